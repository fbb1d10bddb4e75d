//! IPv6 end to end, in a dual-stack lab (`Lab::dual_stack`).

use std::net::{SocketAddr, SocketAddrV6};

use lb_testkit::lab::{tcp_peer_any, udp_peer_any, Lab};

/// The dual-stack lab itself, without lb: pods on two nodes and the outside client reach each
/// other over IPv6 through the nodes' routes and the underlay, and see each other's own
/// addresses. (What the IPv6 tests below rely on; a failure here is the lab's, not lb's.)
#[test]
fn the_dual_stack_lab_routes_ipv6_between_pods_nodes_and_outside() {
    let mut lab = Lab::new("v6lab").expect("lab");
    lab.dual_stack();
    let (n1, n2) = (lab.node(1).expect("node 1"), lab.node(2).expect("node 2"));
    lab.link_nodes(&n1, &n2).expect("underlay");
    let a = lab.pod(&n1, "a", 2, true).expect("pod a");
    let b = lab.pod(&n2, "b", 3, true).expect("pod b");
    lab.serve(&b, 8080, 5353).expect("servers");
    let (a6, b6) = (a.ip6.expect("a has an IPv6 address"), b.ip6.expect("b too"));
    let to = SocketAddr::V6(SocketAddrV6::new(b6, 8080, 0, 0));
    let (name, seen) = tcp_peer_any(&a.netns, to).expect("TCP over IPv6 across nodes, at once");
    assert_eq!((name.as_str(), seen.ip()), ("b", a6.into()), "the client's own address");
    let to = SocketAddr::V6(SocketAddrV6::new(b6, 5353, 0, 0));
    let (name, seen) = udp_peer_any(&a.netns, to, 0).expect("UDP over IPv6 across nodes");
    assert_eq!((name.as_str(), seen.ip()), ("b", a6.into()));
    // IPv4 still works beside it.
    let (name, _) =
        lb_testkit::lab::tcp_peer_from(&a.netns, std::net::SocketAddrV4::new(b.ip, 8080)).expect("IPv4");
    assert_eq!(name, "b");
    // The outside client reaches a pod through a route via its node.
    let out = lab.outside().expect("outside");
    lab.route_via(&out, b6, &n2).expect("route");
    let (name, seen) =
        tcp_peer_any(&out.netns, SocketAddr::V6(SocketAddrV6::new(b6, 8080, 0, 0))).expect("outside");
    assert_eq!((name.as_str(), seen.ip()), ("b", out.ip6.expect("outside's IPv6").into()));
}
