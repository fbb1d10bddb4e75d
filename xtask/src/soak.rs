//! `cargo xtask soak`: the load test for long: 10,000 Services × 10 endpoints programmed under
//! traffic, then 100 endpoint changes a second for `--seconds` (the test suite runs 60 s).

use std::process::Command;

use crate::{root, run_cmd, setup};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Seconds of churn.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    setup::run()?;
    println!("soak: {} s of 100 endpoint changes a second under traffic", o.seconds);
    run_cmd(
        Command::new("cargo")
            .current_dir(root())
            .args(["test", "--release", "--locked", "-p", "lb-agent", "--test", "load", "--", "--nocapture"])
            .env("LB_SOAK_SECS", o.seconds.to_string()),
    )
}
