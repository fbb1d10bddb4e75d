//! `cargo xtask test`: the whole suite, as CI runs it. Plain `cargo test` covers the default
//! members (everything but lb-ebpf, which lb-agent builds for BPF and tests through the kernel).
//!
//! `cargo xtask test --fresh` runs the same command from a fresh clone with an empty cargo home
//! and target directory, so that nothing an earlier command installed can hide a missing step.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::Context as _;

use crate::{root, run_cmd, setup};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Run the suite from a fresh `git clone` of HEAD, with an empty CARGO_HOME and target
    /// directory and no earlier cargo bin directory on PATH (proves the set-up is complete).
    #[arg(long)]
    fresh: bool,
    /// With --fresh: keep the clone and its cargo home afterwards (to look at a failure).
    #[arg(long, requires = "fresh")]
    keep: bool,
    /// Instead of the suite: the kernel matrix (Debian's 5.10, 6.1 and 6.12 kernels booted in
    /// qemu, each running the packet tables and end-to-end tests).
    #[arg(long, conflicts_with = "fresh")]
    kernels: bool,
    /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    if o.fresh {
        return fresh(o);
    }
    setup::run()?;
    if o.kernels {
        return crate::kernels::run();
    }
    setup::step("kubectl", setup::kubectl)?;
    anyhow::ensure!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the tests load eBPF programs and create network namespaces: run them as root"
    );
    policy()?;
    let previous = crate::previous::build()?;
    run_cmd(
        Command::new("cargo")
            .current_dir(root())
            .env("LB_PREVIOUS_AGENT", previous)
            .args(["test", "--locked"])
            .args(&o.args),
    )
}

/// The dependency policy (deny.toml): licenses, banned crates, sources. Advisories need the
/// RustSec database from the network, which these machines do not reach.
fn policy() -> anyhow::Result<()> {
    // cargo-deny reads every crate of the lockfile, those of other platforms too, and a build
    // downloads only this platform's: fetch them all first.
    let out = Command::new("cargo")
        .current_dir(root())
        .args(["fetch", "--locked"])
        .output()
        .context("running cargo fetch")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("no output").trim();
        anyhow::bail!(
            "dependency policy: cannot download the crates Cargo.lock names (`cargo fetch --locked`: {why}); \
             the policy check needs them all, for every platform"
        );
    }
    println!("dependency policy: crates fetched; checking licenses, bans and sources");
    run_cmd(Command::new("cargo").current_dir(root()).args([
        "deny",
        "--log-level",
        "error",
        "--offline",
        "check",
        "licenses",
        "bans",
        "sources",
    ]))
    .context("dependency policy (deny.toml) violated, see above")
}

/// What a fresh run cannot reset: installed system-wide, outside a cargo home or a clone.
const NOT_RESET: &[&str] = &[
    "Debian packages (apt) that an earlier set-up installed",
    "rustup toolchains and components under ~/.rustup (the nightly's rust-src among them)",
    "Python packages (kubernetes-validate)",
    "the bpffs mount at /sys/fs/bpf",
];

fn fresh(o: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let top = std::env::temp_dir().join(format!("lb-fresh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&top);
    std::fs::create_dir_all(&top).with_context(|| format!("creating {}", top.display()))?;
    let result = fresh_in(o, &top);
    if o.keep {
        println!("fresh: kept {}", top.display());
    } else {
        let _ = std::fs::remove_dir_all(&top);
    }
    result?;
    let secs = started.elapsed().as_secs();
    println!("fresh: the suite passed from a fresh clone in {} min {} s", secs / 60, secs % 60);
    Ok(())
}

fn fresh_in(o: &Options, top: &Path) -> anyhow::Result<()> {
    let dirty = Command::new("git").current_dir(root()).args(["status", "--porcelain"]).output()?;
    if !dirty.stdout.is_empty() {
        println!("fresh: note: uncommitted changes are not in the clone (it takes HEAD)");
    }
    let clone = top.join("lb");
    run_cmd(Command::new("git").args(["clone", "--quiet", "--no-hardlinks"]).arg(root()).arg(&clone))?;
    // A cargo home of its own whose bin holds only rustup's proxies (rustup acts as the tool its
    // link is named after): whatever `cargo install` put in the old one is not found.
    let cargo_home = top.join("cargo-home");
    let bin = cargo_home.join("bin");
    std::fs::create_dir_all(&bin)?;
    let rustup = which("rustup").context("rustup not found on PATH")?;
    for tool in ["cargo", "rustc", "rustdoc", "rustup"] {
        std::os::unix::fs::symlink(&rustup, bin.join(tool))?;
    }
    let old_homes: Vec<PathBuf> = [
        std::env::var_os("CARGO_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")),
    ]
    .into_iter()
    .flatten()
    .map(|h| h.join("bin"))
    .collect();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let kept: Vec<PathBuf> = std::env::split_paths(&path).filter(|p| !old_homes.contains(p)).collect();
    let path = std::env::join_paths(std::iter::once(bin.clone()).chain(kept))?;
    println!("fresh: clone of HEAD in {}, empty CARGO_HOME {}", clone.display(), cargo_home.display());
    println!("fresh: cannot reset (set-up checks these, and installs them when missing):");
    for what in NOT_RESET {
        println!("fresh:   - {what}");
    }
    let mut cmd = Command::new(bin.join("cargo"));
    cmd.current_dir(&clone).args(["xtask", "test"]).args(&o.args);
    // Nothing of this cargo's environment leaks in: the child's cargo sets its own.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO") || k == "RUSTUP_TOOLCHAIN" || k == "RUSTC" || k == "RUSTDOC" {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.env("CARGO_HOME", &cargo_home).env("PATH", path);
    run_cmd(&mut cmd).context("the suite failed in the fresh clone")
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}
