//! Golden tests for the Kubernetes model: each folder under `testdata/golden` holds Services and
//! EndpointSlices (`objects.yaml`, optionally `before.yaml` applied first), the node's context
//! (`node.yaml`), and the expected dump of the maps (`expected.txt`). Run with
//! `UPDATE_GOLDEN=1` to rewrite the expected files, then review the diff.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_agent::{
    dump,
    manifests::{read_bytes, Objects},
    model::{self, Context},
    sync::{Capacities, MemoryMaps, Options, Reconciler},
};

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Node {
    node_name: Option<String>,
    zone: Option<String>,
    service_proxy_name: Option<String>,
    max_endpoints_per_service: Option<usize>,
}

fn read_objects(path: &Path) -> Objects {
    let mut o = Objects::default();
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    read_bytes(Path::new(path.file_name().expect("file name")), &bytes, &mut o);
    o
}

fn run_case(dir: &Path) -> String {
    let node: Node = match std::fs::read_to_string(dir.join("node.yaml")) {
        Ok(s) => serde_yaml::from_str(&s).expect("node.yaml"),
        Err(_) => Node::default(),
    };
    let ctx = Context {
        node_name: node.node_name,
        zone: node.zone,
        service_proxy_name: node.service_proxy_name,
        max_endpoints_per_service: node.max_endpoints_per_service.unwrap_or(model::DEFAULT_MAX_ENDPOINTS),
    };
    let caps = Capacities { services: 4096, backends: 4096, maglev_slots: 1 << 20 };
    let opts = Options { max_table_size: 65_537, maglev_seed: 0, drain_timeout: Duration::from_secs(60) };
    let mut r = Reconciler::new(caps, opts);
    let mut maps = MemoryMaps::default();
    let mut names = BTreeMap::new();
    let mut out = String::new();
    let mut steps = vec![];
    if dir.join("before.yaml").exists() {
        steps.push(dir.join("before.yaml"));
    }
    steps.push(dir.join("objects.yaml"));
    let now = Instant::now();
    for path in steps {
        let objects = read_objects(&path);
        let m = model::build(&objects.services, &objects.slices, &ctx);
        let mut held = m.held.clone();
        held.extend(objects.errors.iter().filter_map(|e| e.service()));
        let (_, sync_errors) = r.sync(&m.frontends, &held, now, &mut maps);
        assert!(sync_errors.is_empty(), "{sync_errors:?}");
        for f in m.frontends.values() {
            let port = if f.port_name.is_empty() { String::new() } else { format!(":{}", f.port_name) };
            names.insert(f.addr, format!("{}{port}", f.service));
        }
        out.clear();
        for e in &objects.errors {
            out.push_str(&format!("error {e}\n"));
        }
        for e in &m.errors {
            out.push_str(&format!("error {e}\n"));
        }
        for h in &held {
            out.push_str(&format!("held {h}\n"));
        }
    }
    out.push_str(&dump::render(&maps, &names));
    out
}

#[test]
fn golden_cases() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(&root).expect("golden dir").map(|e| e.expect("entry").path()).collect();
    cases.sort();
    assert!(cases.len() >= 15, "expected the golden cases, found {}", cases.len());
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    for dir in cases {
        let got = run_case(&dir);
        let expected_path = dir.join("expected.txt");
        if update {
            std::fs::write(&expected_path, &got).expect("write expected");
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != want {
            failed.push(format!("{}:\n--- expected\n{want}--- got\n{got}", dir.display()));
        }
    }
    assert!(failed.is_empty(), "golden mismatches (UPDATE_GOLDEN=1 rewrites them):\n{}", failed.join("\n"));
}
