//! Build, set-up, test, demo and benchmark entry points: `cargo xtask <command>`.

mod bench;
mod demo;
mod fuzz;
mod image;
mod kernels;
mod previous;
mod setup;
mod soak;
mod test;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "lb development tasks")]
enum Command {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Set up, then run the whole test suite.
    Test(test::Options),
    /// Set up, build, and run the demo cluster in network namespaces.
    Demo(demo::Options),
    /// Set up, build, and run the benchmarks; writes BENCHMARKS.md.
    Bench(bench::Options),
    /// Build the agent image with podman (no registry needed); `--save FILE` writes an OCI archive.
    Image(image::Options),
    /// Build the agent of the previous pin layout from the git history (the upgrade test's).
    PreviousAgent,
    /// A long run of the hostile-packet fuzzer (the test suite runs a short one).
    Fuzz(fuzz::Options),
    /// A long run of the load test: 10,000 Services and 100 endpoint changes a second under traffic.
    Soak(soak::Options),
}

fn main() -> std::process::ExitCode {
    let result = match Command::parse() {
        Command::Setup => setup::run(),
        Command::Test(o) => test::run(&o),
        Command::Demo(o) => demo::run(&o),
        Command::Bench(o) => bench::run(&o),
        Command::Image(o) => image::run(&o),
        Command::PreviousAgent => previous::run(),
        Command::Fuzz(o) => fuzz::run(&o),
        Command::Soak(o) => soak::run(&o),
    };
    // The error and its causes on one line; never a backtrace, whatever RUST_BACKTRACE says
    // (returning the error from main would print one when it is set).
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a command, failing with its command line if it fails.
pub(crate) fn run_cmd(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let status = cmd.status().map_err(|e| anyhow::anyhow!("{cmd:?}: {e}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Runs the set-up, then builds lb-agent's binaries and the given examples in release mode;
/// returns the directory they are in.
pub(crate) fn setup_and_build_release(what: &str, examples: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    setup::run()?;
    println!("{what}: building (release)");
    let mut cmd = std::process::Command::new("cargo");
    cmd.current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "lb-agent",
        "-p",
        "lbctl",
        "--bins",
    ]);
    for e in examples {
        cmd.args(["--example", e]);
    }
    run_cmd(&mut cmd)?;
    Ok(root().join("target/release"))
}
