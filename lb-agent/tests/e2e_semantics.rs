//! Service semantics end to end: draining, ClientIP affinity, internalTrafficPolicy Local across
//! two nodes, hairpin, a named targetPort that differs per endpoint, and pods reaching LoadBalancer
//! IPs. Manifests change while
//! the agents run; the tests wait for the maps to show a change before relying on it.

mod support;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_agent::datapath::Mode;
use lb_common::{counters as c, BACKEND_STATE_TERMINATING};
use lb_testkit::lab::{tcp_asks, udp_asks, Session};
use support::{endpoint, who, Cluster, VIP};

fn answers(v: Vec<std::io::Result<String>>) -> Vec<String> {
    v.into_iter().enumerate().map(|(i, a)| a.unwrap_or_else(|e| panic!("request #{i} failed: {e}"))).collect()
}

fn names(v: &[String]) -> BTreeSet<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn draining_keeps_established_connections_and_avoids_the_backend() {
    let ready = |b: &[lb_testkit::lab::Pod]| b.iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>();
    let c = Cluster::new("drain", Mode::Tc, true, |b| who("", &ready(b)), &[]);
    c.wait_reachable(&c.client1, 80);
    let tcp = SocketAddrV4::new(VIP, 80);
    let mut session = Session::open(&c.client1, tcp).expect("long-lived connection");
    let pinned = session.ask().expect("first answer");
    let victim = c.backends.iter().find(|b| b.name == pinned).expect("a backend answered");

    // The backend starts terminating (still listed, serving).
    let eps: Vec<String> = c
        .backends
        .iter()
        .map(|b| {
            endpoint(
                b,
                if b.name == victim.name {
                    "ready: false, serving: true, terminating: true"
                } else {
                    "ready: true"
                },
            )
        })
        .collect();
    c.write(&who("", &eps));
    c.wait_backend(1, victim.ip, 8080, Some(BACKEND_STATE_TERMINATING));
    let new = answers(tcp_asks(&c.client1, tcp, 300).expect("new connections"));
    assert!(
        !names(&new).contains(victim.name.as_str()),
        "a new connection reached the terminating {}",
        victim.name
    );
    assert_eq!(names(&new).len(), 2, "the two others share the new connections");
    assert_eq!(session.ask().expect("established connection"), pinned, "established connection moved");

    // Then it disappears from the slice: still drained, not cut.
    let eps: Vec<String> =
        c.backends.iter().filter(|b| b.name != victim.name).map(|b| endpoint(b, "ready: true")).collect();
    c.write(&who("", &eps));
    std::thread::sleep(Duration::from_millis(300));
    c.wait_backend(1, victim.ip, 8080, Some(BACKEND_STATE_TERMINATING));
    for _ in 0..5 {
        assert_eq!(session.ask().expect("established connection"), pinned);
    }
    let new = answers(tcp_asks(&c.client1, tcp, 100).expect("new connections"));
    assert!(!names(&new).contains(victim.name.as_str()));
}

#[test]
fn a_backend_that_left_is_freed_once_no_flow_uses_it() {
    let c = Cluster::new(
        "free",
        Mode::Tc,
        true,
        |b| who("", &[endpoint(&b[0], "ready: true"), endpoint(&b[1], "ready: true")]),
        &["--ct-timeout-tcp-close", "1"],
    );
    c.wait_settled(&c.client1, 80);
    let mut session = Session::open(&c.client1, SocketAddrV4::new(VIP, 80)).expect("connection");
    let pinned = session.ask().expect("answer");
    let (gone, stays) = if c.backends[0].name == pinned { (0, 1) } else { (1, 0) };
    let gone = c.backends[gone].clone();
    c.write(&who("", &[endpoint(&c.backends[stays], "ready: true")]));
    c.wait_backend(1, gone.ip, 8080, Some(BACKEND_STATE_TERMINATING));
    // Kept while its connection lives (several sweep passes), freed once it ended.
    std::thread::sleep(Duration::from_secs(2));
    c.wait_backend(1, gone.ip, 8080, Some(BACKEND_STATE_TERMINATING));
    assert_eq!(session.ask().expect("still served"), pinned);
    drop(session);
    c.wait_backend(1, gone.ip, 8080, None);
}

#[test]
fn client_ip_affinity_sticks_then_expires() {
    let spec = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}";
    let c = Cluster::new(
        "aff",
        Mode::Tc,
        true,
        |b| who(spec, &b.iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>()),
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    std::thread::sleep(Duration::from_millis(1_200));
    let tcp = SocketAddrV4::new(VIP, 80);
    let udp = SocketAddrV4::new(VIP, 53);
    let many = answers(tcp_asks(&c.client1, tcp, 200).expect("connections"));
    assert_eq!(
        names(&many).len(),
        1,
        "ClientIP affinity: one backend for every connection: {:?}",
        names(&many)
    );
    let many_udp = answers(udp_asks(&c.client1, udp, 10_000, 100).expect("udp"));
    assert_eq!(names(&many_udp).len(), 1, "ClientIP affinity over UDP: {:?}", names(&many_udp));
    // Once the client has been quiet for longer than the timeout, Maglev picks again: first
    // connections a timeout apart spread over the backends (all 12 on one has odds of 3 in 3^12).
    let mut firsts = Vec::new();
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(1_100));
        firsts.extend(answers(tcp_asks(&c.client1, tcp, 1).expect("connection")));
    }
    assert!(names(&firsts).len() >= 2, "after the timeout connections spread again: {firsts:?}");
    assert!(c.maps(1).read_counters().expect("counters")[c::AFFINITY_HIT as usize] >= 199);
}

#[test]
fn internal_traffic_policy_local_across_two_nodes() {
    let local = "  internalTrafficPolicy: Local";
    // b1 on node 1 and b3 on node 2 serve `who`; `far` has its only endpoint on node 2.
    let c = Cluster::new(
        "itp",
        Mode::Tc,
        true,
        |b| {
            let mut y = who(local, &[endpoint(&b[0], "ready: true"), endpoint(&b[2], "ready: true")]);
            y.push_str("---\n");
            y.push_str(
                &who(local, &[endpoint(&b[2], "ready: true")])
                    .replace("name: who", "name: far")
                    .replace("who-1", "far-1")
                    .replace("service-name: who", "service-name: far")
                    .replace(&VIP.to_string(), "10.96.0.11"),
            );
            y
        },
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    c.wait_reachable(&c.client2, 80);
    let tcp = SocketAddrV4::new(VIP, 80);
    let from1 = answers(tcp_asks(&c.client1, tcp, 200).expect("from node 1"));
    let from2 = answers(tcp_asks(&c.client2, tcp, 200).expect("from node 2"));
    assert_eq!(names(&from1), BTreeSet::from(["b1"]), "node 1 uses only its local endpoint");
    assert_eq!(names(&from2), BTreeSet::from(["b3"]), "node 2 uses only its local endpoint");
    // No local endpoint on node 1: dropped there (and counted), served on node 2.
    let far = SocketAddrV4::new("10.96.0.11".parse().expect("ip"), 80);
    assert!(tcp_asks(&c.client1, far, 1).expect("attempt")[0].is_err(), "no local endpoint: no answer");
    assert!(c.maps(1).read_counters().expect("counters")[c::DROP_NO_LOCAL_BACKEND as usize] >= 1);
    assert_eq!(answers(tcp_asks(&c.client2, far, 20).expect("from node 2")), vec!["b3".to_string(); 20]);
}

#[test]
fn hairpin_a_pod_reaches_itself_through_its_service() {
    let c = Cluster::new("hair", Mode::Tc, true, |b| who("", &[endpoint(&b[0], "ready: true")]), &[]);
    c.wait_reachable(&c.client1, 80);
    let b1 = &c.backends[0];
    let tcp = answers(tcp_asks(b1, SocketAddrV4::new(VIP, 80), 50).expect("hairpin tcp"));
    assert_eq!(tcp, vec!["b1".to_string(); 50]);
    let udp = answers(udp_asks(b1, SocketAddrV4::new(VIP, 53), 10_000, 50).expect("hairpin udp"));
    assert_eq!(udp, vec!["b1".to_string(); 50]);
    let mut s = Session::open(b1, SocketAddrV4::new(VIP, 80)).expect("long-lived hairpin connection");
    for _ in 0..10 {
        assert_eq!(s.ask().expect("answer"), "b1");
    }
    assert!(c.maps(1).read_counters().expect("counters")[c::HAIRPIN as usize] >= 101);
}

#[test]
fn named_target_port_that_differs_per_endpoint() {
    // b1 and b2 serve "tcp" on 8080, b3 on 9090: one Service port, two target numbers.
    let yaml = |b: &[lb_testkit::lab::Pod; 3]| {
        let mut y = who("", &[endpoint(&b[0], "ready: true"), endpoint(&b[1], "ready: true")]);
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: who-2\n  namespace: demo\n  labels: {{kubernetes.io/service-name: who}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 9090, protocol: TCP}}\nendpoints:\n{}\n",
            endpoint(&b[2], "ready: true")
        ));
        y
    };
    let c = Cluster::new("named", Mode::Tc, true, yaml, &[]);
    c.wait_reachable(&c.client1, 80);
    let got = answers(tcp_asks(&c.client1, SocketAddrV4::new(VIP, 80), 300).expect("connections"));
    assert_eq!(names(&got), BTreeSet::from(["b1", "b2", "b3"]));
}

/// Rule: a pod reaches its Service's LoadBalancer IPs through lb, with every endpoint
/// (kube-proxy's exception to externalTrafficPolicy Local for the cluster's own clients;
/// internalTrafficPolicy narrows the cluster IP only), over TCP and UDP. The node has no route to
/// those addresses: an answer means lb translated.
#[test]
fn pods_reach_load_balancer_ips_with_every_endpoint() {
    let extra = "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32190\n  internalTrafficPolicy: Local\nstatus:\n  \
                 loadBalancer:\n    ingress:\n    - {ip: 203.0.113.10}\n    - {ip: 203.0.113.12, ipMode: VIP}\n    \
                 - {ip: 203.0.113.11, ipMode: Proxy}";
    let c = Cluster::new(
        "lbip",
        Mode::Tc,
        true,
        |b| who(extra, &[endpoint(&b[0], "ready: true"), endpoint(&b[2], "ready: true")]),
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    let cluster = answers(tcp_asks(&c.client1, SocketAddrV4::new(VIP, 80), 50).expect("cluster IP"));
    assert_eq!(
        names(&cluster),
        BTreeSet::from(["b1"]),
        "internalTrafficPolicy Local: the cluster IP is local"
    );
    for ip in ["203.0.113.10", "203.0.113.12"] {
        let ip: Ipv4Addr = ip.parse().expect("ip");
        let tcp = answers(tcp_asks(&c.client1, SocketAddrV4::new(ip, 80), 100).expect("tcp"));
        assert_eq!(names(&tcp), BTreeSet::from(["b1", "b3"]), "{ip}: every endpoint");
        let udp = answers(udp_asks(&c.client1, SocketAddrV4::new(ip, 53), 12_000, 60).expect("udp"));
        assert_eq!(names(&udp), BTreeSet::from(["b1", "b3"]), "{ip}: every endpoint over UDP");
    }
    // ipMode Proxy: the load balancer must see the traffic; not translated (no route here).
    let proxy = SocketAddrV4::new("203.0.113.11".parse().expect("ip"), 80);
    assert!(tcp_asks(&c.client1, proxy, 1).expect("attempt")[0].is_err(), "ipMode Proxy is not translated");
}
