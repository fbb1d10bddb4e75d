//! NodePort traffic from outside the cluster, lb against kube-proxy's dataplanes. Run by
//! `cargo xtask bench`.
//!
//! Topology (the same for every contender): two nodes on an underlay bridge and a client outside
//! the cluster on it (lb-agent's lab); three backend pods running nginx (one worker each) on node
//! 1 or on node 2. The client runs `wrk` pinned to CPU 0 against node 1's NodePort; the backends
//! are pinned to CPU 1. Two cases:
//!
//! - `local`: externalTrafficPolicy Local, the endpoints on node 1 (the client's address kept);
//! - `remote`: externalTrafficPolicy Cluster, the endpoints on node 2: every flow is SNATed to
//!   node 1's address and forwarded (lb: `bpf_fib_lookup` + redirect; kube-proxy: DNAT, routing
//!   and masquerade, with conntrack both ways).
//!
//! The client's and the nodes' underlay interfaces send complete checksums (transmit checksum
//! offload off), as NICs put them on the wire: a veth would hand on a sender's partial checksum,
//! which lb's XDP program leaves to TC.
//!
//! Contenders, each in a fresh lab: `direct` (the client reaches the backends through node 1 by
//! plain routing: the floor), `lb-tc` (lb-agent, release build, standalone, its node-side
//! programs on the underlay interface), `lb-xdp` (the same with `--node-datapath xdp`: generic
//! XDP, the underlay being a veth), `nftables`, `iptables-nft` and `iptables-legacy`
//! (kube-proxy's rules, `kube_proxy.rs`, loaded into node 1). Each runs two loads, a warm-up then
//! `--reps` runs of `--seconds` each, the contenders taking turns: new connections (`wrk -t1 -c50`,
//! `Connection: close`) and kept-alive requests (`-c50`). CPU time per request from /proc/stat.

#[path = "common/kube_proxy.rs"]
mod kube_proxy;
#[path = "common/report.rs"]
mod report;
#[path = "common/traffic.rs"]
mod traffic;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use kube_proxy::ServicePort;
use lb_agent::datapath::Mode;
use lb_testkit::lab::{http_get, node_manifest, wait_until, Lab, Node, Outside, Pod};
use traffic::{figure_row, netns_cmd, run_with_input, start_nginx, sysctl, wrk, Load, Measured, Nginx};

#[derive(Parser)]
struct Args {
    /// The lb-agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// Measured runs per load (after one warm-up).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 2)]
    seconds: u32,
    /// Write the results into this Markdown file (replacing the NodePort section).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// More lb-agent flags (for example `--snat-ports=1024-29999`).
    #[arg(long, allow_hyphen_values = true, value_delimiter = ' ')]
    lb_args: Vec<String>,
    /// The section of the Markdown file the results replace.
    #[arg(long, default_value = "nodeport")]
    section: String,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Contender {
    Direct,
    LbTc,
    LbXdp,
    Nftables,
    IptablesNft,
    IptablesLegacy,
}

impl Contender {
    const ALL: [Contender; 6] = [
        Contender::Direct,
        Contender::LbTc,
        Contender::LbXdp,
        Contender::Nftables,
        Contender::IptablesNft,
        Contender::IptablesLegacy,
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::LbTc => "lb-tc",
            Contender::LbXdp => "lb-xdp",
            Contender::Nftables => "nftables",
            Contender::IptablesNft => "iptables-nft",
            Contender::IptablesLegacy => "iptables-legacy",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Case {
    Local,
    Remote,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Local => "local (eTP Local)",
            Case::Remote => "remote (eTP Cluster, SNAT)",
        }
    }
}

const NODE_PORT: u16 = 30080;

/// The lab of one contender: two nodes, the client outside, three backends running nginx.
struct Bed {
    // Field order is drop order: nginx stops before the lab removes the namespaces.
    _nginx: Nginx,
    out: Outside,
    nodes: [Node; 2],
    lab: Lab,
}

fn bed(tag: &str, case: Case) -> anyhow::Result<(Bed, Vec<Pod>)> {
    let mut lab = Lab::new(tag)?;
    let nodes = [lab.node(1)?, lab.node(2)?];
    lab.link_nodes(&nodes[0], &nodes[1])?;
    let out = lab.outside()?;
    // Checksums complete on the wire, as a NIC sends them (a veth keeps a sender's partial
    // checksum, which lb's XDP program leaves to TC): transmit checksum offload off on the
    // client's and the nodes' underlay interfaces, for every contender.
    for (netns, interface) in [(&out.netns, "eth0"), (&nodes[0].netns, "ul0"), (&nodes[1].netns, "ul0")] {
        let st = netns_cmd(netns, None, "ethtool").args(["-K", interface, "tx", "off"]).status()?;
        anyhow::ensure!(st.success(), "ethtool -K {interface} tx off in {netns} failed");
    }
    sysctl(&out.netns, "net.ipv4.ip_local_port_range=1024 65535")?;
    sysctl(&out.netns, "net.ipv4.tcp_tw_reuse=1")?;
    let on = if case == Case::Local { &nodes[0] } else { &nodes[1] };
    let backends = (1..=3).map(|i| lab.pod(on, &format!("be{i}"), i, true)).collect::<Result<Vec<_>, _>>()?;
    let nginx = start_nginx(lab.scratch(), &backends)?;
    Ok((Bed { _nginx: nginx, out, nodes, lab }, backends))
}

/// Loads kube-proxy's rules for `service` into `node`.
fn load_rules(c: Contender, node: &Node, service: &ServicePort) -> anyhow::Result<()> {
    let services = std::slice::from_ref(service);
    match c {
        Contender::IptablesNft | Contender::IptablesLegacy => {
            let restore = if c == Contender::IptablesLegacy {
                "iptables-legacy-restore"
            } else {
                "iptables-nft-restore"
            };
            run_with_input(netns_cmd(&node.netns, None, restore), &kube_proxy::iptables_full(services))?;
        }
        Contender::Nftables => {
            let mut cmd = netns_cmd(&node.netns, None, "nft");
            cmd.args(["-f", "-"]);
            run_with_input(cmd, &kube_proxy::nft_full(services, node.underlay_ip()))?;
        }
        _ => anyhow::bail!("{} has no kube-proxy rules", c.name()),
    }
    sysctl(&node.netns, "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")
}

/// Sets up contender `c` for `case` in a fresh lab; returns it with the URL to load.
fn set_up(c: Contender, case: Case, args: &Args) -> anyhow::Result<(Bed, String)> {
    let (mut b, backends) = bed(&format!("bn{}{}", c as u8, case as u8), case)?;
    let eps: Vec<(Ipv4Addr, u16)> = backends.iter().map(|p| (p.ip, 80)).collect();
    let local = (case == Case::Local).then(|| eps.clone());
    let service = ServicePort {
        name: "bench/np:http".into(),
        vip: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        endpoints: eps.clone(),
        node_port: Some((NODE_PORT, local)),
    };
    let n1 = b.nodes[0].clone();
    let target = match c {
        Contender::Direct => {
            // Plain routing through node 1 to one backend.
            b.lab.route_via(&b.out, eps[0].0, &n1)?;
            SocketAddr::from((eps[0].0, 80))
        }
        Contender::LbTc | Contender::LbXdp => {
            let dir = b.lab.scratch().join("manifests");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("services.json"),
                serde_json::to_vec(&kube_proxy::manifests(&[service]))?,
            )?;
            std::fs::write(
                dir.join("nodes.yaml"),
                format!("{}---\n{}", node_manifest(&b.nodes[0]), node_manifest(&b.nodes[1])),
            )?;
            // Closed flows go after 1 s, as netfilter's TIME_WAIT entries do in kube-proxy's
            // labs here: a SNATed flow's port is free again once its entry goes.
            let extra = [
                "--metrics-bind-address",
                "127.0.0.1:0",
                "--node-interfaces",
                "ul0",
                "--ct-timeout-tcp-close",
                "1",
            ];
            let xdp: &[&str] = if c == Contender::LbXdp { &["--node-datapath", "xdp"] } else { &[] };
            let extra: Vec<&str> = extra
                .into_iter()
                .chain(xdp.iter().copied())
                .chain(args.lb_args.iter().map(String::as_str))
                .collect();
            b.lab.start_agent(&n1, &args.agent, &dir, Mode::Tc, &extra)?;
            SocketAddr::from((n1.underlay_ip(), NODE_PORT))
        }
        _ => {
            load_rules(c, &n1, &service)?;
            // The checksums a NIC's receive offload would have verified: conntrack does not check
            // them again in software (the veths hand on complete checksums, unverified).
            sysctl(&n1.netns, "net.netfilter.nf_conntrack_checksum=0")?;
            SocketAddr::from((n1.underlay_ip(), NODE_PORT))
        }
    };
    let ns = b.out.netns.clone();
    wait_until(Duration::from_secs(60), || match http_get(&ns, target, "/")? {
        (200, _) => Ok(()),
        (code, _) => Err(std::io::Error::other(format!("answered {code}"))),
    })
    .with_context(|| format!("{} {}: {target} never answered", c.name(), case.name()))?;
    println!("  {} {}: ready", c.name(), case.name());
    Ok((b, format!("http://{target}/")))
}

type Results = BTreeMap<(Case, Contender), BTreeMap<Load, Measured>>;

fn run_case(case: Case, args: &Args, results: &mut Results) -> anyhow::Result<()> {
    let mut beds = Vec::new();
    for c in Contender::ALL {
        beds.push((c, set_up(c, case, args)?));
    }
    for load in [Load::NewConnections, Load::KeptAlive] {
        for (_, (b, url)) in &beds {
            wrk(&b.out.netns, url, load, 1)?;
        }
        for _ in 0..args.reps {
            for (c, (b, url)) in &beds {
                // Let the previous run's TIME_WAIT sockets and conntrack entries go.
                std::thread::sleep(Duration::from_millis(1200));
                let r = wrk(&b.out.netns, url, load, args.seconds)?;
                results.entry((case, *c)).or_default().entry(load).or_default().runs.push(r);
            }
        }
    }
    for (c, (b, _)) in &mut beds {
        for (load, m) in &results[&(case, *c)] {
            println!(
                "    {} {} {load:?}: {:.0} req/s, cpu {:.1} us/req, errors {}",
                c.name(),
                case.name(),
                m.of(|r| r.rps).median,
                m.of(|r| r.cpu_us_per_req).median,
                m.errors()
            );
        }
        b.lab.stop_agents();
    }
    Ok(())
}

fn report(args: &Args, results: &Results) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = report::today();
    let flags = if args.lb_args.is_empty() {
        String::new()
    } else {
        format!(", lb-agent with `{}`", args.lb_args.join(" "))
    };
    let mut md = format!(
        "## NodePort from outside the cluster (network namespaces{flags})\n\nCommand: `cargo xtask bench` · date: {date} · machine: {} CPUs, kernel {} · \
         a client outside the cluster (wrk 4.1, `-t1`, pinned to CPU 0) → node 1's NodePort; 3 nginx backends (one worker each, pinned to CPU 1) \
         on node 1 (`local`: externalTrafficPolicy Local) or node 2 (`remote`: externalTrafficPolicy Cluster, every flow SNATed to node 1's address \
         and forwarded); {} runs of {} s after a 1 s warm-up, the contenders taking turns; median (min–max). `direct`: the client reaches one \
         backend through node 1 by plain routing (no load balancer). lb runs its node-side TC programs on node 1's underlay interface (`lb-tc`), \
         or its XDP node program in front of them (`lb-xdp`, `--node-datapath xdp`: generic XDP, the underlay being a veth; a NIC's driver \
         runs native XDP, which this machine has none to measure); \
         kube-proxy's rules (`kube_proxy.rs`) are loaded into node 1. The client's and the nodes' underlay interfaces have transmit checksum \
         offload off (checksums complete on the wire, as from a NIC), and conntrack does not verify them again (`nf_conntrack_checksum=0`, \
         as for packets a NIC verified). Closed TCP flows are forgotten after 1 s by every contender \
         (netfilter's TIME_WAIT timeout, lb's `--ct-timeout-tcp-close`), so a SNATed flow's port is soon free again.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        host.trim(),
        args.reps,
        args.seconds
    );
    let get = |case: Case, c: Contender, load: Load| results.get(&(case, c)).and_then(|m| m.get(&load));
    type Figure = (&'static str, Load, fn(&traffic::WrkResult) -> f64, usize);
    let figures: [Figure; 3] = [
        ("new connections/s (`-c50`, Connection: close)", Load::NewConnections, |r| r.rps, 0),
        (
            "CPU per new connection (all CPUs: user + system + softirq), µs",
            Load::NewConnections,
            |r| r.cpu_us_per_req,
            1,
        ),
        ("kept-alive requests/s (`-c50`)", Load::KeptAlive, |r| r.rps, 0),
    ];
    for (title, load, f, digits) in figures {
        let _ = writeln!(
            md,
            "### {title}\n\n| case | contender | value | ÷ direct | ÷ nftables | ÷ iptables-nft | ÷ iptables-legacy | errors |\n|---|---|---:|---:|---:|---:|---:|---:|"
        );
        for case in [Case::Local, Case::Remote] {
            let base = |c: Contender| get(case, c, load).map_or(0.0, |m| m.of(f).median);
            let bases =
                [Contender::Direct, Contender::Nftables, Contender::IptablesNft, Contender::IptablesLegacy]
                    .map(base);
            for c in Contender::ALL {
                let Some(m) = get(case, c, load) else { continue };
                let _ = writeln!(md, "{}", figure_row(case.name(), c.name(), m, f, digits, bases));
            }
        }
        md.push('\n');
    }
    md
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut results = Results::new();
    for case in [Case::Local, Case::Remote] {
        println!("nodeport: {}", case.name());
        run_case(case, &args, &mut results)?;
    }
    let md = report(&args, &results);
    if let Some(path) = &args.markdown {
        report::write_section(path, &args.section, &md)?;
        println!("results written to {}", path.display());
    } else {
        println!("{md}");
    }
    Ok(())
}
