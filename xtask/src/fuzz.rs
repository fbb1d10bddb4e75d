//! `cargo xtask fuzz`: a long run of the hostile-packet test (random and mutated packets through
//! the TC and XDP programs). The test suite runs a bounded one.

use std::process::Command;

use crate::{root, run_cmd, setup};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Packets to generate (each goes through three programs).
    #[arg(long, default_value_t = 2_000_000)]
    packets: u64,
    /// Seed of the generator (default: from the clock; printed, so a failure can be replayed).
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    setup::run()?;
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("fuzz: {} packets, seed {seed} (replay with --seed {seed})", o.packets);
    run_cmd(
        Command::new("cargo")
            .current_dir(root())
            .args([
                "test",
                "--release",
                "--locked",
                "-p",
                "lb-agent",
                "--test",
                "fuzz_packets",
                "--",
                "--nocapture",
            ])
            .env("LB_FUZZ_PACKETS", o.packets.to_string())
            .env("LB_FUZZ_SEED", seed.to_string()),
    )
}
