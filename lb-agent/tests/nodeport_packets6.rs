//! The node-side programs over IPv6, packet by packet through BPF_PROG_TEST_RUN, as
//! `nodeport_packets` does IPv4: each row gives an IPv6 packet, the program (the IPv4 entry point
//! `lb4_tc_node_in`, `lb4_tc_node_out` or `lb4_xdp_node_in`, which hands IPv6 on to its lb6
//! program by tail call), the verdict, the bytes out (checksums verified from scratch over the
//! IPv6 pseudo-header) and the exact change of every counter. The rows run in a network namespace
//! of their own whose IPv6 routes say which endpoints are local (behind `lxc1`) and which remote
//! (behind the node interface `ul0`), since the datapath asks the kernel's FIB.

mod support;

use std::{collections::BTreeMap, net::Ipv6Addr};

use aya::maps::{HashMap, Map, MapData};
use lb_agent::{
    datapath::{layout_dir, Datapath, Maps, Mode},
    model::{BackendAddr, Frontend, FrontendAddr, FrontendKind, Protocol, Scope},
    reconcile::{Capacities, Options, Reconciler},
};
use lb_common::{counters as c, DEFAULT_SNAT_PORTS};
use support::{
    kernel_release,
    node::{expect, expect_in, record_interface, Ifs, Prog, XDP_PASS},
    v6::{check_icmp6_error, check_packet6, icmp6_error, neighbour_solicitation, Pkt6, Seen6},
    PinDir, ACK, SYN, SYN_ACK, TC_OK, TC_REDIRECT, TC_SHOT, UDP,
};

/// This node's IPv6 address on `ul0`: NodePorts listen on it, remote flows are SNATed to it.
const NODE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 1);
/// The other node (a known neighbour), next hop to its pods.
const PEER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 2);
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
const OUTSIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 7);
/// A client the LoadBalancer address's source ranges leave out.
const STRANGER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 9);
const LOCAL_POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5);
const REMOTE_POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 4);
/// An address no route leads to.
const NOWHERE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x250, 0, 0, 0, 0, 1);
const CLUSTER_IP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const LB_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x40, 0, 0, 0, 0, 1);

fn frontend(
    vip: Ipv6Addr,
    port: u16,
    proto: Protocol,
    kind: FrontendKind,
    backends: &[(Ipv6Addr, u16)],
) -> Frontend {
    Frontend {
        addr: FrontendAddr::new(vip, port, proto),
        kind,
        service: format!("default/{vip}-{port}"),
        port_name: String::new(),
        backends: backends
            .iter()
            .map(|(ip, port)| BackendAddr { ip: (*ip).into(), port: *port, proto })
            .collect(),
        kept: Vec::new(),
        affinity_timeout_secs: 0,
        local_only: false,
        two_scopes: false,
        source_ranges: None,
    }
}

/// Runs `f` in a new network namespace with this node's IPv6 routes: pods of this node behind
/// `lxc1`, the other node's behind `ul0` via a known neighbour, the rest of the world via a
/// router whose address is not resolved yet; `NOWHERE` unreachable. Forwarding on.
fn in_node_netns<T: Send + 'static>(tag: &str, f: impl FnOnce(Ifs) -> T + Send + 'static) -> T {
    let peer_mac = PEER_MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let (node, peer) = (format!("{NODE}/64"), PEER.to_string());
    let setup = [
        vec!["-6", "addr", "add", &node, "dev", "ul0", "nodad"],
        vec!["-6", "route", "add", "fd00:10:244:1::/64", "dev", "lxc1"],
        vec!["-6", "neigh", "add", &peer, "lladdr", &peer_mac, "dev", "ul0", "nud", "permanent"],
        vec!["-6", "route", "add", "fd00:10:244:2::/64", "via", &peer, "dev", "ul0"],
        vec!["-6", "route", "add", "default", "via", "fd00:172:31::fe", "dev", "ul0"],
        vec!["-6", "route", "add", "unreachable", "fd00:10:250::/48"],
    ];
    support::node::in_node_netns(&format!("lbnp6{tag}"), &setup, "net.ipv6.conf.all.forwarding=1", f)
}

/// Records the interfaces as the agent would: `ul0` a node interface (IPv4 address none here,
/// IPv6 address `NODE` in `LB6_IFS`), `lxc1` a pod's.
fn record_interfaces(pins: &std::path::Path, ifs: &Ifs) {
    record_interface(pins, ifs.ul0, true, 0);
    record_interface(pins, ifs.lxc1, false, 0);
    set_node_address6(pins, ifs.ul0, Some(NODE));
}

/// Writes (or removes) interface `index`'s IPv6 address in `LB6_IFS`.
fn set_node_address6(pins: &std::path::Path, index: u32, addr: Option<Ipv6Addr>) {
    let data = MapData::from_pin(layout_dir(pins).join(lb_common::MAP_LB6_IFS)).expect("LB6_IFS pinned");
    let mut map: HashMap<MapData, u32, [u32; 4]> =
        Map::from_map_data(data).expect("map").try_into().expect("hash map");
    match addr {
        Some(a) => map.insert(index, lb_common::addr6(a.octets()), 0).expect("recorded"),
        None => {
            let _ = map.remove(&index);
        }
    }
}

/// A packet addressed to this host: test runs take packets in on `lo`, whose Ethernet address is
/// all zeros (a frame for another address is another host's, `PACKET_OTHERHOST`).
fn pkt(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), l4: support::L4) -> Vec<u8> {
    let mut b = Pkt6::new(src, dst, l4).bytes();
    b[..6].fill(0);
    b
}

fn in_snat_range(port: u16) -> bool {
    (DEFAULT_SNAT_PORTS.0..=DEFAULT_SNAT_PORTS.1).contains(&port)
}

fn seen(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Seen6 {
    Seen6 { src, dst, udp_checksum: None, ext: Vec::new() }
}

/// Every rule of the node-side programs over IPv6, one row each, in an order where later rows
/// rely on the flows earlier ones made (one load of the programs).
#[test]
fn ipv6_node_side_rules_packet_by_packet() {
    in_node_netns("rules", |ifs| {
        let pins = PinDir::new("nodeport6");
        let cfg = lb_agent::datapath::Config { node_xdp: true, ..support::test_config(pins.path()) };
        let (mut dp, mut maps) = Datapath::load(&cfg, Mode::Tc).expect("load datapath");
        dp.load_node_programs().expect("node-side programs");
        assert_eq!(dp.ipv6_node_error(), None, "the IPv6 node-side programs load");
        record_interfaces(pins.path(), &ifs);
        let (remote, local, empty, local_only, unroutable) = (30080, 30081, 30083, 30084, 30085);
        let mut fes = vec![
            frontend(NODE, remote, Protocol::Tcp, FrontendKind::NodePort, &[(REMOTE_POD, 8080)]),
            frontend(NODE, remote, Protocol::Udp, FrontendKind::NodePort, &[(REMOTE_POD, 5353)]),
            frontend(NODE, local, Protocol::Tcp, FrontendKind::NodePort, &[(LOCAL_POD, 8080)]),
            frontend(NODE, empty, Protocol::Tcp, FrontendKind::NodePort, &[]),
            frontend(NODE, unroutable, Protocol::Tcp, FrontendKind::NodePort, &[(NOWHERE, 8080)]),
            frontend(CLUSTER_IP, 80, Protocol::Tcp, FrontendKind::ClusterIp, &[(REMOTE_POD, 8080)]),
            Frontend {
                source_ranges: Some(vec![(Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0).into(), 48)]),
                ..frontend(LB_IP, 80, Protocol::Tcp, FrontendKind::LoadBalancer, &[(LOCAL_POD, 8080)])
            },
            // A port inside the SNAT reply range: its packets go through all three programs.
            Frontend {
                source_ranges: Some(vec![(Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0).into(), 48)]),
                ..frontend(LB_IP, 8443, Protocol::Tcp, FrontendKind::LoadBalancer, &[(REMOTE_POD, 8443)])
            },
        ];
        // externalTrafficPolicy Local with endpoints only on the other node: outside clients are
        // dropped.
        let mut ext = frontend(NODE, local_only, Protocol::Tcp, FrontendKind::NodePort, &[]);
        (ext.local_only, ext.two_scopes) = (true, true);
        let mut int =
            frontend(NODE, local_only, Protocol::Tcp, FrontendKind::NodePort, &[(REMOTE_POD, 8080)]);
        int.addr.scope = Scope::Internal;
        fes.extend([ext, int]);
        let desired: BTreeMap<_, _> = fes.into_iter().map(|f| (f.addr, f)).collect();
        let caps =
            Capacities { services: 1024, backends: 1024, maglev_slots: 65_536, ..Capacities::default() };
        let mut r = Reconciler::new(caps, Options::default());
        let (_, errors) = r.sync(&desired, &Default::default(), &mut maps);
        assert!(errors.is_empty(), "sync errors: {errors:?}");
        // As on a running node: the node-side programs' rows run with the port filter on.
        support::arm_port_filter(&mut maps);

        // A remote endpoint: DNAT, SNAT to this node's IPv6 address with a port of the SNAT
        // range, and out of ul0 to the known neighbour.
        let syn = pkt((OUTSIDE, 40_000), (NODE, remote), SYN);
        let out = expect(
            &dp,
            &maps,
            "SYN from outside, remote endpoint",
            Prog::NodeIn,
            &syn,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)],
        );
        let s = check_packet6(&out);
        assert_eq!(s.dst, (REMOTE_POD, 8080), "DNAT to the endpoint");
        assert_eq!(s.src.0, NODE, "SNAT to this node's IPv6 address");
        let snat_port = s.src.1;
        assert!(in_snat_range(snat_port), "SNAT port {snat_port} in the SNAT range");
        assert_eq!(out[..6], PEER_MAC, "to the next hop's MAC");
        let ack = pkt((OUTSIDE, 40_000), (NODE, remote), ACK);
        let out = expect(
            &dp,
            &maps,
            "next packet: same translation",
            Prog::NodeIn,
            &ack,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::FWD_ESTABLISHED, 1)],
        );
        assert_eq!(check_packet6(&out), seen((NODE, snat_port), (REMOTE_POD, 8080)));
        // Its reply comes back to this node's address and goes back to the client (the router's
        // address is not resolved: through the neighbour subsystem).
        let reply = pkt((REMOTE_POD, 8080), (NODE, snat_port), SYN_ACK);
        let out = expect(
            &dp,
            &maps,
            "reply of a SNATed flow",
            Prog::NodeIn,
            &reply,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::REV_NAT, 1)],
        );
        assert_eq!(check_packet6(&out), seen((NODE, remote), (OUTSIDE, 40_000)), "back to the client");
        // An ICMPv6 error from the endpoint's way about the SNATed flow's packet goes to the
        // client, about its own packet to the NodePort.
        let quoted = pkt((NODE, snat_port), (REMOTE_POD, 8080), ACK);
        let err = icmp6_error(PEER, NODE, 2, 0, 1280, &quoted);
        let mut err_in = err.clone();
        err_in[..6].fill(0);
        let out = expect(
            &dp,
            &maps,
            "packet too big about a SNATed flow: to its client",
            Prog::NodeIn,
            &err_in,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::REV_NAT, 1)],
        );
        let e = check_icmp6_error(&out, true);
        assert_eq!((e.dst, e.kind), (OUTSIDE, 2));
        assert_eq!(e.quoted, ((OUTSIDE, 40_000), (NODE, remote)), "about the client's own packet");
        // UDP too, and another client port gets another SNAT port.
        let udp = pkt((OUTSIDE, 40_001), (NODE, remote), UDP);
        let out = expect(
            &dp,
            &maps,
            "UDP from outside, remote endpoint",
            Prog::NodeIn,
            &udp,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)],
        );
        let s = check_packet6(&out);
        assert_eq!((s.src.0, s.dst), (NODE, (REMOTE_POD, 5353)));
        assert!(in_snat_range(s.src.1) && s.src.1 != snat_port);
        assert_ne!(s.udp_checksum, Some(0), "a UDP checksum kept");
        let reply = pkt((REMOTE_POD, 5353), s.src, UDP);
        let out = expect(
            &dp,
            &maps,
            "UDP reply of a SNATed flow",
            Prog::NodeIn,
            &reply,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::REV_NAT, 1)],
        );
        let back = check_packet6(&out);
        assert_eq!((back.src, back.dst), ((NODE, remote), (OUTSIDE, 40_001)));

        // A local endpoint: DNAT only (the endpoint sees the client), the stack delivers it; its
        // reply leaving through the node interface gets the NodePort back.
        let syn = pkt((OUTSIDE, 40_002), (NODE, local), SYN);
        let out = expect(
            &dp,
            &maps,
            "SYN from outside, local endpoint",
            Prog::NodeIn,
            &syn,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)],
        );
        assert_eq!(check_packet6(&out), seen((OUTSIDE, 40_002), (LOCAL_POD, 8080)), "client kept");
        let reply = pkt((LOCAL_POD, 8080), (OUTSIDE, 40_002), SYN_ACK);
        let out = expect(
            &dp,
            &maps,
            "local endpoint's reply, leaving",
            Prog::NodeOut,
            &reply,
            TC_OK,
            &[(c::RX_NODE_OUT, 1), (c::REV_NAT, 1)],
        );
        assert_eq!(check_packet6(&out), seen((NODE, local), (OUTSIDE, 40_002)));
        // Anything else leaving: untouched.
        let other = pkt((LOCAL_POD, 8080), (OUTSIDE, 40_099), SYN_ACK);
        let out = expect(
            &dp,
            &maps,
            "a reply of no flow from outside, leaving: untouched",
            Prog::NodeOut,
            &other,
            TC_OK,
            &[(c::RX_NODE_OUT, 1), (c::PASS_NO_REPLY_CT, 1)],
        );
        assert_eq!(out, other);

        // No endpoints: rejected with an ICMPv6 port unreachable, sent back.
        let syn = pkt((OUTSIDE, 40_004), (NODE, empty), SYN);
        let out = expect(
            &dp,
            &maps,
            "NodePort without endpoints: rejected",
            Prog::NodeIn,
            &syn,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::REJECT_NO_BACKEND, 1)],
        );
        // (The answer quotes the IPv6 header and the transport header's first 8 bytes.)
        let e = check_icmp6_error(&out, false);
        assert_eq!((e.src, e.dst, e.kind), (NODE, OUTSIDE, 1), "destination unreachable to the client");
        assert_eq!(e.quoted, ((OUTSIDE, 40_004), (NODE, empty)), "about the client's packet");
        assert_eq!(out[14 + 40 + 1], 4, "port unreachable");
        // externalTrafficPolicy Local without a local endpoint: dropped from outside.
        let syn = pkt((OUTSIDE, 40_005), (NODE, local_only), SYN);
        expect(
            &dp,
            &maps,
            "eTP Local, no local endpoint: dropped",
            Prog::NodeIn,
            &syn,
            TC_SHOT,
            &[(c::RX_NODE_IN, 1), (c::DROP_NO_LOCAL_BACKEND, 1)],
        );
        // No route to the endpoint: dropped, counted.
        let syn = pkt((OUTSIDE, 40_007), (NODE, unroutable), SYN);
        expect(
            &dp,
            &maps,
            "endpoint without a route: dropped",
            Prog::NodeIn,
            &syn,
            TC_SHOT,
            &[(c::RX_NODE_IN, 1), (c::DROP_FIB, 1)],
        );
        // A node interface without an IPv6 address on record: a remote endpoint's flow has none
        // to leave with.
        set_node_address6(pins.path(), ifs.ul0, None);
        let syn = pkt((OUTSIDE, 40_010), (NODE, remote), SYN);
        expect(
            &dp,
            &maps,
            "no IPv6 address to SNAT to: dropped",
            Prog::NodeIn,
            &syn,
            TC_SHOT,
            &[(c::RX_NODE_IN, 1), (c::DROP_FIB, 1)],
        );
        set_node_address6(pins.path(), ifs.ul0, Some(NODE));
        // Source port 0 cannot be answered.
        let zero = pkt((OUTSIDE, 0), (NODE, remote), UDP);
        expect(
            &dp,
            &maps,
            "source port 0 from outside: dropped",
            Prog::NodeIn,
            &zero,
            TC_SHOT,
            &[(c::RX_NODE_IN, 1), (c::DROP_MALFORMED, 1)],
        );
        // A frame for another host is that host's.
        let mut flooded = pkt((OUTSIDE, 40_011), (NODE, remote), SYN);
        flooded[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        let out = expect(
            &dp,
            &maps,
            "a frame for another host: untouched",
            Prog::NodeIn,
            &flooded,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::PASS_NON_VIP, 1)],
        );
        assert_eq!(out, flooded);
        // A cluster IP is for the cluster's own clients; other traffic to the node, neighbour
        // discovery included, is not lb's.
        for (desc, p, counter) in [
            (
                "cluster IP from outside: untouched",
                pkt((OUTSIDE, 40_008), (CLUSTER_IP, 80), SYN),
                c::PASS_NON_VIP,
            ),
            (
                "other traffic to the node: untouched",
                pkt((OUTSIDE, 40_009), (NODE, 62_000), SYN),
                c::PASS_NON_VIP,
            ),
            ("neighbour solicitation: untouched", neighbour_solicitation(PEER, NODE), c::PASS_OTHER_PROTO),
        ] {
            let out = expect(&dp, &maps, desc, Prog::NodeIn, &p, TC_OK, &[(c::RX_NODE_IN, 1), (counter, 1)]);
            assert_eq!(out, p, "{desc}");
        }
        // loadBalancerSourceRanges from outside: a client inside in, one outside dropped.
        let syn = pkt((OUTSIDE, 40_012), (LB_IP, 80), SYN);
        let out = expect(
            &dp,
            &maps,
            "LoadBalancer IP, client inside the ranges",
            Prog::NodeIn,
            &syn,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)],
        );
        assert_eq!(check_packet6(&out), seen((OUTSIDE, 40_012), (LOCAL_POD, 8080)));
        let syn = pkt((STRANGER, 40_013), (LB_IP, 80), SYN);
        let out = expect(
            &dp,
            &maps,
            "LoadBalancer IP, client outside the ranges: dropped",
            Prog::NodeIn,
            &syn,
            TC_SHOT,
            &[(c::RX_NODE_IN, 1), (c::DROP_SRC_RANGE, 1)],
        );
        assert_eq!(out, syn, "untouched");

        // A destination port inside the SNAT reply range that is no reply: the first program
        // hands it to the reply program, which finds none and hands it to the decision, the
        // client's range verdict kept through both tail calls.
        assert!(in_snat_range(8443));
        let syn = pkt((OUTSIDE, 40_014), (LB_IP, 8443), SYN);
        let out = expect(
            &dp,
            &maps,
            "a Service port in the reply range, client inside the ranges: SNAT to the remote endpoint",
            Prog::NodeIn,
            &syn,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)],
        );
        let s = check_packet6(&out);
        assert_eq!((s.src.0, s.dst), (NODE, (REMOTE_POD, 8443)));
        let ack = pkt((OUTSIDE, 40_014), (LB_IP, 8443), ACK);
        let out = expect(
            &dp,
            &maps,
            "...its next packet",
            Prog::NodeIn,
            &ack,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::FWD_ESTABLISHED, 1)],
        );
        assert_eq!(check_packet6(&out), seen(s.src, (REMOTE_POD, 8443)));
        let syn = pkt((STRANGER, 40_015), (LB_IP, 8443), SYN);
        let out = expect(
            &dp,
            &maps,
            "a Service port in the reply range, client outside the ranges: dropped",
            Prog::NodeIn,
            &syn,
            TC_SHOT,
            &[(c::RX_NODE_IN, 1), (c::DROP_SRC_RANGE, 1)],
        );
        assert_eq!(out, syn);
        // The node's own traffic on a port of that range (the kubelet's), and a frame for another
        // host to one: untouched.
        let kubelet = pkt((OUTSIDE, 40_016), (NODE, 10_250), SYN);
        let out = expect(
            &dp,
            &maps,
            "to the node's port 10250: untouched",
            Prog::NodeIn,
            &kubelet,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::PASS_NON_VIP, 1)],
        );
        assert_eq!(out, kubelet);
        let mut flooded = pkt((REMOTE_POD, 8080), (NODE, snat_port), ACK);
        flooded[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
        let out = expect(
            &dp,
            &maps,
            "a reply-range frame for another host: untouched",
            Prog::NodeIn,
            &flooded,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::PASS_NON_VIP, 1)],
        );
        assert_eq!(out, flooded);

        xdp_node_rules(&mut dp, &maps, &ifs, remote, local, local_only);
        drop(dp);
    });
}

/// The XDP node program leaves IPv6 to TC (`lb6_tc_node_in`): untouched, unmarked, before
/// anything is counted or stored, whatever XDP could have decided for IPv4: a local endpoint, a
/// drop, a remote endpoint through the interface it came in on, a reply, an ICMPv6 error.
fn xdp_node_rules(dp: &mut Datapath, maps: &Maps, ifs: &Ifs, remote: u16, local: u16, local_only: u16) {
    let left = &[(c::RX_NODE_IN, 1), (c::XDP_TO_TC, 1)];
    dp.set_node_mac(1, [0; 6]).expect("lo's address recorded");
    let quoted = pkt((NODE, remote), (OUTSIDE, 41_000), SYN_ACK);
    let mut err = icmp6_error(OUTSIDE, NODE, 1, 4, 0, &quoted);
    err[..6].fill(0);
    let rows = [
        ("local endpoint", pkt((OUTSIDE, 41_000), (NODE, local), SYN)),
        ("eTP Local, no local endpoint", pkt((OUTSIDE, 41_003), (NODE, local_only), SYN)),
        ("remote endpoint", pkt((OUTSIDE, 41_006), (NODE, remote), SYN)),
        ("an ICMPv6 error", err),
    ];
    for ingress in [None, (kernel_release() >= (5, 15)).then_some(ifs.ul0)] {
        if let Some(i) = ingress {
            dp.set_node_mac(i, [0; 6]).expect("ul0's address, as the test packets have it");
        }
        for (desc, p) in &rows {
            let out = expect_in(
                dp,
                maps,
                &format!("{desc}: left to TC"),
                Prog::XdpNodeIn,
                p,
                ingress,
                XDP_PASS,
                left,
            );
            assert_eq!(&out, p, "{desc}: untouched");
        }
    }
    // And TC serves what XDP left: the remote endpoint's SYN, then its reply.
    let syn = pkt((OUTSIDE, 41_006), (NODE, remote), SYN);
    let out = expect(
        dp,
        maps,
        "...which TC forwards",
        Prog::NodeIn,
        &syn,
        TC_REDIRECT,
        &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)],
    );
    let s = check_packet6(&out);
    let reply = pkt((REMOTE_POD, 8080), s.src, SYN_ACK);
    let out = expect_in(dp, maps, "its reply: left to TC", Prog::XdpNodeIn, &reply, None, XDP_PASS, left);
    assert_eq!(out, reply);
}

/// With `--ipv6 off` the node-side programs pass IPv6 untouched, counted `pass_ipv6` (TC) or left
/// to TC (XDP), whatever an earlier agent left in the program arrays.
#[test]
fn without_ipv6_the_node_side_programs_pass_it_untouched() {
    in_node_netns("off", |ifs| {
        let pins = PinDir::new("nodeport6off");
        let syn = pkt((OUTSIDE, 40_000), (NODE, 30080), SYN);
        let fes = [frontend(NODE, 30080, Protocol::Tcp, FrontendKind::NodePort, &[(LOCAL_POD, 8080)])];
        let desired: BTreeMap<_, _> = fes.into_iter().map(|f| (f.addr, f)).collect();
        // An agent serving IPv6 first (its programs left in the pinned arrays), then one without.
        for ipv6 in [true, false] {
            let cfg =
                lb_agent::datapath::Config { node_xdp: true, ipv6, ..support::test_config(pins.path()) };
            let (mut dp, mut maps) = Datapath::load(&cfg, Mode::Tc).expect("load datapath");
            dp.load_node_programs().expect("node-side programs");
            record_interfaces(pins.path(), &ifs);
            dp.set_node_mac(1, [0; 6]).expect("lo's address recorded");
            let caps = Capacities { services: 64, backends: 64, maglev_slots: 4096, ..Capacities::default() };
            let mut r = Reconciler::new(caps, Options::default());
            let (_, errors) = r.sync(&desired, &Default::default(), &mut maps);
            if ipv6 {
                assert!(errors.is_empty(), "sync errors: {errors:?}");
                let out = expect(
                    &dp,
                    &maps,
                    "served",
                    Prog::NodeIn,
                    &syn,
                    TC_OK,
                    &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)],
                );
                assert_eq!(check_packet6(&out).dst, (LOCAL_POD, 8080));
                continue;
            }
            let out = expect(
                &dp,
                &maps,
                "--ipv6 off: passed",
                Prog::NodeIn,
                &syn,
                TC_OK,
                &[(c::RX_NODE_IN, 1), (c::PASS_IPV6, 1)],
            );
            assert_eq!(out, syn);
            let out = expect(
                &dp,
                &maps,
                "--ipv6 off, leaving: passed",
                Prog::NodeOut,
                &syn,
                TC_OK,
                &[(c::RX_NODE_OUT, 1), (c::PASS_IPV6, 1)],
            );
            assert_eq!(out, syn);
            let out = expect(
                &dp,
                &maps,
                "--ipv6 off, XDP: left to TC",
                Prog::XdpNodeIn,
                &syn,
                XDP_PASS,
                &[(c::RX_NODE_IN, 1), (c::XDP_TO_TC, 1)],
            );
            assert_eq!(out, syn);
        }
    });
}
