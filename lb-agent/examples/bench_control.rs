//! Control-plane figures for the real agent binary: cold start (time to the first full sync, and
//! peak RSS) with many Services, from manifests and from an API server; and the latency from a
//! change (a file edit, a watch event) to the maps written, seen from outside through the pinned
//! maps. Run by `cargo xtask bench`.

#[path = "common/report.rs"]
mod report;

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use lb_agent::datapath::Maps;
use lb_common::Lb4ServiceKey;
use lb_testkit::api::MockApi;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// The lb-agent binary.
    #[arg(long)]
    agent: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    #[arg(long, default_value_t = 10)]
    endpoints: u32,
    /// Changes timed for the latency figures.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Write the results into this Markdown file (replacing the control-plane section).
    #[arg(long)]
    markdown: Option<PathBuf>,
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn service(i: u32) -> Value {
    let ip = vip(i).to_string();
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("s{i}"), "namespace": "bench"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

fn slice(i: u32, endpoints: u32, version: u32) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|j| {
            let stride = (endpoints + 1).next_power_of_two().max(16);
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * stride + j + version);
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("s{i}-1"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

struct Agent {
    child: Child,
    pin_dir: PathBuf,
    started: Instant,
}

impl Agent {
    fn start(bin: &Path, pin_dir: &Path, source: &[String]) -> anyhow::Result<Self> {
        Self::start_with(bin, pin_dir, source, &["--max-backends", "262144", "--maglev-slots", "33554432"])
    }

    /// As `start`, with `caps` (capacity flags; none: the defaults).
    fn start_with(bin: &Path, pin_dir: &Path, source: &[String], caps: &[&str]) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(pin_dir);
        let started = Instant::now();
        let child = Command::new(bin)
            .env("LB_SOCKET_LB", "off")
            .args(source)
            .args(["--interfaces", "lbbench-none*"])
            .args(caps)
            .args(["--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0"])
            .arg("--pin-dir")
            .arg(pin_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the agent")?;
        Ok(Self { child, pin_dir: pin_dir.into(), started })
    }

    /// Waits for the first full sync; returns its time and the agent's peak RSS (MiB) then.
    fn wait_first_sync(&mut self) -> anyhow::Result<(Duration, f64)> {
        let out = self.child.stdout.take().context("agent stdout")?;
        for line in BufReader::new(out).lines() {
            if line?.contains("first full sync done") {
                let elapsed = self.started.elapsed();
                let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
                let kib: f64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                return Ok((elapsed, kib / 1024.0));
            }
        }
        anyhow::bail!("the agent exited before its first sync")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// The kernel memory of every map pinned under `pin_dir` (the `memlock` of its fdinfo: what the
/// kernel charges for it), by map name, largest first. Since Linux 6.4 a hash map that is not
/// preallocated reports what its entries use (a lower bound: slab rounding and per-CPU caches
/// aside); before, every map reports its full capacity, so the figures mean something only on
/// 6.4 or later (the machine line gives the kernel).
fn map_memory(pin_dir: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut out = Vec::new();
    let mut dirs = vec![pin_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir)? {
            let path = e?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            // Links and programs are pinned too, and open here as well: only what the kernel
            // describes as a map (`map_type` in its fdinfo) is counted.
            let Ok(data) = aya::maps::MapData::from_pin(&path) else { continue };
            let fd = data.fd().as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
            if !info.lines().any(|l| l.starts_with("map_type:")) {
                continue;
            }
            let bytes = info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .with_context(|| format!("no memlock in the fdinfo of {}", path.display()))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push((name, bytes));
        }
    }
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(out)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Polls the pinned service entry of frontend `i` until it has `backends` backends.
fn wait_backends(maps: &Maps, i: u32, backends: u32) -> anyhow::Result<()> {
    let key = Lb4ServiceKey::new(vip(i).octets(), 80, 6);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if maps.services.get(&key, 0).is_ok_and(|s| s.backend_count == backends) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "change never reached the maps");
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Agent arguments that make it watch `api` (through a kubeconfig written at `path`).
fn api_source(api: &MockApi, path: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::write(path, api.kubeconfig())?;
    Ok(vec!["--kubeconfig".into(), path.display().to_string(), "--node-name".into(), "node1".into()])
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = std::env::temp_dir().join(format!("lb-bench-control-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let pins = PathBuf::from(format!("/sys/fs/bpf/lb-bench-control-{}", std::process::id()));
    let date = report::today();
    let mut md = format!(
        "## Control plane\n\nCommand: `cargo xtask bench` (`bench_control`: the release agent binary as a process, changes observed through its pinned maps) · date: {date} · machine: {}\n\n",
        report::machine()
    );
    let (n, e) = (args.services, args.endpoints);

    // Cold start from manifests.
    let dir = tmp.join("manifests");
    std::fs::create_dir_all(&dir)?;
    let mut list = Vec::new();
    for i in 0..n {
        list.push(service(i));
        list.push(slice(i, e, 0));
    }
    std::fs::write(
        dir.join("all.json"),
        serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": list}))?,
    )?;
    let mut agent = Agent::start(&args.agent, &pins, &["--manifests".into(), dir.display().to_string()])?;
    let (t_files, rss_files) = agent.wait_first_sync()?;
    println!(
        "cold start, {n} services x {e} endpoints, from manifests: {:.2} s, peak RSS {rss_files:.0} MiB",
        t_files.as_secs_f64()
    );

    drop(agent);

    // Kernel memory of the maps at the default capacities, with the same Services loaded: on a
    // node without IPv6 (`--ipv6 off`: the lb6 maps keep one entry) and on a dual-stack one.
    let mut map_mem = Vec::new();
    for ipv6 in ["off", "on"] {
        let mut agent = Agent::start_with(
            &args.agent,
            &pins,
            &["--manifests".into(), dir.display().to_string()],
            &["--ipv6", ipv6],
        )?;
        agent.wait_first_sync()?;
        let maps = map_memory(&pins)?;
        let total: u64 = maps.iter().map(|m| m.1).sum();
        println!("map kernel memory at the default capacities, {n} services x {e} endpoints, --ipv6 {ipv6}: {:.1} MiB", mib(total));
        map_mem.push((ipv6, total, maps));
        drop(agent);
    }

    // File edits: one Service's endpoints alternate between e and e - 1.
    let small = tmp.join("small");
    std::fs::create_dir_all(&small)?;
    let write_small = |count: u32| -> anyhow::Result<()> {
        let objs = json!({"apiVersion": "v1", "kind": "List", "items": [service(0), slice(0, count, 0)]});
        let t = small.join(".next.json");
        std::fs::write(&t, serde_json::to_vec(&objs)?)?;
        std::fs::rename(&t, small.join("objects.json"))?;
        Ok(())
    };
    write_small(e)?;
    let mut agent = Agent::start(&args.agent, &pins, &["--manifests".into(), small.display().to_string()])?;
    agent.wait_first_sync()?;
    let maps = Maps::from_pins(&pins)?;
    let mut file_lat = Vec::new();
    for k in 0..args.changes {
        let count = if k % 2 == 0 { e - 1 } else { e };
        let t = Instant::now();
        write_small(count)?;
        wait_backends(&maps, 0, count)?;
        file_lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(maps);
    drop(agent);
    let (fp50, fp99, fmax) = percentiles(file_lat);
    println!(
        "file edit -> maps written ({} changes): p50 {fp50:.2} ms, p99 {fp99:.2} ms, max {fmax:.2} ms",
        args.changes
    );

    // Cold start and watch events from an API server.
    let api = MockApi::start().await;
    api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}));
    for i in 0..n {
        api.apply(service(i));
        api.apply(slice(i, e, 0));
    }
    let source = api_source(&api, &tmp.join("kubeconfig"))?;
    let mut agent = Agent::start(&args.agent, &pins, &source)?;
    let (t_api, rss_api) = tokio::task::block_in_place(|| agent.wait_first_sync())?;
    println!(
        "cold start, {n} services x {e} endpoints, from the API server: {:.2} s, peak RSS {rss_api:.0} MiB",
        t_api.as_secs_f64()
    );
    let maps = Maps::from_pins(&pins)?;
    let mut api_lat = Vec::new();
    for k in 0..args.changes {
        let count = if k % 2 == 0 { e - 1 } else { e };
        let t = Instant::now();
        api.apply(slice(1, count, 0));
        tokio::task::block_in_place(|| wait_backends(&maps, 1, count))?;
        api_lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(maps);
    drop(agent);
    let (ap50, ap99, amax) = percentiles(api_lat);
    println!("watch event -> maps written ({} changes, {n} services loaded): p50 {ap50:.2} ms, p99 {ap99:.2} ms, max {amax:.2} ms", args.changes);

    // Cold start with fewer, larger Services.
    let (n2, e2) = (args.services / 10, args.endpoints * 10);
    let api2 = MockApi::start().await;
    api2.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}));
    for i in 0..n2 {
        api2.apply(service(i));
        api2.apply(slice(i, e2, 0));
    }
    let source2 = api_source(&api2, &tmp.join("kubeconfig2"))?;
    let mut agent = Agent::start(&args.agent, &pins, &source2)?;
    let (t_api2, rss_api2) = tokio::task::block_in_place(|| agent.wait_first_sync())?;
    drop(agent);
    println!(
        "cold start, {n2} services x {e2} endpoints, from the API server: {:.2} s, peak RSS {rss_api2:.0} MiB",
        t_api2.as_secs_f64()
    );

    md.push_str("| figure | value |\n|---|---|\n");
    md.push_str(&format!("| cold start, {n} Services × {e} endpoints, from manifests (one JSON List) | {:.2} s to the first full sync, peak RSS {rss_files:.0} MiB |\n", t_files.as_secs_f64()));
    md.push_str(&format!("| cold start, {n} Services × {e} endpoints, from the in-process API server | {:.2} s to the first full sync, peak RSS {rss_api:.0} MiB |\n", t_api.as_secs_f64()));
    md.push_str(&format!("| cold start, {n2} Services × {e2} endpoints, from the in-process API server | {:.2} s to the first full sync, peak RSS {rss_api2:.0} MiB |\n", t_api2.as_secs_f64()));
    md.push_str(&format!(
        "| file edit → maps written, {} changes | p50 {fp50:.2} ms, p99 {fp99:.2} ms, max {fmax:.2} ms |\n",
        args.changes
    ));
    md.push_str(&format!("| watch event → maps written, {} changes, {n} Services loaded | p50 {ap50:.2} ms, p99 {ap99:.2} ms, max {amax:.2} ms |\n", args.changes));
    for (ipv6, total, _) in &map_mem {
        md.push_str(&format!(
            "| kernel memory of the maps at the default capacities, {n} Services × {e} endpoints loaded, `--ipv6 {ipv6}` | {:.1} MiB |\n",
            mib(*total)
        ));
    }
    if let Some((_, total, maps)) = map_mem.first() {
        md.push_str(&format!(
            "\nKernel memory of each map (`memlock` in its fdinfo; a hash map that is not preallocated reports its entries' use from Linux 6.4, before that its capacity), `--ipv6 off`, the maps that take 1 % or more of the {:.1} MiB:\n\n| map | MiB |\n|---|---:|\n",
            mib(*total)
        ));
        for (name, bytes) in maps.iter().filter(|m| m.1 * 100 >= *total) {
            md.push_str(&format!("| {name} | {:.1} |\n", mib(*bytes)));
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(&pins);
    if let Some(path) = args.markdown {
        report::write_section(&path, "control-plane", &md)?;
    }
    Ok(())
}
