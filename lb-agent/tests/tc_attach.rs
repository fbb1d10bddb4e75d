//! TC programs attached as clsact qdisc filters over netlink (`--tc-attach netlink`, what kernels
//! without TCX get): one filter per direction whatever the restarts, taken over in place under
//! traffic, other owners' filters untouched, a move to TCX and back removing the other kind, and
//! `--cleanup` deleting exactly lb's filters. Its waits are generous: the kernel matrix runs it
//! emulated, where an agent takes over ten seconds to load its programs.

mod support;

use std::{process::Command, time::Duration};

use aya::programs::TcAttachType;
use lb_agent::datapath::Mode;
use lb_testkit::lab::Node;
use support::{
    assert_clean_udp_kept, endpoint, lbctl_interfaces, tcx_programs, who, Cluster, Traffic, AGENT,
};

fn all_ready(c: &[lb_testkit::lab::Pod; 3]) -> String {
    who("", &c.iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>())
}

/// `tc filter show dev IFACE DIR` in `node`'s namespace, one line per filter.
fn filters(node: &Node, interface: &str, dir: &str) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .args(["tc", "filter", "show", "dev", interface, dir])
        .output()
        .expect("tc");
    // `tc` prints a line per priority and kind, then one per filter (with its handle).
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("filter") && l.contains(" handle "))
        .map(str::to_string)
        .collect()
}

fn tc(node: &Node, args: &[&str]) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .arg("tc")
        .args(args)
        .output()
        .expect("tc");
    assert!(out.status.success(), "tc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// lb's filters on `interface`: exactly one each way, lb's programs, at lb's priority and handle.
fn assert_lb_filters(node: &Node, interface: &str, what: &str) {
    for (dir, prog) in [("ingress", "lb4_tc_forward"), ("egress", "lb4_tc_reply")] {
        let lb: Vec<String> =
            filters(node, interface, dir).into_iter().filter(|l| l.contains("lb4_tc")).collect();
        assert_eq!(lb.len(), 1, "{what}: {interface} {dir}: {lb:?}");
        assert!(
            lb[0].contains(prog) && lb[0].contains("pref 1 ") && lb[0].contains("handle 0x1b"),
            "{what}: {lb:?}"
        );
    }
    if has_tcx() {
        assert!(
            tcx_programs(&node.netns, interface, TcAttachType::Ingress).is_empty(),
            "{what}: no TCX program"
        );
    }
}

#[test]
fn netlink_filters_are_replaced_in_place_and_cleaned_up_exactly() {
    let mut c = Cluster::new("nlf", Mode::Tc, true, all_ready, &["--tc-attach", "netlink"]);
    c.wait_reachable(&c.client1, 80);
    let n1 = c.nodes[0].clone();
    let iface = c.client1.host_if.clone();
    assert_lb_filters(&n1, &iface, "attached");
    // Another owner's filter, after lb's: never touched.
    // (classic BPF: its kernel module is the one lb needs anyway.)
    let classic = [
        "filter",
        "add",
        "dev",
        &iface,
        "ingress",
        "pref",
        "50",
        "handle",
        "7",
        "bpf",
        "bytecode",
        "1,6 0 0 4294967295,",
    ];
    tc(&n1, &classic);
    // lbctl shows both, in the order they run, lb's marked; an interface lb does not match has
    // nothing of lb's.
    let view = lbctl_interfaces(&n1);
    let v = &view[&iface];
    assert_eq!(v["lb"], "attached", "{v}");
    assert_eq!(
        hook(v, "ingress", 0),
        ("lb4_tc_forward".into(), "filter".into(), Some((1, 0x1b)), true),
        "{v}"
    );
    assert_eq!(hook(v, "ingress", 1), ("(classic bpf)".into(), "filter".into(), Some((50, 7)), false), "{v}");
    assert_eq!(hook(v, "egress", 0), ("lb4_tc_reply".into(), "filter".into(), Some((1, 0x1b)), true), "{v}");
    assert_eq!(view["lo"]["lb"], "none", "{view:?}");

    let traffic = Traffic::start(&c.client1);
    std::thread::sleep(Duration::from_millis(300));
    let program = |dir: &str| lbctl_interfaces(&n1)[&iface][dir][0]["program_id"].as_u64();
    let mut ids = (program("ingress"), program("egress"));
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        c.lab.stop_agent(&n1, signal);
        std::thread::sleep(Duration::from_millis(300));
        c.lab.restart_agent(&n1).expect("restart");
        // Ready (loaded and attached), then traffic through the new agent's programs a while.
        c.wait_ready(&n1);
        std::thread::sleep(Duration::from_millis(500));
        assert_lb_filters(&n1, &iface, "after a restart");
        // The new agent's programs are in them.
        let now = (program("ingress"), program("egress"));
        assert!(now.0 != ids.0 && now.1 != ids.1, "the filters still run the old programs: {ids:?} {now:?}");
        ids = now;
    }
    let o = traffic.stop();
    support::explain(&c, 1, &o);
    assert_clean_udp_kept(&o, "restarts with netlink filters");
    let other =
        |n: &Node| filters(n, &iface, "ingress").into_iter().filter(|l| l.contains("bytecode")).count();
    assert_eq!(other(&n1), 1, "the other owner's filter stays");

    // To TCX and back: the other kind goes (where the kernel has TCX).
    if has_tcx() {
        to_tcx_and_back(&mut c, &n1, &iface);
    } else {
        eprintln!(
            "note: this kernel has no TCX: the move between TCX and netlink filters is not tested here"
        );
    }

    // Ready means attached: an interface whose filter place another owner holds (a filter at
    // lb's priority and handle that lb did not record) keeps /readyz at 503, naming it, until it
    // can be attached.
    c.lab.stop_agent(&n1, libc::SIGTERM);
    let ip = |args: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", n1.netns))
            .arg("ip")
            .args(args)
            .output();
        assert!(out.expect("ip").status.success(), "ip {args:?}");
    };
    ip(&["link", "add", "lxcz0", "type", "veth", "peer", "name", "z1"]);
    ip(&["link", "set", "lxcz0", "up"]);
    tc(&n1, &["qdisc", "add", "dev", "lxcz0", "clsact"]);
    let squatter = [
        "filter",
        "add",
        "dev",
        "lxcz0",
        "ingress",
        "pref",
        "1",
        "handle",
        "0x1b",
        "bpf",
        "bytecode",
        "1,6 0 0 4294967295,",
    ];
    tc(&n1, &squatter);
    // And one with a legacy `ingress` qdisc: a filter for egress would land in its ingress block.
    ip(&["link", "add", "lxcy0", "type", "veth", "peer", "name", "y1"]);
    ip(&["link", "set", "lxcy0", "up"]);
    tc(&n1, &["qdisc", "add", "dev", "lxcy0", "ingress"]);
    start_as(&mut c, &n1, "netlink");
    let readyz =
        |n: &Node| lb_testkit::lab::http_get(&n.netns, "127.0.0.1:10256".parse().expect("addr"), "/readyz");
    // (Refused while the agent starts: retried.)
    let refused = lb_testkit::lab::wait_until(Duration::from_secs(90), || match readyz(&n1)? {
        (503, body) if body.contains("lxcz0: not attached") && body.contains("lxcy0: not attached") => {
            Ok(body)
        }
        other => Err(std::io::Error::other(format!("{other:?}"))),
    });
    assert!(refused.is_ok(), "/readyz while lxcz0 cannot be attached: {refused:?}\n{}", c.lab.agent_log(&n1));
    let metrics = lb_testkit::lab::http_get(&n1.netns, "127.0.0.1:10249".parse().expect("addr"), "/metrics")
        .expect("scrape")
        .1;
    assert!(metrics.contains("lb_interface_attach_failed{interface=\"lxcz0\"} 1"), "{metrics}");
    // lbctl shows it: nothing of lb's there (a half-done attach is undone), the other owner's
    // filter in lb's place.
    let v = &lbctl_interfaces(&n1)["lxcz0"];
    assert_eq!(v["lb"], "none", "{v}");
    assert_eq!(
        hook(v, "ingress", 0),
        ("(classic bpf)".into(), "filter".into(), Some((1, 0x1b)), false),
        "{v}"
    );
    assert_eq!(v["egress"].as_array().map(Vec::len), Some(0), "{v}");
    let body = readyz(&n1).expect("readyz").1;
    assert!(body.contains("lxcy0 has a 'ingress' qdisc where lb needs clsact"), "{body}");
    assert!(filters(&n1, "lxcy0", "ingress").is_empty(), "nothing of lb's in the legacy qdisc");
    ip(&["link", "del", "lxcy0"]);
    assert_eq!(filters(&n1, "lxcz0", "ingress").len(), 1, "the other owner's filter untouched");
    tc(&n1, &["filter", "del", "dev", "lxcz0", "ingress", "pref", "1", "handle", "0x1b", "bpf"]);
    let ready = lb_testkit::lab::wait_until(Duration::from_secs(30), || match readyz(&n1)? {
        (200, _) => Ok(()),
        other => Err(std::io::Error::other(format!("{other:?}"))),
    });
    assert!(ready.is_ok(), "ready once attached: {ready:?}");
    assert_lb_filters(&n1, "lxcz0", "attached after the other owner left");

    // A filter of lb's deleted under the agent (by hand, or with its qdisc) is noticed at the
    // next rescan and attached again.
    tc(&n1, &["qdisc", "del", "dev", "lxcz0", "clsact"]);
    let back = lb_testkit::lab::wait_until(Duration::from_secs(30), || {
        let both = ["ingress", "egress"]
            .iter()
            .all(|d| filters(&n1, "lxcz0", d).iter().any(|l| l.contains("lb4_tc")));
        if both {
            Ok(())
        } else {
            Err(std::io::Error::other("not yet"))
        }
    });
    assert!(back.is_ok(), "lb's filters on lxcz0 after its qdisc was deleted\n{}", c.lab.agent_log(&n1));
    assert_lb_filters(&n1, "lxcz0", "attached again");
    assert!(c.lab.agent_log(&n1).contains("lb's filter is gone"), "said");

    // --cleanup deletes lb's filters and nothing else.
    c.lab.stop_agent(&n1, libc::SIGTERM);
    support::cleanup(&n1);
    for dir in ["ingress", "egress"] {
        assert!(
            !filters(&n1, &iface, dir).iter().any(|l| l.contains("lb4_tc")),
            "{dir}: lb's filter deleted"
        );
    }
    assert_eq!(other(&n1), 1, "the other owner's filter stays");
}

#[test]
fn a_changed_tc_position_moves_the_filters_and_cleanup_finds_unrecorded_ones() {
    let mut c = Cluster::new("nlp", Mode::Tc, true, all_ready, &["--tc-attach", "netlink"]);
    c.wait_reachable(&c.client1, 80);
    let n1 = c.nodes[0].clone();
    let iface = c.client1.host_if.clone();
    assert_lb_filters(&n1, &iface, "attached");
    // Restarted with `--tc-position last` under traffic: the filters move to priority 0xfff0 (the
    // new one added before the old one goes: no packet meets neither), one each way.
    let traffic = Traffic::start(&c.client1);
    std::thread::sleep(Duration::from_millis(300));
    c.lab.stop_agent(&n1, libc::SIGTERM);
    c.lab
        .start_agent(
            &n1,
            std::path::Path::new(AGENT),
            &c.manifests,
            Mode::Tc,
            &["--tc-attach", "netlink", "--tc-position", "last"],
        )
        .expect("agent");
    c.wait_ready(&n1);
    std::thread::sleep(Duration::from_millis(500));
    let o = traffic.stop();
    support::explain(&c, 1, &o);
    assert_clean_udp_kept(&o, "a move to the last priority");
    for (dir, prog) in [("ingress", "lb4_tc_forward"), ("egress", "lb4_tc_reply")] {
        let lb: Vec<String> =
            filters(&n1, &iface, dir).into_iter().filter(|l| l.contains("lb4_tc")).collect();
        assert_eq!(lb.len(), 1, "{dir}: {lb:?}");
        assert!(
            lb[0].contains(prog) && lb[0].contains("pref 65520 ") && lb[0].contains("handle 0x1b"),
            "{lb:?}"
        );
    }
    let log = c.lab.agent_log(&n1);
    assert!(log.contains("lb's filter moved to the priority --tc-position asks for"), "said:\n{log}");

    // An agent killed between adding its filters and recording them: `--cleanup` finds them by
    // program name at lb's place, on every interface of the namespace; another owner's filter at
    // lb's place elsewhere stays.
    c.lab.stop_agent(&n1, libc::SIGKILL);
    let records = lb_agent::datapath::layout_dir(&n1.pin_dir).join(lb_common::MAP_LB_TC_FILTERS);
    let mut r = lb_agent::datapath::tc_filters::open(records.parent().expect("layout")).expect("records");
    let keys: Vec<_> = r.keys().filter_map(Result::ok).collect();
    // Both of the client's, and the namespace they belong to (the other pods' besides).
    assert!(keys.len() >= 3, "lb's filters were recorded: {keys:?}");
    for k in keys {
        r.remove(&k).expect("record removed");
    }
    drop(r);
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n1.netns))
        .args(["ip", "link", "add", "lxcw0", "type", "veth", "peer", "name", "w1"])
        .output()
        .expect("ip");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tc(&n1, &["qdisc", "add", "dev", "lxcw0", "clsact"]);
    for (dir, pref) in [("ingress", "1"), ("egress", "65520")] {
        tc(
            &n1,
            &[
                "filter",
                "add",
                "dev",
                "lxcw0",
                dir,
                "pref",
                pref,
                "handle",
                "0x1b",
                "bpf",
                "bytecode",
                "1,6 0 0 4294967295,",
            ],
        );
    }
    support::cleanup(&n1);
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n1.netns))
        .args(["ip", "-o", "link", "show"])
        .output()
        .expect("ip");
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n).to_string()))
        .collect();
    assert!(names.contains(&iface), "{names:?}");
    for dir in ["ingress", "egress"] {
        for name in &names {
            let left: Vec<String> =
                filters(&n1, name, dir).into_iter().filter(|l| l.contains("lb4_tc")).collect();
            assert!(left.is_empty(), "{name} {dir}: lb's unrecorded filter deleted: {left:?}");
        }
        assert_eq!(
            filters(&n1, "lxcw0", dir).len(),
            1,
            "{dir}: the other owner's filter at lb's place stays"
        );
    }
}

/// Hook `i` of `dir` in an `lbctl interfaces` view: (program, attach, (priority, handle), lb's).
fn hook(v: &serde_json::Value, dir: &str, i: usize) -> (String, String, Option<(u64, u64)>, bool) {
    let h = &v[dir][i];
    let place = h["priority"].as_u64().zip(h["handle"].as_u64());
    (
        h["program"].as_str().unwrap_or("(missing)").to_string(),
        h["attach"].as_str().unwrap_or("(missing)").to_string(),
        place,
        h["lb"] == true,
    )
}

/// Starts `node`'s agent with `--tc-attach` set to `attach`.
fn start_as(c: &mut Cluster, node: &Node, attach: &str) {
    c.lab
        .start_agent(node, std::path::Path::new(AGENT), &c.manifests, Mode::Tc, &["--tc-attach", attach])
        .expect("agent");
}

/// Whether the running kernel has TCX (Linux 6.6).
fn has_tcx() -> bool {
    lb_agent::datapath::probe::Kernel::probe().tcx
}

/// Restarts `n1`'s agent with TCX, then with netlink filters again: each time the other kind goes.
fn to_tcx_and_back(c: &mut Cluster, n1: &Node, iface: &str) {
    c.lab.stop_agent(n1, libc::SIGTERM);
    start_as(c, n1, "tcx");
    c.wait_reachable(&c.client1, 80);
    let gone = lb_testkit::lab::wait_until(Duration::from_secs(60), || {
        if filters(n1, iface, "ingress").iter().any(|l| l.contains("lb4_tc")) {
            Err(std::io::Error::other("lb's filter still there"))
        } else {
            Ok(())
        }
    });
    assert!(gone.is_ok(), "TCX took over, netlink filters removed: {:?}", filters(n1, iface, "ingress"));
    assert_eq!(tcx_programs(&n1.netns, iface, TcAttachType::Ingress), ["lb4_tc_forward"]);
    let v = &lbctl_interfaces(n1)[iface];
    assert_eq!(
        (&v["lb"], hook(v, "ingress", 0)),
        (&"attached".into(), ("lb4_tc_forward".into(), "tcx".into(), None, true))
    );
    assert_eq!(hook(v, "egress", 0), ("lb4_tc_reply".into(), "tcx".into(), None, true), "{v}");
    c.lab.stop_agent(n1, libc::SIGTERM);
    start_as(c, n1, "netlink");
    c.wait_reachable(&c.client1, 80);
    let tcx_gone = lb_testkit::lab::wait_until(Duration::from_secs(60), || {
        if tcx_programs(&n1.netns, iface, TcAttachType::Ingress).is_empty() {
            Ok(())
        } else {
            Err(std::io::Error::other("TCX still there"))
        }
    });
    assert!(tcx_gone.is_ok(), "back to netlink, TCX links removed");
    assert_lb_filters(n1, iface, "back to netlink");
}

/// What lb reads of an interface's qdisc and filters over netlink, for each state its ingress
/// place can be in: never used, clsact (filters each way), clsact deleted (the built-in `noop`
/// left, which the kernel does not answer for), a legacy `ingress` qdisc (one block, answered for
/// either direction: its filters are ingress filters only), and an interface that is gone (nothing:
/// its filters went with it).
#[test]
fn netlink_reads_every_state_of_the_ingress_place() {
    use lb_agent::datapath::netlink::{filters, qdisc_kind};
    let mut lab = lb_testkit::lab::Lab::new("nlq").expect("lab");
    let node = lab.node(1).expect("node");
    let classic = "1,6 0 0 4294967295,";
    for i in 0..4 {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.netns))
            .args(["ip", "link", "add", &format!("a{i}"), "type", "veth", "peer", "name", &format!("b{i}")])
            .output()
            .expect("ip");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    tc(&node, &["qdisc", "add", "dev", "a1", "clsact"]);
    tc(
        &node,
        &["filter", "add", "dev", "a1", "ingress", "pref", "5", "handle", "3", "bpf", "bytecode", classic],
    );
    tc(
        &node,
        &["filter", "add", "dev", "a1", "egress", "pref", "6", "handle", "4", "bpf", "bytecode", classic],
    );
    tc(&node, &["qdisc", "add", "dev", "a2", "clsact"]);
    tc(&node, &["qdisc", "del", "dev", "a2", "clsact"]);
    tc(&node, &["qdisc", "add", "dev", "a3", "ingress"]);
    tc(
        &node,
        &["filter", "add", "dev", "a3", "ingress", "pref", "7", "handle", "5", "bpf", "bytecode", classic],
    );
    type Read = (Option<String>, Vec<(u16, u32)>, Vec<(u16, u32)>);
    let read = |index: u32| -> std::io::Result<Read> {
        let places = |egress| -> std::io::Result<Vec<(u16, u32)>> {
            Ok(filters(index, egress)?.into_iter().map(|f| (f.priority, f.handle)).collect())
        };
        Ok((qdisc_kind(index)?, places(false)?, places(true)?))
    };
    let (got, gone) = lb_testkit::lab::in_netns(&node.netns, move || {
        let got: Vec<std::io::Result<Read>> = (0..4)
            .map(|i| {
                let name = std::ffi::CString::new(format!("a{i}")).expect("name");
                // SAFETY: a NUL-terminated name.
                read(unsafe { libc::if_nametoindex(name.as_ptr()) })
            })
            .collect();
        (got, read(999_999).map_err(|e| e.to_string()))
    })
    .expect("in the namespace");
    let got: Vec<Read> = got.into_iter().map(|r| r.expect("read")).collect();
    assert_eq!(
        got,
        [
            (None, vec![], vec![]),
            (Some("clsact".to_string()), vec![(5, 3)], vec![(6, 4)]),
            (None, vec![], vec![]),
            (Some("ingress".to_string()), vec![(7, 5)], vec![]),
        ]
    );
    assert_eq!(gone, Ok((None, vec![], vec![])), "an interface that is gone");
}
