//! Packet rewriting: the destination of forward packets (DNAT to the backend) or the source of
//! replies (back to the service address), with IPv4 and L4 checksums kept right.
//!
//! TC uses the kernel's checksum helpers, which also handle socket buffers whose checksum is still
//! partial (veth, local traffic) or complete. XDP has no such helpers and no such state: frames
//! carry full checksums, updated here incrementally (RFC 1624).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use lb_common::{csum, IPPROTO_UDP};

use crate::parse::{ptr_at, Flow, Ipv4Hdr, ETH_HLEN, IP_DADDR_OFF, IP_SADDR_OFF};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// Where the address and port to rewrite are, and their current values.
struct Target {
    addr_off: usize,
    port_off: usize,
    old_addr: u32,
    old_port: u16,
}

#[inline(always)]
fn target(f: &Flow, side: Side) -> Target {
    match side {
        Side::Source => Target {
            addr_off: ETH_HLEN + IP_SADDR_OFF,
            port_off: f.l4_off,
            old_addr: f.saddr,
            old_port: f.sport,
        },
        Side::Destination => Target {
            addr_off: ETH_HLEN + IP_DADDR_OFF,
            port_off: f.l4_off + 2,
            old_addr: f.daddr,
            old_port: f.dport,
        },
    }
}

/// TC: addresses, ports and the IPv4 header checksum are written directly; the L4 checksum goes
/// through `bpf_l4_csum_replace`, which knows whether the socket buffer's checksum is partial
/// (only pseudo-header changes apply), complete (`skb->csum` follows) or absent. Two helper calls
/// instead of five.
#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, f: &Flow, side: Side, addr: u32, port: u16) -> Result<(), i64> {
    let t = target(f, side);
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = ptr_at::<Ipv4Hdr>(data, end, ETH_HLEN).ok_or(-1i64)?;
    let addr_p = ptr_at::<u32>(data, end, t.addr_off).ok_or(-1i64)?;
    let port_p = ptr_at::<u16>(data, end, t.port_off).ok_or(-1i64)?;
    // SAFETY: every pointer was bounds-checked against data_end just above; helpers that may move
    // packet data are called only after the last direct access.
    unsafe {
        (*ip).check = csum::replace4((*ip).check, t.old_addr, addr);
        *addr_p = addr;
        *port_p = port;
    }
    let l4_check = f.l4_check_off();
    let mangled0 = if f.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 };
    ctx.l4_csum_replace(
        l4_check,
        u64::from(t.old_addr),
        u64::from(addr),
        mangled0 | u64::from(BPF_F_PSEUDO_HDR) | 4,
    )?;
    ctx.l4_csum_replace(l4_check, u64::from(t.old_port), u64::from(port), mangled0 | 2)?;
    Ok(())
}

#[inline(always)]
pub fn rewrite_xdp(ctx: &XdpContext, f: &Flow, side: Side, addr: u32, port: u16) -> Result<(), ()> {
    let (data, end) = (ctx.data(), ctx.data_end());
    let t = target(f, side);
    let ip = ptr_at::<Ipv4Hdr>(data, end, ETH_HLEN).ok_or(())?;
    let l4_check = ptr_at::<u16>(data, end, f.l4_check_off()).ok_or(())?;
    let addr_p = ptr_at::<u32>(data, end, t.addr_off).ok_or(())?;
    let port_p = ptr_at::<u16>(data, end, t.port_off).ok_or(())?;
    // SAFETY: every pointer was bounds-checked against data_end just above.
    unsafe {
        let old_l4 = *l4_check;
        let mut l4 = csum::replace4(old_l4, t.old_addr, addr);
        l4 = csum::replace2(l4, t.old_port, port);
        if f.proto == IPPROTO_UDP {
            l4 = csum::udp_fixup(old_l4, l4);
        }
        (*ip).check = csum::replace4((*ip).check, t.old_addr, addr);
        *l4_check = l4;
        *addr_p = addr;
        *port_p = port;
    }
    Ok(())
}
