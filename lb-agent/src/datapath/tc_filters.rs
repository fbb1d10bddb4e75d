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
        Link as _, SchedClassifier, TcAttachType,
    },
};
use lb_common::{LbTcFilter, LbTcFilterKey, MAP_LB_TC_FILTERS};

use super::{maps::map_err, DatapathError, TcOrder};

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

fn key(ifindex: u32, at: TcAttachType) -> LbTcFilterKey {
    LbTcFilterKey { ifindex, egress: u32::from(at == TcAttachType::Egress) }
}

fn ifindex(interface: &str) -> Option<u32> {
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

/// Puts `prog` on `interface` at `at` as lb's filter: in place of lb's filter there (recorded in
/// `ours` or in one of `others`: an earlier agent's, of this layout or another), else as a new
/// filter at lb's priority and handle. Recorded in `ours`. True when the filter is new.
pub fn attach(
    prog: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    at: TcAttachType,
    order: TcOrder,
    ours: &mut Records,
    others: &[Records],
) -> Result<bool, DatapathError> {
    let err = |source| DatapathError::Attach { program: name, interface: interface.to_string(), source };
    let io = |e: std::io::Error| err(tc::TcError::IoError(e).into());
    let index =
        ifindex(interface).ok_or_else(|| io(std::io::Error::other(format!("no interface {interface}"))))?;
    let existing = std::iter::once(&*ours).chain(others).find_map(|r| recorded(r, interface, at));
    let (fresh, priority, handle) = match existing {
        Some(r) => {
            let link = SchedClassifierLink::attached(
                interface,
                at,
                r.priority as u16,
                TcHandle::from(r.handle),
                None,
            )
            .map_err(io)?;
            let id = prog.attach_to_link(link).map_err(err)?;
            // Ours to keep past this process: dropping a link deletes its filter.
            std::mem::forget(prog.take_link(id).map_err(err)?);
            (false, r.priority as u16, r.handle)
        }
        None => {
            // The qdisc may be there already (ours from before, or another owner's).
            let _ = tc::qdisc_add_clsact(interface);
            let priority = match order {
                TcOrder::First => PRIORITY_FIRST,
                TcOrder::Last => PRIORITY_LAST,
            };
            let options = NlOptions { priority, handle: TcHandle::from(HANDLE), ..Default::default() };
            let id =
                prog.attach_with_options(interface, at, TcAttachOptions::Netlink(options)).map_err(err)?;
            std::mem::forget(prog.take_link(id).map_err(err)?);
            (true, priority, HANDLE)
        }
    };
    let record = LbTcFilter { priority: u32::from(priority), handle, ifname: ifname(interface) };
    ours.insert(key(index, at), record, 0).map_err(map_err(MAP_LB_TC_FILTERS))?;
    Ok(fresh)
}

/// Deletes lb's filter on `interface` at `at` as `records` has it, and its record.
pub fn detach(records: &mut Records, interface: &str, at: TcAttachType) {
    if let Some(r) = recorded(records, interface, at) {
        if let Ok(link) =
            SchedClassifierLink::attached(interface, at, r.priority as u16, TcHandle::from(r.handle), None)
        {
            let _ = link.detach();
        }
    }
    if let Some(i) = ifindex(interface) {
        let _ = records.remove(&key(i, at));
    }
}

/// Deletes every filter `records` has, and the records: `--cleanup`, or a move to TCX. Records
/// of interfaces that are gone (their filters went with them) are dropped. How many filters.
pub fn detach_all(records: &mut Records) -> usize {
    let all: Vec<(LbTcFilterKey, LbTcFilter)> = records.iter().filter_map(Result::ok).collect();
    let mut n = 0;
    for (k, r) in all {
        let name: String = r.ifname.iter().take_while(|b| **b != 0).map(|b| *b as char).collect();
        let at = if k.egress != 0 { TcAttachType::Egress } else { TcAttachType::Ingress };
        if ifindex(&name) == Some(k.ifindex) {
            if let Ok(link) =
                SchedClassifierLink::attached(&name, at, r.priority as u16, TcHandle::from(r.handle), None)
            {
                if link.detach().is_ok() {
                    n += 1;
                }
            }
        }
        let _ = records.remove(&k);
    }
    n
}

/// Drops the records of interfaces that are gone.
pub fn prune(records: &mut Records) {
    let stale: Vec<LbTcFilterKey> = records
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, r)| {
            let name: String = r.ifname.iter().take_while(|b| **b != 0).map(|b| *b as char).collect();
            ifindex(&name) != Some(k.ifindex)
        })
        .map(|(k, _)| k)
        .collect();
    for k in stale {
        let _ = records.remove(&k);
    }
}
