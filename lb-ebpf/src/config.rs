//! Load-time settings (`lb_common::globals`), patched by the agent through
//! `EbpfLoader::override_global`. The defaults below apply when nothing is patched.

use aya_ebpf::Global;
use lb_common::{
    addr6, default_timeouts as d, hash::DEFAULT_FLOW_HASH_SEED, DEFAULT_HAIRPIN_ADDR, DEFAULT_HAIRPIN_ADDR6,
    DEFAULT_SNAT_PORTS, IPPROTO_UDP,
};

const NS: u64 = 1_000_000_000;

#[unsafe(no_mangle)]
static CT_TIMEOUT_TCP_SYN_NS: Global<u64> = Global::new(d::TCP_SYN_SECS * NS);
#[unsafe(no_mangle)]
static CT_TIMEOUT_TCP_EST_NS: Global<u64> = Global::new(d::TCP_ESTABLISHED_SECS * NS);
#[unsafe(no_mangle)]
static CT_TIMEOUT_TCP_CLOSE_NS: Global<u64> = Global::new(d::TCP_CLOSE_SECS * NS);
#[unsafe(no_mangle)]
static CT_TIMEOUT_UDP_NS: Global<u64> = Global::new(d::UDP_SECS * NS);
#[unsafe(no_mangle)]
static FLOW_HASH_SEED: Global<u32> = Global::new(DEFAULT_FLOW_HASH_SEED);
#[unsafe(no_mangle)]
static HAIRPIN_ADDR: Global<u32> = Global::new(u32::from_ne_bytes(DEFAULT_HAIRPIN_ADDR));
#[unsafe(no_mangle)]
static HAIRPIN_ADDR6: Global<[u32; 4]> = Global::new(addr6(DEFAULT_HAIRPIN_ADDR6));
#[unsafe(no_mangle)]
static SNAT_PORT_MIN: Global<u32> = Global::new(DEFAULT_SNAT_PORTS.0 as u32);
#[unsafe(no_mangle)]
static SNAT_PORT_MAX: Global<u32> = Global::new(DEFAULT_SNAT_PORTS.1 as u32);
#[unsafe(no_mangle)]
static SNAT_REPLY_MIN: Global<u32> = Global::new(DEFAULT_SNAT_PORTS.0 as u32);
#[unsafe(no_mangle)]
static SNAT_REPLY_MAX: Global<u32> = Global::new(DEFAULT_SNAT_PORTS.1 as u32);
#[unsafe(no_mangle)]
static KTIME_COARSE: Global<u32> = Global::new(1);
#[unsafe(no_mangle)]
static SOCK_SCOPE: Global<u32> = Global::new(lb_common::SOCK_SCOPE_INIT_NETNS);
#[unsafe(no_mangle)]
static SOCK_NETNS_COOKIE: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static SOCK_SET_RETVAL: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SOCK_PROCESS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static XDP_META: Global<u32> = Global::new(0);

/// How long a flow in `state` may stay idle before a new packet starts a new flow.
#[inline(always)]
pub fn ct_timeout_ns(proto: u8, state: u8) -> u64 {
    if proto == IPPROTO_UDP {
        return CT_TIMEOUT_UDP_NS.load();
    }
    match state {
        lb_common::CT_STATE_SYN => CT_TIMEOUT_TCP_SYN_NS.load(),
        lb_common::CT_STATE_ESTABLISHED => CT_TIMEOUT_TCP_EST_NS.load(),
        _ => CT_TIMEOUT_TCP_CLOSE_NS.load(),
    }
}

#[inline(always)]
pub fn flow_hash_seed() -> u32 {
    FLOW_HASH_SEED.load()
}

/// Source address of hairpinned flows, network byte order.
#[inline(always)]
pub fn hairpin_addr() -> u32 {
    HAIRPIN_ADDR.load()
}

/// Source address of hairpinned IPv6 flows, network byte order.
#[inline(always)]
pub fn hairpin_addr6() -> [u32; 4] {
    // Word by word: a volatile 16-byte load is a memcpy that LLVM's BPF backend fails to expand.
    let p = core::ptr::addr_of!(HAIRPIN_ADDR6).cast::<u32>();
    // SAFETY: `Global<[u32; 4]>` is the array itself (a transparent wrapper), four aligned words.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

/// The source ports given to flows whose tuple clashed: first and last, host order.
#[inline(always)]
pub fn snat_ports() -> (u32, u32) {
    (SNAT_PORT_MIN.load(), SNAT_PORT_MAX.load())
}

/// The ports replies of flows SNATed to this node's address may come back to: first and last,
/// host order (see `lb_common::globals::SNAT_REPLY_MIN`).
#[inline(always)]
pub fn snat_reply_ports() -> (u32, u32) {
    (SNAT_REPLY_MIN.load(), SNAT_REPLY_MAX.load())
}

/// Whether the kernel has `bpf_ktime_get_coarse_ns` (see `lb_common::globals::KTIME_COARSE`).
#[inline(always)]
pub fn ktime_coarse() -> bool {
    KTIME_COARSE.load() != 0
}

/// Which sockets the socket programs translate (`lb_common::SOCK_SCOPE_*`).
#[inline(always)]
pub fn sock_scope() -> u32 {
    SOCK_SCOPE.load()
}

/// The network namespace whose sockets are translated, with `SOCK_SCOPE_NETNS`.
#[inline(always)]
pub fn sock_netns_cookie() -> u64 {
    SOCK_NETNS_COOKIE.load()
}

/// Whether the kernel has `bpf_set_retval` for cgroup programs (see
/// `lb_common::globals::SOCK_SET_RETVAL`).
#[inline(always)]
pub fn sock_set_retval() -> bool {
    SOCK_SET_RETVAL.load() != 0
}

/// Whether cgroup socket programs may ask for the current process (see
/// `lb_common::globals::SOCK_PROCESS`).
#[inline(always)]
pub fn sock_process() -> bool {
    SOCK_PROCESS.load() != 0
}

/// Whether XDP programs may leave metadata in front of a packet (see
/// `lb_common::globals::XDP_META`).
#[inline(always)]
pub fn xdp_meta() -> bool {
    XDP_META.load() != 0
}
