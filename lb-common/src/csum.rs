//! Incremental Internet checksum updates (RFC 1624, eqn. 3), for the paths that rewrite packet
//! bytes directly (XDP). The TC path uses the kernel's `bpf_l3/l4_csum_replace` helpers instead,
//! which also handle `CHECKSUM_PARTIAL` and `CHECKSUM_COMPLETE` socket buffers.
//!
//! Values are raw 16/32-bit words as read from the packet: one's-complement sums do not depend on
//! byte order as long as every word is read the same way.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// How much the sum of some data changes when a 16-bit word of it goes from `old` to `new`
/// (what a received packet's sum must follow where no checksum offsets the change).
#[inline(always)]
pub fn diff2(old: u16, new: u16) -> u16 {
    !replace2(0xffff, old, new)
}

/// As [`diff2`], for a 128-bit field (an IPv6 address), words as read from the packet.
#[inline(always)]
pub fn diff16(old: [u32; 4], new: [u32; 4]) -> u16 {
    !replace16(0xffff, old, new)
}

/// The checksum after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(sum)
}

/// The checksum after a 32-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

/// The checksum after a 128-bit field of the covered data (an IPv6 address, in the pseudo-header
/// of every IPv6 L4 checksum) changed from `old` to `new`, words as read from the packet.
#[inline(always)]
pub fn replace16(check: u16, old: [u32; 4], new: [u32; 4]) -> u16 {
    let mut sum = u32::from(!check);
    let mut i = 0;
    while i < 4 {
        sum += u32::from(!(old[i] as u16)) + u32::from(!((old[i] >> 16) as u16));
        sum += u32::from(new[i] as u16) + u32::from((new[i] >> 16) as u16);
        // Folded as it goes: eight words a round never overflow.
        sum = (sum & 0xffff) + (sum >> 16);
        i += 1;
    }
    !fold(sum)
}

/// UDP over IPv4: a zero checksum means "none" and must stay zero; a computed zero is sent as
/// 0xffff (RFC 768).
#[inline(always)]
pub fn udp_fixup(original: u16, updated: u16) -> u16 {
    if original == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

/// The folded, uncomplemented sum of the IPv4 pseudo-header of a TCP or UDP packet: what the
/// kernel stores in the L4 checksum field of a packet whose checksum is still partial
/// (`CHECKSUM_PARTIAL`: the device, or whoever completes it, adds the segment's sum). `saddr`
/// and `daddr` are raw words as read from the packet; `len` is the L4 length in host order.
/// The result compares with the raw checksum field.
#[inline(always)]
pub fn pseudo_sum4(saddr: u32, daddr: u32, proto: u8, len: u16) -> u16 {
    let sum = u32::from(saddr as u16)
        + u32::from((saddr >> 16) as u16)
        + u32::from(daddr as u16)
        + u32::from((daddr >> 16) as u16)
        + u32::from(u16::from_ne_bytes([0, proto]))
        + u32::from(u16::from_ne_bytes(len.to_be_bytes()));
    fold(sum)
}

/// The folded, uncomplemented sum of the IPv6 pseudo-header (RFC 8200 §8.1) of an upper-layer
/// packet of `len` bytes (host order): as [`pseudo_sum4`], what a partial checksum holds.
#[inline(always)]
pub fn pseudo_sum6(saddr: [u32; 4], daddr: [u32; 4], next: u8, len: u32) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 4 {
        sum += u32::from(saddr[i] as u16) + u32::from((saddr[i] >> 16) as u16);
        sum += u32::from(daddr[i] as u16) + u32::from((daddr[i] >> 16) as u16);
        i += 1;
    }
    let l = len.to_be_bytes();
    sum += u32::from(u16::from_ne_bytes([l[0], l[1]])) + u32::from(u16::from_ne_bytes([l[2], l[3]]));
    sum += u32::from(u16::from_ne_bytes([0, next]));
    fold(sum)
}

/// The uncomplemented one's-complement sum of `bytes` (an even number), folded: to add the sums
/// of pieces (a pseudo-header and a message) before [`finish`] complements them.
#[inline(always)]
pub fn sum(bytes: &[u8]) -> u16 {
    !checksum(bytes)
}

/// The checksum to store for pieces whose [`sum`]s are `a` and `b`.
#[inline(always)]
pub fn finish(a: u16, b: u16) -> u16 {
    !fold(u32::from(a) + u32::from(b))
}

/// Whether L4 checksum field `check` may be a partial checksum of a packet whose pseudo-header
/// sums to `pseudo` ([`pseudo_sum4`]). A full checksum equals it only by chance (about one packet
/// in 65,536), so a caller that cannot tell the two apart treats a match as partial.
#[inline(always)]
pub fn maybe_partial(check: u16, pseudo: u16) -> bool {
    check == pseudo || (check == 0 && pseudo == 0xffff) || (check == 0xffff && pseudo == 0)
}

/// The Internet checksum of `bytes` (an even number of them), as a raw word to store.
#[inline(always)]
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum over 16-bit words, computed from scratch.
    fn full(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += u32::from(*w);
        }
        !fold(sum)
    }

    #[test]
    fn incremental_updates_match_full_recomputation() {
        let mut state = 0x1234_5678u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for _ in 0..10_000 {
            let mut words: [u16; 10] = core::array::from_fn(|_| next() as u16);
            let check = full(&words);
            let (old, new) = (u32::from(words[2]) | (u32::from(words[3]) << 16), next());
            words[2] = new as u16;
            words[3] = (new >> 16) as u16;
            let want = full(&words);
            let got = replace4(check, old, new);
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(got == want || (got == 0xffff && want == 0) || (got == 0 && want == 0xffff));

            let (old16, new16) = (words[7], next() as u16);
            words[7] = new16;
            let want = full(&words);
            let got2 = replace2(got, old16, new16);
            assert!(got2 == want || (got2 == 0xffff && want == 0) || (got2 == 0 && want == 0xffff));
        }
    }

    /// The partial-checksum seed is what Linux stores (`~csum_tcpudp_magic(saddr, daddr, len,
    /// proto, 0)`), computed here from the RFC 793 pseudo-header laid out as bytes.
    #[test]
    fn pseudo_sum_is_the_partial_checksum_seed() {
        let (s, d) = ([10u8, 244, 1, 10], [10u8, 96, 0, 10]);
        for (proto, len) in [(6u8, 20u16), (17, 8), (6, 1480), (17, 65_515)] {
            let mut bytes = [0u8; 12];
            bytes[..4].copy_from_slice(&s);
            bytes[4..8].copy_from_slice(&d);
            bytes[9] = proto;
            bytes[10..].copy_from_slice(&len.to_be_bytes());
            let seed = !checksum(&bytes);
            let got = pseudo_sum4(u32::from_ne_bytes(s), u32::from_ne_bytes(d), proto, len);
            assert_eq!(got, seed, "proto {proto} len {len}");
            assert!(maybe_partial(seed, got));
            assert!(!maybe_partial(!seed, got));
        }
    }

    #[test]
    fn address_updates_match_full_recomputation() {
        let mut state = 0x9e37_79b9u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for _ in 0..10_000 {
            // An IPv6 pseudo-header and a TCP header's worth of other words.
            let mut words: [u16; 30] = core::array::from_fn(|_| next() as u16);
            let check = full(&words);
            let old: [u32; 4] =
                core::array::from_fn(|i| u32::from(words[2 * i]) | (u32::from(words[2 * i + 1]) << 16));
            let new: [u32; 4] = core::array::from_fn(|_| next());
            for i in 0..4 {
                words[2 * i] = new[i] as u16;
                words[2 * i + 1] = (new[i] >> 16) as u16;
            }
            let want = full(&words);
            let got = replace16(check, old, new);
            assert!(got == want || (got == 0xffff && want == 0) || (got == 0 && want == 0xffff));
        }
    }

    /// The IPv6 partial-checksum seed, from the RFC 8200 pseudo-header laid out as bytes.
    #[test]
    fn pseudo_sum6_is_the_ipv6_partial_checksum_seed() {
        let s: [u8; 16] = [0xfd, 0, 0, 0x10, 0x02, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2];
        let d: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let words = |a: [u8; 16]| -> [u32; 4] {
            core::array::from_fn(|i| u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]))
        };
        for (next, len) in [(6u8, 20u32), (17, 8), (58, 1232), (17, 70_000)] {
            let mut bytes = [0u8; 40];
            bytes[..16].copy_from_slice(&s);
            bytes[16..32].copy_from_slice(&d);
            bytes[32..36].copy_from_slice(&len.to_be_bytes());
            bytes[39] = next;
            assert_eq!(pseudo_sum6(words(s), words(d), next, len), sum(&bytes), "next {next} len {len}");
            assert_eq!(
                finish(sum(&bytes[..20]), sum(&bytes[20..])),
                checksum(&bytes),
                "sums of pieces add up"
            );
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_fixup(0, replace4(0, 1, 2)), 0);
        assert_eq!(udp_fixup(5, 0), 0xffff);
        assert_eq!(udp_fixup(5, 7), 7);
    }
}
