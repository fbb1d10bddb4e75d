//! Typed handles on every datapath map, the readers `lbctl` and the metrics use, and the
//! [`MapWriter`] the reconciler writes through.
//!
//! One table of the pinned maps: `lb_common::PINNED_MAPS`. The handles are made from it whether
//! the maps come from the loaded object or from their pins, and they are pinned again from it.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray,
};
use lb_common::{
    counters, Lb4Affinity, Lb4AffinityKey, Lb4Backend, Lb4CtEntry, Lb4CtKey, Lb4FrontendMeta, Lb4Member,
    Lb4MemberKey, Lb4Service, Lb4ServiceKey, Lb4SrcRange, Lb4SvcStats, Lb6AffinityKey, Lb6Backend,
    Lb6CtEntry, Lb6CtKey, Lb6Member, Lb6ServiceKey, MAP_LB4_AFFINITY, MAP_LB4_BACKENDS, MAP_LB4_CT,
    MAP_LB4_FE_META, MAP_LB4_FRAGS, MAP_LB4_MAGLEV, MAP_LB4_MEMBERS, MAP_LB4_SERVICES, MAP_LB4_SRC_RANGES,
    MAP_LB4_SVC_STATS, MAP_LB6_AFFINITY, MAP_LB6_BACKENDS, MAP_LB6_CT, MAP_LB6_MEMBERS, MAP_LB6_SERVICES,
    MAP_LB_COUNTERS, MAP_LB_EVENTS, MAP_LB_FORMATS, MAP_LB_MONITOR, MAP_LB_MON_RATE, MAP_LB_PORTS,
    MAP_LB_TC_FILTERS, PINNED_MAPS, PORTS_ARMED, PORTS_BACKEND, PORTS_FRONTEND,
};

use super::{
    maglev_slots::MaglevSlots,
    pins::{layout_dir, not_on_bpffs, obj_get_read_only, other_layouts},
    DatapathError,
};
use crate::reconcile::{
    BackendValue, CtKey, FlowTable, MapWriter, MemberKey, MemberValue, ServiceKey, SrcRangeEntry, SrcRangeKey,
};

/// Typed handles to every datapath map.
pub struct Maps {
    pub services: HashMap<MapData, Lb4ServiceKey, Lb4Service>,
    pub backends: Array<MapData, Lb4Backend>,
    pub maglev: MaglevSlots,
    pub ct: HashMap<MapData, Lb4CtKey, Lb4CtEntry>,
    pub counters: PerCpuArray<MapData, u64>,
    pub svc_stats: PerCpuArray<MapData, Lb4SvcStats>,
    pub affinity: HashMap<MapData, Lb4AffinityKey, Lb4Affinity>,
    pub meta: Array<MapData, Lb4FrontendMeta>,
    pub members: HashMap<MapData, Lb4MemberKey, Lb4Member>,
    /// `[0]`: non-zero while the datapath sends flow events (`--flow-events`).
    pub monitor: Array<MapData, u32>,
    pub src_ranges: LpmTrie<MapData, Lb4SrcRange, u32>,
    /// The IPv6 maps (`lb_common::maps6`). A reader of pins an agent before them left has none;
    /// an agent's own handles always have them.
    pub v6: Option<Maps6>,
    /// `LB_PORTS`, with the words it holds (an agent's handles; readers have none).
    ports: Option<Ports>,
    /// The maps userspace never reads or writes here (the event ring, the monitor's rate buckets,
    /// the fragment map, the formats and SNAT ranges written at load, the socket programs' maps),
    /// kept so that they can be pinned again. Read-only handles leave them closed.
    others: Vec<(&'static str, Map)>,
}

/// Typed handles to the IPv6 maps that hold an address.
pub struct Maps6 {
    pub services: HashMap<MapData, Lb6ServiceKey, Lb4Service>,
    pub backends: Array<MapData, Lb6Backend>,
    pub members: HashMap<MapData, Lb4MemberKey, Lb6Member>,
    pub ct: HashMap<MapData, Lb6CtKey, Lb6CtEntry>,
    pub affinity: HashMap<MapData, Lb6AffinityKey, Lb4Affinity>,
    /// The addresses of `services`' keys (`LB6_VIPS`), kept with them.
    pub vips: HashMap<MapData, [u32; 4], u32>,
    /// `LB6_SRC_RANGES` (a reader of pins an agent before it left has none).
    pub src_ranges: Option<LpmTrie<MapData, lb_common::Lb6SrcRange, u32>>,
    /// `LB6_RANGES_ON`, likewise.
    pub ranges_on: Option<Array<MapData, u32>>,
}

/// `LB_PORTS` and the bits this handle has seen set: a port's bit is written once, the first time
/// a row has it (read from the map first: bits set through another handle stay).
struct Ports {
    map: Array<MapData, u64>,
    seen: Vec<u64>,
}

impl Ports {
    fn new(map: Array<MapData, u64>) -> Self {
        Self { map, seen: vec![0; PORTS_ARMED as usize] }
    }

    /// Sets `port`'s bit in the bitmap beginning at `set`, where it is not yet.
    fn note(&mut self, set: u32, port: u16) -> Result<(), MapError> {
        let (word, bit) = lb_common::port_bit(set, port);
        // In bounds: a set begins at most at 1024, and a port has 1024 words.
        let seen = &mut self.seen[word as usize];
        if *seen & bit == 0 {
            let w = self.map.get(&word, 0)? | bit;
            self.map.set(word, w, 0)?;
            *seen = w;
        }
        Ok(())
    }

    fn arm(&mut self, on: bool) -> Result<(), MapError> {
        self.map.set(PORTS_ARMED, u64::from(on), 0)
    }
}

/// Adds the source port of every reply entry of conntrack table `ct` to `out` (sorted, once
/// each); whether the walk went through the whole table. It stops at an error, and after twice
/// the table's size: an LRU table that evicts the key under the walk sends it back to the start.
pub(crate) fn reply_ports<K: CtKey + aya::Pod, V: aya::Pod>(
    ct: &HashMap<MapData, K, V>,
    out: &mut Vec<u16>,
) -> bool {
    let limit = ct.map().info().map_or(0, |i| 2 * i.max_entries() as usize);
    let mut walked = 0;
    for key in ct.keys() {
        let Ok(key) = key else { return false };
        walked += 1;
        if walked > limit {
            return false;
        }
        if key.dir() == lb_common::CT_DIR_REPLY {
            out.push(key.sport());
        }
    }
    out.sort_unstable();
    out.dedup();
    true
}

/// The IPv6 maps added after the others: a reader of an earlier agent's pins goes on without
/// them.
const LATER_MAPS6: [&str; 3] =
    [lb_common::MAP_LB6_SRC_RANGES, lb_common::MAP_LB6_RANGES_ON, lb_common::MAP_LB6_IFS];

/// The IPv6 maps with a typed handle (`Maps::v6`).
const TYPED_MAPS6: [&str; 6] = [
    MAP_LB6_SERVICES,
    MAP_LB6_BACKENDS,
    MAP_LB6_MEMBERS,
    MAP_LB6_CT,
    MAP_LB6_AFFINITY,
    lb_common::MAP_LB6_VIPS,
];

/// The maps without a typed handle here (see `Maps::others`).
const UNTYPED_MAPS: [&str; 12] = [
    MAP_LB_EVENTS,
    MAP_LB_MON_RATE,
    MAP_LB4_FRAGS,
    MAP_LB_FORMATS,
    MAP_LB_TC_FILTERS,
    lb_common::MAP_LB_SNAT_RANGES,
    lb_common::MAP_LB4_SOCK_REV,
    lb_common::MAP_LB4_SOCK_FWD,
    lb_common::MAP_LB4_SOCK_AFFINITY,
    lb_common::MAP_LB6_FRAGS,
    lb_common::MAP_LB6_SOCK_REV,
    lb_common::MAP_LB6_SOCK_FWD,
];

pub(crate) fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

impl Maps {
    /// Makes the handles from every map of `PINNED_MAPS`, each got by `get`. The Maglev slots are
    /// mapped writable or read-only; read-only handles (readers) skip the maps kept only for
    /// pinning, so a reader never depends on them.
    pub(super) fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, DatapathError>,
        writable: bool,
    ) -> Result<Self, DatapathError> {
        let mut all = BTreeMap::new();
        for name in PINNED_MAPS {
            if name == MAP_LB_PORTS && !writable {
                // Only the agent writes it; a reader of an earlier agent's pins finds none.
                continue;
            }
            if (TYPED_MAPS6.contains(&name) || LATER_MAPS6.contains(&name)) && !writable {
                // A reader of an earlier agent's pins finds no IPv6 maps: it shows none.
                if let Ok(m) = get(name) {
                    all.insert(name, m);
                }
            } else if writable || !UNTYPED_MAPS.contains(&name) {
                all.insert(name, get(name)?);
            }
        }
        let mut take = |name: &'static str| all.remove(name).ok_or(DatapathError::MissingMap(name));
        fn typed<T: TryFrom<Map, Error = MapError>>(
            map: Result<Map, DatapathError>,
            name: &'static str,
        ) -> Result<T, DatapathError> {
            T::try_from(map?).map_err(map_err(name))
        }
        let maglev = match take(MAP_LB4_MAGLEV)? {
            Map::Array(data) => MaglevSlots::map(data, writable)?,
            _ => return Err(DatapathError::MissingMap(MAP_LB4_MAGLEV)),
        };
        // One of `LATER_MAPS6`: a reader of older pins goes on without it; an agent has it.
        fn later<T: TryFrom<Map, Error = MapError>>(
            map: Result<Map, DatapathError>,
            name: &'static str,
            writable: bool,
        ) -> Result<Option<T>, DatapathError> {
            match map {
                Ok(m) => typed(Ok(m), name).map(Some),
                Err(_) if !writable => Ok(None),
                Err(e) => Err(e),
            }
        }
        let v6 = if TYPED_MAPS6.iter().all(|n| all.contains_key(n)) {
            let mut take = |name: &'static str| all.remove(name).ok_or(DatapathError::MissingMap(name));
            Some(Maps6 {
                services: typed(take(MAP_LB6_SERVICES), MAP_LB6_SERVICES)?,
                backends: typed(take(MAP_LB6_BACKENDS), MAP_LB6_BACKENDS)?,
                members: typed(take(MAP_LB6_MEMBERS), MAP_LB6_MEMBERS)?,
                ct: typed(take(MAP_LB6_CT), MAP_LB6_CT)?,
                affinity: typed(take(MAP_LB6_AFFINITY), MAP_LB6_AFFINITY)?,
                vips: typed(take(lb_common::MAP_LB6_VIPS), lb_common::MAP_LB6_VIPS)?,
                src_ranges: later(
                    take(lb_common::MAP_LB6_SRC_RANGES),
                    lb_common::MAP_LB6_SRC_RANGES,
                    writable,
                )?,
                ranges_on: later(take(lb_common::MAP_LB6_RANGES_ON), lb_common::MAP_LB6_RANGES_ON, writable)?,
            })
        } else {
            None
        };
        let mut take = |name: &'static str| all.remove(name).ok_or(DatapathError::MissingMap(name));
        let ports = if writable { Some(Ports::new(typed(take(MAP_LB_PORTS), MAP_LB_PORTS)?)) } else { None };
        let maps = Self {
            v6,
            ports,
            services: typed(take(MAP_LB4_SERVICES), MAP_LB4_SERVICES)?,
            backends: typed(take(MAP_LB4_BACKENDS), MAP_LB4_BACKENDS)?,
            maglev,
            ct: typed(take(MAP_LB4_CT), MAP_LB4_CT)?,
            counters: typed(take(MAP_LB_COUNTERS), MAP_LB_COUNTERS)?,
            svc_stats: typed(take(MAP_LB4_SVC_STATS), MAP_LB4_SVC_STATS)?,
            affinity: typed(take(MAP_LB4_AFFINITY), MAP_LB4_AFFINITY)?,
            meta: typed(take(MAP_LB4_FE_META), MAP_LB4_FE_META)?,
            members: typed(take(MAP_LB4_MEMBERS), MAP_LB4_MEMBERS)?,
            monitor: typed(take(MAP_LB_MONITOR), MAP_LB_MONITOR)?,
            src_ranges: typed(take(MAP_LB4_SRC_RANGES), MAP_LB4_SRC_RANGES)?,
            others: Vec::new(),
        };
        Ok(Self { others: all.into_iter().collect(), ..maps })
    }

    /// Pins every map that is not pinned in `dir` (the pins were removed under the agent). A
    /// read-only handle keeps no Maglev descriptor and cannot pin that map.
    pub(super) fn pin_missing(&self, dir: &Path) -> Result<(), DatapathError> {
        let pin = |name: &'static str, pin: &dyn Fn(&Path) -> Result<(), aya::pin::PinError>| {
            let path = dir.join(name);
            if path.exists() {
                return Ok(());
            }
            pin(&path).map_err(|e| DatapathError::PinMap { map: name, path, reason: e.to_string() })
        };
        let data: [(&'static str, &MapData); 10] = [
            (MAP_LB4_SERVICES, self.services.map()),
            (MAP_LB4_BACKENDS, self.backends.map()),
            (MAP_LB4_CT, self.ct.map()),
            (MAP_LB_COUNTERS, self.counters.map()),
            (MAP_LB4_SVC_STATS, self.svc_stats.map()),
            (MAP_LB4_AFFINITY, self.affinity.map()),
            (MAP_LB4_FE_META, self.meta.map()),
            (MAP_LB4_MEMBERS, self.members.map()),
            (MAP_LB_MONITOR, self.monitor.map()),
            (MAP_LB4_SRC_RANGES, self.src_ranges.map()),
        ];
        // Destructured whole: a map added to `Maps6` cannot be left out of its pinning.
        let data6 = self.v6.iter().flat_map(
            |Maps6 { services, backends, members, ct, affinity, vips, src_ranges, ranges_on }| {
                [
                    (MAP_LB6_SERVICES, services.map()),
                    (MAP_LB6_BACKENDS, backends.map()),
                    (MAP_LB6_MEMBERS, members.map()),
                    (MAP_LB6_CT, ct.map()),
                    (MAP_LB6_AFFINITY, affinity.map()),
                    (lb_common::MAP_LB6_VIPS, vips.map()),
                ]
                .into_iter()
                .chain(src_ranges.iter().map(|t| (lb_common::MAP_LB6_SRC_RANGES, t.map())))
                .chain(ranges_on.iter().map(|a| (lb_common::MAP_LB6_RANGES_ON, a.map())))
            },
        );
        let maglev = [(MAP_LB4_MAGLEV, &self.maglev.data)];
        let ports = self.ports.iter().map(|p| (MAP_LB_PORTS, p.map.map()));
        for (name, d) in data.into_iter().chain(data6).chain(maglev).chain(ports) {
            pin(name, &|p| d.pin(p))?;
        }
        for (name, m) in &self.others {
            pin(name, &|p| m.pin(p))?;
        }
        // Every map of the table is back (the IPv6 ones when this agent has them).
        match self.missing_pin(dir) {
            None => Ok(()),
            Some(name) => Err(DatapathError::PinMap {
                map: name,
                path: dir.join(name),
                reason: "no handle to pin it from".into(),
            }),
        }
    }

    /// The first map this agent has a handle to whose pin is not under `dir` (the IPv6 ones only
    /// when it has them).
    pub(super) fn missing_pin(&self, dir: &Path) -> Option<&'static str> {
        PINNED_MAPS
            .into_iter()
            .filter(|n| self.v6.is_some() || !(TYPED_MAPS6.contains(n) || LATER_MAPS6.contains(n)))
            .filter(|n| self.ports.is_some() || *n != MAP_LB_PORTS)
            .find(|n| !dir.join(n).exists())
    }

    /// Opens the maps pinned under `pin_dir` for reading and writing (tests, benchmarks).
    pub fn from_pins(pin_dir: &Path) -> Result<Self, DatapathError> {
        Self::open_pins(pin_dir, false)
    }

    /// Opens the maps pinned under `pin_dir` read-only (`lbctl`, the metrics collector): the
    /// kernel refuses every write through these handles.
    pub fn from_pins_read_only(pin_dir: &Path) -> Result<Self, DatapathError> {
        Self::open_pins(pin_dir, true)
    }

    fn open_pins(pin_dir: &Path, read_only: bool) -> Result<Self, DatapathError> {
        if let Err(e) = std::fs::read_dir(pin_dir) {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return Err(DatapathError::PermissionDenied(pin_dir.to_path_buf()));
            }
        }
        let others = other_layouts(pin_dir);
        let dir = &layout_dir(pin_dir);
        if !dir.join(MAP_LB4_SERVICES).exists() {
            if !others.is_empty() {
                return Err(DatapathError::OtherLayout { pin_dir: pin_dir.into(), found: others });
            }
            if let Some((dir, kind)) = not_on_bpffs(pin_dir) {
                return Err(DatapathError::NotBpffs { pin_dir: pin_dir.into(), dir, kind });
            }
            return Err(DatapathError::NotPinned(pin_dir.into()));
        }
        let open = |name: &'static str| -> Result<Map, DatapathError> {
            let data = if read_only {
                let fd =
                    obj_get_read_only(&dir.join(name)).map_err(|e| map_err(name)(MapError::IoError(e)))?;
                MapData::from_fd(fd).map_err(map_err(name))?
            } else {
                MapData::from_pin(dir.join(name)).map_err(map_err(name))?
            };
            Map::from_map_data(data).map_err(map_err(name))
        };
        Self::from_maps(open, !read_only)
    }

    /// Every frontend in the services maps (IPv4, then IPv6).
    pub fn read_services(&self) -> Result<Vec<(ServiceKey, Lb4Service)>, DatapathError> {
        let mut out: Vec<(ServiceKey, Lb4Service)> = Vec::new();
        for e in self.services.iter() {
            let (k, v) = e.map_err(map_err(MAP_LB4_SERVICES))?;
            out.push((ServiceKey::V4(k), v));
        }
        for e in self.v6.iter().flat_map(|m| m.services.iter()) {
            let (k, v) = e.map_err(map_err(MAP_LB6_SERVICES))?;
            out.push((ServiceKey::V6(k), v));
        }
        Ok(out)
    }

    /// Makes `LB6_VIPS` count the frontends `LB6_SERVICES` holds per address: at start-up, since
    /// pins of an agent that kept no such count (or a count gone wrong) may be there.
    pub fn rebuild_vips6(&mut self) -> Result<(), MapError> {
        let Some(v6) = self.v6.as_mut() else { return Ok(()) };
        let mut want: std::collections::HashMap<[u32; 4], u32> = std::collections::HashMap::new();
        for k in v6.services.keys() {
            *want.entry(k?.addr).or_default() += 1;
        }
        let stale: Vec<[u32; 4]> =
            v6.vips.keys().filter_map(Result::ok).filter(|a| !want.contains_key(a)).collect();
        for a in stale {
            absent_ok(v6.vips.remove(&a))?;
        }
        for (a, n) in want {
            if v6.vips.get(&a, 0).ok() != Some(n) {
                v6.vips.insert(a, n, 0)?;
            }
        }
        Ok(())
    }

    /// `LB6_SRC_RANGES`, or the error that says it is not there.
    fn src_ranges6(&mut self) -> Result<&mut LpmTrie<MapData, lb_common::Lb6SrcRange, u32>, MapError> {
        self.v6_mut()?.src_ranges.as_mut().ok_or_else(|| missing(lb_common::MAP_LB6_SRC_RANGES))
    }

    /// The IPv6 handles, or the error that says they are not there.
    fn v6_mut(&mut self) -> Result<&mut Maps6, MapError> {
        self.v6.as_mut().ok_or_else(|| {
            MapError::IoError(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the IPv6 maps are not pinned",
            ))
        })
    }

    /// Opens the pinned event ring buffer (for `lbctl monitor`).
    pub fn events(pin_dir: &Path) -> Result<aya::maps::RingBuf<MapData>, DatapathError> {
        let data =
            MapData::from_pin(layout_dir(pin_dir).join(MAP_LB_EVENTS)).map_err(map_err(MAP_LB_EVENTS))?;
        aya::maps::RingBuf::try_from(Map::from_map_data(data).map_err(map_err(MAP_LB_EVENTS))?)
            .map_err(map_err(MAP_LB_EVENTS))
    }

    /// The entries `LB4_CT` holds: a pinned table an earlier agent made keeps its size, whatever
    /// this agent was asked for.
    pub fn ct_capacity(&self) -> Result<u32, DatapathError> {
        Ok(self.ct.map().info().map_err(map_err(MAP_LB4_CT))?.max_entries())
    }

    /// Turns the programs' port filter off (`LB_PORTS`' armed word): every port is looked up
    /// until [`Maps::note_ports`] arms it. Done at load, before any program of this agent can
    /// run, and when the agent stops (the agent that comes next may be one that does not know the
    /// filter: a rollback).
    pub fn disarm_ports(&mut self) -> Result<(), DatapathError> {
        self.ports.as_mut().map_or(Ok(()), |p| p.arm(false)).map_err(map_err(MAP_LB_PORTS))
    }

    /// Sets the `LB_PORTS` bits of every frontend of `services` and backend of `backends`, and of
    /// every conntrack reply entry (a flow whose backend has left may still be answered), as the
    /// pinned maps hold them at start-up (an agent without `LB_PORTS`, or one rolled back to, may
    /// have written them), then arms the programs' port filter. Whether it armed it: a walk of a
    /// conntrack table that failed, or that a table changing under it kept going past twice its
    /// size, may have missed a flow, and the filter stays off.
    pub fn note_ports(
        &mut self,
        services: &[(ServiceKey, Lb4Service)],
        backends: &[(u32, BackendValue)],
    ) -> Result<bool, DatapathError> {
        let err = map_err(MAP_LB_PORTS);
        for (k, _) in services {
            self.note_frontend_port(k).map_err(&err)?;
        }
        for (_, b) in backends {
            self.note_backend_port(b).map_err(&err)?;
        }
        let mut ports = Vec::new();
        let mut whole = reply_ports(&self.ct, &mut ports);
        if let Some(m) = &self.v6 {
            whole &= reply_ports(&m.ct, &mut ports);
        }
        self.note_reply_ports(ports)?;
        if whole {
            self.ports.as_mut().map_or(Ok(()), |p| p.arm(true)).map_err(&err)?;
        }
        Ok(whole)
    }

    /// [`Maps::note_ports`] over the rows the pinned maps hold now (tests and benchmarks; the
    /// agent's start-up passes the rows it reads anyway).
    pub fn note_pinned_ports(&mut self) -> Result<bool, DatapathError> {
        let (services, backends) = (self.read_services()?, self.read_backends()?);
        self.note_ports(&services, &backends)
    }

    /// Sets the `LB_PORTS` bits of `ports`, the source ports of conntrack reply entries (a
    /// backend's), before those entries are written.
    pub(crate) fn note_reply_ports(
        &mut self,
        ports: impl IntoIterator<Item = u16>,
    ) -> Result<(), DatapathError> {
        let Some(p) = self.ports.as_mut() else { return Ok(()) };
        for port in ports {
            p.note(PORTS_BACKEND, port).map_err(map_err(MAP_LB_PORTS))?;
        }
        Ok(())
    }

    fn note_frontend_port(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        // The bitmaps are over the ports as the maps hold them (network byte order).
        let port = key.parts().1.to_be();
        self.ports.as_mut().map_or(Ok(()), |p| p.note(PORTS_FRONTEND, port))
    }

    fn note_backend_port(&mut self, backend: &BackendValue) -> Result<(), MapError> {
        if backend.state() == lb_common::BACKEND_STATE_FREE {
            return Ok(());
        }
        let port = backend.parts().1.to_be();
        self.ports.as_mut().map_or(Ok(()), |p| p.note(PORTS_BACKEND, port))
    }

    /// Turns the datapath's flow events (for `lbctl monitor`) on or off.
    pub fn set_flow_events(&mut self, on: bool) -> Result<(), DatapathError> {
        self.monitor.set(0, u32::from(on), 0).map_err(map_err(MAP_LB_MONITOR))
    }

    /// Whether the datapath sends flow events.
    pub fn flow_events(&self) -> bool {
        self.monitor.get(&0, 0).is_ok_and(|n| n != 0)
    }

    /// What the agent recorded for frontend `id`.
    pub fn read_meta(&self, id: u32) -> Option<Lb4FrontendMeta> {
        self.meta.get(&id, 0).ok()
    }

    /// Every backend slot that is in use, of both families (by id).
    pub fn read_backends(&self) -> Result<Vec<(u32, BackendValue)>, DatapathError> {
        let mut out = Vec::new();
        for (id, b) in self.backends.iter().enumerate() {
            let b = b.map_err(map_err(MAP_LB4_BACKENDS))?;
            if b.state != lb_common::BACKEND_STATE_FREE {
                out.push((id as u32, BackendValue::V4(b)));
            }
        }
        for (id, b) in self.v6.iter().flat_map(|m| m.backends.iter().enumerate()) {
            let b = b.map_err(map_err(MAP_LB6_BACKENDS))?;
            if b.state != lb_common::BACKEND_STATE_FREE {
                out.push((id as u32, BackendValue::V6(b)));
            }
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    /// Every member row, of both families.
    pub fn read_members(&self) -> Result<Vec<(MemberKey, MemberValue)>, DatapathError> {
        let mut out = Vec::new();
        for e in self.members.iter() {
            let (k, v) = e.map_err(map_err(MAP_LB4_MEMBERS))?;
            out.push((MemberKey::V4(k), MemberValue::V4(v)));
        }
        for e in self.v6.iter().flat_map(|m| m.members.iter()) {
            let (k, v) = e.map_err(map_err(MAP_LB6_MEMBERS))?;
            out.push((MemberKey::V6(k), MemberValue::V6(v)));
        }
        Ok(out)
    }

    /// Every `loadBalancerSourceRanges` entry.
    pub fn read_src_ranges(&self) -> Result<Vec<SrcRangeEntry>, DatapathError> {
        let mut out: Vec<SrcRangeEntry> = self
            .src_ranges
            .keys()
            .map(|k| k.map(|k| SrcRangeEntry { key: SrcRangeKey::V4(k.data()), prefix_len: k.prefix_len() }))
            .collect::<Result<_, _>>()
            .map_err(map_err(MAP_LB4_SRC_RANGES))?;
        for k in self.v6.iter().flat_map(|m| m.src_ranges.iter()).flat_map(|t| t.keys()) {
            let k = k.map_err(map_err(lb_common::MAP_LB6_SRC_RANGES))?;
            out.push(SrcRangeEntry { key: SrcRangeKey::V6(k.data()), prefix_len: k.prefix_len() });
        }
        Ok(out)
    }

    /// Global counters summed over CPUs, indexed as `lb_common::counters`.
    pub fn read_counters(&self) -> Result<Vec<u64>, DatapathError> {
        // An agent of an earlier version may have pinned fewer (those it did not know read 0).
        let pinned = self.counters.len();
        (0..counters::COUNT)
            .map(|i| {
                if i >= pinned {
                    return Ok(0);
                }
                self.counters.get(&i, 0).map(|v| v.iter().sum()).map_err(map_err(MAP_LB_COUNTERS))
            })
            .collect()
    }

    /// Per-frontend statistics summed over CPUs.
    pub fn read_svc_stats(&self, id: u32) -> Result<Lb4SvcStats, DatapathError> {
        let per_cpu = self.svc_stats.get(&id, 0).map_err(map_err(MAP_LB4_SVC_STATS))?;
        Ok(per_cpu.iter().fold(Lb4SvcStats::default(), |mut acc, s| {
            acc.packets += s.packets;
            acc.bytes += s.bytes;
            acc.new_flows += s.new_flows;
            acc.drops += s.drops;
            acc
        }))
    }
}

impl MapWriter for Maps {
    type Error = MapError;

    fn set_backend(&mut self, id: u32, backend: &BackendValue) -> Result<(), MapError> {
        self.note_backend_port(backend)?;
        match backend {
            BackendValue::V4(b) => self.backends.set(id, b, 0),
            BackendValue::V6(b) => self.v6_mut()?.backends.set(id, b, 0),
        }
    }

    fn set_maglev(&mut self, offset: u32, table: &[u32]) -> Result<(), MapError> {
        self.maglev.write(offset, table)
    }

    fn set_service(&mut self, key: &ServiceKey, svc: &Lb4Service) -> Result<(), MapError> {
        self.note_frontend_port(key)?;
        match key {
            ServiceKey::V4(k) => self.services.insert(k, svc, 0),
            ServiceKey::V6(k) => {
                let v6 = self.v6_mut()?;
                if present(v6.services.get(k, 0))?.is_some() {
                    return v6.services.insert(k, svc, 0);
                }
                // A new frontend: its address counted first, taken back if the frontend cannot
                // be written (a retry counts it again).
                let n = present(v6.vips.get(&k.addr, 0))?.unwrap_or(0);
                v6.vips.insert(k.addr, n + 1, 0)?;
                v6.services.insert(k, svc, 0).inspect_err(|_| {
                    let _ = if n == 0 { v6.vips.remove(&k.addr) } else { v6.vips.insert(k.addr, n, 0) };
                })
            }
        }
    }

    fn set_frontend_meta(&mut self, id: u32, meta: &Lb4FrontendMeta) -> Result<(), MapError> {
        self.meta.set(id, meta, 0)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        match key {
            ServiceKey::V4(k) => absent_ok(self.services.remove(k)),
            ServiceKey::V6(k) => {
                let v6 = self.v6_mut()?;
                if present(v6.services.get(k, 0))?.is_none() {
                    return Ok(());
                }
                // Its address counted out first, counted back if the frontend cannot be removed
                // (a retry counts it out again), as `set_service` counts in. The address stays a
                // Service address while another frontend has it.
                let n = present(v6.vips.get(&k.addr, 0))?.unwrap_or(0);
                match n {
                    0 | 1 => absent_ok(v6.vips.remove(&k.addr))?,
                    n => v6.vips.insert(k.addr, n - 1, 0)?,
                }
                absent_ok(v6.services.remove(k)).inspect_err(|_| {
                    if n > 0 {
                        let _ = v6.vips.insert(k.addr, n, 0);
                    }
                })
            }
        }
    }

    fn remove_affinity(&mut self, svc_id: u32, backend_ids: &[u32]) -> Result<(), MapError> {
        // One pass over the (LRU-bounded) affinity map; entries of other frontends are untouched.
        let stale: Vec<Lb4AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| k.svc_id == svc_id && backend_ids.contains(&v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            absent_ok(self.affinity.remove(&k))?;
        }
        if let Some(m) = self.v6.as_mut() {
            let stale: Vec<Lb6AffinityKey> = m
                .affinity
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| k.svc_id == svc_id && backend_ids.contains(&v.backend_id))
                .map(|(k, _)| k)
                .collect();
            for k in stale {
                absent_ok(m.affinity.remove(&k))?;
            }
        }
        Ok(())
    }

    fn set_member(&mut self, key: &MemberKey, member: &MemberValue) -> Result<(), MapError> {
        match (key, member) {
            (MemberKey::V4(k), MemberValue::V4(m)) => self.members.insert(k, m, 0),
            (MemberKey::V6(k), MemberValue::V6(m)) => self.v6_mut()?.members.insert(k, m, 0),
            _ => Err(MapError::IoError(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a member row of one family with the key of the other",
            ))),
        }
    }

    fn remove_member(&mut self, key: &MemberKey) -> Result<(), MapError> {
        match key {
            MemberKey::V4(k) => absent_ok(self.members.remove(k)),
            MemberKey::V6(k) => absent_ok(self.v6_mut()?.members.remove(k)),
        }
    }

    fn set_src_range(&mut self, e: &SrcRangeEntry) -> Result<(), MapError> {
        match e.key {
            SrcRangeKey::V4(k) => self.src_ranges.insert(&Key::new(e.prefix_len, k), e.verdict(), 0),
            SrcRangeKey::V6(k) => {
                // The forward program looks IPv6 clients up only while this says so: on before
                // the first entry.
                let on =
                    self.v6_mut()?.ranges_on.as_mut().ok_or_else(|| missing(lb_common::MAP_LB6_RANGES_ON))?;
                if on.get(&0, 0)? == 0 {
                    on.set(0, 1, 0)?;
                }
                self.src_ranges6()?.insert(&Key::new(e.prefix_len, k), e.verdict(), 0)
            }
        }
    }

    fn remove_src_range(&mut self, e: &SrcRangeEntry) -> Result<(), MapError> {
        match e.key {
            SrcRangeKey::V4(k) => absent_ok(self.src_ranges.remove(&Key::new(e.prefix_len, k))),
            SrcRangeKey::V6(k) => {
                absent_ok(self.src_ranges6()?.remove(&Key::new(e.prefix_len, k)))?;
                // Off once none is left.
                if self.src_ranges6()?.keys().next().is_none() {
                    if let Some(on) = self.v6_mut()?.ranges_on.as_mut() {
                        on.set(0, 0, 0)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// The error for a map this handle lacks.
fn missing(name: &str) -> MapError {
    MapError::IoError(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{name} is not pinned")))
}

/// A lookup's value, `None` when the key is not there; any other failure stays one.
fn present<V>(r: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A removal of an entry that is not there (aya reports the kernel's ENOENT as a failed system
/// call) is no failure: the datapath or the LRU may have removed it first.
fn absent_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl FlowTable for Maps {
    type Error = DatapathError;

    fn ct_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(Lb4CtKey, Lb4CtEntry)>,
    ) -> Result<Option<u32>, DatapathError> {
        lookup_batch(self.ct.map(), cursor, max, out).map_err(|e| map_err(MAP_LB4_CT)(MapError::IoError(e)))
    }

    fn ct_get(&self, key: &Lb4CtKey) -> Result<Option<Lb4CtEntry>, DatapathError> {
        match self.ct.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_LB4_CT)(e)),
        }
    }

    fn ct_remove(&mut self, key: &Lb4CtKey) -> Result<(), DatapathError> {
        absent_ok(self.ct.remove(key)).map_err(map_err(MAP_LB4_CT))
    }

    fn affinity_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(Lb4AffinityKey, Lb4Affinity)>,
    ) -> Result<Option<u32>, DatapathError> {
        lookup_batch(self.affinity.map(), cursor, max, out)
            .map_err(|e| map_err(MAP_LB4_AFFINITY)(MapError::IoError(e)))
    }

    fn affinity_remove(&mut self, key: &Lb4AffinityKey) -> Result<(), DatapathError> {
        absent_ok(self.affinity.remove(key)).map_err(map_err(MAP_LB4_AFFINITY))
    }
}

/// `BPF_MAP_LOOKUP_BATCH` (kernel 5.6+, hash and LRU hash maps; arrays, whose cursor is the
/// last index read): up to `max` entries in one system call, from bucket `cursor` on. The kernel's cursor is a bucket index, so entries added
/// or removed meanwhile never make a pass start over (as `get_next_key` does when its key is
/// gone). aya has no batch operations yet. The kernel copies whole buckets: one that holds more
/// than `max` entries fails with ENOSPC, and the read is tried again with room for more.
pub(crate) fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    cursor: Option<u32>,
    max: u32,
    out: &mut Vec<(K, V)>,
) -> std::io::Result<Option<u32>> {
    /// Far more than any bucket of a hash table holds.
    const MOST: u32 = 1 << 16;
    let mut room = max.max(1);
    loop {
        match lookup_batch_once(map, cursor, room, out) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && room < MOST => room = (room * 2).min(MOST),
            r => return r,
        }
    }
}

fn lookup_batch_once<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    cursor: Option<u32>,
    max: u32,
    out: &mut Vec<(K, V)>,
) -> std::io::Result<Option<u32>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    #[repr(C)]
    struct Batch {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let n = max as usize;
    let mut keys: Vec<std::mem::MaybeUninit<K>> = Vec::with_capacity(n);
    let mut values: Vec<std::mem::MaybeUninit<V>> = Vec::with_capacity(n);
    let in_batch = cursor.unwrap_or(0);
    let mut out_batch: u32 = 0;
    let mut attr = Batch {
        in_batch: if cursor.is_some() { &in_batch as *const u32 as u64 } else { 0 },
        out_batch: &mut out_batch as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: max,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: a valid bpf_attr prefix of the size passed; the buffers hold `max` keys and values
    // of the map's sizes (K and V are its key and value types), and outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut Batch,
            std::mem::size_of::<Batch>() as u32,
        )
    };
    let done = if ret < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
        true
    } else {
        false
    };
    let got = (attr.count as usize).min(n);
    // SAFETY: the kernel filled the first `count` keys and values.
    unsafe {
        keys.set_len(got);
        values.set_len(got);
    }
    out.extend(keys.into_iter().zip(values).map(|(k, v)| {
        // SAFETY: filled, and any bit pattern is a valid K or V (Pod).
        unsafe { (k.assume_init(), v.assume_init()) }
    }));
    Ok((!done).then_some(out_batch))
}

/// The IPv6 flow maps. A reader without them (pins of an agent before them) reads none.
impl FlowTable<Lb6CtKey> for Maps {
    type Error = DatapathError;

    fn ct_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(Lb6CtKey, Lb6CtEntry)>,
    ) -> Result<Option<u32>, DatapathError> {
        let Some(m) = &self.v6 else { return Ok(None) };
        lookup_batch(m.ct.map(), cursor, max, out).map_err(|e| map_err(MAP_LB6_CT)(MapError::IoError(e)))
    }

    fn ct_get(&self, key: &Lb6CtKey) -> Result<Option<Lb6CtEntry>, DatapathError> {
        let Some(m) = &self.v6 else { return Ok(None) };
        match m.ct.get(key, 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_LB6_CT)(e)),
        }
    }

    fn ct_remove(&mut self, key: &Lb6CtKey) -> Result<(), DatapathError> {
        let Some(m) = &mut self.v6 else { return Ok(()) };
        absent_ok(m.ct.remove(key)).map_err(map_err(MAP_LB6_CT))
    }

    fn affinity_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(Lb6AffinityKey, Lb4Affinity)>,
    ) -> Result<Option<u32>, DatapathError> {
        let Some(m) = &self.v6 else { return Ok(None) };
        lookup_batch(m.affinity.map(), cursor, max, out)
            .map_err(|e| map_err(MAP_LB6_AFFINITY)(MapError::IoError(e)))
    }

    fn affinity_remove(&mut self, key: &Lb6AffinityKey) -> Result<(), DatapathError> {
        let Some(m) = &mut self.v6 else { return Ok(()) };
        absent_ok(m.affinity.remove(key)).map_err(map_err(MAP_LB6_AFFINITY))
    }
}
