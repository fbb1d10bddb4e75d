//! Socket-level load balancing end to end (`--socket-lb`): processes on a node (the node's
//! network namespace stands for the host's) reach Services through the cgroup programs, which the
//! agents attach to a child cgroup of the test's own cgroup v2 hierarchy, where the clients run.

mod support;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_agent::datapath::Mode;
use lb_common::counters as c;
use lb_testkit::{
    lab::{node_manifest, wait_until, Pod},
    sockets::{Cgroup2, SockClient},
};
use support::{Cluster, VIP};

/// A Service without endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// A Service with ClientIP session affinity over the same endpoints.
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

/// Service `who` (TCP 80 → 8080, UDP 53 → 5353, NodePorts 30080 and 30053) over `endpoints`,
/// `sticky` (the same with ClientIP affinity), `empty` (no endpoints), and both Node objects.
fn objects(nodes: &[lb_testkit::lab::Node; 2], endpoints: &[&Pod]) -> String {
    let eps: Vec<String> =
        endpoints.iter().map(|p| format!("- addresses: [{}]\n  nodeName: node{}", p.ip, p.node)).collect();
    let eps = format!("\n{}", eps.join("\n"));
    let service = |name: &str, vip: Ipv4Addr, extra: &str, eps: &str| {
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  clusterIP: {vip}
{extra}  ports:
  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: udp, port: 53, targetPort: 5353, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: demo
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: tcp, port: 8080, protocol: TCP}}
- {{name: udp, port: 5353, protocol: UDP}}
endpoints:{eps}
---
"#
        )
    };
    let who = service("who", VIP, "  type: NodePort\n", &eps).replace(
        "protocol: TCP}\n  - {name: udp, port: 53, targetPort: 5353, protocol: UDP}",
        "protocol: TCP, nodePort: 30080}\n  - {name: udp, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}",
    );
    let sticky = service("sticky", STICKY_VIP, "  sessionAffinity: ClientIP\n", &eps);
    let empty = service("empty", EMPTY_VIP, "", " []");
    format!("{who}{sticky}{empty}{}---\n{}", node_manifest(&nodes[0]), node_manifest(&nodes[1]))
}

/// A two-node cluster whose agents load-balance the sockets of their node's namespace (`mode`:
/// host or all), each attached to a child cgroup of its own; every backend an endpoint.
fn cluster(tag: &str, mode: &str) -> (Cluster, [Cgroup2; 2]) {
    let cgroups = [
        Cgroup2::new(&format!("{tag}1")).expect("a cgroup v2 hierarchy for node 1"),
        Cgroup2::new(&format!("{tag}2")).expect("a cgroup v2 hierarchy for node 2"),
    ];
    let roots = cgroups.each_ref().map(|g| g.path().display().to_string());
    let mut c = Cluster::new(tag, Mode::Tc, true, |_| String::new(), &[]);
    // Each node's agent with its own cgroup: started again with the flags (the cluster's first
    // start had none, and wrote no objects yet).
    for (i, root) in roots.iter().enumerate() {
        let node = c.nodes[i].clone();
        c.lab.stop_agent(&node, libc::SIGTERM);
        let args = ["--node-interfaces", "ul0", "--socket-lb", mode, "--cgroup-root", root.as_str()];
        c.lab.restart_agent_adding(&node, &args).expect("agent with socket-level load balancing");
    }
    let backends: Vec<&Pod> = c.backends.iter().collect();
    c.write(&objects(&c.nodes, &backends));
    for node in &c.nodes {
        c.wait_ready(node);
    }
    (c, cgroups)
}

/// The counters of node `node`'s datapath.
fn counters(c: &Cluster, node: usize) -> Vec<u64> {
    c.maps(node).read_counters().expect("counters")
}

/// Waits until `client` reaches `to` over TCP (the agent has synced and attached).
fn wait_answer(c: &Cluster, client: &mut SockClient, to: SocketAddrV4) {
    let ok = wait_until(Duration::from_secs(90), || client.tcp(to));
    assert!(
        ok.is_ok(),
        "{to} never answered: {ok:?}\nagent logs:\n{}\n{}",
        c.lab.agent_log(&c.nodes[0]),
        c.lab.agent_log(&c.nodes[1])
    );
}

/// The counters of node 1 and what moved since `before`, for failure messages.
fn show_counters(c: &Cluster) -> String {
    (1..=2)
        .map(|n| {
            let moved: Vec<String> = c::NAMES
                .iter()
                .zip(counters(c, n))
                .filter(|(_, v)| *v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("node{n}: {}", moved.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// From `client` (in node 1's cgroup, translated by its programs): TCP and unconnected UDP to
/// the ClusterIP reach every endpoint and read the Service address back (getpeername; the
/// source of the replies), a connected UDP socket too and keeps its backend, the packet path
/// has nothing to do, and a Service without endpoints is refused at once (ECONNREFUSED, or EPERM
/// where the kernel lacks `bpf_set_retval`).
fn reaches_services_at_the_socket(c: &Cluster, client: &mut SockClient) {
    let (tcp, udp) = (SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53));
    wait_answer(c, client, tcp);
    let all: BTreeSet<String> = c.backends.iter().map(|b| b.name.clone()).collect();
    let before = counters(c, 1);
    let map = |name: &str| {
        let pin = lb_agent::datapath::layout_dir(&c.nodes[0].pin_dir).join(name);
        let data = aya::maps::MapData::from_pin(pin).unwrap_or_else(|e| panic!("{name} pinned: {e}"));
        aya::maps::Map::from_map_data(data).expect("a map")
    };
    let remembered = || {
        let map: aya::maps::HashMap<_, lb_common::Lb4SockRevKey, lb_common::Lb4SockRev> =
            map(lb_common::MAP_LB4_SOCK_REV).try_into().expect("a hash map");
        map.keys().count()
    };
    // The sockets' choices kept for protocol `proto` (`LB4_SOCK_FWD`).
    let choices = |proto: u8| {
        let map: aya::maps::HashMap<_, lb_common::Lb4SockFwdKey, lb_common::Lb4SockFwd> =
            map(lb_common::MAP_LB4_SOCK_FWD).try_into().expect("a hash map");
        map.keys().filter(|k| k.as_ref().is_ok_and(|k| k.proto == proto)).count()
    };
    let remembered_before = remembered();

    // An open TCP connection has its reverse entry (for `getpeername`) and no kept choice: its
    // connect hook runs once, so there is nothing to keep (one map write a connection).
    let tcp_choices = choices(lb_common::IPPROTO_TCP);
    let open = client.call(&format!("tcp-open t1 {VIP} 80")).expect("tcp-open");
    assert_eq!(open["peer"], tcp.to_string(), "{open}");
    assert_eq!(remembered(), remembered_before + 1, "an open TCP socket's LB4_SOCK_REV entry");
    assert_eq!(choices(lb_common::IPPROTO_TCP), tcp_choices, "no LB4_SOCK_FWD entry for TCP");
    client.call("close t1").expect("close");

    // TCP: spread over every endpoint, each connection's peer the Service address.
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let a = client.tcp(tcp).expect("TCP to the ClusterIP");
        assert_eq!(a.peer, tcp.to_string(), "getpeername gives the Service address");
        assert_ne!(a.seen.split(':').next(), Some(VIP.to_string().as_str()));
        seen.insert(a.name);
    }
    assert_eq!(seen, all, "TCP reaches every endpoint");
    // Each closed connection took its reverse entry along.
    assert_eq!(remembered(), remembered_before, "closed TCP sockets leave nothing in LB4_SOCK_REV");

    // Unconnected UDP: each reply reads as coming from the Service address.
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let a = client.udp(udp).expect("UDP sendto/recvfrom to the ClusterIP");
        assert_eq!(a.peer, udp.to_string(), "the reply's source is the Service address");
        seen.insert(a.name);
    }
    assert_eq!(seen, all, "unconnected UDP reaches every endpoint");

    // Connected UDP: its peer is the Service address, and it keeps its backend.
    let udp_choices = choices(lb_common::IPPROTO_UDP);
    let open = client.call(&format!("udp-open u1 {VIP} 53")).expect("udp-open");
    assert_eq!(open["peer"], udp.to_string(), "{open}");
    assert_eq!(choices(lb_common::IPPROTO_UDP), udp_choices + 1, "a connected UDP socket's kept choice");
    let first = client.call("udp-ask u1").expect("udp-ask");
    assert!(first.get("error").is_none(), "{first}");
    for _ in 0..5 {
        assert_eq!(client.call("udp-ask u1").expect("udp-ask")["name"], first["name"]);
    }
    client.call("close u1").expect("close");

    let after = counters(c, 1);
    let moved = |i: u32| after[i as usize] - before[i as usize];
    assert!(moved(c::SOCK_CONNECT) >= 42, "connects translated: {}", show_counters(c));
    assert!(moved(c::SOCK_SENDMSG) >= 40, "sendmsg translated: {}", show_counters(c));
    assert!(moved(c::SOCK_RECVMSG) >= 40, "replies read from the Service: {}", show_counters(c));
    assert!(moved(c::SOCK_GETPEERNAME) >= 41, "getpeername: {}", show_counters(c));
    // Each closed connected socket (41 TCP, one UDP) took its entries along; the unconnected
    // ones name no peer when they close, and leave theirs to the LRU.
    assert_eq!(moved(c::SOCK_RELEASED), 42, "closed sockets' entries removed: {}", show_counters(c));
    // Translated at the socket: nothing for the packet path to do.
    assert_eq!(moved(c::FWD_NEW_FLOW), 0, "no packet-level new flow: {}", show_counters(c));

    // A Service without endpoints: refused at once. The kernels tested are Debian's, which did
    // not backport `bpf_set_retval` (5.18): the release says which error, independently of the
    // agent's probe, which must agree.
    let set_retval = support::kernel_release() >= (5, 18);
    assert_eq!(lb_agent::datapath::probe::Kernel::probe().sock_set_retval, set_retval);
    let want = if set_retval { "ECONNREFUSED" } else { "EPERM" };
    let refused = client.tcp(SocketAddrV4::new(EMPTY_VIP, 80)).expect_err("no endpoints");
    assert_eq!(refused.to_string(), want, "connect to a Service without endpoints");
    let refused = client.udp(SocketAddrV4::new(EMPTY_VIP, 53)).expect_err("no endpoints");
    assert_eq!(refused.to_string(), want, "sendto to a Service without endpoints");
    assert!(counters(c, 1)[c::SOCK_REFUSED as usize] >= 2, "{}", show_counters(c));
}

#[test]
fn host_processes_reach_services_through_their_sockets() {
    let (c, cgroups) = cluster("sk", "host");
    let mut host = SockClient::start(&c.nodes[0].netns, cgroups[0].path()).expect("a client on node 1");
    reaches_services_at_the_socket(&c, &mut host);

    // Session affinity: every connection from this node's processes to the same backend.
    let sticky = SocketAddrV4::new(STICKY_VIP, 80);
    let names: BTreeSet<String> =
        (0..10).map(|_| host.tcp(sticky).expect("TCP to the sticky Service").name).collect();
    assert_eq!(names.len(), 1, "ClientIP affinity from the host: {names:?}");

    // A NodePort on this node's address is translated here, at the socket.
    let own = SocketAddrV4::new(c.nodes[0].underlay_ip(), 30080);
    let before = counters(&c, 1)[c::SOCK_CONNECT as usize];
    let a = host.tcp(own).unwrap_or_else(|e| panic!("this node's NodePort: {e}\n{}", show_counters(&c)));
    assert_eq!(a.peer, own.to_string());
    assert!(counters(&c, 1)[c::SOCK_CONNECT as usize] > before, "translated at the socket");
    // Another node's NodePort is that node's to translate: its packets leave untouched.
    let other = SocketAddrV4::new(c.nodes[1].underlay_ip(), 30080);
    let before = (counters(&c, 1)[c::SOCK_CONNECT as usize], counters(&c, 2)[c::FWD_NEW_FLOW as usize]);
    let a =
        host.tcp(other).unwrap_or_else(|e| panic!("the other node's NodePort: {e}\n{}", show_counters(&c)));
    assert_eq!(a.peer, other.to_string());
    assert_eq!(counters(&c, 1)[c::SOCK_CONNECT as usize], before.0, "not translated on node 1");
    assert!(counters(&c, 2)[c::FWD_NEW_FLOW as usize] > before.1, "translated by node 2");

    monitor_shows_socket_translations(&c, &mut host);
}

/// `lbctl monitor` shows each socket translated (at `connect`, at an unconnected socket's first
/// `sendmsg`) and refused, with the process (its id and command name), which every kernel tested
/// (Debian's 5.10, 6.1, 6.12) gives cgroup programs.
fn monitor_shows_socket_translations(c: &Cluster, host: &mut SockClient) {
    let mut monitor = std::process::Command::new(support::lbctl_path())
        .arg("--pin-dir")
        .arg(&c.nodes[0].pin_dir)
        .args(["-o", "json", "monitor", "--timeout", "5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lbctl monitor");
    let mut stderr = std::io::BufReader::new(monitor.stderr.take().expect("stderr"));
    let mut said = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut said).expect("monitor's stderr");
    assert!(said.starts_with("listening"), "lbctl monitor: {said}");
    host.tcp(SocketAddrV4::new(VIP, 80)).expect("TCP to the ClusterIP");
    host.udp(SocketAddrV4::new(VIP, 53)).expect("UDP to the ClusterIP");
    host.tcp(SocketAddrV4::new(EMPTY_VIP, 80)).expect_err("no endpoints");
    let out = monitor.wait_with_output().expect("monitor output");
    drop(stderr);
    // The socket events (packet events of other traffic may come between).
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
        .filter(|e| e["kind"].as_str().is_some_and(|k| k.starts_with("socket-")))
        .collect();
    assert!(lb_agent::datapath::probe::Kernel::probe().sock_process, "the probe finds the process helpers");
    let want = [
        ("socket-connect", "10.96.0.10:80", "demo/who:tcp", true),
        ("socket-sendmsg", "10.96.0.10:53", "demo/who:udp", true),
        ("socket-refused", "10.96.0.20:80", "demo/empty:tcp", false),
    ];
    assert_eq!(events.len(), want.len(), "{events:?}");
    for (e, (kind, vip, service, backend)) in events.iter().zip(want) {
        assert_eq!(
            (e["kind"].as_str(), e["vip"].as_str(), e["service"].as_str()),
            (Some(kind), Some(vip), Some(service)),
            "{e}"
        );
        let b = e["backend"].as_str().unwrap_or("");
        assert_eq!(c.backends.iter().any(|p| b.starts_with(&format!("{}:", p.ip))), backend, "{e}");
        assert_eq!(
            (e["pid"].as_u64(), e["command"].as_str()),
            (Some(u64::from(host.pid())), Some("python3")),
            "{e}"
        );
    }
}

#[test]
fn host_mode_leaves_pods_to_the_packet_path_and_all_mode_translates_them() {
    let (mut c, cgroups) = cluster("sm", "host");
    let tcp = SocketAddrV4::new(VIP, 80);
    let mut pod = SockClient::start(&c.client1.netns, cgroups[0].path()).expect("a client in pod c1");
    wait_answer(&c, &mut pod, tcp);
    let before = counters(&c, 1);
    for _ in 0..10 {
        let a = pod.tcp(tcp).expect("TCP from the pod");
        assert_eq!(a.peer, tcp.to_string());
    }
    let after = counters(&c, 1);
    let moved = |a: &[u64], b: &[u64], i: u32| a[i as usize] - b[i as usize];
    assert_eq!(moved(&after, &before, c::SOCK_CONNECT), 0, "host mode: the pod's sockets are left alone");
    assert!(moved(&after, &before, c::FWD_NEW_FLOW) >= 10, "the packet path translated them");

    // `all`: the pod's connections are translated at connect, and read the Service back.
    let node = c.nodes[0].clone();
    c.lab.stop_agent(&node, libc::SIGTERM);
    c.lab.restart_agent_adding(&node, &["--socket-lb", "all"]).expect("agent with --socket-lb all");
    let ok = wait_until(Duration::from_secs(90), || {
        let before = counters(&c, 1)[c::SOCK_CONNECT as usize];
        pod.tcp(tcp)?;
        if counters(&c, 1)[c::SOCK_CONNECT as usize] > before {
            Ok(())
        } else {
            Err(std::io::Error::other("not translated at the socket yet"))
        }
    });
    assert!(ok.is_ok(), "{ok:?}\n{}", c.lab.agent_log(&node));
    let before = counters(&c, 1);
    for _ in 0..10 {
        let a = pod.tcp(tcp).expect("TCP from the pod");
        assert_eq!(a.peer, tcp.to_string(), "getpeername gives the Service address");
    }
    let after = counters(&c, 1);
    assert!(moved(&after, &before, c::SOCK_CONNECT) >= 10, "all mode: translated at connect");
    assert_eq!(moved(&after, &before, c::FWD_NEW_FLOW), 0, "no per-packet translation");
}

/// The socket programs' link pins in the layout under `pin_dir` (`links/`).
fn socket_pins(pin_dir: &std::path::Path) -> Vec<String> {
    let links = lb_agent::datapath::layout_dir(pin_dir).join("links");
    let mut pins: Vec<String> = std::fs::read_dir(links)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("@lb4_sock_") || n.contains("@lb6_sock_"))
        .collect();
    pins.sort();
    pins
}

#[test]
fn host_sockets_keep_working_across_a_restart_and_cleanup_detaches_them() {
    let (mut c, cgroups) = cluster("sr", "host");
    let tcp = SocketAddrV4::new(VIP, 80);
    let mut host = SockClient::start(&c.nodes[0].netns, cgroups[0].path()).expect("a client on node 1");
    wait_answer(&c, &mut host, tcp);
    let first = socket_pins(&c.nodes[0].pin_dir);
    assert_eq!(
        first.len(),
        lb_agent::datapath::sockets::SOCK_PROGRAMS.len(),
        "one pinned link per socket program: {first:?}"
    );

    // Connections all along, while the agent stops and starts again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let traffic = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            match host.tcp(tcp) {
                Ok(a) if a.peer == tcp.to_string() => ok += 1,
                Ok(a) => failed.push(format!("peer {}", a.peer)),
                Err(e) => failed.push(e.to_string()),
            }
        }
        (ok, failed, host)
    });
    std::thread::sleep(Duration::from_millis(500));
    let node = c.nodes[0].clone();
    c.lab.stop_agent(&node, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    c.lab.restart_agent(&node).expect("agent again");
    c.wait_ready(&node);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, mut host) = traffic.join().expect("traffic");
    assert!(
        failed.is_empty(),
        "{} of {} connections failed across the restart: {:?}",
        failed.len(),
        ok,
        failed.first()
    );
    assert!(ok > 20, "traffic ran: {ok} connections");
    let second = socket_pins(&node.pin_dir);
    assert_eq!(
        second.len(),
        lb_agent::datapath::sockets::SOCK_PROGRAMS.len(),
        "the restarted agent's links replaced the earlier ones: {second:?}"
    );
    assert!(second.iter().all(|p| !first.contains(p)), "{first:?} → {second:?}");

    // --cleanup unpins them: the host's sockets are left alone again.
    c.lab.stop_agent(&node, libc::SIGTERM);
    support::cleanup(&node);
    assert!(socket_pins(&node.pin_dir).is_empty());
    assert!(lb_agent::datapath::Maps::from_pins(&node.pin_dir).is_err(), "the maps went with the cleanup");
    assert!(host.tcp(tcp).is_err(), "without lb nothing answers for the Service address from the host");
}

/// `--socket-lb all` translates every socket in the cgroup, whatever its network namespace: what
/// the kernel matrix runs on every kernel (below 5.14 `host` means the initial namespace, which a
/// lab's node namespace is not).
#[test]
fn all_mode_translates_sockets_on_this_kernel() {
    let (c, cgroups) = cluster("sa", "all");
    let mut host = SockClient::start(&c.nodes[0].netns, cgroups[0].path()).expect("a client on node 1");
    reaches_services_at_the_socket(&c, &mut host);
    monitor_shows_socket_translations(&c, &mut host);
}

/// `--mount-cgroup` (the DaemonSet's init container): mounts a cgroup v2 hierarchy where there is
/// none, and leaves one that is there alone. Here the "host's" namespaces are the test's own.
#[test]
fn mount_cgroup_mounts_a_cgroup2_hierarchy_once() {
    let dir = std::env::temp_dir().join(format!("lb-mount-cgroup-{}", std::process::id()));
    let mounts = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(dir.to_str().expect("utf-8")))
            .count()
    };
    let run = || {
        let out = std::process::Command::new(support::AGENT)
            .args(["--mount-cgroup", "--cgroup-root"])
            .arg(&dir)
            .arg("--host-namespaces")
            .arg(format!("/proc/{}/ns", std::process::id()))
            .output()
            .expect("lb-agent --mount-cgroup");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            while std::process::Command::new("umount").arg(&self.0).output().is_ok_and(|o| o.status.success())
            {
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unmount = Unmount(dir.clone());
    let (ok, log) = run();
    assert!(ok, "{log}");
    assert!(log.contains("mounted a cgroup v2 hierarchy"), "{log}");
    assert_eq!(mounts(), 1, "{log}");
    lb_agent::datapath::sockets::check_cgroup2(&dir).expect("a cgroup v2 hierarchy");
    let (ok, log) = run();
    assert!(ok, "{log}");
    assert!(log.contains("mounted there already"), "{log}");
    assert_eq!(mounts(), 1, "mounted once: {log}");
}

/// The backend a kept unconnected socket `id` reaches (its replies must come from `to`).
fn kept(host: &mut SockClient, id: &str, to: SocketAddrV4) -> String {
    let a = host.call(&format!("udp-keep {id} {} {}", to.ip(), to.port())).expect("udp-keep");
    assert_eq!(a["src"], to.to_string(), "replies from the Service address: {a}");
    a["name"].as_str().unwrap_or_else(|| panic!("{a}")).to_string()
}

/// Sockets keep their backend while it stays, as flows do on the packet path: unconnected UDP
/// sockets across a change of the Service's Maglev table (an endpoint added). A backend that
/// leaves: the connected UDP sockets sent to it are aborted (ECONNABORTED) and reconnect to a
/// live one, those sent to others are left alone, and unconnected sockets go on to a live one.
#[test]
fn sockets_keep_their_backend_until_it_leaves_and_connected_udp_is_then_aborted() {
    let (c, cgroups) = cluster("su", "host");
    let udp = SocketAddrV4::new(VIP, 53);
    let [b1, b2, b3] = &c.backends;
    c.write(&objects(&c.nodes, &[b1, b2]));
    let mut host = SockClient::start(&c.nodes[0].netns, cgroups[0].path()).expect("a client on node 1");
    // Until b3 is out of the table.
    let two = wait_until(Duration::from_secs(30), || {
        let names: BTreeSet<String> =
            (0..20).map(|_| host.udp(udp).map(|a| a.name)).collect::<Result<_, _>>()?;
        if names.contains(&b3.name) {
            Err(std::io::Error::other("b3 still chosen"))
        } else {
            Ok(())
        }
    });
    assert!(two.is_ok(), "{two:?}");
    let before: Vec<String> = (0..12).map(|i| kept(&mut host, &format!("k{i}"), udp)).collect();
    // b3 joins: the table changes, and a third of its slots move to b3; the kept sockets stay.
    c.write(&objects(&c.nodes, &[b1, b2, b3]));
    let three = wait_until(Duration::from_secs(30), || {
        let names: BTreeSet<String> =
            (0..20).map(|_| host.udp(udp).map(|a| a.name)).collect::<Result<_, _>>()?;
        if names.contains(&b3.name) {
            Ok(())
        } else {
            Err(std::io::Error::other("b3 not chosen yet"))
        }
    });
    assert!(three.is_ok(), "{three:?}");
    for (i, name) in before.iter().enumerate() {
        assert_eq!(&kept(&mut host, &format!("k{i}"), udp), name, "kept socket k{i} moved");
    }

    // Connected sockets on at least two backends.
    let mut connected: Vec<(String, String)> = Vec::new();
    for i in 0..30 {
        let id = format!("u{i}");
        let open = host.call(&format!("udp-open {id} {VIP} 53")).expect("udp-open");
        assert!(open.get("error").is_none(), "{open}");
        let a = host.call(&format!("udp-ask {id}")).expect("udp-ask");
        connected.push((id, a["name"].as_str().unwrap_or_else(|| panic!("{a}")).to_string()));
    }
    let gone = connected[0].1.clone();
    assert!(
        connected.iter().any(|(_, n)| *n != gone),
        "connected sockets on one backend only: {connected:?}"
    );
    // Its backend leaves the Service (the pod still runs and would answer).
    let rest: Vec<&Pod> = c.backends.iter().filter(|b| b.name != gone).collect();
    c.write(&objects(&c.nodes, &rest));
    let aborted = wait_until(Duration::from_secs(30), || {
        let e = host.call(&format!("udp-error {}", connected[0].0))?;
        match e["pending"].as_str() {
            Some("ECONNABORTED") => Ok(()),
            _ => Err(std::io::Error::other(format!("{e}"))),
        }
    });
    assert!(aborted.is_ok(), "{aborted:?}\n{}", c.lab.agent_log(&c.nodes[0]));
    for (id, name) in &connected {
        let e = host.call(&format!("udp-error {id}")).expect("udp-error");
        if *name == gone {
            assert!(e["pending"] == "ECONNABORTED" || e["pending"] == "", "{id} ({name}) aborted once: {e}");
            let after = host.call(&format!("udp-ask {id}")).expect("udp-ask");
            assert!(after.get("error").is_some(), "{id}, aborted, reaches nobody: {after}");
        } else {
            assert_eq!(e["pending"], "", "{id} on {name}, which stays, is left alone");
            assert_eq!(host.call(&format!("udp-ask {id}")).expect("udp-ask")["name"], name.as_str());
        }
    }
    // Reconnected, they reach a live backend; kept unconnected sockets go on to one.
    for i in 0..10 {
        let open = host.call(&format!("udp-open v{i} {VIP} 53")).expect("udp-open");
        assert!(open.get("error").is_none(), "{open}");
        let a = host.call(&format!("udp-ask v{i}")).expect("udp-ask");
        assert_ne!(a["name"], gone.as_str(), "a new connected socket reaches a live backend");
    }
    for (i, name) in before.iter().enumerate() {
        let now = kept(&mut host, &format!("k{i}"), udp);
        assert_ne!(now, gone, "kept socket k{i} moved off the backend that left");
        if *name != gone {
            assert_eq!(&now, name, "kept socket k{i} stays on its backend");
        }
    }
}

/// `--socket-lb host` where the agent can learn its own network namespace (`SO_NETNS_COOKIE`,
/// 5.14): that namespace's sockets are translated. Below, it means the initial namespace: the
/// node namespace's sockets are left alone and the initial one's (the test's own, in the kernel
/// matrix's machines) are translated. The kernel matrix runs this on every kernel.
#[test]
fn host_mode_is_the_agents_namespace_or_the_initial_one() {
    let (c, cgroups) = cluster("sh", "host");
    let tcp = SocketAddrV4::new(VIP, 80);
    let mut host = SockClient::start(&c.nodes[0].netns, cgroups[0].path()).expect("a client on node 1");
    let knows_its_own = support::kernel_release() >= (5, 14);
    assert_eq!(lb_agent::datapath::probe::Kernel::probe().netns_cookie, knows_its_own);
    if knows_its_own {
        wait_answer(&c, &mut host, tcp);
        let a = host.tcp(tcp).expect("TCP from the node");
        assert_eq!(a.peer, tcp.to_string());
        assert!(counters(&c, 1)[c::SOCK_CONNECT as usize] > 0, "{}", show_counters(&c));
        return;
    }
    // The node's namespace is not the initial one: untranslated, its connection finds no route
    // to the Service address.
    assert!(host.tcp(tcp).is_err());
    assert_eq!(counters(&c, 1)[c::SOCK_CONNECT as usize], 0, "{}", show_counters(&c));
    // The initial namespace's sockets are: the connect is translated (and finds no route to the
    // lab's pods from there, which the counter does not care about).
    let mut initial = SockClient::start_here(cgroups[0].path()).expect("a client in the initial namespace");
    let _ = initial.tcp(tcp);
    assert!(counters(&c, 1)[c::SOCK_CONNECT as usize] > 0, "{}", show_counters(&c));
}

/// A Service whose endpoint is host-networked (the `kubernetes` Service, whose endpoint is an API
/// server on node 1's own address: the classic case) is reached from processes on both nodes (at
/// the socket), from pods on both (the packet path) and from the client outside through either
/// node's NodePort.
#[test]
fn a_host_networked_endpoint_is_reached_from_hosts_pods_and_outside() {
    let (mut c, cgroups) = cluster("sn", "host");
    let n1 = c.nodes[0].clone();
    let api = Pod {
        name: "apiserver".into(),
        netns: n1.netns.clone(),
        ip: n1.underlay_ip(),
        ip6: None,
        node: 1,
        host_if: String::new(),
    };
    c.lab.serve_tcp(&api, 6443).expect("an API server on node 1's address");
    let kubernetes = format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: kubernetes, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.1
  ports:
  - {{name: https, port: 443, targetPort: 6443, protocol: TCP, nodePort: 30443}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {{kubernetes.io/service-name: kubernetes}}
addressType: IPv4
ports:
- {{name: https, port: 6443, protocol: TCP}}
endpoints:
- addresses: ["{}"]
  nodeName: node1
"#,
        n1.underlay_ip()
    );
    let backends: Vec<&Pod> = c.backends.iter().collect();
    c.write(&(objects(&c.nodes, &backends) + &kubernetes));
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 443);
    for (i, node) in c.nodes.iter().enumerate() {
        let mut host = SockClient::start(&node.netns, cgroups[i].path()).expect("a client on the node");
        let a = wait_until(Duration::from_secs(30), || host.tcp(to));
        let a = a.unwrap_or_else(|e| panic!("from {}: {e}\n{}", node.netns, show_counters(&c)));
        assert_eq!(
            (a.name.as_str(), a.peer),
            ("apiserver", to.to_string()),
            "from the host of {}",
            node.netns
        );
    }
    for pod in [&c.client1, &c.client2] {
        let got = lb_testkit::lab::tcp_asks(pod, to, 3).expect("from a pod");
        for a in got {
            assert_eq!(a.expect("an answer"), "apiserver", "from pod {}", pod.name);
        }
    }
    let out = c.lab.outside().expect("the client outside");
    for node in &c.nodes {
        let port = SocketAddrV4::new(node.underlay_ip(), 30443);
        let got = wait_until(Duration::from_secs(30), || {
            lb_testkit::lab::tcp_asks_from(&out.netns, port, 1)?.pop().expect("one answer")
        });
        assert_eq!(got.expect("from outside"), "apiserver", "through {}", node.netns);
    }
}

/// The agent without kube-proxy: a process on the node (a hostNetwork pod) reaches the API server
/// through the `kubernetes` Service's ClusterIP, and so does the agent itself once it runs. Its
/// first start reaches the API server at its explicit address (the bootstrap path); started again
/// with the ClusterIP as its API server (what the kubelet gives a pod), it lists and watches
/// through its own socket programs, which stayed attached with the maps it left.
#[test]
fn the_agent_and_host_processes_reach_the_api_server_through_the_kubernetes_service() {
    use lb_testkit::{api::MockApi, lab::Lab};
    use serde_json::json;

    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let mut lab = Lab::new("ka").expect("lab");
    let (n1, n2) = (lab.node(1).expect("node 1"), lab.node(2).expect("node 2"));
    lab.link_nodes(&n1, &n2).expect("underlay");
    let cgroup = Cgroup2::new("ka").expect("a cgroup v2 hierarchy");
    let at = SocketAddrV4::new(n1.underlay_ip(), 6443);
    let listener = lb_testkit::lab::in_netns(&n1.netns, move || std::net::TcpListener::bind(at))
        .expect("netns")
        .expect("an API server on node 1's address");
    let api = rt.block_on(MockApi::start_on(listener));
    let kubernetes = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 443);
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}));
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "spec": {"clusterIP": kubernetes.ip().to_string(), "clusterIPs": [kubernetes.ip().to_string()],
            "ports": [{"name": "https", "port": 443, "targetPort": 6443, "protocol": "TCP"}]}}));
    api.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4", "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        "endpoints": [{"addresses": [at.ip().to_string()], "conditions": {"ready": true}}]}));
    let direct = lab.scratch().join("kubeconfig-direct");
    std::fs::write(&direct, api.kubeconfig()).expect("kubeconfig");
    let through = lab.scratch().join("kubeconfig-service");
    std::fs::write(&through, api.kubeconfig().replace(&at.to_string(), &kubernetes.to_string()))
        .expect("kubeconfig");
    let source = |p: &std::path::Path| ["--kubeconfig".to_string(), p.display().to_string()];
    let root = cgroup.path().display().to_string();
    let flags = ["--socket-lb", "host", "--cgroup-root", root.as_str()];
    let agent = std::path::Path::new(support::AGENT);
    lab.start_agent_in_cgroup(&n1, agent, &source(&direct), &flags, cgroup.path()).expect("agent");

    // A hostNetwork pod asks the API server through the Service.
    let mut host = SockClient::start(&n1.netns, cgroup.path()).expect("a process on the node");
    let asked = wait_until(Duration::from_secs(60), || {
        let a = host.call(&format!("http {} {} /api/v1/nodes", kubernetes.ip(), kubernetes.port()))?;
        if a["status"] == 200 {
            Ok(a)
        } else {
            Err(std::io::Error::other(a.to_string()))
        }
    });
    let asked = asked.unwrap_or_else(|e| panic!("kubernetes.default: {e}\n{}", lab.agent_log(&n1)));
    assert_eq!(asked["peer"], kubernetes.to_string(), "getpeername gives the Service");

    // The agent again, with the ClusterIP as its API server.
    lab.stop_agent(&n1, libc::SIGTERM);
    let (lists, watches) = api.requests();
    let connects = || {
        lb_agent::datapath::Maps::from_pins_read_only(&n1.pin_dir)
            .expect("maps")
            .read_counters()
            .expect("counters")[c::SOCK_CONNECT as usize]
    };
    let before = connects();
    lab.start_agent_in_cgroup(&n1, agent, &source(&through), &flags, cgroup.path()).expect("agent");
    let later = Ipv4Addr::new(10, 96, 0, 50);
    api.apply(
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "later", "namespace": "default"},
        "spec": {"clusterIP": later.to_string(), "clusterIPs": [later.to_string()],
            "ports": [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
    );
    let key = lb_common::Lb4ServiceKey::new(later.octets(), 80, 6);
    let programmed = wait_until(Duration::from_secs(60), || {
        let maps =
            lb_agent::datapath::Maps::from_pins_read_only(&n1.pin_dir).map_err(std::io::Error::other)?;
        maps.services.get(&key, 0).map_err(std::io::Error::other)
    });
    programmed.unwrap_or_else(|e| {
        panic!("a Service written after the restart never reached the maps: {e}\n{}", lab.agent_log(&n1))
    });
    let (lists_after, watches_after) = api.requests();
    assert!(lists_after > lists && watches_after > watches, "the agent listed and watched again");
    assert!(connects() > before, "the agent's connections went through its socket programs");
    lab.stop_agents();
    drop(host);
}

/// `--socket-lb host` is the default, but one this machine cannot take (here `--cgroup-root` is a
/// plain directory, as on a host with cgroup v1 only) turns itself off with a warning, and the
/// agent serves; asked for (the flag, or `LB_SOCKET_LB`), the same stops the agent, naming the
/// flag and the directory.
#[test]
fn the_default_host_mode_turns_itself_off_where_it_cannot_attach_and_an_asked_one_stops_the_agent() {
    let scratch = std::env::temp_dir().join(format!("lb-sock-default-{}", std::process::id()));
    let (manifests, plain) = (scratch.join("manifests"), scratch.join("not-a-cgroup"));
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::create_dir_all(&plain).expect("plain dir");
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/lb-test/sockdefault-{}", std::process::id()));
    struct Cleanup(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::process::Command::new(support::AGENT)
                .arg("--cleanup")
                .arg("--pin-dir")
                .arg(&self.1)
                .output();
            let _ = std::fs::remove_dir_all(&self.1);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(scratch.clone(), pin_dir.clone());
    let agent = |setting: Option<(&str, &str)>| {
        let mut cmd = std::process::Command::new(support::AGENT);
        cmd.env_remove("LB_SOCKET_LB")
            .arg("--manifests")
            .arg(&manifests)
            .args(["--interfaces", "lbsockdef-none*", "--pin-dir"])
            .arg(&pin_dir)
            .arg("--cgroup-root")
            .arg(&plain)
            .args(["--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        match setting {
            Some(("flag", v)) => {
                cmd.args(["--socket-lb", v]);
            }
            Some((_, v)) => {
                cmd.env("LB_SOCKET_LB", v);
            }
            None => {}
        }
        cmd
    };

    // The default: serves without socket programs, and says why.
    let mut child = agent(None).spawn().expect("agent");
    let ready = wait_until(Duration::from_secs(60), || {
        let attached = lb_agent::datapath::layout_dir(&pin_dir).join("links").is_dir();
        if attached {
            Ok(())
        } else {
            Err(std::io::Error::other("not started yet"))
        }
    });
    // A moment for a wrong attach to show.
    std::thread::sleep(Duration::from_secs(1));
    let still_running = child.try_wait().expect("wait").is_none();
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().expect("agent exits");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(ready.is_ok() && still_running, "the agent serves:\n{log}");
    assert!(
        log.contains("socket-level load balancing off")
            && log.contains(&format!("--cgroup-root {} is not a cgroup v2 hierarchy", plain.display())),
        "{log}"
    );
    let pins = socket_pins(&pin_dir);
    assert!(pins.is_empty(), "no socket program attached: {pins:?}");

    // Asked for, by the flag or the environment: the agent stops, saying what to do.
    for setting in [("flag", "host"), ("env", "host"), ("flag", "all")] {
        let out = agent(Some(setting)).output().expect("agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{setting:?}: the agent must stop");
        assert!(
            err.contains("--socket-lb")
                && err.contains(&format!("{} is not a cgroup v2 hierarchy", plain.display())),
            "{setting:?}: {err}"
        );
    }
}
