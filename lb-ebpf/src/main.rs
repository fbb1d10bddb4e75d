//! lb datapath programs. Each entry point is thin: it counts the packet and runs the pipeline
//! (`pipeline`: parse, decide (`lb`), rewrite (`nat`), count) for its hook (`ctx`).
//!
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
//! - `lb4_sock_connect`, `lb4_sock_sendmsg`, `lb4_sock_recvmsg`, `lb4_sock_getpeername`: cgroup v2
//!   socket programs (`--socket-lb`): sockets are sent to a backend when they connect or send to
//!   a Service address, and read the Service address back (`sock`); `lb4_sock_release` drops a
//!   closing socket's entries.
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
mod parse;
mod pipeline;
mod sock;
mod stats;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use lb_common::counters;

use crate::{family::V4, stats::count};

#[classifier]
pub fn lb4_tc_forward(ctx: TcContext) -> i32 {
    // In XDP mode, behind the XDP program: what it decided goes on, uncounted here.
    if ctx::decided_by_xdp(&ctx) {
        return ctx::TC_NEXT;
    }
    count(counters::RX_FORWARD);
    pipeline::forward::<V4, _>(&ctx)
}

#[classifier]
pub fn lb4_tc_reply(ctx: TcContext) -> i32 {
    count(counters::RX_REPLY);
    pipeline::reply::<V4, _>(&ctx)
}

#[classifier]
pub fn lb4_tc_node_in(ctx: TcContext) -> i32 {
    // Behind the XDP node program: what it decided goes on, uncounted here.
    if ctx::decided_by_xdp(&ctx) {
        return ctx::TC_NEXT;
    }
    count(counters::RX_NODE_IN);
    pipeline::node_in::<V4, _>(&ctx)
}

#[classifier]
pub fn lb4_tc_node_out(ctx: TcContext) -> i32 {
    count(counters::RX_NODE_OUT);
    pipeline::node_out::<V4, _>(&ctx)
}

#[xdp]
pub fn lb4_xdp_forward(ctx: XdpContext) -> u32 {
    count(counters::RX_FORWARD);
    pipeline::forward::<V4, _>(&ctx)
}

#[xdp]
pub fn lb4_xdp_node_in(ctx: XdpContext) -> u32 {
    count(counters::RX_NODE_IN);
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

#[cgroup_sock(sock_release)]
pub fn lb4_sock_release(ctx: SockContext) -> i32 {
    sock::sock4_release(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
