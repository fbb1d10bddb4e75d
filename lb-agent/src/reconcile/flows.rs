//! The flow sweep: a bounded background pass over the conntrack and affinity maps that removes
//! what has expired and counts the live flows of each frontend and member, so that the
//! reconciler can let tombstones and departed members go once nothing uses them.
//!
//! Who removes what: the datapath overwrites an expired forward entry when its tuple comes back,
//! and removes a reply entry it meets whose flow is gone. The sweep removes the rest: forward
//! entries idle past their timeout; reply entries whose forward entry is expired or names another
//! backend, or is gone while the reply entry is idle past its timeout (a reply entry is never
//! removed for its own idleness while its flow lives); and affinity entries past their Service's
//! timeout or of a frontend that is no longer live. Each step reads at most `budget` entries with
//! one batched
//! read and removes what it found (an entry is read again just before it is removed, so a packet
//! that refreshed it in between keeps it). Pure: the maps are reached through [`FlowTable`].
//! Each pass sweeps both families' maps (IPv4, then IPv6), with one rule written once over
//! [`CtKey`].

use std::collections::HashMap;

use lb_common::{
    Lb4Affinity, Lb4AffinityKey, Lb4CtEntry, Lb4CtKey, Lb6AffinityKey, Lb6CtEntry, Lb6CtKey, CT_DIR_FORWARD,
    CT_STATE_ESTABLISHED, CT_STATE_SYN, IPPROTO_UDP,
};

/// Batched access to one family's flow maps (conntrack and affinity), by its conntrack key type.
pub trait FlowTable<K: CtKey = Lb4CtKey> {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Appends up to `max` conntrack entries to `out`, starting at `cursor` (`None`: the start).
    /// Returns where to go on, or `None` once the end of the table was read.
    fn ct_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(K, K::Entry)>,
    ) -> Result<Option<u32>, Self::Error>;
    fn ct_get(&self, key: &K) -> Result<Option<K::Entry>, Self::Error>;
    /// Removes an entry (absent is fine).
    fn ct_remove(&mut self, key: &K) -> Result<(), Self::Error>;
    /// As `ct_batch`, for the affinity map.
    fn affinity_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(K::AffinityKey, Lb4Affinity)>,
    ) -> Result<Option<u32>, Self::Error>;
    /// Removes an entry (absent is fine).
    fn affinity_remove(&mut self, key: &K::AffinityKey) -> Result<(), Self::Error>;
}

/// Both families' flow maps, with one error type: what the sweep works on.
pub trait FlowTables:
    FlowTable<Lb4CtKey> + FlowTable<Lb6CtKey, Error = <Self as FlowTable<Lb4CtKey>>::Error>
{
}

impl<T> FlowTables for T where
    T: FlowTable<Lb4CtKey> + FlowTable<Lb6CtKey, Error = <T as FlowTable<Lb4CtKey>>::Error>
{
}

/// The error of a [`FlowTables`].
pub type FlowError<T> = <T as FlowTable<Lb4CtKey>>::Error;

/// What the sweep reads of a conntrack entry, whatever its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryView {
    pub last_seen_ns: u64,
    pub created_s: u32,
    pub snat_port: u16,
    pub state: u8,
    pub svc_id: u32,
    pub backend_id: u32,
}

/// A conntrack key of one family, with its entry and affinity key types: what the sweep's rule
/// needs of them.
pub trait CtKey: Copy + Ord + std::fmt::Debug {
    type Entry: Copy + std::fmt::Debug;
    type AffinityKey: Copy + Ord + std::fmt::Debug;
    fn dir(&self) -> u8;
    fn proto(&self) -> u8;
    fn dport(&self) -> u16;
    fn sport(&self) -> u16;
    /// The forward entry's key of the flow reply entry `self` (holding `e`) belongs to.
    fn forward_of_reply(&self, e: &Self::Entry) -> Self;
    /// Whether forward entry `fwd` still names the backend this reply key is from.
    fn names_backend_of(&self, fwd: &Self::Entry) -> bool;
    fn view(e: &Self::Entry) -> EntryView;
    fn affinity_svc(k: &Self::AffinityKey) -> u32;
}

impl CtKey for Lb4CtKey {
    type Entry = Lb4CtEntry;
    type AffinityKey = Lb4AffinityKey;
    fn dir(&self) -> u8 {
        self.dir
    }
    fn proto(&self) -> u8 {
        self.proto
    }
    fn dport(&self) -> u16 {
        self.dport
    }
    fn sport(&self) -> u16 {
        self.sport
    }
    fn forward_of_reply(&self, e: &Lb4CtEntry) -> Self {
        Lb4CtKey::forward_of_reply(self, e)
    }
    fn names_backend_of(&self, fwd: &Lb4CtEntry) -> bool {
        fwd.nat_addr == self.saddr && fwd.nat_port == self.sport
    }
    fn view(e: &Lb4CtEntry) -> EntryView {
        EntryView {
            last_seen_ns: e.last_seen_ns,
            created_s: e.created_s,
            snat_port: e.snat_port,
            state: e.state,
            svc_id: e.svc_id,
            backend_id: e.backend_id,
        }
    }
    fn affinity_svc(k: &Lb4AffinityKey) -> u32 {
        k.svc_id
    }
}

impl CtKey for Lb6CtKey {
    type Entry = Lb6CtEntry;
    type AffinityKey = Lb6AffinityKey;
    fn dir(&self) -> u8 {
        self.dir
    }
    fn proto(&self) -> u8 {
        self.proto
    }
    fn dport(&self) -> u16 {
        self.dport
    }
    fn sport(&self) -> u16 {
        self.sport
    }
    fn forward_of_reply(&self, e: &Lb6CtEntry) -> Self {
        Lb6CtKey::forward_of_reply(self, e)
    }
    fn names_backend_of(&self, fwd: &Lb6CtEntry) -> bool {
        fwd.nat_addr == self.saddr && fwd.nat_port == self.sport
    }
    fn view(e: &Lb6CtEntry) -> EntryView {
        EntryView {
            last_seen_ns: e.last_seen_ns,
            created_s: e.created_s,
            snat_port: e.snat_port,
            state: e.state,
            svc_id: e.svc_id,
            backend_id: e.backend_id,
        }
    }
    fn affinity_svc(k: &Lb6AffinityKey) -> u32 {
        k.svc_id
    }
}

/// The datapath's conntrack timeouts, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn: u64,
    pub tcp_established: u64,
    pub tcp_close: u64,
    pub udp: u64,
}

impl Timeouts {
    pub fn from_secs(tcp_syn: u64, tcp_established: u64, tcp_close: u64, udp: u64) -> Self {
        let ns = |s: u64| s.saturating_mul(1_000_000_000);
        Self {
            tcp_syn: ns(tcp_syn),
            tcp_established: ns(tcp_established),
            tcp_close: ns(tcp_close),
            udp: ns(udp),
        }
    }

    /// The datapath's rule (`ct_timeout_ns` in lb-ebpf).
    pub fn of(&self, proto: u8, state: u8) -> u64 {
        if proto == IPPROTO_UDP {
            return self.udp;
        }
        match state {
            CT_STATE_SYN => self.tcp_syn,
            CT_STATE_ESTABLISHED => self.tcp_established,
            _ => self.tcp_close,
        }
    }

    fn expired<K: CtKey>(&self, key: &K, e: &K::Entry, now: u64) -> bool {
        let e = K::view(e);
        now.saturating_sub(e.last_seen_ns) >= self.of(key.proto(), e.state)
    }
}

/// The live flows one whole pass saw, by frontend and by (frontend, backend).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlowCensus {
    /// The pass it is of.
    pub pass: u64,
    frontends: HashMap<u32, u64>,
    members: HashMap<(u32, u32), u64>,
    /// Flows, by their forward entries.
    flows: u64,
}

impl FlowCensus {
    pub fn new(pass: u64) -> Self {
        Self { pass, ..Self::default() }
    }

    /// Counts a live flow of frontend `id` to backend `backend_id` (its forward entry).
    pub fn record(&mut self, id: u32, backend_id: u32) {
        self.flows += 1;
        self.record_use(id, backend_id);
    }

    /// Notes that a live reply entry uses frontend `id` and backend `backend_id`: its forward
    /// entry may have been evicted, or rebuilt where the pass had already read.
    pub fn record_use(&mut self, id: u32, backend_id: u32) {
        *self.frontends.entry(id).or_default() += 1;
        *self.members.entry((id, backend_id)).or_default() += 1;
    }

    pub fn frontend_flows(&self, id: u32) -> u64 {
        self.frontends.get(&id).copied().unwrap_or(0)
    }

    pub fn member_flows(&self, id: u32, backend_id: u32) -> u64 {
        self.members.get(&(id, backend_id)).copied().unwrap_or(0)
    }

    /// Live flows in all.
    pub fn flows(&self) -> u64 {
        self.flows
    }
}

/// What the sweep did, since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepStats {
    pub passes: u64,
    pub visited: u64,
    /// Conntrack entries idle past their timeout.
    pub expired: u64,
    /// Reply entries whose flow is gone (counted apart from `expired`).
    pub stale_replies: u64,
    /// Affinity entries past their timeout or of a frontend that is gone.
    pub affinity: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ct4,
    Ct6,
    Affinity4,
    Affinity6,
}

/// A reply entry idle this long is checked against its forward entry (a lookup each): most reply
/// entries are refreshed by their replies and never cost one.
pub const REPLY_CHECK_AFTER_NS: u64 = 30_000_000_000;

pub struct Sweeper {
    timeouts: Timeouts,
    budget: u32,
    pass: u64,
    phase: Phase,
    cursor: Option<u32>,
    census: FlowCensus,
    ct: Vec<(Lb4CtKey, Lb4CtEntry)>,
    ct6: Vec<(Lb6CtKey, Lb6CtEntry)>,
    affinity: Vec<(Lb4AffinityKey, Lb4Affinity)>,
    affinity6: Vec<(Lb6AffinityKey, Lb4Affinity)>,
    pub stats: SweepStats,
}

impl Sweeper {
    /// A sweep that reads at most `budget` entries a step, starting pass 1.
    pub fn new(timeouts: Timeouts, budget: u32) -> Self {
        Self {
            timeouts,
            budget: budget.max(1),
            pass: 1,
            phase: Phase::Ct4,
            cursor: None,
            census: FlowCensus::new(1),
            ct: Vec::new(),
            ct6: Vec::new(),
            affinity: Vec::new(),
            affinity6: Vec::new(),
            stats: SweepStats::default(),
        }
    }

    /// The pass in progress.
    pub fn pass(&self) -> u64 {
        self.pass
    }

    /// Whether the next step reads the affinity map (and so needs the affinity timeouts).
    pub fn in_affinity_phase(&self) -> bool {
        matches!(self.phase, Phase::Affinity4 | Phase::Affinity6)
    }

    /// One bounded step at monotonic time `now` (ns, the clock of `bpf_ktime_get_ns`);
    /// `affinity_timeout` gives a live frontend's affinity timeout in seconds. Returns the census
    /// of the pass when this step ended it (the next pass starts with the next step).
    pub fn step<T: FlowTables>(
        &mut self,
        t: &mut T,
        now: u64,
        affinity_timeout: impl Fn(u32) -> Option<u32>,
    ) -> Result<Option<FlowCensus>, FlowError<T>> {
        let (next, then) = match self.phase {
            Phase::Ct4 => {
                let mut batch = std::mem::take(&mut self.ct);
                let next = self.ct_step(t, &mut batch, now);
                self.ct = batch;
                (next?, Phase::Ct6)
            }
            Phase::Ct6 => {
                let mut batch = std::mem::take(&mut self.ct6);
                let next = self.ct_step(t, &mut batch, now);
                self.ct6 = batch;
                (next?, Phase::Affinity4)
            }
            Phase::Affinity4 => {
                let mut batch = std::mem::take(&mut self.affinity);
                let next = self.affinity_step::<_, Lb4CtKey>(t, &mut batch, now, &affinity_timeout);
                self.affinity = batch;
                (next?, Phase::Affinity6)
            }
            Phase::Affinity6 => {
                let mut batch = std::mem::take(&mut self.affinity6);
                let next = self.affinity_step::<_, Lb6CtKey>(t, &mut batch, now, &affinity_timeout);
                self.affinity6 = batch;
                (next?, Phase::Ct4)
            }
        };
        self.cursor = next;
        if next.is_some() {
            return Ok(None);
        }
        self.phase = then;
        if then != Phase::Ct4 {
            return Ok(None);
        }
        self.stats.passes += 1;
        self.pass += 1;
        let done =
            std::mem::replace(&mut self.census, FlowCensus { pass: self.pass, ..FlowCensus::default() });
        Ok(Some(done))
    }

    /// One batch of one family's conntrack map; where to go on.
    fn ct_step<T: FlowTable<K>, K: CtKey>(
        &mut self,
        t: &mut T,
        batch: &mut Vec<(K, K::Entry)>,
        now: u64,
    ) -> Result<Option<u32>, T::Error> {
        batch.clear();
        let next = t.ct_batch(self.cursor, self.budget, batch)?;
        for (key, e) in batch.iter() {
            self.visit_ct(t, key, e, now)?;
        }
        Ok(next)
    }

    /// One batch of one family's affinity map; where to go on.
    fn affinity_step<T: FlowTable<K>, K: CtKey>(
        &mut self,
        t: &mut T,
        batch: &mut Vec<(K::AffinityKey, Lb4Affinity)>,
        now: u64,
        affinity_timeout: &impl Fn(u32) -> Option<u32>,
    ) -> Result<Option<u32>, T::Error> {
        batch.clear();
        let next = t.affinity_batch(self.cursor, self.budget, batch)?;
        for (key, a) in batch.iter() {
            self.stats.visited += 1;
            let live = affinity_timeout(K::affinity_svc(key)).is_some_and(|secs| {
                now.saturating_sub(a.last_used_ns) < u64::from(secs).saturating_mul(1_000_000_000)
            });
            if !live {
                t.affinity_remove(key)?;
                self.stats.affinity += 1;
            }
        }
        Ok(next)
    }

    fn visit_ct<T: FlowTable<K>, K: CtKey>(
        &mut self,
        t: &mut T,
        key: &K,
        e: &K::Entry,
        now: u64,
    ) -> Result<(), T::Error> {
        self.stats.visited += 1;
        let v = K::view(e);
        if key.dir() == CT_DIR_FORWARD {
            // Read again before removing: a packet may have refreshed it since the batch was read,
            // or a new flow taken the tuple.
            if self.timeouts.expired(key, e, now)
                && t.ct_get(key)?.is_none_or(|e| self.timeouts.expired(key, &e, now))
            {
                t.ct_remove(key)?;
                self.stats.expired += 1;
            } else {
                self.census.record(v.svc_id, v.backend_id);
            }
            return Ok(());
        }
        // A reply entry lives by its flow, never by its own clock alone: a client that streams to
        // a silent server keeps both. Most are refreshed with their flow and never cost a lookup.
        if now.saturating_sub(v.last_seen_ns) < REPLY_CHECK_AFTER_NS {
            if !self.timeouts.expired(key, e, now) {
                self.census.record_use(v.svc_id, v.backend_id);
            }
            return Ok(());
        }
        let fwd_key = key.forward_of_reply(e);
        let garbage = match t.ct_get(&fwd_key)? {
            // The datapath honours a reply entry only while its forward entry is alive and names
            // its backend and the client port it goes to.
            Some(f) => {
                let snat_port = if v.snat_port != 0 { key.dport() } else { 0 };
                self.timeouts.expired(&fwd_key, &f, now)
                    || !key.names_backend_of(&f)
                    || K::view(&f).snat_port != snat_port
            }
            // Evicted (the datapath rebuilds it from a reply within the timeout), or gone.
            None => self.timeouts.expired(key, e, now),
        };
        if !garbage {
            self.census.record_use(v.svc_id, v.backend_id);
            return Ok(());
        }
        // Only the entry that was judged: a new flow on the same tuple has another creation time.
        if t.ct_get(key)?
            .map(|e| K::view(&e))
            .is_some_and(|now_e| now_e.created_s == v.created_s && now_e.last_seen_ns == v.last_seen_ns)
        {
            t.ct_remove(key)?;
            self.stats.stale_replies += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use lb_common::{CT_DIR_REPLY, CT_STATE_CLOSING, IPPROTO_TCP};

    use super::*;
    use crate::reconcile::MemoryMaps;

    const S: u64 = 1_000_000_000;

    fn timeouts() -> Timeouts {
        Timeouts::from_secs(60, 21_600, 10, 60)
    }

    /// A flow client 10.0.0.1:1000 → VIP 10.96.0.1:80 on backend 10.244.0.2:8080 (id 7) of
    /// frontend 3, last seen at `seen` in `state`: its forward and reply entries.
    fn flow(proto: u8, state: u8, seen: u64) -> [(Lb4CtKey, Lb4CtEntry); 2] {
        let ip = |a: [u8; 4]| u32::from_ne_bytes(a);
        let fwd_key = Lb4CtKey {
            saddr: ip([10, 0, 0, 1]),
            daddr: ip([10, 96, 0, 1]),
            sport: 1000u16.to_be(),
            dport: 80u16.to_be(),
            proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let fwd = Lb4CtEntry {
            last_seen_ns: seen,
            nat_addr: ip([10, 244, 0, 2]),
            nat_port: 8080u16.to_be(),
            state,
            backend_id: 7,
            svc_id: 3,
            ..Lb4CtEntry::default()
        };
        let rev_key = Lb4CtKey {
            saddr: fwd.nat_addr,
            daddr: fwd_key.saddr,
            sport: fwd.nat_port,
            dport: fwd_key.sport,
            proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let rev = Lb4CtEntry { nat_addr: fwd_key.daddr, nat_port: fwd_key.dport, ..fwd };
        [(fwd_key, fwd), (rev_key, rev)]
    }

    fn run_pass(s: &mut Sweeper, m: &mut MemoryMaps, now: u64) -> FlowCensus {
        for _ in 0..1000 {
            if let Some(c) = s.step(m, now, |id| (id == 3).then_some(100)).expect("in memory") {
                return c;
            }
        }
        panic!("the pass never ended");
    }

    #[test]
    fn expired_entries_go_live_ones_are_counted_per_frontend_and_member() {
        let mut m = MemoryMaps::default();
        let now = 100_000 * S;
        // Live TCP, expired UDP (idle 61 s), a closing TCP flow idle 11 s.
        let live = flow(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 1000 * S);
        let mut udp = flow(IPPROTO_UDP, CT_STATE_ESTABLISHED, now - 61 * S);
        udp[0].0.sport = 2000u16.to_be();
        udp[1].0.dport = 2000u16.to_be();
        let mut closing = flow(IPPROTO_TCP, CT_STATE_CLOSING, now - 11 * S);
        closing[0].0.sport = 3000u16.to_be();
        closing[1].0.dport = 3000u16.to_be();
        for (k, v) in live.iter().chain(&udp).chain(&closing) {
            m.ct.insert(*k, *v);
        }
        // Budget 1: one entry a step, the pass still covers everything.
        let mut s = Sweeper::new(timeouts(), 1);
        let c = run_pass(&mut s, &mut m, now);
        assert_eq!(c.pass, 1);
        // One live flow; its forward and reply entries both count as uses of frontend 3 and
        // backend 7.
        assert_eq!(c.flows(), 1);
        assert_eq!((c.frontend_flows(3), c.member_flows(3, 7), c.member_flows(3, 8)), (2, 2, 0));
        // The closing flow's reply entry, idle only 11 s, is not looked at yet.
        let left: BTreeSet<_> = m.ct.keys().copied().collect();
        assert_eq!(left, BTreeSet::from([live[0].0, live[1].0, closing[1].0]));
        assert_eq!((s.stats.expired, s.stats.stale_replies), (2, 1));
        assert_eq!(s.pass(), 2);
        // 30 s on, it goes with the next pass: its forward entry is gone and it is past its own
        // timeout. The live flow's reply entry, idle 1,030 s but with a live flow, stays.
        let c = run_pass(&mut s, &mut m, now + 30 * S);
        let left: BTreeSet<_> = m.ct.keys().copied().collect();
        assert_eq!(left, BTreeSet::from([live[0].0, live[1].0]));
        assert_eq!((c.pass, c.flows()), (2, 1));
    }

    #[test]
    fn a_reply_entry_goes_only_when_its_flow_is_gone() {
        let mut m = MemoryMaps::default();
        let now = 100_000 * S;
        let port = |k: Lb4CtKey, p: u16| {
            if k.dir == CT_DIR_FORWARD {
                Lb4CtKey { sport: p.to_be(), ..k }
            } else {
                Lb4CtKey { dport: p.to_be(), ..k }
            }
        };
        // 1. The forward entry names another backend now: stale.
        let [(fk1, mut fv1), (rk1, rv1)] = flow(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 40 * S);
        let (fk1, rk1) = (port(fk1, 1), port(rk1, 1));
        fv1.nat_port = 9090u16.to_be();
        // 2. The forward entry expired (UDP idle 61 s) and the reply entry with it: stale.
        let [(fk2, fv2), (rk2, rv2)] = flow(IPPROTO_UDP, CT_STATE_ESTABLISHED, now - 61 * S);
        let (fk2, rk2) = (port(fk2, 2), port(rk2, 2));
        // 3. The server has said nothing for an hour while the client streams: both stay.
        let [(fk3, mut fv3), (rk3, rv3)] = flow(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 3600 * S);
        let (fk3, rk3) = (port(fk3, 3), port(rk3, 3));
        fv3.last_seen_ns = now - S;
        // 4. The forward entry was evicted; the reply entry is within its timeout (the datapath
        // rebuilds the forward entry from the next reply): it stays and its member counts.
        let [_, (rk4, rv4)] = flow(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 40 * S);
        let rk4 = port(rk4, 4);
        // 5. Gone and idle past its timeout: stale.
        let [_, (rk5, rv5)] = flow(IPPROTO_UDP, CT_STATE_ESTABLISHED, now - 61 * S);
        let rk5 = port(rk5, 5);
        for (k, v) in
            [(fk1, fv1), (rk1, rv1), (fk2, fv2), (rk2, rv2), (fk3, fv3), (rk3, rv3), (rk4, rv4), (rk5, rv5)]
        {
            m.ct.insert(k, v);
        }
        let mut s = Sweeper::new(timeouts(), 16);
        let c = run_pass(&mut s, &mut m, now);
        let left: BTreeSet<_> = m.ct.keys().copied().collect();
        assert_eq!(left, BTreeSet::from([fk1, fk3, rk3, rk4]));
        assert_eq!(s.stats.stale_replies, 3);
        // Flows 1 and 3 by their forward entries (and 3 by its reply entry), flow 4 by its reply
        // entry alone.
        assert_eq!((c.flows(), c.member_flows(3, 7)), (2, 4));
    }

    /// A flow given another source port (its tuple clashed): its reply entry, keyed by that
    /// port and keeping the client's own, lives by its flow; a reply entry whose flow now has
    /// another source port (or none) is stale, as the datapath judges it.
    #[test]
    fn reply_entries_of_flows_with_another_source_port() {
        let mut m = MemoryMaps::default();
        let now = 100_000 * S;
        let snat = |[(fk, mut fv), (rk, mut rv)]: [(Lb4CtKey, Lb4CtEntry); 2], client: u16, given: u16| {
            let fk = Lb4CtKey { sport: client.to_be(), ..fk };
            fv.snat_port = given.to_be();
            rv.snat_port = client.to_be();
            ((fk, fv), (Lb4CtKey { dport: given.to_be(), ..rk }, rv))
        };
        // 1. Alive and consistent: both stay.
        let ((fk1, fv1), (rk1, rv1)) = snat(flow(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 40 * S), 1, 61_001);
        // 2. The flow now has port 61,003: the entry under 61,002 is stale.
        let ((fk2, mut fv2), (rk2, rv2)) =
            snat(flow(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 40 * S), 2, 61_002);
        fv2.snat_port = 61_003u16.to_be();
        // 3. The flow was made again without another port: the old entry is stale.
        let ((fk3, mut fv3), (rk3, rv3)) =
            snat(flow(IPPROTO_UDP, CT_STATE_ESTABLISHED, now - 40 * S), 3, 61_004);
        fv3.snat_port = 0;
        assert_eq!(rk1.forward_of_reply(&rv1), fk1, "the reply entry leads to its flow");
        for (k, v) in [(fk1, fv1), (rk1, rv1), (fk2, fv2), (rk2, rv2), (fk3, fv3), (rk3, rv3)] {
            m.ct.insert(k, v);
        }
        let mut s = Sweeper::new(timeouts(), 16);
        run_pass(&mut s, &mut m, now);
        let left: BTreeSet<_> = m.ct.keys().copied().collect();
        assert_eq!(left, BTreeSet::from([fk1, rk1, fk2, fk3]));
        assert_eq!(s.stats.stale_replies, 2);
    }

    #[test]
    fn an_entry_changed_between_the_batch_and_its_removal_stays() {
        let mut m = MemoryMaps::default();
        let now = 100_000 * S;
        // Seen again (or made anew on the same tuple) after the batch was read.
        m.refresh_on_get = Some(now);
        let [(fk, fv), _] = flow(IPPROTO_UDP, CT_STATE_ESTABLISHED, now - 61 * S);
        m.ct.insert(fk, fv);
        let [(fk2, mut fv2), (rk2, rv2)] = flow(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 40 * S);
        let fk2 = Lb4CtKey { sport: 9u16.to_be(), ..fk2 };
        let rk2 = Lb4CtKey { dport: 9u16.to_be(), ..rk2 };
        fv2.nat_port = 9090u16.to_be();
        m.ct.insert(fk2, fv2);
        m.ct.insert(rk2, rv2);
        let mut s = Sweeper::new(timeouts(), 16);
        run_pass(&mut s, &mut m, now);
        assert!(m.ct.contains_key(&fk) && m.ct.contains_key(&rk2), "{:?}", m.ct);
        assert_eq!((s.stats.expired, s.stats.stale_replies), (0, 0));
    }

    /// An IPv6 flow as `flow` makes an IPv4 one, on frontend `svc_id` and backend 8.
    fn flow6(proto: u8, state: u8, seen: u64, svc_id: u32) -> [(Lb6CtKey, Lb6CtEntry); 2] {
        let ip = |s: &str| lb_common::addr6(s.parse::<std::net::Ipv6Addr>().expect("an address").octets());
        let fwd_key = Lb6CtKey {
            saddr: ip("fd00:10:244:1::1"),
            daddr: ip("fd00:10:96::1"),
            sport: 1000u16.to_be(),
            dport: 80u16.to_be(),
            proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let fwd = Lb6CtEntry {
            last_seen_ns: seen,
            nat_addr: ip("fd00:10:244:2::2"),
            nat_port: 8080u16.to_be(),
            state,
            backend_id: 8,
            svc_id,
            ..Lb6CtEntry::default()
        };
        let rev_key = Lb6CtKey {
            saddr: fwd.nat_addr,
            daddr: fwd_key.saddr,
            sport: fwd.nat_port,
            dport: fwd_key.sport,
            proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let rev = Lb6CtEntry { nat_addr: fwd_key.daddr, nat_port: fwd_key.dport, ..fwd };
        [(fwd_key, fwd), (rev_key, rev)]
    }

    #[test]
    fn one_pass_sweeps_both_families_with_the_same_rule() {
        let mut m = MemoryMaps::default();
        let now = 100_000 * S;
        let v4 = flow(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 1000 * S);
        // IPv6: a live TCP flow of frontend 3, an expired UDP one, and a reply entry whose
        // forward entry names another backend port now (stale).
        let live6 = flow6(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 1000 * S, 3);
        let mut udp6 = flow6(IPPROTO_UDP, CT_STATE_ESTABLISHED, now - 61 * S, 4);
        udp6[0].0.sport = 2000u16.to_be();
        udp6[1].0.dport = 2000u16.to_be();
        let mut moved6 = flow6(IPPROTO_TCP, CT_STATE_ESTABLISHED, now - 40 * S, 5);
        moved6[0].0.sport = 3000u16.to_be();
        moved6[1].0.dport = 3000u16.to_be();
        moved6[0].1.nat_port = 9090u16.to_be();
        moved6[0].1.last_seen_ns = now;
        assert_eq!(moved6[1].0.forward_of_reply(&moved6[1].1), moved6[0].0, "the reply leads to its flow");
        for (k, v) in &v4 {
            m.ct.insert(*k, *v);
        }
        for (k, v) in live6.iter().chain(&udp6).chain(&moved6) {
            m.ct6.insert(*k, *v);
        }
        let aff = |svc_id, used| {
            let client = live6[0].0.saddr;
            (Lb6AffinityKey { client, svc_id }, Lb4Affinity { last_used_ns: used, backend_id: 8, _pad: 0 })
        };
        for (k, v) in [aff(3, now - 10 * S), aff(4, now)] {
            m.affinity6.insert(k, v);
        }
        let mut s = Sweeper::new(timeouts(), 1);
        let c = run_pass(&mut s, &mut m, now);
        let left: BTreeSet<_> = m.ct6.keys().copied().collect();
        assert_eq!(left, BTreeSet::from([live6[0].0, live6[1].0, moved6[0].0]));
        assert_eq!(m.ct.len(), 2, "the IPv4 flow lives");
        assert_eq!((s.stats.expired, s.stats.stale_replies), (1, 2));
        // Flows: the IPv4 one, the live IPv6 one, the moved one by its forward entry.
        assert_eq!(c.flows(), 3);
        assert_eq!((c.member_flows(3, 7), c.member_flows(3, 8), c.member_flows(5, 8)), (2, 2, 1));
        let left: Vec<_> = m.affinity6.keys().map(|k| k.svc_id).collect();
        assert_eq!(left, [3], "frontend 4 is not live");
    }

    #[test]
    fn affinity_goes_after_its_timeout_or_with_its_frontend() {
        let mut m = MemoryMaps::default();
        let now = 100_000 * S;
        let a = |svc_id, client, used| {
            (Lb4AffinityKey { client, svc_id }, Lb4Affinity { last_used_ns: used, backend_id: 7, _pad: 0 })
        };
        for (k, v) in [a(3, 1, now - 10 * S), a(3, 2, now - 100 * S), a(4, 1, now)] {
            m.affinity.insert(k, v);
        }
        let mut s = Sweeper::new(timeouts(), 2);
        run_pass(&mut s, &mut m, now);
        let left: Vec<_> = m.affinity.keys().map(|k| (k.svc_id, k.client)).collect();
        assert_eq!(left, [(3, 1)], "frontend 3's timeout is 100 s; frontend 4 is not live");
        assert_eq!(s.stats.affinity, 2);
    }
}
