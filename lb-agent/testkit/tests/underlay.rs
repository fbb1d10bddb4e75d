//! The lab's underlay without lb: nodes on one bridge, and a client outside the cluster that
//! reaches pods through plain routes, seen by the pods at its own address.

use std::net::SocketAddrV4;

use lb_testkit::lab::{node_manifest, tcp_peer_from, udp_peer_from, Lab, OUTSIDE_IP};

/// Three nodes on the bridge (node 1 linked to both others, so it joins once); the outside client
/// reaches a pod on node 1 through a route for node 1's pod range, and a pod on node 3 through a
/// /32 route via node 3 (as a LoadBalancer IP would be announced); pods reach each other across
/// the bridge. Every server sees the client's own address.
#[test]
fn the_outside_client_and_pods_reach_pods_across_the_bridge() {
    let mut lab = Lab::new("ul").expect("lab");
    let n1 = lab.node(1).expect("node 1");
    let n2 = lab.node(2).expect("node 2");
    let n3 = lab.node(3).expect("node 3");
    lab.link_nodes(&n1, &n2).expect("link 1-2");
    lab.link_nodes(&n1, &n3).expect("link 1-3: node 1 is on the bridge already");
    let a = lab.pod(&n1, "a", 2, true).expect("pod a");
    let c = lab.pod(&n3, "c", 2, true).expect("pod c");
    lab.serve(&a, 8080, 5353).expect("servers in a");
    lab.serve(&c, 8080, 5353).expect("servers in c");
    let out = lab.outside().expect("outside client");
    assert_eq!(out.ip, OUTSIDE_IP);
    assert_eq!(lab.outside().expect("outside again").netns, out.netns, "one outside client a lab");

    let route = std::process::Command::new("ip")
        .args(["-n", &out.netns, "route", "add", "10.244.1.0/24", "via", &n1.underlay_ip().to_string()])
        .status()
        .expect("ip route add");
    assert!(route.success(), "route to node 1's pods");
    let (name, peer) = tcp_peer_from(&out.netns, SocketAddrV4::new(a.ip, 8080)).expect("TCP to a");
    assert_eq!((name.as_str(), *peer.ip()), ("a", OUTSIDE_IP));
    let (name, peer) = udp_peer_from(&out.netns, SocketAddrV4::new(a.ip, 5353), 20_000).expect("UDP to a");
    assert_eq!((name.as_str(), peer), ("a", SocketAddrV4::new(OUTSIDE_IP, 20_000)));

    lab.route_via(&out, c.ip, &n2).expect("route to c via the wrong node");
    lab.route_via(&out, c.ip, &n3).expect("route to c via node 3, replacing it");
    let (name, peer) = tcp_peer_from(&out.netns, SocketAddrV4::new(c.ip, 8080)).expect("TCP to c");
    assert_eq!((name.as_str(), *peer.ip()), ("c", OUTSIDE_IP));

    let (name, peer) = tcp_peer_from(&a.netns, SocketAddrV4::new(c.ip, 8080)).expect("TCP from a to c");
    assert_eq!((name.as_str(), *peer.ip()), ("c", a.ip));

    let yaml = node_manifest(&n3);
    assert!(yaml.contains("name: node3") && yaml.contains("address: \"172.31.0.3\""), "{yaml}");
}
