//! Events for `lbctl monitor`: sent while the agent turns them on (`--flow-events`, the default)
//! and rate-limited per CPU, so that the cost is bounded on new flows and drops (and nothing on
//! established packets); with events off it is one array read.

use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid};
use lb_common::{LbEvent, LbEvent6, EVENT_IPV6, EVENT_SOCK, MONITOR_BURST, MONITOR_RATE_PER_SEC};

use crate::{
    config,
    family::{Address, Family},
    maps::{LB_EVENTS, LB_MONITOR, LB_MON_RATE},
    parse::Flow,
};

/// Whether the agent has events on (`LB_MONITOR[0]`).
#[inline(always)]
fn events_on() -> bool {
    LB_MONITOR.get(0).is_some_and(|n| *n != 0)
}

/// Takes a token from this CPU's bucket.
#[inline(always)]
fn allowed(now: u64) -> bool {
    let Some(b) = LB_MON_RATE.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU value, only this CPU touches it while the program runs.
    let b = unsafe { &mut *b };
    // At most a second counts (a full bucket), which also keeps the product far from overflow:
    // BPF has no 128-bit multiply for a saturating one.
    let elapsed = now.saturating_sub(b.last_ns).min(1_000_000_000);
    let refill = elapsed * MONITOR_RATE_PER_SEC / 1_000_000_000;
    if refill > 0 {
        b.tokens = (b.tokens + refill).min(MONITOR_BURST);
        b.last_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    // Saturating: a TC program in a softirq may take the last token between the check and here
    // (the cgroup programs run in process context on the same CPU's bucket).
    b.tokens = b.tokens.saturating_sub(1);
    true
}

/// Sends an event about `f` if events are on and the rate allows.
#[inline(always)]
pub fn emit<F: Family>(f: &Flow<F>, kind: u32, reason: u32, backend: (F::Addr, u16), svc_id: u32, now: u64) {
    emit_tuple::<F>((f.saddr, f.daddr, f.sport, f.dport, f.proto), kind, reason, backend, svc_id, now);
}

/// [`emit`] for a flow given by its tuple: source, destination, ports, protocol.
#[inline(always)]
pub fn emit_tuple<F: Family>(
    (saddr, daddr, sport, dport, proto): (F::Addr, F::Addr, u16, u16, u8),
    kind: u32,
    reason: u32,
    backend: (F::Addr, u16),
    svc_id: u32,
    now: u64,
) {
    if !events_on() || !allowed(now) {
        return;
    }
    F::output_event((saddr, daddr, sport, dport, proto), kind, reason, backend, svc_id, now, (0, [0; 16]));
}

/// Sends an IPv4 flow or socket event ([`LbEvent`]).
#[inline(always)]
pub fn output4(
    (saddr, daddr, sport, dport, proto): (u32, u32, u16, u16, u8),
    kind: u32,
    reason: u32,
    backend: (u32, u16),
    svc_id: u32,
    now: u64,
    (pid, comm): (u32, [u8; 16]),
) {
    let e = LbEvent {
        kind,
        reason,
        saddr,
        daddr,
        sport,
        dport,
        proto,
        _pad: [0; 3],
        backend_addr: backend.0,
        backend_port: backend.1,
        _pad2: 0,
        svc_id,
        pid,
        ts_ns: now,
        comm,
    };
    let _ = LB_EVENTS.output::<LbEvent>(&e, 0);
}

/// Sends an IPv6 flow or socket event ([`LbEvent6`], its kind flagged `EVENT_IPV6`), written in place in
/// the ring buffer (104 bytes: no stack copy).
#[inline(always)]
pub fn output6(
    (saddr, daddr, sport, dport, proto): ([u32; 4], [u32; 4], u16, u16, u8),
    kind: u32,
    reason: u32,
    backend: ([u32; 4], u16),
    svc_id: u32,
    now: u64,
    (pid, comm): (u32, [u8; 16]),
) {
    let Some(mut entry) = LB_EVENTS.reserve::<LbEvent6>(0) else { return };
    entry.write(LbEvent6 {
        kind: kind | EVENT_IPV6,
        reason,
        saddr,
        daddr,
        sport,
        dport,
        proto,
        backend_addr: backend.0,
        backend_port: backend.1,
        svc_id,
        pid,
        comm,
        ts_ns: now,
        ..LbEvent6::default()
    });
    entry.submit(0);
}

/// Sends a socket event (`EVENT_SOCK`, `reason` the counter of the hook or of the refusal) about
/// a socket of the current process asking for `vip` of `proto` (`backend` the one it was given),
/// if events are on and the rate allows; with the process where the kernel gives it. The family's
/// record, as flow events (no client: its address is not known at the socket).
#[inline(always)]
pub fn emit_sock<F: Family>(
    reason: u32,
    vip: (F::Addr, u16),
    proto: u8,
    backend: (F::Addr, u16),
    svc_id: u32,
    now: u64,
) {
    if !events_on() || !allowed(now) {
        return;
    }
    let t = (F::Addr::ZERO, vip.0, 0, vip.1, proto);
    F::output_event(t, EVENT_SOCK, reason, backend, svc_id, now, process());
}

/// The calling process's id (the thread group's: the process, as `ps` shows it) and command
/// name, where the kernel gives cgroup programs them; else nothing.
#[inline(always)]
fn process() -> (u32, [u8; 16]) {
    if config::sock_process() {
        ((bpf_get_current_pid_tgid() >> 32) as u32, bpf_get_current_comm().unwrap_or_default())
    } else {
        (0, [0; 16])
    }
}
