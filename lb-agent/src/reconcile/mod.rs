//! Reconciliation by level: the desired frontends are compared with what the maps hold, and only
//! the difference is written. The kernel is reached through [`MapWriter`], so this module is
//! tested without one.
//!
//! Order of writes, so that no packet ever sees an inconsistent state: new backends first; then
//! each changed frontend's Maglev table into a free region and its member rows; then the frontend
//! entry, which publishes the table in one map update; only then old regions and backend state
//! changes. A region that held a published table is written again only after a grace period
//! (`alloc::REGION_GRACE_MS`): a CPU that read the old entry may still be reading its table.
//!
//! Flows live as under netfilter conntrack. Each frontend has member rows (frontend id, backend
//! id) saying what its flows may still do with each backend: `Active` (in the table or ready),
//! `Serving` (terminating but serving: TCP and UDP flows stay), `Draining` (not serving, or no
//! longer listed: TCP flows stay, UDP flows pick again). A frontend whose Service is gone becomes a
//! tombstone (an entry with no backend, its members draining) and keeps its id; a member that
//! leaves stays as a draining row. Both go only when a pass of the flow sweep ([`flows`]) that
//! began after they were made finds no flow using them; a backend is freed when no row names it.
//! So an established connection keeps its backend after its Service is deleted or its address
//! changes, and a recycled address or backend id never inherits another Service's flows.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

pub mod alloc;
pub mod encode;
#[cfg(test)]
mod faults;
pub mod flows;
mod memory;

pub use lb_common::capacity::Capacities;
use lb_common::{
    Lb4FrontendMeta, Lb4Service, BACKEND_STATE_ACTIVE, BACKEND_STATE_FREE, SVC_FLAG_EXTERNAL,
    SVC_FLAG_TOMBSTONE,
};

use self::{
    alloc::{IdAllocator, Region, RegionAllocator},
    encode::{
        backend_addr, backend_free, backend_state, backend_value, frontend_addr, member_backend_state,
        meta_kind, service_key, service_region, service_value, src_range_entries, tombstone_value,
    },
};
pub use self::{
    encode::{BackendValue, MemberKey, MemberValue, ServiceKey, SrcRangeEntry, SrcRangeKey},
    flows::{CtKey, FlowCensus, FlowError, FlowTable, FlowTables, Sweeper, Timeouts},
    memory::MemoryMaps,
};
use crate::model::{maglev, BackendAddr, BackendState, Frontend, FrontendAddr};

/// Writes to the datapath maps.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Writes backend `id` into the backends map of its family.
    fn set_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), Self::Error>;
    fn set_maglev(&mut self, offset: u32, table: &[u32]) -> Result<(), Self::Error>;
    fn set_service(&mut self, key: &ServiceKey, svc: &Lb4Service) -> Result<(), Self::Error>;
    /// Records what frontend `id` was built from (its name, a digest), once it is published.
    fn set_frontend_meta(&mut self, id: u32, meta: &Lb4FrontendMeta) -> Result<(), Self::Error>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Self::Error>;
    /// Forgets ClientIP affinity of frontend `svc_id` to the listed backends (they left it), in
    /// both families' affinity maps.
    fn remove_affinity(&mut self, svc_id: u32, backend_ids: &[u32]) -> Result<(), Self::Error>;
    /// Writes a (frontend, backend) member row.
    fn set_member(&mut self, key: &MemberKey, member: &MemberValue) -> Result<(), Self::Error>;
    /// Removes a member row (absent is fine).
    fn remove_member(&mut self, key: &MemberKey) -> Result<(), Self::Error>;
    /// Writes a `loadBalancerSourceRanges` entry with its verdict.
    fn set_src_range(&mut self, e: &SrcRangeEntry) -> Result<(), Self::Error>;
    /// Removes a `loadBalancerSourceRanges` entry (absent is fine).
    fn remove_src_range(&mut self, e: &SrcRangeEntry) -> Result<(), Self::Error>;
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
}

impl Default for Options {
    fn default() -> Self {
        Self { max_table_size: maglev::DEFAULT_MAX_TABLE_SIZE, maglev_seed: 0 }
    }
}

/// Member rows of one frontend: backend → what its flows may do there.
type Rows = BTreeMap<BackendAddr, BackendState>;

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
    /// After a restore: the name recorded beside the maps (`namespace/name:port`, maybe cut).
    restored_name: Option<String>,
    /// After a restore: whether its entry was flagged as an address clients outside reach.
    restored_external: bool,
}

impl Programmed {
    /// The Service it is of, if known whole: named by the last sync, or recorded beside the maps
    /// (unless the record was cut inside the Service's name).
    fn service(&self) -> Option<&str> {
        match (&self.frontend, &self.restored_name) {
            (Some(fe), _) => Some(&fe.service),
            (None, Some(n)) => {
                n.split_once(':').map(|(s, _)| s).or((n.len() < NAME_MAX).then_some(n.as_str()))
            }
            (None, None) => None,
        }
    }

    /// Whether it is of Service `service` (a record cut inside the name: its prefix).
    fn is_of(&self, service: &str) -> bool {
        match (&self.frontend, &self.restored_name) {
            (Some(fe), _) => fe.service == service,
            (None, Some(n)) => recorded_is(n, service),
            (None, None) => false,
        }
    }
}

/// The longest name recorded beside the maps, in bytes (the size of `Lb4FrontendMeta::name`).
const NAME_MAX: usize = 112;

/// Whether `recorded` (`namespace/name:port` cut to [`NAME_MAX`] bytes) names Service `service`.
fn recorded_is(recorded: &str, service: &str) -> bool {
    match recorded.split_once(':') {
        Some((s, _)) => s == service,
        None if recorded.len() >= NAME_MAX => service.starts_with(recorded),
        None => recorded == service,
    }
}

/// A frontend whose Service is gone (deleted, or its address, port or owner changed), kept while
/// flows made for it may be alive.
#[derive(Debug, Clone, Copy)]
struct Tombstone {
    /// Where its tombstone entry is in the services map; `None` once another frontend took the
    /// address (or after a restore that found only its members).
    addr: Option<FrontendAddr>,
    /// The address it was made at (`None` if it never had an entry): while it lives, a packet
    /// of its flows must still find an entry there.
    origin: Option<FrontendAddr>,
    /// The sweep pass during which it was made: it goes at the end of a later pass that found no
    /// flow of it.
    since: u64,
    /// Its address was one clients outside reach: its flows from outside keep finding it.
    external: bool,
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

/// The frontends a backend is a member of, each with the backends-map state it asks for: a list
/// sorted by frontend id. A backend has a few (its Service's cluster IPs, NodePorts, load-balancer
/// addresses); a hash map for each of 100,000 backends cost twice the memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Users(Vec<(u32, u8)>);

impl Users {
    pub(crate) fn insert(&mut self, id: u32, state: u8) {
        match self.0.binary_search_by_key(&id, |u| u.0) {
            Ok(i) => self.0[i].1 = state,
            Err(i) => self.0.insert(i, (id, state)),
        }
    }

    fn remove(&mut self, id: &u32) {
        if let Ok(i) = self.0.binary_search_by_key(id, |u| u.0) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn values(&self) -> impl Iterator<Item = &u8> {
        self.0.iter().map(|u| &u.1)
    }
}

pub struct Reconciler {
    opts: Options,
    frontends: HashMap<FrontendAddr, Programmed>,
    /// Backend address → (id, state written).
    backends: HashMap<BackendAddr, (u32, u8)>,
    /// The members written, by frontend id (live frontends and tombstones): backend → state.
    members: HashMap<u32, Rows>,
    /// Members that left their (live) frontend, and the sweep pass during which they left: they
    /// stay, draining, while flows to them may be alive.
    departed: HashMap<(u32, BackendAddr), u64>,
    tombstones: HashMap<u32, Tombstone>,
    /// Backend → the frontend ids it is a member of, with the backends-map state each asks for
    /// (ACTIVE wins). A backend with no member row is freed.
    users: HashMap<BackendAddr, Users>,
    /// Backends whose wanted state may have changed since states were last written.
    touched: HashSet<BackendAddr>,
    /// Frontends whose member rows are not yet those of their published table (a write failed):
    /// [`Reconciler::retry`] tries them again.
    pending: BTreeSet<FrontendAddr>,
    /// Frontends whose new table found no free region while freed regions were still in their
    /// grace period: [`Reconciler::retry`] tries them again once those are free.
    deferred: BTreeMap<FrontendAddr, Frontend>,
    /// Frontends whose writes failed (before their table was published, they keep what they
    /// had): [`Reconciler::retry`] tries them again.
    unwritten: BTreeMap<FrontendAddr, Frontend>,
    /// ClientIP affinity that failed to be forgotten: frontend id → backend ids that left it.
    forget: BTreeMap<u32, BTreeSet<u32>>,
    /// Frontends no longer wanted whose removal failed: [`Reconciler::retry`] tries it again.
    removals: BTreeSet<FrontendAddr>,
    /// Set by a restore; cleared once its backends have been checked for users.
    restore_pending: bool,
    /// The flow sweep's current pass (see [`flows`]).
    pass: u64,
    frontend_ids: IdAllocator,
    backend_ids: IdAllocator,
    regions: RegionAllocator,
    /// Milliseconds of a monotonic clock: when a freed table region may be written again.
    clock: Clock,
    /// The `loadBalancerSourceRanges` entries written.
    src_ranges: BTreeSet<SrcRangeEntry>,
    /// Some of `src_ranges` are no longer wanted (their removal failed): [`Reconciler::retry`]
    /// removes them.
    src_ranges_stale: bool,
}

/// What a frontend's table is written into.
const SLOTS: &str = "maglev slot array";

/// A monotonic clock in milliseconds (injected in tests).
pub type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

/// Milliseconds since the clock was made.
fn monotonic_clock() -> Clock {
    let start = std::time::Instant::now();
    Box::new(move || start.elapsed().as_millis() as u64)
}

/// A digest of everything a frontend's entry and table are built from.
fn digest(fe: &Frontend, table_size: u32, seed: u64) -> u64 {
    let mut text =
        format!("v1 {} {table_size} {seed} {} {}", fe.addr, fe.affinity_timeout_secs, fe.local_only);
    // Only where not the default, so that a cluster IP's digest stays what earlier versions
    // recorded (its table is adopted after an upgrade).
    if fe.kind.external() {
        text.push_str(" external");
    }
    if fe.two_scopes {
        text.push_str(" two-scopes");
    }
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

/// Whether the frontend's entry or table must be rewritten (the `kept` list only changes member
/// rows and backend states, written separately).
fn same_entry(a: &Frontend, b: &Frontend) -> bool {
    a.backends == b.backends
        && a.affinity_timeout_secs == b.affinity_timeout_secs
        && a.local_only == b.local_only
        && a.kind == b.kind
        && a.two_scopes == b.two_scopes
}

impl Reconciler {
    pub fn new(caps: Capacities, opts: Options) -> Self {
        Self {
            opts,
            frontends: HashMap::new(),
            backends: HashMap::new(),
            members: HashMap::new(),
            departed: HashMap::new(),
            tombstones: HashMap::new(),
            users: HashMap::new(),
            touched: HashSet::new(),
            pending: BTreeSet::new(),
            deferred: BTreeMap::new(),
            unwritten: BTreeMap::new(),
            forget: BTreeMap::new(),
            removals: BTreeSet::new(),
            restore_pending: false,
            pass: 0,
            frontend_ids: IdAllocator::new(caps.services),
            backend_ids: IdAllocator::new(caps.backends),
            regions: RegionAllocator::new(caps.maglev_slots),
            clock: monotonic_clock(),
            src_ranges: BTreeSet::new(),
            src_ranges_stale: false,
        }
    }

    /// The same reconciler with another clock for the regions' grace period (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Adopts what pinned maps already hold, so that ids stay stable across agent restarts and
    /// tracked flows keep their backends. Entries that do not fit are left for the first sync to
    /// overwrite or remove. Tombstones come back as tombstones, and member rows of frontend ids
    /// no entry names any more as tombstones without an address.
    pub fn restore(caps: Capacities, opts: Options, maps: Restored<'_>) -> Self {
        let mut r = Self::new(caps, opts);
        r.restore_pending = true;
        r.src_ranges = maps.src_ranges.into_iter().collect();
        let mut by_id = HashMap::new();
        for (id, b) in maps.backends {
            let Some(addr) = backend_addr(&b) else { continue };
            if !r.backends.contains_key(&addr) && r.backend_ids.reserve(id) {
                r.backends.insert(addr, (id, b.state()));
                by_id.insert(id, addr);
            }
        }
        for (key, svc) in maps.services {
            let Some(addr) = frontend_addr(&key) else { continue };
            if !r.frontend_ids.reserve(svc.id) {
                continue;
            }
            if svc.flags & SVC_FLAG_TOMBSTONE != 0 {
                let external = svc.flags & SVC_FLAG_EXTERNAL != 0;
                r.tombstones
                    .insert(svc.id, Tombstone { addr: Some(addr), origin: Some(addr), since: 0, external });
                continue;
            }
            let region = service_region(&svc).filter(|r2| r.regions.reserve(*r2));
            let meta = (maps.meta)(svc.id);
            let restored_digest = meta.map(|m| m.digest).filter(|d| *d != 0);
            let restored_name = meta.map(|m| m.name().to_string()).filter(|n| !n.is_empty());
            r.frontends.insert(
                addr,
                Programmed {
                    id: svc.id,
                    frontend: None,
                    region,
                    restored_digest,
                    restored_name,
                    restored_external: svc.flags & SVC_FLAG_EXTERNAL != 0,
                },
            );
        }
        let live: HashSet<u32> = r.frontends.values().map(|p| p.id).collect();
        for (key, m) in maps.members {
            let key = key.pair();
            let (Some(addr), Some(state)) = (by_id.get(&key.backend_id), member_backend_state(m.state()))
            else {
                continue;
            };
            if !live.contains(&key.svc_id) && !r.tombstones.contains_key(&key.svc_id) {
                if !r.frontend_ids.reserve(key.svc_id) {
                    continue;
                }
                r.tombstones
                    .insert(key.svc_id, Tombstone { addr: None, origin: None, since: 0, external: false });
            }
            r.members.entry(key.svc_id).or_default().insert(*addr, state);
            r.users.entry(*addr).or_default().insert(key.svc_id, backend_state(state));
        }
        r
    }

    pub fn slots_used(&self) -> u32 {
        self.regions.used_at((self.clock)())
    }

    pub fn frontends_programmed(&self) -> usize {
        self.frontends.len()
    }

    pub fn backends_programmed(&self) -> usize {
        self.backends.len()
    }

    /// Which Service holds each programmed address (restored ones by the name recorded beside
    /// the maps), so that a restarted agent settles two Services asking for one address as the
    /// one before it did.
    pub fn holders(&self) -> Vec<(FrontendAddr, String)> {
        self.frontends.iter().filter_map(|(a, p)| Some((*a, p.service()?.to_string()))).collect()
    }

    /// Frontends kept only for their flows.
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// Members kept only for their flows (they left a live frontend).
    pub fn departed(&self) -> usize {
        self.departed.len()
    }

    /// The ClientIP affinity timeout (seconds) of each live frontend, by id; an affinity entry of
    /// an id not listed is stale. Restored frontends not named yet keep theirs.
    pub fn affinity_timeouts(&self) -> HashMap<u32, u32> {
        self.frontends
            .values()
            .map(|p| (p.id, p.frontend.as_ref().map_or(u32::MAX, |f| f.affinity_timeout_secs)))
            .collect()
    }

    /// Brings the maps to `desired`. Frontends of the Services in `held` that are not in
    /// `desired` keep what they have (their objects were rejected). Frontends that fail are
    /// reported and keep what they had; the others are still written.
    pub fn sync<W: MapWriter>(
        &mut self,
        desired: &BTreeMap<FrontendAddr, Frontend>,
        held: &BTreeSet<String>,
        w: &mut W,
    ) -> (SyncStats, Vec<SyncError>) {
        // A removal that failed stays one unless the address is wanted again: a Service held now
        // keeps what it has, not an address it had already let go of.
        self.removals.retain(|a| !desired.contains_key(a));
        let gone: Vec<FrontendAddr> = self
            .frontends
            .iter()
            .filter(|(a, p)| {
                !desired.contains_key(a) && (self.removals.contains(a) || !held.iter().any(|s| p.is_of(s)))
            })
            .map(|(a, _)| *a)
            .collect();
        // A table waiting for a free region is wanted no more if its address is not (unless its
        // Service is held: as through `apply`, it is published once a region is free).
        self.deferred.retain(|a, f| desired.contains_key(a) || held.contains(&f.service));
        self.unwritten.retain(|a, f| desired.contains_key(a) || held.contains(&f.service));
        self.apply(desired.iter(), &gone, w)
    }

    /// Writes only what changed: `removed` frontends first (their addresses may be taken by
    /// `changed` ones in the same batch), then `changed` ones (new or different). The agent uses
    /// this when it knows which Services an event touched.
    pub fn apply<'a, W: MapWriter>(
        &mut self,
        changed: impl IntoIterator<Item = (&'a FrontendAddr, &'a Frontend)>,
        removed: &[FrontendAddr],
        w: &mut W,
    ) -> (SyncStats, Vec<SyncError>) {
        let mut stats = SyncStats::default();
        let mut errors = Vec::new();
        for addr in removed {
            match self.bury(addr, w, &mut stats) {
                Ok(()) => {
                    self.removals.remove(addr);
                }
                Err(e) => {
                    self.removals.insert(*addr);
                    errors.push(e);
                }
            }
        }
        for (addr, fe) in changed {
            // Wanted again: not to be removed.
            self.removals.remove(addr);
            self.deferred.remove(addr);
            self.unwritten.remove(addr);
            if let Err(e) = self.sync_frontend(addr, fe, w, &mut stats) {
                match &e {
                    SyncError::Full { what: SLOTS, .. } if self.regions.cooling() > 0 => {
                        self.deferred.insert(*addr, fe.clone());
                    }
                    // Full for good: reported, tried again with its next change.
                    SyncError::Full { .. } => {}
                    SyncError::Write { .. } => {
                        self.unwritten.insert(*addr, fe.clone());
                    }
                }
                errors.push(e);
            }
        }
        self.sync_backend_states(w, &mut stats, &mut errors);
        self.prune_src_ranges(w, &mut errors);
        (stats, errors)
    }

    /// Writes the `loadBalancerSourceRanges` entries frontend `fe` at `addr` lacks, before it is
    /// published: its ranges, then its deny entry, so that no client is shut out meanwhile, and
    /// none is let in once it is published. The ones it no longer has go afterwards
    /// ([`Reconciler::prune_src_ranges`]).
    fn write_src_ranges<W: MapWriter>(
        &mut self,
        addr: &FrontendAddr,
        fe: &Frontend,
        w: &mut W,
    ) -> Result<(), SyncError> {
        let Some(ranges) = &fe.source_ranges else { return Ok(()) };
        let object = || format!("{addr} ({})", fe.service);
        let wanted = src_range_entries(addr, ranges);
        for e in &wanted {
            if self.src_ranges.contains(e) {
                continue;
            }
            w.set_src_range(e).map_err(|err| write_err(object(), "source range", err))?;
            self.src_ranges.insert(*e);
        }
        // Ranges it no longer has (or another Service's, at an address it takes) go before it is
        // published; its deny entry stays.
        let key = wanted[wanted.len() - 1].key.frontend();
        let stale: Vec<SrcRangeEntry> = self
            .src_ranges
            .iter()
            .filter(|e| e.key.frontend() == key && !wanted.contains(e))
            .copied()
            .collect();
        for e in stale {
            w.remove_src_range(&e).map_err(|err| write_err(object(), "source range removal", err))?;
            self.src_ranges.remove(&e);
        }
        Ok(())
    }

    /// Removes the `loadBalancerSourceRanges` entries no programmed frontend has: deny entries
    /// first, so a frontend that loses its ranges never shuts a client out. A restored frontend
    /// not named yet keeps the entries at its address.
    fn prune_src_ranges<W: MapWriter>(&mut self, w: &mut W, errors: &mut Vec<SyncError>) {
        if self.src_ranges.is_empty() {
            return;
        }
        let mut wanted: HashSet<SrcRangeEntry> = HashSet::new();
        let mut unknown: HashSet<ServiceKey> = HashSet::new();
        for (addr, p) in &self.frontends {
            match &p.frontend {
                Some(fe) => {
                    if let Some(ranges) = &fe.source_ranges {
                        wanted.extend(src_range_entries(addr, ranges));
                    }
                }
                None => {
                    unknown
                        .insert(service_key(&FrontendAddr { scope: crate::model::Scope::External, ..*addr }));
                }
            }
        }
        let mut stale: Vec<SrcRangeEntry> = self
            .src_ranges
            .iter()
            .filter(|e| !wanted.contains(e) && !unknown.contains(&e.key.frontend()))
            .copied()
            .collect();
        stale.sort_by_key(|e| e.verdict() != lb_common::SRC_RANGE_DENY);
        self.src_ranges_stale = false;
        // Frontends whose deny entry failed to go keep their ranges with it.
        let mut blocked: HashSet<ServiceKey> = HashSet::new();
        for e in stale {
            if blocked.contains(&e.key.frontend()) {
                continue;
            }
            match w.remove_src_range(&e) {
                Ok(()) => {
                    self.src_ranges.remove(&e);
                }
                Err(err) => {
                    self.src_ranges_stale = true;
                    let (vip, port, proto, _) = e.parts();
                    let name =
                        format!("{}/{}", std::net::SocketAddr::new(vip, port), encode::proto_name(proto));
                    errors.push(write_err(name, "source range removal", err));
                    // The ranges it denies for stay until its deny entry goes.
                    if e.verdict() == lb_common::SRC_RANGE_DENY {
                        blocked.insert(e.key.frontend());
                    }
                }
            }
        }
    }

    /// The frontend at `addr` is no longer wanted: its entry becomes a tombstone (no backend, no
    /// table) and its members drain, so its established TCP flows keep their backends until they
    /// end, as under netfilter (UDP flows pick again, as kube-proxy's cleanup deletes them, and
    /// find no backend). The sweep removes it once no flow of it is left.
    fn bury<W: MapWriter>(
        &mut self,
        addr: &FrontendAddr,
        w: &mut W,
        stats: &mut SyncStats,
    ) -> Result<(), SyncError> {
        self.deferred.remove(addr);
        self.unwritten.remove(addr);
        let Some(p) = self.frontends.get(addr) else { return Ok(()) };
        let id = p.id;
        let external = p.frontend.as_ref().map_or(p.restored_external, |f| f.kind.external());
        let object =
            p.frontend.as_ref().map_or_else(|| addr.to_string(), |f| format!("{addr} ({})", f.service));
        // Members drain first, so no new flow or SYN reaches them once the entry has no table.
        let rows: Rows = self
            .members
            .get(&id)
            .map(|m| m.keys().map(|b| (*b, BackendState::Draining)).collect())
            .unwrap_or_default();
        let buried =
            self.write_rows(id, rows, w).map_err(|e| write_err(object.clone(), "member", e)).and_then(|()| {
                w.set_service(&service_key(addr), &tombstone_value(id, external))
                    .map_err(|e| write_err(object, "service entry", e))
            });
        if let Err(e) = buried {
            // Still published, but its rows may drain: should it be wanted again as it is, its
            // rows are written again.
            self.pending.insert(*addr);
            return Err(e);
        }
        let p = self.frontends.remove(addr).expect("checked above");
        self.pending.remove(addr);
        // Its affinity goes with its id (stale once the id is not live: the sweep removes it).
        self.forget.remove(&id);
        if let Some(r) = p.region {
            self.regions.release(r, (self.clock)());
        }
        // Its members are no longer departures of a live frontend: they go with the tombstone.
        self.departed.retain(|(fid, _), _| *fid != id);
        self.tombstones
            .insert(id, Tombstone { addr: Some(*addr), origin: Some(*addr), since: self.pass, external });
        stats.frontends_removed += 1;
        Ok(())
    }

    /// Writes frontend `id`'s member rows to be `rows`, removing none (rows go only when the
    /// sweep finds no flow using them). Backends without an id get no row: no flow can name them.
    fn write_rows<W: MapWriter>(&mut self, id: u32, rows: Rows, w: &mut W) -> Result<(), W::Error> {
        for (b, state) in rows {
            let Some((bid, _)) = self.backends.get(&b).copied() else { continue };
            let current = self.members.get(&id).and_then(|m| m.get(&b)).copied();
            if current == Some(state) {
                continue;
            }
            let (key, value) = encode::member(id, bid, &b, state);
            w.set_member(&key, &value)?;
            self.members.entry(id).or_default().insert(b, state);
            self.users.entry(b).or_default().insert(id, backend_state(state));
            self.touched.insert(b);
        }
        Ok(())
    }

    /// The member rows frontend `id` should have for `fe` (its table's backends active, its other
    /// endpoints in their state), and the members it had that are in neither (they depart). Only
    /// a table's backends are active members: a ready endpoint left out (by topology or
    /// locality) keeps its flows as a serving one does, and gets no SYN and no affinity here.
    fn rows_for(&self, id: u32, fe: &Frontend) -> (Rows, Vec<BackendAddr>) {
        let mut rows: Rows = fe
            .kept
            .iter()
            .map(|(b, s)| (*b, if *s == BackendState::Active { BackendState::Serving } else { *s }))
            .collect();
        for b in &fe.backends {
            rows.insert(*b, BackendState::Active);
        }
        let departures = self
            .members
            .get(&id)
            .into_iter()
            .flat_map(BTreeMap::keys)
            .filter(|b| !rows.contains_key(b))
            .copied()
            .collect();
        (rows, departures)
    }

    /// Once frontend `id`'s table without them is published: its members in `rows` are no longer
    /// departures, and `departures` drain (TCP flows stay, UDP flows pick again) and are recorded
    /// as departed, to go when no flow uses them. Recorded one by one, as each row is written.
    fn settle_departures<W: MapWriter>(
        &mut self,
        id: u32,
        rows: &Rows,
        departures: Vec<BackendAddr>,
        w: &mut W,
    ) -> Result<(), W::Error> {
        for b in rows.keys() {
            self.departed.remove(&(id, *b));
        }
        let pass = self.pass;
        for b in departures {
            self.write_rows(id, BTreeMap::from([(b, BackendState::Draining)]), w)?;
            self.departed.entry((id, b)).or_insert(pass);
        }
        Ok(())
    }

    fn backend_id_for<W: MapWriter>(
        &mut self,
        b: &BackendAddr,
        w: &mut W,
        stats: &mut SyncStats,
    ) -> Result<Option<u32>, W::Error> {
        if let Some((id, state)) = self.backends.get(b).copied() {
            if state != BACKEND_STATE_ACTIVE {
                // Back in a table: active again before the table names it. Should the table not
                // be published, its state is written back from its rows.
                w.set_backend(id, &backend_value(b, BACKEND_STATE_ACTIVE))?;
                self.backends.insert(*b, (id, BACKEND_STATE_ACTIVE));
                self.touched.insert(*b);
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
        // Freed again if no row comes to name it (its table was not published).
        self.touched.insert(*b);
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
        // Another Service takes the address: the old one's flows keep their frontend id (and
        // backends), new flows get a new id, so neither inherits the other's flows.
        // (Restored and not named yet: the name recorded beside the maps tells; with none, it is
        // taken to be the same Service.)
        let other_owner = self
            .frontends
            .get(addr)
            .is_some_and(|p| (p.frontend.is_some() || p.restored_name.is_some()) && !p.is_of(&fe.service));
        if other_owner {
            self.bury(addr, w, stats)?;
        }
        self.write_src_ranges(addr, fe, w)?;
        let object = || addr.to_string();
        let old = self.frontends.get(addr).and_then(|p| p.frontend.clone());
        if let Some(old) = &old {
            let pending = self.pending.contains(addr);
            if old == fe && !pending {
                return Ok(());
            }
            if same_entry(old, fe) {
                // Only the kept endpoints changed (or rows failed before): member rows, and
                // backend states afterwards. Recorded once they are written.
                let id = self.frontends[addr].id;
                if pending {
                    let size = maglev::table_size(fe.backends.len(), self.opts.max_table_size);
                    let meta =
                        Lb4FrontendMeta::new(digest(fe, size, self.opts.maglev_seed), &frontend_name(fe))
                            .with_kind(meta_kind(fe.kind));
                    w.set_frontend_meta(id, &meta).map_err(|e| write_err(object(), "frontend name", e))?;
                }
                let (rows, departures) = self.rows_for(id, fe);
                self.write_rows(id, rows.clone(), w)
                    .and_then(|()| self.settle_departures(id, &rows, departures, w))
                    .map_err(|e| write_err(object(), "member", e))?;
                self.frontends.get_mut(addr).expect("present").frontend = Some(fe.clone());
                self.pending.remove(addr);
                return Ok(());
            }
        }
        let size = maglev::table_size(fe.backends.len(), self.opts.max_table_size);
        let digest = digest(fe, size, self.opts.maglev_seed);
        if let Some(p) = self.frontends.get(addr) {
            // Restored from pinned maps, built from the same inputs: adopt it as it is, so a
            // restart rewrites nothing (and needs no spare table space).
            let backends_known = fe.backends.iter().all(|b| self.backends.contains_key(b));
            // Its table's region must be ours: one that could not be reserved on restore (it
            // overlapped another) may be handed out again, so that table is rewritten.
            let region_held = p.region.is_some() || fe.backends.is_empty();
            if p.frontend.is_none() && p.restored_digest == Some(digest) && backends_known && region_held {
                let id = p.id;
                let (rows, departures) = self.rows_for(id, fe);
                self.write_rows(id, rows.clone(), w)
                    .and_then(|()| self.settle_departures(id, &rows, departures, w))
                    .map_err(|e| write_err(object(), "member", e))?;
                let p = self.frontends.get_mut(addr).expect("present");
                p.frontend = Some(fe.clone());
                p.restored_digest = None;
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
                Err(e) => return Err(write_err(object(), "backend", e)),
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
            let region = self
                .regions
                .alloc(size, (self.clock)())
                .ok_or_else(|| full(SLOTS, self.regions.capacity()))?;
            if let Err(e) = w.set_maglev(region.offset, &table) {
                self.regions.release_unread(region);
                return Err(write_err(object(), "maglev table", e));
            }
            stats.slots_written += table.len();
            Some(region)
        };
        let existing = self.frontends.get(addr).map(|p| p.id);
        // With ClientIP affinity: the backends its published table names that leave it (active
        // rows; also after a restore, when the frontend it was built from is not known).
        let leaving: Vec<BackendAddr> = existing
            .filter(|_| fe.affinity_timeout_secs > 0)
            .and_then(|id| self.members.get(&id))
            .into_iter()
            .flatten()
            .filter(|(b, s)| **s == BackendState::Active && !fe.backends.contains(b))
            .map(|(b, _)| *b)
            .collect();
        let id = match existing.or_else(|| self.frontend_ids.alloc()) {
            Some(id) => id,
            None => {
                if let Some(r) = region {
                    self.regions.release_unread(r);
                }
                return Err(full("service map", self.frontend_ids.in_use() as u32));
            }
        };
        // Members before the entry: the first packet after a new flow checks its member row.
        // Members that are downgraded (no longer active) or leave change only once the table
        // without them is published: until then the old table may still give them new flows.
        let (rows, departures) = self.rows_for(id, fe);
        let (before, after) = self.split_downgrades(id, &rows);
        // The record first names the frontend with no digest: should the agent stop before the
        // digest is written after publishing, a restart knows whose the id is and rewrites the
        // table rather than adopt one it does not know (an id may be another's recycled).
        let unknown = w
            .set_frontend_meta(id, &Lb4FrontendMeta::new(0, &frontend_name(fe)).with_kind(meta_kind(fe.kind)))
            .map_err(|e| write_err(object(), "frontend name", e));
        if unknown.is_ok() {
            // A restored table is no longer known by the digest it was recorded with.
            if let Some(p) = self.frontends.get_mut(addr) {
                p.restored_digest = None;
            }
        }
        let published = unknown
            .and_then(|()| self.write_rows(id, before, w).map_err(|e| write_err(object(), "member", e)))
            .and_then(|()| {
                w.set_service(&service_key(addr), &service_value(id, fe, region))
                    .map_err(|e| write_err(object(), "service entry", e))
            });
        if let Err(e) = published {
            // The entry was not written: no packet can have read the new table.
            if let Some(r) = region {
                self.regions.release_unread(r);
            }
            if self.frontends.contains_key(addr) {
                // Rows for the table that was not published may have been written: the next
                // sync (or retry) brings them back to the published frontend's.
                self.pending.insert(*addr);
            } else if !self.members.contains_key(&id) {
                self.frontend_ids.release(id);
            } else {
                // Rows were written for the new id: keep it as a tombstone until they go.
                self.tombstones
                    .insert(id, Tombstone { addr: None, origin: None, since: self.pass, external: false });
            }
            return Err(e);
        }
        // The address was a tombstone's: that entry is overwritten now.
        for t in self.tombstones.values_mut().filter(|t| t.addr == Some(*addr)) {
            t.addr = None;
        }
        let previous = self.frontends.insert(
            *addr,
            Programmed {
                id,
                frontend: Some(fe.clone()),
                region,
                restored_digest: None,
                restored_name: None,
                restored_external: false,
            },
        );
        if let Some(r) = previous.and_then(|o| o.region) {
            self.regions.release(r, (self.clock)());
        }
        stats.frontends_written += 1;
        self.pending.insert(*addr);
        // Clients pinned by affinity to a backend that left this frontend pick again (the
        // datapath honours affinity only to active members meanwhile). Recorded now, so that a
        // failure below leaves it for `retry`; never for a backend of the table just published
        // (one that left, failed to be forgotten, and came back).
        let forget = self.forget.entry(id).or_default();
        forget.retain(|b| !ids.contains(b));
        forget.extend(leaving.iter().filter_map(|b| self.backends.get(b).map(|(bid, _)| *bid)));
        if forget.is_empty() {
            self.forget.remove(&id);
        }
        // What the published table was built from, once it is published: a restart adopts a
        // table only if this says it was built from the same inputs.
        w.set_frontend_meta(
            id,
            &Lb4FrontendMeta::new(digest, &frontend_name(fe)).with_kind(meta_kind(fe.kind)),
        )
        .map_err(|e| write_err(object(), "frontend name", e))?;
        self.write_rows(id, after, w)
            .and_then(|()| self.settle_departures(id, &rows, departures, w))
            .map_err(|e| write_err(object(), "member", e))?;
        self.pending.remove(addr);
        self.forget_affinity(id, w).map_err(|e| write_err(object(), "affinity entries", e))
    }

    /// Forgets the affinity recorded in `forget` for frontend `id`; kept there if that fails.
    fn forget_affinity<W: MapWriter>(&mut self, id: u32, w: &mut W) -> Result<(), W::Error> {
        let Some(left) = self.forget.remove(&id) else { return Ok(()) };
        let ids: Vec<u32> = left.iter().copied().collect();
        w.remove_affinity(id, &ids).inspect_err(|_| {
            self.forget.insert(id, left);
        })
    }

    /// Splits `rows` of frontend `id` into those that may be written before its new table is
    /// published (new rows, and rows that become active) and the downgrades of rows it has.
    fn split_downgrades(&self, id: u32, rows: &Rows) -> (Rows, Rows) {
        let current = self.members.get(&id);
        rows.iter().map(|(b, s)| (*b, *s)).partition(|(b, s)| {
            *s == BackendState::Active
                || current.and_then(|m| m.get(b)).is_none_or(|c| *c != BackendState::Active)
        })
    }

    /// Whether some writes failed and wait for [`Reconciler::retry`]: what a change wanted is not
    /// all in the maps. Tables waiting for a freed region to cool are not counted: they are not
    /// failures, and under steady churn some region may always be cooling.
    pub fn has_failed_writes(&self) -> bool {
        !self.pending.is_empty()
            || !self.unwritten.is_empty()
            || !self.removals.is_empty()
            || !self.touched.is_empty()
            || !self.forget.is_empty()
            || self.src_ranges_stale
    }

    /// The families whose failed writes wait for [`Reconciler::retry`] ([`crate::health::IPV4`],
    /// [`crate::health::IPV6`]): those of the frontends and backends concerned. Affinity to forget
    /// and stale source ranges are counted to both (their rows name no address here). Empty
    /// exactly when [`Reconciler::has_failed_writes`] is false. (The agent's: the masks are
    /// [`crate::health`]'s, which lbctl's build of the library does not have.)
    #[cfg(feature = "agent")]
    pub fn families_behind(&self) -> u8 {
        use crate::health::{IPV4, IPV6};
        let of = |ip: &std::net::IpAddr| if ip.is_ipv6() { IPV6 } else { IPV4 };
        let mut mask = 0;
        for addr in self.pending.iter().chain(self.unwritten.keys()).chain(self.removals.iter()) {
            mask |= of(&addr.vip);
        }
        for b in &self.touched {
            mask |= of(&b.ip);
        }
        if !self.forget.is_empty() || self.src_ranges_stale {
            mask |= IPV4 | IPV6;
        }
        mask
    }

    /// Whether some writes wait for [`Reconciler::retry`]: failed ones, or tables waiting for a
    /// region.
    pub fn has_pending(&self) -> bool {
        self.has_failed_writes() || !self.deferred.is_empty()
    }

    /// Writes again what failed: member rows and recorded names of published tables, tables that
    /// were not published, removals, backend states; and tables that waited for a region once
    /// one may be free. The agent calls it on its sweep tick, so nothing waits for the Service
    /// to change.
    pub fn retry<W: MapWriter>(&mut self, w: &mut W) -> (SyncStats, Vec<SyncError>) {
        // Rows of a frontend whose removal failed are not brought back: it goes.
        let mut todo: BTreeMap<FrontendAddr, Frontend> = self
            .pending
            .iter()
            .filter(|a| !self.removals.contains(a))
            .filter_map(|a| Some((*a, self.frontends.get(a)?.frontend.clone()?)))
            .collect();
        self.pending.retain(|a| self.frontends.get(a).is_some_and(|p| p.frontend.is_some()));
        todo.extend(std::mem::take(&mut self.unwritten));
        // Rows of a published table do not settle a table still waiting for a region: the ones
        // not tried now are kept whatever the pending rows' outcome.
        let mut waiting = BTreeMap::new();
        if self.regions.cooling() == 0 || self.deferred.is_empty() {
            // Deferred frontends wait for a cooling region to free; with none left cooling, what
            // does not fit now is full for good (reported, tried again with its next change).
            todo.extend(std::mem::take(&mut self.deferred));
        } else if self.regions.next_free_at().is_some_and(|at| at <= (self.clock)()) {
            todo.extend(self.deferred.clone());
        } else {
            waiting = self.deferred.clone();
        }
        let removals: Vec<FrontendAddr> = self.removals.iter().copied().collect();
        let (stats, mut errors) = self.apply(todo.iter(), &removals, w);
        for (a, f) in waiting {
            self.deferred.entry(a).or_insert(f);
        }
        // Affinity of a frontend id no longer live is the sweep's to remove (its id is stale).
        if !self.forget.is_empty() {
            let live: HashSet<u32> = self.frontends.values().map(|p| p.id).collect();
            self.forget.retain(|id, _| live.contains(id));
        }
        let ids: Vec<u32> = self.forget.keys().copied().collect();
        for id in ids {
            if let Err(e) = self.forget_affinity(id, w) {
                errors.push(write_err(format!("frontend {id}"), "affinity entries", e));
            }
        }
        (stats, errors)
    }

    /// Starts sweep pass `pass`: tombstones and departures made from now on wait for the pass
    /// after it.
    pub fn begin_pass(&mut self, pass: u64) {
        self.pass = pass;
    }

    /// Ends a sweep pass with what it found: tombstones and departed members made before the pass
    /// began whose flows it did not see are removed, then backends no member row names are freed.
    pub fn release_idle<W: MapWriter>(
        &mut self,
        census: &FlowCensus,
        w: &mut W,
    ) -> (SyncStats, Vec<SyncError>) {
        let mut stats = SyncStats::default();
        let mut errors = Vec::new();
        let idle = |since: u64| since < census.pass;
        // Never a member the frontend's published state still lists.
        let listed: HashSet<(u32, BackendAddr)> = self
            .frontends
            .values()
            .filter_map(|p| Some((p.id, p.frontend.as_ref()?)))
            .flat_map(|(id, fe)| {
                fe.backends.iter().chain(fe.kept.iter().map(|(b, _)| b)).map(move |b| (id, *b))
            })
            .collect();
        let departed: Vec<(u32, BackendAddr)> = self
            .departed
            .iter()
            .filter(|(k, since)| {
                idle(**since) && !listed.contains(k) && !self.member_has_flows(census, k.0, &k.1)
            })
            .map(|(k, _)| *k)
            .collect();
        for (id, b) in departed {
            match self.remove_row(id, &b, w) {
                Ok(()) => {
                    self.departed.remove(&(id, b));
                }
                Err(e) => errors.push(write_err(format!("{b} of frontend {id}"), "member", e)),
            }
        }
        let buried: Vec<(u32, Tombstone)> = self
            .tombstones
            .iter()
            .filter(|(id, t)| idle(t.since) && census.frontend_flows(**id) == 0)
            .map(|(id, t)| (*id, *t))
            .collect();
        let going: HashSet<u32> = buried.iter().map(|(id, _)| *id).collect();
        'tomb: for (id, t) in buried {
            let rows: Vec<BackendAddr> =
                self.members.get(&id).into_iter().flat_map(|m| m.keys().copied()).collect();
            for b in rows {
                if let Err(e) = self.remove_row(id, &b, w) {
                    errors.push(write_err(format!("{b} of frontend {id}"), "member", e));
                    continue 'tomb;
                }
            }
            if let Some(addr) = t.addr {
                // An older tombstone made at this address still has flows: its packets must find
                // an entry there, so the entry becomes its.
                // One whose address is unknown (restored from member rows alone) may be one too.
                let heir = |origin: Option<FrontendAddr>| {
                    self.tombstones
                        .iter()
                        .filter(|(h, ht)| !going.contains(h) && ht.origin == origin && ht.addr.is_none())
                        .map(|(h, _)| *h)
                        .min()
                };
                let heir = heir(Some(addr)).or_else(|| heir(None));
                let ext = |h: u32| self.tombstones.get(&h).is_some_and(|t| t.external);
                let done = match heir {
                    Some(h) => w.set_service(&service_key(&addr), &tombstone_value(h, ext(h))),
                    None => w.remove_service(&service_key(&addr)),
                };
                if let Err(e) = done {
                    errors.push(write_err(addr.to_string(), "service entry", e));
                    continue;
                }
                if let Some(h) = heir.and_then(|h| self.tombstones.get_mut(&h)) {
                    h.addr = Some(addr);
                }
            }
            self.members.remove(&id);
            self.tombstones.remove(&id);
            self.frontend_ids.release(id);
        }
        self.sync_backend_states(w, &mut stats, &mut errors);
        (stats, errors)
    }

    fn member_has_flows(&self, census: &FlowCensus, id: u32, b: &BackendAddr) -> bool {
        self.backends.get(b).is_some_and(|(bid, _)| census.member_flows(id, *bid) > 0)
    }

    fn remove_row<W: MapWriter>(&mut self, id: u32, b: &BackendAddr, w: &mut W) -> Result<(), W::Error> {
        if let Some((bid, _)) = self.backends.get(b).copied() {
            w.remove_member(&MemberKey::of(id, bid, b))?;
        }
        if let Some(m) = self.members.get_mut(&id) {
            m.remove(b);
        }
        if let Some(u) = self.users.get_mut(b) {
            u.remove(&id);
            if u.is_empty() {
                self.users.remove(b);
            }
        }
        self.touched.insert(*b);
        Ok(())
    }

    /// Writes the state of each backend whose member rows changed (ACTIVE if some frontend may
    /// give it new flows, else TERMINATING), and frees backends no row names.
    fn sync_backend_states<W: MapWriter>(
        &mut self,
        w: &mut W,
        stats: &mut SyncStats,
        errors: &mut Vec<SyncError>,
    ) {
        let mut todo: HashSet<BackendAddr> = std::mem::take(&mut self.touched);
        if std::mem::take(&mut self.restore_pending) {
            // Backends restored from the maps that no member row names: no flow can use them.
            todo.extend(self.backends.keys().filter(|a| !self.users.contains_key(a)));
        }
        // In address order: the writes are the same whatever order the rows changed in.
        let mut todo: Vec<BackendAddr> = todo.into_iter().collect();
        todo.sort_unstable();
        for addr in todo {
            let Some((id, state)) = self.backends.get(&addr).copied() else { continue };
            let want = self
                .users
                .get(&addr)
                .and_then(|u| u.values().copied().min_by_key(|s| u8::from(*s != BACKEND_STATE_ACTIVE)));
            let (target, free) = match want {
                Some(s) => (s, false),
                None => (BACKEND_STATE_FREE, true),
            };
            if target == state && !free {
                continue;
            }
            let value = if free { backend_free(&addr) } else { backend_value(&addr, target) };
            match w.set_backend(id, &value) {
                Ok(()) if free => {
                    self.backends.remove(&addr);
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

/// What a restarted agent reads back from the pinned maps.
pub struct Restored<'a> {
    pub services: Vec<(ServiceKey, Lb4Service)>,
    pub backends: Vec<(u32, BackendValue)>,
    pub members: Vec<(MemberKey, MemberValue)>,
    pub src_ranges: Vec<SrcRangeEntry>,
    pub meta: Box<dyn Fn(u32) -> Option<Lb4FrontendMeta> + 'a>,
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

    use lb_common::{BACKEND_STATE_TERMINATING, MEMBER_ACTIVE, MEMBER_DRAINING, MEMBER_SERVING};

    use super::*;
    use crate::model::{BackendState, Frontend, Protocol};

    /// A clock that moves on by a whole grace period each time it is read: a region released
    /// in one sync is free again by the next, as if syncs were seconds apart. The grace period
    /// itself is tested with a clock that stands still (`alloc`'s tests and
    /// `a_republished_table_does_not_reuse_its_old_region_within_the_grace`).
    fn leaping_clock() -> Clock {
        let t = std::sync::atomic::AtomicU64::new(0);
        Box::new(move || t.fetch_add(alloc::REGION_GRACE_MS, std::sync::atomic::Ordering::Relaxed))
    }

    const fn caps(services: u32, backends: u32, maglev_slots: u32) -> Capacities {
        Capacities { services, backends, maglev_slots, ct: 0, affinity: 0, members: 0 }
    }

    impl MemoryMaps {
        /// Every slot of every published table names an active backend that is an active member
        /// of the frontend.
        pub(super) fn assert_consistent(&self) {
            for svc in self.services.values() {
                for slot in svc.maglev_offset..svc.maglev_offset + svc.maglev_size {
                    let id = self.maglev[&slot];
                    assert_eq!(self.backends[&id].state(), BACKEND_STATE_ACTIVE, "slot {slot} -> {id}");
                    let m = self.member_state(svc.id, id);
                    assert_eq!(m, Some(MEMBER_ACTIVE), "member {}/{id}", svc.id);
                }
            }
        }

        /// The state of the row of (`svc_id`, `backend_id`), in either family's map.
        fn member_state(&self, svc_id: u32, backend_id: u32) -> Option<u8> {
            let k = lb_common::Lb4MemberKey { svc_id, backend_id };
            self.members.get(&MemberKey::V4(k)).or(self.members.get(&MemberKey::V6(k))).map(|m| m.state())
        }
    }

    const CAPS: Capacities = caps(16, 16, 2048);
    const OPTS: Options = Options { max_table_size: maglev::DEFAULT_MAX_TABLE_SIZE, maglev_seed: 0 };

    fn be(last: u8) -> BackendAddr {
        BackendAddr { ip: Ipv4Addr::new(10, 244, 0, last).into(), port: 8080, proto: Protocol::Tcp }
    }

    fn frontend(port: u16, last: &[u8], kept: &[(u8, BackendState)], affinity: u32) -> Frontend {
        let addr = FrontendAddr::new(Ipv4Addr::new(10, 96, 0, 1), port, Protocol::Tcp);
        Frontend {
            addr,
            kind: crate::model::FrontendKind::ClusterIp,
            service: "default/s".into(),
            port_name: String::new(),
            backends: last.iter().map(|l| be(*l)).collect(),
            kept: kept.iter().map(|(l, s)| (be(*l), *s)).collect(),
            affinity_timeout_secs: affinity,
            local_only: false,
            two_scopes: false,
            source_ranges: None,
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
        r.sync(d, &BTreeSet::new(), m)
    }

    /// A census of pass `pass` that saw the listed (frontend, backend) flows.
    fn census(pass: u64, flows: &[(u32, u32)]) -> FlowCensus {
        let mut c = FlowCensus::new(pass);
        for (f, b) in flows {
            c.record(*f, *b);
        }
        c
    }

    fn ranged(ranges: Option<&[(u8, u8)]>) -> Frontend {
        Frontend {
            kind: crate::model::FrontendKind::LoadBalancer,
            source_ranges: ranges
                .map(|r| r.iter().map(|(a, len)| (Ipv4Addr::new(*a, 0, 0, 0).into(), *len)).collect()),
            ..frontend(80, &[1], &[], 0)
        }
    }

    /// The log lines of source range writes and service entries, in order.
    fn range_log(m: &MemoryMaps) -> Vec<&str> {
        m.log
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains("source range") || l.starts_with("service"))
            .collect()
    }

    #[test]
    fn source_ranges_are_written_before_the_entry_and_go_deny_first() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        // New, with ranges: its ranges, then its deny entry, then the entry: never published open.
        let (_, e) = sync(&mut r, &one(ranged(Some(&[(10, 8), (192, 8)]))), &mut maps);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            range_log(&maps),
            [
                "source range 10.96.0.1:80/TCP from 10.0.0.0/8 1",
                "source range 10.96.0.1:80/TCP from 192.0.0.0/8 1",
                "source range 10.96.0.1:80/TCP from any 0",
                "service 1 at 0+1021",
            ]
        );
        // Other ranges: the new one in before the old one goes; the deny entry stays.
        maps.log.clear();
        let (_, e) = sync(&mut r, &one(ranged(Some(&[(10, 8), (172, 8)]))), &mut maps);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            range_log(&maps),
            [
                "source range 10.96.0.1:80/TCP from 172.0.0.0/8 1",
                "remove source range 10.96.0.1:80/TCP from 192.0.0.0/8"
            ]
        );
        // A restart adopts what the map holds and writes nothing.
        let mut r2 = Reconciler::restore(CAPS, OPTS, maps.restored());
        maps.log.clear();
        let (_, e) = sync(&mut r2, &one(ranged(Some(&[(10, 8), (172, 8)]))), &mut maps);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(range_log(&maps), Vec::<&str>::new());
        // No ranges any more: the deny entry goes first, so no client is shut out meanwhile.
        maps.log.clear();
        let (_, e) = sync(&mut r, &one(ranged(None)), &mut maps);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            range_log(&maps),
            [
                "remove source range 10.96.0.1:80/TCP from any",
                "remove source range 10.96.0.1:80/TCP from 10.0.0.0/8",
                "remove source range 10.96.0.1:80/TCP from 172.0.0.0/8",
            ]
        );
        assert!(maps.src_ranges.is_empty());
        // Ranges that hold no IPv4 client: the deny entry alone.
        maps.log.clear();
        let (_, e) = sync(&mut r, &one(ranged(Some(&[]))), &mut maps);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(range_log(&maps), ["source range 10.96.0.1:80/TCP from any 0"]);
        // The Service goes: its entry becomes a tombstone, then its ranges go.
        maps.log.clear();
        let (_, e) = sync(&mut r, &BTreeMap::new(), &mut maps);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(range_log(&maps), ["remove source range 10.96.0.1:80/TCP from any"]);
    }

    #[test]
    fn a_frontend_whose_ranges_fail_is_not_published_and_a_failed_removal_is_retried() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        // The deny entry's write fails (the second write, after its range's).
        maps.fail_write = Some(1);
        let (_, e) = sync(&mut r, &one(ranged(Some(&[(10, 8)]))), &mut maps);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(maps.services.is_empty(), "published without its deny entry");
        assert!(r.has_pending());
        maps.fail_write = None;
        let (_, e) = r.retry(&mut maps);
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(maps.src_ranges.len(), 2);
        assert_eq!(maps.services.len(), 1);
        // Its ranges go, and the first removal (the deny entry) fails: the ranges it denies for
        // stay with it, and the next retry removes both.
        maps.fail_write = Some(maps.writes);
        let (_, e) = sync(&mut r, &one(ranged(None)), &mut maps);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(maps.src_ranges.len(), 2);
        assert!(r.has_pending());
        maps.fail_write = None;
        let (_, e) = r.retry(&mut maps);
        assert!(e.is_empty(), "{e:?}");
        assert!(maps.src_ranges.is_empty());
        assert!(!r.has_pending());
    }

    #[test]
    fn tables_and_members_are_written_before_they_are_published_and_regions_are_reused() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        let (s, e) = sync(&mut r, &fe(&[1, 2, 3]), &mut maps);
        assert!(e.is_empty());
        assert_eq!((s.frontends_written, s.backends_written, s.slots_written), (1, 3, 1021));
        assert_eq!(
            maps.log,
            [
                "backend 1 state 1",
                "backend 2 state 1",
                "backend 3 state 1",
                "maglev 0+1021",
                "member 1/1 state 1",
                "member 1/2 state 1",
                "member 1/3 state 1",
                "service 1 at 0+1021"
            ]
        );
        maps.assert_consistent();

        // Unchanged: nothing is written.
        maps.log.clear();
        assert_eq!(sync(&mut r, &fe(&[1, 2, 3]), &mut maps).0, SyncStats::default());
        assert!(maps.log.is_empty());

        // One backend leaves: the new table goes to a free region, the member drains, then the
        // entry moves, then the backend is terminating (its established TCP flows stay).
        let (s, _) = sync(&mut r, &fe(&[1, 3]), &mut maps);
        assert_eq!((s.frontends_written, s.backends_written), (1, 1));
        assert_eq!(
            maps.log,
            ["maglev 1021+1021", "service 1 at 1021+1021", "member 1/2 state 3", "backend 2 state 2"]
        );
        maps.assert_consistent();

        // The first region is free again and is reused. A fresh backend id (4), not the draining 2.
        maps.log.clear();
        sync(&mut r, &fe(&[1, 3, 4]), &mut maps);
        assert_eq!(
            maps.log,
            ["backend 4 state 1", "maglev 0+1021", "member 1/4 state 1", "service 1 at 0+1021"]
        );
        maps.assert_consistent();
        assert_eq!(r.slots_used(), 1021);
    }

    /// A table's old region is not written again while a CPU may still read it: republished
    /// tables, of this frontend or another, go elsewhere until the grace has passed since the
    /// old one was unpublished; then the region is reused.
    #[test]
    fn a_republished_table_does_not_reuse_its_old_region_within_the_grace() {
        use std::sync::{
            atomic::{AtomicU64, Ordering},
            Arc,
        };
        let now = Arc::new(AtomicU64::new(1_000_000));
        let t = now.clone();
        let caps = Capacities { maglev_slots: 1 << 16, ..CAPS };
        let mut r = Reconciler::new(caps, OPTS).with_clock(Box::new(move || t.load(Ordering::Relaxed)));
        let mut maps = MemoryMaps::default();
        sync(&mut r, &fe(&[1, 2, 3]), &mut maps);
        let mut seen = BTreeSet::new();
        // Ten republications within one grace period: every table in a region of its own, none
        // where a table unpublished less than the grace ago was.
        for i in 0..10u64 {
            now.fetch_add(alloc::REGION_GRACE_MS / 20, Ordering::Relaxed);
            maps.log.clear();
            let backends: &[u8] = if i % 2 == 0 { &[1, 3] } else { &[1, 2, 3] };
            sync(&mut r, &fe(backends), &mut maps);
            let at = maps
                .log
                .iter()
                .find(|l| l.starts_with("maglev "))
                .unwrap_or_else(|| panic!("no table written at {i}: {:?}", maps.log))
                .clone();
            let offset: u32 =
                at["maglev ".len()..].split('+').next().expect("offset").parse().expect("number");
            assert!(seen.insert(offset), "region at {offset} written again within the grace: {:?}", maps.log);
            maps.assert_consistent();
        }
        // A grace later, the first freed region (slot 0) is reused.
        now.fetch_add(alloc::REGION_GRACE_MS, Ordering::Relaxed);
        maps.log.clear();
        sync(&mut r, &fe(&[1, 2, 3, 4]), &mut maps);
        assert!(maps.log.iter().any(|l| l.starts_with("maglev 0+")), "{:?}", maps.log);
    }

    /// A table that finds no free region only because freed ones are still in their grace is
    /// not lost: the frontend keeps its published table, and `retry` writes the new one once a
    /// region is free again.
    #[test]
    fn a_table_waiting_for_a_cooling_region_is_written_once_it_is_free() {
        use std::sync::{
            atomic::{AtomicU64, Ordering},
            Arc,
        };
        let now = Arc::new(AtomicU64::new(1_000_000));
        let t = now.clone();
        // Room for two 1,021-slot tables.
        let mut r = Reconciler::new(caps(16, 16, 2_100), OPTS)
            .with_clock(Box::new(move || t.load(Ordering::Relaxed)));
        let mut maps = MemoryMaps::default();
        sync(&mut r, &fe(&[1, 2, 3]), &mut maps);
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        assert!(!r.has_pending());
        // The third table: the first region still cools, the second is in use.
        let (_, errors) = sync(&mut r, &fe(&[1, 2, 4]), &mut maps);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("maglev slot array is full (capacity 2100)"), "{}", errors[0]);
        assert!(r.has_pending(), "deferred, not dropped");
        let before = maps.services.clone();
        // Still cooling: nothing is tried.
        maps.log.clear();
        let (_, errors) = r.retry(&mut maps);
        assert!(errors.is_empty() && maps.log.is_empty(), "{errors:?} {:?}", maps.log);
        assert_eq!(maps.services, before, "the published table stays");
        // A grace later the new table goes in, and nothing waits any more.
        now.fetch_add(alloc::REGION_GRACE_MS, Ordering::Relaxed);
        let (s, errors) = r.retry(&mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(s.frontends_written, 1);
        assert!(maps.log.iter().any(|l| l == "maglev 0+1021"), "{:?}", maps.log);
        assert!(!r.has_pending());
        maps.assert_consistent();
    }

    /// Rows that failed after a table was published are written by `retry` even while a newer
    /// table for the same address still waits for a region, and that table keeps waiting.
    #[test]
    fn pending_rows_are_retried_while_a_newer_table_waits() {
        use std::sync::{
            atomic::{AtomicU64, Ordering},
            Arc,
        };
        let now = Arc::new(AtomicU64::new(1_000_000));
        let t = now.clone();
        let mut r = Reconciler::new(caps(16, 16, 2_100), OPTS)
            .with_clock(Box::new(move || t.load(Ordering::Relaxed)));
        let mut maps = MemoryMaps::default();
        sync(&mut r, &fe(&[1, 2, 3]), &mut maps);
        maps.fail_members = true;
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        assert_eq!(maps.member_state(1, 3), Some(MEMBER_ACTIVE), "the downgrade failed");
        maps.fail_members = false;
        let (_, errors) = sync(&mut r, &fe(&[1, 2, 4]), &mut maps);
        assert!(errors.iter().any(|e| e.to_string().contains("maglev slot array is full")), "{errors:?}");
        let (_, errors) = r.retry(&mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(maps.member_state(1, 3), Some(MEMBER_DRAINING), "the rows were written");
        assert!(r.has_pending(), "the newer table still waits");
        now.fetch_add(alloc::REGION_GRACE_MS, Ordering::Relaxed);
        let (s, errors) = r.retry(&mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(s.frontends_written, 1);
        assert!(!r.has_pending());
        maps.assert_consistent();
    }

    #[test]
    fn a_departed_member_goes_after_a_whole_pass_without_its_flows() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        r.begin_pass(1);
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        sync(&mut r, &fe(&[1]), &mut maps);
        assert_eq!(maps.member_state(1, 2), Some(MEMBER_DRAINING));
        assert_eq!(maps.backends[&2].state(), BACKEND_STATE_TERMINATING);
        assert_eq!(r.departed(), 1);
        // Pass 1 began before it left: it proves nothing, even with no flow seen.
        maps.log.clear();
        r.release_idle(&census(1, &[]), &mut maps);
        r.begin_pass(2);
        assert!(maps.log.is_empty(), "{:?}", maps.log);
        // Pass 2 saw a flow of it: it stays.
        r.release_idle(&census(2, &[(1, 2)]), &mut maps);
        r.begin_pass(3);
        assert!(maps.log.is_empty(), "{:?}", maps.log);
        // Pass 3 saw none: the row goes, then the backend (no row names it).
        let (s, _) = r.release_idle(&census(3, &[(1, 1)]), &mut maps);
        assert_eq!(maps.log, ["remove member 1/2", "backend 2 state 0"]);
        assert_eq!((s.backends_removed, r.departed()), (1, 0));
        assert_eq!(maps.backends[&2].state(), BACKEND_STATE_FREE);

        // A departed member that comes back is active again before any table names it.
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        let mut maps = MemoryMaps::default();
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        sync(&mut r, &fe(&[1]), &mut maps);
        maps.log.clear();
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        assert_eq!(
            maps.log,
            ["backend 2 state 1", "maglev 0+1021", "member 1/2 state 1", "service 1 at 0+1021"]
        );
        assert_eq!(r.departed(), 0);
        maps.assert_consistent();
    }

    #[test]
    fn a_member_departs_only_once_the_table_without_it_is_published() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        r.begin_pass(1);
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        // The new table cannot be published: the old one (with 2) stays in use, so 2 stays an
        // active member and is no departure.
        maps.fail_services = true;
        let (_, errors) = sync(&mut r, &fe(&[1]), &mut maps);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((maps.member_state(1, 2), r.departed()), (Some(MEMBER_ACTIVE), 0));
        r.begin_pass(2);
        r.release_idle(&census(2, &[]), &mut maps);
        assert_eq!(maps.member_state(1, 2), Some(MEMBER_ACTIVE), "a pass without flows frees nothing in use");
        assert_eq!(maps.backends[&2].state(), BACKEND_STATE_ACTIVE);
        maps.assert_consistent();
        // Once it is published, 2 departs.
        maps.fail_services = false;
        let (_, errors) = sync(&mut r, &fe(&[1]), &mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((maps.member_state(1, 2), r.departed()), (Some(MEMBER_DRAINING), 1));
        maps.assert_consistent();
    }

    #[test]
    fn rows_that_fail_after_publishing_are_written_by_the_next_sync() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        maps.fail_members = true;
        let (_, errors) = sync(&mut r, &fe(&[1]), &mut maps);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((maps.member_state(1, 2), r.departed()), (Some(MEMBER_ACTIVE), 0));
        // The same state again: the row is written now, though the frontend did not change.
        maps.fail_members = false;
        let (_, errors) = sync(&mut r, &fe(&[1]), &mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((maps.member_state(1, 2), r.departed()), (Some(MEMBER_DRAINING), 1));
        maps.log.clear();
        sync(&mut r, &fe(&[1]), &mut maps);
        assert!(maps.log.is_empty(), "then nothing: {:?}", maps.log);

        // Without a sync: the agent's retry writes them.
        sync(&mut r, &fe(&[1, 3]), &mut maps);
        maps.fail_members = true;
        sync(&mut r, &fe(&[1]), &mut maps);
        assert_eq!(maps.member_state(1, 3), Some(MEMBER_ACTIVE));
        assert!(r.has_pending());
        maps.fail_members = false;
        let (_, errors) = r.retry(&mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(maps.member_state(1, 3), Some(MEMBER_DRAINING));
        assert!(!r.has_pending());
    }

    #[test]
    fn rows_written_for_a_table_that_was_not_published_are_undone() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        r.begin_pass(1);
        sync(&mut r, &fe(&[1]), &mut maps);
        // 2 joins, but the table with it is never published; then 2 is gone again.
        maps.fail_services = true;
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        assert_eq!(maps.member_state(1, 2), Some(MEMBER_ACTIVE), "written before the entry");
        maps.fail_services = false;
        let (_, errors) = sync(&mut r, &fe(&[1]), &mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        // Its row drains and goes after a pass without flows; the backend is freed.
        assert_eq!((maps.member_state(1, 2), r.departed()), (Some(MEMBER_DRAINING), 1));
        r.begin_pass(2);
        r.release_idle(&census(2, &[]), &mut maps);
        assert_eq!(maps.member_state(1, 2), None);
        assert_eq!(maps.backends[&2].state(), BACKEND_STATE_FREE);
        maps.assert_consistent();
    }

    #[test]
    fn a_member_leaving_the_table_is_downgraded_only_after_the_table_without_it() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        maps.log.clear();
        // 2 turns terminating but serving and 3 joins: 3's row before the table, 2's after.
        sync(&mut r, &one(frontend(80, &[1, 3], &[(2, BackendState::Serving)], 0)), &mut maps);
        assert_eq!(
            maps.log,
            [
                "backend 3 state 1",
                "maglev 1021+1021",
                "member 1/3 state 1",
                "service 1 at 1021+1021",
                "member 1/2 state 2",
                "backend 2 state 2"
            ]
        );
        maps.assert_consistent();
    }

    #[test]
    fn an_older_tombstone_at_the_address_keeps_an_entry_there() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        r.begin_pass(1);
        let key = service_key(&frontend(80, &[], &[], 0).addr);
        // s moves from port 80 to 81 (tombstone 1 at :80 keeps a flow), back to 80 (id 3), and
        // to 81 again (tombstone 3 at :80, no flow).
        sync(&mut r, &fe(&[1]), &mut maps);
        sync(&mut r, &one(frontend(81, &[1], &[], 0)), &mut maps);
        sync(&mut r, &fe(&[1]), &mut maps);
        sync(&mut r, &one(frontend(81, &[1], &[], 0)), &mut maps);
        assert_eq!((maps.services[&key].id, maps.services[&key].flags), (3, SVC_FLAG_TOMBSTONE));
        assert_eq!(r.tombstones(), 3, "1 and 3 made at :80, 2 at :81");
        // A pass finds tombstone 1's flow, none of 3's: 3 goes, and the entry at :80 becomes 1's,
        // so the flow's packets still find it.
        r.begin_pass(2);
        r.release_idle(&census(2, &[(1, 1)]), &mut maps);
        assert_eq!((maps.services[&key].id, maps.services[&key].flags), (1, SVC_FLAG_TOMBSTONE));
        assert_eq!(r.tombstones(), 1);
        // Once its flow is gone too, the entry goes.
        r.begin_pass(3);
        r.release_idle(&census(3, &[]), &mut maps);
        assert!(!maps.services.contains_key(&key));
        assert_eq!(r.tombstones(), 0);
    }

    #[test]
    fn listed_endpoints_keep_their_state() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        // 2 is ready but left out of the table (topology, locality): its flows stay, as a
        // serving endpoint's do; no SYN and no affinity reach it here (only table backends are
        // active members).
        sync(&mut r, &one(frontend(80, &[1], &[(2, BackendState::Active)], 0)), &mut maps);
        assert_eq!(maps.member_state(1, 2), Some(MEMBER_SERVING));
        maps.assert_consistent();
        // 2 is terminating but serving (still listed): its flows stay, it is no departure.
        sync(&mut r, &one(frontend(80, &[1], &[(2, BackendState::Serving)], 0)), &mut maps);
        assert_eq!(maps.backends[&2].state(), BACKEND_STATE_TERMINATING);
        assert_eq!(maps.member_state(1, 2), Some(MEMBER_SERVING));
        assert_eq!(r.departed(), 0);
        // Then not serving.
        sync(&mut r, &one(frontend(80, &[1], &[(2, BackendState::Draining)], 0)), &mut maps);
        assert_eq!(maps.member_state(1, 2), Some(MEMBER_DRAINING));
        // Another frontend uses 2 for new flows: active wins for the backend; each frontend's
        // member row says what its own flows may do.
        let mut both = one(frontend(80, &[1], &[(2, BackendState::Draining)], 0));
        both.extend(one(frontend(81, &[2], &[], 0)));
        sync(&mut r, &both, &mut maps);
        assert_eq!(maps.backends[&2].state(), BACKEND_STATE_ACTIVE);
        assert_eq!(
            (maps.member_state(1, 2), maps.member_state(2, 2)),
            (Some(MEMBER_DRAINING), Some(MEMBER_ACTIVE))
        );
        maps.assert_consistent();
    }

    #[test]
    fn a_removed_frontend_is_a_tombstone_until_a_pass_finds_no_flow_of_it() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        r.begin_pass(1);
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        maps.log.clear();
        let (s, _) = sync(&mut r, &BTreeMap::new(), &mut maps);
        assert_eq!(s.frontends_removed, 1);
        // Members drain before the entry loses its table.
        assert_eq!(
            maps.log,
            [
                "member 1/1 state 3",
                "member 1/2 state 3",
                "tombstone 1",
                "backend 1 state 2",
                "backend 2 state 2"
            ]
        );
        let entry = maps.services.values().next().expect("the tombstone entry");
        assert_eq!(
            (entry.id, entry.backend_count, entry.maglev_size, entry.flags),
            (1, 0, 0, SVC_FLAG_TOMBSTONE)
        );
        assert_eq!((r.tombstones(), r.frontends_programmed(), r.slots_used()), (1, 0, 0));
        r.begin_pass(2);
        r.release_idle(&census(2, &[(1, 2)]), &mut maps);
        r.begin_pass(3);
        assert_eq!(r.tombstones(), 1, "a flow of it is alive");
        maps.log.clear();
        r.release_idle(&census(3, &[]), &mut maps);
        assert_eq!(
            maps.log,
            [
                "remove member 1/1",
                "remove member 1/2",
                "remove service",
                "backend 1 state 0",
                "backend 2 state 0"
            ]
        );
        assert!(maps.services.is_empty() && maps.members.is_empty());
        assert_eq!(r.tombstones(), 0);
        // Its id is free again (fresh ids go first: freed ones come back last).
        let (mut r, mut maps) =
            (Reconciler::new(caps(3, 16, 2048), OPTS).with_clock(leaping_clock()), MemoryMaps::default());
        sync(&mut r, &fe(&[1]), &mut maps);
        sync(&mut r, &BTreeMap::new(), &mut maps);
        r.release_idle(&census(1, &[]), &mut maps);
        sync(&mut r, &one(frontend(81, &[1], &[], 0)), &mut maps);
        let (_, errors) = sync(&mut r, &one(frontend(82, &[1], &[], 0)), &mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        let key = service_key(&frontend(82, &[], &[], 0).addr);
        assert_eq!(maps.services[&key].id, 1, "id 1 again, while id 2 (port 81) is a tombstone");
    }

    #[test]
    fn an_address_taken_by_another_service_gets_a_new_id_and_the_old_flows_keep_theirs() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        // Service t takes the address in one batch, with s's removal listed too (the agent's
        // batches list both): removals first, so t is programmed in this batch.
        let mut t = frontend(80, &[2, 3], &[], 0);
        t.service = "default/t".into();
        let addr = t.addr;
        maps.log.clear();
        let (_, errors) = r.apply([(&addr, &t)], &[addr], &mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        let entry = maps.services[&service_key(&addr)];
        assert_eq!((entry.id, entry.flags), (2, 0), "a new id; the entry is t's");
        // s's flows: frontend 1's members drain; t's: frontend 2's are active. Backend 2 is in
        // both, with each frontend's own row.
        assert_eq!(maps.member_state(1, 2), Some(MEMBER_DRAINING));
        assert_eq!(maps.member_state(2, 2), Some(MEMBER_ACTIVE));
        maps.assert_consistent();
        // The same without the removal listed (a whole sync): the same outcome.
        let mut maps2 = MemoryMaps::default();
        let mut r2 = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r2, &fe(&[1, 2]), &mut maps2);
        sync(&mut r2, &one(t.clone()), &mut maps2);
        assert_eq!(maps2.services[&service_key(&addr)].id, 2);
        // When s's flows are gone its tombstone goes, and the entry (t's now) stays.
        maps.log.clear();
        r.begin_pass(5);
        r.release_idle(&census(6, &[(2, 2)]), &mut maps);
        assert_eq!(maps.log, ["remove member 1/1", "remove member 1/2", "backend 1 state 0"]);
        assert_eq!(maps.services[&service_key(&addr)].id, 2);
        maps.assert_consistent();
    }

    #[test]
    fn affinity_to_a_backend_that_left_is_forgotten() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r, &one(frontend(80, &[1, 2, 3], &[], 30)), &mut maps);
        assert_eq!(maps.services.values().next().expect("one").affinity_timeout_secs, 30);
        assert_eq!(r.affinity_timeouts(), HashMap::from([(1, 30)]));
        maps.log.clear();
        sync(&mut r, &one(frontend(80, &[1, 3], &[], 30)), &mut maps);
        assert!(maps.log.contains(&"forget affinity of 1 to [2]".to_string()), "{:?}", maps.log);
    }

    /// A removal (an incremental change, as in kube mode) whose write fails is tried again by
    /// `retry`, with no other change to bring it; so is a new frontend whose entry could not be
    /// written.
    #[test]
    fn failed_removals_and_writes_are_retried_without_another_change() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        let a = frontend(80, &[1, 2], &[], 0);
        r.apply([(&a.addr, &a)], &[], &mut maps);
        maps.fail_services = true;
        let (_, errors) = r.apply([], &[a.addr], &mut maps);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let b = frontend(81, &[3], &[], 0);
        let (_, errors) = r.apply([(&b.addr, &b)], &[], &mut maps);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(r.has_pending());
        // Still failing: tried, and still waiting.
        let (_, errors) = r.retry(&mut maps);
        assert_eq!(errors.len(), 2, "{errors:?}");
        maps.fail_services = false;
        let (stats, errors) = r.retry(&mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((stats.frontends_removed, stats.frontends_written), (1, 1));
        assert!(!r.has_pending());
        let at = |port| maps.services.get(&service_key(&frontend(port, &[], &[], 0).addr)).copied();
        assert_eq!(at(80).map(|s| s.flags), Some(SVC_FLAG_TOMBSTONE));
        assert_eq!(at(81).map(|s| s.flags), Some(0));
        maps.assert_consistent();

        // A removal that failed is not forgotten by a full sync in which its Service is held:
        // the Service had let that address go.
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        r.apply([(&a.addr, &a)], &[], &mut maps);
        maps.fail_services = true;
        r.apply([], &[a.addr], &mut maps);
        maps.fail_services = false;
        r.sync(&BTreeMap::new(), &BTreeSet::from(["default/s".to_string()]), &mut maps);
        let at = |port| maps.services.get(&service_key(&frontend(port, &[], &[], 0).addr)).copied();
        assert_eq!(at(80).map(|s| s.flags), Some(SVC_FLAG_TOMBSTONE));
        assert!(!r.has_pending());
    }

    /// Affinity that failed to be forgotten is forgotten by `retry`, but never for a backend
    /// that is back in the table meanwhile.
    #[test]
    fn affinity_is_forgotten_by_retry_unless_its_backend_came_back() {
        for back in [false, true] {
            let mut maps = MemoryMaps::default();
            let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
            sync(&mut r, &one(frontend(80, &[1, 2], &[], 30)), &mut maps);
            let id = maps.services.values().next().expect("published").id;
            let b2 = r.backends[&be(2)].0;
            let key = lb_common::Lb4AffinityKey { client: 7, svc_id: id };
            maps.affinity.insert(key, lb_common::Lb4Affinity { last_used_ns: 1, backend_id: b2, _pad: 0 });
            maps.fail_affinity = true;
            let (_, errors) = sync(&mut r, &one(frontend(80, &[1], &[], 30)), &mut maps);
            assert_eq!(errors.len(), 1, "{errors:?}");
            if back {
                sync(&mut r, &one(frontend(80, &[1, 2], &[], 30)), &mut maps);
            }
            maps.fail_affinity = false;
            r.retry(&mut maps);
            assert_eq!(maps.affinity.contains_key(&key), back, "back in the table: {back}");
            assert!(!r.has_pending());
        }
    }

    #[test]
    fn held_services_keep_what_they_had() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        maps.log.clear();
        let held = BTreeSet::from(["default/s".to_string()]);
        r.sync(&BTreeMap::new(), &held, &mut maps);
        assert!(maps.log.is_empty(), "{:?}", maps.log);
        assert_eq!(maps.services.len(), 1);
        // Once it is no longer held and still absent, it goes.
        let (s, _) = sync(&mut r, &BTreeMap::new(), &mut maps);
        assert_eq!(s.frontends_removed, 1);
    }

    fn restore(maps: &MemoryMaps, with_meta: bool) -> Reconciler {
        let restored = maps.restored();
        let restored = if with_meta { restored } else { Restored { meta: Box::new(|_| None), ..restored } };
        Reconciler::restore(CAPS, OPTS, restored).with_clock(leaping_clock())
    }

    #[test]
    fn restore_keeps_ids_and_buries_what_is_no_longer_wanted() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r, &fe(&[1, 2, 3]), &mut maps);
        let ids_before = maps.backends.clone();

        let mut r2 = restore(&maps, true);
        maps.log.clear();
        sync(&mut r2, &fe(&[1, 2, 3]), &mut maps);
        // Same ids for the same backends, and the table is adopted: nothing is written.
        assert_eq!(maps.backends, ids_before);
        assert!(maps.log.is_empty(), "{:?}", maps.log);
        maps.assert_consistent();
        assert_eq!(maps.meta[&1].name(), "default/s");

        // Without the recorded digest the table is rewritten once, into a new region.
        let mut r3 = restore(&maps, false);
        sync(&mut r3, &fe(&[1, 2, 3]), &mut maps);
        assert_eq!(maps.log, ["maglev 1021+1021", "service 1 at 1021+1021"]);
        assert_eq!(maps.backends, ids_before);
        maps.assert_consistent();

        // No longer wanted: a tombstone, its backends terminating (its flows may be alive).
        maps.log.clear();
        let (s, _) = sync(&mut r3, &BTreeMap::new(), &mut maps);
        assert_eq!(s.frontends_removed, 1);
        assert!(maps.services.values().all(|s| s.flags == SVC_FLAG_TOMBSTONE));
        assert!(maps.backends.values().all(|b| b.state() == BACKEND_STATE_TERMINATING), "draining");
        assert_eq!(r3.slots_used(), 0);

        // A restart finds the tombstone as it was, and lets it go after a pass without flows.
        let mut r4 = restore(&maps, true);
        sync(&mut r4, &BTreeMap::new(), &mut maps);
        assert_eq!(r4.tombstones(), 1);
        r4.begin_pass(1);
        r4.release_idle(&census(1, &[]), &mut maps);
        assert!(maps.services.is_empty() && maps.members.is_empty());
        assert!(maps.backends.values().all(|b| b.state() == BACKEND_STATE_FREE));
    }

    /// A frontend per family of one dual-stack Service: each family's rows go to its own maps,
    /// ids are one space, a restart adopts both, and a backend freed is freed in its family's map.
    #[test]
    fn both_families_are_written_to_their_maps_restored_and_released() {
        let v6 = |last: u16| BackendAddr {
            ip: std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, last).into(),
            port: 8080,
            proto: Protocol::Tcp,
        };
        let six = |backends: &[u16]| {
            let addr = FrontendAddr::new(
                std::net::Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 1),
                80,
                Protocol::Tcp,
            );
            Frontend {
                addr,
                backends: backends.iter().map(|l| v6(*l)).collect(),
                ..frontend(80, &[], &[], 0)
            }
        };
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        let mut both = fe(&[1, 2]);
        both.extend(one(six(&[1, 2])));
        let (_, errors) = sync(&mut r, &both, &mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        maps.assert_consistent();
        let families: Vec<bool> = maps.services.keys().map(|k| matches!(k, ServiceKey::V6(_))).collect();
        assert_eq!(families, [false, true], "one entry in each services map");
        let ids: BTreeSet<u32> = maps.services.values().map(|s| s.id).collect();
        assert_eq!(ids.len(), 2, "two frontend ids");
        let v6_backends: Vec<u32> = maps
            .backends
            .iter()
            .filter(|(_, b)| matches!(b, BackendValue::V6(_)))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(v6_backends.len(), 2);
        assert!(maps.members.keys().filter(|k| matches!(k, MemberKey::V6(_))).count() == 2);

        // A restart adopts both families' frontends and backends: nothing is written.
        let before = maps.backends.clone();
        let mut r2 = restore(&maps, true);
        maps.log.clear();
        sync(&mut r2, &both, &mut maps);
        assert!(maps.log.is_empty(), "{:?}", maps.log);
        assert_eq!(maps.backends, before);

        // The IPv6 frontend goes, and after a pass without flows its backends are freed in the
        // IPv6 map; the ids go back to the one pool and serve IPv4 backends next.
        sync(&mut r2, &fe(&[1, 2]), &mut maps);
        r2.begin_pass(1);
        r2.release_idle(&census(1, &[]), &mut maps);
        for id in &v6_backends {
            assert_eq!(
                maps.backends[id],
                BackendValue::V6(lb_common::Lb6Backend::default()),
                "freed in its map"
            );
        }
        assert!(maps.members.keys().all(|k| matches!(k, MemberKey::V4(_))));
        assert_eq!(r2.backends_programmed(), 2, "the IPv6 backends' ids went back to the pool");
        maps.assert_consistent();
    }

    #[test]
    fn after_a_restore_another_service_at_the_address_gets_a_new_id() {
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        let addr = frontend(80, &[], &[], 0).addr;
        // The agent restarts while Service s was replaced by t at the same address.
        let mut t = frontend(80, &[2, 3], &[], 0);
        t.service = "default/t".into();
        let mut r2 = restore(&maps, true);
        let (_, errors) = sync(&mut r2, &one(t.clone()), &mut maps);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(maps.services[&service_key(&addr)].id, 2, "t's flows do not inherit s's id");
        assert_eq!(
            (maps.member_state(1, 2), maps.member_state(2, 2)),
            (Some(MEMBER_DRAINING), Some(MEMBER_ACTIVE))
        );
        assert_eq!(r2.tombstones(), 1);
        maps.assert_consistent();
        // The same Service under another port name keeps its id.
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(CAPS, OPTS).with_clock(leaping_clock());
        sync(&mut r, &fe(&[1, 2]), &mut maps);
        let mut renamed = frontend(80, &[1, 2], &[], 0);
        renamed.port_name = "http".into();
        let mut r2 = restore(&maps, true);
        sync(&mut r2, &one(renamed), &mut maps);
        assert_eq!((maps.services[&service_key(&addr)].id, r2.tombstones()), (1, 0));
    }

    #[test]
    fn a_full_map_fails_that_frontend_only() {
        let mut maps = MemoryMaps::default();
        let caps = caps(16, 3, 2048);
        let mut r = Reconciler::new(caps, OPTS).with_clock(leaping_clock());
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
        let mut r = Reconciler::new(caps(3, 64, 1 << 16), OPTS).with_clock(leaping_clock());
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

        // Maglev slots for one 1,021-slot table only.
        let mut maps = MemoryMaps::default();
        let mut r = Reconciler::new(caps(16, 64, 1100), OPTS).with_clock(leaping_clock());
        let desired: BTreeMap<_, _> = (80..82).flat_map(|p| one(frontend(p, &[1, 2], &[], 0))).collect();
        let (_, errors) = sync(&mut r, &desired, &mut maps);
        assert_eq!(maps.services.len(), 1, "the table that fits is programmed");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("maglev slot array is full"), "{}", errors[0]);
        maps.assert_consistent();
    }
}
