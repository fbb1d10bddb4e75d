//! IPv6 packet rewriting ([`V6`]'s header functions): the destination of forward packets, the
//! source of replies, ICMPv6 errors about translated flows, and port unreachable answers.
//!
//! IPv6 has no header checksum: an address change touches only the L4 checksum, through its
//! pseudo-header. TC: one `bpf_csum_diff` over the 16-byte addresses, one `bpf_l4_csum_replace`
//! of that difference with `BPF_F_PSEUDO_HDR` (the kernel knows whether the checksum is partial,
//! complete or absent; a received packet's sum is put back as it was, `bpf_csum_update`), and one
//! for the port when it changes. XDP: incremental updates (RFC 1624).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    csum,
    reject::{port_unreachable6, REJECT6_IN, REJECT6_OUT},
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    ctx::PacketCtx,
    family::V6,
    maps::LB_SCRATCH,
    nat::{replace_port_tc, IcmpNat, Side},
    parse::{ptr_at, Flow, IcmpError, IcmpHdr, TcpHdr, UdpHdr, ETH_HLEN, TCP_CHECK_OFF, UDP_CHECK_OFF},
    parse6::Ipv6Hdr,
};

/// Pointers to the fields a rewrite touches, all derived at constant offsets from the IPv6 and L4
/// header pointers checked here (see `nat::Fields`).
struct Fields {
    addr: *mut [u32; 4],
    port: *mut u16,
    l4_check: *mut u16,
}

#[inline(always)]
fn fields(data: usize, end: usize, f: &Flow<V6>, side: Side) -> Option<Fields> {
    let ip = ptr_at::<Ipv6Hdr>(data, end, ETH_HLEN)?;
    let l4: *mut u8 = if f.proto == IPPROTO_TCP {
        ptr_at::<TcpHdr>(data, end, f.l4_off)?.cast()
    } else {
        ptr_at::<UdpHdr>(data, end, f.l4_off)?.cast()
    };
    let check_off = if f.proto == IPPROTO_TCP { TCP_CHECK_OFF } else { UDP_CHECK_OFF };
    // SAFETY: offsets inside the headers checked above.
    unsafe {
        let (addr, port) = match side {
            Side::Source => (core::ptr::addr_of_mut!((*ip).saddr), l4.cast::<u16>()),
            Side::Destination => (core::ptr::addr_of_mut!((*ip).daddr), l4.add(2).cast::<u16>()),
        };
        Some(Fields { addr, port, l4_check: l4.add(check_off).cast() })
    }
}

/// TC: the address and port are written directly; the L4 checksum follows the pseudo-header's
/// change (`bpf_csum_diff` of the addresses, then `bpf_l4_csum_replace` by that difference) and
/// the port's.
#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, f: &Flow<V6>, side: Side, addr: [u32; 4], port: u16) -> Result<(), ()> {
    let x = fields(ctx.data(), ctx.data_end(), f, side).ok_or(())?;
    let mut new = addr;
    // SAFETY: pointers from `fields`; helpers that may move packet data are called only after the
    // last direct access.
    let (mut old, old_port, no_csum) = unsafe {
        let old = (*x.addr, *x.port, f.proto == IPPROTO_UDP && *x.l4_check == 0);
        *x.addr = addr;
        *x.port = port;
        old
    };
    // SAFETY: two 16-byte stack buffers, of the sizes given.
    let diff = unsafe { bpf_csum_diff(old.as_mut_ptr(), 16, new.as_mut_ptr(), 16, 0) };
    if diff < 0 {
        return Err(());
    }
    let l4_check = f.l4_check_off();
    let mangled0 = if f.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    // Size 0: `to` is a checksum difference.
    ctx.l4_csum_replace(l4_check, 0, diff as u64, mangled0 | u64::from(BPF_F_PSEUDO_HDR)).map_err(|_| ())?;
    // A received packet's sum (CHECKSUM_COMPLETE) covers the addresses written above, which the
    // checksum's change offsets: it stays as it was. The helper takes the pseudo-header change
    // out of it all the same (right for IPv4, whose header checksum offsets the addresses; for
    // IPv6 only with `BPF_F_IPV6`, Linux 6.16 and later): put back, on every kernel. Any other
    // packet: nothing to do (the helper says so, ignored).
    ctx.sum_changed(diff as u32);
    // UDP without a checksum here is a reply (to a Service address it is dropped).
    replace_port_tc(ctx, l4_check, old_port, port, mangled0, no_csum).map_err(|_| ())
}

/// XDP: everything written directly, the L4 checksum updated incrementally.
#[inline(always)]
pub fn rewrite_xdp(ctx: &XdpContext, f: &Flow<V6>, side: Side, addr: [u32; 4], port: u16) -> Result<(), ()> {
    let x = fields(ctx.data(), ctx.data_end(), f, side).ok_or(())?;
    // SAFETY: pointers from `fields`, inside the packet.
    unsafe {
        let (old_addr, old_port) = (*x.addr, *x.port);
        let old_l4 = *x.l4_check;
        let mut l4 = csum::replace16(old_l4, old_addr, addr);
        l4 = csum::replace2(l4, old_port, port);
        if f.proto == IPPROTO_UDP {
            l4 = csum::udp_fixup(old_l4, l4);
        }
        *x.l4_check = l4;
        *x.addr = addr;
        *x.port = port;
    }
    Ok(())
}

/// A non-first fragment: writes `addr` into one side of its IPv6 header (no checksum covers it;
/// its datagram's L4 checksum is in the first fragment). Returns the change of the packet's sum.
#[inline(always)]
pub fn rewrite_addr(data: usize, end: usize, side: Side, addr: [u32; 4]) -> Result<u16, ()> {
    let ip = ptr_at::<Ipv6Hdr>(data, end, ETH_HLEN).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    let old = unsafe {
        match side {
            Side::Source => core::mem::replace(&mut (*ip).saddr, addr),
            Side::Destination => core::mem::replace(&mut (*ip).daddr, addr),
        }
    };
    Ok(csum::diff16(old, addr))
}

/// XDP: whether the L4 checksum of `f` may be partial (see `nat::csum_maybe_partial`).
#[inline(always)]
pub fn csum_maybe_partial(data: usize, end: usize, f: &Flow<V6>) -> bool {
    let Some(ip) = ptr_at::<Ipv6Hdr>(data, end, ETH_HLEN) else { return true };
    let check = if f.proto == IPPROTO_TCP {
        match ptr_at::<TcpHdr>(data, end, f.l4_off) {
            // SAFETY: bounds checked by ptr_at.
            Some(t) => unsafe { (*t).check },
            None => return true,
        }
    } else {
        match ptr_at::<UdpHdr>(data, end, f.l4_off) {
            // SAFETY: bounds checked by ptr_at.
            Some(u) => unsafe { (*u).check },
            None => return true,
        }
    };
    // SAFETY: bounds checked by ptr_at.
    let payload = u32::from(u16::from_be(unsafe { (*ip).payload_len }));
    // The payload after the extension headers.
    let l4_len = payload.wrapping_sub((f.l4_off - ETH_HLEN - 40) as u32);
    csum::maybe_partial(check, csum::pseudo_sum6(f.saddr, f.daddr, f.proto, l4_len))
}

/// Rewrites ICMPv6 error `e` as `n` says: the quoted packet's addresses and ports, its L4
/// checksum when it is in the quote, the outer addresses, and the ICMPv6 checksum, which covers
/// the outer addresses (its pseudo-header) and the quote. Plain incremental updates: every change
/// in the packet's bytes is balanced by the checksum's, so the packet's sum, which a complete
/// socket-buffer checksum holds, stays (the same for any [`PacketCtx`]).
#[inline(always)]
pub fn rewrite_icmp_error<C: PacketCtx>(ctx: &C, e: &IcmpError<V6>, n: &IcmpNat<V6>) -> Result<(), ()> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = ptr_at::<Ipv6Hdr>(data, end, ETH_HLEN).ok_or(())?;
    let icmp = ptr_at::<IcmpHdr>(data, end, e.icmp_off).ok_or(())?;
    let inner = ptr_at::<Ipv6Hdr>(data, end, e.inner_off).ok_or(())?;
    let ports = ptr_at::<UdpHdr>(data, end, e.inner_l4_off).ok_or(())?;
    let tcp = if e.proto == IPPROTO_TCP { ptr_at::<TcpHdr>(data, end, e.inner_l4_off) } else { None };
    // SAFETY: every pointer was bounds-checked above; no helper runs in between.
    unsafe {
        let l4_check: Option<*mut u16> = match tcp {
            Some(t) => Some(core::ptr::addr_of_mut!((*t).check)),
            None if e.proto == IPPROTO_UDP && (*ports).check != 0 => {
                Some(core::ptr::addr_of_mut!((*ports).check))
            }
            None => None,
        };
        let old_l4 = l4_check.map_or(0, |p| *p);
        let (mut l4, mut check) = (old_l4, (*icmp).check);
        if let Some((a, p)) = n.quote_src {
            let (old_a, old_p) = ((*inner).saddr, (*ports).source);
            (*inner).saddr = a;
            (*ports).source = p;
            check = csum::replace2(csum::replace16(check, old_a, a), old_p, p);
            l4 = csum::replace2(csum::replace16(l4, old_a, a), old_p, p);
        }
        if let Some((a, p)) = n.quote_dst {
            let (old_a, old_p) = ((*inner).daddr, (*ports).dest);
            (*inner).daddr = a;
            (*ports).dest = p;
            check = csum::replace2(csum::replace16(check, old_a, a), old_p, p);
            l4 = csum::replace2(csum::replace16(l4, old_a, a), old_p, p);
        }
        if let Some(p) = l4_check {
            if e.proto == IPPROTO_UDP {
                l4 = csum::udp_fixup(old_l4, l4);
            }
            *p = l4;
            check = csum::replace2(check, old_l4, l4);
        }
        if let Some(a) = n.outer_src {
            check = csum::replace16(check, (*ip).saddr, a);
            (*ip).saddr = a;
        }
        if let Some(a) = n.outer_dst {
            check = csum::replace16(check, (*ip).daddr, a);
            (*ip).daddr = a;
        }
        (*icmp).check = check;
    }
    Ok(())
}

/// TC: turns the packet into the ICMPv6 port unreachable that answers it and bounces it to its
/// sender (see `nat::reject_tc`). `Err` when it gets no answer.
#[inline(always)]
pub fn reject_tc(ctx: &TcContext) -> Result<i32, ()> {
    // The frame and its answer (186 bytes) are built in this CPU's scratch buffer: on the stack
    // they would take the IPv6 forward program past BPF's 512 bytes.
    // SAFETY: this CPU's buffer, used by this program only while it runs.
    let s = unsafe { &mut *LB_SCRATCH.get_ptr_mut(0).ok_or(())? };
    let frame = &mut s.reject_in;
    // SAFETY: a valid socket buffer and a buffer of exactly the length asked for.
    let loaded = unsafe {
        bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, frame.as_mut_ptr().cast(), REJECT6_IN as u32)
    };
    if loaded != 0 {
        return Err(());
    }
    let out = &mut s.reject_out;
    if !port_unreachable6(&s.reject_in, out) {
        return Err(());
    }
    // SAFETY: a valid socket buffer; the helper sets the packet's length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, REJECT6_OUT as u32, 0) } != 0 {
        return Err(());
    }
    crate::nat::store_answer(ctx, &s.reject_out)?;
    // SAFETY: the context's ifindex is the interface the packet came in on.
    Ok(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 })
}
