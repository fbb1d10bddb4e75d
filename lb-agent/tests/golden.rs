//! Golden tests for the Kubernetes model, through the real agent and reconciler: each folder under `testdata/golden` holds Services and
//! EndpointSlices (`objects.yaml`, optionally `before.yaml` applied first), the node's context
//! (`node.yaml`), and the expected dump of the maps and health-check node ports (`expected.txt`). Run with
//! `UPDATE_GOLDEN=1` to rewrite the expected files, then review the diff.

use std::path::{Path, PathBuf};

use lb_agent::{
    agent::Agent,
    model::{self, Context},
    reconcile::{Capacities, MemoryMaps, Options, Reconciler},
    source::{files::Reader, Change, Objects},
};
use lb_testkit::dump;

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Node {
    node_name: Option<String>,
    zone: Option<String>,
    service_proxy_name: Option<String>,
    max_endpoints_per_service: Option<usize>,
    /// `--nodeport-addresses`, in the flag's syntax (default `primary`).
    nodeport_addresses: Option<String>,
    /// This node's local addresses (that CIDRs of `nodeportAddresses` select from).
    local_addresses: Option<Vec<std::net::Ipv4Addr>>,
    /// This node's global IPv6 addresses (likewise, for IPv6).
    local_addresses6: Option<Vec<std::net::Ipv6Addr>>,
    /// `--external-ips` (default `all`).
    external_ips: Option<String>,
    /// `--ipv6` on or off (default on).
    ipv6: Option<bool>,
}

/// The objects of `path`, this node's Node (named `node_name`) among them.
fn read_objects(path: &Path, node_name: Option<&str>) -> Objects {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut reader = Reader::new(node_name);
    reader.read_bytes(Path::new(path.file_name().expect("file name")), &bytes);
    reader.finish()
}

fn run_case(dir: &Path) -> String {
    let node: Node = match std::fs::read_to_string(dir.join("node.yaml")) {
        Ok(s) => serde_yaml::from_str(&s).expect("node.yaml"),
        Err(_) => Node::default(),
    };
    let node_name = node.node_name.clone();
    let ctx = Context {
        node_name: node.node_name,
        zone: node.zone,
        service_proxy_name: node.service_proxy_name,
        max_endpoints_per_service: node.max_endpoints_per_service.unwrap_or(model::DEFAULT_MAX_ENDPOINTS),
        nodeport_addresses: Vec::new(),
        nodeport_addresses6: Vec::new(),
        node_ip6: None,
        local_addresses6: Vec::new(),
        node_ip: None,
        local_addresses: Vec::new(),
        external_ips: node.external_ips.as_deref().unwrap_or("all").parse().expect("externalIps"),
        ipv6: node.ipv6.unwrap_or(true),
    };
    let nodeports: model::node::NodePortAddresses =
        node.nodeport_addresses.as_deref().unwrap_or("primary").parse().expect("nodeportAddresses");
    let caps = Capacities { services: 4096, backends: 4096, maglev_slots: 1 << 20, ..Capacities::default() };
    let opts = Options::default();
    // The real agent, as the binary drives it, over maps in memory.
    let mut agent = Agent::new(MemoryMaps::default(), Reconciler::new(caps, opts), ctx)
        .with_nodeport_addresses(nodeports, node.local_addresses.unwrap_or_default())
        .with_local_ipv6(node.local_addresses6.unwrap_or_default());
    let mut out = String::new();
    let mut steps = vec![];
    if dir.join("before.yaml").exists() {
        steps.push(dir.join("before.yaml"));
    }
    steps.push(dir.join("objects.yaml"));
    for path in steps {
        let report = agent.apply(Change::all(read_objects(&path, node_name.as_deref())));
        out.clear();
        for e in &report.errors {
            out.push_str(&format!("error {e}\n"));
        }
        for h in &report.held {
            out.push_str(&format!("held {h}\n"));
        }
    }
    out.push_str(&dump::render(&agent.maps));
    for (service, h) in agent.health_checks() {
        out.push_str(&format!(
            "health-check {service} port={} local-endpoints={}\n",
            h.port, h.local_endpoints
        ));
    }
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
