//! The steps every program runs, whatever its hook: parse, decide (`lb`), rewrite both sides of
//! the flow (destination, then source), count the outcome, return the verdict. Generic over the
//! hook's [`PacketCtx`] and the address [`Family`], and inlined into each entry point (no
//! BPF-to-BPF calls), so each program is compiled for its own hook and family (`lb4_*`: [`V4`]).
//!
//! [`V4`]: crate::family::V4

use lb_common::{counters, EVENT_DROP};

use crate::{
    conntrack::Replies,
    ctx::{Hop, PacketCtx},
    family::{Address, Family},
    frags,
    lb::{self, Action, Nat},
    monitor,
    nat::Side,
    parse::{Flow, IcmpError, Parsed},
    stats::count,
};

/// Forward direction (pod → anything): load-balance packets to service frontends. IPv4 only:
/// IPv6 runs [`forward_parsed`] and [`forward_decided`], whose first half finds what the second's
/// decision reads (`Family::decided_source_allowed`).
#[inline(always)]
pub fn forward<F: Family, C: PacketCtx>(ctx: &C) -> C::Ret {
    const { assert!(F::AF == crate::family::V4::AF) };
    let parsed = ctx.parse::<F>();
    verdict(ctx, parsed, |f| lb::forward(ctx, f, ctx.len()))
}

/// [`forward`] in two programs, for a family whose whole pipeline is more than the verifier
/// takes in one (IPv6: every path through the extension headers would verify the decision
/// again; Linux 5.10 stops at 1M instructions). The first parses and settles what needs no
/// decision, leaves the flow in the per-CPU scratch map and goes on by `tail_call` into the
/// second, [`forward_decided`], which verifies the decision once, from a flow read from memory.
/// Should the tail call fail (the slot emptied under it), the packet passes untouched, counted
/// `PASS_IPV6` (XDP: left to TC, `XDP_TO_TC`). The second half takes the flow only if it was
/// left for this packet, on this CPU, in this run (`StoredFlow::ready`): programs of one hook do
/// not nest on a CPU (kernels with `PREEMPT_RT`, whose softirqs can be preempted, are not
/// supported).
#[inline(always)]
pub fn forward_parsed<F: Family, C: PacketCtx>(ctx: &C, tail_call: impl FnOnce()) -> C::Ret {
    match flow_of(ctx, ctx.parse::<F>()) {
        Ok(f) => leave_flow(ctx, &f, tail_call),
        Err(ret) => ret,
    }
}

/// The second program of [`forward_parsed`]: decides the flow the first left in the scratch map.
#[inline(always)]
pub fn forward_decided<F: Family, C: PacketCtx>(ctx: &C) -> C::Ret {
    let Some(slot) = stored_flow::<F>() else {
        return finish_marked::<F, C>(ctx, Action::Pass(counters::PASS_IPV6));
    };
    // Taken once: a first half of another agent load (its own scratch map, for the moment a
    // restart swaps the programs) leaves nothing here, and what is here was left for this packet.
    // (Written out in each second half: through a helper returning the flow or the verdict, the
    // verifier walked 90,000 more instructions.)
    if slot.ready != READY {
        return finish_marked::<F, C>(ctx, Action::Drop(counters::DROP_SPLIT_MISMATCH));
    }
    slot.ready = 0;
    let f = slot.flow();
    apply(ctx, &f, lb::forward(ctx, &f, ctx.len()))
}

/// [`node_in`] in three programs, as [`forward_parsed`] splits [`forward`] (IPv6's whole
/// decision, with this node's SNAT, is more than one program's 512 bytes of stack): the first
/// settles ICMP errors (as `node_in` does) and what needs no decision, and goes on with
/// `tail_call(reply)`: `reply` true, into [`node_in_reply`], for a packet to a port replies of
/// flows SNATed to this node come back to; else into [`node_in_decided`].
#[inline(always)]
pub fn node_in_parsed<F: Family, C: PacketCtx>(ctx: &C, tail_call: impl FnOnce(bool)) -> C::Ret {
    let parsed = ctx.parse::<F>();
    if let Parsed::IcmpError(e) = &parsed {
        return node_in_icmp(ctx, e);
    }
    match flow_of(ctx, parsed) {
        Ok(f) => {
            let reply = lb::snat_reply_port(f.dport);
            leave_flow(ctx, &f, || tail_call(reply))
        }
        Err(ret) => ret,
    }
}

/// The second program of [`node_in_parsed`] for a packet that may be a reply of a flow SNATed to
/// this node: sends it back to its client if it is one; else leaves the flow where it is and
/// goes on with `tail_call` into [`node_in_decided`].
#[inline(always)]
pub fn node_in_reply<F: Family, C: PacketCtx>(ctx: &C, tail_call: impl FnOnce()) -> C::Ret {
    let Some(slot) = stored_flow::<F>() else {
        return finish_marked::<F, C>(ctx, Action::Pass(counters::PASS_IPV6));
    };
    if slot.ready != READY {
        return finish_marked::<F, C>(ctx, Action::Drop(counters::DROP_SPLIT_MISMATCH));
    }
    let f = slot.flow();
    if let Some(action) = lb::node_in_reply(ctx, &f) {
        slot.ready = 0;
        return apply(ctx, &f, action);
    }
    tail_call();
    slot.ready = 0;
    let unserved = if C::TC { counters::PASS_IPV6 } else { counters::XDP_TO_TC };
    finish_marked::<F, C>(ctx, Action::Pass(unserved))
}

/// The last program of [`node_in_parsed`]: a packet that is no reply of a flow SNATed to this
/// node.
#[inline(always)]
pub fn node_in_decided<F: Family, C: PacketCtx>(ctx: &C) -> C::Ret {
    let Some(slot) = stored_flow::<F>() else {
        return finish_marked::<F, C>(ctx, Action::Pass(counters::PASS_IPV6));
    };
    if slot.ready != READY {
        return finish_marked::<F, C>(ctx, Action::Drop(counters::DROP_SPLIT_MISMATCH));
    }
    slot.ready = 0;
    let f = slot.flow();
    apply(ctx, &f, lb::node_in_new(ctx, &f, ctx.len()))
}

/// The end of a first half: leaves flow `f` in the scratch map (with the client's verdict under
/// the family's source ranges) and goes on into the second half.
#[inline(always)]
fn leave_flow<F: Family, C: PacketCtx>(ctx: &C, f: &Flow<F>, tail_call: impl FnOnce()) -> C::Ret {
    // No second half (its slot empty while the agent sets `--ipv6 off`): passed untouched, as
    // with no IPv6 programs at all; XDP leaves it to TC, which has its own.
    let unserved = if C::TC { counters::PASS_IPV6 } else { counters::XDP_TO_TC };
    let Some(slot) = stored_flow::<F>() else {
        return finish_marked::<F, C>(ctx, Action::Pass(unserved));
    };
    *slot = StoredFlow::from(f);
    // Only where some IPv6 frontend has ranges, and only towards a Service address (a hash
    // lookup before the trie's). The agent writes a frontend's ranges before it publishes the
    // frontend, but this reads them before the decision reads the frontend: a packet racing the
    // frontend's first publication may open one flow unchecked (IPv4 reads the other way round).
    if ranges_on::<F>()
        && F::is_frontend_addr(f.daddr)
        && !F::source_allowed(f.daddr, f.dport, f.proto, f.saddr)
    {
        slot.flags |= FLAG_SOURCE_DENIED;
    }
    tail_call();
    // Nothing is left for a second half to find later.
    slot.ready = 0;
    finish_marked::<F, C>(ctx, Action::Pass(unserved))
}

/// A [`Flow`] as one program leaves it for the next in the per-CPU scratch map: plain integers
/// (flags in one byte), so whatever is read back is a valid value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StoredFlow<F: Family> {
    l4_off: u64,
    saddr: F::Addr,
    daddr: F::Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    /// `FLAG_*`.
    flags: u8,
    /// [`READY`] from the first half until the second takes the flow (or the tail call fails).
    ready: u8,
    frag_id: F::FragId,
}

/// [`StoredFlow::ready`] while a flow waits for the second half.
const READY: u8 = 0xa5;

const FLAG_FIRST_FRAGMENT: u8 = 1;
const FLAG_LATER_FRAGMENT: u8 = 2;
const FLAG_UDP_NO_CSUM: u8 = 4;
/// The client may not open a flow to the destination (`loadBalancerSourceRanges`, looked up by
/// the first half: [`Family::decided_source_allowed`]).
const FLAG_SOURCE_DENIED: u8 = 8;

/// The largest L4 offset a parser gives (IPv6: 54 + 4 extension headers of at most 2048 bytes),
/// and the mask a stored offset is read back with (the verifier must see it bounded).
const L4_OFF_MASK: u64 = 0x3fff;

impl<F: Family> StoredFlow<F> {
    #[inline(always)]
    fn from(f: &Flow<F>) -> Self {
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        Self {
            l4_off: f.l4_off as u64,
            saddr: f.saddr,
            daddr: f.daddr,
            sport: f.sport,
            dport: f.dport,
            proto: f.proto,
            tcp_flags: f.tcp_flags,
            flags: flag(f.first_fragment, FLAG_FIRST_FRAGMENT)
                | flag(f.later_fragment, FLAG_LATER_FRAGMENT)
                | flag(f.udp_no_csum, FLAG_UDP_NO_CSUM),
            ready: READY,
            frag_id: f.frag_id,
        }
    }

    #[inline(always)]
    fn flow(&self) -> Flow<F> {
        Flow {
            l4_off: (self.l4_off & L4_OFF_MASK) as usize,
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            tcp_flags: self.tcp_flags,
            first_fragment: self.flags & FLAG_FIRST_FRAGMENT != 0,
            later_fragment: self.flags & FLAG_LATER_FRAGMENT != 0,
            frag_id: self.frag_id,
            udp_no_csum: self.flags & FLAG_UDP_NO_CSUM != 0,
        }
    }
}

/// Whether `loadBalancerSourceRanges` of family `F` may be programmed (IPv6: `LB6_RANGES_ON`),
/// so that the first half looks the client up.
#[inline(always)]
fn ranges_on<F: Family>() -> bool {
    F::AF == crate::family::V6::AF && crate::maps::LB6_RANGES_ON.get(0).is_some_and(|n| *n != 0)
}

/// Whether the first half found that the client of the flow it left may not open a flow to its
/// destination. Only in a second half (`forward_decided`, `node_in_decided`), whose flow it is.
#[inline(always)]
pub fn stored_source_denied<F: Family>() -> bool {
    stored_flow::<F>().is_some_and(|s| s.flags & FLAG_SOURCE_DENIED != 0)
}

/// The scratch map's flow slot, viewed as a stored flow of family `F`.
#[inline(always)]
fn stored_flow<F: Family>() -> Option<&'static mut StoredFlow<F>> {
    const { assert!(core::mem::size_of::<StoredFlow<crate::family::V6>>() <= 64) };
    // SAFETY: the one per-CPU value of an array map, 8-aligned; the flow slot is as large as a
    // stored flow of either family (asserted above) and only a first half and its second half
    // use it, one after the other on one CPU (a tail call does not return).
    unsafe {
        let s = crate::maps::LB_SCRATCH.get_ptr_mut(0)?;
        Some(&mut *(&raw mut (*s).flow).cast::<StoredFlow<F>>())
    }
}

/// Reply direction (anything → pod): translate replies of load-balanced flows back to the
/// service, and ICMP errors about them.
#[inline(always)]
pub fn reply<F: Family, C: PacketCtx>(ctx: &C) -> C::Ret {
    let parsed = ctx.parse::<F>();
    if let Parsed::IcmpError(e) = &parsed {
        return reply_icmp(ctx, e, Replies::Pods);
    }
    verdict(ctx, parsed, |f| lb::reply(f, Replies::Pods))
}

/// An ICMP error about a load-balanced flow goes to the client (of `replies`) as if about its
/// packet to the VIP (counted as reverse NAT); any other ICMP passes.
#[inline(always)]
fn reply_icmp<F: Family, C: PacketCtx>(ctx: &C, e: &IcmpError<F>, replies: Replies) -> C::Ret {
    let action = match lb::reply_icmp(e, replies) {
        Some(n) => match F::rewrite_icmp_error(ctx, e, &n) {
            Ok(()) => Action::<F>::Pass(counters::REV_NAT),
            Err(()) => Action::Drop(counters::DROP_REWRITE_FAILED),
        },
        None => Action::Pass(counters::PASS_OTHER_PROTO),
    };
    finish::<F, C>(action)
}

/// Node interface ingress (outside → this node): load-balance packets to the external addresses
/// of Services, and send the replies of flows SNATed to this node's address back to their clients.
/// IPv4 only: IPv6 runs [`node_in_parsed`] and [`node_in_decided`].
#[inline(always)]
pub fn node_in<F: Family, C: PacketCtx>(ctx: &C) -> C::Ret {
    const { assert!(F::AF == crate::family::V4::AF) };
    let parsed = ctx.parse::<F>();
    if let Parsed::IcmpError(e) = &parsed {
        return node_in_icmp(ctx, e);
    }
    verdict(ctx, parsed, |f| lb::node_in(ctx, f, ctx.len()))
}

/// An ICMP error arriving on a node interface: about a flow from outside, it goes to the flow's
/// backend or client as if about a packet it sent itself (counted as reverse NAT); any other
/// passes, as does a copy of a frame for another host. XDP leaves them to TC.
#[inline(always)]
fn node_in_icmp<F: Family, C: PacketCtx>(ctx: &C, e: &IcmpError<F>) -> C::Ret {
    if !C::TC {
        return finish_marked::<F, C>(ctx, Action::Pass(counters::XDP_TO_TC));
    }
    let about = if ctx.for_this_host() { lb::node_in_icmp(e) } else { None };
    let action = match about {
        Some((n, forward)) => match F::rewrite_icmp_error(ctx, e, &n) {
            Ok(()) if forward => {
                let saddr = n.outer_src.unwrap_or(e.outer_saddr);
                let daddr = n.outer_dst.unwrap_or(e.outer_daddr);
                let hop = Hop::<F> { proto: F::IPPROTO_ICMP, sport: 0, dport: 0, saddr, daddr };
                match ctx.forward(hop) {
                    Ok(ret) => {
                        count(counters::REV_NAT);
                        return ret;
                    }
                    Err(()) => Action::Drop(counters::DROP_FIB),
                }
            }
            Ok(()) => Action::Pass(counters::REV_NAT),
            Err(()) => Action::Drop(counters::DROP_REWRITE_FAILED),
        },
        None => Action::Pass(counters::PASS_OTHER_PROTO),
    };
    finish::<F, C>(action)
}

/// Node interface egress (this node → outside): translate the replies of local endpoints to
/// clients outside back to the Service's address, and ICMP errors about their flows.
#[inline(always)]
pub fn node_out<F: Family, C: PacketCtx>(ctx: &C) -> C::Ret {
    let parsed = ctx.parse::<F>();
    if let Parsed::IcmpError(e) = &parsed {
        return reply_icmp(ctx, e, Replies::External);
    }
    verdict(ctx, parsed, |f| lb::reply(f, Replies::External))
}

/// Decides what to do with a parsed packet, carries it out, counts the outcome and turns it into
/// the hook's verdict. A non-first fragment is decided as its datagram's first fragment was, with
/// the ports that fragment left in `LB4_FRAGS`.
#[inline(always)]
fn verdict<F: Family, C: PacketCtx>(
    ctx: &C,
    parsed: Parsed<F>,
    decide: impl FnOnce(&Flow<F>) -> Action<F>,
) -> C::Ret {
    let f = match parsed {
        Parsed::Flow(f) => f,
        Parsed::Fragment(frag) => match frags::ports(&frag) {
            Some(p) => frag.flow(p.sport, p.dport),
            // XDP may see a batch of frames before TC sees the first of them: TC, which takes
            // packets in order, may yet learn the ports from a first fragment XDP left to it.
            None if !C::TC => return finish_marked::<F, C>(ctx, Action::Pass(counters::XDP_TO_TC)),
            None => return finish_marked::<F, C>(ctx, Action::Pass(counters::PASS_FRAGMENT)),
        },
        Parsed::IcmpError(_) => return finish_marked::<F, C>(ctx, Action::Pass(counters::PASS_OTHER_PROTO)),
        Parsed::Pass(c) => return finish_marked::<F, C>(ctx, Action::Pass(c)),
        Parsed::Drop(c) => return finish_marked::<F, C>(ctx, Action::Drop(c)),
        Parsed::TooDeep(daddr) => {
            let action = if F::is_frontend_addr(daddr) {
                Action::Drop(counters::DROP_EXT_HEADERS)
            } else {
                Action::Pass(counters::PASS_OTHER_PROTO)
            };
            return finish_marked::<F, C>(ctx, action);
        }
    };
    apply(ctx, &f, decide(&f))
}

/// The flow a parsed packet is decided as, or (`Err`) the verdict for a packet that needs no
/// decision, counted.
#[inline(always)]
fn flow_of<F: Family, C: PacketCtx>(ctx: &C, parsed: Parsed<F>) -> Result<Flow<F>, C::Ret> {
    let f = match parsed {
        Parsed::Flow(f) => f,
        Parsed::Fragment(frag) => match frags::ports(&frag) {
            Some(p) => frag.flow(p.sport, p.dport),
            // XDP may see a batch of frames before TC sees the first of them: TC, which takes
            // packets in order, may yet learn the ports from a first fragment XDP left to it.
            None if !C::TC => return Err(finish_marked::<F, C>(ctx, Action::Pass(counters::XDP_TO_TC))),
            None => return Err(finish_marked::<F, C>(ctx, Action::Pass(counters::PASS_FRAGMENT))),
        },
        Parsed::IcmpError(_) => {
            return Err(finish_marked::<F, C>(ctx, Action::Pass(counters::PASS_OTHER_PROTO)))
        }
        Parsed::Pass(c) => return Err(finish_marked::<F, C>(ctx, Action::Pass(c))),
        Parsed::Drop(c) => return Err(finish_marked::<F, C>(ctx, Action::Drop(c))),
        Parsed::TooDeep(daddr) => {
            let action = if F::is_frontend_addr(daddr) {
                Action::Drop(counters::DROP_EXT_HEADERS)
            } else {
                Action::Pass(counters::PASS_OTHER_PROTO)
            };
            return Err(finish_marked::<F, C>(ctx, action));
        }
    };
    Ok(f)
}

/// Carries out what was decided for flow `f`, counts the outcome and returns the hook's verdict.
#[inline(always)]
fn apply<F: Family, C: PacketCtx>(ctx: &C, f: &Flow<F>, action: Action<F>) -> C::Ret {
    let action = match action {
        Action::Rewrite { nat, counter } => match rewrite(ctx, f, nat) {
            Ok(()) => {
                frags::translated(f);
                Action::Pass(counter)
            }
            Err(()) => Action::Drop(counters::DROP_REWRITE_FAILED),
        },
        Action::Forward { nat, counter } => {
            let hop = nat.hop(f);
            match rewrite(ctx, f, nat) {
                Ok(()) => {
                    frags::translated(f);
                    match ctx.forward(hop) {
                        Ok(ret) => {
                            if !C::TC {
                                count(counters::XDP_SENT);
                            }
                            count(counter);
                            return ret;
                        }
                        Err(()) => Action::Drop(counters::DROP_FIB),
                    }
                }
                Err(()) => Action::Drop(counters::DROP_REWRITE_FAILED),
            }
        }
        Action::Bounce { nat, counter } => match rewrite(ctx, f, nat) {
            Ok(()) => {
                frags::translated(f);
                count(counter);
                return ctx.bounce();
            }
            Err(()) => Action::Drop(counters::DROP_REWRITE_FAILED),
        },
        Action::Reject { svc_id } => {
            // The tuple is taken before the packet becomes the answer (and `f` is not kept).
            let tuple = (f.saddr, f.daddr, f.sport, f.dport, f.proto);
            let made = ctx.reject(f);
            let reason = if made.is_ok() { counters::REJECT_NO_BACKEND } else { counters::DROP_NO_BACKEND };
            monitor::emit_tuple::<F>(tuple, EVENT_DROP, reason, (F::Addr::ZERO, 0), svc_id, lb::now_ns());
            match made {
                Ok(ret) => {
                    count(reason);
                    return ret;
                }
                Err(()) => Action::Drop(reason),
            }
        }
        other => other,
    };
    finish_marked::<F, C>(ctx, action)
}

/// Rewrites the destination, then the source; stops at the first failure. A non-first fragment
/// has no L4 header: only its addresses change.
#[inline(always)]
fn rewrite<F: Family, C: PacketCtx>(ctx: &C, f: &Flow<F>, nat: Nat<F>) -> Result<(), ()> {
    if f.later_fragment {
        if let Some((addr, _)) = nat.dst {
            let changed = F::rewrite_addr(ctx.data(), ctx.data_end(), Side::Destination, addr)?;
            ctx.sum_changed(u32::from(changed));
        }
        if let Some((addr, _)) = nat.src {
            let changed = F::rewrite_addr(ctx.data(), ctx.data_end(), Side::Source, addr)?;
            ctx.sum_changed(u32::from(changed));
        }
        return Ok(());
    }
    if let Some((addr, port)) = nat.dst {
        ctx.rewrite(f, Side::Destination, addr, port)?;
    }
    if let Some((addr, port)) = nat.src {
        ctx.rewrite(f, Side::Source, addr, port)?;
    }
    Ok(())
}

/// Counts the outcome and returns the hook's verdict for it. A packet XDP lets pass is marked:
/// decided, or left to TC.
#[inline(always)]
fn finish_marked<F: Family, C: PacketCtx>(ctx: &C, action: Action<F>) -> C::Ret {
    if let Action::Pass(c) = action {
        ctx.mark(c != counters::XDP_TO_TC && c != counters::XDP_PARTIAL_CSUM);
    }
    finish::<F, C>(action)
}

/// Counts the outcome and returns the hook's verdict for it.
#[inline(always)]
fn finish<F: Family, C: PacketCtx>(action: Action<F>) -> C::Ret {
    match action {
        Action::Drop(c) => {
            count(c);
            C::DROP
        }
        Action::Pass(c)
        | Action::Rewrite { counter: c, .. }
        | Action::Bounce { counter: c, .. }
        | Action::Forward { counter: c, .. } => {
            count(c);
            C::PASS
        }
        Action::Reject { .. } => {
            count(counters::DROP_NO_BACKEND);
            C::DROP
        }
    }
}
