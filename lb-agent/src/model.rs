//! The Kubernetes model: Services and EndpointSlices in, load-balancer frontends out. Pure: no
//! kernel, no API server. It follows what kube-proxy programs for ClusterIP traffic.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// A backend: where a frontend's traffic may go. Its display form, `IP:port/protocol`, is the
/// stable name Maglev hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.proto)
    }
}

/// A frontend address: VIP:port/protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendAddr {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.proto)
    }
}

/// What a backend may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Ready: may take new flows where it is in a table.
    Active,
    /// Not ready or terminating: keeps its established flows, takes no new ones.
    Terminating,
}

/// What the datapath should do for one VIP:port/protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub addr: FrontendAddr,
    /// `namespace/name` of the Service.
    pub service: String,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// Backends for new flows (the Maglev table), sorted and without duplicates.
    pub backends: Vec<BackendAddr>,
    /// Endpoints still listed but not used for new flows (not ready, terminating, or left out by
    /// topology or locality). Their established flows are kept.
    pub kept: Vec<(BackendAddr, BackendState)>,
    /// ClientIP session affinity timeout; 0 = none.
    pub affinity_timeout_secs: u32,
    /// `internalTrafficPolicy: Local`.
    pub local_only: bool,
}

/// Where this agent runs and what it answers for.
#[derive(Debug, Clone)]
pub struct Context {
    /// This node's name (`internalTrafficPolicy: Local`, node hints).
    pub node_name: Option<String>,
    /// This node's zone (zone hints).
    pub zone: Option<String>,
    /// Services labelled `service.kubernetes.io/service-proxy-name` are ours only with this value.
    pub service_proxy_name: Option<String>,
    /// A Service with more endpoints than this is rejected.
    pub max_endpoints_per_service: usize,
}

impl Default for Context {
    fn default() -> Self {
        Self {
            node_name: None,
            zone: None,
            service_proxy_name: None,
            max_endpoints_per_service: DEFAULT_MAX_ENDPOINTS,
        }
    }
}

/// Default for [`Context::max_endpoints_per_service`].
pub const DEFAULT_MAX_ENDPOINTS: usize = 10_000;
/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;

const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// Why an object (or part of it) was not programmed. Each names the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("{kind} {object}: field {field}: {reason}")]
    Invalid { kind: &'static str, object: String, field: String, reason: String },
    #[error("{kind} {object}: field {field}: {what} is not supported yet")]
    Unsupported { kind: &'static str, object: String, field: String, what: String },
}

impl ModelError {
    fn invalid(kind: &'static str, object: &str, field: String, reason: impl Into<String>) -> Self {
        Self::Invalid { kind, object: object.to_string(), field, reason: reason.into() }
    }

    fn unsupported(kind: &'static str, object: &str, field: String, what: impl Into<String>) -> Self {
        Self::Unsupported { kind, object: object.to_string(), field, what: what.into() }
    }

    /// The metric label for this error.
    pub const fn reason_label(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid",
            Self::Unsupported { .. } => "unsupported",
        }
    }
}

/// The result of translating a set of objects.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Model {
    /// Frontends by address; an address claimed twice keeps the first Service (by name).
    pub frontends: BTreeMap<FrontendAddr, Frontend>,
    pub errors: Vec<ModelError>,
    /// Services (`namespace/name`) whose current objects were rejected: whatever they had
    /// programmed stays as it was until they are valid again.
    pub held: BTreeSet<String>,
}

fn object_name(ns: Option<&String>, name: Option<&String>) -> String {
    format!("{}/{}", ns.map_or("default", String::as_str), name.map_or("<unnamed>", String::as_str))
}

fn parse_protocol(
    kind: &'static str,
    object: &str,
    field: impl Fn() -> String,
    p: Option<&String>,
) -> Result<Protocol, ModelError> {
    match p.map_or("TCP", String::as_str) {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err(ModelError::unsupported(kind, object, field(), "protocol SCTP")),
        other => Err(ModelError::invalid(kind, object, field(), format!("unknown protocol {other:?}"))),
    }
}

fn parse_port(kind: &'static str, object: &str, field: String, port: i32) -> Result<u16, ModelError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ModelError::invalid(kind, object, field, format!("port {port} is not in 1-65535")))
}

/// A Service port after validation.
struct SvcPort {
    name: String,
    port: u16,
    proto: Protocol,
}

/// What a valid Service asks for.
struct SvcSpec {
    vips: Vec<Ipv4Addr>,
    ports: Vec<SvcPort>,
    affinity_timeout_secs: u32,
    local_only: bool,
}

enum SvcOutcome {
    /// Not ours (headless, ExternalName, another proxy's).
    Skip,
    /// Valid, possibly with parts left out (reported in `errors`).
    Use(SvcSpec),
    /// Rejected: reported in `errors`; what it had stays programmed.
    Reject,
}

fn service_spec(svc: &Service, object: &str, ctx: &Context, errors: &mut Vec<ModelError>) -> SvcOutcome {
    const KIND: &str = "Service";
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return SvcOutcome::Skip;
    }
    if let Some(proxy) = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME)) {
        if ctx.service_proxy_name.as_deref() != Some(proxy.as_str()) {
            return SvcOutcome::Skip;
        }
    }
    let Some(spec) = svc.spec.as_ref() else {
        errors.push(ModelError::invalid(KIND, object, "spec".into(), "missing"));
        return SvcOutcome::Reject;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return SvcOutcome::Skip;
    }
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter());
    }
    if ips.is_empty() {
        errors.push(ModelError::invalid(KIND, object, "spec.clusterIP".into(), "missing"));
        return SvcOutcome::Reject;
    }
    if ips.iter().any(|ip| ip.as_str() == "None" || ip.is_empty()) {
        return SvcOutcome::Skip; // headless
    }
    let mut vips = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let field = if spec.cluster_ips.is_some() {
            format!("spec.clusterIPs[{i}]")
        } else {
            "spec.clusterIP".into()
        };
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => vips.push(v4),
            Ok(IpAddr::V6(_)) => errors.push(ModelError::unsupported(KIND, object, field, "IPv6")),
            Err(_) => {
                errors.push(ModelError::invalid(KIND, object, field, format!("{ip:?} is not an IP address")));
                return SvcOutcome::Reject;
            }
        }
    }
    let svc_ports = spec.ports.as_deref().unwrap_or_default();
    if svc_ports.is_empty() {
        errors.push(ModelError::invalid(KIND, object, "spec.ports".into(), "no ports"));
        return SvcOutcome::Reject;
    }
    let mut ports = Vec::new();
    for (i, p) in svc_ports.iter().enumerate() {
        let port = match parse_port(KIND, object, format!("spec.ports[{i}].port"), p.port) {
            Ok(port) => port,
            Err(e) => {
                errors.push(e);
                return SvcOutcome::Reject;
            }
        };
        match parse_protocol(KIND, object, || format!("spec.ports[{i}].protocol"), p.protocol.as_ref()) {
            Ok(proto) => ports.push(SvcPort { name: p.name.clone().unwrap_or_default(), port, proto }),
            // SCTP: that port is left out and reported; the others work.
            Err(e @ ModelError::Unsupported { .. }) => errors.push(e),
            Err(e) => {
                errors.push(e);
                return SvcOutcome::Reject;
            }
        }
    }
    let affinity_timeout_secs = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS as i32);
            match u32::try_from(t).ok().filter(|t| (1..=86_400).contains(t)) {
                Some(t) => t,
                None => {
                    let field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into();
                    errors.push(ModelError::invalid(KIND, object, field, format!("{t} is not in 1-86400")));
                    return SvcOutcome::Reject;
                }
            }
        }
        None | Some("None") => 0,
        Some(other) => {
            let field = "spec.sessionAffinity".into();
            errors.push(ModelError::invalid(KIND, object, field, format!("unknown value {other:?}")));
            return SvcOutcome::Reject;
        }
    };
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    if vips.is_empty() || ports.is_empty() {
        return SvcOutcome::Skip; // only unsupported parts (IPv6, SCTP), reported above
    }
    SvcOutcome::Use(SvcSpec { vips, ports, affinity_timeout_secs, local_only })
}

/// One endpoint serving one Service port.
#[derive(Clone)]
struct EndpointPort {
    ip: Ipv4Addr,
    port: u16,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<String>,
    zone_hints: BTreeSet<String>,
    node_hints: BTreeSet<String>,
}

type EndpointsByPort = BTreeMap<(String, Protocol), Vec<EndpointPort>>;

/// The endpoints of one EndpointSlice, per Service port name and protocol. A slice with a bad
/// field is rejected whole.
fn slice_endpoints(slice: &EndpointSlice, object: &str, out: &mut EndpointsByPort) -> Result<(), ModelError> {
    const KIND: &str = "EndpointSlice";
    match slice.address_type.as_str() {
        "IPv4" => {}
        "IPv6" | "FQDN" => return Ok(()),
        other => {
            return Err(ModelError::invalid(
                KIND,
                object,
                "addressType".into(),
                format!("unknown address type {other:?}"),
            ));
        }
    }
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
        // A missing `ready` counts as ready; `serving` defaults to `ready`.
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        // Kubernetes uses only the first address of an endpoint.
        let Some(addr) = ep.addresses.first() else {
            return Err(ModelError::invalid(KIND, object, format!("endpoints[{i}].addresses"), "empty"));
        };
        let ip = addr.parse::<Ipv4Addr>().map_err(|_| {
            ModelError::invalid(
                KIND,
                object,
                format!("endpoints[{i}].addresses[0]"),
                format!("{addr:?} is not an IPv4 address"),
            )
        })?;
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

/// Picks the endpoints for new flows as kube-proxy's `CategorizeEndpoints` does; the other listed
/// endpoints are kept for their established flows.
fn select(
    eps: &[EndpointPort],
    proto: Protocol,
    local_only: bool,
    ctx: &Context,
) -> (Vec<BackendAddr>, Vec<(BackendAddr, BackendState)>) {
    // Merge duplicates (the same address and port in two slices): ready if any copy is.
    let mut merged: BTreeMap<(Ipv4Addr, u16), EndpointPort> = BTreeMap::new();
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
        .map(|e| (addr(e), if e.ready { BackendState::Active } else { BackendState::Terminating }))
        .collect();
    (backends.into_iter().collect(), kept)
}

/// Translates Services and EndpointSlices into frontends. Invalid objects are reported in
/// `Model::errors`; a Service whose objects are invalid is listed in `Model::held`.
pub fn build(services: &[Service], slices: &[EndpointSlice], ctx: &Context) -> Model {
    let mut model = Model::default();
    // EndpointSlices by (namespace, service name).
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let ns = s.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        if let Some(svc) = s.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) {
            by_service.entry((ns, svc.clone())).or_default().push(s);
        }
    }
    let mut services: Vec<&Service> = services.iter().collect();
    services.sort_by_key(|s| object_name(s.metadata.namespace.as_ref(), s.metadata.name.as_ref()));
    for svc in services {
        let object = object_name(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref());
        let spec = match service_spec(svc, &object, ctx, &mut model.errors) {
            SvcOutcome::Use(spec) => spec,
            SvcOutcome::Skip => continue,
            SvcOutcome::Reject => {
                model.held.insert(object);
                continue;
            }
        };
        let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = svc.metadata.name.clone().unwrap_or_default();
        let mut endpoints = EndpointsByPort::new();
        let mut rejected = false;
        let mut slices: Vec<&&EndpointSlice> = by_service.get(&(ns, name)).into_iter().flatten().collect();
        slices.sort_by_key(|s| s.metadata.name.clone());
        for slice in slices {
            let slice_object = object_name(slice.metadata.namespace.as_ref(), slice.metadata.name.as_ref());
            if let Err(e) = slice_endpoints(slice, &slice_object, &mut endpoints) {
                model.errors.push(e);
                rejected = true;
            }
        }
        let total: usize = endpoints.values().map(Vec::len).max().unwrap_or(0);
        if total > ctx.max_endpoints_per_service {
            model.errors.push(ModelError::invalid(
                "Service",
                &object,
                "endpoints".into(),
                format!("{total} endpoints, more than the maximum of {}", ctx.max_endpoints_per_service),
            ));
            rejected = true;
        }
        if rejected {
            model.held.insert(object);
            continue;
        }
        for p in &spec.ports {
            let eps = endpoints.get(&(p.name.clone(), p.proto)).map(Vec::as_slice).unwrap_or_default();
            let (backends, kept) = select(eps, p.proto, spec.local_only, ctx);
            for vip in &spec.vips {
                let addr = FrontendAddr { vip: *vip, port: p.port, proto: p.proto };
                if let Some(existing) = model.frontends.get(&addr) {
                    model.errors.push(ModelError::invalid(
                        "Service",
                        &object,
                        "spec.clusterIP".into(),
                        format!("{addr} is already used by Service {}", existing.service),
                    ));
                    continue;
                }
                model.frontends.insert(
                    addr,
                    Frontend {
                        addr,
                        service: object.clone(),
                        port_name: p.name.clone(),
                        backends: backends.clone(),
                        kept: kept.clone(),
                        affinity_timeout_secs: spec.affinity_timeout_secs,
                        local_only: spec.local_only,
                    },
                );
            }
        }
    }
    model
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifests::{read_bytes, Objects};

    fn model(yaml: &str) -> (Model, Objects) {
        let mut objects = Objects::default();
        read_bytes(Path::new("test.yaml"), yaml.as_bytes(), &mut objects);
        (build(&objects.services, &objects.slices, &Context::default()), objects)
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.1.2]
- addresses: [10.244.1.3]
  conditions: {ready: true}
- addresses: [10.244.1.4]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 9090, protocol: TCP}
endpoints:
- addresses: [10.244.2.5]
"#;

    fn addr(vip: [u8; 4], port: u16, proto: Protocol) -> FrontendAddr {
        FrontendAddr { vip: vip.into(), port, proto }
    }

    fn be(ip: [u8; 4], port: u16, proto: Protocol) -> BackendAddr {
        BackendAddr { ip: ip.into(), port, proto }
    }

    #[test]
    fn ports_are_matched_by_name_per_slice_and_only_ready_endpoints_count() {
        let (m, o) = model(WEB);
        assert!(o.errors.is_empty() && m.errors.is_empty(), "{:?} {:?}", o.errors, m.errors);
        let http = &m.frontends[&addr([10, 96, 0, 10], 80, Protocol::Tcp)];
        assert_eq!(http.service, "shop/web");
        assert_eq!(
            http.backends,
            vec![
                be([10, 244, 1, 2], 8080, Protocol::Tcp),
                be([10, 244, 1, 3], 8080, Protocol::Tcp),
                be([10, 244, 2, 5], 9090, Protocol::Tcp)
            ]
        );
        let dns = &m.frontends[&addr([10, 96, 0, 10], 53, Protocol::Udp)];
        assert_eq!(
            dns.backends,
            vec![be([10, 244, 1, 2], 5353, Protocol::Udp), be([10, 244, 1, 3], 5353, Protocol::Udp)]
        );
    }

    #[test]
    fn terminating_endpoints_are_used_only_when_none_is_ready() {
        let (m, _) = model(
            r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- addresses: [10.244.1.7]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.1.8]
  conditions: {ready: false, serving: false, terminating: true}
"#,
        );
        assert_eq!(
            m.frontends[&addr([10, 96, 0, 20], 80, Protocol::Tcp)].backends,
            vec![be([10, 244, 1, 7], 8080, Protocol::Tcp)]
        );
    }

    #[test]
    fn headless_and_external_name_services_are_skipped() {
        let (m, o) = model(
            r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.org}
"#,
        );
        assert!(m.frontends.is_empty() && m.errors.is_empty() && o.errors.is_empty());
    }

    #[test]
    fn bad_fields_are_named_and_the_rest_still_loads() {
        let (m, o) = model(&format!(
            "{WEB}{}",
            r#"
---
apiVersion: v1
kind: Service
metadata: {name: badport}
spec: {clusterIP: 10.96.0.30, ports: [{port: 0}]}
---
apiVersion: v1
kind: Service
metadata: {name: badip}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: sctp}
spec: {clusterIP: 10.96.0.31, ports: [{port: 80, protocol: SCTP}, {name: b, port: 81}]}
---
apiVersion: v1
kind: Service
metadata: {name: wrongtype}
spec: {clusterIP: 10.96.0.32, ports: [{port: "eighty"}]}
"#
        ));
        let msgs: Vec<String> = m
            .errors
            .iter()
            .map(ToString::to_string)
            .chain(o.errors.iter().map(ToString::to_string))
            .collect();
        let has = |s: &str| msgs.iter().any(|m| m.contains(s));
        assert!(
            has("Service default/badport: field spec.ports[0].port: port 0 is not in 1-65535"),
            "{msgs:#?}"
        );
        assert!(
            has("Service default/badip: field spec.clusterIP: \"10.96.0.300\" is not an IP address"),
            "{msgs:#?}"
        );
        assert!(
            has("Service default/sctp: field spec.ports[0].protocol: protocol SCTP is not supported yet"),
            "{msgs:#?}"
        );
        assert!(has("test.yaml: Service default/wrongtype: field spec.ports[0].port:"), "{msgs:#?}");
        // The valid Service, and the valid port of the SCTP one, are still programmed.
        assert!(m.frontends.contains_key(&addr([10, 96, 0, 10], 80, Protocol::Tcp)));
        assert!(m.frontends.contains_key(&addr([10, 96, 0, 31], 81, Protocol::Tcp)));
        assert_eq!(m.frontends.len(), 3);
    }

    #[test]
    fn lists_json_and_other_kinds() {
        let mut o = Objects::default();
        read_bytes(Path::new("a.json"), br#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"j"},"spec":{"clusterIP":"10.96.0.40","ports":[{"port":80}]}},{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"d"}}]}"#, &mut o);
        read_bytes(Path::new("b.yaml"), b"\xff\xfe not utf8", &mut o);
        read_bytes(Path::new("c.yaml"), b"kind: Service\nmetadata: {name: x}\n", &mut o);
        assert_eq!(o.services.len(), 1);
        let msgs: Vec<String> = o.errors.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs[0].starts_with("b.yaml: cannot read: not UTF-8"), "{msgs:?}");
        assert_eq!(msgs[1], "c.yaml: Service default/x: field apiVersion: missing");
    }

    #[test]
    fn duplicate_endpoints_across_slices_are_merged() {
        let dup = WEB
            .replace("- addresses: [10.244.2.5]", "- addresses: [10.244.2.5]\n- addresses: [10.244.1.2]")
            .replace("port: 9090", "port: 8080");
        let (m, _) = model(&dup);
        let http = &m.frontends[&addr([10, 96, 0, 10], 80, Protocol::Tcp)];
        assert_eq!(http.backends.len(), 3, "{:?}", http.backends);
    }
}
