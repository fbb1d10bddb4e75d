//! Connection tracking: the flow → backend memory that keeps every packet of a connection on one
//! backend, and the reply entries that reverse NAT uses.

use lb_common::{
    Lb4CtEntry, Lb4CtKey, BACKEND_STATE_FREE, CT_DIR_FORWARD, CT_DIR_REPLY, CT_REFRESH_INTERVAL_NS,
    CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_SYN, IPPROTO_TCP,
};

use crate::{
    config::ct_timeout_ns,
    maps::{LB4_BACKENDS, LB4_CT},
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn forward_key(f: &Flow) -> Lb4CtKey {
    Lb4CtKey {
        saddr: f.saddr,
        daddr: f.daddr,
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    }
}

/// The key under which the backend's replies are found.
#[inline(always)]
pub fn reply_key(f: &Flow, backend_addr: u32, backend_port: u16) -> Lb4CtKey {
    Lb4CtKey {
        saddr: backend_addr,
        daddr: f.saddr,
        sport: backend_port,
        dport: f.sport,
        proto: f.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

/// The state a new flow starts in.
#[inline(always)]
fn initial_state(f: &Flow) -> u8 {
    if f.proto == IPPROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        CT_STATE_SYN
    } else {
        CT_STATE_ESTABLISHED
    }
}

/// The state after a packet with `flags` (TCP) in either direction.
#[inline(always)]
fn next_state(proto: u8, state: u8, flags: u8) -> u8 {
    if proto != IPPROTO_TCP {
        return CT_STATE_ESTABLISHED;
    }
    if flags & (TCP_FIN | TCP_RST) != 0 {
        CT_STATE_CLOSING
    } else if state == CT_STATE_SYN && flags & (TCP_ACK | TCP_SYN) == TCP_ACK {
        CT_STATE_ESTABLISHED
    } else {
        state
    }
}

pub struct Tracked {
    pub addr: u32,
    pub port: u16,
    pub svc_id: u32,
}

pub enum Lookup {
    /// No usable entry: the flow is new (or its entry expired, or a SYN reuses a closed tuple).
    Miss,
    /// The flow is tracked and its backend is still there.
    Hit(Tracked),
    /// The flow is tracked but its backend was removed or replaced: pick again.
    BackendGone,
}

/// Looks up a forward packet's flow, and advances its state and last-seen time.
#[inline(always)]
pub fn lookup_forward(key: &Lb4CtKey, f: &Flow, now: u64) -> Lookup {
    let Some(entry) = LB4_CT.get_ptr_mut(key) else {
        return Lookup::Miss;
    };
    // SAFETY: a valid map value pointer; concurrent updates of these plain fields are benign.
    let e = unsafe { &mut *entry };
    // Idle for at least its timeout: expired (a timeout of 0 never reuses an entry).
    if now.saturating_sub(e.last_seen_ns) >= ct_timeout_ns(f.proto, e.state) {
        return Lookup::Miss;
    }
    let syn_only = f.proto == IPPROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn_only && e.state == CT_STATE_CLOSING {
        // The client reuses the tuple of a finished connection: a new flow.
        return Lookup::Miss;
    }
    let Some(backend) = LB4_BACKENDS.get(e.backend_id) else {
        return Lookup::BackendGone;
    };
    if backend.state == BACKEND_STATE_FREE || backend.addr != e.nat_addr || backend.port != e.nat_port {
        return Lookup::BackendGone;
    }
    let state = next_state(f.proto, e.state, f.tcp_flags);
    if state != e.state || now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
        e.state = state;
        e.last_seen_ns = now;
    }
    Lookup::Hit(Tracked { addr: e.nat_addr, port: e.nat_port, svc_id: e.svc_id })
}

/// Records a new flow: the forward entry (client → VIP, DNAT to the backend) and the reply entry
/// (backend → client, SNAT back to the VIP). Returns false if either could not be stored.
#[inline(always)]
pub fn create(
    fwd_key: &Lb4CtKey,
    f: &Flow,
    backend_id: u32,
    backend_addr: u32,
    backend_port: u16,
    svc_id: u32,
    now: u64,
) -> bool {
    let state = initial_state(f);
    let fwd = Lb4CtEntry {
        created_ns: now,
        last_seen_ns: now,
        nat_addr: backend_addr,
        nat_port: backend_port,
        state,
        _pad: 0,
        backend_id,
        svc_id,
    };
    let rev = Lb4CtEntry { nat_addr: f.daddr, nat_port: f.dport, ..fwd };
    let rev_key = reply_key(f, backend_addr, backend_port);
    LB4_CT.insert(&rev_key, &rev, 0).is_ok() && LB4_CT.insert(fwd_key, &fwd, 0).is_ok()
}

/// Looks up a reply packet (backend → client). Returns the service address to rewrite the source
/// to. FIN and RST from the backend move the flow to closing.
#[inline(always)]
pub fn lookup_reply(f: &Flow, now: u64) -> Option<(u32, u16)> {
    let key = Lb4CtKey {
        saddr: f.saddr,
        daddr: f.daddr,
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let entry = LB4_CT.get_ptr_mut(&key)?;
    // SAFETY: as in lookup_forward.
    let e = unsafe { &mut *entry };
    let (vip, vport) = (e.nat_addr, e.nat_port);
    if now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
        e.last_seen_ns = now;
    }
    if f.proto == IPPROTO_TCP && f.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        e.state = CT_STATE_CLOSING;
        let fwd_key = Lb4CtKey {
            saddr: f.daddr,
            daddr: vip,
            sport: f.dport,
            dport: vport,
            proto: f.proto,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        if let Some(fwd) = LB4_CT.get_ptr_mut(&fwd_key) {
            // SAFETY: as above.
            unsafe {
                (*fwd).state = CT_STATE_CLOSING;
                (*fwd).last_seen_ns = now;
            }
        }
    }
    Some((vip, vport))
}
