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
    /// `bpf_set_retval` in cgroup programs (5.18): a socket refused for want of endpoints gets
    /// ECONNREFUSED; else EPERM.
    pub sock_set_retval: bool,
    /// `SO_NETNS_COOKIE` (5.14): `--socket-lb host` is the agent's own network namespace; else
    /// the initial one.
    pub netns_cookie: bool,
    /// `bpf_get_current_pid_tgid` and `bpf_get_current_comm` in cgroup socket programs (5.7; every
    /// kernel lb runs on should have them): `lbctl monitor`'s socket events name the process;
    /// else they do not.
    pub sock_process: bool,
    /// `bpf_xdp_adjust_meta` in XDP programs (4.15, but some builds refuse it): XDP marks the
    /// packets it passes for the TC forward program behind it; else TC looks at each again.
    pub xdp_meta: bool,
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
/// `bpf_set_retval`'s helper number.
const BPF_FUNC_SET_RETVAL: i32 = 187;
const BPF_FUNC_GET_CURRENT_PID_TGID: i32 = 14;
const BPF_FUNC_GET_CURRENT_COMM: i32 = 16;
const BPF_FUNC_XDP_ADJUST_META: i32 = 54;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;

impl Kernel {
    /// Asks the running kernel.
    pub fn probe() -> Self {
        Self {
            // A query of the TCX attachments of the loopback interface (there is one in every
            // network namespace): kernels without TCX refuse the attach type.
            tcx: SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok(),
            ktime_coarse: helper_loads(BPF_PROG_TYPE_SCHED_CLS, 0, BPF_FUNC_KTIME_GET_COARSE_NS),
            sock_set_retval: helper_loads(
                BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                BPF_CGROUP_INET4_CONNECT,
                BPF_FUNC_SET_RETVAL,
            ),
            netns_cookie: super::sockets::netns_cookie().is_ok_and(|c| c.is_some()),
            sock_process: helper_loads(
                BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                BPF_CGROUP_INET4_CONNECT,
                BPF_FUNC_GET_CURRENT_PID_TGID,
            ) && loads(
                BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                BPF_CGROUP_INET4_CONNECT,
                // r1 = r10; r1 += -16; r2 = 16; call get_current_comm: a 16-byte stack buffer.
                &[
                    insn(0xbf, 1, 10, 0),
                    insn(0x07, 1, 0, -16),
                    insn(0xb7, 2, 0, 16),
                    insn(0x85, 0, 0, BPF_FUNC_GET_CURRENT_COMM),
                ],
            ),
            // r1 is the context at entry; r2 = 0: a zero-length move of the metadata's start.
            xdp_meta: loads(
                BPF_PROG_TYPE_XDP,
                0,
                &[insn(0xb7, 2, 0, 0), insn(0x85, 0, 0, BPF_FUNC_XDP_ADJUST_META)],
            ),
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
        if !self.sock_set_retval {
            m.push(Missing {
                feature: "bpf_set_retval",
                since: "5.18",
                instead: "with --socket-lb, a connect or sendmsg to a Service without endpoints fails with EPERM, not ECONNREFUSED",
            });
        }
        if !self.sock_process {
            m.push(Missing {
                feature: "bpf_get_current_pid_tgid in cgroup programs",
                since: "5.7",
                instead: "lbctl monitor's socket events do not name the process",
            });
        }
        if !self.xdp_meta {
            m.push(Missing {
                feature: "bpf_xdp_adjust_meta",
                since: "4.15 (this kernel's build refuses it)",
                instead: "with XDP, the TC forward program looks again at every packet XDP passed (one more lookup each)",
            });
        }
        if !self.netns_cookie {
            m.push(Missing {
                feature: "SO_NETNS_COOKIE",
                since: "5.14",
                instead: "--socket-lb host translates the sockets of the initial network namespace, wherever the agent runs",
            });
        }
        m
    }
}

/// Whether a program of type `prog_type` (expected attach type `attach_type`) calling helper `id`
/// (with r1 = 0, and nothing else) loads: the kernel's verifier refuses helpers it does not know,
/// or does not give that program type.
fn helper_loads(prog_type: u32, attach_type: u32, id: i32) -> bool {
    loads(prog_type, attach_type, &[insn(0xb7, 1, 0, 0), insn(0x85, 0, 0, id)])
}

/// One `struct bpf_insn` (code, dst:4 | src:4, a zero offset, imm) as the kernel reads it.
fn insn(code: u8, dst: u8, src: u8, imm: i32) -> u64 {
    u64::from(code) | (u64::from(dst) << 8) | (u64::from(src) << 12) | (u64::from(imm as u32) << 32)
}

/// Whether a program of type `prog_type` (expected attach type `attach_type`) made of `body`,
/// then `r0 = 1; exit`, loads (1: a cgroup socket program may return only 0 or 1).
fn loads(prog_type: u32, attach_type: u32, body: &[u64]) -> bool {
    const BPF_PROG_LOAD: libc::c_long = 5;
    let mut insns = body.to_vec();
    insns.extend([insn(0xb7, 0, 0, 1), insn(0x95, 0, 0, 0)]);
    let license = c"GPL";
    // union bpf_attr, BPF_PROG_LOAD variant: prog_type, insn_cnt, insns, license, no log
    // (level, size, buffer), kern_version, prog_flags, prog_name, prog_ifindex, then
    // expected_attach_type, and zeroes.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        _log_and_more: [u8; 44],
        expected_attach_type: u32,
        _rest: [u8; 80],
    }
    let attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        _log_and_more: [0; 44],
        expected_attach_type: attach_type,
        _rest: [0; 80],
    };
    // SAFETY: a valid bpf_attr of the size passed; the instructions and license outlive the call.
    let load = || unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const ProgLoad, size_of::<ProgLoad>() as u32)
    };
    let mut fd = load();
    if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
        // Before 5.11 the kernel charges BPF memory to RLIMIT_MEMLOCK, per user: the maps of
        // every agent and test running as root count, and a small limit refuses even this
        // program. Lift it, as aya does before its own loads, and ask again.
        let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } == 0 {
            fd = load();
        }
    }
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
        use super::*;
        let cls = BPF_PROG_TYPE_SCHED_CLS;
        assert!(helper_loads(cls, 0, 5), "run as root: loading BPF programs needs CAP_BPF");
        assert!(!helper_loads(cls, 0, 100_000));
        // bpf_ktime_get_ns in a connect4 program: the expected attach type is passed right.
        let sock = BPF_PROG_TYPE_CGROUP_SOCK_ADDR;
        assert!(helper_loads(sock, BPF_CGROUP_INET4_CONNECT, 5));
        // bpf_set_retval is the cgroup programs' only: never a TC program's.
        assert!(!helper_loads(cls, 0, BPF_FUNC_SET_RETVAL));
        // The process's name into a 16-byte stack buffer: the arguments the verifier checks are
        // passed right (a wrong size or a pointer outside the stack is refused).
        let comm = |size: i32, at: i32| {
            [insn(0xbf, 1, 10, 0), insn(0x07, 1, 0, at), insn(0xb7, 2, 0, size), insn(0x85, 0, 0, 16)]
        };
        assert!(loads(sock, BPF_CGROUP_INET4_CONNECT, &comm(16, -16)));
        assert!(!loads(sock, BPF_CGROUP_INET4_CONNECT, &comm(32, -16)));
        assert!(!loads(sock, BPF_CGROUP_INET4_CONNECT, &comm(16, 16)));
    }
}
