//! Per-packet cost of the datapath through BPF_PROG_TEST_RUN, beside no-op TC and XDP programs
//! measured in the same run. Run by `cargo xtask bench`.
//!
//! BPF_PROG_TEST_RUN reuses one packet buffer across `repeat` runs, so a program that rewrites the
//! packet would leave its path after the first run. Each path is therefore built to stay on it:
//! - established: two services point at each other (A → B, B → A); a packet to A is rewritten to
//!   B, then to A, ..., each run a conntrack hit with a real rewrite;
//! - new flow: the same, loaded with every conntrack timeout at 0, so each run misses, hashes,
//!   reads the Maglev table, writes both conntrack entries and rewrites: for a SYN, and for an ACK
//!   (a TCP flow picked up mid-stream, which first looks for a source port it may hold from a
//!   tuple clash: up to 8 more lookups);
//! - reply: two reply entries whose translations alternate (X → C becomes V → C and back), each
//!   with the live forward entry of its flow (a reply is translated only while its flow lives);
//! - non-VIP: a packet to no service, left as it is;
//! - on a kernel whose XDP programs cannot leave a mark for TC (`bpf_xdp_adjust_meta` refused),
//!   XDP leaves to TC a packet it would rewrite to an address that is itself a frontend, so the
//!   ping-pong above would measure that pass and not a translation: there each XDP row that
//!   translates runs one packet a call instead (`repeat` = 1, a fresh copy each call) to a Service
//!   E:80 → F:8080 whose backend is no frontend (the port rewritten too), beside the no-op XDP
//!   program run the same way;
//! - IPv6: the same established, new-flow, reply and non-VIP paths over IPv6 (A6 ↔ B6, X6 → C6),
//!   through the same entry programs, which hand IPv6 to the lb6 programs by tail call.

#[path = "common/report.rs"]
mod report;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
    EbpfLoader,
};
use clap::Parser;
use lb_agent::{
    datapath::{Config, Datapath, Maps, Mode, PROG_TC_FORWARD, PROG_TC_REPLY, PROG_XDP_FORWARD},
    model::{BackendAddr, Frontend, FrontendAddr, Protocol},
    reconcile::{Capacities, Options, Reconciler},
};
use lb_common::{
    maps6::addr6, Lb4CtEntry, Lb4CtKey, Lb4Service, Lb4ServiceKey, Lb6CtEntry, Lb6CtKey, CT_DIR_FORWARD,
    CT_DIR_REPLY, CT_STATE_ESTABLISHED,
};
use lb_testkit::NOOP_OBJECT;

#[derive(Parser)]
struct Args {
    /// Fewer repetitions.
    #[arg(long)]
    quick: bool,
    /// Write the results into this Markdown file (replacing the per-packet section).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Service counts to measure the established path with.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    services: Vec<u32>,
    /// Other flows in the conntrack map while measuring (default 1,000,000; 100,000 with --quick).
    #[arg(long)]
    ct_entries: Option<u32>,
}

const A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
/// A second pair whose rewrites change the port too (C:80 → D:8080 → C:80).
const C: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 3);
const D: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 4);
/// A Service whose backend is no frontend (E:80 → F:8080), for XDP without marks.
const E: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 5);
const F: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 7);

/// IPv6 Services pointing at each other, as A and B.
const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 2);
const E6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 5);
const F6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 3, 0, 0, 0, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 10);

/// Ethernet + IPv6 + TCP (ACK) + 8 bytes, as [`packet`].
fn packet6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 40 + 20 + 8];
    p[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    p[14] = 0x60;
    p[18..20].copy_from_slice(&28u16.to_be_bytes());
    p[20] = 6;
    p[21] = 64;
    p[22..38].copy_from_slice(&src.0.octets());
    p[38..54].copy_from_slice(&dst.0.octets());
    p[54..56].copy_from_slice(&src.1.to_be_bytes());
    p[56..58].copy_from_slice(&dst.1.to_be_bytes());
    p[66] = 0x50;
    p[67] = 0x10; // ACK
    p
}

fn packet(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    // Ethernet + IPv4 + TCP (ACK) + 8 bytes; checksums are not checked by the programs.
    let mut p = vec![0u8; 14 + 20 + 20 + 8];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    p[14] = 0x45;
    p[16..18].copy_from_slice(&48u16.to_be_bytes());
    p[22] = 64;
    p[23] = 6;
    p[26..30].copy_from_slice(&src.0.octets());
    p[30..34].copy_from_slice(&dst.0.octets());
    p[34..36].copy_from_slice(&src.1.to_be_bytes());
    p[36..38].copy_from_slice(&dst.1.to_be_bytes());
    p[46] = 0x50;
    p[47] = 0x10; // ACK
    p
}

struct Pins(PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(pin_dir: &Path, ct_timeouts_secs: u64, ct_fill: u32) -> Config {
    Config {
        pin_dir: pin_dir.to_path_buf(),
        caps: Capacities {
            services: 131_072,
            backends: 1024,
            maglev_slots: 65_536,
            ct: ct_fill + 65_536,
            affinity: 1024,
            members: 1024,
        },
        ct_timeout_tcp_syn_secs: ct_timeouts_secs,
        ct_timeout_tcp_established_secs: ct_timeouts_secs,
        ct_timeout_tcp_close_secs: ct_timeouts_secs,
        ct_timeout_udp_secs: ct_timeouts_secs,
        flow_hash_seed: lb_common::hash::DEFAULT_FLOW_HASH_SEED,
        hairpin_addr: lb_common::DEFAULT_HAIRPIN_ADDR.into(),
        hairpin_addr6: lb_common::DEFAULT_HAIRPIN_ADDR6.into(),
        snat_ports: lb_common::DEFAULT_SNAT_PORTS,
        bpf_log: false,
        tc_order: Default::default(),
        tc_attach: Default::default(),
        node_xdp: false,
        socket_lb: lb_agent::datapath::SocketLb::Off,
        ipv6: true,
    }
}

/// `count` unrelated established flows (both entries of each), as a busy node holds them.
fn fill_conntrack(maps: &mut Maps, count: u32) -> anyhow::Result<()> {
    for i in 0..count / 2 {
        let client = u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i / 50_000;
        let sport = (10_000 + i % 50_000) as u16;
        let backend = u32::from(Ipv4Addr::new(10, 244, 9, 0)) + i % 200;
        let entry = |nat: u32, port: u16| Lb4CtEntry {
            nat_addr: nat.to_be(),
            nat_port: port.to_be(),
            state: CT_STATE_ESTABLISHED,
            backend_id: 1,
            svc_id: 1,
            ..Default::default()
        };
        let key = |s: u32, d: u32, sp: u16, dp: u16, dir: u8| Lb4CtKey {
            saddr: s.to_be(),
            daddr: d.to_be(),
            sport: sp.to_be(),
            dport: dp.to_be(),
            proto: 6,
            dir,
            _pad: 0,
        };
        let vip = u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i % 1000;
        maps.ct.insert(key(client, vip, sport, 80, CT_DIR_FORWARD), entry(backend, 8080), 0)?;
        maps.ct.insert(key(backend, client, 8080, sport, CT_DIR_REPLY), entry(vip, 80), 0)?;
    }
    Ok(())
}

/// A:80 → B:80 and B:80 → A:80, so that rewrites ping-pong between two established flows; and
/// C:80 → D:8080, D:8080 → C:80, the same with the port rewritten too.
fn ping_pong(maps: &mut Maps) -> anyhow::Result<()> {
    let fe = |(vip, port): (IpAddr, u16), (to, to_port): (IpAddr, u16)| Frontend {
        addr: FrontendAddr::new(vip, port, Protocol::Tcp),
        kind: lb_agent::model::FrontendKind::ClusterIp,
        service: format!("bench/{vip}"),
        port_name: String::new(),
        backends: vec![BackendAddr { ip: to, port: to_port, proto: Protocol::Tcp }],
        kept: Vec::new(),
        affinity_timeout_secs: 0,
        local_only: false,
        two_scopes: false,
        source_ranges: None,
    };
    let v4 = |a: Ipv4Addr| IpAddr::V4(a);
    let v6 = |a: Ipv6Addr| IpAddr::V6(a);
    let desired: BTreeMap<_, _> = [
        fe((v4(A), 80), (v4(B), 80)),
        fe((v4(B), 80), (v4(A), 80)),
        fe((v4(C), 80), (v4(D), 8080)),
        fe((v4(D), 8080), (v4(C), 80)),
        fe((v6(A6), 80), (v6(B6), 80)),
        fe((v6(B6), 80), (v6(A6), 80)),
        fe((v4(E), 80), (v4(F), 8080)),
        fe((v6(E6), 80), (v6(F6), 8080)),
    ]
    .into_iter()
    .map(|f| (f.addr, f))
    .collect();
    let caps =
        Capacities { services: 131_072, backends: 1024, maglev_slots: 65_536, ..Capacities::default() };
    let mut r = Reconciler::new(caps, Options::default());
    let (_, errors) = r.sync(&desired, &Default::default(), maps);
    anyhow::ensure!(errors.is_empty(), "{errors:?}");
    Ok(())
}

/// The agent's start-up step: the programs' port filter knows the rows' ports and is armed.
fn arm_port_filter(maps: &mut Maps) -> anyhow::Result<()> {
    anyhow::ensure!(maps.note_pinned_ports()?, "the port filter did not arm");
    Ok(())
}

/// Adds filler services until the map holds `total` (sharing A's table; never matched).
fn fill_services(maps: &mut Maps, total: u32) -> anyhow::Result<()> {
    let a = maps.services.get(&Lb4ServiceKey::new(A.octets(), 80, 6), 0)?;
    let have = maps.read_services()?.len() as u32;
    for i in have..total {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i);
        let svc = Lb4Service { id: 5 + i, ..a };
        maps.services.insert(Lb4ServiceKey::new(ip.octets(), 443, 6), svc, 0)?;
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Stat {
    min: f64,
    median: f64,
    max: f64,
}

fn measure(
    rounds: usize,
    repeat: u32,
    mut run: impl FnMut(u32) -> anyhow::Result<f64>,
) -> anyhow::Result<Stat> {
    run(2)?; // warm-up, and the first runs that create the ping-pong flows
    let mut v: Vec<f64> = (0..rounds).map(|_| run(repeat)).collect::<Result<_, _>>()?;
    v.sort_by(f64::total_cmp);
    Ok(Stat { min: v[0], median: v[v.len() / 2], max: v[v.len() - 1] })
}

fn tc_run(p: &SchedClassifier, pkt: &[u8], repeat: u32) -> anyhow::Result<f64> {
    let r = p.test_run(TestRunOptions { data_in: Some(pkt), repeat, ..Default::default() })?;
    Ok(r.duration.as_nanos() as f64)
}

fn xdp_run(p: &Xdp, pkt: &[u8], repeat: u32) -> anyhow::Result<f64> {
    let r = p.test_run(TestRunOptions { data_in: Some(pkt), repeat, ..Default::default() })?;
    Ok(r.duration.as_nanos() as f64)
}

/// The kernel's time for one run of `p` on a fresh copy of `pkt`, averaged over `calls` calls.
fn xdp_each(p: &Xdp, pkt: &[u8], calls: u32) -> anyhow::Result<f64> {
    let mut total = 0f64;
    for _ in 0..calls {
        total += xdp_run(p, pkt, 1)?;
    }
    Ok(total / f64::from(calls))
}

/// Checks that one run of program `p` rewrites the address at bytes `at` of `pkt` to `to`, so
/// that a row measures a translation and not a packet passed on untouched (or left to TC).
fn translates<P>(p: &P, pkt: &[u8], at: std::ops::Range<usize>, to: &[u8]) -> anyhow::Result<()>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; pkt.len() + 64];
    let r =
        p.test_run(TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ..Default::default() })?;
    let got = out.get(at).context("test run output too short")?;
    anyhow::ensure!(got == to, "not translated (verdict {}, address {got:02x?})", r.return_value);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (rounds, repeat) = if args.quick { (3, 100_000) } else { (7, 1_000_000) };
    let base = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}", std::process::id()));
    let _pins = Pins(base.clone());

    // No-op baselines.
    let mut noop = EbpfLoader::new().load(NOOP_OBJECT).context("loading no-op programs")?;
    let noop_tc: &mut SchedClassifier = noop.program_mut("noop_tc").context("noop_tc")?.try_into()?;
    noop_tc.load()?;
    let noop_xdp: &mut Xdp = noop.program_mut("noop_xdp").context("noop_xdp")?.try_into()?;
    noop_xdp.load()?;
    let noop_tc: &SchedClassifier = noop.program("noop_tc").context("noop_tc")?.try_into()?;
    let noop_xdp: &Xdp = noop.program("noop_xdp").context("noop_xdp")?.try_into()?;

    let ct_fill = args.ct_entries.unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
    println!("filling both conntrack maps with {ct_fill} entries");
    let (dp, mut maps) = Datapath::load(&config(&base.join("est"), 3600, ct_fill), Mode::Xdp)?;
    fill_conntrack(&mut maps, ct_fill)?;
    ping_pong(&mut maps)?;
    arm_port_filter(&mut maps)?;
    let (dp_new, mut maps_new) = Datapath::load(&config(&base.join("new"), 0, ct_fill), Mode::Xdp)?;
    fill_conntrack(&mut maps_new, ct_fill)?;
    ping_pong(&mut maps_new)?;
    arm_port_filter(&mut maps_new)?;
    // Reply entries that alternate: X → C becomes A → C, and A → C becomes X → C.
    let x = (Ipv4Addr::new(10, 244, 2, 4), 8080u16);
    let c = (CLIENT, 40_000u16);
    // Another client port than the forward paths', whose flows would clash with these.
    let rc = (CLIENT, 41_000u16);
    for (from, to) in [(x, (A, 80)), ((A, 80), x)] {
        let key = Lb4CtKey {
            saddr: u32::from_ne_bytes(from.0.octets()),
            daddr: u32::from_ne_bytes(rc.0.octets()),
            sport: from.1.to_be(),
            dport: rc.1.to_be(),
            proto: 6,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let e = Lb4CtEntry {
            nat_addr: u32::from_ne_bytes(to.0.octets()),
            nat_port: to.1.to_be(),
            state: CT_STATE_ESTABLISHED,
            backend_id: 1,
            svc_id: 1,
            ..Default::default()
        };
        maps.ct.insert(key, e, 0)?;
        // A reply is translated only while its flow is alive: the forward entry of each.
        let fwd_key = Lb4CtKey {
            saddr: key.daddr,
            daddr: e.nat_addr,
            sport: key.dport,
            dport: e.nat_port,
            proto: 6,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let fwd = Lb4CtEntry {
            nat_addr: key.saddr,
            nat_port: key.sport,
            last_seen_ns: lb_agent::datapath::monotonic_ns(),
            ..e
        };
        maps.ct.insert(fwd_key, fwd, 0)?;
    }

    // The same alternating reply entries over IPv6: X6 → C6 becomes A6 → C6, and back.
    let x6 = (Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 4), 8080u16);
    let rc6 = (CLIENT6, 41_000u16);
    let m6 = maps.v6.as_mut().context("the IPv6 maps")?;
    for (from, to) in [(x6, (A6, 80)), ((A6, 80), x6)] {
        let key = Lb6CtKey {
            saddr: addr6(from.0.octets()),
            daddr: addr6(rc6.0.octets()),
            sport: from.1.to_be(),
            dport: rc6.1.to_be(),
            proto: 6,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let e = Lb6CtEntry {
            nat_addr: addr6(to.0.octets()),
            nat_port: to.1.to_be(),
            state: CT_STATE_ESTABLISHED,
            backend_id: 1,
            svc_id: 1,
            ..Default::default()
        };
        m6.ct.insert(key, e, 0)?;
        let fwd_key = Lb6CtKey {
            saddr: key.daddr,
            daddr: e.nat_addr,
            sport: key.dport,
            dport: e.nat_port,
            proto: 6,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let fwd = Lb6CtEntry {
            nat_addr: key.saddr,
            nat_port: key.sport,
            last_seen_ns: lb_agent::datapath::monotonic_ns(),
            ..e
        };
        m6.ct.insert(fwd_key, fwd, 0)?;
    }

    let to_a = packet(c, (A, 80));
    let to_c = packet(c, (C, 80));
    let non_vip = packet(c, (Ipv4Addr::new(10, 244, 1, 5), 80));
    let reply = packet(x, rc);
    let tc_fwd = dp.tc_program(PROG_TC_FORWARD).context("tc forward")?;
    let tc_rep = dp.tc_program(PROG_TC_REPLY).context("tc reply")?;
    let xdp = dp.xdp_program(PROG_XDP_FORWARD).context("xdp")?;
    let tc_fwd_new = dp_new.tc_program(PROG_TC_FORWARD).context("tc forward")?;
    let xdp_new = dp_new.xdp_program(PROG_XDP_FORWARD).context("xdp")?;

    println!("per-packet cost, ns (BPF_PROG_TEST_RUN, repeat {repeat}, {rounds} rounds: min / median / max)");
    let mut rows: Vec<(String, &str, Stat)> = Vec::new();
    let mut add = |path: &str, prog: &'static str, s: Stat| {
        println!("  {path:<34} {prog:<4} {:7.1} {:7.1} {:7.1}", s.min, s.median, s.max);
        rows.push((path.to_string(), prog, s));
    };
    add("no-op program", "TC", measure(rounds, repeat, |r| tc_run(noop_tc, &to_a, r))?);
    add("no-op program", "XDP", measure(rounds, repeat, |r| xdp_run(noop_xdp, &to_a, r))?);
    // XDP rows that translate: ping-pong where XDP marks, one packet a call to E → F where not.
    let marks = lb_agent::datapath::probe::Kernel::probe().xdp_meta;
    let calls = if args.quick { 2_000 } else { 20_000 };
    let each = "XDP, one run a call";
    let to_e = packet(c, (E, 80));
    let mut syn_e = to_e.clone();
    syn_e[47] = 0x02;
    let to_e6 = packet6((CLIENT6, 40_000), (E6, 80));
    let mut syn_e6 = to_e6.clone();
    syn_e6[67] = 0x02;
    if !marks {
        println!("this kernel refuses bpf_xdp_adjust_meta: XDP rows that translate run one packet a call");
        add("no-op program", each, measure(rounds, calls, |n| xdp_each(noop_xdp, &to_a, n))?);
        for (p, pkt) in [(xdp_new, &syn_e), (xdp_new, &to_e), (xdp, &to_e)] {
            translates(p, pkt, 30..34, &F.octets())?;
        }
        for (p, pkt) in [(xdp_new, &syn_e6), (xdp, &to_e6)] {
            translates(p, pkt, 38..54, &F6.octets())?;
        }
    }
    let xdp_row = |p: &Xdp, ping_pong: &[u8], single: &[u8]| -> anyhow::Result<(&'static str, Stat)> {
        Ok(if marks {
            ("XDP", measure(rounds, repeat, |r| xdp_run(p, ping_pong, r))?)
        } else {
            (each, measure(rounds, calls, |n| xdp_each(p, single, n))?)
        })
    };
    add("non-VIP packet", "TC", measure(rounds, repeat, |r| tc_run(tc_fwd, &non_vip, r))?);
    add("non-VIP packet", "XDP", measure(rounds, repeat, |r| xdp_run(xdp, &non_vip, r))?);
    // A connection's first packet (SYN), and a TCP flow picked up mid-stream (an ACK of no live
    // flow, after its entry expired or was evicted), which looks for a source port it may hold.
    let mut syn_a = to_a.clone();
    syn_a[47] = 0x02;
    add("new flow (SYN)", "TC", measure(rounds, repeat, |r| tc_run(tc_fwd_new, &syn_a, r))?);
    let (g, st) = xdp_row(xdp_new, &syn_a, &syn_e)?;
    add("new flow (SYN)", g, st);
    add(
        "new flow, TCP picked up mid-stream (ACK)",
        "TC",
        measure(rounds, repeat, |r| tc_run(tc_fwd_new, &to_a, r))?,
    );
    let (g, st) = xdp_row(xdp_new, &to_a, &to_e)?;
    add("new flow, TCP picked up mid-stream (ACK)", g, st);
    add("reply (reverse NAT)", "TC", measure(rounds, repeat, |r| tc_run(tc_rep, &reply, r))?);
    for n in &args.services {
        fill_services(&mut maps, *n)?;
        let label = format!("established flow, {n} services");
        add(&label, "TC", measure(rounds, repeat, |r| tc_run(tc_fwd, &to_a, r))?);
        let (g, st) = xdp_row(xdp, &to_a, &to_e)?;
        add(&label, g, st);
    }
    let label =
        format!("established flow, port rewritten too, {} services", args.services.last().unwrap_or(&1));
    add(&label, "TC", measure(rounds, repeat, |r| tc_run(tc_fwd, &to_c, r))?);
    if marks {
        add(&label, "XDP", measure(rounds, repeat, |r| xdp_run(xdp, &to_c, r))?);
    }
    // IPv6, through the same entry programs (a tail call to the lb6 programs; the forward one is
    // two, a second tail call).
    let c6 = (CLIENT6, 40_000u16);
    let to_a6 = packet6(c6, (A6, 80));
    let mut syn_a6 = to_a6.clone();
    syn_a6[67] = 0x02;
    let non_vip6 = packet6(c6, (Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5), 80));
    add("IPv6: non-VIP packet", "TC", measure(rounds, repeat, |r| tc_run(tc_fwd, &non_vip6, r))?);
    add("IPv6: non-VIP packet", "XDP", measure(rounds, repeat, |r| xdp_run(xdp, &non_vip6, r))?);
    add("IPv6: new flow (SYN)", "TC", measure(rounds, repeat, |r| tc_run(tc_fwd_new, &syn_a6, r))?);
    let (g, st) = xdp_row(xdp_new, &syn_a6, &syn_e6)?;
    add("IPv6: new flow (SYN)", g, st);
    add("IPv6: established flow", "TC", measure(rounds, repeat, |r| tc_run(tc_fwd, &to_a6, r))?);
    let (g, st) = xdp_row(xdp, &to_a6, &to_e6)?;
    add("IPv6: established flow", g, st);
    let reply6 = packet6(x6, rc6);
    translates(tc_rep, &reply6, 22..38, &A6.octets())?; // the source, rewritten
    add("IPv6: reply (reverse NAT)", "TC", measure(rounds, repeat, |r| tc_run(tc_rep, &reply6, r))?);
    drop(maps_new);

    let maglev = maglev_figures(if args.quick { 3 } else { 11 });
    if let Some(path) = args.markdown {
        write_markdown(&path, &rows, repeat, rounds, args.quick)?;
        report::write_section(&path, "maglev", &maglev)?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

/// Maglev table memory against fixed sizes, build time, and balance; returns a Markdown section.
fn maglev_figures(rounds: usize) -> String {
    use lb_agent::model::maglev::{build, table_size, Backend, DEFAULT_MAX_TABLE_SIZE};
    let mib = |slots: u64| slots as f64 * 4.0 / (1024.0 * 1024.0);
    let mut md =
        String::from("## Maglev tables\n\nCommand: `cargo xtask bench` (pure computation, no kernel).\n\n");
    md.push_str("| services × backends | lb table size | lb memory | fixed 16,381 slots | fixed 65,537 slots |\n|---|---:|---:|---:|---:|\n");
    println!("maglev table memory (4 bytes a slot):");
    for (services, backends) in [(10_000u64, 3usize), (1_000, 100), (100_000, 3)] {
        let m = u64::from(table_size(backends, DEFAULT_MAX_TABLE_SIZE));
        let line = format!(
            "| {services} × {backends} | {m} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            mib(services * m),
            mib(services * 16_381),
            mib(services * 65_537)
        );
        println!("  {line}");
        md.push_str(&line);
        md.push('\n');
    }
    let names: Vec<String> =
        (0..1000).map(|i| format!("10.244.{}.{}:8080/TCP", i / 250, i % 250 + 1)).collect();
    let bs: Vec<Backend<'_>> = names.iter().map(|n| Backend { name: n, weight: 1 }).collect();
    let mut times: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = std::time::Instant::now();
            std::hint::black_box(build(&bs, 65_537, 0));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let line = format!(
        "Build of one 65,537-slot table for 1,000 backends: min {:.2} ms, median {:.2} ms, max {:.2} ms ({rounds} runs, release build).",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    println!("  {line}");
    md.push_str(&format!("\n{line}\n\n"));
    md.push_str("Balance (slots per backend, max − min, and max/min − 1):\n\n| backends | lb table | lb spread | 65,537-slot spread |\n|---:|---:|---:|---:|\n");
    for n in [3usize, 10, 100, 1000] {
        let spread = |m: u32| {
            let t = build(&bs[..n], m, 0);
            let mut c = vec![0u32; n];
            for i in t {
                c[i as usize] += 1;
            }
            let (lo, hi) = (*c.iter().min().expect("n > 0"), *c.iter().max().expect("n > 0"));
            format!("{} ({:.2} %)", hi - lo, (f64::from(hi) / f64::from(lo) - 1.0) * 100.0)
        };
        let m = table_size(n, DEFAULT_MAX_TABLE_SIZE);
        let line = format!("| {n} | {m} | {} | {} |", spread(m), spread(65_537));
        println!("  {line}");
        md.push_str(&line);
        md.push('\n');
    }
    md.push_str(&scaling_figures(&names));
    md
}

/// Flows moved on surviving backends when one Service scales from 1 to 30 backends and back, one
/// at a time: lb's tiered table sizes against a fixed 16,381-slot table.
fn scaling_figures(names: &[String]) -> String {
    use lb_agent::model::maglev::{build, moved_on_survivors, table_size, Backend, DEFAULT_MAX_TABLE_SIZE};
    let table = |n: usize, m: u32| {
        let bs: Vec<Backend<'_>> = names[..n].iter().map(|x| Backend { name: x, weight: 1 }).collect();
        build(&bs, m, 0)
    };
    let moved = |a: usize, b: usize, fixed: bool| {
        let size = |n| if fixed { 16_381 } else { table_size(n, DEFAULT_MAX_TABLE_SIZE) };
        moved_on_survivors(&names[..a], &table(a, size(a)), &names[..b], &table(b, size(b)), 100_000) * 100.0
    };
    let mut md = String::from(
        "\nScaling one Service from 1 to 30 backends and back, one at a time: flows on surviving backends that move (100,000 flows hashed onto each table; lb / fixed 16,381 slots):\n\n| backends | lb table | up to n + 1 | down from n + 1 |\n|---:|---:|---:|---:|\n",
    );
    println!("  flows moved on surviving backends, scaling 1 -> 30 -> 1 (lb / fixed 16,381):");
    let mut worst_excess = 0f64;
    for n in 1..30 {
        let (up, up_f, down, down_f) =
            (moved(n, n + 1, false), moved(n, n + 1, true), moved(n + 1, n, false), moved(n + 1, n, true));
        let step = table_size(n, DEFAULT_MAX_TABLE_SIZE) != table_size(n + 1, DEFAULT_MAX_TABLE_SIZE);
        if !step {
            worst_excess = worst_excess.max(up - up_f).max(down - down_f);
        }
        let line = format!(
            "| {n} | {} | {up:.1} % / {up_f:.1} %{} | {down:.1} % / {down_f:.1} % |",
            table_size(n, DEFAULT_MAX_TABLE_SIZE),
            if step { " (size step)" } else { "" }
        );
        println!("    {line}");
        md.push_str(&line);
        md.push('\n');
    }
    md.push_str(&format!(
        "\nAt steps within a size, lb moves at most {worst_excess:.1} points more than the fixed table (a step adding a backend moves the share it takes over either way).\n"
    ));
    md
}

fn write_markdown(
    path: &Path,
    rows: &[(String, &str, Stat)],
    repeat: u32,
    rounds: usize,
    quick: bool,
) -> anyhow::Result<()> {
    let noop = |prog: &str| {
        rows.iter().find(|(p, g, _)| p == "no-op program" && *g == prog).map_or(0.0, |r| r.2.median)
    };
    let date = report::today();
    let mut s = String::new();
    s.push_str("## Per-packet cost (BPF_PROG_TEST_RUN)\n\n");
    s.push_str(&format!(
        "Command: `cargo xtask bench{}` · date: {date} · machine: {}\n\n",
        if quick { " --quick" } else { "" },
        report::machine()
    ));
    s.push_str(&format!("Each figure is the kernel's average over `repeat` = {repeat} runs; {rounds} rounds give min / median / max. \"Over no-op\" is the median minus the no-op program's median of the same type, measured in the same run.\n\n"));
    s.push_str(
        "| path | program | min ns | median ns | max ns | over no-op |\n|---|---|---:|---:|---:|---:|\n",
    );
    for (p, g, st) in rows {
        s.push_str(&format!(
            "| {p} | {g} | {:.1} | {:.1} | {:.1} | {:+.1} |\n",
            st.min,
            st.median,
            st.max,
            st.median - noop(g)
        ));
    }
    report::write_section(path, "per-packet", &s)
}
