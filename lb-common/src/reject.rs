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
}
