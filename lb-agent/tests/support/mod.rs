//! Helpers shared by the integration tests: a unique pin directory that is removed on drop, a
//! datapath configuration sized for tests, and a packet builder.
#![allow(dead_code, reason = "each test binary uses a different subset of these helpers")]

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use etherparse::{IpNumber, Ipv4Header, Ipv4Options, TcpHeader, UdpHeader};
use lb_agent::datapath::{Config, Maps, Mode};
use lb_common::capacity::Capacities;
use lb_testkit::lab::{tcp_asks, wait_until, Lab, Node, Pod};

pub mod node;
pub mod v6;

/// A directory on bpffs, unique to this test, removed (with its pins) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(test: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/lb-test/{}-{}-{}",
            test,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // The shared parent goes too once no other test uses it (fails harmlessly otherwise).
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

pub fn test_config(pin_dir: &Path) -> Config {
    Config {
        pin_dir: pin_dir.to_path_buf(),
        caps: Capacities {
            services: 1024,
            backends: 1024,
            maglev_slots: 65_536,
            ct: 16_384,
            affinity: 1024,
            members: 4096,
        },
        ct_timeout_tcp_syn_secs: 60,
        ct_timeout_tcp_established_secs: 3600,
        ct_timeout_tcp_close_secs: 10,
        ct_timeout_udp_secs: 60,
        flow_hash_seed: lb_common::hash::DEFAULT_FLOW_HASH_SEED,
        hairpin_addr: lb_common::DEFAULT_HAIRPIN_ADDR.into(),
        hairpin_addr6: lb_common::DEFAULT_HAIRPIN_ADDR6.into(),
        snat_ports: lb_common::DEFAULT_SNAT_PORTS,
        bpf_log: false,
        tc_order: Default::default(),
        tc_attach: Default::default(),
        node_xdp: false,
        socket_lb: lb_agent::datapath::SocketLb::Off,
        ipv6: true,
    }
}

/// TC verdicts: `TCX_NEXT` (-1, the packet goes on to the programs after lb), `TC_ACT_SHOT`,
/// `TC_ACT_REDIRECT` (sent out of an interface by the program).
pub const TC_OK: u32 = u32::MAX;
pub const TC_SHOT: u32 = 2;
pub const TC_REDIRECT: u32 = 7;

/// Asserts that the datapath's counters went from `before` to `after` by exactly `want` (counter,
/// change) pairs, naming the counters.
pub fn assert_counter_changes(desc: &str, before: &[u64], after: &[u64], want: &[(u32, u64)]) {
    use lb_common::counters::NAMES;
    let mut wanted = vec![0u64; before.len()];
    for (i, d) in want {
        wanted[*i as usize] += d;
    }
    let got: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let named = |v: &[u64]| -> Vec<(&str, u64)> {
        v.iter().enumerate().filter(|(_, d)| **d != 0).map(|(i, d)| (NAMES[i], *d)).collect()
    };
    assert_eq!(named(&got), named(&wanted), "{desc}: counter changes");
}

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Layer 4 of a test packet.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    /// TCP with these flags (etherparse names).
    Tcp { syn: bool, ack: bool, fin: bool, rst: bool },
    /// UDP; `zero_checksum` sends 0 ("no checksum").
    Udp { zero_checksum: bool },
}

pub const SYN: L4 = L4::Tcp { syn: true, ack: false, fin: false, rst: false };
pub const ACK: L4 = L4::Tcp { syn: false, ack: true, fin: false, rst: false };
pub const SYN_ACK: L4 = L4::Tcp { syn: true, ack: true, fin: false, rst: false };
pub const UDP: L4 = L4::Udp { zero_checksum: false };
pub const UDP_NOCSUM: L4 = L4::Udp { zero_checksum: true };

/// An Ethernet + IPv4 + TCP/UDP packet with valid checksums.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub l4: L4,
    pub ip_options: Vec<u8>,
    pub more_fragments: bool,
    pub fragment_offset: u16,
    pub payload: Vec<u8>,
}

impl Pkt {
    pub fn new(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            ip_options: Vec::new(),
            more_fragments: false,
            fragment_offset: 0,
            payload: b"hello, lb".to_vec(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GW_MAC);
        out.extend_from_slice(&CLIENT_MAC);
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        let (proto, l4_len) = match self.l4 {
            L4::Tcp { .. } => (IpNumber::TCP, 20),
            L4::Udp { .. } => (IpNumber::UDP, 8),
        };
        let mut ip = Ipv4Header::new(
            (l4_len + self.payload.len()) as u16,
            64,
            proto,
            self.src.0.octets(),
            self.dst.0.octets(),
        )
        .expect("ipv4 header");
        ip.options = Ipv4Options::try_from(self.ip_options.as_slice()).expect("ipv4 options");
        ip.total_len += self.ip_options.len() as u16;
        ip.dont_fragment = false;
        ip.more_fragments = self.more_fragments;
        ip.fragment_offset = self.fragment_offset.try_into().expect("fragment offset");
        ip.header_checksum = ip.calc_header_checksum();
        out.extend_from_slice(&ip.to_bytes());
        match self.l4 {
            L4::Tcp { syn, ack, fin, rst } => {
                let mut tcp = TcpHeader::new(self.src.1, self.dst.1, 1000, 64240);
                (tcp.syn, tcp.ack, tcp.fin, tcp.rst) = (syn, ack, fin, rst);
                tcp.checksum = tcp.calc_checksum_ipv4(&ip, &self.payload).expect("tcp checksum");
                out.extend_from_slice(&tcp.to_bytes());
            }
            L4::Udp { zero_checksum } => {
                let mut udp = UdpHeader {
                    source_port: self.src.1,
                    destination_port: self.dst.1,
                    length: (8 + self.payload.len()) as u16,
                    checksum: 0,
                };
                if !zero_checksum {
                    udp.checksum = udp.calc_checksum_ipv4(&ip, &self.payload).expect("udp checksum");
                }
                out.extend_from_slice(&udp.to_bytes());
            }
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// What a packet out of the datapath says, after checking every checksum from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    /// The UDP checksum field (0 = none); TCP: None.
    pub udp_checksum: Option<u16>,
}

/// Parses an Ethernet/IPv4/TCP|UDP packet and panics unless the IPv4 header checksum and the L4
/// checksum are right (computed from scratch by etherparse, not incrementally).
pub fn check_packet(bytes: &[u8]) -> Seen {
    let (ip, rest) = Ipv4Header::from_slice(&bytes[14..]).expect("ipv4 header out");
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header checksum");
    let src = Ipv4Addr::from(ip.source);
    let dst = Ipv4Addr::from(ip.destination);
    match ip.protocol {
        IpNumber::TCP => {
            let (tcp, payload) = TcpHeader::from_slice(rest).expect("tcp header out");
            let want = tcp.calc_checksum_ipv4(&ip, payload).expect("tcp checksum");
            assert_eq!(tcp.checksum, want, "TCP checksum");
            Seen { src: (src, tcp.source_port), dst: (dst, tcp.destination_port), udp_checksum: None }
        }
        IpNumber::UDP => {
            let (udp, payload) = UdpHeader::from_slice(rest).expect("udp header out");
            if udp.checksum != 0 {
                let want = udp.calc_checksum_ipv4(&ip, payload).expect("udp checksum");
                // A computed 0 is sent as 0xffff.
                let want = if want == 0 { 0xffff } else { want };
                assert_eq!(udp.checksum, want, "UDP checksum");
            }
            Seen {
                src: (src, udp.source_port),
                dst: (dst, udp.destination_port),
                udp_checksum: Some(udp.checksum),
            }
        }
        other => panic!("unexpected protocol {other:?}"),
    }
}

/// The service address the end-to-end tests use.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// This version's agent.
pub const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

/// Two nodes joined by an underlay, each with an agent; a client on each (c1, c2); backends b1
/// and b2 on node 1 and b3 on node 2, each serving TCP 8080 and UDP 5353 (and b3 also TCP 9090).
pub struct Cluster {
    pub lab: Lab,
    pub nodes: [Node; 2],
    pub client1: Pod,
    pub client2: Pod,
    pub backends: [Pod; 3],
    pub manifests: PathBuf,
}

impl Cluster {
    pub fn new(
        tag: &str,
        mode: Mode,
        tx_csum_offload: bool,
        yaml: impl FnOnce(&[Pod; 3]) -> String,
        agent_args: &[&str],
    ) -> Self {
        Self::with_agents(tag, [Path::new(AGENT); 2], mode, tx_csum_offload, yaml, agent_args)
    }

    /// As [`Cluster::new`], with the agent binary of each node given (another version's).
    pub fn with_agents(
        tag: &str,
        agents: [&Path; 2],
        mode: Mode,
        tx_csum_offload: bool,
        yaml: impl FnOnce(&[Pod; 3]) -> String,
        agent_args: &[&str],
    ) -> Self {
        Self::build(tag, agents, mode, tx_csum_offload, yaml, agent_args, false)
    }

    /// As [`Cluster::new`] in a dual-stack lab (`Lab::dual_stack`): every pod has an IPv6
    /// address too.
    pub fn dual_stack(
        tag: &str,
        mode: Mode,
        yaml: impl FnOnce(&[Pod; 3]) -> String,
        agent_args: &[&str],
    ) -> Self {
        Self::build(tag, [Path::new(AGENT); 2], mode, false, yaml, agent_args, true)
    }

    fn build(
        tag: &str,
        agents: [&Path; 2],
        mode: Mode,
        tx_csum_offload: bool,
        yaml: impl FnOnce(&[Pod; 3]) -> String,
        agent_args: &[&str],
        dual_stack: bool,
    ) -> Self {
        let mut lab = Lab::new(tag).expect("lab");
        if dual_stack {
            lab.dual_stack();
        }
        let n1 = lab.node(1).expect("node 1");
        let n2 = lab.node(2).expect("node 2");
        lab.link_nodes(&n1, &n2).expect("underlay");
        let client1 = lab.pod(&n1, "c1", 10, tx_csum_offload).expect("client 1");
        let client2 = lab.pod(&n2, "c2", 10, tx_csum_offload).expect("client 2");
        let b1 = lab.pod(&n1, "b1", 2, tx_csum_offload).expect("b1");
        let b2 = lab.pod(&n1, "b2", 3, tx_csum_offload).expect("b2");
        let b3 = lab.pod(&n2, "b3", 4, tx_csum_offload).expect("b3");
        for b in [&b1, &b2, &b3] {
            lab.serve(b, 8080, 5353).expect("servers");
        }
        lab.serve_tcp(&b3, 9090).expect("b3 on 9090");
        let manifests = lab.scratch().join("manifests");
        std::fs::create_dir_all(&manifests).expect("manifest dir");
        let backends = [b1, b2, b3];
        std::fs::write(manifests.join("objects.yaml"), yaml(&backends)).expect("write manifests");
        for (n, agent) in [&n1, &n2].into_iter().zip(agents) {
            lab.start_agent(n, agent, &manifests, mode, agent_args).expect("agent");
        }
        Self { lab, nodes: [n1, n2], client1, client2, backends, manifests }
    }

    /// Waits until `client` gets an answer from `VIP:port`.
    pub fn wait_reachable(&self, client: &Pod, port: u16) {
        let node = &self.nodes[usize::from(client.node) - 1];
        // Generous: the kernel matrix runs this in an emulated machine, where loading the
        // programs (the verifier) alone takes over ten seconds.
        let ready = wait_until(std::time::Duration::from_secs(60), || {
            tcp_asks(client, std::net::SocketAddrV4::new(VIP, port), 1)?.pop().expect("one answer")
        });
        assert!(
            ready.is_ok(),
            "service unreachable from {}: {ready:?}\nagent log:\n{}",
            client.name,
            self.lab.agent_log(node)
        );
    }

    /// As [`Cluster::wait_reachable`], once the client's agent is ready (both programs on every
    /// interface) before the first probe: for tests that wait for a frontend or member to be let
    /// go. A probe sent while the agent was placing its programs (the client's forward program
    /// placed before its reply program) could be load-balanced and yet not answered through lb;
    /// a conntrack dump at such a failure showed its flow left in the SYN state, made at that
    /// moment, which keeps what it uses for the SYN timeout (60 s).
    pub fn wait_settled(&self, client: &Pod, port: u16) {
        self.wait_ready(&self.nodes[usize::from(client.node) - 1]);
        self.wait_reachable(client, port);
    }

    /// Waits until `node`'s agent answers `/readyz` with 200: it loaded its programs, synced and
    /// attached every interface (generous: the kernel matrix loads programs emulated).
    pub fn wait_ready(&self, node: &Node) {
        let ready = wait_until(std::time::Duration::from_secs(90), || {
            match lb_testkit::lab::http_get(&node.netns, "127.0.0.1:10256".parse().expect("addr"), "/readyz")?
            {
                (200, _) => Ok(()),
                other => Err(std::io::Error::other(format!("{other:?}"))),
            }
        });
        assert!(
            ready.is_ok(),
            "{} never ready: {ready:?}\nagent log:\n{}",
            node.netns,
            self.lab.agent_log(node)
        );
    }

    /// Replaces the manifests (the agents pick the change up live).
    pub fn write(&self, yaml: &str) {
        let tmp = self.manifests.join(".objects.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write manifests");
        std::fs::rename(&tmp, self.manifests.join("objects.yaml")).expect("replace manifests");
    }

    pub fn maps(&self, node: usize) -> Maps {
        Maps::from_pins(&self.nodes[node - 1].pin_dir).expect("pinned maps")
    }

    /// Waits until node `node`'s backend map holds `ip:port` in `state` (`None`: not at all).
    /// Generous: some states come by timers (a closing timeout, then sweep passes), which a busy
    /// machine delays.
    pub fn wait_backend(&self, node: usize, ip: Ipv4Addr, port: u16, state: Option<u8>) {
        let found = wait_until(std::time::Duration::from_secs(20), || {
            let got = self
                .maps(node)
                .read_backends()
                .map_err(std::io::Error::other)?
                .into_iter()
                .find(|(_, b)| b.parts().0 == ip && b.parts().1 == port)
                .map(|(_, b)| b.state());
            if got == state {
                Ok(())
            } else {
                Err(std::io::Error::other(format!("state {got:?}")))
            }
        });
        assert!(
            found.is_ok(),
            "node {node}: backend {ip}:{port} never reached {state:?}: {found:?}\nagent log:\n{}",
            self.lab.agent_log(&self.nodes[node - 1])
        );
    }
}

/// `lb-agent --cleanup` for `node`, in its network namespace, where the agent ran (its netlink
/// filters, on kernels without TCX, are found by interface there).
pub fn cleanup(node: &lb_testkit::lab::Node) {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .args([AGENT, "--cleanup", "--pin-dir"])
        .arg(&node.pin_dir)
        .output()
        .expect("cleanup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A Service `who` (TCP 80 → 8080 as "tcp", UDP 53 → 5353 as "udp") with `spec_extra` appended
/// to its spec, and one EndpointSlice with `endpoints` (YAML list items, each starting "- ").
pub fn who(spec_extra: &str, endpoints: &[String]) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: who, namespace: demo}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: udp, port: 53, targetPort: 5353, protocol: UDP}}
{spec_extra}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: who-1
  namespace: demo
  labels: {{kubernetes.io/service-name: who}}
addressType: IPv4
ports:
- {{name: tcp, port: 8080, protocol: TCP}}
- {{name: udp, port: 5353, protocol: UDP}}
endpoints:
{}
"#,
        endpoints.join("\n")
    )
}

/// One endpoint item for [`who`].
pub fn endpoint(pod: &Pod, conditions: &str) -> String {
    format!("- addresses: [{}]\n  nodeName: node{}\n  conditions: {{{conditions}}}", pod.ip, pod.node)
}

/// The Internet checksum of `bytes` (0 when `bytes` carries a right checksum).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 =
        bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/ICMP error from `src` to `dst` of `kind`/`code`, its second word `rest`
/// (the next-hop MTU of "fragmentation needed"), quoting `quoted` (an IPv4 packet).
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, rest: u32, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = internet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip =
        Ipv4Header::new(icmp.len() as u16, 64, IpNumber::ICMP, src.octets(), dst.octets()).expect("ipv4");
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    out.extend_from_slice(&GW_MAC);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp);
    out
}

/// What an ICMP error out of the datapath says, after checking the outer IPv4 and the ICMP
/// checksums, and the quoted packet's IPv4 and (when it is quoted whole) L4 checksums.
#[derive(Debug, PartialEq, Eq)]
pub struct SeenIcmp {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub quoted: Seen,
}

pub fn check_icmp_error(bytes: &[u8]) -> SeenIcmp {
    let (ip, icmp) = Ipv4Header::from_slice(&bytes[14..]).expect("ipv4 header out");
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "outer IPv4 header checksum");
    assert_eq!(ip.protocol, IpNumber::ICMP);
    assert_eq!(internet_checksum(icmp), 0, "ICMP checksum");
    // The quote, as a packet of its own (check_packet verifies its checksums).
    let mut quoted = bytes[..14].to_vec();
    quoted.extend_from_slice(&icmp[8..]);
    SeenIcmp {
        src: Ipv4Addr::from(ip.source),
        dst: Ipv4Addr::from(ip.destination),
        quoted: check_packet(&quoted),
    }
}

/// Traffic from a pod (or any namespace) until stopped: new TCP connections one after another,
/// and a long-lived TCP connection and a connected UDP socket asked between them.
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Outcome>,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub new_ok: usize,
    pub failures: Vec<String>,
    pub long_lived_answers: Vec<String>,
    pub udp_answers: Vec<String>,
}

impl Traffic {
    pub fn start(pod: &Pod) -> Self {
        Self::start_from(&pod.netns, (VIP, 80), (VIP, 53))
    }

    /// Traffic from network namespace `netns` (a pod's, the outside client's) to TCP `tcp` and
    /// UDP `udp`.
    pub fn start_from(netns: &str, tcp: (Ipv4Addr, u16), udp: (Ipv4Addr, u16)) -> Self {
        use lb_testkit::lab::{in_netns, Session};
        use std::sync::{atomic::AtomicBool, Arc};
        let stop = Arc::new(AtomicBool::new(false));
        let to = std::net::SocketAddrV4::new(tcp.0, tcp.1);
        let mut session = Session::open_in(netns, to).expect("long-lived connection");
        let udp_to = std::net::SocketAddrV4::new(udp.0, udp.1);
        let udp = in_netns(netns, move || -> std::io::Result<std::net::UdpSocket> {
            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(udp_to)?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            Ok(s)
        })
        .expect("enter the namespace")
        .expect("UDP socket");
        let (s, netns) = (stop.clone(), netns.to_string());
        let handle = std::thread::spawn(move || {
            in_netns(&netns, move || {
                let mut o = Outcome::default();
                while !s.load(Ordering::Relaxed) {
                    match Session::connect(to).and_then(|mut s| s.ask()) {
                        Ok(_) => o.new_ok += 1,
                        Err(e) => o.failures.push(format!("new connection: {e}")),
                    }
                    match session.ask() {
                        Ok(a) => o.long_lived_answers.push(a),
                        Err(e) => o.failures.push(format!("long-lived connection: {e}")),
                    }
                    let mut buf = [0u8; 64];
                    match udp.send(b"who").and_then(|_| udp.recv(&mut buf)) {
                        Ok(n) => o.udp_answers.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                        Err(e) => o.failures.push(format!("UDP: {e}")),
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                o
            })
            .expect("traffic thread in netns")
        });
        Self { stop, handle }
    }

    pub fn stop(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("traffic thread")
    }
}

/// No failure, traffic ran, and the long-lived connection kept its backend.
pub fn assert_clean(o: &Outcome, what: &str) {
    assert!(o.failures.is_empty(), "{what}: {} failures, first: {:?}", o.failures.len(), o.failures.first());
    assert!(o.new_ok > 20, "{what}: traffic ran ({} new connections)", o.new_ok);
    assert_kept(&o.long_lived_answers, what, "long-lived connection");
}

/// This machine's online CPUs and the conntrack entries the agent takes for them by default.
#[allow(dead_code)]
pub fn default_ct_entries() -> (u32, u32) {
    let cpus = u32::try_from(aya::util::online_cpus().expect("online CPUs").len()).expect("CPUs");
    (cpus, lb_common::capacity::ct_for_cpus(cpus))
}

/// The agent's start-up step over `maps`: the programs' port filter knows the pinned rows' and
/// flows' ports, and is armed, as it is on a running node.
#[allow(dead_code)]
pub fn arm_port_filter(maps: &mut Maps) {
    assert!(maps.note_pinned_ports().expect("LB_PORTS"), "the port filter armed");
}

/// `LB_PORTS`' armed word under `pin_dir`: non-zero while the programs' port filter is on.
#[allow(dead_code)]
pub fn port_filter_armed(pin_dir: &Path) -> u64 {
    let pin = lb_agent::datapath::layout_dir(pin_dir).join(lb_common::MAP_LB_PORTS);
    let data = aya::maps::MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let words: aya::maps::Array<_, u64> =
        aya::maps::Map::from_map_data(data).expect("map").try_into().expect("an array of u64");
    words.get(&lb_common::PORTS_ARMED, 0).expect("the armed word")
}

/// The map pinned at `pin`: its id and capacity.
#[allow(dead_code)]
pub fn pinned_map(pin: &Path) -> (u32, u32) {
    let info = aya::maps::MapData::from_pin(pin)
        .and_then(|d| d.info())
        .unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    (info.id(), info.max_entries())
}

/// As [`assert_clean`], and the UDP flow kept its backend too (nothing removed its endpoint).
pub fn assert_clean_udp_kept(o: &Outcome, what: &str) {
    assert_clean(o, what);
    assert_kept(&o.udp_answers, what, "UDP flow");
}

fn assert_kept(answers: &[String], what: &str, flow: &str) {
    let first = &answers[0];
    assert!(answers.iter().all(|a| a == first), "{what}: the {flow} moved: {answers:?}");
}

/// The names of the TCX programs at `at` on `interface` in `netns`, in the order they run.
pub fn tcx_programs(netns: &str, interface: &str, at: aya::programs::TcAttachType) -> Vec<String> {
    use aya::programs::SchedClassifier;
    let interface = interface.to_string();
    lb_testkit::lab::in_netns(netns, move || {
        let (_, programs) = SchedClassifier::query_tcx(&interface, at).expect("query TCX programs");
        programs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()).collect::<Vec<_>>()
    })
    .expect("enter the node's namespace")
}

/// On failures in `o`: node `node`'s datapath counters, the flows it tracks and its agent's log,
/// printed for the failure message to be read with.
pub fn explain(c: &Cluster, node: usize, o: &Outcome) {
    if o.failures.is_empty() {
        return;
    }
    let counters = c.maps(node).read_counters().unwrap_or_default();
    let named: Vec<String> = lb_common::counters::NAMES
        .iter()
        .zip(counters)
        .filter(|(_, n)| *n != 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    let ct: Vec<String> =
        c.maps(node).ct.iter().filter_map(Result::ok).map(|(k, e)| format!("{k:?} {e:?}")).collect();
    eprintln!(
        "failures: {:?}\ncounters: {named:?}\nflows: {ct:#?}\nagent log:\n{}",
        o.failures,
        c.lab.agent_log(&c.nodes[node - 1])
    );
}

/// The `lbctl` built beside the agent.
pub fn lbctl_path() -> std::path::PathBuf {
    std::path::Path::new(AGENT).with_file_name("lbctl")
}

/// `lbctl -o json interfaces` in `node`'s network namespace: interface name → its view.
pub fn lbctl_interfaces(
    node: &lb_testkit::lab::Node,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let lbctl = lbctl_path();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .arg(&lbctl)
        .args(["-o", "json", "interfaces"])
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", lbctl.display()));
    assert!(out.status.success(), "lbctl interfaces: {}", String::from_utf8_lossy(&out.stderr));
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("lbctl interfaces: JSON");
    v.into_iter().map(|i| (i["interface"].as_str().expect("a name").to_string(), i)).collect()
}

/// The running kernel's major and minor version.
pub fn kernel_release() -> (u32, u32) {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut v = r.trim().split(['.', '-']).map(|n| n.parse().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0))
}

/// `p` with its L4 checksum replaced by the pseudo-header sum, as a sender that leaves the
/// checksum to the device (`CHECKSUM_PARTIAL`) hands it over.
pub fn partial(p: &Pkt) -> Vec<u8> {
    let mut b = p.bytes();
    let l4 = 14 + usize::from(b[14] & 0x0f) * 4;
    let len = (b.len() - l4) as u16;
    let mut pseudo = b[26..34].to_vec();
    pseudo.extend_from_slice(&[0, b[14 + 9]]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    let seed = !internet_checksum(&pseudo);
    let at = l4 + if b[14 + 9] == 6 { 16 } else { 6 };
    b[at..at + 2].copy_from_slice(&seed.to_be_bytes());
    b
}

/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (Linux 6.11): the test run hands the program a received
/// packet's sum (`CHECKSUM_COMPLETE`) and, after it, checks that the sum still matches the
/// packet's bytes (`EBADMSG` otherwise), as the receive path would.
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// The test-run part of `union bpf_attr` (`BPF_PROG_TEST_RUN`).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// What a test run with a received packet's sum gives.
pub enum CompleteRun {
    /// The verdict and the bytes out; the sum matched them.
    Ran(u32, Vec<u8>),
    /// The program left a sum that does not match the bytes it left (`EBADMSG`).
    SumWrong,
    /// This kernel cannot make such test runs (before Linux 6.11: `EINVAL`).
    Unsupported,
}

/// Runs the TC program `prog` on `input` as a received packet with its sum (`CHECKSUM_COMPLETE`).
/// aya's test run has no flags for it: the syscall is made here.
pub fn test_run_checksum_complete(prog: &aya::programs::SchedClassifier, input: &[u8]) -> CompleteRun {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = prog.fd().expect("a loaded program");
    let mut out = vec![0u8; input.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: fd.as_fd().as_raw_fd() as u32,
        data_size_in: input.len() as u32,
        data_size_out: out.len() as u32,
        data_in: input.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        flags: BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
        ..TestRunAttr::default()
    };
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    // SAFETY: a test-run attribute of its size; its buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            std::mem::size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        out.truncate(attr.data_size_out as usize);
        return CompleteRun::Ran(attr.retval, out);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EBADMSG) => CompleteRun::SumWrong,
        Some(libc::EINVAL) => CompleteRun::Unsupported,
        e => panic!("BPF_PROG_TEST_RUN with CHECKSUM_COMPLETE: errno {e:?}"),
    }
}

/// A row of a CHECKSUM_COMPLETE table: what it is, the TC program, the packet, the counter its
/// outcome adds one to.
pub type CompleteRow<'a> = (&'a str, &'a aya::programs::SchedClassifier, Vec<u8>, u32);

/// Runs each row as a received packet with its sum ([`test_run_checksum_complete`]) and checks
/// that the packet was rewritten, its sum still matches it and its outcome was counted. Returns
/// how many rows ran, or `None` (said on stderr) on a kernel that cannot make such runs (before
/// Linux 6.11).
pub fn check_complete_rows(maps: &Maps, rows: Vec<CompleteRow<'_>>) -> Option<usize> {
    let mut checked = 0;
    for (desc, prog, input, counter) in rows {
        let before = maps.read_counters().expect("counters")[counter as usize];
        match test_run_checksum_complete(prog, &input) {
            CompleteRun::Ran(_, out) => {
                assert_ne!(out, input, "{desc}: rewritten");
                checked += 1;
            }
            CompleteRun::SumWrong => panic!("{desc}: the packet's sum no longer matches it (EBADMSG)"),
            CompleteRun::Unsupported => {
                let (major, minor) = kernel_release();
                assert!(
                    (major, minor) < (6, 11),
                    "Linux {major}.{minor} refused a CHECKSUM_COMPLETE test run"
                );
                eprintln!(
                    "NOTE: Linux {major}.{minor} cannot make CHECKSUM_COMPLETE test runs (6.11 and later): not checked here"
                );
                return None;
            }
        }
        let after = maps.read_counters().expect("counters")[counter as usize];
        assert_eq!(after, before + 1, "{desc}: counted as {}", lb_common::counters::NAMES[counter as usize]);
    }
    Some(checked)
}

/// Whether this kernel lets XDP programs leave metadata (`bpf_xdp_adjust_meta`; some builds
/// refuse it, and the XDP programs then leave no mark for TC). Asked once per test binary.
#[allow(dead_code)]
pub fn xdp_meta() -> bool {
    static META: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *META.get_or_init(|| {
        let meta = lb_agent::datapath::probe::Kernel::probe().xdp_meta;
        if !meta {
            eprintln!("note: this kernel refuses bpf_xdp_adjust_meta: XDP leaves no mark for TC here");
        }
        meta
    })
}

/// An XDP program's verdict letting a packet pass.
const XDP_PASS: u32 = 2;

/// Takes off the metadata a test run of an XDP program hands back in front of a packet (Linux
/// 5.14 and later: 8 bytes, a mark for TC and the interface) and returns the mark of a packet XDP
/// passed (`XDP_PASS`); room made before a drop comes back too, holding no mark.
#[allow(dead_code)]
pub fn take_xdp_mark(verdict: u32, input_len: usize, out: &mut Vec<u8>) -> Option<u32> {
    if kernel_release() < (5, 14) || out.len() != input_len + 8 {
        return None;
    }
    let magic = u32::from_ne_bytes(out[..4].try_into().expect("4 bytes"));
    out.drain(..8);
    (verdict == XDP_PASS).then_some(magic)
}

/// The mark XDP should leave on a packet given its verdict and the counters it moved: decided, or
/// left to TC (`xdp_to_tc`, `xdp_partial_csum`); none for a packet it did not pass, or on a kernel
/// that refuses XDP metadata.
#[allow(dead_code)]
pub fn want_xdp_mark(verdict: u32, counters: &[(u32, u64)]) -> Option<u32> {
    use lb_common::counters as c;
    if verdict != XDP_PASS || !xdp_meta() {
        return None;
    }
    let left = counters.iter().any(|(i, _)| *i == c::XDP_TO_TC || *i == c::XDP_PARTIAL_CSUM);
    Some(if left { lb_common::XDP_LEFT } else { lb_common::XDP_DECIDED })
}

/// From network namespace `netns`: connects to `to` (TCP), sends a 20 kB line, in segments as
/// large as the client's path MTU allows, and reads the one-line answer (the backend's name).
/// What path MTU discovery through a Service address is tested with.
pub fn send_long_line(netns: &str, to: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::{BufRead as _, Write as _};
    lb_testkit::lab::in_netns(netns, move || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(3))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let mut line = "x".repeat(20_000);
        line.push('\n');
        s.write_all(line.as_bytes())?;
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer)?;
        Ok(answer.trim().to_string())
    })
    .expect("client thread")
}
