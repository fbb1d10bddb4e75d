//! The agent's core loop state: from a set of objects to the maps, through the model and the
//! reconciler. Sources (the manifest directory, later the API server) call [`Agent::apply`]
//! with everything they know; the reconciler writes only what changed.

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use std::sync::Arc;

use crate::{
    datapath::Maps,
    manifests::Objects,
    metrics::{Health, Metrics},
    model::{self, Context},
    sync::{MapWriter, Reconciler, SyncStats},
};

pub struct Agent<W: MapWriter = Maps> {
    pub maps: W,
    pub reconciler: Reconciler,
    pub ctx: Context,
    /// The last objects applied, for re-syncs that only advance time (drain deadlines).
    last: Option<Objects>,
    /// Error messages already logged, so that a bad object is reported once, not on every sync.
    reported: std::collections::BTreeSet<String>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
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
            last: None,
            reported: Default::default(),
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new()),
        }
    }

    /// Programs `objects` (the whole desired state of the source).
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
        let current: std::collections::BTreeSet<String> = messages.iter().map(|(m, _)| m.clone()).collect();
        for (i, (m, reason)) in messages.iter().enumerate() {
            if !self.reported.contains(m) {
                error!(reason, "{m}");
                if i < config_errors {
                    self.metrics.config_error(reason);
                }
            }
        }
        self.reported = current;
        let report = Report {
            stats,
            frontends: model.frontends.len(),
            errors: messages.len(),
            elapsed: started.elapsed(),
        };
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
        self.last = Some(objects);
        report
    }

    /// Syncs the last objects again if a drain deadline has passed.
    pub fn tick(&mut self, now: Instant) {
        if self.reconciler.next_deadline().is_some_and(|d| d <= now) {
            if let Some(objects) = self.last.take() {
                self.apply(objects);
            } else {
                warn!("drain deadline passed before any sync");
            }
        }
    }
}
