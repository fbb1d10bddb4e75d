//! Hostile packets through BPF_PROG_TEST_RUN: random and mutated packets (truncated at every
//! offset, bogus IHL, IP options, fragments, every TCP flag combination, random bytes, ICMP errors
//! quoting load-balanced flows) through the TC forward, TC reply and XDP programs. Asserted for
//! every packet:
//!
//! - nothing is rewritten unless it is addressed to a frontend with backends (forward), is the
//!   reply of a tracked flow (reply), or is an ICMP error to a client quoting its packet to a
//!   backend (reply);
//! - a rewritten packet differs from its input only in addresses, ports and checksums, and its
//!   checksums are valid whenever the input's were.
//!
//! Over the run, the outcome counters add up to the packets seen. A bounded run is part of the
//! test suite; `cargo xtask fuzz` runs a long one (`LB_FUZZ_PACKETS`, `LB_FUZZ_SEED`).

mod support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpNumber, Ipv4Header, TcpHeader, UdpHeader};
use lb_agent::{
    datapath::{Datapath, Maps, Mode, PROG_TC_FORWARD, PROG_TC_REPLY, PROG_XDP_FORWARD},
    model::{BackendAddr, Frontend, FrontendAddr, Protocol},
    reconcile::{Capacities, Options, Reconciler},
};
use lb_common::counters as c;
use support::*;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const BACKENDS: [(Ipv4Addr, u16); 2] =
    [(Ipv4Addr::new(10, 244, 1, 2), 8080), (Ipv4Addr::new(10, 244, 2, 3), 8080)];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

fn program(maps: &mut Maps) {
    let fe = |vip, port, proto, bs: &[(Ipv4Addr, u16)]| Frontend {
        addr: FrontendAddr::new(vip, port, proto),
        kind: lb_agent::model::FrontendKind::ClusterIp,
        service: format!("fuzz/{vip}-{port}"),
        port_name: String::new(),
        backends: bs.iter().map(|(ip, port)| BackendAddr { ip: (*ip).into(), port: *port, proto }).collect(),
        kept: Vec::new(),
        affinity_timeout_secs: 0,
        local_only: false,
        two_scopes: false,
        source_ranges: None,
    };
    let desired: BTreeMap<_, _> = [
        fe(VIP, 80, Protocol::Tcp, &BACKENDS),
        fe(VIP, 53, Protocol::Udp, &BACKENDS),
        // Port kept by the translation (the TC rewrite skips the port checksum update).
        fe(VIP, 8080, Protocol::Tcp, &BACKENDS),
        fe(VIP, 8080, Protocol::Udp, &BACKENDS),
        fe(EMPTY_VIP, 80, Protocol::Tcp, &[]),
    ]
    .into_iter()
    .map(|f| (f.addr, f))
    .collect();
    let caps = Capacities { services: 1024, backends: 1024, maglev_slots: 65_536, ..Capacities::default() };
    let opts = Options::default();
    let (_, errors) = Reconciler::new(caps, opts).sync(&desired, &Default::default(), maps);
    assert!(errors.is_empty());
}

/// A packet to start from: forward to a VIP or elsewhere, or a reply from a backend.
fn template(r: &mut Rng) -> Pkt {
    let flags = r.below(64) as u8;
    let tcp = L4::Tcp { syn: flags & 2 != 0, ack: flags & 16 != 0, fin: flags & 1 != 0, rst: flags & 4 != 0 };
    let l4 = if r.chance(2) {
        tcp
    } else if r.chance(4) {
        UDP_NOCSUM
    } else {
        UDP
    };
    let port = 30_000 + r.below(64) as u16;
    let (src, dst) = match r.below(4) {
        0 | 1 => (
            (CLIENT, port),
            (
                if r.chance(8) { EMPTY_VIP } else { VIP },
                match (r.chance(2), matches!(l4, L4::Tcp { .. })) {
                    (true, _) => 8080,
                    (false, true) => 80,
                    (false, false) => 53,
                },
            ),
        ),
        2 => (BACKENDS[r.below(2) as usize], (CLIENT, port)),
        _ => {
            ((CLIENT, port), (Ipv4Addr::new(10, 244, 1, r.below(250) as u8 + 1), r.below(65_535) as u16 + 1))
        }
    };
    let mut p = Pkt::new(src, dst, l4);
    if r.chance(8) {
        p.ip_options = vec![1; 4 * (1 + r.below(10) as usize)];
    }
    if r.chance(10) {
        p.more_fragments = r.chance(2);
        p.fragment_offset = if r.chance(2) { 0 } else { r.below(8191) as u16 + 1 };
    }
    p.payload = (0..r.below(64)).map(|_| r.next() as u8).collect();
    p
}

/// An ICMP error (unreachable, time exceeded, parameter problem, or another type) from a backend
/// or a router to the client, quoting the client's packet to a backend (tracked or not), whole or
/// cut short.
fn icmp_template(r: &mut Rng) -> Vec<u8> {
    let mut quoted = template(r);
    quoted.src = (CLIENT, 30_000 + r.below(64) as u16);
    quoted.dst = BACKENDS[r.below(2) as usize];
    let q = quoted.bytes();
    let cut = if r.chance(2) { q.len() } else { 14 + 20 + r.below(q.len() as u64 - 33) as usize };
    let from = if r.chance(2) { quoted.dst.0 } else { Ipv4Addr::new(169, 254, 1, 1) };
    let kind = [3u8, 3, 11, 12, 0, 8][r.below(6) as usize];
    icmp_error(from, CLIENT, kind, r.below(16) as u8, r.next() as u32, &q[14..cut.max(34)])
}

/// Breaks a packet in one of the ways real input breaks.
fn mutate(r: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    match r.below(6) {
        0 => b.truncate(14 + r.below(b.len() as u64 - 13) as usize), // at every offset
        1 => b[14] = 0x40 | r.below(16) as u8,                       // bogus IHL
        2 => {
            for _ in 0..1 + r.below(4) {
                let i = r.below(b.len() as u64) as usize;
                b[i] = r.next() as u8;
            }
        }
        3 => b[12..14].copy_from_slice(&[0x86, 0xdd]), // IPv6 ethertype on IPv4 bytes
        4 => b[14 + 9] = r.below(256) as u8,           // another protocol
        _ => {}                                        // left intact
    }
    b
}

/// Parses what lb may rewrite; `None` when the packet is not IPv4 TCP/UDP with a whole IPv4 header
/// (options included) and, unless it is a non-first fragment, a whole fixed TCP (20 bytes) or UDP
/// (8 bytes) header. That is lb's
/// contract: it translates addresses and ports; TCP options are the receiving stack's to check
/// (it drops a segment whose data offset runs past its end, translated or not).
fn parsed(b: &[u8]) -> Option<(Ipv4Header, usize, u8, bool)> {
    if b.len() < 14 || b[12..14] != [8, 0] {
        return None;
    }
    let (ip, rest) = Ipv4Header::from_slice(&b[14..]).ok()?;
    let l4_off = b.len() - rest.len();
    let frag = u16::from(ip.fragment_offset) != 0;
    let ok = match ip.protocol {
        // A non-first fragment carries no L4 header: its addresses are all there is to translate.
        IpNumber::TCP | IpNumber::UDP if frag => true,
        IpNumber::TCP => rest.len() >= TcpHeader::MIN_LEN,
        IpNumber::UDP => rest.len() >= UdpHeader::LEN,
        _ => false,
    };
    let proto = ip.protocol.0;
    ok.then_some((ip, l4_off, proto, frag))
}

/// Whether the IPv4 and L4 checksums of a whole packet are right.
fn checksums_valid(b: &[u8]) -> bool {
    // check_packet panics on a bad checksum; keep those expected panics quiet.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(|| check_packet(b)).is_ok();
    std::panic::set_hook(hook);
    ok
}

#[test]
fn hostile_packets() {
    let count: u64 = std::env::var("LB_FUZZ_PACKETS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x1b_f00d);
    let pins = PinDir::new("fuzz");
    let (dp, mut maps) = Datapath::load(&test_config(pins.path()), Mode::Xdp).expect("load datapath");
    program(&mut maps);
    let before = maps.read_counters().expect("counters");
    let mut r = Rng(seed | 1);
    let mut rewritten = 0u64;
    let mut icmp_rewritten = 0u64;
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let xdp_meta = support::xdp_meta();
    for i in 0..count {
        let base = if r.chance(5) { icmp_template(&mut r) } else { template(&mut r).bytes() };
        let input = mutate(&mut r, base);
        for (name, ret_ok) in [("tc-forward", u32::MAX), ("tc-reply", u32::MAX), ("xdp", 2)] {
            let mut out = vec![0u8; input.len() + 256];
            let opts =
                TestRunOptions { data_in: Some(&input), data_out: Some(&mut out), ..Default::default() };
            let res = match name {
                "tc-forward" => dp.tc_program(PROG_TC_FORWARD).expect("prog").test_run(opts),
                "tc-reply" => dp.tc_program(PROG_TC_REPLY).expect("prog").test_run(opts),
                _ => dp.xdp_program(PROG_XDP_FORWARD).expect("prog").test_run(opts),
            };
            // The skb test-run refuses some malformed packets outright (EINVAL): nothing ran.
            let Ok(res) = res else { continue };
            out.truncate(res.data_size_out as usize);
            // XDP hands back the metadata in front of a packet it lets pass: its mark for TC.
            if name == "xdp" && res.return_value == 2 && !xdp_meta {
                // This kernel refuses XDP metadata: no mark, the packet as it was sent on.
                assert_eq!(out.len(), input.len(), "xdp: a passed packet with something in front");
            } else if name == "xdp" && res.return_value == 2 {
                let marks = [0x4c42_5844u32.to_ne_bytes(), 0x4c42_5854u32.to_ne_bytes()];
                assert!(
                    out.len() == input.len() + 8 && marks.iter().any(|m| out[..4] == *m),
                    "xdp: a passed packet without its mark for TC"
                );
                out.drain(..8);
            }
            let ret_drop = if name == "xdp" { 1 } else { 2 }; // XDP_DROP, TC_ACT_SHOT
            let redirected = name == "tc-forward" && res.return_value == TC_REDIRECT;
            assert!(
                res.return_value == ret_ok || res.return_value == ret_drop || redirected,
                "{name}: verdict {} is neither pass-on nor drop (nor, from the forward program, a redirect)",
                res.return_value
            );
            if redirected {
                *outcomes.entry("redirected").or_default() += 1;
                let ctx =
                    || format!("packet #{i} (seed {seed}) through {name}:\n in {input:02x?}\nout {out:02x?}");
                check_redirect(&input, &out, &ctx);
                continue;
            }
            *outcomes.entry(if res.return_value == ret_ok { "passed" } else { "dropped" }).or_default() += 1;
            if out == input || res.return_value != ret_ok {
                continue;
            }
            rewritten += 1;
            let ctx =
                || format!("packet #{i} (seed {seed}) through {name}:\n in {input:02x?}\nout {out:02x?}");
            if input.len() > 23 && input[23] == 1 {
                assert_eq!(name, "tc-reply", "only the reply program translates ICMP: {}", ctx());
                check_icmp_rewrite(&input, &out, &ctx);
                icmp_rewritten += 1;
                continue;
            }
            let (ip, l4_off, proto, frag) = parsed(&input)
                .unwrap_or_else(|| panic!("rewrote a packet that is not whole IPv4 TCP/UDP: {}", ctx()));
            assert_eq!(out.len(), input.len(), "length changed: {}", ctx());
            let dst = Ipv4Addr::from(ip.destination);
            let src = Ipv4Addr::from(ip.source);
            if frag {
                // A non-first fragment follows a first fragment translated earlier (same
                // addresses, protocol and IPv4 id): only its addresses and header checksum change.
                match name {
                    "tc-reply" => assert!(
                        BACKENDS.iter().any(|(b, _)| *b == src),
                        "fragment from a non-backend: {}",
                        ctx()
                    ),
                    _ => assert_eq!(dst, VIP, "fragment not to a frontend: {}", ctx()),
                }
                for (j, (a, b)) in input.iter().zip(&out).enumerate() {
                    assert!(a == b || (24..34).contains(&j), "fragment byte {j} changed: {}", ctx());
                }
                let out_ip = Ipv4Header::from_slice(&out[14..]).expect("ipv4 out").0;
                if ip.header_checksum == ip.calc_header_checksum() {
                    assert_eq!(
                        out_ip.header_checksum,
                        out_ip.calc_header_checksum(),
                        "fragment's IPv4 checksum: {}",
                        ctx()
                    );
                }
                continue;
            }
            match name {
                "tc-reply" => assert!(
                    BACKENDS.iter().any(|(b, _)| *b == src),
                    "rewrote a reply from a non-backend: {}",
                    ctx()
                ),
                _ => assert!(
                    dst == VIP && (proto == 6 || proto == 17),
                    "rewrote a packet not to a frontend with backends: {}",
                    ctx()
                ),
            }
            // Only addresses (IPv4 12..20), the IPv4 checksum (10..12), ports (L4 0..4) and the L4
            // checksum may differ.
            let l4_check = l4_off + if proto == 6 { 16 } else { 6 };
            for (j, (a, b)) in input.iter().zip(&out).enumerate() {
                let allowed = (24..26).contains(&j)
                    || (26..34).contains(&j)
                    || (l4_off..l4_off + 4).contains(&j)
                    || (l4_check..l4_check + 2).contains(&j);
                assert!(a == b || allowed, "byte {j} changed: {}", ctx());
            }
            if checksums_valid(&input) {
                assert!(checksums_valid(&out), "checksums broken by the rewrite: {}", ctx());
            }
        }
    }
    let after = maps.read_counters().expect("counters");
    let d: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let outcome_sum: u64 = c::OUTCOMES.iter().map(|i| d[*i as usize]).sum();
    assert_eq!(
        outcome_sum,
        d[c::RX_FORWARD as usize] + d[c::RX_REPLY as usize],
        "outcome counters add up to packets seen"
    );
    assert!(rewritten > count / 20, "the mix exercises rewriting: {rewritten} of {count}");
    assert!(icmp_rewritten > count / 200, "the mix exercises ICMP translation: {icmp_rewritten} of {count}");
    eprintln!(
        "fuzz: {count} packets x 3 programs, seed {seed}: {rewritten} rewritten ({icmp_rewritten} ICMP errors), {outcomes:?}"
    );
}

/// `TC_ACT_REDIRECT`: sent back out of the interface the packet came in on.
const TC_REDIRECT: u32 = 7;

/// A packet the forward program sent back where it came from: either the ICMP port unreachable
/// answering a whole TCP/UDP packet to the frontend without backends, or a hairpinned packet (its
/// source is a backend) with its Ethernet addresses swapped.
fn check_redirect(input: &[u8], out: &[u8], ctx: &dyn Fn() -> String) {
    let (ip, _, proto, frag) = parsed(input)
        .unwrap_or_else(|| panic!("redirected a packet that is not whole IPv4 TCP/UDP: {}", ctx()));
    assert!(!frag, "redirected a non-first fragment: {}", ctx());
    assert_eq!((&out[..6], &out[6..12]), (&input[6..12], &input[..6]), "MACs not swapped: {}", ctx());
    if out.len() == 70 && out[23] == 1 {
        assert_eq!(
            Ipv4Addr::from(ip.destination),
            EMPTY_VIP,
            "rejected a packet to a frontend with backends: {}",
            ctx()
        );
        assert!(proto == 6 || proto == 17, "rejected another protocol: {}", ctx());
        assert_eq!(internet_checksum(&out[14..34]), 0, "reject's IPv4 checksum: {}", ctx());
        assert_eq!(internet_checksum(&out[34..]), 0, "reject's ICMP checksum: {}", ctx());
        assert_eq!(&out[42..], &input[14..42], "reject's quote: {}", ctx());
        return;
    }
    assert!(
        BACKENDS.iter().any(|(b, _)| b.octets() == ip.source),
        "bounced a packet that is not hairpinned: {}",
        ctx()
    );
    assert_eq!(out.len(), input.len(), "length changed: {}", ctx());
}

/// An ICMP error the reply program rewrote: it quotes a client's packet to a backend, only the
/// translated fields changed, and the checksums that were right still are.
fn check_icmp_rewrite(input: &[u8], out: &[u8], ctx: &dyn Fn() -> String) {
    let (ip, icmp) = Ipv4Header::from_slice(&input[14..]).unwrap_or_else(|_| panic!("not IPv4: {}", ctx()));
    let icmp_off = input.len() - icmp.len();
    assert!([3, 11, 12].contains(&icmp[0]), "rewrote an ICMP message that is not an error: {}", ctx());
    let (inner, inner_l4) = Ipv4Header::from_slice(&icmp[8..])
        .unwrap_or_else(|_| panic!("no whole quoted IPv4 header: {}", ctx()));
    let inner_off = icmp_off + 8;
    let inner_l4_off = input.len() - inner_l4.len();
    assert!(inner_l4.len() >= 8, "quote without ports: {}", ctx());
    assert!([6, 17].contains(&inner.protocol.0), "quote of another protocol: {}", ctx());
    assert_eq!(Ipv4Addr::from(inner.source), CLIENT, "quote not from the client: {}", ctx());
    assert_eq!(ip.destination, inner.source, "error not to the quoted packet's sender: {}", ctx());
    assert!(
        BACKENDS.iter().any(|(b, _)| b.octets() == inner.destination),
        "quote not to a backend: {}",
        ctx()
    );
    assert_eq!(out.len(), input.len(), "length changed: {}", ctx());
    let l4_check = inner_l4_off + if inner.protocol.0 == 6 { 16 } else { 6 };
    for (j, (a, b)) in input.iter().zip(out).enumerate() {
        let allowed = (24..26).contains(&j)
            || (26..30).contains(&j)
            || (icmp_off + 2..icmp_off + 4).contains(&j)
            || (inner_off + 10..inner_off + 12).contains(&j)
            || (inner_off + 16..inner_off + 20).contains(&j)
            || (inner_l4_off + 2..inner_l4_off + 4).contains(&j)
            || (l4_check..l4_check + 2).contains(&j);
        assert!(a == b || allowed, "byte {j} changed: {}", ctx());
    }
    assert_eq!(
        &out[inner_off + 16..inner_off + 20],
        &VIP.octets(),
        "quote not translated to the VIP: {}",
        ctx()
    );
    let out_ip = Ipv4Header::from_slice(&out[14..]).expect("ipv4 out").0;
    if ip.header_checksum == ip.calc_header_checksum() {
        assert_eq!(out_ip.header_checksum, out_ip.calc_header_checksum(), "outer IPv4 checksum: {}", ctx());
    }
    if internet_checksum(icmp) == 0 {
        assert_eq!(internet_checksum(&out[icmp_off..]), 0, "ICMP checksum broken: {}", ctx());
    }
}
