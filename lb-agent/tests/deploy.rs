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

/// The agent's arguments as deploy/base/daemonset.yaml has them.
fn base_args() -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("base/daemonset.yaml")).expect("daemonset.yaml");
    let ds = Value::deserialize(serde_yaml::Deserializer::from_str(&text)).expect("yaml");
    strings(&ds["spec"]["template"]["spec"]["containers"][0]["args"])
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().expect("a list").iter().map(|x| x.as_str().expect("a string").to_string()).collect()
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
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
        assert_eq!(strings(&sc["capabilities"]["add"]), ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]);
        // Liveness on /livez: /healthz follows the node's eligibility.
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        let env = c["env"].as_sequence().expect("env");
        let var = |name: &str| env.iter().find(|e| e["name"] == name);
        assert_eq!(
            var("NODE_NAME").expect("NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
        // The API server's address: from the ConfigMap if there is one (optional: beside
        // kube-proxy there is none, and the kubelet's variables stand).
        let mut config_name = None;
        for (name, key) in
            [("KUBERNETES_SERVICE_HOST", "api-server-host"), ("KUBERNETES_SERVICE_PORT", "api-server-port")]
        {
            let r =
                &var(name).unwrap_or_else(|| panic!("{install}: no {name}"))["valueFrom"]["configMapKeyRef"];
            let cm = r["name"].as_str().expect("a ConfigMap").to_string();
            assert!(cm.starts_with("lb-agent-config"), "{install}: {cm}");
            assert_eq!((&r["key"], &r["optional"]), (&Value::from(key), &Value::from(true)), "{install}");
            config_name = Some(cm);
        }
        let bind = |name: &str| {
            var(name).and_then(|e| e["value"].as_str()).unwrap_or_else(|| panic!("{install}: no {name}"))
        };
        assert!(
            c["resources"]["requests"]["cpu"].is_string() && c["resources"]["requests"]["memory"].is_string()
        );
        let mounts = c["volumeMounts"].as_sequence().expect("mounts");
        assert!(mounts.iter().any(|m| m["mountPath"] == "/sys/fs/bpf"));
        // Socket-level load balancing for the host's processes, at the hierarchy the init
        // container mounts, from the host's namespaces, with what mounting takes and no more.
        assert_eq!(bind("LB_SOCKET_LB"), "host", "{install}");
        assert_eq!(bind("LB_CGROUP_ROOT"), "/run/lb/cgroupv2", "{install}");
        let cgroup = mounts.iter().find(|m| m["mountPath"] == "/run/lb/cgroupv2").expect("the cgroup mount");
        assert_eq!(cgroup["readOnly"], true);
        let volume = |name: &Value| {
            pod["volumes"].as_sequence().expect("volumes").iter().find(|v| &v["name"] == name).cloned()
        };
        assert_eq!(volume(&cgroup["name"]).expect("its volume")["hostPath"]["path"], "/run/lb/cgroupv2");
        let init = &pod["initContainers"][0];
        assert_eq!(init["name"], "mount-cgroup");
        assert_eq!(init["image"], c["image"]);
        assert_eq!(
            strings(&init["args"]),
            ["--mount-cgroup", "--cgroup-root=/run/lb/cgroupv2", "--host-namespaces=/hostproc/1/ns"]
        );
        let isc = &init["securityContext"];
        assert_eq!(isc["privileged"], false);
        assert_eq!(strings(&isc["capabilities"]["drop"]), ["ALL"]);
        assert_eq!(strings(&isc["capabilities"]["add"]), ["SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE"]);
        let hostproc = &init["volumeMounts"][0];
        assert_eq!(
            (&hostproc["mountPath"], &hostproc["readOnly"]),
            (&Value::from("/hostproc"), &Value::from(true))
        );
        assert_eq!(volume(&hostproc["name"]).expect("hostproc")["hostPath"]["path"], "/proc");
        // The overlay leaves the arguments (--interfaces, as the operator set them) alone.
        assert_eq!(strings(&c["args"]), base_args(), "{install}");
        let ports = c["ports"].as_sequence().expect("ports");
        assert_eq!(ports.len(), 1, "{install}: {ports:?}");
        assert_eq!(ports[0]["name"], "healthz");
        let config = docs
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"].as_str() == config_name.as_deref());
        if install == "." {
            // Beside kube-proxy: none of its ports; the API server as the kubelet says (its
            // ClusterIP, which kube-proxy translates).
            assert_eq!(bind("LB_METRICS_BIND_ADDRESS"), "127.0.0.1:9981", "metrics stay on loopback");
            assert_eq!(bind("LB_HEALTHZ_BIND_ADDRESS"), "0.0.0.0:9980");
            assert_eq!(ports[0]["containerPort"], 9980);
            assert_eq!(bind("LB_HEALTH_CHECK_NODE_PORTS"), "off", "kube-proxy serves them");
            assert!(config.is_none());
        } else {
            // In its place: kube-proxy's ports, and the API server given.
            assert_eq!(bind("LB_METRICS_BIND_ADDRESS"), "127.0.0.1:10249", "metrics stay on loopback");
            assert_eq!(bind("LB_HEALTHZ_BIND_ADDRESS"), "0.0.0.0:10256");
            assert_eq!(ports[0]["containerPort"], 10256);
            assert_eq!(bind("LB_HEALTH_CHECK_NODE_PORTS"), "on", "kube-proxy's health-check node ports");
            let data = &config.expect("the API server's address")["data"];
            assert!(data["api-server-host"].is_string() && data["api-server-port"].is_string());
        }
    }
}

/// The cleanup DaemonSet (uninstalling) runs on every node with the agent's image, pin directory
/// and bpffs mount: the cleanup in an init container (the pod is Ready only once it is done), then
/// a container that only stays, with no capability; no API access, no service account token.
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
    let a = &agent["containers"][0];
    let init = &pod["initContainers"][0];
    assert_eq!(init["image"], a["image"]);
    let pin = |args: &[String]| args.iter().find(|x| x.starts_with("--pin-dir=")).cloned();
    let args = strings(&init["args"]);
    assert_eq!(pin(&args), pin(&strings(&a["args"])), "the agent's pin directory");
    assert!(args.contains(&"--cleanup".to_string()));
    // The agent's bpffs: unpinning the socket programs' links detaches them, no cgroup needed.
    let bpffs: Vec<&Value> = a["volumeMounts"]
        .as_sequence()
        .expect("the agent's mounts")
        .iter()
        .filter(|m| m["mountPath"] == "/sys/fs/bpf")
        .collect();
    let mounts: Vec<&Value> = init["volumeMounts"].as_sequence().expect("mounts").iter().collect();
    assert_eq!(mounts, bpffs);
    assert_eq!(init["securityContext"]["capabilities"]["drop"], a["securityContext"]["capabilities"]["drop"]);
    let stays = &pod["containers"][0];
    assert_eq!(strings(&stays["args"]), ["--stay"]);
    assert!(stays["securityContext"]["capabilities"]["add"].is_null(), "it needs no capability");
}
