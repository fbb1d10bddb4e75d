//! Services: which ones lb answers for, and what each asks for (addresses, ports, affinity,
//! traffic policy). kube-proxy's rules for skipping a Service live here.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::{
    node::{Cidr, ExternalIps},
    Context, FrontendKind, ModelError, Protocol, SourceRange, DEFAULT_AFFINITY_TIMEOUT_SECS,
};

const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

pub fn object_name(ns: Option<&String>, name: Option<&String>) -> String {
    format!("{}/{}", ns.map_or("default", String::as_str), name.map_or("<unnamed>", String::as_str))
}

pub(super) fn parse_protocol(
    kind: &'static str,
    object: &str,
    field: impl Fn() -> String,
    p: Option<&String>,
) -> Result<Protocol, ModelError> {
    match p.map_or("TCP", String::as_str) {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err(ModelError::unsupported(kind, object, field(), "protocol SCTP")),
        other => Err(ModelError::invalid(kind, object, field(), format!("unknown protocol {other:?}"))),
    }
}

pub(super) fn parse_port(
    kind: &'static str,
    object: &str,
    field: String,
    port: i32,
) -> Result<u16, ModelError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ModelError::invalid(kind, object, field, format!("port {port} is not in 1-65535")))
}

/// A Service port after validation.
pub(super) struct SvcPort {
    pub(super) name: String,
    pub(super) port: u16,
    pub(super) proto: Protocol,
    /// `nodePort`, for a Service of type NodePort or LoadBalancer that has one (none with
    /// `allocateLoadBalancerNodePorts: false`, unless one was given).
    pub(super) node_port: Option<u16>,
}

/// What a valid Service asks for.
pub(super) struct SvcSpec {
    /// The cluster IPs, one per family, primary first (`spec.clusterIPs`).
    pub(super) vips: Vec<IpAddr>,
    /// LoadBalancer ingress IPs and externalIPs.
    pub(super) external: Vec<(IpAddr, FrontendKind)>,
    pub(super) ports: Vec<SvcPort>,
    pub(super) affinity_timeout_secs: u32,
    pub(super) local_only: bool,
    /// `externalTrafficPolicy: Local`: clients from outside reach only this node's endpoints.
    pub(super) external_local: bool,
    /// `loadBalancerSourceRanges` (IPv4 ones) of a LoadBalancer Service that lists any.
    pub(super) source_ranges: Option<Vec<SourceRange>>,
    /// `healthCheckNodePort` of a LoadBalancer Service with externalTrafficPolicy Local.
    pub(super) health_check_port: Option<u16>,
}

pub(super) enum SvcOutcome {
    /// Not ours (headless, ExternalName, another proxy's).
    Skip,
    /// Valid, possibly with parts left out (reported in `errors`).
    Use(SvcSpec),
    /// Rejected: reported in `errors`; what it had stays programmed.
    Reject,
}

pub(super) fn service_spec(
    svc: &Service,
    object: &str,
    ctx: &Context,
    errors: &mut Vec<ModelError>,
) -> SvcOutcome {
    const KIND: &str = "Service";
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return SvcOutcome::Skip;
    }
    if let Some(proxy) = labels.and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME)) {
        if ctx.service_proxy_name.as_deref() != Some(proxy.as_str()) {
            return SvcOutcome::Skip;
        }
    }
    let Some(spec) = svc.spec.as_ref() else {
        errors.push(ModelError::invalid(KIND, object, "spec".into(), "missing"));
        return SvcOutcome::Reject;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return SvcOutcome::Skip;
    }
    let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.iter());
    }
    if ips.is_empty() {
        errors.push(ModelError::invalid(KIND, object, "spec.clusterIP".into(), "missing"));
        return SvcOutcome::Reject;
    }
    if ips.iter().any(|ip| ip.as_str() == "None" || ip.is_empty()) {
        return SvcOutcome::Skip; // headless
    }
    let Ok(mut vips) = cluster_ips(spec, &ips, object, errors) else { return SvcOutcome::Reject };
    if !ctx.ipv6 {
        if let Some(i) = vips.iter().position(IpAddr::is_ipv6) {
            let field = if spec.cluster_ips.is_some() {
                format!("spec.clusterIPs[{i}]")
            } else {
                "spec.clusterIP".into()
            };
            let reason = format!("{} left out: IPv6 is off on this node (--ipv6)", vips[i]);
            errors.push(ModelError::refused(KIND, object, field, reason));
            vips.remove(i);
        }
    }
    let svc_ports = spec.ports.as_deref().unwrap_or_default();
    if svc_ports.is_empty() {
        errors.push(ModelError::invalid(KIND, object, "spec.ports".into(), "no ports"));
        return SvcOutcome::Reject;
    }
    let mut ports = Vec::new();
    // NodePorts are a Service's of type NodePort or LoadBalancer only (the API server clears them
    // from the others).
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    for (i, p) in svc_ports.iter().enumerate() {
        let port = match parse_port(KIND, object, format!("spec.ports[{i}].port"), p.port) {
            Ok(port) => port,
            Err(e) => {
                errors.push(e);
                return SvcOutcome::Reject;
            }
        };
        let node_port = match p.node_port.filter(|_| node_ports) {
            None => None,
            Some(n) => match parse_port(KIND, object, format!("spec.ports[{i}].nodePort"), n) {
                Ok(n) => Some(n),
                Err(e) => {
                    errors.push(e);
                    return SvcOutcome::Reject;
                }
            },
        };
        match parse_protocol(KIND, object, || format!("spec.ports[{i}].protocol"), p.protocol.as_ref()) {
            Ok(proto) => {
                ports.push(SvcPort { name: p.name.clone().unwrap_or_default(), port, proto, node_port })
            }
            // SCTP: that port is left out and reported; the others work.
            Err(e @ ModelError::Unsupported { .. }) => errors.push(e),
            Err(e) => {
                errors.push(e);
                return SvcOutcome::Reject;
            }
        }
    }
    let affinity_timeout_secs = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS as i32);
            match u32::try_from(t).ok().filter(|t| (1..=86_400).contains(t)) {
                Some(t) => t,
                None => {
                    let field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into();
                    errors.push(ModelError::invalid(KIND, object, field, format!("{t} is not in 1-86400")));
                    return SvcOutcome::Reject;
                }
            }
        }
        None | Some("None") => 0,
        Some(other) => {
            let field = "spec.sessionAffinity".into();
            errors.push(ModelError::invalid(KIND, object, field, format!("unknown value {other:?}")));
            return SvcOutcome::Reject;
        }
    };
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            let field = "spec.externalTrafficPolicy".into();
            errors.push(ModelError::invalid(KIND, object, field, format!("unknown value {other:?}")));
            return SvcOutcome::Reject;
        }
    };
    let health_check_port = health_check_port(spec, external_local, object, errors);
    let Ok(source_ranges) = source_ranges(spec, object, errors) else { return SvcOutcome::Reject };
    if vips.is_empty() || ports.is_empty() {
        return SvcOutcome::Skip; // only parts left out (SCTP, IPv6 when off), reported above
    }
    let external = external_addresses(svc, object, &vips, ctx, errors);
    // kube-proxy admits every one of the Service's LoadBalancer IPs as a client when a range
    // holds this node's IP.
    let source_ranges = source_ranges.map(|r| {
        let lbs = external.iter().filter(|(_, k)| *k == FrontendKind::LoadBalancer).map(|(ip, _)| *ip);
        let node_ips: Vec<IpAddr> =
            ctx.node_ip.map(IpAddr::V4).into_iter().chain(ctx.node_ip6.map(IpAddr::V6)).collect();
        with_node_rule(r, lbs, &node_ips)
    });
    SvcOutcome::Use(SvcSpec {
        vips,
        external,
        ports,
        affinity_timeout_secs,
        local_only,
        external_local,
        source_ranges,
        health_check_port,
    })
}

/// The cluster IPs of a Service, one per family, primary first, as the API server keeps them:
/// `spec.clusterIPs` (or `spec.clusterIP` alone), in the order of `spec.ipFamilies` where that is
/// given, with one address for `SingleStack` and at most two, of two families, otherwise
/// (`PreferDualStack` may have one or two; `RequireDualStack` two). An address that is not one,
/// or a list that breaks these rules, rejects the Service (it keeps what it had), naming the field.
fn cluster_ips(
    spec: &ServiceSpec,
    ips: &[&String],
    object: &str,
    errors: &mut Vec<ModelError>,
) -> Result<Vec<IpAddr>, ()> {
    const KIND: &str = "Service";
    let field = |i: usize| {
        if spec.cluster_ips.is_some() {
            format!("spec.clusterIPs[{i}]")
        } else {
            "spec.clusterIP".into()
        }
    };
    let mut invalid = |field: String, reason: String| {
        errors.push(ModelError::invalid(KIND, object, field, reason));
        Err(())
    };
    let mut vips = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(ip) => vips.push(ip),
            Err(_) => return invalid(field(i), format!("{ip:?} is not an IP address")),
        }
    }
    if vips.len() > 2 {
        return invalid(
            "spec.clusterIPs".into(),
            format!("{} addresses: at most one per family", vips.len()),
        );
    }
    if vips.len() == 2 && vips[0].is_ipv6() == vips[1].is_ipv6() {
        return invalid(field(1), format!("{} is of the same family as {}", vips[1], vips[0]));
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    for (i, family) in families.iter().enumerate() {
        let v6 = match family.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            other => return invalid(format!("spec.ipFamilies[{i}]"), format!("unknown family {other:?}")),
        };
        if let Some(ip) = vips.get(i).filter(|ip| ip.is_ipv6() != v6) {
            return invalid(field(i), format!("{ip} is not of spec.ipFamilies[{i}] ({family})"));
        }
    }
    match spec.ip_family_policy.as_deref() {
        None | Some("PreferDualStack") => {}
        Some("SingleStack") if vips.len() > 1 => {
            return invalid("spec.clusterIPs".into(), "two addresses under ipFamilyPolicy SingleStack".into())
        }
        Some("RequireDualStack") if vips.len() < 2 => {
            return invalid(
                "spec.clusterIPs".into(),
                "one address under ipFamilyPolicy RequireDualStack".into(),
            )
        }
        Some("SingleStack" | "RequireDualStack") => {}
        Some(other) => return invalid("spec.ipFamilyPolicy".into(), format!("unknown value {other:?}")),
    }
    Ok(vips)
}

/// The port a LoadBalancer Service with externalTrafficPolicy Local has its load balancer ask each
/// node on (kube-proxy's `NeedsHealthCheck`; the API server allocates it): `spec.healthCheckNodePort`.
/// One missing or out of range is reported, and the Service is served without it (its traffic
/// does not depend on it).
fn health_check_port(
    spec: &ServiceSpec,
    external_local: bool,
    object: &str,
    errors: &mut Vec<ModelError>,
) -> Option<u16> {
    if spec.type_.as_deref() != Some("LoadBalancer") || !external_local {
        return None;
    }
    let field = "spec.healthCheckNodePort".to_string();
    let Some(port) = spec.health_check_node_port else {
        let reason = "missing (the API server allocates one to a LoadBalancer Service with externalTrafficPolicy Local)";
        errors.push(ModelError::invalid("Service", object, field, reason));
        return None;
    };
    parse_port("Service", object, field, port).map_err(|e| errors.push(e)).ok()
}

/// Whether network `(net, len)` holds `ip` (of the same family).
fn range_holds((net, len): &SourceRange, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(*n)
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(*n)
        }
        _ => false,
    }
}

/// `ranges` and, when one of them holds one of this node's IPs (`node_ips`, its primary of each
/// family), each of `lbs` (the Service's LoadBalancer IPs) of that family as a client too:
/// kube-proxy's rule for load balancers that loop a node's request back with the address as its
/// source.
fn with_node_rule(
    mut ranges: Vec<SourceRange>,
    lbs: impl Iterator<Item = IpAddr>,
    node_ips: &[IpAddr],
) -> Vec<SourceRange> {
    let holding: Vec<bool> = [false, true]
        .iter()
        .map(|v6| node_ips.iter().any(|n| n.is_ipv6() == *v6 && ranges.iter().any(|r| range_holds(r, *n))))
        .collect();
    ranges.extend(
        lbs.filter(|ip| holding[usize::from(ip.is_ipv6())])
            .map(|ip| (ip, if ip.is_ipv6() { 128 } else { 32 })),
    );
    ranges.sort_unstable();
    ranges.dedup();
    ranges
}

/// The ranges of `ranges` of the family of `addr`, as a frontend at `addr` takes them: `None`
/// (every client) when there are none of that family (kube-proxy filters each family by its own
/// ranges, and none means no filter), or when one is the family's whole space (`0.0.0.0/0`,
/// `::/0`).
pub(super) fn ranges_of_family(ranges: &[SourceRange], addr: IpAddr) -> Option<Vec<SourceRange>> {
    let mine: Vec<SourceRange> =
        ranges.iter().filter(|(n, _)| n.is_ipv6() == addr.is_ipv6()).copied().collect();
    (!mine.is_empty() && !mine.iter().any(|(_, len)| *len == 0)).then_some(mine)
}

/// The networks of `spec.loadBalancerSourceRanges` of a LoadBalancer Service, of both families
/// (each frontend takes its own family's: [`ranges_of_family`]): `None` (every client) when it
/// lists none (the field means nothing for other types). One that is not a network rejects
/// the Service (it keeps what it had): dropping it would shut out the clients it names, ignoring
/// all of them would let every client in. Spaces around one are allowed, as kube-proxy trims them.
fn source_ranges(
    spec: &ServiceSpec,
    object: &str,
    errors: &mut Vec<ModelError>,
) -> Result<Option<Vec<SourceRange>>, ()> {
    let listed = spec.load_balancer_source_ranges.as_deref().unwrap_or_default();
    if spec.type_.as_deref() != Some("LoadBalancer") || listed.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (i, r) in listed.iter().enumerate() {
        match r.trim().parse::<Cidr>() {
            Ok(c) => out.push((c.addr(), c.prefix_len())),
            Err(e) => {
                let field = format!("spec.loadBalancerSourceRanges[{i}]");
                errors.push(ModelError::invalid("Service", object, field, format!("{r:?}: {e}")));
                return Err(());
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(Some(out))
}

/// The Service's LoadBalancer addresses: for `type: LoadBalancer`, the ingress IPs
/// in its status whose `ipMode` is unset or `VIP` (with `Proxy` the load balancer itself must see
/// the traffic; hostnames are not addresses), as kube-proxy takes them. One that is not an IP
/// address is reported and left out; one listed twice, or that is one of the Service's own
/// cluster IPs (`vips`), is taken once. Then its `spec.externalIPs`, of any type, as
/// `--external-ips` allows them (anyone who may create a Service may list any address there,
/// CVE-2020-8554): one left out is reported.
fn external_addresses(
    svc: &Service,
    object: &str,
    vips: &[IpAddr],
    ctx: &Context,
    errors: &mut Vec<ModelError>,
) -> Vec<(IpAddr, FrontendKind)> {
    const KIND: &str = "Service";
    let Some(spec) = svc.spec.as_ref() else { return Vec::new() };
    let mut out: Vec<(IpAddr, FrontendKind)> = Vec::new();
    // An address of a family the Service has no cluster IP of is left out, as kube-proxy's
    // proxier of each family leaves it (the Service has no endpoints of that family either); an
    // IPv4-mapped IPv6 address is the IPv4 one, as Go's parser has it.
    let take =
        |out: &mut Vec<(IpAddr, FrontendKind)>,
         ip: &str,
         field: String,
         kind: FrontendKind,
         errors: &mut Vec<ModelError>| match ip.trim().parse::<IpAddr>().map(|a| a.to_canonical()) {
            Ok(a) if a.is_ipv6() && !ctx.ipv6 => {
                let reason = format!("{a} left out: IPv6 is off on this node (--ipv6)");
                errors.push(ModelError::refused(KIND, object, field, reason));
            }
            Ok(a) if !vips.iter().any(|v| v.is_ipv6() == a.is_ipv6()) => {
                let family = if a.is_ipv6() { "IPv6" } else { "IPv4" };
                let reason = format!("{a} left out: the Service has no {family} cluster IP");
                errors.push(ModelError::refused(KIND, object, field, reason));
            }
            Ok(a) => {
                if !vips.contains(&a) && !out.iter().any(|(o, _)| *o == a) {
                    out.push((a, kind));
                }
            }
            Err(_) => {
                errors.push(ModelError::invalid(KIND, object, field, format!("{ip:?} is not an IP address")))
            }
        };
    if spec.type_.as_deref() == Some("LoadBalancer") {
        let ingress =
            svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            let Some(ip) = ing.ip.as_deref() else { continue };
            if ing.ip_mode.as_deref().is_some_and(|m| m != "VIP") {
                continue;
            }
            take(
                &mut out,
                ip,
                format!("status.loadBalancer.ingress[{i}].ip"),
                FrontendKind::LoadBalancer,
                errors,
            );
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        let field = format!("spec.externalIPs[{i}]");
        let allowed = match (ctx.external_ips, ip.trim().parse::<IpAddr>().map(|a| a.to_canonical())) {
            (ExternalIps::All, _) | (_, Err(_)) => Ok(()),
            // One of the Service's own addresses already: taken once, whatever the setting.
            (_, Ok(a)) if vips.contains(&a) || out.iter().any(|(o, _)| *o == a) => Ok(()),
            (ExternalIps::NodeAddresses, Ok(IpAddr::V4(a)))
                if ctx.local_addresses.contains(&a) || ctx.node_ip == Some(a) =>
            {
                Ok(())
            }
            (ExternalIps::NodeAddresses, Ok(IpAddr::V6(a)))
                if ctx.local_addresses6.contains(&a) || ctx.node_ip6 == Some(a) =>
            {
                Ok(())
            }
            (ExternalIps::NodeAddresses, Ok(_)) => {
                Err(format!("{ip} is not one of this node's addresses (--external-ips=node-addresses)"))
            }
            (ExternalIps::None, Ok(_)) => Err("externalIPs are not served (--external-ips=none)".into()),
        };
        match allowed {
            Ok(()) => take(&mut out, ip, field, FrontendKind::ExternalIp, errors),
            Err(reason) => errors.push(ModelError::refused(KIND, object, field, reason)),
        }
    }
    out
}
