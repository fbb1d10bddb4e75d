//! `cargo xtask test`: the whole suite, as CI runs it. Plain `cargo test` covers the default
//! members (everything but lb-ebpf, which lb-agent builds for BPF and tests through the kernel).

use std::process::Command;

use crate::{root, run_cmd, setup};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Extra arguments for `cargo test` (a filter, `--nocapture`, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    setup::run()?;
    anyhow::ensure!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "the tests load eBPF programs and create network namespaces: run them as root"
    );
    // The dependency policy (deny.toml): licenses, banned crates, sources. Advisories need the
    // RustSec database from the network, which these machines do not reach.
    run_cmd(Command::new("cargo").current_dir(root()).args([
        "deny",
        "--log-level",
        "error",
        "--offline",
        "check",
        "licenses",
        "bans",
        "sources",
    ]))?;
    run_cmd(Command::new("cargo").current_dir(root()).args(["test", "--locked"]).args(&o.args))
}
