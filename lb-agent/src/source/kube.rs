//! Kubernetes source: kube-rs watchers and reflectors on Services, EndpointSlices and this node's
//! Node. The stores are the agent's whole view: on any event the desired state is recomputed
//! from them (reconcile by level), so nothing depends on seeing a delete event. A relist (after a
//! 410 Gone or a reconnect) is buffered by the reflector and swapped in whole when it completes,
//! so a partial list is never taken for the whole; while a relist fails, the last good view stays.

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, Resource, ResourceExt as _,
};
use tokio::{sync::mpsc::Sender, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{Change, Dirty, Objects, Pending, ServiceObjects, SourceError, What};
use crate::model::EndpointSlice;

/// A client for the API server: from `kubeconfig`, or kube's inference (in-cluster service
/// account, then `$KUBECONFIG`, then `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, SourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |e: &dyn std::fmt::Display| SourceError::Kubeconfig {
                path: path.into(),
                reason: e.to_string(),
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.map_err(|e| err(&e))?
        }
        None => {
            // deploy/replace-kube-proxy ships a placeholder for the API server's address.
            if let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") {
                if host.starts_with("REPLACE-WITH") {
                    return Err(SourceError::NoConfig(format!(
                        "KUBERNETES_SERVICE_HOST is {host:?}: set api-server-host (and api-server-port) in \
                         deploy/replace-kube-proxy/kustomization.yaml to your API server's address"
                    )));
                }
            }
            kube::Config::infer().await.map_err(|e| SourceError::NoConfig(e.to_string()))?
        }
    };
    Client::try_from(config).map_err(|e| SourceError::Client(e.to_string()))
}

/// The stores the watchers keep: the agent's whole view of the API server.
#[derive(Clone)]
pub struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Option<Store<Node>>,
}

pub struct KubeSource {
    stores: Stores,
    tasks: Vec<JoinHandle<()>>,
    pub(super) pending: Arc<Pending>,
}

/// Which Service an event is about.
type KeyOf<K> = fn(&K) -> Option<String>;

fn service_key(s: &Service) -> Option<String> {
    Some(format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
}

fn slice_key(s: &EndpointSlice) -> Option<String> {
    let svc = s.service.as_ref()?;
    Some(format!("{}/{svc}", s.namespace().unwrap_or_default()))
}

impl KubeSource {
    /// Starts the watches. Once every store holds a complete first list, everything is sent on
    /// `tx`; after that, each batch of events sends what it touched.
    pub fn start(client: Client, node_name: Option<&str>, tx: Sender<Change>) -> Self {
        let mut tasks = Vec::new();
        let pending = Arc::new(Pending::default());
        pending.mark_all();
        let (services, w) = reflector::store();
        let api = Api::<Service>::all(client.clone());
        tasks.push(tokio::spawn(follow(api, watcher::Config::default(), w, pending.clone(), service_key)));
        let (slices, w) = reflector::store();
        let api = Api::<EndpointSlice>::all(client.clone());
        tasks.push(tokio::spawn(follow(api, watcher::Config::default(), w, pending.clone(), slice_key)));
        let node = node_name.map(|name| {
            let (node, w) = reflector::store();
            let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
            // A node change (its zone) can change every Service's endpoints.
            tasks.push(tokio::spawn(follow(Api::<Node>::all(client), cfg, w, pending.clone(), |_| None)));
            node
        });
        let stores = Stores { services, slices, node };
        let s = stores.clone();
        let p = pending.clone();
        tasks.push(tokio::spawn(async move {
            info!("waiting for the first complete list of Services, EndpointSlices and this Node");
            s.wait_ready().await;
            // Bursts (a relist) are coalesced by the dirty set; there is nothing to wait for.
            pending.send_changes(Duration::ZERO, tx, move |dirty| Some(s.changes(dirty))).await;
        }));
        Self { stores, tasks, pending: p }
    }

    /// Sends everything again (something the model depends on outside the objects changed).
    pub fn resync(&self) {
        self.pending.mark_all();
    }

    /// Everything the stores hold now (for tests that look at the cache).
    pub fn objects(&self) -> Objects {
        self.stores.objects()
    }
}

impl Stores {
    /// Waits until every store holds a complete first list.
    async fn wait_ready(&self) {
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        if let Some(n) = &self.node {
            let _ = n.wait_until_ready().await;
        }
    }

    /// Everything the stores hold now.
    fn objects(&self) -> Objects {
        Objects {
            services: self.services.state(),
            slices: self.slices.state(),
            node: self.node.as_ref().and_then(|n| n.state().first().map(|n| Box::new(Node::clone(n)))),
            errors: Vec::new(),
        }
    }

    /// What to send for what changed: everything (after a (re)list or a node change), or only the
    /// Services the events touched.
    fn changes(&self, dirty: Dirty) -> What {
        if dirty.all {
            return What::All(self.objects());
        }
        // A few Services: each looks its slices up (the quickest for single changes). A burst
        // (a relist's worth of events): one pass over the slices for the whole batch, not one
        // per Service.
        if dirty.services.len() <= 16 {
            return What::Services(dirty.services.into_iter().map(|key| self.service_objects(key)).collect());
        }
        let mut slices: HashMap<String, HashMap<String, Vec<Arc<EndpointSlice>>>> = HashMap::new();
        for key in &dirty.services {
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            slices.entry(ns.to_string()).or_default().insert(name.to_string(), Vec::new());
        }
        for s in self.slices.state() {
            let Some(service) = &s.service else { continue };
            let ns = s.metadata.namespace.as_deref().unwrap_or_default();
            if let Some(v) = slices.get_mut(ns).and_then(|m| m.get_mut(service.as_str())) {
                v.push(s);
            }
        }
        What::Services(
            dirty
                .services
                .into_iter()
                .map(|key| {
                    let (ns, name) = key.split_once('/').unwrap_or(("", &key));
                    let service = self.services.get(&ObjectRef::new(name).within(ns));
                    let slices = slices.get_mut(ns).and_then(|m| m.remove(name)).unwrap_or_default();
                    ServiceObjects { key, service, slices }
                })
                .collect(),
        )
    }

    /// One Service (if it exists) and its EndpointSlices, as the stores hold them now.
    fn service_objects(&self, key: String) -> ServiceObjects {
        let (ns, name) = key.split_once('/').unwrap_or(("", &key));
        let svc = self.services.get(&ObjectRef::new(name).within(ns));
        let slices = self
            .slices
            .state()
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(ns) && s.service.as_deref() == Some(name))
            .cloned()
            .collect();
        ServiceObjects { key, service: svc, slices }
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
    pending: Arc<Pending>,
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
    // The Service each object was last about, so that an object moved to another Service (a
    // relabelled EndpointSlice) updates both.
    let mut last: HashMap<String, Option<String>> = HashMap::new();
    let mut relist: HashMap<String, Option<String>> = HashMap::new();
    let id = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
    while let Some(ev) = stream.next().await {
        match ev {
            // Applies and deletes change the store now; InitDone swaps in a complete (re)list.
            Ok(Event::Apply(o)) => {
                let key = key_of(&o);
                let before = last.insert(id(&o), key.clone());
                mark(&pending, key, before);
            }
            Ok(Event::Delete(o)) => {
                let before = last.remove(&id(&o));
                mark(&pending, key_of(&o), before);
            }
            Ok(Event::InitDone) => {
                last = std::mem::take(&mut relist);
                pending.mark_all();
            }
            Ok(Event::Init) => {
                relist.clear();
                debug!(kind, "listing");
            }
            Ok(Event::InitApply(o)) => {
                relist.insert(id(&o), key_of(&o));
            }
            Err(e) => {
                // With its causes: "client error (Connect)" alone does not say whether the name did
                // not resolve, the connection was refused, or the certificate did not match.
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    let more = c.to_string();
                    if !text.contains(&more) {
                        text.push_str(": ");
                        text.push_str(&more);
                    }
                    cause = c.source();
                }
                warn!(kind, "watch: {text}; retrying with backoff, keeping the last good view");
            }
        }
    }
}

/// Marks the Service an event is about, and the one the object was about before if it moved.
fn mark(pending: &Pending, key: Option<String>, before: Option<Option<String>>) {
    match key.clone() {
        Some(k) => pending.mark_service(k),
        None => pending.mark_all(),
    }
    if let Some(Some(b)) = before {
        if Some(&b) != key.as_ref() {
            pending.mark_service(b);
        }
    }
}

/// lb's EndpointSlice (the fields it reads) is watched as the API's `discovery.k8s.io/v1`
/// EndpointSlice: the same list and watch requests, each object read into the smaller type.
impl Resource for EndpointSlice {
    type DynamicType = ();
    type Scope = kube::core::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "EndpointSlice".into()
    }

    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "discovery.k8s.io".into()
    }

    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "endpointslices".into()
    }

    fn meta(&self) -> &kube::core::ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut kube::core::ObjectMeta {
        &mut self.metadata
    }
}
