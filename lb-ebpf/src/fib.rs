//! Routes for packets lb forwards itself: a flow from outside this node to a remote endpoint is
//! SNATed to this node's address, and a packet with a local source address that the stack were
//! given would be dropped as a martian. So lb looks the route up (`bpf_fib_lookup`) and sends the
//! packet out of the interface it names: with the neighbour's address when the kernel knows it
//! (`bpf_redirect`), else through the neighbour subsystem (`bpf_redirect_neigh`, Linux 5.10).
//!
//! XDP (`lb4_xdp_node_in`) forwards only where the neighbour is known and the route leaves through
//! the interface the packet came in on (`XDP_TX`, which every driver with XDP has, and generic
//! XDP too); anything else it leaves to TC before touching the packet (a redirect to another
//! interface needs that driver's XDP transmit, which fails silently where it is missing).

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    macros::map,
    maps::{HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
    EbpfContext,
};

use lb_common::{LbNodeMac, IF_ROLE_POD};

use crate::{
    family::{Address, Family},
    maps::LB4_IFS,
    parse::{ptr_at, EthHdr, Flow},
};

/// The route lookup's parameter block, per CPU: off the stack, which the rest of the node-side
/// program fills (Linux 5.10 refuses a program whose calls together use more than 512 bytes).
/// Not pinned; nothing outlives one lookup.
#[map(name = "LB_FIB_PARAMS")]
static FIB_PARAMS: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// The Ethernet address of each node interface the XDP node program is on (see
/// `lb_common::MAP_LB_NODE_MACS`). Not pinned: each load's agent writes it as it attaches; an
/// interface missing from it has its packets left to TC.
#[map(name = "LB_NODE_MACS")]
static NODE_MACS: HashMap<u32, LbNodeMac> = HashMap::with_max_entries(256, 0);

/// Where a flow from outside goes to reach an endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// To this node: the endpoint is one of its pods (its route leaves through a pod's
    /// interface), or one of its own addresses. The stack delivers it.
    Local,
    /// Out of this node, to a remote endpoint: SNATed to `Route::snat`.
    Remote,
    /// No route (or forwarding is off on the interface the packet came in on), or no address to
    /// SNAT a remote endpoint's flow to.
    None,
    /// XDP: a remote endpoint XDP cannot send the packet to (the neighbour is not known, or the
    /// route leaves through another interface than the packet came in on): left to TC.
    ToTc,
}

/// A [`RouteKind`] and, for `Remote`, the address to SNAT to (else `Address::ZERO`): written
/// whole on every path (an enum's payload left unwritten on some is what Linux 5.10's verifier
/// refuses to see read).
#[derive(Clone, Copy)]
pub struct Route<F: Family> {
    pub kind: RouteKind,
    pub snat: F::Addr,
}

impl<F: Family> Route<F> {
    #[inline(always)]
    fn of(kind: RouteKind) -> Self {
        Self { kind, snat: F::Addr::ZERO }
    }
}

/// What a route is looked up for: a packet's protocol, ports and addresses (network byte order).
#[derive(Clone, Copy)]
pub struct Hop<F: Family> {
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub saddr: F::Addr,
    pub daddr: F::Addr,
}

/// Looks up the route from `saddr` to `daddr` for packet `f` (the family sets the addresses), as
/// if it were forwarded from interface `ingress`, the one it came in on (the program's context is `raw`). Returns the
/// kernel's answer and the lookup's results (`None` if the parameter block cannot be had, which
/// does not happen).
#[inline(always)]
fn lookup<F: Family>(
    raw: *mut core::ffi::c_void,
    ingress: u32,
    hop: Hop<F>,
) -> Option<(i64, &'static bpf_fib_lookup)> {
    // SAFETY: this CPU's block, used by this program only while it runs.
    let p = unsafe { &mut *FIB_PARAMS.get_ptr_mut(0)? };
    // SAFETY: a plain C struct of integers, for which all zeros is valid.
    *p = unsafe { zeroed() };
    p.family = F::AF;
    p.l4_protocol = hop.proto;
    p.sport = hop.sport;
    p.dport = hop.dport;
    p.ifindex = ingress;
    F::fib_addrs(p, hop.saddr, hop.daddr);
    // SAFETY: a valid program context and a parameter block of the size given.
    let rc = unsafe { fib_lookup(raw, p, size_of::<bpf_fib_lookup>() as i32, 0) };
    Some((rc, p))
}

/// The interface a TC program's packet came in on.
#[inline(always)]
fn tc_ingress(ctx: &TcContext) -> u32 {
    // SAFETY: reading a context field.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The interface an XDP program's packet came in on.
#[inline(always)]
fn xdp_ingress(ctx: &XdpContext) -> u32 {
    // SAFETY: reading a context field.
    unsafe { (*ctx.ctx).ingress_ifindex }
}

/// Whether the route the last lookup found (`p`) is one XDP can send a packet on: the neighbour
/// known, out of the interface it came in on.
#[inline(always)]
fn xdp_sendable(rc: i64, p: &bpf_fib_lookup, ingress: u32) -> bool {
    rc as u32 == BPF_FIB_LKUP_RET_SUCCESS && p.ifindex == ingress
}

/// Where a new flow from outside (packet `f`) goes to reach endpoint `backend`: this node when
/// the route leaves through a pod's interface (or is local); else a remote endpoint, SNATed to the
/// address of the node interface the route leaves through, or, when that is none lb knows (a
/// CNI's tunnel device), to the address of the one the packet came in on.
/// XDP: the same, but a remote endpoint XDP cannot send the packet to is `Route::ToTc`.
#[inline(always)]
pub fn route_to<F: Family, const XDP: bool>(
    raw: *mut core::ffi::c_void,
    ingress: u32,
    f: &Flow<F>,
    backend: F::Addr,
) -> Route<F> {
    let hop = Hop::<F> { proto: f.proto, sport: f.sport, dport: f.dport, saddr: f.saddr, daddr: backend };
    let Some((rc, p)) = lookup(raw, ingress, hop) else { return Route::of(RouteKind::None) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: the value is copied out at once.
            if unsafe { LB4_IFS.get(&p.ifindex) }.is_some_and(|i| i.role == IF_ROLE_POD) {
                return Route::of(RouteKind::Local);
            }
            if XDP && !xdp_sendable(rc, p, ingress) {
                return Route::of(RouteKind::ToTc);
            }
            let mut snat = F::if_snat_addr(p.ifindex);
            if snat == F::Addr::ZERO {
                snat = F::if_snat_addr(ingress);
            }
            if snat == F::Addr::ZERO {
                return Route::of(RouteKind::None);
            }
            Route { kind: RouteKind::Remote, snat }
        }
        BPF_FIB_LKUP_RET_NOT_FWDED => Route::of(RouteKind::Local),
        _ => Route::of(RouteKind::None),
    }
}

/// TC: where a new flow from outside goes (see [`route_to`]).
#[inline(always)]
pub fn tc_route_to<F: Family>(ctx: &TcContext, f: &Flow<F>, backend: F::Addr) -> Route<F> {
    route_to::<F, false>(ctx.as_ptr(), tc_ingress(ctx), f, backend)
}

/// XDP: where a new flow from outside goes (see [`route_to`]).
#[inline(always)]
pub fn xdp_route_to<F: Family>(ctx: &XdpContext, f: &Flow<F>, backend: F::Addr) -> Route<F> {
    route_to::<F, true>(ctx.as_ptr(), xdp_ingress(ctx), f, backend)
}

/// Whether the packet was addressed to this host at layer 2: a frame a promiscuous interface
/// (a bridge port) received for another host is not lb's to translate.
#[inline(always)]
pub fn for_this_host(ctx: &TcContext) -> bool {
    // SAFETY: reading a context field. PACKET_HOST is 0.
    unsafe { (*ctx.skb.skb).pkt_type == 0 }
}

/// XDP: whether the frame is addressed to the Ethernet address of the interface it came in on
/// (`LB_NODE_MACS`); false where that is not known (the packet is then left to TC).
#[inline(always)]
pub fn xdp_for_this_host(ctx: &XdpContext) -> bool {
    // SAFETY: the value is read at once.
    let Some(mac) = (unsafe { NODE_MACS.get(&xdp_ingress(ctx)) }) else { return false };
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else { return false };
    // SAFETY: bounds checked by ptr_at.
    unsafe { (*eth).dst == mac.addr }
}

/// XDP: looks up the route for a packet about to be rewritten to `hop`'s addresses; true when
/// XDP can send it (see [`xdp_forward`], which uses this lookup's results): else the packet is
/// to be left to TC, untouched.
#[inline(always)]
pub fn xdp_can_forward<F: Family>(ctx: &XdpContext, hop: Hop<F>) -> bool {
    let ingress = xdp_ingress(ctx);
    lookup(ctx.as_ptr(), ingress, hop).is_some_and(|(rc, p)| xdp_sendable(rc, p, ingress))
}

/// XDP: sends the packet back out of the interface it came in on (`XDP_TX`), to the next hop of
/// the route looked up in this run of the program for the addresses it was rewritten to
/// ([`xdp_can_forward`]: the decision returns `Forward` only after it found the route sendable).
/// `Err` if that route is not at hand.
#[inline(always)]
pub fn xdp_forward(ctx: &XdpContext) -> Result<u32, ()> {
    // SAFETY: this CPU's block, filled by a lookup in this run of the program.
    let p = unsafe { &*FIB_PARAMS.get_ptr(0).ok_or(())? };
    if p.ifindex != xdp_ingress(ctx) {
        return Err(());
    }
    let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst = p.dmac;
        (*eth).src = p.smac;
    }
    Ok(xdp_action::XDP_TX)
}

/// Sends the packet (already rewritten to `hop`'s addresses) out of the interface its route
/// names. `Err` when there is no route or the packet cannot be sent.
#[inline(always)]
pub fn forward<F: Family>(ctx: &TcContext, hop: Hop<F>) -> Result<i32, ()> {
    let (rc, p) = lookup(ctx.as_ptr(), tc_ingress(ctx), hop).ok_or(())?;
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let eth = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0).ok_or(())?;
            // SAFETY: bounds checked by ptr_at; no helper ran since.
            unsafe {
                (*eth).dst = p.dmac;
                (*eth).src = p.smac;
            }
            // SAFETY: no preconditions.
            Ok(unsafe { bpf_redirect(p.ifindex, 0) } as i32)
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            // SAFETY: no next hop given (the kernel looks the route up again and resolves its
            // neighbour), so no parameter block.
            let rc = unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) };
            // TC_ACT_REDIRECT, or TC_ACT_SHOT for bad arguments.
            if rc == 7 {
                Ok(7)
            } else {
                Err(())
            }
        }
        _ => Err(()),
    }
}
