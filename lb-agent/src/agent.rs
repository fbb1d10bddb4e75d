//! The agent's core: a [`Change`] from a source goes through the model and the reconciler to the
//! maps. [`Agent::apply`] is the only way in: with everything the source knows, or with just the
//! Services an event touched; the reconciler writes only what changed either way.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use crate::{
    datapath::Maps,
    health::{Health, HealthCheckServers},
    metrics::Metrics,
    model::{self, Addresses, Context, ServiceHealth},
    reconcile::{FlowTables, MapWriter, Reconciler, Sweeper, SyncStats},
    source::{Change, ManifestError, Objects, ServiceObjects, What},
};

pub struct Agent<W: MapWriter = Maps> {
    pub maps: W,
    pub reconciler: Reconciler,
    pub ctx: Context,
    /// The zone given by `--zone`; without it, the zone comes from this node's label.
    zone_flag: Option<String>,
    /// Error messages already logged, so that a bad object is reported once, not on every sync.
    reported: BTreeSet<String>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Which Service holds each frontend address, as last programmed.
    addresses: Addresses,
    /// Whether the first change (the whole state at start) was applied: it is a cold start, not
    /// a change to measure programming latency by.
    started: bool,
    /// The flow sweep, when the agent runs one (see [`Agent::with_sweep`]).
    sweeper: Option<Sweeper>,
    /// The EndpointSlices' last good endpoints: a slice that turns bad is served as it was.
    last_good: model::LastGood,
    /// `--nodeport-addresses`, and this node's local addresses it selects from.
    nodeport_spec: model::node::NodePortAddresses,
    local_addrs: Vec<std::net::Ipv4Addr>,
    /// This node's global IPv6 addresses.
    local_addrs6: Vec<std::net::Ipv6Addr>,
    /// A full resync is wanted (see [`Agent::take_resync`]).
    resync: bool,
    /// The health-check node ports, by Service (a held Service keeps its own).
    health_checks: std::collections::BTreeMap<String, ServiceHealth>,
    /// Services of `health_checks` whose objects are rejected now: they serve what they had, and
    /// yield a port another Service has since been given.
    health_held: BTreeSet<String>,
    health_servers: HealthCheckServers,
    /// A Node object for this node came from the source once: if it goes, the node is not
    /// eligible for load balancer traffic.
    node_seen: bool,
}

/// What one change did.
#[derive(Debug, Clone)]
pub struct Report {
    pub stats: SyncStats,
    pub frontends: usize,
    /// Every configuration and write error of this change, in the order they were found: what the
    /// source could not read, then what the model rejected, then failed writes.
    pub errors: Vec<String>,
    /// Services whose objects were rejected: they keep what they had.
    pub held: BTreeSet<String>,
    pub elapsed: Duration,
}

impl<W: MapWriter> Agent<W> {
    pub fn new(maps: W, reconciler: Reconciler, ctx: Context) -> Self {
        let mut addresses = Addresses::default();
        for (addr, service) in reconciler.holders() {
            addresses.seed(addr, service);
        }
        let health = Arc::new(Health::new());
        health.set_ipv6(ctx.ipv6);
        Self {
            maps,
            reconciler,
            zone_flag: ctx.zone.clone(),
            ctx,
            reported: BTreeSet::new(),
            metrics: Arc::new(Metrics::new()),
            health_servers: HealthCheckServers::new(health.clone(), false),
            health,
            addresses,
            started: false,
            sweeper: None,
            last_good: model::LastGood::default(),
            nodeport_spec: model::node::NodePortAddresses::default(),
            local_addrs: Vec::new(),
            local_addrs6: Vec::new(),
            resync: false,
            health_checks: Default::default(),
            health_held: BTreeSet::new(),
            node_seen: false,
        }
    }

    /// Listens on the health-check node ports (`--health-check-node-ports=on`; without it what they
    /// would answer is still worked out, for `lbctl health`). The agent then needs a Tokio
    /// runtime to apply changes.
    pub fn with_health_check_node_ports(mut self, listen: bool) -> Self {
        self.health_servers = HealthCheckServers::new(self.health.clone(), listen);
        self
    }

    /// Whether some health-check node port could not be served (the main loop tries again on its
    /// next tick).
    pub fn health_checks_failing(&self) -> bool {
        self.health_servers.failing()
    }

    /// The health-check node ports, by Service, with their local endpoints.
    pub fn health_checks(&self) -> &std::collections::BTreeMap<String, ServiceHealth> {
        &self.health_checks
    }

    /// Serves the health-check node ports as they are wanted now; a port that could not be listened
    /// on before is tried again. Returns what cannot be served (each naming its Service).
    pub fn serve_health_checks(&mut self) -> Vec<String> {
        let addresses = health_check_addresses(&self.nodeport_spec, &self.ctx);
        let errors = self.health_servers.sync(&self.health_checks, &self.health_held, &addresses);
        errors.iter().map(ToString::to_string).collect()
    }

    /// NodePorts listen on the addresses `spec` selects among this node's (`local`, and its Node
    /// object's as the source gives it).
    pub fn with_nodeport_addresses(
        mut self,
        spec: model::node::NodePortAddresses,
        local: Vec<std::net::Ipv4Addr>,
    ) -> Self {
        self.nodeport_spec = spec;
        self.local_addrs = local;
        self
    }

    /// This node's global IPv6 addresses (`--nodeport-addresses` CIDRs select among them).
    pub fn with_local_ipv6(mut self, local: Vec<std::net::Ipv6Addr>) -> Self {
        self.local_addrs6 = local;
        self
    }

    /// This node's global IPv6 addresses now; true if they changed (as
    /// [`Agent::set_local_addresses`]).
    pub fn set_local_ipv6(&mut self, local: Vec<std::net::Ipv6Addr>) -> bool {
        replace_unordered(&mut self.local_addrs6, local)
    }

    /// This node's local addresses now; true if they changed (the NodePorts follow at the next
    /// full change).
    pub fn set_local_addresses(&mut self, local: Vec<std::net::Ipv4Addr>) -> bool {
        replace_unordered(&mut self.local_addrs, local)
    }

    /// Runs `sweeper` from [`Agent::sweep`]: expired flows are removed, and tombstones and
    /// departed members go once no flow uses them.
    pub fn with_sweep(mut self, sweeper: Sweeper) -> Self {
        self.reconciler.begin_pass(sweeper.pass());
        self.sweeper = Some(sweeper);
        self
    }

    /// Whether the source should send everything again (see `Addresses::take_displaced`); true
    /// once per need.
    pub fn take_resync(&mut self) -> bool {
        std::mem::take(&mut self.resync)
    }

    /// Programs a change.
    pub fn apply(&mut self, change: Change) -> Report {
        self.health.change_seen(change.seen);
        let mut report = match change.what {
            What::All(objects) => self.apply_all(objects),
            What::Services(changed) => self.apply_services(changed),
        };
        match self.reconciler.families_behind() {
            0 => self.health.applied(),
            behind => self.health.writes_failed(behind),
        }
        report.errors.extend(self.serve_health_checks());
        if std::mem::replace(&mut self.started, true) {
            let latency = change.seen.elapsed();
            self.metrics.programming_latency.observe(latency.as_secs_f64());
            debug!(latency_us = latency.as_micros() as u64, "change applied");
        }
        report
    }

    /// Programs `objects`, the whole desired state of the source.
    fn apply_all(&mut self, objects: Objects) -> Report {
        let started = Instant::now();
        if let Some(node) = &objects.node {
            self.ctx.zone = self.zone_flag.clone().or_else(|| model::node_zone(node));
            self.health.set_node_eligible(model::node::eligible(node));
            self.node_seen = true;
        } else if self.node_seen && !objects.errors.iter().any(ManifestError::may_hide_a_node) {
            // Gone (unless the source could not read what may have held it: then eligibility
            // stays as it was).
            self.health.set_node_eligible(Err("this node's Node object is gone".into()));
        }
        let nodeports = (self.ctx.nodeport_addresses.clone(), self.ctx.nodeport_addresses6.clone());
        self.ctx.nodeport_addresses =
            model::node::nodeport_ipv4(&self.nodeport_spec, objects.node.as_deref(), &self.local_addrs);
        self.ctx.nodeport_addresses6 = if self.ctx.ipv6 {
            model::node::nodeport_ipv6(&self.nodeport_spec, objects.node.as_deref(), &self.local_addrs6)
        } else {
            Vec::new()
        };
        if nodeports != (self.ctx.nodeport_addresses.clone(), self.ctx.nodeport_addresses6.clone()) {
            // Which addresses NodePorts open on (a family no CIDR names gets all of its own).
            let all: Vec<String> = (self.ctx.nodeport_addresses.iter().map(ToString::to_string))
                .chain(self.ctx.nodeport_addresses6.iter().map(ToString::to_string))
                .collect();
            info!(spec = %self.nodeport_spec, "NodePorts listen on: {}", if all.is_empty() { "no address".into() } else { all.join(", ") });
        }
        self.ctx.node_ip = objects.node.as_deref().and_then(model::node::primary_ipv4);
        self.ctx.node_ip6 = objects.node.as_deref().and_then(model::node::primary_ipv6);
        self.ctx.local_addresses6.clone_from(&self.local_addrs6);
        self.ctx.local_addresses.clone_from(&self.local_addrs);
        // Objects the source could not read are held too: their Services keep what they had,
        // their addresses included.
        let held_by_source: BTreeSet<String> = objects.errors.iter().filter_map(|e| e.service()).collect();
        let model = model::build_claiming(
            &objects.services,
            &objects.slices,
            &self.ctx,
            &self.addresses,
            &held_by_source,
            &mut self.last_good,
        );
        let present: BTreeSet<String> = objects
            .services
            .iter()
            .map(|s| model::object_name(s.metadata.namespace.as_ref(), s.metadata.name.as_ref()))
            .collect();
        self.last_good.keep_services(&present);
        let mut messages: Vec<(String, &'static str)> = Vec::new();
        messages.extend(objects.errors.iter().map(|e| (e.to_string(), e.reason_label())));
        messages.extend(model.errors.iter().map(|e| (e.to_string(), e.reason_label())));
        let config_errors = messages.len();
        let mut held = model.held.clone();
        held.extend(held_by_source);
        let mut checks = model.health_checks.clone();
        self.health_held.clear();
        for service in &held {
            if let Some(h) = self.health_checks.get(service) {
                checks.insert(service.clone(), *h);
                self.health_held.insert(service.clone());
            }
        }
        self.health_checks = checks;
        let (stats, sync_errors) = self.reconciler.sync(&model.frontends, &held, &mut self.maps);
        for e in &sync_errors {
            self.metrics.sync_error(e.reason_label());
        }
        messages.extend(sync_errors.iter().map(|e| (e.to_string(), e.reason_label())));
        let current: BTreeSet<String> = messages.iter().map(|(m, _)| m.clone()).collect();
        for (i, (m, reason)) in messages.iter().enumerate() {
            if !self.reported.contains(m) {
                error!(reason, "{m}");
                if i < config_errors {
                    self.metrics.config_error(reason);
                }
            }
        }
        self.reported = current;
        self.addresses = model.addresses;
        let errors = messages.into_iter().map(|(m, _)| m).collect();
        self.finish(stats, model.frontends.len(), errors, held, started)
    }

    /// Recomputes only the listed Services (each with its current objects) and writes what
    /// changed; who gets a contested address is [`Addresses::reassign`]'s rule.
    fn apply_services(&mut self, changed: Vec<ServiceObjects>) -> Report {
        let started = Instant::now();
        let mut errors = Vec::new();
        let mut held = BTreeSet::new();
        let mut built = Vec::new();
        for ServiceObjects { key, service, slices } in changed {
            if service.is_none() {
                self.last_good.forget(&key);
            }
            let m = model::build_with(
                service.as_slice(),
                &slices,
                &self.ctx,
                &self.addresses,
                &mut self.last_good,
            );
            errors.extend(m.errors);
            if m.held.contains(&key) {
                // Rejected: it keeps what it had, and waits for nothing more.
                self.addresses.stop_waiting(&key);
                if self.health_checks.contains_key(&key) {
                    self.health_held.insert(key.clone());
                }
                held.insert(key);
                continue;
            }
            self.health_held.remove(&key);
            match m.health_checks.get(&key) {
                Some(h) => self.health_checks.insert(key.clone(), *h),
                None => self.health_checks.remove(&key),
            };
            built.push((key, m.frontends));
        }
        let (upsert, removed) = self.addresses.reassign(built, &held, &mut errors);
        self.resync |= !self.addresses.take_displaced().is_empty();
        let (stats, sync_errors) = self.reconciler.apply(upsert.iter(), &removed, &mut self.maps);
        for e in &errors {
            let m = e.to_string();
            if self.reported.insert(m.clone()) {
                error!(reason = e.reason_label(), "{m}");
                self.metrics.config_error(e.reason_label());
            }
        }
        for e in &sync_errors {
            self.metrics.sync_error(e.reason_label());
            error!(reason = e.reason_label(), "{e}");
        }
        let messages = errors
            .iter()
            .map(ToString::to_string)
            .chain(sync_errors.iter().map(ToString::to_string))
            .collect();
        self.finish(stats, upsert.len(), messages, held, started)
    }

    fn update_gauges(&self) {
        self.metrics.tombstones.set(self.reconciler.tombstones() as i64);
        self.metrics.departed_members.set(self.reconciler.departed() as i64);
        self.metrics.frontends.set(self.reconciler.frontends_programmed() as i64);
        self.metrics.backends.set(self.reconciler.backends_programmed() as i64);
        // Freed regions count as used until their grace period ends: refreshed on every tick.
        self.metrics.maglev_slots_used.set(i64::from(self.reconciler.slots_used()));
    }

    fn finish(
        &mut self,
        stats: SyncStats,
        frontends: usize,
        errors: Vec<String>,
        held: BTreeSet<String>,
        started: Instant,
    ) -> Report {
        let report = Report { stats, frontends, errors, held, elapsed: started.elapsed() };
        let m = &self.metrics;
        m.syncs.inc();
        m.sync_duration.observe(report.elapsed.as_secs_f64());
        self.update_gauges();
        self.health.synced();
        if stats != SyncStats::default() {
            info!(
                frontends = report.frontends,
                written = stats.frontends_written,
                removed = stats.frontends_removed,
                backends_written = stats.backends_written,
                backends_removed = stats.backends_removed,
                elapsed_us = report.elapsed.as_micros() as u64,
                "maps synced"
            );
        }
        report
    }
}

impl<W: MapWriter + FlowTables> Agent<W> {
    /// Health after writes outside a change (retries, the sweep's releases): failed writes wait
    /// (from now, if nothing waited before); none left, what waited is applied.
    fn note_failed_writes(&self) {
        match self.reconciler.families_behind() {
            0 => self.health.settled(),
            behind => {
                self.health.change_seen(Instant::now());
                self.health.writes_failed(behind);
            }
        }
    }

    /// One bounded step of the flow sweep at monotonic time `now_ns` (the datapath's clock). At
    /// the end of a pass, tombstones and departed members it found no flow of are let go.
    pub fn sweep(&mut self, now_ns: u64) {
        if self.reconciler.has_pending() {
            // Writes that failed after a table was published are tried again here, not only
            // when the Service changes.
            let (_, errors) = self.reconciler.retry(&mut self.maps);
            for e in &errors {
                self.metrics.sync_error(e.reason_label());
                if self.reported.insert(e.to_string()) {
                    warn!(reason = e.reason_label(), "{e}");
                }
            }
            self.note_failed_writes();
        }
        self.update_gauges();
        let Some(sweeper) = &mut self.sweeper else { return };
        let before = sweeper.stats;
        let r = &self.reconciler;
        let timeouts = if sweeper.in_affinity_phase() { r.affinity_timeouts() } else { Default::default() };
        let step = sweeper.step(&mut self.maps, now_ns, |id| timeouts.get(&id).copied());
        let after = sweeper.stats;
        let m = &self.metrics;
        for (what, n) in [
            ("expired", after.expired - before.expired),
            ("stale_reply", after.stale_replies - before.stale_replies),
            ("affinity", after.affinity - before.affinity),
        ] {
            if n > 0 {
                m.swept.get_or_create(&vec![("what".into(), what.into())]).inc_by(n);
            }
        }
        let census = match step {
            Ok(Some(census)) => census,
            Ok(None) => return,
            Err(e) => {
                m.sweep_errors.inc();
                warn!("flow sweep: {e}");
                return;
            }
        };
        let next = sweeper.pass();
        m.sweep_passes.inc();
        m.live_flows.set(census.flows() as i64);
        let started = Instant::now();
        let (stats, errors) = self.reconciler.release_idle(&census, &mut self.maps);
        self.reconciler.begin_pass(next);
        self.note_failed_writes();
        for e in &errors {
            self.metrics.sync_error(e.reason_label());
            warn!("{e}");
        }
        if stats != SyncStats::default() || !errors.is_empty() {
            let errors = errors.iter().map(ToString::to_string).collect();
            self.finish(stats, 0, errors, BTreeSet::new(), started);
        } else {
            self.update_gauges();
        }
    }
}

/// Puts `new` in `old`'s place unless both hold the same items, in any order; true if it did.
fn replace_unordered<T: Ord>(old: &mut Vec<T>, mut new: Vec<T>) -> bool {
    new.sort();
    old.sort();
    if new == *old {
        return false;
    }
    *old = new;
    true
}

/// Where the health-check node ports listen. With `--nodeport-addresses primary` (the default) or
/// `0.0.0.0/0`, on every address, as kube-proxy with none given: some cloud load balancers ask on
/// the load balancer's IP, which the node takes for its own (GCE). With other CIDRs, on the
/// addresses they select, as kube-proxy. Each family apart (with `--ipv6`, IPv6 too): `primary`,
/// a match-all CIDR of the family (`0.0.0.0/0`, `::/0`), or no CIDR of the family at all
/// (kube-proxy's `NewNodePortAddresses` gives such a family its zero CIDR) listens on all of the
/// family's addresses.
fn health_check_addresses(
    spec: &model::node::NodePortAddresses,
    ctx: &model::Context,
) -> Vec<std::net::IpAddr> {
    let match_all = |v6: bool| match spec {
        model::node::NodePortAddresses::Cidrs(c) => {
            let mine: Vec<_> = c.iter().filter(|c| c.is_ipv4_family() != v6).collect();
            mine.is_empty() || mine.iter().any(|c| c.prefix_len() == 0)
        }
        model::node::NodePortAddresses::Primary => true,
    };
    let mut addresses: Vec<std::net::IpAddr> = if match_all(false) {
        vec![std::net::Ipv4Addr::UNSPECIFIED.into()]
    } else {
        ctx.nodeport_addresses.iter().map(|a| (*a).into()).collect()
    };
    if ctx.ipv6 {
        if match_all(true) {
            addresses.push(std::net::Ipv6Addr::UNSPECIFIED.into());
        } else {
            addresses.extend(ctx.nodeport_addresses6.iter().map(|a| std::net::IpAddr::from(*a)));
        }
    }
    addresses
}

#[cfg(test)]
mod tests {
    /// Health-check node ports listen per family: everywhere with `primary`, with the family's
    /// zero CIDR, or with no CIDR of the family; else on the family's selected addresses (none:
    /// none, which the servers report); IPv6 only with `--ipv6`.
    #[test]
    fn health_check_node_ports_listen_per_family() {
        use std::net::IpAddr;
        let ctx = |ipv6: bool| crate::model::Context {
            nodeport_addresses: vec!["10.0.0.5".parse().expect("addr")],
            nodeport_addresses6: vec!["fd00::5".parse().expect("addr")],
            ipv6,
            ..crate::model::Context::default()
        };
        let at = |spec: &str, ipv6: bool| -> Vec<String> {
            let spec: crate::model::node::NodePortAddresses = spec.parse().expect("a spec");
            super::health_check_addresses(&spec, &ctx(ipv6)).iter().map(IpAddr::to_string).collect()
        };
        assert_eq!(at("primary", true), ["0.0.0.0", "::"]);
        assert_eq!(at("primary", false), ["0.0.0.0"]);
        assert_eq!(at("10.0.0.0/8", true), ["10.0.0.5", "::"], "no IPv6 CIDR: every IPv6 address");
        assert_eq!(at("fd00::/8", true), ["0.0.0.0", "fd00::5"], "no IPv4 CIDR: every IPv4 address");
        assert_eq!(at("10.0.0.0/8,fd00::/8", true), ["10.0.0.5", "fd00::5"]);
        assert_eq!(at("0.0.0.0/0,fd00::/8", true), ["0.0.0.0", "fd00::5"]);
        assert_eq!(at("10.0.0.0/8,::/0", true), ["10.0.0.5", "::"]);
        assert_eq!(at("10.0.0.0/8,fd00::/8", false), ["10.0.0.5"]);
    }

    use std::path::Path;

    use lb_common::{Lb4ServiceKey, IPPROTO_TCP, SVC_FLAG_TOMBSTONE};

    use super::*;
    use crate::{
        reconcile::{Capacities, MemoryMaps, Options, ServiceKey},
        source::files::read_bytes,
    };

    fn objects(yaml: &str) -> Objects {
        let mut o = Objects::default();
        read_bytes(Path::new("test.yaml"), yaml.as_bytes(), &mut o);
        assert!(o.errors.is_empty(), "{:?}", o.errors);
        o
    }

    /// Service `name` at 10.96.5.1:80 with one endpoint 10.244.5.`last`:8080.
    fn service(name: &str, last: u8) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: 10.96.5.1, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.244.5.{last}]}}]\n"
        )
    }

    fn change(key: &str, yaml: Option<String>) -> ServiceObjects {
        let o = yaml.map(|y| objects(&y)).unwrap_or_default();
        ServiceObjects { key: key.into(), service: o.services.into_iter().next(), slices: o.slices }
    }

    fn agent() -> Agent<MemoryMaps> {
        let caps = Capacities { services: 64, backends: 64, maglev_slots: 4096, ..Capacities::default() };
        Agent::new(MemoryMaps::default(), Reconciler::new(caps, Options::default()), Context::default())
    }

    /// The backend new flows to 10.96.5.1:80 go to (the last octet), and the frontend's id.
    fn programmed(a: &Agent<MemoryMaps>) -> Option<(u8, u32)> {
        let svc =
            a.maps.services.get(&ServiceKey::V4(Lb4ServiceKey::new([10, 96, 5, 1], 80, IPPROTO_TCP)))?;
        if svc.flags & SVC_FLAG_TOMBSTONE != 0 {
            return None;
        }
        let id = a.maps.maglev[&svc.maglev_offset];
        let std::net::IpAddr::V4(ip) = a.maps.backends[&id].parts().0 else { return None };
        Some((ip.octets()[3], svc.id))
    }

    #[test]
    fn a_load_balancer_ip_follows_the_services_status_change_by_change() {
        let lb = |ingress: &str, kind: &str| {
            service("web", 2).replace(
                "spec: {clusterIP: 10.96.5.1,",
                &format!("status: {{loadBalancer: {{ingress: [{ingress}]}}}}\nspec: {{type: {kind}, clusterIP: 10.96.5.1,"),
            )
        };
        let live = |a: &Agent<MemoryMaps>, ip: [u8; 4]| {
            a.maps
                .services
                .get(&ServiceKey::V4(Lb4ServiceKey::new(ip, 80, IPPROTO_TCP)))
                .is_some_and(|s| s.flags & SVC_FLAG_TOMBSTONE == 0)
        };
        let mut a = agent();
        a.apply(Change::all(objects(&lb("", "LoadBalancer"))));
        assert!(programmed(&a).is_some() && !live(&a, [203, 0, 113, 10]), "no address assigned yet");
        // The load balancer controller writes the status: its IP is answered, with the endpoint.
        let report = a.apply(Change::now(What::Services(vec![change(
            "default/web",
            Some(lb("{ip: 203.0.113.10}", "LoadBalancer")),
        )])));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(live(&a, [203, 0, 113, 10]), "the LoadBalancer IP is a frontend");
        // Another address: the old one goes.
        a.apply(Change::now(What::Services(vec![change(
            "default/web",
            Some(lb("{ip: 203.0.113.11}", "LoadBalancer")),
        )])));
        assert!(live(&a, [203, 0, 113, 11]) && !live(&a, [203, 0, 113, 10]));
        // ipMode Proxy, then a ClusterIP Service (whatever its status says): none.
        a.apply(Change::now(What::Services(vec![change(
            "default/web",
            Some(lb("{ip: 203.0.113.11, ipMode: Proxy}", "LoadBalancer")),
        )])));
        assert!(!live(&a, [203, 0, 113, 11]), "ipMode Proxy");
        a.apply(Change::now(What::Services(vec![change(
            "default/web",
            Some(lb("{ip: 203.0.113.11}", "ClusterIP")),
        )])));
        assert!(
            !live(&a, [203, 0, 113, 11]) && programmed(&a).is_some(),
            "a ClusterIP Service keeps its cluster IP only"
        );
    }

    #[test]
    fn one_batch_moves_an_address_from_a_deleted_service_to_a_new_one_whatever_their_names() {
        for (old, new) in [("zz-old", "aa-new"), ("aa-old", "zz-new")] {
            let mut a = agent();
            a.apply(Change::all(objects(&service(old, 2))));
            let (_, old_id) = programmed(&a).expect("old programmed");
            let report = a.apply(Change::now(What::Services(vec![
                change(&format!("default/{old}"), None),
                change(&format!("default/{new}"), Some(service(new, 3))),
            ])));
            assert!(report.errors.is_empty(), "{old} → {new}: {:?}", report.errors);
            let (backend, id) =
                programmed(&a).unwrap_or_else(|| panic!("{old} → {new}: the address is lost"));
            assert_eq!(backend, 3, "{old} → {new}: the new Service's endpoint");
            assert_ne!(id, old_id, "{old} → {new}: a new frontend id, so old flows are not inherited");
        }
    }

    #[test]
    fn an_address_stays_with_its_holder_whatever_the_batch_or_a_resync() {
        // zz holds the address; aa asks for it later, in a batch where zz changes too.
        let mut a = agent();
        a.apply(Change::all(objects(&service("zz", 2))));
        let (_, id) = programmed(&a).expect("zz programmed");
        let report = a.apply(Change::now(What::Services(vec![
            change("default/aa", Some(service("aa", 3))),
            change("default/zz", Some(service("zz", 4))),
        ])));
        assert_eq!(report.errors.len(), 1, "aa is refused: {:?}", report.errors);
        assert_eq!(programmed(&a), Some((4, id)), "zz keeps the address (its new endpoint)");
        // A whole resync (a relist) moves nothing either, although aa comes first by name.
        let both = format!("{}---\n{}", service("aa", 3), service("zz", 4));
        let report = a.apply(Change::all(objects(&both)));
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        assert_eq!(programmed(&a), Some((4, id)));
        // Once zz lets go, aa gets it.
        a.apply(Change::now(What::Services(vec![change("default/zz", None)])));
        assert_eq!(programmed(&a).map(|p| p.0), Some(3));
    }

    #[test]
    fn a_cluster_ip_takes_its_address_from_an_external_ip_that_holds_it() {
        // aa lists 10.96.5.1 (a cluster IP yet to be allocated) among its externalIPs, with
        // externalTrafficPolicy Local (two entries there), before zz gets it as its cluster IP.
        let capture = |last| {
            service("aa", last).replace(
                "spec: {clusterIP: 10.96.5.1,",
                "spec: {clusterIP: 10.96.5.9, externalTrafficPolicy: Local, externalIPs: [10.96.5.1],",
            )
        };
        let internal = ServiceKey::V4(Lb4ServiceKey {
            scope: lb_common::SCOPE_INTERNAL,
            ..Lb4ServiceKey::new([10, 96, 5, 1], 80, IPPROTO_TCP)
        });
        let mut a = agent();
        a.apply(Change::all(objects(&capture(2))));
        assert_eq!(programmed(&a).map(|p| p.0), Some(2), "aa holds the address");
        assert!(a.maps.services.contains_key(&internal), "and its internal entry");
        assert!(!a.take_resync());
        // zz comes, in a batch of its own: its cluster IP is its, at once; aa's internal entry
        // goes; aa is to be built again (a full resync), which refuses its externalIP.
        let report = a.apply(Change::now(What::Services(vec![change("default/zz", Some(service("zz", 3)))])));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(programmed(&a).map(|p| p.0), Some(3), "zz's cluster IP goes to zz's endpoint");
        let gone = a.maps.services.get(&internal).is_none_or(|s| s.flags & SVC_FLAG_TOMBSTONE != 0);
        assert!(gone, "aa's internal entry at zz's cluster IP is gone");
        assert!(a.take_resync(), "aa is built again");
        assert!(!a.take_resync(), "once");
        let both = format!("{}---\n{}", capture(2), service("zz", 3));
        let report = a.apply(Change::all(objects(&both)));
        assert_eq!(report.errors.len(), 2, "aa's externalIP is refused, both entries: {:?}", report.errors);
        assert!(
            report.errors.iter().all(|e| e.contains("default/aa") && e.contains("default/zz")),
            "{:?}",
            report.errors
        );
        assert_eq!(programmed(&a).map(|p| p.0), Some(3));
        // In one batch too, whatever the order.
        let mut a = agent();
        let report = a.apply(Change::now(What::Services(vec![
            change("default/aa", Some(capture(2))),
            change("default/zz", Some(service("zz", 3))),
        ])));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(programmed(&a).map(|p| p.0), Some(3));
        assert!(a.maps.services.get(&internal).is_none_or(|s| s.flags & SVC_FLAG_TOMBSTONE != 0));
    }

    /// What the source reports when zz's object cannot be read.
    fn unreadable_zz() -> crate::source::ManifestError {
        crate::source::ManifestError::Object {
            path: "zz.yaml".into(),
            kind: "Service".into(),
            object: "default/zz".into(),
            field: "spec.ports".into(),
            reason: "not a list".into(),
            service: Some("default/zz".into()),
        }
    }

    #[test]
    fn a_service_the_source_cannot_read_keeps_its_address() {
        let mut a = agent();
        a.apply(Change::all(objects(&service("zz", 4))));
        let (_, id) = programmed(&a).expect("zz programmed");
        // zz's object turns unreadable (the source reports it, naming zz) while aa asks for
        // its address: zz keeps it, aa is refused.
        let mut o = objects(&service("aa", 3));
        o.errors.push(unreadable_zz());
        let report = a.apply(Change::all(o));
        assert_eq!(report.errors.len(), 2, "zz's object and aa's refusal: {:?}", report.errors);
        assert_eq!(programmed(&a), Some((4, id)));
    }

    #[test]
    fn a_restarted_agent_leaves_an_address_with_its_holder() {
        let mut a = agent();
        a.apply(Change::all(objects(&service("zz", 4))));
        let (_, id) = programmed(&a).expect("zz programmed");
        // The agent restarts with the maps as they are; aa now asks for zz's address too.
        let maps = std::mem::take(&mut a.maps);
        let caps = Capacities { services: 64, backends: 64, maglev_slots: 4096, ..Capacities::default() };
        let r = Reconciler::restore(caps, Options::default(), maps.restored());
        let mut b = Agent::new(maps, r, Context::default());
        let both = format!("{}---\n{}", service("aa", 3), service("zz", 4));
        let report = b.apply(Change::all(objects(&both)));
        assert_eq!(report.errors.len(), 1, "aa is refused: {:?}", report.errors);
        assert_eq!(programmed(&b), Some((4, id)), "zz keeps the address and its id");
    }

    fn restart(a: &mut Agent<MemoryMaps>) -> Agent<MemoryMaps> {
        let maps = std::mem::take(&mut a.maps);
        let caps = Capacities { services: 64, backends: 64, maglev_slots: 4096, ..Capacities::default() };
        let r = Reconciler::restore(caps, Options::default(), maps.restored());
        Agent::new(maps, r, Context::default())
    }

    /// A Service held after a rejected update keeps its frontend, its id and its backend across
    /// restarts, in full syncs and in changes, until its objects are good again: rejected by the
    /// model (its Service object) or by the source (unreadable).
    #[test]
    fn a_held_service_keeps_its_frontends_across_a_restart() {
        let bad_service = service("zz", 5).replace("spec: {", "spec: {sessionAffinity: Bogus, ");
        for how in ["service", "source"] {
            let rejected = || match how {
                "service" => objects(&bad_service),
                _ => {
                    let mut o = Objects::default();
                    o.errors.push(unreadable_zz());
                    o
                }
            };
            let mut a = agent();
            a.apply(Change::all(objects(&service("zz", 4))));
            let (_, id) = programmed(&a).expect("zz programmed");
            let report = a.apply(Change::all(rejected()));
            assert!(!report.errors.is_empty(), "{how}: rejected");
            assert_eq!(programmed(&a), Some((4, id)), "{how}: held while running");
            for round in 0..2 {
                let mut b = restart(&mut a);
                let report = b.apply(Change::all(rejected()));
                assert!(report.held.contains("default/zz"), "{how}, restart {round}: {report:?}");
                assert_eq!(programmed(&b), Some((4, id)), "{how}, restart {round}: held across it");
                // A change (kube mode) that is still bad holds it too.
                if how != "source" {
                    let o = rejected();
                    let change = ServiceObjects {
                        key: "default/zz".into(),
                        service: o.services.into_iter().next(),
                        slices: o.slices,
                    };
                    b.apply(Change::now(What::Services(vec![change])));
                    assert_eq!(programmed(&b), Some((4, id)), "{how}, restart {round}: after a change");
                }
                a = b;
            }
            // Good again: its new endpoint, the same frontend id.
            a.apply(Change::all(objects(&service("zz", 6))));
            assert_eq!(programmed(&a), Some((6, id)), "{how}: good again");
        }
    }

    /// The slots gauge counts a replaced table's region while it cools, and drops once the grace
    /// period has passed, on the next tick, with no other change.
    #[test]
    fn the_slots_gauge_follows_regions_as_they_cool() {
        let now = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let clock = {
            let now = now.clone();
            Box::new(move || now.load(std::sync::atomic::Ordering::Relaxed))
        };
        let caps = Capacities { services: 64, backends: 64, maglev_slots: 4096, ..Capacities::default() };
        let r = Reconciler::new(caps, Options::default()).with_clock(clock);
        let mut a = Agent::new(MemoryMaps::default(), r, Context::default());
        a.apply(Change::all(objects(&service("zz", 4))));
        a.apply(Change::all(objects(&service("zz", 5))));
        assert_eq!(a.metrics.maglev_slots_used.get(), 2 * 1021, "the old table cools");
        now.store(crate::reconcile::alloc::REGION_GRACE_MS, std::sync::atomic::Ordering::Relaxed);
        a.sweep(0);
        assert_eq!(a.metrics.maglev_slots_used.get(), 1021);
    }

    #[test]
    fn a_refused_service_gets_the_address_when_its_holder_lets_it_go() {
        let mut a = agent();
        let both = format!("{}---\n{}", service("aa", 2), service("bb", 3));
        let report = a.apply(Change::all(objects(&both)));
        assert_eq!(report.errors.len(), 1, "bb is refused: {:?}", report.errors);
        assert_eq!(programmed(&a).map(|p| p.0), Some(2));
        // Only aa is in this batch (deleted): bb, refused before, takes the address.
        a.apply(Change::now(What::Services(vec![change("default/aa", None)])));
        assert_eq!(programmed(&a).map(|p| p.0), Some(3), "bb got the address");
    }

    /// A Node tainted for deletion makes the node ineligible; a source that could not read
    /// everything (the Node's file among what failed, perhaps) leaves eligibility as it was; a Node
    /// gone from a source that read everything makes it ineligible.
    #[test]
    fn node_eligibility_follows_the_node_and_survives_a_read_error() {
        let mut a = agent();
        let node = |taint: &str| {
            format!("apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nspec: {{taints: [{taint}]}}\n")
        };
        let with_node = |yaml: &str| {
            let mut reader = crate::source::files::Reader::new(Some("node1"));
            reader.read_bytes(Path::new("n.yaml"), yaml.as_bytes());
            reader.finish()
        };
        a.apply(Change::all(with_node(&node(""))));
        assert_eq!(a.health.node_eligible(), Ok(()));
        a.apply(Change::all(with_node(&node("{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}"))));
        assert!(a.health.node_eligible().is_err());
        a.apply(Change::all(with_node(&node(""))));
        assert_eq!(a.health.node_eligible(), Ok(()));
        let mut unreadable = Objects::default();
        unreadable.errors.push(ManifestError::Syntax { path: "n.yaml".into(), doc: 1, reason: "bad".into() });
        a.apply(Change::all(unreadable));
        assert_eq!(a.health.node_eligible(), Ok(()), "a file that cannot be read is no proof the Node went");
        // A bad Service object hides no Node: the Node is gone.
        let mut bad_service = Objects::default();
        bad_service.errors.push(unreadable_zz());
        a.apply(Change::all(bad_service));
        assert!(a.health.node_eligible().is_err_and(|e| e.contains("gone")));
    }
}
