//! What the kernel will do, read from the pinned maps: the views `lbctl` prints. Read-only; works
//! while the agent is down. Field names are stable: `lbctl -o json` prints these structs.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    counters, Lb4Service, CT_DIR_FORWARD, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_SYN,
    SVC_FLAG_LOCAL_ONLY, SVC_FLAG_TOMBSTONE,
};
use serde::Serialize;

use crate::{
    datapath::{DatapathError, Maps},
    reconcile::{
        encode::{endpoint_of, ipv4 as ip, ipv6, proto_name, socket, socket6, state_name},
        flows::EntryView,
        BackendValue, CtKey, ServiceKey,
    },
};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackendView {
    pub id: u32,
    pub ip: String,
    pub port: u16,
    pub protocol: String,
    /// `active`, `terminating`.
    pub state: String,
    /// Slots of the frontend's Maglev table (in `services` and `maglev` views).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServiceView {
    pub id: u32,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    /// `namespace/name:port` of the Service, as the agent recorded it.
    pub service: String,
    pub table_size: u32,
    /// 0 when the Service has no session affinity.
    pub affinity_timeout_seconds: u32,
    pub internal_traffic_local: bool,
    /// Which of its Service's addresses the frontend is: `ClusterIP`, `LoadBalancer`, `NodePort`.
    pub kind: String,
    /// `external` (the entry every client uses, unless the address has an `internal` one too) or
    /// `internal` (the entry this node's pods use instead).
    pub scope: String,
    /// The traffic policy its backends were chosen by: `Local` or `Cluster`
    /// (internalTrafficPolicy for cluster IPs and internal entries, externalTrafficPolicy for the
    /// external entries of external addresses).
    pub policy: String,
    /// `loadBalancerSourceRanges`: the networks whose clients may open flows to it (`None`: every
    /// client; empty: none).
    pub source_ranges: Option<Vec<String>>,
    /// The Service is gone (deleted, or its address or port changed): the entry stays, with no
    /// backend, until the established flows made for it end.
    pub deleted: bool,
    /// Backends new flows go to, with their share of the table.
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FlowView {
    pub client: String,
    /// The source port the backend sees, when the flow's tuple clashed with another flow's and it
    /// was given another one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_port: Option<u16>,
    pub vip: String,
    pub backend: String,
    pub protocol: String,
    /// `syn`, `established`, `closing`.
    pub state: String,
    pub service: String,
    pub age_seconds: f64,
    pub idle_seconds: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServiceStats {
    pub frontend: String,
    pub service: String,
    /// `ClusterIP`, `LoadBalancer` or `NodePort`.
    pub kind: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub drops: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StatsView {
    /// Every datapath counter by name (`lb_common::counters::NAMES`).
    pub counters: BTreeMap<String, u64>,
    pub services: Vec<ServiceStats>,
}

/// Reads a frontend's table consistently: if the agent republished the frontend while it was
/// read (another region), read again.
fn table_of(
    maps: &Maps,
    key: &ServiceKey,
    mut svc: Lb4Service,
) -> Result<(Lb4Service, Vec<u32>), DatapathError> {
    for _ in 0..10 {
        // (A table said to run past the array is shown as far as the array goes.)
        let end = svc.maglev_offset.saturating_add(svc.maglev_size).min(maps.maglev.slots());
        let table = maps
            .maglev
            .read(svc.maglev_offset.min(end), end - svc.maglev_offset.min(end))
            .map_err(crate::datapath::maps::map_err(lb_common::MAP_LB4_MAGLEV))?;
        let now = match key {
            ServiceKey::V4(k) => maps.services.get(k, 0),
            ServiceKey::V6(k) => match &maps.v6 {
                Some(m) => m.services.get(k, 0),
                None => return Ok((svc, table)),
            },
        };
        match now {
            Ok(now) if now == svc => return Ok((svc, table)),
            Ok(now) => svc = now,
            // Removed meanwhile: what was read is what was there.
            Err(_) => return Ok((svc, table)),
        }
    }
    Err(DatapathError::Unstable)
}

/// Each frontend's `VIP:port/PROTO` and Service name, by frontend id: the services map and the
/// recorded names only, no tables.
pub fn frontend_names(maps: &Maps) -> Result<BTreeMap<u32, (String, String)>, DatapathError> {
    Ok(maps
        .read_services()?
        .into_iter()
        .map(|(key, svc)| {
            // An address's internal entry is a frontend of its own.
            let (vip, port, proto, scope) = key.parts();
            let scope = if scope == lb_common::SCOPE_INTERNAL { " (internal)" } else { "" };
            let frontend = format!("{}{scope}", endpoint_of(vip, port, proto));
            (svc.id, (frontend, maps.read_meta(svc.id).map(|m| m.name().to_string()).unwrap_or_default()))
        })
        .collect())
}

/// Every frontend with its table, in address order.
fn services_with_tables(maps: &Maps) -> Result<Vec<(ServiceView, Vec<u32>)>, DatapathError> {
    let backends: BTreeMap<u32, BackendValue> = maps.read_backends()?.into_iter().collect();
    let mut services = maps.read_services()?;
    services.sort_by_key(|(k, _)| k.parts());
    // Source ranges by frontend (under its external key): the networks let in, once it has a
    // deny entry.
    let mut ranges: BTreeMap<(std::net::IpAddr, u16, u8), (bool, Vec<String>)> = BTreeMap::new();
    for e in maps.read_src_ranges()? {
        let (vip, port, proto, range) = e.parts();
        let r = ranges.entry((vip, port, proto)).or_default();
        match range {
            None => r.0 = true,
            Some((net, len)) => r.1.push(format!("{net}/{len}")),
        }
    }
    let mut out = Vec::new();
    for (key, svc) in services {
        let (svc, table) = table_of(maps, &key, svc)?;
        let (vip, vport, proto, scope) = key.parts();
        let mut shares: BTreeMap<u32, u32> = BTreeMap::new();
        for id in &table {
            *shares.entry(*id).or_default() += 1;
        }
        let backends = shares
            .into_iter()
            .map(|(id, n)| BackendView {
                slots: Some(n),
                ..backend_view(id, backends.get(&id).copied().unwrap_or(BackendValue::V4(Default::default())))
            })
            .collect();
        let view = ServiceView {
            id: svc.id,
            vip: vip.to_string(),
            port: vport,
            protocol: proto_name(proto),
            service: maps.read_meta(svc.id).map(|m| m.name().to_string()).unwrap_or_default(),
            table_size: svc.maglev_size,
            affinity_timeout_seconds: svc.affinity_timeout_secs,
            internal_traffic_local: svc.flags & SVC_FLAG_LOCAL_ONLY != 0,
            kind: kind_of(maps, svc.id).into(),
            scope: if scope == lb_common::SCOPE_INTERNAL { "internal" } else { "external" }.into(),
            policy: if svc.flags & (SVC_FLAG_LOCAL_ONLY | lb_common::SVC_FLAG_TWO_SCOPES) != 0 {
                "Local"
            } else {
                "Cluster"
            }
            .into(),
            source_ranges: ranges
                .get(&(vip, vport, proto))
                .filter(|(deny, _)| *deny)
                .map(|(_, allowed)| allowed.clone()),
            deleted: svc.flags & SVC_FLAG_TOMBSTONE != 0,
            backends,
        };
        out.push((view, table));
    }
    Ok(out)
}

/// Which of its Service's addresses frontend `id` is, as recorded beside the maps.
fn kind_of(maps: &Maps, id: u32) -> &'static str {
    match maps.read_meta(id).map(|m| m.kind) {
        Some(lb_common::FRONTEND_KIND_LOAD_BALANCER) => "LoadBalancer",
        Some(lb_common::FRONTEND_KIND_NODE_PORT) => "NodePort",
        Some(lb_common::FRONTEND_KIND_EXTERNAL_IP) => "ExternalIP",
        _ => "ClusterIP",
    }
}

/// Every frontend with its backends and their shares.
pub fn services(maps: &Maps) -> Result<Vec<ServiceView>, DatapathError> {
    Ok(services_with_tables(maps)?.into_iter().map(|(v, _)| v).collect())
}

fn backend_view(id: u32, b: BackendValue) -> BackendView {
    let (addr, port, proto, state) = b.parts();
    BackendView {
        id,
        ip: addr.to_string(),
        port,
        protocol: proto_name(proto),
        state: state_name(state).into(),
        slots: None,
    }
}

/// Every backend entry in use.
pub fn backends(maps: &Maps) -> Result<Vec<BackendView>, DatapathError> {
    Ok(maps.read_backends()?.into_iter().map(|(id, b)| backend_view(id, b)).collect())
}

/// Whether `query` names a frontend (`VIP:port/PROTO`) or its Service (`namespace/name:port`):
/// it may be either of those, `VIP:port`, or `namespace/name`.
pub fn query_matches(frontend: &str, service: &str, query: &str) -> bool {
    query == frontend
        || frontend.split('/').next() == Some(query)
        || query == service
        || service.split(':').next() == Some(query)
}

/// Whether `query` names this frontend (see [`query_matches`]).
pub fn matches(s: &ServiceView, query: &str) -> bool {
    query_matches(&format!("{}/{}", host_port(&s.vip, s.port), s.protocol), &s.service, query)
}

/// `IP:port`, or `[IP]:port` for an IPv6 address (as a view holds them: address text and port).
pub fn host_port(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// One frontend's table: its backends' shares, and the slots.
pub fn maglev(maps: &Maps, query: &str) -> Result<Option<(ServiceView, Vec<u32>)>, DatapathError> {
    Ok(services_with_tables(maps)?.into_iter().find(|(v, _)| matches(v, query)))
}

/// CLOCK_MONOTONIC_COARSE, the datapath's clock, in ns.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ct_state(state: u8) -> &'static str {
    match state {
        CT_STATE_SYN => "syn",
        CT_STATE_ESTABLISHED => "established",
        CT_STATE_CLOSING => "closing",
        _ => "unknown",
    }
}

/// Tracked flows (their forward entries) of both families, optionally only those of a frontend
/// or to a backend.
pub fn conntrack(
    maps: &Maps,
    service: Option<&str>,
    backend: Option<IpAddr>,
) -> Result<Vec<FlowView>, DatapathError> {
    let names = frontend_names(maps)?;
    let now = coarse_now_ns();
    // (client, VIP, backend, protocol) as text and the entry's view, whatever the family.
    let mut rows: Vec<(String, String, String, IpAddr, u8, EntryView)> = Vec::new();
    for (k, e) in maps.ct.iter().flatten().filter(|(k, _)| k.dir == CT_DIR_FORWARD) {
        let (client, vip, be) =
            (socket(k.saddr, k.sport), socket(k.daddr, k.dport), socket(e.nat_addr, e.nat_port));
        rows.push((
            client,
            vip,
            be,
            ip(e.nat_addr).into(),
            k.proto,
            <lb_common::Lb4CtKey as CtKey>::view(&e),
        ));
    }
    for (k, e) in maps.v6.iter().flat_map(|m| m.ct.iter().flatten()).filter(|(k, _)| k.dir == CT_DIR_FORWARD)
    {
        let (client, vip, be) =
            (socket6(k.saddr, k.sport), socket6(k.daddr, k.dport), socket6(e.nat_addr, e.nat_port));
        rows.push((
            client,
            vip,
            be,
            ipv6(e.nat_addr).into(),
            k.proto,
            <lb_common::Lb6CtKey as CtKey>::view(&e),
        ));
    }
    let mut out = Vec::new();
    for (client, vip, backend_name, backend_ip, proto, e) in rows {
        if backend.is_some_and(|b| b != backend_ip) {
            continue;
        }
        let (frontend, name) = names.get(&e.svc_id).cloned().unwrap_or_default();
        if service.is_some_and(|q| !query_matches(&frontend, &name, q)) {
            continue;
        }
        out.push(FlowView {
            client,
            snat_port: (e.snat_port != 0).then(|| u16::from_be(e.snat_port)),
            vip,
            backend: backend_name,
            protocol: proto_name(proto),
            state: ct_state(e.state).into(),
            service: name,
            age_seconds: (now / 1_000_000_000).saturating_sub(u64::from(e.created_s)) as f64,
            idle_seconds: now.saturating_sub(e.last_seen_ns) as f64 / 1e9,
        });
    }
    out.sort_by(|a, b| a.vip.cmp(&b.vip).then(a.client.cmp(&b.client)));
    Ok(out)
}

/// Datapath counters and per-frontend statistics.
pub fn stats(maps: &Maps) -> Result<StatsView, DatapathError> {
    let v = maps.read_counters()?;
    let counters = counters::NAMES.iter().zip(v).map(|(n, v)| (n.to_string(), v)).collect();
    let mut services = Vec::new();
    for (id, (frontend, service)) in frontend_names(maps)? {
        let st = maps.read_svc_stats(id)?;
        services.push(ServiceStats {
            frontend,
            service,
            kind: kind_of(maps, id).into(),
            packets: st.packets,
            bytes: st.bytes,
            new_flows: st.new_flows,
            drops: st.drops,
        });
    }
    Ok(StatsView { counters, services })
}

/// One `lbctl monitor` event.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventView {
    /// `new-flow`, `drop`, or `reject` (answered with an ICMP port unreachable).
    pub kind: String,
    /// For drops and rejects: the reason (`no_backend`, `no_local_backend`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub client: String,
    pub vip: String,
    pub protocol: String,
    /// For new flows: the backend chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    pub service: String,
    /// Socket events: the process that called, where the kernel gives it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

/// Decodes an event from the ring buffer (of this layout or the one before `comm`); `names` maps
/// frontend ids to Service names.
pub fn event(bytes: &[u8], names: &BTreeMap<u32, String>) -> Option<EventView> {
    if bytes.len() < lb_common::LB_EVENT_BASE_LEN {
        return None;
    }
    let kind = u32::from_ne_bytes(bytes[..4].try_into().ok()?);
    if kind & lb_common::EVENT_IPV6 != 0 {
        return event6(bytes, names);
    }
    let mut whole = [0u8; std::mem::size_of::<lb_common::LbEvent>()];
    let n = bytes.len().min(whole.len());
    whole[..n].copy_from_slice(&bytes[..n]);
    // SAFETY: the buffer has the struct's size; LbEvent is plain integers, any bit pattern is
    // valid.
    let e: lb_common::LbEvent = unsafe { std::ptr::read_unaligned(whole.as_ptr().cast()) };
    if e.kind == lb_common::EVENT_SOCK {
        let reason = counters::NAMES.get(e.reason as usize).copied().unwrap_or("unknown");
        let refused = e.reason == counters::SOCK_REFUSED;
        let command = e.comm.split(|b| *b == 0).next().unwrap_or(&[]);
        return Some(EventView {
            // socket-connect, socket-sendmsg, socket-refused
            kind: format!("socket-{}", reason.trim_start_matches("sock_")),
            reason: None,
            client: "-".into(),
            vip: socket(e.daddr, e.dport),
            protocol: proto_name(e.proto),
            backend: (!refused).then(|| socket(e.backend_addr, e.backend_port)),
            service: names.get(&e.svc_id).cloned().unwrap_or_default(),
            pid: (e.pid != 0).then_some(e.pid),
            command: (!command.is_empty()).then(|| String::from_utf8_lossy(command).into_owned()),
        });
    }
    let new_flow = e.kind == lb_common::EVENT_NEW_FLOW;
    let reason = counters::NAMES.get(e.reason as usize).copied().unwrap_or("unknown");
    let kind = match (new_flow, reason.strip_prefix("reject_")) {
        (true, _) => "new-flow",
        (false, Some(_)) => "reject",
        (false, None) => "drop",
    };
    Some(EventView {
        kind: kind.into(),
        reason: (!new_flow)
            .then(|| reason.trim_start_matches("drop_").trim_start_matches("reject_").to_string()),
        client: socket(e.saddr, e.sport),
        vip: socket(e.daddr, e.dport),
        protocol: proto_name(e.proto),
        backend: new_flow.then(|| socket(e.backend_addr, e.backend_port)),
        service: names.get(&e.svc_id).cloned().unwrap_or_default(),
        pid: None,
        command: None,
    })
}

/// An IPv6 event ([`lb_common::LbEvent6`]), decoded as [`event`] decodes an IPv4 one.
fn event6(bytes: &[u8], names: &BTreeMap<u32, String>) -> Option<EventView> {
    if bytes.len() < std::mem::size_of::<lb_common::LbEvent6>() {
        return None;
    }
    // SAFETY: the slice holds the whole struct; LbEvent6 is plain integers, any bit pattern is
    // valid.
    let e: lb_common::LbEvent6 = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let v4 = lb_common::LbEvent {
        kind: e.kind & !lb_common::EVENT_IPV6,
        reason: e.reason,
        proto: e.proto,
        svc_id: e.svc_id,
        pid: e.pid,
        comm: e.comm,
        ..Default::default()
    };
    // The IPv4 decoding of the same event, its addresses then put right.
    // SAFETY: LbEvent is plain integers with explicit padding fields.
    let raw = unsafe {
        std::slice::from_raw_parts((&raw const v4).cast::<u8>(), std::mem::size_of::<lb_common::LbEvent>())
    };
    let mut view = event(raw, names)?;
    if view.client != "-" {
        view.client = socket6(e.saddr, e.sport);
    }
    view.vip = socket6(e.daddr, e.dport);
    if view.backend.is_some() {
        view.backend = Some(socket6(e.backend_addr, e.backend_port));
    }
    Some(view)
}

/// A BPF program on one of an interface's hooks.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HookView {
    /// The program's name as the kernel has it.
    pub program: String,
    pub program_id: u32,
    /// `tcx`; `filter` (a clsact qdisc filter, with its priority and handle); `xdp-native`,
    /// `xdp-generic` or `xdp-offload`.
    pub attach: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<u32>,
    /// One of lb's programs.
    pub lb: bool,
}

/// What runs on an interface: every BPF program on its TC hooks (lb's and others', in the order
/// they run) and XDP, read from the kernel.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InterfaceView {
    pub interface: String,
    pub ingress: Vec<HookView>,
    pub egress: Vec<HookView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp: Option<HookView>,
    /// `attached` (lb's forward program, TC ingress or XDP, and its reply program on TC egress),
    /// `partial` (one of them: an attach that failed half way, or is in progress) or `none`.
    pub lb: String,
}

/// One of lb's programs, by name (the kernel knows no owner): any version's, a stale one too.
fn is_lb_program(name: &str) -> bool {
    // The kernel keeps 15 bytes of a program's name.
    crate::datapath::ALL_PROGRAMS.iter().any(|p| p.get(..15).unwrap_or(p) == name)
}

/// Every interface of the current network namespace and the BPF programs on its hooks (TCX, clsact
/// filters, XDP), read from the kernel. Needs no pinned map: it shows what runs, whatever the
/// agent believes.
pub fn interfaces() -> std::io::Result<Vec<InterfaceView>> {
    use aya::programs::{SchedClassifier, TcAttachType};

    use crate::datapath::{netlink, PROG_TC_FORWARD, PROG_TC_NODE_IN, PROG_TC_NODE_OUT, PROG_TC_REPLY};
    let names: BTreeMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_string()))
        .collect();
    let hook = |program: String, program_id: u32, attach: &str| HookView {
        lb: is_lb_program(&program),
        program,
        program_id,
        attach: attach.to_string(),
        priority: None,
        handle: None,
    };
    let mut out = Vec::new();
    for link in netlink::links()? {
        let mut view = InterfaceView {
            interface: link.name.clone(),
            ingress: Vec::new(),
            egress: Vec::new(),
            xdp: link.xdp.map(|(id, mode)| {
                hook(names.get(&id).cloned().unwrap_or_else(|| "?".into()), id, &format!("xdp-{mode}"))
            }),
            lb: String::new(),
        };
        for (at, hooks) in
            [(TcAttachType::Ingress, &mut view.ingress), (TcAttachType::Egress, &mut view.egress)]
        {
            // TCX runs before the clsact filters. A kernel without TCX answers with an error.
            if let Ok((_, programs)) = SchedClassifier::query_tcx(&link.name, at) {
                for p in programs {
                    hooks.push(hook(p.name_as_str().unwrap_or("?").to_string(), p.id(), "tcx"));
                }
            }
            // An interface gone since it was listed has no filters any more.
            for f in netlink::filters(link.index, at == TcAttachType::Egress).unwrap_or_default() {
                hooks.push(HookView {
                    priority: Some(f.priority),
                    handle: Some(f.handle),
                    // A classic BPF filter has no program (and no name).
                    ..hook(
                        if f.program_id == 0 { "(classic bpf)".into() } else { f.name },
                        f.program_id,
                        "filter",
                    )
                });
            }
        }
        let has = |hooks: &[HookView], name: &str| hooks.iter().any(|h| h.lb && name.starts_with(&h.program));
        let forward = has(&view.ingress, PROG_TC_FORWARD) || view.xdp.as_ref().is_some_and(|x| x.lb);
        let reply = has(&view.egress, PROG_TC_REPLY);
        // A node interface: the node-side programs.
        let (forward, reply) = if has(&view.ingress, PROG_TC_NODE_IN) || has(&view.egress, PROG_TC_NODE_OUT) {
            (has(&view.ingress, PROG_TC_NODE_IN), has(&view.egress, PROG_TC_NODE_OUT))
        } else {
            (forward, reply)
        };
        view.lb = match (forward, reply) {
            (true, true) => "attached",
            (false, false) => "none",
            _ => "partial",
        }
        .into();
        out.push(view);
    }
    Ok(out)
}

/// One answer of the agent's health endpoints: 200 or 503, and why not 200.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProbeView {
    pub code: u16,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
}

/// A Service's health-check node port on this node: what it answers and where it listens.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HealthCheckView {
    /// `namespace/name`.
    pub service: String,
    pub port: u16,
    /// This node's ready endpoints of the Service (distinct addresses).
    pub local_endpoints: u64,
    /// What the port answers: 200 with a local endpoint while the agent is healthy, else 503.
    pub code: u16,
    /// The addresses it listens on (none with `--health-check-node-ports=off`).
    pub listening: Vec<String>,
    /// Why it is not served (another Service has the port, or the listen failed).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// What the port answered when `lbctl health` asked it (on its first address): code 0 and the
    /// error when it could not. The agent leaves it out.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub probed: Option<ProbeView>,
}

/// The agent's health (its `/health-checks` endpoint): what `/livez`, `/healthz` and `/readyz`
/// answer, and every health-check node port.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HealthView {
    pub livez: ProbeView,
    pub healthz: ProbeView,
    pub readyz: ProbeView,
    pub node_eligible: bool,
    /// `--health-check-node-ports`.
    pub health_check_node_ports: bool,
    pub services: Vec<HealthCheckView>,
}

/// An HTTP answer: status code, headers (names in lower case) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// `GET path` over HTTP/1.0 (the agent's health endpoints, a health-check node port).
pub fn http_get(
    to: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> std::io::Result<HttpAnswer> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&to, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok());
    let Some(status) = status else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not HTTP: {head:?}")));
    };
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpAnswer { status, headers, body: body.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(e: &lb_common::LbEvent) -> Vec<u8> {
        // SAFETY: LbEvent is plain integers with explicit padding fields.
        unsafe { std::slice::from_raw_parts((e as *const lb_common::LbEvent).cast::<u8>(), 64) }.to_vec()
    }

    #[test]
    fn socket_events_name_their_process_and_earlier_layouts_still_decode() {
        let names = BTreeMap::from([(7, "demo/who:tcp".to_string())]);
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let sock = lb_common::LbEvent {
            kind: lb_common::EVENT_SOCK,
            reason: counters::SOCK_CONNECT,
            daddr: u32::from_ne_bytes([10, 96, 0, 10]),
            dport: 80u16.to_be(),
            proto: 6,
            backend_addr: u32::from_ne_bytes([10, 244, 1, 3]),
            backend_port: 8080u16.to_be(),
            svc_id: 7,
            pid: 4242,
            comm,
            ..Default::default()
        };
        let e = event(&bytes(&sock), &names).expect("decoded");
        assert_eq!(
            (e.kind.as_str(), e.vip.as_str(), e.backend.as_deref(), e.service.as_str()),
            ("socket-connect", "10.96.0.10:80", Some("10.244.1.3:8080"), "demo/who:tcp")
        );
        assert_eq!((e.pid, e.command.as_deref()), (Some(4242), Some("curl")));

        // Refused: no backend. A kernel that gives no process: neither field.
        let refused = lb_common::LbEvent { reason: counters::SOCK_REFUSED, pid: 0, comm: [0; 16], ..sock };
        let e = event(&bytes(&refused), &names).expect("decoded");
        assert_eq!((e.kind.as_str(), e.backend, e.pid, e.command), ("socket-refused", None, None, None));

        // An agent of the layout before `comm` sends 48 bytes: decoded, no process.
        let flow = lb_common::LbEvent { kind: lb_common::EVENT_NEW_FLOW, reason: 0, pid: 0, ..sock };
        let e = event(&bytes(&flow)[..lb_common::LB_EVENT_BASE_LEN], &names).expect("48 bytes decode");
        assert_eq!(
            (e.kind.as_str(), e.backend.as_deref(), e.pid),
            ("new-flow", Some("10.244.1.3:8080"), None)
        );
        // Shorter than any layout: nothing.
        assert!(event(&bytes(&flow)[..lb_common::LB_EVENT_BASE_LEN - 1], &names).is_none());
    }

    #[test]
    fn ipv6_events_decode_with_bracketed_addresses() {
        let names = BTreeMap::from([(9, "demo/six:tcp".to_string())]);
        let a = |s: &str| lb_common::addr6(s.parse::<std::net::Ipv6Addr>().expect("address").octets());
        let e6 = lb_common::LbEvent6 {
            kind: lb_common::EVENT_NEW_FLOW | lb_common::EVENT_IPV6,
            saddr: a("fd00:10:244:1::2"),
            daddr: a("fd00:10:96::10"),
            sport: 40_000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            backend_addr: a("fd00:10:244:2::4"),
            backend_port: 8080u16.to_be(),
            svc_id: 9,
            ..Default::default()
        };
        // SAFETY: LbEvent6 is plain integers with explicit padding fields.
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&raw const e6).cast::<u8>(),
                std::mem::size_of::<lb_common::LbEvent6>(),
            )
        };
        let e = event(raw, &names).expect("decoded");
        assert_eq!(
            (e.kind.as_str(), e.client.as_str(), e.vip.as_str(), e.backend.as_deref(), e.service.as_str()),
            (
                "new-flow",
                "[fd00:10:244:1::2]:40000",
                "[fd00:10:96::10]:80",
                Some("[fd00:10:244:2::4]:8080"),
                "demo/six:tcp"
            )
        );
        let drop = lb_common::LbEvent6 {
            kind: lb_common::EVENT_DROP | lb_common::EVENT_IPV6,
            reason: counters::REJECT_NO_BACKEND,
            ..e6
        };
        // SAFETY: as above.
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&raw const drop).cast::<u8>(),
                std::mem::size_of::<lb_common::LbEvent6>(),
            )
        };
        let e = event(raw, &names).expect("decoded");
        assert_eq!((e.kind.as_str(), e.reason.as_deref(), e.backend), ("reject", Some("no_backend"), None));
        assert!(event(&raw[..100], &names).is_none(), "a cut IPv6 record decodes to nothing");
    }
}
