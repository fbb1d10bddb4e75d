//! The node-side packet tables' harness (`nodeport_packets`, `nodeport_packets6`): a network
//! namespace with a node's interfaces and routes, and BPF_PROG_TEST_RUN of the node-side
//! programs with their verdict, counters and XDP mark checked.

use std::process::Command;

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions},
};
use lb_agent::datapath::{
    layout_dir, Datapath, Maps, PROG_TC_FORWARD, PROG_TC_NODE_IN, PROG_TC_NODE_OUT, PROG_XDP_NODE_IN,
};
use lb_common::{Lb4Interface, IF_ROLE_NODE, IF_ROLE_POD, MAP_LB4_IFS};

use super::{assert_counter_changes, kernel_release, take_xdp_mark, want_xdp_mark};

/// The program a row runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    NodeIn,
    NodeOut,
    PodForward,
    XdpNodeIn,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// Interface indexes in the node's namespace.
pub struct Ifs {
    /// The node interface.
    pub ul0: u32,
    /// A pod's interface.
    pub lxc1: u32,
}

/// Runs `input` through `prog`; an XDP program takes it in on interface `ingress` (Linux 5.15),
/// else on `lo`.
pub fn run_in(dp: &Datapath, prog: Prog, input: &[u8], ingress: Option<u32>) -> (u32, Vec<u8>) {
    let name = match prog {
        Prog::NodeIn => PROG_TC_NODE_IN,
        Prog::NodeOut => PROG_TC_NODE_OUT,
        Prog::PodForward => PROG_TC_FORWARD,
        Prog::XdpNodeIn => PROG_XDP_NODE_IN,
    };
    let mut out = vec![0u8; input.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let md: Vec<u8> =
        [0, input.len() as u32, 0, ingress.unwrap_or(0), 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ctx_in: ingress.map(|_| md.as_slice()),
        ..Default::default()
    };
    let res = if prog == Prog::XdpNodeIn {
        dp.xdp_program(name).expect("program").test_run(opts)
    } else {
        dp.tc_program(name).expect("program").test_run(opts)
    }
    .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// Runs `input` through `prog` (taken in on `ingress`, XDP only); checks the verdict, that the
/// counters changed by exactly `counters`, and XDP's mark for TC (Linux 5.14 hands the metadata
/// back); returns the packet out.
#[allow(clippy::too_many_arguments)]
pub fn expect_in(
    dp: &Datapath,
    maps: &Maps,
    desc: &str,
    prog: Prog,
    input: &[u8],
    ingress: Option<u32>,
    verdict: u32,
    counters: &[(u32, u64)],
) -> Vec<u8> {
    let before = maps.read_counters().expect("counters");
    let (v, mut out) = run_in(dp, prog, input, ingress);
    let after = maps.read_counters().expect("counters");
    assert_eq!(v, verdict, "{desc}: verdict");
    assert_counter_changes(desc, &before, &after, counters);
    if prog == Prog::XdpNodeIn && kernel_release() >= (5, 14) {
        // A packet XDP passes is marked for TC, decided or left to it; one it sends or drops is
        // not, nor any on a kernel that refuses XDP metadata (TC looks at the packet again).
        let mark = take_xdp_mark(v, input.len(), &mut out);
        assert_eq!(mark, want_xdp_mark(v, counters), "{desc}: XDP's mark for TC");
    }
    out
}

/// [`expect_in`] on `lo`.
pub fn expect(
    dp: &Datapath,
    maps: &Maps,
    desc: &str,
    prog: Prog,
    input: &[u8],
    verdict: u32,
    counters: &[(u32, u64)],
) -> Vec<u8> {
    expect_in(dp, maps, desc, prog, input, None, verdict, counters)
}

/// Runs `f` in a new network namespace `<prefix><tag><pid>` with the node interface `ul0`, a
/// pod's interface `lxc1` and the `ip` commands of `setup` (each run with `-n <namespace>`),
/// loopback up, forwarding on (`sysctl`, e.g. `net.ipv4.ip_forward=1`). The namespace is removed
/// however `f` ends.
pub fn in_node_netns<T: Send + 'static>(
    name: &str,
    setup: &[Vec<&str>],
    sysctl: &str,
    f: impl FnOnce(Ifs) -> T + Send + 'static,
) -> T {
    let ns = format!("{name}{}", std::process::id());
    let sh = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    sh(&["netns", "add", &ns]);
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let _gone = Gone(ns.clone());
    let links: [Vec<&str>; 7] = [
        vec!["link", "set", "lo", "up"],
        vec!["link", "add", "ul0", "type", "veth", "peer", "name", "ul0p"],
        vec!["link", "set", "ul0", "up"],
        vec!["link", "set", "ul0p", "up"],
        vec!["link", "add", "lxc1", "type", "veth", "peer", "name", "lxc1p"],
        vec!["link", "set", "lxc1", "up"],
        vec!["link", "set", "lxc1p", "up"],
    ];
    for args in links.iter().chain(setup) {
        let mut a = vec!["-n", ns.as_str()];
        a.extend(args);
        sh(&a);
    }
    sh(&["netns", "exec", &ns, "sysctl", "-qw", sysctl]);
    lb_testkit::lab::in_netns(&ns, move || {
        let index = |name: &str| {
            let name = std::ffi::CString::new(name).expect("name");
            // SAFETY: a NUL-terminated name.
            let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(i, 0, "{name:?} exists");
            i
        };
        f(Ifs { ul0: index("ul0"), lxc1: index("lxc1") })
    })
    .expect("in the node's namespace")
}

/// Records interface `index` in `LB4_IFS` as the agent would: a node interface with IPv4 address
/// `snat_addr` (network byte order; 0: none), or (`node` false) a pod's.
pub fn record_interface(pins: &std::path::Path, index: u32, node: bool, snat_addr: u32) {
    let data = MapData::from_pin(layout_dir(pins).join(MAP_LB4_IFS)).expect("LB4_IFS pinned");
    let mut map: HashMap<MapData, u32, Lb4Interface> =
        Map::from_map_data(data).expect("map").try_into().expect("hash map");
    let value = if node {
        Lb4Interface { role: IF_ROLE_NODE, snat_addr }
    } else {
        Lb4Interface { role: IF_ROLE_POD, snat_addr: 0 }
    };
    map.insert(index, value, 0).expect("interface recorded");
}
