//! Network interfaces: the list of this namespace's interfaces, and a netlink socket subscribed to
//! link notifications (RTMGRP_LINK) that wakes the agent when they change. The agent then lists
//! the interfaces again; the messages themselves are only a signal.

#[cfg(feature = "agent")]
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

#[cfg(feature = "agent")]
use tokio::io::unix::AsyncFd;

/// Link notifications of the agent's network namespace.
#[cfg(feature = "agent")]
pub struct LinkEvents {
    fd: AsyncFd<OwnedFd>,
}

#[cfg(feature = "agent")]
impl LinkEvents {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value to fill in.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = libc::RTMGRP_LINK as u32;
        // SAFETY: bind(2) with a valid sockaddr_nl and its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd is valid, open, and owned by the AsyncFd for its whole life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Waits for one or more link notifications.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: recv(2) into a buffer we own, with its length.
            let n =
                unsafe { libc::recv(self.fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    return Ok(());
                }
                // ENOBUFS: notifications were lost; a full rescan follows anyway.
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    continue;
                }
                // Not ready again until the socket says so: an error is not a loop.
                guard.clear_ready();
                return Err(e);
            }
        }
    }
}

/// Interfaces of the current network namespace (through netlink, not /sys, which may show another
/// namespace).
pub fn interfaces() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            if let Ok(name) = std::ffi::CStr::from_ptr((*p).if_name).to_str() {
                out.push(name.to_string());
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Sends one dump request of type `kind` with `header` (the request's fixed part) on a new
/// NETLINK_ROUTE socket and returns the answer's messages, each without its header. A dump
/// interrupted by a change is asked again (a few times).
fn dump(kind: u16, header: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
    let mut tries = 0;
    loop {
        match dump_once(kind, header) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && tries < 5 => tries += 1,
            r => return r,
        }
    }
}

/// How long the agent waits for a part of an answer that does not come (a kernel that answers a
/// request differently than asked): an error then, not a loop stuck for good.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn dump_once(kind: u16, header: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const NLMSG_HDRLEN: usize = 16;
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let raw =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let timeout = libc::timeval { tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: setsockopt(2) with a timeval and its size.
    if unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    let len = NLMSG_HDRLEN + header.len();
    // Dumps only: a get (RTM_GETQDISC, say) is answered through the change notifications, which
    // would tell every listener (`tc monitor`, a CNI) of a change that did not happen.
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_DUMP;
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&kind.to_ne_bytes());
    req.extend_from_slice(&(flags as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    req.extend_from_slice(header);
    // SAFETY: send(2) from a buffer we own, with its length.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv(2) into a buffer we own, with its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "netlink: no answer within 2 s")
            } else {
                e
            });
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
            let flags = u16::from_ne_bytes(rest[6..8].try_into().expect("2 bytes"));
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(std::io::Error::other("netlink: a truncated message"));
            }
            let body = &rest[NLMSG_HDRLEN..len];
            // The objects changed while they were dumped: what came is not one consistent view.
            if flags & libc::NLM_F_DUMP_INTR as u16 != 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "netlink: dump interrupted",
                ));
            }
            match i32::from(kind) {
                // The end, or an error: both carry a (negative) error code, 0 for none (a dump
                // may fail part way).
                libc::NLMSG_DONE | libc::NLMSG_ERROR => {
                    let code = attr_u32(body).map_or(0, |c| c as i32);
                    if code < 0 {
                        return Err(std::io::Error::from_raw_os_error(-code));
                    }
                    return Ok(out);
                }
                _ => out.push(body.to_vec()),
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// The attributes in `buf`: (type, payload).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff; // without NLA_F_NESTED/BYTEORDER
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

fn attr_u32(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(0..4)?.try_into().ok()?))
}

fn attr_str(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

/// The Ethernet address of interface `name` in this network namespace (SIOCGIFHWADDR; not
/// `/sys/class/net`, which shows the interfaces of the namespace that mounted it); `None` for an
/// interface without one.
pub fn ethernet_address(name: &str) -> Option<[u8; 6]> {
    const ARPHRD_ETHER: u16 = 1;
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: ifreq is plain data, for which all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > req.ifr_name.len() {
        return None;
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a datagram socket only for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a valid socket and an ifreq naming the interface; the kernel fills ifru_hwaddr.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    // SAFETY: our socket.
    unsafe { libc::close(fd) };
    // SAFETY: filled by the call above when it succeeded.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    if rc != 0 || hw.sa_family != ARPHRD_ETHER {
        return None;
    }
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *d = *s as u8;
    }
    Some(mac)
}

/// An interface and the XDP program on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The XDP program's id and how it is attached (`native`, `generic`, `offload`).
    pub xdp: Option<(u32, &'static str)>,
    /// Its kind (`veth`, `bridge`, `vxlan`...), if it is a virtual device; none for a NIC.
    pub kind: Option<String>,
}

/// Every interface of the current network namespace, with its XDP program (RTM_GETLINK).
pub fn links() -> std::io::Result<Vec<Link>> {
    const IFLA_IFNAME: u16 = 3;
    const IFLA_LINKINFO: u16 = 18;
    const IFLA_INFO_KIND: u16 = 1;
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_ATTACHED: u16 = 2;
    const IFLA_XDP_PROG_ID: u16 = 4;
    // With several programs (XDP_ATTACHED_MULTI), each mode's own.
    const IFLA_XDP_DRV_PROG_ID: u16 = 5;
    const IFLA_XDP_SKB_PROG_ID: u16 = 6;
    const IFLA_XDP_HW_PROG_ID: u16 = 7;
    // struct ifinfomsg, all zero: every interface.
    let messages = dump(libc::RTM_GETLINK, &[0u8; 16])?;
    let mut out = Vec::new();
    for m in messages {
        let Some(index) = m.get(4..8).and_then(attr_u32) else {
            continue;
        };
        let mut link = Link { index, name: String::new(), xdp: None, kind: None };
        for (kind, v) in attributes(m.get(16..).unwrap_or_default()) {
            match kind {
                IFLA_IFNAME => link.name = attr_str(v),
                IFLA_LINKINFO => {
                    link.kind = attributes(v).find(|(k, _)| *k == IFLA_INFO_KIND).map(|(_, v)| attr_str(v));
                }
                IFLA_XDP => {
                    let (mut mode, mut id, mut by_mode) = (0u8, None, [None; 3]);
                    for (k, v) in attributes(v) {
                        match k {
                            IFLA_XDP_ATTACHED => mode = v.first().copied().unwrap_or(0),
                            IFLA_XDP_PROG_ID => id = attr_u32(v),
                            IFLA_XDP_DRV_PROG_ID => by_mode[0] = attr_u32(v),
                            IFLA_XDP_SKB_PROG_ID => by_mode[1] = attr_u32(v),
                            IFLA_XDP_HW_PROG_ID => by_mode[2] = attr_u32(v),
                            _ => {}
                        }
                    }
                    // XDP_ATTACHED_DRV 1, _SKB 2, _HW 3; _MULTI 4: several, each under its mode
                    // (the driver's shown: the one a packet meets first).
                    link.xdp = match mode {
                        1 => id.map(|id| (id, "native")),
                        2 => id.map(|id| (id, "generic")),
                        3 => id.map(|id| (id, "offload")),
                        4 => by_mode[0]
                            .map(|id| (id, "native"))
                            .or(by_mode[1].map(|id| (id, "generic")))
                            .or(by_mode[2].map(|id| (id, "offload"))),
                        _ => None,
                    }
                    .filter(|(id, _)| *id != 0);
                }
                _ => {}
            }
        }
        out.push(link);
    }
    Ok(out)
}

/// A BPF filter on an interface's clsact qdisc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The program's name as the filter has it, and its id.
    pub name: String,
    pub program_id: u32,
}

/// The BPF filters on interface `index`'s clsact qdisc, ingress or egress, in the order they run
/// (RTM_GETTFILTER). Empty when there is no clsact qdisc; a legacy `ingress` qdisc's filters are
/// its ingress filters (it answers a dump of either direction with its one block, so an egress
/// answer is checked against the qdisc's kind).
pub fn filters(index: u32, egress: bool) -> std::io::Result<Vec<Filter>> {
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_NAME: u16 = 7;
    const TCA_BPF_ID: u16 = 11;
    // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS or TC_H_MIN_EGRESS).
    let parent: u32 = if egress { 0xffff_fff3 } else { 0xffff_fff2 };
    // struct tcmsg: family, padding, ifindex, handle, parent, info.
    let mut header = [0u8; 20];
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    header[12..16].copy_from_slice(&parent.to_ne_bytes());
    let messages = dump(libc::RTM_GETTFILTER, &header)?;
    let mut out = Vec::new();
    for m in messages {
        let (Some(handle), Some(info)) = (m.get(8..12).and_then(attr_u32), m.get(16..20).and_then(attr_u32))
        else {
            continue;
        };
        // Each priority's chain head comes with handle 0 and no program.
        if handle == 0 {
            continue;
        }
        let mut kind = String::new();
        let mut filter = Filter { priority: (info >> 16) as u16, handle, name: String::new(), program_id: 0 };
        for (k, v) in attributes(m.get(20..).unwrap_or_default()) {
            match k {
                TCA_KIND => kind = attr_str(v),
                TCA_OPTIONS => {
                    for (k, v) in attributes(v) {
                        match k {
                            TCA_BPF_NAME => filter.name = attr_str(v),
                            TCA_BPF_ID => filter.program_id = attr_u32(v).unwrap_or(0),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if kind == "bpf" {
            out.push(filter);
        }
    }
    if egress && !out.is_empty() && qdisc_kind(index)?.as_deref() != Some("clsact") {
        return Ok(Vec::new());
    }
    Ok(out)
}

/// The kind of the qdisc in interface `index`'s ingress place (`clsact`, or a legacy `ingress`),
/// if there is one (RTM_GETQDISC: the kernel dumps every interface's, this one's is picked).
pub fn qdisc_kind(index: u32) -> std::io::Result<Option<String>> {
    const TCA_KIND: u16 = 1;
    // TC_H_INGRESS (clsact sits there too).
    const INGRESS: u32 = 0xffff_fff1;
    let mut header = [0u8; 20];
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    for m in dump(libc::RTM_GETQDISC, &header)? {
        let (Some(i), Some(parent)) = (m.get(4..8).and_then(attr_u32), m.get(12..16).and_then(attr_u32))
        else {
            continue;
        };
        if i != index || parent != INGRESS {
            continue;
        }
        return Ok(attributes(m.get(20..).unwrap_or_default())
            .find(|(k, _)| *k == TCA_KIND)
            .map(|(_, v)| attr_str(v)));
    }
    Ok(None)
}
