//! The steps every program runs, whatever its hook: parse, decide (`lb`), rewrite both sides of
//! the flow (destination, then source), count the outcome, return the verdict. Generic over the
//! hook's [`PacketCtx`] and inlined into each entry point (no BPF-to-BPF calls), so each program
//! is compiled for its own hook.

use lb_common::counters;

use crate::{
    ctx::PacketCtx,
    lb::{self, Action, Nat},
    nat::{self, Side},
    parse::{Flow, Parsed},
    stats::count,
};

/// Forward direction (pod → anything): load-balance packets to service frontends.
#[inline(always)]
pub fn lb4_forward<C: PacketCtx>(ctx: &C) -> C::Ret {
    let parsed = ctx.parse();
    verdict(ctx, parsed, |f| lb::lb4_forward(ctx, f, ctx.len()))
}

/// Reply direction (anything → pod): translate replies of load-balanced flows back to the
/// service, and ICMP errors about them.
#[inline(always)]
pub fn lb4_reply<C: PacketCtx>(ctx: &C) -> C::Ret {
    let parsed = ctx.parse();
    if let Parsed::IcmpError(e) = &parsed {
        // An ICMP error about a load-balanced flow goes to the client as if about its packet to
        // the VIP (counted as reverse NAT); any other ICMP passes.
        let action = match lb::lb4_reply_icmp(e) {
            Some((vip, vport)) => match nat::rewrite_icmp_error(ctx, e, vip, vport) {
                Ok(()) => Action::Pass(counters::REV_NAT),
                Err(_) => Action::Drop(counters::DROP_REWRITE_FAILED),
            },
            None => Action::Pass(counters::PASS_OTHER_PROTO),
        };
        return finish::<C>(action);
    }
    verdict(ctx, parsed, lb::lb4_reply)
}

/// Decides what to do with a parsed packet, carries it out, counts the outcome and turns it into
/// the hook's verdict.
#[inline(always)]
fn verdict<C: PacketCtx>(ctx: &C, parsed: Parsed, decide: impl FnOnce(&Flow) -> Action) -> C::Ret {
    let action = match parsed {
        Parsed::Flow(f) => match decide(&f) {
            Action::Rewrite { nat, counter } => match rewrite(ctx, &f, nat) {
                Ok(()) => Action::Pass(counter),
                Err(()) => Action::Drop(counters::DROP_REWRITE_FAILED),
            },
            other => other,
        },
        Parsed::IcmpError(_) => Action::Pass(counters::PASS_OTHER_PROTO),
        Parsed::Pass(c) => Action::Pass(c),
        Parsed::Drop(c) => Action::Drop(c),
    };
    finish::<C>(action)
}

/// Rewrites the destination, then the source; stops at the first failure.
#[inline(always)]
fn rewrite<C: PacketCtx>(ctx: &C, f: &Flow, nat: Nat) -> Result<(), ()> {
    if let Some((addr, port)) = nat.dst {
        ctx.rewrite(f, Side::Destination, addr, port)?;
    }
    if let Some((addr, port)) = nat.src {
        ctx.rewrite(f, Side::Source, addr, port)?;
    }
    Ok(())
}

/// Counts the outcome and returns the hook's verdict for it.
#[inline(always)]
fn finish<C: PacketCtx>(action: Action) -> C::Ret {
    match action {
        Action::Drop(c) => {
            count(c);
            C::DROP
        }
        Action::Pass(c) | Action::Rewrite { counter: c, .. } => {
            count(c);
            C::PASS
        }
    }
}
