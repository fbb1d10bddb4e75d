//! The agent's core: a [`Change`] from a source goes through the model and the reconciler to the
//! maps. [`Agent::apply`] is the only way in: with everything the source knows, or with just the
//! Services an event touched; the reconciler writes only what changed either way.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use crate::{
    datapath::Maps,
    metrics::{Health, Metrics},
    model::{self, Addresses, Context},
    reconcile::{MapWriter, Reconciler, SyncStats},
    source::{Change, Objects, ServiceObjects, What},
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
        Self {
            maps,
            reconciler,
            zone_flag: ctx.zone.clone(),
            ctx,
            reported: BTreeSet::new(),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new()),
            addresses: Addresses::default(),
            started: false,
        }
    }

    /// Programs a change.
    pub fn apply(&mut self, change: Change) -> Report {
        let report = match change.what {
            What::All(objects) => self.apply_all(objects),
            What::Services(changed) => self.apply_services(changed),
        };
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
        }
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
        self.addresses = model.addresses;
        let errors = messages.into_iter().map(|(m, _)| m).collect();
        self.finish(stats, model.frontends.len(), errors, held, started)
    }

    /// Recomputes only the listed Services (each with its current objects) and writes what
    /// changed.
    fn apply_services(&mut self, changed: Vec<ServiceObjects>) -> Report {
        let started = Instant::now();
        let mut upsert = BTreeMap::new();
        let mut removed = Vec::new();
        let mut errors = Vec::new();
        let mut held = BTreeSet::new();
        for ServiceObjects { key, service, slices } in changed {
            let m = model::build(service.as_slice(), &slices, &self.ctx);
            errors.extend(m.errors);
            if m.held.contains(&key) {
                held.insert(key);
                continue; // rejected: it keeps what it had
            }
            let (claimed, released) = self.addresses.reassign(&key, m.frontends, &mut errors);
            upsert.extend(claimed);
            removed.extend(released);
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
        let messages = errors
            .iter()
            .map(ToString::to_string)
            .chain(sync_errors.iter().map(ToString::to_string))
            .collect();
        self.finish(stats, upsert.len(), messages, held, started)
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
            let errors = errors.iter().map(ToString::to_string).collect();
            self.finish(stats, 0, errors, BTreeSet::new(), started);
        }
    }
}
