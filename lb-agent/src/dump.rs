//! A readable dump of what the maps hold: one line per frontend (with each backend's share of
//! its Maglev table) and one per backend. Golden tests compare it; people read it.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use lb_common::{
    Lb4Backend, Lb4Service, Lb4ServiceKey, BACKEND_STATE_ACTIVE, BACKEND_STATE_FREE,
    BACKEND_STATE_TERMINATING, SVC_FLAG_LOCAL_ONLY,
};

use crate::{
    model::{FrontendAddr, Protocol},
    sync::MemoryMaps,
};

/// `TCP`, `UDP`, or `protoN` for a protocol number lb does not handle.
pub fn proto_name(p: u8) -> String {
    Protocol::from_number(p).map_or_else(|| format!("proto{p}"), |p| p.to_string())
}

/// An address as the maps hold it (network byte order).
pub fn ipv4(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

/// `IP:port/PROTO` from map fields (network byte order).
pub fn endpoint(addr: u32, port: u16, proto: u8) -> String {
    format!("{}:{}/{}", ipv4(addr), u16::from_be(port), proto_name(proto))
}

fn frontend_addr(k: &Lb4ServiceKey) -> String {
    endpoint(k.addr, k.port, k.proto)
}

fn backend_addr(b: &Lb4Backend) -> String {
    endpoint(b.addr, b.port, b.proto)
}

pub fn state_name(state: u8) -> &'static str {
    match state {
        BACKEND_STATE_ACTIVE => "active",
        BACKEND_STATE_TERMINATING => "terminating",
        BACKEND_STATE_FREE => "free",
        _ => "unknown",
    }
}

/// Renders `maps`. `names` gives each frontend's `namespace/name:port` (what the agent knows).
pub fn render(maps: &MemoryMaps, names: &BTreeMap<FrontendAddr, String>) -> String {
    let mut out = String::new();
    let mut services: Vec<(&Lb4ServiceKey, &Lb4Service)> = maps.services.iter().collect();
    services.sort_by_key(|(k, _)| (Ipv4Addr::from(k.addr.to_ne_bytes()), u16::from_be(k.port), k.proto));
    for (key, svc) in services {
        let addr = FrontendAddr {
            vip: key.addr.to_ne_bytes().into(),
            port: u16::from_be(key.port),
            proto: Protocol::from_number(key.proto).unwrap_or(Protocol::Tcp),
        };
        let name = names.get(&addr).map_or("?", String::as_str);
        let mut flags = Vec::new();
        if svc.flags & SVC_FLAG_LOCAL_ONLY != 0 {
            flags.push("local-only".to_string());
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
    let mut backends: Vec<(String, &'static str)> = maps
        .backends
        .values()
        .filter(|b| b.state != BACKEND_STATE_FREE)
        .map(|b| (backend_addr(b), state_name(b.state)))
        .collect();
    backends.sort();
    for (b, state) in backends {
        let _ = writeln!(out, "backend {b} {state}");
    }
    out
}
