//! EndpointSlices: which endpoints serve each Service port, and which of them take new flows
//! (readiness, terminating fallback, topology hints, internalTrafficPolicy), as kube-proxy's
//! `CategorizeEndpoints` decides. A slice lists addresses of one family (`addressType`); each
//! family of a Service uses only the slices of its own, as kube-proxy's proxier of that family.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{
    service::{parse_port, parse_protocol},
    slice::EndpointSlice,
    BackendAddr, BackendState, Context, ModelError, Protocol,
};

/// One endpoint serving one Service port.
#[derive(Clone)]
pub(super) struct EndpointPort {
    ip: IpAddr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
    zone_hints: BTreeSet<String>,
    node_hints: BTreeSet<String>,
}

pub(super) type EndpointsByPort = BTreeMap<(String, Protocol), Vec<EndpointPort>>;

/// The endpoints of one EndpointSlice, per Service port name and protocol. A slice with a bad
/// field is rejected whole.
pub(super) fn slice_endpoints(
    slice: &EndpointSlice,
    object: &str,
    out: &mut EndpointsByPort,
) -> Result<(), ModelError> {
    const KIND: &str = "EndpointSlice";
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Ok(()),
        other => {
            return Err(ModelError::invalid(
                KIND,
                object,
                "addressType".into(),
                format!("unknown address type {other:?}"),
            ));
        }
    };
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let proto = match parse_protocol(KIND, object, || format!("ports[{i}].protocol"), p.protocol.as_ref())
        {
            Ok(proto) => proto,
            Err(ModelError::Unsupported { .. }) => continue,
            Err(e) => return Err(e),
        };
        // A port without a number means "all ports": only meaningful for selector-less use.
        let Some(port) = p.port else { continue };
        ports.push((
            p.name.clone().unwrap_or_default(),
            proto,
            parse_port(KIND, object, format!("ports[{i}].port"), port)?,
        ));
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let cond = ep.conditions.as_ref();
        // A missing `ready` or `serving` counts as true (kube-proxy's `addEndpoints`).
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(true);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        // Kubernetes uses only the first address of an endpoint.
        let Some(addr) = ep.addresses.first() else {
            return Err(ModelError::invalid(KIND, object, format!("endpoints[{i}].addresses"), "empty"));
        };
        let ip = if v6 {
            addr.parse::<Ipv6Addr>().map(IpAddr::V6).ok()
        } else {
            addr.parse::<Ipv4Addr>().map(IpAddr::V4).ok()
        };
        let Some(ip) = ip else {
            let family = if v6 { "IPv6" } else { "IPv4" };
            return Err(ModelError::invalid(
                KIND,
                object,
                format!("endpoints[{i}].addresses[0]"),
                format!("{addr:?} is not an {family} address (addressType {family})"),
            ));
        };
        let hints = ep.hints.as_ref();
        let zone_hints =
            hints.and_then(|h| h.for_zones.as_ref()).into_iter().flatten().map(|z| z.name.clone()).collect();
        let node_hints =
            hints.and_then(|h| h.for_nodes.as_ref()).into_iter().flatten().map(|n| n.name.clone()).collect();
        for (name, proto, port) in &ports {
            out.entry((name.clone(), *proto)).or_default().push(EndpointPort {
                ip,
                port: *port,
                ready,
                serving,
                terminating,
                node: ep.node_name.clone(),
                zone_hints: BTreeSet::clone(&zone_hints),
                node_hints: BTreeSet::clone(&node_hints),
            });
        }
    }
    Ok(())
}

/// kube-proxy's `topologyModeFromHints`: hints are used only when every ready endpoint carries
/// them and some endpoint is hinted for this node (node hints) or zone (zone hints).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    All,
    SameNode,
    SameZone,
}

fn topology_mode(eps: &[EndpointPort], ctx: &Context) -> Topology {
    let ready: Vec<&EndpointPort> = eps.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::All;
    }
    if let Some(node) = &ctx.node_name {
        if ready.iter().all(|e| !e.node_hints.is_empty()) && ready.iter().any(|e| e.node_hints.contains(node))
        {
            return Topology::SameNode;
        }
    }
    if let Some(zone) = &ctx.zone {
        if ready.iter().all(|e| !e.zone_hints.is_empty()) && ready.iter().any(|e| e.zone_hints.contains(zone))
        {
            return Topology::SameZone;
        }
    }
    Topology::All
}

fn available(e: &EndpointPort, mode: Topology, ctx: &Context) -> bool {
    match mode {
        Topology::All => true,
        Topology::SameNode => ctx.node_name.as_ref().is_some_and(|n| e.node_hints.contains(n)),
        Topology::SameZone => ctx.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)),
    }
}

/// The endpoints of one family (IPv6 or not): those a frontend of that family uses.
pub(super) fn of_family(eps: &[EndpointPort], v6: bool) -> Vec<EndpointPort> {
    eps.iter().filter(|e| e.ip.is_ipv6() == v6).cloned().collect()
}

/// Whether any endpoint, on any node, could take new flows (ready, or serving while terminating):
/// kube-proxy's `hasAnyEndpoints`, which decides between dropping (internalTrafficPolicy Local
/// without a local one) and rejecting (none at all).
pub(super) fn any_usable(eps: &[EndpointPort]) -> bool {
    eps.iter().any(|e| e.ready || (e.serving && e.terminating))
}

/// How many distinct addresses this node's ready endpoints have, over every port (terminating ones
/// do not count): kube-proxy's `LocalReadyEndpoints`, what a Service's health-check node port
/// reports, for the Service's primary family (`v6`: kube-proxy's proxier of one family counts the
/// endpoints of its slices only). None without a node name.
pub(super) fn local_ready(endpoints: &EndpointsByPort, ctx: &Context, v6: bool) -> usize {
    let Some(node) = &ctx.node_name else { return 0 };
    let local = endpoints
        .values()
        .flatten()
        .filter(|e| e.ready && !e.terminating && e.node.as_ref() == Some(node) && e.ip.is_ipv6() == v6);
    local.map(|e| e.ip).collect::<BTreeSet<_>>().len()
}

/// Picks the endpoints for new flows as kube-proxy's `CategorizeEndpoints` does; the other listed
/// endpoints are kept for their established flows.
pub(super) fn select(
    eps: &[EndpointPort],
    proto: Protocol,
    local_only: bool,
    ctx: &Context,
) -> (Vec<BackendAddr>, Vec<(BackendAddr, BackendState)>) {
    // Merge duplicates (the same address and port in two slices): ready if any copy is.
    let mut merged: BTreeMap<(IpAddr, u16), EndpointPort> = BTreeMap::new();
    for e in eps {
        merged
            .entry((e.ip, e.port))
            .and_modify(|m| {
                m.ready |= e.ready;
                m.serving |= e.serving;
                m.terminating &= e.terminating;
            })
            .or_insert_with(|| e.clone());
    }
    let eps: Vec<EndpointPort> = merged.into_values().collect();
    let candidates: Vec<&EndpointPort> = if local_only {
        eps.iter().filter(|e| ctx.node_name.is_some() && e.node == ctx.node_name).collect()
    } else {
        let mode = topology_mode(&eps, ctx);
        eps.iter().filter(|e| available(e, mode, ctx)).collect()
    };
    let mut chosen: Vec<&EndpointPort> = candidates.iter().copied().filter(|e| e.ready).collect();
    if chosen.is_empty() {
        // KEP-1669: with no ready endpoint, use the serving ones that are terminating.
        chosen = candidates.iter().copied().filter(|e| e.serving && e.terminating).collect();
    }
    let addr = |e: &EndpointPort| BackendAddr { ip: e.ip, port: e.port, proto };
    let backends: BTreeSet<BackendAddr> = chosen.iter().map(|e| addr(e)).collect();
    let kept = eps
        .iter()
        .filter(|e| !backends.contains(&addr(e)))
        .map(|e| {
            let state = if e.ready {
                BackendState::Active
            } else if e.serving {
                BackendState::Serving
            } else {
                BackendState::Draining
            };
            (addr(e), state)
        })
        .collect();
    (backends.into_iter().collect(), kept)
}
