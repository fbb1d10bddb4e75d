//! IPv6 test packets: a builder with extension headers and fragments, ICMPv6 errors and
//! neighbour discovery, and checkers that verify every checksum from scratch (over the IPv6
//! pseudo-header, RFC 8200 §8.1).

use std::net::Ipv6Addr;

use etherparse::{Ipv6Header, TcpHeader};

use super::{internet_checksum, CLIENT_MAC, GW_MAC, L4};

pub const NEXT_HOP_BY_HOP: u8 = 0;
pub const NEXT_ROUTING: u8 = 43;
pub const NEXT_FRAGMENT: u8 = 44;
pub const NEXT_DEST_OPTS: u8 = 60;
pub const NEXT_NONE: u8 = 59;
pub const NEXT_ICMP6: u8 = 58;
pub const NEXT_TCP: u8 = 6;
pub const NEXT_UDP: u8 = 17;

/// An IPv6 extension header placed before the transport header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    /// Hop-by-Hop Options, `len8` more 8-byte units of padding options.
    HopByHop { len8: u8 },
    /// Destination Options, likewise.
    DestOpts { len8: u8 },
    /// A Routing header (type 4, segments left 0: already at its final destination).
    Routing,
    /// A Fragment header: offset in 8-byte units, more fragments, identification.
    Fragment { offset: u16, more: bool, id: u32 },
}

impl Ext {
    const fn number(self) -> u8 {
        match self {
            Self::HopByHop { .. } => NEXT_HOP_BY_HOP,
            Self::DestOpts { .. } => NEXT_DEST_OPTS,
            Self::Routing => NEXT_ROUTING,
            Self::Fragment { .. } => NEXT_FRAGMENT,
        }
    }

    /// The header's bytes, its next-header field `next`.
    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Self::HopByHop { len8 } | Self::DestOpts { len8 } => {
                // PadN filling the rest of the header: type 1, length.
                let total = 8 * (usize::from(len8) + 1);
                let mut b = vec![next, len8, 1, (total - 4) as u8];
                b.resize(total, 0);
                b
            }
            Self::Routing => vec![next, 0, 4, 0, 0, 0, 0, 0],
            Self::Fragment { offset, more, id } => {
                let mut b = vec![next, 0];
                b.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                b.extend_from_slice(&id.to_be_bytes());
                b
            }
        }
    }
}

/// An Ethernet + IPv6 (+ extension headers) + TCP/UDP packet with right checksums.
#[derive(Clone, Debug)]
pub struct Pkt6 {
    pub src: (Ipv6Addr, u16),
    pub dst: (Ipv6Addr, u16),
    pub l4: L4,
    pub ext: Vec<Ext>,
    pub payload: Vec<u8>,
    /// A non-first fragment: no transport header, `payload` only (its last `Ext` a Fragment).
    pub no_l4: bool,
}

/// The Internet checksum of `l4` (header and payload, its checksum field zero or not) over the
/// IPv6 pseudo-header of `src`, `dst` and `next`.
pub fn l4_checksum6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> u16 {
    let mut b = Vec::with_capacity(40 + l4.len());
    b.extend_from_slice(&src.octets());
    b.extend_from_slice(&dst.octets());
    b.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, next]);
    b.extend_from_slice(l4);
    internet_checksum(&b)
}

/// Ethernet and IPv6 headers for `payload_len` bytes after the IPv6 header, whose first header
/// is `next`.
pub fn eth_ip6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload_len: usize, hop_limit: u8) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&GW_MAC);
    out.extend_from_slice(&CLIENT_MAC);
    out.extend_from_slice(&0x86ddu16.to_be_bytes());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    out.extend_from_slice(&[next, hop_limit]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out
}

impl Pkt6 {
    pub fn new(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), l4: L4) -> Self {
        Self { src, dst, l4, ext: Vec::new(), payload: b"hello, lb6".to_vec(), no_l4: false }
    }

    pub fn with_ext(mut self, ext: &[Ext]) -> Self {
        self.ext = ext.to_vec();
        self
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => NEXT_TCP,
            L4::Udp { .. } => NEXT_UDP,
        }
    }

    /// The transport header and payload, checksum included.
    fn l4_bytes(&self) -> Vec<u8> {
        if self.no_l4 {
            return self.payload.clone();
        }
        let mut l4 = match self.l4 {
            L4::Tcp { syn, ack, fin, rst } => {
                let mut tcp = TcpHeader::new(self.src.1, self.dst.1, 1000, 64240);
                (tcp.syn, tcp.ack, tcp.fin, tcp.rst) = (syn, ack, fin, rst);
                tcp.to_bytes().to_vec()
            }
            L4::Udp { .. } => {
                let mut u = Vec::new();
                u.extend_from_slice(&self.src.1.to_be_bytes());
                u.extend_from_slice(&self.dst.1.to_be_bytes());
                u.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                u.extend_from_slice(&[0, 0]);
                u
            }
        };
        let check_at = if self.proto() == NEXT_TCP { 16 } else { 6 };
        l4[check_at..check_at + 2].copy_from_slice(&[0, 0]);
        l4.extend_from_slice(&self.payload);
        let zero = matches!(self.l4, L4::Udp { zero_checksum: true });
        if !zero {
            let mut c = l4_checksum6(self.src.0, self.dst.0, self.proto(), &l4);
            if c == 0 && self.proto() == NEXT_UDP {
                c = 0xffff;
            }
            l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        }
        l4
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut after = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(self.proto(), |n| n.number());
            after.extend_from_slice(&e.bytes(next));
        }
        after.extend_from_slice(&self.l4_bytes());
        let first = self.ext.first().map_or(self.proto(), |e| e.number());
        let mut out = eth_ip6(self.src.0, self.dst.0, first, after.len(), 64);
        out.extend_from_slice(&after);
        out
    }
}

/// What an IPv6 packet out of the datapath says, after checking its L4 checksum from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen6 {
    pub src: (Ipv6Addr, u16),
    pub dst: (Ipv6Addr, u16),
    /// The UDP checksum field (0 = none); TCP: None.
    pub udp_checksum: Option<u16>,
    /// The extension headers' numbers, in order.
    pub ext: Vec<u8>,
}

/// Where the transport header of the IPv6 packet at `ip` (its IPv6 header) starts, its number,
/// and the extension headers passed.
fn walk(ip: &[u8]) -> (usize, u8, Vec<u8>) {
    let (mut next, mut off, mut ext) = (ip[6], 40, Vec::new());
    while matches!(next, NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DEST_OPTS | NEXT_FRAGMENT) {
        ext.push(next);
        let len = if next == NEXT_FRAGMENT { 8 } else { 8 * (usize::from(ip[off + 1]) + 1) };
        next = ip[off];
        off += len;
    }
    (off, next, ext)
}

/// Parses an Ethernet/IPv6/(extensions)/TCP|UDP packet and panics unless its L4 checksum is right
/// (computed from scratch over the pseudo-header; a UDP checksum of 0 is reported, not checked).
pub fn check_packet6(bytes: &[u8]) -> Seen6 {
    assert_eq!(&bytes[12..14], &[0x86, 0xdd], "an IPv6 frame");
    let ip = &bytes[14..];
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    assert_eq!(ip.len(), 40 + payload_len, "the payload length covers the packet");
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).expect("16 bytes"));
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16 bytes"));
    let (off, next, ext) = walk(ip);
    let l4 = &ip[off..];
    let ports = (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]));
    let udp_checksum = match next {
        NEXT_TCP => {
            assert_eq!(l4_checksum6(src, dst, NEXT_TCP, l4), 0, "TCP checksum over the pseudo-header");
            if ext.is_empty() {
                // Cross-checked with etherparse's own computation.
                let (h, _) = Ipv6Header::from_slice(ip).expect("ipv6 header");
                let (tcp, payload) = TcpHeader::from_slice(l4).expect("tcp header");
                assert_eq!(tcp.checksum, tcp.calc_checksum_ipv6(&h, payload).expect("checksum"));
            }
            None
        }
        NEXT_UDP => {
            let c = u16::from_be_bytes([l4[6], l4[7]]);
            if c != 0 {
                assert_eq!(l4_checksum6(src, dst, NEXT_UDP, l4), 0, "UDP checksum over the pseudo-header");
            }
            Some(c)
        }
        other => panic!("unexpected next header {other}"),
    };
    Seen6 { src: (src, ports.0), dst: (dst, ports.1), udp_checksum, ext }
}

/// An Ethernet/IPv6/ICMPv6 message from `src` to `dst`: `kind`/`code`, its second word `rest`
/// (the MTU of "packet too big", the pointer of "parameter problem"), then `body` (for an error,
/// the quoted IPv6 packet), with its checksum over the pseudo-header.
pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, code: u8, rest: u32, body: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(body);
    let c = l4_checksum6(src, dst, NEXT_ICMP6, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut out = eth_ip6(src, dst, NEXT_ICMP6, icmp.len(), 64);
    out.extend_from_slice(&icmp);
    out
}

/// An ICMPv6 error quoting `quoted` (an Ethernet frame: its IPv6 packet is quoted).
pub fn icmp6_error(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, code: u8, rest: u32, quoted: &[u8]) -> Vec<u8> {
    icmp6(src, dst, kind, code, rest, &quoted[14..])
}

/// A neighbour solicitation from `src` for `target`, to its solicited-node multicast address.
pub fn neighbour_solicitation(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let group =
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(t[13]), u16::from_be_bytes([t[14], t[15]]));
    let mut body = target.octets().to_vec();
    // Source link-layer address option.
    body.extend_from_slice(&[1, 1]);
    body.extend_from_slice(&CLIENT_MAC);
    let mut out = icmp6(src, group, 135, 0, 0, &body);
    out[21] = 255; // hop limit 255, as ND requires
    out
}

/// What an ICMPv6 error out of the datapath says, after checking its checksum, and the quoted
/// packet's L4 checksum when it is quoted whole.
#[derive(Debug, PartialEq, Eq)]
pub struct SeenIcmp6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub kind: u8,
    /// The quoted packet's addresses and ports.
    pub quoted: ((Ipv6Addr, u16), (Ipv6Addr, u16)),
}

pub fn check_icmp6_error(bytes: &[u8], quoted_whole: bool) -> SeenIcmp6 {
    assert_eq!(&bytes[12..14], &[0x86, 0xdd], "an IPv6 frame");
    let ip = &bytes[14..];
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).expect("16 bytes"));
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16 bytes"));
    assert_eq!(ip[6], NEXT_ICMP6, "an ICMPv6 message");
    let icmp = &ip[40..];
    assert_eq!(l4_checksum6(src, dst, NEXT_ICMP6, icmp), 0, "ICMPv6 checksum over the pseudo-header");
    let inner = &icmp[8..];
    let q = if quoted_whole {
        let mut frame = bytes[..14].to_vec();
        frame.extend_from_slice(inner);
        let s = check_packet6(&frame);
        (s.src, s.dst)
    } else {
        let qs = Ipv6Addr::from(<[u8; 16]>::try_from(&inner[8..24]).expect("16 bytes"));
        let qd = Ipv6Addr::from(<[u8; 16]>::try_from(&inner[24..40]).expect("16 bytes"));
        let (off, _, _) = walk(inner);
        let p = |i: usize| u16::from_be_bytes([inner[off + i], inner[off + i + 1]]);
        ((qs, p(0)), (qd, p(2)))
    };
    SeenIcmp6 { src, dst, kind: icmp[0], quoted: q }
}

/// The Service's IPv6 cluster IP in the dual-stack labs' objects ([`dual_stack_who`]).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

/// The dual-stack Service `who` (cluster IPs `VIP` and [`VIP6`]; TCP 80 → 8080, UDP 53 → 5353)
/// and one EndpointSlice per family with the backends `b` (all three, or fewer).
pub fn dual_stack_who(b: &[lb_testkit::lab::Pod]) -> String {
    let slice = |family: &str, addr: &dyn Fn(&lb_testkit::lab::Pod) -> String| {
        let endpoints: Vec<String> = b
            .iter()
            .map(|p| {
                format!(
                    "- addresses: ['{}']\n  nodeName: node{}\n  conditions: {{ready: true}}",
                    addr(p),
                    p.node
                )
            })
            .collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: who-{}\n  \
             namespace: demo\n  labels: {{kubernetes.io/service-name: who}}\naddressType: {family}\nports:\n\
             - {{name: tcp, port: 8080, protocol: TCP}}\n- {{name: udp, port: 5353, protocol: UDP}}\nendpoints:\n{}\n",
            family.to_lowercase(),
            endpoints.join("\n")
        )
    };
    let vip = super::VIP;
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: who, namespace: demo}}\nspec:\n  clusterIP: {vip}\n  \
         clusterIPs: ['{vip}', '{VIP6}']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  ports:\n  \
         - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: udp, port: 53, targetPort: 5353, protocol: UDP}}\n{}{}",
        slice("IPv4", &|p| p.ip.to_string()),
        slice("IPv6", &|p| p.ip6.expect("a dual-stack pod").to_string()),
    )
}
