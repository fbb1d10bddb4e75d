//! Header parsing with a bounds check before every access. The packet as the shared code sees it
//! ([`Flow`], [`Fragment`], [`IcmpError`]: generic over the address family), and the IPv4 parser
//! ([`parse`]). IPv4 header length is taken from IHL
//! (options allowed); fragments, truncated headers and other protocols get a defined outcome.
//! ICMP errors (destination unreachable, time exceeded, parameter problem) that quote a TCP or
//! UDP packet are parsed down to the quoted tuple, for the reply program to translate.

use core::mem::size_of;

use lb_common::{counters, IPPROTO_TCP, IPPROTO_UDP};

use crate::family::{Family, V4};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// The fixed TCP header.
#[repr(C)]
pub struct TcpHdr {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

#[repr(C)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

/// Offsets of fields the rewriters touch.
pub const TCP_CHECK_OFF: usize = 16;
pub const UDP_CHECK_OFF: usize = 6;

/// A TCP or UDP packet of family `F`, as far as lb needs to know it.
pub struct Flow<F: Family> {
    pub l4_off: usize,
    pub saddr: F::Addr,
    pub daddr: F::Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// The first fragment of a datagram in fragments (it carries the L4 header).
    pub first_fragment: bool,
    /// A non-first fragment: no L4 header; the ports are its first fragment's (`LB4_FRAGS`).
    /// Only addresses are rewritten.
    pub later_fragment: bool,
    /// The identification the fragments of one datagram share, network byte order.
    pub frag_id: F::FragId,
    /// UDP over IPv6 without a checksum (0): malformed to a Service address (RFC 8200 §8.1),
    /// passed untouched to any other (tunnels, RFC 6935). Never set for IPv4, where 0 is "none".
    pub udp_no_csum: bool,
}

impl<F: Family> Flow<F> {
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        self.l4_off + if self.proto == IPPROTO_TCP { TCP_CHECK_OFF } else { UDP_CHECK_OFF }
    }
}

/// An ICMP error about a TCP or UDP packet: where its parts are and the quoted packet's tuple.
pub struct IcmpError<F: Family> {
    /// The ICMP header.
    pub icmp_off: usize,
    /// The quoted IP header.
    pub inner_off: usize,
    /// The quoted TCP or UDP header, of which at least 8 bytes (ports; UDP's checksum) are there.
    pub inner_l4_off: usize,
    pub outer_saddr: F::Addr,
    pub outer_daddr: F::Addr,
    /// The quoted packet: source, destination, protocol.
    pub saddr: F::Addr,
    pub daddr: F::Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// A non-first fragment of a TCP or UDP datagram: what finds its first fragment's ports.
pub struct Fragment<F: Family> {
    pub l4_off: usize,
    pub saddr: F::Addr,
    pub daddr: F::Addr,
    pub proto: u8,
    pub frag_id: F::FragId,
}

impl<F: Family> Fragment<F> {
    /// The fragment as a flow, with its first fragment's ports.
    #[inline(always)]
    pub fn flow(&self, sport: u16, dport: u16) -> Flow<F> {
        Flow {
            l4_off: self.l4_off,
            saddr: self.saddr,
            daddr: self.daddr,
            sport,
            dport,
            proto: self.proto,
            tcp_flags: 0,
            first_fragment: false,
            later_fragment: true,
            frag_id: self.frag_id,
            udp_no_csum: false,
        }
    }
}

pub enum Parsed<F: Family> {
    Flow(Flow<F>),
    /// A non-first fragment of a TCP or UDP datagram.
    Fragment(Fragment<F>),
    IcmpError(IcmpError<F>),
    /// Not for lb: pass untouched and count.
    Pass(u32),
    /// More IPv6 extension headers than lb follows, to this destination: dropped if it is a
    /// Service address, else passed (`crate::parse6`).
    TooDeep(F::Addr),
    /// Malformed: drop and count.
    Drop(u32),
}

/// A pointer to a `T` at `off`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    let start = data + off;
    if start + size_of::<T>() > data_end {
        return None;
    }
    Some(start as *mut T)
}

/// Whether the frame is IPv6 (its Ethernet type).
#[inline(always)]
pub fn is_ipv6(data: usize, data_end: usize) -> bool {
    match ptr_at::<EthHdr>(data, data_end, 0) {
        // SAFETY: bounds checked by ptr_at.
        Some(eth) => u16::from_be(unsafe { (*eth).proto }) == ETH_P_IPV6,
        None => false,
    }
}

/// The IPv4 parser ([`V4`]'s `Family::parse`).
#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Parsed<V4> {
    let Some(eth) = ptr_at::<EthHdr>(data, data_end, 0) else {
        return Parsed::Drop(counters::DROP_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let eth_proto = u16::from_be(unsafe { (*eth).proto });
    if eth_proto == ETH_P_IPV6 {
        return Parsed::Pass(counters::PASS_IPV6);
    }
    if eth_proto != ETH_P_IP {
        return Parsed::Pass(counters::PASS_NON_IP);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, ETH_HLEN) else {
        return Parsed::Drop(counters::DROP_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let (version_ihl, frag_off, proto, saddr, daddr, ip_id) = unsafe {
        ((*ip).version_ihl, u16::from_be((*ip).frag_off), (*ip).proto, (*ip).saddr, (*ip).daddr, (*ip).id)
    };
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() {
        return Parsed::Drop(counters::DROP_MALFORMED);
    }
    let l4_off = ETH_HLEN + ihl;
    if data + l4_off > data_end {
        return Parsed::Drop(counters::DROP_MALFORMED);
    }
    if frag_off & IP_OFFSET != 0 {
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Parsed::Pass(counters::PASS_FRAGMENT);
        }
        return Parsed::Fragment(Fragment { l4_off, saddr, daddr, proto, frag_id: ip_id });
    }
    // Each header is read through the one pointer that was bounds-checked for it: the verifier
    // loses track of a check made on a recomputed pointer.
    let (sport, dport, tcp_flags) = match proto {
        IPPROTO_TCP => match ptr_at::<TcpHdr>(data, data_end, l4_off) {
            // SAFETY: bounds checked by ptr_at.
            Some(t) => unsafe { ((*t).source, (*t).dest, (*t).flags) },
            None => return Parsed::Drop(counters::DROP_MALFORMED),
        },
        IPPROTO_UDP => match ptr_at::<UdpHdr>(data, data_end, l4_off) {
            // SAFETY: bounds checked by ptr_at.
            Some(u) => unsafe { ((*u).source, (*u).dest, 0) },
            None => return Parsed::Drop(counters::DROP_MALFORMED),
        },
        IPPROTO_ICMP => return parse_icmp_error(data, data_end, l4_off, saddr, daddr),
        _ => return Parsed::Pass(counters::PASS_OTHER_PROTO),
    };
    Parsed::Flow(Flow {
        l4_off,
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        first_fragment: frag_off & IP_MF != 0,
        later_fragment: false,
        frag_id: ip_id,
        udp_no_csum: false,
    })
}

/// An ICMP error quoting TCP or UDP, or (anything else, a quote too short) another protocol to
/// pass: ICMP is not lb's to drop.
#[inline(always)]
fn parse_icmp_error(
    data: usize,
    data_end: usize,
    icmp_off: usize,
    outer_saddr: u32,
    outer_daddr: u32,
) -> Parsed<V4> {
    let other = Parsed::Pass(counters::PASS_OTHER_PROTO);
    let Some(icmp) = ptr_at::<IcmpHdr>(data, data_end, icmp_off) else { return other };
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp).kind };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETERPROB {
        return other;
    }
    let inner_off = icmp_off + size_of::<IcmpHdr>();
    let Some(inner) = ptr_at::<Ipv4Hdr>(data, data_end, inner_off) else { return other };
    // SAFETY: bounds checked by ptr_at.
    let (version_ihl, proto, saddr, daddr) =
        unsafe { ((*inner).version_ihl, (*inner).proto, (*inner).saddr, (*inner).daddr) };
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return other;
    }
    let inner_l4_off = inner_off + ihl;
    // The first 8 bytes of the quoted header: the ports (and UDP's length and checksum).
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
