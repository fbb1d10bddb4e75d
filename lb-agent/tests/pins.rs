//! Pinning problems explain themselves: a `--pin-dir` that is not on bpffs (a plain directory, or
//! /sys/fs/bpf under `ip netns exec`, which remounts /sys without bpffs) gets an error that says
//! so and what to do, from the agent and from lbctl, and nothing is left behind.

use std::{path::PathBuf, process::Command};

use lb_testkit::lab::Lab;

mod support;

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

/// lbctl is built beside the agent (the workspace builds both).
fn lbctl_bin() -> PathBuf {
    let bin = std::path::Path::new(AGENT).with_file_name("lbctl");
    assert!(bin.exists(), "lbctl not built at {}: run `cargo build` first", bin.display());
    bin
}

/// A scratch directory on the machine's ordinary file system, removed on drop.
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("lb-pins-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).expect("scratch dir");
    Scratch(dir)
}

fn agent_args(pin_dir: &std::path::Path, manifests: &std::path::Path) -> Vec<String> {
    [
        "--pin-dir",
        &pin_dir.to_string_lossy(),
        "--manifests",
        &manifests.to_string_lossy(),
        "--interfaces",
        "lxc*",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The error names the pin directory, says it is not on bpffs and what to do.
fn assert_explains(stderr: &str, pin_dir: &std::path::Path) {
    let named = format!("--pin-dir {} is not on bpffs", pin_dir.display());
    for want in [named.as_str(), "mount -t bpf bpf /sys/fs/bpf", "nsenter --net="] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
}

#[test]
fn a_pin_dir_that_is_not_on_bpffs_is_explained() {
    let s = scratch("plain");
    let pin_dir = s.0.join("pins");
    let out = Command::new(AGENT)
        .env("LB_SOCKET_LB", "off")
        .args(agent_args(&pin_dir, &s.0.join("manifests")))
        .output()
        .expect("run the agent");
    assert!(!out.status.success(), "the agent must not start");
    assert_explains(&String::from_utf8_lossy(&out.stderr), &pin_dir);
    assert!(!pin_dir.exists(), "nothing is made under a pin directory that is not on bpffs");

    let out =
        Command::new(lbctl_bin()).arg("--pin-dir").arg(&pin_dir).arg("services").output().expect("run lbctl");
    assert!(!out.status.success());
    assert_explains(&String::from_utf8_lossy(&out.stderr), &pin_dir);
}

#[test]
fn ip_netns_exec_hides_bpffs_and_the_agent_says_so() {
    let mut lab = Lab::new("pins").expect("lab");
    let node = lab.node(1).expect("a network namespace");
    let s = scratch("netns");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb-test/netnsexec-{}", std::process::id()));
    let out = Command::new("ip")
        .args(["netns", "exec", &node.netns, AGENT])
        .env("LB_SOCKET_LB", "off")
        .args(agent_args(&pin_dir, &s.0.join("manifests")))
        .output()
        .expect("run the agent under ip netns exec");
    assert!(!out.status.success(), "the agent must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_explains(&stderr, &pin_dir);
    // /sys/fs/bpf exists there, but as a directory of the namespace's own sysfs.
    assert!(stderr.contains("(/sys/fs/bpf is on a file system of type 0x62656572)"), "{stderr}");
}

/// A health or metrics port that is taken (kube-proxy's 10256 and 10249, on a node where it still
/// runs) stops the agent before it touches the datapath: the error names the flag and the
/// address, and no pin is made.
#[test]
fn a_taken_port_stops_the_agent_before_anything_is_pinned() {
    let s = scratch("port");
    for flag in ["--healthz-bind-address", "--metrics-bind-address"] {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let addr = taken.local_addr().expect("address").to_string();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb-test/port-{}-{flag}", std::process::id()));
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let other = free.local_addr().expect("address").to_string();
        drop(free);
        let other_flag = if flag == "--healthz-bind-address" {
            "--metrics-bind-address"
        } else {
            "--healthz-bind-address"
        };
        let out = Command::new(AGENT)
            .env("LB_SOCKET_LB", "off")
            .args(agent_args(&pin_dir, &s.0.join("manifests")))
            .args([flag, &addr, other_flag, &other])
            .output()
            .expect("run the agent");
        assert!(!out.status.success(), "{flag}: the agent must not start");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("{flag} {addr}: cannot listen")), "{flag}: {stderr}");
        // The directory may be there (the agent holds it before anything else), empty.
        let pinned: Vec<_> =
            std::fs::read_dir(&pin_dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        let _ = std::fs::remove_dir(&pin_dir);
        let _ = std::fs::remove_dir(pin_dir.parent().expect("lb-test"));
        assert!(pinned.is_empty(), "{flag}: pinned {pinned:?}");
        drop(taken);
    }
}

/// A start whose datapath fails to load after some of its maps were pinned (here a conntrack table
/// the kernel refuses, of no entries, whichever is made first; on an old kernel, a program the
/// verifier refuses) removes what it pinned: the next start, or `--cleanup`, finds nothing half
/// made.
#[test]
fn a_failed_load_leaves_nothing_pinned() {
    let pins = support::PinDir::new("failed-load");
    let mut cfg = support::test_config(pins.path());
    cfg.caps.ct = 0;
    let err = lb_agent::datapath::Datapath::load(&cfg, lb_agent::datapath::Mode::Tc).err().expect("refused");
    // Either family's conntrack table (both are sized 0 here; the loader makes maps in no fixed
    // order).
    let err = format!("{err:?}");
    assert!(err.contains("LB4_CT") || err.contains("LB6_CT"), "{err}");
    assert!(
        !pins.path().exists(),
        "left: {:?}",
        std::fs::read_dir(pins.path()).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
}

/// Counters added within a pin layout (the socket programs'): a pinned counter array of the old
/// size is made anew at load, since the loader would reuse it as it is and the new counters would
/// count nowhere.
#[test]
fn a_pinned_counter_array_of_another_size_is_made_anew() {
    use std::os::unix::ffi::OsStrExt as _;
    let pins = support::PinDir::new("counters");
    let dir = lb_agent::datapath::layout_dir(pins.path());
    std::fs::create_dir_all(&dir).expect("layout dir");
    let path = dir.join(lb_common::MAP_LB_COUNTERS);
    // BPF_MAP_CREATE a per-CPU array of the size before (34 u64 counters), then BPF_OBJ_PIN it
    // where the agent pins its counters.
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        _rest: [u8; 56],
    }
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let create = MapCreate {
        map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: 34,
        _rest: [0; 56],
    };
    // SAFETY: a valid bpf_attr of the size passed.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, 0, &create as *const MapCreate, size_of::<MapCreate>() as u32)
    };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _rest: [u8; 112],
    }
    let pin = ObjPin { pathname: c_path.as_ptr() as u64, bpf_fd: fd as u32, file_flags: 0, _rest: [0; 112] };
    // SAFETY: as above; the path outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 6, &pin as *const ObjPin, size_of::<ObjPin>() as u32) };
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our descriptor; the pin holds the map.
    unsafe { libc::close(fd as i32) };
    let size = |p: &std::path::Path| {
        aya::maps::MapData::from_pin(p).expect("pinned").info().expect("info").max_entries()
    };
    assert_eq!(size(&path), 34);

    let (_dp, maps) =
        lb_agent::datapath::Datapath::load(&support::test_config(pins.path()), lb_agent::datapath::Mode::Tc)
            .expect("load");
    assert_eq!(size(&path), lb_common::counters::COUNT, "made anew at the current size");
    assert_eq!(
        maps.read_counters().expect("every counter readable").len(),
        lb_common::counters::COUNT as usize
    );
}
