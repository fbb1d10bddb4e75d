//! `cargo xtask demo`: sets up, builds in release mode, and runs the demo cluster.

use std::process::Command;

use crate::{root, run_cmd, setup_and_build_release};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Tear down as soon as the demo has shown its results.
    #[arg(long)]
    once: bool,
    /// Where the pod → service direction runs.
    #[arg(long, default_value = "tc", value_parser = ["tc", "xdp"])]
    datapath: String,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    let target = setup_and_build_release("demo", &["demo"])?;
    let mut cmd = Command::new(target.join("examples/demo"));
    cmd.arg("--agent").arg(target.join("lb-agent")).arg("--lbctl").arg(target.join("lbctl"));
    cmd.args(["--datapath", &o.datapath]).arg("--examples").arg(root().join("deploy/examples"));
    if o.once {
        cmd.arg("--once");
    }
    run_cmd(&mut cmd)
}
