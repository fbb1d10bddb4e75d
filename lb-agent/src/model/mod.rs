//! The Kubernetes model: Services, EndpointSlices and this node in, load-balancer frontends
//! out. Pure: no kernel, no API server. It follows what kube-proxy programs, and each of its
//! rules lives here once: which Services are ours and what they ask for ([`service`]), which
//! endpoints take new flows ([`endpoints`]), who holds an address ([`Addresses`]), and the
//! Maglev tables ([`maglev`]).

mod endpoints;
pub mod maglev;
pub mod node;
mod service;
mod slice;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Node, Service};
use lb_common::{IPPROTO_TCP, IPPROTO_UDP};

use self::{
    endpoints::{select, slice_endpoints, EndpointsByPort},
    service::{service_spec, SvcOutcome},
};
pub use self::{
    service::object_name,
    slice::{Endpoint, EndpointSlice},
};

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The node label that names its zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// This node's zone, from its `topology.kubernetes.io/zone` label.
pub fn node_zone(node: &Node) -> Option<String> {
    node.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned()
}

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

/// A backend: where a frontend's traffic may go. Its display form, `IP:port/protocol` (an IPv6
/// address in brackets, in RFC 5952's text form: `[2001:db8::a]:80/TCP`), is the stable name
/// Maglev hashes, the same on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", std::net::SocketAddr::new(self.ip, self.port), self.proto)
    }
}

/// A frontend address: VIP:port/protocol, and which of its clients the entry is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
    pub scope: Scope,
}

impl FrontendAddr {
    /// The address's entry for every client (`Scope::External`).
    pub fn new(vip: impl Into<IpAddr>, port: u16, proto: Protocol) -> Self {
        Self { vip: vip.into(), port, proto, scope: Scope::External }
    }
}

impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", std::net::SocketAddr::new(self.vip, self.port), self.proto)?;
        if self.scope == Scope::Internal {
            f.write_str(" (internal)")?;
        }
        Ok(())
    }
}

/// Which clients a frontend entry is for. An address has one entry, for every client
/// (`External`), unless its Service treats this node's pods apart from clients outside: an
/// external address of an `externalTrafficPolicy: Local` Service has a second entry (`Internal`)
/// with every endpoint, which this node's pods use (kube-proxy's exception for the cluster's own
/// clients), while clients from outside get only this node's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    External,
    Internal,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::External => "external",
            Self::Internal => "internal",
        })
    }
}

/// Which of its Service's addresses a frontend answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    /// `spec.clusterIP(s)`.
    ClusterIp,
    /// `status.loadBalancer.ingress[].ip` of a `type: LoadBalancer` Service (`ipMode` unset or
    /// `VIP`).
    LoadBalancer,
    /// `spec.ports[].nodePort` on one of this node's addresses (`--nodeport-addresses`).
    NodePort,
    /// `spec.externalIPs` (as `--external-ips` allows them).
    ExternalIp,
}

impl FrontendKind {
    /// The Service's field that holds addresses of this kind.
    pub fn field(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "spec.clusterIP",
            FrontendKind::LoadBalancer => "status.loadBalancer.ingress",
            FrontendKind::NodePort => "spec.ports[].nodePort",
            FrontendKind::ExternalIp => "spec.externalIPs",
        }
    }

    /// Whether clients outside the cluster reach addresses of this kind (through this node's
    /// interfaces).
    pub fn external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "ClusterIP",
            Self::LoadBalancer => "LoadBalancer",
            Self::NodePort => "NodePort",
            Self::ExternalIp => "ExternalIP",
        })
    }
}

/// What a frontend's flows may do with one of its endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Ready: may take new flows where it is in a table.
    Active,
    /// Not ready but serving (terminating): takes no new flows, keeps its TCP and UDP flows.
    Serving,
    /// Not serving: takes no new flows, keeps its TCP flows; its UDP flows pick again.
    Draining,
}

/// What the datapath should do for one VIP:port/protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub addr: FrontendAddr,
    /// Which of the Service's addresses `addr` is.
    pub kind: FrontendKind,
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
    /// The traffic policy that chose `backends` is `Local` (internalTrafficPolicy for cluster
    /// IPs and internal entries, externalTrafficPolicy for external entries) and the Service has
    /// usable endpoints somewhere (this node or another): with none here, new flows are dropped.
    /// With none anywhere it is false, and new flows are rejected like those of any Service
    /// without endpoints (kube-proxy's REJECT).
    pub local_only: bool,
    /// This node's pods use the entry of the same address with `Scope::Internal` instead of this
    /// one (an external address of an `externalTrafficPolicy: Local` Service).
    pub two_scopes: bool,
    /// A LoadBalancer address's `loadBalancerSourceRanges` (networks of its family, sorted):
    /// only clients inside one open flows to it, this cluster's pods included. `None`: every
    /// client.
    pub source_ranges: Option<Vec<SourceRange>>,
}

/// A network clients may come from (`loadBalancerSourceRanges`): address (host bits clear) and
/// prefix length.
pub type SourceRange = (IpAddr, u8);

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
    /// This node's addresses that NodePorts listen on (`--nodeport-addresses`).
    pub nodeport_addresses: Vec<Ipv4Addr>,
    /// This node's IPv6 addresses `--nodeport-addresses` selects (with `--ipv6`): where NodePorts
    /// and health-check node ports listen over IPv6.
    pub nodeport_addresses6: Vec<std::net::Ipv6Addr>,
    /// This node's primary IPv6 address (`loadBalancerSourceRanges`' node rule, as `node_ip`).
    pub node_ip6: Option<std::net::Ipv6Addr>,
    /// Every global IPv6 address of this node's interfaces (`--external-ips node-addresses`).
    pub local_addresses6: Vec<std::net::Ipv6Addr>,
    /// This node's primary IPv4 address: when a LoadBalancer's source ranges hold it, they admit
    /// the LoadBalancer's own address as a client too (kube-proxy's rule for load balancers that
    /// loop a node's request back with the address as its source).
    pub node_ip: Option<Ipv4Addr>,
    /// Every IPv4 address of this node's interfaces.
    pub local_addresses: Vec<Ipv4Addr>,
    /// Which `spec.externalIPs` are served (`--external-ips`).
    pub external_ips: node::ExternalIps,
    /// IPv6 Services are served (`--ipv6`); without it their IPv6 addresses are left out,
    /// reported.
    pub ipv6: bool,
}

impl Default for Context {
    fn default() -> Self {
        Self {
            node_name: None,
            zone: None,
            service_proxy_name: None,
            max_endpoints_per_service: DEFAULT_MAX_ENDPOINTS,
            nodeport_addresses: Vec::new(),
            nodeport_addresses6: Vec::new(),
            node_ip6: None,
            local_addresses6: Vec::new(),
            node_ip: None,
            local_addresses: Vec::new(),
            external_ips: node::ExternalIps::All,
            ipv6: true,
        }
    }
}

/// Default for [`Context::max_endpoints_per_service`].
pub const DEFAULT_MAX_ENDPOINTS: usize = 10_000;
/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10_800;

/// Why an object (or part of it) was not programmed. Each names the object and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("{kind} {object}: field {field}: {reason}")]
    Invalid { kind: &'static str, object: String, field: String, reason: String },
    #[error("{kind} {object}: field {field}: {what} is not supported yet")]
    Unsupported { kind: &'static str, object: String, field: String, what: String },
    /// Valid, but this agent's settings leave it out (`--external-ips`).
    #[error("{kind} {object}: field {field}: {reason}")]
    Refused { kind: &'static str, object: String, field: String, reason: String },
}

impl ModelError {
    fn invalid(kind: &'static str, object: &str, field: String, reason: impl Into<String>) -> Self {
        Self::Invalid { kind, object: object.to_string(), field, reason: reason.into() }
    }

    fn unsupported(kind: &'static str, object: &str, field: String, what: impl Into<String>) -> Self {
        Self::Unsupported { kind, object: object.to_string(), field, what: what.into() }
    }

    fn refused(kind: &'static str, object: &str, field: String, reason: impl Into<String>) -> Self {
        Self::Refused { kind, object: object.to_string(), field, reason: reason.into() }
    }

    /// The metric label for this error.
    pub const fn reason_label(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid",
            Self::Unsupported { .. } => "unsupported",
            Self::Refused { .. } => "refused",
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
    /// Which Service holds each address of `frontends`.
    pub addresses: Addresses,
    /// The health-check node ports of the Services built (not held), by Service.
    pub health_checks: BTreeMap<String, ServiceHealth>,
}

/// A Service's health-check node port (a LoadBalancer Service with externalTrafficPolicy Local):
/// the port its load balancer asks each node on, and what it reports on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceHealth {
    pub port: u16,
    /// Distinct addresses of this node's ready endpoints (terminating ones do not count).
    pub local_endpoints: usize,
}

/// Which Service holds each frontend address: the one rule for two Services asking for the same
/// address. The address stays with the Service that holds it (in a whole build, the first by
/// name); the other is told which Service has it, and waits: when the holder lets the address go,
/// the first waiting Service (by name) gets it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Addresses {
    owner: HashMap<FrontendAddr, String>,
    by_service: BTreeMap<String, Vec<FrontendAddr>>,
    /// Frontends refused because another Service held their address.
    waiting: BTreeMap<FrontendAddr, BTreeMap<String, Frontend>>,
    /// The addresses held by external frontends (not cluster IPs).
    external: HashSet<FrontendAddr>,
    /// Services that lost an address to a cluster IP since [`Addresses::take_displaced`]: they
    /// must be built again to wait for it.
    displaced: BTreeSet<String>,
    /// Addresses the displaced Services held beside the one taken (an internal entry), no
    /// Service's now.
    dropped: Vec<FrontendAddr>,
}

impl Addresses {
    /// Gives `fe.addr` to `fe.service`, unless a Service holds it already: then `fe` waits for
    /// the address and the error says who holds it.
    pub fn offer(&mut self, fe: Frontend) -> Result<Frontend, ModelError> {
        let addr = fe.addr;
        // An address's internal entry goes with its external one: only the Service that holds
        // that may have it (else a Service refused the address would still catch this node's
        // pods reaching it, once its holder had two scopes).
        let external = FrontendAddr { scope: Scope::External, ..addr };
        let owner = if addr.scope == Scope::Internal && self.owner.get(&external) != Some(&fe.service) {
            self.owner.get(&external).or(self.owner.get(&addr))
        } else {
            self.owner.get(&addr)
        };
        match owner {
            // A cluster IP is the cluster's own: it takes its address from an external one (an
            // externalIP, a LoadBalancer IP or a NodePort anyone who may create a Service can
            // point there, CVE-2020-8554), which then waits for it.
            Some(other)
                if *other != fe.service
                    && fe.kind == FrontendKind::ClusterIp
                    && addr.scope == Scope::External
                    && self.external.contains(&addr) =>
            {
                let other = other.clone();
                let internal = FrontendAddr { scope: Scope::Internal, ..addr };
                let theirs = self.by_service.entry(other.clone()).or_default();
                theirs.retain(|a| *a != addr && *a != internal);
                if self.owner.get(&internal) == Some(&other) {
                    self.owner.remove(&internal);
                    self.external.remove(&internal);
                    self.dropped.push(internal);
                }
                self.displaced.insert(other);
                self.external.remove(&addr);
                self.owner.insert(addr, fe.service.clone());
                self.by_service.entry(fe.service.clone()).or_default().push(addr);
                Ok(fe)
            }
            // Held already, even by this Service (a port or address listed twice).
            Some(other) => {
                let e = ModelError::invalid(
                    "Service",
                    &fe.service,
                    fe.kind.field().into(),
                    format!("{addr} is already used by Service {other}"),
                );
                if *other != fe.service {
                    self.waiting.entry(addr).or_default().insert(fe.service.clone(), fe);
                }
                Err(e)
            }
            None => {
                if fe.kind.external() {
                    self.external.insert(addr);
                }
                self.owner.insert(addr, fe.service.clone());
                self.by_service.entry(fe.service.clone()).or_default().push(addr);
                Ok(fe)
            }
        }
    }

    /// The Services that lost an address to a cluster IP since the last call: the agent builds
    /// them again (a full resync), so that they wait for it and report why.
    pub fn take_displaced(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.displaced)
    }

    /// Stops `service` waiting for addresses (its objects were rejected: what it asked for is no
    /// longer known to be valid).
    pub fn stop_waiting(&mut self, service: &str) {
        self.waiting.retain(|_, w| {
            w.remove(service);
            !w.is_empty()
        });
    }

    /// Records that `service` holds `addr` (as found in the maps at start).
    pub fn seed(&mut self, addr: FrontendAddr, service: String) {
        if !self.owner.contains_key(&addr) {
            self.by_service.entry(service.clone()).or_default().push(addr);
            self.owner.insert(addr, service);
        }
    }

    /// The Service holding `addr`.
    pub fn holder(&self, addr: &FrontendAddr) -> Option<&str> {
        self.owner.get(addr).map(String::as_str)
    }

    /// Lets go of every address `service` holds or waits for; returns those it held.
    fn release(&mut self, service: &str) -> Vec<FrontendAddr> {
        self.waiting.retain(|_, w| {
            w.remove(service);
            !w.is_empty()
        });
        let old = self.by_service.remove(service).unwrap_or_default();
        for a in &old {
            self.owner.remove(a);
            self.external.remove(a);
        }
        old
    }

    /// One batch of Services, each with all its frontends now. Every listed Service lets go of
    /// its addresses before any claims them again, so that one batch can move an address from one
    /// Service to another whatever their names. An address goes back first to the Service that
    /// held it, whatever the order of the batch; then to new claims, in the batch's order; what
    /// is left goes to the Services that waited for it (except those in `held`, rejected now).
    /// Returns the
    /// frontends to write and the addresses no Service holds any more; refusals go to `errors`.
    pub fn reassign(
        &mut self,
        batch: Vec<(String, BTreeMap<FrontendAddr, Frontend>)>,
        held: &BTreeSet<String>,
        errors: &mut Vec<ModelError>,
    ) -> (BTreeMap<FrontendAddr, Frontend>, Vec<FrontendAddr>) {
        let mut released = Vec::new();
        let mut before = BTreeSet::new();
        for (service, _) in &batch {
            let gone = self.release(service);
            before.extend(gone.iter().map(|a| (service.clone(), *a)));
            released.extend(gone);
        }
        let mut claimed = BTreeMap::new();
        let mut rest = Vec::new();
        for (service, frontends) in batch {
            let (again, others) =
                frontends.into_iter().partition(|(a, _)| before.contains(&(service.clone(), *a)));
            claimed.extend(self.claim_all(again, errors));
            rest.push(others);
        }
        for others in rest {
            claimed.extend(self.claim_all(others, errors));
        }
        // What displaced Services held beside the addresses taken goes too (claimed in this
        // batch, or before).
        for addr in self.dropped.drain(..) {
            claimed.remove(&addr);
            released.push(addr);
        }
        claimed.extend(self.hand_over(&released, held));
        let freed = released.into_iter().filter(|a| !claimed.contains_key(a)).collect();
        (claimed, freed)
    }

    /// Offers each of `frontends` (all of one Service); returns those it now holds, and reports
    /// the refused ones in `errors`.
    fn claim_all(
        &mut self,
        frontends: BTreeMap<FrontendAddr, Frontend>,
        errors: &mut Vec<ModelError>,
    ) -> Vec<(FrontendAddr, Frontend)> {
        let mut claimed = Vec::new();
        for fe in frontends.into_values() {
            match self.offer(fe) {
                Ok(fe) => claimed.push((fe.addr, fe)),
                Err(e) => errors.push(e),
            }
        }
        claimed
    }

    /// Gives each of `released` that nobody holds now to the first Service waiting for it, except
    /// those in `skip` (their objects were just rejected: they keep what they had); returns their
    /// frontends.
    fn hand_over(
        &mut self,
        released: &[FrontendAddr],
        skip: &BTreeSet<String>,
    ) -> Vec<(FrontendAddr, Frontend)> {
        let mut out = Vec::new();
        for addr in released {
            if self.owner.contains_key(addr) {
                continue;
            }
            let Some(w) = self.waiting.get_mut(addr) else { continue };
            // A cluster IP first (see `offer`), then the first by name.
            let eligible = || w.iter().filter(|(s, _)| !skip.contains(*s));
            let cluster_ip = eligible().find(|(_, f)| f.kind == FrontendKind::ClusterIp);
            let Some(first) = cluster_ip.or_else(|| eligible().next()).map(|(s, _)| s.clone()) else {
                continue;
            };
            let fe = w.remove(&first).expect("listed");
            if w.is_empty() {
                self.waiting.remove(addr);
            }
            if let Ok(fe) = self.offer(fe) {
                out.push((*addr, fe));
            }
        }
        out
    }
}

/// Translates Services and EndpointSlices into frontends. Invalid objects are reported in
/// `Model::errors`; a Service whose objects are invalid is listed in `Model::held`. Two Services
/// asking for one address: the first by name gets it.
pub fn build(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>], ctx: &Context) -> Model {
    build_with(services, slices, ctx, &Addresses::default(), &mut LastGood::default())
}

/// As [`build`], with what is programmed (`prior`) and the EndpointSlices' last good endpoints
/// (`last_good`, see [`LastGood`]).
pub fn build_with(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    ctx: &Context,
    prior: &Addresses,
    last_good: &mut LastGood,
) -> Model {
    build_claiming(services, slices, ctx, prior, &BTreeSet::new(), last_good)
}

/// The last good endpoints of each EndpointSlice, by slice. A bad slice is rejected alone: its
/// Service is served from its other slices, and from the bad one's last good version if it had
/// one under the same Service (so a slice that turns bad loses nothing while the agent runs). A
/// bad slice without one adds nothing, also after a restart (the cache is not kept across one):
/// its endpoints then leave the table, their established flows draining.
///
/// What is kept is the slice object itself, shared with the source (an `Arc`, no copy), and read
/// again when it stands in: reading a slice depends on nothing but the slice, so it gives the same
/// endpoints it gave when it was good. (Keeping the endpoints read cost about 10 MB at 10,000
/// Services × 10 endpoints, beside the objects.)
#[derive(Default)]
pub struct LastGood {
    /// Slice object → (its Service object, the slice). Slices without a name are not kept.
    slices: HashMap<String, (String, Arc<EndpointSlice>)>,
}

impl LastGood {
    /// Forgets the slices of Services not in `services` (gone from the source).
    pub fn keep_services(&mut self, services: &BTreeSet<String>) {
        self.slices.retain(|_, (svc, _)| services.contains(svc));
    }

    /// Forgets the slices of `service` (deleted, or not served).
    pub fn forget(&mut self, service: &str) {
        self.slices.retain(|_, (svc, _)| svc != service);
    }

    /// The last good endpoints of `slice` under `service`.
    fn get(&self, slice: &str, service: &str) -> Option<EndpointsByPort> {
        let (_, good) = self.slices.get(slice).filter(|(svc, _)| svc == service)?;
        let mut eps = EndpointsByPort::new();
        // It was read without error when it was kept.
        slice_endpoints(good, slice, &mut eps).ok().map(|()| eps)
    }
}

/// As [`build`], but an address `prior` gives to a Service that still asks for it, or whose
/// objects are rejected now (here, or by the source: `held_by_source`), stays with it, whatever
/// the names: a full resync moves no address that changes one by one would not.
pub fn build_claiming(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    ctx: &Context,
    prior: &Addresses,
    held_by_source: &BTreeSet<String>,
    last_good: &mut LastGood,
) -> Model {
    let mut model = Model::default();
    let mut wanted = Vec::new();
    // EndpointSlices by (namespace, service name).
    let mut by_service: BTreeMap<(String, String), Vec<&Arc<EndpointSlice>>> = BTreeMap::new();
    for s in slices {
        let ns = s.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        if let Some(svc) = &s.service {
            by_service.entry((ns, svc.clone())).or_default().push(s);
        }
    }
    let mut services: Vec<&Service> = services.iter().map(|s| &**s).collect();
    services.sort_by_key(|s| object_name(s.metadata.namespace.as_ref(), s.metadata.name.as_ref()));
    for svc in services {
        let object = object_name(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref());
        let spec = match service_spec(svc, &object, ctx, &mut model.errors) {
            SvcOutcome::Use(spec) => spec,
            SvcOutcome::Skip => {
                last_good.forget(&object);
                continue;
            }
            SvcOutcome::Reject => {
                model.held.insert(object);
                continue;
            }
        };
        let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = svc.metadata.name.clone().unwrap_or_default();
        let mut endpoints = EndpointsByPort::new();
        // Programmed already: a Service that has objects the source could not read keeps what it
        // had (which of its objects is missing is unknown).
        let programmed = prior.by_service.contains_key(&object);
        let mut rejected = programmed && held_by_source.contains(&object);
        let mut slices: Vec<&Arc<EndpointSlice>> =
            by_service.get(&(ns, name)).into_iter().flatten().copied().collect();
        slices.sort_by_key(|s| s.metadata.name.clone());
        let mut present = BTreeSet::new();
        for slice in slices {
            let slice_object = object_name(slice.metadata.namespace.as_ref(), slice.metadata.name.as_ref());
            let named = slice.metadata.name.is_some();
            let mut parsed = EndpointsByPort::new();
            let got = match slice_endpoints(slice, &slice_object, &mut parsed) {
                Ok(()) => {
                    if named {
                        last_good.slices.insert(slice_object.clone(), (object.clone(), Arc::clone(slice)));
                    }
                    Some(parsed)
                }
                // Rejected alone: the Service goes on with its other slices, and with this one as
                // it last was good.
                Err(e) => {
                    model.errors.push(e);
                    if named {
                        last_good.get(&slice_object, &object)
                    } else {
                        None
                    }
                }
            };
            for (port, eps) in got.into_iter().flatten() {
                endpoints.entry(port).or_default().extend(eps);
            }
            present.insert(slice_object);
        }
        if !rejected {
            last_good.slices.retain(|slice, (svc, _)| *svc != object || present.contains(slice));
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
        if let Some(port) = spec.health_check_port {
            let primary_v6 = spec.vips.first().is_some_and(IpAddr::is_ipv6);
            let local_endpoints = endpoints::local_ready(&endpoints, ctx, primary_v6);
            model.health_checks.insert(object.clone(), ServiceHealth { port, local_endpoints });
        }
        // Each family's frontends use the endpoints of that family's slices only.
        for (p, v6) in spec.ports.iter().flat_map(|p| [(p, false), (p, true)]) {
            let family = |ip: &IpAddr| ip.is_ipv6() == v6;
            if !spec.vips.iter().any(family) && !spec.external.iter().any(|(ip, _)| family(ip)) {
                continue;
            }
            let all = endpoints.get(&(p.name.clone(), p.proto)).map(Vec::as_slice).unwrap_or_default();
            let eps = &endpoints::of_family(all, v6);
            // kube-proxy drops traffic of a traffic policy Local that has usable endpoints only on
            // other nodes, and rejects it when it has none anywhere.
            let usable = endpoints::any_usable(eps);
            // Endpoints for new flows under each policy, the terminating fallback computed for
            // each set apart (kube-proxy's CategorizeEndpoints).
            let cluster = select(eps, p.proto, false, ctx);
            let local = if spec.local_only || spec.external_local {
                select(eps, p.proto, true, ctx)
            } else {
                cluster.clone()
            };
            let fe = |addr: FrontendAddr, kind, (backends, kept): &(Vec<BackendAddr>, Vec<_>), local_only| {
                Frontend {
                    addr,
                    kind,
                    service: object.clone(),
                    port_name: p.name.clone(),
                    backends: backends.clone(),
                    kept: kept.clone(),
                    affinity_timeout_secs: spec.affinity_timeout_secs,
                    local_only,
                    two_scopes: false,
                    source_ranges: None,
                }
            };
            let internal = if spec.local_only { &local } else { &cluster };
            for vip in spec.vips.iter().filter(|ip| family(ip)) {
                let addr = FrontendAddr::new(*vip, p.port, p.proto);
                wanted.push(fe(addr, FrontendKind::ClusterIp, internal, spec.local_only && usable));
            }
            // NodePorts listen on this node's addresses of the family (IPv6 with `--ipv6`; a
            // Service's family needs a cluster IP of it, as kube-proxy's per-family proxiers).
            let node_addrs: Vec<IpAddr> = if !spec.vips.iter().any(family) {
                Vec::new()
            } else if v6 {
                ctx.nodeport_addresses6.iter().map(|ip| IpAddr::V6(*ip)).collect()
            } else {
                ctx.nodeport_addresses.iter().map(|ip| IpAddr::V4(*ip)).collect()
            };
            let node_ports = p.node_port.into_iter().flat_map(|port| {
                node_addrs.iter().map(move |ip| (*ip, port, FrontendKind::NodePort)).collect::<Vec<_>>()
            });
            let load_balancers =
                spec.external.iter().filter(|(ip, _)| family(ip)).map(|(ip, kind)| (*ip, p.port, *kind));
            for (ip, port, kind) in load_balancers.chain(node_ports) {
                let addr = FrontendAddr::new(ip, port, p.proto);
                let source_ranges = spec
                    .source_ranges
                    .as_deref()
                    .filter(|_| kind == FrontendKind::LoadBalancer)
                    .and_then(|r| service::ranges_of_family(r, ip));
                let fe = |addr, backends, local_only| Frontend {
                    source_ranges: source_ranges.clone(),
                    ..fe(addr, kind, backends, local_only)
                };
                if !spec.external_local {
                    wanted.push(fe(addr, &cluster, false));
                    continue;
                }
                // Clients from outside get this node's endpoints; this node's pods every endpoint
                // (internalTrafficPolicy is for the cluster IPs; this is kube-proxy's exception
                // for the cluster's own clients).
                wanted.push(Frontend { two_scopes: true, ..fe(addr, &local, usable) });
                let addr = FrontendAddr { scope: Scope::Internal, ..addr };
                wanted.push(fe(addr, &cluster, false));
            }
        }
    }
    // Services whose objects were rejected keep what they had, their addresses included (each
    // once: a Service may be held for both reasons).
    for service in model.held.union(held_by_source) {
        for addr in prior.by_service.get(service).into_iter().flatten() {
            if prior.external.contains(addr) {
                model.addresses.external.insert(*addr);
            }
            model.addresses.owner.insert(*addr, service.clone());
            model.addresses.by_service.entry(service.clone()).or_default().push(*addr);
        }
    }
    // Cluster IPs first (an external address never takes one, see `Addresses::offer`), each
    // kind's addresses first to the Services that held them.
    wanted.sort_by_key(|fe| (fe.kind.external(), prior.holder(&fe.addr) != Some(fe.service.as_str())));
    for fe in wanted {
        match model.addresses.offer(fe) {
            Ok(fe) => {
                model.frontends.insert(fe.addr, fe);
            }
            Err(e) => model.errors.push(e),
        }
    }
    for addr in model.addresses.dropped.drain(..) {
        model.frontends.remove(&addr);
    }
    model.addresses.displaced.clear();
    model
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::{files::read_bytes, Objects};

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
        FrontendAddr::new(vip, port, proto)
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
    fn kept_endpoints_say_whether_they_still_serve() {
        // kube-proxy's rules: a missing `serving` counts as true whatever `ready` says; serving
        // endpoints keep UDP flows, the others only TCP flows.
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
- addresses: [10.244.1.6]
- addresses: [10.244.1.7]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.1.8]
  conditions: {ready: false, serving: false, terminating: true}
- addresses: [10.244.1.9]
  conditions: {ready: false}
- addresses: [10.244.1.10]
  conditions: {ready: false, serving: false}
"#,
        );
        let fe = &m.frontends[&addr([10, 96, 0, 20], 80, Protocol::Tcp)];
        assert_eq!(fe.backends, vec![be([10, 244, 1, 6], 8080, Protocol::Tcp)]);
        let kept: BTreeMap<IpAddr, BackendState> = fe.kept.iter().map(|(b, s)| (b.ip, *s)).collect();
        assert_eq!(
            kept,
            BTreeMap::from([
                (Ipv4Addr::new(10, 244, 1, 7).into(), BackendState::Serving),
                (Ipv4Addr::new(10, 244, 1, 8).into(), BackendState::Draining),
                (Ipv4Addr::new(10, 244, 1, 9).into(), BackendState::Serving),
                (Ipv4Addr::new(10, 244, 1, 10).into(), BackendState::Draining),
            ])
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

#[cfg(test)]
mod last_good_tests {
    use std::path::Path;

    use super::*;
    use crate::source::{files::read_bytes, Objects};

    fn objects(yaml: &str) -> Objects {
        let mut o = Objects::default();
        read_bytes(Path::new("test.yaml"), yaml.as_bytes(), &mut o);
        o
    }

    fn service(name: &str, vip: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: d}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80}}]\n---\n")
    }

    fn slice(name: &str, service: &str, addr: &str) -> String {
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: d, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- addresses: [{addr}]\n---\n")
    }

    fn backends(m: &Model, vip: [u8; 4]) -> Vec<String> {
        let a = FrontendAddr::new(vip, 80, Protocol::Tcp);
        m.frontends.get(&a).map(|f| f.backends.iter().map(|b| b.ip.to_string()).collect()).unwrap_or_default()
    }

    fn run(yaml: &str, prior: &Addresses, lg: &mut LastGood) -> Model {
        let o = objects(yaml);
        build_claiming(&o.services, &o.slices, &Context::default(), prior, &BTreeSet::new(), lg)
    }

    /// A slice good under Service a, then relabelled to b and bad: b never gets a's endpoints.
    #[test]
    fn a_last_good_slice_stands_in_only_for_its_own_service() {
        let mut lg = LastGood::default();
        let m = run(
            &format!(
                "{}{}{}",
                service("a", "10.96.0.1"),
                service("b", "10.96.0.2"),
                slice("s", "a", "10.244.0.1")
            ),
            &Addresses::default(),
            &mut lg,
        );
        assert_eq!(backends(&m, [10, 96, 0, 1]), ["10.244.0.1"]);
        let m = run(
            &format!(
                "{}{}{}",
                service("a", "10.96.0.1"),
                service("b", "10.96.0.2"),
                slice("s", "b", "10.244.0.999")
            ),
            &m.addresses,
            &mut lg,
        );
        assert!(
            backends(&m, [10, 96, 0, 2]).is_empty(),
            "b took a's endpoints: {:?}",
            backends(&m, [10, 96, 0, 2])
        );
    }

    /// A bad slice that never was good adds nothing, whether the Service is programmed (here, or
    /// restored from the pins: the cache is empty after a restart) or not: the other slices are
    /// served, and a good slice's change still applies.
    #[test]
    fn a_bad_slice_without_a_good_version_adds_nothing() {
        let good = format!("{}{}", service("web", "10.96.0.1"), slice("web-1", "web", "10.244.0.1"));
        let programmed = run(&good, &Addresses::default(), &mut LastGood::default()).addresses;
        let bad = format!(
            "{}{}{}",
            service("web", "10.96.0.1"),
            slice("web-1", "web", "10.244.0.2"),
            slice("web-2", "web", "10.244.0.999")
        );
        for prior in [Addresses::default(), programmed] {
            let m = run(&bad, &prior, &mut LastGood::default());
            assert!(!m.held.contains("d/web"));
            assert_eq!(backends(&m, [10, 96, 0, 1]), ["10.244.0.2"]);
        }
    }

    /// A Service held for an object the source could not read keeps its addresses, listed once
    /// however many full syncs run (it is held for two reasons at once).
    #[test]
    fn a_held_service_keeps_its_addresses_once() {
        let good = format!("{}{}", service("web", "10.96.0.1"), slice("web-1", "web", "10.244.0.1"));
        let mut prior = run(&good, &Addresses::default(), &mut LastGood::default()).addresses;
        let o = objects(&good);
        let held = BTreeSet::from(["d/web".to_string()]);
        for _ in 0..5 {
            let m = build_claiming(
                &o.services,
                &o.slices,
                &Context::default(),
                &prior,
                &held,
                &mut LastGood::default(),
            );
            assert!(m.held.contains("d/web"));
            assert_eq!(
                m.addresses.by_service.get("d/web").map(Vec::len),
                Some(1),
                "{:?}",
                m.addresses.by_service
            );
            prior = m.addresses;
        }
    }

    /// A Service that is skipped (here: headless) forgets its slices' good versions, so that they
    /// never stand in for endpoints that changed meanwhile.
    #[test]
    fn a_skipped_service_forgets_its_slices() {
        let mut lg = LastGood::default();
        let good = format!("{}{}", service("web", "10.96.0.1"), slice("web-1", "web", "10.244.0.1"));
        run(&good, &Addresses::default(), &mut lg);
        let headless = good.replace("clusterIP: 10.96.0.1", "clusterIP: None");
        run(&headless, &Addresses::default(), &mut lg);
        let bad = format!("{}{}", service("web", "10.96.0.1"), slice("web-1", "web", "10.244.0.999"));
        let m = run(&bad, &Addresses::default(), &mut lg);
        assert!(backends(&m, [10, 96, 0, 1]).is_empty(), "an old good version stood in");
    }

    /// A LoadBalancer Service with externalTrafficPolicy Local (`policy`, `kind` and the port line
    /// given), its endpoints over two slices and two ports.
    fn health_checked(kind: &str, policy: &str, port_line: &str) -> String {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: shop}}
spec:
  type: {kind}
  clusterIP: 10.96.0.30
  externalTrafficPolicy: {policy}
  {port_line}
  ports: [{{name: http, port: 80, nodePort: 30080}}, {{name: dns, port: 53, protocol: UDP, nodePort: 30053}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-a, namespace: shop, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
- {{addresses: [10.244.1.1], nodeName: node1}}
- {{addresses: [10.244.1.2], nodeName: node1, conditions: {{ready: false, serving: true, terminating: true}}}}
- {{addresses: [10.244.1.3], nodeName: node1, conditions: {{ready: false}}}}
- {{addresses: [10.244.2.4], nodeName: node2, conditions: {{ready: true}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-b, namespace: shop, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- {{addresses: [10.244.1.1], nodeName: node1}}
- {{addresses: [10.244.1.5], nodeName: node1, conditions: {{ready: true, terminating: false}}}}
"#
        )
    }

    /// kube-proxy's count for a health-check node port: distinct addresses of this node's ready
    /// endpoints over every port and slice; not-ready and terminating ones (serving or not) and
    /// other nodes' do not count.
    #[test]
    fn a_health_check_node_port_counts_this_nodes_ready_endpoints_by_address() {
        let yaml = health_checked("LoadBalancer", "Local", "healthCheckNodePort: 32100");
        let o = objects(&yaml);
        for (node, want) in [(Some("node1"), 2), (Some("node2"), 1), (Some("node3"), 0), (None, 0)] {
            let ctx = Context { node_name: node.map(Into::into), ..Context::default() };
            let m = build(&o.services, &o.slices, &ctx);
            assert!(m.errors.is_empty(), "{:?}", m.errors);
            let got = m.health_checks.get("shop/lb").copied();
            assert_eq!(got, Some(ServiceHealth { port: 32100, local_endpoints: want }), "{node:?}");
        }
    }

    /// Only a LoadBalancer Service with externalTrafficPolicy Local has one; one that lacks its port
    /// or has a bad one is reported, naming the field, and is served without it.
    #[test]
    fn only_load_balancers_with_a_local_policy_have_a_health_check_node_port() {
        let ctx = Context { node_name: Some("node1".into()), ..Context::default() };
        for (kind, policy, line) in [
            ("LoadBalancer", "Cluster", "healthCheckNodePort: 32100"),
            ("NodePort", "Local", "healthCheckNodePort: 32100"),
        ] {
            let o = objects(&health_checked(kind, policy, line));
            let m = build(&o.services, &o.slices, &ctx);
            assert!(m.health_checks.is_empty() && m.errors.is_empty(), "{kind} {policy}: {m:?}");
        }
        for (line, why) in [("", "missing"), ("healthCheckNodePort: 70000", "70000 is not in 1-65535")] {
            let o = objects(&health_checked("LoadBalancer", "Local", line));
            let m = build(&o.services, &o.slices, &ctx);
            assert!(m.health_checks.is_empty(), "{line:?}");
            assert_eq!(m.errors.len(), 1, "{line:?}: {:?}", m.errors);
            let e = m.errors[0].to_string();
            assert!(e.contains("Service shop/lb: field spec.healthCheckNodePort") && e.contains(why), "{e}");
            assert!(
                m.frontends.contains_key(&FrontendAddr::new([10, 96, 0, 30], 80, Protocol::Tcp)),
                "still served"
            );
        }
        // A Service held (a bad field elsewhere) reports no health check of its own: the agent
        // keeps the one it had.
        let o = objects(&health_checked(
            "LoadBalancer",
            "Local",
            "healthCheckNodePort: 32100\n  sessionAffinity: Bogus",
        ));
        let m = build(&o.services, &o.slices, &ctx);
        assert!(m.held.contains("shop/lb") && m.health_checks.is_empty(), "{m:?}");
    }
}
