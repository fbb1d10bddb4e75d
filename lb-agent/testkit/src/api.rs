//! An in-process Kubernetes API server for tests and benchmarks: it speaks the real list and watch
//! protocol for Services, EndpointSlices and Nodes (JSON lists with a resourceVersion, chunked
//! watch streams of `{"type", "object"}` lines, replay from a resourceVersion, bookmarks, `410
//! Gone` for a compacted history), and lets a test misbehave on purpose: drop every watch, hold
//! reconnecting watches back, make lists slow or fail, or go away altogether.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    fn of(obj: &Value) -> Self {
        match obj["kind"].as_str() {
            Some("Service") => Self::Services,
            Some("EndpointSlice") => Self::EndpointSlices,
            Some("Node") => Self::Nodes,
            other => panic!("mock API server: unsupported kind {other:?}"),
        }
    }

    fn list_kind(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Services => ("v1", "ServiceList", "Service"),
            Self::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSliceList", "EndpointSlice"),
            Self::Nodes => ("v1", "NodeList", "Node"),
        }
    }
}

#[derive(Clone, Debug)]
struct Event {
    resource: Resource,
    rv: u64,
    line: Bytes,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
    objects: BTreeMap<(Resource, String), Value>,
    history: Vec<Event>,
}

struct ApiState {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    drops: broadcast::Sender<()>,
    hold_watches: AtomicBool,
    down: AtomicBool,
    slow_list_ms: AtomicU64,
    failing_lists: AtomicU32,
    lists: AtomicU32,
    watches: AtomicU32,
}

pub struct MockApi {
    pub addr: SocketAddr,
    state: Arc<ApiState>,
    server: tokio::task::JoinHandle<()>,
}

fn key(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!("{}/{}", m["namespace"].as_str().unwrap_or(""), m["name"].as_str().unwrap_or(""))
}

impl MockApi {
    pub async fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind mock API server");
        Self::start_on(listener).await
    }

    /// Serves on `listener` (bound, say, inside a network namespace where an agent runs).
    pub async fn start_on(listener: std::net::TcpListener) -> Self {
        let (events, _) = broadcast::channel(4096);
        let (drops, _) = broadcast::channel(16);
        let state = Arc::new(ApiState {
            inner: Mutex::new(Inner { rv: 1, ..Default::default() }),
            events,
            drops,
            hold_watches: AtomicBool::new(false),
            down: AtomicBool::new(false),
            slow_list_ms: AtomicU64::new(0),
            failing_lists: AtomicU32::new(0),
            lists: AtomicU32::new(0),
            watches: AtomicU32::new(0),
        });
        let app = Router::new()
            .route("/api/v1/services", get(|s, q| handle(s, q, Resource::Services)))
            .route(
                "/apis/discovery.k8s.io/v1/endpointslices",
                get(|s, q| handle(s, q, Resource::EndpointSlices)),
            )
            .route("/api/v1/nodes", get(|s, q| handle(s, q, Resource::Nodes)))
            .with_state(state.clone());
        listener.set_nonblocking(true).expect("non-blocking listener");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, server }
    }

    /// A kubeconfig file's contents that point at this server (for an agent run as a process).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: mock, cluster: {{server: \"http://{}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: mock, user: u}}}}]\ncurrent-context: c\n",
            self.addr
        )
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("url");
        kube::Client::try_from(kube::Config::new(url)).expect("client")
    }

    fn record(&self, kind: &str, mut obj: Value, delete: bool) {
        let mut inner = self.state.inner.lock().expect("state");
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let resource = Resource::of(&obj);
        let k = (resource, key(&obj));
        let existed = inner.objects.contains_key(&k);
        let kind = if delete {
            "DELETED"
        } else if existed {
            "MODIFIED"
        } else {
            kind
        };
        if delete {
            inner.objects.remove(&k);
        } else {
            inner.objects.insert(k, obj.clone());
        }
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).expect("json");
        line.push(b'\n');
        let ev = Event { resource, rv, line: line.into() };
        inner.history.push(ev.clone());
        let _ = self.state.events.send(ev);
    }

    /// Creates or replaces an object (ADDED or MODIFIED).
    pub fn apply(&self, obj: Value) {
        self.record("ADDED", obj, false);
    }

    /// Deletes an object (DELETED with its last state).
    pub fn delete(&self, obj: Value) {
        self.record("DELETED", obj, true);
    }

    /// Sends a bookmark to every watch.
    pub fn bookmark(&self) {
        let inner = self.state.inner.lock().expect("state");
        for r in [Resource::Services, Resource::EndpointSlices, Resource::Nodes] {
            let (api, _, kind) = r.list_kind();
            let obj = json!({"apiVersion": api, "kind": kind, "metadata": {"resourceVersion": inner.rv.to_string()}});
            let mut line = serde_json::to_vec(&json!({"type": "BOOKMARK", "object": obj})).expect("json");
            line.push(b'\n');
            let _ = self.state.events.send(Event { resource: r, rv: inner.rv, line: line.into() });
        }
    }

    /// Ends every open watch (as a dropped connection does).
    pub fn drop_watches(&self) {
        let _ = self.state.drops.send(());
    }

    /// Holds new watch requests back until released.
    pub fn hold_watches(&self, hold: bool) {
        self.state.hold_watches.store(hold, Ordering::SeqCst);
    }

    /// Takes the server away (every request answered 503, open watches ended) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.drop_watches();
        }
    }

    /// Forgets the event history: watches from an older resourceVersion get 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.state.inner.lock().expect("state");
        inner.compacted = inner.rv;
        inner.history.clear();
    }

    pub fn set_slow_lists(&self, delay: Duration) {
        self.state.slow_list_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The next `n` list requests fail with 500.
    pub fn fail_lists(&self, n: u32) {
        self.state.failing_lists.store(n, Ordering::SeqCst);
    }

    /// List and watch requests served so far.
    pub fn requests(&self) -> (u32, u32) {
        (self.state.lists.load(Ordering::SeqCst), self.state.watches.load(Ordering::SeqCst))
    }
}

impl Drop for MockApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<HashMap<String, String>>,
    resource: Resource,
) -> Response {
    if state.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "the API server is away").into_response();
    }
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        state.watches.fetch_add(1, Ordering::SeqCst);
        while state.hold_watches.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        return watch(state, resource, from);
    }
    state.lists.fetch_add(1, Ordering::SeqCst);
    let delay = state.slow_list_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if state.failing_lists.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        return (StatusCode::INTERNAL_SERVER_ERROR, "injected failure").into_response();
    }
    let inner = state.inner.lock().expect("state");
    let (api, kind, _) = resource.list_kind();
    let items: Vec<&Value> =
        inner.objects.iter().filter(|((r, _), _)| *r == resource).map(|(_, v)| v).collect();
    let body = json!({"apiVersion": api, "kind": kind, "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items});
    ([("content-type", "application/json")], body.to_string()).into_response()
}

fn watch(state: Arc<ApiState>, resource: Resource, from: u64) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1024);
    let (backlog, mut live, mut drops) = {
        let inner = state.inner.lock().expect("state");
        if from < inner.compacted {
            let status = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "metadata": {},
                "status": "Failure", "message": format!("too old resource version: {from} ({})", inner.compacted),
                "reason": "Expired", "code": 410}});
            let mut line = serde_json::to_vec(&status).expect("json");
            line.push(b'\n');
            let _ = tx.try_send(Ok(line.into()));
            (Vec::new(), None, None)
        } else {
            let backlog: Vec<Event> =
                inner.history.iter().filter(|e| e.resource == resource && e.rv > from).cloned().collect();
            // Subscribed under the lock: nothing falls between the backlog and the live events.
            (backlog, Some(state.events.subscribe()), Some(state.drops.subscribe()))
        }
    };
    tokio::spawn(async move {
        let mut last = from;
        for e in backlog {
            last = e.rv;
            if tx.send(Ok(e.line)).await.is_err() {
                return;
            }
        }
        let (Some(live), Some(drops)) = (live.as_mut(), drops.as_mut()) else { return };
        loop {
            tokio::select! {
                _ = drops.recv() => return,
                e = live.recv() => match e {
                    Ok(e) if e.resource == resource && (e.rv > last || is_bookmark(&e.line)) => {
                        last = last.max(e.rv);
                        if tx.send(Ok(e.line)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    ([("content-type", "application/json")], Body::from_stream(stream)).into_response()
}

fn is_bookmark(line: &[u8]) -> bool {
    line.windows(10).any(|w| w == b"\"BOOKMARK\"")
}
