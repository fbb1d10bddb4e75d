//! A readable dump of what the maps hold: one line per frontend (with each backend's share of
//! its Maglev table; a Service deleted but kept for its flows on a `deleted` line) and one per
//! backend. Golden tests compare it; people read it.

use std::{collections::BTreeMap, fmt::Write as _};

use lb_agent::reconcile::{
    encode::{endpoint_of, state_name},
    BackendValue, MemoryMaps, ServiceKey,
};
use lb_common::{
    Lb4Service, BACKEND_STATE_FREE, FRONTEND_KIND_EXTERNAL_IP, FRONTEND_KIND_LOAD_BALANCER,
    FRONTEND_KIND_NODE_PORT, SCOPE_INTERNAL, SRC_RANGE_ALLOW, SRC_RANGE_DENY, SVC_FLAG_EXTERNAL,
    SVC_FLAG_LOCAL_ONLY, SVC_FLAG_TOMBSTONE, SVC_FLAG_TWO_SCOPES,
};

/// `VIP:port/PROTO` (`[VIP]:port/PROTO` for IPv6), and ` (internal)` for an address's internal
/// entry.
fn frontend_addr(k: &ServiceKey) -> String {
    let (vip, port, proto, scope) = k.parts();
    let scope = if scope == SCOPE_INTERNAL { " (internal)" } else { "" };
    format!("{}{scope}", endpoint_of(vip, port, proto))
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        SRC_RANGE_ALLOW => "allowed",
        SRC_RANGE_DENY => "dropped",
        _ => "unknown",
    }
}

fn backend_addr(b: &BackendValue) -> String {
    let (ip, port, proto, _) = b.parts();
    endpoint_of(ip, port, proto)
}

/// Renders `maps`, each frontend with the `namespace/name:port` the agent recorded beside it.
pub fn render(maps: &MemoryMaps) -> String {
    let mut out = String::new();
    let mut services: Vec<(&ServiceKey, &Lb4Service)> = maps.services.iter().collect();
    services.sort_by_key(|(k, _)| k.parts());
    for (key, svc) in services {
        let name = maps.meta.get(&svc.id).map_or("?", |m| m.name());
        // The kind, where not a cluster IP.
        let name = match maps.meta.get(&svc.id).map(|m| m.kind) {
            Some(FRONTEND_KIND_LOAD_BALANCER) => format!("{name} LoadBalancer"),
            Some(FRONTEND_KIND_NODE_PORT) => format!("{name} NodePort"),
            Some(FRONTEND_KIND_EXTERNAL_IP) => format!("{name} ExternalIP"),
            _ => name.to_string(),
        };
        if svc.flags & SVC_FLAG_TOMBSTONE != 0 {
            let external = if svc.flags & SVC_FLAG_EXTERNAL != 0 { " external" } else { "" };
            let _ = writeln!(
                out,
                "deleted {} {name}{external} (kept for its established flows)",
                frontend_addr(key)
            );
            continue;
        }
        let mut flags = Vec::new();
        if svc.flags & SVC_FLAG_LOCAL_ONLY != 0 {
            flags.push("local-only".to_string());
        }
        if svc.flags & SVC_FLAG_EXTERNAL != 0 {
            flags.push("external".to_string());
        }
        if svc.flags & SVC_FLAG_TWO_SCOPES != 0 {
            flags.push("two-scopes".to_string());
        }
        if svc.affinity_timeout_secs > 0 {
            flags.push(format!("affinity={}s", svc.affinity_timeout_secs));
        }
        let _ = writeln!(
            out,
            "frontend {} {name} backends={} table={}{}{}",
            frontend_addr(key),
            svc.backend_count,
            svc.maglev_size,
            if flags.is_empty() { "" } else { " " },
            flags.join(" ")
        );
        let mut shares: BTreeMap<String, u32> = BTreeMap::new();
        for slot in svc.maglev_offset..svc.maglev_offset + svc.maglev_size {
            let id = maps.maglev.get(&slot).copied().unwrap_or(0);
            let name = maps.backends.get(&id).map_or_else(|| format!("missing#{id}"), backend_addr);
            *shares.entry(name).or_default() += 1;
        }
        for (b, n) in shares {
            let _ = writeln!(out, "  -> {b} {n}/{}", svc.maglev_size);
        }
    }
    // Source ranges, by frontend: the networks let in, then whether the others are shut out.
    for (e, verdict) in &maps.src_ranges {
        let fe = frontend_addr(&e.key.frontend());
        let _ = match (e.prefix_len.checked_sub(e.frontend_bits()), e.parts().3) {
            (Some(0), _) => writeln!(out, "source-ranges {fe} others {}", verdict_name(*verdict)),
            (Some(_), Some((net, len))) => {
                writeln!(out, "source-ranges {fe} {net}/{len} {}", verdict_name(*verdict))
            }
            _ => writeln!(out, "source-ranges {fe} malformed prefix {}", e.prefix_len),
        };
    }
    let mut backends: Vec<(String, &'static str)> = maps
        .backends
        .values()
        .filter(|b| b.state() != BACKEND_STATE_FREE)
        .map(|b| (backend_addr(b), state_name(b.state())))
        .collect();
    backends.sort();
    for (b, state) in backends {
        let _ = writeln!(out, "backend {b} {state}");
    }
    out
}
