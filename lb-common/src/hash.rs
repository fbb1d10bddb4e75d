//! The flow hash: Bob Jenkins' lookup3 `jhash_3words`, as in the Linux kernel's `jhash.h`.
//!
//! The datapath hashes every new flow with it, and the agent's tests use the same code, so a
//! Maglev table built identically on two nodes gives identical choices on both.

/// The kernel's `JHASH_INITVAL`.
pub const JHASH_INITVAL: u32 = 0xdead_beef;

/// Seed used for flow hashing unless the agent sets another at load time.
pub const DEFAULT_FLOW_HASH_SEED: u32 = 0x4c42_0001;

#[inline(always)]
fn final_mix(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    let _ = a;
    c
}

/// `jhash_3words(a, b, c, initval)` from `include/linux/jhash.h`.
#[inline(always)]
pub fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let iv = initval.wrapping_add(JHASH_INITVAL).wrapping_add(3 << 2);
    final_mix(a.wrapping_add(iv), b.wrapping_add(iv), c.wrapping_add(iv))
}

/// Hash of an IPv4 5-tuple as the datapath computes it. Addresses and ports are the raw
/// network-order values read from the packet.
#[inline(always)]
pub fn lb4_flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    let ports = (u32::from(sport) << 16) | u32::from(dport);
    jhash_3words(saddr, daddr, ports, seed ^ u32::from(proto))
}

/// One word of an IPv6 address's four (network-order words as read from the packet): every bit
/// of the address changes it.
#[inline(always)]
pub fn fold6(a: [u32; 4]) -> u32 {
    jhash_3words(a[0], a[1], a[2], a[3])
}

/// Hash of an IPv6 5-tuple as the datapath computes it: [`lb4_flow_hash`] of the folded
/// addresses ([`fold6`]).
#[inline(always)]
pub fn lb6_flow_hash(saddr: [u32; 4], daddr: [u32; 4], sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    lb4_flow_hash(fold6(saddr), fold6(daddr), sport, dport, proto, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_kernel_jhash_reference_values() {
        // Reference values from a C program built from the kernel's jhash.h macros, verbatim.
        assert_eq!(jhash_3words(0, 0, 0, 0), 0x1b68_e557);
        assert_eq!(jhash_3words(1, 2, 3, 4), 0x8103_143f);
        assert_eq!(jhash_3words(0x0100_000a, 0x0a00_600a, 0x5000_1f90, 0x4c42_0007), 0x8155_ffd4);
        // Every input word changes the result.
        let base = jhash_3words(1, 2, 3, 4);
        assert_eq!(base, jhash_3words(1, 2, 3, 4));
        assert_ne!(base, jhash_3words(9, 2, 3, 4));
        assert_ne!(base, jhash_3words(1, 9, 3, 4));
        assert_ne!(base, jhash_3words(1, 2, 9, 4));
        assert_ne!(base, jhash_3words(1, 2, 3, 9));
    }

    #[test]
    fn even_source_ports_spread_over_both_halves() {
        // Linux picks even ephemeral ports; a weak hash would send them all one way.
        let mut odd = 0u32;
        for sport in (32768u16..40960).step_by(2) {
            odd += lb4_flow_hash(0x0a00_0001, 0x0a60_000a, sport.to_be(), 80u16.to_be(), 6, 7) & 1;
        }
        let total = 4096u32;
        assert!(odd > total * 45 / 100 && odd < total * 55 / 100, "odd={odd} of {total}");
    }
}
