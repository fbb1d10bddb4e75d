//! `cargo xtask setup`: installs, idempotently, what building and testing lb need. A second run
//! only checks, in a few seconds. Anything that cannot be installed is reported on one line with
//! what is missing and how to get it.

use std::process::Command;

use anyhow::{bail, Context as _};

/// The LLVM major that bpf-linker is built against; the eBPF nightly must use the same one.
const LLVM_MAJOR: &str = "22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain that builds the eBPF crate (see lb-agent/build.rs and shared TOOLCHAIN notes).
pub const EBPF_TOOLCHAIN: &str = "nightly";

/// Debian packages: what needs them.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "bpf-linker builds and runs against LLVM 22"),
    ("iproute2", "ip: namespaces, veth pairs and routes in tests and the demo"),
    ("bpftool", "inspecting programs and maps"),
    ("ethtool", "turning checksum offload off in tests"),
    ("iptables", "the hairpin test's ctstate INVALID rule; kube-proxy's iptables mode in the benchmarks"),
    ("podman", "building the agent image and running it as the DaemonSet does, with no registry"),
    ("runc", "podman's runtime (crun refuses this host's cgroups)"),
];

/// Debian packages only the benchmarks need: the load generator, the backends and kube-proxy's
/// dataplanes to compare with.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("wrk", "the load generator of the traffic benchmarks"),
    ("nginx", "the backends of the traffic benchmarks"),
    ("nftables", "kube-proxy's nftables mode"),
];

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn step(name: &str, f: impl FnOnce() -> anyhow::Result<&'static str>) -> anyhow::Result<()> {
    match f() {
        Ok(what) => {
            println!("setup: {name}: {what}");
            Ok(())
        }
        Err(e) => bail!("setup: {name}: {e:#}"),
    }
}

fn apt_packages() -> anyhow::Result<&'static str> {
    apt_install(APT_PACKAGES)
}

pub(crate) fn apt_install(packages: &[(&str, &str)]) -> anyhow::Result<&'static str> {
    let installed = |p: &str| {
        output("dpkg-query", &["-W", "-f=${Status}", p]).is_some_and(|s| s.trim() == "install ok installed")
    };
    let missing: Vec<&str> = packages.iter().map(|(p, _)| *p).filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok("present");
    }
    let why: Vec<String> =
        packages.iter().filter(|(p, _)| missing.contains(p)).map(|(p, w)| format!("{p} ({w})")).collect();
    println!("setup: installing {}", why.join(", "));
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("apt-get not found")?;
        anyhow::ensure!(status.success(), "apt-get {} failed", args.join(" "));
        Ok(())
    };
    apt(&["update", "-qq"])
        .and_then(|()| apt(&[&["install", "-y", "-qq", "--no-install-recommends"][..], &missing].concat()))
        .with_context(|| {
            format!("missing {}: run as root, or `apt-get install {}`", missing.join(" "), missing.join(" "))
        })?;
    Ok("installed")
}

fn nightly() -> anyhow::Result<&'static str> {
    let v = output("rustc", &[&format!("+{EBPF_TOOLCHAIN}"), "-vV"]).with_context(|| {
        format!("no `{EBPF_TOOLCHAIN}` toolchain: `rustup toolchain install {EBPF_TOOLCHAIN}` (one with LLVM {LLVM_MAJOR})")
    })?;
    let llvm = v.lines().find_map(|l| l.strip_prefix("LLVM version: ")).unwrap_or("unknown");
    anyhow::ensure!(
        llvm.split('.').next() == Some(LLVM_MAJOR),
        "`{EBPF_TOOLCHAIN}` uses LLVM {llvm}, bpf-linker needs LLVM {LLVM_MAJOR}: install a nightly with LLVM {LLVM_MAJOR} (2026-05-19 has 22.1) and do not `rustup update nightly`"
    );
    let components = output("rustup", &["component", "list", "--toolchain", EBPF_TOOLCHAIN, "--installed"])
        .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        return Ok("LLVM 22, rust-src present");
    }
    let status = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", EBPF_TOOLCHAIN])
        .status()?;
    anyhow::ensure!(
        status.success(),
        "could not add rust-src: `rustup component add rust-src --toolchain {EBPF_TOOLCHAIN}`"
    );
    Ok("rust-src installed")
}

/// Runs `install` unless `present`; on failure, says how to install by hand.
fn install_unless(present: bool, install: &mut Command, how: &str) -> anyhow::Result<&'static str> {
    if present {
        return Ok("present");
    }
    let status = install.status().with_context(|| format!("running {install:?}"))?;
    anyhow::ensure!(status.success(), "could not install it: {how}");
    Ok("installed")
}

fn bpf_linker() -> anyhow::Result<&'static str> {
    let present = output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !present {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about a minute)"
        );
    }
    let llvm = format!("llvm-{LLVM_MAJOR}");
    install_unless(
        present,
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", &llvm])
            .env("LLVM_PREFIX", format!("/usr/lib/{llvm}")),
        &format!("it needs {llvm}-dev and crates.io"),
    )
}

/// kubernetes-validate (PyPI) checks the deploy manifests against the Kubernetes schemas offline.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

fn kubernetes_validate() -> anyhow::Result<&'static str> {
    install_unless(
        output("kubernetes-validate", &["--version"]).is_some(),
        Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            KUBERNETES_VALIDATE,
        ]),
        &format!("`python3 -m pip install {KUBERNETES_VALIDATE}`"),
    )
}

/// cargo-deny checks the dependency policy (`deny.toml`) in the test command.
const CARGO_DENY_VERSION: &str = "0.20.2";

fn cargo_deny() -> anyhow::Result<&'static str> {
    let present = output("cargo", &["deny", "--version"]).is_some_and(|v| v.contains(CARGO_DENY_VERSION));
    if !present {
        println!("setup: building cargo-deny {CARGO_DENY_VERSION} (about three minutes)");
    }
    install_unless(
        present,
        Command::new("cargo").args(["install", "cargo-deny", "--locked", "--version", CARGO_DENY_VERSION]),
        &format!("`cargo install cargo-deny --locked --version {CARGO_DENY_VERSION}`"),
    )
}

/// podman's settings for this machine kind: runc (crun refuses its hybrid cgroups) and limits
/// root's containers can take (podman's default ulimits for root fail here).
const CONTAINERS_CONF: &str = "/etc/containers/containers.conf.d/lb.conf";
const CONTAINERS_CONF_TEXT: &str = "# Written by `cargo xtask setup` (lb).\n\
[containers]\n\
default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
[engine]\n\
runtime = \"runc\"\n";

fn containers_conf() -> anyhow::Result<&'static str> {
    if std::fs::read_to_string(CONTAINERS_CONF).is_ok_and(|t| t == CONTAINERS_CONF_TEXT) {
        return Ok("present");
    }
    let path = std::path::Path::new(CONTAINERS_CONF);
    std::fs::create_dir_all(path.parent().expect("a directory"))
        .and_then(|()| std::fs::write(path, CONTAINERS_CONF_TEXT))
        .with_context(|| format!("writing {CONTAINERS_CONF} (run as root)"))?;
    Ok("written")
}

/// `kubectl kustomize` renders the deploy/ installs in the tests (`cargo xtask test` checks it).
/// The machines lb is developed on have it; no registry these reach offers it, so it is checked,
/// not installed.
pub fn kubectl() -> anyhow::Result<&'static str> {
    anyhow::ensure!(
        output("kubectl", &["version", "--client"]).is_some(),
        "kubectl not found: the deploy tests render the kustomizations with `kubectl kustomize`; \
         install kubectl (https://kubernetes.io/docs/tasks/tools/)"
    );
    Ok("present")
}

fn bpffs() -> anyhow::Result<&'static str> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok("mounted");
    }
    let status = Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]).status()?;
    anyhow::ensure!(status.success(), "could not mount bpffs: `mount -t bpf bpf /sys/fs/bpf` as root");
    Ok("mounted now")
}

pub fn run() -> anyhow::Result<()> {
    step("apt packages", apt_packages)?;
    step("eBPF toolchain", nightly)?;
    step("bpf-linker", bpf_linker)?;
    step("bpffs", bpffs)?;
    step("podman settings", containers_conf)?;
    step("kubernetes-validate", kubernetes_validate)?;
    step("cargo-deny", cargo_deny)?;
    Ok(())
}

/// What the benchmarks need beyond the set-up.
pub fn bench() -> anyhow::Result<()> {
    step("benchmark packages", || apt_install(BENCH_PACKAGES))
}
