//! Connection tracking: the flow → backend memory that keeps every packet of a connection on one
//! backend, and the reply entries that reverse NAT uses. Generic over the address family: its
//! conntrack map (`LB4_CT`, `LB6_CT`, read as [`CtKey`] and [`CtEntry`]) and members map
//! (`LB4_MEMBERS`, `LB6_MEMBERS`).

use lb_common::{
    counters, Lb4MemberKey, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_EXTERNAL, CT_FLAG_FIN_BACKEND,
    CT_FLAG_FIN_CLIENT, CT_FLAG_HAIRPIN, CT_FLAG_NODE_SNAT, CT_REFRESH_INTERVAL_NS, CT_STATE_CLOSING,
    CT_STATE_ESTABLISHED, CT_STATE_SYN, IPPROTO_TCP, MEMBER_ACTIVE, MEMBER_DRAINING, MEMBER_SERVING,
};

/// `BPF_NOEXIST`: insert only where no entry is.
const BPF_NOEXIST: u64 = 1;

use crate::{
    config::{ct_timeout_ns, snat_ports},
    family::{Address, CtEntry, CtKey, Family, Member},
    maps::LB_SCRATCH,
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

#[inline(always)]
pub fn forward_key<F: Family>(f: &Flow<F>) -> CtKey<F::Addr> {
    CtKey {
        saddr: f.saddr,
        daddr: f.daddr,
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    }
}

/// The key under which the backend's replies are found: they are addressed to the client (or to
/// the hairpin address when the client is its own backend), at the client's port (or the one the
/// flow was given when its tuple clashed).
#[inline(always)]
pub fn reply_key<F: Family>(
    f: &Flow<F>,
    backend_addr: F::Addr,
    backend_port: u16,
    client_addr: F::Addr,
    client_port: u16,
) -> CtKey<F::Addr> {
    CtKey {
        saddr: backend_addr,
        daddr: client_addr,
        sport: backend_port,
        dport: client_port,
        proto: f.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

/// A TCP packet that opens a connection: SYN without ACK.
#[inline(always)]
pub fn syn_only<F: Family>(f: &Flow<F>) -> bool {
    f.proto == IPPROTO_TCP && f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The state a new flow starts in.
#[inline(always)]
fn initial_state<F: Family>(f: &Flow<F>) -> u8 {
    if syn_only(f) {
        CT_STATE_SYN
    } else {
        CT_STATE_ESTABLISHED
    }
}

/// Moves forward entry `e` on after a packet with TCP `flags`, sent by the client (`fin_bit` is
/// `CT_FLAG_FIN_CLIENT`) or by the backend (`CT_FLAG_FIN_BACKEND`), and marks it seen. A FIN one
/// way half-closes the connection and keeps the established timeout (the other side may still
/// send for long, as after `shutdown(SHUT_WR)`); a FIN each way or an RST closes it. The time is
/// written at most every `CT_REFRESH_INTERVAL_NS` unless the state changed.
#[inline(always)]
fn advance<A>(e: &mut CtEntry<A>, proto: u8, flags: u8, fin_bit: u8, now: u64) {
    let mut state = e.state;
    let mut bits = e.flags;
    if proto != IPPROTO_TCP {
        state = CT_STATE_ESTABLISHED;
    } else if flags & TCP_RST != 0 {
        state = CT_STATE_CLOSING;
    } else {
        if flags & TCP_FIN != 0 {
            bits |= fin_bit;
        }
        if bits & FIN_BOTH == FIN_BOTH {
            state = CT_STATE_CLOSING;
        } else if state == CT_STATE_SYN && flags & (TCP_ACK | TCP_SYN) == TCP_ACK {
            state = CT_STATE_ESTABLISHED;
        }
    }
    if state != e.state || bits != e.flags || now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_INTERVAL_NS {
        e.state = state;
        e.flags = bits;
        e.last_seen_ns = now;
    }
}

const FIN_BOTH: u8 = CT_FLAG_FIN_CLIENT | CT_FLAG_FIN_BACKEND;

/// Idle for at least its timeout (a timeout of 0 never keeps an entry).
#[inline(always)]
fn expired<A>(e: &CtEntry<A>, proto: u8, now: u64) -> bool {
    now.saturating_sub(e.last_seen_ns) >= ct_timeout_ns(proto, e.state)
}

/// Backend `backend_id` as a member of frontend `svc_id`, if it is one.
#[inline(always)]
pub fn member<F: Family>(svc_id: u32, backend_id: u32) -> Option<Member<F::Addr>> {
    let key = Lb4MemberKey { svc_id, backend_id };
    // SAFETY: the value is copied out at once.
    unsafe { F::members().get(&key) }.copied()
}

/// Whether a tracked flow of frontend `svc_id` to backend `backend_id` at `addr:port` may go on:
/// the pair is still a member with that address; a SYN (a new connection on an old tuple) only to
/// an active member; UDP only to a serving one (kube-proxy's conntrack cleanup), TCP to any.
#[inline(always)]
fn flow_allowed<F: Family>(
    svc_id: u32,
    backend_id: u32,
    addr: F::Addr,
    port: u16,
    proto: u8,
    syn: bool,
) -> bool {
    let key = Lb4MemberKey { svc_id, backend_id };
    // SAFETY: the fields are read at once. (Read in place: a copied row of a generic family
    // compiles to one packed value, which costs instructions and stack.)
    let Some(m) = (unsafe { F::members().get(&key) }) else {
        return false;
    };
    if m.addr != addr || m.port != port {
        return false;
    }
    match m.state {
        MEMBER_ACTIVE => true,
        MEMBER_SERVING => !syn,
        MEMBER_DRAINING => !syn && proto == IPPROTO_TCP,
        _ => false,
    }
}

pub struct Tracked<F: Family> {
    pub addr: F::Addr,
    pub port: u16,
    pub svc_id: u32,
    pub hairpin: bool,
    /// The source port the flow was given (its tuple clashed, or it was SNATed to this node's
    /// address); 0: kept.
    pub snat_port: u16,
    /// The address the flow was SNATed to (this node's, for a flow from outside to a remote
    /// endpoint: its packets are forwarded by lb); `Address::ZERO`: none.
    pub snat_addr: F::Addr,
}

pub enum Lookup<F: Family> {
    /// No usable entry: the flow is new (or its entry expired, or a SYN starts a new connection
    /// on a tuple that was closed or made for another frontend).
    Miss,
    /// The flow is tracked and may stay on its backend.
    Hit(Tracked<F>),
    /// The flow is tracked but its backend left its frontend (or is not active, for a SYN; or
    /// not serving, for UDP): pick again.
    BackendGone,
}

/// Looks up a forward packet's flow towards frontend `svc_id`, and advances its state and
/// last-seen time. A refresh also rebuilds the flow's reply entry if it was evicted.
#[inline(always)]
pub fn lookup_forward<F: Family>(key: &CtKey<F::Addr>, f: &Flow<F>, svc_id: u32, now: u64) -> Lookup<F> {
    let Some(entry) = F::ct().get_ptr_mut(key) else {
        return Lookup::Miss;
    };
    // SAFETY: a valid map value pointer; concurrent updates of these plain fields are benign.
    let e = unsafe { &mut *entry };
    if expired(e, f.proto, now) {
        return Lookup::Miss;
    }
    let syn = syn_only(f);
    if syn && (e.state == CT_STATE_CLOSING || e.flags & FIN_BOTH != 0 || e.svc_id != svc_id) {
        // The client reuses the tuple of a finished (or half-closed) connection, or of a flow
        // made for the Service that had this address before: a new flow.
        return Lookup::Miss;
    }
    if !flow_allowed::<F>(e.svc_id, e.backend_id, e.nat_addr, e.nat_port, f.proto, syn) {
        return Lookup::BackendGone;
    }
    let (refresh, state, bits) =
        (now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_INTERVAL_NS, e.state, e.flags);
    advance(e, f.proto, f.tcp_flags, CT_FLAG_FIN_CLIENT, now);
    let hairpin = e.flags & CT_FLAG_HAIRPIN != 0;
    // Copied out before any insert: an LRU map reuses an evicted element's memory at once.
    let tracked = Tracked {
        addr: e.nat_addr,
        port: e.nat_port,
        svc_id: e.svc_id,
        hairpin,
        snat_port: e.snat_port,
        snat_addr: e.snat_addr,
    };
    if refresh || e.state != state || e.flags != bits {
        // The reply entry's time, state and FIN bits follow the flow's, so that it never outlives its
        // forward entry by more than a refresh interval (a reply entry past its own timeout is
        // never used to rebuild the flow). Under table pressure it may have been evicted: put it
        // back, so the flow keeps working both ways. A lookup first: inserting into a full LRU
        // map evicts.
        let client = client_addr(e, f);
        let rev_key = reply_key(f, e.nat_addr, e.nat_port, client, client_port(e, f));
        match F::ct().get_ptr_mut(&rev_key) {
            Some(rev) => {
                // SAFETY: a valid map value pointer.
                let rev = unsafe { &mut *rev };
                // Only this flow's (a stale one of another flow may still sit there).
                let snat = if e.snat_port != 0 { f.sport } else { 0 };
                let snat_addr = if e.flags & CT_FLAG_NODE_SNAT != 0 { f.saddr } else { F::Addr::ZERO };
                if rev.nat_addr == f.daddr
                    && rev.nat_port == f.dport
                    && rev.snat_port == snat
                    && rev.snat_addr == snat_addr
                {
                    rev.last_seen_ns = now;
                    rev.state = e.state;
                    rev.flags = e.flags;
                }
            }
            None => {
                let rev = reply_entry(e, f);
                let _ = F::ct().insert(&rev_key, &rev, 0);
            }
        }
    }
    Lookup::Hit(tracked)
}

/// The address the client of forward entry `e` (for packet `f`) is seen with by its backend: the
/// hairpin address, this node's (a flow from outside SNATed to it), or its own.
#[inline(always)]
fn client_addr<F: Family>(e: &CtEntry<F::Addr>, f: &Flow<F>) -> F::Addr {
    if e.flags & CT_FLAG_HAIRPIN != 0 {
        F::hairpin_addr()
    } else if e.flags & CT_FLAG_NODE_SNAT != 0 {
        e.snat_addr
    } else {
        f.saddr
    }
}

/// The port the client of forward entry `e` (for packet `f`) is seen with by its backend.
#[inline(always)]
fn client_port<F: Family>(e: &CtEntry<F::Addr>, f: &Flow<F>) -> u16 {
    if e.snat_port != 0 {
        e.snat_port
    } else {
        f.sport
    }
}

/// The reply entry of forward entry `e`, made by packet `f` (client → service).
#[inline(always)]
fn reply_entry<F: Family>(e: &CtEntry<F::Addr>, f: &Flow<F>) -> CtEntry<F::Addr> {
    CtEntry {
        nat_addr: f.daddr,
        nat_port: f.dport,
        snat_port: if e.snat_port != 0 { f.sport } else { 0 },
        snat_addr: if e.flags & CT_FLAG_NODE_SNAT != 0 { f.saddr } else { F::Addr::ZERO },
        ..*e
    }
}

/// The backend chosen for a new flow.
pub struct Chosen<F: Family> {
    pub id: u32,
    pub addr: F::Addr,
    pub port: u16,
    pub svc_id: u32,
    /// The client is its own backend: its packets are SNATed to the hairpin address.
    pub hairpin: bool,
    /// The flow came from outside through a node interface (`CT_FLAG_EXTERNAL`).
    pub external: bool,
    /// This node's address for a flow from outside to a remote endpoint (`F::Addr::ZERO`: none):
    /// SNATed to it, always with a port of the SNAT range (a client's own port could be one a
    /// socket of this node uses towards the same endpoint). Not an `Option`: LLVM may load the
    /// payload of a `None` it then ignores, and Linux 5.10's verifier refuses a read of stack
    /// never written.
    pub node_snat: F::Addr,
}

/// Why a new flow could not be recorded.
pub enum CreateError {
    /// Its reply tuple belongs to a live flow and no other source port was free: the flow must
    /// not go on (its replies would reach the other flow's client).
    NoPort,
    /// The forward entry could not be stored: the flow goes on untracked, from this source port
    /// (0: the client's), whose reply entry is stored.
    Insert(u16),
}

/// What a reply key holds, for a new flow of forward key `fwd_key`.
#[derive(PartialEq, Eq)]
enum Slot {
    /// Nothing: taken with an insert that fails if another CPU takes it first.
    Empty,
    /// An entry of this very flow (its forward entry was evicted, or it is created again).
    Own,
    /// An entry whose flow is gone: overwritten.
    Stale,
    /// An entry of another live flow: never overwritten.
    Taken,
}

#[inline(always)]
fn slot<F: Family>(key: &CtKey<F::Addr>, fwd_key: &CtKey<F::Addr>, now: u64) -> Slot {
    // SAFETY: read in place (a copy would cost an IPv6 program 64 bytes of its stack); a field
    // another CPU changes meanwhile is read either way, as with a copy.
    let Some(e) = (unsafe { F::ct().get(key) }) else {
        return Slot::Empty;
    };
    let owner = key.forward_of_reply(e);
    // Both are forward keys (their direction and padding are the same): the tuple decides.
    if owner.same_tuple(fwd_key) {
        // An expired one is a connection of this tuple that ended: no port to keep.
        return if expired(e, key.proto, now) { Slot::Stale } else { Slot::Own };
    }
    // SAFETY: as above.
    let live = match unsafe { F::ct().get(&owner) } {
        Some(fwd) => serves_reply(fwd, key, e.snat_port, now),
        // Evicted: the datapath rebuilds it from a reply while the reply entry is in time.
        None => !expired(&e, key.proto, now),
    };
    if live {
        Slot::Taken
    } else {
        Slot::Stale
    }
}

/// Stores reply entry `rev` under `key` unless the key belongs to another live flow; an empty
/// key only if no other CPU took it meanwhile.
#[inline(always)]
fn claim<F: Family>(
    key: &CtKey<F::Addr>,
    fwd_key: &CtKey<F::Addr>,
    rev: &CtEntry<F::Addr>,
    now: u64,
) -> bool {
    claim_slot::<F>(slot::<F>(key, fwd_key, now), key, fwd_key, rev, now)
}

/// [`claim`] where what `key` holds (`s`) is already known.
#[inline(always)]
fn claim_slot<F: Family>(
    s: Slot,
    key: &CtKey<F::Addr>,
    fwd_key: &CtKey<F::Addr>,
    rev: &CtEntry<F::Addr>,
    now: u64,
) -> bool {
    match s {
        // Lost to another CPU: fine if that CPU made this very flow.
        Slot::Empty => {
            F::ct().insert(key, rev, BPF_NOEXIST).is_ok() || slot::<F>(key, fwd_key, now) == Slot::Own
        }
        Slot::Own | Slot::Stale => F::ct().insert(key, rev, 0).is_ok(),
        Slot::Taken => false,
    }
}

/// Source ports tried for a flow whose reply tuple clashed, before it is dropped.
const SNAT_TRIES: u32 = 8;

/// The `i`-th source port tried for the flow whose hash is `h` ([`snat_hash`]): a sequence through the SNAT
/// range that depends only on the flow's tuple, so that every CPU, and the flow again after its
/// forward entry was evicted, tries the same ports in the same order.
#[inline(always)]
fn snat_candidate(h: u32, i: u32, (min, span): (u32, u32)) -> u16 {
    ((min + (h % span + i) % span) as u16).to_be()
}

/// The SNAT range as its first port and its number of ports (at least 1), if it is one.
#[inline(always)]
fn snat_range() -> Option<(u32, u32)> {
    let (min, max) = snat_ports();
    if max < min || max > 65_535 {
        return None;
    }
    // At least 1 (checked: a division by zero would be a panic, which BPF cannot have).
    let span = max - min + 1;
    (span != 0).then_some((min, span))
}

/// The hash that orders a flow's SNAT candidates (seeded apart from the Maglev hash).
#[inline(always)]
fn snat_hash<F: Family>(fwd_key: &CtKey<F::Addr>) -> u32 {
    F::flow_hash(fwd_key.saddr, fwd_key.daddr, fwd_key.sport, fwd_key.dport, fwd_key.proto, 0x5a17)
}

/// The source-port allocator for flows whose reply tuple clashed and for flows SNATed to this
/// node's address: the first port of the flow's sequence ([`snat_candidate`]) under which no other
/// live flow's reply entry lies, claimed with reply entry `rev` (its `snat_port` set). Ports come
/// from the range the agent set, outside the node's `ip_local_port_range`. With `own_only`, only
/// a port this flow already holds is taken (a flow picked up again mid-stream keeps its port).
#[inline(always)]
fn alloc_port<F: Family>(
    rev_key: &CtKey<F::Addr>,
    fwd_key: &CtKey<F::Addr>,
    h: u32,
    rev: &CtEntry<F::Addr>,
    now: u64,
    own_only: bool,
) -> Option<u16> {
    let range = snat_range()?;
    // The key tried is built in this CPU's scratch buffer (see `create`).
    // SAFETY: as in `create`; the key slot is as large and as aligned as a key of either family.
    let key = unsafe {
        let s = &mut *LB_SCRATCH.get_ptr_mut(0)?;
        &mut *(&mut s.key as *mut [u64; 5]).cast::<CtKey<F::Addr>>()
    };
    *key = *rev_key;
    for i in 0..SNAT_TRIES {
        key.dport = snat_candidate(h, i, range);
        if own_only {
            if slot::<F>(&*key, fwd_key, now) == Slot::Own && F::ct().insert(&*key, rev, 0).is_ok() {
                return Some(key.dport);
            }
        } else if claim::<F>(&*key, fwd_key, rev, now) {
            if rev.flags & CT_FLAG_NODE_SNAT == 0 {
                count(counters::SNAT_PORT);
            }
            return Some(key.dport);
        }
    }
    None
}

/// Records a new flow: the forward entry (client → VIP, DNAT to the backend) and the reply entry
/// (backend → client, SNAT back to the VIP). A reply key that belongs to another live flow is
/// never overwritten: the new flow is given another source port (counted as `SNAT_PORT`). A TCP
/// flow picked up mid-stream (its forward entry was evicted) first looks for the port it had; a
/// UDP flow does not (every new UDP flow would pay for the search), and may come back on another
/// port, which UDP tolerates. Returns the source port given (0: the client's is kept).
#[inline(always)]
pub fn create<F: Family>(
    fwd_key: &CtKey<F::Addr>,
    f: &Flow<F>,
    c: &Chosen<F>,
    now: u64,
) -> Result<u16, CreateError> {
    let node_snat = c.node_snat != F::Addr::ZERO;
    let mut flags = if c.hairpin { CT_FLAG_HAIRPIN } else { 0 };
    if c.external {
        flags |= CT_FLAG_EXTERNAL;
    }
    if node_snat {
        flags |= CT_FLAG_NODE_SNAT;
    }
    // The three entries are built in this CPU's scratch buffer: on the stack they would take the
    // IPv6 programs past BPF's 512 bytes.
    // SAFETY: this CPU's buffer, used by this program only while it runs; each slot is as large
    // and as aligned as an entry of either family (`maps::Scratch`).
    let (fwd, plain, snat_rev) = unsafe {
        let s = &mut *LB_SCRATCH.get_ptr_mut(0).ok_or(CreateError::Insert(0))?;
        let [a, b, c] = &mut s.ct;
        (
            &mut *(a as *mut [u64; 8]).cast::<CtEntry<F::Addr>>(),
            &mut *(b as *mut [u64; 8]).cast::<CtEntry<F::Addr>>(),
            &mut *(c as *mut [u64; 8]).cast::<CtEntry<F::Addr>>(),
        )
    };
    *fwd = CtEntry {
        last_seen_ns: now,
        created_s: (now / 1_000_000_000) as u32,
        snat_port: 0,
        _pad: 0,
        nat_addr: c.addr,
        nat_port: c.port,
        state: initial_state(f),
        flags,
        backend_id: c.id,
        svc_id: c.svc_id,
        snat_addr: c.node_snat,
        _pad1: 0,
    };
    let client = if c.hairpin {
        F::hairpin_addr()
    } else if node_snat {
        c.node_snat
    } else {
        f.saddr
    };
    let rev_key = reply_key(f, c.addr, c.port, client, f.sport);
    *plain = reply_entry(fwd, f);
    // Reply entries of an SNATed flow keep the client's own port.
    *snat_rev = reply_entry(fwd, f);
    snat_rev.snat_port = f.sport;
    let (plain, snat_rev) = (&*plain, &*snat_rev);
    let pickup = f.proto == IPPROTO_TCP && !syn_only(f);
    // Each allocation below is written once (every copy of `alloc_port` is a loop the verifier
    // walks again): the node-SNAT flow goes straight to them, the usual one first tries its
    // client's own port.
    let port = 'port: {
        // What the client's own reply key holds, once it was found taken (the usual flow).
        let mut natural = None;
        if !node_snat {
            // The usual new flow: its reply key is free, taken by one insert (no lookup first).
            if !pickup && F::ct().insert(&rev_key, plain, BPF_NOEXIST).is_ok() {
                break 'port 0;
            }
            let n = slot::<F>(&rev_key, fwd_key, now);
            // This flow's own (made again, or picked up without another port), or a dead flow's
            // that a new connection may take over at once.
            if n == Slot::Own || (n == Slot::Stale && !pickup) {
                let _ = F::ct().insert(&rev_key, plain, 0);
                break 'port 0;
            }
            natural = Some(n);
        }
        // A node-SNAT flow always gets a port of the SNAT range (a client's own port could be one
        // a socket of this node uses towards the same endpoint); a flow picked up mid-stream first
        // looks for its own.
        let h = snat_hash::<F>(fwd_key);
        if pickup {
            if let Some(p) = alloc_port::<F>(&rev_key, fwd_key, h, snat_rev, now, true) {
                break 'port p;
            }
        }
        if let Some(n) = natural {
            if claim_slot::<F>(n, &rev_key, fwd_key, plain, now) {
                break 'port 0;
            }
        }
        alloc_port::<F>(&rev_key, fwd_key, h, snat_rev, now, false).ok_or(CreateError::NoPort)?
    };
    fwd.snat_port = port;
    if F::ct().insert(fwd_key, fwd, 0).is_ok() {
        Ok(port)
    } else {
        Err(CreateError::Insert(port))
    }
}

/// A tracked reply: the service address to rewrite the source to.
pub struct Reply<F: Family> {
    pub vip: F::Addr,
    pub vport: u16,
    pub hairpin: bool,
    /// The client's own port, when the flow was given another source port; 0: none.
    pub client_port: u16,
    /// The client's own address, when the flow was SNATed to this node's; `Address::ZERO`: none.
    pub client_addr: F::Addr,
}

impl<F: Family> Reply<F> {
    #[inline(always)]
    fn of(e: &CtEntry<F::Addr>) -> Self {
        Self {
            vip: e.nat_addr,
            vport: e.nat_port,
            hairpin: e.flags & CT_FLAG_HAIRPIN != 0,
            client_port: e.snat_port,
            client_addr: e.snat_addr,
        }
    }
}

/// Which flows' replies a program translates, by their `CT_FLAG_EXTERNAL | CT_FLAG_NODE_SNAT`
/// bits: a reply entry of another kind is left alone, untouched, to the program whose it is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// Flows of this node's pods (the pod-side reply program).
    Pods = 0,
    /// Flows from outside to a local endpoint, whose replies leave through a node interface.
    External = CT_FLAG_EXTERNAL as isize,
    /// Flows from outside SNATed to this node's address, whose replies come to it.
    NodeSnat = (CT_FLAG_EXTERNAL | CT_FLAG_NODE_SNAT) as isize,
}

impl Replies {
    #[inline(always)]
    fn take<A>(self, e: &CtEntry<A>) -> bool {
        e.flags & (CT_FLAG_EXTERNAL | CT_FLAG_NODE_SNAT) == self as u8
    }
}

pub enum ReplyLookup<F: Family> {
    /// No reply entry: not a load-balanced flow.
    None,
    /// A reply entry whose flow is gone (removed now).
    Stale,
    Found(Reply<F>),
}

/// Whether forward entry `fwd` is alive and names backend `key.saddr:key.sport` of reply `key`,
/// and the client port the reply goes to (`rev_snat` is the reply entry's `snat_port`).
#[inline(always)]
fn serves_reply<A: Address>(fwd: &CtEntry<A>, key: &CtKey<A>, rev_snat: u16, now: u64) -> bool {
    let port = if rev_snat != 0 { key.dport } else { 0 };
    let addr = if fwd.flags & CT_FLAG_NODE_SNAT != 0 { key.daddr } else { A::ZERO };
    !expired(fwd, key.proto, now)
        && fwd.nat_addr == key.saddr
        && fwd.nat_port == key.sport
        && fwd.snat_port == port
        && fwd.snat_addr == addr
}

/// Looks up a reply packet (backend → client). The reply entry is honoured only while its flow's
/// forward entry is alive and names this backend; replies keep the flow alive (they refresh the
/// forward entry, as netfilter's timeouts count both directions) and move its TCP state. A
/// forward entry evicted from a full table is rebuilt from the reply entry while that is within
/// its timeout and the backend is still a member that may keep the flow, so a server that
/// streams to a silent client is not cut off.
#[inline(always)]
pub fn lookup_reply<F: Family>(f: &Flow<F>, replies: Replies, now: u64) -> ReplyLookup<F> {
    let key = CtKey {
        saddr: f.saddr,
        daddr: f.daddr,
        sport: f.sport,
        dport: f.dport,
        proto: f.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let Some(entry) = F::ct().get_ptr_mut(&key) else {
        return ReplyLookup::None;
    };
    // SAFETY: as in lookup_forward.
    let e = unsafe { &mut *entry };
    if !replies.take(e) {
        return ReplyLookup::None;
    }
    let r = Reply::of(e);
    let rev_snat = e.snat_port;
    let fwd_key = key.forward_of_reply(e);
    let mut rebuilt = false;
    let fwd = match F::ct().get_ptr_mut(&fwd_key) {
        Some(fwd) => fwd,
        None => {
            if expired(e, f.proto, now)
                || !flow_allowed::<F>(e.svc_id, e.backend_id, key.saddr, key.sport, f.proto, false)
            {
                let _ = F::ct().remove(&key);
                return ReplyLookup::Stale;
            }
            let snat_port = if e.snat_port != 0 { key.dport } else { 0 };
            let snat_addr = if e.flags & CT_FLAG_NODE_SNAT != 0 { key.daddr } else { F::Addr::ZERO };
            let entry = CtEntry { nat_addr: key.saddr, nat_port: key.sport, snat_port, snat_addr, ..*e };
            // Only where no entry is: a new flow may have taken the tuple meanwhile.
            let _ = F::ct().insert(&fwd_key, &entry, BPF_NOEXIST);
            // The insert may have evicted the reply entry and reused its memory: `e` is not
            // written again in this call (the next reply refreshes it).
            rebuilt = true;
            match F::ct().get_ptr_mut(&fwd_key) {
                Some(fwd) => fwd,
                None => return ReplyLookup::Found(r),
            }
        }
    };
    // SAFETY: as above.
    let fwd = unsafe { &mut *fwd };
    // A SYN-ACK answers a new connection: on the tuple of a connection that is closing, it is a
    // direct one to the pod from the same client port, not the Service's.
    let reopened = f.tcp_flags & TCP_SYN != 0 && (fwd.state == CT_STATE_CLOSING || fwd.flags & FIN_BOTH != 0);
    if reopened || !serves_reply(fwd, &key, rev_snat, now) {
        let _ = F::ct().remove(&key);
        return ReplyLookup::Stale;
    }
    advance(fwd, f.proto, f.tcp_flags, CT_FLAG_FIN_BACKEND, now);
    // The reply entry's own time, state and FIN bits tell the sweep (and a rebuild) how the flow
    // was when last used.
    if !rebuilt
        && (fwd.state != e.state
            || fwd.flags != e.flags
            || now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_INTERVAL_NS)
    {
        e.state = fwd.state;
        e.flags = fwd.flags;
        e.last_seen_ns = now;
    }
    ReplyLookup::Found(r)
}

/// The reply entry of backend `saddr:sport` → client `daddr:dport`, if its flow is alive, read
/// without touching either entry (an ICMP error is no sign of life).
#[inline(always)]
pub fn peek_reply<F: Family>(
    saddr: F::Addr,
    daddr: F::Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    replies: Replies,
    now: u64,
) -> Option<Reply<F>> {
    let key = CtKey { saddr, daddr, sport, dport, proto, dir: CT_DIR_REPLY, _pad: 0 };
    // SAFETY: the values are copied out at once.
    let e = unsafe { F::ct().get(&key) }?;
    if !replies.take(e) {
        return None;
    }
    let r = Reply::of(e);
    // SAFETY: as above.
    let fwd = unsafe { F::ct().get(&key.forward_of_reply(e)) }?;
    serves_reply(fwd, &key, e.snat_port, now).then_some(r)
}

/// Backend `backend_id` of frontend `svc_id`, if a new flow may take it from an affinity entry:
/// it must still be an active member.
#[inline(always)]
pub fn affinity_allowed<F: Family>(svc_id: u32, backend_id: u32) -> Option<Member<F::Addr>> {
    let key = Lb4MemberKey { svc_id, backend_id };
    // SAFETY: the value is copied out at once, once checked (see `flow_allowed`).
    unsafe { F::members().get(&key) }.filter(|m| m.state == MEMBER_ACTIVE).copied()
}

/// The live forward entry of a flow from outside (client `saddr:sport` → VIP `daddr:dport`),
/// copied, without touching it (an ICMP error quoting a reply of the flow looks it up).
#[inline(always)]
pub fn peek_external_forward<F: Family>(
    saddr: F::Addr,
    daddr: F::Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    now: u64,
) -> Option<CtEntry<F::Addr>> {
    let key = CtKey { saddr, daddr, sport, dport, proto, dir: CT_DIR_FORWARD, _pad: 0 };
    // SAFETY: the value is copied out at once.
    let e = unsafe { F::ct().get(&key) }.copied()?;
    (e.flags & CT_FLAG_EXTERNAL != 0 && !expired(&e, proto, now)).then_some(e)
}
