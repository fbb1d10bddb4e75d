//! Maps in memory: a [`MapWriter`] and [`FlowTable`] for tests, golden dumps and anything that
//! wants to see what the reconciler would write without a kernel.

use std::collections::BTreeMap;

use lb_common::{
    Lb4Affinity, Lb4AffinityKey, Lb4CtEntry, Lb4CtKey, Lb4FrontendMeta, Lb4Service, Lb6AffinityKey,
    Lb6CtEntry, Lb6CtKey,
};

use super::{
    encode::{BackendValue, MemberKey, MemberValue, ServiceKey, SrcRangeEntry},
    FlowTable, MapWriter, Restored,
};

/// Maps in memory: what the reconciler would write, for tests and golden dumps, with a log of the
/// writes in order.
#[derive(Debug, Default)]
pub struct MemoryMaps {
    /// Both families' services maps (IPv4 keys first).
    pub services: BTreeMap<ServiceKey, Lb4Service>,
    pub meta: BTreeMap<u32, Lb4FrontendMeta>,
    /// Both families' backends maps: an id is in one of them (as the datapath's, where a freed id
    /// stays a free slot in its family's map: the last value written).
    pub backends: BTreeMap<u32, BackendValue>,
    pub maglev: BTreeMap<u32, u32>,
    pub members: BTreeMap<MemberKey, MemberValue>,
    pub ct: BTreeMap<Lb4CtKey, Lb4CtEntry>,
    pub affinity: BTreeMap<Lb4AffinityKey, Lb4Affinity>,
    pub ct6: BTreeMap<Lb6CtKey, Lb6CtEntry>,
    pub affinity6: BTreeMap<Lb6AffinityKey, Lb4Affinity>,
    /// `LB4_SRC_RANGES`: entry → verdict.
    pub src_ranges: BTreeMap<SrcRangeEntry, u32>,
    pub log: Vec<String>,
    /// Tests: `ct_get` sees every entry as last seen at this time (a packet refreshed it between
    /// the sweep's batch read and its removal).
    pub refresh_on_get: Option<u64>,
    /// Tests: service entry writes fail (a frontend cannot be published).
    pub fail_services: bool,
    /// Tests: IPv6 service entry writes fail.
    pub fail_services6: bool,
    /// Tests: member row writes fail.
    pub fail_members: bool,
    /// Tests: forgetting affinity fails.
    pub fail_affinity: bool,
    /// Tests: the writes (of any kind) made so far, counted from 0.
    pub writes: usize,
    /// Tests: write number `n` fails (counted in `writes`), or every write from it on if
    /// `fail_from` is set.
    pub fail_write: Option<usize>,
    pub fail_from: bool,
    /// Where the batches go on: after these keys (entries removed meanwhile move nothing).
    ct_after: Option<Lb4CtKey>,
    affinity_after: Option<Lb4AffinityKey>,
    ct6_after: Option<Lb6CtKey>,
    affinity6_after: Option<Lb6AffinityKey>,
}

impl MemoryMaps {
    /// What a restarted agent would read back from these maps.
    pub fn restored(&self) -> Restored<'_> {
        Restored {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            members: self.members.iter().map(|(k, v)| (*k, *v)).collect(),
            src_ranges: self.src_ranges.keys().copied().collect(),
            meta: Box::new(|id| self.meta.get(&id).copied()),
        }
    }
}

/// A write refused because the test asked for it (`MemoryMaps::fail_services`, `fail_members`,
/// `fail_write`).
#[derive(Debug, thiserror::Error)]
#[error("refused by the test")]
pub struct Refused;

impl MemoryMaps {
    /// Counts a write of `what`; refuses it if the test asked for that.
    fn write(&mut self, what: &str, refuse: bool) -> Result<(), Refused> {
        let n = self.writes;
        self.writes += 1;
        let chosen = self.fail_write.is_some_and(|f| n == f || (self.fail_from && n > f));
        if refuse || chosen {
            self.log.push(format!("refused {what}"));
            return Err(Refused);
        }
        Ok(())
    }
}

impl MapWriter for MemoryMaps {
    type Error = Refused;
    fn set_backend(&mut self, id: u32, b: &BackendValue) -> Result<(), Self::Error> {
        self.write(&format!("backend {id}"), false)?;
        self.log.push(format!("backend {id} state {}", b.state()));
        self.backends.insert(id, *b);
        Ok(())
    }
    fn set_maglev(&mut self, offset: u32, table: &[u32]) -> Result<(), Self::Error> {
        self.write(&format!("maglev {offset}"), false)?;
        self.log.push(format!("maglev {offset}+{}", table.len()));
        for (i, id) in table.iter().enumerate() {
            self.maglev.insert(offset + i as u32, *id);
        }
        Ok(())
    }
    fn set_service(&mut self, key: &ServiceKey, svc: &Lb4Service) -> Result<(), Self::Error> {
        let refuse = self.fail_services || (self.fail_services6 && matches!(key, ServiceKey::V6(_)));
        self.write(&format!("service {}", svc.id), refuse)?;
        if svc.flags & lb_common::SVC_FLAG_TOMBSTONE != 0 {
            self.log.push(format!("tombstone {}", svc.id));
        } else {
            self.log.push(format!("service {} at {}+{}", svc.id, svc.maglev_offset, svc.maglev_size));
        }
        self.services.insert(*key, *svc);
        Ok(())
    }
    fn set_frontend_meta(&mut self, id: u32, meta: &Lb4FrontendMeta) -> Result<(), Self::Error> {
        self.write(&format!("meta {id}"), false)?;
        self.meta.insert(id, *meta);
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Self::Error> {
        self.write("service removal", false)?;
        self.log.push("remove service".into());
        self.services.remove(key);
        Ok(())
    }
    fn remove_affinity(&mut self, svc_id: u32, ids: &[u32]) -> Result<(), Self::Error> {
        self.write(&format!("affinity of {svc_id}"), self.fail_affinity)?;
        self.log.push(format!("forget affinity of {svc_id} to {ids:?}"));
        self.affinity.retain(|k, v| k.svc_id != svc_id || !ids.contains(&v.backend_id));
        self.affinity6.retain(|k, v| k.svc_id != svc_id || !ids.contains(&v.backend_id));
        Ok(())
    }
    fn set_member(&mut self, key: &MemberKey, m: &MemberValue) -> Result<(), Self::Error> {
        let k = key.pair();
        self.write(&format!("member {}/{}", k.svc_id, k.backend_id), self.fail_members)?;
        self.log.push(format!("member {}/{} state {}", k.svc_id, k.backend_id, m.state()));
        self.members.insert(*key, *m);
        Ok(())
    }
    fn remove_member(&mut self, key: &MemberKey) -> Result<(), Self::Error> {
        let k = key.pair();
        self.write(&format!("member removal {}/{}", k.svc_id, k.backend_id), false)?;
        self.log.push(format!("remove member {}/{}", k.svc_id, k.backend_id));
        self.members.remove(key);
        Ok(())
    }
    fn set_src_range(&mut self, e: &SrcRangeEntry) -> Result<(), Self::Error> {
        self.write("source range", false)?;
        self.log.push(format!("source range {} {}", src_range_name(e), e.verdict()));
        self.src_ranges.insert(*e, e.verdict());
        Ok(())
    }
    fn remove_src_range(&mut self, e: &SrcRangeEntry) -> Result<(), Self::Error> {
        self.write("source range removal", false)?;
        self.log.push(format!("remove source range {}", src_range_name(e)));
        self.src_ranges.remove(e);
        Ok(())
    }
}

/// `frontend from network/len`, or `frontend from any` for a deny entry.
pub fn src_range_name(e: &SrcRangeEntry) -> String {
    let (vip, port, proto, range) = e.parts();
    let fe = format!("{}/{}", std::net::SocketAddr::new(vip, port), super::encode::proto_name(proto));
    match range {
        None => format!("{fe} from any"),
        Some((net, len)) => format!("{fe} from {net}/{len}"),
    }
}

/// A batch of `max` entries of `map` after `*after` (from the start when `cursor` is `None`).
fn batch<K: Copy + Ord, V: Copy>(
    map: &BTreeMap<K, V>,
    after: &mut Option<K>,
    cursor: Option<u32>,
    max: u32,
    out: &mut Vec<(K, V)>,
) -> Option<u32> {
    use std::ops::Bound::{Excluded, Unbounded};
    let from = match (cursor, *after) {
        (Some(_), Some(k)) => Excluded(k),
        _ => Unbounded,
    };
    let got: Vec<(K, V)> = map.range((from, Unbounded)).take(max as usize).map(|(k, v)| (*k, *v)).collect();
    *after = got.last().map(|(k, _)| *k);
    let more = after.is_some_and(|k| map.range((Excluded(k), Unbounded)).next().is_some());
    out.extend(got);
    more.then_some(1)
}

impl FlowTable for MemoryMaps {
    type Error = std::convert::Infallible;
    fn ct_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(Lb4CtKey, Lb4CtEntry)>,
    ) -> Result<Option<u32>, Self::Error> {
        Ok(batch(&self.ct, &mut self.ct_after, cursor, max, out))
    }
    fn ct_get(&self, key: &Lb4CtKey) -> Result<Option<Lb4CtEntry>, Self::Error> {
        Ok(self.ct.get(key).map(|e| match self.refresh_on_get {
            Some(t) => Lb4CtEntry { last_seen_ns: t, ..*e },
            None => *e,
        }))
    }
    fn ct_remove(&mut self, key: &Lb4CtKey) -> Result<(), Self::Error> {
        self.ct.remove(key);
        Ok(())
    }
    fn affinity_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(Lb4AffinityKey, Lb4Affinity)>,
    ) -> Result<Option<u32>, Self::Error> {
        Ok(batch(&self.affinity, &mut self.affinity_after, cursor, max, out))
    }
    fn affinity_remove(&mut self, key: &Lb4AffinityKey) -> Result<(), Self::Error> {
        self.affinity.remove(key);
        Ok(())
    }
}

impl FlowTable<Lb6CtKey> for MemoryMaps {
    type Error = std::convert::Infallible;
    fn ct_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(Lb6CtKey, Lb6CtEntry)>,
    ) -> Result<Option<u32>, Self::Error> {
        Ok(batch(&self.ct6, &mut self.ct6_after, cursor, max, out))
    }
    fn ct_get(&self, key: &Lb6CtKey) -> Result<Option<Lb6CtEntry>, Self::Error> {
        Ok(self.ct6.get(key).map(|e| match self.refresh_on_get {
            Some(t) => Lb6CtEntry { last_seen_ns: t, ..*e },
            None => *e,
        }))
    }
    fn ct_remove(&mut self, key: &Lb6CtKey) -> Result<(), Self::Error> {
        self.ct6.remove(key);
        Ok(())
    }
    fn affinity_batch(
        &mut self,
        cursor: Option<u32>,
        max: u32,
        out: &mut Vec<(Lb6AffinityKey, Lb4Affinity)>,
    ) -> Result<Option<u32>, Self::Error> {
        Ok(batch(&self.affinity6, &mut self.affinity6_after, cursor, max, out))
    }
    fn affinity_remove(&mut self, key: &Lb6AffinityKey) -> Result<(), Self::Error> {
        self.affinity6.remove(key);
        Ok(())
    }
}
