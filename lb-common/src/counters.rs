//! Datapath counters: indices into the per-CPU `LB_COUNTERS` array.
//!
//! One list for everything the datapath counts, drop reasons included; the agent's metrics and
//! `lbctl stats` use [`NAMES`] so that a counter has one name everywhere. Every packet a program
//! sees increments exactly one outcome counter (a `PASS_*`, `FWD_*`, `REV_*` or `DROP_*`), so the
//! outcomes add up to `RX_*`.

/// Packets seen by the forward (pod → service) programs, TC or XDP.
pub const RX_FORWARD: u32 = 0;
/// Packets seen by the reply program (egress towards pods).
pub const RX_REPLY: u32 = 1;

/// Not IPv4 and not IPv6 (ARP, LLDP, ...): passed untouched.
pub const PASS_NON_IP: u32 = 2;
/// IPv6 where lb serves no IPv6 (`--ipv6 off`): passed untouched.
pub const PASS_IPV6: u32 = 3;
/// A non-first IPv4 fragment of no datagram lb translated (or whose first fragment it has not
/// seen, or whose flow is gone): passed untouched.
pub const PASS_FRAGMENT: u32 = 4;
/// IPv4 with a protocol other than TCP and UDP: passed untouched.
pub const PASS_OTHER_PROTO: u32 = 5;
/// IPv4 TCP/UDP whose destination is no service frontend: passed untouched.
pub const PASS_NON_VIP: u32 = 6;
/// Reply direction: no reverse-NAT conntrack entry for the tuple (ordinary traffic).
pub const PASS_NO_REPLY_CT: u32 = 7;

/// New flow to a service: backend chosen by Maglev, conntrack entry created, packet DNATed.
pub const FWD_NEW_FLOW: u32 = 8;
/// Packet of a tracked flow to a service: DNATed to the flow's backend.
pub const FWD_ESTABLISHED: u32 = 9;
/// Reply of a tracked flow: source rewritten back to the service address.
pub const REV_NAT: u32 = 10;

/// Service frontend with no usable backend.
pub const DROP_NO_BACKEND: u32 = 11;
/// Truncated or invalid Ethernet, IPv4, TCP or UDP header.
pub const DROP_MALFORMED: u32 = 12;
/// The packet could not be rewritten (a helper failed).
pub const DROP_REWRITE_FAILED: u32 = 13;

/// A new flow was forwarded but its conntrack entry could not be stored (informational: the flow
/// stays on its backend for as long as the Maglev table does not change).
pub const CT_INSERT_FAILED: u32 = 14;
/// A first IPv4 fragment to a service (counted in addition to its outcome).
pub const FIRST_FRAGMENT: u32 = 15;
/// A tracked flow whose backend is gone or changed was given a new backend.
pub const CT_RESELECTED: u32 = 16;

/// `internalTrafficPolicy: Local` frontend, or an external address of an
/// `externalTrafficPolicy: Local` Service reached from outside, with no endpoint on this node
/// (kube-proxy drops too).
pub const DROP_NO_LOCAL_BACKEND: u32 = 17;
/// A new flow took its backend from ClientIP session affinity (counted in addition).
pub const AFFINITY_HIT: u32 = 18;
/// A pod reached itself through a service: the flow is also SNATed (counted in addition).
pub const HAIRPIN: u32 = 19;

/// A TCP RST to a service frontend that matches no tracked flow: dropped, never a new flow
/// (netfilter sees it as INVALID, and kube-proxy drops those).
pub const DROP_RST_NO_FLOW: u32 = 20;
/// Reply direction: a reply entry whose flow is gone (its forward entry expired, was removed or
/// now names another backend): removed, and the packet passed untranslated.
pub const PASS_STALE_REPLY_CT: u32 = 21;

/// A new flow to a frontend whose Service has no endpoints (or is gone): answered with an ICMP
/// port unreachable sent back to the client (kube-proxy's REJECT), so it fails at once. Packets
/// that cannot be answered (IPv4 options, a source that is not unicast) are dropped as
/// `DROP_NO_BACKEND` instead.
pub const REJECT_NO_BACKEND: u32 = 22;
/// XDP: a packet to a frontend whose L4 checksum may be partial (the field holds the
/// pseudo-header sum, as every partial checksum does): XDP cannot tell, so it leaves the packet
/// untouched to the TC program, whose helpers rewrite either kind right.
pub const XDP_PARTIAL_CSUM: u32 = 23;
/// XDP: a packet that needs what only TC can do (a hairpinned flow, which goes back out of the
/// interface it came in on; a reject): left untouched to the TC program.
pub const XDP_TO_TC: u32 = 24;
/// A non-first IPv4 fragment translated as its datagram's first fragment was (its ports found in
/// `LB4_FRAGS`; counted in addition to its outcome).
pub const LATER_FRAGMENT: u32 = 25;
/// A new flow whose reply tuple belonged to another live flow (the same client port to another
/// Service address with the same backend) was given another source port (counted in addition).
pub const SNAT_PORT: u32 = 26;
/// A new flow whose reply tuple clashed found no free source port in the SNAT range: dropped (the
/// live flow keeps its tuple). The client's retransmission tries again.
pub const DROP_SNAT_NO_PORT: u32 = 27;

/// Not a counter: for a verdict counted elsewhere (`LB_TAKEOVER[1]`). Counting it does nothing
/// (it is outside `LB_COUNTERS`).
pub const UNCOUNTED: u32 = u32::MAX;

/// Packets seen by the node-side ingress program (`lb4_tc_node_in`: traffic arriving on a node
/// interface from outside this node).
pub const RX_NODE_IN: u32 = 28;
/// Packets seen by the node-side egress program (`lb4_tc_node_out`: traffic leaving this node).
pub const RX_NODE_OUT: u32 = 29;
/// A new flow from outside this node to a remote endpoint: its source was replaced by this
/// node's address and a port of the SNAT range (counted in addition to its outcome).
pub const NODE_SNAT: u32 = 30;
/// A translated packet that must be forwarded by lb (its source is this node's address, so the
/// stack would drop it as a martian) found no route (`bpf_fib_lookup`), or could not be
/// redirected: dropped.
pub const DROP_FIB: u32 = 31;
/// A new flow to a LoadBalancer address from a client outside its `loadBalancerSourceRanges`:
/// dropped.
pub const DROP_SRC_RANGE: u32 = 32;
/// XDP (`--node-datapath xdp`) sent a translated packet out itself: back out of the interface it
/// came in on (`XDP_TX`) or redirected to another node interface (counted in addition to its
/// outcome).
pub const XDP_SENT: u32 = 33;

/// Socket-level load balancing (not packets: these count system calls, and no outcome counter
/// moves with them). A `connect` (TCP, connected UDP) to a Service address was sent to a backend.
pub const SOCK_CONNECT: u32 = 34;
/// A `sendmsg` of unconnected UDP to a Service address was sent to a backend.
pub const SOCK_SENDMSG: u32 = 35;
/// A UDP datagram received from a backend was given the Service address as its source
/// (`recvmsg`).
pub const SOCK_RECVMSG: u32 = 36;
/// `getpeername` gave the Service address for a backend.
pub const SOCK_GETPEERNAME: u32 = 37;
/// A `connect` or `sendmsg` to a Service with no endpoints (or none for this node's
/// `internalTrafficPolicy: Local`) was refused: ECONNREFUSED, or EPERM before Linux 5.18.
pub const SOCK_REFUSED: u32 = 38;
/// A socket the socket programs had sent to a backend closed, and its entries went with it
/// (`sock_release`).
pub const SOCK_RELEASED: u32 = 39;

/// IPv6: more extension headers in front of the transport header than the parser follows
/// (`lb6`: 4), to a Service address: dropped (lb cannot see its ports; to any other address such
/// a packet passes, counted as `PASS_OTHER_PROTO`).
pub const DROP_EXT_HEADERS: u32 = 40;
/// UDP over IPv6 with a zero checksum (no checksum: malformed over IPv6, RFC 8200 §8.1) to a
/// Service address: dropped. To any other address it passes untouched (tunnels, RFC 6935).
pub const DROP_UDP_ZERO_CSUM: u32 = 41;
/// IPv6: the second half of a forward program (`lb6_*_forward_decided`) found no flow left by
/// the first: the two halves came from different agent loads, for the moment an agent restart
/// swaps them. Dropped (the sender sends again); never a flow applied to another packet.
pub const DROP_SPLIT_MISMATCH: u32 = 42;

/// Number of counters; the size of `LB_COUNTERS`.
pub const COUNT: u32 = 43;

/// Stable names, indexed by counter. Used for metrics and `lbctl stats`.
pub const NAMES: [&str; COUNT as usize] = [
    "rx_forward",
    "rx_reply",
    "pass_non_ip",
    "pass_ipv6",
    "pass_fragment",
    "pass_other_proto",
    "pass_non_vip",
    "pass_no_reply_ct",
    "fwd_new_flow",
    "fwd_established",
    "rev_nat",
    "drop_no_backend",
    "drop_malformed",
    "drop_rewrite_failed",
    "ct_insert_failed",
    "first_fragment",
    "ct_reselected",
    "drop_no_local_backend",
    "affinity_hit",
    "hairpin",
    "drop_rst_no_flow",
    "pass_stale_reply_ct",
    "reject_no_backend",
    "xdp_partial_csum",
    "xdp_to_tc",
    "later_fragment",
    "snat_port",
    "drop_snat_no_port",
    "rx_node_in",
    "rx_node_out",
    "node_snat",
    "drop_fib",
    "drop_src_range",
    "xdp_sent",
    "sock_connect",
    "sock_sendmsg",
    "sock_recvmsg",
    "sock_getpeername",
    "sock_refused",
    "sock_released",
    "drop_ext_headers",
    "drop_udp_zero_csum",
    "drop_split_mismatch",
];

/// The outcome counters. Every packet seen by any lb program increments exactly one of them, so
/// their sum equals `RX_FORWARD + RX_REPLY + RX_NODE_IN + RX_NODE_OUT`.
pub const OUTCOMES: [u32; 24] = [
    PASS_NON_IP,
    PASS_IPV6,
    PASS_FRAGMENT,
    PASS_OTHER_PROTO,
    PASS_NON_VIP,
    PASS_NO_REPLY_CT,
    FWD_NEW_FLOW,
    FWD_ESTABLISHED,
    REV_NAT,
    DROP_NO_BACKEND,
    DROP_MALFORMED,
    DROP_REWRITE_FAILED,
    DROP_NO_LOCAL_BACKEND,
    DROP_RST_NO_FLOW,
    PASS_STALE_REPLY_CT,
    REJECT_NO_BACKEND,
    XDP_PARTIAL_CSUM,
    XDP_TO_TC,
    DROP_SNAT_NO_PORT,
    DROP_FIB,
    DROP_SRC_RANGE,
    DROP_EXT_HEADERS,
    DROP_UDP_ZERO_CSUM,
    DROP_SPLIT_MISMATCH,
];
