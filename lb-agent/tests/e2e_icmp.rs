//! ICMP errors about load-balanced flows, end to end: the client sees them as about its packets to
//! the VIP, so a UDP client learns that the port is closed, and TCP path MTU discovery works
//! through a VIP whose backend sits behind a smaller MTU.

mod support;

use std::{
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use lb_agent::datapath::Mode;
use lb_testkit::lab::in_netns;
use support::{endpoint, who, Cluster, VIP};

#[test]
fn port_unreachable_from_a_backend_reaches_the_udp_client() {
    // Only b1, and its UDP endpoint port has no listener: b1's kernel answers "port unreachable"
    // about the packet client → b1:5399, which the client's socket (connected to VIP:53) only
    // recognises once it is translated back.
    let yaml = |b: &[lb_testkit::lab::Pod; 3]| {
        who("", &[endpoint(&b[0], "ready: true")])
            .replace("- {name: udp, port: 5353, protocol: UDP}", "- {name: udp, port: 5399, protocol: UDP}")
    };
    let c = Cluster::new("icmpu", Mode::Tc, true, yaml, &[]);
    c.wait_reachable(&c.client1, 80);
    let got = in_netns(&c.client1.netns, || -> std::io::Result<std::io::ErrorKind> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(SocketAddrV4::new(VIP, 53))?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        sock.send(b"who")?;
        let mut buf = [0u8; 64];
        Ok(match sock.recv(&mut buf) {
            Ok(_) => std::io::ErrorKind::Other,
            Err(e) => e.kind(),
        })
    })
    .expect("client thread")
    .expect("udp socket");
    let stats = c.maps(1).read_counters().expect("counters");
    assert_eq!(
        got,
        std::io::ErrorKind::ConnectionRefused,
        "the client learns the port is closed (rev_nat {})",
        stats[lb_common::counters::REV_NAT as usize]
    );
}

#[test]
fn path_mtu_discovery_works_through_a_vip() {
    // Only b1, behind a 1200-byte MTU on its node-side link: the node answers the client's
    // full-sized segments (to b1 after DNAT) with "fragmentation needed". Translated, the client
    // lowers its path MTU to the VIP and resends; untranslated, the connection stalls.
    let yaml = |b: &[lb_testkit::lab::Pod; 3]| who("", &[endpoint(&b[0], "ready: true")]);
    let c = Cluster::new("pmtu", Mode::Tc, true, yaml, &[]);
    c.wait_reachable(&c.client1, 80);
    let status = std::process::Command::new("ip")
        .args(["-n", &c.nodes[0].netns, "link", "set", &c.backends[0].host_if, "mtu", "1200"])
        .status()
        .expect("ip");
    assert!(status.success());
    let answer = support::send_long_line(&c.client1.netns, SocketAddrV4::new(VIP, 80).into());
    let stats = c.maps(1).read_counters().expect("counters");
    assert_eq!(
        answer.as_deref().ok(),
        Some("b1"),
        "20 kB through a VIP with a 1200-byte MTU to the backend: {answer:?} (rev_nat {}, pass_other_proto {})",
        stats[lb_common::counters::REV_NAT as usize],
        stats[lb_common::counters::PASS_OTHER_PROTO as usize]
    );
}
