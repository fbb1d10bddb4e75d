//! Kubernetes source: kube-rs watchers and reflectors on Services, EndpointSlices and this node's
//! Node. The stores are the agent's whole view: on any event the desired state is recomputed
//! from them (reconcile by level), so nothing depends on seeing a delete event. A relist (after a
//! 410 Gone or a reconnect) is buffered by the reflector and swapped in whole when it completes,
//! so a partial list is never taken for the whole; while a relist fails, the last good view stays.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Instant,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, Resource, ResourceExt as _,
};
use tokio::{sync::mpsc::UnboundedSender, task::JoinHandle};
use tracing::{debug, warn};

use crate::manifests::Objects;

/// The node label that names its zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Option<Store<Node>>,
    tasks: Vec<JoinHandle<()>>,
    dirty: Arc<Mutex<Dirty>>,
}

/// What changed since the agent last looked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    /// Everything must be recomputed (a (re)list completed, the node changed).
    pub all: bool,
    /// Services (`namespace/name`) whose Service or EndpointSlices changed.
    pub services: BTreeSet<String>,
}

/// What a sync must look at.
pub enum Change {
    All(Objects),
    /// Each touched Service's key, its object (`None`: deleted) and its EndpointSlices.
    Services(Vec<(String, Option<Service>, Vec<EndpointSlice>)>),
}

/// Which Service an event is about.
type KeyOf<K> = fn(&K) -> Option<String>;

fn service_key(s: &Service) -> Option<String> {
    Some(format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
}

fn slice_key(s: &EndpointSlice) -> Option<String> {
    let svc = s.labels().get(crate::model::LABEL_SERVICE_NAME)?;
    Some(format!("{}/{svc}", s.namespace().unwrap_or_default()))
}

impl KubeSource {
    /// Starts the watches. Each event is signalled on `changes` with the time it was seen.
    pub fn start(client: Client, node_name: Option<&str>, changes: UnboundedSender<Instant>) -> Self {
        let mut tasks = Vec::new();
        let dirty = Arc::new(Mutex::new(Dirty { all: true, ..Dirty::default() }));
        let (services, w) = reflector::store();
        let api = Api::<Service>::all(client.clone());
        tasks.push(tokio::spawn(follow(
            api,
            watcher::Config::default(),
            w,
            changes.clone(),
            dirty.clone(),
            service_key,
        )));
        let (slices, w) = reflector::store();
        let api = Api::<EndpointSlice>::all(client.clone());
        tasks.push(tokio::spawn(follow(
            api,
            watcher::Config::default(),
            w,
            changes.clone(),
            dirty.clone(),
            slice_key,
        )));
        let node = node_name.map(|name| {
            let (node, w) = reflector::store();
            let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
            // A node change (its zone) can change every Service's endpoints.
            tasks.push(tokio::spawn(follow(
                Api::<Node>::all(client),
                cfg,
                w,
                changes,
                dirty.clone(),
                |_| None,
            )));
            node
        });
        Self { services, slices, node, tasks, dirty }
    }

    /// Waits until every store holds a complete first list.
    pub async fn wait_ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        if let Some(n) = &self.node {
            let _ = n.wait_until_ready().await;
        }
    }

    /// Everything the stores hold now.
    pub fn objects(&self) -> Objects {
        Objects {
            services: self.services.state().iter().map(|s| Service::clone(s)).collect(),
            slices: self.slices.state().iter().map(|s| EndpointSlice::clone(s)).collect(),
            errors: Vec::new(),
        }
    }

    /// What to apply for the changes seen since the last call: everything (after a (re)list or a
    /// node change), or only the Services the events touched.
    pub fn changes(&self) -> Change {
        let dirty = self.take_dirty();
        if dirty.all {
            return Change::All(self.objects());
        }
        // A few Services: each looks its slices up (the quickest for single changes). A burst
        // (a relist's worth of events): one pass over the slices for the whole batch, not one
        // per Service.
        if dirty.services.len() <= 16 {
            return Change::Services(
                dirty
                    .services
                    .into_iter()
                    .map(|key| {
                        let (svc, slices) = self.service_objects(&key);
                        (key, svc, slices)
                    })
                    .collect(),
            );
        }
        use std::collections::HashMap;
        let mut slices: HashMap<String, HashMap<String, Vec<EndpointSlice>>> = HashMap::new();
        for key in &dirty.services {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            slices.entry(ns.to_string()).or_default().insert(name.to_string(), Vec::new());
        }
        for s in self.slices.state() {
            let Some(service) = s.labels().get(crate::model::LABEL_SERVICE_NAME) else { continue };
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            if let Some(v) = slices.get_mut(ns).and_then(|m| m.get_mut(service.as_str())) {
                v.push(EndpointSlice::clone(&s));
            }
        }
        Change::Services(
            dirty
                .services
                .into_iter()
                .map(|key| {
                    let (ns, name) = key.split_once('/').unwrap_or(("", &key));
                    let svc = self.services.get(&ObjectRef::new(name).within(ns)).map(|s| Service::clone(&s));
                    let mine = slices.get_mut(ns).and_then(|m| m.remove(name)).unwrap_or_default();
                    (key, svc, mine)
                })
                .collect(),
        )
    }

    /// What changed since the last call.
    pub fn take_dirty(&self) -> Dirty {
        std::mem::take(&mut *self.dirty.lock().expect("dirty set"))
    }

    /// One Service (if it exists) and its EndpointSlices, as the stores hold them now.
    pub fn service_objects(&self, key: &str) -> (Option<Service>, Vec<EndpointSlice>) {
        let (ns, name) = key.split_once('/').unwrap_or(("", key));
        let svc = self.services.get(&ObjectRef::new(name).within(ns)).map(|s| Service::clone(&s));
        let slices = self
            .slices
            .state()
            .iter()
            .filter(|s| {
                s.namespace().as_deref() == Some(ns)
                    && s.labels().get(crate::model::LABEL_SERVICE_NAME).map(String::as_str) == Some(name)
            })
            .map(|s| EndpointSlice::clone(s))
            .collect();
        (svc, slices)
    }

    /// This node's zone, from its `topology.kubernetes.io/zone` label.
    pub fn zone(&self) -> Option<String> {
        self.node.as_ref()?.state().first().and_then(|n| n.labels().get(LABEL_ZONE).cloned())
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Follows one resource into its store, with kube's default backoff on errors.
async fn follow<K>(
    api: Api<K>,
    cfg: watcher::Config,
    writer: reflector::store::Writer<K>,
    changes: UnboundedSender<Instant>,
    dirty: Arc<Mutex<Dirty>>,
    key_of: KeyOf<K>,
) where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    // Managed fields are large and never used: strip them before they are cached.
    let stream = watcher::watcher(api, cfg).default_backoff().modify(|o| o.managed_fields_mut().clear());
    let stream = reflector::reflector(writer, stream);
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            // Applies and deletes change the store now; InitDone swaps in a complete (re)list.
            Ok(Event::Apply(o) | Event::Delete(o)) => {
                {
                    let mut d = dirty.lock().expect("dirty set");
                    match key_of(&o) {
                        Some(k) => {
                            d.services.insert(k);
                        }
                        None => d.all = true,
                    }
                }
                let _ = changes.send(Instant::now());
            }
            Ok(Event::InitDone) => {
                dirty.lock().expect("dirty set").all = true;
                let _ = changes.send(Instant::now());
            }
            Ok(Event::Init) => debug!(kind, "listing"),
            Ok(Event::InitApply(_)) => {}
            Err(e) => warn!(kind, "watch: {e}; retrying with backoff, keeping the last good view"),
        }
    }
}
