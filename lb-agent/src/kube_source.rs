//! Kubernetes source: kube-rs watchers and reflectors on Services, EndpointSlices and this node's
//! Node. The stores are the agent's whole view: on any event the desired state is recomputed
//! from them (reconcile by level), so nothing depends on seeing a delete event. A relist (after a
//! 410 Gone or a reconnect) is buffered by the reflector and swapped in whole when it completes,
//! so a partial list is never taken for the whole; while a relist fails, the last good view stays.

use std::time::Instant;

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        reflector::{self, Store},
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
}

impl KubeSource {
    /// Starts the watches. Each event is signalled on `changes` with the time it was seen.
    pub fn start(client: Client, node_name: Option<&str>, changes: UnboundedSender<Instant>) -> Self {
        let mut tasks = Vec::new();
        let (services, w) = reflector::store();
        tasks.push(tokio::spawn(follow(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            w,
            changes.clone(),
        )));
        let (slices, w) = reflector::store();
        tasks.push(tokio::spawn(follow(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            w,
            changes.clone(),
        )));
        let node = node_name.map(|name| {
            let (node, w) = reflector::store();
            let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
            tasks.push(tokio::spawn(follow(Api::<Node>::all(client), cfg, w, changes)));
            node
        });
        Self { services, slices, node, tasks }
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
            Ok(Event::Apply(_) | Event::Delete(_) | Event::InitDone) => {
                let _ = changes.send(Instant::now());
            }
            Ok(Event::Init) => debug!(kind, "listing"),
            Ok(Event::InitApply(_)) => {}
            Err(e) => warn!(kind, "watch: {e}; retrying with backoff, keeping the last good view"),
        }
    }
}
