//! Standalone source: Services and EndpointSlices read from a directory of YAML and JSON files,
//! the same objects an API server would serve, followed live.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;
use serde_yaml::Value;
use tokio::sync::mpsc::Sender;
use tracing::error;

use super::{Change, ManifestError, Objects, Pending, SourceError, What};

/// Editors may write a file in several steps: changes within this long are read once.
const DEBOUNCE: Duration = Duration::from_millis(10);

/// Follows a directory of manifests.
pub struct FileSource {
    _watcher: notify::RecommendedWatcher,
    sender: tokio::task::JoinHandle<()>,
}

impl FileSource {
    /// Reads `dir` (sending everything it holds as the first change), then follows it: each
    /// write, creation, rename or removal of a manifest sends the whole directory again.
    pub fn start(dir: &Path, tx: Sender<Change>) -> Result<Self, SourceError> {
        let pending = Arc::new(Pending::default());
        // Watch the directory before the first read, so that no change slips between them.
        let p = pending.clone();
        let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                // Reads (the agent's own included) raise open/close events: only writes,
                // creations, renames and removals are changes.
                let change = !matches!(ev.kind, notify::EventKind::Access(_));
                if change && ev.paths.iter().any(|p| is_manifest(p)) {
                    p.mark_all();
                }
            }
        })
        .map_err(|e| SourceError::Watch { dir: dir.to_path_buf(), reason: e.to_string() })?;
        notify::Watcher::watch(&mut watcher, dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| SourceError::Watch { dir: dir.to_path_buf(), reason: e.to_string() })?;
        let objects =
            read_dir(dir).map_err(|source| SourceError::ReadDir { dir: dir.to_path_buf(), source })?;
        // The channel is new and has room for this one.
        let _ = tx.try_send(Change::now(What::All(objects)));
        let d = dir.to_path_buf();
        let sender = tokio::spawn(pending.send_changes(DEBOUNCE, tx, move |_| match read_dir(&d) {
            Ok(objects) => Some(What::All(objects)),
            // The directory itself is unreadable: keep serving the last good state.
            Err(e) => {
                error!("reading --manifests {}: {e}", d.display());
                None
            }
        }));
        Ok(Self { _watcher: watcher, sender })
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        self.sender.abort();
    }
}

/// Whether `path` is a file the standalone source reads.
pub fn is_manifest(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json"))
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `dir`, in name order.
pub fn read_dir(dir: &Path) -> Result<Objects, std::io::Error> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    paths.sort();
    let mut objects = Objects::default();
    for path in paths {
        match fs::read(&path) {
            Ok(bytes) => read_bytes(&path, &bytes, &mut objects),
            Err(e) => objects.errors.push(ManifestError::Read { path, reason: e.to_string() }),
        }
    }
    Ok(objects)
}

/// Reads the objects of one file's contents (multi-document YAML, JSON, `kind: List`).
pub fn read_bytes(path: &Path, bytes: &[u8], out: &mut Objects) {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            out.errors.push(ManifestError::Read { path: path.into(), reason: format!("not UTF-8: {e}") });
            return;
        }
    };
    for (doc, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(de) {
            Ok(Value::Null) => {}
            Ok(v) => read_value(path, v, out),
            Err(e) => {
                out.errors.push(ManifestError::Syntax { path: path.into(), doc, reason: e.to_string() });
                // A syntax error ends the stream: later documents cannot be located reliably.
                return;
            }
        }
    }
}

fn str_at<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_str)
}

fn read_value(path: &Path, v: Value, out: &mut Objects) {
    let kind = str_at(&v, &["kind"]).unwrap_or("").to_string();
    let api = str_at(&v, &["apiVersion"]).unwrap_or("").to_string();
    let namespace = str_at(&v, &["metadata", "namespace"]).unwrap_or("default");
    let name = str_at(&v, &["metadata", "name"]);
    let object = format!("{namespace}/{}", name.unwrap_or("<unnamed>"));
    let service = match kind.as_str() {
        "Service" => name.map(|n| format!("{namespace}/{n}")),
        "EndpointSlice" => str_at(&v, &["metadata", "labels", crate::model::LABEL_SERVICE_NAME])
            .map(|s| format!("{namespace}/{s}")),
        _ => None,
    };
    let err = |field: String, reason: String| ManifestError::Object {
        path: path.into(),
        kind: if kind.is_empty() { "object".into() } else { kind.clone() },
        object: object.clone(),
        field,
        reason,
        service: service.clone(),
    };
    match (api.as_str(), kind.as_str()) {
        ("v1", "List") => match v.get("items").and_then(Value::as_sequence) {
            Some(items) => {
                for item in items.clone() {
                    read_value(path, item, out);
                }
            }
            None => out.errors.push(err("items".into(), "missing or not a list".into())),
        },
        ("v1", "Service") => match typed::<Service>(v) {
            Ok(s) => out.services.push(s),
            Err((field, reason)) => out.errors.push(err(field, reason)),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => match typed::<EndpointSlice>(v) {
            Ok(s) => out.slices.push(s),
            Err((field, reason)) => out.errors.push(err(field, reason)),
        },
        // Other kinds (Deployments, ConfigMaps, ...) may share the files; they are not ours.
        (_, k) if !k.is_empty() && !api.is_empty() => {}
        _ => out
            .errors
            .push(err(if api.is_empty() { "apiVersion".into() } else { "kind".into() }, "missing".into())),
    }
}

/// Deserialises with the path of the field at fault.
fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let field = e.path().to_string();
        (if field == "." { "<root>".into() } else { field }, e.into_inner().to_string())
    })
}
