//! The layer that touches the kernel: loads the eBPF object with the agent's settings, pins its
//! maps under the pin directory ([`pins`]), attaches programs to interfaces, and gives typed
//! handles on the maps ([`maps`], with the [`MapWriter`](crate::reconcile::MapWriter) over them).

mod maglev_slots;
pub mod maps;
pub mod migrate;
pub mod netlink;
pub mod pins;
pub mod probe;
pub mod sockets;
pub mod tc_filters;

use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapError,
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    capacity::Capacities, globals, Lb4CtEntry, Lb4CtKey, Lb4Interface, LbNodeMac, CT_DIR_REPLY,
    CT_FLAG_NODE_SNAT, IF_ROLE_NODE, IF_ROLE_POD, MAP_LB4_AFFINITY, MAP_LB4_BACKENDS, MAP_LB4_CT,
    MAP_LB4_FE_META, MAP_LB4_IFS, MAP_LB4_MAGLEV, MAP_LB4_MEMBERS, MAP_LB4_SERVICES, MAP_LB4_SVC_STATS,
    MAP_LB_FORMATS, MAP_LB_NODE_MACS, MAP_LB_TAKEOVER, PIN_LAYOUT_VERSION,
};

use self::migrate::Layout;
pub use self::{
    maglev_slots::MaglevSlots,
    maps::Maps,
    netlink::interfaces,
    pins::{cleanup, layout_dir, on_bpffs, try_lock, PinLock},
    sockets::SocketLb,
};

/// The datapath object, built by `build.rs` from `lb-ebpf`.
pub static LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

pub const PROG_TC_FORWARD: &str = "lb4_tc_forward";
pub const PROG_TC_REPLY: &str = "lb4_tc_reply";
pub const PROG_XDP_FORWARD: &str = "lb4_xdp_forward";
pub const PROG_TC_NODE_IN: &str = "lb4_tc_node_in";
pub const PROG_TC_NODE_OUT: &str = "lb4_tc_node_out";
pub const PROG_XDP_NODE_IN: &str = "lb4_xdp_node_in";

/// Whether `prog` is one of the XDP programs (attached through XDP links, never netlink filters).
fn is_xdp(prog: &str) -> bool {
    prog == PROG_XDP_FORWARD || prog == PROG_XDP_NODE_IN
}

/// What an interface is to lb, and so which programs it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A pod's host-side interface (`--interfaces`): the forward and reply programs.
    Pod,
    /// One of this node's own interfaces (`--node-interfaces`): the node-side programs, for
    /// traffic from outside to the Services' external addresses.
    Node,
}

impl Role {
    /// The programs an interface of this role carries, in the order they are attached.
    pub fn programs(self) -> &'static [&'static str] {
        match self {
            Role::Pod => &PROGRAMS,
            Role::Node => &NODE_PROGRAMS,
        }
    }
}

/// Where a TC program is attached: the reply programs on egress, the others on ingress.
pub fn direction(prog: &str) -> TcAttachType {
    if prog == PROG_TC_REPLY || prog == PROG_TC_NODE_OUT {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    }
}

/// The datapath's clock (`bpf_ktime_get_ns`: CLOCK_MONOTONIC), in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Where the forward (pod → service) direction runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// TC ingress of the pod's host-side interface.
    Tc,
    /// XDP on the pod's host-side interface, in front of the TC ingress program, to which it
    /// leaves what XDP cannot do right (packets whose checksum may be partial, hairpinned flows,
    /// rejects); replies use TC egress.
    Xdp,
}

/// What the datapath is loaded with.
#[derive(Debug, Clone)]
pub struct Config {
    pub pin_dir: PathBuf,
    pub caps: Capacities,
    pub ct_timeout_tcp_syn_secs: u64,
    pub ct_timeout_tcp_established_secs: u64,
    pub ct_timeout_tcp_close_secs: u64,
    pub ct_timeout_udp_secs: u64,
    pub flow_hash_seed: u32,
    /// Source address of hairpinned flows.
    pub hairpin_addr: std::net::Ipv4Addr,
    /// Source address of hairpinned IPv6 flows.
    pub hairpin_addr6: std::net::Ipv6Addr,
    /// Kernel-side aya-log on (true) or compiled in but silent (false).
    pub bpf_log: bool,
    /// Where the TC programs go among the TCX programs already on an interface.
    pub tc_order: TcOrder,
    /// First and last source port given to a flow whose tuple clashed (see `lb_common::Lb4CtKey`).
    pub snat_ports: (u16, u16),
    /// How the TC programs are attached.
    pub tc_attach: TcAttach,
    /// Whether node interfaces carry the XDP node program (`--node-datapath xdp`) in front of
    /// their TC ingress program.
    pub node_xdp: bool,
    /// Which sockets the socket programs translate, once attached ([`Datapath::attach_sockets`]).
    pub socket_lb: SocketLb,
    /// IPv6 Services are served (`--ipv6`): the lb6 maps get the IPv4 maps' capacities; else
    /// one entry each.
    pub ipv6: bool,
}

/// How the TC programs are attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcAttach {
    /// TCX where the kernel has it, else netlink filters.
    #[default]
    Auto,
    /// TCX links (Linux 6.6), pinned.
    Tcx,
    /// Direct-action cls_bpf filters on a clsact qdisc, over netlink, recorded in
    /// `LB_TC_FILTERS` (see [`tc_filters`]).
    Netlink,
}

/// Checks SNAT port range `snat` against `local`, the node's `net.ipv4.ip_local_port_range`
/// (the ports the node's own sockets take): `Err` when the range is no range, and a warning when
/// the two meet, for then a port given to a flow could be one a local connection to the same
/// backend uses. (Flows from pods carry the pod's address, so for them it is each pod's own range
/// that counts, 32768-60999 unless the pod sets it; the node's matters for SNAT to the node's
/// addresses.)
pub fn check_snat_ports(snat: (u16, u16), local: (u16, u16)) -> Result<Option<String>, String> {
    valid_snat_ports(snat)?;
    if snat.0 <= local.1 && local.0 <= snat.1 {
        return Ok(Some(format!(
            "--snat-ports {}-{} overlaps this node's net.ipv4.ip_local_port_range {}-{}",
            snat.0, snat.1, local.0, local.1
        )));
    }
    Ok(None)
}

/// The SNAT port range and a warning to log, if any: `explicit` (`--snat-ports`); or, by default,
/// [`lb_common::DEFAULT_SNAT_PORTS`] where that lies outside `local` (the node's
/// `ip_local_port_range`), else the largest run of ports above 1023 outside both `local` and the
/// default NodePort range (30000-32767) if it holds at least 1,000 ports, else the default anyway
/// (with a warning).
pub fn choose_snat_ports(
    explicit: Option<(u16, u16)>,
    local: (u16, u16),
) -> Result<((u16, u16), Option<String>), String> {
    if let Some(range) = explicit {
        return check_snat_ports(range, local).map(|w| (range, w));
    }
    let default = lb_common::DEFAULT_SNAT_PORTS;
    if check_snat_ports(default, local)?.is_none() {
        return Ok((default, None));
    }
    let taken = [(local.0.min(local.1), local.1.max(local.0)), (30_000, 32_767)];
    let mut best: Option<(u16, u16)> = None;
    let mut start: u32 = 1024;
    for port in 1024u32..=65_536 {
        let used =
            port == 65_536 || taken.iter().any(|(a, b)| (u32::from(*a)..=u32::from(*b)).contains(&port));
        if used {
            if port > start && best.is_none_or(|(a, b)| port - start > u32::from(b - a) + 1) {
                best = Some((start as u16, (port - 1) as u16));
            }
            start = port + 1;
        }
    }
    match best {
        Some((a, b)) if u32::from(b - a) + 1 >= 1_000 => Ok(((a, b), None)),
        _ => Ok((
            default,
            Some(format!(
                "no run of 1,000 ports outside this node's net.ipv4.ip_local_port_range {}-{} and the NodePort range: using {}-{}; set --snat-ports",
                local.0, local.1, default.0, default.1
            )),
        )),
    }
}

/// `Err` unless `snat` is a range of ports: 1 <= first <= last.
pub fn valid_snat_ports(snat: (u16, u16)) -> Result<(), String> {
    if snat.0 == 0 || snat.1 < snat.0 {
        return Err(format!("--snat-ports {}-{}: want FIRST-LAST, 1 <= FIRST <= LAST", snat.0, snat.1));
    }
    Ok(())
}

/// This network namespace's `net.ipv4.ip_local_port_range`.
pub fn local_port_range() -> std::io::Result<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => Err(std::io::Error::other(format!("ip_local_port_range: cannot read {text:?}"))),
    }
}

/// Where lb's TC programs are attached among other TCX programs on an interface. lb passes every
/// packet it does not drop on to the programs after it (`TCX_NEXT`), rewritten or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcOrder {
    /// Before all others: lb translates before a CNI's policy or an observability program sees
    /// the packet (what kube-proxy's DNAT in PREROUTING gives them).
    #[default]
    First,
    /// After all others present when it attaches.
    Last,
}

#[cfg(test)]
mod tests {
    use super::check_snat_ports;

    #[test]
    fn snat_ports_stay_outside_the_local_port_range() {
        let local = (32_768, 60_999);
        assert_eq!(check_snat_ports((61_000, 65_535), local), Ok(None));
        assert_eq!(check_snat_ports((20_000, 29_999), local), Ok(None));
        for meets in [(60_999, 65_535), (30_000, 40_000), (1, 65_535), (40_000, 50_000)] {
            let w = check_snat_ports(meets, local).expect("a range").expect("a warning");
            assert!(w.contains("ip_local_port_range 32768-60999"), "{w}");
        }
        assert!(check_snat_ports((0, 10), local).is_err());
        assert!(check_snat_ports((65_000, 64_000), local).is_err());
    }

    #[test]
    fn the_default_snat_range_moves_out_of_a_wide_local_range() {
        use super::choose_snat_ports as choose;
        let range = |explicit, local| choose(explicit, local).expect("a range");
        assert_eq!(range(None, (32_768, 60_999)), ((1_024, 29_999), None));
        // 1024-64000: what is left above it, 64001-65535, is enough.
        assert_eq!(range(None, (1_024, 64_000)), ((64_001, 65_535), None));
        // 1024-65000: nothing is: the default, with a warning.
        let (r, w) = range(None, (1_024, 65_000));
        assert_eq!(r, (1_024, 29_999));
        assert!(w.expect("a warning").contains("set --snat-ports"));
        // 10000-65535 (common tuning): 1024-9999 is the largest free run.
        assert_eq!(range(None, (10_000, 65_535)), ((1_024, 9_999), None));
        // 32768-65535: 1024-29999 (the NodePort range is skipped).
        assert_eq!(range(None, (32_768, 65_535)), ((1_024, 29_999), None));
        // Explicit: taken as given, with a warning where it meets the node's range.
        assert_eq!(range(Some((20_000, 20_999)), (32_768, 65_535)), ((20_000, 20_999), None));
        let (r, w) = range(Some((40_000, 40_999)), (32_768, 65_535));
        assert_eq!(r, (40_000, 40_999));
        assert!(w.is_some());
        assert!(choose(Some((5, 4)), (32_768, 65_535)).is_err());
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("creating pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
    #[error("pinning map {map} at {path}: {reason}")]
    PinMap { map: &'static str, path: PathBuf, reason: String },
    #[error(
        "{pin_dir} holds pinned layout {found:?}, this agent uses v{ours}: run the matching agent, or \
         `lb-agent --cleanup --pin-dir {pin_dir}` (detaches lb and drops tracked flows)",
        ours = PIN_LAYOUT_VERSION
    )]
    OtherLayout { pin_dir: PathBuf, found: Vec<String> },
    #[error("nothing pinned at {0}: is lb-agent running with this --pin-dir?")]
    NotPinned(PathBuf),
    #[error("permission denied reading {0}: run as root (the pins are root's only, and reading them needs CAP_BPF)")]
    PermissionDenied(PathBuf),
    #[error("the maps kept changing while they were read; try again")]
    Unstable,
    #[error("pinning the link of {program} on {interface} at {path}: {reason}")]
    PinLink { program: &'static str, interface: String, path: PathBuf, reason: String },
    #[error("loading the eBPF object (pinned maps under {pin_dir}): {source}")]
    Load { pin_dir: PathBuf, source: Box<aya::EbpfError> },
    #[error("program {program}: {source}")]
    Program { program: &'static str, source: ProgramError },
    #[error("attaching {program} to {interface}: {source}")]
    Attach { program: &'static str, interface: String, source: ProgramError },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("{0}")]
    SnatPorts(String),
    #[error(
        "--pin-dir {pin_dir} is not on bpffs ({dir} is on a file system of type {kind:#x}): mount bpffs there \
         (`mount -t bpf bpf /sys/fs/bpf`; in a pod, mount the host's /sys/fs/bpf), or choose a directory under one. \
         `ip netns exec` remounts /sys without bpffs: enter a network namespace with `nsenter --net=` instead"
    )]
    NotBpffs { pin_dir: PathBuf, dir: PathBuf, kind: i64 },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("{0}")]
    CgroupRoot(String),
    #[error("--socket-lb: learning this network namespace's cookie: {0}")]
    NetnsCookie(std::io::Error),
}

/// The loaded programs and their attachments.
pub struct Datapath {
    ebpf: Ebpf,
    /// The pinned program arrays of the tail calls (`LB_TAIL_TC`, `LB_TAIL_XDP`), held open.
    tail_arrays: Vec<(&'static str, aya::maps::MapData)>,
    mode: Mode,
    links_dir: PathBuf,
    /// Interface name → its index when attached (one made again under the name has another), the
    /// pins of the links this agent attached (or took over) there, and its role.
    attached: StdHashMap<String, (u32, Vec<PathBuf>, Role)>,
    /// `LB4_IFS`: the interfaces attached, by role, node interfaces with their SNAT addresses;
    /// and those addresses by interface name, as last set.
    ifs: aya::maps::HashMap<aya::maps::MapData, u32, Lb4Interface>,
    /// `LB6_IFS`: node interfaces' IPv6 addresses.
    ifs6: aya::maps::HashMap<aya::maps::MapData, u32, [u32; 4]>,
    node_addrs: StdHashMap<String, (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>)>,
    /// Whether the node-side programs are loaded (on the first node interface).
    node_loaded: bool,
    /// Whether node interfaces carry the XDP node program.
    node_xdp: bool,
    /// Whether IPv6 is served (`--ipv6`): the node-side programs hand it to theirs.
    ipv6: bool,
    /// Why the IPv6 node-side programs could not be loaded, if they could not.
    node6_error: Option<String>,
    /// The ports replies of flows SNATed to this node's address are looked for on (first, last).
    snat_reply_ports: (u32, u32),
    /// `LB_NODE_MACS` (this load's): the Ethernet address of each node interface, for the XDP
    /// node program.
    node_macs: aya::maps::HashMap<aya::maps::MapData, u32, LbNodeMac>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    tc_order: TcOrder,
    /// Layouts of other versions found at load, newest first, until they are removed: their
    /// links are taken over interface by interface (see [`migrate`]).
    others: Vec<Layout>,
    /// Whether our layout had no link at load: our programs never ran, so our maps hold nothing
    /// another layout's state should not replace.
    never_ran: bool,
    /// The layout whose state was carried into ours; its flows are copied again once the links
    /// hold our programs.
    carried_from: Option<Layout>,
    /// `LB_TAKEOVER`: holds back new flows while another layout's links are taken over.
    takeover: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    /// What the kernel can do.
    kernel: probe::Kernel,
    /// TC programs as netlink filters (no TCX), recorded in `tc_records`.
    netlink: bool,
    tc_records: tc_filters::Records,
    /// The pins of the socket programs' links, once attached.
    sockets: Option<Vec<PathBuf>>,
    /// `LB4_SOCK_REV`, once the socket programs are attached: what each socket was sent to.
    sock_rev: Option<aya::maps::HashMap<aya::maps::MapData, lb_common::Lb4SockRevKey, lb_common::Lb4SockRev>>,
    /// `LB6_SOCK_REV`, likewise.
    sock_rev6:
        Option<aya::maps::HashMap<aya::maps::MapData, lb_common::Lb6SockRevKey, lb_common::Lb6SockRev>>,
}

/// Whether our programs ran from layout directory `dir`: a link is pinned in `links/` (before our
/// program goes into it), or a netlink filter is recorded in `LB_TC_FILTERS` (when it is attached).
fn ran_before(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("links")).is_ok_and(|mut d| d.next().is_some())
        || tc_filters::any_recorded(dir)
}

/// The name of a link's pin in a layout's `links/`: the same in every layout version (see
/// [`migrate`]). bpffs refuses names with a '.', which interface names may have (VLANs); ':' is
/// one character an interface name never has, so it stands in for it.
fn link_pin_name(interface: &str, prog: &str) -> String {
    format!("{}@{prog}", interface.replace('.', ":"))
}

/// Every program the datapath attaches, in the order an interface gets them: the TC programs
/// first (the forward one first: whatever is then removed or replaced in front of it, another
/// layout's XDP program or ours, it handles every packet to a Service that comes its way), XDP
/// last, so that an XDP program that cannot attach leaves the interface whole in TC.
const PROGRAMS: [&str; 3] = [PROG_TC_FORWARD, PROG_TC_REPLY, PROG_XDP_FORWARD];
/// The programs of a node interface, ingress first, XDP last (as on a pod's interface).
const NODE_PROGRAMS: [&str; 3] = [PROG_TC_NODE_IN, PROG_TC_NODE_OUT, PROG_XDP_NODE_IN];
/// Every program lb attaches anywhere.
pub const ALL_PROGRAMS: [&str; 6] =
    [PROG_TC_FORWARD, PROG_TC_REPLY, PROG_XDP_FORWARD, PROG_TC_NODE_IN, PROG_TC_NODE_OUT, PROG_XDP_NODE_IN];

/// The SNAT port ranges recorded in layout directory `dir` (`LB_SNAT_RANGES`: those agents of
/// this layout served with, newest first); none where it is not pinned yet.
fn recorded_snat_ranges(dir: &Path) -> Vec<(u16, u16)> {
    let Ok(data) = aya::maps::MapData::from_pin(dir.join(lb_common::MAP_LB_SNAT_RANGES)) else {
        return Vec::new();
    };
    let Ok(map) = aya::maps::Array::<_, u32>::try_from(aya::maps::Map::Array(data)) else {
        return Vec::new();
    };
    (0..lb_common::SNAT_RANGES_KEPT)
        .filter_map(|i| map.get(&i, 0).ok())
        .filter(|v| *v != 0)
        .map(|v| ((v >> 16) as u16, v as u16))
        .collect()
}

/// The ports replies of flows SNATed to this node's address may come back to (see
/// `lb_common::globals::SNAT_REPLY_MIN`): the hull of `snat`, the ranges agents of this layout
/// served with (`recorded`: the one before may have SNATed flows with its range until our
/// programs took its links over) and the SNAT port of every such flow in the table pinned in
/// layout directory `dir`. Host order. A table that cannot be read opens the gate wide (every
/// port: a lookup more per packet, no flow lost), with a warning. Both families' tables count.
pub fn snat_reply_ports(dir: &Path, snat: (u16, u16), recorded: &[(u16, u16)]) -> (u32, u32) {
    let (mut first, mut last) = (u32::from(snat.0), u32::from(snat.1));
    for (a, b) in recorded {
        (first, last) = (first.min(u32::from(*a)), last.max(u32::from(*b)));
    }
    // The reply entries of flows SNATed to this node, of both families.
    let v4 = node_snat_ports::<Lb4CtKey, Lb4CtEntry>(&dir.join(MAP_LB4_CT), |k, e| {
        (k.dir == CT_DIR_REPLY && e.flags & CT_FLAG_NODE_SNAT != 0).then_some(k.dport)
    });
    let v6 = node_snat_ports::<lb_common::Lb6CtKey, lb_common::Lb6CtEntry>(
        &dir.join(lb_common::MAP_LB6_CT),
        |k, e| (k.dir == CT_DIR_REPLY && e.flags & CT_FLAG_NODE_SNAT != 0).then_some(k.dport),
    );
    for ports in [v4, v6] {
        match ports {
            Ok(ports) => {
                for port in ports {
                    let port = u32::from(u16::from_be(port));
                    (first, last) = (first.min(port), last.max(port));
                }
            }
            Err(e) => {
                tracing::warn!("{e}: replies to SNATed flows are looked for on every port");
                return (1, 65_535);
            }
        }
    }
    (first, last)
}

/// The ports (network byte order) `port_of` finds in the entries of the conntrack map pinned at
/// `path` (none if it is not pinned).
fn node_snat_ports<K: aya::Pod, V: aya::Pod>(
    path: &Path,
    port_of: impl Fn(&K, &V) -> Option<u16>,
) -> Result<Vec<u16>, String> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let map = aya::maps::MapData::from_pin(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let (mut cursor, mut batch, mut ports) = (None, Vec::new(), Vec::new());
    loop {
        batch.clear();
        let next = maps::lookup_batch::<K, V>(&map, cursor, 4096, &mut batch);
        ports.extend(batch.iter().filter_map(|(k, e)| port_of(k, e)));
        match next {
            Ok(Some(c)) => cursor = Some(c),
            Ok(None) => return Ok(ports),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
    }
}

/// How XDP program `prog` attaches to `interface`: the driver's own XDP where the kernel has it,
/// except the node program on a virtual device (a veth, a bond, a VLAN...), which gets generic
/// XDP: a veth's driver sends what XDP sends back out (`XDP_TX`) or redirects only to a peer that
/// runs an XDP program itself (or, from Linux 5.13, has GRO on), and drops it otherwise; generic
/// XDP sends through the device's queue like any packet.
fn xdp_mode(interface: &str, prog: &str) -> XdpMode {
    let virtual_device = || {
        netlink::links()
            .ok()
            .and_then(|l| l.into_iter().find(|l| l.name == interface))
            .is_some_and(|l| l.kind.is_some())
    };
    if prog == PROG_XDP_NODE_IN && virtual_device() {
        XdpMode::Skb
    } else {
        XdpMode::Default
    }
}

/// Loads XDP program `name` of the object.
fn load_xdp(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DatapathError> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .expect("object has the program")
        .try_into()
        .map_err(|source| DatapathError::Program { program: name, source })?;
    // Loaded already (a load an earlier call began and a later program failed): kept.
    if prog.fd().is_ok() {
        return Ok(());
    }
    prog.load().map_err(|source| DatapathError::Program { program: name, source })
}

/// Loads the TC programs `names` of the object (those not loaded yet).
fn load_classifiers(ebpf: &mut Ebpf, names: &[&'static str]) -> Result<(), DatapathError> {
    for &name in names {
        let prog: &mut SchedClassifier =
            ebpf.program_mut(name)
                .expect("object has the program")
                .try_into()
                .map_err(|source| DatapathError::Program { program: name, source })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program { program: name, source })?;
        }
    }
    Ok(())
}

/// The IPv6 programs the IPv4 entry points hand IPv6 packets to (tail calls), by program array
/// and slot, the later programs of a split one before the earlier (an earlier one never finds a
/// later one's slot empty).
type Slots = &'static [(u32, &'static str)];
const TAIL_TC_SLOTS: Slots = &[
    (lb_common::TAIL_FORWARD_DECIDED, "lb6_tc_forward_decided"),
    (lb_common::TAIL_FORWARD, "lb6_tc_forward"),
    (lb_common::TAIL_REPLY, "lb6_tc_reply"),
];
const TAIL_XDP_SLOTS: Slots = &[
    (lb_common::TAIL_FORWARD_DECIDED, "lb6_xdp_forward_decided"),
    (lb_common::TAIL_FORWARD, "lb6_xdp_forward"),
];
const TAIL_NODE_TC_SLOTS: Slots = &[
    (lb_common::TAIL_NODE_IN_DECIDED, "lb6_tc_node_in_decided"),
    (lb_common::TAIL_NODE_IN_REPLY, "lb6_tc_node_in_reply"),
    (lb_common::TAIL_NODE_IN, "lb6_tc_node_in"),
    (lb_common::TAIL_NODE_OUT, "lb6_tc_node_out"),
];
/// The pinned program arrays, held open by the agent.
const TAIL_ARRAYS: [&str; 3] =
    [lb_common::MAP_LB_TAIL_TC, lb_common::MAP_LB_TAIL_XDP, lb_common::MAP_LB_TAIL_NODE_TC];

/// Serving IPv6: loads the pod-side IPv6 programs and puts them in the program arrays the IPv4
/// entry points tail-call (`LB_TAIL_TC`, and `LB_TAIL_XDP` in XDP mode). Not serving it (`--ipv6
/// off`): empties the slots, the node-side arrays' too, so that IPv6 passes untouched (the arrays
/// are pinned: a slot an earlier agent filled would stay). The node-side IPv6 programs go in with
/// the node-side programs (`Datapath::load_node_programs`).
fn fill_tail_calls(ebpf: &mut Ebpf, dir: &Path, ipv6: bool, mode: Mode) -> Result<(), DatapathError> {
    let xdp_on = ipv6 && mode == Mode::Xdp;
    // Every program verified before any slot changes: a slot set before a later program fails
    // its verifier would leave a new half beside an old one for as long as the verifier takes,
    // and a start that then fails would leave the new one in place.
    if ipv6 {
        load_classifiers(ebpf, &TAIL_TC_SLOTS.iter().map(|(_, n)| *n).collect::<Vec<_>>())?;
    }
    if xdp_on {
        for (_, name) in TAIL_XDP_SLOTS {
            load_xdp(ebpf, name)?;
        }
    }
    fill_slots(ebpf, dir, lb_common::MAP_LB_TAIL_TC, TAIL_TC_SLOTS, ipv6)?;
    fill_slots(ebpf, dir, lb_common::MAP_LB_TAIL_XDP, TAIL_XDP_SLOTS, xdp_on)?;
    if !ipv6 {
        fill_slots(ebpf, dir, lb_common::MAP_LB_TAIL_NODE_TC, TAIL_NODE_TC_SLOTS, false)?;
    }
    Ok(())
}

/// Puts the (loaded) programs of `slots` into the pinned program array `name` of layout `dir`,
/// or (`on` false) empties those slots, the entry points' first (nothing then reaches a second
/// half any more).
fn fill_slots(
    ebpf: &Ebpf,
    dir: &Path,
    name: &'static str,
    slots: Slots,
    on: bool,
) -> Result<(), DatapathError> {
    let err = maps::map_err(name);
    let data = aya::maps::MapData::from_pin(dir.join(name)).map_err(&err)?;
    let mut array = aya::maps::ProgramArray::try_from(aya::maps::Map::from_map_data(data).map_err(&err)?)
        .map_err(&err)?;
    if !on {
        for (slot, _) in slots.iter().rev() {
            absent_ok(array.clear_index(slot)).map_err(&err)?;
        }
        return Ok(());
    }
    for &(slot, program) in slots {
        let fd = match ebpf.program(program).expect("object has the program") {
            aya::programs::Program::SchedClassifier(p) => p.fd(),
            aya::programs::Program::Xdp(p) => p.fd(),
            _ => unreachable!("tail-called programs are TC or XDP programs"),
        }
        .map_err(|source| DatapathError::Program { program, source })?;
        array.set(slot, fd, 0).map_err(&err)?;
    }
    Ok(())
}

/// A removal of what is not there is no error.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// How long new flows may be held back during a take-over (`LB_TAKEOVER[0]` is a deadline on the
/// datapath's clock, so an agent that dies holding them releases them anyway).
const HOLD_LIMIT_NS: u64 = 5_000_000_000;

impl Datapath {
    /// Loads the programs; maps already pinned under `cfg.pin_dir` are reused, others are
    /// created and pinned there.
    pub fn load(cfg: &Config, mode: Mode) -> Result<(Self, Maps), DatapathError> {
        // Maps pinned by a start that then fails (a verifier that refuses a program) would be
        // left behind: what this start pinned anew is removed again.
        let dir = layout_dir(&cfg.pin_dir);
        let never_ran = !ran_before(&dir);
        let anew =
            !dir.join(MAP_LB4_SERVICES).exists() || (never_ran && !migrate::others(&cfg.pin_dir).is_empty());
        let pin_dir_existed = cfg.pin_dir.exists();
        let loaded = Self::load_pinned(cfg, mode);
        if loaded.is_err() && anew {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if !e.path().is_dir() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            let _ = std::fs::remove_dir(dir.join("links"));
            let _ = std::fs::remove_dir(&dir);
            if !pin_dir_existed {
                let _ = std::fs::remove_dir(&cfg.pin_dir);
            }
        }
        loaded
    }

    fn load_pinned(cfg: &Config, mode: Mode) -> Result<(Self, Maps), DatapathError> {
        valid_snat_ports(cfg.snat_ports).map_err(DatapathError::SnatPorts)?;
        if let Some((dir, kind)) = pins::not_on_bpffs(&cfg.pin_dir) {
            return Err(DatapathError::NotBpffs { pin_dir: cfg.pin_dir.clone(), dir, kind });
        }
        // Other layouts keep serving until our programs take over their links.
        let others = migrate::others(&cfg.pin_dir);
        let dir = layout_dir(&cfg.pin_dir);
        let links_dir = dir.join("links");
        let never_ran = !ran_before(&dir);
        if never_ran && !others.is_empty() {
            // Our programs never ran (a link is pinned in our layout before our program goes into
            // it), so our maps hold nothing that serves: at most an earlier start's copy of another
            // layout's state and what its first sync wrote over it. They are made anew, and the
            // other layout's state is carried again (or rebuilt, if it cannot be read).
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.path().is_file() || !e.path().is_dir() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        std::fs::create_dir_all(&links_dir)
            .map_err(|source| DatapathError::PinDir { path: links_dir.clone(), source })?;
        // Pins are root's only.
        for d in [&cfg.pin_dir, &dir, &links_dir] {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
        }
        let secs = |s: u64| s.saturating_mul(1_000_000_000);
        let (syn, est, close, udp) = (
            secs(cfg.ct_timeout_tcp_syn_secs),
            secs(cfg.ct_timeout_tcp_established_secs),
            secs(cfg.ct_timeout_tcp_close_secs),
            secs(cfg.ct_timeout_udp_secs),
        );
        let log_level: u8 = if cfg.bpf_log { 0xff } else { 0 };
        let hairpin = u32::from_ne_bytes(cfg.hairpin_addr.octets());
        let hairpin6 = lb_common::addr6(cfg.hairpin_addr6.octets());
        let (snat_min, snat_max) = (u32::from(cfg.snat_ports.0), u32::from(cfg.snat_ports.1));
        let recorded = recorded_snat_ranges(&dir);
        let (reply_min, reply_max) = snat_reply_ports(&dir, cfg.snat_ports, &recorded);
        // Counters added within this layout (the socket programs'): a pinned counter array of
        // another size is made anew (the counts start again), since the loader would reuse it as
        // it is, and the new counters would count nowhere.
        let counters_pin = dir.join(lb_common::MAP_LB_COUNTERS);
        if pinned_entries(&counters_pin).is_some_and(|n| n != lb_common::counters::COUNT) {
            tracing::info!("the pinned counters have another size: made anew, counting from zero");
            let _ = std::fs::remove_file(&counters_pin);
        }
        // A pinned conntrack table is reused, flows and all, at the size it was made with (an
        // earlier agent's default or `--ct-entries`); one made beside another layout whose flows
        // it takes over is at least that layout's size, so that every flow carried fits.
        let source_ct = || migrate::source(&others).and_then(|l| pinned_entries(&l.dir.join(MAP_LB4_CT)));
        let ct = pinned_entries(&dir.join(MAP_LB4_CT))
            .unwrap_or_else(|| source_ct().map_or(cfg.caps.ct, |n| n.max(cfg.caps.ct)));
        // The lb6 maps at the sizes asked for: a pinned one is kept at its own (see
        // `drop_other_sizes`), and no other layout's IPv6 flows are carried.
        let caps6 = Caps6::of(cfg.ipv6, &cfg.caps);
        caps6.drop_other_sizes(&dir);
        let kernel = probe::Kernel::probe();
        let ktime_coarse = u32::from(kernel.ktime_coarse);
        let set_retval = u32::from(kernel.sock_set_retval);
        let sock_process = u32::from(kernel.sock_process);
        let xdp_meta = u32::from(kernel.xdp_meta);
        let scope = sockets::Scope::of(cfg.socket_lb).map_err(DatapathError::NetnsCookie)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_max_entries(MAP_LB4_SERVICES, cfg.caps.services)
            .map_max_entries(MAP_LB4_SVC_STATS, cfg.caps.services)
            .map_max_entries(MAP_LB4_FE_META, cfg.caps.services)
            .map_max_entries(MAP_LB4_BACKENDS, cfg.caps.backends)
            .map_max_entries(MAP_LB4_MAGLEV, cfg.caps.maglev_slots.div_ceil(2))
            .map_max_entries(MAP_LB4_CT, ct)
            .map_max_entries(MAP_LB4_AFFINITY, cfg.caps.affinity)
            .map_max_entries(MAP_LB4_MEMBERS, cfg.caps.members)
            .map_max_entries(lb_common::MAP_LB6_SERVICES, caps6.services)
            .map_max_entries(lb_common::MAP_LB6_VIPS, caps6.services)
            .map_max_entries(lb_common::MAP_LB6_BACKENDS, caps6.backends)
            .map_max_entries(lb_common::MAP_LB6_CT, caps6.ct)
            .map_max_entries(lb_common::MAP_LB6_AFFINITY, caps6.affinity)
            .map_max_entries(lb_common::MAP_LB6_MEMBERS, caps6.members)
            .map_max_entries(lb_common::MAP_LB6_FRAGS, caps6.frags)
            .map_max_entries(lb_common::MAP_LB6_SOCK_REV, caps6.sock_rev)
            .map_max_entries(lb_common::MAP_LB6_SOCK_FWD, caps6.sock_fwd)
            .override_global(globals::CT_TIMEOUT_TCP_SYN_NS, &syn, true)
            .override_global(globals::CT_TIMEOUT_TCP_EST_NS, &est, true)
            .override_global(globals::CT_TIMEOUT_TCP_CLOSE_NS, &close, true)
            .override_global(globals::CT_TIMEOUT_UDP_NS, &udp, true)
            .override_global(globals::FLOW_HASH_SEED, &cfg.flow_hash_seed, true)
            .override_global(globals::HAIRPIN_ADDR, &hairpin, true)
            .override_global(globals::HAIRPIN_ADDR6, &hairpin6, true)
            .override_global(globals::SNAT_PORT_MIN, &snat_min, true)
            .override_global(globals::SNAT_PORT_MAX, &snat_max, true)
            .override_global(globals::SNAT_REPLY_MIN, &reply_min, true)
            .override_global(globals::SNAT_REPLY_MAX, &reply_max, true)
            .override_global(globals::KTIME_COARSE, &ktime_coarse, true)
            .override_global(globals::SOCK_SCOPE, &scope.scope, true)
            .override_global(globals::SOCK_NETNS_COOKIE, &scope.netns_cookie, true)
            .override_global(globals::SOCK_SET_RETVAL, &set_retval, true)
            .override_global(globals::SOCK_PROCESS, &sock_process, true)
            .override_global(globals::XDP_META, &xdp_meta, true)
            .override_global(aya_log::LEVEL, &log_level, true)
            .load(LB_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: cfg.pin_dir.clone(),
                source: Box::new(source),
            })?;
        let logger = if cfg.bpf_log { aya_log::EbpfLogger::init(&mut ebpf).ok() } else { None };
        // What agents of other versions read to know whether they can carry our state.
        {
            let err = maps::map_err(MAP_LB_FORMATS);
            let map = ebpf.map_mut(MAP_LB_FORMATS).ok_or(DatapathError::MissingMap(MAP_LB_FORMATS))?;
            let mut formats: aya::maps::Array<&mut aya::maps::MapData, u32> = map.try_into().map_err(&err)?;
            for (i, f) in lb_common::formats::CURRENT.iter().enumerate() {
                formats.set(i as u32, f, 0).map_err(&err)?;
            }
        }
        // Our SNAT range first, then those before it (see `snat_reply_ports`).
        {
            let name = lb_common::MAP_LB_SNAT_RANGES;
            let err = maps::map_err(name);
            let map = ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))?;
            let mut ranges: aya::maps::Array<&mut aya::maps::MapData, u32> = map.try_into().map_err(&err)?;
            let ours = cfg.snat_ports;
            let kept = std::iter::once(ours).chain(recorded.iter().copied().filter(|r| *r != ours));
            for (i, (a, b)) in kept.take(lb_common::SNAT_RANGES_KEPT as usize).enumerate() {
                ranges.set(i as u32, u32::from(a) << 16 | u32::from(b), 0).map_err(&err)?;
            }
        }
        let takeover = ebpf.take_map(MAP_LB_TAKEOVER).ok_or(DatapathError::MissingMap(MAP_LB_TAKEOVER))?;
        let takeover = takeover.try_into().map_err(maps::map_err(MAP_LB_TAKEOVER))?;
        let mut maps =
            Maps::from_maps(|name| ebpf.take_map(name).ok_or(DatapathError::MissingMap(name)), true)?;
        maps.rebuild_vips6().map_err(maps::map_err(lb_common::MAP_LB6_VIPS))?;
        // Before `fill_tail_calls` hands the running programs' IPv6 packets to ours: the port
        // filter is off until the agent has noted every port the pinned maps hold.
        maps.disarm_ports()?;
        let ifs = {
            let path = dir.join(MAP_LB4_IFS);
            let err = maps::map_err(MAP_LB4_IFS);
            let data = aya::maps::MapData::from_pin(&path).map_err(&err)?;
            aya::maps::Map::from_map_data(data).map_err(&err)?.try_into().map_err(&err)?
        };
        let ifs6 = {
            let name = lb_common::MAP_LB6_IFS;
            let err = maps::map_err(name);
            let data = aya::maps::MapData::from_pin(dir.join(name)).map_err(&err)?;
            aya::maps::Map::from_map_data(data).map_err(&err)?.try_into().map_err(&err)?
        };
        // The node-side programs load when a node interface is first attached
        // (`load_node_programs`): an agent without one never has the kernel verify them.
        load_classifiers(&mut ebpf, &[PROG_TC_FORWARD, PROG_TC_REPLY])?;
        if mode == Mode::Xdp {
            load_xdp(&mut ebpf, PROG_XDP_FORWARD)?;
        }
        fill_tail_calls(&mut ebpf, &dir, cfg.ipv6, mode)?;
        // Held open: a program array whose last pin and handle go is emptied by the kernel (a
        // pin directory removed under the agent would leave IPv6 untranslated), and pinned
        // again by `repin`.
        let mut tail_arrays = Vec::new();
        for name in TAIL_ARRAYS {
            let data = aya::maps::MapData::from_pin(dir.join(name)).map_err(maps::map_err(name))?;
            tail_arrays.push((name, data));
        }
        let node_macs = ebpf.take_map(MAP_LB_NODE_MACS).ok_or(DatapathError::MissingMap(MAP_LB_NODE_MACS))?;
        let node_macs = node_macs.try_into().map_err(maps::map_err(MAP_LB_NODE_MACS))?;
        let tc_order = cfg.tc_order;
        let attached = StdHashMap::new();
        let netlink = match cfg.tc_attach {
            TcAttach::Auto => !kernel.tcx,
            TcAttach::Tcx => false,
            TcAttach::Netlink => true,
        };
        let tc_records =
            tc_filters::open(&dir).ok_or(DatapathError::MissingMap(lb_common::MAP_LB_TC_FILTERS))?;
        let (carried_from, logger) = (None, logger);
        let dp = Self {
            ebpf,
            mode,
            links_dir,
            attached,
            ifs,
            ifs6,
            node_addrs: StdHashMap::new(),
            node_loaded: false,
            node_xdp: cfg.node_xdp,
            ipv6: cfg.ipv6,
            node6_error: None,
            snat_reply_ports: (reply_min, reply_max),
            node_macs,
            logger,
            tc_order,
            others,
            never_ran,
            carried_from,
            takeover,
            kernel,
            netlink,
            tc_records,
            sockets: None,
            sock_rev: None,
            sock_rev6: None,
            tail_arrays,
        };
        Ok((dp, maps))
    }

    /// The ports replies of flows SNATed to this node's address are looked for on, first and last
    /// (see [`snat_reply_ports`]).
    pub fn snat_reply_ports(&self) -> (u32, u32) {
        self.snat_reply_ports
    }

    /// What the kernel can do, as found at load.
    pub fn kernel(&self) -> probe::Kernel {
        self.kernel
    }

    /// Layouts of other versions still pinned beside ours, newest first.
    pub fn other_layouts(&self) -> &[Layout] {
        &self.others
    }

    /// Before the first sync: carries the state of the newest other layout this agent can read
    /// into `maps` (see [`migrate`]), unless our programs ran before (our maps are then what
    /// counts). An error leaves the other layout serving.
    pub fn carry_state(&mut self, maps: &mut Maps) -> Result<migrate::Outcome, DatapathError> {
        use migrate::Outcome;
        if self.others.is_empty() {
            return Ok(Outcome::NoOther);
        }
        if !self.never_ran {
            // An earlier start carried its state and moved some of its links: the rest move as
            // then, with its latest flows.
            self.carried_from = migrate::source(&self.others).filter(|l| l.has_links()).cloned();
            return Ok(Outcome::OursRan);
        }
        let Some(from) = migrate::source(&self.others).cloned() else { return Ok(Outcome::Unreadable) };
        Ok(match migrate::carry_state(&from, maps)? {
            Ok(carried) => {
                self.carried_from = Some(from.clone());
                Outcome::Carried(from, carried)
            }
            Err(small) => Outcome::TooSmall(from, small),
        })
    }

    /// With another layout's state carried: takes over its links on `interfaces` so that no flow
    /// is begun in one layout's table and answered from the other's. New flows are held back
    /// (their first packets dropped: senders retransmit) while its forward programs are replaced
    /// by ours, its table (final then: nothing adds to it any more) is copied into ours, and its
    /// reply programs are replaced. Flows already carried go on, unheld. `None` when no state was
    /// carried; else the layout, what the copy gave and how many packets were held back. `Err`
    /// when new flows could not be held: nothing was done.
    pub fn take_over_carried(
        &mut self,
        interfaces: &[String],
        maps: &mut Maps,
    ) -> Result<Option<migrate::TakeOver>, DatapathError> {
        let Some(from) = self.carried_from.clone() else { return Ok(None) };
        // Renewed before each step: a step never runs on a lapsed hold. Not held, nothing is done.
        self.hold_new_flows(true)?;
        self.carried_from = None;
        // Forward programs: ours in its links, or beside them where it has none (layout 6's XDP
        // mode had no TC forward program). An interface whose TC forward program cannot be ours
        // stays wholly theirs, for `attach` to try again.
        let mut ours = Vec::new();
        for interface in interfaces {
            if let Err(e) = self.place(interface, PROG_TC_FORWARD, Some(&from)) {
                tracing::warn!(interface, "{e}");
                continue;
            }
            // Their XDP program, in front of ours, would start flows in their table: ours, or none.
            let xdp_ours = self.wanted(PROG_XDP_FORWARD)
                && self
                    .place(interface, PROG_XDP_FORWARD, Some(&from))
                    .map_err(|e| tracing::warn!(interface, "{e}"))
                    .is_ok();
            if !xdp_ours {
                if let Some(old) = from.link_pin(interface, PROG_XDP_FORWARD) {
                    let _ = std::fs::remove_file(old);
                }
            }
            ours.push(interface);
        }
        // Its table is final now for these interfaces: nothing of theirs starts a flow there.
        let held = self.hold_new_flows(true);
        let copied = held.and_then(|()| migrate::carry_flows(&from, maps));
        let _ = self.hold_new_flows(true);
        for interface in ours {
            if let Err(e) = self.place(interface, PROG_TC_REPLY, Some(&from)) {
                tracing::warn!(interface, "{e}");
            }
        }
        let released = self.hold_new_flows(false);
        if copied.is_err() {
            // Copied again before it is removed.
            self.carried_from = Some(from.clone());
        }
        let result = match (copied, released) {
            (Ok(c), Ok(())) => Ok(c),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        Ok(Some(migrate::TakeOver { from, copied: result, held: self.held_packets() }))
    }

    /// Holds back new flows (`LB_TAKEOVER[0]` set, on every CPU, to a deadline `HOLD_LIMIT_NS`
    /// ahead) or lets them go (0).
    pub fn hold_new_flows(&mut self, on: bool) -> Result<(), DatapathError> {
        self.hold_new_flows_until(if on { monotonic_ns() + HOLD_LIMIT_NS } else { 0 })
    }

    /// Holds back new flows until `deadline` ([`monotonic_ns`]'s clock).
    pub fn hold_new_flows_until(&mut self, deadline: u64) -> Result<(), DatapathError> {
        let err = |e| DatapathError::Map { map: MAP_LB_TAKEOVER, source: e };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| err(MapError::IoError(e)))?;
        let values =
            aya::maps::PerCpuValues::try_from(vec![deadline; cpus]).map_err(|e| err(MapError::IoError(e)))?;
        self.takeover.set(0, values, 0).map_err(err)
    }

    /// Packets held back during take-overs, on all CPUs.
    pub fn held_packets(&self) -> u64 {
        self.takeover.get(&1, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Once every interface of `interfaces` (those that match) is attached: removes every other
    /// layout (its links on interfaces we do not attach to go with it), after copying its flows
    /// again if the take-over's copy failed. Until then it stays, serving where we do not:
    /// `Err` names the interfaces it waits for. What each removal gave; one that failed is tried
    /// again next call.
    #[allow(clippy::type_complexity, reason = "removals, or what they wait for")]
    pub fn finish_take_over(
        &mut self,
        interfaces: &[String],
        maps: &mut Maps,
    ) -> Result<Vec<(Layout, Result<(), String>)>, Vec<String>> {
        let waiting: Vec<String> = interfaces.iter().filter(|i| !self.is_attached(i)).cloned().collect();
        if !waiting.is_empty() {
            return Err(waiting);
        }
        let mut done = Vec::new();
        if let Some(from) = self.carried_from.take() {
            if let Err(e) = migrate::carry_flows(&from, maps) {
                done.push((from.clone(), Err(format!("copying its flows: {e}"))));
                self.carried_from = Some(from);
                return Ok(done);
            }
        }
        for l in std::mem::take(&mut self.others) {
            match migrate::remove(&l) {
                Ok(()) => done.push((l, Ok(()))),
                Err(e) => {
                    done.push((l.clone(), Err(format!("removing {}: {e}", l.dir.display()))));
                    self.others.push(l);
                }
            }
        }
        Ok(done)
    }

    /// The loaded program, for BPF_PROG_TEST_RUN.
    pub fn tc_program(&self, name: &str) -> Option<&SchedClassifier> {
        self.ebpf.program(name).and_then(|p| p.try_into().ok())
    }

    /// The loaded XDP program `name`, for BPF_PROG_TEST_RUN.
    pub fn xdp_program(&self, name: &str) -> Option<&Xdp> {
        self.ebpf.program(name).and_then(|p| p.try_into().ok())
    }

    /// Forwards pending kernel-side log records (only with `bpf_log`).
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    pub fn is_attached(&self, interface: &str) -> bool {
        self.attached.contains_key(interface)
    }

    /// Attached interfaces that are gone: not in `present`, or made again under their name since
    /// (another index: its links and filters went with the one attached). Both link notifications
    /// may come in one wake-up.
    pub fn gone(&self, present: &[String]) -> Vec<String> {
        self.attached
            .iter()
            .filter(|(name, (index, _, _))| {
                !present.contains(name) || tc_filters::ifindex(name).is_some_and(|i| i != *index)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether the current modes attach `prog` on each interface of its role.
    fn wanted(&self, prog: &str) -> bool {
        match prog {
            PROG_XDP_FORWARD => self.mode == Mode::Xdp,
            PROG_XDP_NODE_IN => self.node_xdp,
            _ => true,
        }
    }

    /// Attaches the programs of `role`: on a pod's interface the forward program (TC ingress or
    /// XDP) and the reply program (TC egress); on a node interface the node-side programs. Each
    /// goes through a link pinned under `links/`, so it stays attached while the agent is away. A
    /// link pinned by an earlier agent is taken over: the new program replaces the old one in it
    /// atomically, and no packet goes unhandled. So is one of another layout version, whose pin
    /// then moves into ours (see [`migrate`]).
    pub fn attach(&mut self, interface: &str, role: Role) -> Result<(), DatapathError> {
        if self.is_attached(interface) {
            return Ok(());
        }
        if role == Role::Node {
            self.load_node_programs()?;
        }
        // Taken before anything is attached: should the interface be made again meanwhile, the
        // next pass finds the index changed and attaches to the new one.
        let index = tc_filters::ifindex(interface).ok_or_else(|| DatapathError::Attach {
            program: PROG_TC_FORWARD,
            interface: interface.to_string(),
            source: aya::programs::tc::TcError::IoError(std::io::Error::other(format!(
                "no interface {interface}"
            )))
            .into(),
        })?;
        let mut pins = Vec::new();
        // Attached anew here: removed again if a later program fails (a link taken over stays:
        // it served before, and now serves with our program).
        let mut new = Vec::new();
        for &prog in role.programs() {
            if !self.wanted(prog) {
                // A program this mode does not use (the other --datapath; another layout's):
                // removed once the TC forward program, which handles what it would, is ours.
                for l in &self.others {
                    if let Some(pin) = l.link_pin(interface, prog) {
                        let _ = std::fs::remove_file(pin);
                    }
                }
                let _ = std::fs::remove_file(self.link_pin(interface, prog));
                continue;
            }
            let from = self.others.iter().find(|l| l.link_pin(interface, prog).is_some()).cloned();
            // A netlink filter has no pin: its record in LB_TC_FILTERS stands for it.
            let filter = self.netlink && !is_xdp(prog);
            match self.place(interface, prog, from.as_ref()) {
                Ok(fresh) => {
                    let pin = self.link_pin(interface, prog);
                    if fresh {
                        new.push(prog);
                    }
                    if !filter {
                        pins.push(pin);
                    }
                }
                Err(e) => {
                    for p in &new {
                        if self.netlink && !is_xdp(p) {
                            let _ = tc_filters::detach(&mut self.tc_records, interface, direction(p));
                        } else {
                            let _ = std::fs::remove_file(self.link_pin(interface, p));
                        }
                    }
                    if is_xdp(prog) {
                        // Our TC programs are in place: another layout's XDP program in front of
                        // them would start flows in its table.
                        for l in &self.others {
                            if let Some(pin) = l.link_pin(interface, prog) {
                                let _ = std::fs::remove_file(pin);
                            }
                        }
                    }
                    return Err(e);
                }
            }
        }
        // Whatever other layouts still have on this interface would run beside ours, and so
        // would TC programs of the other kind (TCX links, or netlink filters: a kernel upgrade).
        for l in &self.others {
            for prog in ALL_PROGRAMS {
                if let Some(pin) = l.link_pin(interface, prog) {
                    let _ = std::fs::remove_file(pin);
                }
            }
        }
        if self.netlink {
            for &prog in role.programs().iter().filter(|p| !is_xdp(p)) {
                let _ = std::fs::remove_file(self.link_pin(interface, prog));
            }
        } else {
            for at in [TcAttachType::Ingress, TcAttachType::Egress] {
                let _ = tc_filters::detach(&mut self.tc_records, interface, at);
                for l in &self.others {
                    if let Some(mut r) = tc_filters::open(&l.dir) {
                        let _ = tc_filters::detach(&mut r, interface, at);
                    }
                }
            }
        }
        // Programs of the other role, should the interface have changed role.
        for prog in ALL_PROGRAMS.iter().filter(|p| !role.programs().contains(p)) {
            let _ = std::fs::remove_file(self.link_pin(interface, prog));
        }
        // A node interface's record is written with its address (`set_node_address`).
        if role == Role::Pod {
            let pod = Lb4Interface { role: IF_ROLE_POD, snat_addr: 0 };
            if self.ifs.get(&index, 0).ok() != Some(pod) {
                self.ifs.insert(index, pod, 0).map_err(maps::map_err(MAP_LB4_IFS))?;
            }
        }
        self.attached.insert(interface.to_string(), (index, pins, role));
        Ok(())
    }

    /// Removes the interface records (`LB4_IFS`) of interfaces not attached (gone while the agent
    /// was away, or no longer matching its flags).
    pub fn prune_interface_records(&mut self) {
        let attached: std::collections::HashSet<u32> = self.attached.values().map(|(i, _, _)| *i).collect();
        let stale: Vec<u32> =
            self.ifs.keys().filter_map(Result::ok).filter(|i| !attached.contains(i)).collect();
        for i in stale {
            let _ = self.ifs.remove(&i);
        }
        // IPv6 addresses of node interfaces only.
        let node = |i: &u32| self.attached.values().any(|(n, _, r)| n == i && *r == Role::Node);
        let stale: Vec<u32> = self.ifs6.keys().filter_map(Result::ok).filter(|i| !node(i)).collect();
        for i in stale {
            let _ = self.ifs6.remove(&i);
        }
    }

    /// Loads the node-side programs (once): when the first node interface is attached, or for a
    /// test run.
    pub fn load_node_programs(&mut self) -> Result<(), DatapathError> {
        if self.node_loaded {
            return Ok(());
        }
        load_classifiers(&mut self.ebpf, &[PROG_TC_NODE_IN, PROG_TC_NODE_OUT])?;
        if self.node_xdp {
            load_xdp(&mut self.ebpf, PROG_XDP_NODE_IN)?;
        }
        // Their IPv6 programs (TC: the XDP node program leaves IPv6 to TC), each verified before
        // any slot changes (see `fill_tail_calls`). A kernel that refuses them still gets IPv4
        // from outside served: IPv6 from outside then passes untranslated (`pass_ipv6`), said in
        // the log.
        if self.ipv6 {
            let dir = self.links_dir.parent().expect("the layout directory").to_path_buf();
            let names: Vec<&'static str> = TAIL_NODE_TC_SLOTS.iter().map(|(_, n)| *n).collect();
            let filled = load_classifiers(&mut self.ebpf, &names).and_then(|()| {
                fill_slots(&self.ebpf, &dir, lb_common::MAP_LB_TAIL_NODE_TC, TAIL_NODE_TC_SLOTS, true)
            });
            if let Err(e) = filled {
                self.node6_error = Some(e.to_string());
                tracing::warn!(
                    "the IPv6 node-side programs could not be loaded: {e}; IPv6 from outside passes \
                     untranslated (pass_ipv6), IPv4 is served"
                );
                let emptied =
                    fill_slots(&self.ebpf, &dir, lb_common::MAP_LB_TAIL_NODE_TC, TAIL_NODE_TC_SLOTS, false);
                if let Err(e) = emptied {
                    tracing::warn!("emptying the IPv6 node-side program slots: {e}");
                }
            }
        }
        self.node_loaded = true;
        Ok(())
    }

    /// Why the IPv6 node-side programs could not be loaded (IPv6 from outside then passes
    /// untranslated), if they could not.
    pub fn ipv6_node_error(&self) -> Option<&str> {
        self.node6_error.as_deref()
    }

    /// Records node interface `interface` (attached) in `LB4_IFS` with the address flows from
    /// outside to remote endpoints are SNATed to when they leave through it (or came in through
    /// it and leave through an interface lb does not know), or without one (`None`: such flows
    /// find no address and are dropped, `drop_fib`); and in `LB6_IFS` with its IPv6 address for
    /// IPv6 flows (`addr6`; `None`: no entry). Written only when it changed; true then (and the
    /// first time).
    pub fn set_node_address(
        &mut self,
        interface: &str,
        addr: Option<std::net::Ipv4Addr>,
        addr6: Option<std::net::Ipv6Addr>,
    ) -> Result<bool, DatapathError> {
        let Some((index, _, Role::Node)) = self.attached.get(interface) else { return Ok(false) };
        let index = *index;
        let value = Lb4Interface {
            role: IF_ROLE_NODE,
            snat_addr: addr.map_or(0, |a| u32::from_ne_bytes(a.octets())),
        };
        if self.node_xdp {
            self.record_mac(interface, index)?;
        }
        if self.node_addrs.get(interface) == Some(&(addr, addr6))
            && self.ifs.get(&index, 0).ok() == Some(value)
            && self.ifs6.get(&index, 0).ok() == addr6.map(|a| lb_common::addr6(a.octets()))
        {
            return Ok(false);
        }
        self.ifs.insert(index, value, 0).map_err(maps::map_err(MAP_LB4_IFS))?;
        match addr6 {
            Some(a) => self.ifs6.insert(index, lb_common::addr6(a.octets()), 0),
            None => absent_ok(self.ifs6.remove(&index)),
        }
        .map_err(maps::map_err(lb_common::MAP_LB6_IFS))?;
        self.node_addrs.insert(interface.to_string(), (addr, addr6));
        Ok(true)
    }

    /// Records the Ethernet address of node interface `interface` (index `index`) in
    /// `LB_NODE_MACS` for the XDP node program, where it changed (or is new). An interface
    /// without one (not Ethernet) is removed: XDP leaves its packets to TC.
    fn record_mac(&mut self, interface: &str, index: u32) -> Result<(), DatapathError> {
        let mac = netlink::ethernet_address(interface).filter(|m| *m != [0; 6]);
        let err = maps::map_err(MAP_LB_NODE_MACS);
        match mac {
            Some(addr) => {
                let value = LbNodeMac { addr, _pad: [0; 2] };
                if self.node_macs.get(&index, 0).ok() != Some(value) {
                    self.node_macs.insert(index, value, 0).map_err(err)?;
                }
            }
            None => {
                let _ = self.node_macs.remove(&index);
            }
        }
        Ok(())
    }

    /// Records `mac` as the Ethernet address of interface `index` for the XDP node program (a
    /// test run takes packets in on `lo`, which the agent never records).
    pub fn set_node_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), DatapathError> {
        let value = LbNodeMac { addr: mac, _pad: [0; 2] };
        self.node_macs.insert(index, value, 0).map_err(maps::map_err(MAP_LB_NODE_MACS))
    }

    /// Puts our `prog` on `interface`: into our pinned link, else into `from`'s (another layout's,
    /// whose pin then moves into ours), else in a new link. True when the link is new.
    fn place(
        &mut self,
        interface: &str,
        prog: &'static str,
        from: Option<&Layout>,
    ) -> Result<bool, DatapathError> {
        if self.netlink && !is_xdp(prog) {
            let at = direction(prog);
            let mut others: Vec<tc_filters::Records> =
                self.others.iter().filter_map(|l| tc_filters::open(&l.dir)).collect();
            let order = self.tc_order;
            let p: &mut SchedClassifier = self
                .ebpf
                .program_mut(prog)
                .expect("object has the program")
                .try_into()
                .map_err(|source| DatapathError::Program { program: prog, source })?;
            return tc_filters::attach(p, prog, interface, at, order, &mut self.tc_records, &mut others);
        }
        let pin = self.link_pin(interface, prog);
        if self.take_over(prog, &pin, None) {
            return Ok(false);
        }
        if let Some(old) = from.and_then(|l| l.link_pin(interface, prog)) {
            if self.take_over(prog, &old, Some(&pin)) {
                return Ok(false);
            }
        }
        // Not pinned, or pinned but defunct (its interface was recreated): attach anew.
        let _ = std::fs::remove_file(&pin);
        self.attach_new(interface, prog, &pin)?;
        Ok(true)
    }

    fn link_pin(&self, interface: &str, prog: &str) -> PathBuf {
        self.links_dir.join(link_pin_name(interface, prog))
    }

    /// Puts our program into the link pinned at `pin`. False if there is none or it is defunct.
    /// With `move_to`, the link is pinned there too and its pin at `pin` removed (a link of
    /// another layout moves into ours).
    fn take_over(&mut self, prog: &'static str, pin: &Path, move_to: Option<&Path>) -> bool {
        let Ok(pinned) = PinnedLink::from_pin(pin) else { return false };
        let mut fd = FdLink::from(pinned);
        if let Some(to) = move_to {
            // Pinned in our layout before our program goes in: whenever our program serves
            // through a link, our layout holds it (a start that finds our links empty knows that
            // nothing of ours runs).
            let _ = std::fs::remove_file(to);
            match fd.pin(to) {
                Ok(pinned) => fd = FdLink::from(pinned),
                Err(_) => return false,
            }
        }
        let program = self.ebpf.program_mut(prog).expect("object has the program");
        let swapped = if is_xdp(prog) {
            let Ok(link) = XdpLink::try_from(fd) else { return false };
            let Ok(p) = <&mut Xdp>::try_from(program) else { return false };
            p.attach_to_link(link).ok().map(|id| p.take_link(id).map(drop).is_ok())
        } else {
            let Ok(link) = SchedClassifierLink::try_from(fd) else { return false };
            let Ok(p) = <&mut SchedClassifier>::try_from(program) else { return false };
            p.attach_to_link(link).ok().map(|id| p.take_link(id).map(drop).is_ok())
        };
        if swapped != Some(true) {
            if let Some(to) = move_to {
                let _ = std::fs::remove_file(to);
            }
            return false;
        }
        if move_to.is_some() {
            let _ = std::fs::remove_file(pin);
        }
        // Dropping our handle leaves the link to its pin.
        true
    }

    fn attach_new(&mut self, interface: &str, prog: &'static str, pin: &Path) -> Result<(), DatapathError> {
        let attach_err =
            |source| DatapathError::Attach { program: prog, interface: interface.to_string(), source };
        let pin_err = |reason: String| DatapathError::PinLink {
            program: prog,
            interface: interface.to_string(),
            path: pin.to_path_buf(),
            reason,
        };
        let program = self.ebpf.program_mut(prog).expect("object has the program");
        let fd: FdLink = if is_xdp(prog) {
            let p: &mut Xdp = program.try_into().map_err(attach_err)?;
            let mode = xdp_mode(interface, prog);
            let id = match p.attach(interface, mode) {
                // A driver that refuses its own XDP (an MTU too large for it, say): the node
                // program goes generic rather than leave the interface without NodePorts.
                Err(e) if prog == PROG_XDP_NODE_IN && mode != XdpMode::Skb => {
                    tracing::warn!(
                        interface,
                        "native XDP refused ({e}): the XDP node program runs as generic XDP"
                    );
                    p.attach(interface, XdpMode::Skb)
                }
                r => r,
            }
            .map_err(attach_err)?;
            p.take_link(id).map_err(attach_err)?.try_into().map_err(|e| pin_err(format!("{e}")))?
        } else {
            let p: &mut SchedClassifier = program.try_into().map_err(attach_err)?;
            let at = direction(prog);
            let order = match self.tc_order {
                TcOrder::First => LinkOrder::first(),
                TcOrder::Last => LinkOrder::last(),
            };
            let id =
                p.attach_with_options(interface, at, TcAttachOptions::TcxOrder(order)).map_err(attach_err)?;
            p.take_link(id).map_err(attach_err)?.try_into().map_err(|e| pin_err(format!("{e}")))?
        };
        fd.pin(pin).map_err(|e| pin_err(e.to_string()))?;
        Ok(())
    }

    /// Whether this agent's pins are all in place: the pin directory can be removed, or bpffs
    /// unmounted, under a running agent. The links live only in their pins, so the programs are
    /// detached then; the maps live on in this agent's handles. Every pin counts, and the links'
    /// directory: a removal the agent noticed half way may go on to take what it restored.
    pub fn pins_present(&self, maps: &Maps) -> bool {
        let Some(dir) = self.links_dir.parent() else { return false };
        self.links_dir.is_dir()
            && maps.missing_pin(dir).is_none()
            && self.tail_arrays.iter().all(|(name, _)| dir.join(name).exists())
            && self.attached.values().flat_map(|(_, p, _)| p).all(|p| p.exists())
            && self.sockets.iter().flatten().all(|p| p.exists())
    }

    /// Pins every map again where it was and forgets every attachment (its link went with its
    /// pin), for the caller to attach afresh. Tracked flows, Maglev tables and counters are kept:
    /// the maps never went away.
    pub fn repin(&mut self, maps: &Maps) -> Result<(), DatapathError> {
        let dir = self.links_dir.parent().expect("the layout directory").to_path_buf();
        std::fs::create_dir_all(&self.links_dir)
            .map_err(|source| DatapathError::PinDir { path: self.links_dir.clone(), source })?;
        for d in [dir.parent().unwrap_or(&dir), &dir, &self.links_dir] {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
        }
        maps.pin_missing(&dir)?;
        for (name, data) in &self.tail_arrays {
            let path = dir.join(name);
            if !path.exists() {
                data.pin(&path).map_err(|e| DatapathError::PinMap {
                    map: name,
                    path,
                    reason: e.to_string(),
                })?;
            }
        }
        self.attached.clear();
        self.sockets = None;
        Ok(())
    }

    /// Interfaces whose netlink filters are no longer ours in place (deleted by hand, or with
    /// their qdisc: a CNI reinstalled, say): forgotten, for the caller to attach them again.
    pub fn lost_filters(&mut self) -> Vec<String> {
        if !self.netlink {
            return Vec::new();
        }
        let id = |name: &str| self.tc_program(name).and_then(|p| p.info().ok()).map(|i| i.id());
        let lost: Vec<String> = self
            .attached
            .iter()
            .filter(|(i, (_, _, role))| {
                role.programs().iter().filter(|p| !is_xdp(p)).any(|p| {
                    id(p).is_some_and(|id| {
                        tc_filters::in_place(&self.tc_records, i, direction(p), id) == Some(false)
                    })
                })
            })
            .map(|(i, _)| i.clone())
            .collect();
        for i in &lost {
            self.attached.remove(i);
        }
        lost
    }

    /// Forgets an interface that went away (its links went with it; their pins are removed).
    pub fn forget(&mut self, interface: &str) {
        let Some((index, pins, _)) = self.attached.remove(interface) else { return };
        for pin in pins {
            let _ = std::fs::remove_file(pin);
        }
        let _ = self.ifs.remove(&index);
        let _ = self.node_macs.remove(&index);
        self.node_addrs.remove(interface);
        tc_filters::prune(&mut self.tc_records);
    }

    /// Removes pins of links on interfaces that no longer exist (left by an agent that was away
    /// while they went).
    pub fn prune_links(&mut self, present: &[String]) {
        for e in std::fs::read_dir(&self.links_dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if sockets::is_socket_pin(&name) {
                continue;
            }
            let iface = name.rsplit_once('@').map_or(name.as_str(), |(i, _)| i).replace(':', ".");
            if !present.contains(&iface) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        tc_filters::prune(&mut self.tc_records);
    }
}

/// The capacity of the map pinned at `pin`, if one is.
fn pinned_entries(pin: &std::path::Path) -> Option<u32> {
    aya::maps::MapData::from_pin(pin).ok().and_then(|d| d.info().ok()).map(|i| i.max_entries())
}

/// The capacities of the lb6 maps: the IPv4 maps' with `--ipv6` on, one entry each with it off
/// (no IPv6 frontend is written then, and an LRU or preallocated hash costs its capacity in
/// kernel memory whether used or not).
struct Caps6 {
    services: u32,
    backends: u32,
    ct: u32,
    affinity: u32,
    members: u32,
    frags: u32,
    sock_rev: u32,
    sock_fwd: u32,
}

impl Caps6 {
    fn of(ipv6: bool, c: &Capacities) -> Self {
        if ipv6 {
            Self {
                services: c.services,
                backends: c.backends,
                ct: c.ct,
                affinity: c.affinity,
                members: c.members,
                frags: lb_common::capacity::FRAGS,
                sock_rev: lb_common::capacity::SOCK_REV,
                sock_fwd: lb_common::capacity::SOCK_FWD,
            }
        } else {
            // IPv4-mapped destinations of IPv6 sockets are the IPv4 maps': with no IPv6 Service,
            // no entry is ever written to `LB6_SOCK_*`.
            Self {
                services: 1,
                backends: 1,
                ct: 1,
                affinity: 1,
                members: 1,
                frags: 1,
                sock_rev: 1,
                sock_fwd: 1,
            }
        }
    }

    /// Removes the pins of lb6 maps under `dir` made under the other `--ipv6` setting (one entry
    /// each with it off, full size with it on): the loader would reuse them as they are, so they
    /// are made anew (IPv6 state of the earlier setting is dropped with them). A pinned lb6 map of
    /// another full size (an earlier agent's capacities or defaults) is kept, flows and all, as
    /// the IPv4 maps are.
    fn drop_other_sizes(&self, dir: &std::path::Path) {
        let want = [
            (lb_common::MAP_LB6_SERVICES, self.services),
            (lb_common::MAP_LB6_VIPS, self.services),
            (lb_common::MAP_LB6_BACKENDS, self.backends),
            (lb_common::MAP_LB6_CT, self.ct),
            (lb_common::MAP_LB6_AFFINITY, self.affinity),
            (lb_common::MAP_LB6_MEMBERS, self.members),
            (lb_common::MAP_LB6_FRAGS, self.frags),
            (lb_common::MAP_LB6_SOCK_REV, self.sock_rev),
            (lb_common::MAP_LB6_SOCK_FWD, self.sock_fwd),
        ];
        for (name, n) in want {
            let pin = dir.join(name);
            if let Some(pinned) = pinned_entries(&pin).filter(|p| (*p == 1) != (n == 1)) {
                tracing::info!(map = name, pinned, now = n, "made anew for --ipv6's capacity");
                let _ = std::fs::remove_file(&pin);
            }
        }
    }
}
