//! The IPv6 maps' names, keys and values (`lb6_*`), beside the IPv4 ones in [`crate::maps`].
//!
//! Only the maps that hold an address have an IPv6 twin. Frontend ids and backend ids are one
//! space for both families (the agent allocates them), so the maps indexed by id alone serve
//! both: `LB4_MAGLEV` (table slots are backend ids), `LB4_SVC_STATS` and `LB4_FE_META` (by
//! frontend id). Their names keep the `LB4_` of the layout they were pinned under.
//!
//! An IPv6 address is kept as `[u32; 4]` in network byte order (the 16 bytes exactly as in the
//! packet, read four at a time), so that it compares in four loads and keys stay 4-byte aligned.

use core::mem::size_of;

use crate::maps::{Lb4MemberKey, CT_DIR_FORWARD, CT_FLAG_HAIRPIN, CT_FLAG_NODE_SNAT, SCOPE_EXTERNAL};

/// Frontends of IPv6 addresses: `Lb6ServiceKey` → `Lb4Service` (the value holds no address).
pub const MAP_LB6_SERVICES: &str = "LB6_SERVICES";
/// IPv6 backends by id (`Lb6Backend`); an id is in this map or in `LB4_BACKENDS`, never both.
pub const MAP_LB6_BACKENDS: &str = "LB6_BACKENDS";
/// (Frontend id, backend id) → `Lb6Member`, for IPv6 frontends.
pub const MAP_LB6_MEMBERS: &str = "LB6_MEMBERS";
/// Connection tracking of IPv6 flows (`Lb6CtKey` → `Lb6CtEntry`).
pub const MAP_LB6_CT: &str = "LB6_CT";
/// ClientIP session affinity of IPv6 clients (`Lb6AffinityKey` → `Lb4Affinity`).
pub const MAP_LB6_AFFINITY: &str = "LB6_AFFINITY";
/// Non-first IPv6 fragments → the ports of their datagram's first fragment.
pub const MAP_LB6_FRAGS: &str = "LB6_FRAGS";

/// An IPv6 address as the maps hold it: the 16 bytes in packet order, four at a time.
pub type Addr6 = [u32; 4];

/// The map form of the 16 bytes of an IPv6 address in packet order.
pub const fn addr6(octets: [u8; 16]) -> Addr6 {
    let o = octets;
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The 16 bytes in packet order of an address in map form.
pub const fn octets6(a: Addr6) -> [u8; 16] {
    let (w, x, y, z) = (a[0].to_ne_bytes(), a[1].to_ne_bytes(), a[2].to_ne_bytes(), a[3].to_ne_bytes());
    [w[0], w[1], w[2], w[3], x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3], z[0], z[1], z[2], z[3]]
}

/// Key of `LB6_SERVICES`: a frontend, [VIP]:port/protocol (as `Lb4ServiceKey`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb6ServiceKey {
    /// Service IPv6 address, network byte order.
    pub addr: Addr6,
    /// Service port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
    pub scope: u8,
}
const _: () = assert!(size_of::<Lb6ServiceKey>() == 20);

impl Lb6ServiceKey {
    /// Builds a key from host-order values.
    pub const fn new(addr: [u8; 16], port: u16, proto: u8) -> Self {
        Self { addr: addr6(addr), port: port.to_be(), proto, scope: SCOPE_EXTERNAL }
    }
}

/// Value of `LB6_BACKENDS`, indexed by backend id (as `Lb4Backend`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb6Backend {
    /// Backend IPv6 address, network byte order.
    pub addr: Addr6,
    /// Backend port, network byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// `BACKEND_STATE_*`.
    pub state: u8,
}
const _: () = assert!(size_of::<Lb6Backend>() == 20);

impl Lb6Backend {
    /// Builds a backend from host-order values.
    pub const fn new(addr: [u8; 16], port: u16, proto: u8, state: u8) -> Self {
        Self { addr: addr6(addr), port: port.to_be(), proto, state }
    }
}

/// Key of `LB6_MEMBERS`: the same pair as `LB4_MEMBERS`'.
pub type Lb6MemberKey = Lb4MemberKey;

/// Value of `LB6_MEMBERS` (as `Lb4Member`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb6Member {
    /// Backend IPv6 address, network byte order.
    pub addr: Addr6,
    /// Backend port, network byte order.
    pub port: u16,
    /// `MEMBER_*`.
    pub state: u8,
    /// Padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(size_of::<Lb6Member>() == 20);

/// Key of `LB6_CT` (as `Lb4CtKey`, whose documentation holds for both).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb6CtKey {
    /// Source address, network byte order.
    pub saddr: Addr6,
    /// Destination address, network byte order.
    pub daddr: Addr6,
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
const _: () = assert!(size_of::<Lb6CtKey>() == 40);

impl Lb6CtKey {
    /// The key of the forward entry of the flow that reply entry `self` (holding `e`) belongs
    /// to (as `Lb4CtKey::forward_of_reply`).
    #[inline(always)]
    pub fn forward_of_reply(&self, e: &Lb6CtEntry) -> Self {
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

/// Value of `LB6_CT` (as `Lb4CtEntry`, field for field, with IPv6 addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb6CtEntry {
    pub last_seen_ns: u64,
    pub created_s: u32,
    pub snat_port: u16,
    /// Padding, always zero.
    pub _pad: u16,
    pub nat_addr: Addr6,
    pub nat_port: u16,
    pub state: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub svc_id: u32,
    pub snat_addr: Addr6,
    /// Padding, always zero.
    pub _pad1: u32,
}
const _: () = assert!(size_of::<Lb6CtEntry>() == 64);

/// Key of `LB6_AFFINITY`: ClientIP session affinity, per client address and frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb6AffinityKey {
    /// Client IPv6 address, network byte order.
    pub client: Addr6,
    /// Frontend id.
    pub svc_id: u32,
}
const _: () = assert!(size_of::<Lb6AffinityKey>() == 20);

/// Key of `LB6_FRAGS`: one IPv6 datagram in fragments (RFC 8200 §4.5: source, destination and
/// the Fragment header's identification; the protocol after it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb6FragKey {
    pub saddr: Addr6,
    pub daddr: Addr6,
    /// Identification, network byte order.
    pub id: u32,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Padding, always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<Lb6FragKey>() == 40);

/// `loadBalancerSourceRanges` of IPv6 frontends (`Lb6SrcRange` → `SRC_RANGE_ALLOW` or
/// `SRC_RANGE_DENY`), as `LB4_SRC_RANGES` for IPv4 ones.
pub const MAP_LB6_SRC_RANGES: &str = "LB6_SRC_RANGES";

/// The data of an `LB6_SRC_RANGES` key (as `Lb4SrcRange`): a frontend's deny entry has prefix
/// length [`SRC_RANGE_FRONTEND_BITS6`], each of its ranges that plus the range's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lb6SrcRange {
    pub frontend: Lb6ServiceKey,
    /// The client address (prefix).
    pub src: Addr6,
}
const _: () = assert!(size_of::<Lb6SrcRange>() == 36);

/// `[0]` (`u32`): non-zero while `LB6_SRC_RANGES` may hold an entry; the lb6 forward program
/// looks a client up there only then.
pub const MAP_LB6_RANGES_ON: &str = "LB6_RANGES_ON";

/// The prefix length of a frontend's deny entry in `LB6_SRC_RANGES` (its key's bits).
pub const SRC_RANGE_FRONTEND_BITS6: u32 = 160;

/// Pinned: socket-level load balancing's reverse translations for IPv6 sockets, as
/// `LB4_SOCK_REV` (`Lb6SockRevKey` → `Lb6SockRev`): written by `connect6` and `sendmsg6`, read by
/// `recvmsg6` and `getpeername6`. An IPv6 socket that asks for an IPv4-mapped address
/// (`::ffff:a.b.c.d`) is translated through the IPv4 path and its entries are `LB4_SOCK_*`'s.
/// Session affinity for sockets of both families is `LB4_SOCK_AFFINITY`'s (keyed by frontend id,
/// one space for both).
pub const MAP_LB6_SOCK_REV: &str = "LB6_SOCK_REV";
/// Pinned: socket-level load balancing's choices for IPv6 sockets, as `LB4_SOCK_FWD`
/// (`Lb6SockFwdKey` → `Lb6SockFwd`).
pub const MAP_LB6_SOCK_FWD: &str = "LB6_SOCK_FWD";

/// Key of `LB6_SOCK_REV` (as `Lb4SockRevKey`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb6SockRevKey {
    /// The socket's cookie (`bpf_get_socket_cookie`).
    pub cookie: u64,
    /// The backend the socket was sent to.
    pub addr: Addr6,
    /// Its port, network byte order.
    pub port: u16,
    /// Padding, always zero.
    pub _pad: [u16; 3],
}
const _: () = assert!(size_of::<Lb6SockRevKey>() == 32);

/// Value of `LB6_SOCK_REV` (as `Lb4SockRev`): the Service address and port the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb6SockRev {
    pub vip: Addr6,
    /// Network byte order.
    pub vport: u16,
    /// Padding, always zero.
    pub _pad: u16,
    /// The frontend translated.
    pub svc_id: u32,
    /// The backend given.
    pub backend_id: u32,
}
const _: () = assert!(size_of::<Lb6SockRev>() == 28);

/// Key of `LB6_SOCK_FWD` (as `Lb4SockFwdKey`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lb6SockFwdKey {
    /// The socket's cookie.
    pub cookie: u64,
    /// The Service address.
    pub vip: Addr6,
    /// Its port, network byte order.
    pub vport: u16,
    /// `IPPROTO_UDP` (written by programs before 2026-12-08 for TCP too; nothing reads those).
    pub proto: u8,
    /// Padding, always zero.
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<Lb6SockFwdKey>() == 32);

/// Value of `LB6_SOCK_FWD` (as `Lb4SockFwd`): the backend a socket was given for a Service
/// address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lb6SockFwd {
    pub backend_id: u32,
    pub addr: Addr6,
    /// Network byte order.
    pub port: u16,
    /// Padding, always zero.
    pub _pad: u16,
}
const _: () = assert!(size_of::<Lb6SockFwd>() == 24);

/// Whether `a` is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, RFC 4291 §2.5.5.2); its IPv4
/// address (network byte order) if so.
#[inline(always)]
pub const fn v4_mapped(a: Addr6) -> Option<u32> {
    if a[0] == 0 && a[1] == 0 && a[2] == u32::from_be(0x0000_ffff) {
        Some(a[3])
    } else {
        None
    }
}

/// The IPv4-mapped IPv6 address of `v4` (network byte order).
#[inline(always)]
pub const fn mapped6(v4: u32) -> Addr6 {
    [0, 0, u32::from_be(0x0000_ffff), v4]
}

/// The map of the IPv6 Service addresses (see `lb-ebpf`'s `LB6_VIPS`).
pub const MAP_LB6_VIPS: &str = "LB6_VIPS";
/// The program arrays the IPv4 entry points tail-call the IPv6 programs through.
pub const MAP_LB_TAIL_TC: &str = "LB_TAIL_TC";
pub const MAP_LB_TAIL_XDP: &str = "LB_TAIL_XDP";
/// Slots of the program arrays.
pub const TAIL_SLOTS: u32 = 4;
/// `LB_TAIL_TC`: `lb6_tc_forward`, `lb6_tc_reply`; `LB_TAIL_XDP`: `lb6_xdp_forward`.
pub const TAIL_FORWARD: u32 = 0;
pub const TAIL_REPLY: u32 = 1;
/// `LB_TAIL_TC`: `lb6_tc_forward_decided`; `LB_TAIL_XDP`: `lb6_xdp_forward_decided` (the second
/// half of the forward program, tail-called from the first).
pub const TAIL_FORWARD_DECIDED: u32 = 2;

/// The program array the IPv4 TC node-side entry points (`lb4_tc_node_in`, `lb4_tc_node_out`)
/// tail-call the IPv6 ones through: a map of its own, since the pod-side arrays are pinned with
/// [`TAIL_SLOTS`] slots by earlier agents of this layout. (The XDP node program leaves IPv6 to
/// TC.)
pub const MAP_LB_TAIL_NODE_TC: &str = "LB_TAIL_NODE_TC";
/// Slots of the node-side program array.
pub const NODE_TAIL_SLOTS: u32 = 4;
/// `lb6_tc_node_in`.
pub const TAIL_NODE_IN: u32 = 0;
/// `lb6_tc_node_in_decided` (the last program, tail-called from the first or from the reply
/// program).
pub const TAIL_NODE_IN_DECIDED: u32 = 1;
/// `lb6_tc_node_out`.
pub const TAIL_NODE_OUT: u32 = 2;
/// `lb6_tc_node_in_reply` (replies of flows SNATed to this node, tail-called from the first
/// program before the last).
pub const TAIL_NODE_IN_REPLY: u32 = 3;

/// Node interfaces' IPv6 addresses: ifindex → the address (`Addr6`) a flow from outside to a
/// remote endpoint is SNATed to when it leaves through that interface (as `Lb4Interface`'s
/// `snat_addr` for IPv4; the interface's role is in `LB4_IFS`). Written by the agent as it
/// attaches node interfaces; an interface without an entry has no IPv6 address to SNAT to.
pub const MAP_LB6_IFS: &str = "LB6_IFS";

/// Set in `kind` (`EVENT_NEW_FLOW`, `EVENT_DROP`, `EVENT_SOCK`) of an event about IPv6: the
/// record is an [`LbEvent6`], not an `LbEvent`.
pub const EVENT_IPV6: u32 = 0x100;

/// A datapath event about IPv6 for `lbctl monitor` (`kind` has [`EVENT_IPV6`]): `LbEvent`'s
/// fields with IPv6 addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbEvent6 {
    pub kind: u32,
    pub reason: u32,
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
    pub backend_addr: Addr6,
    pub backend_port: u16,
    pub _pad2: u16,
    pub svc_id: u32,
    pub pid: u32,
    /// Padding, always zero.
    pub _pad3: u32,
    pub ts_ns: u64,
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<LbEvent6>() == 104);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)], made only of integers, with explicit padding fields, so every bit
    // pattern is valid and no byte is uninitialised. The same holds for the types below.
    unsafe impl aya::Pod for Lb6ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6Member {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6CtEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6SrcRange {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6SockRevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6SockRev {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6SockFwdKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Lb6SockFwd {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_keep_packet_order() {
        let o = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
        let a = addr6(o);
        assert_eq!(octets6(a), o);
        assert_eq!(a[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        let k = Lb6ServiceKey::new(o, 443, 6);
        assert_eq!(k.port.to_ne_bytes(), [0x01, 0xbb]);
    }

    #[test]
    fn only_the_ipv4_mapped_prefix_is_mapped() {
        let v4 = u32::from_ne_bytes([10, 96, 0, 10]);
        let mapped = addr6([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]);
        assert_eq!(mapped6(v4), mapped);
        assert_eq!(v4_mapped(mapped), Some(v4));
        // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::a.b.c.d), SIIT (::ffff:0:a.b.c.d),
        // fd00::ffff:a.b.c.d, ::1: not mapped.
        let others: [[u8; 16]; 5] = [
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 96, 0, 10],
            [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0, 10, 96, 0, 10],
            [0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 10, 96, 0, 10],
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ];
        for o in others {
            assert_eq!(v4_mapped(addr6(o)), None, "{o:?}");
        }
    }
}
