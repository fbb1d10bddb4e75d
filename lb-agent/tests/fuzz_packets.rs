//! Hostile packets through BPF_PROG_TEST_RUN: random and mutated packets through the TC forward,
//! TC reply and XDP programs, half of them IPv4 (truncated at every offset, bogus IHL, IP options,
//! fragments, every TCP flag combination, random bytes, ICMP errors quoting load-balanced flows)
//! and half IPv6, which the same entry programs hand on to the lb6 programs (truncated at every
//! offset, bogus payload length, chains of extension headers under and over the parser's limit
//! with bogus lengths, first and non-first fragments, every TCP flag byte, UDP without a checksum,
//! ICMPv6 errors quoting load-balanced flows whole and cut short, neighbour discovery and echo,
//! random bytes). Asserted for every packet:
//!
//! - nothing is rewritten unless it is addressed to a frontend with backends (forward), is the
//!   reply of a tracked flow (reply), or is an ICMP or ICMPv6 error to a client quoting its packet
//!   to a backend (reply);
//! - a rewritten packet differs from its input only in addresses, ports and checksums (of an
//!   error, those of its quote too), and its checksums (IPv4 header, TCP/UDP and ICMPv6 over the
//!   IPv6 pseudo-header, a quote's) are valid whenever the input's were; an IPv6 UDP packet
//!   without a checksum stays without one.
//!
//! Over the run, the outcome counters add up to the packets seen. A bounded run is part of the
//! test suite; `cargo xtask fuzz` runs a long one (`LB_FUZZ_PACKETS`, `LB_FUZZ_SEED`).

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpNumber, Ipv4Header, TcpHeader, UdpHeader};
use lb_agent::{
    datapath::{Datapath, Maps, Mode, PROG_TC_FORWARD, PROG_TC_REPLY, PROG_XDP_FORWARD},
    model::{BackendAddr, Frontend, FrontendAddr, Protocol},
    reconcile::{Capacities, Options, Reconciler},
};
use lb_common::{counters as c, reject::REJECT6_OUT};
use support::{
    v6::{eth_ip6, icmp6, l4_checksum6, neighbour_solicitation, Ext, Pkt6},
    *,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const BACKENDS: [(Ipv4Addr, u16); 2] =
    [(Ipv4Addr::new(10, 244, 1, 2), 8080), (Ipv4Addr::new(10, 244, 2, 3), 8080)];

const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
const EMPTY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x11);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 0x10);
const BACKENDS6: [(Ipv6Addr, u16); 2] = [
    (Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2), 8080),
    (Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 3), 8080),
];
/// A router on the way: the source of ICMPv6 errors that are not the backend's own.
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);

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
    let fe = |vip: IpAddr, port, proto, bs: &[(IpAddr, u16)]| Frontend {
        addr: FrontendAddr::new(vip, port, proto),
        kind: lb_agent::model::FrontendKind::ClusterIp,
        service: format!("fuzz/{vip}-{port}"),
        port_name: String::new(),
        backends: bs.iter().map(|(ip, port)| BackendAddr { ip: *ip, port: *port, proto }).collect(),
        kept: Vec::new(),
        affinity_timeout_secs: 0,
        local_only: false,
        two_scopes: false,
        source_ranges: None,
    };
    let b4: Vec<(IpAddr, u16)> = BACKENDS.iter().map(|(ip, port)| ((*ip).into(), *port)).collect();
    let b6: Vec<(IpAddr, u16)> = BACKENDS6.iter().map(|(ip, port)| ((*ip).into(), *port)).collect();
    let desired: BTreeMap<_, _> = [
        fe(VIP.into(), 80, Protocol::Tcp, &b4),
        fe(VIP.into(), 53, Protocol::Udp, &b4),
        // Port kept by the translation (the TC rewrite skips the port checksum update).
        fe(VIP.into(), 8080, Protocol::Tcp, &b4),
        fe(VIP.into(), 8080, Protocol::Udp, &b4),
        fe(EMPTY_VIP.into(), 80, Protocol::Tcp, &[]),
        // The same over IPv6 (the lb6 programs, by tail call from the same entry programs).
        fe(VIP6.into(), 80, Protocol::Tcp, &b6),
        fe(VIP6.into(), 53, Protocol::Udp, &b6),
        fe(VIP6.into(), 8080, Protocol::Tcp, &b6),
        fe(VIP6.into(), 8080, Protocol::Udp, &b6),
        fe(EMPTY_VIP6.into(), 80, Protocol::Tcp, &[]),
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

/// The extension headers lb6's parser follows (Authentication among them).
fn is_ext6(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60)
}

/// A random Fragment header: first (offset 0) or not, the last or not, one of a few
/// identifications (so that non-first fragments meet the first fragments translated before them).
fn fragment6(r: &mut Rng) -> Ext {
    let offset = if r.chance(2) { 0 } else { r.below(8191) as u16 + 1 };
    Ext::Fragment { offset, more: r.chance(2), id: r.below(4) as u32 }
}

/// Inserts an extension header of kind `next` right after the IPv6 header (the first the parser
/// meets), the payload length grown by its size: whatever checksums were right still are (no
/// pseudo-header covers extension headers).
fn insert_ext6(r: &mut Rng, b: &mut Vec<u8>, next: u8) {
    let mut h = match next {
        // Authentication: length in 4-byte units, minus 2 (16 or 24 bytes), SPI, sequence, ICV.
        51 => {
            let len = 2 + 2 * r.below(2) as u8;
            let mut h = vec![0, len, 0, 0];
            h.extend((0..(usize::from(len) + 2) * 4 - 4).map(|_| r.next() as u8));
            h
        }
        44 => vec![0, 0, 0, 0, 0, 0, 0, r.below(4) as u8], // offset 0, the last: an atomic fragment
        _ => vec![0, 0, 1, 4, 0, 0, 0, 0],                 // PadN filling 8 bytes
    };
    h[0] = b[20];
    b[20] = next;
    let len = u16::from_be_bytes([b[18], b[19]]).wrapping_add(h.len() as u16);
    b[18..20].copy_from_slice(&len.to_be_bytes());
    b.splice(54..54, h);
}

/// An IPv6 packet to start from, as [`template`] for IPv4: to a VIP with backends (now and then
/// from a backend, which Maglev may send to itself: hairpin) or without, a reply from a backend,
/// to another address; behind chains of extension headers (one to six: under and over the
/// parser's four, with long Options headers), Authentication headers and fragments, with every
/// TCP flag byte.
fn template6(r: &mut Rng) -> Vec<u8> {
    let l4 = if r.chance(2) {
        SYN // its flags byte set below
    } else if r.chance(4) {
        UDP_NOCSUM
    } else {
        UDP
    };
    let tcp = matches!(l4, L4::Tcp { .. });
    let port = 30_000 + r.below(64) as u16;
    let (src, dst) = match r.below(4) {
        0 | 1 => (
            if r.chance(16) { BACKENDS6[r.below(2) as usize] } else { (CLIENT6, port) },
            (
                if r.chance(8) { EMPTY_VIP6 } else { VIP6 },
                match (r.chance(2), tcp) {
                    (true, _) => 8080,
                    (false, true) => 80,
                    (false, false) => 53,
                },
            ),
        ),
        2 => (BACKENDS6[r.below(2) as usize], (CLIENT6, port)),
        _ => (
            (CLIENT6, port),
            (
                Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, r.below(250) as u16 + 1),
                r.below(65_535) as u16 + 1,
            ),
        ),
    };
    let mut ext = Vec::new();
    if r.chance(4) {
        for _ in 0..1 + r.below(6) {
            let len8 = if r.chance(16) { r.below(256) } else { r.below(3) } as u8;
            ext.push(match r.below(5) {
                0 => Ext::HopByHop { len8 },
                1 | 2 => Ext::DestOpts { len8 },
                3 => Ext::Routing,
                _ => fragment6(r),
            });
        }
    }
    if r.chance(10) {
        ext.push(fragment6(r));
    }
    let mut p = Pkt6::new(src, dst, l4).with_ext(&ext);
    // After a non-first fragment's Fragment header: payload only.
    p.no_l4 = matches!(ext.last(), Some(Ext::Fragment { offset, .. }) if *offset != 0);
    p.payload = (0..r.below(64)).map(|_| r.next() as u8).collect();
    let mut b = p.bytes();
    if tcp && !p.no_l4 {
        // Every combination of the eight flags, the checksum made right again.
        let l4_off = 54
            + ext
                .iter()
                .map(|e| match e {
                    Ext::HopByHop { len8 } | Ext::DestOpts { len8 } => 8 * (usize::from(*len8) + 1),
                    _ => 8,
                })
                .sum::<usize>();
        b[l4_off + 13] = r.below(256) as u8;
        b[l4_off + 16..l4_off + 18].fill(0);
        let sum = l4_checksum6(src.0, dst.0, 6, &b[l4_off..]);
        b[l4_off + 16..l4_off + 18].copy_from_slice(&sum.to_be_bytes());
    }
    if r.chance(16) {
        insert_ext6(r, &mut b, 51);
    }
    b
}

/// ICMPv6: mostly an error (destination unreachable, packet too big, time exceeded, parameter
/// problem, or another type) from a backend or a router to the client (now and then to another
/// address), quoting the client's packet to a backend (tracked or not, now and then behind an
/// extension header), whole or cut short (past the ports, or inside the IPv6 header), itself now
/// and then behind an extension header; else neighbour discovery or echo.
fn icmp6_template(r: &mut Rng) -> Vec<u8> {
    let mut b = match r.below(8) {
        0 => {
            let (src, target) =
                [(CLIENT6, VIP6), (BACKENDS6[0].0, CLIENT6), (CLIENT6, EMPTY_VIP6)][r.below(3) as usize];
            neighbour_solicitation(src, target)
        }
        1 => {
            let kind = [128u8, 129, 133, 134, 136, r.below(256) as u8][r.below(6) as usize];
            let (src, dst) =
                [(CLIENT6, VIP6), (BACKENDS6[1].0, CLIENT6), (CLIENT6, EMPTY_VIP6)][r.below(3) as usize];
            let body: Vec<u8> = (0..r.below(48)).map(|_| r.next() as u8).collect();
            icmp6(src, dst, kind, r.below(4) as u8, r.next() as u32, &body)
        }
        _ => {
            let l4 = [SYN, ACK, UDP, UDP_NOCSUM][r.below(4) as usize];
            let mut quoted =
                Pkt6::new((CLIENT6, 30_000 + r.below(64) as u16), BACKENDS6[r.below(2) as usize], l4);
            if r.chance(8) {
                quoted.ext = vec![Ext::DestOpts { len8: 0 }];
            }
            quoted.payload = (0..r.below(32)).map(|_| r.next() as u8).collect();
            let q = quoted.bytes();
            let cut = match r.below(8) {
                0..=3 => q.len(),
                7 => 14 + r.below(40) as usize,
                _ => 14 + 40 + r.below(q.len() as u64 - 53) as usize,
            };
            let from = if r.chance(2) { quoted.dst.0 } else { ROUTER6 };
            let to = if r.chance(16) { BACKENDS6[0].0 } else { CLIENT6 };
            let kind = [1u8, 1, 2, 3, 4, 128, 129, r.below(256) as u8][r.below(8) as usize];
            icmp6(from, to, kind, r.below(8) as u8, r.next() as u32, &q[14..cut])
        }
    };
    if r.chance(8) {
        let next = [0u8, 60, 44, 51][r.below(4) as usize];
        insert_ext6(r, &mut b, next);
    }
    b
}

/// Random bytes behind an IPv6 header of random addresses (lb's and others), first header and
/// payload length (right or not).
fn random6(r: &mut Rng) -> Vec<u8> {
    let addr = |r: &mut Rng| match r.below(5) {
        0 => VIP6,
        1 => CLIENT6,
        2 => BACKENDS6[r.below(2) as usize].0,
        3 => EMPTY_VIP6,
        _ => Ipv6Addr::from(u128::from(r.next()) << 64 | u128::from(r.next())),
    };
    let (src, dst) = (addr(r), addr(r));
    let next = [0u8, 43, 44, 51, 60, 6, 17, 58, 59, 50, r.below(256) as u8][r.below(11) as usize];
    let body: Vec<u8> = (0..r.below(120)).map(|_| r.next() as u8).collect();
    let len = if r.chance(2) { body.len() } else { r.below(200) as usize };
    let mut b = eth_ip6(src, dst, next, len, r.next() as u8);
    b.extend_from_slice(&body);
    b
}

/// Breaks an IPv6 packet in one of the ways real input breaks.
fn mutate6(r: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    match r.below(8) {
        0 => {
            // At every offset; half the time the payload length says so.
            b.truncate(14 + r.below(b.len() as u64 - 13) as usize);
            if b.len() >= 54 && r.chance(2) {
                let len = (b.len() - 54) as u16;
                b[18..20].copy_from_slice(&len.to_be_bytes());
            }
        }
        1 => {
            // Bogus payload length: a little off, or anything.
            let len = u16::from_be_bytes([b[18], b[19]]);
            let len = if r.chance(2) {
                len.wrapping_add(r.below(17) as u16).wrapping_sub(8)
            } else {
                r.next() as u16
            };
            b[18..20].copy_from_slice(&len.to_be_bytes());
        }
        2 => {
            for _ in 0..1 + r.below(4) {
                let i = r.below(b.len() as u64) as usize;
                b[i] = r.next() as u8;
            }
        }
        3 if b.len() > 56 && is_ext6(b[20]) => b[55] = r.next() as u8, // bogus extension length
        3 => b[20] = [0u8, 43, 44, 51, 60, 59, 50, r.below(256) as u8][r.below(8) as usize],
        4 => b[14] = (r.below(16) as u8) << 4 | (b[14] & 0x0f), // another IP version
        5 => b[12..14].copy_from_slice(&[8, 0]),                // IPv4 ethertype on IPv6 bytes
        _ => {}                                                 // left intact
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
    // Half of them IPv6: as many IPv4 packets as before IPv6 joined.
    let count: u64 = std::env::var("LB_FUZZ_PACKETS").ok().and_then(|v| v.parse().ok()).unwrap_or(40_000);
    let seed: u64 = std::env::var("LB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x1b_f00d);
    let pins = PinDir::new("fuzz");
    let (dp, mut maps) = Datapath::load(&test_config(pins.path()), Mode::Xdp).expect("load datapath");
    program(&mut maps);
    arm_port_filter(&mut maps);
    let before = maps.read_counters().expect("counters");
    let mut r = Rng(seed | 1);
    let mut rewritten = 0u64;
    let mut icmp_rewritten = 0u64;
    // Of which IPv6: packets generated, rewritten, ICMPv6 errors rewritten.
    let (mut count6, mut rewritten6, mut icmp6_rewritten) = (0u64, 0u64, 0u64);
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    let xdp_meta = support::xdp_meta();
    for i in 0..count {
        let input = if r.chance(2) {
            count6 += 1;
            let base = match r.below(16) {
                0..=2 => icmp6_template(&mut r),
                3 => random6(&mut r),
                _ => template6(&mut r),
            };
            mutate6(&mut r, base)
        } else {
            let base = if r.chance(5) { icmp_template(&mut r) } else { template(&mut r).bytes() };
            mutate(&mut r, base)
        };
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
                let marks = [lb_common::XDP_DECIDED.to_ne_bytes(), lb_common::XDP_LEFT.to_ne_bytes()];
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
                if is_ipv6(&input) {
                    check_redirect6(&input, &out, &ctx);
                } else {
                    check_redirect(&input, &out, &ctx);
                }
                continue;
            }
            *outcomes.entry(if res.return_value == ret_ok { "passed" } else { "dropped" }).or_default() += 1;
            if out == input || res.return_value != ret_ok {
                continue;
            }
            rewritten += 1;
            let ctx =
                || format!("packet #{i} (seed {seed}) through {name}:\n in {input:02x?}\nout {out:02x?}");
            if is_ipv6(&input) {
                rewritten6 += 1;
                if check_rewrite6(name, &input, &out, &ctx) {
                    icmp_rewritten += 1;
                    icmp6_rewritten += 1;
                }
                continue;
            }
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
    let (count4, rewritten4, icmp4_rewritten) =
        (count - count6, rewritten - rewritten6, icmp_rewritten - icmp6_rewritten);
    assert!(rewritten4 > count4 / 20, "the mix exercises IPv4 rewriting: {rewritten4} of {count4}");
    assert!(
        icmp4_rewritten > count4 / 200,
        "the mix exercises ICMP translation: {icmp4_rewritten} of {count4}"
    );
    assert!(rewritten6 > count6 / 20, "the mix exercises IPv6 rewriting: {rewritten6} of {count6}");
    assert!(
        icmp6_rewritten > count6 / 200,
        "the mix exercises ICMPv6 translation: {icmp6_rewritten} of {count6}"
    );
    eprintln!(
        "fuzz: {count} packets ({count6} IPv6) x 3 programs, seed {seed}: {rewritten} rewritten \
         ({icmp_rewritten} ICMP errors; IPv6: {rewritten6}, {icmp6_rewritten} ICMPv6 errors), {outcomes:?}"
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

/// Whether a frame is IPv6 by its ethertype (the lb6 programs get it, whatever its bytes say).
fn is_ipv6(b: &[u8]) -> bool {
    b.len() >= 14 && b[12..14] == [0x86, 0xdd]
}

fn addr6(b: &[u8], at: usize) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(&b[at..at + 16]).expect("16 bytes"))
}

/// Where lb6's parser finds the transport header of an IPv6 frame.
struct Layout6 {
    /// The header after the extension headers followed (TCP, UDP, ICMPv6, ...).
    next: u8,
    l4_off: usize,
    /// Behind a Fragment header, and one of a non-first fragment (no transport header follows).
    fragment: bool,
    later_fragment: bool,
}

/// Walks the extension headers of an IPv6 frame as lb6's parser does: at most four, each whole
/// in the frame, none after a non-first fragment's Fragment header. `None` when the frame has no
/// whole IPv6 header of version 6, or its transport header is out of the parser's reach.
fn layout6(b: &[u8]) -> Option<Layout6> {
    if !is_ipv6(b) || b.len() < 54 || b[14] >> 4 != 6 {
        return None;
    }
    let (mut next, mut off) = (b[20], 54);
    let (mut fragment, mut later_fragment) = (false, false);
    for _ in 0..4 {
        if !is_ext6(next) || later_fragment {
            break;
        }
        let h = b.get(off..off + 8)?;
        if next == 44 {
            fragment = true;
            later_fragment = u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0;
        }
        off += match next {
            44 => 8,
            51 => (usize::from(h[1]) + 2) * 4,
            _ => (usize::from(h[1]) + 1) * 8,
        };
        next = h[0];
    }
    (later_fragment || !is_ext6(next)).then_some(Layout6 { next, l4_off: off, fragment, later_fragment })
}

/// The state of a checksum over the IPv6 pseudo-header.
#[derive(Debug, PartialEq, Eq)]
enum Sum6 {
    Valid,
    /// UDP without a checksum (0).
    Zero,
    /// Wrong, or not to be told: the payload length does not match the frame.
    Other,
}

/// The checksum of the `next` message at `l4_off` (to the end of the frame), over the pseudo-
/// header of the IPv6 header at `ip_off`.
fn sum6(b: &[u8], ip_off: usize, l4_off: usize, next: u8) -> Sum6 {
    let payload_len = usize::from(u16::from_be_bytes([b[ip_off + 4], b[ip_off + 5]]));
    if ip_off + 40 + payload_len != b.len() || l4_off > b.len() {
        return Sum6::Other;
    }
    let l4 = &b[l4_off..];
    if next == 17 && l4.len() >= 8 && l4[6..8] == [0, 0] {
        return Sum6::Zero;
    }
    if l4_checksum6(addr6(b, ip_off + 8), addr6(b, ip_off + 24), next, l4) == 0 {
        Sum6::Valid
    } else {
        Sum6::Other
    }
}

/// A checksum that was valid still is; a UDP packet without one still has none.
fn sum6_kept(before: Sum6, after: Sum6, what: &str, ctx: &dyn Fn() -> String) {
    match before {
        Sum6::Valid => assert_eq!(after, Sum6::Valid, "{what} checksum broken by the rewrite: {}", ctx()),
        Sum6::Zero => assert_eq!(after, Sum6::Zero, "{what}: no checksum became one: {}", ctx()),
        Sum6::Other => {}
    }
}

/// An IPv6 packet a program rewrote (as the IPv4 checks above): TCP or UDP to a frontend with
/// backends (forward) or from a backend (reply), only addresses, ports and the L4 checksum
/// changed; or an ICMPv6 error (reply). Returns whether it was an ICMPv6 error.
fn check_rewrite6(name: &str, input: &[u8], out: &[u8], ctx: &dyn Fn() -> String) -> bool {
    assert_eq!(out.len(), input.len(), "length changed: {}", ctx());
    let l = layout6(input)
        .unwrap_or_else(|| panic!("rewrote an IPv6 packet whose transport lb6 cannot reach: {}", ctx()));
    if l.next == 58 && !l.fragment {
        assert_eq!(name, "tc-reply", "only the reply program translates ICMPv6: {}", ctx());
        check_icmp6_rewrite(input, out, l.l4_off, ctx);
        return true;
    }
    assert!(l.next == 6 || l.next == 17, "rewrote another protocol ({}): {}", l.next, ctx());
    let (src, dst) = (addr6(input, 22), addr6(input, 38));
    match name {
        "tc-reply" => {
            assert!(BACKENDS6.iter().any(|(b, _)| *b == src), "rewrote a reply from a non-backend: {}", ctx())
        }
        _ => assert_eq!(dst, VIP6, "rewrote a packet not to a frontend with backends: {}", ctx()),
    }
    if l.later_fragment {
        // A non-first fragment follows a first fragment translated earlier (same addresses,
        // protocol and identification): only its addresses change, which no checksum covers.
        for (j, (a, b)) in input.iter().zip(out).enumerate() {
            assert!(a == b || (22..54).contains(&j), "fragment byte {j} changed: {}", ctx());
        }
        return false;
    }
    let whole = input.len() >= l.l4_off + if l.next == 6 { 20 } else { 8 };
    assert!(whole, "rewrote a packet whose transport header is cut short: {}", ctx());
    // Only addresses (IPv6 22..54), ports (L4 0..4) and the L4 checksum may differ.
    let l4_check = l.l4_off + if l.next == 6 { 16 } else { 6 };
    for (j, (a, b)) in input.iter().zip(out).enumerate() {
        let allowed = (22..54).contains(&j)
            || (l.l4_off..l.l4_off + 4).contains(&j)
            || (l4_check..l4_check + 2).contains(&j);
        assert!(a == b || allowed, "byte {j} changed: {}", ctx());
    }
    sum6_kept(sum6(input, 14, l.l4_off, l.next), sum6(out, 14, l.l4_off, l.next), "L4", ctx);
    false
}

/// An ICMPv6 error the reply program rewrote (as [`check_icmp_rewrite`] for IPv4): it quotes a
/// client's packet to a backend, only the translated fields changed (the source, the quote's
/// destination address and port, the checksums), and the checksums that were right still are
/// (the ICMPv6 one over the outer pseudo-header, the quoted L4 one over the quote's).
fn check_icmp6_rewrite(input: &[u8], out: &[u8], icmp_off: usize, ctx: &dyn Fn() -> String) {
    assert!(input.len() >= icmp_off + 8, "rewrote a cut ICMPv6 header: {}", ctx());
    assert!((1..=4).contains(&input[icmp_off]), "rewrote an ICMPv6 message that is not an error: {}", ctx());
    let inner_off = icmp_off + 8;
    let inner_l4_off = inner_off + 40;
    assert!(input.len() >= inner_l4_off + 8, "quote without ports: {}", ctx());
    assert_eq!(input[inner_off] >> 4, 6, "quote of another IP version: {}", ctx());
    let proto = input[inner_off + 6];
    assert!(proto == 6 || proto == 17, "quote of another protocol ({proto}): {}", ctx());
    let (inner_src, inner_dst) = (addr6(input, inner_off + 8), addr6(input, inner_off + 24));
    assert_eq!(inner_src, CLIENT6, "quote not from the client: {}", ctx());
    assert_eq!(addr6(input, 38), inner_src, "error not to the quoted packet's sender: {}", ctx());
    assert!(BACKENDS6.iter().any(|(b, _)| *b == inner_dst), "quote not to a backend: {}", ctx());
    let l4_check = inner_l4_off + if proto == 6 { 16 } else { 6 };
    for (j, (a, b)) in input.iter().zip(out).enumerate() {
        let allowed = (22..38).contains(&j)
            || (icmp_off + 2..icmp_off + 4).contains(&j)
            || (inner_off + 24..inner_off + 40).contains(&j)
            || (inner_l4_off + 2..inner_l4_off + 4).contains(&j)
            || (l4_check..l4_check + 2).contains(&j);
        assert!(a == b || allowed, "byte {j} changed: {}", ctx());
    }
    assert_eq!(addr6(out, inner_off + 24), VIP6, "quote not translated to the VIP: {}", ctx());
    sum6_kept(sum6(input, 14, icmp_off, 58), sum6(out, 14, icmp_off, 58), "ICMPv6", ctx);
    // A quote whole to its transport header's end: its own checksum, over its own pseudo-header.
    if input.len() >= inner_l4_off + if proto == 6 { 20 } else { 8 } {
        let quoted = |b: &[u8]| sum6(b, inner_off, inner_l4_off, proto);
        sum6_kept(quoted(input), quoted(out), "quoted L4", ctx);
    }
}

/// An IPv6 packet the forward program sent back where it came from (as [`check_redirect`]): the
/// ICMPv6 port unreachable answering TCP/UDP (its transport header right after the IPv6 header)
/// to the frontend without backends, or a hairpinned packet (from a backend; a non-first
/// fragment too, as its first fragment was), its checksum right if it was.
fn check_redirect6(input: &[u8], out: &[u8], ctx: &dyn Fn() -> String) {
    let l = layout6(input)
        .unwrap_or_else(|| panic!("redirected an IPv6 packet whose transport lb6 cannot reach: {}", ctx()));
    assert!(l.next == 6 || l.next == 17, "redirected another protocol ({}): {}", l.next, ctx());
    assert_eq!((&out[..6], &out[6..12]), (&input[6..12], &input[..6]), "MACs not swapped: {}", ctx());
    if l.later_fragment {
        // A non-first fragment of a hairpinned datagram (the IPv4 mix has none: its forward
        // packets all come from the client) follows its first fragment: only addresses change.
        assert!(
            BACKENDS6.iter().any(|(b, _)| *b == addr6(input, 22)) && addr6(input, 38) == VIP6,
            "bounced a non-first fragment that is not hairpinned: {}",
            ctx()
        );
        assert_eq!(out.len(), input.len(), "length changed: {}", ctx());
        for (j, (a, b)) in input.iter().zip(out).enumerate() {
            assert!(a == b || j < 12 || (22..54).contains(&j), "fragment byte {j} changed: {}", ctx());
        }
        return;
    }
    if out.len() == REJECT6_OUT && is_ipv6(out) && out[20] == 58 {
        assert_eq!(addr6(input, 38), EMPTY_VIP6, "rejected a packet to a frontend with backends: {}", ctx());
        assert_eq!(l.l4_off, 54, "rejected a packet behind extension headers (no quote of it): {}", ctx());
        assert_eq!(
            (addr6(out, 22), addr6(out, 38)),
            (addr6(input, 38), addr6(input, 22)),
            "reject's addresses: {}",
            ctx()
        );
        assert_eq!((out[54], out[55]), (1, 4), "reject: not a port unreachable: {}", ctx());
        assert_eq!(sum6(out, 14, 54, 58), Sum6::Valid, "reject's ICMPv6 checksum: {}", ctx());
        assert_eq!(&out[62..], &input[14..62], "reject's quote: {}", ctx());
        return;
    }
    assert!(
        BACKENDS6.iter().any(|(b, _)| *b == addr6(input, 22)),
        "bounced a packet that is not hairpinned: {}",
        ctx()
    );
    assert_eq!(out.len(), input.len(), "length changed: {}", ctx());
    let whole = input.len() >= l.l4_off + if l.next == 6 { 20 } else { 8 };
    assert!(whole, "bounced a packet whose transport header is cut short: {}", ctx());
    // Ethernet addresses (swapped), IPv6 addresses, ports and the L4 checksum only.
    let l4_check = l.l4_off + if l.next == 6 { 16 } else { 6 };
    for (j, (a, b)) in input.iter().zip(out).enumerate() {
        let allowed = j < 12
            || (22..54).contains(&j)
            || (l.l4_off..l.l4_off + 4).contains(&j)
            || (l4_check..l4_check + 2).contains(&j);
        assert!(a == b || allowed, "hairpin byte {j} changed: {}", ctx());
    }
    sum6_kept(sum6(input, 14, l.l4_off, l.next), sum6(out, 14, l.l4_off, l.next), "hairpin's L4", ctx);
}
