//! IPv4 fragments: a datagram's first fragment carries the ports, the others only its addresses,
//! protocol and identification. When lb translates a first fragment it keeps the ports under that
//! identity (`LB4_FRAGS`), and the later fragments are decided and translated as the first one
//! was (Cilium's `ENABLE_IPV4_FRAGMENTS`). A later fragment that arrives before its first one
//! finds nothing and passes untouched, as do fragments of datagrams lb does not translate.

use lb_common::{counters, Lb4FragKey, Lb4FragPorts};

use crate::{
    maps::LB4_FRAGS,
    parse::{Flow, Fragment},
    stats::count,
};

/// The ports of the datagram non-first fragment `frag` belongs to, if lb translated its first
/// fragment.
#[inline(always)]
pub fn ports(frag: &Fragment) -> Option<Lb4FragPorts> {
    let key = Lb4FragKey { saddr: frag.saddr, daddr: frag.daddr, id: frag.ip_id, proto: frag.proto, _pad: 0 };
    // SAFETY: the value is copied out at once.
    unsafe { LB4_FRAGS.get(&key) }.copied()
}

/// Called for every packet lb translated: a first fragment leaves its ports for the rest of its
/// datagram; a later one is counted.
#[inline(always)]
pub fn translated(f: &Flow) {
    if f.first_fragment {
        let key = Lb4FragKey { saddr: f.saddr, daddr: f.daddr, id: f.ip_id, proto: f.proto, _pad: 0 };
        let _ = LB4_FRAGS.insert(&key, &Lb4FragPorts { sport: f.sport, dport: f.dport }, 0);
    } else if f.later_fragment {
        count(counters::LATER_FRAGMENT);
    }
}
