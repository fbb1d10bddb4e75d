//! Socket-level load balancing (cgroup v2 `connect4`/`connect6`, `sendmsg4`/`sendmsg6`,
//! `recvmsg4`/`recvmsg6`, `getpeername4`/`getpeername6`): a socket that asks for a Service
//! address is given a backend's before any packet exists, so processes on the node (and
//! hostNetwork pods), whose packets never pass a pod's interface, reach Services, and their flows
//! need no per-packet translation. The choice is the packet path's: the same frontends (as a pod
//! on this node sees them: `internalTrafficPolicy`, and all endpoints for this node's external
//! addresses, kube-proxy's exception for local traffic), the same Maglev tables and members, the
//! same session affinity rules.
//!
//! Written once over the address family ([`SockFamily`]: where the context holds the address, and
//! the family's socket maps): [`V4`] through `user_ip4` and `LB4_SOCK_*`, [`V6`] through
//! `user_ip6` and `LB6_SOCK_*`. An IPv6 socket that asks for an IPv4-mapped address
//! (`::ffff:a.b.c.d`) goes through the IPv4 path: its connections are IPv4 on the wire, so the
//! IPv4 frontends and `LB4_SOCK_*` serve it, and the address it is given is mapped back. (Its
//! unconnected UDP datagrams reach the `sendmsg4` hook, as the kernel sends them through IPv4's
//! `udp_sendmsg`; its replies and `getpeername` reach the IPv6 hooks, mapped.)
//!
//! What a socket is translated to is recorded by its cookie (`LB4_SOCK_REV`, `LB6_SOCK_REV`), so
//! that the datagrams it receives from the backend, and `getpeername`, read as coming from the
//! Service.

use core::ptr;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use lb_common::{
    counters, hash::lb4_flow_hash, mapped6, v4_mapped, Lb4Affinity, Lb4Service, Lb4SockFwd, Lb4SockFwdKey,
    Lb4SockRev, Lb4SockRevKey, Lb6SockFwd, Lb6SockFwdKey, Lb6SockRev, Lb6SockRevKey, LbSockAffinityKey,
    IPPROTO_TCP, IPPROTO_UDP, MEMBER_DRAINING, SOCK_SCOPE_ALL, SOCK_SCOPE_NETNS, SVC_FLAG_EXTERNAL,
};

use crate::{
    config, conntrack,
    family::{Address, Backend, Family, V4, V6},
    lb::{self, Origin},
    maps::{LB4_SOCK_AFFINITY, LB4_SOCK_FWD, LB4_SOCK_REV, LB6_SOCK_FWD, LB6_SOCK_REV},
    monitor,
    stats::{count, svc_update},
};

/// What a cgroup socket program returns to let the call go on.
const PROCEED: i32 = 1;
/// What it returns to refuse the call (EPERM, or the error `bpf_set_retval` set).
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `sk_state` of a connected UDP socket.
const TCP_ESTABLISHED: u32 = 1;

/// A Service address a socket asked for, and the backend it was given instead.
#[derive(Clone, Copy)]
pub struct Translation<A> {
    pub vip: A,
    pub vport: u16,
    pub svc_id: u32,
    pub backend_id: u32,
    pub addr: A,
    pub port: u16,
}

/// What socket-level load balancing needs of an address family beyond [`Family`]: the family's
/// socket maps (their keys have explicit padding, so each family has its own types) and the hash
/// a socket is placed with.
pub trait SockFamily: Family {
    /// The backend `LB*_SOCK_FWD` holds for socket `cookie` at Service address `vip`:
    /// (backend id, address, port).
    fn fwd_get(cookie: u64, vip: Self::Addr, vport: u16, proto: u8) -> Option<(u32, Self::Addr, u16)>;
    fn fwd_set(cookie: u64, proto: u8, t: &Translation<Self::Addr>);
    fn fwd_remove(cookie: u64, vip: Self::Addr, vport: u16, proto: u8);
    /// The translation `LB*_SOCK_REV` holds for socket `cookie` sent to backend `addr:port`.
    fn rev_get(cookie: u64, addr: Self::Addr, port: u16) -> Option<Translation<Self::Addr>>;
    /// Records `t` for socket `cookie`, unless it is recorded so already (an entry the LRU
    /// evicted, or one of another Service with the same backend, is written again); `fresh`: the
    /// socket has no entry to compare with (a TCP socket's connect), so it is written at once.
    fn rev_set(cookie: u64, t: &Translation<Self::Addr>, fresh: bool);
    fn rev_remove(cookie: u64, addr: Self::Addr, port: u16);
    /// Where in the frontend's Maglev table socket `cookie` is placed for `vip:vport`.
    fn sock_hash(cookie: u64, vip: Self::Addr, vport: u16, proto: u8) -> u32;
}

impl SockFamily for V4 {
    #[inline(always)]
    fn fwd_get(cookie: u64, vip: u32, vport: u16, proto: u8) -> Option<(u32, u32, u16)> {
        let key = Lb4SockFwdKey { cookie, vip, vport, proto, _pad: 0 };
        // SAFETY: the value is copied out at once.
        unsafe { LB4_SOCK_FWD.get(&key) }.map(|e| (e.backend_id, e.addr, e.port))
    }
    #[inline(always)]
    fn fwd_set(cookie: u64, proto: u8, t: &Translation<u32>) {
        let key = Lb4SockFwdKey { cookie, vip: t.vip, vport: t.vport, proto, _pad: 0 };
        let fwd = Lb4SockFwd { backend_id: t.backend_id, addr: t.addr, port: t.port, _pad: 0 };
        let _ = LB4_SOCK_FWD.insert(&key, &fwd, 0);
    }
    #[inline(always)]
    fn fwd_remove(cookie: u64, vip: u32, vport: u16, proto: u8) {
        let _ = LB4_SOCK_FWD.remove(&Lb4SockFwdKey { cookie, vip, vport, proto, _pad: 0 });
    }
    #[inline(always)]
    fn rev_get(cookie: u64, addr: u32, port: u16) -> Option<Translation<u32>> {
        let key = Lb4SockRevKey { cookie, addr, port, _pad: 0 };
        // SAFETY: the value is copied out at once.
        unsafe { LB4_SOCK_REV.get(&key) }.map(|r| Translation {
            vip: r.vip,
            vport: r.vport,
            svc_id: r.svc_id,
            backend_id: r.backend_id,
            addr,
            port,
        })
    }
    #[inline(always)]
    fn rev_set(cookie: u64, t: &Translation<u32>, fresh: bool) {
        let key = Lb4SockRevKey { cookie, addr: t.addr, port: t.port, _pad: 0 };
        let rev =
            Lb4SockRev { vip: t.vip, vport: t.vport, _pad: 0, svc_id: t.svc_id, backend_id: t.backend_id };
        // SAFETY: the value is copied out at once.
        if fresh || unsafe { LB4_SOCK_REV.get(&key) }.copied() != Some(rev) {
            let _ = LB4_SOCK_REV.insert(&key, &rev, 0);
        }
    }
    #[inline(always)]
    fn rev_remove(cookie: u64, addr: u32, port: u16) {
        let _ = LB4_SOCK_REV.remove(&Lb4SockRevKey { cookie, addr, port, _pad: 0 });
    }
    #[inline(always)]
    fn sock_hash(cookie: u64, vip: u32, vport: u16, proto: u8) -> u32 {
        lb4_flow_hash(cookie as u32, vip, (cookie >> 32) as u16, vport, proto, config::flow_hash_seed())
    }
}

impl SockFamily for V6 {
    #[inline(always)]
    fn fwd_get(cookie: u64, vip: [u32; 4], vport: u16, proto: u8) -> Option<(u32, [u32; 4], u16)> {
        let key = Lb6SockFwdKey { cookie, vip, vport, proto, _pad: [0; 5] };
        // SAFETY: the value is copied out at once.
        unsafe { LB6_SOCK_FWD.get(&key) }.map(|e| (e.backend_id, e.addr, e.port))
    }
    #[inline(always)]
    fn fwd_set(cookie: u64, proto: u8, t: &Translation<[u32; 4]>) {
        let key = Lb6SockFwdKey { cookie, vip: t.vip, vport: t.vport, proto, _pad: [0; 5] };
        let fwd = Lb6SockFwd { backend_id: t.backend_id, addr: t.addr, port: t.port, _pad: 0 };
        let _ = LB6_SOCK_FWD.insert(&key, &fwd, 0);
    }
    #[inline(always)]
    fn fwd_remove(cookie: u64, vip: [u32; 4], vport: u16, proto: u8) {
        let _ = LB6_SOCK_FWD.remove(&Lb6SockFwdKey { cookie, vip, vport, proto, _pad: [0; 5] });
    }
    #[inline(always)]
    fn rev_get(cookie: u64, addr: [u32; 4], port: u16) -> Option<Translation<[u32; 4]>> {
        let key = Lb6SockRevKey { cookie, addr, port, _pad: [0; 3] };
        // SAFETY: the value is copied out at once.
        unsafe { LB6_SOCK_REV.get(&key) }.map(|r| Translation {
            vip: r.vip,
            vport: r.vport,
            svc_id: r.svc_id,
            backend_id: r.backend_id,
            addr,
            port,
        })
    }
    #[inline(always)]
    fn rev_set(cookie: u64, t: &Translation<[u32; 4]>, fresh: bool) {
        let key = Lb6SockRevKey { cookie, addr: t.addr, port: t.port, _pad: [0; 3] };
        let rev =
            Lb6SockRev { vip: t.vip, vport: t.vport, _pad: 0, svc_id: t.svc_id, backend_id: t.backend_id };
        // SAFETY: the value is copied out at once.
        if fresh || unsafe { LB6_SOCK_REV.get(&key) }.copied() != Some(rev) {
            let _ = LB6_SOCK_REV.insert(&key, &rev, 0);
        }
    }
    #[inline(always)]
    fn rev_remove(cookie: u64, addr: [u32; 4], port: u16) {
        let _ = LB6_SOCK_REV.remove(&Lb6SockRevKey { cookie, addr, port, _pad: [0; 3] });
    }
    #[inline(always)]
    fn sock_hash(cookie: u64, vip: [u32; 4], vport: u16, proto: u8) -> u32 {
        let c = [cookie as u32, (cookie >> 32) as u32, 0, 0];
        V6::flow_hash(c, vip, 0, vport, proto, config::flow_hash_seed())
    }
}

/// The IPv6 address a `sock_addr` context holds (`user_ip6`), read 4 bytes at a time (the only
/// size the verifier allows there).
#[inline(always)]
fn user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: a valid context; `user_ip6` is readable in every `sock_addr` program, in 4-byte
    // loads.
    unsafe {
        let p = ptr::addr_of!((*sa).user_ip6).cast::<u32>();
        [
            ptr::read_volatile(p),
            ptr::read_volatile(p.add(1)),
            ptr::read_volatile(p.add(2)),
            ptr::read_volatile(p.add(3)),
        ]
    }
}

/// Writes `addr` and `port` into the context's `user_ip6` and `user_port`, 4 bytes at a time.
/// Writable in `connect6`, `sendmsg6`, `recvmsg6` and `getpeername6`.
#[inline(always)]
fn set_user6(sa: *mut bpf_sock_addr, addr: [u32; 4], port: u16) {
    // SAFETY: as in `user_ip6`; stores of 4 bytes, the size the verifier allows.
    unsafe {
        let p = ptr::addr_of_mut!((*sa).user_ip6).cast::<u32>();
        ptr::write_volatile(p, addr[0]);
        ptr::write_volatile(p.add(1), addr[1]);
        ptr::write_volatile(p.add(2), addr[2]);
        ptr::write_volatile(p.add(3), addr[3]);
        ptr::write_volatile(ptr::addr_of_mut!((*sa).user_port), u32::from(port));
    }
}

/// Writes `addr` and `port` into the context's `user_ip4` and `user_port`. Writable in `connect4`,
/// `sendmsg4`, `recvmsg4` and `getpeername4`.
#[inline(always)]
fn set_user4(sa: *mut bpf_sock_addr, addr: u32, port: u16) {
    // SAFETY: a valid context; both fields writable in these hooks.
    unsafe {
        (*sa).user_ip4 = addr;
        (*sa).user_port = u32::from(port);
    }
}

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
fn affinity_backend<F: Family>(
    svc: &Lb4Service,
    key: &LbSockAffinityKey,
    proto: u8,
    now: u64,
) -> Option<(u32, Backend<F::Addr>)> {
    // SAFETY: the value is copied out at once.
    let a = unsafe { LB4_SOCK_AFFINITY.get(key) }.copied()?;
    lb::affinity_honoured::<F>(svc, &a, proto, now)
}

/// What `connect` or `sendmsg` to a Service address becomes.
enum Outcome<A> {
    /// Not a Service address (or not this socket's to translate): the call goes on untouched.
    Untouched,
    /// Sent to this backend instead.
    To(A, u16),
    /// Refused (counted).
    Refused,
}

impl<A> Outcome<A> {
    /// The call's verdict, with the backend written into the context by `write` when there is one.
    #[inline(always)]
    fn apply(self, write: impl FnOnce((A, u16))) -> i32 {
        match self {
            Self::Untouched => PROCEED,
            Self::To(a, p) => {
                write((a, p));
                PROCEED
            }
            Self::Refused => REFUSE,
        }
    }
}

/// `connect` and `sendmsg` of family `F` to `addr:port` over `proto`: a socket sending to a
/// Service address is given a backend (counted as `counter`); to a Service without endpoints,
/// refused.
#[inline(always)]
fn forward<F: SockFamily>(
    ctx: &SockAddrContext,
    addr: F::Addr,
    port: u16,
    proto: u8,
    counter: u32,
) -> Outcome<F::Addr> {
    let Some(svc) = lb::frontend_at::<F>(addr, port, proto, Origin::Pod) else { return Outcome::Untouched };
    if !in_scope(ctx) {
        return Outcome::Untouched;
    }
    if svc.flags & SVC_FLAG_EXTERNAL != 0 && !F::source_allowed(addr, port, proto, F::Addr::ZERO) {
        // `loadBalancerSourceRanges` that do not admit every source: the socket's own address is
        // not known yet, so the packets go their way (to the load balancer, and back in through a
        // node interface, where the ranges are checked against this node's address; over IPv6
        // the node-side programs translate nothing yet, so such an address is not reached).
        return Outcome::Untouched;
    }
    // SAFETY: a valid context; no other preconditions.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // This UDP socket's earlier choice for this address, while its backend is still a member
    // there (the same address and port: an id freed and given to another endpoint is another
    // backend) that is not draining (a terminating endpoint that still serves keeps its flows):
    // each datagram of unconnected UDP stays with the backend the first went to, as a flow with
    // its conntrack entry on the packet path, even once the Service has no ready endpoint left.
    // A TCP socket has no such entry: the kernel runs its connect hook only while it is
    // unconnected (once a connection, and again only after a connect that failed, when a new
    // choice is as good: by the same hash, the same backend while the table stands), so a
    // connection costs one map write, not two, and one removal.
    let tcp = proto == IPPROTO_TCP;
    let earlier = if tcp { None } else { F::fwd_get(cookie, addr, port, proto) };
    if let Some((backend_id, b_addr, b_port)) = earlier {
        let kept = conntrack::member::<F>(svc.id, backend_id)
            .filter(|m| m.addr == b_addr && m.port == b_port && m.state != MEMBER_DRAINING);
        if kept.is_some() {
            let t = Translation {
                vip: addr,
                vport: port,
                svc_id: svc.id,
                backend_id,
                addr: b_addr,
                port: b_port,
            };
            F::rev_set(cookie, &t, false);
            count(counter);
            return Outcome::To(b_addr, b_port);
        }
    }
    if svc.backend_count == 0 || svc.maglev_size == 0 {
        return refuse::<F>(svc.id, (addr, port), proto);
    }
    let now = lb::now_ns();
    let affinity = svc.affinity_timeout_secs != 0;
    let key = LbSockAffinityKey {
        // SAFETY: as above.
        netns: if affinity { unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } } else { 0 },
        svc_id: svc.id,
        _pad: 0,
    };
    let sticky = if affinity { affinity_backend::<F>(&svc, &key, proto, now) } else { None };
    // One socket, one backend while the table stands (so an unconnected socket's datagrams go on
    // to where its first went).
    let hash = F::sock_hash(cookie, addr, port, proto);
    let Some((id, backend)) = sticky.or_else(|| lb::maglev_pick::<F>(&svc, hash)) else {
        // The agent never publishes a table that points at a missing backend.
        return refuse::<F>(svc.id, (addr, port), proto);
    };
    if sticky.is_some() {
        count(counters::AFFINITY_HIT);
    }
    if affinity {
        let _ =
            LB4_SOCK_AFFINITY.insert(&key, &Lb4Affinity { last_used_ns: now, backend_id: id, _pad: 0 }, 0);
    }
    let t = Translation {
        vip: addr,
        vport: port,
        svc_id: svc.id,
        backend_id: id,
        addr: backend.addr,
        port: backend.port,
    };
    if !tcp {
        F::fwd_set(cookie, proto, &t);
    }
    F::rev_set(cookie, &t, tcp);
    count(counter);
    svc_update(svc.id, |s| s.new_flows += 1);
    monitor::emit_sock::<F>(counter, (addr, port), proto, (backend.addr, backend.port), svc.id, now);
    Outcome::To(backend.addr, backend.port)
}

/// Refuses a `connect` or `sendmsg` to frontend `svc_id` at `vip`, which has no endpoint for this
/// client.
#[inline(always)]
fn refuse<F: SockFamily>(svc_id: u32, vip: (F::Addr, u16), proto: u8) -> Outcome<F::Addr> {
    count(counters::SOCK_REFUSED);
    svc_update(svc_id, |s| s.drops += 1);
    monitor::emit_sock::<F>(counters::SOCK_REFUSED, vip, proto, (F::Addr::ZERO, 0), svc_id, lb::now_ns());
    if config::sock_set_retval() {
        // SAFETY: no preconditions; the verifier sees this call only where the kernel has it
        // (a read-only global).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    Outcome::Refused
}

/// The socket's protocol, if one lb translates.
#[inline(always)]
fn protocol(sa: *mut bpf_sock_addr) -> Option<u8> {
    // SAFETY: a valid context; `protocol` is readable in every `sock_addr` program.
    let proto = unsafe { (*sa).protocol } as u8;
    (proto == IPPROTO_TCP || proto == IPPROTO_UDP).then_some(proto)
}

/// Whether the socket of a `sendmsg4` call is connected (`sk_state` established) to `addr:port`
/// as an IPv4-mapped peer. An IPv6 UDP socket connected to an IPv4-mapped address reaches
/// `sendmsg4` with every datagram (the kernel hands it to IPv4's `udp_sendmsg` with the peer as
/// an explicit destination), where an IPv4 socket's connected sends never reach it: the peer
/// was translated, or deliberately not, at `connect`, and the socket's replies are matched
/// against it, so its datagrams are left as they are.
#[inline(always)]
fn connected_mapped(sa: *mut bpf_sock_addr, addr: u32, port: u16) -> bool {
    // SAFETY: a valid context; `sk` is a socket pointer the verifier knows (Linux 5.3), whose
    // state and destination are readable (the IPv6 address in 4-byte loads; the port as in
    // `sock_release`).
    unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        if sk.is_null() || ptr::read_volatile(ptr::addr_of!((*sk).state)) != TCP_ESTABLISHED {
            return false;
        }
        let dport = ptr::read_volatile(ptr::addr_of!((*sk).dst_port).cast::<u32>()) as u16;
        let p = ptr::addr_of!((*sk).dst_ip6).cast::<u32>();
        let d = [
            ptr::read_volatile(p),
            ptr::read_volatile(p.add(1)),
            ptr::read_volatile(p.add(2)),
            ptr::read_volatile(p.add(3)),
        ];
        dport == port && v4_mapped(d) == Some(addr)
    }
}

/// `connect4` and `sendmsg4`: a socket sending to a Service address is sent to a backend
/// instead (counted as `counter`); to a Service without endpoints, refused. Anything else goes on
/// untouched. IPv6 sockets reach these hooks too, for IPv4-mapped destinations (UDP's unconnected
/// `sendmsg`; a `connect` given a `sockaddr_in`): they are translated alike, and their replies and
/// `getpeername` read back through the IPv6 hooks, which find the same `LB4_SOCK_REV` entries;
/// but not the datagrams of one connected to that destination (see [`connected_mapped`]).
#[inline(always)]
pub fn sock4_forward(ctx: &SockAddrContext, counter: u32) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid context; these fields are readable in every `sock_addr`
    // program.
    let (family, addr, port) = unsafe { ((*sa).family, (*sa).user_ip4, (*sa).user_port as u16) };
    let Some(proto) = protocol(sa) else { return PROCEED };
    if family != AF_INET && family != AF_INET6 {
        return PROCEED;
    }
    if family == AF_INET6
        && proto == IPPROTO_UDP
        && counter == counters::SOCK_SENDMSG
        && connected_mapped(sa, addr, port)
    {
        return PROCEED;
    }
    forward::<V4>(ctx, addr, port, proto, counter).apply(|(a, p)| set_user4(sa, a, p))
}

/// `connect6` and `sendmsg6`: as [`sock4_forward`] for IPv6 Service addresses. With `MAPPED`
/// (`connect6`), an IPv4-mapped destination goes through the IPv4 path, and is given the mapped
/// address of its backend; `sendmsg6` never sees one (the kernel sends such datagrams through
/// IPv4's `sendmsg`, before the IPv6 hook), so its program leaves that path out. Only an address
/// given as a `sockaddr_in6` is read (a `sockaddr_in` long enough for `connect6` holds none).
#[inline(always)]
pub fn sock6_forward<const MAPPED: bool>(ctx: &SockAddrContext, counter: u32) -> i32 {
    let sa = ctx.sock_addr;
    let Some(proto) = protocol(sa) else { return PROCEED };
    // SAFETY: as in `sock4_forward`.
    if unsafe { (*sa).user_family } != AF_INET6 {
        return PROCEED;
    }
    let addr = user_ip6(sa);
    // SAFETY: as in `sock4_forward`.
    let port = unsafe { (*sa).user_port } as u16;
    let mapped = if MAPPED { v4_mapped(addr) } else { None };
    if let Some(v4) = mapped {
        return forward::<V4>(ctx, v4, port, proto, counter).apply(|(a, p)| set_user6(sa, mapped6(a), p));
    }
    forward::<V6>(ctx, addr, port, proto, counter).apply(|(a, p)| set_user6(sa, a, p))
}

/// `recvmsg4` and `getpeername4`: a backend this socket was sent to reads as the Service address
/// it asked for (counted as `counter`).
#[inline(always)]
pub fn sock4_reverse(ctx: &SockAddrContext, counter: u32) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `sock4_forward`.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    // SAFETY: a valid context; no other preconditions.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(t) = V4::rev_get(cookie, addr, port) {
        set_user4(sa, t.vip, t.vport);
        count(counter);
    }
    PROCEED
}

/// `recvmsg6` and `getpeername6`: as [`sock4_reverse`]; an IPv4-mapped peer is looked up as the
/// IPv4 path recorded it, and reads as the mapped Service address.
#[inline(always)]
pub fn sock6_reverse(ctx: &SockAddrContext, counter: u32) -> i32 {
    let sa = ctx.sock_addr;
    let addr = user_ip6(sa);
    // SAFETY: as in `sock4_forward`.
    let port = unsafe { (*sa).user_port } as u16;
    // SAFETY: a valid context; no other preconditions.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let vip = match v4_mapped(addr) {
        Some(v4) => V4::rev_get(cookie, v4, port).map(|t| (mapped6(t.vip), t.vport)),
        None => V6::rev_get(cookie, addr, port).map(|t| (t.vip, t.vport)),
    };
    if let Some((vip, vport)) = vip {
        set_user6(sa, vip, vport);
        count(counter);
    }
    PROCEED
}

/// Drops the entries of socket `cookie`, connected to backend `addr:port`, of family `F`; whether
/// it had any.
#[inline(always)]
fn release<F: SockFamily>(cookie: u64, addr: F::Addr, port: u16, proto: u8) -> bool {
    let Some(t) = F::rev_get(cookie, addr, port) else { return false };
    if proto != IPPROTO_TCP {
        F::fwd_remove(cookie, t.vip, t.vport, proto);
    }
    F::rev_remove(cookie, addr, port);
    true
}

/// `sock_release`: a closing socket that the socket programs sent to a backend takes its entries
/// along (`LB*_SOCK_REV` for the backend it is connected to, and `LB*_SOCK_FWD` for the Service
/// address it asked for), so that the LRU maps hold live sockets, not closed ones. An unconnected
/// socket names no peer here: its entries are left to the LRU. One program for both families: an
/// IPv6 socket connected to an IPv4-mapped address has IPv4 entries.
#[inline(always)]
pub fn sock_release(ctx: &SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: the kernel hands a valid context, whose family, protocol and destination are
    // readable in `sock_release` (the IPv6 address in 4-byte loads). The port is read as the 4
    // bytes every kernel accepts there (before 6.0 the field was a `u32`; since, a 16-bit field
    // and 16 bits of zeroes): the port in network order in the low half.
    let (family, proto, dport) = unsafe {
        (
            (*sk).family,
            (*sk).protocol as u8,
            ptr::read_volatile(ptr::addr_of!((*sk).dst_port).cast::<u32>()) as u16,
        )
    };
    if (family != AF_INET && family != AF_INET6) || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return PROCEED;
    }
    let v6 = family == AF_INET6;
    // SAFETY: as above.
    let (d4, d6) = unsafe {
        if v6 {
            let p = ptr::addr_of!((*sk).dst_ip6).cast::<u32>();
            let a = [
                ptr::read_volatile(p),
                ptr::read_volatile(p.add(1)),
                ptr::read_volatile(p.add(2)),
                ptr::read_volatile(p.add(3)),
            ];
            (v4_mapped(a).unwrap_or(0), a)
        } else {
            ((*sk).dst_ip4, [0; 4])
        }
    };
    let pure6 = v6 && v4_mapped(d6).is_none();
    if (pure6 && d6 == [0; 4]) || (!pure6 && d4 == 0) {
        return PROCEED;
    }
    // Only sockets the programs could have translated: no cookie is made for the others.
    if !in_scope(ctx) {
        return PROCEED;
    }
    // SAFETY: a valid context; no other preconditions.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let released =
        if pure6 { release::<V6>(cookie, d6, dport, proto) } else { release::<V4>(cookie, d4, dport, proto) };
    if released {
        count(counters::SOCK_RELEASED);
    }
    PROCEED
}
