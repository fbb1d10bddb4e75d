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

/// Linear bytes that hold the headers of almost every packet: Ethernet, IPv4 without options and
/// a TCP header (a UDP header is shorter).
const COMMON_HEADERS: u32 = 14 + 20 + 20;
/// Linear bytes for the largest headers lb reads: Ethernet, IPv4 with options, and an ICMP error
/// quoting an IPv4 header with options and a TCP header.
const MAX_HEADERS: u32 = 14 + 60 + 8 + 60 + 20;

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

/// Parses with the common headers linear (no copy for the usual packet), and again with up to
/// [`MAX_HEADERS`] linear when that was not enough (IP options, ICMP errors in paged data).
#[inline(always)]
fn tc_parse(ctx: &TcContext) -> Parsed {
    tc_linearise(ctx, COMMON_HEADERS);
    let parsed = parse(ctx.data(), ctx.data_end());
    let short = matches!(parsed, Parsed::Drop(_) | Parsed::Pass(counters::PASS_OTHER_PROTO));
    if short && tc_linearise(ctx, MAX_HEADERS) {
        return parse(ctx.data(), ctx.data_end());
    }
    parsed
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
        Parsed::IcmpError(_) => Action::Pass(counters::PASS_OTHER_PROTO),
        Parsed::Pass(c) => Action::Pass(c),
        Parsed::Drop(c) => Action::Drop(c),
    };
    tc_finish(action)
}

#[inline(always)]
fn tc_finish(action: Action) -> i32 {
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
    let parsed = tc_parse(&ctx);
    tc_verdict(&ctx, parsed, |f| lb::lb4_forward(&ctx, f, ctx.len()))
}

#[classifier]
pub fn lb4_tc_reply(ctx: TcContext) -> i32 {
    count(counters::RX_REPLY);
    let parsed = tc_parse(&ctx);
    if let Parsed::IcmpError(e) = &parsed {
        // An ICMP error about a load-balanced flow goes to the client as if about its packet to
        // the VIP (counted as reverse NAT); any other ICMP passes.
        let action = match lb::lb4_reply_icmp(e) {
            Some((vip, vport)) => match nat::rewrite_icmp_error(&ctx, e, vip, vport) {
                Ok(()) => Action::Pass(counters::REV_NAT),
                Err(_) => Action::Drop(counters::DROP_REWRITE_FAILED),
            },
            None => Action::Pass(counters::PASS_OTHER_PROTO),
        };
        return tc_finish(action);
    }
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
        Parsed::IcmpError(_) => Action::Pass(counters::PASS_OTHER_PROTO),
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
