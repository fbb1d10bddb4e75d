//! The load-balancing decision, shared by the TC and XDP programs: frontend lookup, conntrack,
//! session affinity, Maglev selection, hairpin. It only decides; the pipeline rewrites the packet.
//! Generic over the address family: one decision for IPv4 and IPv6 alike.

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use aya_log_ebpf::warn;
use lb_common::{
    counters, Lb4Affinity, Lb4Service, BACKEND_STATE_ACTIVE, EVENT_DROP, EVENT_NEW_FLOW, IPPROTO_TCP,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_EXTERNAL, SVC_FLAG_LOCAL_ONLY, SVC_FLAG_TOMBSTONE,
    SVC_FLAG_TWO_SCOPES,
};

use crate::{
    config::{self, flow_hash_seed, snat_reply_ports},
    conntrack::{self, Chosen, CreateError, Lookup, Replies, ReplyLookup},
    ctx::{Hop, PacketCtx, RouteKind},
    family::{Address, AffinityKey, Backend, Family, SvcKey},
    maps::{LB4_MAGLEV, LB_PORTS, LB_TAKEOVER},
    monitor,
    nat::IcmpNat,
    parse::{Flow, IcmpError, TCP_RST},
    stats::{count, svc_update},
};

/// Addresses and ports to write into a packet.
#[derive(Clone, Copy)]
pub struct Nat<F: Family> {
    pub src: Option<(F::Addr, u16)>,
    pub dst: Option<(F::Addr, u16)>,
}

impl<F: Family> Nat<F> {
    /// What packet `f` becomes once rewritten: the route a forwarded packet is looked up by.
    #[inline(always)]
    pub fn hop(&self, f: &Flow<F>) -> Hop<F> {
        let (saddr, sport) = self.src.unwrap_or((f.saddr, f.sport));
        let (daddr, dport) = self.dst.unwrap_or((f.daddr, f.dport));
        Hop { proto: f.proto, sport, dport, saddr, daddr }
    }
}

/// Whether the hook can send `f`, rewritten by `nat`, itself: TC always; XDP where a route lookup
/// (whose results its `forward` then uses) finds the next hop known, out of the interface the
/// packet came in on. A packet XDP cannot send is left to TC, untouched.
#[inline(always)]
fn sendable<F: Family, C: PacketCtx>(ctx: &C, f: &Flow<F>, nat: &Nat<F>) -> bool {
    C::TC || ctx.can_forward(nat.hop(f))
}

pub enum Action<F: Family> {
    /// Leave the packet as it is; the counter says why.
    Pass(u32),
    /// Drop the packet; the counter is the drop reason.
    Drop(u32),
    /// Rewrite the packet, then count `counter`.
    Rewrite { nat: Nat<F>, counter: u32 },
    /// Rewrite the packet and send it back out of the interface it came in on (a hairpinned
    /// flow: the pod is its own backend), then count `counter`. TC only.
    Bounce { nat: Nat<F>, counter: u32 },
    /// Rewrite the packet and send it out of the interface its route names (a flow from outside
    /// SNATed to this node's address, both ways: the stack would drop a packet with a local
    /// source address as a martian), then count `counter`. XDP returns it only once a route
    /// lookup in this run found the packet sendable (`PacketCtx::can_forward`); it leaves the
    /// others to TC.
    Forward { nat: Nat<F>, counter: u32 },
    /// Answer with an ICMP port unreachable (`REJECT_NO_BACKEND`, or `DROP_NO_BACKEND` when the
    /// answer cannot be made) and send the event, for frontend `svc_id`. TC only.
    Reject { svc_id: u32 },
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // The coarse clock (a tick's resolution) is plenty for timeouts of seconds and costs a
    // fraction of bpf_ktime_get_ns; kernels before 5.11 lack it (a load-time choice).
    if config::ktime_coarse() {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_ns() }
    }
}

/// Whether the agent holds back new flows (until `LB_TAKEOVER[0]`, a time on `now_ns`'s clock);
/// counts the packet if so.
#[inline(always)]
fn held_for_takeover(now: u64) -> bool {
    if !LB_TAKEOVER.get(0).is_some_and(|until| now < *until) {
        return false;
    }
    if let Some(n) = LB_TAKEOVER.get_ptr_mut(1) {
        // SAFETY: per-CPU value, only this CPU writes it while this program runs.
        unsafe { *n += 1 };
    }
    true
}

#[inline(always)]
pub fn active_backend<F: Family>(id: u32) -> Option<Backend<F::Addr>> {
    // Checked in place, then copied (see `conntrack::flow_allowed`).
    F::backends().get(id).filter(|b| b.state == BACKEND_STATE_ACTIVE).copied()
}

/// ClientIP session affinity: the backend this client used recently, if still an active member
/// of the frontend.
#[inline(always)]
fn affinity_backend<F: Family>(
    svc: &Lb4Service,
    client: F::Addr,
    proto: u8,
    now: u64,
) -> Option<(u32, Backend<F::Addr>)> {
    let key = AffinityKey { client, svc_id: svc.id };
    // SAFETY: the value is copied out at once.
    let a = unsafe { F::affinity().get(&key) }.copied()?;
    affinity_honoured::<F>(svc, &a, proto, now)
}

/// The backend of affinity entry `a` of frontend `svc`, unless it is past the Service's timeout
/// or no longer an active member (the packet path's entries and the socket programs' alike).
#[inline(always)]
pub fn affinity_honoured<F: Family>(
    svc: &Lb4Service,
    a: &Lb4Affinity,
    proto: u8,
    now: u64,
) -> Option<(u32, Backend<F::Addr>)> {
    let timeout = u64::from(svc.affinity_timeout_secs) * 1_000_000_000;
    if now.saturating_sub(a.last_used_ns) >= timeout {
        return None;
    }
    let m = conntrack::affinity_allowed::<F>(svc.id, a.backend_id)?;
    Some((a.backend_id, Backend { addr: m.addr, port: m.port, proto, state: BACKEND_STATE_ACTIVE }))
}

#[inline(always)]
fn maglev_backend<F: Family>(svc: &Lb4Service, f: &Flow<F>) -> Option<(u32, Backend<F::Addr>)> {
    maglev_pick::<F>(svc, F::flow_hash(f.saddr, f.daddr, f.sport, f.dport, f.proto, flow_hash_seed()))
}

/// The backend in the slot of `svc`'s Maglev table that `hash` falls on, if active.
#[inline(always)]
pub fn maglev_pick<F: Family>(svc: &Lb4Service, hash: u32) -> Option<(u32, Backend<F::Addr>)> {
    let slot = svc.maglev_offset.wrapping_add(hash % svc.maglev_size);
    // One Maglev array for both families: backend ids are one space.
    let id = LB4_MAGLEV.get(slot >> 1)?[(slot & 1) as usize];
    active_backend::<F>(id).map(|b| (id, b))
}

/// Where a packet to a frontend came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// One of this node's pods (the pod-side programs).
    Pod,
    /// Outside this node, through a node interface (`lb4_tc_node_in`, `lb4_xdp_node_in`).
    Outside,
}

/// The frontend packet `f` is addressed to, as seen from `origin`: from outside, only the
/// addresses clients outside reach (`SVC_FLAG_EXTERNAL`); from a pod, the address's internal
/// entry where it has two.
#[inline(always)]
fn frontend<F: Family>(f: &Flow<F>, origin: Origin) -> Option<Lb4Service> {
    frontend_at::<F>(f.daddr, f.dport, f.proto, origin)
}

/// Whether `port` (as the maps hold it) may be in `LB_PORTS`' bitmap beginning at `set`: one array
/// read before any hash lookup, a second where the bit is not set (every port is, while the agent
/// has not armed the bitmaps). A word that cannot be read counts as all ports.
#[inline(always)]
fn port_known(set: u32, port: u16) -> bool {
    let (word, bit) = lb_common::port_bit(set, port);
    LB_PORTS.get(word).is_none_or(|w| *w & bit != 0)
        || LB_PORTS.get(lb_common::PORTS_ARMED).is_none_or(|armed| *armed == 0)
}

/// The frontend at `addr:port` (network byte order) for `proto`, as `origin` sees them (see
/// `frontend`).
#[inline(always)]
pub fn frontend_at<F: Family>(addr: F::Addr, port: u16, proto: u8, origin: Origin) -> Option<Lb4Service> {
    let mut key = SvcKey { addr, port, proto, scope: SCOPE_EXTERNAL };
    // SAFETY: the value is copied out at once.
    let svc = unsafe { F::services().get(&key) }.copied()?;
    match origin {
        Origin::Outside => (svc.flags & SVC_FLAG_EXTERNAL != 0).then_some(svc),
        Origin::Pod if svc.flags & SVC_FLAG_TWO_SCOPES != 0 => {
            key.scope = SCOPE_INTERNAL;
            // SAFETY: as above. An internal entry that is gone (a Service turning to
            // externalTrafficPolicy Cluster buries it before it rewrites the external one) is not
            // used: the external entry serves until then.
            let internal = unsafe { F::services().get(&key) }.copied();
            Some(internal.filter(|i| i.flags & SVC_FLAG_TOMBSTONE == 0).unwrap_or(svc))
        }
        Origin::Pod => Some(svc),
    }
}

/// Forward direction (pod → anything): load-balance packets addressed to a service frontend, and
/// translate hairpinned replies (addressed to the hairpin address).
#[inline(always)]
pub fn forward<F: Family, C: PacketCtx>(ctx: &C, f: &Flow<F>, pkt_len: u32) -> Action<F> {
    new_or_tracked::<F, C, false>(ctx, f, pkt_len)
}

/// Traffic arriving on a node interface: replies of flows SNATed to this node's address go back
/// to their clients; packets to an external address of a Service are load-balanced (a remote
/// endpoint's flows SNATed to this node's address, a local endpoint's keeping the client's).
#[inline(always)]
pub fn node_in<F: Family, C: PacketCtx>(ctx: &C, f: &Flow<F>, pkt_len: u32) -> Action<F> {
    if let Some(action) = node_in_reply(ctx, f) {
        return action;
    }
    new_or_tracked::<F, C, true>(ctx, f, pkt_len)
}

/// [`node_in`] for a packet that is no reply of a flow SNATed to this node (IPv6's third program,
/// after [`node_in_reply`] found none).
#[inline(always)]
pub fn node_in_new<F: Family, C: PacketCtx>(ctx: &C, f: &Flow<F>, pkt_len: u32) -> Action<F> {
    if let Some(action) = not_for_this_host::<F, C>(ctx) {
        return action;
    }
    new_or_tracked::<F, C, true>(ctx, f, pkt_len)
}

/// Whether destination port `port` (network byte order) may be that of a reply of a flow
/// SNATed to this node (see `config::snat_reply_ports`).
#[inline(always)]
pub fn snat_reply_port(port: u16) -> bool {
    let (min, max) = snat_reply_ports();
    let port = u32::from(u16::from_be(port));
    port >= min && port <= max
}

/// The first part of [`node_in`]: what a copy of a frame for another host, or a reply of a flow
/// SNATed to this node, becomes; `None` for any other packet.
#[inline(always)]
pub fn node_in_reply<F: Family, C: PacketCtx>(ctx: &C, f: &Flow<F>) -> Option<Action<F>> {
    if let Some(action) = not_for_this_host::<F, C>(ctx) {
        return Some(action);
    }
    if !snat_reply_port(f.dport) {
        return None;
    }
    match conntrack::lookup_reply(f, Replies::NodeSnat, now_ns()) {
        ReplyLookup::Found(r) => {
            let nat =
                Nat { src: Some((r.vip, r.vport)), dst: Some((r.client_addr, reply_port(f, r.client_port))) };
            // XDP: a partial checksum (a GRO-merged reply) is TC's.
            if !f.later_fragment && ctx.csum_maybe_partial(f) {
                return Some(Action::Pass(counters::XDP_PARTIAL_CSUM));
            }
            if !sendable(ctx, f, &nat) {
                return Some(Action::Pass(counters::XDP_TO_TC));
            }
            Some(Action::Forward { nat, counter: counters::REV_NAT })
        }
        ReplyLookup::Stale => Some(Action::Pass(counters::PASS_STALE_REPLY_CT)),
        ReplyLookup::None => None,
    }
}

/// A copy of a frame for another host (a flooded one, on a bridge port): that host translates
/// it, or nobody. XDP, which cannot always tell, leaves it to TC.
#[inline(always)]
fn not_for_this_host<F: Family, C: PacketCtx>(ctx: &C) -> Option<Action<F>> {
    if ctx.for_this_host() {
        return None;
    }
    Some(Action::Pass(if C::TC { counters::PASS_NON_VIP } else { counters::XDP_TO_TC }))
}

/// Load-balances a packet addressed to a service frontend (as `origin` sees them). A hook that
/// cannot bounce or reject packets, or cannot tell a partial checksum (XDP), leaves the packets
/// that need it to TC untouched, before anything is counted or stored for them.
#[inline(always)]
fn new_or_tracked<F: Family, C: PacketCtx, const OUTSIDE: bool>(
    ctx: &C,
    f: &Flow<F>,
    pkt_len: u32,
) -> Action<F> {
    // A constant of each instance, not an argument: a program with both (IPv6's node-side one
    // beside the pod-side one) would otherwise leave the optimiser one body for both origins,
    // whose frame is more than Linux allows (`tests/stack.rs`).
    let origin = if OUTSIDE { Origin::Outside } else { Origin::Pod };
    // A destination port no frontend has is no frontend's, at the cost of one array read.
    let svc = if port_known(lb_common::PORTS_FRONTEND, f.dport) { frontend(f, origin) } else { None };
    let Some(svc) = svc else {
        if origin == Origin::Pod && f.daddr == F::hairpin_addr() {
            if !C::TC {
                return Action::Pass(counters::XDP_TO_TC);
            }
            return hairpin_reply(f);
        }
        return Action::Pass(counters::PASS_NON_VIP);
    };
    if f.udp_no_csum {
        // UDP over IPv6 without a checksum, to a Service address: malformed (RFC 8200 §8.1).
        return Action::Drop(counters::DROP_UDP_ZERO_CSUM);
    }
    if origin == Origin::Outside && f.sport == 0 {
        // Source port 0 cannot be answered, and a flow SNATed to this node could not be told
        // from one that kept its port.
        return Action::Drop(counters::DROP_MALFORMED);
    }
    if !f.later_fragment && ctx.csum_maybe_partial(f) {
        return Action::Pass(counters::XDP_PARTIAL_CSUM);
    }
    if f.first_fragment {
        count(counters::FIRST_FRAGMENT);
    }
    let now = now_ns();
    let ct_key = conntrack::forward_key(f);
    match conntrack::lookup_forward(&ct_key, f, svc.id, now) {
        Lookup::Hit(t) => {
            if t.hairpin && !C::TC {
                return Action::Pass(counters::XDP_TO_TC);
            }
            if t.snat_addr == F::Addr::ZERO && translated_again::<F, C>(ctx, t.addr, t.port, f.proto, origin)
            {
                return Action::Pass(counters::XDP_TO_TC);
            }
            let counter = counters::FWD_ESTABLISHED;
            // SNATed to this node (flows from outside only: a pod's are never): its rewrite made
            // within the one branch that sends it (see `node_snat_nat`).
            if OUTSIDE && t.snat_addr != F::Addr::ZERO {
                let nat = node_snat_nat(f, t.snat_addr, t.snat_port, (t.addr, t.port));
                // XDP: a route it cannot send by is TC's, before anything is counted.
                if !sendable(ctx, f, &nat) {
                    return Action::Pass(counters::XDP_TO_TC);
                }
                svc_update(t.svc_id, |s| {
                    s.packets += 1;
                    s.bytes += u64::from(pkt_len);
                });
                return Action::Forward { nat, counter };
            }
            let nat = Nat { src: client_nat(f, t.hairpin, t.snat_port), dst: Some((t.addr, t.port)) };
            svc_update(t.svc_id, |s| {
                s.packets += 1;
                s.bytes += u64::from(pkt_len);
            });
            if t.hairpin {
                return Action::Bounce { nat, counter };
            }
            return Action::Rewrite { nat, counter };
        }
        // A later fragment only follows its first one's flow; it never makes one.
        _ if f.later_fragment => return Action::Pass(counters::PASS_FRAGMENT),
        // The agent is moving flows from another layout's table into ours: a flow begun now could
        // be answered by that layout's reply program, which would not know it.
        _ if held_for_takeover(now) => return Action::Drop(counters::UNCOUNTED),
        Lookup::BackendGone => count(counters::CT_RESELECTED),
        Lookup::Miss => {}
    }
    // `loadBalancerSourceRanges`: both scopes of an address share its ranges, under its external
    // key.
    if svc.flags & SVC_FLAG_EXTERNAL != 0 && !F::decided_source_allowed(f) {
        svc_update(svc.id, |s| s.drops += 1);
        monitor::emit(f, EVENT_DROP, counters::DROP_SRC_RANGE, (F::Addr::ZERO, 0), svc.id, now);
        return Action::Drop(counters::DROP_SRC_RANGE);
    }
    if f.proto == IPPROTO_TCP && f.tcp_flags & TCP_RST != 0 {
        // A reset of no tracked flow (or of one whose backend left) never opens a flow.
        monitor::emit(f, EVENT_DROP, counters::DROP_RST_NO_FLOW, (F::Addr::ZERO, 0), svc.id, now);
        return Action::Drop(counters::DROP_RST_NO_FLOW);
    }

    if svc.backend_count == 0 || svc.maglev_size == 0 {
        // internalTrafficPolicy Local (or, from outside, externalTrafficPolicy Local) with
        // endpoints on other nodes only: dropped, as kube-proxy does. No endpoints at all (or a
        // Service that is gone): rejected, as kube-proxy does.
        let local_only = svc.flags & SVC_FLAG_LOCAL_ONLY != 0;
        if !local_only && !C::TC {
            return Action::Pass(counters::XDP_TO_TC);
        }
        svc_update(svc.id, |s| s.drops += 1);
        // An answer only where RFC 1122 allows one, and for headers the reject quotes whole.
        let answerable = F::reject_answerable(f);
        let reason = match (local_only, answerable) {
            (true, _) => counters::DROP_NO_LOCAL_BACKEND,
            (false, true) => counters::REJECT_NO_BACKEND,
            (false, false) => counters::DROP_NO_BACKEND,
        };
        if reason == counters::REJECT_NO_BACKEND {
            // Its event follows once the answer is made (or not).
            return Action::Reject { svc_id: svc.id };
        }
        monitor::emit(f, EVENT_DROP, reason, (F::Addr::ZERO, 0), svc.id, now);
        return Action::Drop(reason);
    }
    let sticky = if svc.affinity_timeout_secs != 0 {
        affinity_backend::<F>(&svc, f.saddr, f.proto, now)
    } else {
        None
    };
    let Some((id, backend)) = sticky.or_else(|| maglev_backend(&svc, f)) else {
        // The agent never publishes a table that points at a missing backend. (Logged from the
        // pod side only: a log call is a function call, whose frame the node-side program has
        // no room for on Linux 5.10; the drop is counted either way.)
        if origin == Origin::Pod {
            warn!(ctx, "lb: maglev table of frontend {} names an inactive backend", svc.id);
        }
        svc_update(svc.id, |s| s.drops += 1);
        monitor::emit(f, EVENT_DROP, counters::DROP_NO_BACKEND, (F::Addr::ZERO, 0), svc.id, now);
        return Action::Drop(counters::DROP_NO_BACKEND);
    };
    // From outside, a remote endpoint's flow is SNATed to this node's address (its replies must
    // come back here); a local endpoint's keeps the client's address.
    // (`F::Addr::ZERO`: none; see `Chosen::node_snat`.)
    let node_snat = match origin {
        Origin::Pod => F::Addr::ZERO,
        Origin::Outside => {
            let route = ctx.route_to(f, backend.addr);
            match route.kind {
                RouteKind::Local => F::Addr::ZERO,
                RouteKind::Remote => route.snat,
                RouteKind::ToTc => return Action::Pass(counters::XDP_TO_TC),
                RouteKind::None => {
                    svc_update(svc.id, |s| s.drops += 1);
                    monitor::emit(f, EVENT_DROP, counters::DROP_FIB, (F::Addr::ZERO, 0), svc.id, now);
                    return Action::Drop(counters::DROP_FIB);
                }
            }
        }
    };
    let hairpinned = origin == Origin::Pod && backend.addr == f.saddr;
    if hairpinned && !C::TC {
        return Action::Pass(counters::XDP_TO_TC);
    }
    if node_snat == F::Addr::ZERO
        && translated_again::<F, C>(ctx, backend.addr, backend.port, f.proto, origin)
    {
        return Action::Pass(counters::XDP_TO_TC);
    }
    if sticky.is_some() {
        count(counters::AFFINITY_HIT);
    }
    if svc.affinity_timeout_secs != 0 {
        let key = AffinityKey { client: f.saddr, svc_id: svc.id };
        let value = Lb4Affinity { last_used_ns: now, backend_id: id, _pad: 0 };
        let _ = F::affinity().insert(&key, &value, 0);
    }
    if hairpinned {
        count(counters::HAIRPIN);
    }
    let chosen = Chosen {
        id,
        addr: backend.addr,
        port: backend.port,
        svc_id: svc.id,
        hairpin: hairpinned,
        external: origin == Origin::Outside,
        node_snat,
    };
    let snat_port = match conntrack::create(&ct_key, f, &chosen, now) {
        Ok(port) => port,
        Err(CreateError::NoPort) => {
            svc_update(svc.id, |s| s.drops += 1);
            monitor::emit(f, EVENT_DROP, counters::DROP_SNAT_NO_PORT, (F::Addr::ZERO, 0), svc.id, now);
            return Action::Drop(counters::DROP_SNAT_NO_PORT);
        }
        Err(CreateError::Insert(port)) => {
            if origin == Origin::Pod {
                warn!(ctx, "lb: conntrack insert failed for frontend {}", svc.id);
            }
            count(counters::CT_INSERT_FAILED);
            port
        }
    };
    let counter = counters::FWD_NEW_FLOW;
    if node_snat != F::Addr::ZERO {
        let nat = node_snat_nat(f, node_snat, snat_port, (backend.addr, backend.port));
        // XDP sends the packet by the route it leaves with (from this node's address and port,
        // which ECMP or a source route may send another way than the client's): where it cannot,
        // TC does, finding the flow made.
        if !sendable(ctx, f, &nat) {
            return Action::Pass(counters::XDP_TO_TC);
        }
        svc_update(svc.id, |s| {
            s.packets += 1;
            s.bytes += u64::from(pkt_len);
            s.new_flows += 1;
        });
        monitor::emit(f, EVENT_NEW_FLOW, 0, (backend.addr, backend.port), svc.id, now);
        count(counters::NODE_SNAT);
        return Action::Forward { nat, counter };
    }
    let nat = Nat { src: client_nat(f, hairpinned, snat_port), dst: Some((backend.addr, backend.port)) };
    svc_update(svc.id, |s| {
        s.packets += 1;
        s.bytes += u64::from(pkt_len);
        s.new_flows += 1;
    });
    monitor::emit(f, EVENT_NEW_FLOW, 0, (backend.addr, backend.port), svc.id, now);
    if hairpinned {
        return Action::Bounce { nat, counter };
    }
    Action::Rewrite { nat, counter }
}

/// The rewrite of a flow from outside SNATed to this node's address `snat_addr` (its source port
/// `snat_port`, or the client's where 0), to `dst`. Built in the branch that returns it, both
/// sides written: where it came from `client_nat` before a second test of the address, Linux
/// 5.10's verifier (which cannot tell the two tests of a 16-byte address agree) walked a path with
/// no source written and refused the IPv6 node program.
#[inline(always)]
fn node_snat_nat<F: Family>(f: &Flow<F>, snat_addr: F::Addr, snat_port: u16, dst: (F::Addr, u16)) -> Nat<F> {
    Nat { src: Some((snat_addr, if snat_port != 0 { snat_port } else { f.sport })), dst: Some(dst) }
}

/// XDP that cannot mark a packet it passes as decided (a kernel that refuses it metadata,
/// `config::xdp_meta`, or a driver without room for it: `PacketCtx::can_mark`) leaves the TC
/// program behind it to look at the packet again: one rewritten in place to a backend that is
/// itself a frontend as TC sees it (an endpoint at another Service's address, a hostNetwork
/// endpoint at a node address and port that is also a frontend) would be translated a second
/// time. Such a packet is TC's from the start. A packet XDP sends (`Forward`) never reaches TC.
#[inline(always)]
fn translated_again<F: Family, C: PacketCtx>(
    ctx: &C,
    addr: F::Addr,
    port: u16,
    proto: u8,
    origin: Origin,
) -> bool {
    !C::TC && !ctx.can_mark() && frontend_at::<F>(addr, port, proto, origin).is_some()
}

/// The source a flow's packets leave with (not SNATed to this node: see `node_snat_nat`): the
/// hairpin address when the client is its own backend, and the port the flow was given when its
/// tuple clashed (`snat_port`, 0: none).
#[inline(always)]
fn client_nat<F: Family>(f: &Flow<F>, hairpin: bool, snat_port: u16) -> Option<(F::Addr, u16)> {
    if !hairpin && snat_port == 0 {
        return None;
    }
    let addr = if hairpin { F::hairpin_addr() } else { f.saddr };
    Some((addr, if snat_port != 0 { snat_port } else { f.sport }))
}

/// The client port a reply goes back to: its own, where the flow was given another.
#[inline(always)]
fn reply_port<F: Family>(f: &Flow<F>, client_port: u16) -> u16 {
    if client_port != 0 {
        client_port
    } else {
        f.dport
    }
}

/// A pod's reply to itself through a service comes back addressed to the hairpin address: its
/// source goes back to the service, its destination back to the pod, and it goes straight back
/// to the pod.
#[inline(always)]
fn hairpin_reply<F: Family>(f: &Flow<F>) -> Action<F> {
    match conntrack::lookup_reply(f, Replies::Pods, now_ns()) {
        ReplyLookup::Found(r) if r.hairpin => Action::Bounce {
            nat: Nat { src: Some((r.vip, r.vport)), dst: Some((f.saddr, reply_port(f, r.client_port))) },
            counter: counters::REV_NAT,
        },
        ReplyLookup::Stale => Action::Pass(counters::PASS_STALE_REPLY_CT),
        _ => Action::Pass(counters::PASS_NON_VIP),
    }
}

/// Reply direction: translate replies of load-balanced flows back to the service, those of
/// `replies` (anything → pod: this node's pods' flows; a node interface's egress: the replies of
/// local endpoints to clients outside).
#[inline(always)]
pub fn reply<F: Family>(f: &Flow<F>, replies: Replies) -> Action<F> {
    // Replies come from a backend's port: from any other, no lookup.
    if !port_known(lb_common::PORTS_BACKEND, f.sport) {
        return Action::Pass(counters::PASS_NO_REPLY_CT);
    }
    match conntrack::lookup_reply(f, replies, now_ns()) {
        ReplyLookup::Found(r) => Action::Rewrite {
            nat: Nat {
                src: Some((r.vip, r.vport)),
                dst: (r.client_port != 0).then(|| (f.daddr, r.client_port)),
            },
            counter: counters::REV_NAT,
        },
        ReplyLookup::Stale => Action::Pass(counters::PASS_STALE_REPLY_CT),
        ReplyLookup::None => Action::Pass(counters::PASS_NO_REPLY_CT),
    }
}

/// Reply direction, ICMP errors going to a client (of `replies`) about its packet to a backend
/// (the quote is client → backend; its reply entry is backend → client): the quote becomes client
/// → VIP, from the client's own port where the flow was given another. An error to a client
/// outside comes from the VIP whoever sent it (as netfilter's NAT rewrites it: a node's or a
/// pod's address is nothing the client knows, and may not leave the cluster); to a pod, when the
/// backend itself sent it. Hairpinned flows are left alone.
#[inline(always)]
pub fn reply_icmp<F: Family>(e: &IcmpError<F>, replies: Replies) -> Option<IcmpNat<F>> {
    if e.outer_daddr != e.saddr {
        return None;
    }
    let r = conntrack::peek_reply::<F>(e.daddr, e.saddr, e.dport, e.sport, e.proto, replies, now_ns())?;
    (!r.hairpin).then_some(IcmpNat {
        quote_src: (r.client_port != 0).then_some((e.saddr, r.client_port)),
        quote_dst: Some((r.vip, r.vport)),
        outer_src: (matches!(replies, Replies::External) || e.outer_saddr == e.daddr).then_some(r.vip),
        outer_dst: None,
    })
}

/// ICMP errors arriving on a node interface about a flow from outside, and whether lb must
/// forward the error itself (it goes out of this node, from an address the stack would take for
/// a martian, or about a flow netfilter never saw). Two kinds:
/// - about a reply this node sent to a client outside (the quote is VIP → client, the error goes
///   to the VIP: "fragmentation needed" from a router on the way): it goes to the backend, as
///   about its packet to the client (to this node's address and SNAT port, for a remote one);
/// - about a packet this node sent to a remote endpoint, SNATed (the quote is this node's address
///   and SNAT port → backend, the error goes to this node): it goes to the client, from the VIP,
///   as about its packet to the VIP.
#[inline(always)]
pub fn node_in_icmp<F: Family>(e: &IcmpError<F>) -> Option<(IcmpNat<F>, bool)> {
    if e.outer_daddr != e.saddr {
        return None;
    }
    let now = now_ns();
    if let Some(t) = conntrack::peek_external_forward::<F>(e.daddr, e.saddr, e.dport, e.sport, e.proto, now) {
        // The backend's reply went to the client's address and port, or to this node's address
        // and the SNAT port the flow was given.
        let client = if t.snat_addr != F::Addr::ZERO { t.snat_addr } else { e.daddr };
        let client_port = if t.snat_port != 0 { t.snat_port } else { e.dport };
        // Forwarded to a remote endpoint, it comes from this node's address (the flow's, there):
        // as under netfilter's masquerade, and no outside address is relayed into the cluster.
        let nat = IcmpNat {
            quote_src: Some((t.nat_addr, t.nat_port)),
            quote_dst: Some((client, client_port)),
            outer_src: (t.snat_addr != F::Addr::ZERO).then_some(t.snat_addr),
            outer_dst: Some(t.nat_addr),
        };
        return Some((nat, t.snat_addr != F::Addr::ZERO));
    }
    let r = conntrack::peek_reply::<F>(e.daddr, e.saddr, e.dport, e.sport, e.proto, Replies::NodeSnat, now)?;
    let nat = IcmpNat {
        quote_src: Some((r.client_addr, reply_port_of(e.sport, r.client_port))),
        quote_dst: Some((r.vip, r.vport)),
        // From the VIP, whoever sent it (see `reply_icmp`).
        outer_src: Some(r.vip),
        outer_dst: Some(r.client_addr),
    };
    Some((nat, true))
}

/// The client's port: its own where the flow was given another (`client_port`, 0: none).
#[inline(always)]
fn reply_port_of(port: u16, client_port: u16) -> u16 {
    if client_port != 0 {
        client_port
    } else {
        port
    }
}
