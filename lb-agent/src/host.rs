//! This host as the agent sees it: its interface addresses in the calling thread's network
//! namespace, IPv4 read with `getifaddrs(3)`, IPv6 from `/proc/net/if_inet6` (with the flags
//! `getifaddrs` lacks). The choice among them (`--nodeport-addresses`) is pure and
//! lives in `model::node`.

use std::{collections::HashMap, ffi::CStr, io, net::Ipv4Addr};

/// One IPv4 address on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub ifname: String,
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// Frees a `getifaddrs` list on every way out.
struct IfAddrs(*mut libc::ifaddrs);

impl Drop for IfAddrs {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful getifaddrs and is freed once, here.
        unsafe { libc::freeifaddrs(self.0) }
    }
}

/// Every IPv4 address of every interface in the calling thread's network namespace, in the
/// kernel's order (by interface, and on each interface its primary address first). Entries
/// without an IPv4 address (IPv6, link-layer) are skipped, and so are those of an interface that
/// vanished while they were read.
pub fn ipv4_addresses() -> io::Result<Vec<InterfaceAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs only writes the list's head to `head`, a valid pointer.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let list = IfAddrs(head);
    let mut indexes: HashMap<String, u32> = HashMap::new();
    let mut out = Vec::new();
    let mut cur = list.0.cast_const();
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until `list` drops.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is null or a socket address from getifaddrs, alive with the list.
        let Some(addr) = (unsafe { sockaddr_ipv4(ifa.ifa_addr) }) else { continue };
        // A netmask that is not IPv4 (or none) counts as a host's.
        // SAFETY: as ifa_addr.
        let mask = unsafe { sockaddr_ipv4(ifa.ifa_netmask) };
        let prefix_len = mask.map_or(32, |m| u32::from(m).leading_ones() as u8);
        // SAFETY: a non-null ifa_name is a NUL-terminated string alive with the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
        let ifname = name.to_string_lossy().into_owned();
        let ifindex = match indexes.get(&ifname) {
            Some(i) => *i,
            None => {
                // SAFETY: `name` is NUL-terminated.
                let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
                indexes.insert(ifname.clone(), i);
                i
            }
        };
        // 0: the interface is gone since getifaddrs listed it.
        if ifindex != 0 {
            out.push(InterfaceAddr { ifname, ifindex, addr, prefix_len });
        }
    }
    Ok(out)
}

/// Whether an interface in the calling thread's network namespace has a global IPv6 address (not
/// loopback, link-local or multicast; unique local addresses count): where a node takes part in
/// IPv6, as kube-proxy's detection of a node's IP families has it.
pub fn has_global_ipv6() -> io::Result<bool> {
    Ok(!global_ipv6_addresses()?.is_empty())
}

/// The global IPv6 addresses (as [`has_global_ipv6`] counts them) of every interface in the
/// calling thread's network namespace, in the kernel's order: those a NodePort or a health-check
/// node port can listen on without naming an interface. From [`ipv6_interface_addresses`], which
/// the SNAT address is chosen from too.
pub fn global_ipv6_addresses() -> io::Result<Vec<std::net::Ipv6Addr>> {
    Ok(global_ipv6_of(&ipv6_interface_addresses()?))
}

/// The global addresses of `addrs`, each once, in their order.
fn global_ipv6_of(addrs: &[Ipv6IfAddr]) -> Vec<std::net::Ipv6Addr> {
    let mut out = Vec::new();
    for a in addrs.iter().map(|a| a.addr).filter(|a| is_global6(*a)) {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// An IPv6 address of an interface as `/proc/net/if_inet6` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6IfAddr {
    pub ifname: String,
    pub addr: std::net::Ipv6Addr,
    pub prefix_len: u8,
    /// `IFA_F_*`.
    pub flags: u32,
}

/// `IFA_F_TEMPORARY`, `IFA_F_DADFAILED`, `IFA_F_TENTATIVE`: an address a flow should not be
/// given as its source (a privacy address that changes, one that failed or has not finished
/// duplicate address detection).
const IFA_F_UNFIT: u32 = 0x01 | 0x08 | 0x40;
/// `IFA_F_DEPRECATED`: an address being retired, used last (as the kernel's source address
/// selection does).
const IFA_F_DEPRECATED: u32 = 0x20;

/// The IPv6 addresses of the calling thread's network namespace, with their flags (what
/// `getifaddrs` does not give). None on a kernel without IPv6 (`ipv6.disable=1`, or no IPv6
/// module), which has no `if_inet6`.
pub fn ipv6_interface_addresses() -> io::Result<Vec<Ipv6IfAddr>> {
    match std::fs::read_to_string("/proc/thread-self/net/if_inet6") {
        Ok(text) => Ok(parse_if_inet6(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// `/proc/net/if_inet6`: per line the address (32 hex digits), interface index, prefix length,
/// scope and flags (hex), and the interface's name. Lines that do not read so are skipped.
fn parse_if_inet6(text: &str) -> Vec<Ipv6IfAddr> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [hex, _index, prefix, _scope, flags, name] = f.as_slice() else { return None };
            let addr = u128::from_str_radix(hex, 16).ok().filter(|_| hex.len() == 32)?;
            Some(Ipv6IfAddr {
                ifname: (*name).to_string(),
                addr: std::net::Ipv6Addr::from(addr),
                prefix_len: u8::from_str_radix(prefix, 16).ok()?,
                flags: u32::from_str_radix(flags, 16).ok()?,
            })
        })
        .collect()
}

/// The IPv6 address flows from outside leave node interface `name` (`None`: any interface)
/// with when lb SNATs them to this node: `prefer` (the node's primary IPv6 address) when the
/// interface has it, else its lowest global address that is not a single host's (`/128`: a
/// floating address a failover may move), else its lowest `/128`; deprecated ones after all
/// others. Never a temporary, tentative or failed address.
pub fn snat_ipv6_of(
    addrs: &[Ipv6IfAddr],
    name: Option<&str>,
    prefer: Option<std::net::Ipv6Addr>,
) -> Option<std::net::Ipv6Addr> {
    let mut fit: Vec<&Ipv6IfAddr> = addrs
        .iter()
        .filter(|a| name.is_none_or(|n| a.ifname == n) && is_global6(a.addr) && a.flags & IFA_F_UNFIT == 0)
        .collect();
    fit.sort_by_key(|a| {
        (a.flags & IFA_F_DEPRECATED != 0, Some(a.addr) != prefer, a.prefix_len == 128, a.addr)
    });
    fit.first().map(|a| a.addr)
}

/// Not loopback, unspecified, multicast or link-local (fe80::/10), nor IPv4-mapped.
pub fn is_global6(a: std::net::Ipv6Addr) -> bool {
    let link_local = a.segments()[0] & 0xffc0 == 0xfe80;
    !a.is_loopback()
        && !a.is_unspecified()
        && !a.is_multicast()
        && !link_local
        && a.to_ipv4_mapped().is_none()
}

/// The IPv4 address in `sa`, when it is a non-null `AF_INET` socket address.
///
/// # Safety
/// `sa` is null or points to a valid socket address as large as its family's (as getifaddrs
/// gives them).
unsafe fn sockaddr_ipv4(sa: *const libc::sockaddr) -> Option<Ipv4Addr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: `sa` points to a socket address (the caller's promise); sa_family is at the same
    // place in all of them. Read unaligned: nothing promises sockaddr_in's alignment.
    let family = unsafe { std::ptr::addr_of!((*sa).sa_family).read_unaligned() };
    if i32::from(family) != libc::AF_INET {
        return None;
    }
    // SAFETY: an AF_INET address is a sockaddr_in.
    let sin = unsafe { sa.cast::<libc::sockaddr_in>().read_unaligned() };
    Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
}

/// The first IPv4 address listed on `ifname` (the kernel lists an interface's primary address
/// before its secondaries).
pub fn primary_ipv4_of(addrs: &[InterfaceAddr], ifname: &str) -> Option<Ipv4Addr> {
    addrs.iter().find(|a| a.ifname == ifname).map(|a| a.addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SNAT address of a node interface over IPv6: the node's primary address where the
    /// interface has it; else its lowest global address with a prefix, then a `/128`, deprecated
    /// ones last; never a temporary, tentative or failed one, nor another interface's, link-local
    /// or loopback. Read from `/proc/net/if_inet6` (this host's parses, `lo`'s `::1` among them).
    #[test]
    fn ipv6_snat_addresses_skip_unfit_and_floating_ones() {
        let text = "\
fd000172003100000000000000000009 03 40 00 80     eth0
fd00017200310000000000000000fffe 03 80 00 80     eth0
fd000172003100000000000000000005 03 40 00 01     eth0
fd000172003100000000000000000004 03 40 00 20     eth0
fd000172003100000000000000000003 03 40 00 40     eth0
fd000172003100000000000000000002 03 40 00 88     eth0
fe800000000000000000000000000001 03 40 20 80     eth0
fd000172003100000000000000000001 04 40 00 80     eth1
00000000000000000000000000000001 01 80 10 80       lo
bogus line
";
        let addrs = parse_if_inet6(text);
        assert_eq!(addrs.len(), 9, "{addrs:?}");
        let a = |s: &str| -> std::net::Ipv6Addr { s.parse().expect("addr") };
        assert_eq!(
            addrs[0],
            Ipv6IfAddr { ifname: "eth0".into(), addr: a("fd00:172:31::9"), prefix_len: 64, flags: 0x80 }
        );
        let eth0 = Some("eth0");
        assert_eq!(snat_ipv6_of(&addrs, eth0, None), Some(a("fd00:172:31::9")), "the /64, not the /128");
        assert_eq!(snat_ipv6_of(&addrs, eth0, Some(a("fd00:172:31::fffe"))), Some(a("fd00:172:31::fffe")));
        assert_eq!(
            snat_ipv6_of(&addrs, eth0, Some(a("fd00:172:31::5"))),
            Some(a("fd00:172:31::9")),
            "temporary"
        );
        assert_eq!(
            snat_ipv6_of(&addrs, eth0, Some(a("fd00:172:31::3"))),
            Some(a("fd00:172:31::9")),
            "tentative"
        );
        assert_eq!(
            snat_ipv6_of(&addrs, eth0, Some(a("fd00:172:31::2"))),
            Some(a("fd00:172:31::9")),
            "failed"
        );
        assert_eq!(
            snat_ipv6_of(&addrs, eth0, Some(a("fd00:172:31::1"))),
            Some(a("fd00:172:31::9")),
            "eth1's"
        );
        assert_eq!(
            snat_ipv6_of(&addrs, None, Some(a("fd00:172:31::1"))),
            Some(a("fd00:172:31::1")),
            "any interface"
        );
        let only_floating: Vec<Ipv6IfAddr> = addrs.iter().filter(|x| x.prefix_len == 128).cloned().collect();
        assert_eq!(snat_ipv6_of(&only_floating, eth0, None), Some(a("fd00:172:31::fffe")));
        // A deprecated address only when nothing else is left.
        let retiring: Vec<Ipv6IfAddr> =
            addrs.iter().filter(|x| x.flags & 0x20 != 0 || x.prefix_len == 128).cloned().collect();
        assert_eq!(snat_ipv6_of(&retiring, eth0, None), Some(a("fd00:172:31::fffe")));
        let deprecated: Vec<Ipv6IfAddr> = addrs.iter().filter(|x| x.flags & 0x20 != 0).cloned().collect();
        assert_eq!(snat_ipv6_of(&deprecated, eth0, None), Some(a("fd00:172:31::4")));
        assert_eq!(snat_ipv6_of(&addrs, Some("lo"), None), None, "loopback");
        assert_eq!(snat_ipv6_of(&addrs, Some("eth2"), None), None);
        // NodePorts listen on every global address, once, in the kernel's order (unlike SNAT,
        // which a flow keeps, a listener may take a tentative or temporary one).
        let global: Vec<std::net::Ipv6Addr> = ["::9", "::fffe", "::5", "::4", "::3", "::2", "::1"]
            .iter()
            .map(|x| a(&format!("fd00:172:31{x}")))
            .collect();
        assert_eq!(global_ipv6_of(&addrs), global);
        // This host's own: `lo` holds ::1/128.
        let live = ipv6_interface_addresses().expect("/proc/thread-self/net/if_inet6");
        let lo = |x: &Ipv6IfAddr| {
            x.ifname == "lo" && x.addr == std::net::Ipv6Addr::LOCALHOST && x.prefix_len == 128
        };
        assert!(live.iter().any(lo), "{live:?}");
    }

    #[test]
    fn loopback_holds_127_0_0_1() {
        let addrs = ipv4_addresses().expect("getifaddrs");
        let lo = addrs.iter().find(|a| a.ifname == "lo").unwrap_or_else(|| panic!("no lo in {addrs:?}"));
        assert_eq!(lo.addr, Ipv4Addr::LOCALHOST);
        assert_eq!(lo.prefix_len, 8);
        assert_eq!(lo.ifindex, 1, "lo is the first interface of a namespace");
        assert_eq!(primary_ipv4_of(&addrs, "lo"), Some(Ipv4Addr::LOCALHOST));
        assert_eq!(primary_ipv4_of(&addrs, "no-such-interface"), None);
    }

    #[test]
    fn the_first_address_of_an_interface_is_its_primary() {
        let a = |ifname: &str, addr: [u8; 4]| InterfaceAddr {
            ifname: ifname.into(),
            ifindex: 2,
            addr: addr.into(),
            prefix_len: 24,
        };
        let addrs = [a("eth0", [10, 0, 0, 5]), a("eth1", [10, 1, 0, 5]), a("eth1", [10, 1, 0, 6])];
        assert_eq!(primary_ipv4_of(&addrs, "eth1"), Some(Ipv4Addr::new(10, 1, 0, 5)));
    }
}
