//! `cargo xtask image`: the agent image, built with podman and no registry: a `FROM scratch`
//! image holding lb-agent, lbctl and the libraries they load (deploy/image/rootfs.sh), tagged as
//! deploy/kustomization.yaml names it. `--save` writes it as an OCI archive for
//! `ctr -n k8s.io images import`.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{root, run_cmd, setup_and_build_release};

/// The image as deploy/kustomization.yaml names it (its deploy test checks that it does). A
/// node's runtime (containerd, CRI-O) reads the short name as docker.io/library/lb-agent.
pub const IMAGE: &str = "lb-agent:latest";
const FULL_NAME: &str = "docker.io/library/lb-agent:latest";

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Also write the image as an OCI archive to this file (for `ctr -n k8s.io images import`).
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    let target = setup_and_build_release("image", &[])?;
    let context = root().join("target/image");
    run_cmd(
        Command::new(root().join("deploy/image/rootfs.sh"))
            .arg(context.join("rootfs"))
            .arg(target.join("lb-agent"))
            .arg(target.join("lbctl")),
    )
    .context("laying out the image's file system")?;
    std::fs::copy(root().join("deploy/image/Containerfile"), context.join("Containerfile"))?;
    run_cmd(
        Command::new("podman")
            .args([
                "build",
                "--pull=never",
                "--quiet",
                "--tag",
                &format!("localhost/{IMAGE}"),
                "--tag",
                FULL_NAME,
            ])
            .arg(&context),
    )
    .context("podman build (is podman installed? `cargo xtask setup` installs it)")?;
    let out =
        Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", FULL_NAME]).output()?;
    let size: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    println!("image: {FULL_NAME} (also localhost/{IMAGE}), {:.1} MB", size as f64 / 1e6);
    if let Some(file) = &o.save {
        let _ = std::fs::remove_file(file);
        run_cmd(
            Command::new("podman")
                .args(["save", "--quiet", "--format", "oci-archive", "--output"])
                .arg(file)
                .arg(FULL_NAME),
        )?;
        println!(
            "image: saved to {} (load it on a node: `ctr -n k8s.io images import {}`)",
            file.display(),
            file.display()
        );
    }
    Ok(())
}
