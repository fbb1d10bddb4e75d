//! Restarts and changes that must lose no connection: the agent SIGKILLed or SIGTERMed and
//! restarted, and endpoint updates, all while traffic runs; a pod interface that appears later;
//! `--cleanup`; a pinned layout of another version.

mod support;

use std::{
    net::SocketAddrV4,
    path::Path,
    time::{Duration, Instant},
};

use lb_agent::datapath::{layout_dir, Mode};
use lb_testkit::lab::{http_get, tcp_asks, Pod};
use support::{
    assert_clean, assert_clean_udp_kept, default_ct_entries, endpoint, pinned_map, port_filter_armed, who,
    Cluster, Traffic, VIP,
};

fn all_ready(c: &[Pod; 3]) -> String {
    who("", &c.iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>())
}

fn restart_with(signal: i32, tag: &str, while_away: impl FnOnce(&Path)) {
    let mut c = Cluster::new(tag, Mode::Tc, true, all_ready, &[]);
    c.wait_reachable(&c.client1, 80);
    let traffic = Traffic::start(&c.client1);
    std::thread::sleep(Duration::from_millis(300));
    let n1 = c.nodes[0].clone();
    c.lab.stop_agent(&n1, signal);
    while_away(&n1.pin_dir);
    // The agent is away: the pinned datapath keeps serving, new connections included.
    std::thread::sleep(Duration::from_millis(700));
    c.lab.restart_agent(&n1).expect("restart");
    // Ready (loaded and attached), then traffic through the new agent's programs a while.
    c.wait_ready(&n1);
    assert_eq!(port_filter_armed(&n1.pin_dir), 1, "{tag}: the port filter armed by the start-up");
    std::thread::sleep(Duration::from_millis(500));
    let o = traffic.stop();
    assert_clean_udp_kept(&o, tag);
    let log = c.lab.agent_log(&n1);
    assert!(!log.contains("ERROR"), "agent log has errors:\n{log}");
}

#[test]
fn sigkill_and_restart_lose_no_connection() {
    restart_with(libc::SIGKILL, "kill", |_| ());
}

#[test]
fn sigterm_and_restart_lose_no_connection() {
    // A stopping agent turns the port filter off: the next may be one that does not know it.
    restart_with(libc::SIGTERM, "term", |pin_dir| {
        assert_eq!(port_filter_armed(pin_dir), 0, "off while away")
    });
}

/// Rule: an agent that finds no `LB_PORTS` pinned (an agent before the port filter served, or
/// one rolled back to) sets the bits of every frontend and backend the pinned maps hold before
/// its programs replace the running ones: the flows begun before go on both ways, though the
/// restart writes no row (nothing changed).
#[test]
fn a_restart_over_pins_without_the_port_filter_loses_no_connection() {
    restart_with(libc::SIGKILL, "noports", |pin_dir| {
        let pin = layout_dir(pin_dir).join(lb_common::MAP_LB_PORTS);
        std::fs::remove_file(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    });
}

/// Rule: the conntrack tables are sized by kube-proxy's rule for this node's online CPUs by
/// default, and a restart asking for another size keeps the pinned tables, IPv4's and IPv6's, as
/// they are (the same maps), loses no connection, warns that the size asked for waits for a fresh
/// start, and reports the size the table has.
#[test]
fn a_restart_asking_another_conntrack_size_keeps_the_pinned_tables() {
    let mut c = Cluster::new("ctsize", Mode::Tc, true, all_ready, &["--ipv6", "on"]);
    c.wait_reachable(&c.client1, 80);
    let n1 = c.nodes[0].clone();
    let (cpus, default) = default_ct_entries();
    let dir = layout_dir(&n1.pin_dir);
    let tables = || {
        [lb_common::MAP_LB4_CT, lb_common::MAP_LB6_CT].map(|name| {
            let (id, size) = pinned_map(&dir.join(name));
            (name, id, size)
        })
    };
    let before = tables();
    for (name, _, size) in before {
        assert_eq!(size, default, "{name} at the default of {cpus} CPUs");
    }
    let traffic = Traffic::start(&c.client1);
    std::thread::sleep(Duration::from_millis(300));
    c.lab.stop_agent(&n1, libc::SIGTERM);
    c.lab.restart_agent_adding(&n1, &["--ct-entries", "4096"]).expect("restart");
    c.wait_ready(&n1);
    std::thread::sleep(Duration::from_millis(500));
    assert_clean_udp_kept(&traffic.stop(), "ctsize");
    assert_eq!(tables(), before, "the same tables, of the same size");
    let log = plain(&c.lab.agent_log(&n1));
    assert!(
        log.contains(&format!(
            "INFO conntrack table: {default} entries, two per flow for max(131072, 32768 × {cpus} online CPUs)"
        )),
        "the first start's default:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "WARN conntrack table: {default} entries (4096 asked for): a pinned table keeps its size"
        )),
        "the restart says the table kept its size:\n{log}"
    );
    assert!(!log.contains("made anew for --ipv6's capacity"), "no lb6 map made anew:\n{log}");
    let (_, body) =
        http_get(&n1.netns, "127.0.0.1:10249".parse().expect("addr"), "/metrics").expect("scrape");
    assert!(body.contains(&format!("lb_map_capacity{{map=\"conntrack\"}} {default}\n")), "{body}");
}

#[test]
fn endpoint_updates_under_traffic_lose_no_connection() {
    let c = Cluster::new("upd", Mode::Tc, true, all_ready, &[]);
    c.wait_reachable(&c.client1, 80);
    let traffic = Traffic::start(&c.client1);
    for i in 0..20 {
        // Alternately take b2 out and put it back, and flip b3 between ready and terminating.
        let eps: Vec<String> = c
            .backends
            .iter()
            .filter(|b| !(i % 2 == 0 && b.name == "b2"))
            .map(|b| {
                endpoint(
                    b,
                    if b.name == "b3" && i % 4 == 1 {
                        "ready: false, serving: true, terminating: true"
                    } else {
                        "ready: true"
                    },
                )
            })
            .collect();
        c.write(&who("", &eps));
        std::thread::sleep(Duration::from_millis(150));
    }
    let o = traffic.stop();
    assert_clean(&o, "20 endpoint updates");
    let log = c.lab.agent_log(&c.nodes[0]);
    assert!(log.matches("maps synced").count() >= 15, "the updates reached the maps:\n{log}");

    // The metrics endpoint shows the updates, their latency, and the traffic, once the last
    // update is applied (the sync count stops moving; an idle agent does not sync: its own reads
    // of the manifests are not changes).
    let ns = &c.nodes[0].netns;
    let syncs = |body: &str| body.lines().find(|l| l.starts_with("lb_syncs_total ")).map(str::to_string);
    let scrape = || http_get(ns, "127.0.0.1:10249".parse().expect("addr"), "/metrics").expect("scrape");
    let mut last = None;
    let settled = lb_testkit::lab::wait_until(Duration::from_secs(20), || {
        let (status, body) = scrape();
        let now = syncs(&body);
        if status == 200 && now.is_some() && now == last {
            Ok(body)
        } else {
            last = now;
            std::thread::sleep(Duration::from_millis(1_000));
            Err(std::io::Error::other(format!("{status}: {last:?}")))
        }
    });
    let body = settled.expect("the sync count settles");
    let (_, later) = scrape();
    assert_eq!(syncs(&body), syncs(&later), "syncs while nothing changed");
    let value = |prefix: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{body}"))
    };
    // 20 writes 150 ms apart: changes that came close together may be applied as one.
    assert!(value("lb_syncs_total ") >= 15.0);
    assert!(value("lb_network_programming_duration_seconds_count ") >= 15.0);
    assert!(value("lb_datapath_packets_total{event=\"fwd_new_flow\"}") >= o.new_ok as f64);
    assert!(
        value("lb_service_new_flows_total{frontend=\"10.96.0.10:80/TCP\",service=\"demo/who:tcp\",kind=\"ClusterIP\"}")
            >= o.new_ok as f64
    );
    assert_eq!(value("lb_services_programmed "), 2.0);
    assert!(value("lb_map_capacity{map=\"conntrack\"}") > 0.0);
    let (status, body) = http_get(ns, "127.0.0.1:10256".parse().expect("addr"), "/readyz").expect("health");
    assert_eq!((status, body.trim()), (200, "ok"), "/readyz");
    // kube-proxy's JSON (standalone, with no Node object: eligible).
    let (status, body) = http_get(ns, "127.0.0.1:10256".parse().expect("addr"), "/healthz").expect("health");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert!(status == 200 && v["nodeEligible"] == true && v["lastUpdated"] == v["currentTime"], "{body}");
    let (_, after) = scrape();
    assert!(after.contains("lb_proxy_health_answers_total{path=\"/healthz\",code=\"200\"} "), "{after}");
}

#[test]
fn a_pod_interface_created_later_is_attached_on_its_link_notification() {
    let mut c = Cluster::new("late", Mode::Tc, true, all_ready, &[]);
    c.wait_reachable(&c.client1, 80);
    let n1 = c.nodes[0].clone();
    let pod = c.lab.pod(&n1, "c3", 11, true).expect("new pod");
    // The link notification wakes the agent at once; without it, the rescan every 5 s would attach
    // the pod's interface. The agent says which pass attached it.
    let said = |cause: &str| {
        plain(&c.lab.agent_log(&n1)).lines().any(|l| {
            l.contains("attached") && l.contains(&format!("interface={} ", pod.host_if)) && l.contains(cause)
        })
    };
    let started = Instant::now();
    while !said("cause=") {
        assert!(started.elapsed() < Duration::from_secs(15), "not attached after {:?}", started.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(said("cause=link-notification"), "attached by another pass:\n{}", c.lab.agent_log(&n1));
    let pin = layout_dir(&n1.pin_dir).join("links").join(format!("{}@lb4_tc_forward", pod.host_if));
    assert!(pin.exists(), "{} pinned", pin.display());
    let answers = tcp_asks(&pod, SocketAddrV4::new(VIP, 80), 10).expect("traffic from the new pod");
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
}

#[test]
fn cleanup_removes_everything_and_an_unknown_layout_is_taken_over() {
    let mut c = Cluster::new("clean", Mode::Tc, true, all_ready, &[]);
    c.wait_reachable(&c.client1, 80);
    let n1 = c.nodes[0].clone();
    c.lab.stop_agent(&n1, libc::SIGTERM);
    // Still served while the agent is away.
    assert!(tcp_asks(&c.client1, SocketAddrV4::new(VIP, 80), 5).expect("asks").iter().all(Result::is_ok));
    support::cleanup(&n1);
    assert!(!n1.pin_dir.exists(), "pins removed");
    let agent = env!("CARGO_BIN_EXE_lb-agent");
    // The links went with their pins (the kernel releases an unpinned link from a workqueue, so
    // shortly after): nothing translates the service address any more.
    let detached = lb_testkit::lab::wait_until(Duration::from_secs(15), || {
        match tcp_asks(&c.client1, SocketAddrV4::new(VIP, 80), 1)?.pop().expect("one") {
            Ok(_) => Err(std::io::Error::other("still answered")),
            Err(_) => Ok(()),
        }
    });
    assert!(detached.is_ok(), "the datapath was not detached");

    // A pin directory holding a layout of another version that this agent cannot read (here an
    // empty one) is taken over: the agent starts, says so, and removes it.
    std::fs::create_dir_all(n1.pin_dir.join("v1").join("links")).expect("old layout dir");
    let agent = std::process::Command::new(agent)
        .env("LB_SOCKET_LB", "off")
        .arg("--manifests")
        .arg(&c.manifests)
        .args(["--interfaces", "nothing*", "--pin-dir"])
        .arg(&n1.pin_dir)
        .args(["--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("agent");
    // (Generous: in the kernel matrix the agent loads emulated, in about ten seconds.)
    let gone = lb_testkit::lab::wait_until(Duration::from_secs(60), || {
        if n1.pin_dir.join("v1").exists() {
            Err(std::io::Error::other("v1 still there"))
        } else {
            Ok(())
        }
    });
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let out = agent.wait_with_output().expect("agent exits");
    let err = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(gone.is_ok(), "layout v1 was not taken over:\n{err}");
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("taking over from pin layout [\"v1\"]") && err.contains("cannot read its state"),
        "{err}"
    );
    assert!(err.contains("took over from pin layout v1"), "{err}");
    assert!(layout_dir(&n1.pin_dir).join("LB4_SERVICES").exists(), "our layout is pinned");
    let _ = std::fs::remove_dir_all(&n1.pin_dir);
    assert!(!Path::new(&n1.pin_dir).exists());
}

#[test]
fn pins_removed_under_the_agent_are_restored_with_their_flows() {
    let c = Cluster::new("repin", Mode::Tc, true, all_ready, &[]);
    c.wait_reachable(&c.client1, 80);
    let traffic = Traffic::start(&c.client1);
    std::thread::sleep(Duration::from_millis(300));
    let n1 = c.nodes[0].clone();
    let flows_before = c.maps(1).ct.keys().count();
    // Nothing is restored while nothing was removed (the agent has looked several times by now).
    assert!(!c.lab.agent_log(&n1).contains("pins are gone"), "{}", c.lab.agent_log(&n1));
    let layout = layout_dir(&n1.pin_dir);
    let links = layout.join("links");
    let link = links.join(format!("{}@lb4_tc_forward", c.client1.host_if));
    let ct = layout.join("LB4_CT");
    // Whatever part goes is restored: the whole directory (bpffs unmounted, say), the links'
    // directory alone (the programs' attachments go with it), one map's pin alone.
    // And removals that go on while the agent restores (one after another for two seconds): a
    // restore that a removal undid is tried again.
    let removals: [(&str, &Path, Duration); 4] = [
        ("the pin directory", Path::new(&n1.pin_dir), Duration::ZERO),
        ("the links", &links, Duration::ZERO),
        ("a map's pin", &ct, Duration::ZERO),
        ("the pin directory, again and again", Path::new(&n1.pin_dir), Duration::from_secs(2)),
    ];
    let mut restored_after = Vec::new();
    for (what, path, repeat) in removals {
        let started = Instant::now();
        loop {
            // bpffs cannot rename a directory: an agent that notices half way and restores its
            // pins makes the last steps of the removal find a directory not empty, or an entry
            // gone; the rest is gone all the same (and the agent sees that at its next look).
            let r = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
            match r {
                Ok(()) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOTEMPTY)
                        || e.kind() == std::io::ErrorKind::NotFound =>
                {
                    if repeat.is_zero() {
                        eprintln!("the agent restored pins while {what} was removed: {e}")
                    }
                }
                Err(e) => panic!("remove {what}: {e}"),
            }
            if started.elapsed() >= repeat {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let removed = Instant::now();
        while ![layout.join("LB4_SERVICES"), ct.clone(), link.clone()].iter().all(|p| p.exists()) {
            assert!(
                removed.elapsed() < Duration::from_secs(15),
                "pins not restored after {what} was removed:\n{}",
                c.lab.agent_log(&n1)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        restored_after.push(removed.elapsed().as_millis());
        std::thread::sleep(Duration::from_millis(700));
        let answers = tcp_asks(&c.client1, SocketAddrV4::new(VIP, 80), 20).expect("asks");
        assert!(answers.iter().all(Result::is_ok), "new connections after {what} was restored: {answers:?}");
    }
    let o = traffic.stop();
    // The same maps came back: tracked flows kept, the long-lived connection on its backend.
    assert!(c.maps(1).ct.keys().count() >= flows_before, "tracked flows kept");
    let first = &o.long_lived_answers[0];
    assert!(o.long_lived_answers.iter().all(|a| a == first), "the long-lived connection moved");
    let log = plain(&c.lab.agent_log(&n1));
    assert!(log.matches("pins are gone").count() >= 4 && log.contains("pins restored"), "{log}");
    // It held the same directory all along, or took the new one.
    assert!(!log.contains("another agent took"), "{log}");
    // New connections made in a gap (at most one tick each) may fail; say how many.
    eprintln!(
        "pins restored {restored_after:?} ms after each removal ({} restores tried again); {} new connections ok, {} \
         failed in the gaps",
        log.matches("tried again at the next tick").count(),
        o.new_ok,
        o.failures.len()
    );
}

/// `log` without its colours (ANSI escapes).
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
