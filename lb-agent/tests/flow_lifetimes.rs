//! Flow lifetimes as under netfilter conntrack, packet by packet through BPF_PROG_TEST_RUN: reply
//! entries live and die with their flow, a Service's deletion or address change does not cut
//! established connections, flows and affinity are checked against the frontend they were made
//! for, a SYN never goes to a backend that is not active, an evicted reply entry is rebuilt, UDP
//! leaves a backend only when it is no longer serving, and an RST never opens a flow. Each case
//! drives the real reconciler against the real maps, sends packets, and checks the verdict, the
//! addresses out, the counters and the conntrack map.

mod support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{
    datapath::{monotonic_ns, Datapath, Maps, Mode, PROG_TC_FORWARD, PROG_TC_REPLY},
    model::{BackendAddr, BackendState, Frontend, FrontendAddr, Protocol},
    reconcile::{
        Capacities, FlowCensus, FlowTable, MapWriter, MemberKey, Options, Reconciler, ServiceKey, Sweeper,
        Timeouts,
    },
};
use lb_common::{counters as c, Lb4CtKey, CT_DIR_FORWARD, CT_DIR_REPLY};
use support::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const B2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const B3: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
/// `TCX_NEXT` (-1): the packet goes on to the programs after lb.
const TC_OK: u32 = u32::MAX;
const TC_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`: a reject, sent back to the client.
const TC_REDIRECT: u32 = 7;
const RST: L4 = L4::Tcp { syn: false, ack: false, fin: false, rst: true };

struct Lab {
    _pins: PinDir,
    dp: Datapath,
    maps: Maps,
    r: Reconciler,
}

/// A frontend of Service `service` at `vip:port`: `table` takes new flows, `kept` are listed in
/// the given state.
fn fe(
    service: &str,
    vip: Ipv4Addr,
    port: u16,
    proto: Protocol,
    table: &[(Ipv4Addr, u16)],
    kept: &[((Ipv4Addr, u16), BackendState)],
    affinity: u32,
) -> Frontend {
    let be = |(ip, port): &(Ipv4Addr, u16)| BackendAddr { ip: (*ip).into(), port: *port, proto };
    Frontend {
        addr: FrontendAddr::new(vip, port, proto),
        kind: lb_agent::model::FrontendKind::ClusterIp,
        service: format!("default/{service}"),
        port_name: String::new(),
        backends: table.iter().map(be).collect(),
        kept: kept.iter().map(|(b, s)| (be(b), *s)).collect(),
        affinity_timeout_secs: affinity,
        local_only: false,
        two_scopes: false,
        source_ranges: None,
    }
}

impl Lab {
    fn new(test: &str) -> Self {
        let pins = PinDir::new(test);
        let (dp, maps) = Datapath::load(&test_config(pins.path()), Mode::Tc).expect("load datapath");
        let caps =
            Capacities { services: 1024, backends: 1024, maglev_slots: 65_536, ..Capacities::default() };
        Self { _pins: pins, dp, maps, r: Reconciler::new(caps, Options::default()) }
    }

    fn sync(&mut self, fes: &[Frontend]) {
        let desired: BTreeMap<_, _> = fes.iter().map(|f| (f.addr, f.clone())).collect();
        let (_, errors) = self.r.sync(&desired, &Default::default(), &mut self.maps);
        assert!(errors.is_empty(), "sync errors: {errors:?}");
    }

    /// Sends `pkt` through `prog`; checks the verdict and the counter changes; returns the packet
    /// out.
    fn send(&self, desc: &str, reply: bool, pkt: &Pkt, verdict: u32, counters: &[u32]) -> Vec<u8> {
        let before = self.maps.read_counters().expect("counters");
        let input = pkt.bytes();
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions { data_in: Some(&input), data_out: Some(&mut out), ..Default::default() };
        let name = if reply { PROG_TC_REPLY } else { PROG_TC_FORWARD };
        let res = self.dp.tc_program(name).expect("program").test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        let after = self.maps.read_counters().expect("counters");
        assert_eq!(res.return_value, verdict, "{desc}: verdict");
        let mut want: Vec<&str> = vec![if reply { "rx_reply" } else { "rx_forward" }];
        want.extend(counters.iter().map(|i| c::NAMES[*i as usize]));
        want.sort_unstable();
        let mut got: Vec<&str> = Vec::new();
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            for _ in 0..(a - b) {
                got.push(c::NAMES[i]);
            }
        }
        got.sort_unstable();
        assert_eq!(got, want, "{desc}: counter changes");
        out
    }

    /// A forward packet that must be DNATed to `to` (the source kept).
    fn forward(&self, desc: &str, pkt: &Pkt, to: (Ipv4Addr, u16), counters: &[u32]) {
        let out = self.send(desc, false, pkt, TC_OK, counters);
        let (inp, seen) = (check_packet(&pkt.bytes()), check_packet(&out));
        assert_eq!((seen.src, seen.dst), (inp.src, to), "{desc}: addresses out");
    }

    /// A reply that must come out from `vip` (the destination kept).
    fn reply(&self, desc: &str, pkt: &Pkt, vip: (Ipv4Addr, u16)) {
        let out = self.send(desc, true, pkt, TC_OK, &[c::REV_NAT]);
        let (inp, seen) = (check_packet(&pkt.bytes()), check_packet(&out));
        assert_eq!((seen.src, seen.dst), (vip, inp.dst), "{desc}: addresses out");
    }

    /// A packet that must leave untouched, counted as `counter`.
    fn untouched(&self, desc: &str, reply: bool, pkt: &Pkt, counter: u32) {
        let out = self.send(desc, reply, pkt, TC_OK, &[counter]);
        assert_eq!(out, pkt.bytes(), "{desc}: bytes out");
    }

    fn dropped(&self, desc: &str, pkt: &Pkt, counter: u32) {
        self.send(desc, false, pkt, TC_SHOT, &[counter]);
    }

    fn ct(&self, key: &Lb4CtKey) -> Option<lb_common::Lb4CtEntry> {
        self.maps.ct.get(key, 0).ok()
    }

    fn set_ct(&mut self, key: &Lb4CtKey, f: impl FnOnce(&mut lb_common::Lb4CtEntry)) {
        let mut e = self.ct(key).expect("entry to change");
        f(&mut e);
        self.maps.ct.insert(key, e, 0).expect("write entry");
    }
}

fn key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, dir: u8) -> Lb4CtKey {
    Lb4CtKey {
        saddr: u32::from_ne_bytes(src.0.octets()),
        daddr: u32::from_ne_bytes(dst.0.octets()),
        sport: src.1.to_be(),
        dport: dst.1.to_be(),
        proto,
        dir,
        _pad: 0,
    }
}

const TCP: u8 = 6;
const UDP_P: u8 = 17;
const S: u64 = 1_000_000_000;

#[test]
fn reply_entries_live_and_die_with_their_flow() {
    let mut lab = Lab::new("lifetimes-reply");
    let vip = Ipv4Addr::new(10, 96, 1, 1);
    lab.sync(&[fe("a", vip, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0)]);
    let client = |port| (CLIENT, port);
    let fwd = |port| key(client(port), (vip, 80), TCP, CT_DIR_FORWARD);
    let rev = |port| key((B2, 8080), client(port), TCP, CT_DIR_REPLY);

    // Three flows; each then loses its forward entry a different way.
    for port in [1000, 1002, 1004] {
        lab.forward("new flow", &Pkt::new(client(port), (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
        lab.reply("its reply", &Pkt::new((B2, 8080), client(port), SYN_ACK), (vip, 80));
    }
    // Gone past its timeout, both entries idle (a forward entry gone while the reply entry is
    // within its timeout is an eviction, rebuilt: see below).
    lab.maps.ct.remove(&fwd(1000)).expect("remove forward entry");
    let seen = lab.ct(&rev(1000)).expect("reply").last_seen_ns;
    lab.set_ct(&rev(1000), |e| e.last_seen_ns = back(seen, 61)); // SYN state: past 60 s
    let seen = lab.ct(&fwd(1002)).expect("forward").last_seen_ns;
    lab.set_ct(&fwd(1002), |e| e.last_seen_ns = back(seen, 61)); // SYN state: past 60 s
    lab.set_ct(&fwd(1004), |e| e.nat_port = 9090u16.to_be()); // now names another backend
    for port in [1000, 1002, 1004] {
        // A direct connection to the pod from the same client port: its answers are not the
        // Service's.
        let direct = Pkt::new((B2, 8080), client(port), SYN_ACK);
        lab.untouched(
            "reply entry of a flow that is gone: not translated",
            true,
            &direct,
            c::PASS_STALE_REPLY_CT,
        );
        assert!(lab.ct(&rev(port)).is_none(), "the stale reply entry is removed");
        lab.untouched("then: no reply entry at all", true, &direct, c::PASS_NO_REPLY_CT);
    }

    // Replies keep the flow alive: they refresh its forward entry, as netfilter's timeouts count
    // both directions.
    lab.forward("new flow", &Pkt::new(client(1006), (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    lab.forward("established", &Pkt::new(client(1006), (vip, 80), ACK), (B2, 8080), &[c::FWD_ESTABLISHED]);
    let seen = lab.ct(&fwd(1006)).expect("forward").last_seen_ns;
    lab.set_ct(&fwd(1006), |e| e.last_seen_ns = seen - 100 * S);
    lab.reply("a reply", &Pkt::new((B2, 8080), client(1006), ACK), (vip, 80));
    assert!(lab.ct(&fwd(1006)).expect("forward").last_seen_ns >= seen, "the reply refreshed the flow");

    // An RST that matches no flow never opens one.
    let rst = Pkt::new(client(1008), (vip, 80), RST);
    lab.dropped("RST to the VIP without a flow", &rst, c::DROP_RST_NO_FLOW);
    assert!(lab.ct(&fwd(1008)).is_none(), "no flow was created");
    // Nor does an RST of an expired flow.
    lab.forward("new flow", &Pkt::new(client(1010), (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    let seen = lab.ct(&fwd(1010)).expect("forward").last_seen_ns;
    lab.set_ct(&fwd(1010), |e| e.last_seen_ns = back(seen, 61)); // SYN state: 60 s
    lab.dropped("RST of an expired flow", &Pkt::new(client(1010), (vip, 80), RST), c::DROP_RST_NO_FLOW);
    // An RST of a live flow goes to its backend.
    lab.forward("new flow", &Pkt::new(client(1012), (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    lab.forward(
        "RST of a live flow",
        &Pkt::new(client(1012), (vip, 80), RST),
        (B2, 8080),
        &[c::FWD_ESTABLISHED],
    );
}

#[test]
fn an_evicted_reply_entry_is_rebuilt_when_its_flow_is_refreshed() {
    let mut lab = Lab::new("lifetimes-evicted");
    let vip = Ipv4Addr::new(10, 96, 1, 2);
    lab.sync(&[fe("a", vip, 53, Protocol::Udp, &[(B2, 5353)], &[], 0)]);
    let c1 = (CLIENT, 2000);
    let flow = Pkt::new(c1, (vip, 53), UDP);
    lab.forward("new flow", &flow, (B2, 5353), &[c::FWD_NEW_FLOW]);
    let (fwd, rev) = (key(c1, (vip, 53), UDP_P, CT_DIR_FORWARD), key((B2, 5353), c1, UDP_P, CT_DIR_REPLY));
    lab.maps.ct.remove(&rev).expect("evict the reply entry");
    // Once a refresh is due (more than a second since the flow was last seen), the next packet
    // rebuilds it.
    let seen = lab.ct(&fwd).expect("forward").last_seen_ns;
    lab.set_ct(&fwd, |e| e.last_seen_ns = seen - 2 * S);
    lab.forward("next packet of the flow", &flow, (B2, 5353), &[c::FWD_ESTABLISHED]);
    let rebuilt = lab.ct(&rev).expect("reply entry rebuilt");
    assert_eq!((rebuilt.nat_addr, rebuilt.nat_port), (u32::from_ne_bytes(vip.octets()), 53u16.to_be()));
    lab.reply("the reply works again", &Pkt::new((B2, 5353), c1, UDP), (vip, 53));
}

#[test]
fn deleted_or_moved_services_keep_their_established_flows() {
    let mut lab = Lab::new("lifetimes-deleted");
    let (vd, vr) = (Ipv4Addr::new(10, 96, 1, 3), Ipv4Addr::new(10, 96, 1, 4));
    let s = fe("s", vd, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0);
    let su = fe("s", vd, 53, Protocol::Udp, &[(B2, 5353)], &[], 0);
    let old = fe("old", vr, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0);
    lab.sync(&[s.clone(), su.clone(), old.clone()]);
    let (tcp, udp, moved) = ((CLIENT, 3000), (CLIENT, 3002), (CLIENT, 3004));
    lab.forward("TCP flow to s", &Pkt::new(tcp, (vd, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    lab.forward("UDP flow to s", &Pkt::new(udp, (vd, 53), UDP), (B2, 5353), &[c::FWD_NEW_FLOW]);
    lab.forward("TCP flow to old", &Pkt::new(moved, (vr, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);

    // s is deleted; old's address is taken by Service new (other backend), in one sync.
    let new = fe("new", vr, 80, Protocol::Tcp, &[(B3, 8080)], &[], 0);
    lab.sync(&[new]);
    lab.forward(
        "s deleted: its TCP flow keeps its backend",
        &Pkt::new(tcp, (vd, 80), ACK),
        (B2, 8080),
        &[c::FWD_ESTABLISHED],
    );
    lab.reply("and its replies", &Pkt::new((B2, 8080), tcp, ACK), (vd, 80));
    lab.send(
        "s deleted: a new connection is rejected (ICMP port unreachable)",
        false,
        &Pkt::new((CLIENT, 3006), (vd, 80), SYN),
        TC_REDIRECT,
        &[c::REJECT_NO_BACKEND],
    );
    // kube-proxy deletes the UDP conntrack entries of a deleted Service.
    let u = Pkt::new(udp, (vd, 53), UDP);
    lab.send(
        "s deleted: its UDP flow ends",
        false,
        &u,
        TC_REDIRECT,
        &[c::CT_RESELECTED, c::REJECT_NO_BACKEND],
    );
    lab.forward(
        "address taken by new: old's flow keeps old's backend",
        &Pkt::new(moved, (vr, 80), ACK),
        (B2, 8080),
        &[c::FWD_ESTABLISHED],
    );
    lab.forward(
        "new connections go to new",
        &Pkt::new((CLIENT, 3008), (vr, 80), SYN),
        (B3, 8080),
        &[c::FWD_NEW_FLOW],
    );
    lab.forward(
        "a SYN on old's tuple is a new connection: new's",
        &Pkt::new(moved, (vr, 80), SYN),
        (B3, 8080),
        &[c::FWD_NEW_FLOW],
    );

    // When a whole pass of the sweep finds no flow of s, its tombstone goes: the address is no
    // Service's any more.
    lab.r.begin_pass(1);
    lab.r.release_idle(&FlowCensus::new(1), &mut lab.maps);
    lab.untouched(
        "s gone for good: packets to its address pass",
        false,
        &Pkt::new(tcp, (vd, 80), ACK),
        c::PASS_NON_VIP,
    );
}

#[test]
fn flows_and_affinity_are_checked_against_their_frontend() {
    let mut lab = Lab::new("lifetimes-members");
    let (vu, vv, va) =
        (Ipv4Addr::new(10, 96, 1, 5), Ipv4Addr::new(10, 96, 1, 6), Ipv4Addr::new(10, 96, 1, 7));
    // B2:5353 serves u and v; B2:8080 is a's only backend, with affinity.
    let u = fe("u", vu, 53, Protocol::Udp, &[(B2, 5353)], &[], 0);
    let ut = fe("u", vu, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0);
    let v = fe("v", vv, 53, Protocol::Udp, &[(B2, 5353)], &[], 0);
    let vt = fe("v", vv, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0);
    let a = fe("a", va, 80, Protocol::Tcp, &[(B2, 8080)], &[], 30);
    lab.sync(&[u, ut, v.clone(), vt.clone(), a]);
    let (cu, ct) = ((CLIENT, 4000), (CLIENT, 4002));
    lab.forward("UDP flow to u", &Pkt::new(cu, (vu, 53), UDP), (B2, 5353), &[c::FWD_NEW_FLOW]);
    lab.forward("TCP flow to u", &Pkt::new(ct, (vu, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    lab.forward(
        "affinity to B2 in a",
        &Pkt::new((CLIENT, 4004), (va, 80), SYN),
        (B2, 8080),
        &[c::FWD_NEW_FLOW],
    );

    let pinned: Vec<_> = lab.maps.affinity.iter().map(|e| e.expect("affinity entry")).collect();
    assert_eq!(pinned.len(), 1, "the client is pinned to B2 in a");

    // B2 leaves u and a (B3 takes over) but still serves v: the backend stays active.
    let u = fe("u", vu, 53, Protocol::Udp, &[(B3, 5353)], &[], 0);
    let ut = fe("u", vu, 80, Protocol::Tcp, &[(B3, 8080)], &[], 0);
    let a = fe("a", va, 80, Protocol::Tcp, &[(B3, 8080)], &[], 30);
    lab.sync(&[u, ut, v, vt, a]);
    // The reconciler forgets such affinity; put it back, as if the removal had not happened yet,
    // so that the datapath's own check is what is tested.
    for (k, v) in &pinned {
        lab.maps.affinity.insert(k, v, 0).expect("put the affinity entry back");
    }
    lab.forward(
        "UDP flow whose backend left its Service (but serves another): moves",
        &Pkt::new(cu, (vu, 53), UDP),
        (B3, 5353),
        &[c::CT_RESELECTED, c::FWD_NEW_FLOW],
    );
    lab.forward(
        "TCP flow whose backend left its Service: stays until it ends",
        &Pkt::new(ct, (vu, 80), ACK),
        (B2, 8080),
        &[c::FWD_ESTABLISHED],
    );
    lab.forward(
        "affinity to a backend that left the Service (but is active elsewhere): not used",
        &Pkt::new((CLIENT, 4006), (va, 80), SYN),
        (B3, 8080),
        &[c::FWD_NEW_FLOW],
    );
}

#[test]
fn syn_and_udp_follow_the_endpoint_conditions() {
    let mut lab = Lab::new("lifetimes-conditions");
    let vip = Ipv4Addr::new(10, 96, 1, 8);
    lab.sync(&[
        fe("s", vip, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0),
        fe("s", vip, 53, Protocol::Udp, &[(B2, 5353)], &[], 0),
    ]);
    let (ct, cu) = ((CLIENT, 5000), (CLIENT, 5002));
    lab.forward("TCP flow", &Pkt::new(ct, (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    lab.forward("UDP flow", &Pkt::new(cu, (vip, 53), UDP), (B2, 5353), &[c::FWD_NEW_FLOW]);

    // B2 terminating but serving; B3 ready.
    let serving = [((B2, 8080), BackendState::Serving)];
    let serving_u = [((B2, 5353), BackendState::Serving)];
    lab.sync(&[
        fe("s", vip, 80, Protocol::Tcp, &[(B3, 8080)], &serving, 0),
        fe("s", vip, 53, Protocol::Udp, &[(B3, 5353)], &serving_u, 0),
    ]);
    lab.forward(
        "serving: the TCP flow stays",
        &Pkt::new(ct, (vip, 80), ACK),
        (B2, 8080),
        &[c::FWD_ESTABLISHED],
    );
    lab.forward(
        "serving: the UDP flow stays (kube-proxy's cleanup spares it)",
        &Pkt::new(cu, (vip, 53), UDP),
        (B2, 5353),
        &[c::FWD_ESTABLISHED],
    );
    lab.forward(
        "a SYN on the flow's tuple never goes to a backend that is not active",
        &Pkt::new(ct, (vip, 80), SYN),
        (B3, 8080),
        &[c::CT_RESELECTED, c::FWD_NEW_FLOW],
    );

    // B2 no longer serving.
    let ct2 = (CLIENT, 5004);
    lab.sync(&[
        fe("s", vip, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0),
        fe("s", vip, 53, Protocol::Udp, &[(B3, 5353)], &serving_u, 0),
    ]);
    lab.forward("TCP flow", &Pkt::new(ct2, (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    let draining = [((B2, 8080), BackendState::Draining)];
    let draining_u = [((B2, 5353), BackendState::Draining)];
    lab.sync(&[
        fe("s", vip, 80, Protocol::Tcp, &[(B3, 8080)], &draining, 0),
        fe("s", vip, 53, Protocol::Udp, &[(B3, 5353)], &draining_u, 0),
    ]);
    lab.forward(
        "not serving: the TCP flow stays",
        &Pkt::new(ct2, (vip, 80), ACK),
        (B2, 8080),
        &[c::FWD_ESTABLISHED],
    );
    lab.forward(
        "not serving: the UDP flow moves",
        &Pkt::new(cu, (vip, 53), UDP),
        (B3, 5353),
        &[c::CT_RESELECTED, c::FWD_NEW_FLOW],
    );
}

const FIN_ACK: L4 = L4::Tcp { syn: false, ack: true, fin: true, rst: false };

/// Idles a flow's entry by `secs`.
fn idle(lab: &mut Lab, key: &Lb4CtKey, secs: u64) {
    let seen = lab.ct(key).expect("entry").last_seen_ns;
    lab.set_ct(key, |e| e.last_seen_ns = back(seen, secs));
}

/// `secs` before monotonic time `t`; the clock starts at boot, so a machine up for less cannot
/// run these tests (a clear failure, not a wrong result).
fn back(t: u64, secs: u64) -> u64 {
    t.checked_sub(secs * S).unwrap_or_else(|| panic!("the machine has been up for less than {secs} s"))
}

#[test]
fn a_half_closed_connection_lives_until_both_sides_close() {
    let mut lab = Lab::new("lifetimes-halfclose");
    let vip = Ipv4Addr::new(10, 96, 1, 9);
    lab.sync(&[fe("s", vip, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0)]);
    let (c1, c2) = ((CLIENT, 6000), (CLIENT, 6002));
    let fwd = |c| key(c, (vip, 80), TCP, CT_DIR_FORWARD);
    for c in [c1, c2] {
        lab.forward("SYN", &Pkt::new(c, (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
        lab.reply("SYN-ACK", &Pkt::new((B2, 8080), c, SYN_ACK), (vip, 80));
        lab.forward("ACK", &Pkt::new(c, (vip, 80), ACK), (B2, 8080), &[c::FWD_ESTABLISHED]);
    }
    // The client shuts down its side (shutdown(SHUT_WR)); the server sends for a long while.
    lab.forward("client FIN", &Pkt::new(c1, (vip, 80), FIN_ACK), (B2, 8080), &[c::FWD_ESTABLISHED]);
    idle(&mut lab, &fwd(c1), 20); // past the close timeout (10 s), far within the established one
    lab.reply("the server still sends, 20 s later", &Pkt::new((B2, 8080), c1, ACK), (vip, 80));
    lab.forward(
        "the client still acknowledges",
        &Pkt::new(c1, (vip, 80), ACK),
        (B2, 8080),
        &[c::FWD_ESTABLISHED],
    );
    // The server closes too: now the connection is closing, and a SYN on its tuple is new.
    // A SYN-ACK from the backend to the client's port while the flow is closing answers a
    // direct connection from that port, not the Service's: left alone, and the reply entry goes.
    let (c3, direct_syn_ack) = ((CLIENT, 6004), Pkt::new((B2, 8080), (CLIENT, 6004), SYN_ACK));
    lab.forward("SYN", &Pkt::new(c3, (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    lab.reply("SYN-ACK", &Pkt::new((B2, 8080), c3, SYN_ACK), (vip, 80));
    lab.forward("client FIN", &Pkt::new(c3, (vip, 80), FIN_ACK), (B2, 8080), &[c::FWD_ESTABLISHED]);
    lab.untouched("a SYN-ACK on a closing flow's tuple", true, &direct_syn_ack, c::PASS_STALE_REPLY_CT);
    lab.untouched("and the next one", true, &direct_syn_ack, c::PASS_NO_REPLY_CT);
    lab.reply("server FIN", &Pkt::new((B2, 8080), c1, FIN_ACK), (vip, 80));
    assert_eq!(lab.ct(&fwd(c1)).expect("forward").state, lb_common::CT_STATE_CLOSING);
    idle(&mut lab, &fwd(c1), 11);
    lab.untouched(
        "closed and idle past 10 s: its replies are the flow's no more",
        true,
        &Pkt::new((B2, 8080), c1, ACK),
        c::PASS_STALE_REPLY_CT,
    );
    // The same the other way round (the server closes first), and an RST closes at once.
    lab.reply("server FIN first", &Pkt::new((B2, 8080), c2, FIN_ACK), (vip, 80));
    idle(&mut lab, &fwd(c2), 20);
    lab.forward("the client still sends", &Pkt::new(c2, (vip, 80), ACK), (B2, 8080), &[c::FWD_ESTABLISHED]);
    lab.reply("RST", &Pkt::new((B2, 8080), c2, RST), (vip, 80));
    assert_eq!(lab.ct(&fwd(c2)).expect("forward").state, lb_common::CT_STATE_CLOSING);
    lab.forward(
        "a SYN after the RST is a new flow",
        &Pkt::new(c2, (vip, 80), SYN),
        (B2, 8080),
        &[c::FWD_NEW_FLOW],
    );
}

#[test]
fn an_evicted_forward_entry_is_rebuilt_from_a_reply_while_the_flow_may_go_on() {
    let mut lab = Lab::new("lifetimes-evicted-fwd");
    let vip = Ipv4Addr::new(10, 96, 1, 10);
    lab.sync(&[
        fe("s", vip, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0),
        fe("s", vip, 53, Protocol::Udp, &[(B2, 5353)], &[], 0),
    ]);
    let (ct, cold, cu) = ((CLIENT, 7000), (CLIENT, 7002), (CLIENT, 7004));
    let fwd = |c, port, proto| key(c, (vip, port), proto, CT_DIR_FORWARD);
    let rev = |c, port, proto| key((B2, port), c, proto, CT_DIR_REPLY);
    lab.forward("TCP flow", &Pkt::new(ct, (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    lab.forward("an idle TCP flow", &Pkt::new(cold, (vip, 80), SYN), (B2, 8080), &[c::FWD_NEW_FLOW]);
    lab.forward("UDP flow", &Pkt::new(cu, (vip, 53), UDP), (B2, 5353), &[c::FWD_NEW_FLOW]);

    // The server streams to a silent client; the forward entry is evicted from a full table.
    lab.maps.ct.remove(&fwd(ct, 80, TCP)).expect("evict");
    lab.reply(
        "the server's next packet still goes out from the VIP",
        &Pkt::new((B2, 8080), ct, ACK),
        (vip, 80),
    );
    let rebuilt = lab.ct(&fwd(ct, 80, TCP)).expect("forward entry rebuilt");
    assert_eq!((rebuilt.nat_addr, rebuilt.nat_port), (u32::from_ne_bytes(B2.octets()), 8080u16.to_be()));
    lab.forward(
        "and the client's packets reach the same backend",
        &Pkt::new(ct, (vip, 80), ACK),
        (B2, 8080),
        &[c::FWD_ESTABLISHED],
    );

    // Not when the reply entry is itself past its timeout: the flow is over.
    lab.maps.ct.remove(&fwd(cold, 80, TCP)).expect("evict");
    let seen = lab.ct(&rev(cold, 8080, TCP)).expect("reply entry").last_seen_ns;
    lab.set_ct(&rev(cold, 8080, TCP), |e| e.last_seen_ns = back(seen, 61)); // SYN state
    lab.untouched(
        "a reply of a flow past its timeout",
        true,
        &Pkt::new((B2, 8080), cold, SYN_ACK),
        c::PASS_STALE_REPLY_CT,
    );
    assert!(lab.ct(&fwd(cold, 80, TCP)).is_none(), "not rebuilt");

    // Nor when the backend may no longer keep the flow: UDP to a backend that stopped serving.
    lab.sync(&[
        fe("s", vip, 80, Protocol::Tcp, &[(B2, 8080)], &[], 0),
        fe("s", vip, 53, Protocol::Udp, &[(B3, 5353)], &[((B2, 5353), BackendState::Draining)], 0),
    ]);
    lab.maps.ct.remove(&fwd(cu, 53, UDP_P)).expect("evict");
    lab.untouched(
        "a UDP reply from a backend that stopped serving",
        true,
        &Pkt::new((B2, 5353), cu, UDP),
        c::PASS_STALE_REPLY_CT,
    );
    assert!(lab.ct(&fwd(cu, 53, UDP_P)).is_none(), "not rebuilt");
}

#[test]
fn the_sweep_reads_and_cleans_the_real_maps() {
    let mut lab = Lab::new("lifetimes-sweep");
    let vip = Ipv4Addr::new(10, 96, 1, 11);
    let now = monotonic_ns();
    // 1,000 UDP flows, every other one idle past its 60 s timeout (both entries), written as the
    // datapath writes them. 2,000 entries in 16,384 buckets: some buckets hold two, so a read
    // budget of 1 meets the kernel's ENOSPC (a bucket is copied whole) and must read on.
    for i in 0..1000u16 {
        let client = (CLIENT, 10_000 + i);
        let seen = if i % 2 == 0 { now } else { back(now, 61) };
        let fwd = key(client, (vip, 53), UDP_P, CT_DIR_FORWARD);
        let rev = key((B2, 5353), client, UDP_P, CT_DIR_REPLY);
        let e = lb_common::Lb4CtEntry {
            last_seen_ns: seen,
            created_s: (seen / 1_000_000_000) as u32,
            nat_addr: u32::from_ne_bytes(B2.octets()),
            nat_port: 5353u16.to_be(),
            state: lb_common::CT_STATE_ESTABLISHED,
            backend_id: 7,
            svc_id: 3,
            ..Default::default()
        };
        lab.maps.ct.insert(fwd, e, 0).expect("forward entry");
        let r = lb_common::Lb4CtEntry {
            nat_addr: u32::from_ne_bytes(vip.octets()),
            nat_port: 53u16.to_be(),
            ..e
        };
        lab.maps.ct.insert(rev, r, 0).expect("reply entry");
    }
    let mut sweeper = Sweeper::new(Timeouts::from_secs(60, 3600, 10, 60), 1);
    let census = (0..100_000)
        .find_map(|_| sweeper.step(&mut lab.maps, now, |_| None).expect("sweep step"))
        .expect("the pass ends");
    assert_eq!((census.flows(), census.member_flows(3, 7)), (500, 1000), "live flows and their uses");
    assert_eq!((sweeper.stats.expired, sweeper.stats.stale_replies), (500, 500));
    let left = lab.maps.ct.iter().filter_map(Result::ok).count();
    assert_eq!(left, 1000, "the live flows' entries are left");
    // Removing what is already gone is no failure (the datapath or the LRU may be first).
    let gone = key((CLIENT, 10_001), (vip, 53), UDP_P, CT_DIR_FORWARD);
    lab.maps.ct_remove(&gone).expect("absent conntrack entry");
    FlowTable::<lb_common::Lb4CtKey>::affinity_remove(
        &mut lab.maps,
        &lb_common::Lb4AffinityKey { client: 1, svc_id: 3 },
    )
    .expect("absent affinity entry");
    lab.maps.ct_remove(&lb_common::Lb6CtKey { sport: 7, ..Default::default() }).expect("absent IPv6 entry");
    FlowTable::<lb_common::Lb6CtKey>::affinity_remove(
        &mut lab.maps,
        &lb_common::Lb6AffinityKey { client: [0, 0, 0, 1], svc_id: 3 },
    )
    .expect("absent IPv6 affinity entry");
    lab.maps
        .remove_member(&MemberKey::V4(lb_common::Lb4MemberKey { svc_id: 3, backend_id: 7 }))
        .expect("absent member");
    lab.maps
        .remove_member(&MemberKey::V6(lb_common::Lb4MemberKey { svc_id: 3, backend_id: 7 }))
        .expect("absent IPv6 member");
    lab.maps
        .remove_service(&ServiceKey::V4(lb_common::Lb4ServiceKey::new([10, 96, 9, 9], 80, TCP)))
        .expect("absent service");
    let v6 =
        lb_common::Lb6ServiceKey::new("fd00::9".parse::<std::net::Ipv6Addr>().unwrap().octets(), 80, TCP);
    lab.maps.remove_service(&ServiceKey::V6(v6)).expect("absent IPv6 service");
}
