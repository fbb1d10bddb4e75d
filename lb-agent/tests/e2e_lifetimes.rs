//! Flow lifetimes end to end, with real TCP and UDP sockets through namespaces and the real
//! agent: a Service's deletion does not cut its established connections, a UDP flow stays on a
//! serving endpoint and leaves one that stops serving, a reply entry outliving its flow does not
//! hijack a later direct exchange from the same client port, and what is kept for flows goes once
//! they end.

mod support;

use std::{net::SocketAddrV4, time::Duration};

use lb_agent::datapath::Mode;
use lb_common::SVC_FLAG_TOMBSTONE;
use lb_testkit::lab::{tcp_asks, udp_asks, wait_until, Session};
use support::{endpoint, who, Cluster, VIP};

fn all(pods: &[lb_testkit::lab::Pod], conditions: &str) -> Vec<String> {
    pods.iter().map(|p| endpoint(p, conditions)).collect()
}

/// Node 1's services map as (protocol, port, flags), sorted.
fn services(c: &Cluster) -> std::io::Result<Vec<(u8, u16, u32)>> {
    let mut got: Vec<(u8, u16, u32)> = c
        .maps(1)
        .read_services()
        .map_err(std::io::Error::other)?
        .iter()
        .map(|(k, s)| (k.parts().2, k.parts().1, s.flags))
        .collect();
    got.sort_unstable();
    Ok(got)
}

/// Waits until node 1's services map satisfies `want` (described by `what`).
fn wait_services(c: &Cluster, what: &str, want: impl Fn(&[(u8, u16, u32)]) -> bool) {
    let got = wait_until(Duration::from_secs(10), || {
        let got = services(c)?;
        if want(&got) {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("(proto, port, flags) {got:?}")))
        }
    });
    assert!(
        got.is_ok(),
        "services map never held {what}: {got:?}\nagent log:\n{}",
        c.lab.agent_log(&c.nodes[0])
    );
}

#[test]
fn deleting_a_service_keeps_its_established_connections_until_they_end() {
    let c = Cluster::new(
        "gone",
        Mode::Tc,
        true,
        |b| who("", &all(&b[..2], "ready: true")),
        &["--ct-timeout-tcp-close", "1"],
    );
    c.wait_settled(&c.client1, 80);
    let tcp = SocketAddrV4::new(VIP, 80);
    let mut session = Session::open(&c.client1, tcp).expect("long-lived connection");
    let pinned = session.ask().expect("first answer");

    // The Service and its EndpointSlice are deleted (an unrelated object stays in the folder).
    c.write("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\n");
    // Port 80 becomes a tombstone: kept for its flow, no backend for new ones. Port 53 has no
    // flow, so its tombstone may already have gone at a sweep pass; nothing stays live.
    wait_services(&c, "a tombstone at 80 and nothing live", |s| {
        s.contains(&(lb_common::IPPROTO_TCP, 80, SVC_FLAG_TOMBSTONE))
            && s.iter().all(|(_, _, flags)| *flags == SVC_FLAG_TOMBSTONE)
    });
    for i in 0..5 {
        assert_eq!(session.ask().unwrap_or_else(|e| panic!("ask #{i} after the deletion: {e}")), pinned);
    }
    let fresh = tcp_asks(&c.client1, tcp, 1).expect("asks").pop().expect("one");
    assert!(fresh.is_err(), "a new connection to a deleted Service was answered: {fresh:?}");
    // Held for minutes, as under netfilter (the established timeout), not cut by a sweep.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(session.ask().expect("still alive after sweeps"), pinned);

    // Once it ends (and its closing timeout passes), a sweep pass lets the tombstones go.
    drop(session);
    wait_services(&c, "nothing", <[_]>::is_empty);
}

#[test]
fn udp_flows_stay_on_serving_endpoints_and_leave_the_others() {
    let c = Cluster::new("udpserve", Mode::Tc, true, |b| who("", &all(&b[..2], "ready: true")), &[]);
    c.wait_reachable(&c.client1, 80);
    let udp = SocketAddrV4::new(VIP, 53);
    // One UDP flow: always the same client port.
    let ask = || udp_asks(&c.client1, udp, 20_001, 1).expect("udp").pop().expect("one").expect("answer");
    let pinned = ask();
    let (victim, other) = if c.backends[0].name == pinned {
        (&c.backends[0], &c.backends[1])
    } else {
        (&c.backends[1], &c.backends[0])
    };
    assert_eq!(victim.name, pinned);

    // Terminating but serving: kube-proxy keeps its UDP conntrack entries, and so does lb.
    c.write(&who(
        "",
        &[endpoint(victim, "ready: false, serving: true, terminating: true"), endpoint(other, "ready: true")],
    ));
    c.wait_backend(1, victim.ip, 8080, Some(lb_common::BACKEND_STATE_TERMINATING));
    for _ in 0..5 {
        assert_eq!(ask(), pinned, "a UDP flow left a serving endpoint");
    }
    // No longer serving: the flow moves.
    c.write(&who(
        "",
        &[
            endpoint(victim, "ready: false, serving: false, terminating: true"),
            endpoint(other, "ready: true"),
        ],
    ));
    let moved = wait_until(Duration::from_secs(5), || {
        let a = ask();
        if a == other.name {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("still answered by {a}")))
        }
    });
    assert!(moved.is_ok(), "the UDP flow never left the endpoint that stopped serving: {moved:?}");
}

#[test]
fn a_reply_entry_outliving_its_flow_leaves_a_direct_exchange_alone() {
    let c = Cluster::new(
        "stale",
        Mode::Tc,
        true,
        |b| who("", &all(&b[..1], "ready: true")),
        &["--ct-timeout-udp", "1"],
    );
    c.wait_reachable(&c.client1, 80);
    let b1 = &c.backends[0];
    let port = 20_101;
    // Through the Service, then (after the flow's timeout) straight to the pod from the same
    // client port: the pod's answer must come from the pod, not be rewritten to the VIP.
    let via = udp_asks(&c.client1, SocketAddrV4::new(VIP, 53), port, 1).expect("udp").pop().expect("one");
    assert_eq!(via.expect("answer through the Service"), b1.name);
    std::thread::sleep(Duration::from_millis(1_500));
    let direct =
        udp_asks(&c.client1, SocketAddrV4::new(b1.ip, 5353), port, 1).expect("udp").pop().expect("one");
    assert_eq!(direct.expect("direct answer from the pod's own address"), b1.name);
}
