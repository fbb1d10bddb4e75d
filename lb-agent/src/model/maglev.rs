//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as a pure function.
//!
//! `build` depends only on the backends' stable names and weights, the table size and the seed:
//! the order backends arrive in does not matter, so every node computes the same table.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Table sizes, one per tier of backend counts: tier `k` holds up to 5 × 4^k backends (1–5,
/// 6–20, 21–80, 81–320, ...), and its size (a prime) gives at least 80 slots per backend at the
/// top of the tier (the first tier more: 204, cheap at that size). A Service changes table size
/// only when its backend count crosses a tier (at most once per 4× growth), because Maglev moves
/// few flows between tables of one size but nearly all between tables of different sizes. The
/// tops sit a quarter above the powers of 4 that replica counts like (4, 16, 64): a Service of
/// that many replicas stays within its tier during a rolling update with the default 25 % surge.
pub const TABLE_SIZES: [u32; 6] = [1_021, 1_601, 6_421, 25_601, 102_407, 409_609];

/// Default upper bound of a table's size.
pub const DEFAULT_MAX_TABLE_SIZE: u32 = 65_537;

/// Sizes a cap (`--maglev-max-table-size`) is rounded down to: the tier sizes and the default.
const CAP_SIZES: [u32; 7] = [1_021, 1_601, 6_421, 25_601, 65_537, 102_407, 409_609];

/// The table size for `backends` backends: the size of their tier (1–5 backends: 1,021 slots,
/// 6–20: 1,601, 21–80: 6,421, 81–320: 25,601, and so on), capped at `max` (rounded down to a
/// listed prime, and never below the smallest). A pure function of the count, so every node
/// builds the same table.
pub fn table_size(backends: usize, max: u32) -> u32 {
    let cap = CAP_SIZES.iter().copied().rev().find(|s| *s <= max).unwrap_or(CAP_SIZES[0]);
    let mut top = 5usize;
    for size in TABLE_SIZES {
        if backends <= top {
            return size.min(cap);
        }
        top = top.saturating_mul(4);
    }
    cap
}

/// The share of `flows` synthetic flows whose backend is in both `before` and `after` but moves
/// to another backend when table `old` (over `before`, indices into it) is replaced by `new`
/// (over `after`): what a change of backends costs the flows that did not have to move. Flows are
/// hashed onto each table as the datapath does (hash modulo size).
pub fn moved_on_survivors(before: &[String], old: &[u32], after: &[String], new: &[u32], flows: u64) -> f64 {
    let (mut survivors, mut moved) = (0u64, 0u64);
    for i in 0..flows {
        let h = xxh3_64_with_seed(&i.to_le_bytes(), 99);
        let was = &before[old[(h % old.len() as u64) as usize] as usize];
        if !after.contains(was) {
            continue;
        }
        survivors += 1;
        if &after[new[(h % new.len() as u64) as usize] as usize] != was {
            moved += 1;
        }
    }
    moved as f64 / survivors.max(1) as f64
}

/// A backend as Maglev sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend<'a> {
    /// Stable name, `IP:port/protocol`.
    pub name: &'a str,
    /// Relative weight; 0 gets no slots.
    pub weight: u32,
}

/// Builds a table of `size` slots (a prime). Each slot holds an index into `backends`. Returns an
/// empty table when no backend has a weight.
pub fn build(backends: &[Backend<'_>], size: u32, seed: u64) -> Vec<u32> {
    assert!(size >= 2, "maglev table size must be at least 2");
    let m = u64::from(size);
    // Work in name order so that the input order does not matter.
    let mut order: Vec<usize> = (0..backends.len()).filter(|i| backends[*i].weight > 0).collect();
    order.sort_by(|a, b| backends[*a].name.cmp(backends[*b].name));
    order.dedup_by(|a, b| backends[*a].name == backends[*b].name);
    if order.is_empty() {
        return Vec::new();
    }
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|i| {
            let name = backends[*i].name.as_bytes();
            let offset = xxh3_64_with_seed(name, seed) % m;
            let skip = xxh3_64_with_seed(name, seed ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = order.iter().map(|i| u64::from(backends[*i].weight)).max().unwrap_or(1);
    let mut next = vec![0u64; order.len()];
    let mut credit = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    while filled < m {
        for (k, i) in order.iter().enumerate() {
            // Weighted turns: a backend claims one slot per `max_weight` of accumulated weight.
            credit[k] += u64::from(backends[*i].weight);
            while credit[k] >= max_weight {
                credit[k] -= max_weight;
                let (offset, skip) = perms[k];
                let mut slot = (offset + next[k] * skip) % m;
                while table[slot as usize] != u32::MAX {
                    next[k] += 1;
                    slot = (offset + next[k] * skip) % m;
                }
                table[slot as usize] = *i as u32;
                next[k] += 1;
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.244.{}.{}:8080/TCP", i / 250, i % 250 + 1)).collect()
    }

    fn backends(names: &[String]) -> Vec<Backend<'_>> {
        names.iter().map(|n| Backend { name: n, weight: 1 }).collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut s = vec![0; n];
        for i in table {
            s[*i as usize] += 1;
        }
        s
    }

    #[test]
    fn every_backend_gets_floor_or_ceil_of_its_share() {
        for (n, size) in [(1, 251), (3, 307 /* any prime */), (7, 1021), (100, 65537), (1000, 65537)] {
            let names = names(n);
            let table = build(&backends(&names), size, 0);
            assert_eq!(table.len(), size as usize);
            let s = shares(&table, n);
            let (lo, hi) = (size as usize / n, (size as usize).div_ceil(n));
            assert!(s.iter().all(|c| *c == lo || *c == hi), "n={n} M={size}: {s:?}");
        }
    }

    #[test]
    fn input_order_does_not_change_the_table() {
        let names = names(10);
        let mut reversed = backends(&names);
        reversed.reverse();
        let a = build(&backends(&names), 1021, 42);
        let b = build(&reversed, 1021, 42);
        // Indices refer to the input slices; compare by name.
        let by_name = |t: &[u32], bs: &[Backend<'_>]| -> Vec<String> {
            t.iter().map(|i| bs[*i as usize].name.to_string()).collect()
        };
        assert_eq!(by_name(&a, &backends(&names)), by_name(&b, &reversed));
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        let names = names(100);
        let all = backends(&names);
        let before = build(&all, 65537, 0);
        let fewer: Vec<Backend<'_>> = all[1..].to_vec();
        let after = build(&fewer, 65537, 0);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 0 && all[**b as usize].name != fewer[**a as usize].name)
            .count();
        assert!(moved * 100 <= 65537, "{moved} slots of remaining backends moved");
        assert_eq!(build(&all, 65537, 0), before, "adding it back restores the table");
    }

    #[test]
    fn weights_are_proportional_and_zero_gets_nothing() {
        let names = names(3);
        let bs = vec![
            Backend { name: &names[0], weight: 1 },
            Backend { name: &names[1], weight: 3 },
            Backend { name: &names[2], weight: 0 },
        ];
        let s = shares(&build(&bs, 65537, 0), 3);
        assert_eq!(s[2], 0);
        let ratio = s[1] as f64 / s[0] as f64;
        assert!((ratio - 3.0).abs() < 0.03, "ratio {ratio}");
    }

    /// Scaling a Service from 1 to 30 backends and back, one at a time, moves about as few flows
    /// on surviving backends as Maglev at a fixed 16,381 slots does (at most 3 points more: a
    /// smaller table disrupts a little more), but at the tier steps (5 ↔ 6 and 20 ↔ 21 backends),
    /// where the size changes and most flows move.
    #[test]
    fn scaling_one_at_a_time_moves_flows_only_at_tier_steps() {
        let all = names(30);
        let counts: Vec<usize> = (1..=30).chain((1..30).rev()).collect();
        let mut steps_with_a_new_size = 0;
        for w in counts.windows(2) {
            let (a, b) = (&all[..w[0]], &all[..w[1]]);
            let (sa, sb) =
                (table_size(a.len(), DEFAULT_MAX_TABLE_SIZE), table_size(b.len(), DEFAULT_MAX_TABLE_SIZE));
            let lb =
                moved_on_survivors(a, &build(&backends(a), sa, 0), b, &build(&backends(b), sb, 0), 20_000);
            let fixed = moved_on_survivors(
                a,
                &build(&backends(a), 16_381, 0),
                b,
                &build(&backends(b), 16_381, 0),
                20_000,
            );
            if sa != sb {
                steps_with_a_new_size += 1;
                continue;
            }
            assert!(
                lb <= fixed + 0.03,
                "{} -> {} backends: {:.1} % of flows on surviving backends moved, fixed 16,381 slots {:.1} %",
                a.len(),
                b.len(),
                lb * 100.0,
                fixed * 100.0
            );
        }
        assert_eq!(steps_with_a_new_size, 4, "5 -> 6, 20 -> 21 and back");
    }

    /// Run-length encoding: `index*count` per run, space-separated.
    fn rle(table: &[u32]) -> String {
        let mut out = Vec::new();
        let mut i = 0;
        while i < table.len() {
            let j = table[i..].iter().position(|v| *v != table[i]).map_or(table.len(), |n| i + n);
            out.push(format!("{}*{}", table[i], j - i));
            i = j;
        }
        out.join(" ")
    }

    /// The table every node must compute for these backends. Changing the hash, the seed handling
    /// or the fill order changes it, and would make nodes of different versions disagree.
    #[test]
    fn reproducible_table_matches_the_checked_in_one() {
        let names: Vec<String> =
            ["10.244.1.2:8080/TCP", "10.244.1.3:8080/TCP", "10.244.2.4:8080/TCP"].map(String::from).to_vec();
        let got = rle(&build(&backends(&names), 307, 0));
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/maglev/three-backends-307.rle");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(path, format!("{got}\n")).expect("write rle");
        }
        let want = std::fs::read_to_string(path).expect("checked-in table");
        assert_eq!(got, want.trim());
    }

    /// IPv6 backends are named in RFC 5952's text form (lower case, the longest run of zero
    /// groups as `::`), in brackets: however an EndpointSlice spells an address, every node hashes
    /// the same name and computes this table.
    #[test]
    fn ipv6_backends_have_one_name_and_the_checked_in_table() {
        use crate::model::{BackendAddr, Protocol};
        let spelled =
            ["FD00:10:244:1:0:0:0:2", "fd00:10:244:1::3", "fd00:0010:0244:0002:0000:0000:0000:0004"];
        let names: Vec<String> = spelled
            .iter()
            .map(|s| {
                BackendAddr { ip: s.parse().expect("an address"), port: 8080, proto: Protocol::Tcp }
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            ["[fd00:10:244:1::2]:8080/TCP", "[fd00:10:244:1::3]:8080/TCP", "[fd00:10:244:2::4]:8080/TCP"]
        );
        let got = rle(&build(&backends(&names), 307, 0));
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/maglev/three-ipv6-backends-307.rle");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(path, format!("{got}\n")).expect("write rle");
        }
        let want = std::fs::read_to_string(path).expect("checked-in table");
        assert_eq!(got, want.trim());
    }

    #[test]
    fn table_size_follows_backend_count_in_tiers() {
        let size = |n| table_size(n, DEFAULT_MAX_TABLE_SIZE);
        for (n, want) in
            [(0, 1_021), (1, 1_021), (5, 1_021), (6, 1_601), (20, 1_601), (21, 6_421), (80, 6_421)]
        {
            assert_eq!(size(n), want, "{n} backends");
        }
        assert_eq!((size(81), size(320)), (25_601, 25_601));
        assert_eq!(size(1000), 65_537, "capped at the default maximum");
        assert_eq!(table_size(1000, 1 << 20), 102_407);
        assert_eq!(table_size(5000, 17_627), 6_421, "a maximum between sizes rounds down");
        assert_eq!(table_size(3, 500), 1_021, "never below the smallest");
        // Every tier has at least 80 slots per backend at its top.
        let mut top = 5u64;
        for s in TABLE_SIZES {
            assert!(u64::from(s) >= 80 * top, "{s} slots for {top} backends");
            top *= 4;
        }
        assert!(
            CAP_SIZES.iter().all(|p| (2..*p).take_while(|d| d * d <= *p).all(|d| p % d != 0)),
            "caps prime"
        );
        assert!(CAP_SIZES.windows(2).all(|w| w[0] < w[1]));
        assert!(
            TABLE_SIZES.iter().all(|p| (2..*p).take_while(|d| d * d <= *p).all(|d| p % d != 0)),
            "all prime"
        );
        assert!(TABLE_SIZES.windows(2).all(|w| w[0] < w[1]));
    }
}
