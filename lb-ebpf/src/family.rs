//! The address family as a type. The decision (`lb`), conntrack, fragments and the pipeline are
//! written once, generic over a [`Family`], and compiled (inlined, monomorphised) for each: IPv4
//! ([`V4`]) today; IPv6 (`V6`, over `lb_common::maps6` and the `LB6_*` maps) slots in beside it.
//!
//! What a family supplies ([`Family`]): its address type, its maps, and the parts that are its
//! own by nature: parsing, header rewriting (IPv4 keeps an IP header checksum; IPv6 has none, and
//! only the L4 pseudo-header changes: one `bpf_csum_diff` over the 16-byte addresses, one
//! `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR`), ICMP errors (ICMPv6's checksum covers a
//! pseudo-header), answers to rejected packets, route lookups, source ranges, the fragment key
//! (the IPv6 Fragment header's identification is 32 bits). Frontend ids and backend ids are one
//! space for both families, so the maps indexed by id alone (`LB4_MAGLEV`, `LB4_SVC_STATS`), and
//! the values that hold no address (`Lb4Service`, `Lb4Affinity`, `Lb4FragPorts`), serve both.
//!
//! The rows that hold an address are seen by the shared code as generic rows ([`SvcKey`],
//! [`AffinityKey`], [`CtKey`], [`CtEntry`], [`Backend`], [`Member`]): `lb_common`'s `Lb4*` and
//! `Lb6*` types field for field, with the family's address (`assert_rows!` checks each layout), so
//! that the shared code reads and writes fields as it did the IPv4 types. (Through accessor
//! methods on the `lb_common` types, the generic code compiled to more instructions and deeper
//! frames than Linux 5.10 allows: `tests/stack.rs`.) The maps keep their `lb_common` types;
//! `map_as!` views them through the generic rows.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    maps::{lpm_trie::Key, Array, HashMap, LruHashMap},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    hash::{lb4_flow_hash, lb6_flow_hash},
    reject, Lb4Affinity, Lb4AffinityKey, Lb4Backend, Lb4CtEntry, Lb4CtKey, Lb4FragKey, Lb4FragPorts,
    Lb4Member, Lb4MemberKey, Lb4Service, Lb4ServiceKey, Lb4SrcRange, Lb6FragKey, Lb6ServiceKey, Lb6SrcRange,
    CT_DIR_FORWARD, CT_FLAG_HAIRPIN, CT_FLAG_NODE_SNAT, IF_ROLE_NODE, SCOPE_EXTERNAL, SRC_RANGE_DENY,
    SRC_RANGE_FRONTEND_BITS, SRC_RANGE_FRONTEND_BITS6,
};

use crate::{
    config,
    ctx::PacketCtx,
    maps::{
        LB4_AFFINITY, LB4_BACKENDS, LB4_CT, LB4_FRAGS, LB4_IFS, LB4_MEMBERS, LB4_SERVICES, LB4_SRC_RANGES,
        LB6_AFFINITY, LB6_BACKENDS, LB6_CT, LB6_FRAGS, LB6_IFS, LB6_MEMBERS, LB6_SERVICES, LB6_SRC_RANGES,
        LB6_VIPS,
    },
    nat::{self, IcmpNat, Side},
    nat6,
    parse::{self, Flow, IcmpError, Parsed, ETH_HLEN},
    parse6,
};

/// An address as packets and maps hold it (network byte order).
pub trait Address: Copy + PartialEq {
    /// The unspecified address, which map values use for "none" (`snat_addr` 0).
    const ZERO: Self;
}

impl Address for u32 {
    const ZERO: u32 = 0;
}

impl Address for [u32; 4] {
    const ZERO: [u32; 4] = [0; 4];
}

/// A frontend key of any family (`LB4_SERVICES`' key `Lb4ServiceKey`, `Lb6ServiceKey`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SvcKey<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// A session affinity key of any family (`LB4_AFFINITY`'s key `Lb4AffinityKey`,
/// `Lb6AffinityKey`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AffinityKey<A> {
    pub client: A,
    pub svc_id: u32,
}

/// A backend of any family (`LB4_BACKENDS`' value `Lb4Backend`, `Lb6Backend`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Backend<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub state: u8,
}

/// A frontend's member of any family (`LB4_MEMBERS`' value `Lb4Member`, `Lb6Member`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Member<A> {
    pub addr: A,
    pub port: u16,
    pub state: u8,
    pub _pad: u8,
}

/// A conntrack key of any family (`LB4_CT`'s key `Lb4CtKey`, `Lb6CtKey`).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CtKey<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

impl<A: Copy + PartialEq> CtKey<A> {
    /// Whether `self` and `other` have the same addresses, ports and protocol (for two keys of
    /// one direction, whose padding is zero: whether they are equal, in fewer comparisons than
    /// `==`, which also costs the SNAT port search registers it has none to spare for).
    #[inline(always)]
    pub fn same_tuple(&self, other: &Self) -> bool {
        self.saddr == other.saddr
            && self.daddr == other.daddr
            && self.sport == other.sport
            && self.dport == other.dport
            && self.proto == other.proto
    }

    /// The key of the forward entry of the flow that reply entry `self` (holding `e`) belongs to:
    /// the rule of `lb_common::Lb4CtKey::forward_of_reply` (the agent's), for every family.
    #[inline(always)]
    pub fn forward_of_reply(&self, e: &CtEntry<A>) -> Self {
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

/// A conntrack entry of any family (`LB4_CT`'s value `Lb4CtEntry`, `Lb6CtEntry`, which document
/// the fields).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CtEntry<A> {
    pub last_seen_ns: u64,
    pub created_s: u32,
    pub snat_port: u16,
    pub _pad: u16,
    pub nat_addr: A,
    pub nat_port: u16,
    pub state: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub svc_id: u32,
    pub snat_addr: A,
    pub _pad1: u32,
}

/// With address `A`, the generic rows are `lb_common`'s `S` (service key), `F` (affinity key), `K`
/// (conntrack key), `E` (conntrack entry), `B` (backend) and `M` (member) field for field.
macro_rules! assert_rows {
    ($a:ty, $s:ty, $f:ty, $k:ty, $e:ty, $b:ty, $m:ty) => {
        const _: () = {
            use core::mem::{align_of, offset_of, size_of};
            assert!(size_of::<SvcKey<$a>>() == size_of::<$s>() && align_of::<SvcKey<$a>>() == align_of::<$s>());
            assert!(offset_of!(SvcKey<$a>, addr) == offset_of!($s, addr));
            assert!(offset_of!(SvcKey<$a>, port) == offset_of!($s, port));
            assert!(offset_of!(SvcKey<$a>, proto) == offset_of!($s, proto));
            assert!(offset_of!(SvcKey<$a>, scope) == offset_of!($s, scope));
            assert!(size_of::<AffinityKey<$a>>() == size_of::<$f>() && align_of::<AffinityKey<$a>>() == align_of::<$f>());
            assert!(offset_of!(AffinityKey<$a>, client) == offset_of!($f, client));
            assert!(offset_of!(AffinityKey<$a>, svc_id) == offset_of!($f, svc_id));
            assert!(size_of::<Backend<$a>>() == size_of::<$b>() && align_of::<Backend<$a>>() == align_of::<$b>());
            assert!(offset_of!(Backend<$a>, addr) == offset_of!($b, addr));
            assert!(offset_of!(Backend<$a>, port) == offset_of!($b, port));
            assert!(offset_of!(Backend<$a>, proto) == offset_of!($b, proto));
            assert!(offset_of!(Backend<$a>, state) == offset_of!($b, state));
            assert!(size_of::<Member<$a>>() == size_of::<$m>() && align_of::<Member<$a>>() == align_of::<$m>());
            assert!(offset_of!(Member<$a>, addr) == offset_of!($m, addr));
            assert!(offset_of!(Member<$a>, port) == offset_of!($m, port));
            assert!(offset_of!(Member<$a>, state) == offset_of!($m, state));
            assert!(size_of::<CtKey<$a>>() == size_of::<$k>() && align_of::<CtKey<$a>>() == align_of::<$k>());
            assert!(offset_of!(CtKey<$a>, saddr) == offset_of!($k, saddr));
            assert!(offset_of!(CtKey<$a>, daddr) == offset_of!($k, daddr));
            assert!(offset_of!(CtKey<$a>, sport) == offset_of!($k, sport));
            assert!(offset_of!(CtKey<$a>, dport) == offset_of!($k, dport));
            assert!(offset_of!(CtKey<$a>, proto) == offset_of!($k, proto));
            assert!(offset_of!(CtKey<$a>, dir) == offset_of!($k, dir));
            assert!(size_of::<CtEntry<$a>>() == size_of::<$e>() && align_of::<CtEntry<$a>>() == align_of::<$e>());
            assert!(offset_of!(CtEntry<$a>, last_seen_ns) == offset_of!($e, last_seen_ns));
            assert!(offset_of!(CtEntry<$a>, created_s) == offset_of!($e, created_s));
            assert!(offset_of!(CtEntry<$a>, snat_port) == offset_of!($e, snat_port));
            assert!(offset_of!(CtEntry<$a>, nat_addr) == offset_of!($e, nat_addr));
            assert!(offset_of!(CtEntry<$a>, nat_port) == offset_of!($e, nat_port));
            assert!(offset_of!(CtEntry<$a>, state) == offset_of!($e, state));
            assert!(offset_of!(CtEntry<$a>, flags) == offset_of!($e, flags));
            assert!(offset_of!(CtEntry<$a>, backend_id) == offset_of!($e, backend_id));
            assert!(offset_of!(CtEntry<$a>, svc_id) == offset_of!($e, svc_id));
            assert!(offset_of!(CtEntry<$a>, snat_addr) == offset_of!($e, snat_addr));
        };
    };
}

assert_rows!(u32, Lb4ServiceKey, Lb4AffinityKey, Lb4CtKey, Lb4CtEntry, Lb4Backend, Lb4Member);
// The IPv6 twins, for `V6`.
assert_rows!(
    [u32; 4],
    lb_common::Lb6ServiceKey,
    lb_common::Lb6AffinityKey,
    lb_common::Lb6CtKey,
    lb_common::Lb6CtEntry,
    lb_common::Lb6Backend,
    lb_common::Lb6Member
);

/// Map `$map` seen as `$ty`, a map of the generic rows of the same layout (`assert_rows!`).
macro_rules! map_as {
    ($map:expr, $ty:ty) => {
        // SAFETY: the key and value of `$ty` are `$map`'s field for field (`assert_rows!`). A
        // map's handle is its definition (sized by those same sizes) and a marker of its types,
        // so it reads the same under either pair.
        unsafe { &*core::ptr::addr_of!($map).cast::<$ty>() }
    };
}

/// An address family: what the shared datapath code needs to know of it.
pub trait Family: Copy + 'static {
    /// An address, network byte order.
    type Addr: Address;
    /// The identification that fragments of one datagram share (IPv4: 16 bits; the IPv6
    /// Fragment header's: 32 bits), network byte order.
    type FragId: Copy;
    type FragKey;

    /// The family's ICMP (1; ICMPv6: 58): the protocol a route for an ICMP error is looked up
    /// with.
    const IPPROTO_ICMP: u8;
    /// Linear bytes that hold the headers of almost every packet (a TC program makes them
    /// readable before it parses).
    const COMMON_HEADERS: u32;
    /// Linear bytes for the largest headers lb reads (pulled when the common ones were not
    /// enough).
    const MAX_HEADERS: u32;

    // The family's maps.
    fn services() -> &'static HashMap<SvcKey<Self::Addr>, Lb4Service>;
    /// The family's backends and members maps, as the shared code sees their rows ([`Backend`],
    /// [`Member`]).
    fn backends() -> &'static Array<Backend<Self::Addr>>;
    fn members() -> &'static HashMap<Lb4MemberKey, Member<Self::Addr>>;
    /// The conntrack map, as the shared code sees its rows ([`CtKey`], [`CtEntry`]).
    fn ct() -> &'static LruHashMap<CtKey<Self::Addr>, CtEntry<Self::Addr>>;
    fn affinity() -> &'static LruHashMap<AffinityKey<Self::Addr>, Lb4Affinity>;
    fn frags() -> &'static LruHashMap<Self::FragKey, Lb4FragPorts>;

    // Keys the shared code builds.
    fn frag_key(saddr: Self::Addr, daddr: Self::Addr, id: Self::FragId, proto: u8) -> Self::FragKey;

    /// The source address of hairpinned flows (a load-time setting).
    fn hairpin_addr() -> Self::Addr;
    /// The flow hash (Maglev slot, SNAT port sequence) of a tuple.
    fn flow_hash(saddr: Self::Addr, daddr: Self::Addr, sport: u16, dport: u16, proto: u8, seed: u32) -> u32;
    /// Whether client `src` may open a flow to external frontend `addr:port`/`proto`
    /// (`loadBalancerSourceRanges`).
    fn source_allowed(addr: Self::Addr, port: u16, proto: u8, src: Self::Addr) -> bool;
    /// [`Family::source_allowed`] for a new flow `f`, in the decision of a forward or node-side
    /// program (IPv6: the verdict the program's first half found before the decision).
    fn decided_source_allowed(f: &Flow<Self>) -> bool;
    /// Sends a flow or socket event of the family's record (`LbEvent`, `LbEvent6`), with the
    /// calling process (socket events; zeroes for packets); the caller checked that events are on
    /// and the rate allows.
    fn output_event(
        t: (Self::Addr, Self::Addr, u16, u16, u8),
        kind: u32,
        reason: u32,
        backend: (Self::Addr, u16),
        svc_id: u32,
        now: u64,
        process: (u32, [u8; 16]),
    );
    /// Whether `addr` is the address of a Service frontend, whatever its port (for a packet
    /// whose ports lb cannot see).
    fn is_frontend_addr(addr: Self::Addr) -> bool;

    // Headers: parsing and rewriting are the family's own.
    /// Parses the packet at `data..end` (its Ethernet header first).
    fn parse(data: usize, end: usize) -> Parsed<Self>;
    /// TC: writes `addr` and `port` into one side of `f`, keeping the checksums right.
    fn rewrite_tc(ctx: &TcContext, f: &Flow<Self>, side: Side, addr: Self::Addr, port: u16)
        -> Result<(), ()>;
    /// XDP: the same, the checksums updated incrementally.
    fn rewrite_xdp(
        ctx: &XdpContext,
        f: &Flow<Self>,
        side: Side,
        addr: Self::Addr,
        port: u16,
    ) -> Result<(), ()>;
    /// A non-first fragment: writes `addr` into one side of its IP header (it has no L4 header).
    /// Returns how much the sum of the bytes after the Ethernet header changed (a received
    /// packet's sum follows it: `PacketCtx::sum_changed`): 0 where a header checksum offsets it.
    fn rewrite_addr(data: usize, end: usize, side: Side, addr: Self::Addr) -> Result<u16, ()>;
    /// XDP: whether the L4 checksum of `f` may be partial (see `nat::csum_maybe_partial`).
    fn csum_maybe_partial(data: usize, end: usize, f: &Flow<Self>) -> bool;
    /// Rewrites ICMP error `e` as `n` says, its checksums kept right.
    fn rewrite_icmp_error<C: PacketCtx>(ctx: &C, e: &IcmpError<Self>, n: &IcmpNat<Self>) -> Result<(), ()>;
    /// Whether packet `f` may be answered with a port unreachable (and its headers are quoted
    /// whole by [`Family::reject_tc`]).
    fn reject_answerable(f: &Flow<Self>) -> bool;
    /// TC: turns the packet into its port unreachable and bounces it (see `nat::reject_tc`).
    fn reject_tc(ctx: &TcContext) -> Result<i32, ()>;

    // Routes.
    /// The family's `AF_*` (a route lookup's `family`).
    const AF: u8;
    /// Fills the addresses of a route lookup.
    fn fib_addrs(p: &mut bpf_fib_lookup, saddr: Self::Addr, daddr: Self::Addr);
    /// The address a flow from outside is SNATed to when it leaves through node interface
    /// `ifindex` (`LB4_IFS`, `LB6_IFS`); `Address::ZERO` if it has none. (An address, not an
    /// `Option`: Linux 5.10's verifier refuses the IPv6 node program where the optimiser reads an
    /// `Option<[u32; 4]>`'s payload on the path where it was never written.)
    fn if_snat_addr(ifindex: u32) -> Self::Addr;
}

/// IPv4.
#[derive(Clone, Copy)]
pub struct V4;

impl Family for V4 {
    type Addr = u32;
    type FragId = u16;
    type FragKey = Lb4FragKey;

    const IPPROTO_ICMP: u8 = lb_common::IPPROTO_ICMP;
    /// `AF_INET`.
    const AF: u8 = 2;
    /// Ethernet, IPv4 without options and a TCP header (a UDP header is shorter).
    const COMMON_HEADERS: u32 = 14 + 20 + 20;
    /// Ethernet, IPv4 with options, and an ICMP error quoting an IPv4 header with options and a
    /// TCP header.
    const MAX_HEADERS: u32 = 14 + 60 + 8 + 60 + 20;

    #[inline(always)]
    fn services() -> &'static HashMap<SvcKey<u32>, Lb4Service> {
        map_as!(LB4_SERVICES, HashMap<SvcKey<u32>, Lb4Service>)
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend<u32>> {
        map_as!(LB4_BACKENDS, Array<Backend<u32>>)
    }
    #[inline(always)]
    fn members() -> &'static HashMap<Lb4MemberKey, Member<u32>> {
        map_as!(LB4_MEMBERS, HashMap<Lb4MemberKey, Member<u32>>)
    }
    #[inline(always)]
    fn ct() -> &'static LruHashMap<CtKey<u32>, CtEntry<u32>> {
        map_as!(LB4_CT, LruHashMap<CtKey<u32>, CtEntry<u32>>)
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<u32>, Lb4Affinity> {
        map_as!(LB4_AFFINITY, LruHashMap<AffinityKey<u32>, Lb4Affinity>)
    }
    #[inline(always)]
    fn frags() -> &'static LruHashMap<Lb4FragKey, Lb4FragPorts> {
        &LB4_FRAGS
    }

    #[inline(always)]
    fn frag_key(saddr: u32, daddr: u32, id: u16, proto: u8) -> Lb4FragKey {
        Lb4FragKey { saddr, daddr, id, proto, _pad: 0 }
    }

    #[inline(always)]
    fn hairpin_addr() -> u32 {
        config::hairpin_addr()
    }
    #[inline(always)]
    fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
        lb4_flow_hash(saddr, daddr, sport, dport, proto, seed)
    }
    #[inline(always)]
    fn decided_source_allowed(f: &Flow<V4>) -> bool {
        Self::source_allowed(f.daddr, f.dport, f.proto, f.saddr)
    }
    /// `LB4_SRC_RANGES`: both scopes of an address share its ranges, under its external key.
    #[inline(always)]
    fn source_allowed(addr: u32, port: u16, proto: u8, src: u32) -> bool {
        let frontend = Lb4ServiceKey { addr, port, proto, scope: SCOPE_EXTERNAL };
        let key = Key::new(SRC_RANGE_FRONTEND_BITS + 32, Lb4SrcRange { frontend, src });
        LB4_SRC_RANGES.get(&key).is_none_or(|v| *v != SRC_RANGE_DENY)
    }
    #[inline(always)]
    fn output_event(
        t: (u32, u32, u16, u16, u8),
        kind: u32,
        reason: u32,
        backend: (u32, u16),
        svc_id: u32,
        now: u64,
        process: (u32, [u8; 16]),
    ) {
        crate::monitor::output4(t, kind, reason, backend, svc_id, now, process);
    }
    /// Never asked: the IPv4 parser always finds the ports.
    #[inline(always)]
    fn is_frontend_addr(_addr: u32) -> bool {
        false
    }

    #[inline(always)]
    fn parse(data: usize, end: usize) -> Parsed<V4> {
        parse::parse(data, end)
    }
    #[inline(always)]
    fn rewrite_tc(ctx: &TcContext, f: &Flow<V4>, side: Side, addr: u32, port: u16) -> Result<(), ()> {
        nat::rewrite_tc(ctx, f, side, addr, port).map_err(|_| ())
    }
    #[inline(always)]
    fn rewrite_xdp(ctx: &XdpContext, f: &Flow<V4>, side: Side, addr: u32, port: u16) -> Result<(), ()> {
        nat::rewrite_xdp(ctx, f, side, addr, port)
    }
    #[inline(always)]
    fn rewrite_addr(data: usize, end: usize, side: Side, addr: u32) -> Result<u16, ()> {
        // The IPv4 header checksum offsets the address.
        nat::rewrite_ip(data, end, side, addr).map(|()| 0)
    }
    #[inline(always)]
    fn csum_maybe_partial(data: usize, end: usize, f: &Flow<V4>) -> bool {
        nat::csum_maybe_partial(data, end, f)
    }
    #[inline(always)]
    fn rewrite_icmp_error<C: PacketCtx>(ctx: &C, e: &IcmpError<V4>, n: &IcmpNat<V4>) -> Result<(), ()> {
        nat::rewrite_icmp_error(ctx, e, n).map_err(|_| ())
    }
    /// Only where RFC 1122 allows one, and for headers the answer quotes whole (no IP options).
    #[inline(always)]
    fn reject_answerable(f: &Flow<V4>) -> bool {
        f.l4_off == ETH_HLEN + 20 && reject::answerable(0x45, f.saddr.to_ne_bytes())
    }
    #[inline(always)]
    fn reject_tc(ctx: &TcContext) -> Result<i32, ()> {
        nat::reject_tc(ctx)
    }

    #[inline(always)]
    fn fib_addrs(p: &mut bpf_fib_lookup, saddr: u32, daddr: u32) {
        p.__bindgen_anon_3.ipv4_src = saddr;
        p.__bindgen_anon_4.ipv4_dst = daddr;
    }
    /// A node interface's IPv4 address (`Lb4Interface::snat_addr`; 0: none).
    #[inline(always)]
    fn if_snat_addr(ifindex: u32) -> u32 {
        // SAFETY: the value is copied out at once.
        match unsafe { LB4_IFS.get(&ifindex) } {
            Some(i) if i.role == IF_ROLE_NODE => i.snat_addr,
            _ => 0,
        }
    }
}

/// IPv6: the `LB6_*` maps, `crate::parse6` and `crate::nat6`.
#[derive(Clone, Copy)]
pub struct V6;

impl Family for V6 {
    type Addr = [u32; 4];
    type FragId = u32;
    type FragKey = Lb6FragKey;

    const IPPROTO_ICMP: u8 = parse6::IPPROTO_ICMPV6;
    /// `AF_INET6`.
    const AF: u8 = 10;
    /// Ethernet, IPv6 and a TCP header.
    const COMMON_HEADERS: u32 = 14 + 40 + 20;
    /// Ethernet, IPv6, extension headers (up to `parse6::MAX_EXT_HEADERS`, here as long as 392
    /// bytes together) and a TCP header; this also holds an ICMPv6 error's quote.
    const MAX_HEADERS: u32 = 14 + 40 + 392 + 20;

    #[inline(always)]
    fn services() -> &'static HashMap<SvcKey<[u32; 4]>, Lb4Service> {
        map_as!(LB6_SERVICES, HashMap<SvcKey<[u32; 4]>, Lb4Service>)
    }
    #[inline(always)]
    fn backends() -> &'static Array<Backend<[u32; 4]>> {
        map_as!(LB6_BACKENDS, Array<Backend<[u32; 4]>>)
    }
    #[inline(always)]
    fn members() -> &'static HashMap<Lb4MemberKey, Member<[u32; 4]>> {
        map_as!(LB6_MEMBERS, HashMap<Lb4MemberKey, Member<[u32; 4]>>)
    }
    #[inline(always)]
    fn ct() -> &'static LruHashMap<CtKey<[u32; 4]>, CtEntry<[u32; 4]>> {
        map_as!(LB6_CT, LruHashMap<CtKey<[u32; 4]>, CtEntry<[u32; 4]>>)
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<[u32; 4]>, Lb4Affinity> {
        map_as!(LB6_AFFINITY, LruHashMap<AffinityKey<[u32; 4]>, Lb4Affinity>)
    }
    #[inline(always)]
    fn frags() -> &'static LruHashMap<Lb6FragKey, Lb4FragPorts> {
        &LB6_FRAGS
    }

    #[inline(always)]
    fn frag_key(saddr: [u32; 4], daddr: [u32; 4], id: u32, proto: u8) -> Lb6FragKey {
        Lb6FragKey { saddr, daddr, id, proto, _pad: [0; 3] }
    }

    #[inline(always)]
    fn hairpin_addr() -> [u32; 4] {
        config::hairpin_addr6()
    }
    #[inline(always)]
    fn flow_hash(saddr: [u32; 4], daddr: [u32; 4], sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
        lb6_flow_hash(saddr, daddr, sport, dport, proto, seed)
    }
    /// The verdict the first half of the forward or node-side program found for the flow it left
    /// (`pipeline::forward_parsed`, `pipeline::node_in_parsed`): looked up there, once per packet,
    /// rather than on every path the verifier walks through the decision (which would take it past
    /// half its limit).
    #[inline(always)]
    fn decided_source_allowed(_f: &Flow<V6>) -> bool {
        !crate::pipeline::stored_source_denied::<V6>()
    }
    /// `LB6_SRC_RANGES`, as `LB4_SRC_RANGES` for IPv4.
    #[inline(always)]
    fn source_allowed(addr: [u32; 4], port: u16, proto: u8, src: [u32; 4]) -> bool {
        let frontend = Lb6ServiceKey { addr, port, proto, scope: SCOPE_EXTERNAL };
        let key = Key::new(SRC_RANGE_FRONTEND_BITS6 + 128, Lb6SrcRange { frontend, src });
        LB6_SRC_RANGES.get(&key).is_none_or(|v| *v != SRC_RANGE_DENY)
    }
    #[inline(always)]
    fn output_event(
        t: ([u32; 4], [u32; 4], u16, u16, u8),
        kind: u32,
        reason: u32,
        backend: ([u32; 4], u16),
        svc_id: u32,
        now: u64,
        process: (u32, [u8; 16]),
    ) {
        crate::monitor::output6(t, kind, reason, backend, svc_id, now, process);
    }
    #[inline(always)]
    fn is_frontend_addr(addr: [u32; 4]) -> bool {
        // SAFETY: only whether there is a value.
        unsafe { LB6_VIPS.get(&addr) }.is_some()
    }

    #[inline(always)]
    fn parse(data: usize, end: usize) -> Parsed<V6> {
        parse6::parse(data, end)
    }
    #[inline(always)]
    fn rewrite_tc(ctx: &TcContext, f: &Flow<V6>, side: Side, addr: [u32; 4], port: u16) -> Result<(), ()> {
        nat6::rewrite_tc(ctx, f, side, addr, port)
    }
    #[inline(always)]
    fn rewrite_xdp(ctx: &XdpContext, f: &Flow<V6>, side: Side, addr: [u32; 4], port: u16) -> Result<(), ()> {
        nat6::rewrite_xdp(ctx, f, side, addr, port)
    }
    #[inline(always)]
    fn rewrite_addr(data: usize, end: usize, side: Side, addr: [u32; 4]) -> Result<u16, ()> {
        nat6::rewrite_addr(data, end, side, addr)
    }
    #[inline(always)]
    fn csum_maybe_partial(data: usize, end: usize, f: &Flow<V6>) -> bool {
        nat6::csum_maybe_partial(data, end, f)
    }
    #[inline(always)]
    fn rewrite_icmp_error<C: PacketCtx>(ctx: &C, e: &IcmpError<V6>, n: &IcmpNat<V6>) -> Result<(), ()> {
        nat6::rewrite_icmp_error(ctx, e, n)
    }
    /// Only where RFC 4443 allows one, and for a transport header right after the IPv6 header
    /// (the answer quotes it whole).
    #[inline(always)]
    fn reject_answerable(f: &Flow<V6>) -> bool {
        f.l4_off == ETH_HLEN + 40 && reject::answerable6(0x60, f.proto, &lb_common::octets6(f.saddr))
    }
    #[inline(always)]
    fn reject_tc(ctx: &TcContext) -> Result<i32, ()> {
        nat6::reject_tc(ctx)
    }

    #[inline(always)]
    fn fib_addrs(p: &mut bpf_fib_lookup, saddr: [u32; 4], daddr: [u32; 4]) {
        p.__bindgen_anon_3.ipv6_src = saddr;
        p.__bindgen_anon_4.ipv6_dst = daddr;
    }
    /// A node interface's IPv6 address (`LB6_IFS`; none: no entry).
    #[inline(always)]
    fn if_snat_addr(ifindex: u32) -> [u32; 4] {
        // SAFETY: the value is copied out at once.
        match unsafe { LB6_IFS.get(&ifindex) } {
            Some(a) => *a,
            None => [0; 4],
        }
    }
}
