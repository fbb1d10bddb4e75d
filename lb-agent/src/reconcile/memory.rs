//! Maps in memory: a [`MapWriter`] for tests, golden dumps and anything that wants to see what
//! the reconciler would write without a kernel.

use std::collections::BTreeMap;

use lb_common::{Lb4Backend, Lb4FrontendMeta, Lb4Service, Lb4ServiceKey};

use super::MapWriter;

/// Maps in memory: what the reconciler would write, for tests and golden dumps, with a log of the
/// writes in order.
#[derive(Debug, Default)]
pub struct MemoryMaps {
    pub services: BTreeMap<Lb4ServiceKey, Lb4Service>,
    pub meta: BTreeMap<u32, Lb4FrontendMeta>,
    pub backends: BTreeMap<u32, Lb4Backend>,
    pub maglev: BTreeMap<u32, u32>,
    pub log: Vec<String>,
}

impl MapWriter for MemoryMaps {
    type Error = std::convert::Infallible;
    fn set_backend(&mut self, id: u32, b: &Lb4Backend) -> Result<(), Self::Error> {
        self.log.push(format!("backend {id} state {}", b.state));
        self.backends.insert(id, *b);
        Ok(())
    }
    fn set_maglev(&mut self, offset: u32, table: &[u32]) -> Result<(), Self::Error> {
        self.log.push(format!("maglev {offset}+{}", table.len()));
        for (i, id) in table.iter().enumerate() {
            self.maglev.insert(offset + i as u32, *id);
        }
        Ok(())
    }
    fn set_service(&mut self, key: &Lb4ServiceKey, svc: &Lb4Service) -> Result<(), Self::Error> {
        self.log.push(format!("service {} at {}+{}", svc.id, svc.maglev_offset, svc.maglev_size));
        self.services.insert(*key, *svc);
        Ok(())
    }
    fn set_frontend_meta(&mut self, id: u32, meta: &Lb4FrontendMeta) -> Result<(), Self::Error> {
        self.meta.insert(id, *meta);
        Ok(())
    }
    fn remove_service(&mut self, key: &Lb4ServiceKey) -> Result<(), Self::Error> {
        self.log.push("remove service".into());
        self.services.remove(key);
        Ok(())
    }
    fn remove_affinity(&mut self, svc_id: u32, ids: &[u32]) -> Result<(), Self::Error> {
        self.log.push(format!("forget affinity of {svc_id} to {ids:?}"));
        Ok(())
    }
}
