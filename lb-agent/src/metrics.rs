//! Prometheus metrics, and the listeners of the metrics and health endpoints.
//!
//! Agent-side metrics are updated as the agent works: sync duration and network programming
//! latency (histograms in the spirit of kube-proxy's `sync_proxy_rules_duration_seconds` and
//! `network_programming_duration_seconds`), what is programmed, and configuration errors by
//! reason. Datapath metrics are read at scrape time from the pinned per-CPU maps (counters by
//! outcome and drop reason, per-frontend packets, bytes, new flows and drops) and map occupancy,
//! so nothing is added to the packet path or the sync loop.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use lb_common::capacity::Capacities;

use crate::{datapath::Maps, health::Health, reconcile::encode::state_name};

type Labels = Vec<(String, String)>;

/// Metrics the agent updates.
#[derive(Debug)]
pub struct Metrics {
    /// Seconds from a change being seen (file event, watch event) to the maps being written.
    pub programming_latency: Histogram,
    /// Seconds one sync takes (model, diff, map writes).
    pub sync_duration: Histogram,
    pub syncs: Counter,
    /// Configuration errors, counted once each when first seen, by reason and kind.
    pub config_errors: Family<Labels, Counter>,
    /// Map write failures by reason (map full, write failed).
    pub sync_errors: Family<Labels, Counter>,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub maglev_slots_used: Gauge,
    /// Frontends whose Service is gone, kept for their established flows.
    pub tombstones: Gauge,
    /// Members that left their frontend, kept for their established flows.
    pub departed_members: Gauge,
    /// Live flows the last complete sweep pass counted.
    pub live_flows: Gauge,
    pub sweep_passes: Counter,
    /// Entries the sweep removed, by what they were (`expired`, `stale_reply`, `affinity`).
    pub swept: Family<Labels, Counter>,
    /// Sweep steps that failed (a map could not be read or written); the next step tries again.
    pub sweep_errors: Counter,
    /// Take-overs from another pin layout version, by layout and outcome (`carried`: its state
    /// was read; `rebuilt`: filled from the source; `failed`: a step failed, retried).
    pub layout_takeovers: Family<Labels, Counter>,
    /// Packets that would have started a flow, dropped while another layout's links were taken
    /// over (their senders retransmit).
    pub layout_takeover_held: Counter,
    /// Connected UDP sockets aborted because the backend the socket programs sent them to left
    /// their Service.
    pub socket_udp_aborted: Counter,
    /// Kernel features lb would use that this kernel lacks (1 each), with what lb does instead.
    pub kernel_missing: Family<Labels, Gauge>,
    /// Interfaces that match but could not be attached (1 each, while so).
    pub attach_failed: Family<Labels, Gauge>,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            // 100 µs to about 13 s.
            programming_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            sync_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            syncs: Counter::default(),
            config_errors: Family::default(),
            sync_errors: Family::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            maglev_slots_used: Gauge::default(),
            tombstones: Gauge::default(),
            departed_members: Gauge::default(),
            live_flows: Gauge::default(),
            sweep_passes: Counter::default(),
            swept: Family::default(),
            sweep_errors: Counter::default(),
            layout_takeovers: Family::default(),
            layout_takeover_held: Counter::default(),
            socket_udp_aborted: Counter::default(),
            kernel_missing: Family::default(),
            attach_failed: Family::default(),
        }
    }

    pub fn layout_takeover(&self, from: &str, outcome: &str) {
        self.layout_takeovers
            .get_or_create(&vec![("from".into(), from.into()), ("outcome".into(), outcome.into())])
            .inc();
    }

    pub fn config_error(&self, reason: &str) {
        self.config_errors.get_or_create(&vec![("reason".into(), reason.into())]).inc();
    }

    pub fn sync_error(&self, reason: &str) {
        self.sync_errors.get_or_create(&vec![("reason".into(), reason.into())]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads the datapath's counters from the pinned maps on each scrape.
#[derive(Debug)]
pub struct DatapathCollector {
    pin_dir: PathBuf,
    caps: Capacities,
    metrics: Arc<Metrics>,
    /// Counting conntrack entries walks the map: done at most every 30 s.
    ct_count: Mutex<Option<(Instant, u64, u64)>>,
}

impl DatapathCollector {
    pub fn new(pin_dir: PathBuf, caps: Capacities, metrics: Arc<Metrics>) -> Self {
        Self { pin_dir, caps, metrics, ct_count: Mutex::new(None) }
    }
}

/// Encodes one metric family from values computed at scrape time.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: Vec<(Labels, M)>,
    metric_type: prometheus_client::metrics::MetricType,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, m) in values {
        m.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: Vec<(Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let values = values.into_iter().map(|(l, v)| (l, ConstCounter::new(v))).collect();
    family(encoder, name, help, values, prometheus_client::metrics::MetricType::Counter)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: Vec<(Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let values = values.into_iter().map(|(l, v)| (l, ConstGauge::new(v))).collect();
    family(encoder, name, help, values, prometheus_client::metrics::MetricType::Gauge)
}

fn label(k: &str, v: impl Into<String>) -> Labels {
    vec![(k.to_string(), v.into())]
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let maps = match Maps::from_pins_read_only(&self.pin_dir) {
            Ok(maps) => maps,
            // Nothing pinned yet: no datapath figures.
            Err(crate::datapath::DatapathError::NotPinned(_)) => return Ok(()),
            Err(e) => {
                tracing::warn!("metrics: the datapath's maps cannot be read: {e}");
                return Ok(());
            }
        };
        // The same view `lbctl stats` prints.
        let stats = crate::inspect::stats(&maps).ok();
        let counters = stats.as_ref().map(|s| s.counters.clone()).unwrap_or_default();
        let events = counters
            .iter()
            .filter(|(n, _)| !n.starts_with("drop_"))
            .map(|(n, v)| (label("event", n.as_str()), *v))
            .collect();
        counter(
            &mut encoder,
            "lb_datapath_packets",
            "Packets seen by the datapath, by event (rx, pass reasons, forward, reverse NAT)",
            events,
        )?;
        let drops = counters
            .iter()
            .filter_map(|(n, v)| n.strip_prefix("drop_").map(|r| (label("reason", r), *v)))
            .collect();
        counter(&mut encoder, "lb_datapath_drops", "Packets dropped by the datapath, by reason", drops)?;
        let mut per = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for s in stats.map(|s| s.services).unwrap_or_default() {
            let l: Labels =
                vec![("frontend".into(), s.frontend), ("service".into(), s.service), ("kind".into(), s.kind)];
            per[0].push((l.clone(), s.packets));
            per[1].push((l.clone(), s.bytes));
            per[2].push((l.clone(), s.new_flows));
            per[3].push((l, s.drops));
        }
        let [packets, bytes, flows, drops] = per;
        counter(&mut encoder, "lb_service_packets", "Packets forwarded to a backend, per frontend", packets)?;
        counter(&mut encoder, "lb_service_bytes", "Bytes forwarded to a backend, per frontend", bytes)?;
        counter(&mut encoder, "lb_service_new_flows", "New flows, per frontend", flows)?;
        counter(&mut encoder, "lb_service_drops", "Packets dropped for a frontend (no backend)", drops)?;

        let backends = maps.read_backends().unwrap_or_default();
        let mut by_state = std::collections::BTreeMap::<&str, i64>::new();
        for (_, b) in &backends {
            *by_state.entry(state_name(b.state())).or_default() += 1;
        }
        gauge(
            &mut encoder,
            "lb_backends_by_state",
            "Backend entries by state",
            by_state.into_iter().map(|(s, n)| (label("state", s), n)).collect(),
        )?;

        let (ct, affinity) = {
            let mut cache = self.ct_count.lock().expect("ct count lock");
            match *cache {
                Some((at, ct, aff)) if at.elapsed() < Duration::from_secs(30) => (ct, aff),
                _ => {
                    let ct = maps.ct.keys().count() as u64;
                    let aff = maps.affinity.keys().count() as u64;
                    *cache = Some((Instant::now(), ct, aff));
                    (ct, aff)
                }
            }
        };
        let m = &self.metrics;
        let occupancy = vec![
            (label("map", "services"), maps.read_services().map_or(0, |s| s.len() as i64)),
            (label("map", "backends"), backends.len() as i64),
            (label("map", "maglev_slots"), m.maglev_slots_used.get()),
            (label("map", "conntrack"), ct as i64),
            (label("map", "affinity"), affinity as i64),
        ];
        gauge(
            &mut encoder,
            "lb_map_entries",
            "Entries in use per map (conntrack and affinity counted at most every 30 s)",
            occupancy,
        )?;
        let c = self.caps;
        let capacity = vec![
            (label("map", "services"), i64::from(c.services)),
            (label("map", "backends"), i64::from(c.backends)),
            (label("map", "maglev_slots"), i64::from(c.maglev_slots)),
            (label("map", "conntrack"), i64::from(c.ct)),
            (label("map", "affinity"), i64::from(c.affinity)),
        ];
        gauge(&mut encoder, "lb_map_capacity", "Capacity of each map", capacity)?;
        Ok(())
    }
}

/// Builds the registry: the agent's metrics and the datapath collector.
pub fn registry(metrics: Arc<Metrics>, health: &Health, collector: DatapathCollector) -> Registry {
    let mut r = Registry::default();
    let h = &health.metrics;
    r.register(
        "lb_proxy_health_answers",
        "Answers of /healthz, /livez and /readyz, by path and code",
        h.proxy.clone(),
    );
    r.register(
        "lb_health_check_node_port_answers",
        "Answers of the health-check node ports, by Service and code",
        h.service.clone(),
    );
    r.register(
        "lb_health_check_node_port_failures",
        "Health-check node ports that could not be served (another Service's port, or the listen failed), once per failure, by Service",
        h.failures.clone(),
    );
    r.register(
        "lb_health_check_node_port_listeners",
        "Sockets listening for health-check node ports",
        h.listeners.clone(),
    );
    r.register(
        "lb_network_programming_duration_seconds",
        "From a change seen (file or watch event) to the maps written",
        metrics.programming_latency.clone(),
    );
    r.register(
        "lb_sync_duration_seconds",
        "Duration of one sync (model, diff, map writes)",
        metrics.sync_duration.clone(),
    );
    r.register("lb_syncs", "Syncs run", metrics.syncs.clone());
    r.register(
        "lb_config_errors",
        "Invalid or unsupported objects, counted once each, by reason",
        metrics.config_errors.clone(),
    );
    r.register("lb_sync_errors", "Map writes that failed, by reason", metrics.sync_errors.clone());
    r.register(
        "lb_services_programmed",
        "Frontends (VIP:port/protocol) in the maps",
        metrics.frontends.clone(),
    );
    r.register("lb_backends_programmed", "Backends in the maps", metrics.backends.clone());
    r.register(
        "lb_frontends_tombstoned",
        "Frontends whose Service is gone, kept while their established flows live",
        metrics.tombstones.clone(),
    );
    r.register(
        "lb_members_departed",
        "Endpoints that left their Service, kept while their established flows live",
        metrics.departed_members.clone(),
    );
    r.register(
        "lb_flows_live",
        "Live flows counted by the last complete sweep pass",
        metrics.live_flows.clone(),
    );
    r.register("lb_flow_sweep_passes", "Complete passes of the flow sweep", metrics.sweep_passes.clone());
    r.register(
        "lb_flow_sweep_removed",
        "Entries the flow sweep removed, by kind (expired, stale_reply, affinity)",
        metrics.swept.clone(),
    );
    r.register("lb_flow_sweep_errors", "Flow sweep steps that failed", metrics.sweep_errors.clone());
    r.register(
        "lb_layout_takeovers",
        "Take-overs from another pin layout version (an upgrade or a rollback), by layout and outcome",
        metrics.layout_takeovers.clone(),
    );
    r.register(
        "lb_kernel_feature_missing",
        "Kernel features lb would use that this kernel lacks, with the kernel that has them and what lb does instead",
        metrics.kernel_missing.clone(),
    );
    r.register(
        "lb_interface_attach_failed",
        "Interfaces that match --interfaces but could not be attached (1 while so), by interface",
        metrics.attach_failed.clone(),
    );
    r.register(
        "lb_layout_takeover_held_packets",
        "Packets that would have started a flow, dropped (and retransmitted by their senders) while another layout's links were taken over",
        metrics.layout_takeover_held.clone(),
    );
    r.register(
        "lb_socket_udp_aborted",
        "Connected UDP sockets aborted (ECONNABORTED) because the backend socket-level load balancing sent them to left their Service",
        metrics.socket_udp_aborted.clone(),
    );
    r.register_collector(Box::new(collector));
    r
}

async fn metrics_handler(
    State(r): State<Arc<Registry>>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &r) {
        Ok(()) => (
            StatusCode::OK,
            [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "text/plain")], "encoding failed\n".into())
        }
    }
}

/// The metrics and health listeners, bound before anything else is done: a port that is taken
/// (kube-proxy's, say) stops the agent before it touches the datapath.
pub struct Listeners {
    metrics: std::net::TcpListener,
    health: std::net::TcpListener,
}

impl Listeners {
    pub fn bind(metrics_addr: SocketAddr, health_addr: SocketAddr) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let bind = |addr: SocketAddr, flag: &str| {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("{flag} {addr}: cannot listen (is another process, kube-proxy say, using it? choose another port)"))?;
            l.set_nonblocking(true)?;
            anyhow::Ok(l)
        };
        Ok(Self {
            metrics: bind(metrics_addr, "--metrics-bind-address")?,
            health: bind(health_addr, "--healthz-bind-address")?,
        })
    }
}

/// Serves `/metrics` and `/health-checks` on the metrics listener, and the health endpoints
/// (`crate::health::router`) on the health listener.
pub fn serve(listeners: Listeners, registry: Arc<Registry>, health: Arc<Health>) -> std::io::Result<()> {
    let m = tokio::net::TcpListener::from_std(listeners.metrics)?;
    let h = tokio::net::TcpListener::from_std(listeners.health)?;
    let metrics = Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(registry)
        .merge(crate::health::status_router(health.clone()));
    let health = crate::health::router(health);
    tokio::spawn(async move { axum::serve(m, metrics).await });
    tokio::spawn(async move { axum::serve(h, health).await });
    Ok(())
}
