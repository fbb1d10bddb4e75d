//! The layer that touches the kernel: loads the eBPF object with the agent's settings, pins its
//! maps under the pin directory, attaches programs to interfaces, and implements [`MapWriter`]
//! over the pinned maps.

use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    counters, globals, Lb4Affinity, Lb4AffinityKey, Lb4Backend, Lb4CtEntry, Lb4CtKey, Lb4FrontendMeta,
    Lb4Service, Lb4ServiceKey, Lb4SvcStats, MAP_LB4_AFFINITY, MAP_LB4_BACKENDS, MAP_LB4_CT, MAP_LB4_FE_META,
    MAP_LB4_MAGLEV, MAP_LB4_SERVICES, MAP_LB4_SVC_STATS, MAP_LB_COUNTERS, MAP_LB_EVENTS, MAP_LB_MONITOR,
    MAP_LB_MON_RATE, PIN_LAYOUT_VERSION,
};

use crate::sync::MapWriter;

/// The datapath object, built by `build.rs` from `lb-ebpf`.
pub static LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// No-op TC and XDP programs, the baseline for per-packet cost.
pub static NOOP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-noop"));

pub const PROG_TC_FORWARD: &str = "lb4_tc_forward";
pub const PROG_TC_REPLY: &str = "lb4_tc_reply";
pub const PROG_XDP_FORWARD: &str = "lb4_xdp_forward";

/// Where the forward (pod → service) direction runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// TC ingress of the pod's host-side interface.
    Tc,
    /// XDP on the pod's host-side interface (replies still use TC egress).
    Xdp,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub pin_dir: PathBuf,
    pub services: u32,
    pub backends: u32,
    pub maglev_slots: u32,
    pub ct_entries: u32,
    pub affinity_entries: u32,
    pub ct_timeout_tcp_syn_secs: u64,
    pub ct_timeout_tcp_established_secs: u64,
    pub ct_timeout_tcp_close_secs: u64,
    pub ct_timeout_udp_secs: u64,
    pub flow_hash_seed: u32,
    /// Source address of hairpinned flows.
    pub hairpin_addr: std::net::Ipv4Addr,
    /// Kernel-side aya-log on (true) or compiled in but silent (false).
    pub bpf_log: bool,
}

/// Where this version's pins live: `<pin-dir>/v<PIN_LAYOUT_VERSION>`; maps directly in it, program
/// links under `links/`. bpffs holds only BPF objects and directories, so the layout version is
/// carried by the directory name.
pub fn layout_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{PIN_LAYOUT_VERSION}"))
}

/// Other layout versions pinned under `pin_dir`.
fn other_layouts(pin_dir: &Path) -> Vec<String> {
    let ours = format!("v{PIN_LAYOUT_VERSION}");
    std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('v') && n[1..].parse::<u32>().is_ok() && *n != ours)
        .collect()
}

/// Removes everything the agent pinned under `pin_dir`: unpinning the links detaches the programs;
/// removing the maps drops them (and with them every tracked flow).
pub fn cleanup(pin_dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return Ok(0) };
    for layout in entries.flatten() {
        let links = layout.path().join("links");
        for l in std::fs::read_dir(&links).into_iter().flatten().flatten() {
            std::fs::remove_file(l.path())?;
            removed += 1;
        }
        let _ = std::fs::remove_dir(&links);
        for m in std::fs::read_dir(layout.path()).into_iter().flatten().flatten() {
            std::fs::remove_file(m.path())?;
            removed += 1;
        }
        std::fs::remove_dir(layout.path())?;
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(removed)
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("creating pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: std::io::Error },
    #[error("pinning map {map} at {path}: {reason}")]
    PinMap { map: &'static str, path: PathBuf, reason: String },
    #[error(
        "{pin_dir} holds pinned layout {found:?}, this agent uses v{ours}: run the matching agent, or \
         `lb-agent --cleanup --pin-dir {pin_dir}` (detaches lb and drops tracked flows)",
        ours = PIN_LAYOUT_VERSION
    )]
    OtherLayout { pin_dir: PathBuf, found: Vec<String> },
    #[error("nothing pinned at {0}: is lb-agent running with this --pin-dir?")]
    NotPinned(PathBuf),
    #[error("permission denied reading {0}: run as root (the pins are root's only, and reading them needs CAP_BPF)")]
    PermissionDenied(PathBuf),
    #[error("the maps kept changing while they were read; try again")]
    Unstable,
    #[error("pinning the link of {program} on {interface} at {path}: {reason}")]
    PinLink { program: &'static str, interface: String, path: PathBuf, reason: String },
    #[error("loading the eBPF object (pinned maps under {pin_dir}): {source}")]
    Load { pin_dir: PathBuf, source: Box<aya::EbpfError> },
    #[error("program {program}: {source}")]
    Program { program: &'static str, source: ProgramError },
    #[error("attaching {program} to {interface}: {source}")]
    Attach { program: &'static str, interface: String, source: ProgramError },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
}

/// The Maglev slot array, memory-mapped: tables are written as plain memory. The datapath reads
/// a region only after its frontend entry points at it, which is written afterwards through a
/// syscall (a full barrier), so a packet never sees a half-written table.
pub struct MaglevSlots {
    /// The map's file descriptor, kept for writers; a read-only mapping drops it (the mapping
    /// outlives it), so no writable handle stays open.
    _data: Option<MapData>,
    ptr: std::ptr::NonNull<u32>,
    len: u32,
    bytes: usize,
    writable: bool,
}

// SAFETY: the mapping is owned by this value and only written through `&mut self`.
unsafe impl Send for MaglevSlots {}
// SAFETY: shared access only reads (volatile) from the mapping.
unsafe impl Sync for MaglevSlots {}

impl MaglevSlots {
    fn map(data: MapData, writable: bool) -> Result<Self, DatapathError> {
        // Two u32 slots per element (see the map's declaration).
        let len = data.info().map_err(map_err(MAP_LB4_MAGLEV))?.max_entries() * 2;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (len as usize * 4).div_ceil(page) * page;
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE array of `len` u32 values, shared, page-rounded.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ },
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DatapathError::Map {
                map: MAP_LB4_MAGLEV,
                source: MapError::IoError(std::io::Error::last_os_error()),
            });
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u32>()).expect("mmap returned non-null");
        // A read-only mapping has no VM_MAYWRITE (the kernel clears it): it cannot be made
        // writable later, and with the descriptor closed nothing writable remains.
        Ok(Self { _data: writable.then_some(data), ptr, len, bytes, writable })
    }

    /// The backend id in `slot`.
    pub fn get(&self, slot: u32) -> Option<u32> {
        // SAFETY: in bounds of the mapping; volatile because the kernel shares it.
        (slot < self.len).then(|| unsafe { self.ptr.as_ptr().add(slot as usize).read_volatile() })
    }

    fn write(&mut self, offset: u32, table: &[u32]) -> Result<(), MapError> {
        let end = offset as usize + table.len();
        if !self.writable {
            return Err(MapError::IoError(std::io::Error::from_raw_os_error(libc::EPERM)));
        }
        if end > self.len as usize {
            return Err(MapError::OutOfBounds { index: end as u32, max_entries: self.len });
        }
        // SAFETY: in bounds (checked above); the region is free, so no packet reads it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(table.as_ptr(), self.ptr.as_ptr().add(offset as usize), table.len())
        };
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MaglevSlots {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

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
    /// `[0]`: non-zero while the datapath sends flow events (`--flow-events`).
    pub monitor: Array<MapData, u32>,
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        fn take<T: TryFrom<Map, Error = MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, DatapathError> {
            let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
            T::try_from(map).map_err(map_err(name))
        }
        Ok(Self {
            services: take(ebpf, MAP_LB4_SERVICES)?,
            backends: take(ebpf, MAP_LB4_BACKENDS)?,
            maglev: match ebpf.take_map(MAP_LB4_MAGLEV).ok_or(DatapathError::MissingMap(MAP_LB4_MAGLEV))? {
                Map::Array(data) => MaglevSlots::map(data, true)?,
                _ => return Err(DatapathError::MissingMap(MAP_LB4_MAGLEV)),
            },
            ct: take(ebpf, MAP_LB4_CT)?,
            counters: take(ebpf, MAP_LB_COUNTERS)?,
            svc_stats: take(ebpf, MAP_LB4_SVC_STATS)?,
            affinity: take(ebpf, MAP_LB4_AFFINITY)?,
            meta: take(ebpf, MAP_LB4_FE_META)?,
            monitor: take(ebpf, MAP_LB_MONITOR)?,
        })
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
        let pin_dir = &layout_dir(pin_dir);
        if !pin_dir.join(MAP_LB4_SERVICES).exists() {
            if !others.is_empty() {
                return Err(DatapathError::OtherLayout {
                    pin_dir: pin_dir.parent().unwrap_or(pin_dir).into(),
                    found: others,
                });
            }
            return Err(DatapathError::NotPinned(pin_dir.parent().unwrap_or(pin_dir).into()));
        }
        let open_data = |dir: &Path, name: &'static str| -> Result<MapData, DatapathError> {
            if read_only {
                let fd =
                    obj_get_read_only(&dir.join(name)).map_err(|e| map_err(name)(MapError::IoError(e)))?;
                MapData::from_fd(fd).map_err(map_err(name))
            } else {
                MapData::from_pin(dir.join(name)).map_err(map_err(name))
            }
        };
        let open = |dir: &Path, name: &'static str| -> Result<Map, DatapathError> {
            Map::from_map_data(open_data(dir, name)?).map_err(map_err(name))
        };
        fn typed<T: TryFrom<Map, Error = MapError>>(
            map: Result<Map, DatapathError>,
            name: &'static str,
        ) -> Result<T, DatapathError> {
            T::try_from(map?).map_err(map_err(name))
        }
        let o = |name: &'static str| open(pin_dir, name);
        Ok(Self {
            services: typed(o(MAP_LB4_SERVICES), MAP_LB4_SERVICES)?,
            backends: typed(o(MAP_LB4_BACKENDS), MAP_LB4_BACKENDS)?,
            // mmap needs a descriptor opened for writing (the kernel refuses to share-map a
            // read-only one); the read-only mapping then drops it.
            maglev: MaglevSlots::map(
                MapData::from_pin(pin_dir.join(MAP_LB4_MAGLEV)).map_err(map_err(MAP_LB4_MAGLEV))?,
                !read_only,
            )?,
            ct: typed(o(MAP_LB4_CT), MAP_LB4_CT)?,
            counters: typed(o(MAP_LB_COUNTERS), MAP_LB_COUNTERS)?,
            svc_stats: typed(o(MAP_LB4_SVC_STATS), MAP_LB4_SVC_STATS)?,
            affinity: typed(o(MAP_LB4_AFFINITY), MAP_LB4_AFFINITY)?,
            meta: typed(o(MAP_LB4_FE_META), MAP_LB4_FE_META)?,
            monitor: typed(o(MAP_LB_MONITOR), MAP_LB_MONITOR)?,
        })
    }

    /// Every frontend in the map.
    pub fn read_services(&self) -> Result<Vec<(Lb4ServiceKey, Lb4Service)>, DatapathError> {
        self.services.iter().collect::<Result<_, _>>().map_err(map_err(MAP_LB4_SERVICES))
    }

    /// Opens the pinned event ring buffer (for `lbctl monitor`).
    pub fn events(pin_dir: &Path) -> Result<aya::maps::RingBuf<MapData>, DatapathError> {
        let data =
            MapData::from_pin(layout_dir(pin_dir).join(MAP_LB_EVENTS)).map_err(map_err(MAP_LB_EVENTS))?;
        aya::maps::RingBuf::try_from(Map::from_map_data(data).map_err(map_err(MAP_LB_EVENTS))?)
            .map_err(map_err(MAP_LB_EVENTS))
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

    /// Every backend slot that is in use.
    pub fn read_backends(&self) -> Result<Vec<(u32, Lb4Backend)>, DatapathError> {
        let mut out = Vec::new();
        for (id, b) in self.backends.iter().enumerate() {
            let b = b.map_err(map_err(MAP_LB4_BACKENDS))?;
            if b.state != lb_common::BACKEND_STATE_FREE {
                out.push((id as u32, b));
            }
        }
        Ok(out)
    }

    /// Global counters summed over CPUs, indexed as `lb_common::counters`.
    pub fn read_counters(&self) -> Result<Vec<u64>, DatapathError> {
        (0..counters::COUNT)
            .map(|i| self.counters.get(&i, 0).map(|v| v.iter().sum()).map_err(map_err(MAP_LB_COUNTERS)))
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

    fn set_backend(&mut self, id: u32, backend: &Lb4Backend) -> Result<(), MapError> {
        self.backends.set(id, backend, 0)
    }

    fn set_maglev(&mut self, offset: u32, table: &[u32]) -> Result<(), MapError> {
        self.maglev.write(offset, table)
    }

    fn set_service(&mut self, key: &Lb4ServiceKey, svc: &Lb4Service) -> Result<(), MapError> {
        self.services.insert(key, svc, 0)
    }

    fn set_frontend_meta(&mut self, id: u32, meta: &Lb4FrontendMeta) -> Result<(), MapError> {
        self.meta.set(id, meta, 0)
    }

    fn remove_service(&mut self, key: &Lb4ServiceKey) -> Result<(), MapError> {
        match self.services.remove(key) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other,
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
            match self.affinity.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The loaded programs and their attachments.
pub struct Datapath {
    ebpf: Ebpf,
    mode: Mode,
    links_dir: PathBuf,
    /// Interface name → the pins of the links this agent attached (or took over) there.
    attached: StdHashMap<String, Vec<PathBuf>>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Datapath {
    /// Loads the programs; maps already pinned under `cfg.pin_dir` are reused, others are
    /// created and pinned there.
    pub fn load(cfg: &Config, mode: Mode) -> Result<(Self, Maps), DatapathError> {
        let others = other_layouts(&cfg.pin_dir);
        if !others.is_empty() {
            return Err(DatapathError::OtherLayout { pin_dir: cfg.pin_dir.clone(), found: others });
        }
        let dir = layout_dir(&cfg.pin_dir);
        let links_dir = dir.join("links");
        std::fs::create_dir_all(&links_dir)
            .map_err(|source| DatapathError::PinDir { path: links_dir.clone(), source })?;
        // Pins are root's only.
        for d in [&cfg.pin_dir, &dir, &links_dir] {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
        }
        let secs = |s: u64| s.saturating_mul(1_000_000_000);
        let (syn, est, close, udp) = (
            secs(cfg.ct_timeout_tcp_syn_secs),
            secs(cfg.ct_timeout_tcp_established_secs),
            secs(cfg.ct_timeout_tcp_close_secs),
            secs(cfg.ct_timeout_udp_secs),
        );
        let log_level: u8 = if cfg.bpf_log { 0xff } else { 0 };
        let hairpin = u32::from_ne_bytes(cfg.hairpin_addr.octets());
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_max_entries(MAP_LB4_SERVICES, cfg.services)
            .map_max_entries(MAP_LB4_SVC_STATS, cfg.services)
            .map_max_entries(MAP_LB4_BACKENDS, cfg.backends)
            .map_max_entries(MAP_LB4_MAGLEV, cfg.maglev_slots.div_ceil(2))
            .map_max_entries(MAP_LB4_CT, cfg.ct_entries)
            .map_max_entries(MAP_LB4_AFFINITY, cfg.affinity_entries)
            .override_global(globals::CT_TIMEOUT_TCP_SYN_NS, &syn, true)
            .override_global(globals::CT_TIMEOUT_TCP_EST_NS, &est, true)
            .override_global(globals::CT_TIMEOUT_TCP_CLOSE_NS, &close, true)
            .override_global(globals::CT_TIMEOUT_UDP_NS, &udp, true)
            .override_global(globals::FLOW_HASH_SEED, &cfg.flow_hash_seed, true)
            .override_global(globals::HAIRPIN_ADDR, &hairpin, true)
            .override_global(aya_log::LEVEL, &log_level, true)
            .load(LB_OBJECT)
            .map_err(|source| DatapathError::Load {
                pin_dir: cfg.pin_dir.clone(),
                source: Box::new(source),
            })?;
        let logger = if cfg.bpf_log { aya_log::EbpfLogger::init(&mut ebpf).ok() } else { None };
        let maps = Maps::take(&mut ebpf)?;
        for name in [PROG_TC_FORWARD, PROG_TC_REPLY] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .expect("object has the program")
                .try_into()
                .map_err(|source| DatapathError::Program { program: name, source })?;
            prog.load().map_err(|source| DatapathError::Program { program: name, source })?;
        }
        if mode == Mode::Xdp {
            let prog: &mut Xdp = ebpf
                .program_mut(PROG_XDP_FORWARD)
                .expect("object has the program")
                .try_into()
                .map_err(|source| DatapathError::Program { program: PROG_XDP_FORWARD, source })?;
            prog.load().map_err(|source| DatapathError::Program { program: PROG_XDP_FORWARD, source })?;
        }
        Ok((Self { ebpf, mode, links_dir, attached: StdHashMap::new(), logger }, maps))
    }

    /// The loaded program, for BPF_PROG_TEST_RUN.
    pub fn tc_program(&self, name: &str) -> Option<&SchedClassifier> {
        self.ebpf.program(name).and_then(|p| p.try_into().ok())
    }

    pub fn xdp_program(&self) -> Option<&Xdp> {
        self.ebpf.program(PROG_XDP_FORWARD).and_then(|p| p.try_into().ok())
    }

    /// Forwards pending kernel-side log records (only with `bpf_log`).
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    pub fn is_attached(&self, interface: &str) -> bool {
        self.attached.contains_key(interface)
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// The programs attached on each interface in the current mode.
    fn wanted(&self) -> [&'static str; 2] {
        match self.mode {
            Mode::Tc => [PROG_TC_FORWARD, PROG_TC_REPLY],
            Mode::Xdp => [PROG_XDP_FORWARD, PROG_TC_REPLY],
        }
    }

    /// Attaches the forward program (TC ingress or XDP) and the reply program (TC egress), each
    /// through a link pinned under `links/`, so it stays attached while the agent is away. A link
    /// pinned by an earlier agent is taken over: the new program replaces the old one in it
    /// atomically, and no packet goes unhandled.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        if self.is_attached(interface) {
            return Ok(());
        }
        // Links of programs this mode does not use (the other --datapath) are removed.
        for prog in [PROG_TC_FORWARD, PROG_XDP_FORWARD] {
            if !self.wanted().contains(&prog) {
                let _ = std::fs::remove_file(self.link_pin(interface, prog));
            }
        }
        let mut pins = Vec::new();
        for prog in self.wanted() {
            let pin = self.link_pin(interface, prog);
            if !self.take_over(prog, &pin) {
                // Not pinned, or pinned but defunct (its interface was recreated): attach anew.
                let _ = std::fs::remove_file(&pin);
                if let Err(e) = self.attach_new(interface, prog, &pin) {
                    for p in &pins {
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(e);
                }
            }
            pins.push(pin);
        }
        self.attached.insert(interface.to_string(), pins);
        Ok(())
    }

    /// bpffs refuses names with a '.', which interface names may have (VLANs); ':' is one
    /// character an interface name never has, so it stands in for it.
    fn link_pin(&self, interface: &str, prog: &str) -> PathBuf {
        self.links_dir.join(format!("{}@{prog}", interface.replace('.', ":")))
    }

    /// Puts our program into the link pinned at `pin`. False if there is none or it is defunct.
    fn take_over(&mut self, prog: &'static str, pin: &Path) -> bool {
        let Ok(pinned) = PinnedLink::from_pin(pin) else { return false };
        let fd = FdLink::from(pinned);
        let program = self.ebpf.program_mut(prog).expect("object has the program");
        let id = if prog == PROG_XDP_FORWARD {
            let Ok(link) = XdpLink::try_from(fd) else { return false };
            let Ok(p) = <&mut Xdp>::try_from(program) else { return false };
            p.attach_to_link(link).ok().map(|id| p.take_link(id).map(drop).is_ok())
        } else {
            let Ok(link) = SchedClassifierLink::try_from(fd) else { return false };
            let Ok(p) = <&mut SchedClassifier>::try_from(program) else { return false };
            p.attach_to_link(link).ok().map(|id| p.take_link(id).map(drop).is_ok())
        };
        // Dropping our handle leaves the link to its pin.
        id.unwrap_or(false)
    }

    fn attach_new(&mut self, interface: &str, prog: &'static str, pin: &Path) -> Result<(), DatapathError> {
        let attach_err =
            |source| DatapathError::Attach { program: prog, interface: interface.to_string(), source };
        let pin_err = |reason: String| DatapathError::PinLink {
            program: prog,
            interface: interface.to_string(),
            path: pin.to_path_buf(),
            reason,
        };
        let program = self.ebpf.program_mut(prog).expect("object has the program");
        let fd: FdLink = if prog == PROG_XDP_FORWARD {
            let p: &mut Xdp = program.try_into().map_err(attach_err)?;
            let id = p.attach(interface, XdpMode::Default).map_err(attach_err)?;
            p.take_link(id).map_err(attach_err)?.try_into().map_err(|e| pin_err(format!("{e}")))?
        } else {
            let p: &mut SchedClassifier = program.try_into().map_err(attach_err)?;
            let at = if prog == PROG_TC_REPLY { TcAttachType::Egress } else { TcAttachType::Ingress };
            let id = p.attach(interface, at).map_err(attach_err)?;
            p.take_link(id).map_err(attach_err)?.try_into().map_err(|e| pin_err(format!("{e}")))?
        };
        fd.pin(pin).map_err(|e| pin_err(e.to_string()))?;
        Ok(())
    }

    /// Whether this agent's pins are all in place: the pin directory can be removed, or bpffs
    /// unmounted, under a running agent. The links live only in their pins, so the programs are
    /// detached then; the maps live on in this agent's handles.
    pub fn pins_present(&self) -> bool {
        self.links_dir.parent().is_some_and(|d| d.join(MAP_LB4_SERVICES).exists())
            && self.attached.values().flatten().all(|p| p.exists())
    }

    /// Pins every map again where it was and forgets every attachment (its link went with its
    /// pin), for the caller to attach afresh. Tracked flows, Maglev tables and counters are kept:
    /// the maps never went away.
    pub fn repin(&mut self, maps: &Maps) -> Result<(), DatapathError> {
        let dir = self.links_dir.parent().expect("the layout directory").to_path_buf();
        std::fs::create_dir_all(&self.links_dir)
            .map_err(|source| DatapathError::PinDir { path: self.links_dir.clone(), source })?;
        for d in [dir.parent().unwrap_or(&dir), &dir, &self.links_dir] {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
        }
        let pin = |name: &'static str, data: &MapData| -> Result<(), DatapathError> {
            let path = dir.join(name);
            if path.exists() {
                return Ok(());
            }
            data.pin(&path).map_err(|e| DatapathError::PinMap { map: name, path, reason: e.to_string() })
        };
        pin(MAP_LB4_SERVICES, maps.services.map())?;
        pin(MAP_LB4_BACKENDS, maps.backends.map())?;
        if let Some(data) = &maps.maglev._data {
            pin(MAP_LB4_MAGLEV, data)?;
        }
        pin(MAP_LB4_CT, maps.ct.map())?;
        pin(MAP_LB_COUNTERS, maps.counters.map())?;
        pin(MAP_LB4_SVC_STATS, maps.svc_stats.map())?;
        pin(MAP_LB4_AFFINITY, maps.affinity.map())?;
        pin(MAP_LB4_FE_META, maps.meta.map())?;
        pin(MAP_LB_MONITOR, maps.monitor.map())?;
        for name in [MAP_LB_EVENTS, MAP_LB_MON_RATE] {
            let path = dir.join(name);
            if let (Some(map), false) = (self.ebpf.map(name), path.exists()) {
                map.pin(&path).map_err(|e| DatapathError::PinMap {
                    map: name,
                    path,
                    reason: e.to_string(),
                })?;
            }
        }
        self.attached.clear();
        Ok(())
    }

    /// Forgets an interface that went away (its links went with it; their pins are removed).
    pub fn forget(&mut self, interface: &str) {
        for pin in self.attached.remove(interface).unwrap_or_default() {
            let _ = std::fs::remove_file(pin);
        }
    }

    /// Removes pins of links on interfaces that no longer exist (left by an agent that was away
    /// while they went).
    pub fn prune_links(&mut self, present: &[String]) {
        for e in std::fs::read_dir(&self.links_dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let iface = name.rsplit_once('@').map_or(name.as_str(), |(i, _)| i).replace(':', ".");
            if !present.contains(&iface) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Interfaces of the current network namespace (through netlink, not /sys, which may show another
/// namespace).
pub fn interfaces() -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 {
            if let Ok(name) = std::ffi::CStr::from_ptr((*p).if_name).to_str() {
                out.push(name.to_string());
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// BPF_OBJ_GET with BPF_F_RDONLY: a read-only handle on a pinned map (aya opens pins read-write).
fn obj_get_read_only(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // union bpf_attr, BPF_OBJ_GET variant: pathname (u64), bpf_fd (u32), file_flags (u32),
    // path_fd (s32); the rest zero.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _rest: [u8; 108],
    }
    let attr = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
        path_fd: 0,
        _rest: [0; 108],
    };
    // SAFETY: a valid bpf_attr of the size passed; the path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
