//! The agent's core: from objects to the maps, through the model and the reconciler. Sources
//! (the manifest directory, the API server) call [`Agent::apply`] with everything they know, or
//! [`Agent::apply_services`] with just the Services an event touched; the reconciler writes only
//! what changed either way.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tracing::{error, info, warn};

use crate::{
    datapath::Maps,
    manifests::Objects,
    metrics::{Health, Metrics},
    model::{self, Context, FrontendAddr},
    sync::{MapWriter, Reconciler, SyncStats},
};

pub struct Agent<W: MapWriter = Maps> {
    pub maps: W,
    pub reconciler: Reconciler,
    pub ctx: Context,
    /// Error messages already logged, so that a bad object is reported once, not on every sync.
    reported: BTreeSet<String>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Frontend addresses of each Service as last programmed, for incremental updates.
    by_service: BTreeMap<String, Vec<FrontendAddr>>,
    /// The Service that owns each frontend address.
    owner: std::collections::HashMap<FrontendAddr, String>,
}

/// What one sync did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub stats: SyncStats,
    pub frontends: usize,
    pub errors: usize,
    pub elapsed: Duration,
}

impl<W: MapWriter> Agent<W> {
    pub fn new(maps: W, reconciler: Reconciler, ctx: Context) -> Self {
        Self {
            maps,
            reconciler,
            ctx,
            reported: BTreeSet::new(),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new()),
            by_service: BTreeMap::new(),
            owner: std::collections::HashMap::new(),
        }
    }

    /// Programs `objects`, the whole desired state of the source.
    pub fn apply(&mut self, objects: Objects) -> Report {
        let started = Instant::now();
        let model = model::build(&objects.services, &objects.slices, &self.ctx);
        let mut messages: Vec<(String, &'static str)> = Vec::new();
        messages.extend(objects.errors.iter().map(|e| (e.to_string(), e.reason_label())));
        messages.extend(model.errors.iter().map(|e| (e.to_string(), e.reason_label())));
        let config_errors = messages.len();
        // Objects the files could not express are held too: their Services keep what they had.
        let mut held = model.held.clone();
        held.extend(objects.errors.iter().filter_map(|e| e.service()));
        let (stats, sync_errors) =
            self.reconciler.sync(&model.frontends, &held, Instant::now(), &mut self.maps);
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
        self.by_service.clear();
        self.owner.clear();
        for (addr, fe) in &model.frontends {
            self.by_service.entry(fe.service.clone()).or_default().push(*addr);
            self.owner.insert(*addr, fe.service.clone());
        }
        self.finish(stats, model.frontends.len(), messages.len(), started)
    }

    /// Recomputes only the listed Services (each with its current objects; `None`: deleted) and
    /// writes what changed.
    pub fn apply_services(&mut self, changed: Vec<(String, Option<Service>, Vec<EndpointSlice>)>) -> Report {
        let started = Instant::now();
        let mut upsert = BTreeMap::new();
        let mut removed = Vec::new();
        let mut errors = Vec::new();
        for (key, svc, slices) in changed {
            let m = model::build(svc.as_slice(), &slices, &self.ctx);
            errors.extend(m.errors);
            if m.held.contains(&key) {
                continue; // rejected: it keeps what it had
            }
            let old = self.by_service.remove(&key).unwrap_or_default();
            for a in &old {
                self.owner.remove(a);
            }
            let mut mine = Vec::new();
            for (addr, fe) in m.frontends {
                // An address another Service already holds stays with it.
                if let Some(other) = self.owner.get(&addr) {
                    errors.push(model::ModelError::Invalid {
                        kind: "Service",
                        object: key.clone(),
                        field: "spec.clusterIP".into(),
                        reason: format!("{addr} is already used by Service {other}"),
                    });
                    continue;
                }
                mine.push(addr);
                self.owner.insert(addr, key.clone());
                upsert.insert(addr, fe);
            }
            removed.extend(old.into_iter().filter(|a| !mine.contains(a)));
            if !mine.is_empty() {
                self.by_service.insert(key, mine);
            }
        }
        let (stats, sync_errors) =
            self.reconciler.apply(upsert.iter(), &removed, Instant::now(), &mut self.maps);
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
        self.finish(stats, upsert.len(), errors.len() + sync_errors.len(), started)
    }

    fn finish(&mut self, stats: SyncStats, frontends: usize, errors: usize, started: Instant) -> Report {
        let report = Report { stats, frontends, errors, elapsed: started.elapsed() };
        let m = &self.metrics;
        m.syncs.inc();
        m.sync_duration.observe(report.elapsed.as_secs_f64());
        m.frontends.set(self.reconciler.frontends_programmed() as i64);
        m.backends.set(self.reconciler.backends_programmed() as i64);
        m.maglev_slots_used.set(i64::from(self.reconciler.slots_used()));
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

    /// Frees drained backends whose deadline has passed.
    pub fn tick(&mut self, now: Instant) {
        if self.reconciler.next_deadline().is_some_and(|d| d <= now) {
            let started = Instant::now();
            let (stats, errors) = self.reconciler.apply(std::iter::empty(), &[], now, &mut self.maps);
            for e in &errors {
                warn!("{e}");
            }
            self.finish(stats, 0, errors.len(), started);
        }
    }
}
