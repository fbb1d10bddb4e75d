//! Socket-level load balancing (cgroup v2 `connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`):
//! a socket that asks for a Service address is given a backend's before any packet exists, so
//! processes on the node (and hostNetwork pods), whose packets never pass a pod's interface, reach
//! Services, and their flows need no per-packet translation. The choice is the packet path's: the
//! same frontends (as a pod on this node sees them: `internalTrafficPolicy`, and all endpoints for
//! this node's external addresses, kube-proxy's exception for local traffic), the same Maglev
//! tables and members, the same session affinity rules.
//!
//! IPv4 only (the `LB4_SOCK_*` maps and `user_ip4`), over the [`V4`] family's selection; IPv6
//! (`connect6`, ...) would be the same steps over `V6` with `user_ip6` and its own socket maps.
//!
//! What a socket is translated to is recorded by its cookie (`LB4_SOCK_REV`), so that the
//! datagrams it receives from the backend, and `getpeername`, read as coming from the Service.

use core::ptr;

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use lb_common::{
    counters, hash::lb4_flow_hash, Lb4Affinity, Lb4Service, Lb4SockFwd, Lb4SockFwdKey, Lb4SockRev,
    Lb4SockRevKey, LbSockAffinityKey, IPPROTO_TCP, IPPROTO_UDP, MEMBER_ACTIVE, MEMBER_DRAINING,
    SOCK_SCOPE_ALL, SOCK_SCOPE_NETNS, SVC_FLAG_EXTERNAL,
};

use crate::{
    config, conntrack,
    family::{Backend, Family, V4},
    lb::{self, Origin},
    maps::{LB4_SOCK_AFFINITY, LB4_SOCK_FWD, LB4_SOCK_REV},
    monitor,
    stats::{count, svc_update},
};

/// What a cgroup socket program returns to let the call go on.
const PROCEED: i32 = 1;
/// What it returns to refuse the call (EPERM, or the error `bpf_set_retval` set).
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;
const AF_INET: u32 = 2;

/// Whether the socket of `ctx` (a `sock_addr` or a `sock` context) is one lb translates
/// (`--socket-lb`): every socket, or those of one network namespace (the agent's; or, where the
/// kernel cannot tell the agent its own, the initial one).
#[inline(always)]
fn in_scope(ctx: &impl EbpfContext) -> bool {
    let scope = config::sock_scope();
    if scope == SOCK_SCOPE_ALL {
        return true;
    }
    // SAFETY: a valid context; no other preconditions.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if scope == SOCK_SCOPE_NETNS {
        return netns == config::sock_netns_cookie();
    }
    // SAFETY: a null context asks for the initial namespace's cookie.
    netns == unsafe { bpf_get_netns_cookie(ptr::null_mut()) }
}

/// The backend this namespace's sockets were given recently, if still an active member.
#[inline(always)]
fn affinity_backend(
    svc: &Lb4Service,
    key: &LbSockAffinityKey,
    proto: u8,
    now: u64,
) -> Option<(u32, Backend<u32>)> {
    // SAFETY: the value is copied out at once.
    let a = unsafe { LB4_SOCK_AFFINITY.get(key) }.copied()?;
    lb::affinity_honoured::<V4>(svc, &a, proto, now)
}

/// `connect4` and `sendmsg4`: a socket sending to a Service address is sent to a backend
/// instead (counted as `counter`); to a Service without endpoints, refused. Anything else goes on
/// untouched.
#[inline(always)]
pub fn sock4_forward(ctx: &SockAddrContext, counter: u32) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid context; these fields are readable in every
    // `sock_addr` program.
    let (family, proto, addr, port) =
        unsafe { ((*sa).family, (*sa).protocol as u8, (*sa).user_ip4, (*sa).user_port as u16) };
    // An IPv6 socket sending to an IPv4-mapped address reaches the IPv4 hooks too (UDP's
    // `sendmsg`), but reads its replies through the IPv6 ones, which lb has not yet: left alone
    // whole, rather than sent to a backend whose replies it would not recognise.
    if family != AF_INET || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return PROCEED;
    }
    let Some(svc) = lb::frontend_at::<V4>(addr, port, proto, Origin::Pod) else { return PROCEED };
    if !in_scope(ctx) {
        return PROCEED;
    }
    if svc.flags & SVC_FLAG_EXTERNAL != 0 && !V4::source_allowed(addr, port, proto, 0) {
        // `loadBalancerSourceRanges` that do not admit every source: the socket's own address is
        // not known yet, so the packets go their way (to the load balancer, and back in through a
        // node interface, where the ranges are checked against this node's address).
        return PROCEED;
    }
    // SAFETY: a valid context; no other preconditions.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // This socket's earlier choice for this address, while its backend is still a member there
    // (the same address and port: an id freed and given to another endpoint is another backend)
    // that is not draining (a terminating endpoint that still serves keeps its flows; a TCP
    // connect, a new connection, only to an active one): each datagram of unconnected UDP stays
    // with the backend the first went to, as a flow with its conntrack entry on the packet path,
    // even once the Service has no ready endpoint left.
    let fwd_key = Lb4SockFwdKey { cookie, vip: addr, vport: port, proto, _pad: 0 };
    // SAFETY: the value is copied out at once.
    if let Some(e) = unsafe { LB4_SOCK_FWD.get(&fwd_key) }.copied() {
        let kept = conntrack::member::<V4>(svc.id, e.backend_id).filter(|m| {
            m.addr == e.addr
                && m.port == e.port
                && m.state != MEMBER_DRAINING
                && (proto != IPPROTO_TCP || m.state == MEMBER_ACTIVE)
        });
        if kept.is_some() {
            remember_reverse(cookie, (e.addr, e.port), (addr, port), svc.id, e.backend_id);
            // SAFETY: as below.
            unsafe {
                (*sa).user_ip4 = e.addr;
                (*sa).user_port = u32::from(e.port);
            }
            count(counter);
            return PROCEED;
        }
    }
    if svc.backend_count == 0 || svc.maglev_size == 0 {
        return refuse(svc.id, (addr, port), proto);
    }
    let now = lb::now_ns();
    let affinity = svc.affinity_timeout_secs != 0;
    let key = LbSockAffinityKey {
        // SAFETY: as above.
        netns: if affinity { unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } } else { 0 },
        svc_id: svc.id,
        _pad: 0,
    };
    let sticky = if affinity { affinity_backend(&svc, &key, proto, now) } else { None };
    // One socket, one backend while the table stands (so an unconnected socket's datagrams go on
    // to where its first went).
    let hash =
        lb4_flow_hash(cookie as u32, addr, (cookie >> 32) as u16, port, proto, config::flow_hash_seed());
    let Some((id, backend)) = sticky.or_else(|| lb::maglev_pick::<V4>(&svc, hash)) else {
        // The agent never publishes a table that points at a missing backend.
        return refuse(svc.id, (addr, port), proto);
    };
    if sticky.is_some() {
        count(counters::AFFINITY_HIT);
    }
    if affinity {
        let _ =
            LB4_SOCK_AFFINITY.insert(&key, &Lb4Affinity { last_used_ns: now, backend_id: id, _pad: 0 }, 0);
    }
    let fwd = Lb4SockFwd { backend_id: id, addr: backend.addr, port: backend.port, _pad: 0 };
    let _ = LB4_SOCK_FWD.insert(&fwd_key, &fwd, 0);
    remember_reverse(cookie, (backend.addr, backend.port), (addr, port), svc.id, id);
    // SAFETY: as above; both fields are writable in `connect4` and `sendmsg4`.
    unsafe {
        (*sa).user_ip4 = backend.addr;
        (*sa).user_port = u32::from(backend.port);
    }
    count(counter);
    svc_update(svc.id, |s| s.new_flows += 1);
    monitor::emit_sock(counter, (addr, port), proto, (backend.addr, backend.port), svc.id, now);
    PROCEED
}

/// Records that socket `cookie` was sent to `backend` (id `backend_id`) for Service address `vip`
/// of frontend `svc_id`, unless it is recorded so already (an entry the LRU evicted, or one of
/// another Service with the same backend, is written again).
#[inline(always)]
fn remember_reverse(cookie: u64, backend: (u32, u16), vip: (u32, u16), svc_id: u32, backend_id: u32) {
    let key = Lb4SockRevKey { cookie, addr: backend.0, port: backend.1, _pad: 0 };
    let rev = Lb4SockRev { vip: vip.0, vport: vip.1, _pad: 0, svc_id, backend_id };
    // SAFETY: the value is copied out at once.
    if unsafe { LB4_SOCK_REV.get(&key) }.copied() != Some(rev) {
        let _ = LB4_SOCK_REV.insert(&key, &rev, 0);
    }
}

/// Refuses a `connect` or `sendmsg` to frontend `svc_id` at `vip`, which has no endpoint for this
/// client.
#[inline(always)]
fn refuse(svc_id: u32, vip: (u32, u16), proto: u8) -> i32 {
    count(counters::SOCK_REFUSED);
    svc_update(svc_id, |s| s.drops += 1);
    monitor::emit_sock(counters::SOCK_REFUSED, vip, proto, (0, 0), svc_id, lb::now_ns());
    if config::sock_set_retval() {
        // SAFETY: no preconditions; the verifier sees this call only where the kernel has it
        // (a read-only global).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    REFUSE
}

/// `recvmsg4` and `getpeername4`: a backend this socket was sent to by `sock4_forward` reads as
/// the Service address it asked for (counted as `counter`).
#[inline(always)]
pub fn sock4_reverse(ctx: &SockAddrContext, counter: u32) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `sock4_forward`.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    // SAFETY: a valid context; no other preconditions.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = Lb4SockRevKey { cookie, addr, port, _pad: 0 };
    // SAFETY: the value is copied out at once.
    if let Some(r) = unsafe { LB4_SOCK_REV.get(&key) }.copied() {
        // SAFETY: as above; both fields are writable in `recvmsg4` and `getpeername4`.
        unsafe {
            (*sa).user_ip4 = r.vip;
            (*sa).user_port = u32::from(r.vport);
        }
        count(counter);
    }
    PROCEED
}

/// `sock_release`: a closing socket that the socket programs sent to a backend takes its entries
/// along (`LB4_SOCK_REV` for the backend it is connected to, and `LB4_SOCK_FWD` for the Service
/// address it asked for), so that the LRU maps hold live sockets, not closed ones. An unconnected
/// socket names no peer here: its entries are left to the LRU.
#[inline(always)]
pub fn sock4_release(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the kernel hands a valid context, whose family, protocol and destination are
    // readable in `sock_release`. The port is read as the 4 bytes every kernel accepts there
    // (before 6.0 the field was a `u32`; since, a 16-bit field and 16 bits of zeroes): the port in
    // network order in the low half.
    let (family, proto, daddr, dport) = unsafe {
        (
            (*sk).family,
            (*sk).protocol as u8,
            (*sk).dst_ip4,
            ptr::read_volatile(ptr::addr_of!((*sk).dst_port).cast::<u32>()) as u16,
        )
    };
    if family != AF_INET || daddr == 0 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return PROCEED;
    }
    // Only sockets the programs could have translated: no cookie is made for the others.
    if !in_scope(ctx) {
        return PROCEED;
    }
    // SAFETY: a valid context; no other preconditions.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = Lb4SockRevKey { cookie, addr: daddr, port: dport, _pad: 0 };
    // SAFETY: the value is copied out at once.
    let Some(r) = unsafe { LB4_SOCK_REV.get(&key) }.copied() else { return PROCEED };
    let _ = LB4_SOCK_FWD.remove(&Lb4SockFwdKey { cookie, vip: r.vip, vport: r.vport, proto, _pad: 0 });
    let _ = LB4_SOCK_REV.remove(&key);
    count(counters::SOCK_RELEASED);
    PROCEED
}
