//! Control-plane integrity end to end: Maglev tables republished again and again under new
//! connections never send a connection to a backend outside its Service (a freed table region is
//! not written again while a CPU may still read it).

mod support;

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_agent::datapath::Mode;
use lb_common::Lb4ServiceKey;
use lb_testkit::lab::{tcp_asks, wait_until, Pod};
use support::{endpoint, Cluster, VIP};

const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// Service `who` (VIP:80 → 8080) on b1 and b2, or b1 alone; Service `other` (VIP2:80 → named
/// port `tcp`) on b3:8080, or b3 on 8080 and 9090. Each phase changes both tables.
fn yaml(b: &[Pod; 3], phase: bool) -> String {
    let who_eps: Vec<String> = if phase {
        vec![endpoint(&b[0], "ready: true")]
    } else {
        b[..2].iter().map(|p| endpoint(p, "ready: true")).collect()
    };
    let slice = |name: &str, port: u16, pod: &Pod| {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: demo\n  labels: {{kubernetes.io/service-name: other}}\naddressType: IPv4\nports:\n- {{name: tcp, port: {port}, protocol: TCP}}\nendpoints:\n{}\n",
            endpoint(pod, "ready: true")
        )
    };
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: who, namespace: demo}}\nspec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: who-1\n  namespace: demo\n  labels: {{kubernetes.io/service-name: who}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 8080, protocol: TCP}}\nendpoints:\n{}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: demo}}\nspec:\n  clusterIP: {VIP2}\n  ports:\n  - {{name: tcp, port: 80, targetPort: tcp, protocol: TCP}}\n",
        who_eps.join("\n")
    );
    y.push_str(&slice("other-1", 8080, &b[2]));
    if phase {
        y.push_str(&slice("other-2", 9090, &b[2]));
    }
    y
}

/// Replaces the manifests the way `Cluster::write` does (a rename, so the agent never reads half).
fn write(dir: &std::path::Path, text: &str) {
    let tmp = dir.join(".objects.yaml.tmp");
    std::fs::write(&tmp, text).expect("write manifests");
    std::fs::rename(&tmp, dir.join("objects.yaml")).expect("replace manifests");
}

#[test]
fn republished_tables_never_send_a_connection_outside_its_service() {
    let c = Cluster::new("regions", Mode::Tc, true, |b| yaml(b, false), &[]);
    c.wait_reachable(&c.client1, 80);
    let other = SocketAddrV4::new(VIP2, 80);
    let ready =
        wait_until(Duration::from_secs(15), || tcp_asks(&c.client1, other, 1)?.pop().expect("one answer"));
    assert!(ready.is_ok(), "the second Service: {ready:?}");

    // Both Services' tables are republished every 20 ms for 6 s, while the client opens
    // connections to both without pause.
    let stop = Arc::new(AtomicBool::new(false));
    let (manifests, backends): (PathBuf, [Pod; 3]) = (c.manifests.clone(), c.backends.clone());
    let flipper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut phase = false;
            let mut flips = 0u32;
            while !stop.load(Ordering::Relaxed) {
                phase = !phase;
                write(&manifests, &yaml(&backends, phase));
                flips += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            flips
        })
    };
    let key = Lb4ServiceKey::new(VIP.octets(), 80, 6);
    let mut offsets = BTreeSet::new();
    let (mut asked, mut failed) = (0usize, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        for (to, allowed) in
            [(SocketAddrV4::new(VIP, 80), ["b1", "b2"].as_slice()), (other, ["b3"].as_slice())]
        {
            for a in tcp_asks(&c.client1, to, 10).expect("connections") {
                asked += 1;
                match a {
                    Ok(name) => {
                        assert!(allowed.contains(&name.as_str()), "a connection to {to} reached {name}")
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
        }
        if let Ok(svc) = c.maps(1).services.get(&key, 0) {
            offsets.insert(svc.maglev_offset);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().expect("flipper");
    assert!(
        failed.is_empty(),
        "{} of {asked} connections failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // The tables really moved: many regions used for one Service while connections went on.
    assert!(offsets.len() >= 5, "the table of {VIP}:80 moved through only {offsets:?} ({flips} changes)");
    assert!(asked >= 200, "only {asked} connections");
}
