//! A lab of network namespaces for end-to-end tests, the demo and benchmarks: nodes, pods on veth
//! pairs routed the way a simple routed CNI (Calico) does it, an underlay between nodes, servers
//! that say who they are, and agents running inside node namespaces. Everything it creates is
//! removed when the [`Lab`] is dropped, on failure too.
//!
//! Addressing: pod `k` on node `n` is `10.244.n.k/32`, reached from its node through the host-side
//! veth; the pod's default route points at `169.254.1.1`, which every host-side veth carries.
//! Nodes share the underlay `172.31.0.0/24` (node `n` is `172.31.0.n` on its `ul0`): a Linux
//! bridge `br0` in a namespace of its own (`<prefix>-ul`), each linked node's `ul0` the far end
//! of a veth whose near end (`n<index>`) is a port of the bridge. A client outside the cluster
//! ([`Lab::outside`], [`OUTSIDE_IP`]) sits on the same bridge and reaches what a node announces
//! through the routes [`Lab::route_via`] gives it, as a router in front of a cluster would.
//!
//! The servers answer each question with the pod's name; the question `peer` is answered with
//! the name and the address the server's socket sees the client at (see [`PEER`]).
//!
//! A dual-stack lab ([`Lab::dual_stack`]) gives everything an IPv6 address too: pod `k` on node
//! `n` is `fd00:10:244:n::k/128` with its default route via `fe80::1` (every host-side veth
//! carries it), node `n` is `fd00:172:31::n` on the underlay (`/64`), the outside client
//! `fd00:172:31::c8`; the servers listen on both addresses. Addresses skip duplicate address
//! detection, so they work at once.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_agent::datapath::Mode;

/// Gateway address of every pod (carried by each host-side veth).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Host-side interfaces are named `lxc<pod>`; agents attach to this glob.
pub const POD_IF_GLOB: &str = "lxc*";
/// The address of the client outside the cluster ([`Lab::outside`]) on the underlay.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 200);
/// Gateway address of every pod in a dual-stack lab (link-local, on each host-side veth).
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The outside client's IPv6 address on the underlay, in a dual-stack lab.
pub const OUTSIDE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 0xc8);

/// Pod `host`'s IPv6 address on node `node` in a dual-stack lab: `fd00:10:244:<node>::<host>`.
pub const fn pod_ip6(node: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, node as u16, 0, 0, 0, host as u16)
}
/// Every node's interface on the underlay.
pub const UNDERLAY_IF: &str = "ul0";
/// The underlay's bridge, in the underlay's namespace.
const BRIDGE: &str = "br0";

/// Runs `f` on a thread that has joined network namespace `netns`. Sockets created there stay in
/// that namespace wherever they are used later.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let file = File::open(format!("/run/netns/{netns}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only; the fd is valid for the call.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("thread in netns panicked"))?
}

fn run(cmd: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(cmd).args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args)
}

fn sysctl(netns: &str, settings: &[&str]) -> io::Result<()> {
    let mut args = vec!["netns", "exec", netns, "sysctl", "-qw"];
    args.extend_from_slice(settings);
    run("ip", &args)
}

#[derive(Debug, Clone)]
pub struct Node {
    pub index: u8,
    pub netns: String,
    pub pin_dir: PathBuf,
}

impl Node {
    pub fn underlay_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, 0, self.index)
    }

    /// Its underlay IPv6 address, in a dual-stack lab.
    pub fn underlay_ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, u16::from(self.index))
    }

    /// The name its agent is given (`--node-name`) and its Node object has.
    pub fn name(&self) -> String {
        format!("node{}", self.index)
    }
}

/// A client outside the cluster: a namespace on the underlay bridge, at [`OUTSIDE_IP`], with no
/// route beyond the underlay but those [`Lab::route_via`] adds.
#[derive(Debug, Clone)]
pub struct Outside {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// In a dual-stack lab, [`OUTSIDE_IP6`].
    pub ip6: Option<Ipv6Addr>,
}

/// A `v1` Node object for `node`, as the API server would hold it: named as its agent is
/// (`node<index>`), its underlay address as `InternalIP`, its name as `Hostname`.
pub fn node_manifest(node: &Node) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata:
  name: {name}
status:
  addresses:
  - type: InternalIP
    address: "{ip}"
  - type: Hostname
    address: {name}
"#,
        name = node.name(),
        ip = node.underlay_ip()
    )
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack lab.
    pub ip6: Option<Ipv6Addr>,
    pub node: u8,
    /// Host-side interface in the node's namespace.
    pub host_if: String,
}

/// Servers in a pod that answer with the pod's name: TCP (one line per line received) and UDP
/// (one datagram per datagram).
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    pin_root: PathBuf,
    scratch: PathBuf,
    agents: Vec<(String, Child)>,
    /// How each node's agent was started, for restarts.
    agent_specs: Vec<AgentSpec>,
    servers: Vec<Servers>,
    /// The underlay's namespace, once a node has joined it.
    underlay: Option<String>,
    /// The nodes on the underlay bridge, by index.
    on_underlay: Vec<u8>,
    outside: Option<Outside>,
    /// Everything gets an IPv6 address too ([`Lab::dual_stack`]).
    dual_stack: bool,
}

#[derive(Clone)]
struct AgentSpec {
    node: Node,
    agent: PathBuf,
    /// `--manifests DIR` or `--kubeconfig PATH ...`.
    source: Vec<String>,
    mode: Mode,
    extra: Vec<String>,
    /// The cgroup (a directory of a cgroup v2 hierarchy) the agent process runs in, if not the
    /// test's.
    cgroup: Option<PathBuf>,
}

impl Lab {
    /// A new, empty lab. `tag` keeps parallel labs apart (namespace and pin names).
    pub fn new(tag: &str) -> io::Result<Self> {
        let prefix = format!("lb{tag}{}", std::process::id());
        let scratch = std::env::temp_dir().join(format!("lab-{prefix}"));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        Ok(Self {
            pin_root: PathBuf::from(format!("/sys/fs/bpf/lb-lab/{prefix}")),
            prefix,
            namespaces: Vec::new(),
            scratch,
            agents: Vec::new(),
            agent_specs: Vec::new(),
            servers: Vec::new(),
            underlay: None,
            on_underlay: Vec::new(),
            outside: None,
            dual_stack: false,
        })
    }

    /// Makes the nodes, pods and outside client made from now on dual-stack (see the module
    /// documentation for their IPv6 addresses).
    pub fn dual_stack(&mut self) {
        self.dual_stack = true;
    }

    /// A directory that lives as long as the lab (manifests, logs).
    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    fn netns(&mut self, name: &str) -> io::Result<String> {
        let ns = format!("{}-{name}", self.prefix);
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        if self.dual_stack {
            // No duplicate address detection, on the link-local addresses the kernel gives each
            // interface either: until it ends, an interface answers no neighbour solicitation.
            sysctl(&ns, &["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])?;
        }
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn node(&mut self, index: u8) -> io::Result<Node> {
        let netns = self.netns(&format!("n{index}"))?;
        // No reverse-path filter: traffic from outside the cluster may come in on one interface
        // and its answers leave on another (NodePort to another node's endpoint). `default`
        // covers the interfaces made later.
        sysctl(
            &netns,
            &["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"],
        )?;
        if self.dual_stack {
            sysctl(&netns, &["net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.forwarding=1"])?;
        }
        Ok(Node { index, netns, pin_dir: self.pin_root.join(format!("n{index}")) })
    }

    /// A pod on `node` with address `10.244.<node>.<host>`. `tx_csum_offload: false` makes the pod
    /// send full checksums (as a physical NIC delivers them) instead of partial ones.
    pub fn pod(&mut self, node: &Node, name: &str, host: u8, tx_csum_offload: bool) -> io::Result<Pod> {
        let netns = self.netns(name)?;
        let host_if = format!("lxc{name}");
        let ip_addr = Ipv4Addr::new(10, 244, node.index, host);
        let (pod_ip, gw) = (format!("{ip_addr}/32"), POD_GATEWAY.to_string());
        ip(&[
            "-n",
            &node.netns,
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        ip(&["-n", &node.netns, "addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
        ip(&["-n", &node.netns, "link", "set", &host_if, "up"])?;
        ip(&["-n", &node.netns, "route", "add", &pod_ip, "dev", &host_if])?;
        ip(&["-n", &netns, "addr", "add", &pod_ip, "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "route", "add", &gw, "dev", "eth0", "scope", "link"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", &gw, "dev", "eth0"])?;
        if !tx_csum_offload {
            run("ip", &["netns", "exec", &netns, "ethtool", "-K", "eth0", "tx", "off"])?;
        }
        let ip6 = self.dual_stack.then(|| pod_ip6(node.index, host));
        if let Some(a) = ip6 {
            let (pod_ip6, gw6) = (format!("{a}/128"), POD_GATEWAY6.to_string());
            ip(&["-n", &node.netns, "-6", "addr", "add", &format!("{gw6}/64"), "dev", &host_if, "nodad"])?;
            ip(&["-n", &node.netns, "-6", "route", "add", &pod_ip6, "dev", &host_if])?;
            ip(&["-n", &netns, "-6", "addr", "add", &pod_ip6, "dev", "eth0", "nodad"])?;
            ip(&["-n", &netns, "-6", "route", "add", "default", "via", &gw6, "dev", "eth0"])?;
        }
        Ok(Pod { name: name.into(), netns, ip: ip_addr, ip6, node: node.index, host_if })
    }

    /// Puts both nodes on the underlay bridge (each once, however many nodes it is linked to) and
    /// routes each node's pod range via the other's underlay address.
    pub fn link_nodes(&mut self, a: &Node, b: &Node) -> io::Result<()> {
        for n in [a, b] {
            if !self.on_underlay.contains(&n.index) {
                let ip6 = self.dual_stack.then(|| n.underlay_ip6());
                self.plug(&n.netns, UNDERLAY_IF, &format!("n{}", n.index), n.underlay_ip(), ip6)?;
                sysctl(&n.netns, &[&format!("net.ipv4.conf.{UNDERLAY_IF}.rp_filter=0")])?;
                self.on_underlay.push(n.index);
            }
        }
        for (n, peer) in [(a, b), (b, a)] {
            let range = format!("10.244.{}.0/24", peer.index);
            ip(&["-n", &n.netns, "route", "replace", &range, "via", &peer.underlay_ip().to_string()])?;
            if self.dual_stack {
                let range = format!("{}/64", pod_ip6(peer.index, 0));
                let via = peer.underlay_ip6().to_string();
                ip(&["-n", &n.netns, "-6", "route", "replace", &range, "via", &via])?;
            }
        }
        Ok(())
    }

    /// The client outside the cluster, on the underlay bridge (made on the first call).
    pub fn outside(&mut self) -> io::Result<Outside> {
        if let Some(out) = &self.outside {
            return Ok(out.clone());
        }
        let netns = self.netns("out")?;
        let ip6 = self.dual_stack.then_some(OUTSIDE_IP6);
        self.plug(&netns, "eth0", "out", OUTSIDE_IP, ip6)?;
        let out = Outside { netns, ip: OUTSIDE_IP, ip6 };
        self.outside = Some(out.clone());
        Ok(out)
    }

    /// Routes `dst` (a /32) from `out` via `node`'s underlay address, replacing any route `dst`
    /// had: a router announcing a LoadBalancer IP or an external IP through that node.
    pub fn route_via(&self, out: &Outside, dst: impl Into<IpAddr>, node: &Node) -> io::Result<()> {
        match dst.into() {
            IpAddr::V4(dst) => {
                let (dst, via) = (format!("{dst}/32"), node.underlay_ip().to_string());
                ip(&["-n", &out.netns, "route", "replace", &dst, "via", &via])
            }
            IpAddr::V6(dst) => {
                let (dst, via) = (format!("{dst}/128"), node.underlay_ip6().to_string());
                ip(&["-n", &out.netns, "-6", "route", "replace", &dst, "via", &via])
            }
        }
    }

    /// The underlay's namespace with its bridge, made on first use.
    fn underlay(&mut self) -> io::Result<String> {
        if let Some(ns) = &self.underlay {
            return Ok(ns.clone());
        }
        let ns = self.netns("ul")?;
        ip(&["-n", &ns, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", BRIDGE, "up"])?;
        // Where the kernel has bridge netfilter (built in on some), bridged frames would pass
        // the namespace's iptables and conntrack: the underlay is a plain switch, so not.
        in_netns(&ns, || -> io::Result<()> {
            for f in ["arptables", "iptables", "ip6tables"] {
                let path = format!("/proc/sys/net/bridge/bridge-nf-call-{f}");
                if Path::new(&path).exists() {
                    std::fs::write(path, "0")?;
                }
            }
            Ok(())
        })??;
        self.underlay = Some(ns.clone());
        Ok(ns)
    }

    /// Plugs `netns` into the underlay bridge: interface `inner` there, with `addr/24` (and
    /// `addr6/64`), on a veth whose other end is the bridge port `port`.
    fn plug(
        &mut self,
        netns: &str,
        inner: &str,
        port: &str,
        addr: Ipv4Addr,
        addr6: Option<Ipv6Addr>,
    ) -> io::Result<()> {
        let ul = self.underlay()?;
        ip(&["-n", &ul, "link", "add", port, "type", "veth", "peer", "name", inner, "netns", netns])?;
        ip(&["-n", &ul, "link", "set", port, "master", BRIDGE, "up"])?;
        ip(&["-n", netns, "addr", "add", &format!("{addr}/24"), "dev", inner])?;
        if let Some(a) = addr6 {
            ip(&["-n", netns, "-6", "addr", "add", &format!("{a}/64"), "dev", inner, "nodad"])?;
        }
        ip(&["-n", netns, "link", "set", inner, "up"])
    }

    /// Starts TCP and UDP servers in `pod` that answer with the pod's name (on each of its
    /// addresses).
    pub fn serve(&mut self, pod: &Pod, tcp_port: u16, udp_port: u16) -> io::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let addrs: Vec<IpAddr> = std::iter::once(IpAddr::V4(pod.ip)).chain(pod.ip6.map(IpAddr::V6)).collect();
        for addr in addrs {
            let (tcp, udp) = in_netns(&pod.netns, move || -> io::Result<_> {
                Ok((TcpListener::bind((addr, tcp_port))?, UdpSocket::bind((addr, udp_port))?))
            })??;
            let (s, n) = (stop.clone(), pod.name.clone());
            threads.push(std::thread::spawn(move || tcp_server(tcp, &n, &s)));
            let (s, n) = (stop.clone(), pod.name.clone());
            threads.push(std::thread::spawn(move || udp_server(udp, &n, &s)));
        }
        self.servers.push(Servers { stop, threads });
        Ok(())
    }

    /// Starts only a TCP server in `pod` on `port` (answering with the pod's name).
    pub fn serve_tcp(&mut self, pod: &Pod, port: u16) -> io::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let (name, addr) = (pod.name.clone(), pod.ip);
        let tcp = in_netns(&pod.netns, move || TcpListener::bind((addr, port)))??;
        let s = stop.clone();
        let threads = vec![std::thread::spawn(move || tcp_server(tcp, &name, &s))];
        self.servers.push(Servers { stop, threads });
        Ok(())
    }

    /// Starts `lb-agent` (the binary at `agent`) inside `node`'s namespace in standalone mode.
    pub fn start_agent(
        &mut self,
        node: &Node,
        agent: &Path,
        manifests: &Path,
        mode: Mode,
        extra: &[&str],
    ) -> io::Result<()> {
        let source = ["--manifests".to_string(), manifests.display().to_string()];
        self.start_agent_with(node, agent, &source, mode, extra)
    }

    /// Starts `lb-agent` inside `node`'s namespace with another source (`--kubeconfig PATH`).
    pub fn start_agent_with(
        &mut self,
        node: &Node,
        agent: &Path,
        source: &[String],
        mode: Mode,
        extra: &[&str],
    ) -> io::Result<()> {
        let spec = AgentSpec {
            node: node.clone(),
            agent: agent.into(),
            source: source.to_vec(),
            mode,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            cgroup: None,
        };
        self.start_agent_spec(spec)
    }

    /// Starts `lb-agent` as [`Lab::start_agent_with`] does, its process in `cgroup` (a directory
    /// of a cgroup v2 hierarchy), as an agent on a node runs in the cgroup its socket programs
    /// attach to; restarts keep it there.
    pub fn start_agent_in_cgroup(
        &mut self,
        node: &Node,
        agent: &Path,
        source: &[String],
        extra: &[&str],
        cgroup: &Path,
    ) -> io::Result<()> {
        let spec = AgentSpec {
            node: node.clone(),
            agent: agent.into(),
            source: source.to_vec(),
            mode: Mode::Tc,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            cgroup: Some(cgroup.into()),
        };
        self.start_agent_spec(spec)
    }

    fn start_agent_spec(&mut self, spec: AgentSpec) -> io::Result<()> {
        let AgentSpec { node, agent, source, mode, extra, cgroup } = spec.clone();
        self.agent_specs.retain(|s| s.node.netns != node.netns);
        self.agent_specs.push(spec);
        let netns = File::open(format!("/run/netns/{}", node.netns))?;
        let procs = match &cgroup {
            Some(dir) => Some(std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?),
            None => None,
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.agent_log_path(&node))?;
        let mode = match mode {
            Mode::Tc => "tc",
            Mode::Xdp => "xdp",
        };
        let mut cmd = Command::new(agent);
        // The socket programs attach only where a test gives its own cgroup (`--socket-lb` in
        // `extra` overrides this), never to the machine's hierarchy.
        cmd.env("LB_SOCKET_LB", "off")
            .args(&source)
            .args(["--interfaces", POD_IF_GLOB, "--datapath", mode, "--node-name", &node.name()])
            .arg("--pin-dir")
            .arg(&node.pin_dir)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let fd = netns.as_raw_fd();
        let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: only async-signal-safe calls (setns, write) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0": the writing process itself.
                if let Some(p) = procs_fd {
                    if libc::write(p, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop((netns, procs));
        self.agents.push((node.netns.clone(), child));
        Ok(())
    }

    /// The process id of `node`'s agent, while it runs.
    pub fn agent_pid(&self, node: &Node) -> Option<u32> {
        self.agents.iter().find(|(ns, _)| *ns == node.netns).map(|(_, c)| c.id())
    }

    pub fn agent_log_path(&self, node: &Node) -> PathBuf {
        self.scratch.join(format!("agent-n{}.log", node.index))
    }

    pub fn agent_log(&self, node: &Node) -> String {
        std::fs::read_to_string(self.agent_log_path(node)).unwrap_or_default()
    }

    /// Sends `signal` to `node`'s agent and waits for it to exit (SIGKILL after 5 s).
    pub fn stop_agent(&mut self, node: &Node, signal: i32) {
        let Some(i) = self.agents.iter().position(|(ns, _)| *ns == node.netns) else { return };
        let agent = self.agents.remove(i);
        stop_children(vec![agent], signal);
    }

    /// Starts `node`'s agent again, as it was started before.
    pub fn restart_agent(&mut self, node: &Node) -> io::Result<()> {
        self.restart_agent_adding(node, &[])
    }

    /// Starts `node`'s agent again, as it was started before but with flags `more` after the
    /// others (a later one of a flag wins).
    pub fn restart_agent_adding(&mut self, node: &Node, more: &[&str]) -> io::Result<()> {
        let spec = self
            .agent_specs
            .iter()
            .find(|s| s.node.netns == node.netns)
            .cloned()
            .ok_or_else(|| io::Error::other("no agent started on that node"))?;
        let mut spec = spec;
        spec.extra.extend(more.iter().map(|s| s.to_string()));
        self.start_agent_spec(spec)
    }

    /// Stops the agents (SIGTERM, then SIGKILL after 5 s).
    pub fn stop_agents(&mut self) {
        stop_children(self.agents.drain(..).collect(), libc::SIGTERM);
    }
}

/// Sends `signal` to every child, then waits for them all (SIGKILL after 5 s).
fn stop_children(children: Vec<(String, Child)>, signal: i32) {
    for (_, child) in &children {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for (_, mut child) in children {
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_agents();
        for s in &self.servers {
            s.stop.store(true, Ordering::Relaxed);
        }
        for s in self.servers.drain(..) {
            for t in s.threads {
                let _ = t.join();
            }
        }
        // Deleting a namespace removes its interfaces, and with them the attachments.
        for ns in self.namespaces.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
        let _ = std::fs::remove_dir_all(&self.pin_root);
        // The shared parent goes too once no other lab uses it (fails harmlessly otherwise).
        if let Some(parent) = self.pin_root.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Waits up to 100 ms for `fd` to be readable.
fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 100) > 0 }
}

fn tcp_server(listener: TcpListener, name: &str, stop: &Arc<AtomicBool>) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.as_raw_fd()) {
            continue;
        }
        let Ok((stream, peer)) = listener.accept() else { continue };
        let (name, stop) = (name.to_string(), stop.clone());
        conns.push(std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
            let mut w = stream.try_clone().expect("clone tcp stream");
            let mut r = BufReader::new(stream);
            let mut line = String::new();
            while !stop.load(Ordering::Relaxed) {
                match r.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => {
                        let answer = if line.trim_end_matches(['\r', '\n']).as_bytes() == PEER {
                            format!("{name} {peer}\n")
                        } else {
                            format!("{name}\n")
                        };
                        if w.write_all(answer.as_bytes()).is_err() {
                            break;
                        }
                        line.clear();
                    }
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                    Err(_) => break,
                }
            }
        }));
        conns.retain(|t| !t.is_finished());
    }
    for t in conns {
        let _ = t.join();
    }
}

/// Answers each datagram with the pod's name; a datagram starting with [`ECHO`] is answered with
/// the name followed by the rest of it, so that a large question gets an answer as large; the
/// datagram [`PEER`] with the name and the address it came from.
fn udp_server(sock: UdpSocket, name: &str, stop: &Arc<AtomicBool>) {
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let mut answer = name.as_bytes().to_vec();
            if let Some(rest) = buf[..n].strip_prefix(ECHO) {
                answer.push(b':');
                answer.extend_from_slice(rest);
            } else if &buf[..n] == PEER {
                answer.extend_from_slice(format!(" {peer}").as_bytes());
            }
            let _ = sock.send_to(&answer, peer);
        }
    }
}

/// A UDP question that the lab's servers echo after their name (see `udp_server`).
pub const ECHO: &[u8] = b"echo:";

/// The question (a TCP line, or a whole UDP datagram) that the lab's servers answer with
/// `<pod name> <ip>:<port>`: the client's address as the server's socket sees it, that is after
/// any translation on the way (the client's own address, or a node's after SNAT).
/// [`Session::peer`], [`tcp_peer_from`] and [`udp_peer_from`] ask it.
pub const PEER: &[u8] = b"peer";

/// Splits a [`PEER`] answer into the pod's name and the address it saw (IPv4 or IPv6, as `A`).
fn parse_peer<A: std::str::FromStr>(answer: &str) -> io::Result<(String, A)> {
    answer
        .trim()
        .split_once(' ')
        .and_then(|(name, peer)| Some((name.to_string(), peer.parse().ok()?)))
        .ok_or_else(|| io::Error::other(format!("not an answer to `peer`: {answer:?}")))
}

const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP connection from a pod (or any namespace), kept open across questions.
pub struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Session {
    pub fn open(pod: &Pod, to: impl Into<SocketAddr>) -> io::Result<Self> {
        Self::open_in(&pod.netns, to)
    }

    /// Connects from network namespace `netns` (a pod's, a node's, the outside client's).
    pub fn open_in(netns: &str, to: impl Into<SocketAddr>) -> io::Result<Self> {
        let to = to.into();
        in_netns(netns, move || Self::connect(to))?
    }

    /// Connects from the calling thread's network namespace.
    pub fn connect(to: impl Into<SocketAddr>) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&to.into(), CLIENT_TIMEOUT)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        Ok(Self { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    /// Asks who answers; returns the backend's name.
    pub fn ask(&mut self) -> io::Result<String> {
        self.question(b"who")
    }

    /// Asks [`PEER`]; returns the backend's name and the address it sees this connection from.
    pub fn peer(&mut self) -> io::Result<(String, SocketAddrV4)> {
        parse_peer(&self.question(PEER)?)
    }

    /// As [`Session::peer`], for a connection of either family.
    pub fn peer_addr(&mut self) -> io::Result<(String, SocketAddr)> {
        parse_peer(&self.question(PEER)?)
    }

    /// Sends `q` as one line; returns the line answered, trimmed.
    fn question(&mut self, q: &[u8]) -> io::Result<String> {
        self.writer.write_all(&[q, b"\n"].concat())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(line.trim().to_string())
    }
}

/// Runs `count` one-question TCP connections (each from a new source port) from `pod` to `to`;
/// returns each answer.
pub fn tcp_asks(pod: &Pod, to: impl Into<SocketAddr>, count: usize) -> io::Result<Vec<io::Result<String>>> {
    tcp_asks_from(&pod.netns, to, count)
}

/// As [`tcp_asks`], from network namespace `netns`.
pub fn tcp_asks_from(
    netns: &str,
    to: impl Into<SocketAddr>,
    count: usize,
) -> io::Result<Vec<io::Result<String>>> {
    let to = to.into();
    in_netns(netns, move || (0..count).map(|_| Session::connect(to)?.ask()).collect())
}

/// One TCP connection from `netns` to `to` that asks [`PEER`]: the backend's name and the address
/// it sees the client at.
pub fn tcp_peer_from(netns: &str, to: SocketAddrV4) -> io::Result<(String, SocketAddrV4)> {
    Session::open_in(netns, to)?.peer()
}

/// As [`tcp_peer_from`], to an address of either family.
pub fn tcp_peer_any(netns: &str, to: SocketAddr) -> io::Result<(String, SocketAddr)> {
    Session::open_in(netns, to)?.peer_addr()
}

/// Source ports for [`udp_asks`]: below the kernel's ephemeral range, so they never collide with
/// ports the kernel picks.
pub const UDP_CLIENT_PORTS: std::ops::Range<u16> = 10_000..30_000;

/// Runs `count` UDP exchanges from `pod` to `to`, each from a different source port (the kernel
/// would reuse ephemeral ports, which makes the same flow twice). `first_port` is the port of
/// the first exchange; the others follow it.
pub fn udp_asks(
    pod: &Pod,
    to: impl Into<SocketAddr>,
    first_port: u16,
    count: usize,
) -> io::Result<Vec<io::Result<String>>> {
    udp_asks_from(&pod.netns, to, first_port, count)
}

/// As [`udp_asks`], from network namespace `netns`.
pub fn udp_asks_from(
    netns: &str,
    to: impl Into<SocketAddr>,
    first_port: u16,
    count: usize,
) -> io::Result<Vec<io::Result<String>>> {
    let to = to.into();
    in_netns(netns, move || (0..count).map(|i| udp_exchange(first_port + i as u16, to, b"who")).collect())
}

/// One UDP exchange from `netns`, from source port `port` (0: the kernel picks one), that asks
/// [`PEER`]: the backend's name and the address it sees the client at.
pub fn udp_peer_from(netns: &str, to: SocketAddrV4, port: u16) -> io::Result<(String, SocketAddrV4)> {
    parse_peer(&in_netns(netns, move || udp_exchange(port, to.into(), PEER))??)
}

/// As [`udp_peer_from`], to an address of either family.
pub fn udp_peer_any(netns: &str, to: SocketAddr, port: u16) -> io::Result<(String, SocketAddr)> {
    parse_peer(&in_netns(netns, move || udp_exchange(port, to, PEER))??)
}

/// Sends `question` from source port `port` to `to` and waits for the answer, which must come
/// from `to` (run in the client's namespace).
fn udp_exchange(port: u16, to: SocketAddr, question: &[u8]) -> io::Result<String> {
    let any: IpAddr = if to.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let sock = UdpSocket::bind((any, port))?;
    sock.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    sock.send_to(question, to)?;
    let mut buf = [0u8; 256];
    let (n, from) = sock.recv_from(&mut buf)?;
    if from != to {
        return Err(io::Error::other(format!("answer came from {from}, not {to}")));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Retries `f` until it succeeds or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `GET path` over HTTP/1.0 from inside `netns`; returns the status code and the body.
pub fn http_get(netns: &str, to: std::net::SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_answer(netns, to, path).map(|a| (a.status, a.body))
}

/// `GET path` over HTTP/1.0 from inside `netns`: status, headers and body.
pub fn http_answer(
    netns: &str,
    to: std::net::SocketAddr,
    path: &str,
) -> io::Result<lb_agent::inspect::HttpAnswer> {
    let path = path.to_string();
    in_netns(netns, move || lb_agent::inspect::http_get(to, &path, Duration::from_secs(10)))?
}
