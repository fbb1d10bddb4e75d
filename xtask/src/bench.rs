//! `cargo xtask bench`: per-packet cost through BPF_PROG_TEST_RUN beside no-op programs measured
//! in the same run, Maglev table figures, control-plane figures of the agent binary (cold start,
//! change latency), and real traffic through namespaces against kube-proxy's iptables and
//! nftables dataplanes with their ruleset load times; the results go to BENCHMARKS.md.

use std::process::Command;

use crate::{root, run_cmd, setup_and_build_release};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Fewer repetitions and a smaller control-plane load (a quick look, not for BENCHMARKS.md).
    #[arg(long)]
    quick: bool,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    let release = setup_and_build_release(
        "bench",
        &["bench_datapath", "bench_control", "bench_traffic", "bench_nodeport"],
    )?;
    crate::setup::bench()?;
    let markdown = root().join("BENCHMARKS.md");
    let mut cmd = Command::new(release.join("examples/bench_datapath"));
    cmd.arg("--markdown").arg(&markdown);
    if o.quick {
        cmd.arg("--quick");
    }
    run_cmd(&mut cmd)?;
    println!("bench: control plane (the agent binary with 10,000 Services x 10 endpoints)");
    let mut cmd = Command::new(release.join("examples/bench_control"));
    cmd.arg("--agent").arg(release.join("lb-agent")).arg("--markdown").arg(&markdown);
    if o.quick {
        cmd.args(["--services", "1000", "--changes", "20"]);
    }
    run_cmd(&mut cmd)?;
    println!("bench: real traffic (wrk, nginx) against kube-proxy's dataplanes, and their ruleset loads");
    let mut cmd = Command::new(release.join("examples/bench_traffic"));
    cmd.arg("--agent").arg(release.join("lb-agent")).arg("--markdown").arg(&markdown);
    if o.quick {
        cmd.args(["--services", "1,1000", "--reps", "1", "--seconds", "2"]);
    }
    run_cmd(&mut cmd)?;
    println!("bench: NodePort traffic from outside the cluster against kube-proxy's dataplanes");
    let mut cmd = Command::new(release.join("examples/bench_nodeport"));
    cmd.arg("--agent").arg(release.join("lb-agent")).arg("--markdown").arg(&markdown);
    if o.quick {
        cmd.args(["--reps", "1", "--seconds", "2"]);
    }
    run_cmd(&mut cmd)
}
