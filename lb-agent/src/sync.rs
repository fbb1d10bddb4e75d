//! Reconciliation by level: the desired frontends are compared with what the maps hold, and only
//! the difference is written. The kernel is reached through [`MapWriter`], so this module is
//! tested without one.
//!
//! Order of writes, so that no packet ever sees an inconsistent state: new backends first; then
//! each changed frontend's Maglev table into a free region; then the frontend entry, which
//! publishes the table in one map update; only then old regions, removed frontends and backends no
//! longer used are released.

use std::collections::{BTreeMap, HashMap};

use lb_common::{
    Lb4Backend, Lb4Service, Lb4ServiceKey, BACKEND_STATE_ACTIVE, BACKEND_STATE_FREE,
};

use crate::{
    alloc::{IdAllocator, Region, RegionAllocator},
    maglev,
    model::{BackendAddr, Frontend, FrontendAddr, Protocol},
};

/// Writes to the datapath maps.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_backend(&mut self, id: u32, backend: &Lb4Backend) -> Result<(), Self::Error>;
    fn set_maglev(&mut self, offset: u32, table: &[u32]) -> Result<(), Self::Error>;
    fn set_service(&mut self, key: &Lb4ServiceKey, svc: &Lb4Service) -> Result<(), Self::Error>;
    fn remove_service(&mut self, key: &Lb4ServiceKey) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("frontend {frontend} ({service}): {what} is full (capacity {capacity})")]
    Full { frontend: FrontendAddr, service: String, what: &'static str, capacity: u32 },
    #[error("frontend {frontend}: writing {what} failed: {source}")]
    Write {
        frontend: String,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SyncError {
    pub const fn reason_label(&self) -> &'static str {
        match self {
            Self::Full { .. } => "map_full",
            Self::Write { .. } => "write_failed",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    pub maglev_slots: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub max_table_size: u32,
    pub maglev_seed: u64,
}

/// What one frontend has in the maps.
#[derive(Debug, Clone)]
struct Programmed {
    id: u32,
    /// `None` after a restore: unknown, so the table is rewritten on the first sync.
    backends: Option<Vec<BackendAddr>>,
    region: Option<Region>,
}

/// Counts of what a sync wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    pub slots_written: usize,
}

pub struct Reconciler {
    opts: Options,
    frontends: HashMap<FrontendAddr, Programmed>,
    backends: HashMap<BackendAddr, u32>,
    frontend_ids: IdAllocator,
    backend_ids: IdAllocator,
    regions: RegionAllocator,
}

pub fn service_key(a: &FrontendAddr) -> Lb4ServiceKey {
    Lb4ServiceKey::new(a.vip.octets(), a.port, a.proto.number())
}

fn backend_value(b: &BackendAddr) -> Lb4Backend {
    Lb4Backend::new(b.ip.octets(), b.port, b.proto.number(), BACKEND_STATE_ACTIVE)
}

impl Reconciler {
    pub fn new(caps: Capacities, opts: Options) -> Self {
        Self {
            opts,
            frontends: HashMap::new(),
            backends: HashMap::new(),
            frontend_ids: IdAllocator::new(caps.services),
            backend_ids: IdAllocator::new(caps.backends),
            regions: RegionAllocator::new(caps.maglev_slots),
        }
    }

    /// Adopts what pinned maps already hold, so that ids stay stable across agent restarts and
    /// tracked flows keep their backends. Entries that do not fit are left for the first sync to
    /// overwrite or remove.
    pub fn restore(
        caps: Capacities,
        opts: Options,
        services: impl IntoIterator<Item = (Lb4ServiceKey, Lb4Service)>,
        backends: impl IntoIterator<Item = (u32, Lb4Backend)>,
    ) -> Self {
        let mut r = Self::new(caps, opts);
        for (id, b) in backends {
            let Some(proto) = Protocol::from_number(b.proto) else { continue };
            if b.state == BACKEND_STATE_FREE {
                continue;
            }
            let addr = BackendAddr {
                ip: b.addr.to_ne_bytes().into(),
                port: u16::from_be(b.port),
                proto,
            };
            if !r.backends.contains_key(&addr) && r.backend_ids.reserve(id) {
                r.backends.insert(addr, id);
            }
        }
        for (key, svc) in services {
            let Some(proto) = Protocol::from_number(key.proto) else { continue };
            let addr = FrontendAddr { vip: key.addr.to_ne_bytes().into(), port: u16::from_be(key.port), proto };
            if !r.frontend_ids.reserve(svc.id) {
                continue;
            }
            let region = Region { offset: svc.maglev_offset, size: svc.maglev_size };
            let region = (svc.maglev_size > 0 && r.regions.reserve(region)).then_some(region);
            r.frontends.insert(addr, Programmed { id: svc.id, backends: None, region });
        }
        r
    }

    /// Frontend id of `addr`, if programmed.
    pub fn frontend_id(&self, addr: &FrontendAddr) -> Option<u32> {
        self.frontends.get(addr).map(|p| p.id)
    }

    pub fn backend_id(&self, addr: &BackendAddr) -> Option<u32> {
        self.backends.get(addr).copied()
    }

    pub fn slots_used(&self) -> u32 {
        self.regions.used()
    }

    /// Brings the maps to `desired`. Frontends that fail are reported and keep what they had;
    /// the others are still written.
    pub fn sync<W: MapWriter>(
        &mut self,
        desired: &BTreeMap<FrontendAddr, Frontend>,
        w: &mut W,
    ) -> (SyncStats, Vec<SyncError>) {
        let mut stats = SyncStats::default();
        let mut errors = Vec::new();
        for (addr, fe) in desired {
            match self.sync_frontend(addr, fe, w, &mut stats) {
                Ok(()) => {}
                Err(e) => errors.push(e),
            }
        }
        let gone: Vec<FrontendAddr> =
            self.frontends.keys().filter(|a| !desired.contains_key(a)).copied().collect();
        for addr in gone {
            match w.remove_service(&service_key(&addr)) {
                Ok(()) => {
                    let p = self.frontends.remove(&addr).expect("listed above");
                    if let Some(r) = p.region {
                        self.regions.release(r);
                    }
                    self.frontend_ids.release(p.id);
                    stats.frontends_removed += 1;
                }
                Err(e) => errors.push(write_err(addr.to_string(), "service entry", e)),
            }
        }
        self.release_unused_backends(w, &mut stats, &mut errors);
        (stats, errors)
    }

    fn sync_frontend<W: MapWriter>(
        &mut self,
        addr: &FrontendAddr,
        fe: &Frontend,
        w: &mut W,
        stats: &mut SyncStats,
    ) -> Result<(), SyncError> {
        if let Some(p) = self.frontends.get(addr) {
            if p.backends.as_ref() == Some(&fe.backends) {
                return Ok(());
            }
        }
        let full = |what, capacity| SyncError::Full {
            frontend: *addr,
            service: fe.service.clone(),
            what,
            capacity,
        };
        // Backends first, so the table never names one that is not there yet.
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            let id = match self.backends.get(b) {
                Some(id) => *id,
                None => {
                    let id = self.backend_ids.alloc().ok_or_else(|| full("backend map", self.backend_ids.in_use() as u32))?;
                    if let Err(e) = w.set_backend(id, &backend_value(b)) {
                        self.backend_ids.release(id);
                        return Err(write_err(addr.to_string(), "backend", e));
                    }
                    self.backends.insert(*b, id);
                    stats.backends_written += 1;
                    id
                }
            };
            ids.push(id);
        }
        let region = if fe.backends.is_empty() {
            None
        } else {
            let size = maglev::table_size(fe.backends.len(), self.opts.max_table_size);
            let names: Vec<String> = fe.backends.iter().map(ToString::to_string).collect();
            let mb: Vec<maglev::Backend<'_>> = names.iter().map(|n| maglev::Backend { name: n, weight: 1 }).collect();
            let table: Vec<u32> = maglev::build(&mb, size, self.opts.maglev_seed)
                .into_iter()
                .map(|i| ids[i as usize])
                .collect();
            let region = self.regions.alloc(size).ok_or_else(|| full("maglev slot array", self.regions.used()))?;
            if let Err(e) = w.set_maglev(region.offset, &table) {
                self.regions.release(region);
                return Err(write_err(addr.to_string(), "maglev table", e));
            }
            stats.slots_written += table.len();
            Some(region)
        };
        let existing = self.frontends.get(addr).map(|p| p.id);
        let id = match existing {
            Some(id) => id,
            None => match self.frontend_ids.alloc() {
                Some(id) => id,
                None => {
                    if let Some(r) = region {
                        self.regions.release(r);
                    }
                    return Err(full("service map", self.frontend_ids.in_use() as u32));
                }
            },
        };
        let svc = Lb4Service {
            id,
            backend_count: fe.backends.len() as u32,
            maglev_offset: region.map_or(0, |r| r.offset),
            maglev_size: region.map_or(0, |r| r.size),
            affinity_timeout_secs: 0,
            flags: 0,
        };
        if let Err(e) = w.set_service(&service_key(addr), &svc) {
            if let Some(r) = region {
                self.regions.release(r);
            }
            if existing.is_none() {
                self.frontend_ids.release(id);
            }
            return Err(write_err(addr.to_string(), "service entry", e));
        }
        let old = self.frontends.insert(*addr, Programmed { id, backends: Some(fe.backends.clone()), region });
        if let Some(r) = old.and_then(|o| o.region) {
            self.regions.release(r);
        }
        stats.frontends_written += 1;
        Ok(())
    }

    /// Backends that no frontend uses any more are freed: flows still tracked to them pick a
    /// new backend on their next packet.
    fn release_unused_backends<W: MapWriter>(
        &mut self,
        w: &mut W,
        stats: &mut SyncStats,
        errors: &mut Vec<SyncError>,
    ) {
        let mut used: std::collections::HashSet<BackendAddr> = std::collections::HashSet::new();
        for p in self.frontends.values() {
            match &p.backends {
                Some(bs) => used.extend(bs.iter().copied()),
                // Unknown after a restore and not yet rewritten: keep everything.
                None => return,
            }
        }
        let unused: Vec<(BackendAddr, u32)> =
            self.backends.iter().filter(|(a, _)| !used.contains(a)).map(|(a, id)| (*a, *id)).collect();
        for (addr, id) in unused {
            match w.set_backend(id, &Lb4Backend::default()) {
                Ok(()) => {
                    self.backends.remove(&addr);
                    self.backend_ids.release(id);
                    stats.backends_removed += 1;
                }
                Err(e) => errors.push(write_err(addr.to_string(), "backend", e)),
            }
        }
    }
}

fn write_err(frontend: String, what: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> SyncError {
    SyncError::Write { frontend, what, source: Box::new(e) }
}
