//! Standalone source: Services, EndpointSlices and this node's Node read from a directory of YAML
//! and JSON files, the same objects an API server would serve, followed live.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, Service};
use serde::Deserialize;
use serde_yaml::Value;
use tokio::sync::mpsc::Sender;
use tracing::error;

use crate::model::EndpointSlice;

use super::{Change, ManifestError, Objects, Pending, SourceError, What};

/// Editors may write a file in several steps: changes within this long are read once.
const DEBOUNCE: Duration = Duration::from_millis(10);

/// Follows a directory of manifests.
pub struct FileSource {
    _watcher: notify::RecommendedWatcher,
    sender: tokio::task::JoinHandle<()>,
    pub(super) pending: Arc<Pending>,
}

impl FileSource {
    /// Reads `dir` (sending everything it holds as the first change), then follows it: each
    /// write, creation, rename or removal of a manifest sends the whole directory again.
    /// `node_name` picks this node's Node among the manifests (see [`Reader`]).
    pub fn start(dir: &Path, node_name: Option<&str>, tx: Sender<Change>) -> Result<Self, SourceError> {
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
        let objects = read_dir(dir, node_name)
            .map_err(|source| SourceError::ReadDir { dir: dir.to_path_buf(), source })?;
        // The channel is new and has room for this one.
        let _ = tx.try_send(Change::now(What::All(objects)));
        let d = dir.to_path_buf();
        let node_name = node_name.map(str::to_string);
        let p = pending.clone();
        let sender = tokio::spawn(p.send_changes(DEBOUNCE, tx, move |_| {
            match read_dir(&d, node_name.as_deref()) {
                Ok(objects) => Some(What::All(objects)),
                // The directory itself is unreadable: keep serving the last good state.
                Err(e) => {
                    error!("reading --manifests {}: {e}", d.display());
                    None
                }
            }
        }));
        Ok(Self { _watcher: watcher, sender, pending })
    }

    /// Reads the directory again and sends everything (something the model depends on outside
    /// the objects changed).
    pub fn resync(&self) {
        self.pending.mark_all();
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

/// Reads every `*.yaml`, `*.yml` and `*.json` file directly in `dir`, in name order, for the
/// node `node_name` (see [`Reader`]).
pub fn read_dir(dir: &Path, node_name: Option<&str>) -> Result<Objects, std::io::Error> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    paths.sort();
    let mut reader = Reader::new(node_name);
    for path in paths {
        match fs::read(&path) {
            Ok(bytes) => reader.read_bytes(&path, &bytes),
            Err(e) => reader.objects.errors.push(ManifestError::Read { path, reason: e.to_string() }),
        }
    }
    Ok(reader.finish())
}

/// Reads the objects of one file's contents into `out`, for no node in particular: Node objects
/// are skipped (see [`Reader`]).
pub fn read_bytes(path: &Path, bytes: &[u8], out: &mut Objects) {
    let mut reader = Reader::new(None);
    reader.objects = std::mem::take(out);
    reader.read_bytes(path, bytes);
    *out = reader.finish();
}

fn str_at<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_str)
}

/// One reading of manifests, file after file, for one node.
///
/// The Node named `node_name` (`--node-name`) becomes [`Objects::node`]; Nodes of other names,
/// and every Node without a `node_name`, are skipped unread, as the API source watches only this
/// node's. This node's Node listed twice is an error naming both files, and the first read stands
/// (even when it was malformed, so that the outcome never depends on which copy is bad).
#[derive(Debug)]
pub struct Reader<'a> {
    node_name: Option<&'a str>,
    /// The file this node's Node was found in.
    node_from: Option<PathBuf>,
    objects: Objects,
}

impl<'a> Reader<'a> {
    pub fn new(node_name: Option<&'a str>) -> Self {
        Self { node_name, node_from: None, objects: Objects::default() }
    }

    /// Reads the objects of one file's contents (multi-document YAML, JSON, `kind: List`).
    pub fn read_bytes(&mut self, path: &Path, bytes: &[u8]) {
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                self.objects
                    .errors
                    .push(ManifestError::Read { path: path.into(), reason: format!("not UTF-8: {e}") });
                return;
            }
        };
        if self.read_json(path, text) {
            return;
        }
        for (doc, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
            match Value::deserialize(de) {
                Ok(Value::Null) => {}
                Ok(v) => self.read_value(path, v),
                Err(e) => {
                    self.objects.errors.push(ManifestError::Syntax {
                        path: path.into(),
                        doc,
                        reason: e.to_string(),
                    });
                    // A syntax error ends the stream: later documents cannot be located reliably.
                    return;
                }
            }
        }
    }

    /// Reads a file of one JSON object without the YAML loader, which holds all the events of a
    /// document at once (for a 10 MB List of 10,000 Services and their slices, 200 MB of them
    /// beside a 170 MB tree of values), and a `kind: List` one item at a time, each kept as its
    /// text until it is read. JSON is read as JSON, as `kubectl` reads it (`1e400` is out of
    /// range, `-0` is a float, a surrogate-pair escape is one character). All or nothing: false,
    /// with nothing read, when the text is not one JSON object this way can read whole (YAML,
    /// several documents, a syntax error, a key twice in any object, a number out of range): the
    /// YAML reader reads the file then, and reports what it finds.
    fn read_json(&mut self, path: &Path, text: &str) -> bool {
        use serde_json::value::RawValue;
        if !text.trim_start_matches('\u{feff}').trim_start().starts_with('{') {
            return false;
        }
        // The top level's members, unparsed: a List's items are parsed one by one.
        let Ok(head) = serde_json::from_str::<Members>(text) else { return false };
        let field = |name: &str| head.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        let string = |v: Option<&RawValue>| v.and_then(|v| serde_json::from_str::<String>(v.get()).ok());
        let mut keys: Vec<&str> = head.0.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return false;
        }
        let list = string(field("apiVersion")).as_deref() == Some("v1")
            && string(field("kind")).as_deref() == Some("List");
        let items = field("items").and_then(|v| serde_json::from_str::<Vec<&RawValue>>(v.get()).ok());
        let values: Box<dyn Iterator<Item = &str>> = match items {
            Some(items) if list => Box::new(items.into_iter().map(RawValue::get)),
            _ => Box::new(std::iter::once(text)),
        };
        let before = (
            self.objects.services.len(),
            self.objects.slices.len(),
            self.objects.errors.len(),
            self.objects.node.is_some(),
            self.node_from.is_some(),
        );
        for value in values {
            match serde_json::from_str::<Value>(value) {
                Ok(v) => self.read_value(path, v),
                Err(_) => {
                    // Undo what this file added: the YAML reader reads it whole.
                    self.objects.services.truncate(before.0);
                    self.objects.slices.truncate(before.1);
                    self.objects.errors.truncate(before.2);
                    if !before.3 {
                        self.objects.node = None;
                    }
                    if !before.4 {
                        self.node_from = None;
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Everything read.
    pub fn finish(self) -> Objects {
        self.objects
    }

    fn read_value(&mut self, path: &Path, v: Value) {
        let kind = str_at(&v, &["kind"]).unwrap_or("").to_string();
        let api = str_at(&v, &["apiVersion"]).unwrap_or("").to_string();
        let namespace = str_at(&v, &["metadata", "namespace"]).unwrap_or("default");
        let name = str_at(&v, &["metadata", "name"]);
        let object = match kind.as_str() {
            // Cluster-scoped.
            "Node" => name.unwrap_or("<unnamed>").to_string(),
            _ => format!("{namespace}/{}", name.unwrap_or("<unnamed>")),
        };
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
            ("v1", "List") => {
                // (Tags, `!x`, are looked through, as `str_at` does.)
                let items = match untag(v) {
                    Value::Mapping(mut m) => m.remove("items").map(untag),
                    _ => None,
                };
                match items {
                    Some(Value::Sequence(items)) => {
                        for item in items {
                            self.read_value(path, item);
                        }
                    }
                    _ => self.objects.errors.push(err("items".into(), "missing or not a list".into())),
                }
            }
            ("v1", "Service") => match typed::<Service>(v) {
                Ok(s) => self.objects.services.push(Arc::new(s)),
                Err((field, reason)) => self.objects.errors.push(err(field, reason)),
            },
            ("discovery.k8s.io/v1", "EndpointSlice") => match typed::<EndpointSlice>(v) {
                Ok(s) => self.objects.slices.push(Arc::new(s)),
                Err((field, reason)) => self.objects.errors.push(err(field, reason)),
            },
            ("v1", "Node") if name.is_some() && name == self.node_name => match &self.node_from {
                Some(first) => self.objects.errors.push(err(
                    "metadata.name".into(),
                    format!("this node's Node again (the one in {} is used)", first.display()),
                )),
                None => {
                    self.node_from = Some(path.into());
                    match typed::<Node>(v) {
                        Ok(n) => self.objects.node = Some(Box::new(n)),
                        Err((field, reason)) => self.objects.errors.push(err(field, reason)),
                    }
                }
            },
            // Other kinds (Deployments, ConfigMaps, ...) may share the files; they are not ours.
            (_, k) if !k.is_empty() && !api.is_empty() => {}
            _ => self.objects.errors.push(err(
                if api.is_empty() { "apiVersion".into() } else { "kind".into() },
                "missing".into(),
            )),
        }
    }
}

/// `v` without its tags (`!x`).
fn untag(v: Value) -> Value {
    match v {
        Value::Tagged(t) => untag(t.value),
        v => v,
    }
}

/// A JSON object's members in order, values unparsed (keys may repeat: the caller checks).
struct Members<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visit<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members<'a>, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de serde_json::value::RawValue>()? {
                    out.push(entry);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// Deserialises with the path of the field at fault.
fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let field = e.path().to_string();
        (if field == "." { "<root>".into() } else { field }, e.into_inner().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, internal_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: z-{name}}}}}\nstatus:\n  addresses: [{{type: InternalIP, address: \"{internal_ip}\"}}]\n---\n"
        )
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n";

    fn read(node_name: Option<&str>, files: &[(&str, String)]) -> (Objects, Vec<String>) {
        let mut r = Reader::new(node_name);
        for (path, text) in files {
            r.read_bytes(Path::new(path), text.as_bytes());
        }
        let o = r.finish();
        let errors = o.errors.iter().map(ToString::to_string).collect();
        (o, errors)
    }

    fn node_ip(o: &Objects) -> Option<String> {
        let addrs = o.node.as_ref()?.status.as_ref()?.addresses.as_ref()?;
        Some(addrs.first()?.address.clone())
    }

    #[test]
    fn this_nodes_node_is_read_and_others_are_skipped() {
        let files = [("a.yaml", format!("{}{SERVICE}{}", node("n2", "10.0.0.2"), node("n1", "10.0.0.1")))];
        let (o, errors) = read(Some("n1"), &files);
        assert_eq!(errors, Vec::<String>::new());
        assert_eq!(node_ip(&o).as_deref(), Some("10.0.0.1"));
        assert_eq!(o.services.len(), 1);
        // Not this node's name, or no name at all: no Node.
        for name in [Some("n3"), None] {
            let (o, errors) = read(name, &files);
            assert!(o.node.is_none() && errors.is_empty(), "{name:?}: {errors:?}");
        }
        // Inside a List, too.
        let list =
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: n1}}\n";
        assert!(read(Some("n1"), &[("l.yaml", list.into())]).0.node.is_some());
        // The shorthand reads for no node.
        let mut o = Objects::default();
        read_bytes(Path::new("a.yaml"), files[0].1.as_bytes(), &mut o);
        assert!(o.node.is_none() && o.errors.is_empty() && o.services.len() == 1);
    }

    #[test]
    fn a_malformed_node_is_reported_with_its_field_and_the_rest_is_read() {
        let bad = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: 7}]}\n---\n";
        let (o, errors) = read(Some("n1"), &[("a.yaml", format!("{bad}{SERVICE}"))]);
        assert!(o.node.is_none());
        assert_eq!(o.services.len(), 1, "the rest is read");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("a.yaml: Node n1: field status.addresses[0].address: invalid type"),
            "{errors:?}"
        );
        assert_eq!(o.errors[0].service(), None);
        // Another node's malformed Node is not ours: skipped unread.
        let (_, errors) = read(Some("n2"), &[("a.yaml", bad.into())]);
        assert!(errors.is_empty(), "{errors:?}");
    }

    /// A file of one JSON object, read without the YAML loader (a `kind: List` item by item),
    /// gives exactly what the YAML reader gives for the same text (forced here by a comment line
    /// before it): the objects, and every error with its field, for good items, malformed ones,
    /// null and non-object items, a List without a list of items, one object, and text that is
    /// no JSON object at all (which the YAML reader reads).
    #[test]
    fn json_files_read_as_their_yaml_reading() {
        let service = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "a"}, "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}"#;
        let bad = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"}, "spec": {"ports": [{"port": "eighty"}]}}"#;
        let slice = r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web-1", "namespace": "a", "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.9"]}]}"#;
        let node = r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}"#;
        let list = |items: &str| format!(r#"{{"apiVersion": "v1", "kind": "List", "items": [{items}]}}"#);
        let texts = [
            list(&format!("{service}, {bad}, {slice}, {node}, null, 7, {{\"kind\": \"Service\"}}")),
            list(""),
            r#"{"apiVersion": "v1", "kind": "List", "items": {"a": 1}}"#.to_string(),
            r#"{"apiVersion": "v1", "kind": "List"}"#.to_string(),
            service.to_string(),
            format!("  \n{bad}\n"),
            // What JSON cannot read whole goes to the YAML reader, whole: a key twice in an
            // item, or at the top, a number out of range.
            list(&format!(
                "{service}, {}",
                slice.replacen("\"addressType\"", "\"kind\": \"EndpointSlice\", \"addressType\"", 1)
            )),
            format!(
                r#"{{"apiVersion": "v1", "kind": "List", "metadata": {{}}, "metadata": {{}}, "items": [{service}]}}"#
            ),
            list(&format!("{service}, {}", service.replacen("\"web\"", "\"big\", \"x\": 1e400", 1))),
        ];
        // Positions are left out of the comparison (the YAML reading's are a line further on).
        fn unplaced(e: &str) -> String {
            let Some(i) = e.find(" at line ") else { return e.to_string() };
            let rest = &e[i + " at line ".len()..];
            let digits = |s: &str| s.chars().take_while(char::is_ascii_digit).count();
            let mut after = digits(rest);
            if rest[after..].starts_with(" column ") {
                after += " column ".len() + digits(&rest[after + " column ".len()..]);
            }
            format!("{}{}", &e[..i], unplaced(&rest[after..]))
        }
        let unplaced_all =
            |errors: Vec<String>| -> Vec<String> { errors.iter().map(|e| unplaced(e)).collect() };
        for text in texts {
            let (json, json_errors) = read(Some("n1"), &[("f.json", text.clone())]);
            let (yaml, yaml_errors) = read(Some("n1"), &[("f.json", format!("# YAML\n{text}"))]);
            assert_eq!(unplaced_all(json_errors), unplaced_all(yaml_errors), "{text}");
            assert_eq!(unplaced(&format!("{json:?}")), unplaced(&format!("{yaml:?}")), "{text}");
        }
        // A key twice in one item: nothing of the file is read (as the YAML reader does).
        let twice = list(&format!(
            "{service}, {}",
            service.replacen("\"kind\"", "\"kind\": \"Service\", \"kind\"", 1)
        ));
        let (o, errors) = read(None, &[("f.json", twice)]);
        assert!(o.services.is_empty(), "{o:?}");
        assert_eq!(errors.len(), 1, "{errors:?}");
        // A tagged YAML List is read through its tags.
        let tagged = "--- !x\napiVersion: v1\nkind: List\nitems: !y\n- {apiVersion: v1, kind: Service, metadata: {name: t}, spec: {clusterIP: 10.96.0.3}}\n";
        let (o, errors) = read(None, &[("t.yaml", tagged.into())]);
        assert_eq!((o.services.len(), errors.len()), (1, 0), "{errors:?}");
        // The first: everything read, the malformed item reported with its field.
        let (o, errors) =
            read(Some("n1"), &[("f.json", list(&format!("{service}, {bad}, {slice}, {node}")))]);
        assert_eq!((o.services.len(), o.slices.len(), node_ip(&o).as_deref()), (1, 1, Some("10.0.0.1")));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("f.json: Service default/bad: field spec.ports[0].port: invalid type"),
            "{errors:?}"
        );
        // No JSON object: read as YAML (a syntax error, two documents, a flow mapping).
        let (o, errors) = read(None, &[("f.json", format!("{service},"))]);
        assert_eq!(o.services.len(), 1, "the YAML reader's first document");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("f.json: document 1: not valid YAML/JSON"), "{errors:?}");
        let (o, errors) = read(None, &[("f.json", format!("{service}\n---\n{slice}\n"))]);
        assert_eq!((o.services.len(), o.slices.len(), errors.len()), (1, 1, 0), "{errors:?}");
        let flow = "{apiVersion: v1, kind: Service, metadata: {name: flow}, spec: {clusterIP: 10.96.0.2}}";
        let (o, errors) = read(None, &[("f.yaml", flow.into())]);
        assert_eq!((o.services.len(), errors.len()), (1, 0), "{errors:?}");
    }

    #[test]
    fn this_nodes_node_twice_is_an_error_naming_both_files_and_the_first_stands() {
        let dir = std::env::temp_dir().join(format!("lb-files-nodes-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the test folder");
        fs::write(dir.join("b.yaml"), node("n1", "10.0.0.2")).expect("write b.yaml");
        fs::write(dir.join("a.yaml"), node("n1", "10.0.0.1")).expect("write a.yaml");
        fs::write(dir.join("c.yaml"), node("n2", "10.0.0.3")).expect("write c.yaml");
        let o = read_dir(&dir, Some("n1")).expect("read the test folder");
        let errors: Vec<String> = o.errors.iter().map(ToString::to_string).collect();
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(node_ip(&o).as_deref(), Some("10.0.0.1"), "the first by file name");
        assert_eq!(
            errors,
            [format!(
                "{}: Node n1: field metadata.name: this node's Node again (the one in {} is used)",
                dir.join("b.yaml").display(),
                dir.join("a.yaml").display()
            )]
        );
        // In one file; and a malformed first copy still stands (the second is not used).
        let bad = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: 5\n---\n";
        let (o, errors) = read(Some("n1"), &[("a.yaml", format!("{bad}{}", node("n1", "10.0.0.1")))]);
        assert!(o.node.is_none());
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("a.yaml: Node n1: field spec: invalid type"), "{errors:?}");
        assert_eq!(
            errors[1],
            "a.yaml: Node n1: field metadata.name: this node's Node again (the one in a.yaml is used)"
        );
    }
}
