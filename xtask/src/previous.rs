//! `cargo xtask previous-agent`: builds the agent of the pin layout before this one, from the git
//! history, for the upgrade test (lb-agent/tests/upgrade.rs). `cargo xtask test` runs it and
//! passes the binary to the suite as `LB_PREVIOUS_AGENT`.
//!
//! The previous layout's agent is the parent of the last commit that changed the line
//! `PIN_LAYOUT_VERSION: u32 = N` in lb-common. Its source comes from `git archive` (the checkout
//! must hold that history: a clone, not a shallow one) and is built with its own Cargo.lock into
//! `target/previous/<commit>/`, kept for later runs.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{root, run_cmd};

const VERSION_LINE: &str = "PIN_LAYOUT_VERSION: u32 = ";
const MAPS_RS: &str = "lb-common/src/maps.rs";

fn git(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git").current_dir(root()).args(args).output().context("running git")?;
    anyhow::ensure!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn layout_version(source: &str) -> Option<u32> {
    let rest = &source[source.find(VERSION_LINE)? + VERSION_LINE.len()..];
    rest[..rest.find(';')?].trim().parse().ok()
}

/// The previous layout's agent, built if it is not yet: its path.
pub fn build() -> anyhow::Result<PathBuf> {
    let ours = layout_version(&std::fs::read_to_string(root().join(MAPS_RS))?)
        .context("no PIN_LAYOUT_VERSION in lb-common/src/maps.rs")?;
    let pattern = format!("{VERSION_LINE}{ours};");
    let bump = git(&["log", "-1", "--format=%H", "-S", &pattern, "--", MAPS_RS])?;
    anyhow::ensure!(
        !bump.is_empty(),
        "previous agent: no commit in this checkout's history sets `{pattern}` (a shallow clone? the upgrade \
         test needs the history back to the last layout change: `git fetch --unshallow`)"
    );
    let rev = git(&["rev-parse", &format!("{bump}^")]).context(
        "previous agent: the parent of the layout change is not in this checkout (a shallow clone? `git fetch --unshallow`)",
    )?;
    let theirs = layout_version(&git(&["show", &format!("{rev}:{MAPS_RS}")])?)
        .context("previous agent: no PIN_LAYOUT_VERSION in its lb-common")?;
    anyhow::ensure!(theirs < ours, "previous agent: {rev} has layout v{theirs}, not older than v{ours}");
    let dir = root().join("target/previous").join(&rev[..12]);
    let bin = dir.join("lb-agent");
    if bin.is_file() {
        println!("previous agent: layout v{theirs} (commit {}), built before: {}", &rev[..12], bin.display());
        return Ok(bin);
    }
    println!(
        "previous agent: building layout v{theirs}'s agent (commit {}) into {}",
        &rev[..12],
        dir.display()
    );
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let mut archive = Command::new("git")
        .current_dir(root())
        .args(["archive", "--format=tar", &rev])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("git archive")?;
    let tar = archive.stdout.take().context("git archive's output")?;
    let unpacked = run_cmd(Command::new("tar").arg("-x").arg("-C").arg(&src).stdin(tar));
    let archived = archive.wait()?;
    unpacked?;
    anyhow::ensure!(archived.success(), "git archive {rev} failed");
    run_cmd(
        Command::new("cargo")
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .args(["build", "--locked", "-p", "lb-agent", "--bin", "lb-agent"]),
    )
    .context("building the previous agent")?;
    std::fs::copy(dir.join("target/debug/lb-agent"), &bin).context("copying the previous agent")?;
    // Only the binary is kept.
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(dir.join("target"));
    Ok(bin)
}

pub fn run() -> anyhow::Result<()> {
    crate::setup::run()?;
    let bin = build()?;
    println!("LB_PREVIOUS_AGENT={}", bin.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_layout_version_is_read_from_its_line() {
        let src = "/// doc\npub const PIN_LAYOUT_VERSION: u32 = 7;\n";
        assert_eq!(super::layout_version(src), Some(7));
        assert_eq!(super::layout_version("nothing"), None);
    }
}
