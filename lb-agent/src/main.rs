//! lb-agent: the per-node agent.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use lb_agent::{
    agent::Agent,
    datapath::{self, Datapath, Mode},
    kube_source::Change,
    maglev, manifests, metrics, model,
    sync::{Capacities, Options, Reconciler},
};
use lb_common::{capacity, default_timeouts, hash::DEFAULT_FLOW_HASH_SEED};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, error, info, warn};

#[derive(Debug, Parser)]
#[command(name = "lb-agent", version, about = "eBPF ClusterIP load balancer: per-node agent")]
struct Args {
    /// Standalone mode: read Services and EndpointSlices from the YAML/JSON files in DIR, and
    /// follow changes. Without it, the agent watches the API server.
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server; by default kube's inference (in-cluster service account,
    /// then $KUBECONFIG, then ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Interfaces to attach to (pods' host-side interfaces), as comma-separated globs.
    #[arg(long, value_name = "GLOB[,GLOB...]", value_delimiter = ',', required_unless_present = "cleanup")]
    interfaces: Vec<glob::Pattern>,
    /// Remove everything lb installed under --pin-dir (detaches the programs, drops tracked
    /// flows) and exit.
    #[arg(long)]
    cleanup: bool,
    /// Directory on bpffs where maps are pinned; one per agent.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    pin_dir: PathBuf,
    /// Where the pod → service direction runs.
    #[arg(long, value_enum, default_value = "tc")]
    datapath: Mode,
    /// This node's name (internalTrafficPolicy Local, node topology hints).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// This node's zone (zone topology hints).
    #[arg(long)]
    zone: Option<String>,
    /// Also handle Services labelled service.kubernetes.io/service-proxy-name with this value.
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// Reject Services with more endpoints than this.
    #[arg(long, default_value_t = model::DEFAULT_MAX_ENDPOINTS)]
    max_endpoints_per_service: usize,
    /// Seconds a backend that left every Service keeps its established TCP flows.
    #[arg(long, default_value_t = Options::DEFAULT_DRAIN_TIMEOUT.as_secs())]
    drain_timeout: u64,
    /// Source address for hairpinned flows (a pod reaching itself through a Service).
    #[arg(long, default_value_t = std::net::Ipv4Addr::from(lb_common::DEFAULT_HAIRPIN_ADDR))]
    hairpin_addr: std::net::Ipv4Addr,
    /// Capacity of the service (frontend) map.
    #[arg(long, default_value_t = capacity::SERVICES)]
    max_services: u32,
    /// Capacity of the backend map.
    #[arg(long, default_value_t = capacity::BACKENDS)]
    max_backends: u32,
    /// Maglev slots for all frontends together.
    #[arg(long, default_value_t = capacity::MAGLEV_SLOTS)]
    maglev_slots: u32,
    /// Largest Maglev table of one frontend (a prime from the built-in list is used).
    #[arg(long, default_value_t = maglev::DEFAULT_MAX_TABLE_SIZE)]
    maglev_max_table_size: u32,
    /// Conntrack entries (two per flow).
    #[arg(long, default_value_t = capacity::CT)]
    ct_entries: u32,
    /// ClientIP session affinity entries.
    #[arg(long, default_value_t = capacity::AFFINITY)]
    affinity_entries: u32,
    #[arg(long, default_value_t = default_timeouts::TCP_SYN_SECS)]
    ct_timeout_tcp_syn: u64,
    #[arg(long, default_value_t = default_timeouts::TCP_ESTABLISHED_SECS)]
    ct_timeout_tcp_established: u64,
    #[arg(long, default_value_t = default_timeouts::TCP_CLOSE_SECS)]
    ct_timeout_tcp_close: u64,
    #[arg(long, default_value_t = default_timeouts::UDP_SECS)]
    ct_timeout_udp: u64,
    /// Turn on kernel-side logging of rare datapath events (aya-log).
    #[arg(long)]
    bpf_log: bool,
    /// Have the datapath send flow events (new flows, drops; at most 2,000 a second per CPU) for
    /// `lbctl monitor`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    flow_events: bool,
    /// Where /metrics is served (Prometheus).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: std::net::SocketAddr,
    /// Where /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: std::net::SocketAddr,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "info")]
    log_level: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log_level).context("--log-level")?)
        .with_target(false)
        .init();

    if args.cleanup {
        let n = datapath::cleanup(&args.pin_dir)
            .with_context(|| format!("removing pins under {}", args.pin_dir.display()))?;
        info!("removed {n} pinned objects under {}", args.pin_dir.display());
        return Ok(());
    }
    let cfg = datapath::Config {
        pin_dir: args.pin_dir.clone(),
        services: args.max_services,
        backends: args.max_backends,
        maglev_slots: args.maglev_slots,
        ct_entries: args.ct_entries,
        affinity_entries: args.affinity_entries,
        ct_timeout_tcp_syn_secs: args.ct_timeout_tcp_syn,
        ct_timeout_tcp_established_secs: args.ct_timeout_tcp_established,
        ct_timeout_tcp_close_secs: args.ct_timeout_tcp_close,
        ct_timeout_udp_secs: args.ct_timeout_udp,
        flow_hash_seed: DEFAULT_FLOW_HASH_SEED,
        hairpin_addr: args.hairpin_addr,
        bpf_log: args.bpf_log,
    };
    let (mut dp, mut maps) = Datapath::load(&cfg, args.datapath).context("loading the datapath")?;
    maps.set_flow_events(args.flow_events).context("--flow-events")?;
    let caps = Capacities {
        services: args.max_services,
        backends: args.max_backends,
        maglev_slots: args.maglev_slots,
    };
    let opts = Options {
        max_table_size: args.maglev_max_table_size,
        maglev_seed: 0,
        drain_timeout: Duration::from_secs(args.drain_timeout),
    };
    let reconciler = Reconciler::restore(caps, opts, maps.read_services()?, maps.read_backends()?, |id| {
        maps.read_meta(id)
    });
    let ctx = model::Context {
        node_name: args.node_name.clone(),
        zone: args.zone.clone(),
        service_proxy_name: args.service_proxy_name.clone(),
        max_endpoints_per_service: args.max_endpoints_per_service,
    };
    let mut agent = Agent::new(maps, reconciler, ctx);
    let caps = metrics::Capacities {
        services: args.max_services,
        backends: args.max_backends,
        maglev_slots: args.maglev_slots,
        ct: args.ct_entries,
        affinity: args.affinity_entries,
    };
    let collector = metrics::DatapathCollector::new(args.pin_dir.clone(), caps, agent.metrics.clone());
    let registry = std::sync::Arc::new(metrics::registry(agent.metrics.clone(), collector));
    metrics::serve(args.metrics_bind_address, args.healthz_bind_address, registry, agent.health.clone())
        .await
        .context("serving metrics and health")?;

    // Changes from either source arrive here, with the time they were seen.
    let (tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let source = match &args.manifests {
        Some(dir) => Source::files(dir, tx)?,
        None => Source::kube(&args, tx).await?,
    };
    if let Some(zone) = source.zone().filter(|_| args.zone.is_none()) {
        agent.ctx.zone = Some(zone);
    }
    // Our view is rebuilt from the source before anything is reconciled: entries that are still
    // wanted are adopted, not rewritten.
    agent.apply(source.objects()?);
    if let Source::Kube(k) = &source {
        // Included in the full sync above.
        k.take_dirty();
    }
    info!(source = source.describe(), "first full sync done");
    dp.prune_links(&datapath::interfaces());
    attach_matching(&mut dp, &args.interfaces);
    let mut links = lb_agent::netlink::LinkEvents::new().context("netlink link notifications")?;

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(seen) = changes.recv() => {
                agent.health.change_seen();
                // Changes come in bursts (an editor's writes, a relist): take what else arrives
                // within the debounce in the same sync.
                let debounce = source.debounce();
                if !debounce.is_zero() {
                    tokio::time::sleep(debounce).await;
                }
                while changes.try_recv().is_ok() {}
                if let Some(zone) = source.zone().filter(|_| args.zone.is_none()) {
                    agent.ctx.zone = Some(zone);
                }
                match source.changes() {
                    Ok(Change::All(objects)) => {
                        agent.apply(objects);
                        let latency = seen.elapsed();
                        agent.metrics.programming_latency.observe(latency.as_secs_f64());
                        debug!(latency_us = latency.as_micros() as u64, "change applied");
                    }
                    Ok(Change::Services(changed)) => {
                        agent.apply_services(changed);
                        let latency = seen.elapsed();
                        agent.metrics.programming_latency.observe(latency.as_secs_f64());
                        debug!(latency_us = latency.as_micros() as u64, "change applied");
                    }
                    // The directory itself is unreadable: keep serving the last good state.
                    Err(e) => error!("{e:#}"),
                }
            }
            r = links.changed() => {
                if let Err(e) = r {
                    warn!("netlink: {e}");
                }
                attach_matching(&mut dp, &args.interfaces);
            }
            _ = tick.tick() => {
                agent.health.tick();
                if !dp.pins_present() {
                    // Someone removed the pin directory or unmounted bpffs: the links (and so the
                    // programs' attachments) went with their pins; the maps live on here.
                    error!(
                        pin_dir = %args.pin_dir.display(),
                        "pins are gone (directory removed, or bpffs unmounted): pinning the maps again and \
                         re-attaching; tracked flows are kept"
                    );
                    dp.repin(&agent.maps).with_context(|| {
                        format!(
                            "cannot restore the pins under {}; exiting (is bpffs mounted at /sys/fs/bpf?)",
                            args.pin_dir.display()
                        )
                    })?;
                    attach_matching(&mut dp, &args.interfaces);
                    info!("pins restored");
                }
                // Netlink wakes the scan on every link change; this is only a backstop.
                ticks += 1;
                if ticks.is_multiple_of(20) {
                    attach_matching(&mut dp, &args.interfaces);
                }
                agent.tick(Instant::now());
                dp.flush_logs();
            }
        }
    }
    info!("stopping; the datapath stays in place (pins under {})", args.pin_dir.display());
    Ok(())
}

/// Attaches to interfaces that match and are new; forgets those that vanished.
fn attach_matching(dp: &mut Datapath, globs: &[glob::Pattern]) {
    let present = datapath::interfaces();
    let gone: Vec<String> =
        dp.attached().filter(|a| !present.iter().any(|p| p == a)).map(String::from).collect();
    for name in gone {
        info!(interface = %name, "interface gone");
        dp.forget(&name);
    }
    for name in present {
        if dp.is_attached(&name) || !globs.iter().any(|g| g.matches(&name)) {
            continue;
        }
        match dp.attach(&name) {
            Ok(()) => info!(interface = %name, "attached"),
            Err(e) => warn!(interface = %name, "{e}"),
        }
    }
}

/// Where the Services and EndpointSlices come from.
enum Source {
    Files { dir: PathBuf, _watcher: notify::RecommendedWatcher },
    Kube(lb_agent::kube_source::KubeSource),
}

impl Source {
    fn files(dir: &std::path::Path, tx: tokio::sync::mpsc::UnboundedSender<Instant>) -> anyhow::Result<Self> {
        // Watch the directory before the first read, so that no change slips between them.
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                // Reads (the agent's own included) raise open/close events: only writes,
                // creations, renames and removals are changes.
                let change = !matches!(ev.kind, notify::EventKind::Access(_));
                if change && ev.paths.iter().any(|p| manifests::is_manifest(p)) {
                    let _ = tx.send(Instant::now());
                }
            }
        })
        .context("file watcher")?;
        notify::Watcher::watch(&mut watcher, dir, notify::RecursiveMode::NonRecursive)
            .with_context(|| format!("watching --manifests {}", dir.display()))?;
        Ok(Self::Files { dir: dir.to_path_buf(), _watcher: watcher })
    }

    async fn kube(args: &Args, tx: tokio::sync::mpsc::UnboundedSender<Instant>) -> anyhow::Result<Self> {
        let config = match &args.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("--kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.context("--kubeconfig")?
            }
            None => kube::Config::infer().await.context(
                "no API server configuration (in-cluster or kubeconfig); use --manifests for standalone mode",
            )?,
        };
        let client = kube::Client::try_from(config).context("API client")?;
        let source = lb_agent::kube_source::KubeSource::start(client, args.node_name.as_deref(), tx);
        info!("waiting for the first complete list of Services, EndpointSlices and this Node");
        source.wait_ready().await;
        Ok(Self::Kube(source))
    }

    /// What to apply for the changes seen: everything, or only the Services an event touched.
    fn changes(&self) -> anyhow::Result<Change> {
        match self {
            Self::Kube(k) => Ok(k.changes()),
            Self::Files { .. } => Ok(Change::All(self.objects()?)),
        }
    }

    fn objects(&self) -> anyhow::Result<manifests::Objects> {
        match self {
            Self::Files { dir, .. } => {
                manifests::read_dir(dir).with_context(|| format!("reading --manifests {}", dir.display()))
            }
            Self::Kube(k) => Ok(k.objects()),
        }
    }

    fn zone(&self) -> Option<String> {
        match self {
            Self::Files { .. } => None,
            Self::Kube(k) => k.zone(),
        }
    }

    fn debounce(&self) -> Duration {
        match self {
            // Editors may write a file in several steps.
            Self::Files { .. } => Duration::from_millis(10),
            // Bursts (a relist) are coalesced by the dirty set; nothing to wait for.
            Self::Kube(_) => Duration::ZERO,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Self::Files { .. } => "manifests",
            Self::Kube(_) => "api-server",
        }
    }
}
