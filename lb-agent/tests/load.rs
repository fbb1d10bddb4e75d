//! Load: 10,000 Services × 10 endpoints programmed through the API server while a client opens
//! connections without pause, then 100 endpoint changes a second (`LB_SOAK_SECS`, 60 s here;
//! `cargo xtask soak` runs 10 minutes), one Service with live backends among them. Asserted: no
//! connection to a backend that stays alive fails, and a long-lived connection never moves.
//! Reported: the time to program the 10,000 Services, the agent's RSS over the run, and the
//! programming latency of the changes (from the agent's metrics).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_agent::datapath::{Maps, Mode};
use lb_common::Lb4ServiceKey;
use lb_testkit::{
    api::MockApi,
    lab::{http_get, in_netns, wait_until, Lab, Session},
};
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn service(name: &str, vip: Ipv4Addr, target: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "load"},
        "spec": {"clusterIP": vip.to_string(), "clusterIPs": [vip.to_string()],
            "ports": [{"name": "tcp", "port": 80, "targetPort": target, "protocol": "TCP"}]}})
}

fn slice(name: &str, port: u16, ips: &[Ipv4Addr]) -> Value {
    let eps: Vec<Value> =
        ips.iter().map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "load", "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4", "ports": [{"name": "tcp", "port": port, "protocol": "TCP"}], "endpoints": eps})
}

/// Filler Service `i` (never reached) and its `n` endpoints.
fn filler(i: u32, n: u32) -> (Value, Value) {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i);
    let ips: Vec<Ipv4Addr> =
        (0..n).map(|j| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 16 + j)).collect();
    let name = format!("f{i}");
    (service(&name, vip, 8080), slice(&name, 8080, &ips))
}

/// The least-squares slope (MiB a minute) of the samples taken from `from` seconds on, and how many
/// those are.
fn rss_slope(samples: &[(f64, f64)], from: f64) -> (f64, usize) {
    let tail: Vec<(f64, f64)> = samples.iter().copied().filter(|(t, _)| *t >= from).collect();
    let n = tail.len() as f64;
    if tail.len() < 2 {
        return (f64::NAN, tail.len());
    }
    let (mt, mr) = (tail.iter().map(|s| s.0).sum::<f64>() / n, tail.iter().map(|s| s.1).sum::<f64>() / n);
    let cov: f64 = tail.iter().map(|(t, r)| (t - mt) * (r - mr)).sum();
    let var: f64 = tail.iter().map(|(t, _)| (t - mt) * (t - mt)).sum();
    (cov / var * 60.0, tail.len())
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(str::to_string))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The latency below which `q` of the observations of a Prometheus histogram fall (the upper
/// bound of the bucket it lands in).
fn quantile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, count.parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    buckets.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| *le)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_services_and_churn_under_traffic_lose_no_connection() {
    let secs: u64 = std::env::var("LB_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let mut lab = Lab::new("load").expect("lab");
    let n1 = lab.node(1).expect("node");
    let client = lab.pod(&n1, "c1", 10, true).expect("client");
    let backends: Vec<_> =
        (2..5).map(|i| lab.pod(&n1, &format!("b{i}"), i, true).expect("backend")).collect();
    for b in &backends {
        lab.serve_tcp(b, 8080).expect("server");
    }
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.ip).collect();

    // The API server listens inside the node's namespace, where the agent runs.
    let listener =
        in_netns(&n1.netns, || std::net::TcpListener::bind("127.0.0.1:0")).expect("netns").expect("bind");
    let api = MockApi::start_on(listener).await;
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}));
    api.apply(service("web", VIP, 8080));
    api.apply(slice("web", 8080, &ips));
    let kubeconfig = lab.scratch().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let source = ["--kubeconfig".to_string(), kubeconfig.display().to_string()];
    // Default capacities: they hold 10,000 Services × 10 endpoints.
    lab.start_agent_with(&n1, std::path::Path::new(AGENT), &source, Mode::Tc, &[]).expect("agent");
    let to = SocketAddrV4::new(VIP, 80);
    let (ns, log) = (client.netns.clone(), lab.agent_log_path(&n1));
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), || lb_testkit::lab::tcp_asks(&client, to, 1)?.pop().expect("one"))
    })
    .unwrap_or_else(|e| {
        panic!("web unreachable: {e}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
    });
    let pid = lab.agent_pid(&n1).expect("agent pid");

    // A client that opens connections without pause and keeps one open.
    let stop = Arc::new(AtomicBool::new(false));
    let mut session = Session::open(&client, to).expect("long-lived connection");
    let s = stop.clone();
    let traffic = std::thread::spawn(move || {
        in_netns(&ns, move || {
            let (mut ok, mut failures, mut answers) = (0usize, Vec::new(), Vec::new());
            while !s.load(Ordering::Relaxed) {
                match Session::connect(to).and_then(|mut c| c.ask()) {
                    Ok(_) => ok += 1,
                    Err(e) => failures.push(format!("new connection: {e}")),
                }
                match session.ask() {
                    Ok(a) => answers.push(a),
                    Err(e) => failures.push(format!("long-lived connection: {e}")),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (ok, failures, answers)
        })
        .expect("traffic thread")
    });

    // 10,000 Services × 10 endpoints arrive while the traffic runs.
    let started = Instant::now();
    for i in 0..10_000 {
        let (svc, sl) = filler(i, 10);
        api.apply(svc);
        api.apply(sl);
    }
    let maps = Maps::from_pins_read_only(&n1.pin_dir).expect("maps");
    let last = Lb4ServiceKey::new(Ipv4Addr::new(10, 100, 39, 15).octets(), 80, 6); // filler 9999
    tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), || {
            maps.services
                .get(&last, 0)
                .ok()
                .filter(|s| s.backend_count == 10)
                .ok_or_else(|| std::io::Error::other("not yet"))
        })
    })
    .unwrap_or_else(|e| {
        let log = lab.agent_log(&n1);
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!("10,000 Services not programmed: {e}; agent log ends:\n{}", tail.join("\n"))
    });
    let programmed = started.elapsed();
    let rss_after_load = rss_mib(pid);

    // Churn: 100 endpoint changes a second, each a filler Service going between 10 and 9
    // endpoints; every 200th change takes b4 out of web or puts it back (it stays alive, so its
    // established connections drain and new ones go to b2 and b3).
    let churn_started = Instant::now();
    let (mut changes, mut rss_max) = (0u64, rss_after_load);
    // (seconds into the churn, RSS) about once a second, for the slope of its last five minutes.
    let mut rss_samples: Vec<(f64, f64)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while churn_started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        let i = (changes * 7919 % 10_000) as u32;
        let (_, sl) = filler(i, if (changes / 10_000) % 2 == 0 { 9 } else { 10 });
        api.apply(sl);
        if changes % 200 == 199 {
            let with_b3 = (changes / 200) % 2 == 1;
            api.apply(slice("web", 8080, if with_b3 { &ips } else { &ips[..2] }));
        }
        changes += 1;
        if changes % 100 == 0 {
            let rss = rss_mib(pid);
            rss_max = rss_max.max(rss);
            rss_samples.push((churn_started.elapsed().as_secs_f64(), rss));
        }
    }
    let churn = churn_started.elapsed();
    // The figure: the last five minutes. The churn repeats every 200 s (filler slices go
    // from 9 endpoints to 10 and back, 10,000 changes each way), so the last 400 s (two whole
    // cycles, after the first pass over the Services) are fitted too. Measured, not asserted.
    let end = churn.as_secs_f64();
    let window = 300f64.min(end / 2.0);
    let (slope, fitted) = rss_slope(&rss_samples, end - window);
    let cycles = 400f64.min(((end - 100.0) / 200.0).floor().max(0.0) * 200.0);
    let (slope_cycles, _) = rss_slope(&rss_samples, end - cycles);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failures, answers) = tokio::task::block_in_place(|| traffic.join().expect("traffic"));
    let metrics = tokio::task::block_in_place(|| {
        http_get(&n1.netns, "127.0.0.1:10249".parse().expect("addr"), "/metrics").expect("metrics").1
    });
    let p50 = quantile(&metrics, "lb_network_programming_duration_seconds", 0.5).unwrap_or(f64::NAN);
    let p99 = quantile(&metrics, "lb_network_programming_duration_seconds", 0.99).unwrap_or(f64::NAN);
    println!(
        "load: 10,000 Services x 10 endpoints programmed in {:.2} s under traffic; {changes} endpoint changes in \
         {:.1} s ({:.0}/s); {ok} new connections, {} failed; agent RSS {rss_after_load:.0} MiB after the load, \
         at most {rss_max:.0} MiB during the churn, {:.0} MiB at the end, a fitted slope of {slope:.2} MiB/min \
         over the last {window:.0} s ({fitted} samples; {slope_cycles:.2} MiB/min over the last {cycles:.0} s, \
         whole cycles of the churn); programming latency p50 <= {:.1} ms, \
         p99 <= {:.1} ms (histogram buckets)",
        programmed.as_secs_f64(),
        churn.as_secs_f64(),
        changes as f64 / churn.as_secs_f64(),
        failures.len(),
        rss_mib(pid),
        p50 * 1e3,
        p99 * 1e3,
    );
    assert!(failures.is_empty(), "{} failures, first: {:?}", failures.len(), failures.first());
    assert!(ok > 100, "traffic ran: {ok} connections");
    assert!(answers.iter().all(|a| *a == answers[0]), "the long-lived connection moved");
    assert!(changes as f64 >= 0.9 * 100.0 * secs as f64, "the churn kept its rate: {changes} changes");
    drop(maps);
    lab.stop_agents();
}
