//! The Kubernetes source against an in-process API server speaking the real list and watch
//! protocol, through kube's real client. Each scenario asserts what the maps hold afterwards.

use std::time::{Duration, Instant};

use lb_agent::{
    agent::Agent,
    model::Context,
    reconcile::{Capacities, MemoryMaps, Options, Reconciler},
    source::{kube::KubeSource, Change, What},
};
use lb_testkit::{api::MockApi, dump};
use serde_json::{json, Value};
use tokio::sync::mpsc::Receiver;

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

fn slice(name: &str, service: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node1"}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints})
}

fn node(zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": zone}}})
}

struct Harness {
    api: MockApi,
    source: KubeSource,
    agent: Agent<MemoryMaps>,
    changes: Receiver<Change>,
}

impl Harness {
    async fn start(api: MockApi) -> Self {
        let (tx, mut changes) = lb_agent::source::channel();
        let source = KubeSource::start(api.client(), Some("node1"), tx);
        // The first change holds everything, once every store has a complete list.
        let first = tokio::time::timeout(Duration::from_secs(20), changes.recv())
            .await
            .expect("stores ready")
            .expect("a first change");
        let caps =
            Capacities { services: 4096, backends: 65_536, maglev_slots: 1 << 24, ..Capacities::default() };
        let opts = Options::default();
        let ctx = Context { node_name: Some("node1".into()), ..Context::default() };
        let mut agent = Agent::new(MemoryMaps::default(), Reconciler::new(caps, opts), ctx);
        assert!(matches!(first.what, What::All(_)), "the first change holds everything");
        agent.apply(first);
        Self { api, source, agent, changes }
    }

    fn dump(&self) -> String {
        dump::render(&self.agent.maps)
    }

    /// Applies, as the agent does, the changes that arrive within `wait` (and any right behind
    /// them). Returns whether one did.
    async fn apply_arrivals(&mut self, wait: Duration) -> bool {
        let Ok(Some(change)) = tokio::time::timeout(wait, self.changes.recv()).await else { return false };
        self.agent.apply(change);
        while let Ok(change) = self.changes.try_recv() {
            self.agent.apply(change);
        }
        true
    }

    /// Applies changes as they arrive until `done(dump)` holds; panics after 10 s.
    async fn settle(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        // Generous: a busy machine delays the watches' backoff and relists.
        self.settle_within(Duration::from_secs(30), what, done).await;
    }

    async fn settle_within(&mut self, within: Duration, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        while !done(&self.dump()) {
            assert!(Instant::now() < deadline, "{what}: maps never got there:\n{}", self.dump());
            self.apply_arrivals(Duration::from_millis(100)).await;
        }
    }
}

fn backends_of(dump: &str, vip: &str) -> Option<usize> {
    dump.lines()
        .find(|l| l.starts_with(&format!("frontend {vip}:80/TCP")))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("backends=")))
        .and_then(|n| n.parse().ok())
}

async fn api_with_web() -> MockApi {
    let api = MockApi::start().await;
    api.apply(node("zone-a"));
    api.apply(service("web", "10.96.0.10"));
    api.apply(slice("web-1", "web", &["10.244.1.2", "10.244.1.3"]));
    api
}

#[tokio::test]
async fn initial_list_then_add_modify_delete_events() {
    let mut h = Harness::start(api_with_web().await).await;
    assert_eq!(backends_of(&h.dump(), "10.96.0.10"), Some(2), "initial list:\n{}", h.dump());
    assert_eq!(h.agent.ctx.zone.as_deref(), Some("zone-a"), "zone from this node's label");

    h.api.apply(slice("web-1", "web", &["10.244.1.2", "10.244.1.3", "10.244.1.4"]));
    h.settle("modified slice", |d| backends_of(d, "10.96.0.10") == Some(3)).await;

    h.api.apply(service("api", "10.96.0.11"));
    h.api.apply(slice("api-1", "api", &["10.244.2.2"]));
    h.settle("added service", |d| backends_of(d, "10.96.0.11") == Some(1)).await;

    h.api.delete(service("api", "10.96.0.11"));
    h.settle("deleted service", |d| backends_of(d, "10.96.0.11").is_none()).await;
    assert_eq!(backends_of(&h.dump(), "10.96.0.10"), Some(3));

    // Cached objects carry no managed fields.
    assert!(h.source.objects().services.iter().all(|s| s
        .metadata
        .managed_fields
        .as_ref()
        .is_none_or(Vec::is_empty)));

    h.api.apply(node("zone-b"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.agent.ctx.zone.as_deref() != Some("zone-b") {
        assert!(Instant::now() < deadline, "the node's new zone never arrived");
        h.apply_arrivals(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_slice_relabelled_to_another_service_updates_both() {
    let mut h = Harness::start(api_with_web().await).await;
    h.api.apply(service("api", "10.96.0.11"));
    h.api.apply(slice("api-1", "api", &["10.244.2.2"]));
    h.settle("api programmed", |d| backends_of(d, "10.96.0.11") == Some(1)).await;
    // web-1 now belongs to api: web has no endpoint left, api has both slices' (one watch event,
    // which names only the new Service).
    h.api.apply(slice("web-1", "api", &["10.244.1.2", "10.244.1.3"]));
    h.settle("both Services updated", |d| {
        backends_of(d, "10.96.0.10") == Some(0) && backends_of(d, "10.96.0.11") == Some(3)
    })
    .await;
}

#[tokio::test]
async fn bookmarks_and_a_dropped_watch_lose_nothing() {
    let mut h = Harness::start(api_with_web().await).await;
    let (_, watches_before) = h.api.requests();
    h.api.bookmark();
    h.api.drop_watches();
    // A change made right after the drop arrives through the reconnected watch (from its
    // resourceVersion), not through a relist.
    h.api.apply(slice("web-1", "web", &["10.244.1.9"]));
    h.settle("change after a dropped watch", |d| {
        backends_of(d, "10.96.0.10") == Some(1) && d.contains("10.244.1.9:8080/TCP 1021/1021")
    })
    .await;
    let (lists, watches) = h.api.requests();
    assert!(watches > watches_before, "the watches reconnected");
    assert_eq!(lists, 3, "no relist was needed: one list per resource");
}

#[tokio::test]
async fn gone_410_relists_and_objects_deleted_meanwhile_go() {
    let mut h = Harness::start(api_with_web().await).await;
    h.api.apply(service("old", "10.96.0.12"));
    h.api.apply(slice("old-1", "old", &["10.244.3.3"]));
    h.settle("old service", |d| backends_of(d, "10.96.0.12") == Some(1)).await;

    // The agent is cut off; meanwhile `old` is deleted and the history compacted, so its
    // deletion is never delivered as an event: only the relist after 410 Gone shows it.
    h.api.hold_watches(true);
    h.api.drop_watches();
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.api.delete(slice("old-1", "old", &["10.244.3.3"]));
    h.api.delete(service("old", "10.96.0.12"));
    h.api.compact();
    h.api.hold_watches(false);
    h.settle("relist after 410", |d| backends_of(d, "10.96.0.12").is_none()).await;
    let d = h.dump();
    assert_eq!(backends_of(&d, "10.96.0.10"), Some(2), "the rest stays:\n{d}");
    assert!(
        d.contains("backend 10.244.3.3:8080/TCP terminating"),
        "the vanished backend drains, then goes:\n{d}"
    );
}

#[tokio::test]
async fn slow_and_failing_lists_never_yield_a_partial_view() {
    let api = api_with_web().await;
    api.set_slow_lists(Duration::from_millis(1_500));
    let started = Instant::now();
    let mut h = Harness::start(api).await;
    assert!(started.elapsed() >= Duration::from_millis(1_400), "ready only after the slow lists");
    assert_eq!(backends_of(&h.dump(), "10.96.0.10"), Some(2));

    // A relist that fails twice and is slow: until it completes the last good view stays whole.
    h.api.set_slow_lists(Duration::from_millis(300));
    h.api.fail_lists(2);
    h.api.hold_watches(true);
    h.api.drop_watches();
    h.api.apply(slice("web-1", "web", &["10.244.1.2", "10.244.1.3", "10.244.1.5"]));
    h.api.compact();
    h.api.hold_watches(false);
    let deadline = Instant::now() + Duration::from_millis(400);
    while Instant::now() < deadline {
        h.apply_arrivals(Duration::from_millis(50)).await;
        let n = backends_of(&h.dump(), "10.96.0.10");
        assert!(n == Some(2) || n == Some(3), "a partial view was programmed:\n{}", h.dump());
    }
    h.settle("relist done", |d| backends_of(d, "10.96.0.10") == Some(3)).await;
}

#[tokio::test]
async fn api_server_away_for_a_minute_then_back_converges_with_no_stale_backend() {
    let mut h = Harness::start(api_with_web().await).await;
    h.api.apply(service("old", "10.96.0.12"));
    h.api.apply(slice("old-1", "old", &["10.244.3.3"]));
    h.settle("old service", |d| backends_of(d, "10.96.0.12") == Some(1)).await;
    let before = h.dump();

    // The API server goes away; meanwhile web's endpoints change, `old` is deleted, `new` is
    // created, and the history is compacted (the agent will have to relist).
    h.api.set_down(true);
    // Let the open watches end before anything changes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.api.apply(slice("web-1", "web", &["10.244.1.7"]));
    h.api.delete(slice("old-1", "old", &["10.244.3.3"]));
    h.api.delete(service("old", "10.96.0.12"));
    h.api.apply(service("new", "10.96.0.13"));
    h.api.apply(slice("new-1", "new", &["10.244.4.4"]));
    h.api.compact();
    // For 60 s the agent keeps serving the last good state, whatever its source reports.
    let away = Instant::now() + Duration::from_secs(60);
    while Instant::now() < away {
        h.apply_arrivals(Duration::from_millis(500)).await;
        assert_eq!(h.dump(), before, "the state changed while the API server was away");
    }
    let (lists_before, _) = h.api.requests();

    h.api.set_down(false);
    // The client backs off while the server is away as client-go (and so kube-proxy) does: up to
    // 30 s between attempts, doubled at most by jitter, for each of its three watches.
    // 60 s at worst until the next attempt, then the relist of each watch; the rest is room for a
    // machine busy with other tests (90 s was once not enough there, in a fresh-clone run, while
    // the same test alone converged 13 s after the server came back).
    h.settle_within(Duration::from_secs(150), "back after 60 s away", |d| {
        backends_of(d, "10.96.0.10") == Some(1)
            && backends_of(d, "10.96.0.12").is_none()
            && backends_of(d, "10.96.0.13") == Some(1)
    })
    .await;
    let d = h.dump();
    assert!(d.contains("10.244.1.7:8080/TCP"), "web's new endpoint:\n{d}");
    for stale in ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP", "10.244.3.3:8080/TCP"] {
        assert!(
            d.lines().all(|l| !l.contains(stale) || l.contains("terminating")),
            "{stale} is only draining, in no frontend:\n{d}"
        );
    }
    assert!(h.api.requests().0 > lists_before, "the agent relisted");
}

#[tokio::test]
async fn hostile_objects_from_the_api_are_rejected_one_by_one() {
    let api = api_with_web().await;
    // Objects an API server would store: 10,000 endpoints in one slice, a thousand ports, a
    // slice of another address type, a slice for no Service, and a ClusterIP that is no IPv4
    // address (older servers, or a hand-edited etcd).
    let big: Vec<String> = (0..10_000).map(|i| format!("10.250.{}.{}", i / 250, i % 250 + 1)).collect();
    let big_refs: Vec<&str> = big.iter().map(String::as_str).collect();
    api.apply(service("big", "10.96.0.20"));
    api.apply(slice("big-1", "big", &big_refs));
    let mut ports = service("ports", "10.96.0.21");
    ports["spec"]["ports"] = (0..1000)
        .map(|p| json!({"name": format!("p{p}"), "port": 1000 + p, "targetPort": 8080, "protocol": "TCP"}))
        .collect();
    api.apply(ports);
    let mut fqdn = slice("fqdn-1", "web", &["example.com"]);
    fqdn["addressType"] = json!("FQDN");
    api.apply(fqdn);
    api.apply(slice("orphan-1", "nobody", &["10.244.9.9"]));
    api.apply(service("badip", "10.96.0.300"));
    let mut h = Harness::start(api).await;
    h.settle("hostile objects", |d| backends_of(d, "10.96.0.20") == Some(10_000)).await;
    let d = h.dump();
    assert_eq!(backends_of(&d, "10.96.0.10"), Some(2), "web untouched by the FQDN slice:\n{d}");
    assert_eq!(d.lines().filter(|l| l.starts_with("frontend 10.96.0.21:")).count(), 1000, "a thousand ports");
    assert!(!d.contains("10.96.0.300") && !d.contains("10.244.9.9"), "nothing from the bad ones:\n{d}");
}
