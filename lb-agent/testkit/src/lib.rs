//! lb's test kit, kept out of the product: the namespace lab ([`lab`]), the in-process Kubernetes
//! API server ([`api`]), socket-level clients in a cgroup of their own ([`sockets`]), a readable dump of the maps for golden tests ([`dump`]), and the no-op
//! programs that per-packet costs are measured against. Integration tests, the demo and the
//! benchmarks use it; unit tests inside lb-agent do not (they would see a second copy of its
//! types).

pub mod api;
pub mod dump;
pub mod lab;
pub mod sockets;

/// No-op TC and XDP programs (`noop_tc`, `noop_xdp`), the baseline for per-packet cost, built
/// with the datapath by lb-agent's build script.
pub static NOOP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("LB_EBPF_OBJECTS"), "/lb-noop"));
