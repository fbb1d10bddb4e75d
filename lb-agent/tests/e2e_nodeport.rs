//! Traffic from outside the cluster, end to end: a client on the underlay (outside the cluster)
//! reaches NodePorts on both nodes and LoadBalancer IPs routed through one node or the other, over
//! real TCP and UDP, with both externalTrafficPolicy values. The agents find their NodePort
//! addresses from their Node objects (`--nodeport-addresses primary`) and attach the node-side
//! programs to the underlay (`--node-interfaces ul0`).

mod support;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::Duration,
};

use lb_agent::datapath::Mode;
use lb_common::counters as c;
use lb_testkit::lab::{
    node_manifest, tcp_asks, tcp_asks_from, tcp_peer_from, udp_asks_from, udp_peer_from, wait_until, Outside,
    Pod,
};
use support::{assert_clean, Cluster, Traffic, VIP};

const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const NODE_ARGS: &[&str] = &["--node-interfaces", "ul0"];
/// Service `who`'s health-check node port (a LoadBalancer with externalTrafficPolicy Local).
const HEALTH_PORT: u16 = 32100;

/// Service `who` of `type` with `policy` as its externalTrafficPolicy (TCP 80 → 8080 on NodePort
/// 30080, UDP 53 → 5353 on NodePort 30053, LoadBalancer IP `LB_IP` and health-check node port
/// `HEALTH_PORT` when a LoadBalancer) and `endpoints` ready, plus both Node objects.
fn service(c_nodes: &[lb_testkit::lab::Node; 2], kind: &str, policy: &str, endpoints: &[&Pod]) -> String {
    let eps: Vec<String> =
        endpoints.iter().map(|p| format!("- addresses: [{}]\n  nodeName: node{}", p.ip, p.node)).collect();
    let status = if kind == "LoadBalancer" {
        format!("status:\n  loadBalancer:\n    ingress:\n    - {{ip: {LB_IP}}}\n")
    } else {
        String::new()
    };
    // The API server allocates one to a LoadBalancer Service with externalTrafficPolicy Local.
    let health_check = if kind == "LoadBalancer" && policy == "Local" {
        format!("  healthCheckNodePort: {HEALTH_PORT}\n")
    } else {
        String::new()
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: who, namespace: demo}}
spec:
  type: {kind}
  clusterIP: {VIP}
  externalTrafficPolicy: {policy}
{health_check}  ports:
  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}}
  - {{name: udp, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}}
{status}---
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
{}
---
{}---
{}"#,
        eps.join("\n"),
        node_manifest(&c_nodes[0]),
        node_manifest(&c_nodes[1]),
    )
}

/// A cluster whose agents serve traffic from outside, with `yaml` written once the nodes exist.
fn cluster(tag: &str, yaml: impl Fn(&Cluster) -> String) -> (Cluster, Outside) {
    cluster_with(tag, NODE_ARGS, yaml)
}

/// The same, with the agents' node-side flags `args`.
fn cluster_with(tag: &str, args: &[&str], yaml: impl Fn(&Cluster) -> String) -> (Cluster, Outside) {
    let mut c = Cluster::new(tag, Mode::Tc, true, |_| String::new(), args);
    let out = c.lab.outside().expect("the client outside");
    c.write(&yaml(&c));
    (c, out)
}

/// Waits until both agents are ready (their programs attached, their interface records written:
/// until then a flow to a remote endpoint finds no address to be SNATed to) and `to` answers a TCP
/// question from `netns`.
fn wait_answer(c: &Cluster, netns: &str, to: impl Into<SocketAddr>) {
    let to = to.into();
    // Generous: in the kernel matrix's emulated machines, verifying the node-side programs alone
    // takes minutes on Linux 5.10 (over 3 each, the XDP node program with them).
    let limit = Duration::from_secs(900);
    for node in &c.nodes {
        let healthz = "127.0.0.1:10256".parse().expect("addr");
        let ready = wait_until(limit, || match lb_testkit::lab::http_get(&node.netns, healthz, "/readyz")? {
            (200, _) => Ok(()),
            other => Err(std::io::Error::other(format!("{other:?}"))),
        });
        assert!(ready.is_ok(), "{} never ready: {ready:?}\n{}", node.netns, c.lab.agent_log(node));
    }
    let ready = wait_until(limit, || tcp_asks_from(netns, to, 1)?.pop().expect("one answer"));
    assert!(
        ready.is_ok(),
        "{to} never answered from {netns}: {ready:?}\nagent logs:\n{}\n{}",
        c.lab.agent_log(&c.nodes[0]),
        c.lab.agent_log(&c.nodes[1])
    );
}

fn names(v: Vec<std::io::Result<String>>) -> BTreeSet<String> {
    answers(v).into_iter().collect()
}

/// The backends that answered, in order; panics at the first exchange that failed.
fn answers(v: Vec<std::io::Result<String>>) -> Vec<String> {
    v.into_iter().enumerate().map(|(i, a)| a.unwrap_or_else(|e| panic!("request #{i} failed: {e}"))).collect()
}

/// Through `node`'s NodePorts (TCP 30080, UDP 30053) from the client outside: every endpoint
/// answers over TCP and UDP (UDP from client ports `udp_ports` on), and each sees the client (a
/// local endpoint) or the node (a remote one, SNATed), over `peers` TCP and UDP exchanges.
/// Returns how many of the TCP and of the UDP exchanges went to a remote endpoint.
fn every_endpoint_through(
    c: &Cluster,
    out: &Outside,
    node: &lb_testkit::lab::Node,
    udp_ports: u16,
    peers: u16,
) -> Remote {
    let all: BTreeSet<String> = c.backends.iter().map(|b| b.name.clone()).collect();
    let remote_of =
        |name: &str| c.backends.iter().find(|b| b.name == name).expect("a backend").node != node.index;
    let (tcp, udp) =
        (SocketAddrV4::new(node.underlay_ip(), 30080), SocketAddrV4::new(node.underlay_ip(), 30053));
    // Every endpoint answered `what`'s exchanges; how many of them went to a remote one.
    let every_endpoint = |answered: Vec<String>, what: &str| {
        let remote = answered.iter().filter(|n| remote_of(n)).count();
        assert_eq!(
            answered.into_iter().collect::<BTreeSet<_>>(),
            all,
            "{what} through {}: every endpoint",
            node.netns
        );
        remote
    };
    let mut remote = Remote {
        tcp: every_endpoint(answers(tcp_asks_from(&out.netns, tcp, 60).expect("TCP from outside")), "TCP"),
        udp: every_endpoint(answers(udp_asks_from(&out.netns, udp, udp_ports, 60).expect("UDP")), "UDP"),
    };
    let mut seen = BTreeSet::new();
    for i in 0..peers {
        let (name, peer) = tcp_peer_from(&out.netns, tcp).expect("TCP peer");
        let (uname, upeer) = udp_peer_from(&out.netns, udp, udp_ports + 1_000 + i).expect("UDP peer");
        remote.tcp += usize::from(remote_of(&name));
        remote.udp += usize::from(remote_of(&uname));
        for (name, peer) in [(name, peer), (uname, upeer)] {
            let local = !remote_of(&name);
            let want = if local { out.ip } else { node.underlay_ip() };
            assert_eq!(*peer.ip(), want, "{name} through {}: the address it sees", node.netns);
            seen.insert(local);
        }
    }
    assert_eq!(seen.len(), 2, "through {}: both local and remote endpoints answered", node.netns);
    remote
}

/// How many exchanges of [`every_endpoint_through`] went to a remote endpoint (SNATed).
struct Remote {
    tcp: usize,
    udp: usize,
}

#[test]
fn nodeport_cluster_policy_reaches_every_endpoint_through_either_node() {
    let (c, out) = cluster("npc", |c| service(&c.nodes, "NodePort", "Cluster", &c.backends.each_ref()));
    let all: BTreeSet<String> = c.backends.iter().map(|b| b.name.clone()).collect();
    for node in &c.nodes {
        wait_answer(&c, &out.netns, SocketAddrV4::new(node.underlay_ip(), 30080));
        every_endpoint_through(&c, &out, node, 20_000 + 2_000 * u16::from(node.index), 60);
    }
    // This node's pods reach the NodePort of their own node and of the other one.
    for node in &c.nodes {
        let got = names(tcp_asks(&c.client1, SocketAddrV4::new(node.underlay_ip(), 30080), 60).expect("pod"));
        assert_eq!(got, all, "a pod through {}'s NodePort", node.netns);
    }
}

#[test]
fn xdp_on_the_node_interface_serves_nodeports_through_either_node() {
    // The XDP node program in front of TC (generic XDP: ul0 is a veth): it sends the SNATed flows
    // to remote endpoints and their replies itself, and passes local endpoints' flows DNATed.
    let args = ["--node-interfaces", "ul0", "--node-datapath", "xdp"];
    let (c, out) =
        cluster_with("npx", &args, |c| service(&c.nodes, "NodePort", "Cluster", &c.backends.each_ref()));
    // Checksums complete on the wire, as from a NIC: a packet that crossed veths from a sender
    // with checksum offload on keeps a partial checksum, which XDP leaves to TC (checked packet by
    // packet in nodeport_packets).
    for (netns, interface) in [(&out.netns, "eth0"), (&c.nodes[0].netns, "ul0"), (&c.nodes[1].netns, "ul0")] {
        let done = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["ethtool", "-K", interface, "tx", "off"])
            .status()
            .expect("ethtool (cargo xtask setup installs it)");
        assert!(done.success(), "ethtool -K {interface} tx off in {netns}");
    }
    for node in &c.nodes {
        wait_answer(&c, &out.netns, SocketAddrV4::new(node.underlay_ip(), 30080));
        let counters = || c.maps(usize::from(node.index)).read_counters().expect("counters");
        let before = counters();
        let remote = every_endpoint_through(&c, &out, node, 30_000 + 2_000 * u16::from(node.index), 30);
        // XDP itself sent the packets of the SNATed flows (to remote endpoints) both ways, all but
        // the first of a flow while a next hop was not yet known (left to TC). Counted: those
        // sent before the client had its answer, 5 a TCP exchange (SYN, SYN-ACK, ACK, question,
        // answer; its FINs may still be under way as the counter is read) and 2 a UDP one, less
        // 8 for those first packets. The exchanges that went to a remote endpoint are counted,
        // since the hash of each flow decides them (here each remote exchange was 10 and 2
        // packets: through node 1, 26 to 36 TCP and 35 UDP exchanges gave 330 to 430).
        let after = counters();
        let sent = after[c::XDP_SENT as usize] - before[c::XDP_SENT as usize];
        let want = (5 * remote.tcp + 2 * remote.udp).saturating_sub(8) as u64;
        let moved: Vec<String> = (0..after.len())
            .filter(|&i| after[i] != before[i])
            .map(|i| format!("{} +{}", c::NAMES[i], after[i] - before[i]))
            .collect();
        assert!(
            remote.tcp > 0 && sent >= want,
            "{}: XDP sent the SNATed flows' packets itself: {sent}, at least {want} for {} TCP and {} UDP \
             exchanges with a remote endpoint; every counter that moved: {moved:?}",
            node.netns,
            remote.tcp,
            remote.udp,
        );
    }
}

#[test]
fn local_policy_answers_only_where_an_endpoint_is_and_keeps_the_client_address() {
    // One endpoint, on node 1 (b1): only node 1 answers from outside.
    let (c, out) = cluster("npl", |c| service(&c.nodes, "LoadBalancer", "Local", &[&c.backends[0]]));
    let b1 = &c.backends[0];
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let np1 = SocketAddrV4::new(n1.underlay_ip(), 30080);
    wait_answer(&c, &out.netns, np1);
    let (name, peer) = tcp_peer_from(&out.netns, np1).expect("NodePort on node 1");
    assert_eq!((name.as_str(), *peer.ip()), (b1.name.as_str(), out.ip), "the endpoint sees the client");
    let (name, peer) =
        udp_peer_from(&out.netns, SocketAddrV4::new(n1.underlay_ip(), 30053), 22_000).expect("UDP");
    assert_eq!((name.as_str(), *peer.ip()), (b1.name.as_str(), out.ip));
    // Node 2 has no endpoint: dropped there, and counted. (Its pods reaching its NodePort show
    // that its agent has programmed the Service.)
    let np2 = SocketAddrV4::new(n2.underlay_ip(), 30080);
    wait_answer(&c, &c.client2.netns, np2);
    let before = c.maps(2).read_counters().expect("counters")[c::DROP_NO_LOCAL_BACKEND as usize];
    assert!(tcp_peer_from(&out.netns, np2).is_err(), "node 2 has no local endpoint: no answer");
    let after = c.maps(2).read_counters().expect("counters")[c::DROP_NO_LOCAL_BACKEND as usize];
    assert!(after > before, "node 2 counted the drop ({before} → {after})");
    // The LoadBalancer IP, routed through node 1: answered with the client's address; through
    // node 2: dropped.
    let lb = SocketAddrV4::new(LB_IP, 80);
    c.lab.route_via(&out, LB_IP, n1).expect("route via node 1");
    wait_answer(&c, &out.netns, lb);
    let (name, peer) = tcp_peer_from(&out.netns, lb).expect("LB IP via node 1");
    assert_eq!((name.as_str(), *peer.ip()), (b1.name.as_str(), out.ip));
    c.lab.route_via(&out, LB_IP, n2).expect("route via node 2");
    assert!(tcp_peer_from(&out.netns, lb).is_err(), "LB IP via node 2: no local endpoint, no answer");
    // A pod on node 2, which has no endpoint, still reaches the Service through node 2's NodePort
    // and the LoadBalancer IP (every endpoint, for the cluster's own clients).
    for to in [np2, lb] {
        let got = names(tcp_asks(&c.client2, to, 5).expect("pod on node 2"));
        assert_eq!(got, BTreeSet::from([b1.name.clone()]), "pod on node 2 → {to}");
    }
}

#[test]
fn a_pod_reaches_itself_through_a_nodeport_of_either_node() {
    // b1 is the only endpoint: through its own node's NodePort the flow is hairpinned; through
    // the other node's it comes back SNATed to that node.
    let (c, _out) = cluster("nph", |c| service(&c.nodes, "NodePort", "Cluster", &[&c.backends[0]]));
    let b1 = &c.backends[0];
    for node in &c.nodes {
        let to = SocketAddrV4::new(node.underlay_ip(), 30080);
        wait_answer(&c, &b1.netns, to);
        let got = names(tcp_asks(b1, to, 10).expect("hairpin"));
        assert_eq!(got, BTreeSet::from([b1.name.clone()]), "b1 → {to}");
    }
}

#[test]
fn agents_restart_under_traffic_from_outside_and_lose_no_connection() {
    // Traffic from outside to node 1's NodePort, whose endpoints are on both nodes (SNATed and
    // not), while node 1's agent stops (SIGTERM) and starts again, then node 2's.
    let (mut c, out) = cluster("nprs", |c| service(&c.nodes, "NodePort", "Cluster", &c.backends.each_ref()));
    let n1 = c.nodes[0].clone();
    let (tcp, udp) = ((n1.underlay_ip(), 30080), (n1.underlay_ip(), 30053));
    wait_answer(&c, &out.netns, SocketAddrV4::new(tcp.0, tcp.1));
    c.wait_ready(&c.nodes[1]);
    let traffic = Traffic::start_from(&out.netns, tcp, udp);
    std::thread::sleep(Duration::from_millis(300));
    for node in c.nodes.clone() {
        c.lab.stop_agent(&node, libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
        c.lab.restart_agent(&node).expect("restart");
        c.wait_ready(&node);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_clean(&traffic.stop(), "restarts under traffic from outside");
}

#[test]
fn flows_snated_before_a_restart_with_another_snat_range_go_on() {
    // The endpoints are on node 2 only: every flow from outside through node 1 is SNATed there.
    // Node 1's agent restarts with another SNAT range under traffic: the flows SNATed with the old
    // one go on (their replies still come back), and new ones get ports of the new range.
    let (mut c, out) = cluster("npsr", |c| {
        let remote: Vec<&Pod> = c.backends.iter().filter(|b| b.node == 2).collect();
        service(&c.nodes, "NodePort", "Cluster", &remote)
    });
    let n1 = c.nodes[0].clone();
    let (tcp, udp) = ((n1.underlay_ip(), 30080), (n1.underlay_ip(), 30053));
    wait_answer(&c, &out.netns, SocketAddrV4::new(tcp.0, tcp.1));
    let traffic = Traffic::start_from(&out.netns, tcp, udp);
    std::thread::sleep(Duration::from_millis(300));
    c.lab.stop_agent(&n1, libc::SIGTERM);
    c.lab.restart_agent_adding(&n1, &["--snat-ports", "40000-40999"]).expect("restart");
    c.wait_ready(&n1);
    std::thread::sleep(Duration::from_millis(500));
    let o = traffic.stop();
    support::assert_clean_udp_kept(&o, "a restart with another SNAT range");
    let (_, peer) = tcp_peer_from(&out.netns, SocketAddrV4::new(tcp.0, tcp.1)).expect("a new flow");
    assert_eq!(*peer.ip(), n1.underlay_ip(), "SNATed to node 1");
    assert!((40_000..=40_999).contains(&peer.port()), "a port of the new range: {peer}");
}

/// `service` with `loadBalancerSourceRanges: ranges`.
fn with_ranges(yaml: String, ranges: &[String]) -> String {
    yaml.replacen(
        "  externalTrafficPolicy:",
        &format!("  loadBalancerSourceRanges: [{}]\n  externalTrafficPolicy:", ranges.join(", ")),
        1,
    )
}

#[test]
fn source_ranges_let_only_their_clients_reach_a_load_balancer_ip() {
    // The client outside is not in the ranges at first; the NodePort of the same Service takes
    // it all the same.
    let others = vec!["198.51.100.0/24".to_string()];
    let (c, out) = cluster("npsr", |c| {
        with_ranges(service(&c.nodes, "LoadBalancer", "Cluster", &c.backends.each_ref()), &others)
    });
    let n1 = &c.nodes[0];
    let lb = SocketAddrV4::new(LB_IP, 80);
    c.lab.route_via(&out, LB_IP, n1).expect("route via node 1");
    wait_answer(&c, &out.netns, SocketAddrV4::new(n1.underlay_ip(), 30080));
    let dropped = |node: usize| c.maps(node).read_counters().expect("counters")[c::DROP_SRC_RANGE as usize];
    let before = dropped(1);
    assert!(tcp_peer_from(&out.netns, lb).is_err(), "a client outside the ranges: no answer");
    assert!(udp_peer_from(&out.netns, SocketAddrV4::new(LB_IP, 53), 23_000).is_err(), "nor over UDP");
    // So is this node's pod (kube-proxy filters the cluster's own clients too).
    assert!(
        tcp_asks(&c.client1, lb, 1).expect("asked").pop().expect("one").is_err(),
        "a pod outside the ranges"
    );
    let after = dropped(1);
    assert!(after >= before + 3, "node 1 counted the drops ({before} → {after})");
    // lbctl shows the ranges of the LoadBalancer address's frontends, and none on the NodePort's.
    let v = lbctl_services(n1);
    for s in &v {
        let want = match s["kind"].as_str() {
            Some("LoadBalancer") => serde_json::json!(["198.51.100.0/24"]),
            _ => serde_json::Value::Null,
        };
        assert_eq!(s["source_ranges"], want, "{s:#}");
    }
    assert!(v.iter().any(|s| s["kind"] == "LoadBalancer"), "{v:#?}");
    // Ranges holding the client outside and the pod: both are answered, by every endpoint.
    let theirs = vec![format!("{}/32", out.ip), format!("{}/32", c.client1.ip)];
    c.write(&with_ranges(service(&c.nodes, "LoadBalancer", "Cluster", &c.backends.each_ref()), &theirs));
    wait_answer(&c, &out.netns, lb);
    let all: BTreeSet<String> = c.backends.iter().map(|b| b.name.clone()).collect();
    assert_eq!(names(tcp_asks_from(&out.netns, lb, 60).expect("TCP")), all, "the client outside, in range");
    assert_eq!(names(udp_asks_from(&out.netns, SocketAddrV4::new(LB_IP, 53), 23_100, 60).expect("UDP")), all);
    assert_eq!(names(tcp_asks(&c.client1, lb, 30).expect("pod")), all, "the pod, in range");
    // The other pod (node 2) is still outside them.
    assert!(tcp_asks(&c.client2, lb, 1).expect("asked").pop().expect("one").is_err(), "node 2's pod");
}

/// `service` with `spec.externalIPs: ips`.
fn with_external_ips(yaml: String, ips: &[String]) -> String {
    yaml.replacen("  ports:\n", &format!("  externalIPs: [{}]\n  ports:\n", ips.join(", ")), 1)
}

#[test]
fn external_ips_are_served_like_kube_proxy_unless_told_otherwise() {
    // --external-ips=all (the default): any address, routed through either node, and from pods.
    let ext = Ipv4Addr::new(198, 51, 100, 50);
    let (c, out) = cluster("npxa", |c| {
        with_external_ips(
            service(&c.nodes, "NodePort", "Cluster", &c.backends.each_ref()),
            &[ext.to_string()],
        )
    });
    let all: BTreeSet<String> = c.backends.iter().map(|b| b.name.clone()).collect();
    let to = SocketAddrV4::new(ext, 80);
    for node in &c.nodes {
        c.lab.route_via(&out, ext, node).expect("route");
        wait_answer(&c, &out.netns, to);
        assert_eq!(names(tcp_asks_from(&out.netns, to, 60).expect("TCP")), all, "through {}", node.netns);
        let udp = SocketAddrV4::new(ext, 53);
        let got =
            names(udp_asks_from(&out.netns, udp, 24_000 + 100 * u16::from(node.index), 40).expect("UDP"));
        assert_eq!(got, all, "UDP through {}", node.netns);
    }
    assert_eq!(names(tcp_asks(&c.client2, to, 30).expect("pod")), all, "a pod");
    drop((c, out));

    // --external-ips=node-addresses: node 1's own address is served on the Service's port; any
    // other address is not translated (its traffic goes where it would without lb: here, nowhere).
    let mut c = Cluster::new(
        "npxn",
        Mode::Tc,
        true,
        |_| String::new(),
        &[NODE_ARGS[0], NODE_ARGS[1], "--external-ips", "node-addresses"],
    );
    let out = c.lab.outside().expect("the client outside");
    let n1 = c.nodes[0].clone();
    let own = SocketAddrV4::new(n1.underlay_ip(), 80);
    c.write(&with_external_ips(
        service(&c.nodes, "NodePort", "Cluster", &c.backends.each_ref()),
        &[n1.underlay_ip().to_string(), ext.to_string()],
    ));
    wait_answer(&c, &out.netns, own);
    assert_eq!(names(tcp_asks_from(&out.netns, own, 60).expect("TCP")), all, "node 1's address");
    c.lab.route_via(&out, ext, &n1).expect("route");
    wait_answer(&c, &out.netns, SocketAddrV4::new(n1.underlay_ip(), 30080));
    assert!(tcp_peer_from(&out.netns, to).is_err(), "another address: not served");
    assert!(tcp_asks(&c.client1, to, 1).expect("asked").pop().expect("one").is_err(), "nor for pods");
    let log = c.lab.agent_log(&n1);
    assert!(
        log.contains("spec.externalIPs[1]") && log.contains("--external-ips=node-addresses"),
        "the refusal is logged:\n{log}"
    );
}

/// Service `other`: a LoadBalancer with externalTrafficPolicy Local (cluster IP 10.96.0.11, TCP 80
/// → 8080 on NodePort 30081, health-check node port 32101), `endpoints` ready.
fn other_service(endpoints: &[&Pod]) -> String {
    let eps: Vec<String> =
        endpoints.iter().map(|p| format!("- addresses: [{}]\n  nodeName: node{}", p.ip, p.node)).collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: other, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.11
  externalTrafficPolicy: Local
  healthCheckNodePort: 32101
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30081}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-1
  namespace: demo
  labels: {{kubernetes.io/service-name: other}}
addressType: IPv4
ports:
- {{name: tcp, port: 8080, protocol: TCP}}
endpoints:
{}
---
"#,
        eps.join("\n")
    )
}

/// What `to` answers over HTTP from the client outside, once it answers `code` with
/// `localEndpoints` `count` (generous: the agents pick manifests up within a second, and retry a
/// port they could not listen on every 5 s).
fn health_answer(out: &Outside, to: impl Into<SocketAddr>, code: u16, count: u64) -> serde_json::Value {
    let to: SocketAddr = to.into();
    let mut last = None;
    let got = wait_until(Duration::from_secs(30), || {
        let a = lb_testkit::lab::http_answer(&out.netns, to, "/")?;
        let body: serde_json::Value = serde_json::from_str(&a.body).map_err(std::io::Error::other)?;
        let ok = a.status == code && body["localEndpoints"] == count;
        if ok {
            // kube-proxy's headers, the weight being the count.
            assert_eq!(a.header("content-type"), Some("application/json"), "{a:?}");
            assert_eq!(a.header("x-content-type-options"), Some("nosniff"), "{a:?}");
            assert_eq!(
                a.header("x-load-balancing-endpoint-weight"),
                Some(count.to_string().as_str()),
                "{a:?}"
            );
        }
        last = Some(a);
        if ok {
            Ok(body)
        } else {
            Err(std::io::Error::other("not yet"))
        }
    });
    got.unwrap_or_else(|e| {
        panic!("{to} never answered {code} with {count} local endpoints: {e}; last: {last:?}")
    })
}

/// `lbctl -o json health` in `node`'s namespace.
fn lbctl_health(node: &lb_testkit::lab::Node) -> serde_json::Value {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .arg(support::lbctl_path())
        .args(["-o", "json", "health"])
        .output()
        .expect("run lbctl");
    assert!(out.status.success(), "lbctl health: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("lbctl health: JSON")
}

/// `lbctl -o json services` over `node`'s pins.
fn lbctl_services(node: &lb_testkit::lab::Node) -> Vec<serde_json::Value> {
    let ctl = std::process::Command::new(support::lbctl_path())
        .args([
            "--pin-dir".as_ref(),
            node.pin_dir.as_os_str(),
            "-o".as_ref(),
            "json".as_ref(),
            "services".as_ref(),
        ])
        .output()
        .expect("lbctl");
    assert!(ctl.status.success(), "lbctl services: {}", String::from_utf8_lossy(&ctl.stderr));
    serde_json::from_slice(&ctl.stdout).expect("lbctl services: JSON")
}

/// kube-proxy's health-check node ports, asked from outside as a cloud load balancer does: 200 with
/// the count of local ready endpoints on a node that has some, 503 on the other; they follow the
/// endpoints and the Service; a port another process holds is an error naming the Service (counted;
/// the other ports work) until it is free; `--health-check-node-ports=off` listens nowhere. And
/// `/healthz` on kube-proxy's port, asked from outside, drains a node tainted for deletion.
#[test]
fn health_check_node_ports_tell_load_balancers_which_nodes_have_endpoints() {
    let mut c = Cluster::new("nphc", Mode::Tc, true, |_| String::new(), NODE_ARGS);
    let out = c.lab.outside().expect("the client outside");
    let (n1, n2) = (c.nodes[0].clone(), c.nodes[1].clone());
    // Another process on node 2 holds `other`'s port there.
    let taken = SocketAddrV4::new(n2.underlay_ip(), 32101);
    let blocker = lb_testkit::lab::in_netns(&n2.netns, move || std::net::TcpListener::bind(taken))
        .expect("netns")
        .expect("hold node 2's port 32101");
    let (nodes, [b1, b2, b3]) = (c.nodes.clone(), c.backends.clone());
    let yaml = |who: &[&Pod], kind: &str| {
        format!("{}{}", other_service(&[&b3]), service(&nodes, kind, "Local", who))
    };
    c.write(&yaml(&[&b1, &b2], "LoadBalancer"));
    wait_answer(&c, &out.netns, SocketAddrV4::new(n1.underlay_ip(), 30080));
    let (h1, h2) =
        (SocketAddrV4::new(n1.underlay_ip(), HEALTH_PORT), SocketAddrV4::new(n2.underlay_ip(), HEALTH_PORT));
    let body = health_answer(&out, h1, 200, 2);
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "demo", "name": "who"}, "localEndpoints": 2, "serviceProxyHealthy": true})
    );
    health_answer(&out, h2, 503, 0);
    // `other`: node 1 has no endpoint of it; node 2 cannot listen, and says which Service.
    health_answer(&out, SocketAddrV4::new(n1.underlay_ip(), 32101), 503, 0);
    let v = lbctl_health(&n2);
    let row = |v: &serde_json::Value, s: &str| {
        v["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["service"] == s)
            .cloned()
            .unwrap_or_default()
    };
    let err = row(&v, "demo/other")["error"].as_str().unwrap_or_default().to_string();
    assert!(
        err.starts_with("Service demo/other: health-check node port 0.0.0.0:32101: cannot listen"),
        "{v}"
    );
    let who = row(&v, "demo/who");
    assert_eq!(
        (who["port"].clone(), who["local_endpoints"].clone(), who["code"].clone()),
        (HEALTH_PORT.into(), 0.into(), 503.into()),
        "{v}"
    );
    assert_eq!(who["probed"]["code"], 503, "lbctl asked the port itself: {v}");
    // The table names both, with the error.
    let out2 = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n2.netns))
        .arg(support::lbctl_path())
        .arg("health")
        .output()
        .expect("run lbctl");
    let table = String::from_utf8_lossy(&out2.stdout);
    assert!(
        out2.status.success() && table.contains("demo/who") && table.contains("Address already in use"),
        "{table}"
    );
    println!("lbctl health on node 2:\n{table}");
    let metrics = lb_testkit::lab::http_get(&n2.netns, "127.0.0.1:10249".parse().expect("addr"), "/metrics")
        .expect("metrics");
    assert!(
        metrics.1.contains(r#"lb_health_check_node_port_failures_total{service="demo/other"} 1"#),
        "{}",
        metrics.1
    );
    assert!(c.lab.agent_log(&n2).contains("Service demo/other: health-check node port"), "logged");
    // On every address (`--nodeport-addresses primary`, as kube-proxy with none given).
    assert_eq!(who["listening"], serde_json::json!([format!("0.0.0.0:{HEALTH_PORT}")]), "{v}");
    // The port comes free: node 2's agent takes it (its endpoint b3 is local there).
    drop(blocker);
    health_answer(&out, taken, 200, 1);
    // who's endpoints move to node 2.
    c.write(&yaml(&[&b3], "LoadBalancer"));
    health_answer(&out, h1, 503, 0);
    health_answer(&out, h2, 200, 1);
    let metrics = lb_testkit::lab::http_get(&n2.netns, "127.0.0.1:10249".parse().expect("addr"), "/metrics")
        .expect("metrics");
    assert!(
        metrics.1.contains(r#"lb_health_check_node_port_answers_total{service="demo/who",code="200"}"#),
        "{}",
        metrics.1
    );

    // /healthz where cloud load balancers look (kube-proxy's port), from outside: node 1 is
    // eligible until its Node is tainted for deletion; /livez stays 200.
    let (healthz, livez) = (SocketAddrV4::new(n1.underlay_ip(), 10256), "/livez");
    let ask = |path: &str| lb_testkit::lab::http_answer(&out.netns, healthz.into(), path).expect("answer");
    let a = ask("/healthz");
    assert!(a.status == 200 && a.body.contains(r#""nodeEligible":true"#), "{a:?}");
    let node1 = node_manifest(&n1);
    let tainted = node1.replace(
        "status:\n",
        "spec:\n  taints:\n  - {key: ToBeDeletedByClusterAutoscaler, value: \"1733250000\", effect: NoSchedule}\nstatus:\n",
    );
    assert_ne!(node1, tainted);
    c.write(&yaml(&[&b3], "LoadBalancer").replace(&node1, &tainted));
    let drained = wait_until(Duration::from_secs(30), || match ask("/healthz") {
        a if a.status == 503 && a.body.contains(r#""nodeEligible":false"#) => Ok(()),
        a => Err(std::io::Error::other(format!("{a:?}"))),
    });
    assert!(drained.is_ok(), "node 1 never drained: {drained:?}");
    assert_eq!(ask(livez).status, 200, "live while draining");
    c.write(&yaml(&[&b3], "LoadBalancer"));

    // who becomes a NodePort Service: its health-check port closes on both nodes.
    c.write(&yaml(&[&b3], "NodePort"));
    for to in [h1, h2] {
        let closed = wait_until(Duration::from_secs(30), || {
            match lb_testkit::lab::http_answer(&out.netns, to.into(), "/") {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                other => Err(std::io::Error::other(format!("{other:?}"))),
            }
        });
        assert!(closed.is_ok(), "{to} still answers: {closed:?}");
    }
    health_answer(&out, taken, 200, 1);
    // Off (kube-proxy beside lb holds the ports): node 2 listens nowhere, and tells what it would
    // answer.
    c.lab.stop_agent(&n2, libc::SIGTERM);
    c.lab.restart_agent_adding(&n2, &["--health-check-node-ports=off"]).expect("restart node 2");
    c.wait_ready(&n2);
    let refused = wait_until(Duration::from_secs(30), || {
        match lb_testkit::lab::http_answer(&out.netns, taken.into(), "/") {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => Err(std::io::Error::other(format!("{other:?}"))),
        }
    });
    assert!(refused.is_ok(), "node 2 still listens with --health-check-node-ports=off: {refused:?}");
    let v = lbctl_health(&n2);
    assert_eq!(v["health_check_node_ports"], false, "{v}");
    assert_eq!(
        (row(&v, "demo/other")["code"].clone(), row(&v, "demo/other")["listening"].clone()),
        (200.into(), serde_json::json!([])),
        "{v}"
    );
}

/// Health-check node ports over IPv6, asked from outside on the nodes' IPv6 underlay addresses
/// (a dual-stack lab, `--ipv6 on`): the same answers as over IPv4 on the same port (200 and the
/// count where the Service has local endpoints, 503 elsewhere), from a listener of each family
/// (`0.0.0.0` and `::`, with `--nodeport-addresses primary`), which `lbctl health` lists.
#[test]
fn health_check_node_ports_answer_over_ipv6() {
    // Service `who`, dual-stack, with b1 and b2 (node 1) as its endpoints.
    let yaml = |b: &[Pod; 3]| {
        support::v6::dual_stack_who(&b[..2])
            .replacen(
                "spec:\n",
                &format!(
                    "spec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {HEALTH_PORT}\n"
                ),
                1,
            )
            .replacen("protocol: TCP}", "protocol: TCP, nodePort: 30080}", 1)
    };
    let args = ["--node-interfaces", "ul0", "--ipv6", "on"];
    let mut c = Cluster::dual_stack("nph6", Mode::Tc, yaml, &args);
    let out = c.lab.outside().expect("the client outside");
    let (n1, n2) = (c.nodes[0].clone(), c.nodes[1].clone());
    // b1 and b2, the endpoints, are on node 1.
    let h1 = SocketAddrV6::new(n1.underlay_ip6(), HEALTH_PORT, 0, 0);
    let body = health_answer(&out, h1, 200, 2);
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "demo", "name": "who"}, "localEndpoints": 2, "serviceProxyHealthy": true})
    );
    health_answer(&out, SocketAddrV6::new(n2.underlay_ip6(), HEALTH_PORT, 0, 0), 503, 0);
    // The same port over IPv4.
    health_answer(&out, SocketAddrV4::new(n1.underlay_ip(), HEALTH_PORT), 200, 2);
    health_answer(&out, SocketAddrV4::new(n2.underlay_ip(), HEALTH_PORT), 503, 0);
    let v = lbctl_health(&n1);
    let who = v["services"].as_array().into_iter().flatten().find(|r| r["service"] == "demo/who").cloned();
    let who = who.unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        who["listening"],
        serde_json::json!([format!("0.0.0.0:{HEALTH_PORT}"), format!("[::]:{HEALTH_PORT}")]),
        "{v}"
    );
}

/// The LoadBalancer IPv6 address of the dual-stack Service in
/// `nodeports_and_load_balancer_ips_serve_clients_outside_over_ipv6`.
const LB_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x40, 0, 0, 0, 0, 0x10);

/// Dual-stack `who` as a LoadBalancer (NodePorts 30080/TCP and 30053/UDP, ingress `LB_IP` and
/// `LB_IP6`) under externalTrafficPolicy `policy`, endpoints `b`.
fn dual_stack_load_balancer(b: &[Pod], policy: &str) -> String {
    let health =
        if policy == "Local" { format!("  healthCheckNodePort: {HEALTH_PORT}\n") } else { String::new() };
    support::v6::dual_stack_who(b)
        .replacen(
            "spec:\n",
            &format!("spec:\n  type: LoadBalancer\n  externalTrafficPolicy: {policy}\n{health}"),
            1,
        )
        .replacen("protocol: TCP}", "protocol: TCP, nodePort: 30080}", 1)
        .replacen("protocol: UDP}", "protocol: UDP, nodePort: 30053}", 1)
        .replacen(
            "---\n",
            &format!("status:\n  loadBalancer:\n    ingress:\n    - {{ip: {LB_IP}}}\n    - {{ip: '{LB_IP6}'}}\n---\n"),
            1,
        )
}

/// From the client outside over IPv6, through `via` (an IPv6 NodePort or the LoadBalancer IPv6
/// address routed through a node), TCP and UDP reach exactly the endpoints `want`, and each sees
/// the client's address (`out_ip6`: a local endpoint, or any under Local) or the node's (a remote
/// one, SNATed under Cluster).
fn ipv6_endpoints_through(
    c: &Cluster,
    out: &Outside,
    node: &lb_testkit::lab::Node,
    via: std::net::Ipv6Addr,
    (tcp_port, udp_port): (u16, u16),
    want: &BTreeSet<String>,
    udp_ports: u16,
) {
    let tcp = SocketAddr::from(SocketAddrV6::new(via, tcp_port, 0, 0));
    let udp = SocketAddr::from(SocketAddrV6::new(via, udp_port, 0, 0));
    let got = names(tcp_asks_from(&out.netns, tcp, 40).expect("TCP from outside"));
    assert_eq!(&got, want, "TCP to {tcp} through {}", node.netns);
    let got = names(udp_asks_from(&out.netns, udp, udp_ports, 40).expect("UDP from outside"));
    assert_eq!(&got, want, "UDP to {udp} through {}", node.netns);
    let client = out.ip6.expect("a dual-stack outside client");
    let mut kinds = BTreeSet::new();
    for i in 0..12 {
        let (name, peer) = lb_testkit::lab::tcp_peer_any(&out.netns, tcp).expect("TCP peer");
        let (uname, upeer) =
            lb_testkit::lab::udp_peer_any(&out.netns, udp, udp_ports + 1_000 + i).expect("UDP peer");
        for (name, peer) in [(name, peer), (uname, upeer)] {
            let b = c.backends.iter().find(|b| b.name == name).expect("a backend");
            let local = b.node == node.index;
            let want_ip = if local { client } else { node.underlay_ip6() };
            assert_eq!(
                peer.ip(),
                std::net::IpAddr::V6(want_ip),
                "{name} through {}: the address it sees",
                node.netns
            );
            kinds.insert(local);
        }
    }
    let both = want.iter().any(|n| c.backends.iter().any(|b| &b.name == n && b.node != node.index));
    assert_eq!(
        kinds.len(),
        if both { 2 } else { 1 },
        "through {}: local and remote endpoints seen",
        node.netns
    );
}

#[test]
fn nodeports_and_load_balancer_ips_serve_clients_outside_over_ipv6() {
    let args = [
        "--node-interfaces",
        "ul0",
        "--ipv6",
        "on",
        "--nodeport-addresses",
        "172.31.0.0/24,fd00:172:31::/64",
    ];
    let mut c = Cluster::dual_stack("np6", Mode::Tc, |b| dual_stack_load_balancer(b, "Cluster"), &args);
    let out = c.lab.outside().expect("the client outside");
    let (n1, n2) = (c.nodes[0].clone(), c.nodes[1].clone());
    // b1 and b2 on node 1, b3 on node 2.
    let all: BTreeSet<String> = c.backends.iter().map(|b| b.name.clone()).collect();
    // Both agents ready first: until node 1's interface records are written, a flow to the
    // endpoint on node 2 finds no IPv6 address to be SNATed to (CI once saw the first such flow
    // time out after a local endpoint had answered).
    wait_answer(&c, &out.netns, SocketAddrV6::new(n1.underlay_ip6(), 30080, 0, 0));
    // externalTrafficPolicy Cluster: every endpoint through either node's IPv6 NodePorts, remote
    // ones SNATed to the node's IPv6 address.
    ipv6_endpoints_through(&c, &out, &n1, n1.underlay_ip6(), (30080, 30053), &all, 20_000);
    ipv6_endpoints_through(&c, &out, &n2, n2.underlay_ip6(), (30080, 30053), &all, 21_000);
    // The LoadBalancer IPv6 address, routed through node 2.
    c.lab.route_via(&out, LB_IP6, &n2).expect("route via node 2");
    ipv6_endpoints_through(&c, &out, &n2, LB_IP6, (80, 53), &all, 22_000);
    // Counted as flows from outside SNATed to the node, and the IPv4 NodePort still serves.
    let counters = c.maps(2).read_counters().expect("counters");
    assert!(counters[c::NODE_SNAT as usize] > 0, "node 2 SNATed IPv6 flows to its remote endpoints");
    let np4 = SocketAddrV4::new(n1.underlay_ip(), 30080);
    assert_eq!(names(tcp_asks_from(&out.netns, np4, 20).expect("IPv4 NodePort")), all);

    // externalTrafficPolicy Local: each node's own endpoints only, the client's address kept.
    let backends = c.backends.clone();
    c.write(&dual_stack_load_balancer(&backends, "Local"));
    let on = |n: u8| -> BTreeSet<String> {
        backends.iter().filter(|b| b.node == n).map(|b| b.name.clone()).collect()
    };
    // Each agent applies the change at its own pace: both nodes settled.
    for n in [&n1, &n2] {
        let np = SocketAddr::from(SocketAddrV6::new(n.underlay_ip6(), 30080, 0, 0));
        let settled = wait_until(Duration::from_secs(120), || {
            // (A request may fail while the agent moves to Local: not settled yet.)
            let answers = tcp_asks_from(&out.netns, np, 10)?;
            let got: BTreeSet<String> = answers.into_iter().collect::<std::io::Result<_>>()?;
            if got == on(n.index) {
                Ok(())
            } else {
                Err(std::io::Error::other(format!("{got:?}")))
            }
        });
        assert!(settled.is_ok(), "{} under Local: {settled:?}", n.netns);
    }
    ipv6_endpoints_through(&c, &out, &n1, n1.underlay_ip6(), (30080, 30053), &on(1), 23_000);
    ipv6_endpoints_through(&c, &out, &n2, n2.underlay_ip6(), (30080, 30053), &on(2), 24_000);
    c.lab.route_via(&out, LB_IP6, &n1).expect("route via node 1");
    ipv6_endpoints_through(&c, &out, &n1, LB_IP6, (80, 53), &on(1), 25_000);
    // The health-check node port tells a load balancer over IPv6 which node has endpoints.
    health_answer(&out, SocketAddrV6::new(n1.underlay_ip6(), HEALTH_PORT, 0, 0), 200, 2);
    health_answer(&out, SocketAddrV6::new(n2.underlay_ip6(), HEALTH_PORT, 0, 0), 200, 1);
    // `lbctl` lists the IPv6 NodePort and LoadBalancer frontends.
    let listed = lbctl_services(&n1);
    for (vip, port, kind) in [(n1.underlay_ip6(), 30080, "NodePort"), (LB_IP6, 80, "LoadBalancer")] {
        let found = listed.iter().any(|s| {
            s["vip"] == vip.to_string() && s["port"] == port && s["kind"] == kind && s["scope"] == "external"
        });
        assert!(found, "lbctl services lists [{vip}]:{port} ({kind}): {listed:?}");
    }
}
