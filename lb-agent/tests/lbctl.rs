//! lbctl against maps written by the real agent: every command, both output formats. (Its errors
//! are tested in lbctl's own package.)

mod support;

use std::{net::SocketAddrV4, process::Command};

use lb_agent::datapath::Mode;
use lb_testkit::lab::tcp_asks;
use serde_json::Value;
use support::{endpoint, who, Cluster, VIP};

/// lbctl is its own package: a workspace `cargo test` (the README's test command) builds its
/// binary beside the agent's. `cargo test -p lb-agent` alone does not (cargo has no stable way for
/// one package's tests to depend on another's binary), so run `cargo build -p lbctl` first then.
fn lbctl_bin() -> std::path::PathBuf {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_lb-agent")).with_file_name("lbctl");
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build -p lbctl` (a workspace `cargo test` builds it)",
        bin.display()
    );
    bin
}

fn lbctl(pin_dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(lbctl_bin()).arg("--pin-dir").arg(pin_dir).args(args).output().expect("run lbctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(pin_dir: &std::path::Path, args: &[&str]) -> Value {
    let mut a = vec!["-o", "json"];
    a.extend_from_slice(args);
    let (ok, out, err) = lbctl(pin_dir, &a);
    assert!(ok, "lbctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("lbctl {args:?}: not JSON ({e}):\n{out}"))
}

#[test]
fn lbctl_shows_what_the_agent_programmed() {
    let spec = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}";
    let c = Cluster::new(
        "ctl",
        Mode::Tc,
        true,
        |b| who(spec, &b.iter().map(|p| endpoint(p, "ready: true")).collect::<Vec<_>>()),
        // Closed flows stay while the views are compared (a sweep would change their number).
        // IPv6 on: the lab's nodes have no global IPv6 address, so `auto` would refuse the IPv6
        // Service below.
        &["--ct-timeout-tcp-close", "600", "--ipv6", "on"],
    );
    c.wait_reachable(&c.client1, 80);
    let answers = tcp_asks(&c.client1, SocketAddrV4::new(VIP, 80), 20).expect("traffic");
    assert!(answers.iter().all(Result::is_ok));
    let pins = &c.nodes[0].pin_dir;

    // services: the documented JSON fields.
    let v = json(pins, &["services"]);
    let list = v.as_array().expect("array of frontends");
    assert_eq!(list.len(), 2, "{v:#}");
    let tcp = list.iter().find(|s| s["protocol"] == "TCP").expect("TCP frontend");
    assert_eq!((tcp["vip"].as_str(), tcp["port"].as_u64()), (Some("10.96.0.10"), Some(80)));
    assert_eq!(tcp["service"], "demo/who:tcp");
    assert_eq!(tcp["affinity_timeout_seconds"], 30);
    let backends = tcp["backends"].as_array().expect("backends");
    let mut ips: Vec<&str> = backends.iter().map(|b| b["ip"].as_str().expect("ip")).collect();
    ips.sort();
    assert_eq!(ips, ["10.244.1.2", "10.244.1.3", "10.244.2.4"]);
    assert!(backends.iter().all(|b| b["port"] == 8080 && b["state"] == "active"));
    let slots: u64 = backends.iter().map(|b| b["slots"].as_u64().expect("slots")).sum();
    assert_eq!(slots, tcp["table_size"].as_u64().expect("table size"));

    // The table form says the same.
    let (ok, out, _) = lbctl(pins, &["services"]);
    assert!(
        ok && out.contains("10.96.0.10:80/TCP")
            && out.contains("demo/who:tcp")
            && out.contains("ClientIP 30s"),
        "{out}"
    );

    let v = json(pins, &["backends"]);
    assert_eq!(v.as_array().expect("backends").len(), 6, "3 pods x 2 ports: {v:#}");

    let v = json(pins, &["maglev", "demo/who:tcp", "--raw"]);
    assert_eq!(
        v["slots"].as_array().expect("raw slots").len() as u64,
        v["service"]["table_size"].as_u64().expect("size")
    );
    let (ok, out, _) = lbctl(pins, &["maglev", "10.96.0.10:80/TCP"]);
    assert!(ok && out.contains("SHARE"), "{out}");

    // conntrack: the client's flows, all to the backend affinity chose.
    let v = json(pins, &["conntrack", "--service", "demo/who:tcp"]);
    let flows = v.as_array().expect("flows");
    assert!(flows.len() >= 20, "{v:#}");
    assert!(flows.iter().all(|f| f["client"].as_str().is_some_and(|c| c.starts_with("10.244.1.10:"))
        && f["vip"] == "10.96.0.10:80"));
    let backend = flows[0]["backend"].as_str().expect("backend");
    assert!(flows.iter().all(|f| f["backend"] == backend), "affinity: one backend");
    let only = json(pins, &["conntrack", "--backend", backend.split(':').next().expect("ip")]);
    assert_eq!(only.as_array().expect("flows").len(), flows.len());

    let v = json(pins, &["stats"]);
    assert!(v["counters"]["fwd_new_flow"].as_u64().expect("counter") >= 20);
    assert!(v["services"]
        .as_array()
        .expect("per service")
        .iter()
        .any(|s| s["service"] == "demo/who:tcp" && s["new_flows"].as_u64() >= Some(20)));

    // monitor: events appear while it listens (new flows, and drops with their reason), and
    // lbctl only moved its read position.
    // A Service with no endpoints, for a reject.
    let empty = "---\napiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: demo}\nspec: {clusterIP: 10.96.0.20, ports: [{name: tcp, port: 80}]}\n";
    let eps: Vec<String> = c.backends.iter().map(|p| endpoint(p, "ready: true")).collect();
    c.write(&format!("{}{empty}", who(spec, &eps)));
    lb_testkit::lab::wait_until(std::time::Duration::from_secs(5), || {
        let v = json(pins, &["services"]);
        if v.as_array().is_some_and(|a| a.len() == 3) {
            Ok(())
        } else {
            Err(std::io::Error::other("not yet"))
        }
    })
    .expect("the empty Service programmed");
    let monitor = Command::new(lbctl_bin())
        .arg("--pin-dir")
        .arg(pins)
        .args(["-o", "json", "monitor", "--count", "4", "--timeout", "10"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lbctl monitor");
    // Events sent before it listens are history it skips: traffic once it says it listens.
    let mut said = String::new();
    let mut monitor = monitor;
    // (Kept open until it ends: its later errors are written here.)
    let mut stderr = std::io::BufReader::new(monitor.stderr.take().expect("stderr"));
    std::io::BufRead::read_line(&mut stderr, &mut said).expect("monitor's stderr");
    assert!(said.starts_with("listening"), "lbctl monitor: {said}");
    let _ = tcp_asks(&c.client1, SocketAddrV4::new(VIP, 80), 3).expect("traffic");
    let dropped =
        tcp_asks(&c.client1, SocketAddrV4::new("10.96.0.20".parse().expect("ip"), 80), 1).expect("attempt");
    assert!(dropped[0].is_err());
    let out = monitor.wait_with_output().expect("monitor output");
    drop(stderr);
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 4, "events: {lines:?}");
    assert!(
        lines[..3].iter().all(|e| e["kind"] == "new-flow"
            && e["vip"] == "10.96.0.10:80"
            && e["service"] == "demo/who:tcp"
            && e["backend"].is_string()),
        "{lines:?}"
    );
    assert_eq!(
        (&lines[3]["kind"], &lines[3]["reason"], &lines[3]["vip"]),
        (&Value::from("reject"), &Value::from("no_backend"), &Value::from("10.96.0.20:80")),
        "{lines:?}"
    );
    // Events stay on (the agent's switch); lbctl wrote nothing (its maps are read-only handles).
    assert!(c.maps(1).flow_events(), "flow events on");

    // An IPv6 Service: the agent writes it to the lb6 maps, and every view shows it in brackets.
    let six = "---\napiVersion: v1\nkind: Service\nmetadata: {name: six, namespace: demo}\nspec: {clusterIPs: [\"fd00:10:96::10\"], ipFamilies: [IPv6], ports: [{name: tcp, port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: six-1, namespace: demo, labels: {kubernetes.io/service-name: six}}\naddressType: IPv6\nports: [{name: tcp, port: 8080}]\nendpoints: [{addresses: [\"fd00:10:244:1::2\"]}, {addresses: [\"fd00:10:244:2::4\"]}]\n";
    c.write(&format!("{}{empty}{six}", who(spec, &eps)));
    lb_testkit::lab::wait_until(std::time::Duration::from_secs(5), || {
        let v = json(pins, &["services"]);
        if v.as_array().is_some_and(|a| a.len() == 4) {
            Ok(())
        } else {
            Err(std::io::Error::other("not yet"))
        }
    })
    .expect("the IPv6 Service programmed");
    let v = json(pins, &["services"]);
    let six = v.as_array().expect("frontends").iter().find(|s| s["service"] == "demo/six:tcp").expect("IPv6");
    assert_eq!((six["vip"].as_str(), six["port"].as_u64()), (Some("fd00:10:96::10"), Some(80)), "{six:#}");
    let mut ips: Vec<&str> =
        six["backends"].as_array().expect("backends").iter().map(|b| b["ip"].as_str().expect("ip")).collect();
    ips.sort();
    assert_eq!(ips, ["fd00:10:244:1::2", "fd00:10:244:2::4"]);
    let (ok, out, _) = lbctl(pins, &["services"]);
    assert!(
        ok && out.contains("[fd00:10:96::10]:80/TCP") && out.contains("[fd00:10:244:1::2]:8080"),
        "{out}"
    );
    let (ok, out, _) = lbctl(pins, &["backends"]);
    assert!(ok && out.contains("[fd00:10:244:2::4]:8080/TCP"), "{out}");
    let (ok, out, err) = lbctl(pins, &["maglev", "[fd00:10:96::10]:80/TCP"]);
    assert!(
        ok && out.contains("[fd00:10:96::10]:80/TCP demo/six:tcp") && out.contains("SHARE"),
        "{out}{err}"
    );

    // lbctl works while the agent is down.
    let mut c = c;
    let n1 = c.nodes[0].clone();
    c.lab.stop_agent(&n1, libc::SIGTERM);
    assert_eq!(json(&n1.pin_dir, &["services"]).as_array().map(Vec::len), Some(4));
}
