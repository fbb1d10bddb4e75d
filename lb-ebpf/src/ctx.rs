//! The packet context the pipeline runs on: everything that differs between the TC and XDP hooks,
//! behind one trait. Where the packet is and how long it is, how its headers are made readable,
//! how one side of a flow is rewritten (TC: the kernel's checksum helpers; XDP: incremental
//! checksums) and which return values pass and drop a packet. The pipeline (`crate::pipeline`) is
//! generic over it, so each program is the same steps compiled for its hook.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    helpers::bpf_xdp_adjust_meta,
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::counters;
pub use lb_common::{XDP_DECIDED, XDP_LEFT};

pub use crate::fib::{Hop, Route, RouteKind};
use crate::{
    family::Family,
    fib,
    nat::{self, Side},
    parse::{self, Flow, Parsed},
};

/// A packet as a program hook presents it. The methods that take a packet or an address are
/// generic over the address family: the hook does its part (helpers or direct writes), the
/// family (`F`) its own (headers, checksums, route lookups).
pub trait PacketCtx: EbpfContext {
    /// The program's return value.
    type Ret;
    /// The return value that lets the packet go on.
    const PASS: Self::Ret;
    /// The return value that drops the packet.
    const DROP: Self::Ret;

    /// Start of the directly accessible packet data.
    fn data(&self) -> usize;
    /// End of the directly accessible packet data.
    fn data_end(&self) -> usize;
    /// The packet's length, as counted in per-frontend bytes (layer 2).
    fn len(&self) -> u32;

    /// Parses the packet. By default its headers are readable as they are (all of an XDP frame
    /// is); a hook whose packet may be partly non-linear makes them readable first.
    #[inline(always)]
    fn parse<F: Family>(&self) -> Parsed<F> {
        F::parse(self.data(), self.data_end())
    }

    /// Writes `addr` and `port` into one side of `f`, keeping the IP and L4 checksums right.
    fn rewrite<F: Family>(&self, f: &Flow<F>, side: Side, addr: F::Addr, port: u16) -> Result<(), ()>;

    /// Whether this hook can send a packet back out of the interface it came in on and rebuild
    /// packets (TC). XDP leaves packets that need either to the TC program (`XDP_TO_TC`).
    const TC: bool;

    /// Whether the L4 checksum of `f` may be partial, which a hook that rewrites checksums
    /// incrementally cannot tell from a full one (XDP); false where the kernel's helpers know.
    fn csum_maybe_partial<F: Family>(&self, f: &Flow<F>) -> bool;

    /// Sends the (rewritten) packet back out of the interface it came in on, to the pod that sent
    /// it, its Ethernet addresses swapped: hairpinned packets go from a pod to itself without
    /// the node's stack (and its netfilter) seeing half a translation. TC only.
    fn bounce(&self) -> Self::Ret;

    /// Replaces the packet `f` by an ICMP port unreachable to its sender and bounces it; `Err`
    /// when it gets no answer (see `lb_common::reject`). TC only.
    fn reject<F: Family>(&self, f: &Flow<F>) -> Result<Self::Ret, ()>;

    /// Where a new flow from outside (packet `f`) goes to reach endpoint `backend`: this node,
    /// or out of a node interface (with the address to SNAT it to).
    fn route_to<F: Family>(&self, f: &Flow<F>, backend: F::Addr) -> Route<F>;

    /// Whether the packet was addressed to this host at layer 2 (not a copy a promiscuous
    /// interface received for another).
    fn for_this_host(&self) -> bool;

    /// Before a packet is rewritten to `hop`'s addresses and forwarded: whether this hook can
    /// send it out (TC always; XDP where the neighbour is known and the route leaves through the
    /// interface the packet came in on). A packet it cannot send is left to TC untouched. XDP
    /// sends a packet by the route this looked up.
    fn can_forward<F: Family>(&self, _hop: Hop<F>) -> bool {
        true
    }

    /// Sends the packet, rewritten to `hop`'s addresses, out of the interface its route names;
    /// `Err` when it cannot. (XDP: by the route `can_forward` found in this run.)
    fn forward<F: Family>(&self, hop: Hop<F>) -> Result<Self::Ret, ()>;

    /// XDP: marks a packet it lets pass, in the metadata in front of it (which the kernel hands
    /// on to the socket buffer), as `decided` (the TC forward program behind it leaves it alone)
    /// or as left to TC. Every passed packet is marked, so that no mark left by an earlier hop
    /// (metadata stays with a reused buffer) is read as this one's. A no-op where nothing runs
    /// behind (TC).
    fn mark(&self, _decided: bool) {}

    /// XDP: whether a packet it passes can carry its mark for TC: the kernel allows metadata
    /// (`config::xdp_meta`, known at load) and this packet has room for it, made here (a driver
    /// without metadata support refuses it per packet). Invalidates packet pointers. TC: true
    /// (nothing runs behind it).
    fn can_mark(&self) -> bool {
        true
    }

    /// After a write that changed the sum of the bytes after the Ethernet header by `diff` (a
    /// ones'-complement sum, `__wsum`) with nothing offsetting it (an IPv6 address outside any
    /// checksum): a received packet's sum (`CHECKSUM_COMPLETE`, TC) follows. A no-op where there
    /// is none (XDP).
    fn sum_changed(&self, _diff: u32) {}
}

/// The metadata XDP writes in front of a packet.
#[repr(C)]
pub struct XdpMark {
    pub magic: u32,
    pub ifindex: u32,
}

/// TC: whether the XDP program in front already decided this packet, on this interface (see
/// [`PacketCtx::mark`]); the TC forward program then lets it go on uncounted.
#[inline(always)]
pub fn decided_by_xdp(ctx: &TcContext) -> bool {
    // SAFETY: reading context fields.
    let (meta, data, ifindex) = unsafe {
        ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize, (*ctx.skb.skb).ingress_ifindex)
    };
    match parse::ptr_at::<XdpMark>(meta, data, 0) {
        // SAFETY: bounds checked against the start of the packet by ptr_at.
        Some(m) => unsafe { (*m).magic == XDP_DECIDED && (*m).ifindex == ifindex },
        None => false,
    }
}

/// `TCX_NEXT` (= `TC_ACT_UNSPEC`): no verdict, the next program (or filter) decides; after the
/// last one the packet passes.
pub const TC_NEXT: i32 = -1;

impl PacketCtx for TcContext {
    type Ret = i32;
    /// A packet lb does not own, or has rewritten, goes on to the TCX programs after lb, then to
    /// any classic clsact filters (`TCX_NEXT`); with none, it passes.
    const PASS: i32 = TC_NEXT;
    const DROP: i32 = TC_ACT_SHOT as i32;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    /// The socket buffer's length, paged data included.
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    /// Parses with the common headers linear (no copy for the usual packet), and again with up to
    /// `F::MAX_HEADERS` linear when that was not enough (IP options, ICMP errors in paged data).
    #[inline(always)]
    fn parse<F: Family>(&self) -> Parsed<F> {
        tc_linearise(self, F::COMMON_HEADERS);
        let parsed = F::parse(TcContext::data(self), TcContext::data_end(self));
        let short =
            matches!(parsed, Parsed::Drop(_) | Parsed::Pass(counters::PASS_OTHER_PROTO) | Parsed::TooDeep(_));
        if short && tc_linearise(self, F::MAX_HEADERS) {
            return F::parse(TcContext::data(self), TcContext::data_end(self));
        }
        parsed
    }

    #[inline(always)]
    fn rewrite<F: Family>(&self, f: &Flow<F>, side: Side, addr: F::Addr, port: u16) -> Result<(), ()> {
        F::rewrite_tc(self, f, side, addr, port)
    }

    const TC: bool = true;

    /// The helpers know the socket buffer's checksum state.
    #[inline(always)]
    fn csum_maybe_partial<F: Family>(&self, _f: &Flow<F>) -> bool {
        false
    }

    #[inline(always)]
    fn bounce(&self) -> i32 {
        nat::bounce_tc(self)
    }

    #[inline(always)]
    fn reject<F: Family>(&self, _f: &Flow<F>) -> Result<i32, ()> {
        F::reject_tc(self)
    }

    #[inline(always)]
    fn sum_changed(&self, diff: u32) {
        if diff != 0 {
            // SAFETY: a valid context. Any packet without a received sum: nothing to do (the
            // helper says so, ignored).
            unsafe { aya_ebpf::helpers::bpf_csum_update(self.skb.skb, diff) };
        }
    }

    #[inline(always)]
    fn route_to<F: Family>(&self, f: &Flow<F>, backend: F::Addr) -> Route<F> {
        fib::tc_route_to(self, f, backend)
    }

    #[inline(always)]
    fn for_this_host(&self) -> bool {
        fib::for_this_host(self)
    }

    #[inline(always)]
    fn forward<F: Family>(&self, hop: Hop<F>) -> Result<i32, ()> {
        fib::forward(self, hop)
    }
}

/// Makes the first `want` bytes (or the whole packet) readable through direct packet access (they
/// may sit in paged data). Returns whether it pulled.
#[inline(always)]
fn tc_linearise(ctx: &TcContext, want: u32) -> bool {
    let want = if ctx.len() < want { ctx.len() } else { want };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
        return true;
    }
    false
}

impl PacketCtx for XdpContext {
    type Ret = u32;
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    /// The frame's length: all of it is linear.
    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    #[inline(always)]
    fn rewrite<F: Family>(&self, f: &Flow<F>, side: Side, addr: F::Addr, port: u16) -> Result<(), ()> {
        F::rewrite_xdp(self, f, side, addr, port)
    }

    const TC: bool = false;

    #[inline(always)]
    fn csum_maybe_partial<F: Family>(&self, f: &Flow<F>) -> bool {
        F::csum_maybe_partial(XdpContext::data(self), XdpContext::data_end(self), f)
    }

    /// Never called: the pipeline leaves such packets to TC.
    #[inline(always)]
    fn bounce(&self) -> u32 {
        xdp_action::XDP_PASS
    }

    /// Never called: the pipeline leaves such packets to TC.
    #[inline(always)]
    fn reject<F: Family>(&self, _f: &Flow<F>) -> Result<u32, ()> {
        Err(())
    }

    #[inline(always)]
    fn route_to<F: Family>(&self, f: &Flow<F>, backend: F::Addr) -> Route<F> {
        fib::xdp_route_to(self, f, backend)
    }

    #[inline(always)]
    fn for_this_host(&self) -> bool {
        fib::xdp_for_this_host(self)
    }

    #[inline(always)]
    fn can_forward<F: Family>(&self, hop: Hop<F>) -> bool {
        fib::xdp_can_forward(self, hop)
    }

    #[inline(always)]
    fn forward<F: Family>(&self, _hop: Hop<F>) -> Result<u32, ()> {
        fib::xdp_forward(self)
    }

    #[inline(always)]
    fn can_mark(&self) -> bool {
        if !crate::config::xdp_meta() {
            // This kernel refuses the helper (known at load: the verifier never looks here).
            return false;
        }
        let len = size_of::<XdpMark>();
        // Room made once: a test run that repeats the program on one buffer reuses it, and
        // `mark` after `can_mark` finds it made.
        // (A driver without metadata gives a start past the packet's: no room, whatever the
        // difference would wrap to; the helper then says why.)
        self.metadata() + len <= XdpContext::data(self)
            // SAFETY: a valid XDP context; the helper only moves the metadata's start.
            || unsafe { bpf_xdp_adjust_meta(self.ctx, -(len as i32)) } == 0
    }

    #[inline(always)]
    fn mark(&self, decided: bool) {
        if !self.can_mark() {
            // No room or no metadata support in this kernel or driver: TC looks at the packet
            // again.
            return;
        }
        if let Some(m) = parse::ptr_at::<XdpMark>(self.metadata(), XdpContext::data(self), 0) {
            // SAFETY: bounds checked against the start of the packet by ptr_at; a valid context.
            unsafe {
                (*m).magic = if decided { XDP_DECIDED } else { XDP_LEFT };
                (*m).ifindex = (*self.ctx).ingress_ifindex;
            }
        }
    }
}
