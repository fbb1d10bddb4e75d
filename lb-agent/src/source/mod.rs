//! Where Services, EndpointSlices and this node come from: the API server ([`kube`]) or a folder
//! of manifests ([`files`]). Both send one stream of [`Change`]s: the watchers mark what changed
//! in a [`Pending`] set, and one task per source waits out the debounce, takes the set and sends
//! the objects it names. Nothing downstream calls back into a source.
//!
//! The stream is a channel of one: the set is taken only once the agent has taken the change
//! before, so whatever arrives while it applies one change goes into the next, whole (10,000
//! Services arriving as 20,000 events are applied in a few large changes, not 20,000 small ones).

pub mod files;
pub mod kube;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Service};
use tokio::sync::{mpsc::Sender, Notify};

use crate::model::EndpointSlice;

/// A change to apply, with the time it was first seen.
#[derive(Debug)]
pub struct Change {
    pub seen: Instant,
    pub what: What,
}

/// What a change carries.
#[derive(Debug)]
pub enum What {
    /// Everything the source knows: the whole desired state.
    All(Objects),
    /// Only the Services an event touched, each with its current objects.
    Services(Vec<ServiceObjects>),
}

/// One Service as the source holds it now.
#[derive(Debug, Clone)]
pub struct ServiceObjects {
    /// `namespace/name`.
    pub key: String,
    /// `None`: deleted.
    pub service: Option<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
}

impl Change {
    /// A change seen now.
    pub fn now(what: What) -> Self {
        Self { seen: Instant::now(), what }
    }

    /// Everything in `objects`, seen now.
    pub fn all(objects: Objects) -> Self {
        Self::now(What::All(objects))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading --manifests {dir}: {source}")]
    ReadDir { dir: PathBuf, source: std::io::Error },
    #[error("watching --manifests {dir}: {reason}")]
    Watch { dir: PathBuf, reason: String },
    #[error("--kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error(
        "no API server configuration (in-cluster or kubeconfig): {0}; use --manifests for standalone mode"
    )]
    NoConfig(String),
    #[error("API client: {0}")]
    Client(String),
}

/// Everything a source knows: Services, EndpointSlices, this node (from the API server), and what
/// could not be read (files). One bad object never hides the others.
#[derive(Debug, Default, Clone)]
///
/// Objects are shared (`Arc`) with the API source's stores, which hold them anyway: a full sync
/// copies none of them.
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// This node's Node object, when the source knows this node's name and finds its Node.
    pub node: Option<Box<Node>>,
    pub errors: Vec<ManifestError>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: document {doc}: not valid YAML/JSON: {reason}")]
    Syntax { path: PathBuf, doc: usize, reason: String },
    #[error("{path}: {kind} {object}: field {field}: {reason}")]
    Object {
        path: PathBuf,
        kind: String,
        object: String,
        field: String,
        reason: String,
        /// The Service (`namespace/name`) the object belongs to, when it can be told.
        service: Option<String>,
    },
}

impl ManifestError {
    /// The Service this bad object belongs to: it keeps what it had until the object is fixed.
    pub fn service(&self) -> Option<String> {
        match self {
            Self::Object { service, .. } => service.clone(),
            _ => None,
        }
    }

    /// Whether this object may be this node's Node, unread: a file that could not be read or
    /// parsed, or a Node object (or one whose kind is unknown) with a bad field.
    pub fn may_hide_a_node(&self) -> bool {
        match self {
            Self::Read { .. } | Self::Syntax { .. } => true,
            // "object": a document whose kind could not be told.
            Self::Object { kind, .. } => kind == "Node" || kind == "object",
        }
    }

    pub const fn reason_label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Syntax { .. } => "syntax",
            Self::Object { .. } => "object",
        }
    }
}

/// What changed since the last [`Change`] was sent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    /// Everything must be sent (a (re)list completed, the node or a file changed).
    pub all: bool,
    /// Services (`namespace/name`) whose Service or EndpointSlices changed.
    pub services: BTreeSet<String>,
}

/// The dirty set the watchers fill and the source's sender empties, with the time of the first
/// change not yet sent.
#[derive(Debug, Default)]
pub struct Pending {
    state: Mutex<(Dirty, Option<Instant>)>,
    wake: Notify,
}

impl Pending {
    /// Everything changed.
    pub fn mark_all(&self) {
        self.mark(|d| d.all = true);
    }

    /// Service `key`'s objects changed.
    pub fn mark_service(&self, key: String) {
        self.mark(|d| {
            d.services.insert(key);
        });
    }

    fn mark(&self, f: impl FnOnce(&mut Dirty)) {
        {
            let mut s = self.state.lock().expect("pending set");
            f(&mut s.0);
            s.1.get_or_insert_with(Instant::now);
        }
        self.wake.notify_one();
    }

    /// When the oldest change not yet sent was first seen, if one waits.
    pub fn oldest_unsent(&self) -> Option<Instant> {
        self.state.lock().expect("pending set").1
    }

    /// What changed and when it was first seen, if anything did.
    pub fn take(&self) -> Option<(Dirty, Instant)> {
        let (dirty, seen) = std::mem::take(&mut *self.state.lock().expect("pending set"));
        seen.map(|s| (dirty, s))
    }

    /// Sends a change each time something was marked, until nobody listens: after `debounce`
    /// (so that a burst goes in one change) and once the channel has room (the agent took the
    /// change before), `build` turns what changed into what to send (`None`: nothing).
    pub async fn send_changes(
        self: Arc<Self>,
        debounce: Duration,
        tx: Sender<Change>,
        mut build: impl FnMut(Dirty) -> Option<What> + Send + 'static,
    ) {
        loop {
            self.wake.notified().await;
            if !debounce.is_zero() {
                tokio::time::sleep(debounce).await;
            }
            let Ok(permit) = tx.reserve().await else { return };
            let Some((dirty, seen)) = self.take() else { continue };
            if let Some(what) = build(dirty) {
                permit.send(Change { seen, what });
            }
        }
    }
}

/// The channel sources send on: room for one change (see the module's documentation).
pub fn channel() -> (Sender<Change>, tokio::sync::mpsc::Receiver<Change>) {
    tokio::sync::mpsc::channel(1)
}

/// Where the agent reads from.
#[derive(Debug, Clone)]
pub enum Config {
    /// Standalone: a folder of manifests, and this node's name (which picks its Node there).
    Files { dir: PathBuf, node_name: Option<String> },
    /// The API server (kube's inference when `kubeconfig` is `None`), and this node's name.
    Kube { kubeconfig: Option<PathBuf>, node_name: Option<String> },
}

/// A running source; dropping it stops it.
pub enum Source {
    Files(files::FileSource),
    Kube(kube::KubeSource),
}

impl Source {
    /// Starts following `config`; changes arrive on `tx` (see [`channel`]), the first one holding
    /// everything.
    pub async fn start(config: &Config, tx: Sender<Change>) -> Result<Self, SourceError> {
        Ok(match config {
            Config::Files { dir, node_name } => {
                Self::Files(files::FileSource::start(dir, node_name.as_deref(), tx)?)
            }
            Config::Kube { kubeconfig, node_name } => {
                let client = kube::client(kubeconfig.as_deref()).await?;
                Self::Kube(kube::KubeSource::start(client, node_name.as_deref(), tx))
            }
        })
    }

    /// Sends everything again: something the model depends on besides the objects (this node's
    /// addresses) changed.
    pub fn resync(&self) {
        match self {
            Self::Files(f) => f.resync(),
            Self::Kube(k) => k.resync(),
        }
    }

    /// When the oldest change the source holds, not yet sent, was first seen (kube-proxy counts
    /// a change from its event, not from when it is applied).
    pub fn oldest_unsent(&self) -> Option<Instant> {
        match self {
            Self::Files(f) => f.pending.oldest_unsent(),
            Self::Kube(k) => k.pending.oldest_unsent(),
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Self::Files(_) => "manifests",
            Self::Kube(_) => "api-server",
        }
    }
}
