//! Socket-level load balancing's side of the datapath (`--socket-lb`): which sockets the cgroup
//! programs translate, and their attachment to a cgroup v2 hierarchy through links pinned beside
//! the interfaces' (`links/`), so that they stay while the agent is away. A restarted agent puts
//! its programs in front of the pinned ones before it unpins them: for a moment both run, and the
//! second finds a backend's address, which is no Service's, and lets it be; no socket goes
//! untranslated.

use std::{io, path::Path};

use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr};
use lb_common::{SOCK_SCOPE_ALL, SOCK_SCOPE_INIT_NETNS, SOCK_SCOPE_NETNS};

use super::{Datapath, DatapathError};

pub const PROG_SOCK_CONNECT: &str = "lb4_sock_connect";
pub const PROG_SOCK_SENDMSG: &str = "lb4_sock_sendmsg";
pub const PROG_SOCK_RECVMSG: &str = "lb4_sock_recvmsg";
pub const PROG_SOCK_GETPEERNAME: &str = "lb4_sock_getpeername";
pub const PROG_SOCK6_CONNECT: &str = "lb6_sock_connect";
pub const PROG_SOCK6_SENDMSG: &str = "lb6_sock_sendmsg";
pub const PROG_SOCK6_RECVMSG: &str = "lb6_sock_recvmsg";
pub const PROG_SOCK6_GETPEERNAME: &str = "lb6_sock_getpeername";
/// The `sock_release` program, both families' (a `CgroupSock`; the others are `CgroupSockAddr`).
pub const PROG_SOCK_RELEASE: &str = "lb4_sock_release";
/// The socket programs, in the order they are attached: the reverse ones first, so that a socket
/// translated by a new `connect4` or `connect6` always finds a `recvmsg4` or `recvmsg6` that reads
/// its replies back (an IPv6 socket sending to an IPv4-mapped address is translated by the IPv4
/// programs and read back by the IPv6 ones).
pub const SOCK_PROGRAMS: [&str; 9] = [
    PROG_SOCK_RELEASE,
    PROG_SOCK_RECVMSG,
    PROG_SOCK_GETPEERNAME,
    PROG_SOCK6_RECVMSG,
    PROG_SOCK6_GETPEERNAME,
    PROG_SOCK_CONNECT,
    PROG_SOCK_SENDMSG,
    PROG_SOCK6_CONNECT,
    PROG_SOCK6_SENDMSG,
];

/// `--socket-lb`: which sockets are load-balanced when they connect or send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SocketLb {
    /// None: only packets are translated (hostNetwork clients reach no Service).
    #[default]
    Off,
    /// Sockets of the agent's own network namespace (the host's, on a node): processes on the
    /// node and hostNetwork pods. Pods' sockets are left to the packet path, so that what a
    /// service mesh reads with `SO_ORIGINAL_DST` is still the Service address.
    Host,
    /// Every socket under the cgroup root, pods' too: their connections need no per-packet
    /// translation at all.
    All,
}

/// Which sockets the programs translate (`lb_common::globals::SOCK_SCOPE`), and the network
/// namespace cookie that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    pub scope: u32,
    pub netns_cookie: u64,
}

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the calling thread's network namespace; `None` where the kernel cannot say
/// (before 5.14).
pub fn netns_cookie() -> io::Result<Option<u64>> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid descriptor and a buffer of the length given.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r == 0 {
        return Ok(Some(cookie));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
        return Ok(None);
    }
    Err(e)
}

impl Scope {
    /// The scope of `mode` for an agent in the calling thread's network namespace: `host` is that
    /// namespace where the kernel can name it (`SO_NETNS_COOKIE`), else the initial one.
    pub fn of(mode: SocketLb) -> io::Result<Self> {
        Ok(match mode {
            SocketLb::All | SocketLb::Off => Self { scope: SOCK_SCOPE_ALL, netns_cookie: 0 },
            SocketLb::Host => match netns_cookie()? {
                Some(c) => Self { scope: SOCK_SCOPE_NETNS, netns_cookie: c },
                None => Self { scope: SOCK_SCOPE_INIT_NETNS, netns_cookie: 0 },
            },
        })
    }
}

/// `CGROUP2_SUPER_MAGIC`: the file system type of a cgroup v2 hierarchy.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// `Err` (saying what to do) unless `root` is a directory of a cgroup v2 hierarchy.
pub fn check_cgroup2(root: &Path) -> Result<(), String> {
    let kind = super::pins::fs_type(root).map_err(|e| format!("--cgroup-root {}: {e}", root.display()))?;
    if kind != CGROUP2_SUPER_MAGIC {
        return Err(format!(
            "--cgroup-root {} is not a cgroup v2 hierarchy (file system type {kind:#x}): socket-level load \
             balancing attaches to one. Mount one (`mount -t cgroup2 none DIR`; in a pod, mount the host's by \
             hostPath) and give its root, or run with --socket-lb off",
            root.display()
        ));
    }
    Ok(())
}

/// Why `--socket-lb host`, when not asked for (the default), does not fit here, if it does not: no
/// cgroup v2 hierarchy at `root` (a host with cgroup v1, or a container without the host's), or a
/// kernel without `SO_NETNS_COOKIE` (before 5.14), where `host` would mean the initial network
/// namespace, while the agent runs in another (a test or a trial by hand, whose sockets it would
/// not translate while translating the machine's).
pub fn default_host_unfit(root: &Path) -> Option<String> {
    if let Err(e) = check_cgroup2(root) {
        return Some(e);
    }
    let own = std::fs::metadata("/proc/self/ns/net").ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let init = std::fs::metadata("/proc/1/ns/net").ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let cookie = netns_cookie().ok().flatten();
    if cookie.is_none() && own != init {
        return Some(
            "this kernel has no SO_NETNS_COOKIE (5.14), so `host` would translate the initial network \
             namespace's sockets, and the agent runs in another"
                .into(),
        );
    }
    None
}

/// The id of the frontend a UDP socket of this node sending to a Service address gets now, as the
/// socket programs find it (as a pod on this node: an address's internal entry where it has two);
/// `get` reads the address's entry of a scope from its family's services map.
fn current_frontend(get: impl Fn(u8) -> Option<lb_common::Lb4Service>) -> Option<u32> {
    use lb_common::{SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_TOMBSTONE, SVC_FLAG_TWO_SCOPES};
    let svc = get(SCOPE_EXTERNAL)?;
    if svc.flags & SVC_FLAG_TWO_SCOPES != 0 {
        if let Some(i) = get(SCOPE_INTERNAL).filter(|i| i.flags & SVC_FLAG_TOMBSTONE == 0) {
            return Some(i.id);
        }
    }
    Some(svc.id)
}

/// Whether the backend `addr:port` that socket `cookie` was sent to (`LB4_SOCK_REV`) is still a
/// member of its frontend that is not draining; `None` when the programs did not translate it.
/// Judged by the frontend at the Service address now, as the socket would be sent again (a
/// Service whose traffic policy changed has another), else the one it was.
fn live4(
    rev: &aya::maps::HashMap<aya::maps::MapData, lb_common::Lb4SockRevKey, lb_common::Lb4SockRev>,
    maps: &super::Maps,
    cookie: u64,
    addr: u32,
    port: u16,
) -> Option<bool> {
    let r = rev.get(&lb_common::Lb4SockRevKey { cookie, addr, port, _pad: 0 }, 0).ok()?;
    let key =
        |scope| lb_common::Lb4ServiceKey { addr: r.vip, port: r.vport, proto: lb_common::IPPROTO_UDP, scope };
    let svc_id = current_frontend(|scope| maps.services.get(&key(scope), 0).ok()).unwrap_or(r.svc_id);
    let member = maps.members.get(&lb_common::Lb4MemberKey { svc_id, backend_id: r.backend_id }, 0).ok();
    Some(member.is_some_and(|m| m.addr == addr && m.port == port && m.state != lb_common::MEMBER_DRAINING))
}

/// [`live4`] for an IPv6 socket sent to an IPv6 backend (`LB6_SOCK_REV`).
fn live6(
    rev: &aya::maps::HashMap<aya::maps::MapData, lb_common::Lb6SockRevKey, lb_common::Lb6SockRev>,
    v6: &super::maps::Maps6,
    cookie: u64,
    addr: lb_common::Addr6,
    port: u16,
) -> Option<bool> {
    let r = rev.get(&lb_common::Lb6SockRevKey { cookie, addr, port, _pad: [0; 3] }, 0).ok()?;
    let key =
        |scope| lb_common::Lb6ServiceKey { addr: r.vip, port: r.vport, proto: lb_common::IPPROTO_UDP, scope };
    let svc_id = current_frontend(|scope| v6.services.get(&key(scope), 0).ok()).unwrap_or(r.svc_id);
    let member = v6.members.get(&lb_common::Lb4MemberKey { svc_id, backend_id: r.backend_id }, 0).ok();
    Some(member.is_some_and(|m| m.addr == addr && m.port == port && m.state != lb_common::MEMBER_DRAINING))
}

/// The two names a socket program's link is pinned under in `links/`, taken in turn so that a
/// restarted agent pins its link before it unpins the one it replaces. No interface's: those are
/// `<interface>@<program>`, and no interface program is called `lb4_sock_*` or `lb6_sock_*`.
fn pin_names(prog: &str) -> [String; 2] {
    [format!("cgroup-a@{prog}"), format!("cgroup-b@{prog}")]
}

/// Whether pin `name` in `links/` is a socket program's link (not an interface's).
pub(super) fn is_socket_pin(name: &str) -> bool {
    name.rsplit_once('@').is_some_and(|(_, prog)| SOCK_PROGRAMS.contains(&prog))
}

impl Datapath {
    /// Attaches the socket programs to the cgroup v2 hierarchy at `root` (`--cgroup-root`)
    /// through pinned links, in front of those an earlier agent pinned, which are then unpinned.
    /// Loaded on first use: an agent with `--socket-lb off` never has the kernel verify them.
    pub fn attach_sockets(&mut self, root: &Path) -> Result<(), DatapathError> {
        let attach_err = |program: &'static str, source| DatapathError::Attach {
            program,
            interface: format!("cgroup {}", root.display()),
            source,
        };
        check_cgroup2(root).map_err(DatapathError::CgroupRoot)?;
        let cgroup = std::fs::File::open(root)
            .map_err(|e| DatapathError::CgroupRoot(format!("--cgroup-root {}: {e}", root.display())))?;
        let mut pins = Vec::new();
        for prog in SOCK_PROGRAMS {
            let [a, b] = pin_names(prog).map(|n| self.links_dir.join(n));
            let (new, old) = if a.exists() { (b, a) } else { (a, b) };
            let _ = std::fs::remove_file(&new);
            let pin_err = |reason: String| DatapathError::PinLink {
                program: prog,
                interface: format!("cgroup {}", root.display()),
                path: new.clone(),
                reason,
            };
            // Loaded on first use, attached as a link (Linux 5.7): its flags must be none, and
            // links always run beside the other programs of the cgroup, in the order attached.
            macro_rules! attach_as {
                ($ty:ty) => {{
                    let p: &mut $ty = self
                        .ebpf
                        .program_mut(prog)
                        .expect("object has the program")
                        .try_into()
                        .map_err(|source| DatapathError::Program { program: prog, source })?;
                    if p.fd().is_err() {
                        p.load().map_err(|source| DatapathError::Program { program: prog, source })?;
                    }
                    let id = p.attach(&cgroup, CgroupAttachMode::Single).map_err(|e| attach_err(prog, e))?;
                    let link: FdLink = p
                        .take_link(id)
                        .map_err(|e| attach_err(prog, e))?
                        .try_into()
                        .map_err(|e: aya::programs::links::LinkError| pin_err(e.to_string()))?;
                    link
                }};
            }
            let link = if prog == PROG_SOCK_RELEASE {
                // Housekeeping only (closed sockets' entries are otherwise left to the LRU maps):
                // a kernel that refuses it costs no translation.
                match (|| -> Result<FdLink, DatapathError> { Ok(attach_as!(CgroupSock)) })() {
                    Ok(link) => link,
                    Err(e) => {
                        tracing::warn!(
                            "{prog}: {e}; closed sockets' entries are left to the LRU maps (counter sock_released stays 0)"
                        );
                        continue;
                    }
                }
            } else {
                attach_as!(CgroupSockAddr)
            };
            link.pin(&new).map_err(|e| pin_err(e.to_string()))?;
            // Ours runs now; the earlier one goes with its pin.
            let _ = std::fs::remove_file(&old);
            pins.push(new);
        }
        self.sockets = Some(pins);
        if self.sock_rev.is_none() {
            let name = lb_common::MAP_LB4_SOCK_REV;
            let err = super::maps::map_err(name);
            let path = self.links_dir.parent().expect("the layout directory").join(name);
            let data = aya::maps::MapData::from_pin(&path).map_err(&err)?;
            self.sock_rev =
                Some(aya::maps::Map::from_map_data(data).map_err(&err)?.try_into().map_err(&err)?);
        }
        if self.sock_rev6.is_none() {
            let name = lb_common::MAP_LB6_SOCK_REV;
            let err = super::maps::map_err(name);
            let path = self.links_dir.parent().expect("the layout directory").join(name);
            let data = aya::maps::MapData::from_pin(&path).map_err(&err)?;
            self.sock_rev6 =
                Some(aya::maps::Map::from_map_data(data).map_err(&err)?.try_into().map_err(&err)?);
        }
        Ok(())
    }

    /// Aborts this network namespace's connected UDP sockets that the socket programs sent to a
    /// backend that has left their Service (no longer a member of its frontend, or draining, as
    /// `members` has it): their next call fails with ECONNABORTED, and their reconnect goes to a
    /// live backend. kube-proxy removes such flows' conntrack entries; a connected socket would
    /// otherwise keep sending to the gone backend. Unconnected UDP needs nothing (each `sendmsg`
    /// is translated anew), and TCP connections are left to fail as under kube-proxy. Both
    /// families: IPv6 sockets connected to an IPv4-mapped address are judged by the IPv4 maps, as
    /// they were translated. How many were aborted; `Err` when the sockets cannot be listed, or
    /// one cannot be aborted (a kernel without `CONFIG_INET_DIAG_DESTROY`).
    pub fn abort_stale_udp(&self, maps: &super::Maps) -> io::Result<usize> {
        let Some(rev) = &self.sock_rev else { return Ok(0) };
        let (mut aborted, mut failed) = (0, None);
        let mut socks = connected_udp_sockets(libc::AF_INET as u8)?;
        socks.extend(connected_udp_sockets(libc::AF_INET6 as u8)?);
        for sock in socks {
            let cookie = sock.cookie();
            let live = match sock.destination() {
                Destination::V4(addr, port) => live4(rev, maps, cookie, addr, port),
                Destination::V6(addr, port) => match (&self.sock_rev6, &maps.v6) {
                    (Some(rev6), Some(v6)) => live6(rev6, v6, cookie, addr, port),
                    _ => None,
                },
            };
            // Not one the programs translated, or its backend is still there.
            if live != Some(false) {
                continue;
            }
            match abort(&sock) {
                Ok(()) => aborted += 1,
                // Closed meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // The others are still tried.
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(aborted),
        }
    }

    /// Detaches the socket programs (`--socket-lb off`, or an earlier agent's): their pins are
    /// removed.
    pub fn detach_sockets(&mut self) {
        for prog in SOCK_PROGRAMS {
            for n in pin_names(prog) {
                let _ = std::fs::remove_file(self.links_dir.join(n));
            }
        }
        self.sockets = None;
    }
}

/// Mounts a cgroup v2 hierarchy at `root` in the host's mount namespace unless one is there
/// (`--mount-cgroup`, the DaemonSet's init container, as Cilium's): containers usually get a
/// cgroup namespace of their own, whose root is not the host's, and a host with cgroup v1 has no
/// v2 hierarchy mounted at all. `host_ns` holds the host's namespace files (its PID 1's
/// `/proc/1/ns`): the cgroup namespace is entered first, so that the hierarchy mounted is seen
/// from the host's root, then the mount namespace, so that the mount is the host's. True when it
/// mounted one. Must run before the process has a second thread (joining a mount namespace
/// requires it).
pub fn mount_cgroup2(root: &Path, host_ns: &Path) -> Result<bool, String> {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    for (name, kind) in [("cgroup", libc::CLONE_NEWCGROUP), ("mnt", libc::CLONE_NEWNS)] {
        let path = host_ns.join(name);
        let ns = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: setns on a descriptor this function owns.
        if unsafe { libc::setns(ns.as_raw_fd(), kind) } != 0 {
            return Err(format!(
                "joining the host's namespace {}: {}",
                path.display(),
                io::Error::last_os_error()
            ));
        }
    }
    std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    if check_cgroup2(root).is_ok() {
        return Ok(false);
    }
    let c_root = std::ffi::CString::new(root.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let r =
        unsafe { libc::mount(c"none".as_ptr(), c_root.as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(format!("mount -t cgroup2 none {}: {}", root.display(), io::Error::last_os_error()));
    }
    Ok(true)
}

/// A connected UDP socket of this network namespace, as sock_diag names it.
#[derive(Clone, Copy, Debug)]
pub struct UdpSock {
    /// `AF_INET` or `AF_INET6`.
    family: u8,
    /// `struct inet_diag_sockid` as the kernel gave it (ports, addresses, interface, cookie):
    /// what `SOCK_DESTROY` is asked with.
    id: [u8; 48],
}

/// Where a connected socket sends, network byte order (as the maps hold it): an IPv6 socket
/// connected to an IPv4-mapped address sends over IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    V4(u32, u16),
    V6(lb_common::Addr6, u16),
}

impl UdpSock {
    /// Its destination address and port.
    pub fn destination(&self) -> Destination {
        let port = u16::from_ne_bytes([self.id[2], self.id[3]]);
        let word =
            |i: usize| u32::from_ne_bytes([self.id[i], self.id[i + 1], self.id[i + 2], self.id[i + 3]]);
        if self.family != libc::AF_INET6 as u8 {
            return Destination::V4(word(20), port);
        }
        let addr = [word(20), word(24), word(28), word(32)];
        match lb_common::v4_mapped(addr) {
            Some(v4) => Destination::V4(v4, port),
            None => Destination::V6(addr, port),
        }
    }

    /// Its cookie (`bpf_get_socket_cookie`'s).
    pub fn cookie(&self) -> u64 {
        let lo = u32::from_ne_bytes([self.id[40], self.id[41], self.id[42], self.id[43]]);
        let hi = u32::from_ne_bytes([self.id[44], self.id[45], self.id[46], self.id[47]]);
        u64::from(lo) | u64::from(hi) << 32
    }
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `TCP_ESTABLISHED`: the state of a connected UDP socket.
const TCP_ESTABLISHED: u32 = 1;

/// A sock_diag request for UDP sockets of `family` (`struct nlmsghdr` + `struct
/// inet_diag_req_v2`): message `kind` with `flags`, for the connected sockets (a dump), or the
/// one `id` names.
fn diag_request(family: u8, kind: u16, flags: u16, id: &[u8; 48]) -> Vec<u8> {
    let len: u32 = 16 + 56;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    m.extend_from_slice(&[family, libc::IPPROTO_UDP as u8, 0, 0]);
    m.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    m.extend_from_slice(id);
    m
}

/// A sock_diag socket that has sent `request`.
fn diag_socket(request: &[u8]) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let raw =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // The agent's loop waits for the answer: never longer than this.
    let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
    // SAFETY: a valid descriptor and a timeval of the size given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: a buffer of the length given; the kernel is the destination of an unbound socket.
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads netlink messages from `fd` until `NLMSG_DONE` (or, with `ack`, the first
/// acknowledgement), handing each message's type and payload to `each`.
fn diag_read(fd: &std::os::fd::OwnedFd, ack: bool, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: a buffer of the length given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < 16 || len > rest.len() {
                return Err(io::Error::other("sock_diag: a truncated message"));
            }
            let payload = &rest[16..len];
            match kind {
                // A dump cut short says so in its end.
                NLMSG_DONE => {
                    let code = payload.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if code < 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return Ok(());
                }
                NLMSG_ERROR => {
                    let code = payload.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    if ack {
                        return Ok(());
                    }
                }
                _ => each(kind, payload),
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

/// The connected UDP sockets of `family` (`AF_INET`, `AF_INET6`) of this network namespace
/// (sock_diag).
pub fn connected_udp_sockets(family: u8) -> io::Result<Vec<UdpSock>> {
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    let fd = diag_socket(&diag_request(family, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &[0; 48]))?;
    let mut found = Vec::new();
    diag_read(&fd, false, |kind, payload| {
        // struct inet_diag_msg: family, state, timer, retrans, then the id.
        if kind == SOCK_DIAG_BY_FAMILY && payload.len() >= 52 {
            let mut id = [0u8; 48];
            id.copy_from_slice(&payload[4..52]);
            found.push(UdpSock { family, id });
        }
    })?;
    Ok(found)
}

/// Aborts `sock` (`SOCK_DESTROY`, which needs `CONFIG_INET_DIAG_DESTROY`): its next call fails
/// with ECONNABORTED. A socket closed meanwhile (or another with its tuple: the cookie is
/// checked) is left alone (`Err` NotFound).
pub fn abort(sock: &UdpSock) -> io::Result<()> {
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    let fd = diag_socket(&diag_request(sock.family, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &sock.id))?;
    diag_read(&fd, true, |_, _| {})
}
