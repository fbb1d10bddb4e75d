//! `cargo xtask test --kernels`: the kernel matrix. Debian's kernels (5.10, 6.1, 6.12) are
//! fetched through an apt configuration of their own (the host's sources stay as they are),
//! cached under `/var/cache/lb-kernels`, and booted in qemu (TCG: this host's /dev/kvm boots no
//! stock kernel) with an initramfs of busybox and the modules the tests need, the host's root
//! shared read-only over 9p. Inside each, the packet tables and end-to-end tests run from this
//! build, and their results come back through a second, writable share.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{root, run_cmd};

/// What booting the kernels needs.
pub const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "booting other kernels for the kernel matrix"),
    ("busybox-static", "the kernel matrix's initramfs"),
    ("kmod", "depmod, for the kernel matrix's module dependencies"),
    ("cpio", "packing the kernel matrix's initramfs"),
    ("xz-utils", "unpacking compressed kernel modules"),
    ("zstd", "unpacking compressed kernel modules"),
];

/// A Debian kernel of the matrix.
struct Kernel {
    /// As the matrix names it.
    name: &'static str,
    /// Its cache directory's name.
    dist: &'static str,
    /// apt sources that hold it.
    sources: &'static [&'static str],
}

const KERNELS: [Kernel; 3] = [
    Kernel {
        name: "5.10",
        dist: "bullseye",
        sources: &[
            "deb http://deb.debian.org/debian bullseye main",
            "deb http://deb.debian.org/debian-security bullseye-security main",
        ],
    },
    Kernel {
        name: "6.1",
        dist: "bookworm",
        sources: &[
            "deb http://deb.debian.org/debian bookworm main",
            "deb http://deb.debian.org/debian-security bookworm-security main",
        ],
    },
    Kernel {
        name: "6.12",
        dist: "bookworm-backports",
        sources: &["deb http://deb.debian.org/debian bookworm-backports main"],
    },
];

const CACHE: &str = "/var/cache/lb-kernels";

/// Modules the guest loads (with what they depend on, from modules.dep): the host share, veth
/// pairs, TC, the lab's underlay bridge (`bridge`, after `llc` and `stp`; Debian builds all
/// three as modules, and `br_netfilter` is left out on purpose: the underlay filters nothing), and
/// sock_diag for UDP (`udp_diag`, after `inet_diag`), which a node's kernel loads on demand and
/// the agent uses to abort connected UDP sockets whose backend left.
const MODULES: &[&str] =
    &["virtio_pci", "9pnet_virtio", "9p", "veth", "sch_ingress", "cls_bpf", "bridge", "udp_diag"];

/// The tests each kernel runs: (test binary, filter arguments, what it shows).
const TESTS: &[(&str, &[&str], &str)] = &[
    ("datapath_packets", &[], "packet tables (BPF_PROG_TEST_RUN)"),
    ("datapath_packets6", &[], "lb6 packet tables (BPF_PROG_TEST_RUN), IPv6 on and off"),
    ("e2e", &["--exact", "tc_two_nodes"], "two nodes, TC"),
    ("e2e", &["--exact", "xdp_two_nodes"], "two nodes, XDP"),
    ("e2e_ipv6", &["--exact", "tc_dual_stack_service"], "dual-stack Service over IPv6, two nodes, TC"),
    ("nodeport_packets", &[], "node-side programs packet by packet (FIB lookup, redirect, SNAT)"),
    ("nodeport_packets6", &[], "IPv6 node-side programs packet by packet (three tail-called programs, IPv6 SNAT, FIB)"),
    (
        "e2e_nodeport",
        &["--exact", "nodeports_and_load_balancer_ips_serve_clients_outside_over_ipv6"],
        "IPv6 NodePorts and LoadBalancer IPs from outside, Cluster (IPv6 SNAT) and Local (client kept)",
    ),
    (
        "e2e_nodeport",
        &["--exact", "nodeport_cluster_policy_reaches_every_endpoint_through_either_node"],
        "NodePort from outside, externalTrafficPolicy Cluster (SNAT, bpf_redirect_neigh)",
    ),
    (
        "e2e_nodeport",
        &["--exact", "xdp_on_the_node_interface_serves_nodeports_through_either_node"],
        "NodePort from outside through the XDP node program (generic XDP, XDP_TX)",
    ),
    (
        "e2e_sockets",
        &["--exact", "all_mode_translates_sockets_on_this_kernel"],
        "socket-level load balancing (cgroup connect4, sendmsg4, recvmsg4, getpeername4; EPERM before bpf_set_retval; monitor events name the process)",
    ),
    (
        "e2e_ipv6",
        &["--exact", "host_sockets_reach_ipv6_and_ipv4_mapped_service_addresses"],
        "socket-level load balancing over IPv6 (connect6, sendmsg6, recvmsg6, getpeername6), IPv4-mapped addresses through the IPv4 path, connected UDP aborted over IPv6",
    ),
    (
        "e2e_sockets",
        &["--exact", "host_mode_is_the_agents_namespace_or_the_initial_one"],
        "--socket-lb host: the agent's namespace (SO_NETNS_COOKIE), else the initial one",
    ),
    ("e2e_restart", &["--exact", "sigterm_and_restart_lose_no_connection"], "restart under traffic"),
    (
        "e2e_restart",
        &["--exact", "cleanup_removes_everything_and_an_unknown_layout_is_taken_over"],
        "--cleanup",
    ),
    (
        "tc_attach",
        &[],
        "netlink filters: in place, other owners, /readyz, --cleanup, a moved position, what netlink answers",
    ),
    (
        "upgrade",
        &["--exact", "a_rollback_from_a_newer_layout_of_the_same_formats_loses_no_connection"],
        "another layout taken over under traffic, its flows carried",
    ),
];

/// An unpacked kernel: its image, the root its modules are under, and its release.
struct Unpacked {
    vmlinuz: PathBuf,
    root: PathBuf,
    release: String,
}

fn apt_options(dir: &Path) -> Vec<String> {
    vec![
        format!("-oDir::Etc::SourceList={}", dir.join("sources.list").display()),
        "-oDir::Etc::SourceParts=/nonexistent".into(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oDir::State::Status=/dev/null".into(),
        "-oAPT::Get::List-Cleanup=0".into(),
        "-q".into(),
    ]
}

/// Fetches and unpacks `k` (once: kept in the cache).
fn fetch(k: &Kernel) -> anyhow::Result<Unpacked> {
    let dir = Path::new(CACHE).join(k.dist);
    let root = dir.join("root");
    if let Some(u) = unpacked(&root)? {
        return Ok(u);
    }
    println!("kernels: fetching Debian's {} kernel ({})", k.name, k.dist);
    for d in ["lists/partial", "cache/archives/partial", "deb"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::write(dir.join("sources.list"), k.sources.join("\n") + "\n")?;
    let apt = apt_options(&dir);
    run_cmd(Command::new("apt-get").args(&apt).arg("update"))
        .context("apt-get update (the kernels' own sources)")?;
    // The metapackage names the kernel's package.
    let out = Command::new("apt-cache").args(&apt).args(["depends", "linux-image-amd64"]).output()?;
    let deps = String::from_utf8_lossy(&out.stdout);
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && !p.contains("unsigned"))
        .or_else(|| {
            deps.lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
                .find(|p| p.starts_with("linux-image-"))
        })
        .with_context(|| format!("no kernel package behind linux-image-amd64 in {}:\n{deps}", k.dist))?
        .to_string();
    let _ = std::fs::remove_dir_all(dir.join("deb"));
    std::fs::create_dir_all(dir.join("deb"))?;
    run_cmd(Command::new("apt-get").current_dir(dir.join("deb")).args(&apt).args(["download", &package]))?;
    let deb = std::fs::read_dir(dir.join("deb"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let tmp = dir.join("root.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let release = releases(&tmp)?.into_iter().next().context("no /lib/modules in the kernel package")?;
    run_cmd(Command::new("depmod").arg("-b").arg(&tmp).arg(&release))?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&tmp, &root)?;
    let _ = std::fs::remove_dir_all(dir.join("deb"));
    unpacked(&root)?.context("the unpacked kernel has no vmlinuz")
}

fn releases(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("lib/modules"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

fn unpacked(root: &Path) -> anyhow::Result<Option<Unpacked>> {
    let Some(release) = releases(root)?.into_iter().next() else { return Ok(None) };
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    let deps = root.join("lib/modules").join(&release).join("modules.dep");
    Ok((vmlinuz.is_file() && deps.is_file()).then(|| Unpacked { vmlinuz, root: root.to_path_buf(), release }))
}

/// The modules to load, dependencies first, as paths under the kernel's module directory.
fn module_order(deps: &str, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let table: Vec<(&str, Vec<&str>)> = deps
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m, d.split_whitespace().collect()))
        .collect();
    let mut order = Vec::new();
    fn add<'a>(m: &'a str, table: &[(&'a str, Vec<&'a str>)], order: &mut Vec<String>) {
        if order.iter().any(|o| o == m) {
            return;
        }
        // modules.dep lists every dependency, the deepest last: load them in reverse.
        if let Some((_, d)) = table.iter().find(|(n, _)| *n == m) {
            for dep in d.iter().rev() {
                add(dep, table, order);
            }
        }
        order.push(m.to_string());
    }
    for name in wanted {
        let file =
            |m: &str| m.rsplit('/').next().unwrap_or(m).split('.').next().unwrap_or(m).replace('-', "_");
        // Not listed: built in.
        if let Some((m, _)) = table.iter().find(|(m, _)| file(m) == name.replace('-', "_")) {
            add(m, &table, &mut order);
        }
    }
    Ok(order)
}

/// Packs the initramfs for `k` at `out`.
fn initramfs(k: &Unpacked, out: &Path) -> anyhow::Result<()> {
    let modules = k.root.join("lib/modules").join(&k.release);
    let deps = std::fs::read_to_string(modules.join("modules.dep"))?;
    let order = module_order(&deps, MODULES)?;
    let work = out.with_extension("d");
    let _ = std::fs::remove_dir_all(&work);
    for d in ["bin", "modules", "proc", "sys", "dev", "host"] {
        std::fs::create_dir_all(work.join(d))?;
    }
    std::fs::copy("/bin/busybox", work.join("bin/busybox")).context("busybox-static")?;
    let mut names = Vec::new();
    for m in &order {
        let src = modules.join(m);
        let base = m.rsplit('/').next().unwrap_or(m);
        let (name, unpack): (&str, Option<&str>) = match base.rsplit_once('.') {
            Some((n, "xz")) => (n, Some("xz")),
            Some((n, "zst")) => (n, Some("zstd")),
            _ => (base, None),
        };
        let dst = work.join("modules").join(name);
        match unpack {
            Some(tool) => {
                let data = Command::new(tool).arg("-dc").arg(&src).output()?;
                anyhow::ensure!(data.status.success(), "{tool} -dc {}", src.display());
                std::fs::write(&dst, data.stdout)?;
            }
            None => {
                std::fs::copy(&src, &dst)?;
            }
        }
        names.push(name.to_string());
    }
    std::fs::write(work.join("modules/order"), names.join("\n") + "\n")?;
    let init = work.join("init");
    std::fs::write(&init, INIT)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let status = Command::new("sh")
        .current_dir(&work)
        .arg("-c")
        .arg(format!("find . | cpio -o -H newc --quiet | gzip -1 > '{}'", out.display()))
        .status()?;
    anyhow::ensure!(status.success(), "packing the initramfs (cpio, gzip)");
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The guest's init: modules, the host's root (read-only) with writable /tmp, /run and /root,
/// bpffs; then the job in the host's root; then power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "guest: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host || echo "guest: no host root"
mount -t tmpfs tmp /host/tmp && mkdir -p /host/tmp/job
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 job /host/tmp/job || echo "guest: no job share"
mount -t tmpfs run /host/run; mount -t tmpfs root /host/root
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t devtmpfs dev /host/dev
mount -t bpf bpf /host/sys/fs/bpf
mkdir -p /host/dev/pts /host/dev/shm; mount -t devpts pts /host/dev/pts; mount -t tmpfs shm /host/dev/shm
echo "guest: $(uname -r) up"
chroot /host /bin/sh /tmp/job/job.sh > /host/tmp/job/job.log 2>&1
echo "guest: done"
poweroff -f
"#;

/// Whether a row runs: `LB_KERNEL_TESTS=nodeport_packets,e2e` runs only those test binaries'
/// rows, and a test's own name only its row (while working on one kernel's failure); the others
/// show as not run.
fn selected(test: &str, args: &[&str]) -> bool {
    std::env::var("LB_KERNEL_TESTS")
        .ok()
        .is_none_or(|o| o.split(',').map(str::trim).any(|t| t == test || args.last() == Some(&t)))
}

/// The job: each test, its log, its exit code and seconds in `results`.
fn job_script(binaries: &[(String, PathBuf)]) -> anyhow::Result<String> {
    let mut s = String::from(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=0\n\
         cd /tmp\n\
         ip link set lo up\n\
         run() { n=$1; shift; s=$(date +%s); \"$@\" > /tmp/job/$n.log 2>&1; rc=$?; echo \"$n $rc $(( $(date +%s) - s ))\" >> /tmp/job/results; }\n",
    );
    for (i, (test, args, _)) in TESTS.iter().enumerate().filter(|(_, (t, a, _))| selected(t, a)) {
        let bin =
            &binaries.iter().find(|(n, _)| n == test).with_context(|| format!("no test binary {test}"))?.1;
        s += &format!("run t{i} {} --test-threads 1 {}\n", bin.display(), args.join(" "));
    }
    Ok(s)
}

/// Builds the test binaries (and `lbctl`, which tests run from beside the agent: a plain `cargo
/// test` builds it, `--no-run -p lb-agent` does not); their names and paths.
fn build_tests() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = Command::new("cargo")
        .current_dir(root())
        .args(["build", "--locked", "-p", "lbctl"])
        .output()
        .context("cargo build -p lbctl")?;
    anyhow::ensure!(out.status.success(), "building lbctl failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let mut names: Vec<&str> = TESTS.iter().map(|(t, _, _)| *t).collect();
    names.dedup();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).args(["test", "--locked", "--no-run", "-p", "lb-agent"]);
    for n in &names {
        cmd.args(["--test", n]);
    }
    let out = cmd.output().context("cargo test --no-run")?;
    let text = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "building the tests failed:\n{text}");
    // "  Executable tests/e2e.rs (target/debug/deps/e2e-0123abcd)"
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Executable tests/"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(".rs (")?;
            Some((name.to_string(), root().join(rest.trim_end_matches(')'))))
        })
        .collect())
}

/// One kernel's outcome: each test's (exit code, seconds), and the boot's whole time.
struct Outcome {
    results: Vec<(usize, i32, u64)>,
    took: Duration,
    /// Whether any row started (has a log).
    started: bool,
}

/// Boots `k` and runs the job; boots it once more when the guest ran none of the rows that were
/// to run: no test started, so no program of lb's was loaded, and the emulated machine, not lb,
/// is what failed (its console says how). A second such boot leaves the rows as not run.
fn boot_and_run(k: &Kernel, u: &Unpacked, binaries: &[(String, PathBuf)]) -> anyhow::Result<Outcome> {
    let o = boot(k, u, binaries)?;
    if o.started || !TESTS.iter().any(|(t, a, _)| selected(t, a)) {
        return Ok(o);
    }
    let dir = kernel_dir(k);
    println!(
        "kernels: {}: the guest ran none of its tests in {} s; the end of its console:\n{}\nof its job's output:\n{}\nkernels: booting {} again",
        k.name,
        o.took.as_secs(),
        log_tail(&dir.join("console.log"), 30),
        log_tail(&dir.join("job/job.log"), 20),
        k.name
    );
    boot(k, u, binaries)
}

/// Where a kernel's run keeps its initramfs, console and job (`job/t<row>.log`, `job/results`).
fn kernel_dir(k: &Kernel) -> PathBuf {
    root().join("target/kernels").join(k.name)
}

fn boot(k: &Kernel, u: &Unpacked, binaries: &[(String, PathBuf)]) -> anyhow::Result<Outcome> {
    let dir = kernel_dir(k);
    let _ = std::fs::remove_dir_all(&dir);
    let job = dir.join("job");
    std::fs::create_dir_all(&job)?;
    std::fs::write(job.join("job.sh"), job_script(binaries)?)?;
    let initrd = dir.join("initrd.gz");
    initramfs(u, &initrd)?;
    let started = Instant::now();
    let console = std::fs::File::create(dir.join("console.log"))?;
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-smp", "2", "-m", "2048", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&u.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(["-virtfs", "local,path=/,mount_tag=hostroot,readonly=on,security_model=none,multidevs=remap"])
        .arg("-virtfs")
        .arg(format!("local,path={},mount_tag=job,security_model=none", job.display()))
        .stdin(std::process::Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("qemu-system-x86_64")?;
    let limit = Duration::from_secs(30 * 60);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "kernel {}: still running after {} minutes (console: {})",
                k.name,
                30,
                dir.join("console.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let results = std::fs::read_to_string(job.join("results")).unwrap_or_default();
    let results = results
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let i: usize = it.next()?.strip_prefix('t')?.parse().ok()?;
            let rc: i32 = it.next()?.parse().ok()?;
            // A filter that matches no test exits 0 too: a pass is at least one test passed.
            let log = std::fs::read_to_string(job.join(format!("t{i}.log"))).unwrap_or_default();
            let ran = log.lines().any(|l| l.starts_with("test result: ok.") && !l.contains(" 0 passed"));
            let rc = if rc == 0 && !ran { -2 } else { rc };
            Some((i, rc, it.next()?.parse().ok()?))
        })
        .collect();
    let began = std::fs::read_dir(&job)?.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with('t') && name.ends_with(".log")
    });
    Ok(Outcome { results, took: started.elapsed(), started: began })
}

pub fn run() -> anyhow::Result<()> {
    crate::setup::step("kernel matrix packages", || crate::setup::apt_install(PACKAGES))?;
    let binaries = build_tests()?;
    let mut table = vec!["| kernel | test | result | seconds |".to_string(), "|---|---|---|---|".to_string()];
    let mut failed = Vec::new();
    // `LB_KERNELS=5.10,6.1` runs only those (while working on one kernel's failure); the
    // matrix CI runs is all of them.
    let only = std::env::var("LB_KERNELS").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|k| k.trim() == name));
    for k in KERNELS.iter().filter(|k| wanted(k.name)) {
        // A kernel whose tests cannot run fails its row, saying why; the others still run.
        let mut not_run = |release: &str, why: String| {
            failed.push(format!("{} ({release}): {why}", k.name));
            table.push(format!("| {} ({release}) | every test | not run: {why} | 0 |", k.name));
        };
        let u = match fetch(k) {
            Ok(u) => u,
            Err(e) => {
                not_run("?", format!("fetching its kernel: {e:#}"));
                continue;
            }
        };
        // The row names a kernel line: a distribution that moved past it is said, not tested
        // under the old name.
        if !u.release.starts_with(&format!("{}.", k.name)) {
            not_run(
                &u.release,
                format!("{} moved to another kernel line: update the matrix (xtask/src/kernels.rs)", k.dist),
            );
            continue;
        }
        println!("kernels: booting {} ({}) in qemu", k.name, u.release);
        let o = match boot_and_run(k, &u, &binaries) {
            Ok(o) => o,
            Err(e) => {
                let console = kernel_dir(k).join("console.log");
                println!("kernels: {}: the end of the guest's console:\n{}", k.name, log_tail(&console, 30));
                not_run(&u.release, format!("booting it: {e:#}"));
                continue;
            }
        };
        for (i, (test, args, what)) in TESTS.iter().enumerate() {
            let (rc, secs) =
                o.results.iter().find(|(t, _, _)| *t == i).map_or((-1, 0), |(_, rc, s)| (*rc, *s));
            let result = match rc {
                0 => "pass".to_string(),
                -1 => "did not run".to_string(),
                -2 => "no test ran".to_string(),
                rc => format!("FAIL ({rc})"),
            };
            println!("kernels: {} {} {}: {result} in {secs} s", k.name, test, args.last().unwrap_or(&""));
            table.push(format!("| {} ({}) | {what} | {result} | {secs} |", k.name, u.release));
            if rc != 0 {
                let log = kernel_dir(k).join(format!("job/t{i}.log"));
                // What the row's log says is printed too (CI keeps only what the matrix printed,
                // not the tree): a row that failed, found no test, or started and never finished
                // (a guest that hung or died). A row filtered out has no log.
                if log.exists() {
                    println!("kernels: {} {what}: from its log:\n{}", k.name, log_excerpt(&log));
                }
                failed.push(format!("{} {what}: see {}", k.name, log.display()));
            }
        }
        println!("kernels: {} took {} s", k.name, o.took.as_secs());
    }
    let report = table.join("\n") + "\n";
    std::fs::write(root().join("target/kernels/matrix.md"), &report)?;
    println!("{report}");
    anyhow::ensure!(failed.is_empty(), "the kernel matrix failed:\n{}", failed.join("\n"));
    Ok(())
}

/// What a test's log says of a failure: from libtest's first "---- <test> stdout ----" section
/// (the panic, what the test printed) when there is one, else its last 60 lines; long excerpts
/// keep their first 80 and last 40 lines.
fn log_excerpt(path: &Path) -> String {
    let text = match read_log(path) {
        Ok(text) => text,
        Err(why) => return why,
    };
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return "(empty)".to_string();
    }
    let Some(from) = all.iter().position(|l| l.starts_with("---- ")) else { return tail(&all, 60) };
    let part = &all[from..];
    if part.len() <= 120 {
        return part.join("\n");
    }
    let skipped = part.len() - 120;
    format!("{}\n[... {skipped} lines ...]\n{}", part[..80].join("\n"), part[part.len() - 40..].join("\n"))
}

/// The last `lines` lines of a file, or why it cannot be read.
fn log_tail(path: &Path, lines: usize) -> String {
    read_log(path).map_or_else(|why| why, |text| tail(&text.lines().collect::<Vec<_>>(), lines))
}

/// A log's text (read lossily: a test may print anything), or why it cannot be read.
fn read_log(path: &Path) -> Result<String, String> {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .map_err(|e| format!("(cannot read {}: {e})", path.display()))
}

/// The last `n` of `lines`, joined.
fn tail(lines: &[&str], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failed_rows_log_is_excerpted_from_its_failure() {
        let dir = std::env::temp_dir().join(format!("lb-log-excerpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("t0.log");
        let write = |text: String| std::fs::write(&log, text).expect("log");
        // No failure section: the last 60 lines.
        write((1..=100).map(|n| format!("line {n}\n")).collect());
        let got = super::log_excerpt(&log);
        assert!(got.starts_with("line 41\n") && got.ends_with("line 100"), "{got}");
        // From libtest's failure section on.
        write("running 1 test\ntest t ... FAILED\n\nfailures:\n\n---- t stdout ----\npanicked: why\n".into());
        assert_eq!(super::log_excerpt(&log), "---- t stdout ----\npanicked: why");
        // A long one keeps its first 80 and last 40 lines.
        write(
            std::iter::once("---- t stdout ----\n".to_string())
                .chain((1..=200).map(|n| format!("{n}\n")))
                .collect(),
        );
        let got = super::log_excerpt(&log);
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(
            (lines.len(), lines[79], lines[80], lines[81], lines[120]),
            (121, "79", "[... 81 lines ...]", "161", "200")
        );
        write(String::new());
        assert_eq!(super::log_excerpt(&log), "(empty)");
        let missing = super::log_excerpt(&dir.join("t1.log"));
        assert!(missing.starts_with("(cannot read ") && missing.contains("t1.log"), "{missing}");
        assert_eq!(super::log_tail(&log, 3), "");
        std::fs::remove_dir_all(&dir).expect("remove");
    }

    #[test]
    fn modules_load_after_what_they_depend_on() {
        let deps = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko\n\
                    kernel/net/9p/9pnet.ko:\n\
                    kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\n\
                    kernel/fs/netfs/netfs.ko:\n\
                    kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko\n";
        let order = super::module_order(deps, &["9pnet_virtio", "9p", "veth"]).expect("order");
        assert_eq!(
            order,
            [
                "kernel/net/9p/9pnet.ko",
                "kernel/net/9p/9pnet_virtio.ko.xz",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/fscache/fscache.ko",
                "kernel/fs/9p/9p.ko"
            ]
        );
    }

    /// The bridge as Debian's kernels list it (5.10, 6.1 and 6.12 alike).
    #[test]
    fn the_bridge_loads_after_stp_and_llc() {
        let deps = "kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz\n\
                    kernel/net/llc/llc.ko.xz:\n\
                    kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz\n\
                    kernel/net/bridge/br_netfilter.ko.xz: kernel/net/bridge/bridge.ko.xz \
                    kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz\n";
        let order = super::module_order(deps, super::MODULES).expect("order");
        assert_eq!(
            order,
            ["kernel/net/llc/llc.ko.xz", "kernel/net/802/stp.ko.xz", "kernel/net/bridge/bridge.ko.xz"]
        );
    }
}
