//! The one encoder between model types and map types, both ways. The reconciler writes with it,
//! a restarted agent reads the maps back with it, and `lbctl`, the metrics and the golden dumps
//! print with it; it is the only code that knows how an address, a port or a state is laid out in
//! a map, and the only code that tells lb4 from lb6: the maps that hold an address have a twin
//! per family, and their keys and values travel as the enums below.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    addr6, octets6, Addr6, Lb4Backend, Lb4Member, Lb4MemberKey, Lb4Service, Lb4ServiceKey, Lb4SrcRange,
    Lb6Backend, Lb6Member, Lb6ServiceKey, BACKEND_STATE_ACTIVE, BACKEND_STATE_FREE,
    BACKEND_STATE_TERMINATING, FRONTEND_KIND_CLUSTER_IP, FRONTEND_KIND_EXTERNAL_IP,
    FRONTEND_KIND_LOAD_BALANCER, FRONTEND_KIND_NODE_PORT, MEMBER_ACTIVE, MEMBER_DRAINING, MEMBER_SERVING,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SRC_RANGE_ALLOW, SRC_RANGE_DENY, SRC_RANGE_FRONTEND_BITS,
    SVC_FLAG_EXTERNAL, SVC_FLAG_LOCAL_ONLY, SVC_FLAG_TOMBSTONE, SVC_FLAG_TWO_SCOPES,
};

use super::alloc::Region;
use crate::model::{
    BackendAddr, BackendState, Frontend, FrontendAddr, FrontendKind, Protocol, Scope, SourceRange,
};

/// A key of `LB4_SERVICES` or `LB6_SERVICES` (both hold `Lb4Service` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    V4(Lb4ServiceKey),
    V6(Lb6ServiceKey),
}

impl ServiceKey {
    /// Address, port (host order), protocol number and scope byte, whatever the family.
    pub fn parts(&self) -> (IpAddr, u16, u8, u8) {
        match self {
            Self::V4(k) => (ipv4(k.addr).into(), port(k.port), k.proto, k.scope),
            Self::V6(k) => (ipv6(k.addr).into(), port(k.port), k.proto, k.scope),
        }
    }
}

/// A value of `LB4_BACKENDS` or `LB6_BACKENDS` (one backend id is in one of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendValue {
    V4(Lb4Backend),
    V6(Lb6Backend),
}

impl BackendValue {
    /// Address, port (host order), protocol number and state, whatever the family.
    pub fn parts(&self) -> (IpAddr, u16, u8, u8) {
        match self {
            Self::V4(b) => (ipv4(b.addr).into(), port(b.port), b.proto, b.state),
            Self::V6(b) => (ipv6(b.addr).into(), port(b.port), b.proto, b.state),
        }
    }

    /// `BACKEND_STATE_*`.
    pub const fn state(&self) -> u8 {
        match self {
            Self::V4(b) => b.state,
            Self::V6(b) => b.state,
        }
    }
}

/// A key of `LB4_MEMBERS` or `LB6_MEMBERS`: the same pair, in the map of its frontend's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberKey {
    V4(Lb4MemberKey),
    V6(Lb4MemberKey),
}

impl MemberKey {
    /// The key of (`svc_id`, `backend_id`) in the members map of `backend`'s family.
    pub const fn of(svc_id: u32, backend_id: u32, backend: &BackendAddr) -> Self {
        let k = Lb4MemberKey { svc_id, backend_id };
        if backend.ip.is_ipv6() {
            Self::V6(k)
        } else {
            Self::V4(k)
        }
    }

    /// The (frontend id, backend id) pair.
    pub const fn pair(&self) -> Lb4MemberKey {
        match self {
            Self::V4(k) | Self::V6(k) => *k,
        }
    }
}

/// A value of `LB4_MEMBERS` or `LB6_MEMBERS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberValue {
    V4(Lb4Member),
    V6(Lb6Member),
}

impl MemberValue {
    /// `MEMBER_*`.
    pub const fn state(&self) -> u8 {
        match self {
            Self::V4(m) => m.state,
            Self::V6(m) => m.state,
        }
    }

    /// The member's backend address and port (host order).
    pub fn socket(&self) -> (IpAddr, u16) {
        match self {
            Self::V4(m) => (IpAddr::V4(ipv4(m.addr)), port(m.port)),
            Self::V6(m) => (IpAddr::V6(ipv6(m.addr)), port(m.port)),
        }
    }
}

/// The scope byte of a services-map key.
const fn scope_byte(s: Scope) -> u8 {
    match s {
        Scope::External => SCOPE_EXTERNAL,
        Scope::Internal => SCOPE_INTERNAL,
    }
}

/// The services-map key of a frontend.
pub fn service_key(a: &FrontendAddr) -> ServiceKey {
    let scope = scope_byte(a.scope);
    match a.vip {
        IpAddr::V4(v4) => ServiceKey::V4(Lb4ServiceKey {
            scope,
            ..Lb4ServiceKey::new(v4.octets(), a.port, a.proto.number())
        }),
        IpAddr::V6(v6) => ServiceKey::V6(Lb6ServiceKey {
            scope,
            ..Lb6ServiceKey::new(v6.octets(), a.port, a.proto.number())
        }),
    }
}

/// The `LB4_SERVICES` key of an IPv4 frontend (`None` for an IPv6 one).
pub fn service_key4(a: &FrontendAddr) -> Option<Lb4ServiceKey> {
    match service_key(a) {
        ServiceKey::V4(k) => Some(k),
        ServiceKey::V6(_) => None,
    }
}

/// The frontend a services-map key names (`None` for a protocol or scope lb does not program).
pub fn frontend_addr(k: &ServiceKey) -> Option<FrontendAddr> {
    let (vip, port, proto, scope): (IpAddr, _, _, _) = match k {
        ServiceKey::V4(k) => (ipv4(k.addr).into(), k.port, k.proto, k.scope),
        ServiceKey::V6(k) => (ipv6(k.addr).into(), k.port, k.proto, k.scope),
    };
    let proto = Protocol::from_number(proto)?;
    let scope = match scope {
        SCOPE_EXTERNAL => Scope::External,
        SCOPE_INTERNAL => Scope::Internal,
        _ => return None,
    };
    Some(FrontendAddr { scope, ..FrontendAddr::new(vip, u16::from_be(port), proto) })
}

/// The services-map value that publishes frontend `id` with its table in `region`.
pub fn service_value(id: u32, fe: &Frontend, region: Option<Region>) -> Lb4Service {
    Lb4Service {
        id,
        backend_count: fe.backends.len() as u32,
        maglev_offset: region.map_or(0, |r| r.offset),
        maglev_size: region.map_or(0, |r| r.size),
        affinity_timeout_secs: fe.affinity_timeout_secs,
        flags: [
            (fe.local_only, SVC_FLAG_LOCAL_ONLY),
            (fe.kind.external(), SVC_FLAG_EXTERNAL),
            (fe.two_scopes, SVC_FLAG_TWO_SCOPES),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |flags, (_, flag)| flags | flag),
    }
}

/// The services-map value of frontend `id` once its Service is gone: no backend, no table, kept
/// for the flows made for it (from outside too, for an `external` address).
pub fn tombstone_value(id: u32, external: bool) -> Lb4Service {
    let flags = SVC_FLAG_TOMBSTONE | if external { SVC_FLAG_EXTERNAL } else { 0 };
    Lb4Service { id, flags, ..Lb4Service::default() }
}

/// The key data of a source-range entry, of the frontend's family (`LB4_SRC_RANGES`,
/// `LB6_SRC_RANGES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SrcRangeKey {
    V4(Lb4SrcRange),
    V6(lb_common::Lb6SrcRange),
}

/// One entry of `LB4_SRC_RANGES` or `LB6_SRC_RANGES`: its key's data and prefix length (its
/// verdict follows from the length: a frontend's whole key is its deny entry, a longer prefix
/// one of its ranges).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeEntry {
    pub key: SrcRangeKey,
    pub prefix_len: u32,
}

impl SrcRangeKey {
    /// The frontend's (external) key.
    pub const fn frontend(&self) -> ServiceKey {
        match self {
            Self::V4(k) => ServiceKey::V4(k.frontend),
            Self::V6(k) => ServiceKey::V6(k.frontend),
        }
    }
}

impl SrcRangeEntry {
    /// The prefix length of its frontend's deny entry (the bits of a frontend key of its family).
    pub const fn frontend_bits(&self) -> u32 {
        match self.key {
            SrcRangeKey::V4(_) => SRC_RANGE_FRONTEND_BITS,
            SrcRangeKey::V6(_) => lb_common::SRC_RANGE_FRONTEND_BITS6,
        }
    }

    /// `SRC_RANGE_DENY` for a frontend's own entry, `SRC_RANGE_ALLOW` for one of its ranges.
    pub const fn verdict(&self) -> u32 {
        if self.prefix_len == self.frontend_bits() {
            SRC_RANGE_DENY
        } else {
            SRC_RANGE_ALLOW
        }
    }

    /// The frontend's address, port and protocol, and the range (`None`: the deny entry).
    pub fn parts(&self) -> (IpAddr, u16, u8, Option<(IpAddr, u8)>) {
        let len = self.prefix_len.saturating_sub(self.frontend_bits()) as u8;
        let (vip, port, proto, src): (IpAddr, _, _, IpAddr) = match self.key {
            SrcRangeKey::V4(k) => {
                (ipv4(k.frontend.addr).into(), k.frontend.port, k.frontend.proto, ipv4(k.src).into())
            }
            SrcRangeKey::V6(k) => {
                (ipv6(k.frontend.addr).into(), k.frontend.port, k.frontend.proto, ipv6(k.src).into())
            }
        };
        (vip, u16::from_be(port), proto, (len > 0).then_some((src, len)))
    }
}

/// The source-range entries of the frontend at `addr` with source ranges `ranges` (of its
/// family; the model gives each frontend its own family's): one per range, then its deny entry
/// (the order to write them in). Under the address's external key, which both scopes share.
pub fn src_range_entries(addr: &FrontendAddr, ranges: &[SourceRange]) -> Vec<SrcRangeEntry> {
    // A `/0` range (which the model turns into no ranges at all) would be the deny entry itself.
    let ranges = ranges.iter().filter(|(_, len)| *len > 0);
    match service_key(&FrontendAddr { scope: Scope::External, ..*addr }) {
        ServiceKey::V4(frontend) => ranges
            .filter_map(|(net, len)| match net {
                IpAddr::V4(n) => Some(SrcRangeEntry {
                    key: SrcRangeKey::V4(Lb4SrcRange { frontend, src: u32::from_ne_bytes(n.octets()) }),
                    prefix_len: SRC_RANGE_FRONTEND_BITS + u32::from(*len),
                }),
                IpAddr::V6(_) => None,
            })
            .chain([SrcRangeEntry {
                key: SrcRangeKey::V4(Lb4SrcRange { frontend, src: 0 }),
                prefix_len: SRC_RANGE_FRONTEND_BITS,
            }])
            .collect(),
        ServiceKey::V6(frontend) => ranges
            .filter_map(|(net, len)| match net {
                IpAddr::V6(n) => Some(SrcRangeEntry {
                    key: SrcRangeKey::V6(lb_common::Lb6SrcRange {
                        frontend,
                        src: lb_common::addr6(n.octets()),
                    }),
                    prefix_len: lb_common::SRC_RANGE_FRONTEND_BITS6 + u32::from(*len),
                }),
                IpAddr::V4(_) => None,
            })
            .chain([SrcRangeEntry {
                key: SrcRangeKey::V6(lb_common::Lb6SrcRange { frontend, src: [0; 4] }),
                prefix_len: lb_common::SRC_RANGE_FRONTEND_BITS6,
            }])
            .collect(),
    }
}

/// The frontend record's kind of a frontend of `kind`.
pub fn meta_kind(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp => FRONTEND_KIND_CLUSTER_IP,
        FrontendKind::LoadBalancer => FRONTEND_KIND_LOAD_BALANCER,
        FrontendKind::NodePort => FRONTEND_KIND_NODE_PORT,
        FrontendKind::ExternalIp => FRONTEND_KIND_EXTERNAL_IP,
    }
}

/// The table region a services-map value points at (`None` when it has no table).
pub fn service_region(svc: &Lb4Service) -> Option<Region> {
    (svc.maglev_size > 0).then_some(Region { offset: svc.maglev_offset, size: svc.maglev_size })
}

/// The backends-map value of `b` in `state` (`BACKEND_STATE_*`).
pub fn backend_value(b: &BackendAddr, state: u8) -> BackendValue {
    match b.ip {
        IpAddr::V4(v4) => BackendValue::V4(Lb4Backend::new(v4.octets(), b.port, b.proto.number(), state)),
        IpAddr::V6(v6) => BackendValue::V6(Lb6Backend::new(v6.octets(), b.port, b.proto.number(), state)),
    }
}

/// The free slot of `b`'s id, in the backends map of `b`'s family.
pub fn backend_free(b: &BackendAddr) -> BackendValue {
    match b.ip {
        IpAddr::V4(_) => BackendValue::V4(Lb4Backend::default()),
        IpAddr::V6(_) => BackendValue::V6(Lb6Backend::default()),
    }
}

/// The backend a backends-map value holds (`None` for a free slot or another protocol).
pub fn backend_addr(b: &BackendValue) -> Option<BackendAddr> {
    let (ip, port, proto): (IpAddr, _, _) = match b {
        BackendValue::V4(b) => (ipv4(b.addr).into(), b.port, b.proto),
        BackendValue::V6(b) => (ipv6(b.addr).into(), b.port, b.proto),
    };
    if b.state() == BACKEND_STATE_FREE {
        return None;
    }
    let proto = Protocol::from_number(proto)?;
    Some(BackendAddr { ip, port: u16::from_be(port), proto })
}

/// The backends-map state of a backend the model lists (the most any frontend allows wins).
pub fn backend_state(s: BackendState) -> u8 {
    match s {
        BackendState::Active => BACKEND_STATE_ACTIVE,
        BackendState::Serving | BackendState::Draining => BACKEND_STATE_TERMINATING,
    }
}

/// The members-map state of an endpoint of a frontend.
pub fn member_state(s: BackendState) -> u8 {
    match s {
        BackendState::Active => MEMBER_ACTIVE,
        BackendState::Serving => MEMBER_SERVING,
        BackendState::Draining => MEMBER_DRAINING,
    }
}

/// The model state a members-map state stands for (`None` for an unknown value).
pub fn member_backend_state(state: u8) -> Option<BackendState> {
    match state {
        MEMBER_ACTIVE => Some(BackendState::Active),
        MEMBER_SERVING => Some(BackendState::Serving),
        MEMBER_DRAINING => Some(BackendState::Draining),
        _ => None,
    }
}

/// The members-map key and value of backend `backend_id` (`b`) of frontend `svc_id`.
pub fn member(svc_id: u32, backend_id: u32, b: &BackendAddr, s: BackendState) -> (MemberKey, MemberValue) {
    let state = member_state(s);
    let value = match backend_value(b, 0) {
        BackendValue::V4(v) => MemberValue::V4(Lb4Member { addr: v.addr, port: v.port, state, _pad: 0 }),
        BackendValue::V6(v) => MemberValue::V6(Lb6Member { addr: v.addr, port: v.port, state, _pad: 0 }),
    };
    (MemberKey::of(svc_id, backend_id, b), value)
}

/// `active`, `serving`, `draining`: a member state as people read it.
pub fn member_state_name(state: u8) -> &'static str {
    match state {
        MEMBER_ACTIVE => "active",
        MEMBER_SERVING => "serving",
        MEMBER_DRAINING => "draining",
        _ => "unknown",
    }
}

/// `active`, `terminating`, `free`: a backend state as people read it.
pub fn state_name(state: u8) -> &'static str {
    match state {
        BACKEND_STATE_ACTIVE => "active",
        BACKEND_STATE_TERMINATING => "terminating",
        BACKEND_STATE_FREE => "free",
        _ => "unknown",
    }
}

/// An address as the maps hold it (network byte order).
pub fn ipv4(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

/// An IPv6 address as the maps hold it.
pub fn ipv6(a: Addr6) -> Ipv6Addr {
    Ipv6Addr::from(octets6(a))
}

/// The map form of an IPv6 address.
pub fn addr6_of(ip: Ipv6Addr) -> Addr6 {
    addr6(ip.octets())
}

/// `TCP`, `UDP`, or `protoN` for a protocol number lb does not handle.
pub fn proto_name(p: u8) -> String {
    Protocol::from_number(p).map_or_else(|| format!("proto{p}"), |p| p.to_string())
}

/// A port as the maps hold it (network byte order).
pub fn port(be: u16) -> u16 {
    u16::from_be(be)
}

/// `IP:port` from map fields (network byte order).
pub fn socket(addr: u32, be_port: u16) -> String {
    format!("{}:{}", ipv4(addr), port(be_port))
}

/// `[IP]:port` from IPv6 map fields (network byte order).
pub fn socket6(addr: Addr6, be_port: u16) -> String {
    format!("[{}]:{}", ipv6(addr), port(be_port))
}

/// `IP:port/PROTO` from map fields (network byte order).
pub fn endpoint(addr: u32, be_port: u16, proto: u8) -> String {
    format!("{}/{}", socket(addr, be_port), proto_name(proto))
}

/// A services-map key as people read it: `IP:port/PROTO` (`[IP]:port/PROTO` for IPv6).
pub fn service_key_name(k: &ServiceKey) -> String {
    let (ip, port, proto, _) = k.parts();
    endpoint_of(ip, port, proto)
}

/// `IP:port/PROTO` (`[IP]:port/PROTO` for IPv6) from an address, a host-order port and a protocol
/// number.
pub fn endpoint_of(ip: IpAddr, port: u16, proto: u8) -> String {
    format!("{}/{}", std::net::SocketAddr::new(ip, port), proto_name(proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_map_types_round_trip() {
        let fe = FrontendAddr::new(Ipv4Addr::new(10, 96, 0, 10), 8080, Protocol::Udp);
        let ServiceKey::V4(key) = service_key(&fe) else { panic!("an IPv4 key") };
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(frontend_addr(&ServiceKey::V4(key)), Some(fe));
        let be = BackendAddr { ip: Ipv4Addr::new(10, 244, 1, 2).into(), port: 53, proto: Protocol::Tcp };
        let v = backend_value(&be, BACKEND_STATE_TERMINATING);
        assert_eq!(backend_addr(&v), Some(be));
        assert_eq!(backend_addr(&backend_free(&be)), None, "a free slot holds no backend");
        let BackendValue::V4(v) = v else { panic!("an IPv4 backend") };
        assert_eq!(endpoint(v.addr, v.port, v.proto), "10.244.1.2:53/TCP");
        assert_eq!(state_name(v.state), "terminating");
        assert_eq!(proto_name(132), "proto132");
    }

    #[test]
    fn ipv6_frontends_and_backends_round_trip_through_the_lb6_types() {
        let vip: Ipv6Addr = "fd00:10:96::a".parse().unwrap();
        let fe = FrontendAddr { scope: Scope::Internal, ..FrontendAddr::new(vip, 443, Protocol::Tcp) };
        let key = service_key(&fe);
        let ServiceKey::V6(k6) = key else { panic!("an IPv6 key") };
        assert_eq!(octets6(k6.addr), vip.octets(), "the address in packet order");
        assert_eq!(k6.port.to_ne_bytes(), [0x01, 0xbb]);
        assert_eq!(k6.scope, SCOPE_INTERNAL);
        assert_eq!(frontend_addr(&key), Some(fe));
        assert_eq!(service_key4(&fe), None);
        assert_eq!(service_key_name(&key), "[fd00:10:96::a]:443/TCP");
        let be = BackendAddr { ip: "fd00:10:244:1::2".parse().unwrap(), port: 8080, proto: Protocol::Udp };
        let v = backend_value(&be, BACKEND_STATE_ACTIVE);
        assert!(matches!(v, BackendValue::V6(_)));
        assert_eq!(backend_addr(&v), Some(be));
        assert_eq!(backend_addr(&backend_free(&be)), None);
        assert!(matches!(backend_free(&be), BackendValue::V6(_)), "freed in its own family's map");
        let (k, m) = member(3, 9, &be, BackendState::Serving);
        assert_eq!(k, MemberKey::V6(Lb4MemberKey { svc_id: 3, backend_id: 9 }));
        assert_eq!(m.socket(), (be.ip, 8080));
        assert_eq!(m.state(), MEMBER_SERVING);
        assert_eq!(be.to_string(), "[fd00:10:244:1::2]:8080/UDP", "RFC 5952 text in brackets");
        // Its source ranges go to `LB6_SRC_RANGES`: one per range (160 bits of frontend and the
        // range's), then its deny entry.
        let net: IpAddr = "fd00:1::".parse::<Ipv6Addr>().expect("addr").into();
        let e = src_range_entries(&fe, &[(net, 32)]);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            matches!(e[0].key, SrcRangeKey::V6(k) if k.src == addr6([0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
        );
        assert_eq!(
            (e[0].prefix_len, e[0].verdict()),
            (lb_common::SRC_RANGE_FRONTEND_BITS6 + 32, SRC_RANGE_ALLOW)
        );
        assert_eq!((e[1].prefix_len, e[1].verdict()), (lb_common::SRC_RANGE_FRONTEND_BITS6, SRC_RANGE_DENY));
        assert_eq!(e[0].parts().3, Some((net, 32)));
        assert_eq!(e[1].parts().3, None);
        // Under the address's external key, whatever the frontend's scope.
        assert_eq!(e[0].key.frontend(), service_key(&FrontendAddr { scope: Scope::External, ..fe }));
    }
}
