//! The load-balancing decision, shared by the TC and XDP programs: frontend lookup, conntrack,
//! Maglev selection. It only decides; the caller rewrites the packet.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, EbpfContext};
use aya_log_ebpf::warn;
use lb_common::{counters, hash::lb4_flow_hash, Lb4ServiceKey, BACKEND_STATE_ACTIVE};

use crate::{
    config::flow_hash_seed,
    conntrack::{self, Lookup},
    maps::{LB4_BACKENDS, LB4_MAGLEV, LB4_SERVICES},
    parse::Flow,
    stats::{count, svc_update},
};

pub enum Action {
    /// Leave the packet as it is; the counter says why.
    Pass(u32),
    /// Drop the packet; the counter is the drop reason.
    Drop(u32),
    /// Rewrite the destination to the backend (forward) or the source to the service (reply).
    Rewrite { addr: u32, port: u16, counter: u32 },
}

/// Forward direction (pod → anything): load-balance packets addressed to a service frontend.
#[inline(always)]
pub fn lb4_forward<C: EbpfContext>(ctx: &C, f: &Flow, pkt_len: u32) -> Action {
    let svc_key = Lb4ServiceKey { addr: f.daddr, port: f.dport, proto: f.proto, _pad: 0 };
    // SAFETY: the value is copied out at once.
    let Some(svc) = (unsafe { LB4_SERVICES.get(&svc_key) }).copied() else {
        return Action::Pass(counters::PASS_NON_VIP);
    };
    if f.first_fragment {
        count(counters::FIRST_FRAGMENT);
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let ct_key = conntrack::forward_key(f);
    match conntrack::lookup_forward(&ct_key, f, now) {
        Lookup::Hit(t) => {
            svc_update(t.svc_id, |s| {
                s.packets += 1;
                s.bytes += u64::from(pkt_len);
            });
            return Action::Rewrite { addr: t.addr, port: t.port, counter: counters::FWD_ESTABLISHED };
        }
        Lookup::BackendGone => count(counters::CT_RESELECTED),
        Lookup::Miss => {}
    }

    if svc.backend_count == 0 || svc.maglev_size == 0 {
        svc_update(svc.id, |s| s.drops += 1);
        return Action::Drop(counters::DROP_NO_BACKEND);
    }
    let hash = lb4_flow_hash(f.saddr, f.daddr, f.sport, f.dport, f.proto, flow_hash_seed());
    let slot = svc.maglev_offset.wrapping_add(hash % svc.maglev_size);
    let backend = LB4_MAGLEV.get(slot).and_then(|id| LB4_BACKENDS.get(*id).map(|b| (*id, *b)));
    let Some((backend_id, backend)) = backend.filter(|(_, b)| b.state == BACKEND_STATE_ACTIVE) else {
        // The agent never publishes a table that points at a missing backend.
        warn!(ctx, "lb: maglev slot {} of frontend {} has no active backend", slot, svc.id);
        svc_update(svc.id, |s| s.drops += 1);
        return Action::Drop(counters::DROP_NO_BACKEND);
    };
    if !conntrack::create(&ct_key, f, backend_id, backend.addr, backend.port, svc.id, now) {
        warn!(ctx, "lb: conntrack insert failed for frontend {}", svc.id);
        count(counters::CT_INSERT_FAILED);
    }
    svc_update(svc.id, |s| {
        s.packets += 1;
        s.bytes += u64::from(pkt_len);
        s.new_flows += 1;
    });
    Action::Rewrite { addr: backend.addr, port: backend.port, counter: counters::FWD_NEW_FLOW }
}

/// Reply direction (anything → pod): translate replies of load-balanced flows back to the service.
#[inline(always)]
pub fn lb4_reply(f: &Flow) -> Action {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match conntrack::lookup_reply(f, now) {
        Some((addr, port)) => Action::Rewrite { addr, port, counter: counters::REV_NAT },
        None => Action::Pass(counters::PASS_NO_REPLY_CT),
    }
}
