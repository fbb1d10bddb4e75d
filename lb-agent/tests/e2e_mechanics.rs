//! Datapath mechanics end to end, with real sockets through namespaces and the real agent: lb
//! coexists with other TC programs on the interfaces it attaches to: it goes before the ones
//! already there (`--tc-position first`), and every packet it does not drop goes on to the ones
//! after it.

mod support;

use std::{net::SocketAddrV4, time::Duration};

use aya::{
    programs::{links::LinkOrder, tc::TcAttachOptions, SchedClassifier, TcAttachType},
    sys::{enable_stats, Stats},
    Ebpf,
};
use lb_agent::datapath::{Mode, PROG_TC_FORWARD, PROG_TC_REPLY};
use lb_testkit::{
    lab::{in_netns, tcp_asks, wait_until},
    NOOP_OBJECT,
};
use support::{endpoint, who, Cluster, VIP};

/// A no-op TC program (its verdict, `TC_ACT_OK`, is final) attached after every other TCX
/// program at `at` on `interface` in `netns`; it lives as long as the returned object.
fn attach_after(netns: &str, interface: &str, at: TcAttachType) -> Ebpf {
    let interface = interface.to_string();
    in_netns(netns, move || -> anyhow::Result<Ebpf> {
        let mut ebpf = Ebpf::load(NOOP_OBJECT)?;
        let p: &mut SchedClassifier =
            ebpf.program_mut("noop_tc").ok_or_else(|| anyhow::anyhow!("no noop_tc"))?.try_into()?;
        p.load()?;
        p.attach_with_options(&interface, at, TcAttachOptions::TcxOrder(LinkOrder::last()))?;
        Ok(ebpf)
    })
    .expect("enter the node's namespace")
    .expect("attach the program after lb")
}

/// How many times the no-op program in `ebpf` has run (while run-time statistics are on).
fn runs(ebpf: &Ebpf) -> u64 {
    let p = ebpf.program("noop_tc").expect("noop_tc");
    p.info().expect("program info").run_count()
}

#[test]
fn packets_lb_passes_go_on_to_the_tc_programs_after_it() {
    let c = Cluster::new(
        "coexist",
        Mode::Tc,
        true,
        |b| who("", &b[..2].iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>()),
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    // Run counts are kept while this descriptor is open.
    let _stats = enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS");
    // After lb on the client's interface: ingress sees the client's packets to the VIP (which lb
    // rewrites), egress the replies to the client (which lb translates back).
    let node = &c.nodes[0].netns;
    let ingress = attach_after(node, &c.client1.host_if, TcAttachType::Ingress);
    let egress = attach_after(node, &c.client1.host_if, TcAttachType::Egress);
    let (in_before, out_before) = (runs(&ingress), runs(&egress));

    let asks = 5;
    let answers = tcp_asks(&c.client1, SocketAddrV4::new(VIP, 80), asks).expect("connections");
    let names: Vec<String> = c.backends[..2].iter().map(|b| b.name.clone()).collect();
    for a in &answers {
        let a = a.as_ref().expect("answered through the Service");
        assert!(names.contains(a), "answered by {a}, not a backend of the Service");
    }
    // Each connection: at least SYN, ACK and a request from the client, SYN-ACK and an answer
    // back. A program after lb that never runs (lb's verdict was final) shows 0.
    let (seen_in, seen_out) = (runs(&ingress) - in_before, runs(&egress) - out_before);
    let want = 3 * asks as u64;
    assert!(seen_in >= want, "the program after lb saw {seen_in} client packets, want at least {want}");
    assert!(
        seen_out >= 2 * asks as u64,
        "the program after lb saw {seen_out} replies, want at least {}",
        2 * asks
    );
}

/// The names of the TCX programs at `at` on `interface` in `netns`, in the order they run.
fn tcx_order(netns: &str, interface: &str, at: TcAttachType) -> Vec<String> {
    let interface = interface.to_string();
    in_netns(netns, move || {
        let (_, programs) = SchedClassifier::query_tcx(&interface, at).expect("query TCX programs");
        programs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()).collect::<Vec<_>>()
    })
    .expect("enter the node's namespace")
}

#[test]
fn lb_goes_before_the_tc_programs_already_on_an_interface() {
    let mut c = Cluster::new(
        "tcfirst",
        Mode::Tc,
        true,
        |b| who("", &b[..2].iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>()),
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    // lb leaves node 1 (its links go with their pins), then another program whose verdict is
    // final takes both hooks of the client's interface, then lb comes back.
    let n1 = c.nodes[0].clone();
    c.lab.stop_agent(&n1, libc::SIGTERM);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args(["--cleanup", "--pin-dir"])
        .arg(&n1.pin_dir)
        .output()
        .expect("cleanup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let iface = c.client1.host_if.clone();
    let gone = wait_until(Duration::from_secs(3), || {
        let names = tcx_order(&n1.netns, &iface, TcAttachType::Ingress);
        if names.is_empty() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{names:?}")))
        }
    });
    assert!(gone.is_ok(), "lb's programs were not detached: {gone:?}");
    let ingress = attach_after(&n1.netns, &iface, TcAttachType::Ingress);
    let egress = attach_after(&n1.netns, &iface, TcAttachType::Egress);
    c.lab.restart_agent(&n1).expect("agent again");
    // Had lb gone after them, their final verdict would keep it from ever seeing a packet.
    c.wait_reachable(&c.client1, 80);
    assert_eq!(tcx_order(&n1.netns, &iface, TcAttachType::Ingress), [PROG_TC_FORWARD, "noop_tc"]);
    assert_eq!(tcx_order(&n1.netns, &iface, TcAttachType::Egress), [PROG_TC_REPLY, "noop_tc"]);
    drop((ingress, egress));
}
