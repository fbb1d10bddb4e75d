//! lbctl: shows what the lb datapath will do, read from the pinned maps. Read-only; works while
//! the agent is down and needs no API access.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use lb_agent::{
    datapath::{DatapathError, Maps},
    inspect,
};

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Inspect the lb datapath (read-only)")]
struct Args {
    /// The agent's --pin-dir.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/lb")]
    pin_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every frontend (VIP:port/protocol) with its Service, backends, affinity and table size.
    Services,
    /// Every backend entry and its state.
    Backends,
    /// One frontend's Maglev table: each backend's share (and the slots with --raw).
    Maglev {
        /// `VIP:port/PROTO`, `VIP:port`, `namespace/name:port` or `namespace/name`.
        service: String,
        #[arg(long)]
        raw: bool,
    },
    /// Tracked flows: client, VIP, backend, protocol, state, age.
    Conntrack {
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        backend: Option<IpAddr>,
    },
    /// Datapath counters and drop reasons, and per-Service statistics.
    Stats,
    /// Every interface of this network namespace and the BPF programs on its hooks (TCX, clsact
    /// filters, XDP), lb's and others', read from the kernel: where lb is attached, and where not.
    Interfaces,
    /// The agent's health (/livez, /healthz, /readyz) and every health-check node port on this
    /// node: its Service, local endpoints and answer, asked of the agent and of the port itself.
    Health {
        /// The agent's --metrics-bind-address, where it serves /health-checks (an unspecified
        /// address is asked on loopback).
        #[arg(long, env = "LB_METRICS_BIND_ADDRESS", default_value = "127.0.0.1:10249")]
        metrics_address: std::net::SocketAddr,
    },
    /// Streams datapath events (new flows, drops and rejects with their reason; sockets sent to a
    /// backend or refused by the socket programs, with their process) as they happen. The datapath
    /// sends at most 2,000 a second per CPU, while the agent runs with `--flow-events` (the
    /// default).
    Monitor {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Streams events until stopped. Only the ring buffer's read position moves; no map is written.
fn monitor(args: &Args, maps: &Maps, count: Option<usize>, timeout: Option<f64>) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    anyhow::ensure!(maps.flow_events(), "flow events are off: the agent runs with --flow-events=false");
    let mut events = Maps::events(&args.pin_dir)?;
    // Events sent before this monitor started are history: skip them.
    while events.next().is_some() {}
    let names: std::collections::BTreeMap<u32, String> =
        inspect::frontend_names(maps)?.into_iter().map(|(id, (_, service))| (id, service)).collect();
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let deadline = timeout.map(|t| std::time::Instant::now() + std::time::Duration::from_secs_f64(t));
    let json = matches!(args.output, Output::Json);
    // On stderr in both formats: events from here on are shown (a script may wait for it).
    eprintln!("listening for datapath events (Ctrl-C to stop)");
    let mut seen = 0usize;
    let result = (|| -> anyhow::Result<()> {
        loop {
            while let Some(item) = events.next() {
                let Some(e) = inspect::event(&item, &names) else { continue };
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else if e.kind.starts_with("socket-") {
                    let process = match (e.pid, &e.command) {
                        (Some(pid), Some(c)) => format!("pid {pid} ({c})"),
                        (Some(pid), None) => format!("pid {pid}"),
                        _ => "a process".into(),
                    };
                    let to = e.backend.as_deref().map(|b| format!(" => {b}")).unwrap_or_default();
                    println!(
                        "{:<14} {process:<21} -> {:<21} {}{to}  {}",
                        e.kind, e.vip, e.protocol, e.service
                    );
                } else {
                    match (&e.backend, &e.reason) {
                        (Some(b), _) => println!(
                            "new-flow  {:<21} -> {:<21} {} => {b}  {}",
                            e.client, e.vip, e.protocol, e.service
                        ),
                        (None, r) => println!(
                            "{:<9} {:<21} -> {:<21} {} ({})  {}",
                            e.kind,
                            e.client,
                            e.vip,
                            e.protocol,
                            r.as_deref().unwrap_or("?"),
                            e.service
                        ),
                    }
                }
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
            if STOP.load(std::sync::atomic::Ordering::Relaxed)
                || deadline.is_some_and(|d| std::time::Instant::now() >= d)
            {
                return Ok(());
            }
            let mut p = libc::pollfd { fd: events.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
        }
    })();
    result
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn interfaces(json: bool) -> anyhow::Result<()> {
    let v = inspect::interfaces()?;
    if json {
        return print_json(&v);
    }
    let hooks = |hooks: &[inspect::HookView]| -> String {
        let shown: Vec<String> = hooks
            .iter()
            .map(|h| match (h.priority, h.handle) {
                (Some(p), Some(handle)) => {
                    format!("{} ({} pref {p} handle {handle:#x})", h.program, h.attach)
                }
                _ => format!("{} ({})", h.program, h.attach),
            })
            .collect();
        if shown.is_empty() {
            "-".into()
        } else {
            shown.join("\n")
        }
    };
    let mut t = table(&["INTERFACE", "LB", "TC INGRESS", "TC EGRESS", "XDP"]);
    for i in &v {
        t.add_row(vec![
            i.interface.clone(),
            i.lb.clone(),
            hooks(&i.ingress),
            hooks(&i.egress),
            hooks(i.xdp.as_slice()),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// `lbctl health`: the agent's view, each health-check node port asked too.
fn health(mut agent: std::net::SocketAddr, json: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
    if agent.ip().is_unspecified() {
        agent.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let answer = inspect::http_get(agent, "/health-checks", TIMEOUT).with_context(|| {
        format!("asking the agent at {agent} (its --metrics-bind-address; is it running?)")
    })?;
    anyhow::ensure!(answer.status == 200, "the agent at {agent} answered {}: {}", answer.status, answer.body);
    let mut v: inspect::HealthView = serde_json::from_str(&answer.body)
        .with_context(|| format!("the agent at {agent} answered /health-checks with {:?}", answer.body))?;
    for s in &mut v.services {
        let Some(mut addr) = s.listening.first().and_then(|a| a.parse::<std::net::SocketAddr>().ok()) else {
            continue;
        };
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        s.probed = Some(match inspect::http_get(addr, "/", TIMEOUT) {
            Ok(a) => inspect::ProbeView { code: a.status, reason: None },
            Err(e) => inspect::ProbeView { code: 0, reason: Some(e.to_string()) },
        });
    }
    if json {
        return print_json(&v);
    }
    let probe = |name: &str, p: &inspect::ProbeView| match &p.reason {
        None => format!("{name} {}", p.code),
        Some(r) => format!("{name} {} ({r})", p.code),
    };
    println!("{}", probe("livez", &v.livez));
    println!("{}{}", probe("healthz", &v.healthz), if v.node_eligible { "" } else { " [node not eligible]" });
    println!("{}", probe("readyz", &v.readyz));
    if !v.health_check_node_ports {
        println!(
            "health-check node ports: not served (--health-check-node-ports=off); what they would answer:"
        );
    }
    let mut t = table(&["SERVICE", "PORT", "LOCAL ENDPOINTS", "ANSWER", "LISTENING", "ASKED", "ERROR"]);
    for s in &v.services {
        t.add_row(vec![
            s.service.clone(),
            s.port.to_string(),
            s.local_endpoints.to_string(),
            // Not listening by mistake: it answers nothing (off: what it would answer).
            if s.error.is_some() { "-".into() } else { s.code.to_string() },
            if s.listening.is_empty() { "-".into() } else { s.listening.join("\n") },
            match &s.probed {
                None => "-".into(),
                Some(p) if p.code == 0 => format!("failed: {}", p.reason.as_deref().unwrap_or("?")),
                Some(p) => p.code.to_string(),
            },
            s.error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn run(args: &Args) -> anyhow::Result<()> {
    let json = matches!(args.output, Output::Json);
    match args.command {
        Cmd::Interfaces => return interfaces(json),
        Cmd::Health { metrics_address } => return health(metrics_address, json),
        _ => {}
    }
    let maps = Maps::from_pins_read_only(&args.pin_dir).map_err(|e| match e {
        DatapathError::Map { source: aya::maps::MapError::IoError(ref io), .. }
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            anyhow::anyhow!(
                "permission denied reading {}: run lbctl as root (it needs CAP_BPF)",
                args.pin_dir.display()
            )
        }
        other => other.into(),
    })?;
    match &args.command {
        Cmd::Interfaces | Cmd::Health { .. } => unreachable!("answered above"),
        Cmd::Services => {
            let v = inspect::services(&maps)?;
            if json {
                return print_json(&v);
            }
            let mut t = table(&[
                "FRONTEND", "KIND", "SCOPE", "SERVICE", "BACKENDS", "TABLE", "AFFINITY", "POLICY", "SOURCES",
            ]);
            for s in &v {
                let backends: Vec<String> = s
                    .backends
                    .iter()
                    .map(|b| {
                        format!(
                            "{} {} ({} slots)",
                            inspect::host_port(&b.ip, b.port),
                            b.state,
                            b.slots.unwrap_or(0)
                        )
                    })
                    .collect();
                t.add_row(vec![
                    format!("{}/{}", inspect::host_port(&s.vip, s.port), s.protocol),
                    s.kind.clone(),
                    s.scope.clone(),
                    s.service.clone(),
                    if s.deleted {
                        "(Service deleted: kept until its flows end; new flows rejected)".into()
                    } else if backends.is_empty() {
                        "(none: new flows rejected, or dropped under a traffic policy Local)".into()
                    } else {
                        backends.join("\n")
                    },
                    s.table_size.to_string(),
                    if s.affinity_timeout_seconds > 0 {
                        format!("ClientIP {}s", s.affinity_timeout_seconds)
                    } else {
                        "-".into()
                    },
                    s.policy.clone(),
                    match &s.source_ranges {
                        None => "any".into(),
                        Some(r) if r.is_empty() => "none".into(),
                        Some(r) => r.join("\n"),
                    },
                ]);
            }
            println!("{t}");
        }
        Cmd::Backends => {
            let v = inspect::backends(&maps)?;
            if json {
                return print_json(&v);
            }
            let mut t = table(&["ID", "BACKEND", "STATE"]);
            for b in &v {
                t.add_row(vec![
                    b.id.to_string(),
                    format!("{}/{}", inspect::host_port(&b.ip, b.port), b.protocol),
                    b.state.clone(),
                ]);
            }
            println!("{t}");
        }
        Cmd::Maglev { service, raw } => {
            let Some((view, slots)) = inspect::maglev(&maps, service)? else {
                anyhow::bail!("no frontend matches {service:?} (see `lbctl services`)");
            };
            if json {
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    service: &'a inspect::ServiceView,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    slots: Option<&'a [u32]>,
                }
                return print_json(&Out { service: &view, slots: raw.then_some(&slots[..]) });
            }
            println!(
                "{}/{} {} ({} slots)",
                inspect::host_port(&view.vip, view.port),
                view.protocol,
                view.service,
                view.table_size
            );
            let mut t = table(&["BACKEND", "ID", "STATE", "SLOTS", "SHARE"]);
            for b in &view.backends {
                let n = b.slots.unwrap_or(0);
                t.add_row(vec![
                    inspect::host_port(&b.ip, b.port),
                    b.id.to_string(),
                    b.state.clone(),
                    n.to_string(),
                    format!("{:.2}%", f64::from(n) * 100.0 / f64::from(view.table_size.max(1))),
                ]);
            }
            println!("{t}");
            if *raw {
                let ids: Vec<String> = slots.iter().map(u32::to_string).collect();
                println!("slots (backend ids): {}", ids.join(" "));
            }
        }
        Cmd::Conntrack { service, backend } => {
            let v = inspect::conntrack(&maps, service.as_deref(), *backend)?;
            if json {
                return print_json(&v);
            }
            let mut t = table(&["CLIENT", "VIP", "BACKEND", "PROTO", "STATE", "AGE", "IDLE", "SERVICE"]);
            for f in &v {
                t.add_row(vec![
                    match f.snat_port {
                        Some(p) => format!("{} (as :{p})", f.client),
                        None => f.client.clone(),
                    },
                    f.vip.clone(),
                    f.backend.clone(),
                    f.protocol.clone(),
                    f.state.clone(),
                    format!("{:.1}s", f.age_seconds),
                    format!("{:.1}s", f.idle_seconds),
                    f.service.clone(),
                ]);
            }
            println!("{t}");
            println!("{} flows", v.len());
        }
        Cmd::Monitor { count, timeout } => return monitor(args, &maps, *count, *timeout),
        Cmd::Stats => {
            let v = inspect::stats(&maps)?;
            if json {
                return print_json(&v);
            }
            let mut t = table(&["COUNTER", "VALUE"]);
            for (name, value) in &v.counters {
                if *value != 0 {
                    t.add_row(vec![name.clone(), value.to_string()]);
                }
            }
            println!("{t}");
            let mut t = table(&["FRONTEND", "SERVICE", "PACKETS", "BYTES", "NEW FLOWS", "DROPS"]);
            for s in &v.services {
                t.add_row(vec![
                    s.frontend.clone(),
                    s.service.clone(),
                    s.packets.to_string(),
                    s.bytes.to_string(),
                    s.new_flows.to_string(),
                    s.drops.to_string(),
                ]);
            }
            println!("{t}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
