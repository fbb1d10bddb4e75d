//! The one encoder between model types and map types, both ways. The reconciler writes with it,
//! a restarted agent reads the maps back with it, and `lbctl`, the metrics and the golden dumps
//! print with it; it is the only code that knows how an address, a port or a state is laid out in
//! a map (and so, later, the only code that tells lb4 from lb6).

use std::net::Ipv4Addr;

use lb_common::{
    Lb4Backend, Lb4Member, Lb4MemberKey, Lb4Service, Lb4ServiceKey, Lb4SrcRange, BACKEND_STATE_ACTIVE,
    BACKEND_STATE_FREE, BACKEND_STATE_TERMINATING, FRONTEND_KIND_CLUSTER_IP, FRONTEND_KIND_EXTERNAL_IP,
    FRONTEND_KIND_LOAD_BALANCER, FRONTEND_KIND_NODE_PORT, MEMBER_ACTIVE, MEMBER_DRAINING, MEMBER_SERVING,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SRC_RANGE_ALLOW, SRC_RANGE_DENY, SRC_RANGE_FRONTEND_BITS,
    SVC_FLAG_EXTERNAL, SVC_FLAG_LOCAL_ONLY, SVC_FLAG_TOMBSTONE, SVC_FLAG_TWO_SCOPES,
};

use super::alloc::Region;
use crate::model::{
    BackendAddr, BackendState, Frontend, FrontendAddr, FrontendKind, Protocol, Scope, SourceRange,
};

/// The services-map key of a frontend.
pub fn service_key(a: &FrontendAddr) -> Lb4ServiceKey {
    let scope = match a.scope {
        Scope::External => SCOPE_EXTERNAL,
        Scope::Internal => SCOPE_INTERNAL,
    };
    Lb4ServiceKey { scope, ..Lb4ServiceKey::new(a.vip.octets(), a.port, a.proto.number()) }
}

/// The frontend a services-map key names (`None` for a protocol or scope lb does not program).
pub fn frontend_addr(k: &Lb4ServiceKey) -> Option<FrontendAddr> {
    let proto = Protocol::from_number(k.proto)?;
    let scope = match k.scope {
        SCOPE_EXTERNAL => Scope::External,
        SCOPE_INTERNAL => Scope::Internal,
        _ => return None,
    };
    Some(FrontendAddr { scope, ..FrontendAddr::new(ipv4(k.addr), u16::from_be(k.port), proto) })
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

/// One entry of `LB4_SRC_RANGES`: its key's data and prefix length (its verdict follows from the
/// length: a frontend's whole key is its deny entry, a longer prefix one of its ranges).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRangeEntry {
    pub key: Lb4SrcRange,
    pub prefix_len: u32,
}

impl SrcRangeEntry {
    /// `SRC_RANGE_DENY` for a frontend's own entry, `SRC_RANGE_ALLOW` for one of its ranges.
    pub const fn verdict(&self) -> u32 {
        if self.prefix_len == SRC_RANGE_FRONTEND_BITS {
            SRC_RANGE_DENY
        } else {
            SRC_RANGE_ALLOW
        }
    }
}

/// The `LB4_SRC_RANGES` entries of the frontend at `addr` with source ranges `ranges`: one per
/// range, then its deny entry (the order to write them in). Under the address's external key,
/// which both scopes share.
pub fn src_range_entries(addr: &FrontendAddr, ranges: &[SourceRange]) -> Vec<SrcRangeEntry> {
    let frontend = service_key(&FrontendAddr { scope: Scope::External, ..*addr });
    // A `/0` range (which the model turns into no ranges at all) would be the deny entry itself.
    ranges
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|(net, len)| SrcRangeEntry {
            key: Lb4SrcRange { frontend, src: u32::from_ne_bytes(net.octets()) },
            prefix_len: SRC_RANGE_FRONTEND_BITS + u32::from(*len),
        })
        .chain([SrcRangeEntry { key: Lb4SrcRange { frontend, src: 0 }, prefix_len: SRC_RANGE_FRONTEND_BITS }])
        .collect()
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
pub fn backend_value(b: &BackendAddr, state: u8) -> Lb4Backend {
    Lb4Backend::new(b.ip.octets(), b.port, b.proto.number(), state)
}

/// The backend a backends-map value holds (`None` for a free slot or another protocol).
pub fn backend_addr(b: &Lb4Backend) -> Option<BackendAddr> {
    if b.state == BACKEND_STATE_FREE {
        return None;
    }
    let proto = Protocol::from_number(b.proto)?;
    Some(BackendAddr { ip: ipv4(b.addr), port: u16::from_be(b.port), proto })
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
pub fn member(svc_id: u32, backend_id: u32, b: &BackendAddr, s: BackendState) -> (Lb4MemberKey, Lb4Member) {
    let v = backend_value(b, 0);
    (
        Lb4MemberKey { svc_id, backend_id },
        Lb4Member { addr: v.addr, port: v.port, state: member_state(s), _pad: 0 },
    )
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

/// `IP:port/PROTO` from map fields (network byte order).
pub fn endpoint(addr: u32, be_port: u16, proto: u8) -> String {
    format!("{}/{}", socket(addr, be_port), proto_name(proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_map_types_round_trip() {
        let fe = FrontendAddr::new(Ipv4Addr::new(10, 96, 0, 10), 8080, Protocol::Udp);
        let key = service_key(&fe);
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(frontend_addr(&key), Some(fe));
        let be = BackendAddr { ip: Ipv4Addr::new(10, 244, 1, 2), port: 53, proto: Protocol::Tcp };
        let v = backend_value(&be, BACKEND_STATE_TERMINATING);
        assert_eq!(backend_addr(&v), Some(be));
        assert_eq!(backend_addr(&Lb4Backend::default()), None, "a free slot holds no backend");
        assert_eq!(endpoint(v.addr, v.port, v.proto), "10.244.1.2:53/TCP");
        assert_eq!(state_name(v.state), "terminating");
        assert_eq!(proto_name(132), "proto132");
    }
}
