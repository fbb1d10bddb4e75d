//! `cargo xtask bench`: per-packet cost through BPF_PROG_TEST_RUN beside no-op programs measured
//! in the same run, Maglev table figures, and control-plane figures of the agent binary (cold
//! start, change latency); the results go to BENCHMARKS.md.

use std::process::Command;

use crate::{root, run_cmd, setup};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Fewer repetitions (a quick look, not for BENCHMARKS.md).
    #[arg(long)]
    quick: bool,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    setup::run()?;
    println!("bench: building (release)");
    run_cmd(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "lb-agent",
        "--example",
        "bench_datapath",
    ]))?;
    let mut cmd = Command::new(root().join("target/release/examples/bench_datapath"));
    cmd.arg("--markdown").arg(root().join("BENCHMARKS.md"));
    if o.quick {
        cmd.arg("--quick");
    }
    run_cmd(&mut cmd)
}
