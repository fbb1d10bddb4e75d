//! The agent SIGKILLed in the middle of its first sync of 10,000 Services × 10 endpoints: what it
//! had written is whole (every frontend the datapath can see points at a complete Maglev table of
//! active backends, with as many distinct backends as it says), and a restarted agent converges.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lb_agent::datapath::Maps;
use lb_common::BACKEND_STATE_ACTIVE;
use serde_json::{json, Value};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const SERVICES: u32 = 10_000;

fn objects() -> Value {
    let mut items = Vec::new();
    for i in 0..SERVICES {
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i).to_string();
        items.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": format!("s{i}"), "namespace": "kill"},
            "spec": {"clusterIP": vip, "clusterIPs": [vip], "ports": [{"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}));
        let eps: Vec<Value> = (0..10)
            .map(|j| {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 16 + j);
                json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})
            })
            .collect();
        items.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("s{i}-1"), "namespace": "kill", "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}], "endpoints": eps}));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

fn start(manifests: &Path, pins: &Path) -> Child {
    Command::new(AGENT)
        .env("LB_SOCKET_LB", "off")
        .arg("--manifests")
        .arg(manifests)
        .args(["--interfaces", "lbkill-none*", "--metrics-bind-address", "127.0.0.1:0"])
        .args(["--healthz-bind-address", "127.0.0.1:0"])
        .arg("--pin-dir")
        .arg(pins)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent")
}

/// Checks that every frontend in the maps points at a whole table; returns how many there are.
fn check_whole(pins: &Path) -> usize {
    let maps = Maps::from_pins_read_only(pins).expect("maps");
    let services = maps.read_services().expect("services");
    let backends: std::collections::HashMap<u32, u8> =
        maps.read_backends().expect("backends").into_iter().map(|(id, b)| (id, b.state())).collect();
    for (key, svc) in &services {
        let mut ids = BTreeSet::new();
        let table = maps.maglev.read(svc.maglev_offset, svc.maglev_size).expect("table in range");
        for (slot, id) in (svc.maglev_offset..).zip(table) {
            let state = backends.get(&id).copied();
            assert_eq!(
                state,
                Some(BACKEND_STATE_ACTIVE),
                "{key:?}: slot {slot} names backend {id}, not active"
            );
            ids.insert(id);
        }
        assert_eq!(
            ids.len() as u32,
            svc.backend_count,
            "{key:?}: table of {} backends, entry says {}",
            ids.len(),
            svc.backend_count
        );
    }
    services.len()
}

struct Cleanup(PathBuf, PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[test]
fn sigkill_in_the_middle_of_a_sync_leaves_only_whole_state_and_a_restart_converges() {
    let dir = std::env::temp_dir().join(format!("lb-kill-{}", std::process::id()));
    let pins = PathBuf::from(format!("/sys/fs/bpf/lb-kill-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone(), pins.clone());
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("objects.json"), serde_json::to_vec(&objects()).expect("json")).expect("write");

    let mut agent = start(&dir, &pins);
    // Kill it once some but not all of the Services are in the maps.
    let started = Instant::now();
    let seen = loop {
        assert!(started.elapsed() < Duration::from_secs(120), "the agent never got going");
        let n =
            Maps::from_pins_read_only(&pins).ok().and_then(|m| m.read_services().ok()).map_or(0, |s| s.len());
        if n >= 500 {
            break n;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    agent.kill().expect("SIGKILL");
    agent.wait().expect("wait");
    let partial = check_whole(&pins);
    assert!(partial < SERVICES as usize, "killed mid-sync ({partial} of {SERVICES} frontends written)");
    eprintln!("killed with {seen}..{partial} of {SERVICES} frontends written; every one whole");

    let mut agent = start(&dir, &pins);
    let started = Instant::now();
    loop {
        let maps = Maps::from_pins_read_only(&pins).expect("maps");
        let services = maps.read_services().expect("services");
        if services.len() == SERVICES as usize && services.iter().all(|(_, s)| s.backend_count == 10) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the restart never converged");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(check_whole(&pins), SERVICES as usize);
    agent.kill().expect("kill");
    agent.wait().expect("wait");
    let _ = Command::new(AGENT).args(["--cleanup", "--pin-dir"]).arg(&pins).status();
}
