//! IPv6 end to end, in a dual-stack lab (`Lab::dual_stack`): two nodes, each with its own agent
//! (`--ipv6 on`), backends on both, a dual-stack Service (one cluster IP per family).

mod support;

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use lb_agent::datapath::Mode;
use lb_common::counters as c;
use lb_testkit::lab::{tcp_asks, tcp_peer_any, udp_asks, udp_peer_any, wait_until, Lab, Pod, Session};
use support::{
    v6::{dual_stack_who, VIP6},
    Cluster, VIP,
};

/// New flows per family and protocol from node 1: a third is 600 per backend, with a standard
/// deviation of 20, so the ±15 % band (±90) is 4.5 standard deviations wide.
const FLOWS: usize = 1_800;

fn tally(answers: Vec<std::io::Result<String>>, what: &str) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for (i, a) in answers.into_iter().enumerate() {
        let name = a.unwrap_or_else(|e| panic!("{what} #{i} failed: {e}"));
        *t.entry(name).or_default() += 1;
    }
    t
}

fn assert_fair(t: &BTreeMap<String, usize>, total: usize, what: &str) {
    assert_eq!(t.keys().map(String::as_str).collect::<Vec<_>>(), ["b1", "b2", "b3"], "{what}: {t:?}");
    let fair = total as f64 / 3.0;
    for (b, n) in t {
        let off = (*n as f64 - fair).abs() / fair;
        assert!(off <= 0.15, "{what}: {b} got {n} of {total} ({:.1}% off fair)", off * 100.0);
    }
}

/// Rule: pods reach a dual-stack Service over both families: IPv6 flows spread over the backends
/// by Maglev, within 15 % of fair, over TCP and UDP; a long connection stays with its backend
/// while new flows come; the backend sees the client's own IPv6 address; the other node's agent
/// balances its pods' flows across the underlay; IPv4 to the same Service works beside it.
fn dual_stack_service(tag: &str, mode: Mode) {
    let cl = Cluster::dual_stack(tag, mode, |b: &[Pod; 3]| dual_stack_who(b), &["--ipv6", "on"]);
    let tcp = SocketAddr::V6(SocketAddrV6::new(VIP6, 80, 0, 0));
    let udp = SocketAddr::V6(SocketAddrV6::new(VIP6, 53, 0, 0));
    // Generous: the kernel matrix loads the programs emulated.
    let ready = wait_until(std::time::Duration::from_secs(90), || {
        tcp_asks(&cl.client1, tcp, 1)?.pop().expect("one answer")
    });
    assert!(
        ready.is_ok(),
        "IPv6 cluster IP unreachable: {ready:?}\nagent log:\n{}",
        cl.lab.agent_log(&cl.nodes[0])
    );

    // Counted from when every program is attached (TC may meet the first ones before XDP is).
    cl.wait_ready(&cl.nodes[0]);
    let before = cl.maps(1).read_counters().expect("counters");
    let mut session = Session::open(&cl.client1, tcp).expect("long-lived connection over IPv6");
    let (first, seen) = session.peer_addr().expect("first answer");
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V6(cl.client1.ip6.expect("client 1's IPv6 address")),
        "the backend sees the client"
    );
    let mut answers = Vec::new();
    for _ in 0..6 {
        answers.extend(tcp_asks(&cl.client1, tcp, FLOWS / 6).expect("tcp clients"));
        assert_eq!(session.peer_addr().expect("long-lived answer").0, first, "long-lived connection moved");
    }
    assert_fair(&tally(answers, "TCP over IPv6"), FLOWS, "TCP over IPv6 from node 1");
    let answers = udp_asks(&cl.client1, udp, 20_000, FLOWS).expect("udp clients");
    assert_fair(&tally(answers, "UDP over IPv6"), FLOWS, "UDP over IPv6 from node 1");
    let (_, seen) = udp_peer_any(&cl.client1.netns, udp, 0).expect("UDP peer");
    assert_eq!(
        seen.ip(),
        std::net::IpAddr::V6(cl.client1.ip6.expect("client 1's IPv6 address")),
        "UDP: the backend sees the client"
    );

    if mode == Mode::Xdp {
        // XDP decided node 1's IPv6 packets, and TC behind it left them alone: were XDP to leave
        // them to TC, `xdp_to_tc` would count each; were TC to look at XDP's packets again,
        // every packet XDP forwarded (then addressed to a backend) would pass as no Service.
        let after = cl.maps(1).read_counters().expect("counters");
        let counted = |i: u32| after[i as usize] - before[i as usize];
        let decided = counted(c::FWD_NEW_FLOW) + counted(c::FWD_ESTABLISHED);
        assert!(decided >= 2 * FLOWS as u64, "forwarded over IPv6: {decided}");
        if support::xdp_meta() {
            assert!(
                counted(c::PASS_NON_VIP) < decided,
                "TC saw XDP's IPv6 packets again: {} passed as no Service, {decided} forwarded",
                counted(c::PASS_NON_VIP)
            );
        } else {
            // No mark on this kernel: TC looks at every packet XDP passed, addressed to a backend.
            assert!(
                counted(c::PASS_NON_VIP) >= decided,
                "without XDP's marks TC passes XDP's IPv6 packets as no Service: {} of {decided}",
                counted(c::PASS_NON_VIP)
            );
        }
        for left in [c::XDP_TO_TC, c::XDP_PARTIAL_CSUM] {
            assert!(
                counted(left) * 1_000 < decided,
                "{}: {} of {decided}",
                c::NAMES[left as usize],
                counted(left)
            );
        }
    }

    // From the other node: its own agent, across the underlay both ways.
    let t = tally(tcp_asks(&cl.client2, tcp, 300).expect("tcp from node 2"), "TCP from node 2");
    assert_eq!(t.len(), 3, "node 2 reaches every backend over IPv6: {t:?}");
    let t = tally(udp_asks(&cl.client2, udp, 20_000, 300).expect("udp from node 2"), "UDP from node 2");
    assert_eq!(t.len(), 3, "node 2 reaches every backend over IPv6 UDP: {t:?}");

    // The same Service over IPv4, beside it.
    let t = tally(
        tcp_asks(&cl.client1, SocketAddrV4::new(VIP, 80), 300).expect("tcp over IPv4"),
        "TCP over IPv4",
    );
    assert_eq!(t.len(), 3, "IPv4 to the same Service: {t:?}");
    assert_eq!(session.peer_addr().expect("long-lived answer").0, first, "long-lived connection moved");

    let v = cl.maps(1).read_counters().expect("counters");
    assert!(v[c::FWD_NEW_FLOW as usize] >= 2 * FLOWS as u64, "new flows: {}", v[c::FWD_NEW_FLOW as usize]);
    assert!(v[c::REV_NAT as usize] >= 2 * FLOWS as u64, "reverse NAT: {}", v[c::REV_NAT as usize]);
    for bad in
        [c::DROP_NO_BACKEND, c::DROP_REWRITE_FAILED, c::DROP_MALFORMED, c::DROP_SPLIT_MISMATCH, c::PASS_IPV6]
    {
        assert_eq!(v[bad as usize], 0, "{}", c::NAMES[bad as usize]);
    }
}

#[test]
fn tc_dual_stack_service() {
    dual_stack_service("v6tc", Mode::Tc);
}

#[test]
fn xdp_dual_stack_service() {
    dual_stack_service("v6xdp", Mode::Xdp);
}

/// Rule: TCP path MTU discovery works through an IPv6 cluster IP whose backend sits behind a
/// smaller MTU. Only b1, behind a 1280-byte MTU (IPv6's minimum) on its node-side link, the rest
/// 1500: b1 advertises an MSS of 1440 (its own link is 1500), so the client's full-sized segments
/// (1500 bytes, to b1 after DNAT) are too big for node 1 to forward, and node 1 answers each with
/// an ICMPv6 "packet too big" (MTU 1280) quoting client → b1:8080. lb's reply program turns the
/// quote into client → VIP6:80 (ICMPv6 checksum updated): only then does the client's kernel find
/// its socket, lower its path MTU to the VIP and send again; untranslated, the connection stalls.
///
/// TC only: XDP is on the forward path only, and the "packet too big" travels on the reply path,
/// which is the same TC egress program in either mode.
#[test]
fn path_mtu_discovery_works_through_an_ipv6_vip() {
    let cl =
        Cluster::dual_stack("v6pmtu", Mode::Tc, |b: &[Pod; 3]| dual_stack_who(&b[..1]), &["--ipv6", "on"]);
    let to = SocketAddr::V6(SocketAddrV6::new(VIP6, 80, 0, 0));
    let ready = wait_until(std::time::Duration::from_secs(90), || {
        tcp_asks(&cl.client1, to, 1)?.pop().expect("one answer")
    });
    assert!(
        ready.is_ok(),
        "IPv6 cluster IP unreachable: {ready:?}\nagent log:\n{}",
        cl.lab.agent_log(&cl.nodes[0])
    );
    cl.wait_ready(&cl.nodes[0]);
    let (b1, c1) = (&cl.backends[0], &cl.client1);
    let ip = |args: &[&str]| {
        let out = std::process::Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    ip(&["-n", &cl.nodes[0].netns, "link", "set", &b1.host_if, "mtu", "1280"]);

    let before = cl.maps(1).read_counters().expect("counters");
    let (node_before, client_before) = (snmp6(&cl.nodes[0].netns), snmp6(&c1.netns));
    let answer = support::send_long_line(&c1.netns, to);
    let after = cl.maps(1).read_counters().expect("counters");
    let (node_after, client_after) = (snmp6(&cl.nodes[0].netns), snmp6(&c1.netns));
    let mut counted: Vec<String> =
        [c::REV_NAT, c::PASS_OTHER_PROTO, c::DROP_REWRITE_FAILED, c::DROP_MALFORMED]
            .into_iter()
            .map(|i| format!("{} {}", c::NAMES[i as usize], after[i as usize] - before[i as usize]))
            .collect();
    let sent = node_after["Icmp6OutPktTooBigs"] - node_before["Icmp6OutPktTooBigs"];
    counted.push(format!("node 1 sent Icmp6OutPktTooBigs {sent}"));
    for k in ["Icmp6InPktTooBigs", "Icmp6InCsumErrors", "Icmp6InErrors"] {
        counted.push(format!("client got {k} {}", client_after[k] - client_before[k]));
    }
    // No counter of lb's tells translated ICMPv6 errors apart (they count as reverse NAT, with
    // b1's replies): the kernels' ICMPv6 statistics and the client's route say what happened
    // (veth passes a full checksum on unchecked: the client checks the ICMPv6 checksum).
    // What the client's kernel learnt about the path to the VIP (a cached route with its MTU).
    let route = ip(&["-n", &c1.netns, "-6", "route", "get", &VIP6.to_string()]);
    let why = format!("during the exchange: {}; the client's route: {route}", counted.join(", "));
    assert!(sent > 0, "node 1 sent no \"packet too big\": the test did not test ({why})");
    assert_eq!(
        answer.as_deref().ok(),
        Some("b1"),
        "20 kB through an IPv6 VIP with a 1280-byte MTU to the backend: {answer:?} ({why})"
    );
    assert!(route.contains("mtu 1280"), "the client learnt the path MTU to the VIP ({why})");
    for bad in [c::DROP_REWRITE_FAILED, c::DROP_MALFORMED] {
        assert_eq!(after[bad as usize], before[bad as usize], "{} ({why})", c::NAMES[bad as usize]);
    }
}

/// The IPv6 statistics of network namespace `netns` (`/proc/net/snmp6`: `Icmp6InPktTooBigs`, ...).
fn snmp6(netns: &str) -> BTreeMap<String, u64> {
    let out = std::process::Command::new("nsenter")
        .args([&format!("--net=/run/netns/{netns}"), "cat", "/proc/net/snmp6"])
        .output()
        .expect("nsenter");
    assert!(out.status.success(), "snmp6 of {netns}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(char::is_whitespace)?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

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

/// An IPv6 Service without endpoints.
const EMPTY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x20);

/// The number of entries of node 1's socket map `name` (`LB4_SOCK_REV` or `LB6_SOCK_REV`).
fn sock_rev_entries(cl: &Cluster, name: &str) -> usize {
    let pin = lb_agent::datapath::layout_dir(&cl.nodes[0].pin_dir).join(name);
    let data = aya::maps::MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{name} pinned: {e}"));
    let map = aya::maps::Map::from_map_data(data).expect("a map");
    if name == lb_common::MAP_LB6_SOCK_REV {
        let m: aya::maps::HashMap<_, lb_common::Lb6SockRevKey, lb_common::Lb6SockRev> =
            map.try_into().expect("a hash map");
        m.keys().count()
    } else {
        let m: aya::maps::HashMap<_, lb_common::Lb4SockRevKey, lb_common::Lb4SockRev> =
            map.try_into().expect("a hash map");
        m.keys().count()
    }
}

/// Rule: with `--socket-lb`, processes on the node reach an IPv6 cluster IP through their
/// sockets, as over IPv4: TCP (`connect6`) and unconnected UDP (`sendmsg6`) spread over every
/// endpoint, `getpeername` and the replies' source (`recvmsg6`) read as the Service address, a
/// connected UDP socket keeps its backend, closed connected sockets take their `LB6_SOCK_REV`
/// entries along (`sock_release`), no packet is left for the packet path, and a Service without
/// endpoints is refused at once. An IPv6 socket asking for an IPv4-mapped Service address
/// (`::ffff:10.96.0.10`) is translated through the IPv4 path (TCP at `connect6`; unconnected UDP
/// at `sendmsg4`, where the kernel sends it) and reads the mapped Service address back.
/// `lbctl monitor` shows the IPv6 socket events. A backend that leaves: the connected UDP sockets
/// sent to it, IPv6 and IPv4-mapped, are aborted, the others left alone. Node 1's agent runs with
/// `--socket-lb all` on a cgroup of its own, where only the client runs (`host` means node 1's
/// namespace only where the kernel has `SO_NETNS_COOKIE`, 5.14: the kernel matrix runs this on
/// 5.10 too; the scope is one check for both families, tested in `e2e_sockets`).
#[test]
fn host_sockets_reach_ipv6_and_ipv4_mapped_service_addresses() {
    use lb_testkit::sockets::{Cgroup2, SockClient};
    let cgroup = Cgroup2::new("s6").expect("a cgroup v2 hierarchy");
    let root = cgroup.path().display().to_string();
    let empty = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: empty6, namespace: demo}}\nspec:\n  \
         clusterIP: '{EMPTY6}'\n  clusterIPs: ['{EMPTY6}']\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n  \
         ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  \
         - {{name: udp, port: 53, targetPort: 5353, protocol: UDP}}\n"
    );
    let mut cl =
        Cluster::dual_stack("s6", Mode::Tc, |b| format!("{}{empty}", dual_stack_who(b)), &["--ipv6", "on"]);
    let node = cl.nodes[0].clone();
    let mut host = SockClient::start(&node.netns, cgroup.path()).expect("a client on node 1");
    // Before the socket programs are attached: a UDP socket connected to the IPv4-mapped Service
    // address (a route to it for the connect, towards node 2, which forwards nowhere), untranslated.
    let via = cl.nodes[1].underlay_ip().to_string();
    let route = std::process::Command::new("ip")
        .args(["-n", &node.netns, "route", "add", &format!("{VIP}/32"), "via", &via])
        .status()
        .expect("ip route");
    assert!(route.success(), "a route to {VIP} in {}", node.netns);
    let early = host.call(&format!("udp-open early {} 53", VIP.to_ipv6_mapped())).expect("udp-open");
    assert!(early.get("error").is_none(), "{early}");
    cl.lab.stop_agent(&node, libc::SIGTERM);
    cl.lab
        .restart_agent_adding(&node, &["--socket-lb", "all", "--cgroup-root", &root])
        .expect("agent with socket-level load balancing");
    cl.wait_ready(&node);
    let counters = || cl.maps(1).read_counters().expect("counters");
    let all: std::collections::BTreeSet<String> = cl.backends.iter().map(|b| b.name.clone()).collect();
    let (tcp, udp) = (SocketAddrV6::new(VIP6, 80, 0, 0), SocketAddrV6::new(VIP6, 53, 0, 0));
    let ok = wait_until(std::time::Duration::from_secs(90), || host.tcp(tcp));
    assert!(ok.is_ok(), "{tcp} never answered: {ok:?}\n{}", cl.lab.agent_log(&node));

    let before = counters();
    let rev6 = sock_rev_entries(&cl, lb_common::MAP_LB6_SOCK_REV);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let a = host.tcp(tcp).expect("TCP to the IPv6 cluster IP");
        assert_eq!(a.peer, tcp.to_string(), "getpeername gives the Service address");
        seen.insert(a.name);
    }
    assert_eq!(seen, all, "TCP over IPv6 reaches every endpoint");
    assert_eq!(sock_rev_entries(&cl, lb_common::MAP_LB6_SOCK_REV), rev6, "closed sockets leave no entry");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let a = host.udp(udp).expect("UDP sendto/recvfrom to the IPv6 cluster IP");
        assert_eq!(a.peer, udp.to_string(), "the reply's source is the Service address");
        seen.insert(a.name);
    }
    assert_eq!(seen, all, "unconnected UDP over IPv6 reaches every endpoint");
    let open = host.call(&format!("udp-open u1 {VIP6} 53")).expect("udp-open");
    assert_eq!(open["peer"], udp.to_string(), "{open}");
    let first = host.call("udp-ask u1").expect("udp-ask");
    assert!(first.get("error").is_none(), "{first}");
    for _ in 0..5 {
        assert_eq!(host.call("udp-ask u1").expect("udp-ask")["name"], first["name"]);
    }
    host.call("close u1").expect("close");
    let after = counters();
    let moved = |i: u32| after[i as usize] - before[i as usize];
    assert!(moved(c::SOCK_CONNECT) >= 41, "connect6 translated: {}", moved(c::SOCK_CONNECT));
    assert!(moved(c::SOCK_SENDMSG) >= 40, "sendmsg6 translated: {}", moved(c::SOCK_SENDMSG));
    assert!(moved(c::SOCK_RECVMSG) >= 40, "recvmsg6: {}", moved(c::SOCK_RECVMSG));
    assert!(moved(c::SOCK_GETPEERNAME) >= 41, "getpeername6: {}", moved(c::SOCK_GETPEERNAME));
    assert_eq!(moved(c::SOCK_RELEASED), 41, "closed connected sockets' entries removed");
    assert_eq!(moved(c::FWD_NEW_FLOW), 0, "no packet-level new flow");

    // IPv4-mapped: an IPv6 socket to ::ffff:10.96.0.10, through the IPv4 path.
    let mapped = |port| SocketAddrV6::new(VIP.to_ipv6_mapped(), port, 0, 0);
    let before = counters();
    let rev4 = sock_rev_entries(&cl, lb_common::MAP_LB4_SOCK_REV);
    // The socket connected before the programs came: the kernel hands each of its datagrams to
    // `sendmsg4` with its peer as the destination, and it is left as it was connected (its
    // replies are matched against that peer): not translated, no entry (it reaches nobody here).
    let e = host.call("udp-ask early").expect("udp-ask");
    assert!(e.get("error").is_some(), "{e}");
    let moved = counters()[c::SOCK_SENDMSG as usize] - before[c::SOCK_SENDMSG as usize];
    assert_eq!(moved, 0, "a connected socket's datagram translated at sendmsg4");
    assert_eq!(sock_rev_entries(&cl, lb_common::MAP_LB4_SOCK_REV), rev4);
    host.call("close early").expect("close");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let a = host.tcp(mapped(80)).expect("TCP to the IPv4-mapped cluster IP");
        assert_eq!(a.peer, mapped(80).to_string(), "getpeername gives the mapped Service address");
        seen.insert(a.name);
    }
    assert_eq!(seen, all, "IPv4-mapped TCP reaches every endpoint");
    assert_eq!(
        sock_rev_entries(&cl, lb_common::MAP_LB4_SOCK_REV),
        rev4,
        "closed mapped sockets leave no entry"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let a = host.udp(mapped(53)).expect("UDP to the IPv4-mapped cluster IP");
        assert_eq!(a.peer, mapped(53).to_string(), "the reply's source is the mapped Service address");
        seen.insert(a.name);
    }
    assert_eq!(seen, all, "IPv4-mapped unconnected UDP reaches every endpoint");
    let open = host.call(&format!("udp-open m1 {} 53", VIP.to_ipv6_mapped())).expect("udp-open");
    assert_eq!(open["peer"], mapped(53).to_string(), "{open}");
    let first = host.call("udp-ask m1").expect("udp-ask");
    assert!(first.get("error").is_none(), "{first}");
    assert_eq!(host.call("udp-ask m1").expect("udp-ask")["name"], first["name"]);
    host.call("close m1").expect("close");
    let after = counters();
    let moved = |i: u32| after[i as usize] - before[i as usize];
    assert!(moved(c::SOCK_CONNECT) >= 41, "mapped connects translated: {}", moved(c::SOCK_CONNECT));
    assert!(moved(c::SOCK_SENDMSG) >= 40, "mapped sendmsg translated: {}", moved(c::SOCK_SENDMSG));
    assert!(moved(c::SOCK_RECVMSG) >= 40, "mapped replies read back: {}", moved(c::SOCK_RECVMSG));
    assert_eq!(moved(c::SOCK_RELEASED), 41, "closed mapped sockets' entries removed");
    assert_eq!(moved(c::FWD_NEW_FLOW), 0, "no packet-level new flow");

    // No endpoints: refused at once (ECONNREFUSED from 5.18's bpf_set_retval, else EPERM).
    let want = if support::kernel_release() >= (5, 18) { "ECONNREFUSED" } else { "EPERM" };
    let refused = host.tcp(SocketAddrV6::new(EMPTY6, 80, 0, 0)).expect_err("no endpoints");
    assert_eq!(refused.to_string(), want, "connect to an IPv6 Service without endpoints");
    let refused = host.udp(SocketAddrV6::new(EMPTY6, 53, 0, 0)).expect_err("no endpoints");
    assert_eq!(refused.to_string(), want, "sendto to an IPv6 Service without endpoints");

    // lbctl monitor shows them, with the process.
    let mut monitor = std::process::Command::new(support::lbctl_path())
        .arg("--pin-dir")
        .arg(&node.pin_dir)
        .args(["-o", "json", "monitor", "--timeout", "5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lbctl monitor");
    let mut stderr = std::io::BufReader::new(monitor.stderr.take().expect("stderr"));
    let mut said = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut said).expect("monitor's stderr");
    assert!(said.starts_with("listening"), "lbctl monitor: {said}");
    host.tcp(tcp).expect("TCP to the IPv6 cluster IP");
    host.udp(udp).expect("UDP to the IPv6 cluster IP");
    host.tcp(SocketAddrV6::new(EMPTY6, 80, 0, 0)).expect_err("no endpoints");
    let out = monitor.wait_with_output().expect("monitor output");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("socket-")))
        .collect();
    let want = [
        ("socket-connect", tcp.to_string(), "demo/who:tcp", true),
        ("socket-sendmsg", udp.to_string(), "demo/who:udp", true),
        ("socket-refused", SocketAddrV6::new(EMPTY6, 80, 0, 0).to_string(), "demo/empty6:tcp", false),
    ];
    assert_eq!(events.len(), want.len(), "{events:?}");
    for (e, (kind, vip, service, backend)) in events.iter().zip(want) {
        assert_eq!(
            (e["kind"].as_str(), e["vip"].as_str(), e["service"].as_str()),
            (Some(kind), Some(vip.as_str()), Some(service)),
            "{e}"
        );
        let b = e["backend"].as_str().unwrap_or("");
        let ours = cl.backends.iter().any(|p| b.starts_with(&format!("[{}]:", p.ip6.expect("IPv6"))));
        assert_eq!(ours, backend, "{e}");
        assert_eq!(e["pid"].as_u64(), Some(u64::from(host.pid())), "{e}");
    }

    // A backend leaves the Service: the connected UDP sockets sent to it, IPv6 and IPv4-mapped,
    // are aborted (ECONNABORTED); the others are left alone.
    let mut connected: Vec<(String, String)> = Vec::new();
    for i in 0..20 {
        for (tag, to) in [("s", VIP6.to_string()), ("m", VIP.to_ipv6_mapped().to_string())] {
            let id = format!("{tag}{i}");
            let open = host.call(&format!("udp-open {id} {to} 53")).expect("udp-open");
            assert!(open.get("error").is_none(), "{open}");
            let a = host.call(&format!("udp-ask {id}")).expect("udp-ask");
            connected.push((id, a["name"].as_str().unwrap_or_else(|| panic!("{a}")).to_string()));
        }
    }
    // A backend with sockets of both kinds (each kind misses a given backend with probability
    // (2/3)^20).
    let on = |tag: &str, b: &str| {
        connected.iter().find(|(id, n)| id.starts_with(tag) && n == b).map(|(id, _)| id.clone())
    };
    let gone = cl
        .backends
        .iter()
        .map(|b| b.name.clone())
        .find(|b| on("s", b).is_some() && on("m", b).is_some())
        .unwrap_or_else(|| panic!("no backend with sockets of both kinds: {connected:?}"));
    let (s_gone, m_gone) = (on("s", &gone), on("m", &gone));
    let rest: Vec<Pod> = cl.backends.iter().filter(|b| b.name != gone).cloned().collect();
    cl.write(&format!("{}{empty}", dual_stack_who(&rest)));
    for id in [s_gone.expect("IPv6"), m_gone.expect("mapped")] {
        let aborted = wait_until(std::time::Duration::from_secs(30), || {
            let e = host.call(&format!("udp-error {id}"))?;
            match e["pending"].as_str() {
                Some("ECONNABORTED") => Ok(()),
                _ => Err(std::io::Error::other(format!("{e}"))),
            }
        });
        assert!(aborted.is_ok(), "{id} on {gone}: {aborted:?}\n{}", cl.lab.agent_log(&node));
    }
    for (id, name) in &connected {
        let e = host.call(&format!("udp-error {id}")).expect("udp-error");
        if *name == gone {
            assert!(e["pending"] == "ECONNABORTED" || e["pending"] == "", "{id} ({name}) aborted once: {e}");
            let after = host.call(&format!("udp-ask {id}")).expect("udp-ask");
            assert!(after.get("error").is_some(), "{id}, aborted, reaches nobody: {after}");
        } else {
            assert_eq!(e["pending"], "", "{id} on {name}, which stays, is left alone");
            assert_eq!(host.call(&format!("udp-ask {id}")).expect("udp-ask")["name"], name.as_str(), "{id}");
        }
    }
}

/// Rule: an IPv6 LoadBalancer address of a dual-stack Service is answered for the cluster's pods
/// (TCP and UDP, spread over the IPv6 endpoints) and for processes on the node at the socket, as
/// its IPv4 one is; its IPv6 `loadBalancerSourceRanges` let only their clients in (client 2,
/// listed, reaches it; client 1, not listed, is dropped, counted), while the IPv4 address, whose
/// ranges are IPv4 ones, and the cluster IPs take both.
#[test]
fn pods_reach_an_ipv6_load_balancer_address_within_its_source_ranges() {
    use lb_testkit::sockets::{Cgroup2, SockClient};
    let lb6 = Ipv6Addr::new(0x2001, 0xdb8, 0x40, 0, 0, 0, 0, 1);
    let lb4 = std::net::Ipv4Addr::new(203, 0, 113, 40);
    let cgroup = Cgroup2::new("lb6").expect("a cgroup v2 hierarchy");
    let root = cgroup.path().display().to_string();
    let with_status = |b: &[Pod; 3], ranges: &str| {
        let who = dual_stack_who(b);
        let (svc, slices) = who.split_once("---\n").expect("the Service, then its slices");
        let svc = svc.replacen(
            "spec:\n",
            &format!("spec:\n  type: LoadBalancer\n  loadBalancerSourceRanges: [{ranges}]\n"),
            1,
        );
        format!("{svc}status:\n  loadBalancer:\n    ingress:\n    - {{ip: '{lb6}'}}\n    - {{ip: {lb4}}}\n---\n{slices}")
    };
    let mut cl = Cluster::dual_stack("lb6", Mode::Tc, |_| String::new(), &["--ipv6", "on"]);
    let c2 = cl.client2.ip6.expect("client 2's IPv6 address");
    let ranges = format!("'{c2}/128', 192.0.2.0/24, 172.31.0.0/16, 10.244.0.0/16");
    cl.write(&with_status(&cl.backends, &ranges));
    let tcp = SocketAddr::V6(SocketAddrV6::new(lb6, 80, 0, 0));
    let udp = SocketAddr::V6(SocketAddrV6::new(lb6, 53, 0, 0));
    let ok =
        wait_until(std::time::Duration::from_secs(90), || tcp_asks(&cl.client2, tcp, 1)?.pop().expect("one"));
    assert!(ok.is_ok(), "{tcp} unreachable from client 2: {ok:?}\n{}", cl.lab.agent_log(&cl.nodes[1]));
    let t = tally(tcp_asks(&cl.client2, tcp, 150).expect("tcp"), "TCP to the IPv6 LoadBalancer IP");
    assert_eq!(t.len(), 3, "every IPv6 endpoint: {t:?}");
    let t = tally(udp_asks(&cl.client2, udp, 21_000, 150).expect("udp"), "UDP to the IPv6 LoadBalancer IP");
    assert_eq!(t.len(), 3, "every IPv6 endpoint over UDP: {t:?}");
    // Client 1 is in no IPv6 range: dropped, counted on its node.
    let before = cl.maps(1).read_counters().expect("counters")[c::DROP_SRC_RANGE as usize];
    let denied = tcp_asks(&cl.client1, tcp, 1).expect("tcp");
    assert!(denied[0].is_err(), "client 1 reached {tcp}: {denied:?}");
    let after = cl.maps(1).read_counters().expect("counters")[c::DROP_SRC_RANGE as usize];
    assert!(after > before, "drop_src_range counted on node 1 ({before} → {after})");
    // The IPv4 address (IPv4 ranges hold the pods' 10.244.0.0/16) and the IPv6 cluster IP take it.
    let t =
        tally(tcp_asks(&cl.client1, SocketAddrV4::new(lb4, 80), 30).expect("tcp"), "TCP to the IPv4 LB IP");
    assert!(!t.is_empty(), "{t:?}");
    let t = tally(tcp_asks(&cl.client1, SocketAddrV6::new(VIP6, 80, 0, 0), 30).expect("tcp"), "TCP to VIP6");
    assert!(!t.is_empty(), "{t:?}");
    // Ranges that admit every IPv6 client (::/0): client 1 gets in.
    cl.write(&with_status(&cl.backends, "'::/0', 10.244.0.0/16"));
    let ok =
        wait_until(std::time::Duration::from_secs(30), || tcp_asks(&cl.client1, tcp, 1)?.pop().expect("one"));
    assert!(ok.is_ok(), "client 1 with ::/0: {ok:?}");

    // A process on node 1 reaches the IPv6 LoadBalancer address at its socket (the source is not
    // known at connect, so only ranges admitting everyone let it be translated there).
    let node = cl.nodes[0].clone();
    cl.lab.stop_agent(&node, libc::SIGTERM);
    cl.lab
        .restart_agent_adding(&node, &["--socket-lb", "all", "--cgroup-root", &root])
        .expect("agent with socket-level load balancing");
    cl.wait_ready(&node);
    let mut host = SockClient::start(&node.netns, cgroup.path()).expect("a client on node 1");
    let ok = wait_until(std::time::Duration::from_secs(60), || host.tcp(tcp));
    let a = ok.unwrap_or_else(|e| panic!("{tcp} from node 1's process: {e}\n{}", cl.lab.agent_log(&node)));
    assert_eq!(a.peer, tcp.to_string(), "getpeername gives the LoadBalancer address");
}
