//! The IPv6 parser ([`V6`]'s `Family::parse`), with a bounds check before every access.
//!
//! Up to [`MAX_EXT_HEADERS`] extension headers (Hop-by-Hop, Routing, Fragment, Destination
//! Options, Authentication) are skipped before the transport header. A packet with more is one lb
//! cannot see the ports of: to a Service address it is dropped (`DROP_EXT_HEADERS`), to any other
//! it passes (`PASS_OTHER_PROTO`); the pipeline tells which (`Parsed::TooDeep`). ESP, "no next
//! header" and other protocols pass. The Fragment header follows the IPv4 fragment rules (a first
//! fragment carries the ports; later ones are found by source, destination, identification and
//! protocol). ICMPv6 errors (destination unreachable, packet too big, time exceeded, parameter
//! problem) quoting TCP or UDP right after the quoted IPv6 header are parsed down to the quoted
//! tuple; Neighbour Discovery and every other ICMPv6 pass. UDP with a zero checksum is flagged
//! (`Flow::udp_no_csum`): malformed to a Service address, left alone to anything else.

use core::mem::size_of;

use lb_common::{counters, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    family::V6,
    maps::opaque,
    parse::{ptr_at, EthHdr, Flow, Fragment, IcmpError, IcmpHdr, Parsed, TcpHdr, UdpHdr, ETH_HLEN},
};

const ETH_P_IPV6: u16 = 0x86DD;

/// Extension headers followed before the transport header.
pub const MAX_EXT_HEADERS: usize = 4;

const NEXT_HOPOPTS: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_AH: u8 = 51;
const NEXT_DSTOPTS: u8 = 60;
pub const IPPROTO_ICMPV6: u8 = 58;

const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PARAMPROB: u8 = 4;

/// The fixed IPv6 header.
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class, flow label.
    pub vtc_flow: [u8; 4],
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

/// The first 8 bytes of any extension header (the Fragment header is exactly these).
#[repr(C)]
struct ExtHdr {
    next: u8,
    /// Hop-by-Hop, Routing, Destination Options: length in 8-byte units after the first 8;
    /// Authentication: in 4-byte units, minus 2.
    len: u8,
    /// Fragment header: offset (13 bits, in 8-byte units) and flags (M: the lowest bit).
    frag_off: u16,
    /// Fragment header: the identification.
    id: u32,
}

const IP6_MF: u16 = 0x0001;
const IP6_OFFSET: u16 = 0xfff8;

#[inline(always)]
fn is_ext(next: u8) -> bool {
    matches!(next, NEXT_HOPOPTS | NEXT_ROUTING | NEXT_FRAGMENT | NEXT_AH | NEXT_DSTOPTS)
}

/// The IPv6 parser.
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Parsed<V6> {
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return Parsed::Drop(counters::DROP_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).proto }) != ETH_P_IPV6 {
        return Parsed::Pass(counters::PASS_NON_IP);
    }
    let Some(ip) = ptr_at::<Ipv6Hdr>(data, data_end, ETH_HLEN) else {
        return Parsed::Drop(counters::DROP_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let (first, mut next, saddr, daddr) =
        unsafe { ((*ip).vtc_flow[0], (*ip).nexthdr, (*ip).saddr, (*ip).daddr) };
    if first >> 4 != 6 {
        return Parsed::Drop(counters::DROP_MALFORMED);
    }
    let mut l4_off = ETH_HLEN + size_of::<Ipv6Hdr>();
    // The Fragment header's offset-and-flags and identification, if there is one.
    let (mut has_frag, mut frag_off, mut frag_id) = (false, 0u16, 0u32);
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        if !is_ext(next) {
            break;
        }
        // Out of reach: cut short, or past what the hook pulled in (TC: `MAX_HEADERS`), which
        // long options headers can be. Either way a packet whose ports lb cannot see.
        let Some(h) = ptr_at::<ExtHdr>(data, data_end, l4_off) else {
            return Parsed::TooDeep(daddr);
        };
        // SAFETY: bounds checked by ptr_at.
        let (n, len, off, id) = unsafe { ((*h).next, (*h).len, (*h).frag_off, (*h).id) };
        l4_off += match next {
            NEXT_FRAGMENT => {
                (has_frag, frag_off, frag_id) = (true, u16::from_be(off), id);
                8
            }
            NEXT_AH => (usize::from(len) + 2) * 4,
            _ => (usize::from(len) + 1) * 8,
        };
        next = n;
        i += 1;
        // A non-first fragment: what follows its Fragment header is payload, whatever `next`
        // names (a header in the first fragment).
        if has_frag && frag_off & IP6_OFFSET != 0 {
            break;
        }
    }
    if is_ext(next) {
        if has_frag && frag_off & IP6_OFFSET != 0 {
            return Parsed::Pass(counters::PASS_FRAGMENT);
        }
        return Parsed::TooDeep(daddr);
    }
    // Every path through the extension headers (each kind and length its own known offset) meets
    // here in one verifier state: the offset and the fragment fields are passed through memory
    // the verifier does not follow. Otherwise the pipeline after the parser is verified once per
    // path, past the verifier's 1M-instruction limit. The offset is at most 54 + 4 × 2048.
    let packed = usize::from(has_frag) << 31 | usize::from(frag_off) << 14 | l4_off;
    let (Some(packed), Some(id)) = (opaque(packed, 0xffff_ffff), opaque(frag_id as usize, 0xffff_ffff))
    else {
        return Parsed::Drop(counters::DROP_MALFORMED);
    };
    let (has_frag, frag_off, frag_id) = (packed >> 31 != 0, (packed >> 14) as u16, id as u32);
    let l4_off = packed & 0x3fff;
    if has_frag && frag_off & IP6_OFFSET != 0 {
        if next != IPPROTO_TCP && next != IPPROTO_UDP {
            return Parsed::Pass(counters::PASS_FRAGMENT);
        }
        return Parsed::Fragment(Fragment { l4_off, saddr, daddr, proto: next, frag_id });
    }
    let (sport, dport, tcp_flags, udp_no_csum) = match next {
        IPPROTO_TCP => match ptr_at::<TcpHdr>(data, data_end, l4_off) {
            // SAFETY: bounds checked by ptr_at.
            Some(t) => unsafe { ((*t).source, (*t).dest, (*t).flags, false) },
            None => return short_l4(l4_off, daddr),
        },
        IPPROTO_UDP => match ptr_at::<UdpHdr>(data, data_end, l4_off) {
            // SAFETY: bounds checked by ptr_at.
            Some(u) => unsafe { ((*u).source, (*u).dest, 0, (*u).check == 0) },
            None => return short_l4(l4_off, daddr),
        },
        IPPROTO_ICMPV6 if !has_frag => return parse_icmp6_error(data, data_end, l4_off, saddr, daddr),
        _ => return Parsed::Pass(counters::PASS_OTHER_PROTO),
    };
    let first_fragment = has_frag && frag_off & IP6_MF != 0;
    Parsed::Flow(Flow {
        l4_off,
        saddr,
        daddr,
        sport,
        dport,
        proto: next,
        tcp_flags,
        first_fragment,
        later_fragment: false,
        frag_id,
        udp_no_csum,
    })
}

/// A transport header out of reach: right after the IPv6 header, a packet cut short; behind
/// extension headers, possibly past what the hook pulled in (`Parsed::TooDeep`).
#[inline(always)]
fn short_l4(l4_off: usize, daddr: [u32; 4]) -> Parsed<V6> {
    if l4_off > ETH_HLEN + size_of::<Ipv6Hdr>() {
        Parsed::TooDeep(daddr)
    } else {
        Parsed::Drop(counters::DROP_MALFORMED)
    }
}

/// An ICMPv6 error quoting TCP or UDP (right after the quoted IPv6 header), or (anything else: ND,
/// echo, a quote too short) another protocol to pass: ICMPv6 is not lb's to drop.
#[inline(always)]
fn parse_icmp6_error(
    data: usize,
    data_end: usize,
    icmp_off: usize,
    outer_saddr: [u32; 4],
    outer_daddr: [u32; 4],
) -> Parsed<V6> {
    let other = Parsed::Pass(counters::PASS_OTHER_PROTO);
    let Some(icmp) = ptr_at::<IcmpHdr>(data, data_end, icmp_off) else { return other };
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp).kind };
    if !(ICMP6_DEST_UNREACH..=ICMP6_PARAMPROB).contains(&kind) {
        return other;
    }
    let inner_off = icmp_off + size_of::<IcmpHdr>();
    let Some(inner) = ptr_at::<Ipv6Hdr>(data, data_end, inner_off) else { return other };
    // SAFETY: bounds checked by ptr_at.
    let (first, proto, saddr, daddr) =
        unsafe { ((*inner).vtc_flow[0], (*inner).nexthdr, (*inner).saddr, (*inner).daddr) };
    if first >> 4 != 6 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return other;
    }
    let inner_l4_off = inner_off + size_of::<Ipv6Hdr>();
    let Some(ports) = ptr_at::<UdpHdr>(data, data_end, inner_l4_off) else { return other };
    // SAFETY: bounds checked by ptr_at.
    let (sport, dport) = unsafe { ((*ports).source, (*ports).dest) };
    Parsed::IcmpError(IcmpError {
        icmp_off,
        inner_off,
        inner_l4_off,
        outer_saddr,
        outer_daddr,
        saddr,
        daddr,
        sport,
        dport,
        proto,
    })
}
