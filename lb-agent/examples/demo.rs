//! The demo: a two-node cluster in network namespaces, an lb-agent per node in standalone mode
//! reading `deploy/examples/`, and traffic that shows which backend answers.
//! Run it with `cargo xtask demo` (it builds this and the agent first).

use std::{
    collections::BTreeMap,
    io::BufRead as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use lb_agent::datapath::Mode;
use lb_testkit::lab::{tcp_asks, udp_asks, wait_until, Lab, Pod, Session};

#[derive(Parser)]
struct Args {
    /// The lb-agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// Directory of Service and EndpointSlice manifests.
    #[arg(long)]
    examples: PathBuf,
    /// The lbctl binary (its output is shown).
    #[arg(long)]
    lbctl: PathBuf,
    /// Where the pod → service direction runs: `tc` or `xdp`.
    #[arg(long, default_value = "tc", value_parser = ["tc", "xdp"])]
    datapath: String,
    /// Tear down right after showing the results.
    #[arg(long)]
    once: bool,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const FLOWS: usize = 3_000;

fn step(n: u32, what: &str) {
    println!("[{n}/6] {what}");
}

fn spread(title: &str, answers: Vec<std::io::Result<String>>) -> anyhow::Result<()> {
    let total = answers.len();
    let mut t: BTreeMap<String, usize> = BTreeMap::new();
    for a in answers {
        *t.entry(a.context("a request failed")?).or_default() += 1;
    }
    println!("      {title}: {total} requests, all answered");
    for (b, n) in &t {
        let share = *n as f64 * 100.0 / total as f64;
        println!("        {b:<4} {n:>6}  {share:5.1}%  {}", "#".repeat((share / 2.0).round() as usize));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    step(1, "creating the cluster: 2 node namespaces joined by an underlay, 5 pod namespaces on veth pairs");
    let mut lab = Lab::new("demo")?;
    let n1 = lab.node(1)?;
    let n2 = lab.node(2)?;
    lab.link_nodes(&n1, &n2)?;
    let datapath = if args.datapath == "xdp" { Mode::Xdp } else { Mode::Tc };
    let offload = datapath == Mode::Tc;
    let c1 = lab.pod(&n1, "c1", 10, offload)?;
    let c2 = lab.pod(&n2, "c2", 10, offload)?;
    let backends: Vec<Pod> = vec![
        lab.pod(&n1, "b1", 2, offload)?,
        lab.pod(&n1, "b2", 3, offload)?,
        lab.pod(&n2, "b3", 4, offload)?,
    ];
    step(2, "starting servers in b1, b2 (node1) and b3 (node2): TCP 8080 and UDP 5353, each answers with its name");
    for b in &backends {
        lab.serve(b, 8080, 5353)?;
    }
    let mode = args.datapath.as_str();
    step(
        3,
        &format!(
            "starting lb-agent on node1 and node2 (--datapath {mode}, --manifests {})",
            args.examples.display()
        ),
    );
    for n in [&n1, &n2] {
        lab.start_agent(n, &args.agent, &args.examples, datapath, &[])?;
    }
    step(4, "waiting for the service 10.96.0.10 to answer from both nodes");
    for (c, n) in [(&c1, &n1), (&c2, &n2)] {
        wait_until(Duration::from_secs(20), || {
            tcp_asks(c, SocketAddrV4::new(VIP, 80), 1)?.pop().expect("one")
        })
        .with_context(|| format!("service unreachable from {}; agent log:\n{}", c.name, lab.agent_log(n)))?;
    }

    step(5, "sending traffic");
    let tcp = SocketAddrV4::new(VIP, 80);
    println!("      first requests from c1 (node1) to {tcp}, one new connection each:");
    for (i, a) in tcp_asks(&c1, tcp, 8)?.into_iter().enumerate() {
        let name = a?;
        let ip = backends.iter().find(|b| b.name == name).map_or(String::new(), |b| b.ip.to_string());
        println!("        request {:>2} -> {name} ({ip})", i + 1);
    }
    let mut session = Session::open(&c1, tcp)?;
    let first = session.ask()?;
    spread(&format!("TCP {tcp} from c1 (node1), one connection each"), tcp_asks(&c1, tcp, FLOWS)?)?;
    spread(
        "UDP 10.96.0.10:53 from c1 (node1), one source port each",
        udp_asks(&c1, SocketAddrV4::new(VIP, 53), 10_000, FLOWS)?,
    )?;
    spread(&format!("TCP {tcp} from c2 (node2)"), tcp_asks(&c2, tcp, 600)?)?;
    let sticky = (0..20).map(|_| session.ask()).collect::<Result<Vec<_>, _>>()?;
    println!(
        "      one long-lived connection from c1: 21 requests, answered by {first} every time: {}",
        sticky.iter().all(|s| *s == first)
    );
    let sticky_vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 80);
    spread(
        &format!("TCP {sticky_vip} (sessionAffinity: ClientIP) from c1: one backend for every connection"),
        tcp_asks(&c1, sticky_vip, 300)?,
    )?;
    let local_vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 12), 80);
    spread(
        &format!("TCP {local_vip} (internalTrafficPolicy: Local) from c1 on node1: node1's endpoints only"),
        tcp_asks(&c1, local_vip, 300)?,
    )?;
    spread(
        &format!("TCP {local_vip} (internalTrafficPolicy: Local) from c2 on node2: node2's endpoint only"),
        tcp_asks(&c2, local_vip, 300)?,
    )?;

    step(6, "what node1's kernel holds and counted, as lbctl shows it (read from the pinned maps)");
    for cmd in [&["services"][..], &["stats"][..]] {
        println!("\n$ lbctl --pin-dir {} {}", n1.pin_dir.display(), cmd.join(" "));
        let out = std::process::Command::new(&args.lbctl)
            .arg("--pin-dir")
            .arg(&n1.pin_dir)
            .args(cmd)
            .output()
            .context("running lbctl")?;
        anyhow::ensure!(out.status.success(), "lbctl failed: {}", String::from_utf8_lossy(&out.stderr));
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\ndemo ready in {:.1} s. Explore while it runs:", started.elapsed().as_secs_f64());
    let pins = lb_agent::datapath::layout_dir(&n1.pin_dir);
    println!(
        "  {} --pin-dir {} conntrack --service demo/who:tcp | head",
        args.lbctl.display(),
        n1.pin_dir.display()
    );
    println!("  {} --pin-dir {} maglev 10.96.0.10:80/TCP", args.lbctl.display(), n1.pin_dir.display());
    println!("  {} --pin-dir {} services -o json", args.lbctl.display(), n1.pin_dir.display());
    println!("  bpftool map dump pinned {}/LB4_SERVICES", pins.display());
    println!(
        "  ip netns exec {} bash -c 'exec 3<>/dev/tcp/10.96.0.10/80; echo hi >&3; head -1 <&3'",
        c1.netns
    );
    println!("  agent logs: {} and {}", lab.agent_log_path(&n1).display(), lab.agent_log_path(&n2).display());
    if args.once {
        println!("tearing down (--once)");
        return Ok(());
    }
    println!("Press Enter or Ctrl-C to tear down.");
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    ctrlc::set_handler(move || {
        let _ = tx2.send(());
    })
    .context("Ctrl-C handler")?;
    std::thread::spawn(move || {
        let _ = std::io::stdin().lock().lines().next();
        let _ = tx.send(());
    });
    let _ = rx.recv();
    println!("tearing down");
    drop(lab);
    Ok(())
}
