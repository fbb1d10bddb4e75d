//! Upgrades and rollbacks across a pin layout change, under traffic: the agent of the previous
//! layout replaced by this one and back, and this one meeting a newer layout (a rollback from a
//! later version). See `lb_agent::datapath::migrate`.
//!
//! The previous agent is built by `cargo xtask test` from the git history (the commit before the
//! one that set this `PIN_LAYOUT_VERSION`) and named by `LB_PREVIOUS_AGENT`.

mod support;

use std::{path::PathBuf, time::Duration};

use lb_agent::datapath::{layout_dir, Maps, Mode, PROG_TC_FORWARD, PROG_TC_REPLY};
use lb_common::{CT_DIR_FORWARD, PIN_LAYOUT_VERSION};
use lb_testkit::lab::{wait_until, Node};
use support::{
    assert_clean_udp_kept, default_ct_entries, endpoint, lbctl_interfaces, pinned_map, who, Cluster, Traffic,
    AGENT,
};

fn previous_agent() -> PathBuf {
    let path = std::env::var_os("LB_PREVIOUS_AGENT").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "LB_PREVIOUS_AGENT is not set: `cargo xtask test` builds the agent of the previous pin layout \
             from the git history and sets it (or run `cargo xtask previous-agent` and export what it prints)"
        )
    });
    assert!(path.is_file(), "LB_PREVIOUS_AGENT={}: no such file", path.display());
    path
}

fn all_ready(c: &[lb_testkit::lab::Pod; 3]) -> String {
    who("", &c.iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>())
}

/// Exactly lb's two TC programs on each pod interface of `node` (TCX links or netlink filters,
/// as `lbctl interfaces` reads them from the kernel): never a second copy.
fn assert_attached_once(c: &Cluster, node: &Node, what: &str) {
    let view = lbctl_interfaces(node);
    let pods = [&c.client1, &c.backends[0], &c.backends[1]];
    for pod in pods.into_iter().filter(|p| p.node == node.index) {
        let iface = &pod.host_if;
        let lb = |dir: &str| -> Vec<String> {
            view[iface][dir]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|h| h["lb"] == true)
                .map(|h| h["program"].as_str().unwrap_or("?").to_string())
                .collect()
        };
        assert_eq!(lb("ingress"), [PROG_TC_FORWARD], "{what}: {iface}: {}", view[iface]);
        assert_eq!(lb("egress"), [PROG_TC_REPLY], "{what}: {iface}: {}", view[iface]);
    }
}

/// The layout directories under `node`'s pin directory.
fn layouts(node: &Node) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&node.pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn wait_log(c: &Cluster, node: &Node, text: &str) {
    // Generous: it includes a program load, which takes seconds on a busy machine.
    let seen = wait_until(Duration::from_secs(60), || {
        if c.lab.agent_log(node).contains(text) {
            Ok(())
        } else {
            Err(std::io::Error::other("not yet"))
        }
    });
    assert!(seen.is_ok(), "never logged {text:?}:\n{}", c.lab.agent_log(node));
}

/// Forward flows of `client` in node's maps, with when each was created (seconds).
fn client_flows(node: &Node, client: std::net::Ipv4Addr) -> Vec<u32> {
    let maps = Maps::from_pins(&node.pin_dir).expect("our maps");
    maps.ct
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.dir == CT_DIR_FORWARD && k.saddr.to_ne_bytes() == client.octets())
        .map(|(_, e)| e.created_s)
        .collect()
}

#[test]
fn an_upgrade_from_the_previous_layout_and_a_rollback_lose_no_connection() {
    upgrade_and_rollback(Mode::Tc, "upgrade");
}

/// The previous layout's XDP mode had no TC forward program: ours goes in before its XDP program
/// is replaced.
#[test]
fn an_upgrade_in_xdp_mode_and_a_rollback_lose_no_connection() {
    if !support::xdp_meta() {
        // The previous agent's XDP program calls bpf_xdp_adjust_meta unconditionally: a kernel
        // build that refuses the helper refuses that program, so there is no previous XDP
        // datapath to upgrade from here. Said, not hidden; the TC upgrade test still runs.
        eprintln!(
            "NOTE: this kernel refuses bpf_xdp_adjust_meta: the previous agent cannot run XDP here; the XDP upgrade is not tested on it"
        );
        return;
    }
    upgrade_and_rollback(Mode::Xdp, "upxdp");
}

fn upgrade_and_rollback(mode: Mode, tag: &str) {
    let previous = previous_agent();
    let mut c = Cluster::with_agents(
        tag,
        [previous.as_path(), std::path::Path::new(AGENT)],
        mode,
        true,
        all_ready,
        &[],
    );
    c.wait_reachable(&c.client1, 80);
    let n1 = c.nodes[0].clone();
    let ours = format!("v{PIN_LAYOUT_VERSION}");
    let theirs = format!("v{}", PIN_LAYOUT_VERSION - 1);
    assert_eq!(layouts(&n1), [theirs.as_str()], "the previous agent pins its own layout");
    let ct_size = |dir: std::path::PathBuf| pinned_map(&dir.join(lb_common::MAP_LB4_CT)).1;
    let theirs_ct = ct_size(n1.pin_dir.join(&theirs));
    let traffic = Traffic::start(&c.client1);
    // Long enough for the carried flows to be a whole second older than the new agent.
    std::thread::sleep(Duration::from_millis(1_100));

    // The upgrade, as a rolling update does it: the old agent is stopped, the new one started.
    c.lab.stop_agent(&n1, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let before = lb_agent::datapath::monotonic_ns() / 1_000_000_000;
    c.lab.start_agent(&n1, std::path::Path::new(AGENT), &c.manifests, mode, &[]).expect("agent");
    wait_log(&c, &n1, &format!("took over from pin layout {theirs}"));
    let log = c.lab.agent_log(&n1);
    assert!(
        log.contains(&format!("taking over from pin layout {theirs}"))
            && log.contains("state is carried over"),
        "{log}"
    );
    assert_eq!(layouts(&n1), [ours.as_str()], "the previous layout is removed");
    // The table the flows were carried into holds at least as many as the one they left.
    assert_eq!(ct_size(layout_dir(&n1.pin_dir)), theirs_ct.max(default_ct_entries().1));
    assert_attached_once(&c, &n1, "after the upgrade");
    assert_eq!(takeovers(&n1, &theirs, "carried"), Some(1));
    // The flows were carried, not picked up again: the long-lived connection's entry is older
    // than the new agent.
    let created = client_flows(&n1, c.client1.ip);
    assert!(
        created.iter().any(|&s| u64::from(s) < before),
        "no carried flow among {created:?} (agent started at {before} s)"
    );
    std::thread::sleep(Duration::from_millis(700));

    let o = traffic.stop();
    support::explain(&c, 1, &o);
    assert_clean_udp_kept(&o, "upgrade");

    // The rollback to the previous version: our layout changed formats it cannot read, so it
    // takes our links over with its maps filled from its source, and picks established flows up
    // on the same Maglev tables (an idle connection keeps its backend).
    let mut session =
        lb_testkit::lab::Session::open(&c.client1, std::net::SocketAddrV4::new(support::VIP, 80))
            .expect("connect");
    let pinned = session.ask().expect("ask");
    c.lab.stop_agent(&n1, libc::SIGTERM);
    c.lab.start_agent(&n1, &previous, &c.manifests, mode, &[]).expect("previous agent");
    wait_log(&c, &n1, &format!("took over from pin layout {ours}"));
    assert_eq!(layouts(&n1), [theirs.as_str()], "our layout is removed");
    assert_attached_once(&c, &n1, "after the rollback");
    assert_eq!(session.ask().expect("the connection survives the rollback"), pinned);
    c.lab.stop_agent(&n1, libc::SIGTERM);

    // And forward again: this version takes its own layout back as after a restart.
    c.lab.start_agent(&n1, std::path::Path::new(AGENT), &c.manifests, mode, &[]).expect("agent");
    c.wait_ready(&n1);
    assert_eq!(session.ask().expect("the connection survives the upgrade back"), pinned);
    let removed = wait_until(Duration::from_secs(30), || {
        if layouts(&n1) == [ours.as_str()] {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{:?}", layouts(&n1))))
        }
    });
    assert!(removed.is_ok(), "the previous layout is removed again: {removed:?}");
    assert_attached_once(&c, &n1, "at the end");
    let log = c.lab.agent_log(&n1);
    assert!(!log.contains("ERROR"), "agent log has errors:\n{log}");
}

/// Stops `node`'s agent and makes its layout look like a later version's: renamed to the next
/// layout version, with `formats` (`LB_FORMATS`) changed by `change`.
fn as_if_newer(
    c: &mut Cluster,
    node: &Node,
    change: impl FnOnce(&mut [u32; lb_common::formats::MAPS.len()]),
) -> String {
    c.lab.stop_agent(node, libc::SIGTERM);
    let newer = format!("v{}", PIN_LAYOUT_VERSION + 1);
    let dir = node.pin_dir.join(&newer);
    std::fs::rename(layout_dir(&node.pin_dir), &dir).expect("rename the layout");
    let mut formats = lb_common::formats::CURRENT;
    change(&mut formats);
    let data = aya::maps::MapData::from_pin(dir.join(lb_common::MAP_LB_FORMATS)).expect("LB_FORMATS");
    let map = aya::maps::Map::from_map_data(data).expect("map");
    let mut recorded: aya::maps::Array<_, u32> = map.try_into().expect("an array");
    for (i, f) in formats.iter().enumerate() {
        recorded.set(i as u32, f, 0).expect("write a format");
    }
    newer
}

#[test]
fn a_rollback_from_a_newer_layout_of_the_same_formats_loses_no_connection() {
    rollback_same_formats("rollback", &[]);
}

/// The same with netlink filters (what kernels without TCX get): the newer layout's recorded
/// filters are replaced in place, its flows carried.
#[test]
fn a_rollback_with_netlink_filters_loses_no_connection() {
    rollback_same_formats("rollnl", &["--tc-attach", "netlink"]);
}

fn rollback_same_formats(tag: &str, args: &[&str]) {
    let mut c = Cluster::new(tag, Mode::Tc, true, all_ready, args);
    c.wait_reachable(&c.client1, 80);
    let n1 = c.nodes[0].clone();
    let traffic = Traffic::start(&c.client1);
    std::thread::sleep(Duration::from_millis(500));
    // What a later version that changed no map format leaves.
    let newer = as_if_newer(&mut c, &n1, |_| {});
    std::thread::sleep(Duration::from_millis(300));
    c.lab.restart_agent(&n1).expect("agent");
    wait_log(&c, &n1, &format!("took over from pin layout {newer}"));
    let log = c.lab.agent_log(&n1);
    assert!(
        log.contains(&format!("taking over from pin layout {newer}"))
            && log.contains("state is carried over"),
        "{log}"
    );
    assert_eq!(layouts(&n1), [format!("v{PIN_LAYOUT_VERSION}")], "the newer layout is removed");
    assert_attached_once(&c, &n1, "after the rollback");
    assert_eq!(takeovers(&n1, &newer, "carried"), Some(1));
    std::thread::sleep(Duration::from_millis(1_000));
    let o = traffic.stop();
    support::explain(&c, 1, &o);
    assert_clean_udp_kept(&o, "rollback from a newer layout");
    let log = c.lab.agent_log(&n1);
    assert!(!log.contains("ERROR"), "agent log has errors:\n{log}");
}

#[test]
fn a_rollback_across_a_format_change_picks_established_flows_up() {
    use lb_testkit::lab::{in_netns, Session};
    let mut c = Cluster::new("rollfmt", Mode::Tc, true, all_ready, &[]);
    c.wait_reachable(&c.client1, 80);
    let n1 = c.nodes[0].clone();
    // A TCP connection and a UDP flow, asked before and after, idle while the agents change.
    let mut tcp = Session::open(&c.client1, std::net::SocketAddrV4::new(support::VIP, 80)).expect("connect");
    let udp = in_netns(&c.client1.netns, || -> std::io::Result<std::net::UdpSocket> {
        let s = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((support::VIP, 53))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    })
    .expect("enter the pod")
    .expect("UDP socket");
    let udp_ask = |s: &std::net::UdpSocket| -> String {
        let mut buf = [0u8; 64];
        s.send(b"who").expect("send");
        let n = s.recv(&mut buf).expect("UDP answer");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let (tcp_backend, udp_backend) = (tcp.ask().expect("ask"), udp_ask(&udp));
    // A later version that changed the flow table's format.
    let newer = as_if_newer(&mut c, &n1, |f| f[7] += 1);
    c.lab.restart_agent(&n1).expect("agent");
    wait_log(&c, &n1, &format!("took over from pin layout {newer}"));
    let log = c.lab.agent_log(&n1);
    assert!(log.contains("cannot read its") && log.contains(&format!("[\"{newer}\"]")), "{log}");
    assert_eq!(layouts(&n1), [format!("v{PIN_LAYOUT_VERSION}")], "the newer layout is removed");
    assert_attached_once(&c, &n1, "after the rollback");
    assert!(client_flows(&n1, c.client1.ip).is_empty(), "nothing carried");
    assert_eq!(takeovers(&n1, &newer, "rebuilt"), Some(1));
    // Picked up on the same backends.
    for _ in 0..5 {
        assert_eq!(tcp.ask().expect("the connection survives"), tcp_backend);
        assert_eq!(udp_ask(&udp), udp_backend);
    }
    c.wait_reachable(&c.client1, 80);
    let log = c.lab.agent_log(&n1);
    assert!(!log.contains("ERROR"), "agent log has errors:\n{log}");
}

/// `lb_layout_takeovers_total` of `node`'s agent for layout `from` and `outcome`.
fn takeovers(node: &Node, from: &str, outcome: &str) -> Option<u64> {
    let addr = "127.0.0.1:10249".parse().expect("addr");
    let (_, body) = lb_testkit::lab::http_get(&node.netns, addr, "/metrics").expect("scrape");
    let want = format!("lb_layout_takeovers_total{{from=\"{from}\",outcome=\"{outcome}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&want)).map(|v| v.trim().parse().expect("a count"))
}

/// An agent that carried another layout's state and died before any link moved (after its first
/// sync wrote over the copy) leaves our layout with no link: the next start makes our maps anew
/// and carries the other layout's state again, rather than keep a mix of both.
#[test]
fn a_start_that_died_before_the_swap_carries_the_other_layout_again() {
    use lb_agent::{
        datapath::migrate::Outcome,
        reconcile::{BackendValue, MapWriter as _, ServiceKey},
    };
    use lb_common::{Lb4Backend, Lb4Service, Lb4ServiceKey, BACKEND_STATE_ACTIVE, IPPROTO_TCP};
    let pins = support::PinDir::new("recarry");
    let cfg = support::test_config(pins.path());
    let key = |last: u8| ServiceKey::V4(Lb4ServiceKey::new([10, 96, 0, last], 80, IPPROTO_TCP));
    let service = |id, offset| Lb4Service {
        id,
        backend_count: 1,
        maglev_offset: offset,
        maglev_size: 7,
        ..Default::default()
    };
    {
        // What a later version, which changed no format, left.
        let (_dp, mut maps) = lb_agent::datapath::Datapath::load(&cfg, Mode::Tc).expect("load");
        let b = Lb4Backend {
            addr: u32::from_ne_bytes([10, 244, 1, 2]),
            port: 8080u16.to_be(),
            proto: IPPROTO_TCP,
            state: BACKEND_STATE_ACTIVE,
        };
        maps.set_backend(3, &BackendValue::V4(b)).expect("backend");
        maps.set_maglev(0, &[3; 7]).expect("table");
        maps.set_service(&key(10), &service(1, 0)).expect("service");
    }
    let newer = pins.path().join(format!("v{}", PIN_LAYOUT_VERSION + 1));
    std::fs::rename(layout_dir(pins.path()), &newer).expect("rename");
    let carry = |what: &str| {
        let (mut dp, mut maps) = lb_agent::datapath::Datapath::load(&cfg, Mode::Tc).expect("load");
        let outcome = dp.carry_state(&mut maps).expect("carry");
        assert!(
            matches!(&outcome, Outcome::Carried(_, c) if c.services == 1 && c.backends == 1),
            "{what}: {outcome:?}"
        );
        (dp, maps)
    };
    {
        let (_dp, mut maps) = carry("first start");
        // Its first sync: another Service, and the table's slots written over. Then it dies.
        maps.set_maglev(0, &[5; 14]).expect("table");
        maps.set_service(&key(11), &service(2, 7)).expect("service");
    }
    let (_dp, maps) = carry("second start");
    let services = maps.read_services().expect("services");
    assert_eq!(services, [(key(10), service(1, 0))], "only what the other layout holds");
    assert_eq!((0..7).map(|i| maps.maglev.get(i)).collect::<Vec<_>>(), [Some(3); 7], "its table");
    assert!(newer.exists(), "the other layout serves until its links move");
}
