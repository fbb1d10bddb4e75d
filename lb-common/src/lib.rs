//! Types shared by the lb datapath (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding fields and a size assertion, and
//! holds only integers: the kernel and userspace read the same bytes. Addresses and ports are kept
//! in network byte order exactly as they appear in packets, so the datapath never converts them.
//! Names follow Cilium's `lb4_*`/`lb6_*` convention so that IPv6 types can sit beside these.
#![no_std]

pub mod counters;
pub mod csum;
pub mod hash;
pub mod maps;
pub mod maps6;
pub mod reject;

pub use maps::*;
pub use maps6::*;

/// The mark XDP leaves in the metadata in front of a packet it decided ("LBXD"), followed by the
/// index of the interface it came in on (native-endian u32s), for the TC forward program behind it.
pub const XDP_DECIDED: u32 = 0x4c42_5844;
/// The mark of a packet XDP left to TC ("LBXT").
pub const XDP_LEFT: u32 = 0x4c42_5854;
