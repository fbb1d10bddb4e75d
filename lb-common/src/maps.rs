//! Map names, keys and values.
//!
//! Each map's full documentation (writer, reader, pinning, type and capacity) is at its
//! declaration in `lb-ebpf/src/maps.rs`; the names below are the single source of the names both
//! sides use.

use core::mem::size_of;

/// Version of the pinned map layout. Bumped whenever a key, value or map changes shape.
pub const PIN_LAYOUT_VERSION: u32 = 8;

pub const MAP_LB4_SERVICES: &str = "LB4_SERVICES";
pub const MAP_LB4_BACKENDS: &str = "LB4_BACKENDS";
pub const MAP_LB4_MAGLEV: &str = "LB4_MAGLEV";
pub const MAP_LB4_CT: &str = "LB4_CT";
pub const MAP_LB_COUNTERS: &str = "LB_COUNTERS";
pub const MAP_LB4_SVC_STATS: &str = "LB4_SVC_STATS";
pub const MAP_LB4_AFFINITY: &str = "LB4_AFFINITY";
pub const MAP_LB4_FE_META: &str = "LB4_FE_META";
pub const MAP_LB4_MEMBERS: &str = "LB4_MEMBERS";
/// The datapath's events, read by `lbctl monitor` (which only moves the ring's read position).
pub const MAP_LB_EVENTS: &str = "LB_EVENTS";
/// `[0]`: non-zero while the datapath sends events. Written by the agent at start from
/// `--flow-events` (on by default), never by `lbctl monitor`.
pub const MAP_LB_MONITOR: &str = "LB_MONITOR";
pub const MAP_LB_MON_RATE: &str = "LB_MON_RATE";
/// Non-first IPv4 fragments → the ports of their datagram's first fragment.
pub const MAP_LB4_FRAGS: &str = "LB4_FRAGS";
/// The interfaces lb attaches to: ifindex → `Lb4Interface` (a pod's, or one of this node's own
/// with the address flows from outside leave it with). Written by the agent as it attaches;
/// read by the node-side program for each new flow from outside, to tell a local endpoint (its
/// route leaves through a pod's interface) from a remote one.
pub const MAP_LB4_IFS: &str = "LB4_IFS";
/// `loadBalancerSourceRanges`: (frontend, client address prefix) → `SRC_RANGE_ALLOW` or
/// `SRC_RANGE_DENY`, longest prefix first (see [`Lb4SrcRange`]). Written by the agent only; read
/// for each new flow to an external frontend.
pub const MAP_LB4_SRC_RANGES: &str = "LB4_SRC_RANGES";

/// The data of an `LB4_SRC_RANGES` key (an LPM trie's: after its prefix length). A frontend with
/// source ranges has one entry of prefix length 64 (its frontend key, any client):
/// `SRC_RANGE_DENY`; and one per range, of prefix length 64 + the range's: `SRC_RANGE_ALLOW`. A
/// client in a range matches its longer entry; any other client the frontend's deny; a frontend
/// without source ranges has no entry, and every client gets through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4SrcRange {
    pub frontend: Lb4ServiceKey,
    /// The client address (prefix), network byte order.
    pub src: u32,
}
const _: () = assert!(size_of::<Lb4SrcRange>() == 12);

/// The prefix length of a frontend's deny entry in `LB4_SRC_RANGES` (its key's bits).
pub const SRC_RANGE_FRONTEND_BITS: u32 = 64;
/// `LB4_SRC_RANGES` value: the client may open flows to the frontend.
pub const SRC_RANGE_ALLOW: u32 = 1;
/// `LB4_SRC_RANGES` value: the client may not (dropped, `DROP_SRC_RANGE`).
pub const SRC_RANGE_DENY: u32 = 0;

/// Value of `LB4_IFS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Interface {
    /// `IF_ROLE_*`.
    pub role: u32,
    /// A node interface's IPv4 address (network byte order): a flow from outside to a remote
    /// endpoint is SNATed to it when it leaves through the interface, or came in through it and
    /// leaves through an interface lb does not know (a CNI's tunnel device). 0: none.
    pub snat_addr: u32,
}
const _: () = assert!(size_of::<Lb4Interface>() == 8);

/// Not pinned (each load's agent writes it as it attaches): the Ethernet address of each node
/// interface the XDP node program (`--node-datapath xdp`) is on, by interface index. XDP has no
/// packet type: a frame to another address (a promiscuous interface's copy of another host's) is
/// not this node's to translate. An interface missing from it has its packets left to TC.
pub const MAP_LB_NODE_MACS: &str = "LB_NODE_MACS";

/// Value of `LB_NODE_MACS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbNodeMac {
    pub addr: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<LbNodeMac>() == 8);

/// A pod's host-side interface (`--interfaces`): endpoints routed through it are this node's.
pub const IF_ROLE_POD: u32 = 1;
/// One of this node's own interfaces (`--node-interfaces`).
pub const IF_ROLE_NODE: u32 = 2;

/// Not pinned (each load has its own, all zero): while the agent takes over another layout's
/// links with its flows carried (lb-agent's `datapath::migrate`), `[0]` holds a deadline on the
/// datapath's clock (CLOCK_MONOTONIC, ns) until which a packet that would start a flow is dropped
/// instead (its sender retransmits), so that no flow is begun in one layout's table and answered
/// from the other's; a deadline, so that an agent that dies holding releases anyway. `[1]`
/// counts those packets. Per CPU; the agent writes `[0]` on every CPU.
pub const MAP_LB_TAKEOVER: &str = "LB_TAKEOVER";

/// Pinned: lb's TC filters (clsact qdisc filters attached over netlink, where the kernel has no
/// TCX), so that a later agent knows which filters are lb's and `--cleanup` deletes exactly those.
/// Written by the agent only.
pub const MAP_LB_TC_FILTERS: &str = "LB_TC_FILTERS";

/// Key of `LB_TC_FILTERS`: an interface and a direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbTcFilterKey {
    pub ifindex: u32,
    /// 0: ingress; 1: egress.
    pub egress: u32,
}
const _: () = assert!(size_of::<LbTcFilterKey>() == 8);

/// Value of `LB_TC_FILTERS`: where lb's filter is, and the interface's name when it was attached
/// (an index reused by another interface is not its).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbTcFilter {
    pub priority: u32,
    pub handle: u32,
    /// NUL-padded.
    pub ifname: [u8; 16],
}
const _: () = assert!(size_of::<LbTcFilter>() == 24);

/// The format of each map whose state an agent carries from another layout version (lb-agent's
/// `datapath::migrate`), written by the agent at load: `[i]` is the format of `formats::MAPS[i]`.
/// An agent of another version compares them with its own to know what it can read.
pub const MAP_LB_FORMATS: &str = "LB_FORMATS";

/// Formats of the maps an agent carries across layout versions. A map's format is bumped with its
/// key or value (and the layout version with it); an agent reads another layout's map only if its
/// format is its own or one it has a converter for.
pub mod formats {
    use super::*;

    /// Index in `LB_FORMATS` of each map's format. Fixed forever: new maps are only appended.
    pub const MAPS: [&str; 9] = [
        MAP_LB4_SERVICES,
        MAP_LB4_BACKENDS,
        MAP_LB4_MAGLEV,
        MAP_LB4_MEMBERS,
        MAP_LB4_FE_META,
        MAP_LB4_SVC_STATS,
        MAP_LB4_AFFINITY,
        MAP_LB4_CT,
        MAP_LB4_SRC_RANGES,
    ];
    /// This version's format of each of `MAPS`. `LB4_CT` 2: `created_s` and `snat_port`
    /// (layout 7); 3: `snat_addr`, 40 bytes (layout 8). `LB4_SERVICES` 2: the key's `scope`
    /// (layout 8; the same bytes, 0 where layout 7 had padding). `LB4_FE_META` 2: `kind` (layout
    /// 8; where layout 7 had padding, 0: a cluster IP). `LB4_SRC_RANGES` 1 (layout 8; 0: a layout
    /// without the map).
    pub const CURRENT: [u32; 9] = [2, 1, 1, 1, 2, 1, 1, 3, 1];
    /// Entries of `LB_FORMATS` (room for maps to come).
    pub const CAPACITY: u32 = 32;
}

/// Pinned: the SNAT port ranges (`--snat-ports`) agents of this layout served with, newest first,
/// as `first << 16 | last`; 0: none. Written by the agent at load (its own range first), read by
/// the next one, which keeps answering the replies of flows SNATed with any of them (the gate of
/// `globals::SNAT_REPLY_MIN`): an agent restarted with another range finds the ports the one
/// before may still have given out while it started. No program reads it.
pub const MAP_LB_SNAT_RANGES: &str = "LB_SNAT_RANGES";
/// Entries of `LB_SNAT_RANGES`.
pub const SNAT_RANGES_KEPT: u32 = 4;

/// Pinned: socket-level load balancing's reverse translations, (socket cookie, backend address
/// and port) → the Service address the socket asked for (`Lb4SockRevKey` → `Lb4SockRev`). Written
/// by the `connect4` and `sendmsg4` programs when they translate; read by `recvmsg4` and
/// `getpeername4`, which make the backend read as the Service. LRU: a socket leaves no trace when
/// it closes, so the oldest translations are forgotten first.
pub const MAP_LB4_SOCK_REV: &str = "LB4_SOCK_REV";
/// Pinned: socket-level load balancing's choices, (socket cookie, Service address, port,
/// protocol) → the backend given (`Lb4SockFwdKey` → `Lb4SockFwd`). Written by `connect4` and
/// `sendmsg4` when they choose; read by them first, so that a socket that sends to the Service
/// again (every datagram of unconnected UDP) keeps its backend while that stays a member that is
/// not draining, as a flow keeps its conntrack entry on the packet path. UDP sockets only: the
/// kernel runs a TCP socket's connect hook only while it is unconnected. LRU.
pub const MAP_LB4_SOCK_FWD: &str = "LB4_SOCK_FWD";
/// Pinned: ClientIP session affinity for sockets, (network namespace cookie, frontend) → backend
/// (`LbSockAffinityKey` → `Lb4Affinity`): at `connect` the client's address is not known yet, so
/// the namespace stands for it (every process of a node is one client, as under kube-proxy, where
/// they share the node's address). LRU.
pub const MAP_LB4_SOCK_AFFINITY: &str = "LB4_SOCK_AFFINITY";

/// Pinned: two bitmaps of port numbers (as the maps hold them, network byte order), 64 to a
/// word: from [`PORTS_FRONTEND`], every port a frontend key of `LB4_SERVICES` or `LB6_SERVICES`
/// has; from [`PORTS_BACKEND`], every port a backend of `LB4_BACKENDS` or `LB6_BACKENDS` has.
/// Written by the agent only, a port's bit before the first row that has the port, and never
/// cleared while the map lives (so a flow's backend port stays in, whatever left the maps since).
/// Read by the programs before any hash lookup, while [`PORTS_ARMED`] is non-zero: a packet
/// whose destination port is no frontend's is no new flow to one, one whose source port is no
/// backend's no reply of a load-balanced flow.
///
/// The word at [`PORTS_ARMED`] says the bitmaps hold every port the maps need. A loading agent
/// clears it before any program of its own can run (the pinned tail-call arrays hand packets to
/// its programs at once); it sets the bits of every frontend, backend and conntrack reply entry
/// it finds (rows an agent without `LB_PORTS`, or one rolled back to, wrote) and then sets it.
/// While it is 0, every port is looked up, as before the filter.
pub const MAP_LB_PORTS: &str = "LB_PORTS";
/// The first word of `LB_PORTS`' frontend ports.
pub const PORTS_FRONTEND: u32 = 0;
/// The first word of `LB_PORTS`' backend ports.
pub const PORTS_BACKEND: u32 = 1024;
/// The `LB_PORTS` word that is non-zero while the bitmaps are complete.
pub const PORTS_ARMED: u32 = 2048;
/// Entries (words) of `LB_PORTS`.
pub const PORTS_WORDS: u32 = 2049;

/// The `LB_PORTS` word that holds `port` in the bitmap beginning at `set` ([`PORTS_FRONTEND`]
/// or [`PORTS_BACKEND`]), and the port's bit in it.
#[inline(always)]
pub const fn port_bit(set: u32, port: u16) -> (u32, u64) {
    (set + (port >> 6) as u32, 1 << (port & 63))
}

/// Every map the agent pins, in a fixed order.
pub const PINNED_MAPS: [&str; 34] = [
    MAP_LB4_SERVICES,
    MAP_LB4_BACKENDS,
    MAP_LB4_MAGLEV,
    MAP_LB4_CT,
    MAP_LB_COUNTERS,
    MAP_LB4_SVC_STATS,
    MAP_LB4_AFFINITY,
    MAP_LB4_FE_META,
    MAP_LB4_MEMBERS,
    MAP_LB_EVENTS,
    MAP_LB_MONITOR,
    MAP_LB_MON_RATE,
    MAP_LB4_FRAGS,
    MAP_LB_FORMATS,
    MAP_LB_TC_FILTERS,
    MAP_LB4_IFS,
    MAP_LB4_SRC_RANGES,
    MAP_LB_SNAT_RANGES,
    MAP_LB4_SOCK_REV,
    MAP_LB4_SOCK_FWD,
    MAP_LB4_SOCK_AFFINITY,
    crate::maps6::MAP_LB6_SERVICES,
    crate::maps6::MAP_LB6_BACKENDS,
    crate::maps6::MAP_LB6_MEMBERS,
    crate::maps6::MAP_LB6_CT,
    crate::maps6::MAP_LB6_AFFINITY,
    crate::maps6::MAP_LB6_FRAGS,
    crate::maps6::MAP_LB6_VIPS,
    crate::maps6::MAP_LB6_SOCK_REV,
    crate::maps6::MAP_LB6_SOCK_FWD,
    crate::maps6::MAP_LB6_SRC_RANGES,
    crate::maps6::MAP_LB6_RANGES_ON,
    crate::maps6::MAP_LB6_IFS,
    MAP_LB_PORTS,
];

/// Names of the load-time settings (global variables) of the datapath.
pub mod globals {
    /// `u64`, nanoseconds: a TCP flow that has sent only its SYN.
    pub const CT_TIMEOUT_TCP_SYN_NS: &str = "CT_TIMEOUT_TCP_SYN_NS";
    /// `u64`, nanoseconds: an established TCP flow.
    pub const CT_TIMEOUT_TCP_EST_NS: &str = "CT_TIMEOUT_TCP_EST_NS";
    /// `u64`, nanoseconds: a TCP flow after FIN or RST.
    pub const CT_TIMEOUT_TCP_CLOSE_NS: &str = "CT_TIMEOUT_TCP_CLOSE_NS";
    /// `u64`, nanoseconds: an idle UDP flow.
    pub const CT_TIMEOUT_UDP_NS: &str = "CT_TIMEOUT_UDP_NS";
    /// `u32`: seed of the flow hash; must be equal on every node.
    pub const FLOW_HASH_SEED: &str = "FLOW_HASH_SEED";
    /// `u32`, network byte order: source address of hairpinned flows (a pod reaching itself
    /// through a service is SNATed to it, so its reply comes back through lb).
    pub const HAIRPIN_ADDR: &str = "HAIRPIN_ADDR";
    /// `[u32; 4]`, network byte order: source address of hairpinned IPv6 flows.
    pub const HAIRPIN_ADDR6: &str = "HAIRPIN_ADDR6";
    /// `u32`, host order: the first and last source port given to a flow whose tuple clashed
    /// (`Lb4CtEntry::snat_port`). Outside the node's `ip_local_port_range`.
    pub const SNAT_PORT_MIN: &str = "SNAT_PORT_MIN";
    pub const SNAT_PORT_MAX: &str = "SNAT_PORT_MAX";
    /// `u32`, host order: the first and last port a reply of a flow SNATed to this node's
    /// address may come back to: the SNAT ports, widened to hold those of the flows an earlier
    /// agent SNATed with another range (a changed `--snat-ports` or `ip_local_port_range`), so
    /// that they go on. A packet to a port outside is no such reply.
    pub const SNAT_REPLY_MIN: &str = "SNAT_REPLY_MIN";
    pub const SNAT_REPLY_MAX: &str = "SNAT_REPLY_MAX";
    /// `u32`: non-zero where the kernel has `bpf_ktime_get_coarse_ns` (5.11), which the datapath
    /// then reads its clock with; else `bpf_ktime_get_ns` (the same CLOCK_MONOTONIC, to the
    /// nanosecond, at a few more nanoseconds a call). A read-only global, so the verifier knows
    /// it and never looks at the branch not taken, whose helper an older kernel would refuse.
    pub const KTIME_COARSE: &str = "KTIME_COARSE";
    /// `u32`: which sockets the socket programs translate (`SOCK_SCOPE_*`).
    pub const SOCK_SCOPE: &str = "SOCK_SCOPE";
    /// `u64`: with `SOCK_SCOPE_NETNS`, the cookie of the network namespace whose sockets are
    /// translated (the agent's own, from `SO_NETNS_COOKIE`).
    pub const SOCK_NETNS_COOKIE: &str = "SOCK_NETNS_COOKIE";
    /// `u32`: non-zero where the kernel has `bpf_set_retval` for cgroup programs (5.18): a
    /// `connect` or `sendmsg` to a Service without endpoints then fails with ECONNREFUSED;
    /// else with EPERM (what a cgroup program's refusal gives). Read-only, like `KTIME_COARSE`.
    pub const SOCK_SET_RETVAL: &str = "SOCK_SET_RETVAL";
    /// `u32`: non-zero where cgroup socket programs may call `bpf_get_current_pid_tgid` and
    /// `bpf_get_current_comm` (5.7): socket events then name their process.
    /// Read-only, like `KTIME_COARSE`.
    pub const SOCK_PROCESS: &str = "SOCK_PROCESS";
    /// `u32`: non-zero where XDP programs may call `bpf_xdp_adjust_meta` (every kernel since 4.15
    /// should, but some builds refuse it): XDP then marks the packets it passes for the TC
    /// forward program behind it (`decided` or left to TC); else it leaves no mark and TC looks
    /// at each again. Read-only, like `KTIME_COARSE`.
    pub const XDP_META: &str = "XDP_META";
}

/// `globals::SOCK_SCOPE`: every socket (`--socket-lb all`).
pub const SOCK_SCOPE_ALL: u32 = 0;
/// `globals::SOCK_SCOPE`: sockets of the network namespace `globals::SOCK_NETNS_COOKIE` names
/// (`--socket-lb host` where the kernel has `SO_NETNS_COOKIE`, 5.14).
pub const SOCK_SCOPE_NETNS: u32 = 1;
/// `globals::SOCK_SCOPE`: sockets of the initial network namespace (`--socket-lb host` below
/// 5.14, whose agent cannot learn its own namespace's cookie).
pub const SOCK_SCOPE_INIT_NETNS: u32 = 2;

/// Default SNAT port range: below the default NodePort range (30000-32767) and the kernel's
/// default `ip_local_port_range` (32768-60999). 28,976 ports: a node SNATing the flows from
/// outside to a remote endpoint holds a port per flow until its entry goes (a closed TCP flow's
/// after `CT_TIMEOUT_TCP_CLOSE`), so the range bounds the new flows a second it can send one
/// backend (61000-65535, the first default, held NodePort traffic to 0.59 of kube-proxy's rate
/// in `cargo xtask bench`).
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1_024, 29_999);

/// Default hairpin source address (Cilium uses the same link-local address).
pub const DEFAULT_HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];

/// Default hairpin source address of IPv6 flows: `100::a9fe:2a01`, in the discard-only prefix
/// `100::/64` (RFC 6666), so it is nobody's address and no route leads anywhere real; the pod
/// sends its replies to it by its default route, through lb. (Not link-local, which a pod would
/// look for on its own link with Neighbour Discovery, and nobody would answer.) The last 32 bits
/// are the IPv4 default's.
pub const DEFAULT_HAIRPIN_ADDR6: [u8; 16] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 169, 254, 42, 1];

/// Default conntrack timeouts, in seconds (the values Cilium uses).
pub mod default_timeouts {
    pub const TCP_SYN_SECS: u64 = 60;
    pub const TCP_ESTABLISHED_SECS: u64 = 21_600;
    pub const TCP_CLOSE_SECS: u64 = 10;
    pub const UDP_SECS: u64 = 60;
}

/// How often (at most) the datapath refreshes a flow's `last_seen_ns`: refreshing on every packet
/// would write a shared cache line per packet.
pub const CT_REFRESH_INTERVAL_NS: u64 = 1_000_000_000;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Key of `LB4_SERVICES`: a frontend, VIP:port/protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4ServiceKey {
    /// Service IPv4 address, network byte order.
    pub addr: u32,
    /// Service port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
    pub scope: u8,
}
const _: () = assert!(size_of::<Lb4ServiceKey>() == 8);

/// The entry every client of the address uses: the only one, unless the frontend is flagged
/// `SVC_FLAG_TWO_SCOPES`.
pub const SCOPE_EXTERNAL: u8 = 0;
/// The entry this node's pods use instead, where the frontend is flagged `SVC_FLAG_TWO_SCOPES`:
/// an external address of an `externalTrafficPolicy: Local` Service, which pods reach with every
/// endpoint (kube-proxy's exception for the cluster's own clients) while clients from outside get
/// only this node's.
pub const SCOPE_INTERNAL: u8 = 1;

/// Value of `LB4_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Service {
    /// Frontend id: index into `LB4_SVC_STATS`; never 0.
    pub id: u32,
    /// Backends that new flows may use; 0 means new flows are rejected (or dropped, see
    /// `SVC_FLAG_LOCAL_ONLY`).
    pub backend_count: u32,
    /// First slot of this frontend's Maglev table in `LB4_MAGLEV`.
    pub maglev_offset: u32,
    /// Number of slots of the table (a prime); 0 when there is no table.
    pub maglev_size: u32,
    /// ClientIP session affinity timeout in seconds; 0 = no affinity.
    pub affinity_timeout_secs: u32,
    /// `SVC_FLAG_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<Lb4Service>() == 24);

/// `internalTrafficPolicy: Local` with usable endpoints on other nodes: when `backend_count` is 0,
/// new flows are dropped (`DROP_NO_LOCAL_BACKEND`), as kube-proxy does. Without the flag, a
/// frontend with no backend rejects new flows (ICMP port unreachable, `REJECT_NO_BACKEND`).
pub const SVC_FLAG_LOCAL_ONLY: u32 = 1;
/// The Service is gone (deleted, or its address or port changed): the entry stays, with no
/// backend and no table, only while tracked flows made for it are alive, so that they keep their
/// backends as under netfilter conntrack. New flows are rejected, as to a Service without
/// endpoints.
pub const SVC_FLAG_TOMBSTONE: u32 = 2;
/// An address clients outside the cluster reach (a NodePort on this node's address, a
/// LoadBalancer IP): served by the node-side program too. Without it, the node-side program
/// leaves the packet alone (a cluster IP is for the cluster's own clients).
pub const SVC_FLAG_EXTERNAL: u32 = 4;
/// This node's pods use the `SCOPE_INTERNAL` entry of the same address instead of this one.
pub const SVC_FLAG_TWO_SCOPES: u32 = 8;

/// Value of `LB4_BACKENDS`, indexed by backend id (0 is never a backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Backend {
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
}
const _: () = assert!(size_of::<Lb4Backend>() == 8);

/// The slot is unused (also what a zeroed array entry reads as).
pub const BACKEND_STATE_FREE: u8 = 0;
/// Takes new flows.
pub const BACKEND_STATE_ACTIVE: u8 = 1;
/// Keeps its established flows but takes no new ones.
pub const BACKEND_STATE_TERMINATING: u8 = 2;

/// Key of `LB4_MEMBERS`: a backend as a member of one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4MemberKey {
    /// Frontend id.
    pub svc_id: u32,
    /// Backend id.
    pub backend_id: u32,
}
const _: () = assert!(size_of::<Lb4MemberKey>() == 8);

/// Value of `LB4_MEMBERS`: what a tracked flow or an affinity entry of the frontend may still do
/// with the backend. A flow or affinity entry is honoured only while its (frontend, backend) pair
/// is a member with the same address and port, so a backend id or a frontend address that is
/// reused never inherits another Service's flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Member {
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    /// `MEMBER_*`.
    pub state: u8,
    /// Padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(size_of::<Lb4Member>() == 8);

/// Ready: takes new flows (from the Maglev table or from affinity) and keeps its flows.
pub const MEMBER_ACTIVE: u8 = 1;
/// Not ready but serving (terminating): no new flow, no SYN; keeps its TCP and UDP flows
/// (kube-proxy's conntrack cleanup spares serving endpoints).
pub const MEMBER_SERVING: u8 = 2;
/// Not serving, or no longer listed by the Service: no new flow, no SYN; keeps its TCP flows
/// until they end; its UDP flows pick again.
pub const MEMBER_DRAINING: u8 = 3;

/// Key of `LB4_CT`. A load-balanced flow has two entries: `CT_DIR_FORWARD` keyed by the client's
/// tuple towards the VIP, and `CT_DIR_REPLY` keyed by the backend's tuple towards the client. The
/// forward entry is the flow: packets in both directions refresh it, its state and timeout decide
/// whether the flow is alive, and a reply entry is honoured only while its forward entry is alive
/// and names the same backend (else the datapath removes it). A forward entry whose reply entry
/// was evicted rebuilds it when it is refreshed.
///
/// Two flows from one client port to two Service addresses whose backends are the same would
/// share one reply key (a tuple clash). The second one is given another source port
/// (`Lb4CtEntry::snat_port`, from the datapath's SNAT port range), as netfilter's NAT does, so
/// that every live flow has its own reply key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4CtKey {
    /// Source address, network byte order.
    pub saddr: u32,
    /// Destination address, network byte order.
    pub daddr: u32,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `CT_DIR_FORWARD` or `CT_DIR_REPLY`.
    pub dir: u8,
    /// Padding, always zero.
    pub _pad: u16,
}
const _: () = assert!(size_of::<Lb4CtKey>() == 16);

pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

impl Lb4CtKey {
    /// The key of the forward entry of the flow that reply entry `self` (holding `e`) belongs
    /// to: the client's tuple towards the service address. The client is the reply's
    /// destination, or its source when the flow is hairpinned (the client is its own backend and
    /// the reply goes to the hairpin address), or the address the entry keeps when the flow was
    /// SNATed to this node's address (`CT_FLAG_NODE_SNAT`); its port is the reply's destination port, or the
    /// one the entry keeps when the flow was given another source port.
    #[inline(always)]
    pub fn forward_of_reply(&self, e: &Lb4CtEntry) -> Self {
        let saddr = if e.flags & CT_FLAG_NODE_SNAT != 0 {
            e.snat_addr
        } else if e.flags & CT_FLAG_HAIRPIN != 0 {
            self.saddr
        } else {
            self.daddr
        };
        Self {
            saddr,
            daddr: e.nat_addr,
            sport: if e.snat_port != 0 { e.snat_port } else { self.dport },
            dport: e.nat_port,
            proto: self.proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        }
    }
}

/// Value of `LB4_CT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4CtEntry {
    /// `bpf_ktime_get_coarse_ns()` when a packet of the flow was last seen (refreshed at most
    /// every `CT_REFRESH_INTERVAL_NS`).
    pub last_seen_ns: u64,
    /// When the flow was created, in whole seconds of the same clock.
    pub created_s: u32,
    /// A flow whose tuple clashed (see `Lb4CtKey`) and was given another source port. Forward
    /// entries: the source port the client's packets are rewritten to. Reply entries: the
    /// client's own port, which replies are rewritten back to. 0: the client's port is kept.
    /// Network byte order.
    pub snat_port: u16,
    /// Padding, always zero.
    pub _pad: u16,
    /// Forward entries: the backend address the flow is DNATed to. Reply entries: the service
    /// address replies are rewritten back to (kept here rather than looked up by frontend id, so a
    /// reply costs one lookup and flows still drain after their frontend is removed). Network
    /// byte order.
    pub nat_addr: u32,
    /// Forward entries: the backend port. Reply entries: the service port. Network byte order.
    pub nat_port: u16,
    /// `CT_STATE_*`.
    pub state: u8,
    /// `CT_FLAG_*` bits.
    pub flags: u8,
    /// Backend id chosen for the flow.
    pub backend_id: u32,
    /// Frontend id of the service.
    pub svc_id: u32,
    /// A flow SNATed to this node's address (`CT_FLAG_NODE_SNAT`). Forward entries: the address
    /// the client's packets are rewritten to. Reply entries: the client's own address, which
    /// replies are rewritten back to. 0 otherwise. Network byte order.
    pub snat_addr: u32,
    /// Padding, always zero.
    pub _pad1: u32,
}
const _: () = assert!(size_of::<Lb4CtEntry>() == 40);

/// The client is its own backend: its packets are also SNATed to the hairpin address, and the
/// reply entry is keyed by that address.
pub const CT_FLAG_HAIRPIN: u8 = 1;
/// TCP: the client sent a FIN (forward entries).
pub const CT_FLAG_FIN_CLIENT: u8 = 2;
/// TCP: the backend sent a FIN (forward entries).
pub const CT_FLAG_FIN_BACKEND: u8 = 4;
/// The flow came from outside this node through a node interface (`lb4_tc_node_in`): the
/// node-side egress program translates its replies, which leave through a node interface.
pub const CT_FLAG_EXTERNAL: u8 = 8;
/// The flow came from outside to a remote endpoint and was SNATed to this node's address
/// (`snat_addr`, with a port of the SNAT range): its packets both ways are forwarded by lb.
pub const CT_FLAG_NODE_SNAT: u8 = 16;

/// TCP: only the client's SYN seen.
pub const CT_STATE_SYN: u8 = 1;
/// TCP past the handshake (also half-closed: a FIN one way only), or any UDP flow.
pub const CT_STATE_ESTABLISHED: u8 = 2;
/// TCP after a FIN each way, or an RST.
pub const CT_STATE_CLOSING: u8 = 3;

/// Key of `LB4_FRAGS`: one IPv4 datagram in fragments, as its fragments all carry it (RFC 791:
/// source, destination, protocol and identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4FragKey {
    /// Source address, network byte order.
    pub saddr: u32,
    /// Destination address, network byte order.
    pub daddr: u32,
    /// IPv4 identification, network byte order.
    pub id: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(size_of::<Lb4FragKey>() == 12);

/// Value of `LB4_FRAGS`: the ports of the datagram, read from its first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4FragPorts {
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
}
const _: () = assert!(size_of::<Lb4FragPorts>() == 4);

/// Key of `LB4_AFFINITY`: ClientIP session affinity, per client address and frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb4AffinityKey {
    /// Client IPv4 address, network byte order.
    pub client: u32,
    /// Frontend id.
    pub svc_id: u32,
}
const _: () = assert!(size_of::<Lb4AffinityKey>() == 8);

/// Value of `LB4_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4Affinity {
    /// When the client last opened a flow to the frontend (coarse monotonic ns).
    pub last_used_ns: u64,
    /// The backend it was given.
    pub backend_id: u32,
    /// Padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<Lb4Affinity>() == 16);

/// Key of `LB4_SOCK_REV` (see `MAP_LB4_SOCK_REV`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4SockRevKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// The backend the socket was sent to, network byte order.
    pub addr: u32,
    /// Its port, network byte order.
    pub port: u16,
    /// Padding, always zero.
    pub _pad: u16,
}
const _: () = assert!(size_of::<Lb4SockRevKey>() == 16);

/// Value of `LB4_SOCK_REV`: the Service address and port the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4SockRev {
    /// Network byte order.
    pub vip: u32,
    /// Network byte order.
    pub vport: u16,
    /// Padding, always zero.
    pub _pad: u16,
    /// The frontend translated.
    pub svc_id: u32,
    /// The backend given: while (`svc_id`, `backend_id`) is a member of the frontend that is not
    /// draining, the socket may go on with it (the agent aborts connected UDP sockets whose
    /// backend left).
    pub backend_id: u32,
}
const _: () = assert!(size_of::<Lb4SockRev>() == 16);

/// Key of `LB4_SOCK_FWD` (see `MAP_LB4_SOCK_FWD`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb4SockFwdKey {
    /// The socket's cookie.
    pub cookie: u64,
    /// The Service address, network byte order.
    pub vip: u32,
    /// Its port, network byte order.
    pub vport: u16,
    /// `IPPROTO_UDP` (written by programs before 2026-12-08 for TCP too; nothing reads those).
    pub proto: u8,
    /// Padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(size_of::<Lb4SockFwdKey>() == 16);

/// Value of `LB4_SOCK_FWD`: the backend a socket was given for a Service address, honoured while
/// (frontend, `backend_id`) is a member at this address and port (an id freed and given to
/// another endpoint is not the same backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4SockFwd {
    pub backend_id: u32,
    /// Network byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    /// Padding, always zero.
    pub _pad: u16,
}
const _: () = assert!(size_of::<Lb4SockFwd>() == 12);

/// Key of `LB4_SOCK_AFFINITY` (see `MAP_LB4_SOCK_AFFINITY`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbSockAffinityKey {
    /// The client socket's network namespace cookie.
    pub netns: u64,
    pub svc_id: u32,
    /// Padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<LbSockAffinityKey>() == 16);

/// Value of `LB4_FE_META`, indexed by frontend id: what the agent knows of a frontend, kept beside
/// the maps for `lbctl` and for a restarted agent. Never read by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lb4FrontendMeta {
    /// Digest of everything the frontend's entry and table were built from; a restarted agent
    /// whose desired frontend has the same digest adopts the table instead of rewriting it.
    pub digest: u64,
    /// Bytes used in `name`.
    pub name_len: u32,
    /// `FRONTEND_KIND_*`: which of its Service's addresses the frontend is.
    pub kind: u8,
    /// Padding, always zero.
    pub _pad: [u8; 3],
    /// `namespace/name:port` of the Service, UTF-8, truncated to fit.
    pub name: [u8; 112],
}
const _: () = assert!(size_of::<Lb4FrontendMeta>() == 128);

/// A cluster IP (0: what layouts before 8 recorded, when every frontend was one).
pub const FRONTEND_KIND_CLUSTER_IP: u8 = 0;
/// A LoadBalancer ingress IP.
pub const FRONTEND_KIND_LOAD_BALANCER: u8 = 1;
/// A NodePort on one of this node's addresses.
pub const FRONTEND_KIND_NODE_PORT: u8 = 2;
/// `spec.externalIPs`.
pub const FRONTEND_KIND_EXTERNAL_IP: u8 = 3;

impl Default for Lb4FrontendMeta {
    fn default() -> Self {
        Self { digest: 0, name_len: 0, kind: FRONTEND_KIND_CLUSTER_IP, _pad: [0; 3], name: [0; 112] }
    }
}

impl Lb4FrontendMeta {
    pub fn new(digest: u64, name: &str) -> Self {
        let mut m = Self { digest, ..Self::default() };
        // Truncate on a character boundary.
        let mut n = name.len().min(m.name.len());
        while !name.is_char_boundary(n) {
            n -= 1;
        }
        m.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        m.name_len = n as u32;
        m
    }

    /// The same record for a frontend of `kind` (`FRONTEND_KIND_*`).
    pub fn with_kind(self, kind: u8) -> Self {
        Self { kind, ..self }
    }

    pub fn name(&self) -> &str {
        let n = (self.name_len as usize).min(self.name.len());
        core::str::from_utf8(&self.name[..n]).unwrap_or("")
    }
}

/// A datapath event for `lbctl monitor`, sent through `LB_EVENTS` while the agent has events on
/// (`LB_MONITOR[0]`, from `--flow-events`), whether or not a monitor is reading.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbEvent {
    /// `EVENT_*`.
    pub kind: u32,
    /// For drops, the counter index of the reason (`counters::DROP_*`).
    pub reason: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
    /// New flows: the backend chosen.
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad2: u16,
    /// Frontend id (0 when unknown).
    pub svc_id: u32,
    /// Socket events: the process (thread group id) that called, where the kernel gives cgroup
    /// programs `bpf_get_current_pid_tgid` (0 otherwise, and for packet events).
    pub pid: u32,
    /// Coarse monotonic time of the event.
    pub ts_ns: u64,
    /// Socket events: the calling thread's command name (NUL-padded), where the kernel gives
    /// `bpf_get_current_comm`. An event of an earlier layout ends before it (48 bytes).
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<LbEvent>() == 64);
/// The length of an event of the layout without `comm` (agents before socket events).
pub const LB_EVENT_BASE_LEN: usize = 48;

pub const EVENT_NEW_FLOW: u32 = 1;
pub const EVENT_DROP: u32 = 2;
/// A socket translated at `connect` or at its first `sendmsg` to a Service address, or refused
/// (`reason`: `counters::SOCK_CONNECT`, `SOCK_SENDMSG` or `SOCK_REFUSED`).
pub const EVENT_SOCK: u32 = 3;

/// Events per second each CPU may send to `lbctl monitor`, and the burst allowed.
pub const MONITOR_RATE_PER_SEC: u64 = 2_000;
pub const MONITOR_BURST: u64 = 200;

/// Value of `LB_MON_RATE` (per CPU): the monitor's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbMonitorBucket {
    pub tokens: u64,
    pub last_ns: u64,
}
const _: () = assert!(size_of::<LbMonitorBucket>() == 16);

/// Value of `LB4_SVC_STATS` (per CPU), indexed by frontend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb4SvcStats {
    /// Packets forwarded to a backend (new and established).
    pub packets: u64,
    /// Bytes of those packets (layer 2 length).
    pub bytes: u64,
    /// New flows created.
    pub new_flows: u64,
    /// Packets dropped for this frontend (no backend).
    pub drops: u64,
}
const _: () = assert!(size_of::<Lb4SvcStats>() == 32);

impl Lb4ServiceKey {
    /// Builds a key from host-order values.
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self { addr: u32::from_ne_bytes(addr), port: port.to_be(), proto, scope: SCOPE_EXTERNAL }
    }
}

impl Lb4Backend {
    /// Builds a backend from host-order values.
    pub const fn new(addr: [u8; 4], port: u16, proto: u8, state: u8) -> Self {
        Self { addr: u32::from_ne_bytes(addr), port: port.to_be(), proto, state }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)], made only of integers, with explicit padding fields, so every bit
    // pattern is valid and no byte is uninitialised. The same holds for the types below.
    unsafe impl aya::Pod for Lb4ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4Service {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4CtEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4SvcStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4Affinity {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4SockRevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4SockRev {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbSockAffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4SockFwdKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4SockFwd {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4FrontendMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbMonitorBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4MemberKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4Member {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4FragPorts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbTcFilterKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbTcFilter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4Interface {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbNodeMac {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb4SrcRange {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_key_holds_network_order_bytes() {
        let key = Lb4ServiceKey::new([10, 96, 0, 10], 8080, IPPROTO_TCP);
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(key.proto, 6);
    }

    /// The default conntrack table holds two entries for each flow kube-proxy has netfilter
    /// track on a node of that many CPUs (`--conntrack-min` 131,072 up to 4 CPUs, 32,768 per CPU
    /// above), up to the cap of 524,288 entries from 8 CPUs on, also where the product would pass
    /// u32 (no wrap to a small table).
    #[test]
    fn conntrack_default_follows_kube_proxys_per_cpu_rule_up_to_its_cap() {
        for (cpus, entries) in [
            (0, 262_144),
            (1, 262_144),
            (4, 262_144),
            (5, 327_680),
            (6, 393_216),
            (7, 458_752),
            (8, 524_288),
            (96, 524_288),
            (200_000, 524_288),
            (u32::MAX, 524_288),
        ] {
            assert_eq!(capacity::ct_for_cpus(cpus), entries, "{cpus} CPUs");
        }
        assert_eq!(capacity::CT, 262_144);
    }

    #[test]
    fn backend_holds_network_order_bytes() {
        let be = Lb4Backend::new([10, 244, 1, 3], 53, IPPROTO_UDP, BACKEND_STATE_ACTIVE);
        assert_eq!(be.addr.to_ne_bytes(), [10, 244, 1, 3]);
        assert_eq!(be.port.to_ne_bytes(), [0, 53]);
    }

    /// The forward key found from a reply entry is the one the flow was created under, for a
    /// plain flow and for a hairpinned one (the client is its own backend, replies go to the
    /// hairpin address).
    #[test]
    fn forward_of_reply_inverts_the_reply_key() {
        let ip = |a: [u8; 4]| u32::from_ne_bytes(a);
        let (client, vip, backend, hairpin) =
            (ip([10, 244, 0, 5]), ip([10, 96, 0, 10]), ip([10, 244, 0, 9]), ip([169, 254, 42, 1]));
        for (proto, hairpinned, snat) in [
            (IPPROTO_TCP, false, 0u16),
            (IPPROTO_UDP, false, 0),
            (IPPROTO_TCP, true, 0),
            (IPPROTO_TCP, false, 61_234),
            (IPPROTO_UDP, true, 65_000),
        ] {
            let client = if hairpinned { backend } else { client };
            let fwd = Lb4CtKey {
                saddr: client,
                daddr: vip,
                sport: 41_000u16.to_be(),
                dport: 80u16.to_be(),
                proto,
                dir: CT_DIR_FORWARD,
                _pad: 0,
            };
            let entry = Lb4CtEntry {
                nat_addr: vip,
                nat_port: 80u16.to_be(),
                flags: if hairpinned { CT_FLAG_HAIRPIN | CT_FLAG_FIN_CLIENT } else { CT_FLAG_FIN_BACKEND },
                // A reply entry keeps the client's own port when the flow was given another one.
                snat_port: if snat != 0 { fwd.sport } else { 0 },
                ..Lb4CtEntry::default()
            };
            let reply = Lb4CtKey {
                saddr: backend,
                daddr: if hairpinned { hairpin } else { client },
                sport: 8080u16.to_be(),
                dport: if snat != 0 { snat.to_be() } else { fwd.sport },
                proto,
                dir: CT_DIR_REPLY,
                _pad: 0,
            };
            assert_eq!(reply.forward_of_reply(&entry), fwd, "proto {proto} hairpin {hairpinned} snat {snat}");
        }
    }

    /// A flow from outside SNATed to this node's address: its replies come to that address and a
    /// port of the SNAT range; the reply entry keeps the client's address and port.
    #[test]
    fn forward_of_reply_finds_the_client_of_a_node_snat_flow() {
        let ip = |a: [u8; 4]| u32::from_ne_bytes(a);
        let (client, node, backend) = (ip([192, 0, 2, 7]), ip([172, 31, 0, 1]), ip([10, 244, 2, 3]));
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            let fwd = Lb4CtKey {
                saddr: client,
                daddr: node,
                sport: 41_000u16.to_be(),
                dport: 30_080u16.to_be(),
                proto,
                dir: CT_DIR_FORWARD,
                _pad: 0,
            };
            let entry = Lb4CtEntry {
                nat_addr: node,
                nat_port: fwd.dport,
                flags: CT_FLAG_NODE_SNAT | CT_FLAG_EXTERNAL,
                snat_port: fwd.sport,
                snat_addr: client,
                ..Lb4CtEntry::default()
            };
            let reply = Lb4CtKey {
                saddr: backend,
                daddr: node,
                sport: 8080u16.to_be(),
                dport: 61_500u16.to_be(),
                proto,
                dir: CT_DIR_REPLY,
                _pad: 0,
            };
            assert_eq!(reply.forward_of_reply(&entry), fwd, "proto {proto}");
        }
    }
}

/// Default capacities. The agent sets the real ones at load time from its flags, whose defaults
/// are these; the eBPF object declares the same values so it also loads as it is.
pub mod capacity {
    /// Frontends (VIP:port/protocol). Frontend ids run from 1 to `SERVICES - 1`.
    pub const SERVICES: u32 = 65_536;
    /// Backends. Backend ids run from 1 to `BACKENDS - 1`. Room for 10,000 Services × 10
    /// endpoints and more (each distinct endpoint address, port and protocol is one backend).
    pub const BACKENDS: u32 = 262_144;
    /// Maglev slots for all frontends together (u32 each: 64 MiB). 10,000 Services × 10 endpoints
    /// take 16.0 million (1,601 slots each), which leaves room for about 480 tables a second to
    /// be republished (a freed table's region waits 1 s before it is written again).
    pub const MAGLEV_SLOTS: u32 = 16_777_216;
    /// Conntrack entries (two per load-balanced flow) by default on a node of one CPU (and up to
    /// four): [`ct_for_cpus`]`(1)`, 262,144. The agent sizes the table by the node's CPUs.
    pub const CT: u32 = ct_for_cpus(1);
    /// The flows kube-proxy has netfilter track at least (`--conntrack-min`).
    pub const CT_FLOWS_MIN: u32 = 131_072;
    /// The flows kube-proxy has netfilter track per CPU (`--conntrack-max-per-core`).
    pub const CT_FLOWS_PER_CPU: u32 = 32_768;

    /// The most conntrack entries the default gives (a node of 8 CPUs or more): Cilium's default
    /// for TCP flows (`bpf-ct-global-tcp-max`), and lb's fixed default before. The table is
    /// preallocated, its kernel memory charged to the agent's pod whether used or not, where
    /// kube-proxy's figure only bounds what netfilter allocates as flows come.
    pub const CT_DEFAULT_MAX: u32 = 524_288;

    /// Conntrack entries by default on a node of `cpus` CPUs: two per flow, for as many flows as
    /// kube-proxy sets `nf_conntrack_max` to on that node, max(131,072, 32,768 × CPUs), so that
    /// the node tracks as many Service flows as it did under kube-proxy; at most
    /// [`CT_DEFAULT_MAX`] (262,144 entries up to 4 CPUs, 393,216 at 6, 524,288 from 8 on).
    pub const fn ct_for_cpus(cpus: u32) -> u32 {
        let per_cpu = CT_FLOWS_PER_CPU.saturating_mul(cpus);
        let flows = if per_cpu > CT_FLOWS_MIN { per_cpu } else { CT_FLOWS_MIN };
        let entries = flows.saturating_mul(2);
        if entries < CT_DEFAULT_MAX {
            entries
        } else {
            CT_DEFAULT_MAX
        }
    }
    /// ClientIP session affinity entries (client, frontend).
    pub const AFFINITY: u32 = 65_536;
    /// (frontend, backend) memberships, those of Services gone but with live flows included.
    pub const MEMBERS: u32 = 262_144;
    /// IPv4 datagrams in fragments being translated at once (Cilium's default too). Fixed: an
    /// entry lives only while its datagram's fragments pass, so this bounds datagrams in flight,
    /// not flows.
    pub const FRAGS: u32 = 8_192;
    /// `loadBalancerSourceRanges` entries (one per frontend with ranges, and one per range of
    /// each). Fixed.
    pub const SRC_RANGES: u32 = 65_536;
    /// Socket-level reverse translations (a socket and the backend it was sent to). Fixed.
    pub const SOCK_REV: u32 = 65_536;
    /// Socket-level choices (a socket and the Service address it sends to). Fixed.
    pub const SOCK_FWD: u32 = 65_536;
    /// Socket-level session affinity entries (network namespace, frontend). Fixed.
    pub const SOCK_AFFINITY: u32 = 16_384;

    /// Every capacity the agent sets at load time, in one place: the flags fill it, the loader,
    /// the reconciler's allocators and the occupancy metrics read it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Capacities {
        pub services: u32,
        pub backends: u32,
        pub maglev_slots: u32,
        pub ct: u32,
        pub affinity: u32,
        pub members: u32,
    }

    impl Default for Capacities {
        fn default() -> Self {
            Self {
                services: SERVICES,
                backends: BACKENDS,
                maglev_slots: MAGLEV_SLOTS,
                ct: CT,
                affinity: AFFINITY,
                members: MEMBERS,
            }
        }
    }
}
