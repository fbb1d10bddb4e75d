//! TC programs as clsact qdisc filters over netlink, where the kernel has no TCX (before 6.6).
//!
//! A filter is not a pinnable link: it lives on its interface until deleted. lb attaches its
//! filters at a fixed priority and handle (the same in every layout version), replaces them in
//! place (a restart, a retry, another layout's agent taking over: never a second filter), and
//! records each in the pinned map `LB_TC_FILTERS` of its layout, so that a later agent knows which
//! filters are lb's and `--cleanup` deletes exactly those. A filter of another owner at lb's
//! priority and handle is never replaced: attaching there fails instead. The clsact qdisc is
//! created where missing and never removed (other owners' filters may hang on it).

use std::path::Path;

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        Link as _, ProgramError, SchedClassifier, TcAttachType,
    },
};
use lb_common::{LbTcFilter, LbTcFilterKey, MAP_LB_TC_FILTERS};

use super::{
    maps::map_err,
    netlink::{filters, links, qdisc_kind, Filter},
    DatapathError, TcOrder,
};

/// lb's filter handle (`tc filter … handle 0x1b`), at every priority.
pub const HANDLE: u32 = 0x1b;
/// Priorities: lb first among the filters of its direction (lower runs first), or last.
pub const PRIORITY_FIRST: u16 = 1;
pub const PRIORITY_LAST: u16 = 0xfff0;

/// The records of a layout: which filters are lb's.
pub type Records = HashMap<MapData, LbTcFilterKey, LbTcFilter>;

/// Opens the records pinned in layout directory `dir`, if there are any.
pub fn open(dir: &Path) -> Option<Records> {
    let data = MapData::from_pin(dir.join(MAP_LB_TC_FILTERS)).ok()?;
    Map::from_map_data(data).ok()?.try_into().ok()
}

/// Whether layout directory `dir` records any filter (its programs serve, or served, through it).
pub fn any_recorded(dir: &Path) -> bool {
    open(dir).is_some_and(|r| r.keys().filter_map(Result::ok).any(|k| k != NAMESPACE))
}

/// Whether `name` is one of lb's TC programs (as a filter names it: any layout version's).
fn is_lb(name: &str) -> bool {
    name.starts_with("lb4_tc_")
}

/// The BPF filter at `priority` and `handle` on interface `index`, `at`, as the kernel has it.
fn filter_at(index: u32, at: TcAttachType, priority: u16, handle: u32) -> std::io::Result<Option<Filter>> {
    Ok(filters(index, at == TcAttachType::Egress)?
        .into_iter()
        .find(|f| f.priority == priority && f.handle == handle))
}

/// Whether the filter at `priority` and `handle` is lb's: false when there is none or it is
/// another owner's. A failed dump tells nothing: its error.
fn lb_at(index: u32, at: TcAttachType, priority: u16, handle: u32) -> std::io::Result<bool> {
    Ok(filter_at(index, at, priority, handle)?.is_some_and(|f| is_lb(&f.name)))
}

/// Whether lb's filter of `program` on `interface` at `at` is in place with this very program
/// (`program_id`) and recorded under the interface's present index: false when it is not (no
/// record: the interface was made again under its name, say), `None` when that cannot be told
/// (the dump failed, or the interface is gone).
pub fn in_place(records: &Records, interface: &str, at: TcAttachType, program_id: u32) -> Option<bool> {
    let index = ifindex(interface)?;
    let Some(r) = recorded(records, interface, at) else { return Some(false) };
    let f = filter_at(index, at, r.priority as u16, r.handle).ok()?;
    Some(f.is_some_and(|f| f.program_id == program_id))
}

fn key(ifindex: u32, at: TcAttachType) -> LbTcFilterKey {
    LbTcFilterKey { ifindex, egress: u32::from(at == TcAttachType::Egress) }
}

pub(super) fn ifindex(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

fn ifname(interface: &str) -> [u8; 16] {
    let mut n = [0u8; 16];
    for (d, s) in n.iter_mut().zip(interface.bytes().take(15)) {
        *d = s;
    }
    n
}

/// The filter lb recorded on `interface` at `at`, in `records`.
pub fn recorded(records: &Records, interface: &str, at: TcAttachType) -> Option<LbTcFilter> {
    let r = records.get(&key(ifindex(interface)?, at), 0).ok()?;
    // An interface index reused by another interface: not its filter.
    (r.ifname == ifname(interface)).then_some(r)
}

/// Puts `prog` on `interface` at `at` as lb's filter at the priority `order` asks for: in place
/// of lb's filter there (recorded in `ours` or in one of `others`: an earlier agent's, of this
/// layout or another; other layouts' records of it go), else as a new filter at lb's priority and
/// handle. lb's filter at the other priority (`--tc-position` changed) is deleted once the new one
/// is in place: no packet meets neither (a few meet both meanwhile). Recorded in `ours`. True when
/// the interface had no filter of lb's before (a failure after it may delete it again).
pub fn attach(
    prog: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    at: TcAttachType,
    order: TcOrder,
    ours: &mut Records,
    others: &mut [Records],
) -> Result<bool, DatapathError> {
    let err = |source| DatapathError::Attach { program: name, interface: interface.to_string(), source };
    let io = |e: std::io::Error| err(tc::TcError::IoError(e).into());
    let listing =
        |e: std::io::Error| io(std::io::Error::other(format!("listing {interface}'s filters: {e}")));
    let index =
        ifindex(interface).ok_or_else(|| io(std::io::Error::other(format!("no interface {interface}"))))?;
    let (priority, other) = match order {
        TcOrder::First => (PRIORITY_FIRST, PRIORITY_LAST),
        TcOrder::Last => (PRIORITY_LAST, PRIORITY_FIRST),
    };
    // Which layout's record, if any: ours (None), or `others[i]` (Some(i)).
    let mut existing = recorded(ours, interface, at).map(|r| (r, None));
    if existing.is_none() {
        existing = others.iter().enumerate().find_map(|(i, o)| Some((recorded(o, interface, at)?, Some(i))));
    }
    let record = LbTcFilter { priority: u32::from(priority), handle: HANDLE, ifname: ifname(interface) };
    // One look at the filters, before anything is added (a dump that fails tells nothing:
    // attaching fails, the record stays). lb's filter at the other priority: `--tc-position`
    // changed since it was added (recorded, or its record lost).
    let present = filters(index, at == TcAttachType::Egress).map_err(listing)?;
    let lb_there = |p: u16| {
        present.iter().find(|f| f.priority == p && f.handle == HANDLE).is_some_and(|f| is_lb(&f.name))
    };
    let moving = lb_there(other);
    // Replaced in place while the filter recorded at lb's place is still lb's (one deleted by
    // hand whose place another owner took is not replaced, nor is a place found empty: attached
    // anew below).
    let recorded_here = existing.is_some_and(|(r, _)| r.priority == record.priority && r.handle == HANDLE);
    let mut replaced = false;
    if recorded_here && lb_there(priority) {
        let link = SchedClassifierLink::attached(interface, at, priority, TcHandle::from(HANDLE), None)
            .map_err(io)?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // Ours to keep past this process: dropping a link deletes its filter.
                std::mem::forget(prog.take_link(id).map_err(err)?);
                replaced = true;
            }
            // Deleted meanwhile (its qdisc too, maybe): attached anew below. Still there, it keeps
            // serving with the program it has, and its record stays: the error, for a later try.
            Err(e) => {
                if lb_at(index, at, priority, HANDLE).map_err(listing)? {
                    return Err(err(e));
                }
            }
        }
    }
    if !replaced {
        if recorded_here && existing.is_some_and(|(_, from)| from.is_none()) {
            // Not lb's in place any more: the record goes, whether or not adding works.
            let _ = ours.remove(&key(index, at));
        }
        // lb's own filter found there with its record lost counts as replaced.
        replaced = add(prog, name, interface, index, at, priority)?;
    }
    let fresh = !replaced && !moving && existing.is_none();
    let written = ours.insert(key(index, at), record, 0).map_err(map_err(MAP_LB_TC_FILTERS));
    if let Err(e) = written.and_then(|()| record_namespace(ours)) {
        // Not recorded, a filter added here would be no one's: it goes again.
        if !replaced {
            let _ = delete_at(interface, at, priority, HANDLE);
            let _ = ours.remove(&key(index, at));
        }
        return Err(e);
    }
    // Ours stands for the filter now: no other layout's record may (removing that layout would
    // delete it).
    for o in others.iter_mut() {
        let _ = o.remove(&key(index, at));
    }
    // The new one runs first or last now (both pass on what they do not translate, and the
    // second finds nothing of a service in what the first translated); the old one goes. Until it
    // is gone, attaching fails and is tried again (which finds the new one recorded in place).
    if moving {
        delete_at(interface, at, other, HANDLE).map_err(|e| io(std::io::Error::other(e)))?;
        tracing::info!(
            interface,
            program = name,
            from = other,
            to = priority,
            "lb's filter moved to the priority --tc-position asks for"
        );
    }
    Ok(fresh)
}

/// Adds `prog` as a new filter at `priority` and lb's handle, creating the clsact qdisc where
/// missing. A filter there that is lb's own with its record lost (a program named as ours) is
/// replaced in place (true); another owner's is left alone, and adding fails.
fn add(
    prog: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    index: u32,
    at: TcAttachType,
    priority: u16,
) -> Result<bool, DatapathError> {
    let err = |source| DatapathError::Attach { program: name, interface: interface.to_string(), source };
    let io = |e: std::io::Error| err(tc::TcError::IoError(e).into());
    // The qdisc may be there already (ours from before, or another owner's). A legacy `ingress`
    // qdisc in its place takes filters for either direction into its one (ingress) block: lb's
    // reply program would run on arriving packets. Refused, saying what to do.
    let qdisc = tc::qdisc_add_clsact(interface).err();
    if qdisc.is_some() {
        if let Some(kind) = qdisc_kind(index).map_err(io)? {
            if kind != "clsact" {
                return Err(io(std::io::Error::other(format!(
                    "{interface} has a '{kind}' qdisc where lb needs clsact (replace it: `tc qdisc del dev \
                     {interface} {kind}; tc qdisc add dev {interface} clsact`, keeping its filters)"
                ))));
            }
        }
    }
    let options = NlOptions { priority, handle: TcHandle::from(HANDLE), ..Default::default() };
    let mut replaced = false;
    let attached = match prog.attach_with_options(interface, at, TcAttachOptions::Netlink(options)) {
        Ok(id) => Ok(id),
        Err(first) => match lb_at(index, at, priority, HANDLE) {
            Ok(true) => {
                replaced = true;
                SchedClassifierLink::attached(interface, at, priority, TcHandle::from(HANDLE), None)
                    .map_err(|e| ProgramError::from(tc::TcError::IoError(e)))
                    .and_then(|link| prog.attach_to_link(link))
            }
            _ => Err(first),
        },
    };
    let id = attached.map_err(|e| match &qdisc {
        Some(q) => io(std::io::Error::other(format!("{e} (adding the clsact qdisc: {q})"))),
        None => err(e),
    })?;
    // Ours to keep past this process: dropping a link deletes its filter.
    std::mem::forget(prog.take_link(id).map_err(err)?);
    Ok(replaced)
}

/// Deletes lb's filter on `interface` at `at` as `records` has it, then its record. The record
/// stays if the filter could not be deleted (for a later try, or `--cleanup`).
pub fn detach(records: &mut Records, interface: &str, at: TcAttachType) -> Result<(), String> {
    let Some(r) = recorded(records, interface, at) else { return Ok(()) };
    delete(interface, at, &r)?;
    if let Some(i) = ifindex(interface) {
        let _ = records.remove(&key(i, at));
    }
    Ok(())
}

fn delete(interface: &str, at: TcAttachType, r: &LbTcFilter) -> Result<(), String> {
    // The interface is gone (its filters went with it), the filter is gone already (deleted by
    // hand, or with its qdisc: then the kernel answers EINVAL, not ENOENT), or another owner's
    // now: nothing of lb's to delete. A failed dump tells nothing: the record stays.
    let Some(index) = ifindex(interface) else { return Ok(()) };
    match lb_at(index, at, r.priority as u16, r.handle) {
        Ok(true) => delete_at(interface, at, r.priority as u16, r.handle),
        Ok(false) => Ok(()),
        Err(e) => Err(format!("{interface}: listing its filters: {e}")),
    }
}

/// Deletes the filter at `priority` and `handle` on `interface`, whoever's it is.
fn delete_at(interface: &str, at: TcAttachType, priority: u16, handle: u32) -> Result<(), String> {
    let link = SchedClassifierLink::attached(interface, at, priority, TcHandle::from(handle), None)
        .map_err(|e| format!("{interface}: {e}"))?;
    match link.detach() {
        Ok(()) => Ok(()),
        // Already gone (deleted by hand, or with its qdisc).
        Err(e) if format!("{e:?}").contains("No such file") || format!("{e:?}").contains("ENOENT") => Ok(()),
        Err(e) => Err(format!("{interface}: deleting lb's filter: {e}")),
    }
}

fn name_of(r: &LbTcFilter) -> String {
    r.ifname.iter().take_while(|b| **b != 0).map(|b| *b as char).collect()
}

/// Deletes every filter `records` has, and the records: `--cleanup`, or a layout being removed.
/// Records of interfaces that are gone (their filters went with them) are dropped. `Err` names
/// the filters that could not be deleted (their records stay): one on an interface this network
/// namespace does not have under its index is one of them (run where the agent ran).
pub fn detach_all(records: &mut Records) -> Result<usize, Vec<String>> {
    let here = namespace();
    if let Some(there) = recorded_namespace(records) {
        if Some(there) != here {
            return Err(vec![format!(
                "lb's filters were recorded in another network namespace (inode {there}; this is {}): \
                 run where the agent ran (the host's)",
                here.map_or("unknown".to_string(), |h| h.to_string())
            )]);
        }
    }
    let all: Vec<(LbTcFilterKey, LbTcFilter)> = records.iter().filter_map(Result::ok).collect();
    let (mut n, mut left) = (0, Vec::new());
    for (k, r) in all {
        let name = name_of(&r);
        let at = if k.egress != 0 { TcAttachType::Egress } else { TcAttachType::Ingress };
        if k == NAMESPACE {
            continue;
        }
        if ifindex(&name) == Some(k.ifindex) {
            if let Err(e) = delete(&name, at, &r) {
                left.push(e);
                continue;
            }
            n += 1;
        }
        let _ = records.remove(&k);
    }
    if left.is_empty() {
        let _ = records.remove(&NAMESPACE);
        Ok(n)
    } else {
        Err(left)
    }
}

/// The reserved key under which the records say which network namespace their interface indexes
/// belong to (its inode, in `priority` (high half) and `handle` (low half)).
const NAMESPACE: LbTcFilterKey = LbTcFilterKey { ifindex: u32::MAX, egress: u32::MAX };

/// This process's network namespace (its inode).
fn namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self/ns/net").ok().map(|m| m.ino())
}

fn recorded_namespace(records: &Records) -> Option<u64> {
    let r = records.get(&NAMESPACE, 0).ok()?;
    Some((u64::from(r.priority) << 32) | u64::from(r.handle))
}

/// Records which network namespace the records' interface indexes belong to.
fn record_namespace(records: &mut Records) -> Result<(), DatapathError> {
    let Some(ns) = namespace() else { return Ok(()) };
    let value = LbTcFilter { priority: (ns >> 32) as u32, handle: ns as u32, ifname: [0; 16] };
    records.insert(NAMESPACE, value, 0).map_err(map_err(MAP_LB_TC_FILTERS))
}
/// Deletes lb's filters that no record names (an agent killed between adding a filter and
/// recording it): a program named as lb's at lb's priority and handle, on any interface of this
/// network namespace (the whole namespace: run `--cleanup` where the agent ran, the host's).
/// `--cleanup` only. The number deleted, or what could not be deleted (the rest is done).
pub fn delete_unrecorded() -> Result<usize, Vec<String>> {
    let (mut n, mut left) = (0, Vec::new());
    for link in links().map_err(|e| vec![format!("listing interfaces: {e}")])? {
        for at in [TcAttachType::Ingress, TcAttachType::Egress] {
            let found = match filters(link.index, at == TcAttachType::Egress) {
                Ok(f) => f,
                // Gone since it was listed: its filters went with it.
                Err(_) if ifindex(&link.name) != Some(link.index) => continue,
                Err(e) => {
                    left.push(format!("{}: listing its filters: {e}", link.name));
                    continue;
                }
            };
            for f in found {
                if is_lb(&f.name)
                    && f.handle == HANDLE
                    && [PRIORITY_FIRST, PRIORITY_LAST].contains(&f.priority)
                {
                    let r = LbTcFilter {
                        priority: u32::from(f.priority),
                        handle: HANDLE,
                        ifname: ifname(&link.name),
                    };
                    // Looked at again just before: another owner may have taken the place since.
                    match delete(&link.name, at, &r) {
                        Ok(()) => n += 1,
                        Err(e) => left.push(e),
                    }
                }
            }
        }
    }
    if left.is_empty() {
        Ok(n)
    } else {
        Err(left)
    }
}

/// Drops the records of interfaces that are gone.
pub fn prune(records: &mut Records) {
    let stale: Vec<LbTcFilterKey> = records
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, r)| *k != NAMESPACE && ifindex(&name_of(r)) != Some(k.ifindex))
        .map(|(k, _)| k)
        .collect();
    for k in stale {
        let _ = records.remove(&k);
    }
}
