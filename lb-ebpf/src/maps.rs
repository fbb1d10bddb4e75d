//! Every map of the datapath, with who writes it, who reads it, and why it has its shape.
//! Capacities here are the defaults from `lb_common::capacity`; the agent sets the real ones at
//! load time. All maps are pinned by name under the agent's `--pin-dir`, so they outlive the
//! agent and a restarted agent reuses them.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::{
    capacity, counters, formats, Lb4Affinity, Lb4AffinityKey, Lb4Backend, Lb4CtEntry, Lb4CtKey, Lb4FragKey,
    Lb4FragPorts, Lb4FrontendMeta, Lb4Interface, Lb4Member, Lb4MemberKey, Lb4Service, Lb4ServiceKey,
    Lb4SockFwd, Lb4SockFwdKey, Lb4SockRev, Lb4SockRevKey, Lb4SrcRange, Lb4SvcStats, Lb6AffinityKey,
    Lb6Backend, Lb6CtEntry, Lb6CtKey, Lb6FragKey, Lb6Member, Lb6MemberKey, Lb6ServiceKey, Lb6SockFwd,
    Lb6SockFwdKey, Lb6SockRev, Lb6SockRevKey, Lb6SrcRange, LbMonitorBucket, LbSockAffinityKey, LbTcFilter,
    LbTcFilterKey,
};

/// Frontends: VIP:port/protocol → service. Written by the agent only; read by the forward
/// programs on every IPv4 TCP/UDP packet. A plain hash: exact match on an 8-byte key, read-mostly.
/// Not preallocated (`BPF_F_NO_PREALLOC`, Cilium's default for its service maps too): its kernel
/// memory follows the frontends there are, not the capacity (6 MiB at the default capacity
/// preallocated; about 1 MiB for 10,000 frontends). The price: an agent update can fail for lack
/// of kernel memory, which the agent counts and retries like any failed write; the programs only
/// read it. The same holds for the agent-written hash maps below (but `LB6_VIPS`). Maps pinned by
/// an earlier version keep their preallocation until they are made anew. (A hash map may hand the
/// element an update replaced to the next update at once, preallocated or not since Linux 6.1,
/// so a CPU copying an entry while two updates land could read parts of both: a known gap, to be
/// closed by checking the table's choice against the member rows.)
#[map(name = "LB4_SERVICES")]
pub static LB4_SERVICES: HashMap<Lb4ServiceKey, Lb4Service> =
    HashMap::pinned(capacity::SERVICES, BPF_F_NO_PREALLOC);

/// The ports frontends and backends have (`lb_common::MAP_LB_PORTS`, two bitmaps). Written by
/// the agent only, a port before its first row, never cleared; read by the pod-side and node-side
/// programs before their first hash lookup, so that the packets of flows that are not lb's (the
/// half of a pod's traffic that goes the other way, a node's own) cost one array read. An array:
/// the verifier inlines its lookups.
#[map(name = "LB_PORTS")]
pub static LB_PORTS: Array<u64> = Array::pinned(lb_common::PORTS_WORDS, 0);

/// Backends by id. Written by the agent only; read by the forward programs (new flows, and to
/// check that a tracked flow's backend still exists). An array: ids are dense and allocated by
/// the agent, and an array lookup is the cheapest there is.
#[map(name = "LB4_BACKENDS")]
pub static LB4_BACKENDS: Array<Lb4Backend> = Array::pinned(capacity::BACKENDS, 0);

/// All Maglev tables, one region per frontend (`maglev_offset .. + maglev_size`), each slot a
/// backend id. Written by the agent only, into a free region before the frontend is pointed at
/// it, so a packet never sees a half-written table; read by the forward programs for new flows.
/// One flat array costs one lookup per new flow, where a map of maps would cost two. Memory-mapped
/// (`BPF_F_MMAPABLE`) so that the agent writes tables as plain memory instead of one syscall per
/// slot. Two slots per element: the kernel aligns array elements to 8 bytes, so a single u32 per
/// element would take 8; as pairs, slot `i` is `LB4_MAGLEV[i / 2][i % 2]`, the memory is 4 bytes a
/// slot, and the mapping reads as one dense u32 array.
#[map(name = "LB4_MAGLEV")]
pub static LB4_MAGLEV: Array<[u32; 2]> = Array::pinned(capacity::MAGLEV_SLOTS / 2, BPF_F_MMAPABLE);

/// (Frontend id, backend id) → the backend's address and what the frontend's flows may still do
/// with it (`MEMBER_*`). Written by the agent only: a frontend's members are its endpoints, those
/// that left it while flows to them live, and, for a Service that is gone, its last endpoints
/// until its flows end. Read by the forward programs for every tracked flow and affinity entry,
/// which are honoured only while their pair is a member (the check Cilium makes with its
/// reverse-NAT index and affinity-match map). A hash: pairs are sparse; not preallocated, like the
/// service map (20 MiB at the default capacity preallocated; about 6 MiB for 100,000 pairs).
#[map(name = "LB4_MEMBERS")]
pub static LB4_MEMBERS: HashMap<Lb4MemberKey, Lb4Member> =
    HashMap::pinned(capacity::MEMBERS, BPF_F_NO_PREALLOC);

/// Connection tracking: two entries per flow (forward and reply). Written by the datapath
/// (create, state, last-seen; it removes a reply entry whose flow is gone) and by the agent (its
/// sweep removes expired entries); read by both directions. LRU, so that under a flood the least recently used flows are evicted instead
/// of new flows failing; an evicted flow that is still alive is re-hashed onto the same backend
/// while its service's Maglev table is unchanged.
#[map(name = "LB4_CT")]
pub static LB4_CT: LruHashMap<Lb4CtKey, Lb4CtEntry> = LruHashMap::pinned(capacity::CT, 0);

/// Datapath counters (`lb_common::counters`). Written by the datapath; read by the agent's
/// metrics and `lbctl stats`. Per CPU, so counting needs no atomic operation.
#[map(name = "LB_COUNTERS")]
pub static LB_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::COUNT, 0);

/// Per-frontend packets, bytes, new flows and drops, indexed by frontend id. Written by the
/// datapath; read by the agent's metrics and `lbctl stats`. Per CPU for the same reason.
#[map(name = "LB4_SVC_STATS")]
pub static LB4_SVC_STATS: PerCpuArray<Lb4SvcStats> = PerCpuArray::pinned(capacity::SERVICES, 0);

/// ClientIP session affinity: (client, frontend) → backend and when it was last given. Written by
/// the datapath on new flows of frontends with affinity, and by the agent (it removes entries whose
/// backend left the frontend); read by the datapath on new flows. LRU, like kube-proxy's `recent`
/// lists, which forget the oldest clients first.
#[map(name = "LB4_AFFINITY")]
pub static LB4_AFFINITY: LruHashMap<Lb4AffinityKey, Lb4Affinity> = LruHashMap::pinned(capacity::AFFINITY, 0);

/// What the agent knows of each frontend (its Service's name, a digest of what it was built from),
/// indexed by frontend id. Written by the agent; read by `lbctl` and by a restarted agent. The
/// programs never touch it: it is declared here so that it is created and pinned with the rest.
#[map(name = "LB4_FE_META")]
pub static LB4_FE_META: Array<Lb4FrontendMeta> = Array::pinned(capacity::SERVICES, 0);

/// Events for `lbctl monitor` (new flows, drops). Written by the datapath only while
/// `LB_MONITOR[0]` is non-zero (the agent's `--flow-events`, on by default), at most
/// `MONITOR_RATE_PER_SEC` per CPU; read by `lbctl monitor`, which only moves the ring buffer's
/// read position (it skips the events it finds at start). While nobody reads, the ring fills and
/// further events are lost. A ring buffer: one buffer for all CPUs, in order, with no per-CPU
/// set-up.
#[map(name = "LB_EVENTS")]
pub static LB_EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

/// `[0]`: non-zero while the datapath sends events to `LB_EVENTS`. Written by the agent only, at
/// start, from `--flow-events` (on by default); read by the datapath before sending an event, and
/// by `lbctl monitor`, which refuses to run while events are off and never writes it.
#[map(name = "LB_MONITOR")]
pub static LB_MONITOR: Array<u32> = Array::pinned(1, 0);

/// The monitor's token bucket per CPU. Written and read by the datapath.
#[map(name = "LB_MON_RATE")]
pub static LB_MON_RATE: PerCpuArray<LbMonitorBucket> = PerCpuArray::pinned(1, 0);

/// IPv4 datagrams in fragments: (addresses, protocol, identification) → the ports of the first
/// fragment, which alone carries them. Written by every program when it translates a first
/// fragment; read for the non-first fragments of the same datagram, which are then translated
/// the same way (addresses only: they carry no L4 header), as Cilium's `ENABLE_IPV4_FRAGMENTS`
/// does. LRU: entries are never removed, a datagram's fragments pass within moments, and the
/// first fragment of a later datagram with the same identification overwrites the entry.
#[map(name = "LB4_FRAGS")]
pub static LB4_FRAGS: LruHashMap<Lb4FragKey, Lb4FragPorts> = LruHashMap::pinned(capacity::FRAGS, 0);

/// The format of each map an agent carries across layout versions (`lb_common::formats`), written
/// by the agent at load, read by agents of other versions. Pinned. No program reads it.
#[map(name = "LB_FORMATS")]
pub static LB_FORMATS: Array<u32> = Array::pinned(formats::CAPACITY, 0);

/// While the agent takes over another layout's links: until `[0]` (a deadline on the datapath's
/// clock) packets that would start a flow are held back, `[1]` counts them (see `lb_common::MAP_LB_TAKEOVER`). Not pinned: every load
/// starts with it off.
#[map(name = "LB_TAKEOVER")]
pub static LB_TAKEOVER: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// The SNAT port ranges agents of this layout served with (see `lb_common::MAP_LB_SNAT_RANGES`).
/// Pinned; written by the agent; no program reads it.
#[map(name = "LB_SNAT_RANGES")]
pub static LB_SNAT_RANGES: Array<u32> = Array::pinned(lb_common::SNAT_RANGES_KEPT, 0);

/// lb's TC filters, where the kernel has no TCX (see `lb_common::MAP_LB_TC_FILTERS`). Pinned;
/// written by the agent; no program reads it.
#[map(name = "LB_TC_FILTERS")]
pub static LB_TC_FILTERS: HashMap<LbTcFilterKey, LbTcFilter> = HashMap::pinned(16_384, BPF_F_NO_PREALLOC);

/// The interfaces lb attaches to, pods' and this node's own (see `lb_common::MAP_LB4_IFS`).
/// Pinned; written by the agent as it attaches; read by `lb4_tc_node_in` for each new flow from
/// outside.
#[map(name = "LB4_IFS")]
pub static LB4_IFS: HashMap<u32, Lb4Interface> = HashMap::pinned(16_384, BPF_F_NO_PREALLOC);

/// `loadBalancerSourceRanges` (see `lb_common::MAP_LB4_SRC_RANGES`). Written by the agent only;
/// read for each new flow to an external frontend. An LPM trie (never preallocated): one lookup
/// finds the longest of a frontend's ranges that holds the client, or its deny entry. The agent
/// writes a frontend's ranges before its deny entry, and its deny entry before it publishes it.
#[map(name = "LB4_SRC_RANGES")]
pub static LB4_SRC_RANGES: LpmTrie<Lb4SrcRange, u32> = LpmTrie::pinned(capacity::SRC_RANGES, 0);

/// Socket-level load balancing: (socket cookie, backend) → the Service address the socket asked
/// for (see `lb_common::MAP_LB4_SOCK_REV`). Written by `lb4_sock_connect` and `lb4_sock_sendmsg`
/// as they translate; read by `lb4_sock_recvmsg` and `lb4_sock_getpeername`. LRU: nothing tells a
/// program that a socket closed, so the oldest entries make room. Pinned, so that sockets
/// translated before a restart still read as talking to their Service.
#[map(name = "LB4_SOCK_REV")]
pub static LB4_SOCK_REV: LruHashMap<Lb4SockRevKey, Lb4SockRev> = LruHashMap::pinned(capacity::SOCK_REV, 0);

/// Socket-level choices: (socket cookie, Service address) → backend id (see
/// `lb_common::MAP_LB4_SOCK_FWD`). UDP sockets only (a TCP socket's connect hook runs once a
/// connection). Written and read by `lb4_sock_connect` and `lb4_sock_sendmsg`; honoured while the
/// backend is a member at that address that is not draining. LRU.
#[map(name = "LB4_SOCK_FWD")]
pub static LB4_SOCK_FWD: LruHashMap<Lb4SockFwdKey, Lb4SockFwd> = LruHashMap::pinned(capacity::SOCK_FWD, 0);

/// ClientIP session affinity of sockets: (network namespace, frontend) → backend (see
/// `lb_common::MAP_LB4_SOCK_AFFINITY`). Written and read by `lb4_sock_connect` and
/// `lb4_sock_sendmsg`; an entry is honoured only while its backend is an active member of the
/// frontend, as in `LB4_AFFINITY`. LRU.
#[map(name = "LB4_SOCK_AFFINITY")]
pub static LB4_SOCK_AFFINITY: LruHashMap<LbSockAffinityKey, Lb4Affinity> =
    LruHashMap::pinned(capacity::SOCK_AFFINITY, 0);

// The IPv6 twins of the maps that hold an address (`lb_common::maps6`). Frontend and backend ids
// are one space for both families: `LB4_MAGLEV`, `LB4_SVC_STATS` and `LB4_FE_META` serve IPv6
// frontends too. Each has the shape and the writers and readers of its IPv4 twin above.

/// `loadBalancerSourceRanges` of IPv6 frontends (see `LB4_SRC_RANGES`).
#[map(name = "LB6_SRC_RANGES")]
pub static LB6_SRC_RANGES: LpmTrie<Lb6SrcRange, u32> = LpmTrie::pinned(capacity::SRC_RANGES, 0);

/// `[0]`: non-zero while `LB6_SRC_RANGES` may hold an entry (the agent sets it before it writes
/// the first, and clears it once none is left), so that IPv6 packets pay for no trie lookup on
/// nodes whose IPv6 frontends have no `loadBalancerSourceRanges`.
#[map(name = "LB6_RANGES_ON")]
pub static LB6_RANGES_ON: Array<u32> = Array::pinned(1, 0);

/// Socket-level reverse translations of IPv6 sockets (see `LB4_SOCK_REV`; written by
/// `lb6_sock_connect` and `lb6_sock_sendmsg`, read by `lb6_sock_recvmsg` and
/// `lb6_sock_getpeername`). IPv4-mapped destinations use `LB4_SOCK_REV`.
#[map(name = "LB6_SOCK_REV")]
pub static LB6_SOCK_REV: LruHashMap<Lb6SockRevKey, Lb6SockRev> = LruHashMap::pinned(capacity::SOCK_REV, 0);

/// Socket-level choices of IPv6 sockets (see `LB4_SOCK_FWD`). Session affinity for sockets of
/// both families is `LB4_SOCK_AFFINITY` (keyed by frontend id).
#[map(name = "LB6_SOCK_FWD")]
pub static LB6_SOCK_FWD: LruHashMap<Lb6SockFwdKey, Lb6SockFwd> = LruHashMap::pinned(capacity::SOCK_FWD, 0);

/// IPv6 frontends (see `LB4_SERVICES`).
#[map(name = "LB6_SERVICES")]
pub static LB6_SERVICES: HashMap<Lb6ServiceKey, Lb4Service> =
    HashMap::pinned(capacity::SERVICES, BPF_F_NO_PREALLOC);

/// IPv6 backends by id (see `LB4_BACKENDS`).
#[map(name = "LB6_BACKENDS")]
pub static LB6_BACKENDS: Array<Lb6Backend> = Array::pinned(capacity::BACKENDS, 0);

/// Members of IPv6 frontends (see `LB4_MEMBERS`).
#[map(name = "LB6_MEMBERS")]
pub static LB6_MEMBERS: HashMap<Lb6MemberKey, Lb6Member> =
    HashMap::pinned(capacity::MEMBERS, BPF_F_NO_PREALLOC);

/// Connection tracking of IPv6 flows (see `LB4_CT`).
#[map(name = "LB6_CT")]
pub static LB6_CT: LruHashMap<Lb6CtKey, Lb6CtEntry> = LruHashMap::pinned(capacity::CT, 0);

/// ClientIP session affinity of IPv6 clients (see `LB4_AFFINITY`).
#[map(name = "LB6_AFFINITY")]
pub static LB6_AFFINITY: LruHashMap<Lb6AffinityKey, Lb4Affinity> = LruHashMap::pinned(capacity::AFFINITY, 0);

/// IPv6 datagrams in fragments (see `LB4_FRAGS`).
/// The IPv6 addresses of Service frontends → how many frontends have it. Written by the agent
/// only; read for a packet whose ports lb cannot see (more extension headers than it follows),
/// which is dropped to a Service address and passes to any other. Preallocated, unlike the other
/// agent-written hashes: the agent counts an address in before it writes the frontend and takes
/// the count back if that write fails, and a replacement in a preallocated map never needs memory,
/// so the taking back cannot fail for the lack of memory that failed the write.
#[map(name = "LB6_VIPS")]
pub static LB6_VIPS: HashMap<[u32; 4], u32> = HashMap::pinned(capacity::SERVICES, 0);

/// The IPv6 programs the IPv4 entry points hand IPv6 packets to (`bpf_tail_call`), by `TAIL_*`
/// index: `LB_TAIL_TC` for the TC programs, `LB_TAIL_XDP` for XDP (a program array holds
/// programs of one type). Filled by the agent when it serves IPv6; an empty slot (`--ipv6 off`)
/// lets IPv6 pass untouched (`PASS_IPV6`). Pinned, so that the programs stay in it while the
/// agent is away.
#[map(name = "LB_TAIL_TC")]
pub static LB_TAIL_TC: ProgramArray = ProgramArray::pinned(lb_common::TAIL_SLOTS, 0);
#[map(name = "LB_TAIL_XDP")]
pub static LB_TAIL_XDP: ProgramArray = ProgramArray::pinned(lb_common::TAIL_SLOTS, 0);

/// The IPv6 node-side programs the IPv4 TC node-side entry points hand IPv6 packets to, by
/// `TAIL_NODE_*` index, as the arrays above for the pod side. Filled when the node-side programs
/// load and the agent serves IPv6.
#[map(name = "LB_TAIL_NODE_TC")]
pub static LB_TAIL_NODE_TC: ProgramArray = ProgramArray::pinned(lb_common::NODE_TAIL_SLOTS, 0);

/// Node interfaces' IPv6 addresses, by interface index (see `lb_common::MAP_LB6_IFS`).
#[map(name = "LB6_IFS")]
pub static LB6_IFS: HashMap<u32, [u32; 4]> = HashMap::pinned(256, BPF_F_NO_PREALLOC);

/// Per-CPU room for what would not fit on a program's stack (BPF's 512 bytes): an IPv6 reject's
/// frame and answer. Not pinned: nothing outlives the program run that uses it.
#[map(name = "LB_SCRATCH")]
pub static LB_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// [`LB_SCRATCH`]'s one value.
#[repr(C)]
pub struct Scratch {
    pub reject_in: [u8; lb_common::reject::REJECT6_IN],
    pub reject_out: [u8; lb_common::reject::REJECT6_OUT],
    /// A new flow's forward entry, reply entry and SNATed reply entry (`conntrack::create`), of
    /// either family (`CtEntry<[u32; 4]>`: 64 bytes, 8-aligned).
    pub ct: [[u64; 8]; 3],
    /// The reply key a new flow tries source ports with (`conntrack::alloc_port`; `CtKey<[u32;
    /// 4]>`: 40 bytes, 4-aligned).
    pub key: [u64; 5],
    /// A value passed through memory the verifier does not follow ([`opaque`]).
    pub opaque: u64,
    /// The flow `pipeline::forward_parsed` leaves for `pipeline::forward_decided`.
    pub flow: [u64; 8],
}

/// `v` as the verifier sees a value read from a map: any number, bounded here by `mask`. The
/// IPv6 parser passes what it found in the extension headers through it (`parse6`). `None` if the
/// scratch map is missing (it never is).
#[inline(always)]
pub fn opaque(v: usize, mask: usize) -> Option<usize> {
    // SAFETY: the one per-CPU value of an array; nothing else holds a reference into it across
    // this function (programs do not nest on a CPU for one hook).
    unsafe {
        let s = LB_SCRATCH.get_ptr_mut(0)?;
        core::ptr::write_volatile(&raw mut (*s).opaque, v as u64);
        Some(core::ptr::read_volatile(&raw const (*s).opaque) as usize & mask)
    }
}

const _: () = assert!(
    core::mem::size_of::<crate::family::CtEntry<[u32; 4]>>() <= 64
        && core::mem::align_of::<crate::family::CtEntry<[u32; 4]>>() <= 8
);

#[map(name = "LB6_FRAGS")]
pub static LB6_FRAGS: LruHashMap<Lb6FragKey, Lb4FragPorts> = LruHashMap::pinned(capacity::FRAGS, 0);
