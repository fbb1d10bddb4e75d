//! Packet rewriting: the destination of forward packets (DNAT to the backend) or the source of
//! replies (back to the service address), with IPv4 and L4 checksums kept right. The functions
//! here are IPv4's (`V4`'s header rewriting in `crate::family`); [`Side`] and [`IcmpNat`] are
//! every family's.
//!
//! TC uses the kernel's checksum helpers, which also handle socket buffers whose checksum is still
//! partial (veth, local traffic) or complete. XDP has no such helpers and no such state: frames
//! carry full checksums, updated here incrementally (RFC 1624).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    csum,
    reject::{port_unreachable, REJECT_IN, REJECT_OUT},
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    ctx::PacketCtx,
    family::{Family, V4},
    parse::{
        ptr_at, EthHdr, Flow, IcmpError, IcmpHdr, Ipv4Hdr, TcpHdr, UdpHdr, ETH_HLEN, TCP_CHECK_OFF,
        UDP_CHECK_OFF,
    },
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Pointers to the fields a rewrite touches. All of them are derived, at constant offsets, from
/// the IPv4 and L4 header pointers checked once here: the verifier does not carry a bounds check
/// over to a pointer the compiler recomputed.
struct Fields {
    ip: *mut Ipv4Hdr,
    addr: *mut u32,
    port: *mut u16,
    l4_check: *mut u16,
}

#[inline(always)]
fn fields(data: usize, end: usize, f: &Flow<V4>, side: Side) -> Option<Fields> {
    let ip = ptr_at::<Ipv4Hdr>(data, end, ETH_HLEN)?;
    let l4: *mut u8 = if f.proto == IPPROTO_TCP {
        ptr_at::<TcpHdr>(data, end, f.l4_off)?.cast()
    } else {
        ptr_at::<UdpHdr>(data, end, f.l4_off)?.cast()
    };
    let check_off = if f.proto == IPPROTO_TCP { TCP_CHECK_OFF } else { UDP_CHECK_OFF };
    // SAFETY: offsets inside the headers checked above (ports at 0 and 2, the checksum at 6 or
    // 16, addresses at 12 and 16 of the IPv4 header).
    unsafe {
        let (addr, port) = match side {
            Side::Source => (core::ptr::addr_of_mut!((*ip).saddr), l4.cast::<u16>()),
            Side::Destination => (core::ptr::addr_of_mut!((*ip).daddr), l4.add(2).cast::<u16>()),
        };
        Some(Fields { ip, addr, port, l4_check: l4.add(check_off).cast() })
    }
}

/// TC: addresses, ports and the IPv4 header checksum are written directly; the L4 checksum goes
/// through `bpf_l4_csum_replace`, which knows whether the socket buffer's checksum is partial
/// (only pseudo-header changes apply), complete (`skb->csum` follows) or absent. Two helper calls
/// instead of five, one when the port stays.
#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, f: &Flow<V4>, side: Side, addr: u32, port: u16) -> Result<(), i64> {
    let x = fields(ctx.data(), ctx.data_end(), f, side).ok_or(-1i64)?;
    // SAFETY: pointers from `fields`; helpers that may move packet data are called only after the
    // last direct access.
    let (old_addr, old_port, no_csum) = unsafe {
        let old = (*x.addr, *x.port, f.proto == IPPROTO_UDP && *x.l4_check == 0);
        (*x.ip).check = csum::replace4((*x.ip).check, old.0, addr);
        *x.addr = addr;
        *x.port = port;
        old
    };
    let l4_check = f.l4_check_off();
    let mangled0 = if f.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    ctx.l4_csum_replace(
        l4_check,
        u64::from(old_addr),
        u64::from(addr),
        mangled0 | u64::from(BPF_F_PSEUDO_HDR) | 4,
    )?;
    replace_port_tc(ctx, l4_check, old_port, port, mangled0, no_csum)
}

/// TC, after a port of the packet's L4 header was rewritten: the checksum at `l4_check` follows
/// (`mangled0`: UDP's 0 stays 0). UDP without a checksum (`no_csum`): none offsets the port, and
/// the helper leaves a received packet's sum (`CHECKSUM_COMPLETE`) as it was: it is made to follow.
/// IPv4 and IPv6 alike. A Service whose targetPort is its port keeps the port: no helper call.
#[inline(always)]
pub fn replace_port_tc(
    ctx: &TcContext,
    l4_check: usize,
    old_port: u16,
    port: u16,
    mangled0: u64,
    no_csum: bool,
) -> Result<(), i64> {
    if old_port != port {
        ctx.l4_csum_replace(l4_check, u64::from(old_port), u64::from(port), mangled0 | 2)?;
        if no_csum {
            ctx.sum_changed(u32::from(csum::diff2(old_port, port)));
        }
    }
    Ok(())
}

/// XDP: whether the L4 checksum field of `f` holds its pseudo-header sum, as a partial checksum
/// does (a veth whose peer offloads transmit checksums, the default, delivers those). Rewriting
/// it incrementally as if it were full would make a checksum that is wrong once completed, which
/// only a receiver behind a device that completes it (a NIC, or a device without checksum
/// offload) notices. UDP without a checksum (0) is never partial.
#[inline(always)]
pub fn csum_maybe_partial(data: usize, end: usize, f: &Flow<V4>) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, ETH_HLEN) else { return true };
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
    if f.proto == IPPROTO_UDP && check == 0 {
        return false;
    }
    // SAFETY: bounds checked by ptr_at.
    let tot_len = u16::from_be(unsafe { (*ip).tot_len });
    let l4_len = tot_len.wrapping_sub((f.l4_off - ETH_HLEN) as u16);
    csum::maybe_partial(check, csum::pseudo_sum4(f.saddr, f.daddr, f.proto, l4_len))
}

/// TC: sends the packet back out of the interface it came in on, its Ethernet source and
/// destination swapped (the pod's own address becomes the destination). Returns the verdict.
#[inline(always)]
pub fn bounce_tc(ctx: &TcContext) -> i32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: bounds checked by ptr_at; no helper ran since.
    unsafe {
        let dst = (*eth).dst;
        (*eth).dst = (*eth).src;
        (*eth).src = dst;
    }
    // SAFETY: no preconditions; the context's ifindex is the interface the packet came in on.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

/// TC: turns the packet into the ICMP port unreachable that answers it and bounces it to its
/// sender. `Err` when it gets no answer (the packet is to be dropped). The socket buffer keeps its
/// checksum state: a partial checksum's offsets then point into the answer, which the pod's stack
/// accepts as it is (a device without checksum offload that the pod forwarded it through would
/// write into the quote).
#[inline(always)]
pub fn reject_tc(ctx: &TcContext) -> Result<i32, ()> {
    let mut frame = [0u8; REJECT_IN];
    // SAFETY: a valid socket buffer and a stack buffer of exactly the length asked for (the
    // helper fails, leaving it untouched, when the packet is shorter).
    let loaded = unsafe {
        bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, frame.as_mut_ptr().cast(), REJECT_IN as u32)
    };
    if loaded != 0 {
        return Err(());
    }
    let mut out = [0u8; REJECT_OUT];
    if !port_unreachable(&frame, &mut out) {
        return Err(());
    }
    // SAFETY: a valid socket buffer; the helper sets the packet's length, trimming or growing it.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, REJECT_OUT as u32, 0) } != 0 {
        return Err(());
    }
    // From here the packet is the answer or nothing: a failed store drops it (counted as a drop).
    store_answer(ctx, &out)?;
    // SAFETY: as in bounce_tc.
    Ok(unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 })
}

/// TC: writes `answer` over the whole packet (already of its length). A received packet's sum
/// (`CHECKSUM_COMPLETE`, which covers what follows the Ethernet header) follows the bytes after
/// the Ethernet header (`BPF_F_RECOMPUTE_CSUM`); any other packet's state is left as it is.
#[inline(always)]
pub fn store_answer<const N: usize>(ctx: &TcContext, answer: &[u8; N]) -> Result<(), ()> {
    const { assert!(N > ETH_HLEN) };
    let p = answer.as_ptr();
    // SAFETY: a valid socket buffer; the two parts of a buffer of `N` bytes, of the lengths given.
    let (eth, rest) = unsafe {
        (
            bpf_skb_store_bytes(ctx.skb.skb, 0, p.cast(), ETH_HLEN as u32, 0),
            bpf_skb_store_bytes(
                ctx.skb.skb,
                ETH_HLEN as u32,
                p.add(ETH_HLEN).cast(),
                (N - ETH_HLEN) as u32,
                u64::from(BPF_F_RECOMPUTE_CSUM),
            ),
        )
    };
    if eth != 0 || rest != 0 {
        return Err(());
    }
    Ok(())
}

/// A non-first fragment: writes `addr` into one side of its IPv4 header, the header checksum
/// updated incrementally (it carries no L4 header; its datagram's L4 checksum is in the first
/// fragment). Direct writes, right for TC and XDP alike: the header's sum does not change.
#[inline(always)]
pub fn rewrite_ip(data: usize, end: usize, side: Side, addr: u32) -> Result<(), ()> {
    let ip = ptr_at::<Ipv4Hdr>(data, end, ETH_HLEN).ok_or(())?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        let field = match side {
            Side::Source => core::ptr::addr_of_mut!((*ip).saddr),
            Side::Destination => core::ptr::addr_of_mut!((*ip).daddr),
        };
        (*ip).check = csum::replace4((*ip).check, *field, addr);
        *field = addr;
    }
    Ok(())
}

/// XDP: everything is written directly, the checksums updated incrementally.
#[inline(always)]
pub fn rewrite_xdp(ctx: &XdpContext, f: &Flow<V4>, side: Side, addr: u32, port: u16) -> Result<(), ()> {
    let x = fields(ctx.data(), ctx.data_end(), f, side).ok_or(())?;
    // SAFETY: pointers from `fields`, inside the packet.
    unsafe {
        let (old_addr, old_port) = (*x.addr, *x.port);
        let old_l4 = *x.l4_check;
        let mut l4 = csum::replace4(old_l4, old_addr, addr);
        l4 = csum::replace2(l4, old_port, port);
        if f.proto == IPPROTO_UDP {
            l4 = csum::udp_fixup(old_l4, l4);
        }
        (*x.ip).check = csum::replace4((*x.ip).check, old_addr, addr);
        *x.l4_check = l4;
        *x.addr = addr;
        *x.port = port;
    }
    Ok(())
}

/// What to rewrite in an ICMP error: the quoted packet's source and destination (address and
/// port), and the error's own source and destination addresses.
#[derive(Clone, Copy)]
pub struct IcmpNat<F: Family> {
    pub quote_src: Option<(F::Addr, u16)>,
    pub quote_dst: Option<(F::Addr, u16)>,
    pub outer_src: Option<F::Addr>,
    pub outer_dst: Option<F::Addr>,
}

/// Rewrites ICMP error `e` about a load-balanced flow as `n` says, so that the host it goes to
/// reads it as about a packet it sent itself: the quoted packet's addresses and ports with its
/// IPv4 and L4 checksums (when the L4 one is in the quote), the ICMP checksum, and the outer
/// addresses with the IPv4 checksum. ICMP's checksum covers no pseudo-header, so every change is a
/// plain incremental update, right for any socket-buffer checksum state (the covered bytes' sum
/// does not change) and for XDP frames alike: no helper is needed, hence any [`PacketCtx`].
#[inline(always)]
pub fn rewrite_icmp_error<C: PacketCtx>(ctx: &C, e: &IcmpError<V4>, n: &IcmpNat<V4>) -> Result<(), i64> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = ptr_at::<Ipv4Hdr>(data, end, ETH_HLEN).ok_or(-1i64)?;
    let icmp = ptr_at::<IcmpHdr>(data, end, e.icmp_off).ok_or(-1i64)?;
    let inner = ptr_at::<Ipv4Hdr>(data, end, e.inner_off).ok_or(-1i64)?;
    let ports = ptr_at::<UdpHdr>(data, end, e.inner_l4_off).ok_or(-1i64)?;
    let tcp = if e.proto == IPPROTO_TCP { ptr_at::<TcpHdr>(data, end, e.inner_l4_off) } else { None };
    // SAFETY: every pointer was bounds-checked above; no helper runs in between.
    unsafe {
        // The quoted L4 checksum (pseudo-header and ports), when it is in the quote.
        let l4_check: Option<*mut u16> = match tcp {
            Some(t) => Some(core::ptr::addr_of_mut!((*t).check)),
            None if e.proto == IPPROTO_UDP && (*ports).check != 0 => {
                Some(core::ptr::addr_of_mut!((*ports).check))
            }
            None => None,
        };
        let old_l4 = l4_check.map_or(0, |p| *p);
        let (mut l4, mut check) = (old_l4, (*icmp).check);
        let old_ip_check = (*inner).check;
        let mut ip_check = old_ip_check;
        // Each side in turn (no array of them: the node-side program has no stack to spare).
        let mut side = |(a, p): (u32, u16), addr: *mut u32, port: *mut u16| {
            let (old_a, old_p) = (*addr, *port);
            *addr = a;
            *port = p;
            ip_check = csum::replace4(ip_check, old_a, a);
            check = csum::replace2(csum::replace4(check, old_a, a), old_p, p);
            l4 = csum::replace2(csum::replace4(l4, old_a, a), old_p, p);
        };
        if let Some(to) = n.quote_src {
            side(to, core::ptr::addr_of_mut!((*inner).saddr), core::ptr::addr_of_mut!((*ports).source));
        }
        if let Some(to) = n.quote_dst {
            side(to, core::ptr::addr_of_mut!((*inner).daddr), core::ptr::addr_of_mut!((*ports).dest));
        }
        (*inner).check = ip_check;
        check = csum::replace2(check, old_ip_check, ip_check);
        if let Some(p) = l4_check {
            if e.proto == IPPROTO_UDP {
                l4 = csum::udp_fixup(old_l4, l4);
            }
            *p = l4;
            check = csum::replace2(check, old_l4, l4);
        }
        (*icmp).check = check;
        if let Some(a) = n.outer_src {
            (*ip).check = csum::replace4((*ip).check, (*ip).saddr, a);
            (*ip).saddr = a;
        }
        if let Some(a) = n.outer_dst {
            (*ip).check = csum::replace4((*ip).check, (*ip).daddr, a);
            (*ip).daddr = a;
        }
    }
    Ok(())
}
