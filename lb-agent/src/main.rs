//! lb-agent: the per-node agent.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use lb_agent::{
    agent::Agent,
    datapath::{self, netlink::LinkEvents, Datapath, Mode, Role},
    metrics,
    model::{self, maglev},
    reconcile::{Options, Reconciler, Restored, Sweeper, Timeouts},
    source::{self, Source},
};
use lb_common::{
    capacity::{self, Capacities},
    default_timeouts,
    hash::DEFAULT_FLOW_HASH_SEED,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// `--datapath`: the flag's spelling of [`Mode`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DatapathMode {
    /// TC ingress of the pod's host-side interface.
    Tc,
    /// XDP on the pod's host-side interface (replies still use TC egress).
    Xdp,
}

/// `--ipv6`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Ipv6Flag {
    Auto,
    On,
    Off,
}

/// `--socket-lb`: the flag's spelling of [`datapath::SocketLb`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SocketLbFlag {
    /// No socket-level load balancing: processes on the node and hostNetwork pods reach no
    /// Service (kube-proxy, if it still runs beside lb, serves them).
    Off,
    /// Sockets in the agent's own network namespace (the host's): processes on the node and
    /// hostNetwork pods. Pods keep packet-level translation.
    Host,
    /// Every socket under --cgroup-root, pods' too (no per-packet translation for their
    /// connections; a service mesh reading SO_ORIGINAL_DST then sees the backend).
    All,
}

/// `--tc-position`: the flag's spelling of [`datapath::TcOrder`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TcPosition {
    /// Before the TCX programs already on the interface.
    First,
    /// After them.
    Last,
}

/// `--tc-attach`: the flag's spelling of [`datapath::TcAttach`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TcAttachFlag {
    /// TCX where the kernel has it (Linux 6.6), else clsact qdisc filters over netlink.
    Auto,
    /// TCX links only.
    Tcx,
    /// clsact qdisc filters over netlink only (direct-action cls_bpf, at a fixed priority and
    /// handle).
    Netlink,
}

#[derive(Debug, Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF ClusterIP load balancer: per-node agent",
    args_override_self = true
)]
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
    #[arg(
        long,
        value_name = "GLOB[,GLOB...]",
        value_delimiter = ',',
        required_unless_present_any = ["cleanup", "stay", "mount_cgroup"]
    )]
    interfaces: Vec<glob::Pattern>,
    /// This node's own interfaces that traffic from outside the cluster arrives on and replies
    /// leave by (the underlay, and a CNI's tunnel device if replies from remote endpoints come
    /// through it), as comma-separated globs: they carry the node-side programs that serve
    /// NodePorts and LoadBalancer IPs. None by default: then only this node's pods reach them.
    #[arg(long, value_name = "GLOB[,GLOB...]", value_delimiter = ',')]
    node_interfaces: Vec<glob::Pattern>,
    /// Which of this node's addresses NodePorts listen on, as kube-proxy's flag: `primary` (the
    /// Node object's InternalIP, else its ExternalIP) or comma-separated CIDRs selecting local
    /// addresses. Loopback never.
    #[arg(long, default_value = "primary")]
    nodeport_addresses: model::node::NodePortAddresses,
    /// Which Services' `spec.externalIPs` are served: `all` (kube-proxy's behaviour),
    /// `node-addresses` (only this node's own addresses) or `none`. Anyone who may create a
    /// Service may list any address there and catch the cluster's traffic to it (CVE-2020-8554).
    #[arg(long, default_value = "all", value_name = "all|node-addresses|none")]
    external_ips: model::node::ExternalIps,
    /// Remove everything lb installed under --pin-dir (detaches the programs, drops tracked
    /// flows) and exit.
    #[arg(long)]
    cleanup: bool,
    /// Do nothing more (after --cleanup, if given) and stay until stopped (SIGTERM), as a
    /// DaemonSet's container must (deploy/cleanup/).
    #[arg(long)]
    stay: bool,
    /// Directory on bpffs where maps are pinned; one per agent.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    pin_dir: PathBuf,
    /// Where the pod → service direction runs.
    #[arg(long, value_enum, default_value = "tc")]
    datapath: DatapathMode,
    /// Where traffic from outside arriving on a node interface (`--node-interfaces`) is decided:
    /// `tc` (TC ingress), or `xdp` (an XDP program in front of it, which drops, translates and
    /// sends back out what it can and leaves the rest to TC: rejects, ICMP errors, partial
    /// checksums, packets whose neighbour is not known yet or whose route leaves through another
    /// interface than they came in on).
    #[arg(long, value_enum, default_value = "tc")]
    node_datapath: DatapathMode,
    /// Where lb's TC programs go among the TCX programs already on an interface when it attaches
    /// (a CNI's policy, observability tools). Either way, packets lb does not drop go on to the
    /// programs after it, then to classic clsact filters.
    #[arg(long, value_enum, default_value = "first")]
    tc_position: TcPosition,
    /// How the TC programs are attached.
    #[arg(long, value_enum, default_value = "auto")]
    tc_attach: TcAttachFlag,
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
    /// IPv6 Services: `on` programs their IPv6 addresses and sizes the lb6 maps as the IPv4 ones,
    /// `off` leaves them out (reported) and keeps the lb6 maps to one entry each (their kernel
    /// memory), `auto` is `on` where this node has a global IPv6 address.
    #[arg(long, env = "LB_IPV6", value_enum, default_value = "auto")]
    ipv6: Ipv6Flag,
    /// Source address for hairpinned flows (a pod reaching itself through a Service).
    #[arg(long, default_value_t = std::net::Ipv4Addr::from(lb_common::DEFAULT_HAIRPIN_ADDR))]
    hairpin_addr: std::net::Ipv4Addr,
    /// Source address for hairpinned IPv6 flows: in the discard-only prefix 100::/64 (RFC 6666),
    /// nobody's address, which a pod reaches by its default route.
    #[arg(long, default_value_t = std::net::Ipv6Addr::from(lb_common::DEFAULT_HAIRPIN_ADDR6))]
    hairpin_addr6: std::net::Ipv6Addr,
    /// Source ports given to a new flow whose reply tuple belongs to another live flow (the same
    /// client port to another Service address with the same backend), as netfilter's NAT does:
    /// FIRST-LAST, best outside this node's net.ipv4.ip_local_port_range (a warning otherwise).
    /// Default: 1024-29999, or where that meets the node's range, the largest run of at least
    /// 1,000 ports outside it and the NodePort range.
    #[arg(long, value_parser = port_range)]
    snat_ports: Option<(u16, u16)>,
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
    /// Conntrack entries (two per flow). Default: two for each flow kube-proxy would have
    /// netfilter track on this node, max(131,072, 32,768 × online CPUs), at most 524,288
    /// (262,144 entries up to 4 CPUs). A table already pinned keeps its size, flows and all (and
    /// a new one beside another layout whose flows it takes over is at least that one's size):
    /// the size asked for comes with a node started fresh or after `lb-agent --cleanup`.
    #[arg(long)]
    ct_entries: Option<u32>,
    /// ClientIP session affinity entries.
    #[arg(long, default_value_t = capacity::AFFINITY)]
    affinity_entries: u32,
    /// (Service port, endpoint) pairs, those kept for the flows of Services gone included.
    #[arg(long, default_value_t = capacity::MEMBERS)]
    member_entries: u32,
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
    /// Where /metrics (Prometheus) and /health-checks (for `lbctl health`) are served.
    #[arg(long, env = "LB_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:10249")]
    metrics_bind_address: std::net::SocketAddr,
    /// Where /healthz, /livez and /readyz are served.
    #[arg(long, env = "LB_HEALTHZ_BIND_ADDRESS", default_value = "0.0.0.0:10256")]
    healthz_bind_address: std::net::SocketAddr,
    /// /livez and /healthz answer 503 once a change has waited this long to be applied (its map
    /// writes failing), or the agent's loop has stalled this long: kube-proxy's 2 x sync period.
    /// Seconds (60s) or minutes (2m).
    #[arg(long, env = "LB_HEALTHZ_STALE_AFTER", value_parser = seconds, default_value = "60s", value_name = "DURATION")]
    healthz_stale_after: Duration,
    /// Serve the health-check node ports of LoadBalancer Services with externalTrafficPolicy Local
    /// (on every address with --nodeport-addresses primary or 0.0.0.0/0, else on the addresses
    /// it selects). `off` while kube-proxy runs beside lb: it holds them.
    #[arg(long, env = "LB_HEALTH_CHECK_NODE_PORTS", default_value = "on", value_name = "on|off", value_parser = on_off, action = clap::ArgAction::Set)]
    health_check_node_ports: bool,
    /// Socket-level load balancing (cgroup v2 programs at --cgroup-root): which sockets are sent
    /// to a backend when they connect to (or send to) a Service address.
    #[arg(long, env = "LB_SOCKET_LB", value_enum, default_value = "host")]
    socket_lb: SocketLbFlag,
    /// The cgroup v2 hierarchy (its root, on a node) the socket programs attach to.
    #[arg(long, env = "LB_CGROUP_ROOT", default_value = "/sys/fs/cgroup", value_name = "DIR")]
    cgroup_root: PathBuf,
    /// Mount a cgroup v2 hierarchy at --cgroup-root in the host's mount namespace, seen from the
    /// host's cgroup namespace (both entered through --host-namespaces), unless one is there;
    /// then exit. The DaemonSet's init container does this (needs CAP_SYS_ADMIN).
    #[arg(long)]
    mount_cgroup: bool,
    /// The host's namespace files (its PID 1's /proc/1/ns), for --mount-cgroup.
    #[arg(long, default_value = "/hostproc/1/ns", value_name = "DIR")]
    host_namespaces: PathBuf,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// A duration above 0 in whole seconds or minutes: `60s`, `2m`, or `60` (seconds).
fn seconds(s: &str) -> Result<Duration, String> {
    let (n, unit) = match (s.strip_suffix('m'), s.strip_suffix('s')) {
        (Some(n), _) => (n, 60),
        (None, Some(n)) => (n, 1),
        (None, None) => (s, 1),
    };
    match n.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n * unit)),
        _ => Err(format!("{s:?}: want a duration above 0, as 60s or 2m")),
    }
}

/// `on` or `off`.
fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: want on or off")),
    }
}

/// `FIRST-LAST`, two ports.
fn port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: want FIRST-LAST"))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
    Ok((port(a)?, port(b)?))
}

/// Everything the flags say, by the part that uses it.
struct Config {
    datapath: datapath::Config,
    mode: Mode,
    interfaces: Interfaces,
    nodeport_addresses: model::node::NodePortAddresses,
    source: source::Config,
    reconcile: Options,
    model: model::Context,
    flow_events: bool,
    metrics_addr: std::net::SocketAddr,
    healthz_addr: std::net::SocketAddr,
    healthz_stale_after: Duration,
    health_check_node_ports: bool,
    cgroup_root: PathBuf,
}

impl From<Args> for Config {
    fn from(a: Args) -> Self {
        let caps = Capacities {
            services: a.max_services,
            backends: a.max_backends,
            maglev_slots: a.maglev_slots,
            ct: a.ct_entries.unwrap_or(capacity::CT),
            affinity: a.affinity_entries,
            members: a.member_entries,
        };
        Self {
            datapath: datapath::Config {
                pin_dir: a.pin_dir,
                caps,
                ct_timeout_tcp_syn_secs: a.ct_timeout_tcp_syn,
                ct_timeout_tcp_established_secs: a.ct_timeout_tcp_established,
                ct_timeout_tcp_close_secs: a.ct_timeout_tcp_close,
                ct_timeout_udp_secs: a.ct_timeout_udp,
                flow_hash_seed: DEFAULT_FLOW_HASH_SEED,
                hairpin_addr: a.hairpin_addr,
                hairpin_addr6: a.hairpin_addr6,
                snat_ports: a.snat_ports.unwrap_or(lb_common::DEFAULT_SNAT_PORTS),
                bpf_log: a.bpf_log,
                tc_order: match a.tc_position {
                    TcPosition::First => datapath::TcOrder::First,
                    TcPosition::Last => datapath::TcOrder::Last,
                },
                tc_attach: match a.tc_attach {
                    TcAttachFlag::Auto => datapath::TcAttach::Auto,
                    TcAttachFlag::Tcx => datapath::TcAttach::Tcx,
                    TcAttachFlag::Netlink => datapath::TcAttach::Netlink,
                },
                node_xdp: matches!(a.node_datapath, DatapathMode::Xdp),
                socket_lb: match a.socket_lb {
                    SocketLbFlag::Off => datapath::SocketLb::Off,
                    SocketLbFlag::Host => datapath::SocketLb::Host,
                    SocketLbFlag::All => datapath::SocketLb::All,
                },
                ipv6: true,
            },
            mode: match a.datapath {
                DatapathMode::Tc => Mode::Tc,
                DatapathMode::Xdp => Mode::Xdp,
            },
            interfaces: Interfaces { pods: a.interfaces, nodes: a.node_interfaces },
            nodeport_addresses: a.nodeport_addresses,
            source: match a.manifests {
                Some(dir) => source::Config::Files { dir, node_name: a.node_name.clone() },
                None => source::Config::Kube { kubeconfig: a.kubeconfig, node_name: a.node_name.clone() },
            },
            reconcile: Options { max_table_size: a.maglev_max_table_size, maglev_seed: 0 },
            model: model::Context {
                node_name: a.node_name,
                zone: a.zone,
                service_proxy_name: a.service_proxy_name,
                max_endpoints_per_service: a.max_endpoints_per_service,
                nodeport_addresses: Vec::new(),
                nodeport_addresses6: Vec::new(),
                node_ip6: None,
                local_addresses6: Vec::new(),
                node_ip: None,
                local_addresses: Vec::new(),
                external_ips: a.external_ips,
                ipv6: true,
            },
            flow_events: a.flow_events,
            metrics_addr: a.metrics_bind_address,
            healthz_addr: a.healthz_bind_address,
            healthz_stale_after: a.healthz_stale_after,
            health_check_node_ports: a.health_check_node_ports,
            cgroup_root: a.cgroup_root,
        }
    }
}

/// Conntrack and affinity entries the flow sweep reads per tick (250 ms): the default 262,144
/// conntrack entries of a node of up to 4 CPUs take about 16 s a pass, the largest default
/// (524,288) about 32 s, with one batched read per tick.
const SWEEP_BATCH: u32 = 4096;

/// `--ct-entries`' default on this node ([`capacity::ct_for_cpus`] of its online CPUs), said in
/// the log; the default of a node of up to 4 CPUs if they cannot be read.
fn default_ct_entries() -> u32 {
    match aya::util::online_cpus() {
        Ok(cpus) => {
            let n = capacity::ct_for_cpus(u32::try_from(cpus.len()).unwrap_or(u32::MAX));
            info!(
                "conntrack table: {n} entries, two per flow for max(131072, 32768 × {} online CPUs) flows as kube-proxy's nf_conntrack_max, at most {} (--ct-entries to change)",
                cpus.len(),
                capacity::CT_DEFAULT_MAX
            );
            n
        }
        Err((path, e)) => {
            warn!(
                "conntrack table: {} entries, the default of a node of up to 4 CPUs: reading {path} for this node's CPUs: {e} (--ct-entries to change)",
                capacity::CT
            );
            capacity::CT
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let matches = <Args as clap::CommandFactory>::command().get_matches();
    let args = <Args as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `--socket-lb host` by default, unless this machine cannot take it (see below); asked for,
    // it is tried and its failure stops the agent.
    let socket_lb_defaulted =
        matches.value_source("socket_lb") == Some(clap::parser::ValueSource::DefaultValue);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log_level).context("--log-level")?)
        .with_target(false)
        .init();

    if args.mount_cgroup {
        // Before anything could start a second thread.
        let root = &args.cgroup_root;
        match datapath::sockets::mount_cgroup2(root, &args.host_namespaces) {
            Ok(true) => info!(cgroup = %root.display(), "mounted a cgroup v2 hierarchy"),
            Ok(false) => info!(cgroup = %root.display(), "a cgroup v2 hierarchy is mounted there already"),
            Err(e) => anyhow::bail!("--mount-cgroup: {e}"),
        }
        return Ok(());
    }
    // First: in a container the agent is PID 1, which the kernel spares signals it has no
    // handler for, so a SIGTERM would go unheard until the kubelet's SIGKILL.
    let mut stop = Stop::new()?;
    if args.cleanup || args.stay {
        if args.cleanup {
            cleanup(&args.pin_dir, &mut stop).await?;
        }
        if args.stay {
            info!("staying until stopped");
            stop.wait().await;
        }
        return Ok(());
    }
    // One agent per pin directory: wait for the one that holds it (a rolling update's old pod)
    // to exit. Before the ports are bound, which it holds too.
    let mut lock = tokio::select! {
        lock = hold_pin_dir(&args.pin_dir) => lock?,
        () = stop.wait() => return Ok(()),
    };
    let explicit_snat = args.snat_ports;
    let ipv6 = match args.ipv6 {
        Ipv6Flag::On => true,
        Ipv6Flag::Off => false,
        Ipv6Flag::Auto => {
            let found =
                lb_agent::host::has_global_ipv6().context("--ipv6 auto: listing this node's addresses")?;
            info!(
                "IPv6 Services {}: this node has {} global IPv6 address (--ipv6 auto)",
                if found { "on" } else { "off" },
                if found { "a" } else { "no" }
            );
            found
        }
    };
    let ct_defaulted = args.ct_entries.is_none();
    let mut cfg = Config::from(args);
    if ct_defaulted {
        cfg.datapath.caps.ct = default_ct_entries();
    }
    cfg.datapath.ipv6 = ipv6;
    cfg.model.ipv6 = ipv6;
    if socket_lb_defaulted && cfg.datapath.socket_lb == datapath::SocketLb::Host {
        if let Some(why) = datapath::sockets::default_host_unfit(&cfg.cgroup_root) {
            warn!("socket-level load balancing off: {why}; give --socket-lb host (or LB_SOCKET_LB=host) to insist");
            cfg.datapath.socket_lb = datapath::SocketLb::Off;
        }
    }
    let local = datapath::local_port_range().context("reading net.ipv4.ip_local_port_range")?;
    let (snat_ports, warning) =
        datapath::choose_snat_ports(explicit_snat, local).map_err(anyhow::Error::msg)?;
    if let Some(w) = warning {
        warn!("{w}");
    }
    cfg.datapath.snat_ports = snat_ports;
    info!(
        "source ports for clashing flows: {}-{} (this node's ip_local_port_range: {}-{})",
        cfg.datapath.snat_ports.0, cfg.datapath.snat_ports.1, local.0, local.1
    );
    let smallest = model::maglev::TABLE_SIZES[0];
    if cfg.reconcile.max_table_size < smallest {
        warn!(
            "--maglev-max-table-size {} is below the smallest table, {smallest} slots: tables of {smallest} are used",
            cfg.reconcile.max_table_size
        );
    }
    let pin_dir = cfg.datapath.pin_dir.clone();
    // Before the datapath: a port that is taken leaves the node as it was.
    let listeners = metrics::Listeners::bind(cfg.metrics_addr, cfg.healthz_addr)?;
    let (mut dp, mut maps) = Datapath::load(&cfg.datapath, cfg.mode).context("loading the datapath")?;
    maps.set_flow_events(cfg.flow_events).context("--flow-events")?;
    // The pinned maps are reused as they are, flows and all: a conntrack table an earlier agent
    // made keeps its size (see `Datapath::load`).
    let ct = maps.ct_capacity().context("reading the conntrack table's size")?;
    if ct != cfg.datapath.caps.ct {
        let what = format!(
            "conntrack table: {ct} entries ({} asked for): a pinned table keeps its size, flows and all, and one that takes over another layout's flows is at least that one's size; a node started fresh or lb-agent --cleanup (which drops every flow) makes it anew",
            cfg.datapath.caps.ct
        );
        if ct_defaulted {
            info!("{what}");
        } else {
            warn!("{what}");
        }
        cfg.datapath.caps.ct = ct;
    }
    // Another version's layout (a rolling update, or a rollback) keeps serving until our programs
    // take over its links; what of its state we can read comes first.
    let carried = take_over_state(&mut dp, &mut maps)?;
    let caps = cfg.datapath.caps;
    let (services, backends) = (maps.read_services()?, maps.read_backends()?);
    // Before our programs are attached: their port filter, off since the load, knows every port
    // these rows and the flows have, and is armed.
    if !maps.note_ports(&services, &backends)? {
        warn!(
            "the programs' port filter stays off (every packet is looked up, as before it): a walk of the conntrack tables for the ports of their flows failed or did not end; the next start tries again"
        );
    }
    let restored = Restored {
        services,
        backends,
        members: maps.read_members()?,
        src_ranges: maps.read_src_ranges()?,
        meta: Box::new(|id| maps.read_meta(id)),
    };
    let reconciler = Reconciler::restore(caps, cfg.reconcile, restored);
    let d = &cfg.datapath;
    let timeouts = Timeouts::from_secs(
        d.ct_timeout_tcp_syn_secs,
        d.ct_timeout_tcp_established_secs,
        d.ct_timeout_tcp_close_secs,
        d.ct_timeout_udp_secs,
    );
    let mut agent = Agent::new(maps, reconciler, cfg.model)
        .with_sweep(Sweeper::new(timeouts, SWEEP_BATCH))
        .with_nodeport_addresses(cfg.nodeport_addresses.clone(), addresses(&local_ipv4()))
        .with_local_ipv6(local_ipv6())
        .with_health_check_node_ports(cfg.health_check_node_ports);
    agent.health.set_stale_after(cfg.healthz_stale_after);
    if let Some((from, state)) = carried {
        agent.metrics.layout_takeover(&from, state);
    }
    for m in dp.kernel().missing() {
        warn!(
            feature = m.feature,
            "this kernel lacks {} (Linux {} has it): {}", m.feature, m.since, m.instead
        );
        let labels = vec![
            ("feature".to_string(), m.feature.to_string()),
            ("since".to_string(), m.since.to_string()),
            ("instead".to_string(), m.instead.to_string()),
        ];
        agent.metrics.kernel_missing.get_or_create(&labels).set(1);
    }
    let collector = metrics::DatapathCollector::new(pin_dir.clone(), caps, agent.metrics.clone());
    let registry = std::sync::Arc::new(metrics::registry(agent.metrics.clone(), &agent.health, collector));
    metrics::serve(listeners, registry, agent.health.clone()).context("serving metrics and health")?;

    // Changes from the source arrive here; the first holds everything it knows.
    let (tx, mut changes) = source::channel();
    let source = Source::start(&cfg.source, tx).await?;
    // Our view is rebuilt from the source before anything is reconciled: entries that are still
    // wanted are adopted, not rewritten.
    let first = tokio::select! {
        first = changes.recv() => first.context("the source ended before its first change")?,
        // Nothing is attached yet: the maps stay pinned for the next start.
        () = stop.wait() => return Ok(()),
    };
    agent.apply(first);
    info!(source = source.describe(), "first full sync done");
    dp.prune_links(&datapath::interfaces());
    // The links of a layout whose state was carried move to our programs with its latest flows.
    let carried = dp
        .take_over_carried(&matching(&cfg.interfaces.pods), &mut agent.maps)
        .context("holding new flows back to take over another pin layout's links; it keeps serving")?;
    if let Some(datapath::migrate::TakeOver { from, copied: r, held }) = carried {
        agent.metrics.layout_takeover_held.inc_by(held);
        match r {
            Ok(c) => info!(
                flows = c.flows,
                affinity = c.affinity,
                failed = c.failed,
                held_packets = held,
                "the links of the layout taken over hold our programs; its latest flows are copied"
            ),
            Err(e) => {
                agent.metrics.layout_takeover(&from.name(), "failed");
                error!(from = from.name(), "taking over the links of pin layout {}: {e}", from.name());
            }
        }
    }
    // Subscribed before the first pass: an interface that appears during it wakes the next one.
    let mut links = LinkEvents::new().context("netlink link notifications")?;
    // Before the interfaces, whose attachment makes the agent ready: ready means the sockets are
    // translated too.
    attach_sockets(&mut dp, cfg.datapath.socket_lb, &cfg.cgroup_root)?;
    attach_matching(&mut dp, &cfg.interfaces, &agent, "start");
    let mut waiting = Vec::new();
    finish_take_over(&mut dp, &cfg.interfaces.pods, &mut agent, &mut waiting);

    // Whether a change was applied since connected UDP sockets whose backend left were last
    // aborted (at most once a tick; first after the first sync: backends may have left while the
    // agent was away), and whether that failed last time (said once until it works again).
    let (mut abort_due, mut abort_failing) = (true, false);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut ticks: u64 = 0;
    // Ticks in a row whose restore of the pins failed.
    let mut restore_failures = 0;
    loop {
        tokio::select! {
            () = stop.wait() => break,
            r = links.changed() => {
                if let Err(e) = r {
                    warn!("netlink: {e}");
                }
                attach_matching(&mut dp, &cfg.interfaces, &agent, "link-notification");
            }
            _ = tick.tick() => {
                agent.health.tick();
                // A change the source holds counts from when it was seen (kube-proxy counts from
                // the event).
                agent.health.source_waiting(source.oldest_unsent());
                // A health-check node port that could not be listened on is tried again.
                if agent.health_checks_failing() {
                    agent.serve_health_checks();
                }
                if restore_failures > 0 || !dp.pins_present(&agent.maps) {
                    if restore_failures == 0 {
                        // Someone removed the pin directory or unmounted bpffs: the links (and so
                        // the programs' attachments) went with their pins; the maps live on here.
                        error!(
                            pin_dir = %pin_dir.display(),
                            "pins are gone (directory removed, or bpffs unmounted): pinning the maps again \
                             and re-attaching; tracked flows are kept"
                        );
                    }
                    let (interfaces, socket_lb) = (&cfg.interfaces, cfg.datapath.socket_lb);
                    match restore_pins(&mut dp, interfaces, socket_lb, &cfg.cgroup_root, &agent, &pin_dir, &mut lock) {
                        Ok(()) => {
                            restore_failures = 0;
                            info!("pins restored");
                        }
                        // A removal still going on can take what was just pinned: the next tick
                        // tries again, for a while.
                        Err(e) if restore_failures < RESTORE_TRIES => {
                            restore_failures += 1;
                            warn!("restoring the pins, tried again at the next tick: {e:#}");
                        }
                        Err(e) => {
                            return Err(e.context(format!(
                                "cannot restore the pins under {} ({RESTORE_TRIES} ticks in a row); exiting (is \
                                 bpffs mounted at /sys/fs/bpf?)",
                                pin_dir.display()
                            )))
                        }
                    }
                }
                // Netlink wakes the scan on every link change; this is only a backstop.
                ticks += 1;
                if ticks.is_multiple_of(20) {
                    for i in dp.lost_filters() {
                        warn!(interface = %i, "lb's filter is gone (deleted, or with its qdisc): attaching again");
                    }
                    attach_matching(&mut dp, &cfg.interfaces, &agent, "rescan");
                    // This node's addresses changed: the NodePorts follow (a full resync).
                    let changed6 = agent.set_local_ipv6(local_ipv6());
                    if agent.set_local_addresses(addresses(&local_ipv4())) | changed6 {
                        info!("this node's addresses changed: NodePorts follow");
                        source.resync();
                    }
                    finish_take_over(&mut dp, &cfg.interfaces.pods, &mut agent, &mut waiting);
                }
                agent.sweep(datapath::monotonic_ns());
                // After a change, and every second besides: a backend may also leave with a write
                // the sweep retries (a table that waited for its region, a failed write).
                let due = std::mem::take(&mut abort_due) || ticks.is_multiple_of(4);
                if due && cfg.datapath.socket_lb != datapath::SocketLb::Off {
                    abort_stale_udp(&dp, &agent, &mut abort_failing);
                }
                dp.flush_logs();
            }
            Some(change) = changes.recv() => {
                agent.apply(change);
                abort_due = true;
                if agent.take_resync() {
                    // A cluster IP took an address from an external one: that Service is built
                    // again, to wait for it.
                    source.resync();
                }
            }
        }
    }
    drop(source);
    // The next agent may not know the port filter (a rollback) and write rows without their
    // ports' bits while our programs still serve: they look every packet up until it arms it.
    if let Err(e) = agent.maps.disarm_ports() {
        warn!("turning the programs' port filter off for the next agent: {e}");
    }
    // Held to the end: the next agent may go on once this one is gone.
    drop(lock);
    info!("stopping; the datapath stays in place (pins under {})", pin_dir.display());
    Ok(())
}

/// SIGTERM (the kubelet, podman) and SIGINT (a terminal): the agent stops.
struct Stop {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Stop {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }

    /// Until either arrives.
    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// `--cleanup`: removes what lb pinned under `pin_dir`, once no agent holds it (waiting up to 30 s
/// for one that is stopping: one that runs on is left alone, with an error). Nothing to do where
/// `pin_dir` is not on bpffs (nothing can have been pinned there).
async fn cleanup(pin_dir: &std::path::Path, stop: &mut Stop) -> anyhow::Result<()> {
    if !datapath::on_bpffs(pin_dir) {
        info!(pin_dir = %pin_dir.display(), "not on bpffs: nothing lb pinned there");
        return Ok(());
    }
    let _lock = tokio::select! {
        lock = hold_pin_dir(pin_dir) => lock?,
        _ = tokio::time::sleep(Duration::from_secs(30)) => anyhow::bail!(
            "an lb-agent still holds {} (it runs on this node): stop it first (delete lb's DaemonSet), then clean up",
            pin_dir.display()
        ),
        () = stop.wait() => return Ok(()),
    };
    let n =
        datapath::cleanup(pin_dir).with_context(|| format!("removing pins under {}", pin_dir.display()))?;
    info!("removed {n} pinned objects under {}", pin_dir.display());
    Ok(())
}

/// Takes the hold on `pin_dir`, waiting while another agent has it (stopped by SIGTERM or SIGINT
/// meanwhile, as everywhere else).
async fn hold_pin_dir(pin_dir: &std::path::Path) -> anyhow::Result<datapath::PinLock> {
    let mut said = false;
    loop {
        if let Some(lock) = datapath::try_lock(pin_dir)? {
            if said {
                info!(pin_dir = %pin_dir.display(), "the other agent is gone; going on");
            }
            return Ok(lock);
        }
        if !std::mem::replace(&mut said, true) {
            warn!(
                pin_dir = %pin_dir.display(),
                "another lb-agent holds this pin directory (a rolling update's old pod?): waiting for it to exit"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Carries the state of another layout version into ours, where this agent can read it (see
/// `datapath::migrate`), and says what it does about each other layout: the layout and how it
/// was taken over, for the metric. An error stops the agent with the other layout still serving.
fn take_over_state(
    dp: &mut Datapath,
    maps: &mut datapath::Maps,
) -> anyhow::Result<Option<(String, &'static str)>> {
    use datapath::migrate::Outcome;
    let others: Vec<String> = dp.other_layouts().iter().map(|l| l.name()).collect();
    let ours = format!("v{}", lb_common::PIN_LAYOUT_VERSION);
    let lost = "the maps are filled from the source and established flows are picked up on the same \
                Maglev tables (session affinity, flows given another source port, and replies in flight \
                at the swap are lost)";
    let outcome = dp.carry_state(maps).with_context(|| {
        format!("carrying the state of pin layout {others:?} into {ours}; it keeps serving")
    })?;
    Ok(match outcome {
        Outcome::NoOther => None,
        Outcome::Carried(from, c) => {
            info!(
                from = from.name(),
                services = c.services,
                backends = c.backends,
                flows = c.flows,
                affinity = c.affinity,
                failed = c.failed,
                retried = c.retried,
                "taking over from pin layout {} (this agent uses {ours}): its state is carried over; \
                 its programs serve until ours replace them in its links",
                from.name()
            );
            Some((from.name(), "carried"))
        }
        Outcome::TooSmall(from, small) => {
            warn!(
                "taking over from pin layout {} (this agent uses {ours}): its {} holds {} entries, ours {} \
                 (lowered with the update): its state is not carried; {lost}",
                from.name(),
                small.map,
                small.theirs,
                small.ours
            );
            Some((from.name(), "rebuilt"))
        }
        Outcome::Unreadable => {
            warn!(
                "taking over from pin layout {others:?} (this agent uses {ours}): this agent cannot read its \
                 state (a map format it does not know: a rollback across a format change, or a layout too old); {lost}"
            );
            Some((others[0].clone(), "rebuilt"))
        }
        Outcome::OursRan => {
            warn!(
                "pin layout {others:?} beside ours ({ours}), whose programs ran after it: ours is kept, and \
                 its links are taken over"
            );
            Some((others[0].clone(), "ours_kept"))
        }
    })
}

/// Once every matching interface is attached: other layouts are removed. Until then, says once
/// which interfaces they wait for (`waiting`: what was said last).
fn finish_take_over(
    dp: &mut Datapath,
    globs: &[glob::Pattern],
    agent: &mut Agent<datapath::Maps>,
    waiting: &mut Vec<String>,
) {
    if dp.other_layouts().is_empty() {
        return;
    }
    match dp.finish_take_over(&matching(globs), &mut agent.maps) {
        Err(w) => {
            if w != *waiting {
                warn!(
                    interfaces = ?w,
                    "pin layouts {:?} stay until these interfaces carry our programs: they serve them meanwhile, \
                     from maps nothing updates",
                    dp.other_layouts().iter().map(|l| l.name()).collect::<Vec<_>>()
                );
                *waiting = w;
            }
        }
        Ok(done) => {
            for (layout, r) in done {
                match r {
                    Ok(()) => info!(
                        from = layout.name(),
                        "took over from pin layout {}: its links hold our programs and it is removed",
                        layout.name()
                    ),
                    Err(e) => {
                        agent.metrics.layout_takeover(&layout.name(), "failed");
                        error!(from = layout.name(), "pin layout {}: {e}", layout.name());
                    }
                }
            }
        }
    }
}

/// The interfaces present that match `globs`.
fn matching(globs: &[glob::Pattern]) -> Vec<String> {
    datapath::interfaces().into_iter().filter(|n| globs.iter().any(|g| g.matches(n))).collect()
}

fn addresses(addrs: &[lb_agent::host::InterfaceAddr]) -> Vec<std::net::Ipv4Addr> {
    addrs.iter().map(|a| a.addr).collect()
}

/// Which interfaces lb attaches to, by role.
struct Interfaces {
    /// `--interfaces`: pods' host-side interfaces.
    pods: Vec<glob::Pattern>,
    /// `--node-interfaces`: this node's own.
    nodes: Vec<glob::Pattern>,
}

impl Interfaces {
    /// The role of interface `name`, if lb attaches to it (a pod's, where both match).
    fn role(&self, name: &str) -> Option<Role> {
        if self.pods.iter().any(|g| g.matches(name)) {
            Some(Role::Pod)
        } else if self.nodes.iter().any(|g| g.matches(name)) {
            Some(Role::Node)
        } else {
            None
        }
    }
}

/// This node's global IPv6 addresses (none if they cannot be read: said in the log).
fn local_ipv6() -> Vec<std::net::Ipv6Addr> {
    lb_agent::host::global_ipv6_addresses().unwrap_or_else(|e| {
        warn!("reading this node's IPv6 addresses: {e}");
        Vec::new()
    })
}

/// This node's IPv4 addresses (none if they cannot be read: said in the log).
fn local_ipv4() -> Vec<lb_agent::host::InterfaceAddr> {
    lb_agent::host::ipv4_addresses().unwrap_or_else(|e| {
        warn!("reading this node's addresses: {e}");
        Vec::new()
    })
}

/// Attaches to interfaces that match and are new; forgets those that vanished. What failed goes
/// to the health (`/readyz`) and the metrics; each failure is logged when it first happens or
/// changes. `cause`: what started this pass (`start`, `link-notification`, `pins-restored`,
/// `rescan`), in the log.
/// Aborts the connected UDP sockets whose backend left their Service (see
/// `Datapath::abort_stale_udp`), counted; a failure is logged once until it works again (it is
/// tried again within a second).
fn abort_stale_udp(dp: &Datapath, agent: &Agent<datapath::Maps>, failing: &mut bool) {
    match dp.abort_stale_udp(&agent.maps) {
        Ok(n) => {
            if n > 0 {
                info!(sockets = n, "aborted connected UDP sockets whose backend left");
                agent.metrics.socket_udp_aborted.inc_by(n as u64);
            }
            *failing = false;
        }
        Err(e) => {
            if !std::mem::replace(failing, true) {
                // What sock_diag answers: no handler for UDP (the udp_diag module is not loaded
                // and cannot be), or no SOCK_DESTROY (a kernel without CONFIG_INET_DIAG_DESTROY).
                let why = match e.raw_os_error() {
                    Some(libc::ENOENT) => "this kernel has no sock_diag for UDP (load the udp_diag module)",
                    Some(libc::EOPNOTSUPP) => "this kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY)",
                    _ => "sock_diag refused",
                };
                warn!(
                    "aborting connected UDP sockets whose backend left: {e}: {why}; until it can, they keep \
                     their backend until they reconnect"
                );
            }
        }
    }
}

/// How many ticks in a row a restore of the pins may fail before the agent gives up.
const RESTORE_TRIES: u32 = 20;

/// Pins every map again, attaches afresh and holds the pin directory (again, if it is a new one).
fn restore_pins(
    dp: &mut Datapath,
    interfaces: &Interfaces,
    socket_lb: datapath::SocketLb,
    cgroup_root: &std::path::Path,
    agent: &Agent<datapath::Maps>,
    pin_dir: &std::path::Path,
    lock: &mut datapath::PinLock,
) -> anyhow::Result<()> {
    dp.repin(&agent.maps)?;
    attach_matching(dp, interfaces, agent, "pins-restored");
    attach_sockets(dp, socket_lb, cgroup_root)?;
    if !lock.holds(pin_dir) {
        match datapath::try_lock(pin_dir)? {
            Some(l) => *lock = l,
            None => error!(pin_dir = %pin_dir.display(), "another agent took the new pin directory"),
        }
    }
    Ok(())
}

/// Attaches the socket programs to --cgroup-root (`--socket-lb host|all`), or detaches those an
/// earlier agent left (`off`). A root that cannot take them stops the agent: the operator asked
/// for socket-level load balancing.
fn attach_sockets(dp: &mut Datapath, mode: datapath::SocketLb, root: &std::path::Path) -> anyhow::Result<()> {
    if mode == datapath::SocketLb::Off {
        dp.detach_sockets();
        return Ok(());
    }
    dp.attach_sockets(root).context("--socket-lb")?;
    info!(cgroup = %root.display(), mode = ?mode, "socket-level load balancing attached");
    Ok(())
}

fn attach_matching(dp: &mut Datapath, interfaces: &Interfaces, agent: &Agent<datapath::Maps>, cause: &str) {
    let present = datapath::interfaces();
    for name in dp.gone(&present) {
        info!(interface = %name, "interface gone");
        dp.forget(&name);
    }
    let before = agent.health.failing();
    let mut failed = Vec::new();
    let addrs = if interfaces.nodes.is_empty() { Vec::new() } else { local_ipv4() };
    let ipv6 = agent.ctx.ipv6 && !interfaces.nodes.is_empty();
    let addrs6 = if ipv6 {
        lb_agent::host::ipv6_interface_addresses().unwrap_or_else(|e| {
            warn!("reading this node's IPv6 addresses: {e}");
            Vec::new()
        })
    } else {
        Vec::new()
    };
    for name in present {
        let Some(role) = interfaces.role(&name) else { continue };
        if !dp.is_attached(&name) {
            match dp.attach(&name, role) {
                Ok(()) => info!(interface = %name, cause = %cause, role = ?role, "attached"),
                Err(e) => {
                    let e = e.to_string();
                    if before.get(&name) != Some(&e) {
                        warn!(interface = %name, "{e}");
                    }
                    failed.push((name, e));
                    continue;
                }
            }
        }
        if role == Role::Node {
            // Flows to remote endpoints leave with the interface's address (or, where it has
            // none, a tunnel device say, with the first NodePort address).
            let addr = lb_agent::host::primary_ipv4_of(&addrs, &name)
                .or_else(|| agent.ctx.nodeport_addresses.first().copied());
            // (Or, where it has none, a tunnel device say, the best IPv6 NodePort address.)
            let addr6 = lb_agent::host::snat_ipv6_of(&addrs6, Some(&name), agent.ctx.node_ip6)
                .or_else(|| {
                    let nodeports: Vec<lb_agent::host::Ipv6IfAddr> = addrs6
                        .iter()
                        .filter(|a| agent.ctx.nodeport_addresses6.contains(&a.addr))
                        .cloned()
                        .collect();
                    lb_agent::host::snat_ipv6_of(&nodeports, None, agent.ctx.node_ip6)
                })
                .filter(|_| ipv6);
            match dp.set_node_address(&name, addr, addr6) {
                Ok(false) => {}
                Ok(true) => {
                    match addr {
                        Some(a) => {
                            info!(interface = %name, "flows from outside to remote endpoints leave it as {a}")
                        }
                        None => warn!(
                            interface = %name,
                            "no IPv4 address (and no NodePort address): flows from outside to remote \
                             endpoints that would leave through it as this node have none to leave with, \
                             and are dropped"
                        ),
                    }
                    match addr6 {
                        Some(a) => info!(
                            interface = %name,
                            "IPv6 flows from outside to remote endpoints leave it as {a}"
                        ),
                        None if ipv6 => warn!(
                            interface = %name,
                            "no global IPv6 address (and no IPv6 NodePort address): IPv6 flows from outside \
                             to remote endpoints that would leave through it as this node are dropped"
                        ),
                        None => {}
                    }
                }
                Err(e) => failed.push((name, e.to_string())),
            }
        }
    }
    dp.prune_interface_records();
    agent.health.interfaces(&failed);
    agent.metrics.attach_failed.clear();
    for (name, _) in &failed {
        agent.metrics.attach_failed.get_or_create(&vec![("interface".to_string(), name.clone())]).set(1);
    }
}
