//! The conntrack map under pressure, through BPF_PROG_TEST_RUN: a flood of new flows ten times the
//! table's size while established flows keep talking, and many short connections.
//!
//! The conntrack map is an LRU hash: a full table evicts the least recently used entries, and a
//! lookup marks an entry as used (the kernel's LRU is approximate: a used entry gets a second
//! chance). Flows that keep sending survive a flood; idle ones may go. A flow whose entries were evicted is picked again by Maglev, which gives the same
//! backend while the backends are unchanged: it keeps working either way.

mod support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{
    datapath::{Datapath, Maps, Mode, PROG_TC_FORWARD, PROG_TC_REPLY},
    model::{BackendAddr, Frontend, FrontendAddr, Protocol},
    reconcile::{Capacities, Options, Reconciler},
};
use lb_common::counters as c;
use support::*;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TABLE: u32 = 4096;
const FIN_ACK: L4 = L4::Tcp { syn: false, ack: true, fin: true, rst: false };

fn setup(test: &str) -> (PinDir, Datapath, Maps) {
    let pins = PinDir::new(test);
    let mut config = test_config(pins.path());
    config.caps.ct = TABLE;
    let (dp, mut maps) = Datapath::load(&config, Mode::Tc).expect("load datapath");
    let backends = (2..5).map(|i| BackendAddr {
        ip: Ipv4Addr::new(10, 244, 1, i).into(),
        port: 8080,
        proto: Protocol::Tcp,
    });
    let fe = Frontend {
        addr: FrontendAddr::new(VIP, 80, Protocol::Tcp),
        kind: lb_agent::model::FrontendKind::ClusterIp,
        service: "flood/web".into(),
        port_name: String::new(),
        backends: backends.collect(),
        kept: Vec::new(),
        affinity_timeout_secs: 0,
        local_only: false,
        two_scopes: false,
        source_ranges: None,
    };
    let caps = Capacities { services: 64, backends: 64, maglev_slots: 65_536, ..Capacities::default() };
    let opts = Options::default();
    let desired: BTreeMap<_, _> = [(fe.addr, fe)].into_iter().collect();
    let (_, errors) = Reconciler::new(caps, opts).sync(&desired, &Default::default(), &mut maps);
    assert!(errors.is_empty(), "{errors:?}");
    (pins, dp, maps)
}

/// Runs a packet through the TC forward (or reply) program; returns where it went.
fn send(dp: &Datapath, reply: bool, pkt: Pkt) -> (Ipv4Addr, u16) {
    let bytes = pkt.bytes();
    let mut out = vec![0u8; bytes.len() + 256];
    let opts = TestRunOptions { data_in: Some(&bytes), data_out: Some(&mut out), ..Default::default() };
    let prog = dp.tc_program(if reply { PROG_TC_REPLY } else { PROG_TC_FORWARD }).expect("program");
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, u32::MAX, "passed on (TCX_NEXT)");
    out.truncate(r.data_size_out as usize);
    let seen = check_packet(&out);
    if reply {
        seen.src
    } else {
        seen.dst
    }
}

fn counter(maps: &Maps, index: u32) -> u64 {
    maps.read_counters().expect("counters")[index as usize]
}

fn client(i: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 100, 0)) + i / 40_000), 20_000 + (i % 40_000) as u16)
}

#[test]
fn established_flows_survive_a_syn_flood_of_ten_times_the_table() {
    flood("syn-flood", false);
}

#[test]
fn established_flows_survive_a_connection_flood_of_ten_times_the_table() {
    flood("conn-flood", true);
}

/// 200 active and 200 idle established flows, then 10 × the table in new flows: SYNs only
/// (`handshake` false), or SYN then ACK (each flood entry is used again, as a real connection's).
fn flood(test: &str, handshake: bool) {
    let (_pins, dp, maps) = setup(test);
    // 200 flows that keep talking and 200 that go quiet, each with its backend.
    let (active, idle): (Vec<u32>, Vec<u32>) = ((0..200).collect(), (200..400).collect());
    let mut backend = BTreeMap::new();
    for i in active.iter().chain(&idle) {
        let b = send(&dp, false, Pkt::new(client(*i), (VIP, 80), SYN));
        assert_eq!(send(&dp, true, Pkt::new(b, client(*i), SYN_ACK)), (VIP, 80));
        send(&dp, false, Pkt::new(client(*i), (VIP, 80), ACK));
        backend.insert(*i, b);
    }

    // The flood: 10 × the table in new flows (two entries each); every 256 of them, each active
    // flow sends a packet and gets a reply.
    let flood = 10 * TABLE;
    let (mut hits, mut asked, mut reply_hits) = (0u64, 0u64, 0u64);
    for k in 0..flood {
        send(&dp, false, Pkt::new(client(1_000_000 + k), (VIP, 80), SYN));
        if handshake {
            send(&dp, false, Pkt::new(client(1_000_000 + k), (VIP, 80), ACK));
        }
        if k % 256 == 255 {
            for i in &active {
                let before = counter(&maps, c::FWD_ESTABLISHED);
                let b = send(&dp, false, Pkt::new(client(*i), (VIP, 80), ACK));
                assert_eq!(b, backend[i], "active flow {i} moved during the flood");
                hits += counter(&maps, c::FWD_ESTABLISHED) - before;
                asked += 1;
                // A reply whose entry was evicted passes untranslated (the client would drop it;
                // the next forward packet re-creates the entries).
                reply_hits += u64::from(send(&dp, true, Pkt::new(b, client(*i), ACK)) == (VIP, 80));
            }
        }
    }
    // Afterwards: how many flows still had their entries?
    let survived = |flows: &[u32]| {
        flows
            .iter()
            .filter(|i| {
                let before = counter(&maps, c::FWD_ESTABLISHED);
                let b = send(&dp, false, Pkt::new(client(**i), (VIP, 80), ACK));
                assert_eq!(b, backend[*i], "flow {i} kept its backend (Maglev picks it again if evicted)");
                counter(&maps, c::FWD_ESTABLISHED) > before
            })
            .count()
    };
    let (active_left, idle_left) = (survived(&active), survived(&idle));
    println!(
        "{test}: {flood} new flows into a {TABLE}-entry table: during the flood {hits} of {asked} forward packets \
         and {reply_hits} of {asked} replies of active flows found their entries; afterwards {active_left}/200 active \
         and {idle_left}/200 idle flows had theirs"
    );
    // The kernel's LRU is approximate (per-CPU free lists, batch rotation): active flows keep
    // their entries almost always, idle ones lose them.
    assert!(hits * 100 >= asked * 95, "active flows kept their forward entries: {hits} of {asked}");
    assert!(reply_hits * 100 >= asked * 95, "active flows kept their reply entries: {reply_hits} of {asked}");
    assert!(active_left >= 190, "active flows survive: {active_left}/200");
    // Idle flows: reported. The kernel's LRU gives a used entry a second chance, so a SYN flood
    // (entries never used again) mostly evicts its own entries; a connection flood evicts idle
    // flows too.
    let _ = idle_left;
}

#[test]
fn many_short_connections_leave_a_bounded_table() {
    let (_pins, dp, maps) = setup("short");
    let connections = 30 * TABLE;
    for k in 0..connections {
        let cl = client(k);
        let b = send(&dp, false, Pkt::new(cl, (VIP, 80), SYN));
        send(&dp, true, Pkt::new(b, cl, SYN_ACK));
        send(&dp, false, Pkt::new(cl, (VIP, 80), ACK));
        send(&dp, false, Pkt::new(cl, (VIP, 80), FIN_ACK));
        send(&dp, true, Pkt::new(b, cl, FIN_ACK));
    }
    let entries = maps.ct.keys().filter(Result::is_ok).count() as u32;
    println!("{connections} short connections: {entries} conntrack entries left (capacity {TABLE})");
    assert!(entries <= TABLE, "{entries} entries in a {TABLE}-entry table");
    assert_eq!(counter(&maps, c::CT_INSERT_FAILED), 0, "the full table never refused a new flow");
    // A new connection still works.
    let cl = client(5_000_000);
    let b = send(&dp, false, Pkt::new(cl, (VIP, 80), SYN));
    assert_eq!(send(&dp, true, Pkt::new(b, cl, SYN_ACK)), (VIP, 80));
}
