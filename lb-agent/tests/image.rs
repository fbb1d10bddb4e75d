//! The agent image, run the way the DaemonSet runs it. The image is built with podman from this
//! build's binaries and deploy/image/ (the layout `cargo xtask image` and deploy/Dockerfile use);
//! each install (`kubectl kustomize deploy/` beside kube-proxy, and deploy/replace-kube-proxy)
//! is rendered, and its container spec becomes podman's flags: the node's network namespace as
//! the host network, `--cap-drop ALL` plus exactly the capabilities it adds, a read-only root,
//! no-new-privileges, its seccomp choice, its volumes (the host's bpffs), its environment, its
//! command and arguments. The source is a manifest folder (no API server can run here), mounted
//! read-only. Beside kube-proxy, kube-proxy's ports 10249 and 10256 are taken first. The agent
//! must become ready on its readiness probe, answer its liveness probe, balance a connection, be
//! read by lbctl in the same image, and stop on SIGTERM leaving the datapath serving. A second
//! agent (a rolling update's surge) waits for the first and takes over; the cleanup DaemonSet
//! (deploy/cleanup/), run as it renders, waits for a running agent, then leaves nothing, and
//! stays until stopped. The cgroup v2 hierarchy the DaemonSet's init container mounts on the host
//! (`/run/lb/cgroupv2`) is, here, a child cgroup of the test's own hierarchy: the agent attaches its
//! socket programs there (never to a root other processes share), and a process of the node in
//! that cgroup reaches the Service through them. The init container itself is not run (it would
//! mount on the machine's own root namespace): its mount is tested directly
//! (`e2e_sockets::mount_cgroup_mounts_a_cgroup2_hierarchy_once`), its privileges in `deploy.rs`.

mod support;

use std::{
    net::{SocketAddr, SocketAddrV4, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lb_testkit::lab::{http_get, in_netns, tcp_asks, wait_until, Lab, Node};
use serde::Deserialize;
use serde_yaml::Value;
use support::{endpoint, who, VIP};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn podman(args: &[&str]) -> Command {
    let mut c = Command::new("podman");
    c.args(args);
    c
}

/// The image and containers this test made, removed on drop (also when it fails).
struct Made {
    image: String,
    containers: Vec<String>,
    pin_dir: PathBuf,
}

impl Drop for Made {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman(&["rm", "--force", "--time", "0", c]).output();
        }
        let _ = podman(&["rmi", "--force", &self.image]).output();
        // The datapath of a run that failed midway.
        let _ = Command::new(AGENT).arg("--cleanup").arg("--pin-dir").arg(&self.pin_dir).output();
    }
}

/// Builds the image from this build's binaries, laid out as `cargo xtask image` lays it out.
fn build_image(scratch: &Path, tag: &str) {
    let context = scratch.join("image");
    let lbctl = Path::new(AGENT).with_file_name("lbctl");
    assert!(lbctl.exists(), "lbctl not built at {}", lbctl.display());
    run(Command::new(root().join("deploy/image/rootfs.sh"))
        .arg(context.join("rootfs"))
        .arg(AGENT)
        .arg(&lbctl));
    std::fs::copy(root().join("deploy/image/Containerfile"), context.join("Containerfile"))
        .expect("Containerfile");
    run(podman(&["build", "--pull=never", "--quiet", "--tag", tag]).arg(&context));
}

/// The DaemonSet (and the ConfigMaps beside it) that `kubectl kustomize` renders for `install`.
fn rendered(install: &str) -> Vec<Value> {
    let text = run(Command::new("kubectl").arg("kustomize").arg(root().join("deploy").join(install)));
    serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).expect("yaml")).collect()
}

/// A container of a rendered DaemonSet as `podman run` takes it: flags before the image, the
/// agent's arguments after it.
struct Spec {
    flags: Vec<String>,
    args: Vec<String>,
}

impl Spec {
    /// `podman run` arguments for it from image `tag`, with `more` flags.
    fn command(&self, tag: &str, more: &[String]) -> Vec<String> {
        let mut out = self.flags.clone();
        out.extend(more.iter().cloned());
        out.push(tag.to_string());
        out.extend(self.args.iter().cloned());
        out
    }

    fn arg(&self, flag: &str) -> &str {
        self.args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .unwrap_or_else(|| panic!("no {flag}"))
    }
}

/// The DaemonSet's container `container` (`("containers", 0)`, ...), run in `node`'s network
/// namespace; `extra_mounts` and `extra_args` add the manifest folder.
/// The host's cgroup v2 hierarchy as the DaemonSet mounts it, and the test's child cgroup that
/// stands for it.
const HOST_CGROUP: &str = "/run/lb/cgroupv2";
static CGROUP: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn podman_spec(
    docs: &[Value],
    node: &Node,
    container: (&str, usize),
    extra_mounts: &[String],
    extra_args: &[&str],
) -> Spec {
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod[container.0][container.1];
    let mut flags = Vec::new();
    assert_eq!(pod["hostNetwork"], true, "the test runs it in the node's network namespace");
    flags.push(format!("--network=ns:/run/netns/{}", node.netns));
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    if sc["capabilities"]["drop"] == serde_yaml::from_str::<Value>("[ALL]").expect("yaml") {
        flags.push("--cap-drop=ALL".into());
    }
    for cap in sc["capabilities"]["add"].as_sequence().into_iter().flatten() {
        flags.push(format!("--cap-add={}", cap.as_str().expect("a capability")));
    }
    if sc["readOnlyRootFilesystem"] == true {
        // Exactly: no tmpfs on /tmp, /run and /var/tmp either (the kubelet adds none).
        flags.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if sc["allowPrivilegeEscalation"] == false {
        flags.push("--security-opt=no-new-privileges".into());
    }
    match sc["seccompProfile"]["type"].as_str() {
        Some("Unconfined") => flags.push("--security-opt=seccomp=unconfined".into()),
        Some("RuntimeDefault") | None => {}
        Some(other) => panic!("seccomp profile {other}: not handled by this test"),
    }
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
        let v = volumes.iter().find(|v| v["name"] == m["name"]).expect("the mount's volume");
        let mut host = v["hostPath"]["path"].as_str().expect("a hostPath volume").to_string();
        if host == HOST_CGROUP {
            host = CGROUP.get().expect("the test's cgroup").display().to_string();
        }
        flags.push(format!("--volume={host}:{}", m["mountPath"].as_str().expect("mountPath")));
    }
    flags.extend(extra_mounts.iter().cloned());
    let node_name = format!("node{}", node.index);
    let mut env = Vec::new();
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().expect("name");
        let from = &e["valueFrom"];
        let value = if from["fieldRef"]["fieldPath"] == "spec.nodeName" {
            Some(node_name.clone())
        } else if let Some(key) = from["configMapKeyRef"]["key"].as_str() {
            let cm = docs.iter().find(|d| {
                d["kind"] == "ConfigMap" && d["metadata"]["name"] == from["configMapKeyRef"]["name"]
            });
            cm.and_then(|cm| cm["data"][key].as_str()).map(String::from)
        } else {
            e["value"].as_str().map(String::from)
        };
        if let Some(v) = value {
            flags.push(format!("--env={name}={v}"));
            env.push((name.to_string(), v));
        }
    }
    let command = c["command"].as_sequence().expect("command");
    assert_eq!(command.len(), 1);
    flags.push(format!("--entrypoint={}", command[0].as_str().expect("command")));
    let mut args: Vec<String> = c["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| {
            let mut a = a.as_str().expect("arg").to_string();
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            a
        })
        .collect();
    args.extend(extra_args.iter().map(ToString::to_string));
    Spec { flags, args }
}

/// The port a probe of the rendered container asks, resolved through the named container port.
fn probe(docs: &[Value], which: &str) -> (String, u16) {
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let get = &c[which]["httpGet"];
    let port = match &get["port"] {
        Value::Number(n) => n.as_u64().expect("port") as u16,
        Value::String(name) => c["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .expect("the named port") as u16,
        other => panic!("probe port {other:?}"),
    };
    (get["path"].as_str().expect("path").to_string(), port)
}

/// Bytes in a size as podman (`176.9MB`, `1.2GB`, `512kB`) or Kubernetes (`192Mi`) writes it.
fn parse_size(text: &str) -> f64 {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("a size: {t:?}"));
    let scale = match unit.trim() {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unit {other:?} in {t:?}"),
    };
    n * scale
}

fn requested_memory(docs: &[Value]) -> &str {
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"]
        .as_str()
        .expect("a request")
}

/// A self-signed certificate for the fake service account (never used in a handshake here).
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBgTCCASegAwIBAgIUUaX0PD7v8i6Y5fMzdUvS1N9x7uMwCgYIKoZIzj0EAwIw\nFTETMBEGA1UEAwwKbGItdGVzdC1jYTAgFw0yNjEyMDIxMzUxMjFaGA8yMTI2MTEw\nODEzNTEyMVowFTETMBEGA1UEAwwKbGItdGVzdC1jYTBZMBMGByqGSM49AgEGCCqG\nSM49AwEHA0IABOUU8MwTqIBOGj2cVGRn7dXsuuWazwb0qXJ+YwezyL7XgI7sgwrb\nkNDl691WpuqZLeez1alr7fI4rYGzcHWllMejUzBRMB0GA1UdDgQWBBRByTix2OHa\nl7+hEGtKkz9HsJMF1jAfBgNVHSMEGDAWgBRByTix2OHal7+hEGtKkz9HsJMF1jAP\nBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQCh7GhdEX4Zr7ITHVvx\najMer+zWS8y2uVOeUNaX1kLxZgIgBHU31b5VFCzpge2K0PPIKERV6ow+nm3tUWDW\nuSYRcnU=\n-----END CERTIFICATE-----\n";

/// Runs a command; whether it succeeded, and its output.
fn run_output(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// Waits until `container`'s output contains `what`; returns the output.
fn wait_log(container: &str, what: &str) -> std::io::Result<String> {
    wait_until(Duration::from_secs(45), || {
        let l = logs_of(container);
        if l.contains(what) {
            Ok(l)
        } else {
            Err(std::io::Error::other(l))
        }
    })
}

/// A container's output.
fn logs_of(container: &str) -> String {
    let out = podman(&["logs", container]).output().expect("podman logs");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Stops a container with SIGTERM (as the kubelet does) and checks it exited cleanly.
fn stop(container: &str, logs_of: &dyn Fn(&str) -> String) {
    run(&mut podman(&["stop", "--time", "10", container]));
    let code = run(&mut podman(&["inspect", "--format", "{{.State.ExitCode}}", container]));
    assert_eq!(code.trim(), "0", "{container}: exit code\n{}", logs_of(container));
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it_beside_kube_proxy_and_in_its_place() {
    let version = Command::new("podman").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "podman not found ({version:?}): `cargo xtask setup` installs it (this test is not skipped)"
    );
    let cgroup = lb_testkit::sockets::Cgroup2::new("img").expect("a cgroup v2 hierarchy of the test's own");
    CGROUP.set(cgroup.path().to_path_buf()).expect("set once");
    let mut lab = Lab::new("img").expect("lab");
    let node = lab.node(1).expect("node");
    let client = lab.pod(&node, "c1", 10, true).expect("client");
    let b1 = lab.pod(&node, "b1", 2, true).expect("backend");
    lab.serve(&b1, 8080, 5353).expect("servers");
    let manifests = lab.scratch().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests");
    std::fs::write(manifests.join("objects.yaml"), who("", &[endpoint(&b1, "ready: true")])).expect("write");

    let tag = format!("localhost/lb-agent:test-{}", std::process::id());
    let mut made = Made { image: tag.clone(), containers: Vec::new(), pin_dir: PathBuf::new() };
    build_image(lab.scratch(), &tag);
    let size = run(&mut podman(&["image", "inspect", "--format", "{{.Size}}", &tag]));
    eprintln!(
        "image: {:.1} MB (this build's binaries, stripped of debug information)",
        size.trim().parse::<f64>().unwrap_or(0.0) / 1e6
    );

    for install in [".", "replace-kube-proxy"] {
        let docs = rendered(install);
        let mounts = [format!("--volume={}:/etc/lb/manifests:ro", manifests.display())];
        let agent = podman_spec(&docs, &node, ("containers", 0), &mounts, &["--manifests=/etc/lb/manifests"]);
        let pin_dir = PathBuf::from(agent.arg("--pin-dir"));
        made.pin_dir = pin_dir.clone();
        let agent = agent.command(&tag, &[]);
        // Beside kube-proxy, its ports are taken (10249 on loopback, 10256 on every address).
        let _kube_proxy = (install == ".").then(|| {
            in_netns(&node.netns, || {
                (
                    TcpListener::bind("127.0.0.1:10249").expect("10249"),
                    TcpListener::bind("0.0.0.0:10256").expect("10256"),
                )
            })
            .expect("in the node")
        });
        let name = format!("lbimg{}-{}", std::process::id(), if install == "." { "base" } else { "replace" });
        made.containers.push(name.clone());
        let started = Instant::now();
        run(podman(&["run", "--detach", "--name", &name]).args(&agent));
        let logs = || logs_of(&name);

        let (ready_path, port) = probe(&docs, "readinessProbe");
        let health = SocketAddr::from(([127, 0, 0, 1], port));
        let ready =
            wait_until(Duration::from_secs(60), || match http_get(&node.netns, health, &ready_path)? {
                (200, _) => Ok(()),
                (code, body) => Err(std::io::Error::other(format!("{code} {body}"))),
            });
        assert!(ready.is_ok(), "{install}: not ready on {health}{ready_path}: {ready:?}\n{}", logs());
        eprintln!("{install}: ready {} ms after `podman run`", started.elapsed().as_millis());
        let (live_path, live_port) = probe(&docs, "livenessProbe");
        let live = http_get(&node.netns, SocketAddr::from(([127, 0, 0, 1], live_port)), &live_path);
        assert_eq!(live.as_ref().map(|(c, _)| *c).ok(), Some(200), "{install}: liveness {live:?}");

        let vip = SocketAddrV4::new(VIP, 80);
        let answered = wait_until(Duration::from_secs(15), || tcp_asks(&client, vip, 1)?.pop().expect("one"));
        assert_eq!(answered.ok().as_deref(), Some("b1"), "{install}: the Service answers\n{}", logs());
        let answers = tcp_asks(&client, vip, 10).expect("asks");
        assert!(answers.iter().all(|a| a.as_deref().ok() == Some("b1")), "{install}: {answers:?}");
        // A process of the node (its namespace stands for the host's) reaches it at the socket.
        let mut host =
            lb_testkit::sockets::SockClient::start(&node.netns, cgroup.path()).expect("a node process");
        let a = host.tcp(vip).unwrap_or_else(|e| panic!("{install}: from the node: {e}\n{}", logs()));
        assert_eq!((a.name.as_str(), a.peer), ("b1", vip.to_string()), "{install}: from the node");
        drop(host);
        // lbctl in the same image reads this node's datapath (as `kubectl exec ds/lb-agent -- lbctl`).
        let services = run(&mut podman(&["exec", &name, "lbctl", "services"]));
        assert!(services.contains("demo/who"), "{install}: lbctl services:\n{services}");
        // Below the DaemonSet's memory request (the maps' kernel memory is most of it).
        let usage = run(&mut podman(&["stats", "--no-stream", "--format", "{{.MemUsage}}", &name]));
        eprintln!("{install}: memory {}", usage.trim());
        let used = parse_size(usage.split('/').next().expect("usage"));
        let request = parse_size(requested_memory(&docs));
        assert!(used > 0.0 && used < request, "{install}: using {used} bytes, the request is {request}");

        // A second agent on the node (a rolling update's surge): it waits while the first holds
        // the pin directory, then takes over when the first exits; the Service answers all along.
        let mut running = name.clone();
        if install == "." {
            let surge = format!("{name}-surge");
            made.containers.push(surge.clone());
            run(podman(&["run", "--detach", "--name", &surge]).args(&agent));
            let waits = wait_log(&surge, "another lb-agent holds this pin directory");
            assert!(waits.is_ok(), "the surge agent does not wait: {waits:?}");
            assert!(!logs_of(&surge).contains("first full sync done"), "the surge agent went on");
            // One that waits hears SIGTERM (as PID 1 it hears only signals it handles): it exits
            // cleanly (code 0), not by the SIGKILL after the grace period (code 137).
            let waiter = format!("{name}-waiter");
            made.containers.push(waiter.clone());
            run(podman(&["run", "--detach", "--name", &waiter]).args(&agent));
            let waits = wait_log(&waiter, "another lb-agent holds this pin directory");
            assert!(waits.is_ok(), "the second surge agent does not wait: {waits:?}");
            stop(&waiter, &logs_of);
            stop(&name, &logs_of);
            let took =
                wait_until(Duration::from_secs(30), || match http_get(&node.netns, health, &ready_path)? {
                    (200, _) if logs_of(&surge).contains("the other agent is gone") => Ok(()),
                    (code, _) => Err(std::io::Error::other(format!("{code}"))),
                });
            assert!(took.is_ok(), "the surge agent never took over: {took:?}\n{}", logs_of(&surge));
            let answers = tcp_asks(&client, vip, 5).expect("asks");
            assert!(
                answers.iter().all(|a| a.as_deref().ok() == Some("b1")),
                "after the takeover: {answers:?}"
            );
            running = surge;
        }

        // Uninstall: the cleanup DaemonSet's pod, as it renders: its init container cleans up,
        // then its container stays. In place of kube-proxy the cleanup is started while the agent
        // still runs (its DaemonSet just deleted): it waits for it.
        let cleanup_docs = rendered("cleanup");
        let spec = |which: (&str, usize)| podman_spec(&cleanup_docs, &node, which, &[], &[]);
        let init = spec(("initContainers", 0));
        assert_eq!(init.arg("--pin-dir"), pin_dir.to_str().expect("utf-8"), "the agent's pin directory");
        let cleanup = format!("{name}-cleanup");
        made.containers.push(cleanup.clone());
        if install != "." {
            run(podman(&["run", "--detach", "--name", &cleanup]).args(init.command(&tag, &[])));
            let waits = wait_log(&cleanup, "another lb-agent holds this pin directory");
            assert!(waits.is_ok(), "the cleanup does not wait for the agent: {waits:?}");
            let layout = pin_dir.join(format!("v{}", lb_common::PIN_LAYOUT_VERSION));
            assert!(layout.exists(), "cleaned under a running agent");
        }
        // SIGTERM: the agent stops; the datapath stays and keeps serving.
        stop(&running, &logs_of);
        let answers = tcp_asks(&client, vip, 5).expect("asks");
        assert!(
            answers.iter().all(|a| a.as_deref().ok() == Some("b1")),
            "{install}: after the stop: {answers:?}"
        );
        if install == "." {
            run(podman(&["run", "--detach", "--name", &cleanup]).args(init.command(&tag, &[])));
        }
        let removed = wait_log(&cleanup, "pinned objects under");
        assert!(removed.is_ok(), "{install}: the cleanup did not run: {removed:?}");
        let done = wait_until(Duration::from_secs(30), || {
            let state =
                run(&mut podman(&["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", &cleanup]));
            if state.trim() == "exited 0" {
                Ok(())
            } else {
                Err(std::io::Error::other(state))
            }
        });
        assert!(
            done.is_ok(),
            "{install}: the init container must end, with success: {done:?}\n{}",
            logs_of(&cleanup)
        );
        assert!(!pin_dir.exists(), "{install}: {} is left", pin_dir.display());
        // The kernel releases an unpinned link from a workqueue: shortly after, not at once.
        let detached = lb_testkit::lab::wait_until(Duration::from_secs(15), || {
            let net = run(Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", node.netns))
                .args(["bpftool", "-j", "net", "show"]));
            let after = tcp_asks(&client, vip, 1)?;
            if net.contains("lb4_") {
                Err(std::io::Error::other(format!("programs still attached: {net}")))
            } else if !after.iter().all(Result::is_err) {
                Err(std::io::Error::other(format!("still translated after the cleanup: {after:?}")))
            } else {
                Ok(())
            }
        });
        assert!(detached.is_ok(), "{install}: {detached:?}");
        // Then the pod's container stays (a DaemonSet's pod must) until stopped.
        let stays = format!("{name}-cleanup-done");
        made.containers.push(stays.clone());
        run(podman(&["run", "--detach", "--name", &stays]).args(spec(("containers", 0)).command(&tag, &[])));
        let _ = wait_log(&stays, "staying until stopped");
        let state = run(&mut podman(&["inspect", "--format", "{{.State.Status}}", &stays]));
        assert_eq!(state.trim(), "running", "{install}: the cleanup pod must stay\n{}", logs_of(&stays));
        stop(&stays, &logs_of);
    }

    // In place of kube-proxy, with no manifest folder: the in-cluster configuration as the
    // kubelet gives it (the service account's token and CA) and the API server named by the
    // ConfigMap. Its placeholder stops the agent with an error that says what to set.
    let mut docs = rendered("replace-kube-proxy");
    let placeholder = podman_spec(&docs, &node, ("containers", 0), &[], &[]);
    let sa = lab.scratch().join("serviceaccount");
    std::fs::create_dir_all(&sa).expect("serviceaccount");
    std::fs::write(sa.join("token"), "test-token").expect("token");
    std::fs::write(sa.join("ca.crt"), TEST_CA).expect("ca.crt");
    std::fs::write(sa.join("namespace"), "kube-system").expect("namespace");
    let sa_mount = format!("--volume={}:/var/run/secrets/kubernetes.io/serviceaccount:ro", sa.display());
    let refused = placeholder.command(&tag, std::slice::from_ref(&sa_mount));
    let out = run_output(podman(&["run", "--rm"]).args(&refused));
    assert!(!out.0, "the placeholder must stop the agent");
    assert!(out.1.contains("set api-server-host"), "the error says what to set: {}", out.1);
    // A name the node resolves (here through /etc/hosts, which the runtime writes), at a port
    // where nothing listens: the agent resolves it and is refused, waits alive (/livez 200) and
    // not ready (/readyz 503), and a SIGTERM stops it cleanly.
    for d in docs.iter_mut().filter(|d| d["kind"] == "ConfigMap") {
        d["data"]["api-server-host"] = Value::from("api.lbtest.invalid");
        d["data"]["api-server-port"] = Value::from("1");
    }
    let agent = podman_spec(&docs, &node, ("containers", 0), &[], &[]);
    let pin_dir = PathBuf::from(agent.arg("--pin-dir"));
    made.pin_dir = pin_dir.clone();
    let name = format!("lbimg{}-incluster", std::process::id());
    made.containers.push(name.clone());
    let hosts = "--add-host=api.lbtest.invalid:127.0.0.1".to_string();
    run(podman(&["run", "--detach", "--name", &name]).args(agent.command(&tag, &[sa_mount, hosts])));
    let refused = wait_log(&name, "Connection refused");
    assert!(refused.is_ok(), "the API server's name did not resolve to a refused connection: {refused:?}");
    assert!(!refused.expect("checked").contains("dns error"), "a lookup failed");
    let (_, port) = probe(&docs, "livenessProbe");
    let at = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(http_get(&node.netns, at, "/livez").map(|r| r.0).ok(), Some(200), "alive while it waits");
    assert_eq!(http_get(&node.netns, at, "/readyz").map(|r| r.0).ok(), Some(503), "not ready before a sync");
    stop(&name, &logs_of);
    run(Command::new(AGENT).arg("--cleanup").arg(format!("--pin-dir={}", pin_dir.display())));
}
