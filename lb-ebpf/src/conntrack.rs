//! Connection tracking: the flow → backend memory that keeps every packet of a connection on one
//! backend, and the reply entries that reverse NAT uses.

use lb_common::{
    Lb4CtEntry, Lb4CtKey, BACKEND_STATE_FREE, BACKEND_STATE_TERMINATING, CT_DIR_FORWARD, CT_DIR_REPLY,
    CT_FLAG_HAIRPIN, CT_REFRESH_INTERVAL_NS, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_SYN,
    IPPROTO_TCP, IPPROTO_UDP,
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

/// The key under which the backend's replies are found: they are addressed to the client, or to
/// the hairpin address when the client is its own backend.
#[inline(always)]
pub fn reply_key(f: &Flow, backend_addr: u32, backend_port: u16, client_addr: u32) -> Lb4CtKey {
    Lb4CtKey {
        saddr: backend_addr,
        daddr: client_addr,
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
    pub hairpin: bool,
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
    // A TCP flow keeps a terminating backend (it drains); a UDP flow has nothing to drain and
    // moves at once, as kube-proxy flushes UDP conntrack entries of endpoints that leave.
    let gone = backend.state == BACKEND_STATE_FREE
        || (backend.state == BACKEND_STATE_TERMINATING && f.proto == IPPROTO_UDP)
        || backend.addr != e.nat_addr
        || backend.port != e.nat_port;
    if gone {
        return Lookup::BackendGone;
    }
    let state = next_state(f.proto, e.state, f.tcp_flags);
    if state != e.state || now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
        e.state = state;
        e.last_seen_ns = now;
    }
    Lookup::Hit(Tracked {
        addr: e.nat_addr,
        port: e.nat_port,
        svc_id: e.svc_id,
        hairpin: e.flags & CT_FLAG_HAIRPIN != 0,
    })
}

/// The backend chosen for a new flow.
pub struct Chosen {
    pub id: u32,
    pub addr: u32,
    pub port: u16,
    pub svc_id: u32,
    /// `Some(hairpin address)` when the client is its own backend.
    pub hairpin: Option<u32>,
}

/// Records a new flow: the forward entry (client → VIP, DNAT to the backend) and the reply entry
/// (backend → client, SNAT back to the VIP). Returns false if either could not be stored.
#[inline(always)]
pub fn create(fwd_key: &Lb4CtKey, f: &Flow, c: &Chosen, now: u64) -> bool {
    let state = initial_state(f);
    let fwd = Lb4CtEntry {
        created_ns: now,
        last_seen_ns: now,
        nat_addr: c.addr,
        nat_port: c.port,
        state,
        flags: if c.hairpin.is_some() { CT_FLAG_HAIRPIN } else { 0 },
        backend_id: c.id,
        svc_id: c.svc_id,
    };
    let rev = Lb4CtEntry { nat_addr: f.daddr, nat_port: f.dport, ..fwd };
    let rev_key = reply_key(f, c.addr, c.port, c.hairpin.unwrap_or(f.saddr));
    LB4_CT.insert(&rev_key, &rev, 0).is_ok() && LB4_CT.insert(fwd_key, &fwd, 0).is_ok()
}

/// A tracked reply: the service address to rewrite the source to.
pub struct Reply {
    pub vip: u32,
    pub vport: u16,
    pub hairpin: bool,
}

/// Looks up a reply packet (backend → client). FIN and RST from the backend move the flow to
/// closing.
#[inline(always)]
pub fn lookup_reply(f: &Flow, now: u64) -> Option<Reply> {
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
    let (vip, vport, hairpin) = (e.nat_addr, e.nat_port, e.flags & CT_FLAG_HAIRPIN != 0);
    if now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
        e.last_seen_ns = now;
    }
    if f.proto == IPPROTO_TCP && f.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        e.state = CT_STATE_CLOSING;
        // The forward entry is keyed by the client's address, which a hairpinned reply carries as
        // its source (the client is the backend).
        let fwd_key = Lb4CtKey {
            saddr: if hairpin { f.saddr } else { f.daddr },
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
    Some(Reply { vip, vport, hairpin })
}

/// The reply entry of backend `saddr:sport` → client `daddr:dport`, read without touching it (an
/// ICMP error is no sign of life).
#[inline(always)]
pub fn peek_reply(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> Option<Reply> {
    let key = Lb4CtKey { saddr, daddr, sport, dport, proto, dir: CT_DIR_REPLY, _pad: 0 };
    // SAFETY: the value is copied out at once.
    let e = unsafe { LB4_CT.get(&key) }?;
    Some(Reply { vip: e.nat_addr, vport: e.nat_port, hairpin: e.flags & CT_FLAG_HAIRPIN != 0 })
}
