//! The deploy manifests: valid against the Kubernetes schemas (offline, kubernetes-validate from
//! PyPI, installed by `cargo xtask setup`), and granting exactly what the agent's watches need.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::Resource;
use serde::Deserialize;
use serde_yaml::Value;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn docs(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy().join(file)).expect("manifest");
    serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).expect("yaml")).collect()
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let mut files: Vec<PathBuf> = ["rbac.yaml", "daemonset.yaml"].iter().map(|f| deploy().join(f)).collect();
    for e in std::fs::read_dir(deploy().join("examples")).expect("examples") {
        files.push(e.expect("entry").path());
    }
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .expect("kubernetes-validate not found: run `cargo xtask setup`");
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cluster_role_grants_exactly_what_the_watches_need() {
    // What kube_source watches: list and watch (get for single reads), nothing else.
    fn needed<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).to_string(), K::plural(&()).to_string())
    }
    let mut want = BTreeSet::new();
    for (group, resource) in [needed::<Service>(), needed::<EndpointSlice>(), needed::<Node>()] {
        for verb in ["get", "list", "watch"] {
            want.insert((group.clone(), resource.clone(), verb.to_string()));
        }
    }
    let role = docs("rbac.yaml").into_iter().find(|d| d["kind"] == "ClusterRole").expect("a ClusterRole");
    let mut got = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let list = |k: &str| -> Vec<String> {
            rule[k].as_sequence().expect(k).iter().map(|v| v.as_str().expect("string").to_string()).collect()
        };
        for g in list("apiGroups") {
            for r in list("resources") {
                for v in list("verbs") {
                    got.insert((g.clone(), r.clone(), v));
                }
            }
        }
    }
    assert_eq!(got, want);
    let binding = docs("rbac.yaml").into_iter().find(|d| d["kind"] == "ClusterRoleBinding").expect("binding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], "lb-agent");
}

#[test]
fn daemonset_runs_like_kube_proxy_with_least_privilege() {
    let ds = docs("daemonset.yaml").pop().expect("DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert_eq!(pod["serviceAccountName"], "lb-agent");
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_yaml::from_str::<Value>("[ALL]").expect("yaml"));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_yaml::from_str::<Value>("[BPF, NET_ADMIN, PERFMON, SYS_RESOURCE]").expect("yaml")
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert!(
        c["resources"]["requests"]["cpu"].is_string() && c["resources"]["requests"]["memory"].is_string()
    );
    let mounts = c["volumeMounts"].as_sequence().expect("mounts");
    assert!(mounts.iter().any(|m| m["mountPath"] == "/sys/fs/bpf"));
    let args: Vec<&str> = c["args"].as_sequence().expect("args").iter().filter_map(Value::as_str).collect();
    assert!(args.contains(&"--metrics-bind-address=127.0.0.1:10249"), "metrics stay on loopback");

    let kustomization = docs("kustomization.yaml").pop().expect("kustomization");
    let resources: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(resources, ["rbac.yaml", "daemonset.yaml"]);
}
