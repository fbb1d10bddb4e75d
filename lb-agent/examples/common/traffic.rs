//! What the traffic benchmarks share: commands in network namespaces, nginx backends, wrk runs
//! and their CPU cost from /proc/stat, and the statistics over runs.

// Shared by several benchmark programs, each using a part.
#![allow(dead_code)]

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lb_testkit::lab::{http_get, wait_until, Pod};

/// Runs `program` inside `netns` (pinned to `cpu` if given) and returns its standard output.
pub fn netns_cmd(netns: &str, cpu: Option<u32>, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]);
    if let Some(cpu) = cpu {
        cmd.args(["taskset", "-c", &cpu.to_string()]);
    }
    cmd.arg(program);
    cmd
}

pub fn run_with_input(mut cmd: Command, input: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).lines().take(5).collect::<Vec<_>>().join("; ")
        );
    }
    Ok(took)
}

pub fn sysctl(netns: &str, setting: &str) -> anyhow::Result<()> {
    let st = netns_cmd(netns, None, "sysctl").args(["-qw", setting]).status()?;
    anyhow::ensure!(st.success(), "sysctl {setting} in {netns} failed");
    Ok(())
}

/// nginx processes, stopped when dropped.
pub struct Nginx(pub Vec<Child>);

impl Drop for Nginx {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub const BIG_FILE_MIB: usize = 64;

/// Starts nginx in each of `pods`, listening on port 80 of its IPv4 address and, in a dual-stack
/// lab, of its IPv6 address too; returns when each answers on every address.
pub fn start_nginx(scratch: &Path, pods: &[Pod]) -> anyhow::Result<Nginx> {
    let www = scratch.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "hello from a backend\n")?;
    std::fs::write(www.join("big"), vec![0x5au8; BIG_FILE_MIB << 20])?;
    let mut children = Nginx(Vec::new());
    for p in pods {
        sysctl(&p.netns, "net.core.somaxconn=4096")?;
        let conf = scratch.join(format!("nginx-{}.conf", p.name));
        let tmp = scratch.join(format!("nginx-tmp-{}", p.name));
        std::fs::create_dir_all(&tmp)?;
        let listen6 = p.ip6.map(|a| format!(" listen [{a}]:80 backlog=4096 reuseport;")).unwrap_or_default();
        std::fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 1;\ndaemon off;\npid {s}/nginx-{n}.pid;\nerror_log {s}/nginx-{n}.err warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n access_log off;\n sendfile on;\n tcp_nopush on;\n keepalive_requests 1000000000;\n\
                 client_body_temp_path {t}/body;\n proxy_temp_path {t}/proxy;\n fastcgi_temp_path {t}/fcgi;\n\
                 uwsgi_temp_path {t}/uwsgi;\n scgi_temp_path {t}/scgi;\n\
                 server {{ listen {ip}:80 backlog=4096 reuseport;{listen6} root {www}; }}\n}}\n",
                s = scratch.display(),
                n = p.name,
                t = tmp.display(),
                ip = p.ip,
                www = www.display()
            ),
        )?;
        let child = netns_cmd(&p.netns, Some(1), "nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(scratch.join(format!("nginx-{}.err", p.name)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        children.0.push(child);
    }
    for p in pods {
        let addrs = std::iter::once(IpAddr::V4(p.ip)).chain(p.ip6.map(IpAddr::V6));
        for to in addrs.map(|a| SocketAddr::from((a, 80))) {
            let ns = p.netns.clone();
            wait_until(Duration::from_secs(10), || match http_get(&ns, to, "/")? {
                (200, _) => Ok(()),
                (code, _) => Err(std::io::Error::other(format!("nginx answered {code}"))),
            })
            .with_context(|| format!("nginx in {} never answered on {to}", p.name))?;
        }
    }
    Ok(children)
}

/// Busy and softirq time of all CPUs so far, in clock ticks.
pub fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 7 {
        return (0, 0);
    }
    // user nice system idle iowait irq softirq steal ...
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v.get(7).copied().unwrap_or(0);
    (busy, v[6])
}

pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// What one wrk run reported.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    /// Bytes per second.
    pub transfer: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    pub cpu_us_per_req: f64,
    pub softirq_us_per_req: f64,
}

pub fn parse_duration_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        _ => return None,
    })
}

pub fn parse_bytes(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    let k = match unit {
        "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(n * k)
}

pub fn parse_wrk(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse()?,
            ["Transfer/sec:", v] => r.transfer = parse_bytes(v).context("transfer")?,
            ["50%", v] => r.p50_ms = parse_duration_ms(v).context("p50")?,
            ["99%", v] => r.p99_ms = parse_duration_ms(v).context("p99")?,
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            ["Socket", "errors:", rest @ ..] => {
                r.errors +=
                    rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            _ => {}
        }
    }
    anyhow::ensure!(r.requests > 0, "wrk made no requests:\n{out}");
    Ok(r)
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Load {
    NewConnections,
    KeptAlive,
    Bulk,
}

pub fn wrk(netns: &str, url: &str, load: Load, seconds: u32) -> anyhow::Result<WrkResult> {
    wrk_in(netns, None, url, load, seconds)
}

/// As [`wrk`], with wrk in cgroup `cgroup` (a directory of a cgroup v2 hierarchy) if given: where
/// socket-level load balancing's programs are attached.
pub fn wrk_in(
    netns: &str,
    cgroup: Option<&Path>,
    url: &str,
    load: Load,
    seconds: u32,
) -> anyhow::Result<WrkResult> {
    let mut cmd = netns_cmd(netns, Some(0), "wrk");
    let procs = match cgroup {
        Some(g) => Some(std::fs::OpenOptions::new().write(true).open(g.join("cgroup.procs"))?),
        None => None,
    };
    if let Some(procs) = &procs {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let fd = procs.as_raw_fd();
        // SAFETY: only write(2), async-signal-safe, between fork and exec: "0" moves the child
        // itself, and what it runs after, into the cgroup.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.args(["-t1", "--timeout", "5s", "-d", &format!("{seconds}s")]);
    match load {
        Load::NewConnections => cmd.args(["-c50", "-H", "Connection: close", url]),
        Load::KeptAlive => cmd.args(["-c50", "--latency", url]),
        Load::Bulk => cmd.args(["-c1", &format!("{url}big")]),
    };
    let before = cpu_ticks();
    let out = cmd.output().context("running wrk")?;
    let after = cpu_ticks();
    anyhow::ensure!(out.status.success(), "wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut r = parse_wrk(&String::from_utf8_lossy(&out.stdout))?;
    let us = 1e6 / ticks_per_sec() / r.requests as f64;
    r.cpu_us_per_req = (after.0 - before.0) as f64 * us;
    r.softirq_us_per_req = (after.1 - before.1) as f64 * us;
    Ok(r)
}

/// Min, median and max of one figure over the runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stat {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

pub fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Stat::default();
    }
    Stat { min: v[0], median: v[v.len() / 2], max: v[v.len() - 1] }
}

#[derive(Clone, Debug, Default)]
pub struct Measured {
    pub runs: Vec<WrkResult>,
}

impl Measured {
    pub fn of(&self, f: impl Fn(&WrkResult) -> f64) -> Stat {
        stat(self.runs.iter().map(f).collect())
    }
    pub fn errors(&self) -> u64 {
        self.runs.iter().map(|r| r.errors).sum()
    }
}

/// `a / b` to two places, or a dash when there is nothing to divide by.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

/// One row of a figure's table: `label`, the contender, the median (min–max) of figure `f` over
/// `m`'s runs with `digits` places, its ratio to each of `bases` (the same figure's medians for
/// direct, nftables, iptables-nft and iptables-legacy), and the errors.
pub fn figure_row(
    label: &str,
    contender: &str,
    m: &Measured,
    f: impl Fn(&WrkResult) -> f64,
    digits: usize,
    bases: [f64; 4],
) -> String {
    let s = m.of(&f);
    let ratios: Vec<String> = bases.iter().map(|b| ratio(s.median, *b)).collect();
    format!(
        "| {label} | {contender} | {:.*} ({:.*}–{:.*}) | {} | {} |",
        digits,
        s.median,
        digits,
        s.min,
        digits,
        s.max,
        ratios.join(" | "),
        m.errors()
    )
}
