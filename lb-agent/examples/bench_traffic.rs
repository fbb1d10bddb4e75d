//! Real traffic through network namespaces, lb against kube-proxy's dataplanes, and the time
//! kube-proxy's rulesets take to load. Run by `cargo xtask bench`.
//!
//! Topology (the same for every contender): one node namespace; a client pod and three backend pods
//! on veth pairs (lb-agent's lab). The client runs `wrk` pinned to CPU 0; each backend runs nginx
//! (one worker) pinned to CPU 1. The Service measured is the last of N (1, 1,000, 10,000), each
//! with 3 endpoints, and comes last in every chain. Contenders, each in a fresh lab:
//!
//! - `direct`: the client connects to a backend's address (no load balancer: the floor);
//! - `tc-noop`: the same connections with a TC program that does nothing (lb-ebpf's no-op) where
//!   lb's forward and reply programs go, ingress and egress of every pod's host-side interface:
//!   the floor of any TC datapath at those hooks, which `lb-tc` and `lb-sock-all` cannot beat;
//! - `lb-tc`, `lb-xdp`: lb-agent (release build) in standalone mode, TC or XDP forward path;
//! - `lb-sock-all`: lb-agent in TC mode with `--socket-lb all`, its socket programs attached to a
//!   child cgroup of a cgroup v2 hierarchy mounted for the run, where wrk runs: connections are
//!   sent to a backend at `connect`, and no packet is translated;
//! - `iptables-nft`, `iptables-legacy`: kube-proxy's iptables-mode rules (see `kube_proxy.rs`)
//!   loaded with iptables-restore, with the nf_tables and the legacy backend;
//! - `nftables`: kube-proxy's nftables-mode ruleset loaded with `nft -f`;
//! - `host-direct`, `host-lb-sock`, `host-nftables`: the client is a process on the node (wrk in
//!   the node's namespace, as a hostNetwork pod): to a backend's address; through lb-agent with
//!   `--socket-lb host`, wrk in the child cgroup its socket programs attach to; through
//!   kube-proxy's nftables ruleset, whose `nat-output` chain catches the node's own connections
//!   (kube-proxy's nat OUTPUT path). Their ratios are to `host-direct` and `host-nftables`.
//! - `direct6`, `lb6`: the same over IPv6, in a dual-stack lab (`Lab::dual_stack`: every pod has
//!   an IPv6 address too, and nginx listens on it): the client connects to a backend's IPv6
//!   address, or to an IPv6 ClusterIP through lb-agent in TC mode with `--ipv6 on`. Their
//!   Services are the IPv4 ones as single-stack IPv6 Services (see [`manifests6`]). Their ratio
//!   is to `direct6`. To keep the run's length, they run only the new-connection load (the
//!   per-connection cost, where an IPv6 lookup and rewrite would show) and only at the smallest
//!   Service count asked for (lb's lookups do not grow with the count; 1 by default), beside the
//!   IPv4 contenders of that count, so `lb6 ÷ direct6` and `lb-tc ÷ direct` come from the same
//!   runs.
//!
//! Each contender and Service count runs three loads, each a warm-up then `--reps` runs of
//! `--seconds`: new connections (`wrk -t1 -c50`, `Connection: close`), kept-alive requests
//! (`wrk -t1 -c50 --latency`) and one bulk stream (`wrk -t1 -c1` fetching a 64 MiB file). CPU
//! time per request comes from /proc/stat (all CPUs, user + system + softirq) over each run.
//! Netfilter's TIME_WAIT timeout is 1 s in the node namespace, or its table fills at these rates.

#[path = "common/kube_proxy.rs"]
mod kube_proxy;
#[path = "common/report.rs"]
mod report;
#[path = "common/traffic.rs"]
mod traffic;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use kube_proxy::ServicePort;
use lb_agent::datapath::Mode;
use lb_testkit::{
    lab::{http_get, in_netns, wait_until, Lab, Node, Pod},
    sockets::Cgroup2,
    NOOP_OBJECT,
};
use traffic::{
    figure_row, netns_cmd, ratio, run_with_input, start_nginx, sysctl, wrk_in, Load, Measured, Nginx,
    WrkResult,
};

#[derive(Parser)]
struct Args {
    /// The lb-agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// Service counts.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    services: Vec<u32>,
    /// Measured runs per load (after one warm-up); each figure is their median (five: the
    /// least that the new-connection goals are judged on).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 2)]
    seconds: u32,
    /// Contenders to run (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only the new-connection load (for a profile of it; not with `--markdown`).
    #[arg(long, conflicts_with = "markdown")]
    new_connections_only: bool,
    /// Services × endpoints for separate ruleset load times (0, the default, skips them; the
    /// traffic runs time their own ruleset loads and one change).
    #[arg(long, default_value_t = 0)]
    ruleset_services: u32,
    #[arg(long, default_value_t = 10)]
    ruleset_endpoints: u32,
    /// Write the results into this Markdown file (replacing the traffic and ruleset sections).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// One more argument for every lb contender's agent, e.g. `--agent-arg=--ct-entries=131072`
    /// (repeatable; for experiments, so not with `--markdown`, whose runs are at the defaults).
    #[arg(long, allow_hyphen_values = true, conflicts_with = "markdown")]
    agent_arg: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Contender {
    Direct,
    TcNoop,
    LbTc,
    LbXdp,
    IptablesNft,
    IptablesLegacy,
    Nftables,
    LbSockAll,
    HostDirect,
    HostLbSock,
    HostNftables,
    Direct6,
    Lb6,
}

impl Contender {
    const ALL: [Contender; 13] = [
        Contender::Direct,
        Contender::TcNoop,
        Contender::LbTc,
        Contender::LbXdp,
        Contender::LbSockAll,
        Contender::Nftables,
        Contender::IptablesNft,
        Contender::IptablesLegacy,
        Contender::HostDirect,
        Contender::HostLbSock,
        Contender::HostNftables,
        Contender::Direct6,
        Contender::Lb6,
    ];

    /// Whether it runs over IPv6 (in a dual-stack lab).
    fn ipv6(self) -> bool {
        matches!(self, Contender::Direct6 | Contender::Lb6)
    }

    /// The loads it runs: the IPv6 contenders only new connections (see the module
    /// documentation).
    fn loads(self) -> &'static [Load] {
        if self.ipv6() {
            &[Load::NewConnections]
        } else {
            &[Load::NewConnections, Load::KeptAlive, Load::Bulk]
        }
    }

    /// Whether the client is a process on the node rather than a pod.
    fn client_on_host(self) -> bool {
        matches!(self, Contender::HostDirect | Contender::HostLbSock | Contender::HostNftables)
    }

    /// The contenders a row's ratios are to: no load balancer, then kube-proxy's modes, each with
    /// a client of the same kind (none measured: "–").
    fn references(self) -> [Option<Contender>; 4] {
        if self.client_on_host() {
            [Some(Contender::HostDirect), Some(Contender::HostNftables), None, None]
        } else if self.ipv6() {
            [Some(Contender::Direct6), None, None, None]
        } else {
            [
                Some(Contender::Direct),
                Some(Contender::Nftables),
                Some(Contender::IptablesNft),
                Some(Contender::IptablesLegacy),
            ]
        }
    }

    fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::TcNoop => "tc-noop",
            Contender::LbTc => "lb-tc",
            Contender::LbXdp => "lb-xdp",
            Contender::IptablesNft => "iptables-nft",
            Contender::IptablesLegacy => "iptables-legacy",
            Contender::Nftables => "nftables",
            Contender::LbSockAll => "lb-sock-all",
            Contender::HostDirect => "host-direct",
            Contender::HostLbSock => "host-lb-sock",
            Contender::HostNftables => "host-nftables",
            Contender::Direct6 => "direct6",
            Contender::Lb6 => "lb6",
        }
    }
}

/// The lab of one contender: a node, a client and three backends running nginx.
struct Bed {
    // Field order is drop order: nginx stops before the lab removes the namespaces.
    _nginx: Nginx,
    client: Pod,
    /// Where wrk runs: the client pod's namespace, or the node's for the `host-*` contenders.
    client_ns: String,
    backends: Vec<Pod>,
    node: Node,
    lab: Lab,
    /// Where wrk runs, for `lb-sock-all` (after the lab: its links go with the lab's pins).
    cgroup: Option<Cgroup2>,
    /// `tc-noop`'s programs, detached when dropped.
    noop: Option<aya::Ebpf>,
}

/// A bed; `dual_stack`: its pods have IPv6 addresses too, where nginx listens as well.
fn bed(tag: &str, from_host: bool, dual_stack: bool) -> anyhow::Result<Bed> {
    let mut lab = Lab::new(tag)?;
    if dual_stack {
        lab.dual_stack();
    }
    let node = lab.node(1)?;
    let client = lab.pod(&node, "client", 100, true)?;
    let client_ns = if from_host { node.netns.clone() } else { client.netns.clone() };
    if from_host {
        // A node has a route for Service addresses (its default route): a connect to one needs it
        // before kube-proxy's nat OUTPUT rewrites the packet (lb's socket programs rewrite before
        // the lookup). Here: towards a pod's interface, as good as any.
        let out = netns_cmd(&node.netns, None, "ip")
            .args(["route", "add", "10.96.0.0/12", "dev", &client.host_if])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "a route for Service addresses: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    sysctl(&client_ns, "net.ipv4.ip_local_port_range=1024 65535")?;
    sysctl(&client_ns, "net.ipv4.tcp_tw_reuse=1")?;
    let backends =
        (1..=3).map(|i| lab.pod(&node, &format!("be{i}"), i, true)).collect::<Result<Vec<_>, _>>()?;
    let nginx = start_nginx(lab.scratch(), &backends)?;
    Ok(Bed { _nginx: nginx, client, client_ns, backends, node, lab, cgroup: None, noop: None })
}

/// The iptables-restore of contender `c`'s backend.
fn restore_program(c: Contender) -> &'static str {
    if c == Contender::IptablesLegacy {
        "iptables-legacy-restore"
    } else {
        "iptables-nft-restore"
    }
}

/// Loads kube-proxy's rules for `services` into the node (replacing what is there); returns the
/// time the load took.
fn load_rules(c: Contender, node: &Node, services: &[ServicePort]) -> anyhow::Result<Duration> {
    match c {
        Contender::IptablesNft | Contender::IptablesLegacy => run_with_input(
            netns_cmd(&node.netns, None, restore_program(c)),
            &kube_proxy::iptables_full(services),
        ),
        Contender::Nftables | Contender::HostNftables => {
            let _ =
                netns_cmd(&node.netns, None, "nft").args(["delete", "table", "ip", "kube-proxy"]).output();
            let mut cmd = netns_cmd(&node.netns, None, "nft");
            cmd.args(["-f", "-"]);
            run_with_input(cmd, &kube_proxy::nft_full(services, node.underlay_ip()))
        }
        _ => bail!("{} has no kube-proxy rules", c.name()),
    }
}

/// Starts lb-agent on the node with `manifests` (its Services and EndpointSlices, a JSON List);
/// returns when its first full sync is done.
fn start_lb(
    b: &mut Bed,
    args: &Args,
    mode: Mode,
    manifests: &serde_json::Value,
    n: u32,
    extra: &[&str],
) -> anyhow::Result<Duration> {
    let dir = b.lab.scratch().join(format!("manifests-{n}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("services.json"), serde_json::to_vec(manifests)?)?;
    let syncs = |lab: &Lab, node: &Node| lab.agent_log(node).matches("first full sync done").count();
    let before = syncs(&b.lab, &b.node);
    let started = Instant::now();
    let agent_args: Vec<&str> = ["--metrics-bind-address", "127.0.0.1:0"]
        .into_iter()
        .chain(extra.iter().copied())
        .chain(args.agent_arg.iter().map(String::as_str))
        .collect();
    b.lab.start_agent(&b.node, &args.agent, &dir, mode, &agent_args)?;
    let (lab, node) = (&b.lab, &b.node);
    wait_until(Duration::from_secs(60), || {
        if syncs(lab, node) > before {
            Ok(())
        } else {
            Err(std::io::Error::other("agent not synced"))
        }
    })
    .with_context(|| format!("lb-agent never synced; log:\n{}", b.lab.agent_log(&b.node)))?;
    Ok(started.elapsed())
}

/// `tc-noop`: lb-ebpf's no-op TC program on ingress and egress of every pod's host-side
/// interface, where lb attaches its forward and reply programs (`--interfaces`), attached as lb
/// attaches (TCX where the kernel has it).
fn attach_noop(b: &Bed) -> anyhow::Result<aya::Ebpf> {
    use aya::programs::{tc, SchedClassifier, TcAttachType};
    let ifs: Vec<String> = std::iter::once(&b.client).chain(&b.backends).map(|p| p.host_if.clone()).collect();
    in_netns(&b.node.netns, move || -> anyhow::Result<aya::Ebpf> {
        let mut ebpf = aya::EbpfLoader::new().load(NOOP_OBJECT).context("loading the no-op programs")?;
        let prog: &mut SchedClassifier = ebpf.program_mut("noop_tc").context("noop_tc")?.try_into()?;
        prog.load()?;
        for i in &ifs {
            // Only where the kernel lacks TCX (netlink attachment); already there is fine.
            let _ = tc::qdisc_add_clsact(i);
            for at in [TcAttachType::Ingress, TcAttachType::Egress] {
                prog.attach(i, at).with_context(|| format!("attaching the no-op program to {i} ({at:?})"))?;
            }
        }
        Ok(ebpf)
    })?
}

/// The IPv6 address standing for the IPv4 address `10.b.c.d` in lb6's Services:
/// `fd00:10:<b>:<c>::<d>`, `b` written with the digits of its decimal writing (96, 128, 244) as
/// the lab writes its addresses. A pod's is its address in the dual-stack lab
/// ([`lb_testkit::lab::pod_ip6`]); the ClusterIP `10.96.0.10` becomes `fd00:10:96::a`, the
/// addresses of the unmeasured Services' endpoints (`10.128.c.d`) ones that exist nowhere.
fn ipv6_of(a: Ipv4Addr) -> Ipv6Addr {
    let [_, b, c, d] = a.octets();
    let b = u16::from_str_radix(&b.to_string(), 16).expect("decimal digits are hexadecimal ones");
    Ipv6Addr::new(0xfd00, 0x10, b, c.into(), 0, 0, 0, d.into())
}

/// `services` as lb6's Services: [`kube_proxy::manifests`] with each address replaced by the one
/// [`ipv6_of`] gives, the Services single-stack IPv6 (`ipFamilies: [IPv6]`), the EndpointSlices
/// of `addressType: IPv6`.
fn manifests6(services: &[ServicePort]) -> anyhow::Result<serde_json::Value> {
    use serde_json::{json, Value};
    let v6 = |v: &Value| -> anyhow::Result<Value> {
        let a: Ipv4Addr = v.as_str().context("an address")?.parse()?;
        Ok(ipv6_of(a).to_string().into())
    };
    let mut m = kube_proxy::manifests(services);
    for item in m["items"].as_array_mut().context("a List")? {
        match item["kind"].as_str() {
            Some("Service") => {
                let spec = &mut item["spec"];
                let vip = v6(&spec["clusterIP"])?;
                spec["clusterIPs"] = json!([vip]);
                spec["clusterIP"] = vip;
                spec["ipFamilies"] = json!(["IPv6"]);
                spec["ipFamilyPolicy"] = json!("SingleStack");
            }
            Some("EndpointSlice") => {
                item["addressType"] = json!("IPv6");
                for ep in item["endpoints"].as_array_mut().context("endpoints")? {
                    ep["addresses"] = json!([v6(&ep["addresses"][0])?]);
                }
            }
            _ => {}
        }
    }
    Ok(m)
}

type Results = BTreeMap<(u32, Contender), BTreeMap<Load, Measured>>;

/// Sets up contender `c` with `n` Services in a fresh lab; returns the lab and the URL to load.
/// A fresh lab for every configuration: the backends' TIME_WAIT sockets of an earlier
/// configuration (another VIP, so other TCP timestamp offsets) would reject new SYNs.
fn set_up(
    c: Contender,
    n: u32,
    args: &Args,
    loads: &mut Vec<String>,
) -> anyhow::Result<(Bed, String, Vec<ServicePort>)> {
    let mut b = bed(&format!("bt{}", c as u8), c.client_on_host(), c.ipv6())?;
    let backends: Vec<(Ipv4Addr, u16)> = b.backends.iter().map(|p| (p.ip, 80)).collect();
    let services = kube_proxy::services(n.max(1), 3, &backends);
    let vip = services.last().context("no service")?.vip;
    // `tc-noop` connects to a backend too: its programs translate nothing.
    let direct =
        matches!(c, Contender::Direct | Contender::TcNoop | Contender::HostDirect | Contender::Direct6);
    let target: IpAddr = match (c.ipv6(), direct) {
        (false, true) => backends[0].0.into(),
        (false, false) => vip.into(),
        (true, true) => b.backends[0].ip6.context("a dual-stack backend")?.into(),
        (true, false) => ipv6_of(vip).into(),
    };
    if c.ipv6() {
        // lb6's EndpointSlices name the backends by `ipv6_of` their IPv4 addresses.
        for p in &b.backends {
            anyhow::ensure!(p.ip6 == Some(ipv6_of(p.ip)), "{}: IPv6 address {:?}", p.name, p.ip6);
        }
    }
    let manifests = || kube_proxy::manifests(&services);
    let took = match c {
        Contender::Direct | Contender::HostDirect | Contender::Direct6 => Duration::ZERO,
        Contender::TcNoop => {
            b.noop = Some(attach_noop(&b)?);
            Duration::ZERO
        }
        Contender::LbTc => start_lb(&mut b, args, Mode::Tc, &manifests(), n, &[])?,
        Contender::LbXdp => start_lb(&mut b, args, Mode::Xdp, &manifests(), n, &[])?,
        Contender::Lb6 => start_lb(&mut b, args, Mode::Tc, &manifests6(&services)?, n, &["--ipv6", "on"])?,
        Contender::LbSockAll | Contender::HostLbSock => {
            let (tag, mode) = if c == Contender::LbSockAll { ("bt", "all") } else { ("bh", "host") };
            let cgroup = Cgroup2::new(&format!("{tag}{n}"))?;
            let root = cgroup.path().display().to_string();
            b.cgroup = Some(cgroup);
            start_lb(&mut b, args, Mode::Tc, &manifests(), n, &["--socket-lb", mode, "--cgroup-root", &root])?
        }
        _ => {
            let took = load_rules(c, &b.node, &services)?;
            sysctl(&b.node.netns, "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")?;
            took
        }
    };
    if !direct {
        loads.push(format!("| {} | {n} × 3 | {:.2} s |", c.name(), took.as_secs_f64()));
    }
    // Asked from the client pod (the packet path), also for the `host-*` contenders: the node's
    // namespace outside wrk's cgroup has no translation under `host-lb-sock`. wrk's errors count
    // what fails from where it runs.
    let (ns, to) = (b.client.netns.clone(), SocketAddr::from((target, 80)));
    wait_until(Duration::from_secs(30), || match http_get(&ns, to, "/")? {
        (200, _) => Ok(()),
        (code, _) => Err(std::io::Error::other(format!("answered {code}"))),
    })
    .with_context(|| format!("{}: {to} never answered", c.name()))?;
    println!("  {} with {n} services ({:.2} s to set up)", c.name(), took.as_secs_f64());
    // wrk takes an IPv6 address in brackets.
    let url = match target {
        IpAddr::V4(a) => format!("http://{a}/"),
        IpAddr::V6(a) => format!("http://[{a}]/"),
    };
    Ok((b, url, services))
}

/// The time kube-proxy's dataplane `c` takes to apply one Service's change (one endpoint removed,
/// then put back), as kube-proxy writes it: iptables-restore `--noflush` of the Service's chains
/// (its partial sync), or one nft transaction.
fn change_times(c: Contender, node: &Node, services: &[ServicePort]) -> anyhow::Result<Option<(f64, f64)>> {
    let old = services[services.len() / 2].clone();
    let mut new = old.clone();
    new.endpoints.pop();
    let large = services.iter().map(|s| s.endpoints.len()).sum::<usize>() > 1000;
    let mut took = Vec::new();
    for (from, to) in [(&old, &new), (&new, &old)] {
        let t = match c {
            Contender::Nftables | Contender::HostNftables => {
                let mut cmd = netns_cmd(&node.netns, None, "nft");
                cmd.args(["-f", "-"]);
                run_with_input(cmd, &kube_proxy::nft_change(from, to))?
            }
            Contender::IptablesNft | Contender::IptablesLegacy => {
                let mut cmd = netns_cmd(&node.netns, None, restore_program(c));
                cmd.arg("--noflush");
                run_with_input(cmd, &kube_proxy::iptables_change(from, to, large))?
            }
            _ => return Ok(None),
        };
        took.push(t.as_secs_f64());
    }
    Ok(Some((took[0], took[1])))
}

/// One Service count: every contender in a lab of its own, all at once; each repetition of a load
/// runs them one after the other, so the slow drifts of a shared machine hit them all alike.
fn run_count(
    n: u32,
    contenders: &[Contender],
    args: &Args,
    results: &mut Results,
    loads: &mut Vec<String>,
    changes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut beds = Vec::new();
    for &c in contenders {
        beds.push((c, set_up(c, n, args, loads)?));
    }
    let all = [Load::NewConnections, Load::KeptAlive, Load::Bulk];
    let run = if args.new_connections_only { &all[..1] } else { &all[..] };
    for &load in run {
        for (_, (b, url, _)) in beds.iter().filter(|(c, _)| c.loads().contains(&load)) {
            wrk_in(&b.client_ns, b.cgroup.as_ref().map(|g| g.path()), url, load, 1)?;
        }
        for _ in 0..args.reps {
            for (c, (b, url, _)) in beds.iter().filter(|(c, _)| c.loads().contains(&load)) {
                // Let the previous run's TIME_WAIT sockets and conntrack entries go.
                std::thread::sleep(Duration::from_millis(1200));
                let r = wrk_in(&b.client_ns, b.cgroup.as_ref().map(|g| g.path()), url, load, args.seconds)?;
                results.entry((n, *c)).or_default().entry(load).or_default().runs.push(r);
            }
        }
    }
    for (c, _) in &beds {
        for (load, m) in &results[&(n, *c)] {
            let rps = m.of(|r| r.rps);
            println!(
                "    {} {n} {load:?}: {:.0} req/s (min {:.0}, max {:.0}), {:.2} MB/s, p50 {:.3} ms, p99 {:.3} ms, cpu {:.1} us/req, errors {}",
                c.name(),
                rps.median,
                rps.min,
                rps.max,
                m.of(|r| r.transfer).median / 1e6,
                m.of(|r| r.p50_ms).median,
                m.of(|r| r.p99_ms).median,
                m.of(|r| r.cpu_us_per_req).median,
                m.errors()
            );
        }
    }
    for (c, (b, _, services)) in &mut beds {
        if let Some((remove, add)) = change_times(*c, &b.node, services)? {
            println!("    {} {n}: one Service's change {remove:.3} s, {add:.3} s", c.name());
            changes.push(format!("| {} | {n} × 3 | {remove:.3} s, {add:.3} s |", c.name()));
        }
        b.lab.stop_agents();
    }
    Ok(())
}

/// The ruleset load times of kube-proxy's dataplanes at `n` Services × `e` endpoints: a full load
/// and one Service's change, in a namespace of their own.
fn ruleset_times(n: u32, e: u32) -> anyhow::Result<String> {
    let mut lab = Lab::new("rs")?;
    let node = lab.node(1)?;
    let services = kube_proxy::services(n, e, &[(Ipv4Addr::new(10, 244, 1, 1), 80)]);
    let mut md = format!(
        "\nkube-proxy's rulesets for {n} Services × {e} endpoints (`kube_proxy.rs`), loaded into an empty network namespace, in the same run:\n\n| ruleset | full load | one Service's endpoints changed (one removed, then back) |\n|---|---:|---:|\n"
    );
    for c in [Contender::IptablesNft, Contender::IptablesLegacy, Contender::Nftables] {
        let full = load_rules(c, &node, &services)?;
        let (removed, added) = change_times(c, &node, &services)?.context("a kube-proxy ruleset")?;
        let changes = [removed, added];
        println!(
            "  {}: full load {:.2} s, one change {:.3} s / {:.3} s",
            c.name(),
            full.as_secs_f64(),
            changes[0],
            changes[1]
        );
        let _ = writeln!(
            md,
            "| {} | {:.2} s | {:.3} s, {:.3} s |",
            c.name(),
            full.as_secs_f64(),
            changes[0],
            changes[1]
        );
    }
    Ok(md)
}

fn report(args: &Args, results: &Results, loads: &[String], changes: &[String], rulesets: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = report::today();
    let mut md = format!(
        "## Real traffic (network namespaces)\n\nCommand: `cargo xtask bench` · date: {date} · machine: {} CPUs, kernel {} · \
         load generator: wrk 4.1 (Debian), `-t1`, pinned to CPU 0; backends: nginx, one worker each, pinned to CPU 1; \
         3 endpoints per Service, the measured Service last in every chain; {} runs of {} s after a 1 s warm-up; median (min–max). \
         Every contender has a lab of its own, set up at once for each Service count; the runs of a load take the contenders in turn, \
         so drifts of the shared machine hit all alike. `direct` (no load balancer) is measured beside them each time; ratios are to the same Service count's figures. \
         `tc-noop` is `direct` with a TC program that does nothing on ingress and egress of every pod's host-side interface, where lb's forward and reply programs go: the floor of a TC datapath at those hooks. \
         The `host-*` rows have a process on the node as the client (wrk in the node's namespace): their ratios are to `host-direct` and `host-nftables` (kube-proxy's nat OUTPUT path). \
         The `direct6` and `lb6` rows are over IPv6 in a dual-stack lab (to a backend's IPv6 address; to a single-stack IPv6 ClusterIP through lb-agent in TC mode, `--ipv6 on`), \
         new connections only and at the smallest Service count only, in the same runs as the others: their ratio (÷ direct) is to `direct6`.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        host.trim(),
        args.reps,
        args.seconds
    );
    let get = |n: u32, c: Contender, load: Load| results.get(&(n, c)).and_then(|m| m.get(&load));
    type Figure = (&'static str, Load, fn(&WrkResult) -> f64, usize, bool);
    let figures: [Figure; 5] = [
        ("new connections/s (`-c50`, Connection: close)", Load::NewConnections, |r| r.rps, 0, true),
        ("kept-alive requests/s (`-c50`)", Load::KeptAlive, |r| r.rps, 0, true),
        ("kept-alive p50 latency, ms", Load::KeptAlive, |r| r.p50_ms, 3, false),
        ("kept-alive p99 latency, ms", Load::KeptAlive, |r| r.p99_ms, 3, false),
        ("one bulk TCP stream, Gbit/s", Load::Bulk, |r| r.transfer * 8.0 / 1e9, 2, true),
    ];
    for (title, load, f, digits, _) in figures {
        let _ = writeln!(
            md,
            "### {title}\n\n| Services | contender | value | ÷ direct | ÷ nftables | ÷ iptables-nft | ÷ iptables-legacy | errors |\n|---:|---|---:|---:|---:|---:|---:|---:|"
        );
        for &n in &args.services {
            let base = |c: Option<Contender>| c.and_then(|c| get(n, c, load)).map_or(0.0, |m| m.of(f).median);
            for c in Contender::ALL {
                let Some(m) = get(n, c, load) else { continue };
                let bases = c.references().map(base);
                let _ = writeln!(md, "{}", figure_row(&n.to_string(), c.name(), m, f, digits, bases));
            }
        }
        md.push('\n');
    }
    if let Some(n) = args.services.iter().copied().min() {
        let rps = |c: Contender| get(n, c, Load::NewConnections).map(|m| m.of(|r| r.rps).median);
        if let (Some(lb6), Some(direct6)) = (rps(Contender::Lb6), rps(Contender::Direct6)) {
            let v4 = match (rps(Contender::LbTc), rps(Contender::Direct)) {
                (Some(lb), Some(direct)) => {
                    format!("; over IPv4 in the same runs, lb-tc ÷ direct = {}", ratio(lb, direct))
                }
                _ => String::new(),
            };
            let _ = writeln!(
                md,
                "IPv6, new connections/s at {n} Services: lb6 {lb6:.0} ÷ direct6 {direct6:.0} = {}{v4}.\n",
                ratio(lb6, direct6)
            );
        }
    }
    md.push_str("### CPU time per request (all CPUs: user + system + softirq, from /proc/stat), µs\n\n| Services | contender | new connection | of which softirq | kept-alive request | of which softirq |\n|---:|---|---:|---:|---:|---:|\n");
    let cpu_row = |label: String, name: &str, m: &BTreeMap<Load, Measured>| {
        // A dash for a load the contender does not run (the IPv6 ones: kept-alive).
        let g = |load: Load, f: fn(&WrkResult) -> f64| {
            m.get(&load).map_or_else(|| "–".to_string(), |m| format!("{:.1}", m.of(f).median))
        };
        format!(
            "| {label} | {name} | {} | {} | {} | {} |\n",
            g(Load::NewConnections, |r| r.cpu_us_per_req),
            g(Load::NewConnections, |r| r.softirq_us_per_req),
            g(Load::KeptAlive, |r| r.cpu_us_per_req),
            g(Load::KeptAlive, |r| r.softirq_us_per_req)
        )
    };
    for &n in &args.services {
        for c in Contender::ALL {
            if let Some(m) = results.get(&(n, c)) {
                md.push_str(&cpu_row(n.to_string(), c.name(), m));
            }
        }
    }
    md.push_str("\nSet-up time of each contender in the traffic runs (lb: agent start to its first full sync; kube-proxy modes: the ruleset load):\n\n| contender | Services × endpoints | time |\n|---|---:|---:|\n");
    for l in loads {
        md.push_str(l);
        md.push('\n');
    }
    md.push_str("\nOne Service's endpoints changed in those rulesets (one endpoint removed, then put back), as kube-proxy applies it (iptables: `iptables-restore --noflush` of the Service's chains, its partial sync; nftables: one `nft -f` transaction). lb's equivalent, an EndpointSlice event to the maps written, is in the control-plane section.\n\n| contender | Services × endpoints | removed, put back |\n|---|---:|---:|\n");
    for l in changes {
        md.push_str(l);
        md.push('\n');
    }
    md.push_str(rulesets);
    md
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut results = Results::new();
    let mut loads = Vec::new();
    let mut changes = Vec::new();
    let contenders: Vec<Contender> = Contender::ALL
        .into_iter()
        .filter(|c| args.only.is_empty() || args.only.iter().any(|o| o == c.name()))
        .collect();
    // The IPv6 contenders run at the smallest count only (see the module documentation).
    let smallest = args.services.iter().copied().min();
    for &n in &args.services {
        println!("traffic: {n} services");
        let here: Vec<Contender> =
            contenders.iter().copied().filter(|c| !c.ipv6() || Some(n) == smallest).collect();
        run_count(n, &here, &args, &mut results, &mut loads, &mut changes)?;
    }
    let rulesets = if args.ruleset_services > 0 {
        println!("rulesets: {} services x {} endpoints", args.ruleset_services, args.ruleset_endpoints);
        ruleset_times(args.ruleset_services, args.ruleset_endpoints)?
    } else {
        String::new()
    };
    let md = report(&args, &results, &loads, &changes, &rulesets);
    if let Some(path) = &args.markdown {
        report::write_section(path, "traffic", &md)?;
        println!("results written to {}", path.display());
    } else {
        println!("{md}");
    }
    Ok(())
}
