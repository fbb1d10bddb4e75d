//! This node's addresses as Services see them: where NodePorts listen (`--nodeport-addresses`,
//! kube-proxy's flag of the same name and syntax) and the node's primary IP. Pure: the host's
//! interface addresses come in as a list (see `crate::host`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use k8s_openapi::api::core::v1::Node;

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers should go on sending this node traffic (kube-proxy's `nodeEligible`,
/// KEP-3836): not once its Node object is being deleted, nor once the cluster autoscaler has
/// tainted it for deletion. `Err` says why not.
pub fn eligible(node: &Node) -> Result<(), String> {
    if let Some(t) = &node.metadata.deletion_timestamp {
        return Err(format!("the Node is being deleted (deletionTimestamp {})", t.0));
    }
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
    if taints.into_iter().flatten().any(|t| t.key == TAINT_TO_BE_DELETED) {
        return Err(format!(
            "the Node has the taint {TAINT_TO_BE_DELETED} (the cluster autoscaler removes it)"
        ));
    }
    Ok(())
}

/// An IP network: an address with its host bits cleared, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a CIDR does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("no prefix length (write ADDRESS/LENGTH, e.g. 10.0.0.0/8)")]
    NoPrefix,
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error("{0:?} is not a prefix length")]
    Prefix(String),
    #[error("prefix length {len} is more than {max}")]
    PrefixTooLong { len: u8, max: u8 },
}

impl Cidr {
    /// The network of `addr` with `prefix_len` bits; host bits are cleared (Go's
    /// `net.ParseCIDR`, which kube-proxy uses, accepts them too).
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, CidrError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(CidrError::PrefixTooLong { len: prefix_len, max });
        }
        Ok(Self { addr: mask(addr, prefix_len), prefix_len })
    }

    /// The network address (host bits clear).
    pub const fn addr(&self) -> IpAddr {
        self.addr
    }

    pub const fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is in this network; an address of the other family never is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }

    /// Whether kube-proxy takes this CIDR for IPv4 (Go's `netutils`: an address with a 4-byte
    /// form, so an IPv4-mapped network such as `::ffff:0:0/96` too).
    pub fn is_ipv4_family(&self) -> bool {
        match self.addr {
            IpAddr::V4(_) => true,
            IpAddr::V6(a) => a.to_ipv4_mapped().is_some(),
        }
    }

    /// Whether local address `ip` is in this network as kube-proxy matches it: [`Cidr::contains`],
    /// or an IPv4 address by its mapped form in an IPv4-mapped network.
    fn holds(&self, ip: IpAddr) -> bool {
        self.contains(ip) || matches!(ip, IpAddr::V4(v) if self.contains(IpAddr::V6(v.to_ipv6_mapped())))
    }
}

/// `addr` with all but its first `len` bits cleared (`len` at most the family's width).
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (addr, len) = s.split_once('/').ok_or(CidrError::NoPrefix)?;
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Address(addr.into()))?;
        // Digits only: `u8::from_str` would take "+8".
        let len = Some(len)
            .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| CidrError::Prefix(len.into()))?;
        Self::new(addr, len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Which of this node's addresses NodePorts listen on: `--nodeport-addresses`, with kube-proxy's
/// syntax (`primary`, or a comma-separated list of CIDRs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The node's primary IP (see [`primary_ipv4`]): kube-proxy's default in nftables mode.
    #[default]
    Primary,
    /// Every local interface address inside one of these networks, of either family.
    Cidrs(Vec<Cidr>),
}

/// Why `--nodeport-addresses` does not parse; names the item at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodePortAddressesError {
    #[error("--nodeport-addresses: {item:?}: {reason}")]
    Cidr { item: String, reason: CidrError },
    #[error("--nodeport-addresses: {0:?}: an empty item")]
    Empty(String),
    #[error("--nodeport-addresses: {0:?}: \"primary\" cannot be mixed with CIDRs")]
    PrimaryMixed(String),
}

/// The flag's word for [`NodePortAddresses::Primary`].
const PRIMARY: &str = "primary";

impl FromStr for NodePortAddresses {
    type Err = NodePortAddressesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let items: Vec<&str> = s.split(',').map(str::trim).collect();
        if items.iter().any(|i| i.is_empty()) {
            return Err(NodePortAddressesError::Empty(s.into()));
        }
        if items.contains(&PRIMARY) {
            // kube-proxy's validation: "primary" stands alone.
            return match items.len() {
                1 => Ok(Self::Primary),
                _ => Err(NodePortAddressesError::PrimaryMixed(s.into())),
            };
        }
        items
            .iter()
            .map(|i| i.parse().map_err(|reason| NodePortAddressesError::Cidr { item: (*i).into(), reason }))
            .collect::<Result<_, _>>()
            .map(Self::Cidrs)
    }
}

impl fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Primary => f.write_str(PRIMARY),
            Self::Cidrs(cidrs) => {
                for (i, c) in cidrs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{c}")?;
                }
                Ok(())
            }
        }
    }
}

/// Which `spec.externalIPs` lb serves (`--external-ips`). Anyone who may create a Service may
/// list any address there, and catch the traffic of the cluster's pods (and of this node) to it
/// (CVE-2020-8554): `all` is kube-proxy's behaviour; `node-addresses` serves only this node's own
/// addresses (Cilium's default for its socket-level translation); `none` serves none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalIps {
    #[default]
    All,
    NodeAddresses,
    None,
}

impl FromStr for ExternalIps {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "node-addresses" => Ok(Self::NodeAddresses),
            "none" => Ok(Self::None),
            other => Err(format!("--external-ips: {other:?}: one of all, node-addresses, none")),
        }
    }
}

impl fmt::Display for ExternalIps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::All => "all",
            Self::NodeAddresses => "node-addresses",
            Self::None => "none",
        })
    }
}

/// The node's primary IPv4 address: the first IPv4 `InternalIP` in `status.addresses`, else the
/// first IPv4 `ExternalIP` (kube-proxy's `GetNodeHostIPs`). Addresses that do not parse are
/// skipped; an IPv4-mapped IPv6 address counts as IPv4, as Go's parser has it.
pub fn primary_ipv4(node: &Node) -> Option<Ipv4Addr> {
    let addrs = node.status.as_ref()?.addresses.as_deref()?;
    let first = |kind: &str| {
        addrs.iter().filter(|a| a.type_ == kind).find_map(|a| match a.address.trim().parse().ok()? {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        })
    };
    first("InternalIP").or_else(|| first("ExternalIP"))
}

/// The node's primary IPv6 address: the first IPv6 `InternalIP` in `status.addresses`, else the
/// first IPv6 `ExternalIP` (kube-proxy's `GetNodeHostIPs` for the other family). An IPv4-mapped
/// address is IPv4's ([`primary_ipv4`]), not this.
pub fn primary_ipv6(node: &Node) -> Option<std::net::Ipv6Addr> {
    let addrs = node.status.as_ref()?.addresses.as_deref()?;
    let first = |kind: &str| {
        addrs.iter().filter(|a| a.type_ == kind).find_map(|a| match a.address.trim().parse().ok()? {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => Some(v6),
            _ => None,
        })
    };
    first("InternalIP").or_else(|| first("ExternalIP"))
}

/// The IPv6 addresses health-check node ports (and, to come, NodePorts) listen on, sorted and
/// without duplicates: [`nodeport_ipv4`]'s rules for the other family ([`primary_ipv6`]; or
/// every address of `local`, this host's global IPv6 addresses, inside one of the networks).
/// Never loopback, unspecified, link-local (which needs an interface to be reached) or
/// IPv4-mapped.
pub fn nodeport_ipv6(
    spec: &NodePortAddresses,
    node: Option<&Node>,
    local: &[std::net::Ipv6Addr],
) -> Vec<std::net::Ipv6Addr> {
    let mut out: Vec<std::net::Ipv6Addr> = match spec {
        NodePortAddresses::Primary => node.and_then(primary_ipv6).into_iter().collect(),
        NodePortAddresses::Cidrs(cidrs) => {
            local.iter().copied().filter(|a| cidrs_select(cidrs, (*a).into())).collect()
        }
    };
    out.retain(|a| {
        let link_local = a.segments()[0] & 0xffc0 == 0xfe80;
        !a.is_loopback() && !a.is_unspecified() && !link_local && a.to_ipv4_mapped().is_none()
    });
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether `--nodeport-addresses` CIDRs `cidrs` select local address `a`: one of them holds it,
/// or none is of its family (kube-proxy's `NewNodePortAddresses` gives a family without a CIDR
/// its zero CIDR: every address of the family).
fn cidrs_select(cidrs: &[Cidr], a: IpAddr) -> bool {
    let mut mine = cidrs.iter().filter(|c| c.is_ipv4_family() == a.is_ipv4()).peekable();
    mine.peek().is_none() || mine.any(|c| c.holds(a))
}

/// The IPv4 addresses NodePorts listen on, sorted and without duplicates.
///
/// - [`NodePortAddresses::Primary`]: the node's primary IPv4 ([`primary_ipv4`] of `node`), as the
///   Node object gives it, whether or not it is in `local`: kube-proxy's nftables `primary` uses
///   the node IP unchecked too (a node behind 1:1 NAT may list an address it does not hold).
///   Without a Node object, none (kube-proxy would fall back to loopback; lb never listens
///   there).
/// - [`NodePortAddresses::Cidrs`]: every address of `local` (this host's interface addresses)
///   inside one of the networks.
///
/// Never a loopback address (127.0.0.0/8: reaching it needs `route_localnet=1`,
/// kubernetes#90259), even when a CIDR covers it, nor 0.0.0.0.
pub fn nodeport_ipv4(spec: &NodePortAddresses, node: Option<&Node>, local: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = match spec {
        NodePortAddresses::Primary => node.and_then(primary_ipv4).into_iter().collect(),
        NodePortAddresses::Cidrs(cidrs) => {
            local.iter().copied().filter(|a| cidrs_select(cidrs, (*a).into())).collect()
        }
    };
    out.retain(|a| !a.is_loopback() && !a.is_unspecified());
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    use super::*;

    fn node(addrs: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| NodeAddress { type_: (*t).into(), address: (*a).into() })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn ips(s: &[&str]) -> Vec<Ipv4Addr> {
        s.iter().map(|a| a.parse().expect("test address")).collect()
    }

    fn spec(s: &str) -> NodePortAddresses {
        s.parse().expect("valid --nodeport-addresses")
    }

    fn parse_err(s: &str) -> String {
        s.parse::<NodePortAddresses>().expect_err("invalid --nodeport-addresses").to_string()
    }

    #[test]
    fn parses_and_displays_the_flag() {
        assert_eq!(NodePortAddresses::default(), NodePortAddresses::Primary);
        assert_eq!(spec("primary"), NodePortAddresses::Primary);
        assert_eq!(spec("primary").to_string(), "primary");
        let s = spec("10.0.0.0/8, 192.168.1.0/24,fd00::/64");
        assert_eq!(s.to_string(), "10.0.0.0/8,192.168.1.0/24,fd00::/64");
        assert_eq!(spec(&s.to_string()), s, "round trip");
        // Host bits are cleared, as Go's ParseCIDR does.
        assert_eq!(spec("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(spec("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(spec("10.1.2.3/32").to_string(), "10.1.2.3/32");
    }

    #[test]
    fn parse_errors_name_the_item() {
        assert_eq!(
            parse_err("10.0.0.0/8,10.0.0.0/33"),
            r#"--nodeport-addresses: "10.0.0.0/33": prefix length 33 is more than 32"#
        );
        assert_eq!(
            parse_err("fd00::/129"),
            r#"--nodeport-addresses: "fd00::/129": prefix length 129 is more than 128"#
        );
        assert_eq!(
            parse_err("10.0.0.0"),
            r#"--nodeport-addresses: "10.0.0.0": no prefix length (write ADDRESS/LENGTH, e.g. 10.0.0.0/8)"#
        );
        assert_eq!(
            parse_err("10.0.0.256/8"),
            r#"--nodeport-addresses: "10.0.0.256/8": "10.0.0.256" is not an IP address"#
        );
        assert_eq!(
            parse_err("10.0.0.0/+8"),
            r#"--nodeport-addresses: "10.0.0.0/+8": "+8" is not a prefix length"#
        );
        assert_eq!(parse_err("10.0.0.0/"), r#"--nodeport-addresses: "10.0.0.0/": "" is not a prefix length"#);
        assert_eq!(parse_err(""), r#"--nodeport-addresses: "": an empty item"#);
        assert_eq!(parse_err("10.0.0.0/8,"), r#"--nodeport-addresses: "10.0.0.0/8,": an empty item"#);
        assert_eq!(
            parse_err("primary,10.0.0.0/8"),
            r#"--nodeport-addresses: "primary,10.0.0.0/8": "primary" cannot be mixed with CIDRs"#
        );
    }

    #[test]
    fn cidr_contains_only_its_own_family() {
        let c: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(c.contains("10.255.0.1".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        assert!(!c.contains("::ffff:10.0.0.1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("1.2.3.4".parse().expect("ip")));
        let v6: Cidr = "fd00::/8".parse().expect("cidr");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert!(!v6.contains("10.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn primary_is_the_first_internal_ipv4_else_the_first_external() {
        let n = node(&[
            ("Hostname", "n1"),
            ("ExternalIP", "203.0.113.5"),
            ("InternalIP", "fd00::5"),
            ("InternalIP", "not-an-ip"),
            ("InternalIP", "10.0.0.5"),
            ("InternalIP", "10.0.0.6"),
        ]);
        assert_eq!(primary_ipv4(&n), Some(Ipv4Addr::new(10, 0, 0, 5)));
        let n = node(&[("InternalIP", "fd00::5"), ("ExternalIP", "fd00::6"), ("ExternalIP", "203.0.113.5")]);
        assert_eq!(primary_ipv4(&n), Some(Ipv4Addr::new(203, 0, 113, 5)));
        assert_eq!(primary_ipv4(&node(&[("Hostname", "10.0.0.5"), ("InternalIP", "fd00::5")])), None);
        assert_eq!(primary_ipv4(&Node::default()), None);
    }

    #[test]
    fn primary_selects_the_node_ip_as_given() {
        let n = node(&[("InternalIP", "10.0.0.5")]);
        let p = NodePortAddresses::Primary;
        // Not among the local addresses: kept, as kube-proxy keeps it.
        assert_eq!(nodeport_ipv4(&p, Some(&n), &ips(&["192.168.0.1"])), ips(&["10.0.0.5"]));
        assert_eq!(nodeport_ipv4(&p, None, &ips(&["10.0.0.5"])), ips(&[]), "no Node object, no address");
        assert_eq!(nodeport_ipv4(&p, Some(&Node::default()), &ips(&["10.0.0.5"])), ips(&[]));
        let lo = node(&[("InternalIP", "127.0.0.1")]);
        assert_eq!(nodeport_ipv4(&p, Some(&lo), &ips(&["127.0.0.1"])), ips(&[]), "never loopback");
    }

    #[test]
    fn cidrs_select_local_addresses_only_never_loopback() {
        let n = node(&[("InternalIP", "10.0.0.5")]);
        let local = ips(&["127.0.0.1", "192.168.1.7", "10.0.0.5", "172.16.0.1", "10.9.9.9", "127.0.0.53"]);
        assert_eq!(
            nodeport_ipv4(&spec("10.0.0.0/8,192.168.1.0/24"), Some(&n), &local),
            ips(&["10.0.0.5", "10.9.9.9", "192.168.1.7"])
        );
        // The Node's own address counts only when it is local.
        assert_eq!(nodeport_ipv4(&spec("10.0.0.0/8"), Some(&n), &ips(&["192.168.1.7"])), ips(&[]));
        assert_eq!(
            nodeport_ipv4(&spec("0.0.0.0/0"), None, &local),
            ips(&["10.0.0.5", "10.9.9.9", "172.16.0.1", "192.168.1.7"]),
            "loopback even when a CIDR covers it: never"
        );
        assert_eq!(nodeport_ipv4(&spec("127.0.0.0/8"), None, &local), ips(&[]));
    }

    fn ips6(list: &[&str]) -> Vec<std::net::Ipv6Addr> {
        list.iter().map(|a| a.parse().expect("an IPv6 address")).collect()
    }

    /// IPv6's rules are IPv4's for the other family: the primary IPv6 (InternalIP, else
    /// ExternalIP; never an IPv4-mapped one), or the local addresses inside an IPv6 CIDR; never
    /// loopback, link-local or mapped; sorted, once each.
    #[test]
    fn ipv6_addresses_follow_the_same_rules_for_their_family() {
        let n = node(&[
            ("ExternalIP", "2001:db8::5"),
            ("InternalIP", "10.0.0.5"),
            ("InternalIP", "::ffff:10.0.0.6"),
            ("InternalIP", "fd00::5"),
            ("InternalIP", "fd00::6"),
        ]);
        assert_eq!(primary_ipv6(&n), Some("fd00::5".parse().expect("addr")));
        let n2 = node(&[("InternalIP", "10.0.0.5"), ("ExternalIP", "2001:db8::5")]);
        assert_eq!(primary_ipv6(&n2), Some("2001:db8::5".parse().expect("addr")));
        assert_eq!(primary_ipv6(&node(&[("InternalIP", "10.0.0.5")])), None);
        let p = NodePortAddresses::Primary;
        assert_eq!(nodeport_ipv6(&p, Some(&n), &ips6(&["fd00::9"])), ips6(&["fd00::5"]), "as given");
        assert_eq!(nodeport_ipv6(&p, None, &ips6(&["fd00::9"])), ips6(&[]));
        let local = ips6(&["fd00::9", "::1", "fe80::1", "2001:db8::7", "fd00::1", "fd00::9"]);
        assert_eq!(nodeport_ipv6(&spec("fd00::/8"), Some(&n), &local), ips6(&["fd00::1", "fd00::9"]));
        assert_eq!(
            nodeport_ipv6(&spec("::/0"), None, &local),
            ips6(&["2001:db8::7", "fd00::1", "fd00::9"]),
            "never loopback or link-local, even when a CIDR covers them"
        );
        assert_eq!(
            nodeport_ipv6(&spec("10.0.0.0/8"), None, &local),
            ips6(&["2001:db8::7", "fd00::1", "fd00::9"]),
            "no IPv6 CIDR: every IPv6 address (the family's zero CIDR)"
        );
        assert_eq!(nodeport_ipv6(&spec("fd00::/8,10.0.0.0/8"), None, &local), ips6(&["fd00::1", "fd00::9"]));
    }

    /// kube-proxy's `NewNodePortAddresses`: a family no CIDR is of gets its zero CIDR (every
    /// address of the family); IPv6 CIDRs never select an IPv4 address.
    #[test]
    fn a_family_without_a_cidr_listens_on_all_its_addresses() {
        let local = ips(&["10.0.0.5", "192.168.1.7", "127.0.0.1"]);
        let all = ips(&["10.0.0.5", "192.168.1.7"]);
        assert_eq!(nodeport_ipv4(&spec("::/0"), None, &local), all);
        // An IPv4-mapped network is IPv4's (as Go's netutils has it), holding IPv4 addresses by
        // their mapped form; IPv6 then has no CIDR: all of its addresses.
        assert_eq!(nodeport_ipv4(&spec("::ffff:0:0/96"), None, &local), all);
        assert_eq!(nodeport_ipv4(&spec("::ffff:10.0.0.0/104"), None, &local), ips(&["10.0.0.5"]));
        let local6: Vec<std::net::Ipv6Addr> = vec!["fd00::1".parse().expect("addr")];
        assert_eq!(nodeport_ipv6(&spec("::ffff:0:0/96"), None, &local6), local6);
        assert_eq!(nodeport_ipv4(&spec("fd00::/8,10.0.0.0/8"), None, &local), ips(&["10.0.0.5"]));
        assert_eq!(nodeport_ipv4(&spec("fd00::/8,172.16.0.0/12"), None, &local), ips(&[]));
    }

    #[test]
    fn addresses_are_sorted_and_listed_once() {
        let local = ips(&["10.0.0.9", "10.0.0.5", "10.0.0.9", "10.0.0.1"]);
        assert_eq!(
            nodeport_ipv4(&spec("10.0.0.0/24,10.0.0.0/8"), None, &local),
            ips(&["10.0.0.1", "10.0.0.5", "10.0.0.9"])
        );
    }

    /// KEP-3836: a Node being deleted, or tainted by the cluster autoscaler for deletion, is not
    /// eligible; other taints (NoSchedule, NoExecute) leave it so.
    #[test]
    fn a_node_going_away_is_not_eligible() {
        let taint = |key: &str, effect: &str| k8s_openapi::api::core::v1::Taint {
            key: key.into(),
            effect: effect.into(),
            ..Default::default()
        };
        let mut n = node(&[("InternalIP", "192.0.2.1")]);
        assert_eq!(eligible(&n), Ok(()));
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![
                taint("node.kubernetes.io/unschedulable", "NoSchedule"),
                taint("node.kubernetes.io/not-ready", "NoExecute"),
            ]),
            ..Default::default()
        });
        assert_eq!(eligible(&n), Ok(()), "cordoned or not ready: still eligible");
        n.spec
            .as_mut()
            .and_then(|s| s.taints.as_mut())
            .expect("taints")
            .push(taint(TAINT_TO_BE_DELETED, "NoSchedule"));
        assert!(eligible(&n).expect_err("to be deleted").contains(TAINT_TO_BE_DELETED));
        let mut n = node(&[]);
        n.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2026-12-03T20:00:00Z".parse().expect("time"),
        ));
        assert!(eligible(&n).expect_err("deleted").contains("being deleted"));
    }
}
