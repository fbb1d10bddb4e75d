//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), as a pure function.
//!
//! `build` depends only on the backends' stable names and weights, the table size and the seed:
//! the order backends arrive in does not matter, so every node computes the same table.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Table sizes to choose from: primes about 20 % apart, so a table is never much larger than 100
/// slots per backend asks for.
pub const TABLE_SIZES: [u32; 33] = [
    251, 307, 367, 443, 541, 653, 787, 947, 1129, 1361, 1637, 1973, 2371, 2851, 3413, 4099, 4919, 5903, 7079,
    8501, 10211, 12251, 14699, 17627, 21149, 25391, 30467, 36563, 43867, 52639, 65537, 131071, 262139,
];

/// Default upper bound of a table's size.
pub const DEFAULT_MAX_TABLE_SIZE: u32 = 65_537;

/// Slots per backend that the table size aims for.
const SLOTS_PER_BACKEND: u64 = 100;

/// The smallest size from [`TABLE_SIZES`] with at least 100 slots per backend, capped at `max`
/// (rounded down to a listed prime, and never below the smallest).
pub fn table_size(backends: usize, max: u32) -> u32 {
    let want = (backends as u64).saturating_mul(SLOTS_PER_BACKEND);
    let cap = TABLE_SIZES.iter().copied().rev().find(|s| *s <= max).unwrap_or(TABLE_SIZES[0]);
    TABLE_SIZES.iter().copied().find(|s| u64::from(*s) >= want).unwrap_or(cap).min(cap)
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

    #[test]
    fn table_size_follows_backend_count() {
        assert_eq!(table_size(0, DEFAULT_MAX_TABLE_SIZE), 251);
        assert_eq!(table_size(2, DEFAULT_MAX_TABLE_SIZE), 251);
        assert_eq!(table_size(3, DEFAULT_MAX_TABLE_SIZE), 307);
        assert_eq!(table_size(100, DEFAULT_MAX_TABLE_SIZE), 10211);
        assert_eq!(table_size(1000, DEFAULT_MAX_TABLE_SIZE), 65537);
        assert_eq!(table_size(5000, 17627), 17627);
        assert!(
            TABLE_SIZES.iter().all(|p| (2..*p).take_while(|d| d * d <= *p).all(|d| p % d != 0)),
            "all prime"
        );
        assert!(TABLE_SIZES.windows(2).all(|w| w[0] < w[1]));
    }
}
