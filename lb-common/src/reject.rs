//! The ICMP port unreachable that answers a new flow to a Service without endpoints, built from
//! the rejected frame's first bytes: the answer kube-proxy's REJECT rule gives (netfilter's
//! `ipt_REJECT` with its default `icmp-port-unreachable`), so that a TCP client gets
//! ECONNREFUSED and a connected UDP socket an error at once. Pure, so that the datapath and the
//! tests build and check the same bytes.

use crate::csum::checksum;

/// Bytes of the rejected frame that the answer needs: Ethernet, an IPv4 header without options,
/// and the first 8 bytes of its payload (the ports).
pub const REJECT_IN: usize = 14 + 20 + 8;
/// Length of the answer: Ethernet, IPv4, the ICMP header and the quote (RFC 792: the original
/// IPv4 header and the first 64 bits of its data).
pub const REJECT_OUT: usize = 14 + 20 + 8 + 20 + 8;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
use crate::IPPROTO_ICMP;
/// Precedence "internetwork control", as Linux's `icmp_send` sets it.
const TOS_INTERNETCONTROL: u8 = 0xc0;

/// Whether a packet whose IPv4 header starts with `version_ihl`, from `src`, gets an answer:
/// version 4 without options (the quote is a fixed 20-byte header), from a unicast address that
/// is not this host's loopback (RFC 1122 §3.2.2: never about a packet from 0.0.0.0, a multicast
/// or broadcast address).
#[inline(always)]
pub fn answerable(version_ihl: u8, src: [u8; 4]) -> bool {
    version_ihl == 0x45 && src[0] != 0 && src[0] < 224 && src[0] != 127
}

/// Builds into `out` the answer to `frame` (its first [`REJECT_IN`] bytes): from the address the
/// client sent to, back to the client, between the frame's Ethernet addresses swapped. Returns
/// false, writing nothing useful, when the frame gets no answer (RFC 1122 §3.2.2): its IPv4 header
/// has options (not quoted here), or its source is not a unicast address.
#[inline(always)]
pub fn port_unreachable(frame: &[u8; REJECT_IN], out: &mut [u8; REJECT_OUT]) -> bool {
    let ip = &frame[14..34];
    let src = [ip[12], ip[13], ip[14], ip[15]];
    if !answerable(ip[0], src) {
        return false;
    }
    // Ethernet: back to the sender.
    out[..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[..6]);
    out[12] = 0x08;
    out[13] = 0x00;
    // IPv4: from the address the client sent to.
    let total = (REJECT_OUT - 14) as u16;
    let hdr = [
        0x45,
        TOS_INTERNETCONTROL,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0,
        0,
        64,
        IPPROTO_ICMP,
        0,
        0,
        ip[16],
        ip[17],
        ip[18],
        ip[19],
        src[0],
        src[1],
        src[2],
        src[3],
    ];
    out[14..34].copy_from_slice(&hdr);
    let c = checksum(&out[14..34]).to_ne_bytes();
    out[24] = c[0];
    out[25] = c[1];
    // ICMP: port unreachable, quoting the frame's IPv4 header and ports.
    out[34] = ICMP_DEST_UNREACH;
    out[35] = ICMP_PORT_UNREACH;
    out[36..42].copy_from_slice(&[0; 6]);
    out[42..].copy_from_slice(&frame[14..]);
    let c = checksum(&out[34..]).to_ne_bytes();
    out[36] = c[0];
    out[37] = c[1];
    true
}

/// Bytes of a rejected IPv6 frame that the answer needs: Ethernet, the IPv6 header, and the first
/// 8 bytes of the transport header (the ports) right after it.
pub const REJECT6_IN: usize = 14 + 40 + 8;
/// Length of the IPv6 answer: Ethernet, IPv6, the ICMPv6 header, and the quote (the IPv6 header
/// and the ports: RFC 4443 asks for as much as fits, and the ports are what the client's kernel
/// finds its socket by).
pub const REJECT6_OUT: usize = 14 + 40 + 8 + 40 + 8;

const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;
const NEXT_ICMP6: u8 = 58;

/// Whether an IPv6 packet whose header starts with `first` (version and traffic class), whose
/// next header is `next`, from `src`, gets an answer: IPv6, its transport header right after the
/// IPv6 header (one behind extension headers is not quoted here, as an IPv4 header with options
/// is not), from a unicast address that is not unspecified or loopback (RFC 4443 §2.4 (e)).
#[inline(always)]
pub fn answerable6(first: u8, next: u8, src: &[u8; 16]) -> bool {
    let transport = next == crate::IPPROTO_TCP || next == crate::IPPROTO_UDP;
    let mut zero_to_14 = true;
    let mut i = 0;
    while i < 15 {
        zero_to_14 &= src[i] == 0;
        i += 1;
    }
    let unspecified_or_loopback = zero_to_14 && src[15] <= 1;
    first >> 4 == 6 && transport && src[0] != 0xff && !unspecified_or_loopback
}

/// Builds into `out` the ICMPv6 port unreachable (destination unreachable, code 4) that answers
/// `frame` (its first [`REJECT6_IN`] bytes), as [`port_unreachable`] does for IPv4: from the
/// address the client sent to, back to the client, its checksum over the pseudo-header. Returns
/// false, writing nothing useful, when the frame gets no answer ([`answerable6`]).
#[inline(always)]
pub fn port_unreachable6(frame: &[u8; REJECT6_IN], out: &mut [u8; REJECT6_OUT]) -> bool {
    let mut src = [0u8; 16];
    src.copy_from_slice(&frame[22..38]);
    if !answerable6(frame[14], frame[20], &src) {
        return false;
    }
    out[..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[..6]);
    out[12] = 0x86;
    out[13] = 0xdd;
    // IPv6: version 6, no traffic class or flow label; from the address the client sent to.
    let len = (REJECT6_OUT - 14 - 40) as u16;
    out[14..18].copy_from_slice(&[0x60, 0, 0, 0]);
    out[18..20].copy_from_slice(&len.to_be_bytes());
    out[20] = NEXT_ICMP6;
    out[21] = 64;
    out[22..38].copy_from_slice(&frame[38..54]);
    out[38..54].copy_from_slice(&src);
    // ICMPv6: port unreachable, quoting the frame's IPv6 header and ports.
    out[54] = ICMP6_DEST_UNREACH;
    out[55] = ICMP6_PORT_UNREACH;
    out[56..62].copy_from_slice(&[0; 6]);
    out[62..].copy_from_slice(&frame[14..]);
    // The pseudo-header: both addresses, then the length and next header (RFC 8200 §8.1).
    let mut tail = [0u8; 8];
    tail[2..4].copy_from_slice(&len.to_be_bytes());
    tail[7] = NEXT_ICMP6;
    let pseudo = crate::csum::finish(crate::csum::sum(&out[22..54]), crate::csum::sum(&tail));
    let c = crate::csum::finish(!pseudo, crate::csum::sum(&out[54..])).to_ne_bytes();
    out[56] = c[0];
    out[57] = c[1];
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: [u8; 4], version_ihl: u8) -> [u8; REJECT_IN] {
        let mut f = [0u8; REJECT_IN];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12] = 8;
        f[14] = version_ihl;
        f[23] = 6;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&[10, 96, 0, 10]);
        f[34..38].copy_from_slice(&[0xa0, 0x28, 0, 80]);
        f
    }

    #[test]
    fn answers_unicast_sources_with_a_valid_port_unreachable() {
        let f = frame([10, 244, 1, 10], 0x45);
        let mut out = [0u8; REJECT_OUT];
        assert!(port_unreachable(&f, &mut out));
        assert_eq!(&out[..6], &f[6..12]);
        assert_eq!(&out[6..12], &f[..6]);
        assert_eq!(checksum(&out[14..34]), 0, "IPv4 header checksum");
        assert_eq!(checksum(&out[34..]), 0, "ICMP checksum");
        assert_eq!(&out[26..30], &[10, 96, 0, 10], "from the Service address");
        assert_eq!(&out[30..34], &[10, 244, 1, 10], "to the client");
        assert_eq!((out[34], out[35]), (3, 3));
        assert_eq!(&out[42..], &f[14..], "the quote");
    }

    #[test]
    fn never_answers_options_or_non_unicast_sources() {
        let mut out = [0u8; REJECT_OUT];
        assert!(!port_unreachable(&frame([10, 244, 1, 10], 0x46), &mut out));
        for src in [[0, 0, 0, 0], [224, 0, 0, 1], [255, 255, 255, 255], [127, 0, 0, 1]] {
            assert!(!port_unreachable(&frame(src, 0x45), &mut out), "{src:?}");
        }
    }

    fn frame6(src: [u8; 16], next: u8) -> [u8; REJECT6_IN] {
        let mut f = [0u8; REJECT6_IN];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[14] = 0x60;
        f[18..20].copy_from_slice(&20u16.to_be_bytes());
        f[20] = next;
        f[21] = 64;
        f[22..38].copy_from_slice(&src);
        f[38..54].copy_from_slice(&[0xfd, 0, 0, 0x10, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        f[54..58].copy_from_slice(&[0xa0, 0x28, 0, 80]);
        f
    }

    const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2];

    /// The ICMPv6 checksum of an answer, computed from scratch over the pseudo-header laid out as
    /// bytes: 0 when right.
    fn icmp6_check(out: &[u8; REJECT6_OUT]) -> u16 {
        let mut b = [0u8; 40 + REJECT6_OUT - 54];
        b[..32].copy_from_slice(&out[22..54]);
        b[34..36].copy_from_slice(&((REJECT6_OUT - 54) as u16).to_be_bytes());
        b[39] = 58;
        b[40..].copy_from_slice(&out[54..]);
        checksum(&b)
    }

    #[test]
    fn answers_ipv6_unicast_sources_with_a_valid_port_unreachable() {
        for next in [6, 17] {
            let f = frame6(CLIENT6, next);
            let mut out = [0u8; REJECT6_OUT];
            assert!(port_unreachable6(&f, &mut out));
            assert_eq!(&out[..6], &f[6..12]);
            assert_eq!(&out[6..12], &f[..6]);
            assert_eq!(&out[12..14], &[0x86, 0xdd]);
            assert_eq!(u16::from_be_bytes([out[18], out[19]]) as usize, REJECT6_OUT - 54, "payload length");
            assert_eq!((out[20], out[21]), (58, 64));
            assert_eq!(&out[22..38], &f[38..54], "from the Service address");
            assert_eq!(&out[38..54], &CLIENT6, "to the client");
            assert_eq!((out[54], out[55]), (1, 4), "destination unreachable, port unreachable");
            assert_eq!(icmp6_check(&out), 0, "ICMPv6 checksum over the pseudo-header");
            assert_eq!(&out[62..], &f[14..], "the quote");
        }
    }

    #[test]
    fn never_answers_extension_headers_or_non_unicast_ipv6_sources() {
        let mut out = [0u8; REJECT6_OUT];
        for next in [0, 43, 44, 60, 58] {
            assert!(!port_unreachable6(&frame6(CLIENT6, next), &mut out), "next header {next}");
        }
        let mut multicast = [0u8; 16];
        multicast[0] = 0xff;
        multicast[15] = 1;
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        for src in [[0u8; 16], loopback, multicast] {
            assert!(!port_unreachable6(&frame6(src, 6), &mut out), "{src:?}");
        }
        let mut v4 = frame6(CLIENT6, 6);
        v4[14] = 0x45;
        assert!(!port_unreachable6(&v4, &mut out), "not version 6");
    }
}
