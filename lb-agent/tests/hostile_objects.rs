//! Hostile objects through both sources: files that are not UTF-8, not YAML, nested ten thousand
//! deep, of the wrong types or shapes; and objects an API server would accept but that push the
//! limits (10,000 endpoints in one slice, a thousand ports, slices for no Service). Each bad one is
//! rejected with an error naming it; nothing else is lost; a Service whose object turns bad keeps
//! what it had.

use std::path::Path;

use lb_agent::{
    agent::Agent,
    model::Context,
    reconcile::{Capacities, MemoryMaps, Options, Reconciler},
    source::{files as manifests, Change},
};
use lb_testkit::dump;

fn agent() -> Agent<MemoryMaps> {
    let caps =
        Capacities { services: 4096, backends: 65_536, maglev_slots: 1 << 24, ..Capacities::default() };
    let opts = Options::default();
    Agent::new(MemoryMaps::default(), Reconciler::new(caps, opts), Context::default())
}

fn backends_of(dump: &str, frontend: &str) -> Option<usize> {
    dump.lines()
        .find(|l| l.starts_with(&format!("frontend {frontend} ")))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("backends=")))
        .and_then(|n| n.parse().ok())
}

fn service_yaml(name: &str, ip: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports: {ports}\n"
    )
}

fn slice_yaml(service: &str, ips: &[String]) -> String {
    let eps: Vec<String> =
        ips.iter().map(|ip| format!("- {{addresses: [\"{ip}\"], conditions: {{ready: true}}}}")).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{}\n",
        eps.join("\n")
    )
}

const PORT: &str = "[{name: http, port: 80, targetPort: 8080, protocol: TCP}]";

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    std::fs::write(dir.join(name), bytes).expect("write");
}

#[test]
fn hostile_files_are_rejected_one_by_one_and_nothing_else_is_lost() {
    let dir = std::env::temp_dir().join(format!("lb-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ips = |n: usize, third: u32| -> Vec<String> {
        (0..n).map(|i| format!("10.244.{third}.{}", i + 2)).collect()
    };

    // The good state: `good` and `victim`, each with two endpoints.
    write(
        &dir,
        "good.yaml",
        format!("{}---\n{}", service_yaml("good", "10.96.0.10", PORT), slice_yaml("good", &ips(2, 1))),
    );
    write(
        &dir,
        "victim.yaml",
        format!("{}---\n{}", service_yaml("victim", "10.96.0.11", PORT), slice_yaml("victim", &ips(2, 2))),
    );
    let mut a = agent();
    a.apply(Change::all(manifests::read_dir(&dir, None).expect("read")));
    let before = dump::render(&a.maps);
    assert_eq!(backends_of(&before, "10.96.0.11:80/TCP"), Some(2), "{before}");

    // The corpus.
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        ("not-utf8.yaml", b"kind: Service\nmetadata: {name: \xff\xfe}\n".to_vec()),
        ("binary.json", (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()),
        ("nested.json", nested.clone().into_bytes()),
        ("nested.yaml", format!("a: {nested}\n").into_bytes()),
        ("not-yaml.yaml", b"kind: Service\n  metadata: [\n".to_vec()),
        ("scalar.yaml", b"42\n".to_vec()),
        ("wrong-kind.yaml", b"kind: 7\napiVersion: v1\n".to_vec()),
        ("spec-number.yaml", b"apiVersion: v1\nkind: Service\nmetadata: {name: specnum}\nspec: 5\n".to_vec()),
        ("metadata-list.yaml", b"apiVersion: v1\nkind: Service\nmetadata: []\nspec: {}\n".to_vec()),
        ("ports-string.yaml", service_yaml("portstr", "10.96.0.12", "\"eighty\"").into_bytes()),
        (
            "list-of-junk.json",
            br#"{"apiVersion": "v1", "kind": "List", "items": [1, "two", null, {"kind": "Service"}]}"#
                .to_vec(),
        ),
        ("empty.yaml", Vec::new()),
        ("separators.yaml", b"---\n---\n---\n".to_vec()),
        // This node's Node, malformed; another node's, malformed too, is not ours and is skipped.
        (
            "node-bad.yaml",
            b"apiVersion: v1\nkind: Node\nmetadata: {name: this-node}\nstatus: {addresses: 5}\n".to_vec(),
        ),
        (
            "node-other.yaml",
            b"apiVersion: v1\nkind: Node\nmetadata: {name: other-node}\nstatus: {addresses: 5}\n".to_vec(),
        ),
    ];
    for (name, bytes) in &corpus {
        write(&dir, name, bytes);
    }
    // Objects that are well formed but large: a thousand ports, 10,000 endpoints in one slice.
    let many_ports: Vec<String> = (0..1000)
        .map(|p| format!("{{name: p{p}, port: {}, targetPort: 8080, protocol: TCP}}", 1000 + p))
        .collect();
    write(
        &dir,
        "many-ports.yaml",
        service_yaml("manyports", "10.96.0.13", &format!("[{}]", many_ports.join(", "))),
    );
    let big: Vec<String> = (0..10_000).map(|i| format!("10.250.{}.{}", i / 250, i % 250 + 1)).collect();
    write(
        &dir,
        "big-slice.yaml",
        format!("{}---\n{}", service_yaml("big", "10.96.0.14", PORT), slice_yaml("big", &big)),
    );
    // And `victim` turns bad: its port becomes a map.
    write(
        &dir,
        "victim.yaml",
        format!(
            "{}---\n{}",
            service_yaml("victim", "10.96.0.11", "[{name: http, port: {a: 1}}]"),
            slice_yaml("victim", &ips(2, 2))
        ),
    );

    let objects = manifests::read_dir(&dir, Some("this-node")).expect("read");
    let errors: Vec<String> = objects.errors.iter().map(ToString::to_string).collect();
    eprintln!("{}", errors.join("\n"));
    for name in [
        "not-utf8.yaml",
        "binary.json",
        "nested.json",
        "nested.yaml",
        "not-yaml.yaml",
        "scalar.yaml",
        "wrong-kind.yaml",
        "spec-number.yaml",
        "metadata-list.yaml",
        "ports-string.yaml",
        "list-of-junk.json",
        "victim.yaml",
        "node-bad.yaml: Node this-node: field status.addresses:",
    ] {
        assert!(errors.iter().any(|e| e.contains(name)), "no error names {name}: {errors:#?}");
    }
    assert!(
        errors
            .iter()
            .all(|e| ["empty.yaml", "separators.yaml", "node-other.yaml"].iter().all(|n| !e.contains(n))),
        "{errors:#?}"
    );
    let report = a.apply(Change::all(objects));
    let after = dump::render(&a.maps);
    assert_eq!(backends_of(&after, "10.96.0.10:80/TCP"), Some(2), "good is untouched:\n{after}");
    assert_eq!(backends_of(&after, "10.96.0.11:80/TCP"), Some(2), "victim keeps what it had:\n{after}");
    assert_eq!(backends_of(&after, "10.96.0.14:80/TCP"), Some(10_000), "10,000 endpoints in one slice");
    assert_eq!(
        after.lines().filter(|l| l.starts_with("frontend 10.96.0.13:")).count(),
        1000,
        "a thousand ports, a frontend each (no endpoints)"
    );
    assert!(report.errors.len() >= 12, "errors counted: {}", report.errors.len());
    let _ = std::fs::remove_dir_all(&dir);
}
