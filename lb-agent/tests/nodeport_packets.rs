//! The node-side programs (`lb4_tc_node_in` on a node interface's ingress, `lb4_tc_node_out` on
//! its egress, `lb4_xdp_node_in` in front of the first), packet by packet through BPF_PROG_TEST_RUN: each row gives a packet, the program,
//! the verdict, the bytes out (checksums verified from scratch) and the exact change of every
//! counter. The rows run in a network namespace of their own whose routes say which endpoints are
//! local (behind `lxc1`) and which remote (behind the node interface `ul0`), since the datapath
//! asks the kernel's FIB.

mod support;

use std::{collections::BTreeMap, net::Ipv4Addr, process::Command};

use lb_agent::{
    datapath::{Datapath, Maps, Mode},
    model::{BackendAddr, Frontend, FrontendAddr, FrontendKind, Protocol, Scope},
    reconcile::{Capacities, Options, Reconciler},
};
use lb_common::{counters as c, DEFAULT_SNAT_PORTS};
use support::{
    node::{expect, record_interface, run_in, Ifs, Prog, XDP_DROP, XDP_PASS, XDP_TX},
    *,
};

/// This node's address on `ul0`, which NodePorts listen on and remote flows are SNATed to.
const NODE: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
/// The MAC of the next hop to the other node's pods (172.31.0.2, a known neighbour; the router
/// to the outside, 172.31.0.254, is not known).
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 4);
/// A pod of a third node, reached through a CNI's tunnel device lb does not know (`tun1`).
const TUNNEL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 4);
/// A pod of this node that is a client.
const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
/// An address no route leads to.
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The cluster IP of the Service with source ranges.
const RANGED_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

fn frontend(
    vip: Ipv4Addr,
    port: u16,
    proto: Protocol,
    kind: FrontendKind,
    backends: &[(Ipv4Addr, u16)],
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

/// Runs `f` in a new network namespace with this node's routes: pods of this node behind `lxc1`,
/// the other node's behind `ul0` via a known neighbour, a third node's behind `tun1` (a CNI's
/// tunnel device lb does not know), the rest of the world via a router whose address is not
/// resolved yet; `NOWHERE` unreachable. Forwarding on.
fn in_node_netns<T: Send + 'static>(tag: &str, f: impl FnOnce(Ifs) -> T + Send + 'static) -> T {
    let peer_mac = PEER_MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let setup = [
        vec!["addr", "add", "172.31.0.1/24", "dev", "ul0"],
        vec!["route", "add", "10.244.1.0/24", "dev", "lxc1"],
        vec!["link", "add", "tun1", "type", "veth", "peer", "name", "tun1p"],
        vec!["link", "set", "tun1", "up"],
        vec!["link", "set", "tun1p", "up"],
        vec!["route", "add", "10.244.3.0/24", "dev", "tun1"],
        vec!["neigh", "add", "172.31.0.2", "lladdr", &peer_mac, "dev", "ul0", "nud", "permanent"],
        vec!["route", "add", "10.244.2.0/24", "via", "172.31.0.2", "dev", "ul0"],
        vec!["route", "add", "default", "via", "172.31.0.254", "dev", "ul0"],
        vec!["route", "add", "unreachable", "10.250.0.0/16"],
    ];
    support::node::in_node_netns(&format!("lbnp{tag}"), &setup, "net.ipv4.ip_forward=1", f)
}

/// Records the interfaces as the agent would: `ul0` a node interface with address `NODE`, `lxc1`
/// a pod's; `tun1` (a CNI's tunnel device) unknown to lb.
fn record_interfaces(pins: &std::path::Path, ifs: &Ifs) {
    record_interface(pins, ifs.ul0, true, ip(NODE));
    record_interface(pins, ifs.lxc1, false, 0);
}

/// Records `lo`, the interface test runs take packets in on, as a node interface with address
/// `NODE`.
fn record_lo(pins: &std::path::Path) {
    record_interface(pins, 1, true, ip(NODE));
}

/// A packet addressed to this host: test runs take packets in on `lo`, whose Ethernet address is
/// all zeros (a frame for another address is another host's, `PACKET_OTHERHOST`).
fn pkt(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), l4: L4) -> Vec<u8> {
    let mut b = Pkt::new(src, dst, l4).bytes();
    b[..6].fill(0);
    b
}

fn ip(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn in_snat_range(port: u16) -> bool {
    (DEFAULT_SNAT_PORTS.0..=DEFAULT_SNAT_PORTS.1).contains(&port)
}

/// Every rule of the node-side programs, one row each, in an order where later rows rely on the
/// flows earlier ones made (one load of the programs: verifying them takes minutes in the kernel
/// matrix's emulated machines).
#[test]
fn node_side_rules_packet_by_packet() {
    in_node_netns("rules", |ifs| {
        let pins = PinDir::new("nodeport");
        // The XDP node program too: its rows run last, on the same load.
        let cfg = lb_agent::datapath::Config { node_xdp: true, ..test_config(pins.path()) };
        let (mut dp, mut maps) = Datapath::load(&cfg, Mode::Tc).expect("load datapath");
        dp.load_node_programs().expect("node-side programs");
        record_interfaces(pins.path(), &ifs);
        let (remote, local, host, empty, local_only, unroutable, tunnel) =
            (30080, 30081, 30082, 30083, 30084, 30085, 30086);
        let mut fes = vec![
            frontend(NODE, remote, Protocol::Tcp, FrontendKind::NodePort, &[(REMOTE_POD, 8080)]),
            frontend(NODE, remote, Protocol::Udp, FrontendKind::NodePort, &[(REMOTE_POD, 5353)]),
            frontend(NODE, local, Protocol::Tcp, FrontendKind::NodePort, &[(LOCAL_POD, 8080)]),
            frontend(NODE, host, Protocol::Tcp, FrontendKind::NodePort, &[(NODE, 9000)]),
            frontend(NODE, empty, Protocol::Tcp, FrontendKind::NodePort, &[]),
            frontend(NODE, unroutable, Protocol::Tcp, FrontendKind::NodePort, &[(NOWHERE, 8080)]),
            frontend(NODE, tunnel, Protocol::Tcp, FrontendKind::NodePort, &[(TUNNEL_POD, 8080)]),
            frontend(CLUSTER_IP, 80, Protocol::Tcp, FrontendKind::ClusterIp, &[(REMOTE_POD, 8080)]),
        ];
        // externalTrafficPolicy Local with endpoints only on the other node: outside clients are
        // dropped; this node's pods use the internal entry, with every endpoint.
        let mut ext = frontend(NODE, local_only, Protocol::Tcp, FrontendKind::NodePort, &[]);
        (ext.local_only, ext.two_scopes) = (true, true);
        let mut int =
            frontend(NODE, local_only, Protocol::Tcp, FrontendKind::NodePort, &[(REMOTE_POD, 8080)]);
        int.addr.scope = Scope::Internal;
        fes.extend([ext, int]);
        fes.push(frontend(NODE, 30090, Protocol::Tcp, FrontendKind::NodePort, &[(REMOTE_POD, 8080)]));
        // A NodePort whose one endpoint is a host-network one at another NodePort of this node.
        fes.push(frontend(NODE, CHAINED, Protocol::Tcp, FrontendKind::NodePort, &[(NODE, remote)]));
        let desired: BTreeMap<_, _> = fes.into_iter().map(|f| (f.addr, f)).collect();
        let caps =
            Capacities { services: 1024, backends: 1024, maglev_slots: 65_536, ..Capacities::default() };
        let mut r = Reconciler::new(caps, Options::default());
        let (_, errors) = r.sync(&desired, &Default::default(), &mut maps);
        assert!(errors.is_empty(), "sync errors: {errors:?}");
        // As on a running node: the node-side programs' rows run with the port filter on.
        support::arm_port_filter(&mut maps);

        // A remote endpoint: DNAT, SNAT to this node's address with a port of the SNAT range,
        // and out of ul0 to the known neighbour.
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
        let seen = check_packet(&out);
        assert_eq!(seen.dst, (REMOTE_POD, 8080), "DNAT to the endpoint");
        assert_eq!(seen.src.0, NODE, "SNAT to this node's address");
        let snat_port = seen.src.1;
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
        assert_eq!(
            check_packet(&out),
            Seen { src: (NODE, snat_port), dst: (REMOTE_POD, 8080), udp_checksum: None }
        );
        // Its reply comes back to this node's address and goes back to the client, out by the
        // route to it (the router's address is not resolved: through the neighbour subsystem).
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
        assert_eq!(
            check_packet(&out),
            Seen { src: (NODE, remote), dst: (OUTSIDE, 40_000), udp_checksum: None },
            "back to the client, from the NodePort"
        );
        // Another client port gets another SNAT port; UDP too.
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
        let seen = check_packet(&out);
        assert_eq!((seen.src.0, seen.dst), (NODE, (REMOTE_POD, 5353)));
        assert!(in_snat_range(seen.src.1));
        let reply = pkt((REMOTE_POD, 5353), seen.src, UDP);
        let out = expect(
            &dp,
            &maps,
            "UDP reply of a SNATed flow",
            Prog::NodeIn,
            &reply,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::REV_NAT, 1)],
        );
        assert_eq!((check_packet(&out).src, check_packet(&out).dst), ((NODE, remote), (OUTSIDE, 40_001)));

        // A client port inside the SNAT range: the flow gets a port of the range all the same, and
        // its replies come back to the client's own port (UDP and TCP).
        for (i, l4) in [UDP, SYN].into_iter().enumerate() {
            let cport = DEFAULT_SNAT_PORTS.0 + 100 + i as u16;
            let first = pkt((OUTSIDE, cport), (NODE, remote), l4);
            let out = expect(
                &dp,
                &maps,
                "a client port in the SNAT range",
                Prog::NodeIn,
                &first,
                TC_REDIRECT,
                &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)],
            );
            let seen = check_packet(&out);
            assert!(seen.src.0 == NODE && in_snat_range(seen.src.1), "{seen:?}");
            let reply_l4 = if i == 0 { UDP } else { SYN_ACK };
            let reply = pkt(seen.dst, seen.src, reply_l4);
            let out = expect(
                &dp,
                &maps,
                "its reply",
                Prog::NodeIn,
                &reply,
                TC_REDIRECT,
                &[(c::RX_NODE_IN, 1), (c::REV_NAT, 1)],
            );
            let back = check_packet(&out);
            assert_eq!((back.src, back.dst), ((NODE, remote), (OUTSIDE, cport)));
        }

        // The same to a local endpoint: DNAT only, the reply leaves from the NodePort.
        let cport = DEFAULT_SNAT_PORTS.0 + 110;
        let first = pkt((OUTSIDE, cport), (NODE, local), SYN);
        let out = expect(
            &dp,
            &maps,
            "a client port in the SNAT range, local",
            Prog::NodeIn,
            &first,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)],
        );
        assert_eq!(check_packet(&out).dst, (LOCAL_POD, 8080));
        let reply = pkt((LOCAL_POD, 8080), (OUTSIDE, cport), SYN_ACK);
        let out = expect(
            &dp,
            &maps,
            "its reply, local",
            Prog::NodeOut,
            &reply,
            TC_OK,
            &[(c::RX_NODE_OUT, 1), (c::REV_NAT, 1)],
        );
        assert_eq!(check_packet(&out).src, (NODE, local));
        let ack = pkt((OUTSIDE, cport), (NODE, local), ACK);
        expect(
            &dp,
            &maps,
            "its next packet, local",
            Prog::NodeIn,
            &ack,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::FWD_ESTABLISHED, 1)],
        );

        // A local endpoint: DNAT only (the endpoint sees the client), and the stack delivers it.
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
        assert_eq!(
            check_packet(&out),
            Seen { src: (OUTSIDE, 40_002), dst: (LOCAL_POD, 8080), udp_checksum: None }
        );
        // Its reply leaves through the node interface: the egress program puts the NodePort back.
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
        assert_eq!(
            check_packet(&out),
            Seen { src: (NODE, local), dst: (OUTSIDE, 40_002), udp_checksum: None }
        );

        // An endpoint on this node's own address (hostNetwork): delivered here.
        let syn = pkt((OUTSIDE, 40_003), (NODE, host), SYN);
        let out = expect(
            &dp,
            &maps,
            "SYN from outside, host-network endpoint",
            Prog::NodeIn,
            &syn,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)],
        );
        assert_eq!(check_packet(&out).dst, (NODE, 9000));
        // A host-network endpoint at another NodePort: translated once (delivered to the stack).
        let syn = pkt((OUTSIDE, 40_020), (NODE, CHAINED), SYN);
        let out = expect(
            &dp,
            &maps,
            "SYN from outside, endpoint at another NodePort of this node",
            Prog::NodeIn,
            &syn,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)],
        );
        assert_eq!(check_packet(&out).dst, (NODE, remote));

        // No endpoints at all: rejected, as kube-proxy does for every address of the Service.
        let syn = pkt((OUTSIDE, 40_004), (NODE, empty), SYN);
        expect(
            &dp,
            &maps,
            "NodePort without endpoints: rejected",
            Prog::NodeIn,
            &syn,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::REJECT_NO_BACKEND, 1)],
        );
        // externalTrafficPolicy Local without a local endpoint: dropped from outside...
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
        // ...while this node's pods reach it with every endpoint (the internal entry).
        let syn = pkt((POD_CLIENT, 40_006), (NODE, local_only), SYN);
        let out = expect(
            &dp,
            &maps,
            "eTP Local from a pod: every endpoint",
            Prog::PodForward,
            &syn,
            TC_OK,
            &[(c::RX_FORWARD, 1), (c::FWD_NEW_FLOW, 1)],
        );
        assert_eq!(
            check_packet(&out),
            Seen { src: (POD_CLIENT, 40_006), dst: (REMOTE_POD, 8080), udp_checksum: None }
        );
        // A pod's flow is none of the node-side programs' business, even when its reply leaves
        // through a node interface.
        let reply = pkt((REMOTE_POD, 8080), (POD_CLIENT, 40_006), SYN_ACK);
        let out = expect(
            &dp,
            &maps,
            "a pod flow's reply, leaving: untouched",
            Prog::NodeOut,
            &reply,
            TC_OK,
            &[(c::RX_NODE_OUT, 1), (c::PASS_NO_REPLY_CT, 1)],
        );
        assert_eq!(out, reply);

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
        // A remote endpoint behind an interface lb does not know (a CNI's tunnel device): SNATed to
        // the address of the node interface the packet came in on (in a test run, `lo`); none
        // there: dropped, counted.
        let syn = pkt((OUTSIDE, 40_010), (NODE, tunnel), SYN);
        expect(
            &dp,
            &maps,
            "tunnel endpoint, no address to leave with",
            Prog::NodeIn,
            &syn,
            TC_SHOT,
            &[(c::RX_NODE_IN, 1), (c::DROP_FIB, 1)],
        );
        record_lo(pins.path());
        let out = expect(
            &dp,
            &maps,
            "tunnel endpoint: SNAT to the ingress's address",
            Prog::NodeIn,
            &syn,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)],
        );
        let seen = check_packet(&out);
        assert_eq!((seen.src.0, seen.dst), (NODE, (TUNNEL_POD, 8080)));
        // Source port 0 cannot be answered: dropped.
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
        // A frame for another host (a flooded copy on a bridge port) is that host's.
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
        // A cluster IP is for the cluster's own clients: left alone from outside.
        let syn = pkt((OUTSIDE, 40_008), (CLUSTER_IP, 80), SYN);
        let out = expect(
            &dp,
            &maps,
            "cluster IP from outside: untouched",
            Prog::NodeIn,
            &syn,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::PASS_NON_VIP, 1)],
        );
        assert_eq!(out, syn);
        // Traffic to this node that is nothing of lb's, in the SNAT range too: untouched.
        let other = pkt((OUTSIDE, 40_009), (NODE, 62_000), SYN);
        let out = expect(
            &dp,
            &maps,
            "other traffic to the node: untouched",
            Prog::NodeIn,
            &other,
            TC_OK,
            &[(c::RX_NODE_IN, 1), (c::PASS_NON_VIP, 1)],
        );
        assert_eq!(out, other);
        source_ranges(&dp, &mut maps, &mut r, &desired);
        icmp_errors_about_flows_from_outside(&dp, &mut maps, &mut r, &desired);
        a_deleted_nodeport_keeps_its_flows_from_outside(&dp, &mut maps, &mut r, desired.clone());
        xdp_node_rules(&mut dp, &maps, &ifs);
        drop(dp);
    });
}

/// A NodePort whose endpoint is this node's address at the `remote` NodePort (30080).
const CHAINED: u16 = 30087;

/// The XDP node program (`--node-datapath xdp`), on the frontends of
/// `node_side_rules_packet_by_packet`: what it decides itself (drops; DNAT to a local endpoint,
/// passed marked decided; DNAT + SNAT to a remote endpoint and the replies, sent back out of the
/// interface they came in on, `XDP_TX`, where the next hop is known) and what it leaves to TC
/// untouched, before anything is counted or stored, counted `xdp_to_tc`. Test runs take packets in
/// on `lo` (recorded as a node interface with address `NODE`), from which every route to a remote
/// endpoint leaves through another interface; from Linux 5.15 a test run can take them in on `ul0`,
/// which the `XDP_TX` rows need.
fn xdp_node_rules(dp: &mut Datapath, maps: &Maps, ifs: &Ifs) {
    let (remote, local, host, empty, local_only, unroutable, tunnel) =
        (30080, 30081, 30082, 30083, 30084, 30085, 30086);
    let left = &[(c::RX_NODE_IN, 1), (c::XDP_TO_TC, 1)];
    let xdp = |dp: &Datapath, desc: &str, input: &[u8], verdict: u32, counters: &[(u32, u64)]| {
        expect(dp, maps, desc, Prog::XdpNodeIn, input, verdict, counters)
    };
    // Without lo's Ethernet address on record, XDP cannot tell a frame for this host: TC decides.
    let syn = pkt((OUTSIDE, 41_000), (NODE, local), SYN);
    let out = xdp(dp, "no address on record: left to TC", &syn, XDP_PASS, left);
    assert_eq!(out, syn, "untouched");
    dp.set_node_mac(1, [0; 6]).expect("lo's address recorded");
    let mut flooded = syn.clone();
    flooded[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    let out = xdp(dp, "a frame for another host: left to TC", &flooded, XDP_PASS, left);
    assert_eq!(out, flooded);

    // A local endpoint: DNAT, and the stack delivers it (marked decided: TC lets it by).
    let out = xdp(dp, "local endpoint", &syn, XDP_PASS, &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)]);
    assert_eq!(
        check_packet(&out),
        Seen { src: (OUTSIDE, 41_000), dst: (LOCAL_POD, 8080), udp_checksum: None }
    );
    let ack = pkt((OUTSIDE, 41_000), (NODE, local), ACK);
    let out = xdp(
        dp,
        "local endpoint, next packet",
        &ack,
        XDP_PASS,
        &[(c::RX_NODE_IN, 1), (c::FWD_ESTABLISHED, 1)],
    );
    assert_eq!(check_packet(&out).dst, (LOCAL_POD, 8080));
    let syn = pkt((OUTSIDE, 41_001), (NODE, host), SYN);
    let out = xdp(dp, "host-network endpoint", &syn, XDP_PASS, &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)]);
    assert_eq!(check_packet(&out).dst, (NODE, 9000));
    // A host-network endpoint at another NodePort: translated in place where XDP can mark it
    // decided; where it cannot (no metadata), TC would translate XDP's packet again: TC's.
    let syn = pkt((OUTSIDE, 41_020), (NODE, CHAINED), SYN);
    if support::xdp_meta() {
        let out = xdp(
            dp,
            "endpoint at another NodePort",
            &syn,
            XDP_PASS,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)],
        );
        assert_eq!(check_packet(&out).dst, (NODE, remote));
    } else {
        let out =
            xdp(dp, "endpoint at another NodePort, XDP without metadata: left to TC", &syn, XDP_PASS, left);
        assert_eq!(out, syn, "untouched");
    }
    // A partial checksum, which XDP cannot tell from a full one: TC's.
    let part = partial(&Pkt::new((OUTSIDE, 41_002), (NODE, local), SYN));
    let mut part_in = part.clone();
    part_in[..6].fill(0);
    let out = xdp(
        dp,
        "partial checksum: left to TC",
        &part_in,
        XDP_PASS,
        &[(c::RX_NODE_IN, 1), (c::XDP_PARTIAL_CSUM, 1)],
    );
    assert_eq!(out, part_in);

    // Drops are XDP's; rejects TC's.
    let syn = pkt((OUTSIDE, 41_003), (NODE, local_only), SYN);
    xdp(
        dp,
        "eTP Local, no local endpoint: dropped",
        &syn,
        XDP_DROP,
        &[(c::RX_NODE_IN, 1), (c::DROP_NO_LOCAL_BACKEND, 1)],
    );
    let syn = pkt((OUTSIDE, 41_004), (NODE, unroutable), SYN);
    xdp(dp, "no route: dropped", &syn, XDP_DROP, &[(c::RX_NODE_IN, 1), (c::DROP_FIB, 1)]);
    let zero = pkt((OUTSIDE, 0), (NODE, remote), UDP);
    xdp(dp, "source port 0: dropped", &zero, XDP_DROP, &[(c::RX_NODE_IN, 1), (c::DROP_MALFORMED, 1)]);
    let syn = pkt((OUTSIDE, 41_005), (NODE, empty), SYN);
    let out = xdp(dp, "no endpoints: the reject left to TC", &syn, XDP_PASS, left);
    assert_eq!(out, syn);

    // A remote endpoint whose route leaves through another interface than the packet came in on
    // (lo → ul0), or through a tunnel device: TC's, with nothing stored or counted (TC makes the
    // flow); and so are the flow's next packets, before they are counted to the Service.
    for (port, cport, desc) in [(remote, 41_006, "another interface"), (tunnel, 41_007, "a tunnel device")] {
        let syn = pkt((OUTSIDE, cport), (NODE, port), SYN);
        let out = xdp(dp, &format!("remote endpoint through {desc}: left to TC"), &syn, XDP_PASS, left);
        assert_eq!(out, syn);
        let packets = || {
            let (_, svc) = maps
                .read_services()
                .expect("services")
                .into_iter()
                .find(|(k, _)| {
                    *k == lb_agent::reconcile::ServiceKey::V4(lb_common::Lb4ServiceKey {
                        addr: ip(NODE),
                        port: port.to_be(),
                        proto: 6,
                        scope: lb_common::SCOPE_EXTERNAL,
                    })
                })
                .expect("the frontend");
            maps.read_svc_stats(svc.id).expect("stats").packets
        };
        let before = packets();
        expect(
            dp,
            maps,
            "...which TC forwards",
            Prog::NodeIn,
            &syn,
            TC_REDIRECT,
            &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)],
        );
        let ack = pkt((OUTSIDE, cport), (NODE, port), ACK);
        let out = xdp(dp, "its next packet: left to TC", &ack, XDP_PASS, left);
        assert_eq!(out, ack);
        assert_eq!(packets(), before + 1, "only TC's packet counted to the Service");
    }
    // A later fragment whose first fragment XDP has not seen: TC, which takes packets in order,
    // may have it yet.
    let mut later = Pkt::new((OUTSIDE, 41_008), (NODE, local), UDP);
    later.fragment_offset = 185;
    let mut later = later.bytes();
    later[..6].fill(0);
    let out = xdp(dp, "a later fragment without its ports: left to TC", &later, XDP_PASS, left);
    assert_eq!(out, later);
    // ICMP errors are TC's; anything not lb's XDP passes as it is.
    let quoted = pkt((NODE, remote), (OUTSIDE, 41_000), SYN_ACK);
    let err = icmp_in(Ipv4Addr::new(198, 51, 100, 1), NODE, 3, 4, 1400, &quoted[14..]);
    let out = xdp(dp, "ICMP error: left to TC", &err, XDP_PASS, left);
    assert_eq!(out, err);
    let syn = pkt((OUTSIDE, 41_009), (CLUSTER_IP, 80), SYN);
    let out = xdp(
        dp,
        "cluster IP from outside: untouched",
        &syn,
        XDP_PASS,
        &[(c::RX_NODE_IN, 1), (c::PASS_NON_VIP, 1)],
    );
    assert_eq!(out, syn);

    let release = kernel_release();
    if release < (5, 15) {
        eprintln!("note: Linux {release:?}: a test run cannot name its ingress (5.15): XDP_TX is tested end to end only");
        return;
    }
    // In and out of ul0: XDP sends them itself.
    dp.set_node_mac(ifs.ul0, [0; 6]).expect("ul0's address, as the test packets have it");
    let on_ul0 = |dp: &Datapath, desc: &str, input: &[u8], verdict: u32, counters: &[(u32, u64)]| {
        let before = maps.read_counters().expect("counters");
        let (v, out) = run_in(dp, Prog::XdpNodeIn, input, Some(ifs.ul0));
        let after = maps.read_counters().expect("counters");
        assert_eq!(v, verdict, "{desc}: verdict");
        assert_counter_changes(desc, &before, &after, counters);
        // No metadata: sent or dropped, or passed on a kernel that hands none back.
        if out.len() == input.len() + 8 {
            out[8..].to_vec()
        } else {
            out
        }
    };
    let sent = |c1: u32| vec![(c::RX_NODE_IN, 1), (c1, 1), (c::XDP_SENT, 1)];
    let mut sent_new = sent(c::FWD_NEW_FLOW);
    sent_new.push((c::NODE_SNAT, 1));
    let syn = pkt((OUTSIDE, 41_010), (NODE, remote), SYN);
    let out = on_ul0(dp, "SYN from outside, remote endpoint", &syn, XDP_TX, &sent_new);
    let seen = check_packet(&out);
    assert_eq!((seen.src.0, seen.dst), (NODE, (REMOTE_POD, 8080)));
    let snat_port = seen.src.1;
    assert!(in_snat_range(snat_port), "SNAT port {snat_port}");
    assert_eq!(out[..6], PEER_MAC, "to the next hop's MAC");
    let ack = pkt((OUTSIDE, 41_010), (NODE, remote), ACK);
    let out = on_ul0(dp, "its next packet", &ack, XDP_TX, &sent(c::FWD_ESTABLISHED));
    assert_eq!(
        check_packet(&out),
        Seen { src: (NODE, snat_port), dst: (REMOTE_POD, 8080), udp_checksum: None }
    );
    // Its reply goes to the client through a router whose address is not resolved yet: TC (which
    // has the neighbour subsystem resolve it) sends it, untouched by XDP.
    let reply = pkt((REMOTE_POD, 8080), (NODE, snat_port), SYN_ACK);
    let out = on_ul0(dp, "reply, next hop unknown: left to TC", &reply, XDP_PASS, left);
    assert_eq!(out, reply);
    let out = expect(
        dp,
        maps,
        "...which TC sends",
        Prog::NodeIn,
        &reply,
        TC_REDIRECT,
        &[(c::RX_NODE_IN, 1), (c::REV_NAT, 1)],
    );
    assert_eq!((check_packet(&out).src, check_packet(&out).dst), ((NODE, remote), (OUTSIDE, 41_010)));
    // A reply with a partial checksum (merged by GRO): TC's.
    let mut part = partial(&Pkt::new((REMOTE_POD, 8080), (NODE, snat_port), ACK));
    part[..6].fill(0);
    let out = on_ul0(
        dp,
        "reply with a partial checksum: left to TC",
        &part,
        XDP_PASS,
        &[(c::RX_NODE_IN, 1), (c::XDP_PARTIAL_CSUM, 1)],
    );
    assert_eq!(out, part);
    // Once the router is known, XDP sends the replies itself.
    let status = Command::new("ip")
        .args([
            "neigh",
            "replace",
            "172.31.0.254",
            "lladdr",
            "02:00:00:00:00:fe",
            "dev",
            "ul0",
            "nud",
            "permanent",
        ])
        .status()
        .expect("ip neigh");
    assert!(status.success());
    let out = on_ul0(dp, "reply, next hop known", &reply, XDP_TX, &sent(c::REV_NAT));
    assert_eq!(check_packet(&out), Seen { src: (NODE, remote), dst: (OUTSIDE, 41_010), udp_checksum: None });
    assert_eq!(out[..6], [0x02, 0, 0, 0, 0, 0xfe], "to the router's MAC");
    // UDP the same way.
    let udp = pkt((OUTSIDE, 41_011), (NODE, remote), UDP);
    let out = on_ul0(dp, "UDP, remote endpoint", &udp, XDP_TX, &sent_new);
    let seen = check_packet(&out);
    assert_eq!((seen.src.0, seen.dst), (NODE, (REMOTE_POD, 5353)));
    let out = on_ul0(dp, "UDP reply", &pkt((REMOTE_POD, 5353), seen.src, UDP), XDP_TX, &sent(c::REV_NAT));
    assert_eq!((check_packet(&out).src, check_packet(&out).dst), ((NODE, remote), (OUTSIDE, 41_011)));
}

/// A NodePort's flows from outside outlive their Service as a cluster IP's do: the tombstone keeps
/// answering from outside (established flows go on, new ones are rejected). `desired` holds the
/// NodePort `NODE:30090`, which goes.
fn a_deleted_nodeport_keeps_its_flows_from_outside(
    dp: &Datapath,
    maps: &mut Maps,
    r: &mut Reconciler,
    mut desired: BTreeMap<FrontendAddr, Frontend>,
) {
    let syn = pkt((OUTSIDE, 41_000), (NODE, 30090), SYN);
    let out = expect(
        dp,
        maps,
        "SYN",
        Prog::NodeIn,
        &syn,
        TC_REDIRECT,
        &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)],
    );
    let snat = check_packet(&out).src;
    let ack = pkt((OUTSIDE, 41_000), (NODE, 30090), ACK);
    expect(dp, maps, "ACK", Prog::NodeIn, &ack, TC_REDIRECT, &[(c::RX_NODE_IN, 1), (c::FWD_ESTABLISHED, 1)]);
    desired.retain(|a, _| a.port != 30090);
    let (_, errors) = r.sync(&desired, &Default::default(), maps);
    assert!(errors.is_empty(), "sync errors: {errors:?}");
    let out = expect(
        dp,
        maps,
        "after the Service went: the flow goes on",
        Prog::NodeIn,
        &ack,
        TC_REDIRECT,
        &[(c::RX_NODE_IN, 1), (c::FWD_ESTABLISHED, 1)],
    );
    assert_eq!(check_packet(&out).src, snat);
    let reply = pkt((REMOTE_POD, 8080), snat, ACK);
    expect(
        dp,
        maps,
        "and so do its replies",
        Prog::NodeIn,
        &reply,
        TC_REDIRECT,
        &[(c::RX_NODE_IN, 1), (c::REV_NAT, 1)],
    );
    let syn = pkt((OUTSIDE, 41_001), (NODE, 30090), SYN);
    expect(
        dp,
        maps,
        "a new flow is rejected",
        Prog::NodeIn,
        &syn,
        TC_REDIRECT,
        &[(c::RX_NODE_IN, 1), (c::REJECT_NO_BACKEND, 1)],
    );
}

/// Rule: `loadBalancerSourceRanges` let only clients inside a range open flows to a LoadBalancer
/// address, from outside and from this node's pods alike (both scopes of the address); the
/// others are dropped and counted. The edges of a range are the range's; the Service's NodePort
/// and cluster IP take every client; a deny entry alone shuts every client out; a flow
/// let in goes on when its client leaves the ranges (only new flows are checked, as under
/// kube-proxy's rules), while that client's new flows are dropped; and a range added lets its
/// clients in.
fn source_ranges(
    dp: &Datapath,
    maps: &mut Maps,
    r: &mut Reconciler,
    base: &BTreeMap<FrontendAddr, Frontend>,
) {
    let lb_ip = Ipv4Addr::new(203, 0, 113, 10);
    let lb_local = Ipv4Addr::new(203, 0, 113, 11);
    let ranged = |fe: Frontend, ranges: &[(Ipv4Addr, u8)]| Frontend {
        source_ranges: Some(ranges.iter().map(|(a, l)| ((*a).into(), *l)).collect()),
        ..fe
    };
    let net = (Ipv4Addr::new(192, 0, 2, 0), 24);
    let fes = |ranges: &[(Ipv4Addr, u8)]| {
        let mut fes = vec![
            ranged(
                frontend(lb_ip, 80, Protocol::Tcp, FrontendKind::LoadBalancer, &[(LOCAL_POD, 8080)]),
                ranges,
            ),
            // A deny entry alone: ranges that admit no client.
            ranged(frontend(lb_ip, 53, Protocol::Udp, FrontendKind::LoadBalancer, &[(LOCAL_POD, 5353)]), &[]),
            frontend(NODE, 30095, Protocol::Tcp, FrontendKind::NodePort, &[(LOCAL_POD, 8080)]),
            frontend(RANGED_CLUSTER_IP, 80, Protocol::Tcp, FrontendKind::ClusterIp, &[(LOCAL_POD, 8080)]),
        ];
        // externalTrafficPolicy Local: the internal entry (this node's pods) is filtered too.
        let mut ext = ranged(frontend(lb_local, 80, Protocol::Tcp, FrontendKind::LoadBalancer, &[]), ranges);
        (ext.local_only, ext.two_scopes) = (true, true);
        let mut int = ranged(
            frontend(lb_local, 80, Protocol::Tcp, FrontendKind::LoadBalancer, &[(REMOTE_POD, 8080)]),
            ranges,
        );
        int.addr.scope = Scope::Internal;
        fes.extend([ext, int]);
        let mut all = base.clone();
        all.extend(fes.into_iter().map(|f| (f.addr, f)));
        all
    };
    let (_, errors) = r.sync(&fes(&[net]), &Default::default(), maps);
    assert!(errors.is_empty(), "sync errors: {errors:?}");

    let new_flow = [(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)];
    let denied = [(c::RX_NODE_IN, 1), (c::DROP_SRC_RANGE, 1)];
    let port = |i: u16| 42_000 + i;
    // Inside the range, its first and last addresses included: let in.
    for (i, client) in [[192, 0, 2, 7], [192, 0, 2, 0], [192, 0, 2, 255]].into_iter().enumerate() {
        let syn = pkt((client.into(), port(i as u16)), (lb_ip, 80), SYN);
        let out = expect(dp, maps, &format!("{client:?} in range"), Prog::NodeIn, &syn, TC_OK, &new_flow);
        assert_eq!(check_packet(&out).dst, (LOCAL_POD, 8080));
    }
    // Just outside it, and far from it: dropped, UDP too; nothing is tracked for them.
    for (i, client) in [[192, 0, 1, 255], [192, 0, 3, 0], [198, 51, 100, 9]].into_iter().enumerate() {
        let syn = pkt((client.into(), port(10 + i as u16)), (lb_ip, 80), SYN);
        let out = expect(dp, maps, &format!("{client:?} out of range"), Prog::NodeIn, &syn, TC_SHOT, &denied);
        assert_eq!(out, syn, "a dropped packet is not rewritten");
        let again = expect(dp, maps, "its next packet", Prog::NodeIn, &syn, TC_SHOT, &denied);
        assert_eq!(again, syn);
    }
    // Ranges that admit no client: every client is dropped.
    let udp = pkt((Ipv4Addr::new(192, 0, 2, 7), port(20)), (lb_ip, 53), UDP);
    expect(dp, maps, "ranges admitting none", Prog::NodeIn, &udp, TC_SHOT, &denied);
    // The NodePort and the cluster IP of the same Service take any client.
    let syn = pkt((Ipv4Addr::new(198, 51, 100, 9), port(21)), (NODE, 30095), SYN);
    expect(dp, maps, "the NodePort", Prog::NodeIn, &syn, TC_OK, &new_flow);
    let pod_new = [(c::RX_FORWARD, 1), (c::FWD_NEW_FLOW, 1)];
    let pod_denied = [(c::RX_FORWARD, 1), (c::DROP_SRC_RANGE, 1)];
    let syn = pkt((POD_CLIENT, port(22)), (RANGED_CLUSTER_IP, 80), SYN);
    expect(dp, maps, "the cluster IP from a pod", Prog::PodForward, &syn, TC_OK, &pod_new);
    // This node's pods are clients like any other (kube-proxy filters them too), through the
    // internal entry of an externalTrafficPolicy Local address as well.
    for (i, vip) in [lb_ip, lb_local].into_iter().enumerate() {
        let syn = pkt((POD_CLIENT, port(23 + i as u16)), (vip, 80), SYN);
        expect(
            dp,
            maps,
            &format!("a pod to {vip}, out of range"),
            Prog::PodForward,
            &syn,
            TC_SHOT,
            &pod_denied,
        );
    }
    // An established flow from 192.0.2.7 outlives its client leaving the ranges; its new flows
    // do not. A range added for the pods lets them in, through both scopes.
    let ack = pkt((Ipv4Addr::new(192, 0, 2, 7), port(0)), (lb_ip, 80), ACK);
    expect(
        dp,
        maps,
        "established",
        Prog::NodeIn,
        &ack,
        TC_OK,
        &[(c::RX_NODE_IN, 1), (c::FWD_ESTABLISHED, 1)],
    );
    let pods = (Ipv4Addr::new(10, 244, 1, 0), 24);
    let (_, errors) = r.sync(&fes(&[pods]), &Default::default(), maps);
    assert!(errors.is_empty(), "sync errors: {errors:?}");
    expect(
        dp,
        maps,
        "after the ranges changed",
        Prog::NodeIn,
        &ack,
        TC_OK,
        &[(c::RX_NODE_IN, 1), (c::FWD_ESTABLISHED, 1)],
    );
    let syn = pkt((Ipv4Addr::new(192, 0, 2, 7), port(30)), (lb_ip, 80), SYN);
    expect(dp, maps, "a new flow of the client that left", Prog::NodeIn, &syn, TC_SHOT, &denied);
    for (i, vip) in [lb_ip, lb_local].into_iter().enumerate() {
        let syn = pkt((POD_CLIENT, port(31 + i as u16)), (vip, 80), SYN);
        let out =
            expect(dp, maps, &format!("a pod to {vip}, in range"), Prog::PodForward, &syn, TC_OK, &pod_new);
        assert_eq!(check_packet(&out).src, (POD_CLIENT, port(31 + i as u16)));
    }
    // No ranges any more: every client.
    let mut open = fes(&[]);
    for fe in open.values_mut().filter(|f| !base.contains_key(&f.addr)) {
        fe.source_ranges = None;
    }
    let (_, errors) = r.sync(&open, &Default::default(), maps);
    assert!(errors.is_empty(), "sync errors: {errors:?}");
    assert!(maps.read_src_ranges().expect("ranges").is_empty(), "every entry removed");
    expect(dp, maps, "ranges gone", Prog::NodeIn, &syn, TC_OK, &new_flow);
    expect(dp, maps, "ranges gone, UDP", Prog::NodeIn, &udp, TC_OK, &new_flow);
}

/// An ICMP error as a node interface receives it (addressed to this host at layer 2).
fn icmp_in(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, rest: u32, quoted: &[u8]) -> Vec<u8> {
    let mut b = icmp_error(src, dst, kind, code, rest, quoted);
    b[..6].fill(0);
    b
}

/// Rule: an ICMP error about a flow from outside reaches the host that sent the quoted packet, as
/// if about a packet it sent itself, both ways and for both kinds of endpoint: a local endpoint's
/// error to the client leaves from the NodePort (node egress); a router's "fragmentation needed"
/// about a reply this node sent to the client goes to the endpoint, local (delivered) or remote
/// (forwarded, to the SNAT address and port it replied to); a remote endpoint's error about a
/// SNATed packet goes to the client (forwarded). Errors about no flow of lb's, or in a frame for
/// another host, pass untouched.
fn icmp_errors_about_flows_from_outside(
    dp: &Datapath,
    maps: &mut Maps,
    r: &mut Reconciler,
    base: &BTreeMap<FrontendAddr, Frontend>,
) {
    // The rules test's NodePorts: 30080 to a remote endpoint, 30081 to a local one.
    let (remote, local) = (30080, 30081);
    for (port, to) in [(remote, REMOTE_POD), (local, LOCAL_POD)] {
        let fe = &base[&FrontendAddr::new(NODE, port, Protocol::Tcp)];
        assert_eq!(fe.backends.iter().map(|b| b.ip).collect::<Vec<_>>(), [to]);
    }
    let (_, errors) = r.sync(base, &Default::default(), maps);
    assert!(errors.is_empty(), "sync errors: {errors:?}");
    let router = Ipv4Addr::new(172, 31, 0, 254);
    let rev_in = [(c::RX_NODE_IN, 1), (c::REV_NAT, 1)];

    // A local endpoint's flow: the client's SYN, and the endpoint's reply on its way out.
    let syn = pkt((OUTSIDE, 43_000), (NODE, local), SYN);
    let to_pod = expect(
        dp,
        maps,
        "SYN, local",
        Prog::NodeIn,
        &syn,
        TC_OK,
        &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)],
    );
    let reply = pkt((LOCAL_POD, 8080), (OUTSIDE, 43_000), SYN_ACK);
    let reply_out = expect(
        dp,
        maps,
        "reply, local",
        Prog::NodeOut,
        &reply,
        TC_OK,
        &[(c::RX_NODE_OUT, 1), (c::REV_NAT, 1)],
    );
    assert_eq!(check_packet(&reply_out).src, (NODE, local));
    // The endpoint's own error about the client's packet: from the NodePort, about a packet
    // to it.
    let err = icmp_error(LOCAL_POD, OUTSIDE, 3, 4, 1400, &to_pod[14..]);
    let out = expect(
        dp,
        maps,
        "the endpoint's error",
        Prog::NodeOut,
        &err,
        TC_OK,
        &[(c::RX_NODE_OUT, 1), (c::REV_NAT, 1)],
    );
    let seen = check_icmp_error(&out);
    assert_eq!((seen.src, seen.dst), (NODE, OUTSIDE));
    assert_eq!((seen.quoted.src, seen.quoted.dst), ((OUTSIDE, 43_000), (NODE, local)));
    // A router's "fragmentation needed" about the reply: to the endpoint, about its reply.
    let err = icmp_in(router, NODE, 3, 4, 1280, &reply_out[14..]);
    let out = expect(
        dp,
        maps,
        "a router's error about a local endpoint's reply",
        Prog::NodeIn,
        &err,
        TC_OK,
        &rev_in,
    );
    let seen = check_icmp_error(&out);
    assert_eq!((seen.src, seen.dst), (router, LOCAL_POD));
    assert_eq!((seen.quoted.src, seen.quoted.dst), ((LOCAL_POD, 8080), (OUTSIDE, 43_000)));

    // A remote endpoint's flow, SNATed: the client's SYN, and the endpoint's reply.
    let syn = pkt((OUTSIDE, 43_001), (NODE, remote), SYN);
    let to_remote = expect(
        dp,
        maps,
        "SYN, remote",
        Prog::NodeIn,
        &syn,
        TC_REDIRECT,
        &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)],
    );
    let snat = check_packet(&to_remote).src;
    assert_eq!(snat.0, NODE);
    let reply = pkt((REMOTE_POD, 8080), snat, SYN_ACK);
    let reply_out = expect(dp, maps, "reply, remote", Prog::NodeIn, &reply, TC_REDIRECT, &rev_in);
    assert_eq!(check_packet(&reply_out).src, (NODE, remote));
    // The endpoint's error about the SNATed packet: to the client, from the NodePort, about
    // the client's packet to it; forwarded.
    let err = icmp_in(REMOTE_POD, NODE, 3, 3, 0, &to_remote[14..]);
    let out = expect(dp, maps, "the remote endpoint's error", Prog::NodeIn, &err, TC_REDIRECT, &rev_in);
    let seen = check_icmp_error(&out);
    assert_eq!((seen.src, seen.dst), (NODE, OUTSIDE));
    assert_eq!((seen.quoted.src, seen.quoted.dst), ((OUTSIDE, 43_001), (NODE, remote)));
    // A router on the way to it (not the endpoint): from the NodePort all the same.
    let err = icmp_in(router, NODE, 11, 0, 0, &to_remote[14..]);
    let out =
        expect(dp, maps, "a router's error about a SNATed packet", Prog::NodeIn, &err, TC_REDIRECT, &rev_in);
    assert_eq!(check_icmp_error(&out).src, NODE);
    // A router's "fragmentation needed" about the reply this node forwarded: to the remote
    // endpoint, about its reply to this node's address and SNAT port; forwarded to it.
    let err = icmp_in(router, NODE, 3, 4, 1280, &reply_out[14..]);
    let out = expect(
        dp,
        maps,
        "a router's error about a remote endpoint's reply",
        Prog::NodeIn,
        &err,
        TC_REDIRECT,
        &rev_in,
    );
    let seen = check_icmp_error(&out);
    assert_eq!((seen.src, seen.dst), (NODE, REMOTE_POD), "from this node's address, as the flow there");
    assert_eq!((seen.quoted.src, seen.quoted.dst), ((REMOTE_POD, 8080), snat));
    assert_eq!(out[..6], PEER_MAC, "to the next hop towards the endpoint");

    // A LoadBalancer IP, which is not this node's address: the same rules, each address where it
    // belongs.
    let vip = Ipv4Addr::new(203, 0, 113, 20);
    let mut with_lb = base.clone();
    for (port, to) in [(80, REMOTE_POD), (81, LOCAL_POD)] {
        let fe = frontend(vip, port, Protocol::Tcp, FrontendKind::LoadBalancer, &[(to, 8080)]);
        with_lb.insert(fe.addr, fe);
    }
    let (_, errors) = r.sync(&with_lb, &Default::default(), maps);
    assert!(errors.is_empty(), "sync errors: {errors:?}");
    let syn = pkt((OUTSIDE, 43_010), (vip, 80), SYN);
    let new_remote = [(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1), (c::NODE_SNAT, 1)];
    let to_remote =
        expect(dp, maps, "SYN to the LB IP, remote", Prog::NodeIn, &syn, TC_REDIRECT, &new_remote);
    let snat = check_packet(&to_remote).src;
    let reply = pkt((REMOTE_POD, 8080), snat, SYN_ACK);
    let reply_out = expect(dp, maps, "reply, LB IP, remote", Prog::NodeIn, &reply, TC_REDIRECT, &rev_in);
    assert_eq!(check_packet(&reply_out).src, (vip, 80));
    // An error from inside the cluster about the SNATed packet: to the client, from the LB IP.
    let err = icmp_in(Ipv4Addr::new(10, 244, 2, 1), NODE, 3, 1, 0, &to_remote[14..]);
    let out =
        expect(dp, maps, "an error about a SNATed packet, LB IP", Prog::NodeIn, &err, TC_REDIRECT, &rev_in);
    let seen = check_icmp_error(&out);
    assert_eq!((seen.src, seen.dst), (vip, OUTSIDE));
    assert_eq!((seen.quoted.src, seen.quoted.dst), ((OUTSIDE, 43_010), (vip, 80)));
    // A router's error about the reply, sent to the LB IP: to the remote endpoint, from this node.
    let err = icmp_in(router, vip, 3, 4, 1280, &reply_out[14..]);
    let out =
        expect(dp, maps, "a router's error about a reply, LB IP", Prog::NodeIn, &err, TC_REDIRECT, &rev_in);
    let seen = check_icmp_error(&out);
    assert_eq!((seen.src, seen.dst), (NODE, REMOTE_POD));
    assert_eq!((seen.quoted.src, seen.quoted.dst), ((REMOTE_POD, 8080), snat));
    // The same error sent to this node's address instead (not the reply's source): not about a
    // packet this node sent from there; untouched.
    let err = icmp_in(router, NODE, 3, 4, 1280, &reply_out[14..]);
    let out = expect(
        dp,
        maps,
        "an error to another address than the quote's source",
        Prog::NodeIn,
        &err,
        TC_OK,
        &[(c::RX_NODE_IN, 1), (c::PASS_OTHER_PROTO, 1)],
    );
    assert_eq!(out, err);
    // A local endpoint's flow to the LB IP, and an error this node's own stack sends the client
    // about its packet (the node's address as source): from the LB IP.
    let syn = pkt((OUTSIDE, 43_011), (vip, 81), SYN);
    let to_pod = expect(
        dp,
        maps,
        "SYN to the LB IP, local",
        Prog::NodeIn,
        &syn,
        TC_OK,
        &[(c::RX_NODE_IN, 1), (c::FWD_NEW_FLOW, 1)],
    );
    let err = icmp_error(NODE, OUTSIDE, 3, 4, 1400, &to_pod[14..]);
    let out = expect(
        dp,
        maps,
        "the node's error about a local flow, LB IP",
        Prog::NodeOut,
        &err,
        TC_OK,
        &[(c::RX_NODE_OUT, 1), (c::REV_NAT, 1)],
    );
    let seen = check_icmp_error(&out);
    assert_eq!((seen.src, seen.dst), (vip, OUTSIDE));
    assert_eq!((seen.quoted.src, seen.quoted.dst), ((OUTSIDE, 43_011), (vip, 81)));
    // A flow of this node's pod to the LB IP is no flow from outside: an error quoting its reply
    // (LB IP → pod) that comes in on the node interface is left alone.
    let syn = pkt((POD_CLIENT, 43_012), (vip, 81), SYN);
    expect(
        dp,
        maps,
        "a pod's SYN to the LB IP",
        Prog::PodForward,
        &syn,
        TC_OK,
        &[(c::RX_FORWARD, 1), (c::FWD_NEW_FLOW, 1)],
    );
    let pod_reply = pkt((vip, 81), (POD_CLIENT, 43_012), SYN_ACK);
    let err = icmp_in(router, vip, 3, 4, 1280, &pod_reply[14..]);
    let out = expect(
        dp,
        maps,
        "an error about a pod's flow",
        Prog::NodeIn,
        &err,
        TC_OK,
        &[(c::RX_NODE_IN, 1), (c::PASS_OTHER_PROTO, 1)],
    );
    assert_eq!(out, err);

    // About no flow of lb's: untouched, both ways.
    let other = pkt((NODE, 22), (OUTSIDE, 50_000), ACK);
    let err = icmp_in(router, NODE, 3, 4, 1280, &other[14..]);
    let out = expect(
        dp,
        maps,
        "about another flow, in",
        Prog::NodeIn,
        &err,
        TC_OK,
        &[(c::RX_NODE_IN, 1), (c::PASS_OTHER_PROTO, 1)],
    );
    assert_eq!(out, err);
    let err = icmp_error(NODE, OUTSIDE, 3, 3, 0, &pkt((OUTSIDE, 50_001), (NODE, 9999), UDP)[14..]);
    let out = expect(
        dp,
        maps,
        "about another flow, out",
        Prog::NodeOut,
        &err,
        TC_OK,
        &[(c::RX_NODE_OUT, 1), (c::PASS_OTHER_PROTO, 1)],
    );
    assert_eq!(out, err);
    // A copy of a frame for another host: not this node's to translate.
    let mut flooded = icmp_in(router, NODE, 3, 4, 1280, &reply_out[14..]);
    flooded[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    let out = expect(
        dp,
        maps,
        "for another host",
        Prog::NodeIn,
        &flooded,
        TC_OK,
        &[(c::RX_NODE_IN, 1), (c::PASS_OTHER_PROTO, 1)],
    );
    assert_eq!(out, flooded);
}

/// Rule: replies of flows SNATed to this node's address are looked for on every port an agent of
/// this layout may have given one: the SNAT range, the ranges agents before it served with (the
/// one before may give out ports of its range until the new one takes its links over) and the
/// ports of the SNATed flows in the table. (End to end: `e2e_nodeport`'s restart with another
/// range under traffic.)
#[test]
fn the_reply_gate_holds_the_ports_of_earlier_snat_ranges_and_of_the_flows_in_the_table() {
    let pins = PinDir::new("replygate");
    let load = |range: (u16, u16)| {
        let cfg = lb_agent::datapath::Config { snat_ports: range, ..test_config(pins.path()) };
        Datapath::load(&cfg, Mode::Tc).expect("load datapath")
    };
    let (dp, _) = load(DEFAULT_SNAT_PORTS);
    assert_eq!(dp.snat_reply_ports(), (1024, 29_999), "the first agent: its range");
    drop(dp);
    let (dp, mut maps) = load((40_000, 40_999));
    assert_eq!(dp.snat_reply_ports(), (1024, 40_999), "another range: the one before kept");
    // A flow SNATed to this node's address on port 50,000 (an agent's of long ago).
    let key = lb_common::Lb4CtKey {
        saddr: ip(REMOTE_POD),
        daddr: ip(NODE),
        sport: 8080u16.to_be(),
        dport: 50_000u16.to_be(),
        proto: 6,
        dir: lb_common::CT_DIR_REPLY,
        _pad: 0,
    };
    let entry = lb_common::Lb4CtEntry { flags: lb_common::CT_FLAG_NODE_SNAT, ..Default::default() };
    maps.ct.insert(key, entry, 0).expect("a reply entry");
    drop((dp, maps));
    let (dp, mut maps) = load((40_000, 40_999));
    assert_eq!(dp.snat_reply_ports(), (1024, 50_000), "the same range again: the flows' ports too");
    // An IPv6 flow SNATed to this node on port 60,000: its table counts too.
    let key6 = lb_common::Lb6CtKey {
        saddr: [1, 2, 3, 4],
        daddr: [5, 6, 7, 8],
        sport: 8080u16.to_be(),
        dport: 60_000u16.to_be(),
        proto: 6,
        dir: lb_common::CT_DIR_REPLY,
        _pad: 0,
    };
    let entry6 = lb_common::Lb6CtEntry { flags: lb_common::CT_FLAG_NODE_SNAT, ..Default::default() };
    maps.v6.as_mut().expect("IPv6 maps").ct.insert(key6, entry6, 0).expect("an IPv6 reply entry");
    drop((dp, maps));
    let (dp, _) = load((40_000, 40_999));
    assert_eq!(dp.snat_reply_ports(), (1024, 60_000), "the IPv6 flows' ports too");
}
