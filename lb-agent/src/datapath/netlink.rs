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
