//! End to end through network namespaces: two nodes, each with its own agent; backends on both;
//! clients on both. Real TCP and UDP to the service address.

mod support;

use std::{collections::BTreeMap, net::SocketAddrV4};

use lb_agent::datapath::Mode;
use lb_common::counters as c;
use lb_testkit::lab::{tcp_asks, udp_asks, Session};
use support::{endpoint, who, Cluster, VIP};

/// With 3 backends, each should get a third. 3,600 flows: a third is 1,200 with a standard
/// deviation of about 28, so the ±15 % band (±180) is more than 6 standard deviations wide, and
/// the Maglev table (1,021 slots, about 340 each) adds under 0.2 %. Chance alone cannot fail it.
const FLOWS: usize = 3_600;

fn cluster(tag: &str, mode: Mode, tx_csum_offload: bool) -> Cluster {
    let c = Cluster::new(
        tag,
        mode,
        tx_csum_offload,
        |b| who("", &b.iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>()),
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    c.wait_reachable(&c.client2, 80);
    c
}

fn tally(answers: Vec<std::io::Result<String>>, what: &str) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for (i, a) in answers.into_iter().enumerate() {
        let name = a.unwrap_or_else(|e| panic!("{what} #{i} failed: {e}"));
        *t.entry(name).or_default() += 1;
    }
    t
}

fn assert_fair(t: &BTreeMap<String, usize>, total: usize, what: &str) {
    assert_eq!(
        t.keys().map(String::as_str).collect::<Vec<_>>(),
        ["b1", "b2", "b3"],
        "{what}: every backend answers: {t:?}"
    );
    let fair = total as f64 / 3.0;
    for (b, n) in t {
        let off = (*n as f64 - fair).abs() / fair;
        assert!(off <= 0.15, "{what}: {b} got {n} of {total} ({:.1}% off fair)", off * 100.0);
    }
}

fn exercise(c: &Cluster) {
    let tcp = SocketAddrV4::new(VIP, 80);
    let udp = SocketAddrV4::new(VIP, 53);
    // A long-lived connection, asked between batches of new connections: it never moves.
    let mut session = Session::open(&c.client1, tcp).expect("long-lived connection");
    let first = session.ask().expect("first answer");
    let mut tcp_answers = Vec::new();
    for _ in 0..12 {
        tcp_answers.extend(tcp_asks(&c.client1, tcp, FLOWS / 12).expect("tcp clients"));
        assert_eq!(session.ask().expect("long-lived answer"), first, "long-lived connection moved");
    }
    assert_fair(&tally(tcp_answers, "TCP connection"), FLOWS, "TCP from node 1");
    let udp_answers = udp_asks(&c.client1, udp, 10_000, FLOWS).expect("udp clients");
    assert_fair(&tally(udp_answers, "UDP exchange"), FLOWS, "UDP from node 1");

    // From the other node: its own agent balances, across the underlay both ways.
    let t = tally(tcp_asks(&c.client2, tcp, 300).expect("tcp from node 2"), "TCP from node 2");
    assert_eq!(t.len(), 3, "node 2 reaches every backend: {t:?}");
    let t = tally(udp_asks(&c.client2, udp, 10_000, 300).expect("udp from node 2"), "UDP from node 2");
    assert_eq!(t.len(), 3, "node 2 reaches every backend over UDP: {t:?}");
    assert_eq!(session.ask().expect("long-lived answer"), first);

    // The kernel counted what happened.
    let maps = c.maps(1);
    let v = maps.read_counters().expect("counters");
    assert!(v[c::FWD_NEW_FLOW as usize] >= 2 * FLOWS as u64, "new flows: {}", v[c::FWD_NEW_FLOW as usize]);
    assert!(v[c::REV_NAT as usize] >= 2 * FLOWS as u64, "reverse NAT: {}", v[c::REV_NAT as usize]);
    assert_eq!(v[c::DROP_NO_BACKEND as usize] + v[c::DROP_REWRITE_FAILED as usize], 0);
}

#[test]
fn tc_two_nodes() {
    let c = cluster("tc", Mode::Tc, true);
    exercise(&c);
}

#[test]
fn tc_two_nodes_full_checksums() {
    // Pods send full checksums, so receivers verify them: a wrong incremental update would drop
    // every packet.
    let c = cluster("tcf", Mode::Tc, false);
    exercise(&c);
}

#[test]
fn xdp_two_nodes() {
    let c = cluster("xdp", Mode::Xdp, false);
    exercise(&c);
    // The TC forward program behind XDP leaves the packets XDP decided alone. `pass_non_vip`
    // counts the backends' answers (XDP passes them); were TC to look at XDP's packets again,
    // every packet XDP forwarded (then addressed to a backend) would add one more, and every
    // answer another.
    let v = c.maps(1).read_counters().expect("counters");
    let decided = v[c::FWD_NEW_FLOW as usize] + v[c::FWD_ESTABLISHED as usize];
    if support::xdp_meta() {
        assert!(
            v[c::PASS_NON_VIP as usize] < decided,
            "TC saw XDP's packets again: {} passed as no Service, {decided} forwarded",
            v[c::PASS_NON_VIP as usize]
        );
    } else {
        // No mark on this kernel: TC looks at every packet XDP passed, addressed to a backend.
        assert!(
            v[c::PASS_NON_VIP as usize] >= decided,
            "without XDP's marks TC passes XDP's packets as no Service: {} of {decided}",
            v[c::PASS_NON_VIP as usize]
        );
    }
    // Full checksums stay in XDP, but for the one in about 65,536 that equals its
    // pseudo-header sum by chance and goes to TC.
    assert!(v[c::XDP_PARTIAL_CSUM as usize] * 1_000 < decided, "full checksums stay in XDP");
    // lbctl shows XDP in front of the TC programs, on the pod's interface and no other.
    let view = support::lbctl_interfaces(&c.nodes[0]);
    let pod = &view[&c.client1.host_if];
    assert_eq!(pod["lb"], "attached", "{pod}");
    assert_eq!(pod["xdp"]["program"], "lb4_xdp_forward", "{pod}");
    assert!(pod["xdp"]["attach"].as_str().is_some_and(|a| a.starts_with("xdp-")), "{pod}");
    assert_eq!(pod["ingress"][0]["program"], "lb4_tc_forward", "{pod}");
    assert_eq!(pod["egress"][0]["program"], "lb4_tc_reply", "{pod}");
    assert!(view.get("lo").is_some_and(|lo| lo["lb"] == "none" && lo["xdp"].is_null()), "{view:?}");
}
