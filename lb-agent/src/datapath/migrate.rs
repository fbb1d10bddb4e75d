//! Taking over from an agent of another pin layout version: a rolling update to a new version, or
//! a rollback to an older one.
//!
//! What every layout shares is the way its links are pinned, `links/<interface>@<program>` under
//! its directory, with the programs named by their role (`lb4_tc_forward`, `lb4_tc_reply`,
//! `lb4_xdp_forward`). A link is a kernel object whose program any agent can replace in one step
//! (BPF_LINK_UPDATE): a packet meets either the old program or the new one, never both and never
//! neither. So the new agent loads its own layout beside the old one, fills it, puts its programs
//! into the old links (moving their pins into its own layout), and only then removes the old
//! layout. Until the swap the old programs keep serving from the old maps.
//!
//! How its maps get filled depends on whether this agent can read the other layout. Each layout
//! records the format of every map that holds state (`LB_FORMATS`, see `lb_common::formats`;
//! layouts from before it are known here by version):
//! - Every format is ours, or one this module converts ([`readable`]): the layout's state is
//!   carried over before the first sync (frontends, backends, memberships, Maglev tables,
//!   frontend records, statistics, session affinity and tracked flows), ids included, so the
//!   reconciler adopts it as after a restart of the same version. This holds for an upgrade from
//!   the layout before ours, and for a rollback from a later one that changed no format. Flows the
//!   old programs start after that copy are copied again just before and just after the links
//!   take our programs ([`carry_flows`]).
//! - Otherwise (a format changed in a later version, a layout too old): nothing is read. The maps
//!   are filled from the source as on a first start, and established flows continue because the
//!   datapath picks a TCP flow up mid-stream, and re-chooses a UDP flow, on the same Maglev table
//!   (the tables depend only on the backends' names). What cannot be recomputed is lost: a
//!   client's session affinity, a source port given to a flow whose tuple clashed, and a flow
//!   whose first packet after the swap is a reply (a request in flight at that moment).
//!
//! An agent older than this module refuses to start while another layout is pinned, leaving the
//! newer datapath in place and serving: it never adds its programs beside it.

use std::path::{Path, PathBuf};

use aya::maps::{lpm_trie::LpmTrie, Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    formats, Lb4Affinity, Lb4AffinityKey, Lb4Backend, Lb4CtEntry, Lb4CtKey, Lb4FrontendMeta, Lb4Member,
    Lb4MemberKey, Lb4Service, Lb4ServiceKey, Lb4SrcRange, Lb4SvcStats, MAP_LB4_AFFINITY, MAP_LB4_BACKENDS,
    MAP_LB4_CT, MAP_LB4_FE_META, MAP_LB4_MAGLEV, MAP_LB4_MEMBERS, MAP_LB4_SERVICES, MAP_LB4_SRC_RANGES,
    MAP_LB4_SVC_STATS, MAP_LB_FORMATS, PIN_LAYOUT_VERSION,
};

use super::{
    maglev_slots::MaglevSlots,
    maps::{map_err, reply_ports},
    DatapathError, Maps,
};

/// A layout of another version found under the pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub version: u32,
    pub dir: PathBuf,
    /// The format of each of `lb_common::formats::MAPS` in it, if known.
    pub formats: Option<[u32; formats::MAPS.len()]>,
}

impl Layout {
    /// `v<version>`, as its directory is named.
    pub fn name(&self) -> String {
        format!("v{}", self.version)
    }

    /// Whether this agent can read the layout's state (see the module documentation).
    pub fn readable(&self) -> bool {
        self.formats.is_some_and(|f| readable(&f))
    }

    /// Whether any of its links is still pinned, or a netlink filter recorded (serving).
    pub fn has_links(&self) -> bool {
        std::fs::read_dir(self.dir.join("links")).is_ok_and(|mut d| d.next().is_some())
            || super::tc_filters::any_recorded(&self.dir)
    }

    /// The pin of its link of `prog` on `interface`, if there is one.
    pub fn link_pin(&self, interface: &str, prog: &str) -> Option<PathBuf> {
        let pin = self.dir.join("links").join(super::link_pin_name(interface, prog));
        pin.exists().then_some(pin)
    }
}

/// Where in `formats::MAPS` the frontends, their records and the tracked flows are.
const SERVICES: usize = 0;
const FE_META: usize = 4;
const CT: usize = 7;
const SRC_RANGES: usize = 8;
const _: () = assert!(matches!(formats::MAPS[SERVICES].as_bytes(), b"LB4_SERVICES"));
const _: () = assert!(matches!(formats::MAPS[FE_META].as_bytes(), b"LB4_FE_META"));
const _: () = assert!(matches!(formats::MAPS[CT].as_bytes(), b"LB4_CT"));
const _: () = assert!(matches!(formats::MAPS[SRC_RANGES].as_bytes(), b"LB4_SRC_RANGES"));

/// Whether every map in `theirs` is in our format or one converted here: `LB4_CT` formats 1
/// (layout 6) and 2 (layout 7); `LB4_SERVICES` and `LB4_FE_META` format 1 (layouts 6 and 7:
/// the key's `scope` and the record's `kind` were padding, always 0, which is `SCOPE_EXTERNAL`
/// and `FRONTEND_KIND_CLUSTER_IP`: read as they are); no `LB4_SRC_RANGES` (0: layouts before 8,
/// which left LoadBalancer IPs with source ranges untranslated). A format change adds its
/// converter here.
pub fn readable(theirs: &[u32; formats::MAPS.len()]) -> bool {
    theirs.iter().zip(formats::CURRENT).enumerate().all(|(i, (&t, ours))| {
        t == ours
            || (i == CT && (t == 1 || t == 2))
            || ((i == SERVICES || i == FE_META) && t == 1)
            || (i == SRC_RANGES && t == 0)
    })
}

/// The formats of layouts by version (those from before `LB_FORMATS` are known only so).
fn known_formats(version: u32) -> Option<[u32; formats::MAPS.len()]> {
    match version {
        6 => Some([1, 1, 1, 1, 1, 1, 1, 1, 0]),
        7 => Some([1, 1, 1, 1, 1, 1, 1, 2, 0]),
        8 => Some([2, 1, 1, 1, 2, 1, 1, 3, 1]),
        _ => None,
    }
}

/// The formats layout `dir` (version `version`) records, or those known for its version.
fn formats_of(dir: &Path, version: u32) -> Option<[u32; formats::MAPS.len()]> {
    let Ok(data) = MapData::from_pin(dir.join(MAP_LB_FORMATS)) else { return known_formats(version) };
    let map = Map::from_map_data(data).ok()?;
    let recorded: Array<MapData, u32> = map.try_into().ok()?;
    let mut f = [0; formats::MAPS.len()];
    for (i, slot) in f.iter_mut().enumerate() {
        *slot = recorded.get(&(i as u32), 0).ok()?;
    }
    // A map of a later version that holds state we would not carry: not readable.
    let more = (f.len() as u32..recorded.len()).any(|i| recorded.get(&i, 0).map_or(true, |v| v != 0));
    (!more).then_some(f)
}

/// Every other layout under `pin_dir`, newest first.
pub fn others(pin_dir: &Path) -> Vec<Layout> {
    let mut found: Vec<Layout> = std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.strip_prefix('v')?.parse::<u32>().ok()?;
            if version == PIN_LAYOUT_VERSION || !e.path().is_dir() {
                return None;
            }
            Some(Layout { version, formats: formats_of(&e.path(), version), dir: e.path() })
        })
        .collect();
    found.sort_by_key(|l| std::cmp::Reverse(l.version));
    found
}

/// The layout whose state is carried: the newest readable one, if any.
pub fn source(others: &[Layout]) -> Option<&Layout> {
    others.iter().find(|l| l.readable())
}

/// Layout v6's tracked-flow entry: v7 replaced `created_ns` with `created_s` and added
/// `snat_port` (same size: a byte copy would read the creation time as the last-seen time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntryV6 {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub nat_addr: u32,
    pub nat_port: u16,
    pub state: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntryV6>() == 32);
// SAFETY: repr(C) of plain integers with no padding (asserted 32 bytes: 8+8+4+2+1+1+4+4).
unsafe impl aya::Pod for CtEntryV6 {}

impl From<CtEntryV6> for CtEntryV7 {
    /// v6 flows never had another source port: 0 keeps the client's. Both versions' clocks are
    /// CLOCK_MONOTONIC (v7 reads it coarse), so times carry as they are.
    fn from(e: CtEntryV6) -> Self {
        Self {
            last_seen_ns: e.last_seen_ns,
            created_s: (e.created_ns / 1_000_000_000) as u32,
            snat_port: 0,
            _pad: 0,
            nat_addr: e.nat_addr,
            nat_port: e.nat_port,
            state: e.state,
            flags: e.flags,
            backend_id: e.backend_id,
            svc_id: e.svc_id,
        }
    }
}

impl From<CtEntryV6> for Lb4CtEntry {
    fn from(e: CtEntryV6) -> Self {
        CtEntryV7::from(e).into()
    }
}

/// Layout v7's tracked-flow entry: v8 added `snat_addr` (and grew to 40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntryV7 {
    pub last_seen_ns: u64,
    pub created_s: u32,
    pub snat_port: u16,
    pub _pad: u16,
    pub nat_addr: u32,
    pub nat_port: u16,
    pub state: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntryV7>() == 32);
// SAFETY: repr(C) of plain integers with explicit padding (asserted 32 bytes: 8+4+2+2+4+2+1+1+4+4).
unsafe impl aya::Pod for CtEntryV7 {}

impl From<CtEntryV7> for Lb4CtEntry {
    /// v7 flows all came from pods: none was SNATed to the node's address.
    fn from(e: CtEntryV7) -> Self {
        Self {
            last_seen_ns: e.last_seen_ns,
            created_s: e.created_s,
            snat_port: e.snat_port,
            _pad: 0,
            nat_addr: e.nat_addr,
            nat_port: e.nat_port,
            state: e.state,
            flags: e.flags,
            backend_id: e.backend_id,
            svc_id: e.svc_id,
            snat_addr: 0,
            _pad1: 0,
        }
    }
}

/// What became of other layouts' state at start.
#[derive(Debug)]
pub enum Outcome {
    /// No other layout is pinned.
    NoOther,
    /// Our own layout's programs ran before (an agent of this version was here after the other
    /// layout's): our maps are kept.
    OursRan,
    /// No other layout is readable: our maps are filled from the source.
    Unreadable,
    Carried(Layout, Carried),
    /// Our maps are too small for its ids: filled from the source.
    TooSmall(Layout, TooSmall),
}

/// A take-over of another layout's links with its flows (`Datapath::take_over_carried`).
#[derive(Debug)]
pub struct TakeOver {
    pub from: Layout,
    /// What its table's last copy gave.
    pub copied: Result<Carried, DatapathError>,
    /// Packets held back meanwhile (that would have started a flow).
    pub held: u64,
}

/// What was carried from another layout, and what could not be.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Carried {
    pub services: usize,
    pub backends: usize,
    pub flows: usize,
    pub affinity: usize,
    /// Entries that could not be written (our map refused them); the datapath recomputes them.
    pub failed: usize,
    /// Writes tried again because the kernel had no memory for a new element at that moment.
    pub retried: usize,
}

/// How many times one write that failed for lack of memory is tried in all.
const ENOMEM_TRIES: u32 = 6;
/// Retries a whole take-over may make (at most 31 ms of pauses each: under 7 s in all), so that a
/// node out of memory stops the agent soon, the other layout still serving, rather than after a
/// retry of every entry.
const ENOMEM_RETRIES: usize = 200;

/// Runs `write`, and again while it fails with ENOMEM, up to [`ENOMEM_TRIES`] times, pausing 1, 2,
/// 4 ... ms between, while `retried` (the take-over's count) is under [`ENOMEM_RETRIES`]. The hash
/// maps only the agent writes are not preallocated: since Linux 6.1 their elements come from a
/// per-CPU cache that is refilled in the background without reclaim, so a burst of inserts (as
/// here, thousands in a row) can find it empty for a moment. Any other error, or the last ENOMEM,
/// is returned as it came.
fn retry_enomem<T>(
    retried: &mut usize,
    mut write: impl FnMut() -> Result<T, MapError>,
) -> Result<T, MapError> {
    let mut pause = std::time::Duration::from_millis(1);
    let mut tries = 1;
    loop {
        match write() {
            Err(MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOMEM)
                    && tries < ENOMEM_TRIES
                    && *retried < ENOMEM_RETRIES =>
            {
                *retried += 1;
                tries += 1;
                std::thread::sleep(pause);
                pause *= 2;
            }
            done => return done,
        }
    }
}

fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &'static str) -> Result<T, DatapathError> {
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    T::try_from(Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
}

fn max_entries(data: &MapData, name: &'static str) -> Result<u32, DatapathError> {
    Ok(data.info().map_err(map_err(name))?.max_entries())
}

/// What layout `from` holds does not fit our maps (capacities were lowered in the same update):
/// in `map`, it needs `theirs` where ours has `ours`. Its state is then not carried.
#[derive(Debug)]
pub struct TooSmall {
    pub map: &'static str,
    pub theirs: u32,
    pub ours: u32,
}

/// Copies layout `from`'s state into `maps` (ours, new: our programs have not run): everything
/// the reconciler restores from, and the flows and affinity the datapath keeps. `Ok(Err(_))` when
/// what it holds does not fit our maps: nothing is copied then.
pub fn carry_state(from: &Layout, maps: &mut Maps) -> Result<Result<Carried, TooSmall>, DatapathError> {
    debug_assert!(from.readable());
    let dir = &from.dir;
    let services: HashMap<MapData, Lb4ServiceKey, Lb4Service> = open(dir, MAP_LB4_SERVICES)?;
    let backends: Array<MapData, Lb4Backend> = open(dir, MAP_LB4_BACKENDS)?;
    let members: HashMap<MapData, Lb4MemberKey, Lb4Member> = open(dir, MAP_LB4_MEMBERS)?;
    let meta: Array<MapData, Lb4FrontendMeta> = open(dir, MAP_LB4_FE_META)?;
    let stats: PerCpuArray<MapData, Lb4SvcStats> = open(dir, MAP_LB4_SVC_STATS)?;
    let data = MapData::from_pin(dir.join(MAP_LB4_MAGLEV)).map_err(map_err(MAP_LB4_MAGLEV))?;
    let maglev = match Map::from_map_data(data).map_err(map_err(MAP_LB4_MAGLEV))? {
        Map::Array(data) => MaglevSlots::map(data, false)?,
        _ => return Err(DatapathError::MissingMap(MAP_LB4_MAGLEV)),
    };
    let services: Vec<(Lb4ServiceKey, Lb4Service)> =
        services.iter().collect::<Result<_, _>>().map_err(map_err(MAP_LB4_SERVICES))?;
    let members: Vec<(Lb4MemberKey, Lb4Member)> =
        members.iter().collect::<Result<_, _>>().map_err(map_err(MAP_LB4_MEMBERS))?;
    let mut used_backends = Vec::new();
    for id in 0..backends.len() {
        let b = backends.get(&id, 0).map_err(map_err(MAP_LB4_BACKENDS))?;
        if b.state != lb_common::BACKEND_STATE_FREE {
            used_backends.push((id, b));
        }
    }
    // What must fit: the entries of the hash maps, and the highest id in use of the arrays
    // (capacities differ between layouts: frontend records followed --max-services only from
    // layout 7).
    let fe_ids = services.iter().map(|(_, s)| s.id).chain(members.iter().map(|(k, _)| k.svc_id));
    let fe_end = fe_ids.max().map_or(0, |id| id + 1);
    let be_end = used_backends.iter().map(|(id, _)| *id).chain(members.iter().map(|(k, _)| k.backend_id));
    let be_end = be_end.max().map_or(0, |id| id + 1);
    let slots_end =
        services.iter().map(|(_, s)| s.maglev_offset.saturating_add(s.maglev_size)).max().unwrap_or(0);
    let needs = [
        (MAP_LB4_SERVICES, services.len() as u32, max_entries(maps.services.map(), MAP_LB4_SERVICES)?),
        (MAP_LB4_MEMBERS, members.len() as u32, max_entries(maps.members.map(), MAP_LB4_MEMBERS)?),
        (MAP_LB4_BACKENDS, be_end, maps.backends.len()),
        (MAP_LB4_FE_META, fe_end, maps.meta.len()),
        (MAP_LB4_SVC_STATS, fe_end, maps.svc_stats.len()),
        (MAP_LB4_MAGLEV, slots_end, maps.maglev.slots()),
    ];
    if let Some((map, theirs, ours)) = needs.into_iter().find(|(_, theirs, ours)| theirs > ours) {
        return Ok(Err(TooSmall { map, theirs, ours }));
    }
    let mut carried = Carried::default();
    // The Maglev tables first and the frontends last, as the reconciler writes them.
    maps.maglev.copy_from(&maglev, slots_end).map_err(map_err(MAP_LB4_MAGLEV))?;
    for (id, b) in used_backends {
        maps.backends.set(id, b, 0).map_err(map_err(MAP_LB4_BACKENDS))?;
        carried.backends += 1;
    }
    for (k, v) in members {
        retry_enomem(&mut carried.retried, || maps.members.insert(k, v, 0))
            .map_err(map_err(MAP_LB4_MEMBERS))?;
    }
    for id in 0..fe_end.min(meta.len()) {
        let m = meta.get(&id, 0).map_err(map_err(MAP_LB4_FE_META))?;
        if m != Lb4FrontendMeta::default() {
            maps.meta.set(id, m, 0).map_err(map_err(MAP_LB4_FE_META))?;
        }
    }
    for id in 0..fe_end.min(stats.len()) {
        let s = stats.get(&id, 0).map_err(map_err(MAP_LB4_SVC_STATS))?;
        if s.iter().any(|s| *s != Lb4SvcStats::default()) {
            maps.svc_stats.set(id, s, 0).map_err(map_err(MAP_LB4_SVC_STATS))?;
        }
    }
    // Source ranges before the frontends they filter.
    if from.formats.is_some_and(|f| f[SRC_RANGES] == formats::CURRENT[SRC_RANGES]) {
        let theirs: LpmTrie<MapData, Lb4SrcRange, u32> = open(dir, MAP_LB4_SRC_RANGES)?;
        for k in theirs.keys() {
            let k = k.map_err(map_err(MAP_LB4_SRC_RANGES))?;
            let v = theirs.get(&k, 0).map_err(map_err(MAP_LB4_SRC_RANGES))?;
            retry_enomem(&mut carried.retried, || maps.src_ranges.insert(&k, v, 0))
                .map_err(map_err(MAP_LB4_SRC_RANGES))?;
        }
    }
    for (k, v) in services {
        retry_enomem(&mut carried.retried, || maps.services.insert(k, v, 0))
            .map_err(map_err(MAP_LB4_SERVICES))?;
        carried.services += 1;
    }
    let flows = carry_flows(from, maps)?;
    carried.flows = flows.flows;
    carried.affinity = flows.affinity;
    carried.failed = flows.failed;
    Ok(Ok(carried))
}

/// Copies layout `from`'s tracked flows and session affinity into `maps`, converted: each entry
/// ours does not have, or has from longer ago (its last packet, or last use, older than theirs:
/// the other layout's programs kept it going since it was copied).
pub fn carry_flows(from: &Layout, maps: &mut Maps) -> Result<Carried, DatapathError> {
    let mut c = Carried::default();
    let seen = |e: &Lb4CtEntry| e.last_seen_ns;
    // The reply entries' backend ports go into our port filter before the entries: a flow
    // whose backend has left has no row that put its port there.
    fn note<V: aya::Pod>(ct: &HashMap<MapData, Lb4CtKey, V>, maps: &mut Maps) -> Result<(), DatapathError> {
        let mut ports = Vec::new();
        let whole = reply_ports(ct, &mut ports);
        maps.note_reply_ports(ports)?;
        // A walk that may have missed one: the filter is off until the next start.
        if whole {
            Ok(())
        } else {
            maps.disarm_ports()
        }
    }
    match from.formats.map(|f| f[CT]) {
        Some(1) => {
            let ct: HashMap<MapData, Lb4CtKey, CtEntryV6> = open(&from.dir, MAP_LB4_CT)?;
            note(&ct, maps)?;
            copy_newer(&ct, &mut maps.ct, Lb4CtEntry::from, seen, &mut c.flows, &mut c.failed);
        }
        Some(2) => {
            let ct: HashMap<MapData, Lb4CtKey, CtEntryV7> = open(&from.dir, MAP_LB4_CT)?;
            note(&ct, maps)?;
            copy_newer(&ct, &mut maps.ct, Lb4CtEntry::from, seen, &mut c.flows, &mut c.failed);
        }
        _ => {
            let ct: HashMap<MapData, Lb4CtKey, Lb4CtEntry> = open(&from.dir, MAP_LB4_CT)?;
            note(&ct, maps)?;
            copy_newer(&ct, &mut maps.ct, |e| e, seen, &mut c.flows, &mut c.failed);
        }
    }
    let affinity: HashMap<MapData, Lb4AffinityKey, Lb4Affinity> = open(&from.dir, MAP_LB4_AFFINITY)?;
    copy_newer(&affinity, &mut maps.affinity, |a| a, |a| a.last_used_ns, &mut c.affinity, &mut c.failed);
    // An LRU map evicts rather than refuse: what did not fit is gone from ours.
    let room = |m: &MapData, name| max_entries(m, name).map(|n| n as usize);
    c.failed += c.flows.saturating_sub(room(maps.ct.map(), MAP_LB4_CT)?);
    c.failed += c.affinity.saturating_sub(room(maps.affinity.map(), MAP_LB4_AFFINITY)?);
    Ok(c)
}

/// Copies every entry of `from`, converted by `convert`, that `to` lacks or holds with an older
/// `time`; counts those copied and those `to` refused.
fn copy_newer<K: aya::Pod, V: aya::Pod, W: aya::Pod>(
    from: &HashMap<MapData, K, V>,
    to: &mut HashMap<MapData, K, W>,
    convert: impl Fn(V) -> W,
    time: impl Fn(&W) -> u64,
    copied: &mut usize,
    failed: &mut usize,
) {
    // Keys first: a map iterated while the datapath changes it may skip or repeat, never fail.
    for key in from.keys().filter_map(Result::ok).collect::<Vec<_>>() {
        let Ok(v) = from.get(&key, 0) else { continue };
        let theirs = convert(v);
        if to.get(&key, 0).is_ok_and(|ours| time(&ours) >= time(&theirs)) {
            continue;
        }
        match to.insert(key, theirs, 0) {
            Ok(()) => *copied += 1,
            Err(_) => *failed += 1,
        }
    }
}

/// Removes layout `l`: unpinning its links detaches whatever program they still hold; its maps go
/// once no program uses them.
pub fn remove(l: &Layout) -> std::io::Result<()> {
    // Its netlink filters on interfaces we do not attach to (those we do are ours now, their
    // records moved).
    if let Some(mut records) = super::tc_filters::open(&l.dir) {
        super::tc_filters::detach_all(&mut records).map_err(|left| std::io::Error::other(left.join("; ")))?;
    }
    let links = l.dir.join("links");
    for e in std::fs::read_dir(&links).into_iter().flatten().flatten() {
        std::fs::remove_file(e.path())?;
    }
    let _ = std::fs::remove_dir(&links);
    for e in std::fs::read_dir(&l.dir)?.flatten() {
        std::fs::remove_file(e.path())?;
    }
    std::fs::remove_dir(&l.dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(errno: i32) -> MapError {
        aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        }
        .into()
    }

    #[test]
    fn a_write_short_of_memory_is_tried_again_and_any_other_error_is_not() {
        let errno = |r: &Result<(), MapError>| match r {
            Err(MapError::SyscallError(e)) => e.io_error.raw_os_error(),
            _ => None,
        };
        // Short of memory twice, then written.
        let (mut retried, mut calls) = (0, 0);
        let done = retry_enomem(&mut retried, || {
            calls += 1;
            if calls <= 2 {
                Err(failed(libc::ENOMEM))
            } else {
                Ok(calls)
            }
        });
        assert_eq!((done.ok(), retried), (Some(3), 2));

        // Short of memory every time: tried ENOMEM_TRIES times, the last error returned.
        let (mut retried, mut calls) = (0, 0);
        let done = retry_enomem(&mut retried, || {
            calls += 1;
            Err(failed(libc::ENOMEM))
        });
        assert_eq!(errno(&done), Some(libc::ENOMEM));
        assert_eq!((calls, retried), (ENOMEM_TRIES, ENOMEM_TRIES as usize - 1));

        // The take-over's retries are spent: one more, then no more.
        let (mut retried, mut calls) = (ENOMEM_RETRIES - 1, 0);
        let done = retry_enomem(&mut retried, || {
            calls += 1;
            Err(failed(libc::ENOMEM))
        });
        assert_eq!(errno(&done), Some(libc::ENOMEM));
        assert_eq!((calls, retried), (2, ENOMEM_RETRIES));

        // Any other error at once, as it came, not counted.
        for want in [libc::E2BIG, libc::EEXIST, libc::EPERM] {
            let (mut retried, mut calls) = (0, 0);
            let done = retry_enomem(&mut retried, || {
                calls += 1;
                Err(failed(want))
            });
            assert_eq!(errno(&done), Some(want));
            assert_eq!((calls, retried), (1, 0), "errno {want}");
        }
    }

    #[test]
    fn a_v6_flow_keeps_its_backend_times_and_state() {
        let old = CtEntryV6 {
            created_ns: 1_234 * 1_000_000_000 + 999_999_999,
            last_seen_ns: 5_678_000_000_123,
            nat_addr: u32::from_ne_bytes([10, 244, 0, 9]),
            nat_port: 8080u16.to_be(),
            state: lb_common::CT_STATE_ESTABLISHED,
            flags: lb_common::CT_FLAG_HAIRPIN,
            backend_id: 7,
            svc_id: 3,
        };
        let new = Lb4CtEntry::from(old);
        assert_eq!(new.last_seen_ns, old.last_seen_ns);
        assert_eq!(new.created_s, 1_234);
        assert_eq!((new.snat_port, new._pad), (0, 0));
        assert_eq!((new.nat_addr, new.nat_port), (old.nat_addr, old.nat_port));
        assert_eq!((new.state, new.flags, new.backend_id, new.svc_id), (old.state, old.flags, 7, 3));
        assert_eq!(new.snat_addr, 0);
    }

    #[test]
    fn a_v7_flow_keeps_every_field_and_has_no_node_snat() {
        let old = CtEntryV7 {
            last_seen_ns: 5_678_000_000_123,
            created_s: 1_234,
            snat_port: 61_500u16.to_be(),
            _pad: 0,
            nat_addr: u32::from_ne_bytes([10, 244, 0, 9]),
            nat_port: 8080u16.to_be(),
            state: lb_common::CT_STATE_SYN,
            flags: lb_common::CT_FLAG_FIN_CLIENT,
            backend_id: 7,
            svc_id: 3,
        };
        let new = Lb4CtEntry::from(old);
        assert_eq!(
            (new.last_seen_ns, new.created_s, new.snat_port),
            (old.last_seen_ns, 1_234, old.snat_port)
        );
        assert_eq!((new.nat_addr, new.nat_port), (old.nat_addr, old.nat_port));
        assert_eq!((new.state, new.flags, new.backend_id, new.svc_id), (old.state, old.flags, 7, 3));
        assert_eq!((new.snat_addr, new._pad, new._pad1), (0, 0, 0));
    }

    #[test]
    fn the_newest_readable_layout_is_carried_and_the_rest_only_taken_over() {
        let dir = std::env::temp_dir().join(format!("lb-layouts-{}", std::process::id()));
        for v in ["v3", "v6", &format!("v{PIN_LAYOUT_VERSION}"), "v99", "vx", "links"] {
            std::fs::create_dir_all(dir.join(v)).expect("dir");
        }
        std::fs::write(dir.join("v5"), b"").expect("a file is no layout");
        let found = others(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let names: Vec<String> = found.iter().map(Layout::name).collect();
        assert_eq!(names, ["v99", "v6", "v3"]);
        // Off bpffs nothing records formats: only versions known here have them.
        assert_eq!(found.iter().map(|l| l.formats.is_some()).collect::<Vec<_>>(), [false, true, false]);
        assert_eq!(source(&found).map(Layout::name).as_deref(), Some("v6"));
        assert!(source(&found[..1]).is_none());
    }

    #[test]
    fn a_layout_is_readable_when_every_format_is_ours_or_converted() {
        let ours = formats::CURRENT;
        assert!(readable(&ours));
        assert_eq!(
            known_formats(PIN_LAYOUT_VERSION),
            Some(ours),
            "this version's formats are known by version too"
        );
        assert!(readable(&known_formats(6).expect("v6")));
        assert!(readable(&known_formats(7).expect("v7")));
        for i in 0..ours.len() {
            let mut newer = ours;
            newer[i] += 1;
            assert!(!readable(&newer), "a newer format of {} is not readable", formats::MAPS[i]);
        }
        let mut older_ct = ours;
        older_ct[CT] = 0;
        assert!(!readable(&older_ct));
    }
}
