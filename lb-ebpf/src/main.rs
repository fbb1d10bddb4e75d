//! lb datapath programs. Each entry point is thin: it counts the packet and runs the pipeline
//! (`pipeline`: parse, decide (`lb`), rewrite (`nat`), count) for its hook (`ctx`).
//!
//! - `lb4_tc_forward`, `lb4_tc_reply`, `lb4_xdp_forward` hand IPv6 packets to `lb6_tc_forward`,
//!   `lb6_tc_reply`, `lb6_xdp_forward` (the same pipeline for `V6`) by tail call, through the
//!   program arrays `LB_TAIL_TC` and `LB_TAIL_XDP` the agent fills when it serves IPv6.
//! - `lb4_tc_forward`: TC ingress of a pod's host-side interface (traffic leaving the pod).
//! - `lb4_xdp_forward`: the same decision as an XDP program (`--datapath xdp`), in front of
//!   `lb4_tc_forward`, which takes what XDP leaves to it and lets the rest go on.
//! - `lb4_tc_reply`: TC egress of a pod's host-side interface (traffic towards the pod).
//! - `lb4_tc_node_in`: TC ingress of a node interface (`--node-interfaces`: traffic from outside
//!   this node to the external addresses of Services, and replies to flows SNATed to this node).
//! - `lb4_tc_node_out`: TC egress of a node interface (replies of local endpoints to clients
//!   outside).
//! - `lb4_xdp_node_in`: the node interface's ingress decision as an XDP program
//!   (`--node-datapath xdp`), in front of `lb4_tc_node_in`, which takes what XDP leaves to it.
//! - The TC node-side entry points hand IPv6 packets to `lb6_tc_node_in` and `lb6_tc_node_out`
//!   through `LB_TAIL_NODE_TC`; the XDP one leaves IPv6 to TC.
//! - `lb4_sock_connect`, `lb4_sock_sendmsg`, `lb4_sock_recvmsg`, `lb4_sock_getpeername`: cgroup v2
//!   socket programs (`--socket-lb`): sockets are sent to a backend when they connect or send to
//!   a Service address, and read the Service address back (`sock`); `lb6_sock_connect`,
//!   `lb6_sock_sendmsg`, `lb6_sock_recvmsg`, `lb6_sock_getpeername` the same for IPv6 sockets
//!   (IPv4-mapped destinations through the IPv4 path); `lb4_sock_release` drops a closing
//!   socket's entries, of either family.
#![no_std]
#![no_main]

mod config;
mod conntrack;
mod ctx;
mod family;
mod fib;
mod frags;
mod lb;
mod maps;
mod monitor;
mod nat;
mod nat6;
mod parse;
mod parse6;
mod pipeline;
mod sock;
mod stats;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use lb_common::counters;

use crate::{
    ctx::PacketCtx,
    family::{V4, V6},
    maps::{LB_TAIL_NODE_TC, LB_TAIL_TC, LB_TAIL_XDP},
    stats::count,
};

/// An IPv6 packet goes on in the IPv6 program in `slot` of `programs` (a tail call: it does not
/// come back). Where the slot is empty (`--ipv6 off`) it passes untouched, counted as `empty`.
/// `None` for any other packet.
#[inline(always)]
fn to_ipv6<C: PacketCtx>(
    ctx: &C,
    programs: &aya_ebpf::maps::ProgramArray,
    slot: u32,
    empty: u32,
) -> Option<C::Ret> {
    if !parse::is_ipv6(ctx.data(), ctx.data_end()) {
        return None;
    }
    // SAFETY: a valid context; the programs in the array are of this program's type.
    unsafe { programs.tail_call(ctx, slot) };
    count(empty);
    Some(C::PASS)
}

#[classifier]
pub fn lb4_tc_forward(ctx: TcContext) -> i32 {
    // In XDP mode, behind the XDP program: what it decided goes on, uncounted here.
    if ctx::decided_by_xdp(&ctx) {
        return ctx::TC_NEXT;
    }
    count(counters::RX_FORWARD);
    if let Some(ret) = to_ipv6(&ctx, &LB_TAIL_TC, lb_common::TAIL_FORWARD, counters::PASS_IPV6) {
        return ret;
    }
    pipeline::forward::<V4, _>(&ctx)
}

#[classifier]
pub fn lb4_tc_reply(ctx: TcContext) -> i32 {
    count(counters::RX_REPLY);
    if let Some(ret) = to_ipv6(&ctx, &LB_TAIL_TC, lb_common::TAIL_REPLY, counters::PASS_IPV6) {
        return ret;
    }
    pipeline::reply::<V4, _>(&ctx)
}

/// `lb4_tc_forward` for IPv6 packets (tail-called, `LB_TAIL_TC[TAIL_FORWARD]`; the packet was
/// counted there). The lb6 bodies are inlined into their entry points (`inline(always)` goes to
/// the function the attribute macro wraps): a wrapper's frame would count against the 512 bytes of
/// stack a chain of calls shares (`tests/stack.rs`).
#[classifier]
#[inline(always)]
pub fn lb6_tc_forward(ctx: TcContext) -> i32 {
    // SAFETY: a valid context; the array holds programs of this type.
    pipeline::forward_parsed::<V6, _>(&ctx, || unsafe {
        let _ = LB_TAIL_TC.tail_call(&ctx, lb_common::TAIL_FORWARD_DECIDED);
    })
}

/// The second half of `lb6_tc_forward` (`LB_TAIL_TC[TAIL_FORWARD_DECIDED]`).
#[classifier]
#[inline(always)]
pub fn lb6_tc_forward_decided(ctx: TcContext) -> i32 {
    pipeline::forward_decided::<V6, _>(&ctx)
}

/// `lb4_tc_reply` for IPv6 packets (`LB_TAIL_TC[TAIL_REPLY]`).
#[classifier]
#[inline(always)]
pub fn lb6_tc_reply(ctx: TcContext) -> i32 {
    pipeline::reply::<V6, _>(&ctx)
}

/// `lb4_xdp_forward` for IPv6 packets (`LB_TAIL_XDP[TAIL_FORWARD]`).
#[xdp]
#[inline(always)]
pub fn lb6_xdp_forward(ctx: XdpContext) -> u32 {
    // SAFETY: a valid context; the array holds programs of this type.
    pipeline::forward_parsed::<V6, _>(&ctx, || unsafe {
        let _ = LB_TAIL_XDP.tail_call(&ctx, lb_common::TAIL_FORWARD_DECIDED);
    })
}

/// The second half of `lb6_xdp_forward` (`LB_TAIL_XDP[TAIL_FORWARD_DECIDED]`).
#[xdp]
#[inline(always)]
pub fn lb6_xdp_forward_decided(ctx: XdpContext) -> u32 {
    pipeline::forward_decided::<V6, _>(&ctx)
}

#[classifier]
pub fn lb4_tc_node_in(ctx: TcContext) -> i32 {
    // Behind the XDP node program: what it decided goes on, uncounted here.
    if ctx::decided_by_xdp(&ctx) {
        return ctx::TC_NEXT;
    }
    count(counters::RX_NODE_IN);
    if let Some(ret) = to_ipv6(&ctx, &LB_TAIL_NODE_TC, lb_common::TAIL_NODE_IN, counters::PASS_IPV6) {
        return ret;
    }
    pipeline::node_in::<V4, _>(&ctx)
}

#[classifier]
pub fn lb4_tc_node_out(ctx: TcContext) -> i32 {
    count(counters::RX_NODE_OUT);
    if let Some(ret) = to_ipv6(&ctx, &LB_TAIL_NODE_TC, lb_common::TAIL_NODE_OUT, counters::PASS_IPV6) {
        return ret;
    }
    pipeline::node_out::<V4, _>(&ctx)
}

/// `lb4_tc_node_in` for IPv6 packets (`LB_TAIL_NODE_TC[TAIL_NODE_IN]`), in three programs (see
/// `pipeline::node_in_parsed`).
#[classifier]
#[inline(always)]
pub fn lb6_tc_node_in(ctx: TcContext) -> i32 {
    // SAFETY: a valid context; the array holds programs of this type.
    pipeline::node_in_parsed::<V6, _>(&ctx, |reply| unsafe {
        let next = if reply { lb_common::TAIL_NODE_IN_REPLY } else { lb_common::TAIL_NODE_IN_DECIDED };
        let _ = LB_TAIL_NODE_TC.tail_call(&ctx, next);
    })
}

/// Replies of flows SNATed to this node (`LB_TAIL_NODE_TC[TAIL_NODE_IN_REPLY]`).
#[classifier]
#[inline(always)]
pub fn lb6_tc_node_in_reply(ctx: TcContext) -> i32 {
    // SAFETY: as above.
    pipeline::node_in_reply::<V6, _>(&ctx, || unsafe {
        let _ = LB_TAIL_NODE_TC.tail_call(&ctx, lb_common::TAIL_NODE_IN_DECIDED);
    })
}

/// The rest of `lb6_tc_node_in` (`LB_TAIL_NODE_TC[TAIL_NODE_IN_DECIDED]`).
#[classifier]
#[inline(always)]
pub fn lb6_tc_node_in_decided(ctx: TcContext) -> i32 {
    pipeline::node_in_decided::<V6, _>(&ctx)
}

/// `lb4_tc_node_out` for IPv6 packets (`LB_TAIL_NODE_TC[TAIL_NODE_OUT]`).
#[classifier]
#[inline(always)]
pub fn lb6_tc_node_out(ctx: TcContext) -> i32 {
    pipeline::node_out::<V6, _>(&ctx)
}

#[xdp]
pub fn lb4_xdp_forward(ctx: XdpContext) -> u32 {
    count(counters::RX_FORWARD);
    // An empty slot (no IPv6 XDP program) leaves the packet to the TC program behind, which
    // hands it to its own IPv6 program or passes it (`PASS_IPV6`); IPv6's XDP program marks what
    // it decides itself.
    if let Some(ret) = to_ipv6(&ctx, &LB_TAIL_XDP, lb_common::TAIL_FORWARD, counters::XDP_TO_TC) {
        ctx.mark(false);
        return ret;
    }
    pipeline::forward::<V4, _>(&ctx)
}

#[xdp]
pub fn lb4_xdp_node_in(ctx: XdpContext) -> u32 {
    count(counters::RX_NODE_IN);
    // IPv6 from outside is TC's (`lb6_tc_node_in`): left to it untouched, marked as left to TC.
    if parse::is_ipv6(ctx.data(), ctx.data_end()) {
        count(counters::XDP_TO_TC);
        ctx.mark(false);
        return aya_ebpf::bindings::xdp_action::XDP_PASS;
    }
    pipeline::node_in::<V4, _>(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn lb4_sock_connect(ctx: SockAddrContext) -> i32 {
    sock::sock4_forward(&ctx, counters::SOCK_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb4_sock_sendmsg(ctx: SockAddrContext) -> i32 {
    sock::sock4_forward(&ctx, counters::SOCK_SENDMSG)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb4_sock_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::sock4_reverse(&ctx, counters::SOCK_RECVMSG)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb4_sock_getpeername(ctx: SockAddrContext) -> i32 {
    sock::sock4_reverse(&ctx, counters::SOCK_GETPEERNAME)
}

#[cgroup_sock_addr(connect6)]
pub fn lb6_sock_connect(ctx: SockAddrContext) -> i32 {
    sock::sock6_forward::<true>(&ctx, counters::SOCK_CONNECT)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb6_sock_sendmsg(ctx: SockAddrContext) -> i32 {
    sock::sock6_forward::<false>(&ctx, counters::SOCK_SENDMSG)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb6_sock_recvmsg(ctx: SockAddrContext) -> i32 {
    sock::sock6_reverse(&ctx, counters::SOCK_RECVMSG)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb6_sock_getpeername(ctx: SockAddrContext) -> i32 {
    sock::sock6_reverse(&ctx, counters::SOCK_GETPEERNAME)
}

/// Both families' sockets (the name keeps the `lb4_` its pins were made under).
#[cgroup_sock(sock_release)]
pub fn lb4_sock_release(ctx: SockContext) -> i32 {
    sock::sock_release(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
