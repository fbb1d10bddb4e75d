//! Clients for socket-level load balancing: a cgroup v2 hierarchy of the test's own (mounted
//! here, with a child cgroup the programs attach to, never a root other processes share), and a
//! client process that runs in that child cgroup and in a given network namespace (a node's, as
//! a process on the host; a pod's), driven line by line.
//!
//! The client is a Python script (python3 is part of the machine set-up): a cgroup holds
//! processes, so the client cannot be a thread of the test, and a script keeps each socket call
//! visible as the test wrote it. Each command is one line; each answer one JSON object, with
//! `error` (an errno name, as `ECONNREFUSED`) when the call failed.

use std::{
    io::{self, BufRead, BufReader, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

/// A cgroup v2 hierarchy mounted for one test, and the child cgroup its clients run in.
pub struct Cgroup2 {
    mount: PathBuf,
    child: PathBuf,
}

impl Cgroup2 {
    /// Mounts a cgroup v2 hierarchy under the temporary directory (`tag` keeps parallel tests
    /// apart) and makes a child cgroup in it.
    pub fn new(tag: &str) -> io::Result<Self> {
        let mount = std::env::temp_dir().join(format!("lb-cg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&mount)?;
        let out = Command::new("mount").args(["-t", "cgroup2", "none"]).arg(&mount).output()?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&mount);
            return Err(io::Error::other(format!(
                "mount -t cgroup2: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let child = mount.join(format!("lb-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&child);
        std::fs::create_dir(&child)?;
        Ok(Self { mount, child })
    }

    /// The child cgroup: where the programs attach (`--cgroup-root`) and the clients run.
    pub fn path(&self) -> &Path {
        &self.child
    }
}

impl Drop for Cgroup2 {
    fn drop(&mut self) {
        // Emptied when its clients exit (they are killed when dropped); a moment for the kernel to
        // notice.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.child).is_ok() || !self.child.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg(&self.mount).output();
        let _ = std::fs::remove_dir(&self.mount);
    }
}

/// The client: commands on stdin, one JSON answer a line on stdout.
const CLIENT: &str = r#"
import errno, json, socket, sys
socks = {}
def answer(**kw):
    sys.stdout.write(json.dumps(kw) + "\n"); sys.stdout.flush()
def addr(a):
    # IPv6 (and IPv4-mapped) as Rust's SocketAddr prints them: [addr]:port.
    return ("[%s]:%d" if ":" in a[0] else "%s:%d") % (a[0], a[1])
def family(host):
    # An IPv6 socket for an IPv6 or IPv4-mapped address (`::ffff:a.b.c.d`).
    return socket.AF_INET6 if ":" in host else socket.AF_INET
for line in sys.stdin:
    words = line.split()
    if not words:
        continue
    op = words[0]
    try:
        if op == "tcp":
            # tcp HOST PORT: connect, getpeername, ask `peer` (the server says who it is and whom
            # it sees).
            s = socket.socket(family(words[1]), socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect((words[1], int(words[2])))
            peer = s.getpeername()
            s.sendall(b"peer\n")
            said = s.makefile().readline().split()
            s.close()
            answer(name=said[0], seen=said[1], peer=addr(peer))
        elif op == "udp":
            # udp HOST PORT: unconnected sendto, recvfrom.
            s = socket.socket(family(words[1]), socket.SOCK_DGRAM)
            s.settimeout(2)
            s.sendto(b"peer", (words[1], int(words[2])))
            data, src = s.recvfrom(2048)
            s.close()
            said = data.decode().split()
            answer(name=said[0], seen=said[1], src=addr(src))
        elif op == "udp-open":
            # udp-open ID HOST PORT: a connected UDP socket, kept as ID.
            s = socket.socket(family(words[2]), socket.SOCK_DGRAM)
            s.settimeout(2)
            s.connect((words[2], int(words[3])))
            socks[words[1]] = s
            answer(peer=addr(s.getpeername()))
        elif op == "tcp-open":
            # tcp-open ID HOST PORT: a TCP connection, kept open as ID.
            s = socket.socket(family(words[2]), socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect((words[2], int(words[3])))
            socks[words[1]] = s
            answer(peer=addr(s.getpeername()))
        elif op == "udp-ask":
            # udp-ask ID: send on the connected socket, receive.
            s = socks[words[1]]
            s.send(b"peer")
            said = s.recv(2048).decode().split()
            answer(name=said[0], seen=said[1])
        elif op == "udp-keep":
            # udp-keep ID HOST PORT: an unconnected socket kept as ID, and one sendto/recvfrom
            # (again on later calls with the same ID).
            if words[1] not in socks:
                socks[words[1]] = socket.socket(family(words[2]), socket.SOCK_DGRAM)
                socks[words[1]].settimeout(2)
            s = socks[words[1]]
            s.sendto(b"peer", (words[2], int(words[3])))
            data, src = s.recvfrom(2048)
            said = data.decode().split()
            answer(name=said[0], seen=said[1], src=addr(src))
        elif op == "udp-error":
            # udp-error ID: the socket's pending error (SO_ERROR), taken.
            e = socks[words[1]].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            answer(pending=errno.errorcode.get(e, str(e)) if e else "")
        elif op == "http":
            # http HOST PORT PATH: GET over HTTP/1.0; the status and getpeername.
            s = socket.create_connection((words[1], int(words[2])), timeout=2)
            peer = s.getpeername()
            s.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" % (words[3], words[1])).encode())
            status = s.makefile("rb").readline().split()
            s.close()
            answer(status=int(status[1]), peer=addr(peer))
        elif op == "close":
            socks.pop(words[1]).close()
            answer()
        else:
            answer(error="unknown command " + op)
    except socket.timeout:
        answer(error="timeout")
    except OSError as e:
        answer(error=errno.errorcode.get(e.errno, str(e)))
"#;

/// A client process in a network namespace and a cgroup, driven command by command (killed when
/// dropped).
pub struct SockClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl SockClient {
    /// Starts the client in network namespace `netns` (a name under /run/netns) and cgroup
    /// `cgroup` (a directory of a cgroup v2 hierarchy).
    pub fn start(netns: &str, cgroup: &Path) -> io::Result<Self> {
        Self::start_in(Some(netns), cgroup)
    }

    /// Starts the client in the test's own network namespace (in the kernel matrix's machines,
    /// the initial one) and cgroup `cgroup`.
    pub fn start_here(cgroup: &Path) -> io::Result<Self> {
        Self::start_in(None, cgroup)
    }

    fn start_in(netns: Option<&str>, cgroup: &Path) -> io::Result<Self> {
        let ns = match netns {
            Some(n) => std::fs::File::open(format!("/run/netns/{n}"))?,
            None => std::fs::File::open("/proc/self/ns/net")?,
        };
        let procs = std::fs::OpenOptions::new().write(true).open(cgroup.join("cgroup.procs"))?;
        let mut cmd = Command::new("python3");
        cmd.args(["-u", "-c", CLIENT]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_raw_fd());
        // SAFETY: only async-signal-safe calls (setns, write) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0": the writing process itself.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        drop((ns, procs));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Ok(Self { child, stdin, stdout })
    }

    /// The client's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs one command; its answer.
    pub fn call(&mut self, command: &str) -> io::Result<serde_json::Value> {
        writeln!(self.stdin, "{command}")?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err(io::Error::other(format!("the client exited during {command:?}")));
        }
        serde_json::from_str(&line).map_err(|e| io::Error::other(format!("{command:?}: {e}: {line:?}")))
    }

    /// `tcp HOST PORT`: the backend's name, the address it saw the client at, and what
    /// `getpeername` gave; `Err` with the errno name when the connection failed.
    pub fn tcp(&mut self, to: impl Into<std::net::SocketAddr>) -> io::Result<Answer> {
        let to = to.into();
        Answer::from(self.call(&format!("tcp {} {}", to.ip(), to.port()))?)
    }

    /// `udp HOST PORT` (unconnected): the backend's name, the address it saw, and the source the
    /// answer was received from.
    pub fn udp(&mut self, to: impl Into<std::net::SocketAddr>) -> io::Result<Answer> {
        let to = to.into();
        Answer::from(self.call(&format!("udp {} {}", to.ip(), to.port()))?)
    }
}

/// What a client command gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The backend that answered.
    pub name: String,
    /// The address the backend saw the client at.
    pub seen: String,
    /// `getpeername` (TCP) or the source of the answer (UDP).
    pub peer: String,
}

impl Answer {
    fn from(v: serde_json::Value) -> io::Result<Self> {
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(io::Error::other(e.to_string()));
        }
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
        let peer = if v.get("src").is_some() { field("src") } else { field("peer") };
        Ok(Self { name: field("name"), seen: field("seen"), peer })
    }
}

impl Drop for SockClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
