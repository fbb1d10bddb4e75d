//! The agent's own health, kube-proxy's contract: `/livez` says whether every change has reached
//! the maps within `--healthz-stale-after`; `/healthz` says that and whether this node is
//! eligible for load balancer traffic (its Node object not being deleted nor tainted
//! `ToBeDeletedByClusterAutoscaler`). Driven through the in-process API server and kube's real
//! client, with the real agent and health router, over real HTTP.

use std::time::{Duration, Instant};

use lb_agent::{
    agent::Agent,
    inspect::{http_get, HttpAnswer},
    model::Context,
    reconcile::{Capacities, MemoryMaps, Options, Reconciler},
    source::{kube::KubeSource, Change},
};
use lb_testkit::api::MockApi;
use serde_json::{json, Value};
use tokio::sync::mpsc::Receiver;

const STALE_AFTER: Duration = Duration::from_secs(5);

fn node(extra: Value) -> Value {
    let mut n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}});
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            match (k.as_str(), v) {
                ("metadata", Value::Object(m)) => {
                    n["metadata"].as_object_mut().expect("metadata").extend(m);
                }
                (k, v) => {
                    n[k] = v;
                }
            }
        }
    }
    n
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": 80, "protocol": "TCP"}]}})
}

fn slice(name: &str, service: &str, ip: &str) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "nodeName": "node1"}]})
}

struct Harness {
    api: MockApi,
    _source: KubeSource,
    agent: Agent<MemoryMaps>,
    changes: Receiver<Change>,
    health: std::net::SocketAddr,
}

impl Harness {
    async fn start(api: MockApi) -> Self {
        let (tx, changes) = lb_agent::source::channel();
        let source = KubeSource::start(api.client(), Some("node1"), tx);
        let caps = Capacities { services: 64, backends: 64, maglev_slots: 1 << 16, ..Capacities::default() };
        let ctx = Context { node_name: Some("node1".into()), ..Context::default() };
        let agent = Agent::new(MemoryMaps::default(), Reconciler::new(caps, Options::default()), ctx);
        agent.health.set_stale_after(STALE_AFTER);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let health = l.local_addr().expect("addr");
        let router = lb_agent::health::router(agent.health.clone());
        tokio::spawn(async move { axum::serve(l, router).await });
        Self { api, _source: source, agent, changes, health }
    }

    /// Runs the agent's loop for `d`: changes applied as they arrive, the loop's tick, and the
    /// retry of failed writes (the sweep tick), every 100 ms.
    async fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if let Ok(Some(change)) =
                tokio::time::timeout(Duration::from_millis(100), self.changes.recv()).await
            {
                self.agent.apply(change);
            }
            self.agent.health.tick();
            self.agent.sweep(0);
        }
    }

    async fn get(&self, path: &str) -> (HttpAnswer, Value) {
        let (to, path) = (self.health, path.to_string());
        let a = tokio::task::spawn_blocking(move || http_get(to, &path, Duration::from_secs(5)))
            .await
            .expect("join")
            .expect("the health endpoint answers");
        assert_eq!(a.header("content-type"), Some("application/json"), "{a:?}");
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"), "{a:?}");
        let body = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("{e}: {:?}", a.body));
        (a, body)
    }

    /// An agent on node1 with Service `web`, its first change applied.
    async fn synced() -> Self {
        let api = MockApi::start().await;
        api.apply(node(json!({})));
        api.apply(service("web", "10.96.0.10"));
        api.apply(slice("web-1", "web", "10.244.1.2"));
        let mut h = Self::start(api).await;
        h.until_synced().await;
        h
    }

    /// Runs the loop until the first change is applied (Service `web` programmed); until then
    /// the agent counts as starting, and healthy.
    async fn until_synced(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.agent.maps.services.is_empty() {
            assert!(Instant::now() < deadline, "the first change never came");
            self.run_for(Duration::from_millis(100)).await;
        }
    }

    /// Runs the loop until `path` answers `code`; panics after 30 s (the watch's relist backoff
    /// on a busy machine). Returns the answer's body.
    async fn until(&mut self, path: &str, code: u16, what: &str) -> Value {
        self.until_with(path, code, what, |_| true).await
    }

    /// As [`Harness::until`], until the answer's body also satisfies `done`.
    async fn until_with(
        &mut self,
        path: &str,
        code: u16,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (a, body) = self.get(path).await;
            if a.status == code && done(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "{what}: {path} still answers {}: {}", a.status, a.body);
            self.run_for(Duration::from_millis(200)).await;
        }
    }
}

fn timestamp(v: &Value, field: &str) -> k8s_openapi::jiff::Timestamp {
    v[field].as_str().and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{field} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_follows_the_nodes_eligibility_and_livez_does_not() {
    let mut h = Harness::synced().await;
    let body = h.until("/healthz", 200, "start").await;
    assert_eq!(body["nodeEligible"], true, "{body}");
    assert_eq!(timestamp(&body, "lastUpdated"), timestamp(&body, "currentTime"), "as kube-proxy: {body}");
    let (a, body) = h.get("/livez").await;
    assert_eq!(a.status, 200);
    assert!(body.get("nodeEligible").is_none() && body.get("currentTime").is_some(), "{body}");

    // The cluster autoscaler marks the node for deletion: load balancers are told to drain it,
    // while the agent stays live (a liveness probe must not restart it).
    let tainted = json!({"spec": {"taints": [
        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1733250000", "effect": "NoSchedule"}]}});
    h.api.apply(node(tainted));
    let body = h.until("/healthz", 503, "tainted").await;
    assert_eq!(body["nodeEligible"], false, "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("ToBeDeletedByClusterAutoscaler")), "{body}");
    assert_eq!(h.get("/livez").await.0.status, 200, "live while draining");
    // The autoscaler changes its mind: eligible again.
    h.api.apply(node(
        json!({"spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
    ));
    h.until("/healthz", 200, "taint removed").await;

    // The Node is being deleted (a finalizer holds it).
    h.api.apply(node(json!({"metadata": {"deletionTimestamp": "2026-12-03T20:00:00Z", "finalizers": ["example.com/hold"]}})));
    let body = h.until("/healthz", 503, "deletionTimestamp").await;
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("being deleted")), "{body}");
    assert_eq!(h.get("/livez").await.0.status, 200);
    // And gone.
    h.api.delete(node(json!({})));
    let gone = |b: &Value| b["reason"].as_str().is_some_and(|r| r.contains("Node object is gone"));
    h.until_with("/healthz", 503, "Node deleted", gone).await;
    let answers = |path: &str, code: &str| {
        let labels = vec![("path".to_string(), path.to_string()), ("code".to_string(), code.to_string())];
        h.agent.health.metrics.proxy.get_or_create(&labels).get()
    };
    assert!(
        answers("/healthz", "503") >= 3 && answers("/healthz", "200") >= 2 && answers("/livez", "200") >= 3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_held_back_past_the_limit_fails_livez_and_healthz_until_it_is_applied() {
    let mut h = Harness::synced().await;
    h.until("/livez", 200, "start").await;
    // The maps refuse the next Service's entry: its change waits, retried on every tick.
    h.agent.maps.fail_services = true;
    let held_at = Instant::now();
    h.api.apply(service("api", "10.96.0.11"));
    h.api.apply(slice("api-1", "api", "10.244.1.3"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !h.agent.reconciler.has_failed_writes() {
        assert!(Instant::now() < deadline, "the change never came");
        h.run_for(Duration::from_millis(50)).await;
    }
    let (a, _) = h.get("/livez").await;
    if held_at.elapsed() < STALE_AFTER {
        assert_eq!(a.status, 200, "a change may wait less than --healthz-stale-after: {}", a.body);
    }
    for path in ["/livez", "/healthz"] {
        let body = h.until(path, 503, "held back").await;
        assert!(held_at.elapsed() >= STALE_AFTER, "{path} failed before the limit: {body}");
        assert!(body["reason"].as_str().is_some_and(|r| r.contains("a change has waited")), "{body}");
        let (last, now) = (timestamp(&body, "lastUpdated"), timestamp(&body, "currentTime"));
        let behind = now.duration_since(last).as_secs_f64();
        assert!(behind >= STALE_AFTER.as_secs_f64(), "lastUpdated is when all was last applied: {body}");
    }
    assert_eq!(h.get("/healthz").await.1["nodeEligible"], true, "the node itself is eligible");
    // The maps take writes again: the retry applies the change, and the agent is healthy.
    h.agent.maps.fail_services = false;
    h.until("/livez", 200, "applied").await;
    h.until("/healthz", 200, "applied").await;
    assert!(!h.agent.reconciler.has_failed_writes());
}

/// kube-proxy's proxy health per family (`status`, its proxier per family): a change whose
/// IPv6 writes are held back past the limit makes the IPv6 family unhealthy and `/livez` fail,
/// naming the family, while the IPv4 family, whose writes went in, stays healthy with a current
/// `lastUpdated`; applied, both are healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_health_is_reported_per_family() {
    let mut h = Harness::synced().await;
    let (a, body) = h.get("/livez").await;
    assert_eq!(a.status, 200, "{body}");
    assert_eq!(body["healthy"], true, "{body}");
    for family in ["IPv4", "IPv6"] {
        assert_eq!(body["status"][family]["healthy"], true, "{family}: {body}");
    }
    // The maps refuse IPv6 Service entries: a dual-stack Service's IPv6 frontend waits.
    h.agent.maps.fail_services6 = true;
    let held_at = Instant::now();
    let mut dual = service("both", "10.96.0.12");
    dual["spec"]["clusterIPs"] = json!(["10.96.0.12", "fd00:10:96::12"]);
    dual["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    dual["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
    h.api.apply(dual);
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.agent.reconciler.families_behind() == 0 {
        assert!(Instant::now() < deadline, "the change never came");
        h.run_for(Duration::from_millis(50)).await;
    }
    assert_eq!(h.agent.reconciler.families_behind(), lb_agent::health::IPV6, "only IPv6 writes wait");
    let body = h.until("/livez", 503, "IPv6 held back").await;
    assert!(held_at.elapsed() >= STALE_AFTER, "failed before the limit: {body}");
    assert_eq!(body["healthy"], false, "{body}");
    assert_eq!(body["status"]["IPv6"]["healthy"], false, "{body}");
    assert_eq!(body["status"]["IPv4"]["healthy"], true, "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("(IPv6;")), "the family is named: {body}");
    let now = timestamp(&body, "currentTime");
    let ipv6 = now.duration_since(timestamp(&body["status"]["IPv6"], "lastUpdated")).as_secs_f64();
    let ipv4 = now.duration_since(timestamp(&body["status"]["IPv4"], "lastUpdated")).as_secs_f64();
    assert!(ipv6 >= STALE_AFTER.as_secs_f64(), "IPv6 last updated before the change: {body}");
    assert!(ipv4 < STALE_AFTER.as_secs_f64(), "IPv4 is up to date: {body}");
    h.agent.maps.fail_services6 = false;
    let body = h.until("/livez", 200, "applied").await;
    assert_eq!(
        (body["status"]["IPv4"]["healthy"].clone(), body["status"]["IPv6"]["healthy"].clone()),
        (json!(true), json!(true))
    );
}
