//! Reconciliation by level: the desired frontends are compared with what the maps hold, and only
//! the difference is written. The kernel is reached through [`MapWriter`], so this module is
//! tested without one.
//!
//! Order of writes, so that no packet ever sees an inconsistent state: new backends first; then
//! each changed frontend's Maglev table into a free region; then the frontend entry, which
//! publishes the table in one map update; only then old regions, removed frontends and backends no
//! longer used are released.

use std::collections::{BTreeMap, HashMap};

use lb_common::{Lb4Backend, Lb4Service, Lb4ServiceKey, BACKEND_STATE_ACTIVE, BACKEND_STATE_FREE};

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
            let addr = BackendAddr { ip: b.addr.to_ne_bytes().into(), port: u16::from_be(b.port), proto };
            if !r.backends.contains_key(&addr) && r.backend_ids.reserve(id) {
                r.backends.insert(addr, id);
            }
        }
        for (key, svc) in services {
            let Some(proto) = Protocol::from_number(key.proto) else { continue };
            let addr =
                FrontendAddr { vip: key.addr.to_ne_bytes().into(), port: u16::from_be(key.port), proto };
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
        let full =
            |what, capacity| SyncError::Full { frontend: *addr, service: fe.service.clone(), what, capacity };
        // Backends first, so the table never names one that is not there yet.
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            let id = match self.backends.get(b) {
                Some(id) => *id,
                None => {
                    let id = self
                        .backend_ids
                        .alloc()
                        .ok_or_else(|| full("backend map", self.backend_ids.in_use() as u32))?;
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
            let mb: Vec<maglev::Backend<'_>> =
                names.iter().map(|n| maglev::Backend { name: n, weight: 1 }).collect();
            let table: Vec<u32> = maglev::build(&mb, size, self.opts.maglev_seed)
                .into_iter()
                .map(|i| ids[i as usize])
                .collect();
            let region =
                self.regions.alloc(size).ok_or_else(|| full("maglev slot array", self.regions.used()))?;
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
        let old =
            self.frontends.insert(*addr, Programmed { id, backends: Some(fe.backends.clone()), region });
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

fn write_err(
    frontend: String,
    what: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> SyncError {
    SyncError::Write { frontend, what, source: Box::new(e) }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, convert::Infallible, net::Ipv4Addr};

    use super::*;
    use crate::model::Frontend;

    /// Maps in memory, with a log of the writes in order.
    #[derive(Default)]
    struct FakeMaps {
        services: BTreeMap<Lb4ServiceKey, Lb4Service>,
        backends: BTreeMap<u32, Lb4Backend>,
        maglev: BTreeMap<u32, u32>,
        log: Vec<String>,
    }

    impl MapWriter for FakeMaps {
        type Error = Infallible;
        fn set_backend(&mut self, id: u32, b: &Lb4Backend) -> Result<(), Infallible> {
            self.log.push(format!("backend {id} state {}", b.state));
            self.backends.insert(id, *b);
            Ok(())
        }
        fn set_maglev(&mut self, offset: u32, table: &[u32]) -> Result<(), Infallible> {
            self.log.push(format!("maglev {offset}+{}", table.len()));
            for (i, id) in table.iter().enumerate() {
                self.maglev.insert(offset + i as u32, *id);
            }
            Ok(())
        }
        fn set_service(&mut self, key: &Lb4ServiceKey, svc: &Lb4Service) -> Result<(), Infallible> {
            self.log.push(format!("service {} at {}+{}", svc.id, svc.maglev_offset, svc.maglev_size));
            self.services.insert(*key, *svc);
            Ok(())
        }
        fn remove_service(&mut self, key: &Lb4ServiceKey) -> Result<(), Infallible> {
            self.log.push("remove service".into());
            self.services.remove(key);
            Ok(())
        }
    }

    impl FakeMaps {
        /// Every slot of every published table names an active backend.
        fn assert_consistent(&self) {
            for svc in self.services.values() {
                for slot in svc.maglev_offset..svc.maglev_offset + svc.maglev_size {
                    let id = self.maglev[&slot];
                    assert_eq!(self.backends[&id].state, BACKEND_STATE_ACTIVE, "slot {slot} -> {id}");
                }
            }
        }
    }

    const CAPS: Capacities = Capacities { services: 16, backends: 16, maglev_slots: 2048 };
    const OPTS: Options = Options { max_table_size: 65_537, maglev_seed: 0 };

    fn fe(last: &[u8]) -> BTreeMap<FrontendAddr, Frontend> {
        let addr = FrontendAddr { vip: Ipv4Addr::new(10, 96, 0, 1), port: 80, proto: Protocol::Tcp };
        let backends = last
            .iter()
            .map(|l| BackendAddr { ip: Ipv4Addr::new(10, 244, 0, *l), port: 8080, proto: Protocol::Tcp })
            .collect();
        BTreeMap::from([(
            addr,
            Frontend { addr, service: "default/s".into(), port_name: String::new(), backends },
        )])
    }

    #[test]
    fn tables_are_written_before_they_are_published_and_regions_are_reused() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS);
        let (s, e) = r.sync(&fe(&[1, 2, 3]), &mut maps);
        assert!(e.is_empty());
        assert_eq!((s.frontends_written, s.backends_written, s.slots_written), (1, 3, 509));
        assert_eq!(
            maps.log,
            [
                "backend 1 state 1",
                "backend 2 state 1",
                "backend 3 state 1",
                "maglev 0+509",
                "service 1 at 0+509"
            ]
        );
        maps.assert_consistent();

        // Unchanged: nothing is written.
        maps.log.clear();
        assert_eq!(r.sync(&fe(&[1, 2, 3]), &mut maps).0, SyncStats::default());
        assert!(maps.log.is_empty());

        // One backend leaves: the new table goes to a free region, then the entry moves, then the
        // backend is freed.
        let (s, _) = r.sync(&fe(&[1, 3]), &mut maps);
        assert_eq!((s.frontends_written, s.backends_removed), (1, 1));
        assert_eq!(maps.log, ["maglev 509+251", "service 1 at 509+251", "backend 2 state 0"]);
        maps.assert_consistent();

        // The first region is free again and is reused.
        maps.log.clear();
        r.sync(&fe(&[1, 3, 4]), &mut maps);
        // A fresh id (4), not the one just freed (2): flows still tracked to 2 must not land on 4.
        assert_eq!(maps.log, ["backend 4 state 1", "maglev 0+509", "service 1 at 0+509"]);
        maps.assert_consistent();
        assert_eq!(r.slots_used(), 509);
    }

    #[test]
    fn restore_keeps_ids_and_removes_what_is_no_longer_wanted() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS);
        r.sync(&fe(&[1, 2, 3]), &mut maps);
        let ids_before = maps.backends.clone();

        let mut r2 = Reconciler::restore(
            CAPS,
            OPTS,
            maps.services.iter().map(|(k, v)| (*k, *v)),
            maps.backends.iter().map(|(k, v)| (*k, *v)),
        );
        maps.log.clear();
        r2.sync(&fe(&[1, 2, 3]), &mut maps);
        // Same ids for the same backends; the table is rewritten once into a new region.
        assert_eq!(maps.backends, ids_before);
        assert_eq!(maps.log, ["maglev 509+509", "service 1 at 509+509"]);
        maps.assert_consistent();

        maps.log.clear();
        let (s, _) = r2.sync(&BTreeMap::new(), &mut maps);
        assert_eq!((s.frontends_removed, s.backends_removed), (1, 3));
        assert!(maps.services.is_empty());
        assert!(maps.backends.values().all(|b| b.state == BACKEND_STATE_FREE));
        assert_eq!(r2.slots_used(), 0);
    }

    #[test]
    fn a_full_map_fails_that_frontend_only() {
        let mut maps = FakeMaps::default();
        let caps = Capacities { services: 16, backends: 3, maglev_slots: 2048 };
        let mut r = Reconciler::new(caps, OPTS);
        let mut desired = fe(&[1]);
        let mut second = fe(&[2, 3, 4]);
        let (addr, mut f) = second.pop_first().expect("one");
        let addr2 = FrontendAddr { port: 81, ..addr };
        f.addr = addr2;
        desired.insert(addr2, f);
        let (_, errors) = r.sync(&desired, &mut maps);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("backend map is full"), "{}", errors[0]);
        assert_eq!(maps.services.len(), 1, "the frontend that fits is programmed");
        maps.assert_consistent();
    }
}
