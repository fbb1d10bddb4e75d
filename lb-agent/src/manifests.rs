//! Standalone source: Services and EndpointSlices read from a directory of YAML and JSON files,
//! the same objects an API server would serve.

use std::{
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;
use serde_yaml::Value;

/// Objects read from a directory, and what could not be read. One bad object never hides the
/// others.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
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

    pub const fn reason_label(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Syntax { .. } => "syntax",
            Self::Object { .. } => "object",
        }
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
