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

/// The two ways to install: beside kube-proxy (deploy/) and in its place (the overlay).
const INSTALLS: [&str; 2] = [".", "replace-kube-proxy"];

/// What `kubectl kustomize` renders for `dir` (under deploy/), as text.
fn render_text(dir: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(deploy().join(dir))
        .output()
        .expect("kubectl not found: it renders the kustomizations (`kubectl kustomize`), install it");
    assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

fn render(dir: &str) -> Vec<Value> {
    let text = render_text(dir);
    serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).expect("yaml")).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
}

/// What both installs render is what is validated: against the Kubernetes schemas, strictly.
#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let dir = std::env::temp_dir().join(format!("lb-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch");
    let mut files = Vec::new();
    for install in INSTALLS.iter().chain(&["cleanup"]) {
        let file = dir.join(format!("{}.yaml", install.replace('.', "base")));
        std::fs::write(&file, render_text(install)).expect("write");
        files.push(file);
    }
    for e in std::fs::read_dir(deploy().join("examples")).expect("examples") {
        files.push(e.expect("entry").path());
    }
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .expect("kubernetes-validate not found: run `cargo xtask setup`");
    let _ = std::fs::remove_dir_all(&dir);
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
    let docs = render(".");
    let role = find(&docs, "ClusterRole");
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
    let binding = find(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], "lb-agent");
}

#[test]
fn daemonset_runs_like_kube_proxy_with_least_privilege() {
    for install in INSTALLS {
        let docs = render(install);
        let ds = find(&docs, "DaemonSet");
        assert_eq!(ds["metadata"]["namespace"], "kube-system");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true);
        // Cluster DNS is behind a ClusterIP: the node's resolver.
        assert_eq!(pod["dnsPolicy"], "Default", "{install}");
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert_eq!(pod["tolerations"][0]["operator"], "Exists");
        assert_eq!(pod["serviceAccountName"], "lb-agent");
        let c = &pod["containers"][0];
        // As `cargo xtask image` tags it.
        assert_eq!(c["image"], "lb-agent:latest", "{install}");
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(
            sc["seccompProfile"]["type"], "Unconfined",
            "bpf(2) needs it under the runtimes' defaults"
        );
        assert_eq!(sc["capabilities"]["drop"], serde_yaml::from_str::<Value>("[ALL]").expect("yaml"));
        assert_eq!(
            sc["capabilities"]["add"],
            serde_yaml::from_str::<Value>("[BPF, NET_ADMIN, PERFMON, SYS_RESOURCE]").expect("yaml")
        );
        // Liveness on /livez: /healthz follows the node's eligibility.
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        let env = c["env"].as_sequence().expect("env");
        assert_eq!(env[0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
        for (name, key) in
            [("KUBERNETES_SERVICE_HOST", "api-server-host"), ("KUBERNETES_SERVICE_PORT", "api-server-port")]
        {
            let e = env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("{install}: no {name}"));
            let r = &e["valueFrom"]["configMapKeyRef"];
            assert_eq!(
                (&r["name"], &r["key"]),
                (&Value::from("lb-agent-config"), &Value::from(key)),
                "{install}"
            );
        }
        assert!(
            c["resources"]["requests"]["cpu"].is_string() && c["resources"]["requests"]["memory"].is_string()
        );
        let mounts = c["volumeMounts"].as_sequence().expect("mounts");
        assert!(mounts.iter().any(|m| m["mountPath"] == "/sys/fs/bpf"));
        let args: Vec<&str> =
            c["args"].as_sequence().expect("args").iter().filter_map(Value::as_str).collect();
        let health = c["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == "healthz")
            .expect("healthz");
        let config =
            docs.iter().find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "lb-agent-config");
        if install == "." {
            // Beside kube-proxy: none of its ports; the API server as the kubelet says (its
            // ClusterIP, which kube-proxy translates).
            assert!(args.contains(&"--metrics-bind-address=127.0.0.1:9981"), "metrics stay on loopback");
            assert!(args.contains(&"--healthz-bind-address=0.0.0.0:9980"));
            assert_eq!(health["containerPort"], 9980);
            assert!(config.is_none());
        } else {
            // In its place: kube-proxy's ports, and the API server given.
            assert!(args.contains(&"--metrics-bind-address=127.0.0.1:10249"), "metrics stay on loopback");
            assert!(args.contains(&"--healthz-bind-address=0.0.0.0:10256"));
            assert_eq!(health["containerPort"], 10256);
            assert_eq!(c["ports"].as_sequence().map(Vec::len), Some(1));
            let data = &config.expect("the API server's address")["data"];
            assert!(data["api-server-host"].is_string() && data["api-server-port"].is_string());
        }
    }
}

/// The cleanup DaemonSet (uninstalling) runs on every node with the agent's image, pin directory
/// and bpffs mount, and nothing else: no API access, no service account token.
#[test]
fn cleanup_daemonset_removes_what_the_agent_pinned() {
    let agent = render(".");
    let agent = &find(&agent, "DaemonSet")["spec"]["template"]["spec"];
    let docs = render("cleanup");
    assert_eq!(docs.len(), 1, "only the DaemonSet");
    let ds = &docs[0];
    assert_eq!(ds["metadata"]["namespace"], "kube-system");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["tolerations"], agent["tolerations"], "on every node the agent runs on");
    assert_eq!(pod["automountServiceAccountToken"], false);
    let c = &pod["containers"][0];
    let a = &agent["containers"][0];
    assert_eq!(c["image"], a["image"]);
    let args: Vec<&str> = c["args"].as_sequence().expect("args").iter().filter_map(Value::as_str).collect();
    let pin = |args: &[&str]| args.iter().find(|x| x.starts_with("--pin-dir=")).map(ToString::to_string);
    let agent_args: Vec<&str> =
        a["args"].as_sequence().expect("args").iter().filter_map(Value::as_str).collect();
    assert_eq!(pin(&args), pin(&agent_args), "the agent's pin directory");
    assert!(args.contains(&"--cleanup") && args.contains(&"--stay"));
    assert_eq!(c["volumeMounts"], a["volumeMounts"]);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], a["securityContext"]["capabilities"]["drop"]);
}
