//! End to end through network namespaces: two nodes, each with its own agent; backends on both;
//! clients on both. Real TCP and UDP to the service address.

mod support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use lb_agent::{
    datapath::{Maps, Mode},
    testbed::{tcp_asks, udp_asks, wait_until, Lab, Node, Pod, Session},
};
use lb_common::counters as c;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

/// With 3 backends, each should get a third. 3,600 flows: a third is 1,200 with a standard
/// deviation of about 28, so the ±15 % band (±180) is more than 6 standard deviations wide, and
/// the Maglev table (509 slots: 170/170/169) adds under 0.2 %. Chance alone cannot fail it.
const FLOWS: usize = 3_600;

fn manifests(dir: &Path, backends: &[&Pod]) {
    let endpoints: String = backends
        .iter()
        .map(|p| {
            format!("- addresses: [{}]\n  nodeName: node{}\n  conditions: {{ready: true}}\n", p.ip, p.node)
        })
        .collect();
    let yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: who, namespace: demo}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: udp, port: 53, targetPort: 5353, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: who-1
  namespace: demo
  labels: {{kubernetes.io/service-name: who}}
addressType: IPv4
ports:
- {{name: tcp, port: 8080, protocol: TCP}}
- {{name: udp, port: 5353, protocol: UDP}}
endpoints:
{endpoints}"#
    );
    std::fs::create_dir_all(dir).expect("manifest dir");
    std::fs::write(dir.join("who.yaml"), yaml).expect("write manifest");
}

struct Cluster {
    lab: Lab,
    nodes: [Node; 2],
    client1: Pod,
    client2: Pod,
}

fn cluster(tag: &str, mode: Mode, tx_csum_offload: bool) -> Cluster {
    let mut lab = Lab::new(tag).expect("lab");
    let n1 = lab.node(1).expect("node 1");
    let n2 = lab.node(2).expect("node 2");
    lab.link_nodes(&n1, &n2).expect("underlay");
    let client1 = lab.pod(&n1, "c1", 10, tx_csum_offload).expect("client 1");
    let client2 = lab.pod(&n2, "c2", 10, tx_csum_offload).expect("client 2");
    let b1 = lab.pod(&n1, "b1", 2, tx_csum_offload).expect("b1");
    let b2 = lab.pod(&n1, "b2", 3, tx_csum_offload).expect("b2");
    let b3 = lab.pod(&n2, "b3", 4, tx_csum_offload).expect("b3");
    for b in [&b1, &b2, &b3] {
        lab.serve(b, 8080, 5353).expect("servers");
    }
    let dir = lab.scratch().join("manifests");
    manifests(&dir, &[&b1, &b2, &b3]);
    for n in [&n1, &n2] {
        lab.start_agent(n, Path::new(AGENT), &dir, mode, &[]).expect("agent");
    }
    let c = Cluster { lab, nodes: [n1, n2], client1, client2 };
    for (client, node) in [(&c.client1, &c.nodes[0]), (&c.client2, &c.nodes[1])] {
        let ready = wait_until(Duration::from_secs(15), || {
            tcp_asks(client, SocketAddrV4::new(VIP, 80), 1)?.pop().expect("one answer")
        });
        assert!(
            ready.is_ok(),
            "service not reachable from {}: {ready:?}\nagent log:\n{}",
            client.name,
            c.lab.agent_log(node)
        );
    }
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
    let maps = Maps::from_pins(&c.nodes[0].pin_dir).expect("pinned maps of node 1");
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
}
