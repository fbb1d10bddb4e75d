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
mod monitor;
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
    lb::{Action, Nat},
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
fn tc_rewrite(ctx: &TcContext, f: &parse::Flow, nat: Nat) -> Result<(), i64> {
    if let Some((addr, port)) = nat.dst {
        nat::rewrite_tc(ctx, f, Side::Destination, addr, port)?;
    }
    if let Some((addr, port)) = nat.src {
        nat::rewrite_tc(ctx, f, Side::Source, addr, port)?;
    }
    Ok(())
}

#[inline(always)]
fn xdp_rewrite(ctx: &XdpContext, f: &parse::Flow, nat: Nat) -> Result<(), ()> {
    if let Some((addr, port)) = nat.dst {
        nat::rewrite_xdp(ctx, f, Side::Destination, addr, port)?;
    }
    if let Some((addr, port)) = nat.src {
        nat::rewrite_xdp(ctx, f, Side::Source, addr, port)?;
    }
    Ok(())
}

/// Counts the outcome and turns it into a TC verdict.
#[inline(always)]
fn tc_verdict(ctx: &TcContext, parsed: Parsed, decide: impl FnOnce(&parse::Flow) -> Action) -> i32 {
    let action = match parsed {
        Parsed::Flow(f) => match decide(&f) {
            Action::Rewrite { nat, counter } => match tc_rewrite(ctx, &f, nat) {
                Ok(()) => Action::Pass(counter),
                Err(_) => Action::Drop(counters::DROP_REWRITE_FAILED),
            },
            other => other,
        },
        Parsed::Pass(c) => Action::Pass(c),
        Parsed::Drop(c) => Action::Drop(c),
    };
    match action {
        Action::Drop(c) => {
            count(c);
            TC_ACT_SHOT as i32
        }
        Action::Pass(c) | Action::Rewrite { counter: c, .. } => {
            count(c);
            TC_ACT_OK as i32
        }
    }
}

#[classifier]
pub fn lb4_tc_forward(ctx: TcContext) -> i32 {
    count(counters::RX_FORWARD);
    tc_linearise(&ctx);
    let parsed = parse(ctx.data(), ctx.data_end());
    tc_verdict(&ctx, parsed, |f| lb::lb4_forward(&ctx, f, ctx.len()))
}

#[classifier]
pub fn lb4_tc_reply(ctx: TcContext) -> i32 {
    count(counters::RX_REPLY);
    tc_linearise(&ctx);
    let parsed = parse(ctx.data(), ctx.data_end());
    tc_verdict(&ctx, parsed, lb::lb4_reply)
}

#[xdp]
pub fn lb4_xdp_forward(ctx: XdpContext) -> u32 {
    count(counters::RX_FORWARD);
    let action = match parse(ctx.data(), ctx.data_end()) {
        Parsed::Flow(f) => match lb::lb4_forward(&ctx, &f, (ctx.data_end() - ctx.data()) as u32) {
            Action::Rewrite { nat, counter } => match xdp_rewrite(&ctx, &f, nat) {
                Ok(()) => Action::Pass(counter),
                Err(()) => Action::Drop(counters::DROP_REWRITE_FAILED),
            },
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
