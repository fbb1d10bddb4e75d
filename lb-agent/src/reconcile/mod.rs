//! Reconciliation by level: the desired frontends are compared with what the maps hold, and only
//! the difference is written. The kernel is reached through [`MapWriter`], so this module is
//! tested without one.
//!
//! Order of writes, so that no packet ever sees an inconsistent state: new backends first; then
//! each changed frontend's Maglev table into a free region; then the frontend entry, which
//! publishes the table in one map update; only then old regions, removed frontends and backend
//! state changes.
//!
//! Backends (shared by address between frontends) are `ACTIVE` while some frontend may use them
//! for new flows or lists them as ready; `TERMINATING` while they are only listed as not ready or
//! terminating; and, once no frontend lists them, `TERMINATING` for the drain timeout and then
//! freed. A TCP flow keeps its backend for as long as the entry exists; a UDP flow moves as soon
//! as its backend is terminating; a flow whose backend was freed picks a new one (for TCP the new
//! backend answers with a reset: the connection's server is gone).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::{Duration, Instant},
};

pub mod alloc;
pub mod encode;
mod memory;

pub use lb_common::capacity::Capacities;
use lb_common::{
    Lb4Backend, Lb4FrontendMeta, Lb4Service, Lb4ServiceKey, BACKEND_STATE_ACTIVE, BACKEND_STATE_FREE,
    BACKEND_STATE_TERMINATING,
};

pub use self::memory::MemoryMaps;
use self::{
    alloc::{IdAllocator, Region, RegionAllocator},
    encode::{
        backend_addr, backend_state, backend_value, frontend_addr, service_key, service_region, service_value,
    },
};
use crate::model::{maglev, BackendAddr, Frontend, FrontendAddr};

/// Writes to the datapath maps.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_backend(&mut self, id: u32, backend: &Lb4Backend) -> Result<(), Self::Error>;
    fn set_maglev(&mut self, offset: u32, table: &[u32]) -> Result<(), Self::Error>;
    fn set_service(&mut self, key: &Lb4ServiceKey, svc: &Lb4Service) -> Result<(), Self::Error>;
    /// Records what frontend `id` was built from (its name, a digest), before it is published.
    fn set_frontend_meta(&mut self, id: u32, meta: &Lb4FrontendMeta) -> Result<(), Self::Error>;
    fn remove_service(&mut self, key: &Lb4ServiceKey) -> Result<(), Self::Error>;
    /// Forgets ClientIP affinity of frontend `svc_id` to the listed backends (they left it).
    fn remove_affinity(&mut self, svc_id: u32, backend_ids: &[u32]) -> Result<(), Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("frontend {frontend} ({service}): {what} is full (capacity {capacity})")]
    Full { frontend: FrontendAddr, service: String, what: &'static str, capacity: u32 },
    #[error("{object}: writing {what} failed: {source}")]
    Write {
        object: String,
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
pub struct Options {
    pub max_table_size: u32,
    pub maglev_seed: u64,
    /// How long a backend that no frontend lists any more keeps its established flows.
    pub drain_timeout: Duration,
}

impl Options {
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
}

/// What one frontend has in the maps.
#[derive(Debug, Clone)]
struct Programmed {
    id: u32,
    /// `None` after a restore until the first sync: then the frontend is adopted as it is if
    /// its digest matches, or rewritten.
    frontend: Option<Frontend>,
    region: Option<Region>,
    /// After a restore: the digest recorded beside the maps.
    restored_digest: Option<u64>,
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
    /// Backend address → (id, state written).
    backends: HashMap<BackendAddr, (u32, u8)>,
    /// Backends no frontend lists any more, and when they are freed.
    draining: HashMap<BackendAddr, Instant>,
    /// Backend → the frontends that list it, with the state each asks for (ACTIVE wins).
    users: HashMap<BackendAddr, HashMap<FrontendAddr, u8>>,
    /// Backends whose wanted state may have changed since states were last written.
    touched: HashSet<BackendAddr>,
    /// Frontends restored from the maps that no sync has named yet: until there are none, a
    /// backend with no known user is kept as it is.
    unknown: usize,
    /// Set by a restore; cleared once its backends have been checked for users.
    restore_pending: bool,
    frontend_ids: IdAllocator,
    backend_ids: IdAllocator,
    regions: RegionAllocator,
}

/// A digest of everything a frontend's entry and table are built from.
fn digest(fe: &Frontend, table_size: u32, seed: u64) -> u64 {
    let mut text =
        format!("v1 {} {table_size} {seed} {} {}", fe.addr, fe.affinity_timeout_secs, fe.local_only);
    for b in &fe.backends {
        text.push(' ');
        text.push_str(&b.to_string());
    }
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// The name recorded for a frontend: `namespace/name:port`.
pub fn frontend_name(fe: &Frontend) -> String {
    if fe.port_name.is_empty() {
        fe.service.clone()
    } else {
        format!("{}:{}", fe.service, fe.port_name)
    }
}

/// Whether the frontend's entry or table must be rewritten (the `kept` list only changes backend
/// states, written separately).
fn same_entry(a: &Frontend, b: &Frontend) -> bool {
    a.backends == b.backends
        && a.affinity_timeout_secs == b.affinity_timeout_secs
        && a.local_only == b.local_only
}

impl Reconciler {
    pub fn new(caps: Capacities, opts: Options) -> Self {
        Self {
            opts,
            frontends: HashMap::new(),
            backends: HashMap::new(),
            draining: HashMap::new(),
            users: HashMap::new(),
            touched: HashSet::new(),
            unknown: 0,
            restore_pending: false,
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
        meta: impl Fn(u32) -> Option<Lb4FrontendMeta>,
    ) -> Self {
        let mut r = Self::new(caps, opts);
        r.restore_pending = true;
        for (id, b) in backends {
            let Some(addr) = backend_addr(&b) else { continue };
            if !r.backends.contains_key(&addr) && r.backend_ids.reserve(id) {
                r.backends.insert(addr, (id, b.state));
            }
        }
        for (key, svc) in services {
            let Some(addr) = frontend_addr(&key) else { continue };
            if !r.frontend_ids.reserve(svc.id) {
                continue;
            }
            let region = service_region(&svc).filter(|r2| r.regions.reserve(*r2));
            let restored_digest = meta(svc.id).map(|m| m.digest).filter(|d| *d != 0);
            r.frontends.insert(addr, Programmed { id: svc.id, frontend: None, region, restored_digest });
            r.unknown += 1;
        }
        r
    }

    /// Stores what `addr` now holds, keeping the backend index in step.
    fn set_programmed(&mut self, addr: FrontendAddr, p: Programmed) -> Option<Programmed> {
        let old = self.frontends.get(&addr).and_then(|o| o.frontend.as_ref());
        if self.frontends.get(&addr).is_some_and(|o| o.frontend.is_none()) && p.frontend.is_some() {
            self.unknown -= 1;
        }
        set_users(&mut self.users, &mut self.touched, addr, old, p.frontend.as_ref());
        self.frontends.insert(addr, p)
    }

    pub fn slots_used(&self) -> u32 {
        self.regions.used()
    }

    pub fn frontends_programmed(&self) -> usize {
        self.frontends.len()
    }

    pub fn backends_programmed(&self) -> usize {
        self.backends.len()
    }

    /// The earliest time a draining backend is due to be freed (the agent syncs again then).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.draining.values().min().copied()
    }

    /// Brings the maps to `desired`. Frontends of the Services in `held` that are not in
    /// `desired` keep what they have (their objects were rejected). Frontends that fail are
    /// reported and keep what they had; the others are still written.
    pub fn sync<W: MapWriter>(
        &mut self,
        desired: &BTreeMap<FrontendAddr, Frontend>,
        held: &BTreeSet<String>,
        now: Instant,
        w: &mut W,
    ) -> (SyncStats, Vec<SyncError>) {
        let gone: Vec<FrontendAddr> = self
            .frontends
            .iter()
            .filter(|(a, p)| {
                !desired.contains_key(a) && !p.frontend.as_ref().is_some_and(|f| held.contains(&f.service))
            })
            .map(|(a, _)| *a)
            .collect();
        self.apply(desired.iter(), &gone, now, w)
    }

    /// Writes only what changed: `changed` frontends (new or different) and `removed` ones. The
    /// agent uses this when it knows which Services an event touched.
    pub fn apply<'a, W: MapWriter>(
        &mut self,
        changed: impl IntoIterator<Item = (&'a FrontendAddr, &'a Frontend)>,
        removed: &[FrontendAddr],
        now: Instant,
        w: &mut W,
    ) -> (SyncStats, Vec<SyncError>) {
        let mut stats = SyncStats::default();
        let mut errors = Vec::new();
        for (addr, fe) in changed {
            if let Err(e) = self.sync_frontend(addr, fe, w, &mut stats) {
                errors.push(e);
            }
        }
        for addr in removed {
            if !self.frontends.contains_key(addr) {
                continue;
            }
            match w.remove_service(&service_key(addr)) {
                Ok(()) => {
                    let p = self.frontends.remove(addr).expect("checked above");
                    if p.frontend.is_none() {
                        self.unknown -= 1;
                    }
                    set_users(&mut self.users, &mut self.touched, *addr, p.frontend.as_ref(), None);
                    if let Some(r) = p.region {
                        self.regions.release(r);
                    }
                    self.frontend_ids.release(p.id);
                    stats.frontends_removed += 1;
                }
                Err(e) => errors.push(write_err(addr.to_string(), "service entry", e)),
            }
        }
        self.sync_backend_states(now, w, &mut stats, &mut errors);
        (stats, errors)
    }

    fn backend_id_for<W: MapWriter>(
        &mut self,
        b: &BackendAddr,
        w: &mut W,
        stats: &mut SyncStats,
    ) -> Result<Option<u32>, W::Error> {
        if let Some((id, state)) = self.backends.get(b).copied() {
            if state != BACKEND_STATE_ACTIVE {
                // Back in a table: active again before the table names it.
                w.set_backend(id, &backend_value(b, BACKEND_STATE_ACTIVE))?;
                self.backends.insert(*b, (id, BACKEND_STATE_ACTIVE));
                self.draining.remove(b);
                stats.backends_written += 1;
            }
            return Ok(Some(id));
        }
        let Some(id) = self.backend_ids.alloc() else { return Ok(None) };
        if let Err(e) = w.set_backend(id, &backend_value(b, BACKEND_STATE_ACTIVE)) {
            self.backend_ids.release(id);
            return Err(e);
        }
        self.backends.insert(*b, (id, BACKEND_STATE_ACTIVE));
        stats.backends_written += 1;
        Ok(Some(id))
    }

    fn sync_frontend<W: MapWriter>(
        &mut self,
        addr: &FrontendAddr,
        fe: &Frontend,
        w: &mut W,
        stats: &mut SyncStats,
    ) -> Result<(), SyncError> {
        let old = self.frontends.get(addr).and_then(|p| p.frontend.clone());
        if let Some(old) = &old {
            if old == fe {
                return Ok(());
            }
            if same_entry(old, fe) {
                // Only the kept endpoints changed: backend states, written afterwards.
                let p = self.frontends.get(addr).expect("present");
                let p = Programmed {
                    id: p.id,
                    region: p.region,
                    restored_digest: p.restored_digest,
                    frontend: Some(fe.clone()),
                };
                self.set_programmed(*addr, p);
                return Ok(());
            }
        }
        let size = maglev::table_size(fe.backends.len(), self.opts.max_table_size);
        let digest = digest(fe, size, self.opts.maglev_seed);
        if let Some(p) = self.frontends.get(addr) {
            // Restored from pinned maps, built from the same inputs: adopt it as it is, so a
            // restart rewrites nothing (and needs no spare table space).
            let backends_known = fe.backends.iter().all(|b| self.backends.contains_key(b));
            if p.frontend.is_none() && p.restored_digest == Some(digest) && backends_known {
                let p = Programmed {
                    id: p.id,
                    region: p.region,
                    restored_digest: None,
                    frontend: Some(fe.clone()),
                };
                self.set_programmed(*addr, p);
                return Ok(());
            }
        }
        let full =
            |what, capacity| SyncError::Full { frontend: *addr, service: fe.service.clone(), what, capacity };
        // Backends first, so the table never names one that is not there yet.
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            match self.backend_id_for(b, w, stats) {
                Ok(Some(id)) => ids.push(id),
                Ok(None) => return Err(full("backend map", self.backend_ids.in_use() as u32)),
                Err(e) => return Err(write_err(addr.to_string(), "backend", e)),
            }
        }
        let region = if fe.backends.is_empty() {
            None
        } else {
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
        let id = match existing.or_else(|| self.frontend_ids.alloc()) {
            Some(id) => id,
            None => {
                if let Some(r) = region {
                    self.regions.release(r);
                }
                return Err(full("service map", self.frontend_ids.in_use() as u32));
            }
        };
        let svc = service_value(id, fe, region);
        let published = w
            .set_frontend_meta(id, &Lb4FrontendMeta::new(digest, &frontend_name(fe)))
            .and_then(|()| w.set_service(&service_key(addr), &svc));
        if let Err(e) = published {
            if let Some(r) = region {
                self.regions.release(r);
            }
            if existing.is_none() {
                self.frontend_ids.release(id);
            }
            return Err(write_err(addr.to_string(), "service entry", e));
        }
        // Clients pinned by affinity to a backend that left this frontend pick again.
        if fe.affinity_timeout_secs > 0 {
            let left: Vec<u32> = old
                .iter()
                .flat_map(|o| o.backends.iter())
                .filter(|b| !fe.backends.contains(b))
                .filter_map(|b| self.backends.get(b).map(|(id, _)| *id))
                .collect();
            if !left.is_empty() {
                if let Err(e) = w.remove_affinity(id, &left) {
                    return Err(write_err(addr.to_string(), "affinity entries", e));
                }
            }
        }
        let previous = self.set_programmed(
            *addr,
            Programmed { id, frontend: Some(fe.clone()), region, restored_digest: None },
        );
        if let Some(r) = previous.and_then(|o| o.region) {
            self.regions.release(r);
        }
        stats.frontends_written += 1;
        Ok(())
    }

    /// Writes the state of each backend whose users changed, from what its frontends list, and
    /// frees backends whose drain timeout passed.
    fn sync_backend_states<W: MapWriter>(
        &mut self,
        now: Instant,
        w: &mut W,
        stats: &mut SyncStats,
        errors: &mut Vec<SyncError>,
    ) {
        if self.unknown > 0 {
            // Restored frontends not named yet: their backends' users are unknown.
            return;
        }
        let mut todo: HashSet<BackendAddr> = std::mem::take(&mut self.touched);
        todo.extend(self.draining.iter().filter(|(_, d)| **d <= now).map(|(a, _)| *a));
        if std::mem::take(&mut self.restore_pending) {
            // Backends restored from the maps that no frontend has named: they drain.
            todo.extend(self.backends.keys().filter(|a| !self.users.contains_key(a)));
        }
        for addr in todo {
            let Some((id, state)) = self.backends.get(&addr).copied() else { continue };
            let want = self
                .users
                .get(&addr)
                .and_then(|u| u.values().copied().min_by_key(|s| u8::from(*s != BACKEND_STATE_ACTIVE)));
            let (target, free) = match want {
                Some(s) => {
                    self.draining.remove(&addr);
                    (s, false)
                }
                None => {
                    let deadline = *self.draining.entry(addr).or_insert(now + self.opts.drain_timeout);
                    if now >= deadline {
                        (BACKEND_STATE_FREE, true)
                    } else {
                        (BACKEND_STATE_TERMINATING, false)
                    }
                }
            };
            if target == state && !free {
                continue;
            }
            let value = if free { Lb4Backend::default() } else { backend_value(&addr, target) };
            match w.set_backend(id, &value) {
                Ok(()) if free => {
                    self.backends.remove(&addr);
                    self.draining.remove(&addr);
                    self.backend_ids.release(id);
                    stats.backends_removed += 1;
                }
                Ok(()) => {
                    self.backends.insert(addr, (id, target));
                    stats.backends_written += 1;
                }
                Err(e) => {
                    self.touched.insert(addr);
                    errors.push(write_err(addr.to_string(), "backend", e));
                }
            }
        }
    }
}

/// Records in the backend index which backends `addr` lists, replacing what `old` listed; every
/// backend concerned is marked for a state check.
fn set_users(
    users: &mut HashMap<BackendAddr, HashMap<FrontendAddr, u8>>,
    touched: &mut HashSet<BackendAddr>,
    addr: FrontendAddr,
    old: Option<&Frontend>,
    new: Option<&Frontend>,
) {
    for b in old.into_iter().flat_map(|o| o.backends.iter().chain(o.kept.iter().map(|(b, _)| b))) {
        if let Some(u) = users.get_mut(b) {
            u.remove(&addr);
            if u.is_empty() {
                users.remove(b);
            }
        }
        touched.insert(*b);
    }
    let Some(new) = new else { return };
    for (b, s) in &new.kept {
        users.entry(*b).or_default().insert(addr, backend_state(*s));
        touched.insert(*b);
    }
    // Table backends last: a backend both kept and in the table is active.
    for b in &new.backends {
        users.entry(*b).or_default().insert(addr, BACKEND_STATE_ACTIVE);
        touched.insert(*b);
    }
}

fn write_err(
    object: String,
    what: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> SyncError {
    SyncError::Write { object, what, source: Box::new(e) }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use super::*;
    use crate::model::{BackendState, Frontend, Protocol};

    const fn caps(services: u32, backends: u32, maglev_slots: u32) -> Capacities {
        Capacities { services, backends, maglev_slots, ct: 0, affinity: 0 }
    }

    impl MemoryMaps {
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

    const CAPS: Capacities = caps(16, 16, 2048);
    const OPTS: Options =
        Options { max_table_size: 65_537, maglev_seed: 0, drain_timeout: Duration::from_secs(60) };

    fn be(last: u8) -> BackendAddr {
        BackendAddr { ip: Ipv4Addr::new(10, 244, 0, last), port: 8080, proto: Protocol::Tcp }
    }

    fn frontend(port: u16, last: &[u8], kept: &[(u8, BackendState)], affinity: u32) -> Frontend {
        let addr = FrontendAddr { vip: Ipv4Addr::new(10, 96, 0, 1), port, proto: Protocol::Tcp };
        Frontend {
            addr,
            service: "default/s".into(),
            port_name: String::new(),
            backends: last.iter().map(|l| be(*l)).collect(),
            kept: kept.iter().map(|(l, s)| (be(*l), *s)).collect(),
            affinity_timeout_secs: affinity,
            local_only: false,
        }
    }

    fn fe(last: &[u8]) -> BTreeMap<FrontendAddr, Frontend> {
        one(frontend(80, last, &[], 0))
    }

    fn one(f: Frontend) -> BTreeMap<FrontendAddr, Frontend> {
        BTreeMap::from([(f.addr, f)])
    }

    fn sync(
        r: &mut Reconciler,
        d: &BTreeMap<FrontendAddr, Frontend>,
        m: &mut MemoryMaps,
    ) -> (SyncStats, Vec<SyncError>) {
        r.sync(d, &BTreeSet::new(), Instant::now(), m)
    }

    #[test]
    fn tables_are_written_before_they_are_published_and_regions_are_reused() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS);
        let (s, e) = sync(&mut r, &fe(&[1, 2, 3]), &mut maps);
        assert!(e.is_empty());
        assert_eq!((s.frontends_written, s.backends_written, s.slots_written), (1, 3, 307));
        assert_eq!(
            maps.log,
            [
                "backend 1 state 1",
                "backend 2 state 1",
                "backend 3 state 1",
                "maglev 0+307",
                "service 1 at 0+307"
            ]
        );
        maps.assert_consistent();

        // Unchanged: nothing is written.
        maps.log.clear();
        assert_eq!(sync(&mut r, &fe(&[1, 2, 3]), &mut maps).0, SyncStats::default());
        assert!(maps.log.is_empty());

        // One backend leaves: the new table goes to a free region, then the entry moves, then the
        // backend drains (terminating: established flows stay).
        let (s, _) = sync(&mut r, &fe(&[1, 3]), &mut maps);
        assert_eq!((s.frontends_written, s.backends_written), (1, 1));
        assert_eq!(maps.log, ["maglev 307+251", "service 1 at 307+251", "backend 2 state 2"]);
        maps.assert_consistent();

        // The first region is free again and is reused. A fresh backend id (4), not the draining 2.
        maps.log.clear();
        sync(&mut r, &fe(&[1, 3, 4]), &mut maps);
        assert_eq!(maps.log, ["backend 4 state 1", "maglev 0+307", "service 1 at 0+307"]);
        maps.assert_consistent();
        assert_eq!(r.slots_used(), 307);
    }

    #[test]
    fn removed_backends_drain_then_are_freed_and_can_come_back() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS);
        let t0 = Instant::now();
        r.sync(&fe(&[1, 2]), &BTreeSet::new(), t0, &mut maps);
        r.sync(&fe(&[1]), &BTreeSet::new(), t0, &mut maps);
        assert_eq!(maps.backends[&2].state, BACKEND_STATE_TERMINATING);
        assert_eq!(r.next_deadline(), Some(t0 + OPTS.drain_timeout));
        maps.log.clear();
        r.sync(&fe(&[1]), &BTreeSet::new(), t0 + Duration::from_secs(59), &mut maps);
        assert!(maps.log.is_empty(), "still draining: {:?}", maps.log);
        let (s, _) = r.sync(&fe(&[1]), &BTreeSet::new(), t0 + Duration::from_secs(60), &mut maps);
        assert_eq!(s.backends_removed, 1);
        assert_eq!(maps.backends[&2].state, BACKEND_STATE_FREE);
        assert_eq!(r.next_deadline(), None);

        // A draining backend that comes back is active again before any table names it.
        r.sync(&fe(&[1]), &BTreeSet::new(), t0, &mut maps);
        let mut r = Reconciler::new(CAPS, OPTS);
        let mut maps = MemoryMaps::default();
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        sync(&mut r, &fe(&[1]), &mut maps);
        maps.log.clear();
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        assert_eq!(maps.log, ["backend 2 state 1", "maglev 0+251", "service 1 at 0+251"]);
        maps.assert_consistent();
    }

    #[test]
    fn listed_endpoints_keep_their_state() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS);
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        // 2 is terminating (still listed): its flows stay, no drain deadline.
        sync(&mut r, &one(frontend(80, &[1], &[(2, BackendState::Terminating)], 0)), &mut maps);
        assert_eq!(maps.backends[&2].state, BACKEND_STATE_TERMINATING);
        assert_eq!(r.next_deadline(), None);
        // Another frontend uses 2 for new flows: active wins.
        let mut both = one(frontend(80, &[1], &[(2, BackendState::Terminating)], 0));
        both.extend(one(frontend(81, &[2], &[], 0)));
        sync(&mut r, &both, &mut maps);
        assert_eq!(maps.backends[&2].state, BACKEND_STATE_ACTIVE);
        maps.assert_consistent();
    }

    #[test]
    fn affinity_to_a_backend_that_left_is_forgotten() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS);
        sync(&mut r, &one(frontend(80, &[1, 2, 3], &[], 30)), &mut maps);
        assert_eq!(maps.services.values().next().expect("one").affinity_timeout_secs, 30);
        maps.log.clear();
        sync(&mut r, &one(frontend(80, &[1, 3], &[], 30)), &mut maps);
        assert!(maps.log.contains(&"forget affinity of 1 to [2]".to_string()), "{:?}", maps.log);
    }

    #[test]
    fn held_services_keep_what_they_had() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS);
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        maps.log.clear();
        let held = BTreeSet::from(["default/s".to_string()]);
        r.sync(&BTreeMap::new(), &held, Instant::now(), &mut maps);
        assert!(maps.log.is_empty(), "{:?}", maps.log);
        assert_eq!(maps.services.len(), 1);
        // Once it is no longer held and still absent, it goes.
        let (s, _) = sync(&mut r, &BTreeMap::new(), &mut maps);
        assert_eq!(s.frontends_removed, 1);
    }

    #[test]
    fn restore_keeps_ids_and_removes_what_is_no_longer_wanted() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS);
        sync(&mut r, &fe(&[1, 2, 3]), &mut maps);
        let ids_before = maps.backends.clone();

        let meta = maps.meta.clone();
        let mut r2 = Reconciler::restore(
            CAPS,
            OPTS,
            maps.services.iter().map(|(k, v)| (*k, *v)),
            maps.backends.iter().map(|(k, v)| (*k, *v)),
            |id| meta.get(&id).copied(),
        );
        maps.log.clear();
        sync(&mut r2, &fe(&[1, 2, 3]), &mut maps);
        // Same ids for the same backends, and the table is adopted: nothing is written.
        assert_eq!(maps.backends, ids_before);
        assert!(maps.log.is_empty(), "{:?}", maps.log);
        maps.assert_consistent();
        assert_eq!(maps.meta[&1].name(), "default/s");

        // Without the recorded digest the table is rewritten once, into a new region.
        let mut r3 = Reconciler::restore(
            CAPS,
            OPTS,
            maps.services.iter().map(|(k, v)| (*k, *v)),
            maps.backends.iter().map(|(k, v)| (*k, *v)),
            |_| None,
        );
        sync(&mut r3, &fe(&[1, 2, 3]), &mut maps);
        assert_eq!(maps.log, ["maglev 307+307", "service 1 at 307+307"]);
        assert_eq!(maps.backends, ids_before);
        maps.assert_consistent();
        let mut r2 = r3;

        maps.log.clear();
        let (s, _) = sync(&mut r2, &BTreeMap::new(), &mut maps);
        assert_eq!(s.frontends_removed, 1);
        assert!(maps.services.is_empty());
        assert!(maps.backends.values().all(|b| b.state == BACKEND_STATE_TERMINATING), "draining");
        assert_eq!(r2.slots_used(), 0);
    }

    #[test]
    fn a_full_map_fails_that_frontend_only() {
        let mut maps = MemoryMaps::default();
        let caps = caps(16, 3, 2048);
        let mut r = Reconciler::new(caps, OPTS);
        let mut desired = one(frontend(80, &[1], &[], 0));
        desired.extend(one(frontend(81, &[2, 3, 4], &[], 0)));
        let (_, errors) = sync(&mut r, &desired, &mut maps);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("backend map is full"), "{}", errors[0]);
        assert_eq!(maps.services.len(), 1, "the frontend that fits is programmed");
        maps.assert_consistent();
    }

    #[test]
    fn full_service_and_slot_maps_fail_the_frontends_that_do_not_fit_and_keep_the_rest() {
        // Frontend ids run from 1, so a 3-entry service map holds two frontends.
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(caps(3, 64, 1 << 16), OPTS);
        let desired: BTreeMap<_, _> = (80..84).flat_map(|p| one(frontend(p, &[1, 2], &[], 0))).collect();
        let (_, errors) = sync(&mut r, &desired, &mut maps);
        assert_eq!(maps.services.len(), 2, "two fit");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors
            .iter()
            .all(|e| e.to_string().contains("service map is full") && e.reason_label() == "map_full"));
        maps.assert_consistent();
        // A second sync of the same state changes nothing that works and fails the same way.
        let before = maps.services.clone();
        let (_, errors) = sync(&mut r, &desired, &mut maps);
        assert_eq!((maps.services.clone(), errors.len()), (before, 2));

        // Maglev slots for one 251-slot table only.
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(caps(16, 64, 300), OPTS);
        let desired: BTreeMap<_, _> = (80..82).flat_map(|p| one(frontend(p, &[1, 2], &[], 0))).collect();
        let (_, errors) = sync(&mut r, &desired, &mut maps);
        assert_eq!(maps.services.len(), 1, "the table that fits is programmed");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("maglev slot array is full"), "{}", errors[0]);
        maps.assert_consistent();
    }
}
