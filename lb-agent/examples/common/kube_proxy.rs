//! kube-proxy's ClusterIP rulesets, written the way kube-proxy writes them, for the benchmarks that
//! compare lb with kube-proxy's iptables and nftables dataplanes:
//!
//! - iptables mode (pkg/proxy/iptables): `KUBE-SERVICES` with one rule per Service port, matched
//!   in order; a `KUBE-SVC-*` chain per Service port choosing an endpoint with `statistic --mode
//!   random` probabilities 1/n, 1/(n-1), ...; a `KUBE-SEP-*` chain per endpoint that DNATs; the
//!   masquerade marking, and the filter-table hooks. Above 1,000 endpoints kube-proxy drops the
//!   per-rule comments ("large cluster mode"), and so does this.
//! - nftables mode (pkg/proxy/nftables): table `ip kube-proxy` with the `service-ips` verdict map
//!   (`ip daddr . meta l4proto . th dport`), a `service-*` chain per Service port choosing with
//!   `numgen random mod n vmap`, an `endpoint-*` chain per endpoint that DNATs, and the
//!   filter-forward checks.
//!
//! NodePorts (`node_port`), as both modes write them: iptables' `KUBE-NODEPORTS` (reached from
//! `KUBE-SERVICES` for local destinations) jumping to a `KUBE-EXT-*` chain per Service port, which
//! masquerades and goes to the Service's chain (externalTrafficPolicy Cluster) or, for Local,
//! sends pods and the node to the Service's chain and everyone else to `KUBE-SVL-*`, this node's
//! endpoints; nftables' `service-nodeports` verdict map on the `nodeport-ips` set (the node's
//! primary address, `--nodeport-addresses primary`) to an `external-*` chain doing the same.
//!
//! Chain names carry a hash of the Service port (and endpoint) as kube-proxy's do; the hash
//! function differs (FNV here, SHA-256 there) but the names have the same length.

// Shared by several benchmark programs, each using a part.
#![allow(dead_code)]

use std::{fmt::Write as _, net::Ipv4Addr};

/// One Service port and its endpoints.
#[derive(Clone, Debug)]
pub struct ServicePort {
    /// `namespace/name:port-name`, as kube-proxy prints it.
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
    /// A NodePort on this node, and its policy: `Some(local)` with this node's endpoints for
    /// externalTrafficPolicy Local, `None` for Cluster.
    pub node_port: Option<(u16, Option<Endpoints>)>,
}

/// Endpoints: address and port.
pub type Endpoints = Vec<(Ipv4Addr, u16)>;

/// Pod addresses: traffic from outside this range to a Service is masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

fn hash_chars(s: &str, n: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut out = String::with_capacity(n);
    let mut round = 0u8;
    while out.len() < n {
        for b in s.bytes().chain([round]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut x = h;
        for _ in 0..12.min(n - out.len()) {
            out.push(ALPHABET[(x & 31) as usize] as char);
            x >>= 5;
        }
        round += 1;
    }
    out
}

fn svc_chain(s: &ServicePort) -> String {
    format!("KUBE-SVC-{}", hash_chars(&format!("{}tcp", s.name), 16))
}

fn ext_chain(s: &ServicePort) -> String {
    format!("KUBE-EXT-{}", hash_chars(&format!("{}tcp", s.name), 16))
}

fn svl_chain(s: &ServicePort) -> String {
    format!("KUBE-SVL-{}", hash_chars(&format!("{}tcp", s.name), 16))
}

fn sep_chain(s: &ServicePort, ep: (Ipv4Addr, u16)) -> String {
    format!("KUBE-SEP-{}", hash_chars(&format!("{}tcp{}:{}", s.name, ep.0, ep.1), 16))
}

/// The iptables-restore input for a full sync (what kube-proxy writes at start-up).
pub fn iptables_full(services: &[ServicePort]) -> String {
    let large = services.iter().map(|s| s.endpoints.len()).sum::<usize>() > LARGE_CLUSTER_ENDPOINTS;
    let mut f = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for c in
        ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-PROXY-FIREWALL", "KUBE-NODEPORTS"]
    {
        let _ = writeln!(f, ":{c} - [0:0]");
    }
    f.push_str(concat!(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
        ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    ));
    for s in services {
        let _ = writeln!(f, ":{} - [0:0]", svc_chain(s));
        if let Some((_, local)) = &s.node_port {
            let _ = writeln!(f, ":{} - [0:0]", ext_chain(s));
            if local.is_some() {
                let _ = writeln!(f, ":{} - [0:0]", svl_chain(s));
            }
        }
        for ep in &s.endpoints {
            let _ = writeln!(f, ":{} - [0:0]", sep_chain(s, *ep));
        }
    }
    f.push_str(concat!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n",
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    ));
    for s in services {
        let _ = writeln!(
            f,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} -j {}",
            s.name,
            s.vip,
            s.port,
            svc_chain(s)
        );
    }
    f.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for s in services {
        service_rules(&mut f, s, large);
        nodeport_rules(&mut f, s);
    }
    f.push_str("COMMIT\n");
    f
}

/// A Service port's NodePort rules (iptables): `KUBE-NODEPORTS` to its `KUBE-EXT-*` chain.
fn nodeport_rules(f: &mut String, s: &ServicePort) {
    let Some((port, local)) = &s.node_port else { return };
    let (ext, svc, name) = (ext_chain(s), svc_chain(s), &s.name);
    let _ =
        writeln!(f, "-A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport {port} -j {ext}");
    let Some(local) = local else {
        let _ = writeln!(
            f,
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(f, "-A {ext} -j {svc}");
        return;
    };
    let _ = writeln!(
        f,
        "-A {ext} -s {CLUSTER_CIDR} -m comment --comment \"pod traffic for {name} external destinations\" -j {svc}"
    );
    let _ = writeln!(
        f,
        "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
    );
    let _ = writeln!(
        f,
        "-A {ext} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc}"
    );
    let svl = svl_chain(s);
    let _ = writeln!(f, "-A {ext} -j {svl}");
    let n = local.len();
    for (i, ep) in local.iter().enumerate() {
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(
                f,
                "-A {svl} -m comment --comment \"{name} -> {}:{}\" -m statistic --mode random --probability {p:.10} -j {}",
                ep.0,
                ep.1,
                sep_chain(s, *ep)
            );
        } else {
            let _ = writeln!(
                f,
                "-A {svl} -m comment --comment \"{name} -> {}:{}\" -j {}",
                ep.0,
                ep.1,
                sep_chain(s, *ep)
            );
        }
    }
}

/// The rules of one Service port's chains (without the chain declarations).
fn service_rules(f: &mut String, s: &ServicePort, large: bool) {
    let svc = svc_chain(s);
    let _ = writeln!(
        f,
        "-A {svc} -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        s.name, s.vip, s.port
    );
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let comment = if large {
            String::new()
        } else {
            format!("-m comment --comment \"{} -> {}:{}\" ", s.name, ep.0, ep.1)
        };
        if i + 1 < n {
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(
                f,
                "-A {svc} {comment}-m statistic --mode random --probability {p:.10} -j {}",
                sep_chain(s, *ep)
            );
        } else {
            let _ = writeln!(f, "-A {svc} {comment}-j {}", sep_chain(s, *ep));
        }
    }
    for ep in &s.endpoints {
        let sep = sep_chain(s, *ep);
        let comment = if large { String::new() } else { format!("-m comment --comment {} ", s.name) };
        let _ = writeln!(f, "-A {sep} {comment}-s {}/32 -j KUBE-MARK-MASQ", ep.0);
        let _ = writeln!(f, "-A {sep} {comment}-m tcp -p tcp -j DNAT --to-destination {}:{}", ep.0, ep.1);
    }
}

/// The iptables-restore `--noflush` input of kube-proxy's partial sync after one Service port's
/// endpoints changed from `old` to `new`: its chain rewritten, new endpoint chains written and
/// the chains of endpoints that left deleted.
pub fn iptables_change(old: &ServicePort, new: &ServicePort, large: bool) -> String {
    let mut f = String::from("*nat\n");
    let _ = writeln!(f, ":{} - [0:0]", svc_chain(new));
    for ep in &new.endpoints {
        let _ = writeln!(f, ":{} - [0:0]", sep_chain(new, *ep));
    }
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(f, ":{} - [0:0]", sep_chain(old, *ep));
    }
    service_rules(&mut f, new, large);
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(f, "-X {}", sep_chain(old, *ep));
    }
    f.push_str("COMMIT\n");
    f
}

fn nft_svc_chain(s: &ServicePort) -> String {
    let (ns_name, port) = s.name.split_once(':').unwrap_or((&s.name, ""));
    format!("service-{}-{ns_name}/tcp/{port}", hash_chars(&format!("{}tcp", s.name), 8))
}

fn nft_ep_chain(s: &ServicePort, ep: (Ipv4Addr, u16)) -> String {
    let (ns_name, port) = s.name.split_once(':').unwrap_or((&s.name, ""));
    let h = hash_chars(&format!("{}tcp{}:{}", s.name, ep.0, ep.1), 8);
    format!("endpoint-{h}-{ns_name}/tcp/{port}__{}/{}", ep.0, ep.1)
}

const NFT_TABLE: &str = "ip kube-proxy";

/// The `nft -f` input for a full sync of kube-proxy's nftables mode; NodePorts listen on
/// `node_ip`.
pub fn nft_full(services: &[ServicePort], node_ip: Ipv4Addr) -> String {
    let t = NFT_TABLE;
    let mut f = format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}\n");
    for line in [
        "add chain T mark-for-masquerade",
        "add rule T mark-for-masquerade mark set mark or 0x4000",
        "add chain T masquerading",
        "add rule T masquerading mark and 0x4000 == 0 return",
        "add rule T masquerading mark set mark xor 0x4000",
        "add rule T masquerading masquerade fully-random",
        "add set T cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }",
        "add map T service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
        "add map T no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }",
        "add chain T services",
        "add rule T services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add set T nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }",
        "add map T service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }",
        "add rule T services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        "add chain T service-endpoints-check",
        "add rule T service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "add chain T cluster-ips-check",
        "add rule T cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
        "add rule T cluster-ips-check ip daddr 10.96.0.0/12 drop comment \"Drop traffic to unallocated ClusterIPs\"",
        "add chain T filter-forward { type filter hook forward priority -110 ; }",
        "add rule T filter-forward ct state new jump service-endpoints-check",
        "add rule T filter-forward ct state new jump cluster-ips-check",
        "add chain T filter-output { type filter hook output priority -110 ; }",
        "add rule T filter-output ct state new jump service-endpoints-check",
        // After nat-output's DNAT, as kube-proxy has it: only what was not sent to an endpoint
        // is still addressed to a ClusterIP.
        "add chain T filter-output-post-dnat { type filter hook output priority -90 ; }",
        "add rule T filter-output-post-dnat ct state new jump cluster-ips-check",
        "add chain T nat-prerouting { type nat hook prerouting priority -100 ; }",
        "add rule T nat-prerouting jump services",
        "add chain T nat-output { type nat hook output priority -100 ; }",
        "add rule T nat-output jump services",
        "add chain T nat-postrouting { type nat hook postrouting priority 100 ; }",
        "add rule T nat-postrouting jump masquerading",
    ] {
        f.push_str(&line.replacen(" T ", &format!(" {t} "), 1));
        f.push('\n');
    }
    let _ = writeln!(f, "add element {t} nodeport-ips {{ {node_ip} }}");
    for s in services {
        nft_service(&mut f, s);
        nft_nodeport(&mut f, s);
        let _ = writeln!(f, "add element {t} cluster-ips {{ {} }}", s.vip);
        let _ = writeln!(
            f,
            "add element {t} service-ips {{ {} . tcp . {} : goto {} }}",
            s.vip,
            s.port,
            nft_svc_chain(s)
        );
    }
    f
}

/// Chains and rules of one Service port (endpoint chains first: the verdict map names them).
fn nft_service(f: &mut String, s: &ServicePort) {
    let t = NFT_TABLE;
    for ep in &s.endpoints {
        let c = nft_ep_chain(s, *ep);
        let _ = writeln!(f, "add chain {t} {c}");
        let _ = writeln!(f, "add rule {t} {c} ip saddr {} jump mark-for-masquerade", ep.0);
        let _ = writeln!(f, "add rule {t} {c} meta l4proto tcp dnat to {}:{}", ep.0, ep.1);
    }
    let c = nft_svc_chain(s);
    let _ = writeln!(f, "add chain {t} {c}");
    let _ = writeln!(
        f,
        "add rule {t} {c} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.vip, s.port
    );
    let targets: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| format!("{i} : goto {}", nft_ep_chain(s, *ep)))
        .collect();
    let _ = writeln!(
        f,
        "add rule {t} {c} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        targets.join(" , ")
    );
}

fn nft_ext_chain(s: &ServicePort) -> String {
    let (ns_name, port) = s.name.split_once(':').unwrap_or((&s.name, ""));
    format!("external-{}-{ns_name}/tcp/{port}", hash_chars(&format!("{}tcp", s.name), 8))
}

/// A Service port's NodePort (nftables): its `external-*` chain and `service-nodeports` element.
fn nft_nodeport(f: &mut String, s: &ServicePort) {
    let Some((port, local)) = &s.node_port else { return };
    let (t, ext, svc) = (NFT_TABLE, nft_ext_chain(s), nft_svc_chain(s));
    let _ = writeln!(f, "add chain {t} {ext}");
    match local {
        None => {
            let _ = writeln!(f, "add rule {t} {ext} jump mark-for-masquerade");
            let _ = writeln!(f, "add rule {t} {ext} goto {svc}");
        }
        Some(local) => {
            let _ = writeln!(f, "add rule {t} {ext} ip saddr {CLUSTER_CIDR} goto {svc}");
            let _ = writeln!(f, "add rule {t} {ext} fib saddr type local jump mark-for-masquerade");
            let _ = writeln!(f, "add rule {t} {ext} fib saddr type local goto {svc}");
            let targets: Vec<String> = local
                .iter()
                .enumerate()
                .map(|(i, ep)| format!("{i} : goto {}", nft_ep_chain(s, *ep)))
                .collect();
            let _ = writeln!(
                f,
                "add rule {t} {ext} numgen random mod {} vmap {{ {} }}",
                local.len(),
                targets.join(" , ")
            );
        }
    }
    let _ = writeln!(f, "add element {t} service-nodeports {{ tcp . {port} : goto {ext} }}");
}

/// kube-proxy's nftables transaction after one Service port's endpoints changed from `old` to
/// `new`: the service chain flushed and rewritten, new endpoint chains added, departed ones deleted.
pub fn nft_change(old: &ServicePort, new: &ServicePort) -> String {
    let t = NFT_TABLE;
    let c = nft_svc_chain(new);
    let mut f = format!("flush chain {t} {c}\n");
    let mut body = String::new();
    nft_service(&mut body, new);
    for line in body.lines() {
        // Existing endpoint chains are re-added (a no-op in nft) and their rules not duplicated.
        let existing = old.endpoints.iter().any(|ep| line.contains(&nft_ep_chain(old, *ep)));
        if line.starts_with("add rule") && existing && !line.contains(&c) {
            continue;
        }
        f.push_str(line);
        f.push('\n');
    }
    for ep in old.endpoints.iter().filter(|e| !new.endpoints.contains(e)) {
        let _ = writeln!(f, "delete chain {t} {}", nft_ep_chain(old, *ep));
    }
    f
}

/// `count` Service ports with `endpoints` endpoints each; the last one (the one traffic is measured
/// on) points at `measured` and comes last in every chain. The others point at addresses that
/// exist nowhere.
pub fn services(count: u32, endpoints: u32, measured: &[(Ipv4Addr, u16)]) -> Vec<ServicePort> {
    (0..count)
        .map(|i| {
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 10 + i);
            let endpoints = if i + 1 == count {
                measured.to_vec()
            } else {
                (0..endpoints)
                    .map(|j| (Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * 16 + j), 80))
                    .collect()
            };
            ServicePort { name: format!("bench/s{i}:http"), vip, port: 80, endpoints, node_port: None }
        })
        .collect()
}

/// The same Services as Kubernetes objects (a JSON List) for lb's standalone mode.
pub fn manifests(services: &[ServicePort]) -> serde_json::Value {
    use serde_json::json;
    let mut items = Vec::new();
    for s in services {
        let (ns_name, port_name) = s.name.split_once(':').unwrap_or((&s.name, ""));
        let (ns, name) = ns_name.split_once('/').unwrap_or(("default", ns_name));
        let target = s.endpoints.first().map_or(s.port, |e| e.1);
        items.push(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": s.vip.to_string(), "clusterIPs": [s.vip.to_string()],
                "ports": [{"name": port_name, "port": s.port, "targetPort": target, "protocol": "TCP"}]}}),
        );
        if let (Some((node_port, local)), Some(svc)) = (&s.node_port, items.last_mut()) {
            svc["spec"]["type"] = json!("NodePort");
            svc["spec"]["ports"][0]["nodePort"] = json!(node_port);
            svc["spec"]["externalTrafficPolicy"] = json!(if local.is_some() { "Local" } else { "Cluster" });
        }
        // The node an endpoint is on, where the bench says (10.244.N.x is node N's).
        let eps: Vec<_> = s
            .endpoints
            .iter()
            .map(|e| {
                let node = format!("node{}", e.0.octets()[2]);
                json!({"addresses": [e.0.to_string()], "conditions": {"ready": true}, "nodeName": node})
            })
            .collect();
        items.push(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": port_name, "port": target, "protocol": "TCP"}], "endpoints": eps}));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}
