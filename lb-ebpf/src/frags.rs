//! Fragments (of any family): a datagram's first fragment carries the ports, the others only its
//! addresses, protocol and identification. When lb translates a first fragment it keeps the ports
//! under that identity (`LB4_FRAGS`, `LB6_FRAGS`), and the later fragments are decided and translated as the first one
//! was (Cilium's `ENABLE_IPV4_FRAGMENTS`). A later fragment that arrives before its first one
//! finds nothing and passes untouched, as do fragments of datagrams lb does not translate.

use lb_common::{counters, Lb4FragPorts};

use crate::{
    family::Family,
    parse::{Flow, Fragment},
    stats::count,
};

/// The ports of the datagram non-first fragment `frag` belongs to, if lb translated its first
/// fragment.
#[inline(always)]
pub fn ports<F: Family>(frag: &Fragment<F>) -> Option<Lb4FragPorts> {
    let key = F::frag_key(frag.saddr, frag.daddr, frag.frag_id, frag.proto);
    // SAFETY: the value is copied out at once.
    unsafe { F::frags().get(&key) }.copied()
}

/// Called for every packet lb translated: a first fragment leaves its ports for the rest of its
/// datagram; a later one is counted.
#[inline(always)]
pub fn translated<F: Family>(f: &Flow<F>) {
    if f.first_fragment {
        let key = F::frag_key(f.saddr, f.daddr, f.frag_id, f.proto);
        let _ = F::frags().insert(&key, &Lb4FragPorts { sport: f.sport, dport: f.dport }, 0);
    } else if f.later_fragment {
        count(counters::LATER_FRAGMENT);
    }
}
