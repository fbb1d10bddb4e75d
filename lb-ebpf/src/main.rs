//! lb datapath programs. Each entry point is thin: parse, decide (`lb`), rewrite (`nat`), count.
//!
//! - `lb4_tc_forward`: TC ingress of a pod's host-side interface (traffic leaving the pod).
//! - `lb4_xdp_forward`: the same decision as an XDP program (`--datapath xdp`).
//! - `lb4_tc_reply`: TC egress of a pod's host-side interface (traffic towards the pod).
#![no_std]
#![no_main]

mod config;
mod conntrack;
mod lb;
mod maps;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::counters;

use crate::{
    lb::Action,
    nat::Side,
    parse::{parse, Parsed},
    stats::count,
};

/// Enough linear bytes for Ethernet, the largest IPv4 header and a TCP header.
const MAX_HEADERS: u32 = 14 + 60 + 20;

/// Makes the headers readable through direct packet access (they may sit in paged data).
#[inline(always)]
fn tc_linearise(ctx: &TcContext) {
    let want = if ctx.len() < MAX_HEADERS { ctx.len() } else { MAX_HEADERS };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
    }
}

#[inline(always)]
fn tc_verdict(ctx: &TcContext, action: Action, f: Option<&parse::Flow>, side: Side) -> i32 {
    match (action, f) {
        (Action::Rewrite { addr, port, counter }, Some(f)) => {
            match nat::rewrite_tc(ctx, f, side, addr, port) {
                Ok(()) => {
                    count(counter);
                    TC_ACT_OK as i32
                }
                Err(_) => {
                    count(counters::DROP_REWRITE_FAILED);
                    TC_ACT_SHOT as i32
                }
            }
        }
        (Action::Drop(c), _) => {
            count(c);
            TC_ACT_SHOT as i32
        }
        (Action::Pass(c), _) | (Action::Rewrite { counter: c, .. }, None) => {
            count(c);
            TC_ACT_OK as i32
        }
    }
}

#[classifier]
pub fn lb4_tc_forward(ctx: TcContext) -> i32 {
    count(counters::RX_FORWARD);
    tc_linearise(&ctx);
    match parse(ctx.data(), ctx.data_end()) {
        Parsed::Flow(f) => {
            let action = lb::lb4_forward(&ctx, &f, ctx.len());
            tc_verdict(&ctx, action, Some(&f), Side::Destination)
        }
        Parsed::Pass(c) => tc_verdict(&ctx, Action::Pass(c), None, Side::Destination),
        Parsed::Drop(c) => tc_verdict(&ctx, Action::Drop(c), None, Side::Destination),
    }
}

#[classifier]
pub fn lb4_tc_reply(ctx: TcContext) -> i32 {
    count(counters::RX_REPLY);
    tc_linearise(&ctx);
    match parse(ctx.data(), ctx.data_end()) {
        Parsed::Flow(f) => {
            let action = lb::lb4_reply(&f);
            tc_verdict(&ctx, action, Some(&f), Side::Source)
        }
        Parsed::Pass(c) => tc_verdict(&ctx, Action::Pass(c), None, Side::Source),
        Parsed::Drop(c) => tc_verdict(&ctx, Action::Drop(c), None, Side::Source),
    }
}

#[xdp]
pub fn lb4_xdp_forward(ctx: XdpContext) -> u32 {
    count(counters::RX_FORWARD);
    let action = match parse(ctx.data(), ctx.data_end()) {
        Parsed::Flow(f) => match lb::lb4_forward(&ctx, &f, (ctx.data_end() - ctx.data()) as u32) {
            Action::Rewrite { addr, port, counter } => {
                match nat::rewrite_xdp(&ctx, &f, Side::Destination, addr, port) {
                    Ok(()) => Action::Pass(counter),
                    Err(()) => Action::Drop(counters::DROP_REWRITE_FAILED),
                }
            }
            other => other,
        },
        Parsed::Pass(c) => Action::Pass(c),
        Parsed::Drop(c) => Action::Drop(c),
    };
    match action {
        Action::Drop(c) => {
            count(c);
            xdp_action::XDP_DROP
        }
        Action::Pass(c) | Action::Rewrite { counter: c, .. } => {
            count(c);
            xdp_action::XDP_PASS
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
