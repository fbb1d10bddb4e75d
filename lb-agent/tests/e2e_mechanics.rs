//! Datapath mechanics end to end, with real sockets through namespaces and the real agent: lb
//! coexists with other TC programs on the interfaces it attaches to (it goes before the ones
//! already there, `--tc-position first`, and every packet it does not drop or send back goes on
//! to the ones after it); a Service without endpoints refuses connections at once; hairpinned
//! flows work on a node whose netfilter drops ctstate INVALID; XDP mode never sends a wrong
//! checksum across nodes; UDP datagrams larger than the MTU go through a Service both ways.

mod support;

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::Command,
    time::Duration,
};

use aya::{
    programs::{links::LinkOrder, tc::TcAttachOptions, SchedClassifier, TcAttachType},
    sys::{enable_stats, Stats},
    Ebpf,
};
use lb_agent::datapath::{Mode, PROG_TC_FORWARD, PROG_TC_REPLY};
use lb_common::counters as c;
use lb_testkit::{
    lab::{in_netns, tcp_asks, udp_asks, wait_until, Pod, Session, ECHO},
    NOOP_OBJECT,
};
use support::{endpoint, who, Cluster, VIP};

/// Runs `cmd args` inside network namespace `netns` and panics unless it succeeds.
fn run_in(netns: &str, cmd: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, cmd])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (is it installed? `cargo xtask setup` installs it)"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a TCP connection from `pod` to `to` ends in: the backend's answer, or the error.
fn tcp_outcome(pod: &Pod, to: SocketAddrV4) -> Result<String, ErrorKind> {
    in_netns(&pod.netns, move || Session::connect(to).and_then(|mut s| s.ask()).map_err(|e| e.kind()))
        .expect("enter the pod")
}

/// What a connected UDP socket in `pod` gets for a datagram to `to`: the answer, or the error.
fn udp_outcome(pod: &Pod, to: SocketAddrV4) -> Result<String, ErrorKind> {
    in_netns(&pod.netns, move || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.kind())?;
        s.connect(to).map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.kind())?;
        s.send(b"who").map_err(|e| e.kind())?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).map_err(|e| e.kind())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .expect("enter the pod")
}

/// A no-op TC program (its verdict, `TC_ACT_OK`, is final) attached after every other TCX
/// program at `at` on `interface` in `netns`; it lives as long as the returned object.
fn attach_after(netns: &str, interface: &str, at: TcAttachType) -> Ebpf {
    let interface = interface.to_string();
    in_netns(netns, move || -> anyhow::Result<Ebpf> {
        let mut ebpf = Ebpf::load(NOOP_OBJECT)?;
        let p: &mut SchedClassifier =
            ebpf.program_mut("noop_tc").ok_or_else(|| anyhow::anyhow!("no noop_tc"))?.try_into()?;
        p.load()?;
        p.attach_with_options(&interface, at, TcAttachOptions::TcxOrder(LinkOrder::last()))?;
        Ok(ebpf)
    })
    .expect("enter the node's namespace")
    .expect("attach the program after lb")
}

/// How many times the no-op program in `ebpf` has run (while run-time statistics are on).
fn runs(ebpf: &Ebpf) -> u64 {
    let p = ebpf.program("noop_tc").expect("noop_tc");
    p.info().expect("program info").run_count()
}

#[test]
fn packets_lb_passes_go_on_to_the_tc_programs_after_it() {
    let c = Cluster::new(
        "coexist",
        Mode::Tc,
        true,
        |b| who("", &b[..2].iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>()),
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    // Run counts are kept while this descriptor is open.
    let _stats = enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS");
    // After lb on the client's interface: ingress sees the client's packets to the VIP (which lb
    // rewrites), egress the replies to the client (which lb translates back).
    let node = &c.nodes[0].netns;
    let ingress = attach_after(node, &c.client1.host_if, TcAttachType::Ingress);
    let egress = attach_after(node, &c.client1.host_if, TcAttachType::Egress);
    let (in_before, out_before) = (runs(&ingress), runs(&egress));

    let asks = 5;
    let answers = tcp_asks(&c.client1, SocketAddrV4::new(VIP, 80), asks).expect("connections");
    let names: Vec<String> = c.backends[..2].iter().map(|b| b.name.clone()).collect();
    for a in &answers {
        let a = a.as_ref().expect("answered through the Service");
        assert!(names.contains(a), "answered by {a}, not a backend of the Service");
    }
    // Each connection: at least SYN, ACK and a request from the client, SYN-ACK and an answer
    // back. A program after lb that never runs (lb's verdict was final) shows 0.
    let (seen_in, seen_out) = (runs(&ingress) - in_before, runs(&egress) - out_before);
    let want = 3 * asks as u64;
    assert!(seen_in >= want, "the program after lb saw {seen_in} client packets, want at least {want}");
    assert!(
        seen_out >= 2 * asks as u64,
        "the program after lb saw {seen_out} replies, want at least {}",
        2 * asks
    );
}

#[test]
fn lb_goes_before_the_tc_programs_already_on_an_interface() {
    let mut c = Cluster::new(
        "tcfirst",
        Mode::Tc,
        true,
        |b| who("", &b[..2].iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>()),
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    // lb leaves node 1 (its links go with their pins), then another program whose verdict is
    // final takes both hooks of the client's interface, then lb comes back.
    let n1 = c.nodes[0].clone();
    c.lab.stop_agent(&n1, libc::SIGTERM);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args(["--cleanup", "--pin-dir"])
        .arg(&n1.pin_dir)
        .output()
        .expect("cleanup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let iface = c.client1.host_if.clone();
    let gone = wait_until(Duration::from_secs(15), || {
        let names = support::tcx_programs(&n1.netns, &iface, TcAttachType::Ingress);
        if names.is_empty() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{names:?}")))
        }
    });
    assert!(gone.is_ok(), "lb's programs were not detached: {gone:?}");
    let ingress = attach_after(&n1.netns, &iface, TcAttachType::Ingress);
    let egress = attach_after(&n1.netns, &iface, TcAttachType::Egress);
    c.lab.restart_agent(&n1).expect("agent again");
    // Had lb gone after them, their final verdict would keep it from ever seeing a packet.
    c.wait_reachable(&c.client1, 80);
    assert_eq!(support::tcx_programs(&n1.netns, &iface, TcAttachType::Ingress), [PROG_TC_FORWARD, "noop_tc"]);
    assert_eq!(support::tcx_programs(&n1.netns, &iface, TcAttachType::Egress), [PROG_TC_REPLY, "noop_tc"]);
    drop((ingress, egress));
}

/// Rule: a Service without endpoints rejects new connections (ICMP port unreachable), so a TCP
/// client gets ECONNREFUSED and a connected UDP socket an error, from either node; counted. Once
/// an endpoint appears, the same Service answers.
#[test]
fn a_service_without_endpoints_refuses_connections() {
    refuses_connections(Mode::Tc);
}

/// The same in XDP mode: XDP leaves the packet to the TC program behind it, which rejects it.
#[test]
fn a_service_without_endpoints_refuses_connections_in_xdp_mode() {
    refuses_connections(Mode::Xdp);
}

fn refuses_connections(mode: Mode) {
    let tag = if mode == Mode::Tc { "reject" } else { "rejectx" };
    // XDP mode with full checksums, so that XDP itself meets the Service and leaves it to TC.
    let c = Cluster::new(tag, mode, mode == Mode::Tc, |_| who("", &[]), &[]);
    let (tcp, udp) = (SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53));
    for (node, client) in [(1, &c.client1), (2, &c.client2)] {
        // The agent may still be starting: wait for the answer the rule wants, then ask again.
        let first = wait_until(Duration::from_secs(15), || match tcp_outcome(client, tcp) {
            Err(ErrorKind::ConnectionRefused) => Ok(()),
            other => Err(std::io::Error::other(format!("{other:?}"))),
        });
        assert!(first.is_ok(), "{}: TCP to a Service without endpoints: {first:?}", client.name);
        // TC may meet the first ones before XDP is attached: count from when every program is.
        c.wait_ready(&c.nodes[node - 1]);
        let before = c.maps(node).read_counters().expect("counters");
        for _ in 0..5 {
            assert_eq!(tcp_outcome(client, tcp), Err(ErrorKind::ConnectionRefused), "{}: TCP", client.name);
            assert_eq!(udp_outcome(client, udp), Err(ErrorKind::ConnectionRefused), "{}: UDP", client.name);
        }
        let after = c.maps(node).read_counters().expect("counters");
        let counted = |i: u32| after[i as usize] - before[i as usize];
        assert!(
            counted(c::REJECT_NO_BACKEND) >= 10,
            "node {node}: rejects counted: {}",
            counted(c::REJECT_NO_BACKEND)
        );
        if mode == Mode::Xdp {
            assert!(
                counted(c::XDP_TO_TC) >= 10,
                "node {node}: XDP left them to TC: {}",
                counted(c::XDP_TO_TC)
            );
        }
    }
    c.write(&who("", &[endpoint(&c.backends[0], "ready: true")]));
    c.wait_reachable(&c.client1, 80);
    assert_eq!(udp_outcome(&c.client1, udp), Ok("b1".to_string()));
}

/// Rule: hairpin works on a node whose netfilter drops ctstate INVALID in FORWARD, as kube-proxy,
/// Calico and Docker set up. A pod that is its own backend reaches itself through its Service
/// over TCP (many connections and a long one) and UDP; its packets go straight back to it, so
/// netfilter never sees half a translation.
#[test]
fn hairpin_works_where_netfilter_drops_invalid() {
    hairpin_past_invalid(Mode::Tc);
}

/// The same in XDP mode, with full checksums (so that XDP itself sees the hairpinned flow and
/// leaves it to TC).
#[test]
fn hairpin_works_where_netfilter_drops_invalid_in_xdp_mode() {
    hairpin_past_invalid(Mode::Xdp);
}

fn hairpin_past_invalid(mode: Mode) {
    let tag = if mode == Mode::Tc { "hairinv" } else { "hairinvx" };
    let c = Cluster::new(tag, mode, mode == Mode::Tc, |b| who("", &[endpoint(&b[0], "ready: true")]), &[]);
    c.wait_reachable(&c.client1, 80);
    // Every pod interface attached (the client's may be before the backend's).
    c.wait_ready(&c.nodes[0]);
    let node = &c.nodes[0].netns;
    run_in(node, "iptables", &["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]);
    assert!(run_in(node, "iptables", &["-S", "FORWARD"]).contains("INVALID -j DROP"), "the rule is in place");
    // Other pods still reach the Service through the node's stack with the rule in place.
    c.wait_reachable(&c.client1, 80);
    let b1 = &c.backends[0];
    let tcp = tcp_asks(b1, SocketAddrV4::new(VIP, 80), 30).expect("hairpin tcp");
    assert!(tcp.iter().all(|a| a.as_deref().ok() == Some("b1")), "hairpin TCP: {tcp:?}");
    let udp = udp_asks(b1, SocketAddrV4::new(VIP, 53), 10_000, 30).expect("hairpin udp");
    assert!(udp.iter().all(|a| a.as_deref().ok() == Some("b1")), "hairpin UDP: {udp:?}");
    let mut s = Session::open(b1, SocketAddrV4::new(VIP, 80)).expect("long-lived hairpin connection");
    for _ in 0..10 {
        assert_eq!(s.ask().expect("answer"), "b1");
    }
    let v = c.maps(1).read_counters().expect("counters");
    assert!(v[c::HAIRPIN as usize] >= 61);
    if mode == Mode::Xdp {
        assert!(v[c::XDP_TO_TC as usize] >= 61, "XDP left the hairpinned flows to TC");
    }
}

/// Rule: XDP mode never sends a wrong checksum. Pods hand their packets over with partial
/// checksums (veth transmit offload, the default); the underlay devices have transmit checksum
/// offload off, so the kernel completes every checksum in software as it sends (as a NIC does in
/// hardware), and the receiving pod checks it. A partial checksum rewritten as if it were full
/// would be completed wrong and the packet dropped by the backend.
#[test]
fn xdp_mode_sends_right_checksums_across_nodes() {
    let c = Cluster::new(
        "xdpcsum",
        Mode::Xdp,
        true,
        |b| who("", &b.iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>()),
        &[],
    );
    for n in &c.nodes {
        run_in(&n.netns, "ethtool", &["-K", "ul0", "tx", "off"]);
    }
    c.wait_reachable(&c.client1, 80);
    c.wait_reachable(&c.client2, 80);
    for client in [&c.client1, &c.client2] {
        let tcp = tcp_asks(client, SocketAddrV4::new(VIP, 80), 150).expect("tcp");
        let names: BTreeSet<String> =
            tcp.into_iter().map(|a| a.unwrap_or_else(|e| panic!("{}: TCP: {e}", client.name))).collect();
        assert_eq!(names.len(), 3, "{}: every backend answers, on both nodes: {names:?}", client.name);
        let udp = udp_asks(client, SocketAddrV4::new(VIP, 53), 10_000, 150).expect("udp");
        let names: BTreeSet<String> =
            udp.into_iter().map(|a| a.unwrap_or_else(|e| panic!("{}: UDP: {e}", client.name))).collect();
        assert_eq!(names.len(), 3, "{}: every backend answers UDP: {names:?}", client.name);
    }
    for node in [1, 2] {
        let v = c.maps(node).read_counters().expect("counters");
        assert!(v[c::XDP_PARTIAL_CSUM as usize] > 0, "node {node}: XDP left partial checksums to TC");
    }
}

/// Rule: UDP datagrams larger than the MTU work through a Service, both ways. A 3,000-byte
/// question leaves the client in fragments (the pods' MTU is 1,500), and the 3,000-byte answer
/// comes back in fragments: every fragment must be translated, or the datagram cannot be put
/// back together. From both nodes, so fragments also cross the underlay.
#[test]
fn udp_datagrams_larger_than_the_mtu_go_through_a_service() {
    let c = Cluster::new(
        "frags",
        Mode::Tc,
        true,
        |b| who("", &b.iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>()),
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    c.wait_reachable(&c.client2, 80);
    let to = SocketAddrV4::new(VIP, 53);
    let mut question = ECHO.to_vec();
    question.extend((0..3_000u32).map(|i| (i % 251) as u8));
    for client in [&c.client1, &c.client2] {
        let q = question.clone();
        let answers = in_netns(&client.netns, move || -> Vec<std::io::Result<Vec<u8>>> {
            (0..20)
                .map(|_| {
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.send_to(&q, to)?;
                    let mut buf = vec![0u8; 8_192];
                    let (n, from) = s.recv_from(&mut buf)?;
                    if from != to.into() {
                        return Err(std::io::Error::other(format!("answer from {from}")));
                    }
                    Ok(buf[..n].to_vec())
                })
                .collect()
        })
        .expect("enter the client");
        let mut names = BTreeSet::new();
        for (i, a) in answers.into_iter().enumerate() {
            let a = a.unwrap_or_else(|e| panic!("{}: datagram #{i}: {e}", client.name));
            let colon = a.iter().position(|b| *b == b':').expect("name:echo");
            assert_eq!(&a[colon + 1..], &question[ECHO.len()..], "{}: the echo came back whole", client.name);
            names.insert(String::from_utf8_lossy(&a[..colon]).into_owned());
        }
        assert!(names.len() >= 2, "{}: answered by several backends: {names:?}", client.name);
        let v = c.maps(usize::from(client.node)).read_counters().expect("counters");
        assert!(v[c::LATER_FRAGMENT as usize] >= 40, "{}: later fragments translated", client.name);
    }
}

/// A socket of `kind` (`libc::SOCK_STREAM` or `SOCK_DGRAM`) bound to `port` with SO_REUSEADDR (so
/// that two sockets can share it, each towards another destination), connected to `to`.
fn shared_port_socket(kind: i32, port: u16, to: SocketAddrV4) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let check = |r: i32| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) };
    // SAFETY: plain socket calls on a descriptor this function owns, with valid pointers and
    // lengths.
    unsafe {
        let fd = check(libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0))?;
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let one_ptr = (&one as *const libc::c_int).cast();
        check(libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, one_ptr, 4))?;
        let local = sockaddr(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
        check(libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len))?;
        let remote = sockaddr(to);
        check(libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len))?;
        Ok(owned)
    }
}

/// Rule: tuple clashes are resolved, never overwritten. One client port to two Services whose
/// only endpoint is the same pod: without another source port for the second flow, both would
/// reach the backend as the same connection, and the second would take the first one's replies.
/// Both must work, TCP and UDP, asked in turns.
#[test]
fn one_client_port_to_two_services_with_the_same_backend() {
    const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
    let yaml = |b: &[Pod; 3]| {
        let one = [endpoint(&b[0], "ready: true")];
        let second = who("", &one)
            .replace("name: who,", "name: who2,")
            .replace(&format!("clusterIP: {VIP}"), &format!("clusterIP: {VIP2}"));
        let second = second
            .replace("name: who-1", "name: who2-1")
            .replace("service-name: who}", "service-name: who2}");
        format!("{}\n---\n{second}", who("", &one))
    };
    let c = Cluster::new("clash", Mode::Tc, true, yaml, &[]);
    c.wait_reachable(&c.client1, 80);
    let (a, b) = (SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP2, 80));
    let ready =
        wait_until(Duration::from_secs(15), || tcp_asks(&c.client1, b, 1)?.pop().expect("one answer"));
    assert!(ready.is_ok(), "the second Service: {ready:?}");
    let answers = in_netns(&c.client1.netns, move || -> std::io::Result<Vec<String>> {
        use std::io::{BufRead as _, BufReader, Write as _};
        let mut got = Vec::new();
        // TCP: two connections from port 31,000 (below the local port range: never taken by another), asked in turns.
        let streams: Vec<std::net::TcpStream> = [a, b]
            .into_iter()
            .map(|to| shared_port_socket(libc::SOCK_STREAM, 31_000, to).map(std::net::TcpStream::from))
            .collect::<Result<_, _>>()?;
        let mut readers: Vec<_> = streams
            .iter()
            .map(|s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                Ok(BufReader::new(s.try_clone()?))
            })
            .collect::<std::io::Result<_>>()?;
        for _ in 0..5 {
            for (s, r) in streams.iter().zip(&mut readers) {
                (&*s).write_all(b"who\n")?;
                let mut line = String::new();
                r.read_line(&mut line)?;
                got.push(format!("tcp {}", line.trim()));
            }
        }
        // UDP: two connected sockets on port 31,001, asked in turns.
        let udp_a = SocketAddrV4::new(VIP, 53);
        let udp_b = SocketAddrV4::new(VIP2, 53);
        let socks: Vec<UdpSocket> = [udp_a, udp_b]
            .into_iter()
            .map(|to| shared_port_socket(libc::SOCK_DGRAM, 31_001, to).map(UdpSocket::from))
            .collect::<Result<_, _>>()?;
        for _ in 0..5 {
            for s in &socks {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.send(b"who")?;
                let mut buf = [0u8; 64];
                let n = s.recv(&mut buf)?;
                got.push(format!("udp {}", String::from_utf8_lossy(&buf[..n])));
            }
        }
        Ok(got)
    })
    .expect("enter the client")
    .expect("both flows of each protocol work");
    let want: Vec<String> = ["tcp b1"; 10].into_iter().chain(["udp b1"; 10]).map(String::from).collect();
    assert_eq!(answers, want);
    let v = c.maps(1).read_counters().expect("counters");
    assert!(
        v[c::SNAT_PORT as usize] >= 2,
        "the second flows were given other ports: {}",
        v[c::SNAT_PORT as usize]
    );
}
