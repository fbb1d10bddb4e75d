//! Every write the reconciler makes may fail. Whichever does, the reconciler's view stays equal to
//! the maps (no region, id or backend leaked, no table believed live that is not), and what failed
//! is written by [`Reconciler::retry`] without waiting for another change: the maps end as they
//! would have with no failure.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Lb4Affinity, Lb4AffinityKey, BACKEND_STATE_FREE, SVC_FLAG_TOMBSTONE};

use super::{
    alloc::REGION_GRACE_MS,
    encode::{self, backend_addr, backend_state, backend_value, frontend_addr, service_key},
    *,
};
use crate::model::Protocol;

fn be(last: u8) -> BackendAddr {
    BackendAddr { ip: std::net::Ipv4Addr::new(10, 244, 0, last).into(), port: 8080, proto: Protocol::Tcp }
}

fn frontend(service: &str, port: u16, last: &[u8], kept: &[(u8, BackendState)], affinity: u32) -> Frontend {
    Frontend {
        addr: FrontendAddr::new(std::net::Ipv4Addr::new(10, 96, 0, 1), port, Protocol::Tcp),
        kind: crate::model::FrontendKind::ClusterIp,
        service: format!("default/{service}"),
        port_name: String::new(),
        backends: last.iter().map(|l| be(*l)).collect(),
        kept: kept.iter().map(|(l, s)| (be(*l), *s)).collect(),
        affinity_timeout_secs: affinity,
        local_only: false,
        two_scopes: false,
        source_ranges: None,
    }
}

fn addr(port: u16) -> FrontendAddr {
    frontend("x", port, &[], &[], 0).addr
}

enum Step {
    /// A full sync (files mode, a relist) with these Services held.
    Sync(Vec<Frontend>, &'static [&'static str]),
    /// An incremental change (kube mode): changed frontends, removed addresses.
    Apply(Vec<Frontend>, Vec<u16>),
    /// The end of a sweep pass that found no flow.
    Sweep(u64),
    /// The agent restarts: a new reconciler restored from the maps.
    Restart,
    /// A client gets ClientIP affinity to backend `.0` of the frontend at port `.1` (the datapath
    /// writes it).
    Affinity(u8, u16),
}

/// New Services, a table change with a new backend, a removal, a change of kept endpoints only,
/// a restart, members departing, affinity forgotten, an address taken by a tombstone and then by
/// another Service, a held Service, tombstones and departures swept, everything removed but one
/// new one.
fn scenario() -> Vec<Step> {
    use BackendState::Serving;
    let (a1, c1) = (frontend("a", 80, &[1, 2, 3, 6], &[(4, Serving)], 0), frontend("c", 82, &[5], &[], 30));
    vec![
        Step::Sync(
            vec![frontend("a", 80, &[1, 2, 3], &[], 0), frontend("b", 81, &[2, 4], &[], 0), c1.clone()],
            &[],
        ),
        Step::Apply(vec![frontend("a", 80, &[1, 2, 3, 6], &[], 0)], vec![81]),
        Step::Restart,
        Step::Apply(vec![a1.clone()], vec![]),
        Step::Sync(vec![a1, c1, frontend("d", 81, &[8], &[], 0)], &[]),
        Step::Affinity(5, 82),
        Step::Sync(
            vec![
                frontend("a", 80, &[1, 6], &[], 0),
                frontend("c", 82, &[7], &[], 30),
                frontend("d", 81, &[8], &[], 0),
            ],
            &[],
        ),
        Step::Sync(
            vec![frontend("e", 80, &[9, 1], &[], 0), frontend("d", 81, &[8, 2], &[], 0)],
            &["default/c"],
        ),
        Step::Sweep(1),
        Step::Apply(vec![frontend("f", 83, &[1, 2], &[], 0)], vec![80, 81]),
        Step::Sweep(2),
    ]
}

/// Runs the scenario with `maps` failing as set, retrying after every other step as the agent's
/// sweep tick does (so a failure also meets the next change before its retry), and checking the
/// view after every call. Then lets every write succeed and retries until nothing is pending.
fn run(maps: &mut MemoryMaps, case: &str) -> Reconciler {
    let caps = Capacities { services: 32, backends: 32, maglev_slots: 1 << 14, ..Capacities::default() };
    let clock = || {
        let t = std::sync::atomic::AtomicU64::new(0);
        Box::new(move || t.fetch_add(REGION_GRACE_MS, std::sync::atomic::Ordering::Relaxed)) as Clock
    };
    let mut r = Reconciler::new(caps, Options::default()).with_clock(clock());
    for (i, step) in scenario().into_iter().enumerate() {
        let case = format!("{case}, step {i}");
        match step {
            Step::Sync(fes, held) => {
                let desired = fes.into_iter().map(|f| (f.addr, f)).collect();
                let held = held.iter().map(ToString::to_string).collect();
                r.sync(&desired, &held, maps);
            }
            Step::Apply(fes, removed) => {
                let changed: BTreeMap<_, _> = fes.into_iter().map(|f| (f.addr, f)).collect();
                let removed: Vec<FrontendAddr> = removed.into_iter().map(addr).collect();
                r.apply(changed.iter(), &removed, maps);
            }
            Step::Sweep(pass) => {
                r.begin_pass(pass);
                r.release_idle(&FlowCensus::new(pass), maps);
            }
            Step::Restart => {
                r = Reconciler::restore(caps, Options::default(), maps.restored()).with_clock(clock());
            }
            Step::Affinity(backend, port) => {
                let svc = maps.services.get(&service_key(&addr(port))).copied();
                if let (Some(svc), Some((bid, _))) = (svc, r.backends.get(&be(backend))) {
                    let value = Lb4Affinity { last_used_ns: 1, backend_id: *bid, _pad: 0 };
                    maps.affinity.insert(Lb4AffinityKey { client: 1, svc_id: svc.id }, value);
                }
            }
        }
        assert_view(&r, maps, &case);
        if i % 2 == 1 && r.has_pending() {
            r.retry(maps);
            assert_view(&r, maps, &format!("{case}, retried"));
        }
    }
    maps.fail_write = None;
    for _ in 0..3 {
        if r.has_pending() {
            r.retry(maps);
        }
    }
    assert!(!r.has_pending(), "{case}: still pending after the writes work again");
    // Tombstones made by the retries go with the next pass.
    r.begin_pass(3);
    r.release_idle(&FlowCensus::new(3), maps);
    assert_view(&r, maps, &format!("{case}, recovered"));
    r
}

/// The reconciler's view equals the maps.
fn assert_view(r: &Reconciler, maps: &MemoryMaps, case: &str) {
    // Service entries: live frontends and the tombstones that have an address, nothing else.
    let mut want: BTreeMap<ServiceKey, (u32, bool, Option<Region>)> = BTreeMap::new();
    for (a, p) in &r.frontends {
        want.insert(service_key(a), (p.id, false, p.region));
    }
    for (id, t) in &r.tombstones {
        if let Some(a) = t.addr {
            let clash = want.insert(service_key(&a), (*id, true, None));
            assert!(clash.is_none(), "{case}: tombstone {id} and {clash:?} at {a}");
        }
    }
    let have: BTreeMap<ServiceKey, (u32, bool, Option<Region>)> = maps
        .services
        .iter()
        .map(|(k, s)| {
            let tomb = s.flags & SVC_FLAG_TOMBSTONE != 0;
            (*k, (s.id, tomb, encode::service_region(s)))
        })
        .collect();
    assert_eq!(want, have, "{case}: service entries (id, tombstone, region)");
    // Frontend ids: each live frontend's and tombstone's, once.
    let ids: BTreeSet<u32> = r.frontends.values().map(|p| p.id).chain(r.tombstones.keys().copied()).collect();
    assert_eq!(ids.len(), r.frontends.len() + r.tombstones.len(), "{case}: an id used twice");
    assert_eq!(r.frontend_ids.in_use(), ids.len(), "{case}: frontend ids leaked or lost");
    // Regions: the live tables' and the cooling ones, no other.
    let live: u32 = r.frontends.values().filter_map(|p| p.region).map(|g| g.size).sum();
    assert_eq!(r.regions.used(), live + r.regions.cooling(), "{case}: table regions leaked or lost");
    // Backends: the ones with an id, in the state believed written; the others free.
    let want: BTreeMap<u32, (BackendAddr, u8)> =
        r.backends.iter().map(|(b, (id, s))| (*id, (*b, *s))).collect();
    let have: BTreeMap<u32, (BackendAddr, u8)> = maps
        .backends
        .iter()
        .filter(|(_, b)| b.state() != BACKEND_STATE_FREE)
        .map(|(id, b)| (*id, (backend_addr(b).expect("an address"), b.state())))
        .collect();
    assert_eq!(want, have, "{case}: backends");
    assert_eq!(r.backend_ids.in_use(), r.backends.len(), "{case}: backend ids leaked or lost");
    for (b, (id, s)) in &r.backends {
        assert_eq!(maps.backends[id], backend_value(b, *s), "{case}: backend {id}");
    }
    // Member rows, and who uses each backend.
    let mut want = BTreeMap::new();
    let mut users: HashMap<BackendAddr, super::Users> = HashMap::new();
    for (id, rows) in &r.members {
        for (b, state) in rows {
            let bid = r.backends[b].0;
            want.insert(MemberKey::of(*id, bid, b), encode::member(*id, bid, b, *state).1.state());
            users.entry(*b).or_default().insert(*id, backend_state(*state));
        }
    }
    let have: BTreeMap<_, _> = maps.members.iter().map(|(k, m)| (*k, m.state())).collect();
    assert_eq!(want, have, "{case}: member rows");
    assert_eq!(users, r.users, "{case}: users of backends");
    // A published table names only active backends that are active members; but not a table
    // whose removal failed midway (its rows may drain, its backends terminate: it goes, and until
    // then new flows through it are dropped), which is pending or a removal, or restored and not
    // yet synced (the agent's first sync after a restart settles it).
    for (a, p) in &r.frontends {
        let settled = p.frontend.is_some() && !r.removals.contains(a) && !r.pending.contains(a);
        let Some(g) = p.region.filter(|_| settled) else { continue };
        for slot in g.offset..g.offset + g.size {
            let id = maps.maglev[&slot];
            assert_eq!(
                maps.backends[&id].state(),
                lb_common::BACKEND_STATE_ACTIVE,
                "{case}: {a}: slot {slot}"
            );
            let key = match a.vip {
                std::net::IpAddr::V4(_) => {
                    MemberKey::V4(lb_common::Lb4MemberKey { svc_id: p.id, backend_id: id })
                }
                std::net::IpAddr::V6(_) => {
                    MemberKey::V6(lb_common::Lb4MemberKey { svc_id: p.id, backend_id: id })
                }
            };
            let m = maps.members.get(&key).map(|m| m.state());
            assert_eq!(m, Some(lb_common::MEMBER_ACTIVE), "{case}: {a}: member {id}");
        }
    }
    // Each live frontend not waiting for a retry has the rows and the record of its table.
    for (a, p) in &r.frontends {
        let Some(fe) = &p.frontend else { continue };
        if r.pending.contains(a) {
            continue;
        }
        let (rows, _) = r.rows_for(p.id, fe);
        // (A kept endpoint without a backend id gets no row: no flow can name it.)
        for (b, s) in rows.iter().filter(|(b, _)| r.backends.contains_key(b)) {
            assert_eq!(r.members[&p.id].get(b), Some(s), "{case}: {a}: row of {b}");
        }
        let size = maglev::table_size(fe.backends.len(), r.opts.max_table_size);
        let meta = maps.meta.get(&p.id).expect("recorded");
        assert_eq!(meta.digest, digest(fe, size, r.opts.maglev_seed), "{case}: {a}: digest");
        assert_eq!(meta.name(), frontend_name(fe), "{case}: {a}: name");
    }
}

/// What the maps say, by address rather than id (ids may differ after a failure): each entry's
/// table as backend addresses, member rows, backend states.
type Decoded = (
    BTreeMap<FrontendAddr, (bool, BTreeMap<BackendAddr, usize>)>,
    BTreeSet<(Option<FrontendAddr>, BackendAddr, u8)>,
    BTreeSet<(BackendAddr, u8)>,
    BTreeSet<(FrontendAddr, Option<BackendAddr>)>,
);

fn decoded(maps: &MemoryMaps) -> Decoded {
    let backend = |id: &u32| backend_addr(&maps.backends[id]).expect("a backend");
    let mut at = BTreeMap::new();
    let services = maps
        .services
        .iter()
        .map(|(k, s)| {
            let a = frontend_addr(k).expect("an address");
            at.insert(s.id, a);
            // Slots per backend (a table is a function of its backends and size).
            let mut table = BTreeMap::new();
            for i in s.maglev_offset..s.maglev_offset + s.maglev_size {
                *table.entry(backend(&maps.maglev[&i])).or_insert(0) += 1;
            }
            (a, (s.flags & SVC_FLAG_TOMBSTONE != 0, table))
        })
        .collect();
    let members = maps
        .members
        .iter()
        .map(|(k, m)| (at.get(&k.pair().svc_id).copied(), backend(&k.pair().backend_id), m.state()))
        .collect();
    let backends = maps
        .backends
        .values()
        .filter(|b| b.state() != BACKEND_STATE_FREE)
        .map(|b| (backend_addr(b).expect("a backend"), b.state()))
        .collect();
    // The affinity written in the scenario is forgotten when its backend leaves.
    let affinity = maps
        .affinity
        .iter()
        .filter_map(|(k, a)| Some((*at.get(&k.svc_id)?, backend_addr(&maps.backends[&a.backend_id]))))
        .collect();
    (services, members, backends, affinity)
}

#[test]
fn whichever_write_fails_the_view_equals_the_maps_and_a_retry_completes_the_change() {
    let mut clean = MemoryMaps::default();
    run(&mut clean, "no failure");
    let want = decoded(&clean);
    assert_eq!(want.0.len(), 2, "the scenario ends with two Services: {:?}", want.0);
    assert!(clean.log.iter().any(|l| l.starts_with("forget affinity")), "affinity is forgotten");
    clean.assert_consistent();
    let writes = clean.writes;
    assert!(writes > 50, "the scenario writes {writes} times");
    for fail_from in [false, true] {
        for n in 0..writes {
            let case = if fail_from { format!("writes {n}.. fail") } else { format!("write {n} fails") };
            let mut maps = MemoryMaps::default();
            (maps.fail_write, maps.fail_from) = (Some(n), fail_from);
            run(&mut maps, &case);
            let got = decoded(&maps);
            assert_eq!(got.0, want.0, "{case}: service entries after recovery");
            assert_eq!(got.1, want.1, "{case}: member rows after recovery");
            assert_eq!(got.2, want.2, "{case}: backends after recovery");
            assert_eq!(got.3, want.3, "{case}: affinity after recovery");
            maps.assert_consistent();
        }
    }
}
