//! What the running kernel can do, found by asking it (never by its version: distributions
//! backport), and what the datapath does where it cannot.

use aya::programs::{SchedClassifier, TcAttachType};

/// The kernel features lb uses beyond its floor (Linux 5.10), and whether this kernel has each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    /// TCX attachment of TC programs (6.6): else clsact qdisc filters over netlink.
    pub tcx: bool,
    /// `bpf_ktime_get_coarse_ns` (5.11): else `bpf_ktime_get_ns`.
    pub ktime_coarse: bool,
}

/// A feature this kernel lacks: its name, the kernel that has it, and what lb does instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub feature: &'static str,
    pub since: &'static str,
    pub instead: &'static str,
}

/// `bpf_ktime_get_coarse_ns`'s helper number.
const BPF_FUNC_KTIME_GET_COARSE_NS: i32 = 160;

impl Kernel {
    /// Asks the running kernel.
    pub fn probe() -> Self {
        Self {
            // A query of the TCX attachments of the loopback interface (there is one in every
            // network namespace): kernels without TCX refuse the attach type.
            tcx: SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok(),
            ktime_coarse: helper_loads(BPF_FUNC_KTIME_GET_COARSE_NS),
        }
    }

    /// What this kernel lacks, and what lb does instead.
    pub fn missing(&self) -> Vec<Missing> {
        let mut m = Vec::new();
        if !self.tcx {
            m.push(Missing {
                feature: "tcx",
                since: "6.6",
                instead: "TC programs attached as clsact qdisc filters over netlink",
            });
        }
        if !self.ktime_coarse {
            m.push(Missing {
                feature: "bpf_ktime_get_coarse_ns",
                since: "5.11",
                instead: "the datapath reads its clock with bpf_ktime_get_ns",
            });
        }
        m
    }
}

/// Whether a TC program calling helper `id` (and nothing else) loads: the kernel's verifier
/// refuses helpers it does not know.
fn helper_loads(id: i32) -> bool {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    // call id; r0 = 0; exit (struct bpf_insn: code, dst:4|src:4, off, imm).
    let insn = |code: u8, imm: i32| -> u64 { u64::from(code) | (u64::from(imm as u32) << 32) };
    let insns = [insn(0x85, id), insn(0xb7, 0), insn(0x95, 0)];
    let license = c"GPL";
    // union bpf_attr, BPF_PROG_LOAD variant: prog_type, insn_cnt, insns, license, then zeroes
    // (no log, no name, no attach type).
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        _rest: [u8; 128],
    }
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        _rest: [0; 128],
    };
    // SAFETY: a valid bpf_attr of the size passed; the instructions and license outlive the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const ProgLoad, size_of::<ProgLoad>() as u32)
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: a descriptor this function owns.
    unsafe { libc::close(fd as i32) };
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unknown_helper_is_refused_and_a_known_one_loads() {
        // bpf_ktime_get_ns (5): every kernel lb runs on has it. 100,000: no kernel has it.
        assert!(super::helper_loads(5), "run as root: loading BPF programs needs CAP_BPF");
        assert!(!super::helper_loads(100_000));
    }
}
