//! Health as kubelets and cloud load balancers ask for it, with kube-proxy's contracts
//! (../shared/KUBE-PROXY-PARITY.md §2):
//! - the agent's own, on `--healthz-bind-address`: `/livez` (healthy: no change has waited
//!   unapplied longer than `--healthz-stale-after`), `/healthz` (healthy, and this node eligible
//!   for load balancer traffic: a node that is going away is drained), `/readyz` (synced once, the
//!   programs attached); and `/health-checks` (what `lbctl health` prints) on the metrics listener;
//! - the health-check node ports ([`HealthCheckServers`]): a LoadBalancer Service with
//!   externalTrafficPolicy Local has its load balancer ask every node, on that port, whether it
//!   has a ready endpoint of the Service.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::State,
    http::{header, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, get},
    Router,
};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use tracing::{info, warn};

use crate::{
    inspect::{HealthCheckView, HealthView, ProbeView},
    model::ServiceHealth,
};

type Labels = Vec<(String, String)>;

/// `--healthz-stale-after`'s default: kube-proxy's, twice its 30 s sync period.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(60);

/// How long an interface that just appeared may go without the programs before `/readyz` says so
/// (the agent attaches on the netlink event, or at worst on its 5 s rescan).
pub const ATTACH_GRACE: Duration = Duration::from_secs(10);

/// IPv4, as a bit of a family mask (kube-proxy's proxier per family).
pub const IPV4: u8 = 1;
/// IPv6, likewise.
pub const IPV6: u8 = 2;

/// What the health endpoints answer from.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// `--healthz-stale-after`, in milliseconds.
    stale_after_ms: AtomicU64,
    synced_once: AtomicBool,
    /// A change was once wholly applied: until then the agent counts as starting, and healthy
    /// (kube-proxy is healthy until its first successful sync).
    applied_once: AtomicBool,
    /// Milliseconds since `started` of the main loop's last turn.
    last_tick_ms: AtomicU64,
    /// The same for the oldest change the source still holds (not sent yet), as the main loop
    /// last read it; 0 = none.
    source_since_ms: AtomicU64,
    /// The last time nothing waited to be applied (kube-proxy's `lastUpdated`). What waits now is
    /// [`Health::pending_since_ms`], from the families' waits.
    last_updated: Mutex<SystemTime>,
    /// The families served ([`IPV4`], and [`IPV6`] with `--ipv6`): kube-proxy reports each
    /// one's health apart (`status`).
    families: AtomicU8,
    /// Each family's own wait (kube-proxy's `oldestPendingQueuedMap` and `lastUpdatedMap`).
    by_family: Mutex<ByFamily>,
    /// Whether this node is eligible for load balancer traffic, and why not.
    node: Mutex<Result<(), String>>,
    /// Interfaces that match `--interfaces` but do not carry the programs: since when (ms since
    /// `started`; 0: from the start, no grace), and the last attach error.
    unattached: Mutex<BTreeMap<String, (u64, Option<String>)>>,
    /// The first attach pass is done (before it, nothing is known to be attached).
    attach_pass_done: AtomicBool,
    /// The health-check node ports, as [`HealthCheckServers`] last set them up.
    checks: RwLock<Checks>,
    pub metrics: HealthMetrics,
}

/// Every answer the health endpoints give, counted.
#[derive(Debug, Default)]
pub struct HealthMetrics {
    /// Answers of `/healthz`, `/livez` and `/readyz`, by path and code.
    pub proxy: Family<Labels, Counter>,
    /// Answers of the health-check node ports, by Service and code.
    pub service: Family<Labels, Counter>,
    /// Times a health-check node port could not be served (taken by another Service, or the
    /// listen failed; counted once per failure, not per retry), by Service.
    pub failures: Family<Labels, Counter>,
    /// Sockets listening for health-check node ports.
    pub listeners: Gauge,
}

#[derive(Debug, Default)]
struct Checks {
    /// `--health-check-node-ports`.
    serving: bool,
    by_service: BTreeMap<String, CheckState>,
    /// Port → the Service that answers on it.
    by_port: BTreeMap<u16, String>,
}

#[derive(Debug, Clone)]
struct CheckState {
    port: u16,
    local_endpoints: usize,
    listening: Vec<SocketAddr>,
    error: Option<String>,
}

impl Health {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            stale_after_ms: AtomicU64::new(DEFAULT_STALE_AFTER.as_millis() as u64),
            synced_once: AtomicBool::new(false),
            applied_once: AtomicBool::new(false),
            last_tick_ms: AtomicU64::new(0),
            source_since_ms: AtomicU64::new(0),
            last_updated: Mutex::new(SystemTime::now()),
            families: AtomicU8::new(IPV4),
            by_family: Mutex::new(ByFamily { pending_ms: [0; 2], updated: [SystemTime::now(); 2] }),
            node: Mutex::new(Ok(())),
            unattached: Mutex::default(),
            attach_pass_done: AtomicBool::new(false),
            checks: RwLock::default(),
            metrics: HealthMetrics::default(),
        }
    }

    /// `--healthz-stale-after`: how long a change may wait to be applied before the agent is
    /// unhealthy.
    pub fn set_stale_after(&self, limit: Duration) {
        self.stale_after_ms.store(limit.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// What the last attach pass found: `failed` (interface, error) do not carry the programs;
    /// every other matching interface does. Interfaces gone are forgotten. What fails in the
    /// first pass (at start) gets no grace: only an interface that appears later does.
    pub fn interfaces(&self, failed: &[(String, String)]) {
        let first = !self.attach_pass_done.swap(true, Ordering::Relaxed);
        let now = if first { 0 } else { self.now_ms() };
        let mut u = self.unattached.lock().expect("not poisoned");
        u.retain(|i, _| failed.iter().any(|(f, _)| f == i));
        for (i, e) in failed {
            u.entry(i.clone()).or_insert((now, None)).1 = Some(e.clone());
        }
    }

    /// Every interface that failed to attach, with its last error.
    pub fn failing(&self) -> BTreeMap<String, String> {
        let u = self.unattached.lock().expect("not poisoned");
        u.iter().map(|(i, (_, e))| (i.clone(), e.clone().unwrap_or_default())).collect()
    }

    /// Interfaces that have gone without the programs longer than [`ATTACH_GRACE`], with why.
    pub fn not_attached(&self) -> Vec<(String, String)> {
        let now = self.now_ms();
        let u = self.unattached.lock().expect("not poisoned");
        u.iter()
            .filter(|(_, (since, _))| {
                *since == 0 || now.saturating_sub(*since) > ATTACH_GRACE.as_millis() as u64
            })
            .map(|(i, (_, e))| (i.clone(), e.clone().unwrap_or_default()))
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// The main loop turned.
    pub fn tick(&self) {
        self.last_tick_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn since_ms(&self, seen: Instant) -> u64 {
        seen.saturating_duration_since(self.started).as_millis() as u64 + 1
    }

    /// The oldest change the source holds, not yet sent (`None`: none), read on the main loop's
    /// tick: it counts from when the source saw it.
    pub fn source_waiting(&self, seen: Option<Instant>) {
        self.source_since_ms.store(seen.map_or(0, |s| self.since_ms(s)), Ordering::Relaxed);
    }

    /// Which families are served: IPv4, and IPv6 with `ipv6`.
    pub fn set_ipv6(&self, ipv6: bool) {
        self.families.store(if ipv6 { IPV4 | IPV6 } else { IPV4 }, Ordering::Relaxed);
    }

    /// A change the source first saw at `seen` is being applied (or writes failed at `seen`): it
    /// waits until [`Health::applied`], in every family until [`Health::writes_failed`] says
    /// which.
    pub fn change_seen(&self, seen: Instant) {
        let at = self.since_ms(seen);
        let then = SystemTime::now() - seen.elapsed();
        let mut f = self.by_family.lock().expect("not poisoned");
        if f.pending_ms == [0; 2] {
            // Everything was applied until this change came.
            *self.last_updated.lock().expect("not poisoned") = then;
        }
        for i in 0..2 {
            if f.pending_ms[i] == 0 {
                // Everything of this family was applied until this change came.
                (f.pending_ms[i], f.updated[i]) = (at, then);
            } else {
                f.pending_ms[i] = f.pending_ms[i].min(at);
            }
        }
    }

    /// Writes of the families in `behind` failed and wait to be retried; the other family's are
    /// all in the maps (its wait ends).
    pub fn writes_failed(&self, behind: u8) {
        let mut f = self.by_family.lock().expect("not poisoned");
        for (i, (bit, _)) in FAMILIES.iter().enumerate() {
            if behind & bit == 0 {
                (f.pending_ms[i], f.updated[i]) = (0, SystemTime::now());
            }
        }
    }

    /// Milliseconds since `started` when the oldest change taken from the source but not yet
    /// wholly in the maps was first seen by the source (the oldest wait of a family); 0 = none.
    fn pending_since_ms(&self) -> u64 {
        let f = self.by_family.lock().expect("not poisoned");
        f.pending_ms.iter().copied().filter(|p| *p != 0).min().unwrap_or(0)
    }

    /// Failed writes were retried, and none is left: what waited is applied.
    pub fn settled(&self) {
        if self.pending_since_ms() != 0 {
            self.applied();
        }
    }

    /// Every change seen is wholly in the maps (no write waits to be retried).
    pub fn applied(&self) {
        self.applied_once.store(true, Ordering::Relaxed);
        let now = SystemTime::now();
        *self.last_updated.lock().expect("not poisoned") = now;
        *self.by_family.lock().expect("not poisoned") = ByFamily { pending_ms: [0; 2], updated: [now; 2] };
    }

    /// A sync (whole or partial) ran.
    pub fn synced(&self) {
        self.synced_once.store(true, Ordering::Relaxed);
        self.tick();
    }

    /// This node's eligibility for load balancer traffic, from its Node object.
    pub fn set_node_eligible(&self, eligible: Result<(), String>) {
        let mut n = self.node.lock().expect("not poisoned");
        if *n != eligible {
            match &eligible {
                Ok(()) => {
                    info!("this node is eligible for load balancer traffic again: /healthz answers 200")
                }
                Err(why) => warn!("{why}: /healthz answers 503, so that load balancers drain this node"),
            }
        }
        *n = eligible;
    }

    pub fn node_eligible(&self) -> Result<(), String> {
        self.node.lock().expect("not poisoned").clone()
    }

    /// `Ok` while the main loop turns and no change has waited longer than
    /// `--healthz-stale-after` to be applied. Until a change was first wholly applied the agent
    /// waits for its source (a large cluster's first list, an API server not up yet), which is no
    /// reason to restart it: `Ok` too, as kube-proxy (`/readyz` tells that it is not ready).
    pub fn healthy(&self) -> Result<(), String> {
        self.judge().verdict
    }

    /// The verdict and each family's health, from one reading of the state (an answer's code,
    /// `healthy`, `reason` and `status` always agree).
    fn judge(&self) -> Judgement {
        let served = self.families.load(Ordering::Relaxed);
        let f = *self.by_family.lock().expect("not poisoned");
        let (now, wall) = (self.now_ms(), SystemTime::now());
        let source = self.source_since_ms.load(Ordering::Relaxed);
        // A family's last update: before its own wait, or before the change its source holds.
        let at = |ms: u64| wall - Duration::from_millis(now.saturating_sub(ms));
        let status = |late: u8| -> Vec<(&'static str, SystemTime, bool)> {
            FAMILIES
                .iter()
                .enumerate()
                .filter(|(_, (bit, _))| served & bit != 0)
                .map(|(i, (bit, name))| {
                    let mut last = if f.pending_ms[i] != 0 { f.updated[i] } else { wall };
                    if source != 0 {
                        last = last.min(at(source));
                    }
                    (*name, last, late & bit == 0)
                })
                .collect()
        };
        if !self.applied_once.load(Ordering::Relaxed) {
            return Judgement { verdict: Ok(()), status: status(0) };
        }
        let limit = self.stale_after_ms.load(Ordering::Relaxed);
        let waited = |since: u64| if since == 0 { 0 } else { now.saturating_sub(since) };
        let tick = self.last_tick_ms.load(Ordering::Relaxed);
        if now.saturating_sub(tick) > limit {
            let verdict = Err(format!(
                "the main loop has not turned for {} ms (--healthz-stale-after {limit} ms)",
                now.saturating_sub(tick)
            ));
            return Judgement { verdict, status: status(served) };
        }
        // The source's change waits for every family; a family's own writes for it alone (one
        // not served any more, for every family served).
        let mut late = 0;
        let mut longest = 0;
        if waited(source) > limit {
            (late, longest) = (served, waited(source));
        }
        for (i, (bit, _)) in FAMILIES.iter().enumerate() {
            if waited(f.pending_ms[i]) > limit {
                late |= if served & bit != 0 { *bit } else { served };
                longest = longest.max(waited(f.pending_ms[i]));
            }
        }
        let verdict = if late == 0 {
            Ok(())
        } else {
            let names: Vec<&str> =
                FAMILIES.iter().filter(|(bit, _)| late & bit != 0).map(|(_, n)| *n).collect();
            Err(format!(
                "a change has waited {longest} ms to be applied ({}; --healthz-stale-after {limit} ms)",
                names.join(", ")
            ))
        };
        Judgement { verdict, status: status(late) }
    }

    /// A full sync is done, and the first attach pass.
    pub fn ready(&self) -> bool {
        self.synced_once.load(Ordering::Relaxed) && self.attach_pass_done.load(Ordering::Relaxed)
    }

    /// `/readyz`: synced once, and every interface that matches carries the programs (one that
    /// just appeared gets [`ATTACH_GRACE`]).
    fn readiness(&self) -> Result<(), String> {
        if !self.synced_once.load(Ordering::Relaxed) {
            return Err("no full sync yet".into());
        }
        if !self.ready() {
            return Err("not attached yet".into());
        }
        let missing = self.not_attached();
        if !missing.is_empty() {
            let lines: Vec<String> = missing.iter().map(|(i, e)| format!("{i}: not attached: {e}")).collect();
            return Err(lines.join("\n"));
        }
        Ok(())
    }

    /// kube-proxy's `lastUpdated`: the last time every change seen had reached the maps (now,
    /// when none waits).
    fn last_updated(&self) -> SystemTime {
        let (pending, source) = (self.pending_since_ms(), self.source_since_ms.load(Ordering::Relaxed));
        let before_source = || {
            let ago = Duration::from_millis(self.now_ms().saturating_sub(source));
            SystemTime::now() - ago
        };
        match (pending, source) {
            (0, 0) => SystemTime::now(),
            (0, _) => before_source(),
            (p, s) if s != 0 && s < p => before_source(),
            _ => *self.last_updated.lock().expect("not poisoned"),
        }
    }

    /// What a health-check node port answers for the Service on `port`: the Service
    /// (`namespace/name`), its local endpoints, and whether the agent is healthy.
    fn service_answer(&self, port: u16) -> (String, usize, bool) {
        let (service, n) = {
            let c = self.checks.read().expect("not poisoned");
            let service = c.by_port.get(&port).cloned().unwrap_or_default();
            let n = c.by_service.get(&service).map_or(0, |s| s.local_endpoints);
            (service, n)
        };
        (service, n, self.healthy().is_ok())
    }

    /// The view `/health-checks` serves and `lbctl health` prints.
    pub fn view(&self) -> HealthView {
        let probe =
            |r: Result<(), String>| ProbeView { code: if r.is_ok() { 200 } else { 503 }, reason: r.err() };
        let healthy = self.healthy();
        let eligible = self.node_eligible();
        let healthz = healthy.clone().and(eligible.clone());
        let c = self.checks.read().expect("not poisoned");
        let services = c
            .by_service
            .iter()
            .map(|(service, s)| HealthCheckView {
                service: service.clone(),
                port: s.port,
                local_endpoints: s.local_endpoints as u64,
                code: if s.local_endpoints > 0 && healthy.is_ok() { 200 } else { 503 },
                listening: s.listening.iter().map(ToString::to_string).collect(),
                error: s.error.clone(),
                probed: None,
            })
            .collect();
        HealthView {
            livez: probe(healthy),
            healthz: probe(healthz),
            readyz: probe(self.readiness()),
            node_eligible: eligible.is_ok(),
            health_check_node_ports: c.serving,
            services,
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

/// kube-proxy's JSON answer: `body` with its headers (and `extra`).
fn json(code: StatusCode, body: &str, extra: Option<(HeaderName, usize)>) -> Response {
    let mut r = (code, body.to_string()).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Some((name, n)) = extra {
        h.insert(name, HeaderValue::from(n));
    }
    r
}

fn timestamp(t: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(t).map(|t| t.to_string()).unwrap_or_default()
}

fn count(h: &Health, path: &str, code: StatusCode) {
    let labels =
        vec![("path".to_string(), path.to_string()), ("code".to_string(), code.as_u16().to_string())];
    h.metrics.proxy.get_or_create(&labels).inc();
}

/// The families by bit and by kube-proxy's name (`v1.IPFamily`).
const FAMILIES: [(u8, &str); 2] = [(IPV4, "IPv4"), (IPV6, "IPv6")];

/// Each family's wait: since when a change waits for it (ms since `started`; 0: none), and the
/// last time nothing of it waited.
#[derive(Debug, Clone, Copy)]
struct ByFamily {
    pending_ms: [u64; 2],
    updated: [SystemTime; 2],
}

/// What [`Health::judge`] found.
struct Judgement {
    verdict: Result<(), String>,
    /// Each family served: its name, last update and health.
    status: Vec<(&'static str, SystemTime, bool)>,
}

/// One family's health in the body of `/healthz` and `/livez` (kube-proxy's `ProxierHealth`).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyBody {
    last_updated: String,
    healthy: bool,
}

/// The body of `/healthz` and `/livez`, in kube-proxy's order.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxyBody {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    /// Whether every family is healthy (`nodeEligible` aside).
    healthy: bool,
    /// Each family served.
    status: BTreeMap<&'static str, FamilyBody>,
    /// Why a 503 (lb's addition).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// `/healthz` and `/livez`, any method: 200 or 503, with kube-proxy's fields (`lastUpdated`,
/// `currentTime`, and `nodeEligible` for `/healthz`), and `reason` on a 503. As kube-proxy, a 200
/// gives the current time as `lastUpdated`.
fn proxy_answer(h: &Health, path: &str) -> Response {
    let eligible = h.node_eligible();
    let judged = h.judge();
    let healthy = judged.verdict.is_ok();
    let mut verdict = judged.verdict;
    if path == "/healthz" {
        verdict = verdict.and(eligible.clone());
    }
    let now = SystemTime::now();
    let (code, last) = match &verdict {
        Ok(()) => (StatusCode::OK, now),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, h.last_updated()),
    };
    let status: BTreeMap<&'static str, FamilyBody> = judged
        .status
        .into_iter()
        .map(|(name, last, healthy)| (name, FamilyBody { last_updated: timestamp(last), healthy }))
        .collect();
    let body = ProxyBody {
        last_updated: timestamp(last),
        current_time: timestamp(now),
        node_eligible: (path == "/healthz").then_some(eligible.is_ok()),
        healthy,
        status,
        reason: verdict.err(),
    };
    count(h, path, code);
    json(code, &serde_json::to_string(&body).unwrap_or_default(), None)
}

async fn healthz(State(h): State<Arc<Health>>) -> Response {
    proxy_answer(&h, "/healthz")
}

async fn livez(State(h): State<Arc<Health>>) -> Response {
    proxy_answer(&h, "/livez")
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, String) {
    let (code, text) = match h.readiness() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    };
    count(&h, "/readyz", code);
    (code, text + "\n")
}

async fn health_checks(State(h): State<Arc<Health>>) -> Response {
    json(StatusCode::OK, &serde_json::to_string(&h.view()).unwrap_or_default(), None)
}

/// The agent's health endpoints, served on `--healthz-bind-address` (where load balancers ask:
/// nothing there names a Service).
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(livez))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// `/health-checks`, what `lbctl health` prints (every health-check node port with its Service):
/// served on the metrics listener, loopback by default.
pub fn status_router(health: Arc<Health>) -> Router {
    Router::new().route("/health-checks", get(health_checks)).with_state(health)
}

/// kube-proxy's answer on a health-check node port, whatever the path and method: 200 when this
/// node has a ready endpoint of the Service and the agent is healthy, else 503.
async fn service_answer(State((h, port)): State<(Arc<Health>, u16)>) -> Response {
    #[derive(serde::Serialize)]
    struct Name<'a> {
        namespace: &'a str,
        name: &'a str,
    }
    /// kube-proxy's body, in its order.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        service: Name<'a>,
        local_endpoints: usize,
        service_proxy_healthy: bool,
    }
    let (service, n, healthy) = h.service_answer(port);
    let (namespace, name) = service.split_once('/').unwrap_or(("", &service));
    let code = if n > 0 && healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = Body { service: Name { namespace, name }, local_endpoints: n, service_proxy_healthy: healthy };
    // A port whose Service just went (a connection kept alive while its listener closes) is
    // not counted.
    if !service.is_empty() {
        let labels =
            vec![("service".to_string(), service.clone()), ("code".to_string(), code.as_u16().to_string())];
        h.metrics.service.get_or_create(&labels).inc();
    }
    let body = serde_json::to_string(&body).unwrap_or_default();
    json(code, &body, Some((HeaderName::from_static("x-load-balancing-endpoint-weight"), n)))
}

/// Why a health-check node port is not served; each names the Service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum HealthCheckError {
    #[error(
        "Service {service}: field spec.healthCheckNodePort: port {port} is already Service {holder}'s health-check node port"
    )]
    Taken { service: String, port: u16, holder: String },
    #[error("Service {service}: health-check node port {addr}: cannot listen: {reason}")]
    Listen { service: String, addr: SocketAddr, reason: String },
    #[error("Service {service}: health-check node port {port}: --nodeport-addresses selects none of this node's addresses")]
    NoAddress { service: String, port: u16 },
}

/// The health-check node ports: one listener for each port and NodePort address of this node,
/// answering for the Service that has the port. Listeners come and go with the Services; a port
/// that cannot be listened on is reported (naming the Service), counted, and tried again on the
/// next [`HealthCheckServers::sync`], while the others work.
pub struct HealthCheckServers {
    health: Arc<Health>,
    /// `--health-check-node-ports`: without it, what the ports would answer is still worked out
    /// (for `lbctl health`), but nothing listens.
    listen: bool,
    /// Each listener's server, and the sender whose drop shuts it down gracefully (keep-alive
    /// connections close too).
    listeners: BTreeMap<SocketAddr, (tokio::task::JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>,
    /// Errors already logged and counted, so that a retry that fails the same way is quiet.
    reported: BTreeSet<HealthCheckError>,
    /// Some listener could not be opened at the last sync.
    failing: bool,
}

impl std::fmt::Debug for HealthCheckServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthCheckServers").field("listen", &self.listen).finish_non_exhaustive()
    }
}

impl HealthCheckServers {
    pub fn new(health: Arc<Health>, listen: bool) -> Self {
        health.checks.write().expect("not poisoned").serving = listen;
        Self { health, listen, listeners: BTreeMap::new(), reported: BTreeSet::new(), failing: false }
    }

    /// Some listener could not be opened at the last [`HealthCheckServers::sync`].
    pub fn failing(&self) -> bool {
        self.failing
    }

    /// Serves `wanted` (Service → its port and local endpoints) on each of `addresses`
    /// (`0.0.0.0`: all of this node's IPv4 addresses; `::`, all of its IPv6 ones): opens the listeners that are missing, closes those no
    /// longer wanted, and updates what the others answer. Two Services with one port: the first
    /// by name has it, one whose objects are rejected now (`held`, serving what it had) last.
    /// Needs a Tokio runtime when listening.
    pub fn sync(
        &mut self,
        wanted: &BTreeMap<String, ServiceHealth>,
        held: &BTreeSet<String>,
        addresses: &[IpAddr],
    ) -> Vec<HealthCheckError> {
        let mut errors = Vec::new();
        let mut by_port: BTreeMap<u16, String> = BTreeMap::new();
        let mut states: BTreeMap<String, CheckState> = BTreeMap::new();
        let (current, kept): (Vec<_>, Vec<_>) = wanted.iter().partition(|(s, _)| !held.contains(*s));
        for (service, h) in current.into_iter().chain(kept) {
            let mut state = CheckState {
                port: h.port,
                local_endpoints: h.local_endpoints,
                listening: Vec::new(),
                error: None,
            };
            match by_port.get(&h.port) {
                Some(holder) => {
                    let e = HealthCheckError::Taken {
                        service: service.clone(),
                        port: h.port,
                        holder: holder.clone(),
                    };
                    state.error = Some(e.to_string());
                    errors.push(e);
                }
                None => {
                    by_port.insert(h.port, service.clone());
                }
            }
            states.insert(service.clone(), state);
        }
        let want: BTreeSet<SocketAddr> = if self.listen {
            by_port.keys().flat_map(|p| addresses.iter().map(|a| SocketAddr::new(*a, *p))).collect()
        } else {
            BTreeSet::new()
        };
        if self.listen && addresses.is_empty() {
            for (port, service) in &by_port {
                let e = HealthCheckError::NoAddress { service: service.clone(), port: *port };
                states.get_mut(service).expect("a state per Service").error = Some(e.to_string());
                errors.push(e);
            }
        }
        // Dropping a listener's sender shuts its server down.
        self.listeners.retain(|a, (task, _)| want.contains(a) && !task.is_finished());
        for addr in &want {
            let service = &by_port[&addr.port()];
            if !self.listeners.contains_key(addr) {
                match self.listen_on(*addr) {
                    Ok(server) => {
                        info!(service, %addr, "serving the health-check node port");
                        self.listeners.insert(*addr, server);
                    }
                    Err(e) => {
                        let e = HealthCheckError::Listen {
                            service: service.clone(),
                            addr: *addr,
                            reason: e.to_string(),
                        };
                        states.get_mut(service).expect("a state per Service").error = Some(e.to_string());
                        errors.push(e);
                        continue;
                    }
                }
            }
            states.get_mut(service).expect("a state per Service").listening.push(*addr);
        }
        // Each failure is logged and counted once, until it clears.
        let now: BTreeSet<HealthCheckError> = errors.iter().cloned().collect();
        for e in now.difference(&self.reported) {
            let service = match e {
                HealthCheckError::Taken { service, .. }
                | HealthCheckError::Listen { service, .. }
                | HealthCheckError::NoAddress { service, .. } => service,
            };
            warn!("{e}");
            self.health.metrics.failures.get_or_create(&vec![("service".into(), service.clone())]).inc();
        }
        self.failing = errors.iter().any(|e| matches!(e, HealthCheckError::Listen { .. }));
        self.reported = now;
        self.health.metrics.listeners.set(self.listeners.len() as i64);
        let mut c = self.health.checks.write().expect("not poisoned");
        c.by_port = by_port;
        c.by_service = states;
        errors
    }

    fn listen_on(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<(tokio::task::JoinHandle<()>, tokio::sync::oneshot::Sender<()>)> {
        // SO_REUSEPORT: a listener of ours still closing (its server stops asynchronously) does
        // not keep the port from the next one. Another process's socket still does, unless it
        // asked for SO_REUSEPORT itself.
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => {
                let s = tokio::net::TcpSocket::new_v6()?;
                // IPv6 only: `::` beside `0.0.0.0` on one port, each family its own listener.
                set_v6_only(&s)?;
                s
            }
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let l = socket.listen(1024)?;
        let app = Router::new().fallback(service_answer).with_state((self.health.clone(), addr.port()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(l, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                warn!(%addr, "health-check node port: {e}");
            }
        });
        Ok((task, stop))
    }
}

/// `IPV6_V6ONLY` on `socket`: it takes IPv6 only, so that the same port's IPv4 listener is
/// another socket.
fn set_v6_only(socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: a valid descriptor and an int of the size given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::{http_get, HttpAnswer};

    const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A port free on loopback now.
    fn free_port() -> u16 {
        std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind").local_addr().expect("addr").port()
    }

    async fn get(port: u16, path: &str) -> std::io::Result<HttpAnswer> {
        get_at(SocketAddr::from((LOCALHOST, port)), path).await
    }

    async fn get_at(to: SocketAddr, path: &str) -> std::io::Result<HttpAnswer> {
        let path = path.to_string();
        tokio::task::spawn_blocking(move || http_get(to, &path, Duration::from_secs(5))).await.expect("join")
    }

    /// Waits (up to 10 s) until nothing listens on `port`.
    async fn closed(port: u16) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match get(port, "/").await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        false
    }

    fn wanted(list: &[(&str, u16, usize)]) -> BTreeMap<String, ServiceHealth> {
        list.iter()
            .map(|(s, port, n)| (s.to_string(), ServiceHealth { port: *port, local_endpoints: *n }))
            .collect()
    }

    fn counted(family: &Family<Labels, Counter>, labels: &[(&str, &str)]) -> u64 {
        let labels: Labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        family.get_or_create(&labels).get()
    }

    /// A healthy agent: a change applied, the loop turning.
    fn healthy() -> Arc<Health> {
        let health = Arc::new(Health::new());
        health.synced();
        health.applied();
        health
    }

    const NONE_HELD: &BTreeSet<String> = &BTreeSet::new();

    /// kube-proxy's answer on a health-check node port, any path: 200 with local endpoints while
    /// healthy, 503 without; its headers and JSON (kube-proxy's field order); the count follows
    /// the Service; the port closes when the Service goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_health_check_node_port_answers_as_kube_proxy_and_follows_its_service() {
        let health = healthy();
        let mut servers = HealthCheckServers::new(health.clone(), true);
        let (p1, p2) = (free_port(), free_port());
        let errors =
            servers.sync(&wanted(&[("shop/web", p1, 2), ("shop/api", p2, 0)]), NONE_HELD, &[LOCALHOST]);
        assert!(errors.is_empty(), "{errors:?}");
        for path in ["/", "/healthz", "/anything/at/all?x=1"] {
            let a = get(p1, path).await.expect("web's port");
            assert_eq!(a.status, 200, "{path}: {a:?}");
            assert_eq!(a.header("content-type"), Some("application/json"));
            assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("2"));
            assert_eq!(
                a.body,
                r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}"#
            );
        }
        let a = get(p2, "/").await.expect("api's port");
        assert_eq!((a.status, a.header("x-load-balancing-endpoint-weight")), (503, Some("0")), "{a:?}");
        assert!(a.body.contains(r#""localEndpoints":0"#) && a.body.contains(r#""name":"api""#), "{}", a.body);
        // web's endpoints leave this node; api gets one.
        servers.sync(&wanted(&[("shop/web", p1, 0), ("shop/api", p2, 1)]), NONE_HELD, &[LOCALHOST]);
        assert_eq!(get(p1, "/").await.expect("web").status, 503);
        assert_eq!(get(p2, "/").await.expect("api").status, 200);
        assert_eq!(counted(&health.metrics.service, &[("service", "shop/web"), ("code", "200")]), 3);
        assert_eq!(counted(&health.metrics.service, &[("service", "shop/web"), ("code", "503")]), 1);
        // web goes: its port closes; api's stays.
        servers.sync(&wanted(&[("shop/api", p2, 1)]), NONE_HELD, &[LOCALHOST]);
        assert!(closed(p1).await, "web's port is closed");
        assert_eq!(get(p2, "/").await.expect("api").status, 200);
        assert_eq!(health.metrics.listeners.get(), 1);
        // Every address (`--nodeport-addresses primary`): answered on loopback too.
        let p3 = free_port();
        let errors = servers.sync(
            &wanted(&[("shop/all", p3, 1)]),
            NONE_HELD,
            &[std::net::Ipv4Addr::UNSPECIFIED.into()],
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(get(p3, "/").await.expect("all").status, 200);
        let view = health.view();
        assert_eq!(view.services.len(), 1);
        assert_eq!(view.services[0].listening, vec![format!("0.0.0.0:{p3}")]);
        assert!(closed(p2).await, "api's port is closed");
    }

    /// Both families on one port: `0.0.0.0` and `::` (IPv6 only) are two listeners, each
    /// answering its own family; an IPv6 address alone answers over IPv6 only; the addresses
    /// changing moves the listeners.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_health_check_node_port_answers_over_ipv4_and_ipv6() {
        let v6_loopback = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
        let health = healthy();
        let mut servers = HealthCheckServers::new(health.clone(), true);
        let port = free_port();
        let both = [std::net::Ipv4Addr::UNSPECIFIED.into(), std::net::Ipv6Addr::UNSPECIFIED.into()];
        let errors = servers.sync(&wanted(&[("shop/web", port, 2)]), NONE_HELD, &both);
        assert!(errors.is_empty(), "{errors:?}");
        for at in [LOCALHOST, v6_loopback] {
            let a = get_at(SocketAddr::new(at, port), "/").await.unwrap_or_else(|e| panic!("{at}: {e}"));
            assert_eq!(a.status, 200, "{at}: {a:?}");
            assert!(a.body.contains(r#""localEndpoints":2"#), "{at}: {}", a.body);
        }
        let view = health.view();
        assert_eq!(view.services[0].listening, vec![format!("0.0.0.0:{port}"), format!("[::]:{port}")]);
        assert_eq!(health.metrics.listeners.get(), 2);
        // An IPv6 node address alone (here ::1): IPv4 is refused, IPv6 answers.
        let errors = servers.sync(&wanted(&[("shop/web", port, 0)]), NONE_HELD, &[v6_loopback]);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(closed(port).await, "the IPv4 listener closed");
        let a = get_at(SocketAddr::new(v6_loopback, port), "/").await.expect("over IPv6");
        assert_eq!(a.status, 503, "{a:?}");
        assert_eq!(health.view().services[0].listening, vec![format!("[::1]:{port}")]);
        // `::` alone takes IPv6 only (IPV6_V6ONLY): IPv4 is refused, not answered by it.
        let only6 = free_port();
        let errors = servers.sync(
            &wanted(&[("shop/web", only6, 1)]),
            NONE_HELD,
            &[std::net::Ipv6Addr::UNSPECIFIED.into()],
        );
        assert!(errors.is_empty(), "{errors:?}");
        let a = get_at(SocketAddr::new(v6_loopback, only6), "/").await.expect("over IPv6");
        assert_eq!(a.status, 200, "{a:?}");
        assert!(closed(only6).await, "IPv4 is not served by the IPv6 listener");
    }

    /// The agent unhealthy (a change held back past the limit): every port answers 503 with
    /// `serviceProxyHealthy: false`, local endpoints or not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unhealthy_agent_fails_every_health_check() {
        let health = healthy();
        health.set_stale_after(Duration::from_millis(200));
        health.change_seen(Instant::now());
        let mut servers = HealthCheckServers::new(health.clone(), true);
        let port = free_port();
        servers.sync(&wanted(&[("shop/web", port, 3)]), NONE_HELD, &[LOCALHOST]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        health.tick();
        // 503 whatever the machine's pace: the change has waited past the limit (and, later, the
        // loop too).
        let a = get(port, "/").await.expect("answer");
        assert_eq!(a.status, 503, "{a:?}");
        assert!(
            a.body.contains(r#""serviceProxyHealthy":false"#) && a.body.contains(r#""localEndpoints":3"#)
        );
        health.set_stale_after(Duration::from_secs(60));
        health.applied();
        health.tick();
        assert_eq!(get(port, "/").await.expect("answer").status, 200);
    }

    /// A port taken (by another process, or another Service) is an error naming the Service,
    /// counted once however many times it is retried; the other ports work; once free, the next
    /// sync listens.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_that_cannot_be_served_names_its_service_and_the_rest_works() {
        let health = healthy();
        let mut servers = HealthCheckServers::new(health.clone(), true);
        let blocker = std::net::TcpListener::bind((LOCALHOST, 0)).expect("bind");
        let (taken, free) = (blocker.local_addr().expect("addr").port(), free_port());
        let want = wanted(&[("shop/a", taken, 1), ("shop/b", free, 1), ("shop/c", free, 1)]);
        for _ in 0..3 {
            let mut errors: Vec<String> =
                servers.sync(&want, NONE_HELD, &[LOCALHOST]).iter().map(ToString::to_string).collect();
            errors.sort();
            assert_eq!(errors.len(), 2, "{errors:?}");
            assert!(
                errors[0].starts_with(&format!(
                    "Service shop/a: health-check node port 127.0.0.1:{taken}: cannot listen"
                )),
                "{errors:?}"
            );
            assert_eq!(
                errors[1],
                format!("Service shop/c: field spec.healthCheckNodePort: port {free} is already Service shop/b's health-check node port")
            );
        }
        for s in ["shop/a", "shop/c"] {
            assert_eq!(counted(&health.metrics.failures, &[("service", s)]), 1, "{s}: once");
        }
        assert_eq!(get(free, "/").await.expect("b's port").status, 200);
        let view = health.view();
        let row = |s: &str| view.services.iter().find(|r| r.service == s).cloned().expect("a row");
        assert!(
            row("shop/a").error.is_some_and(|e| e.contains("cannot listen"))
                && row("shop/a").listening.is_empty()
        );
        assert_eq!(row("shop/b").listening, vec![format!("127.0.0.1:{free}")]);
        assert!(row("shop/c").error.is_some_and(|e| e.contains("shop/b's")));
        drop(blocker);
        assert_eq!(servers.sync(&want, NONE_HELD, &[LOCALHOST]).len(), 1, "a listens now; c still clashes");
        assert_eq!(get(taken, "/").await.expect("a's port").status, 200);
        // b's objects are rejected now (it serves what it had): c, built anew with the port, has
        // it.
        let held = BTreeSet::from(["shop/b".to_string()]);
        let errors = servers.sync(&want, &held, &[LOCALHOST]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].to_string().starts_with("Service shop/b: field spec.healthCheckNodePort"),
            "{errors:?}"
        );
        let a = get(free, "/").await.expect("c's port");
        assert!(a.body.contains(r#""name":"c""#), "{a:?}");
        // --nodeport-addresses selecting none of this node's addresses: each Service says so.
        let errors = servers.sync(&wanted(&[("shop/a", taken, 1)]), NONE_HELD, &[]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("--nodeport-addresses selects none"), "{errors:?}");
        assert!(closed(taken).await && closed(free).await);
    }

    /// `--health-check-node-ports=off`: nothing listens, but what each port would answer is known.
    #[test]
    fn off_listens_nowhere_and_still_tells_what_would_be_answered() {
        let health = healthy();
        let mut servers = HealthCheckServers::new(health.clone(), false);
        let port = free_port();
        assert!(servers.sync(&wanted(&[("shop/web", port, 1)]), NONE_HELD, &[LOCALHOST]).is_empty());
        assert!(std::net::TcpStream::connect((LOCALHOST, port)).is_err(), "nothing listens");
        let v = health.view();
        assert!(!v.health_check_node_ports);
        assert_eq!((v.services.len(), v.services[0].code, v.services[0].listening.len()), (1, 200, 0));
    }

    /// Healthy until a change was first wholly applied (starting, as kube-proxy); then while a
    /// change waits less than the limit, not once it waits longer or the main loop stalls that
    /// long; healthy again once applied. The oldest change counts.
    #[test]
    fn healthy_means_no_change_waits_longer_than_the_limit() {
        let h = Health::new();
        h.set_stale_after(Duration::from_millis(300));
        h.change_seen(Instant::now());
        h.synced();
        std::thread::sleep(Duration::from_millis(400));
        h.tick();
        assert!(h.healthy().is_ok(), "nothing wholly applied yet: starting");
        h.applied();
        assert!(h.healthy().is_ok());
        let first = Instant::now();
        h.change_seen(first);
        h.change_seen(first + Duration::from_millis(200));
        assert!(h.healthy().is_ok(), "a change may wait less than the limit");
        std::thread::sleep(Duration::from_millis(400));
        h.tick();
        let e = h.healthy().expect_err("the first change has waited 400 ms");
        assert!(e.contains("a change has waited") && e.contains("--healthz-stale-after 300 ms"), "{e}");
        h.applied();
        assert!(h.healthy().is_ok());
        std::thread::sleep(Duration::from_millis(400));
        assert!(h.healthy().expect_err("stalled").contains("main loop"));
        h.tick();
        // Failed writes retried by the sweep: they wait from when they failed, until retried.
        h.change_seen(Instant::now());
        h.settled();
        assert!(h.healthy().is_ok() && h.pending_since_ms() == 0);
    }

    /// Each family waits from its own oldest failed change (kube-proxy's
    /// `oldestPendingQueuedMap`): one that is late does not make the other's fresh failure late,
    /// nor keep the agent unhealthy once its own writes went in; a family no longer served that
    /// waits counts against those served.
    #[test]
    fn each_family_waits_from_its_own_oldest_change() {
        let h = Health::new();
        h.set_ipv6(true);
        h.set_stale_after(Duration::from_millis(300));
        h.synced();
        h.applied();
        let status = |h: &Health| -> Vec<(&str, bool)> {
            h.judge().status.iter().map(|(n, _, ok)| (*n, *ok)).collect()
        };
        // IPv4's writes fail, and stay failed past the limit.
        h.change_seen(Instant::now());
        h.writes_failed(IPV4);
        std::thread::sleep(Duration::from_millis(400));
        h.tick();
        assert_eq!(status(&h), [("IPv4", false), ("IPv6", true)]);
        assert!(h.healthy().expect_err("IPv4 late").contains("(IPv4;"));
        // A new change fails its IPv6 writes while IPv4's retry goes in: IPv6 waits from now.
        h.change_seen(Instant::now());
        h.writes_failed(IPV6);
        assert_eq!(status(&h), [("IPv4", true), ("IPv6", true)]);
        assert!(h.healthy().is_ok(), "IPv6 has waited less than the limit");
        std::thread::sleep(Duration::from_millis(400));
        h.tick();
        assert_eq!(status(&h), [("IPv4", true), ("IPv6", false)]);
        // IPv6 no longer served while its writes wait: every family served counts it.
        h.set_ipv6(false);
        assert_eq!(status(&h), [("IPv4", false)]);
        assert!(h.healthy().is_err());
        h.applied();
        assert_eq!(status(&h), [("IPv4", true)]);
    }

    /// A change the source still holds counts from when it was seen, as long as the source holds
    /// it; once the source holds nothing (sent, or dropped as nothing to send) it no longer counts.
    #[test]
    fn a_change_the_source_holds_counts_while_it_holds_it() {
        let h = Health::new();
        h.set_stale_after(Duration::from_millis(300));
        h.synced();
        h.applied();
        let seen = Instant::now();
        h.source_waiting(Some(seen));
        assert!(h.healthy().is_ok());
        std::thread::sleep(Duration::from_millis(400));
        h.tick();
        h.source_waiting(Some(seen));
        assert!(h.healthy().expect_err("held too long").contains("a change has waited"));
        let last = h.last_updated();
        assert!(
            SystemTime::now().duration_since(last).is_ok_and(|d| d >= Duration::from_millis(350)),
            "lastUpdated is from before the change"
        );
        h.source_waiting(None);
        assert!(h.healthy().is_ok(), "nothing held: no change waits");
        let last = h.last_updated();
        assert!(last.elapsed().is_ok_and(|d| d < Duration::from_millis(100)), "now, when nothing waits");
    }
}
