use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// The nightly that builds the eBPF crate. Its LLVM major must match bpf-linker's (see
/// `cargo xtask setup`); `cargo xtask setup` checks it.
const EBPF_TOOLCHAIN: &str = "nightly";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent"))?;
    aya_build::build_ebpf(
        [Package { name: "lb-ebpf", root_dir: root_dir.as_str(), ..Default::default() }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )?;
    // For dependents' build scripts (`links = "lb_ebpf"`): where the objects are. The test kit
    // embeds the no-op programs from there, so that the product does not carry them.
    println!("cargo:out_dir={}", std::env::var("OUT_DIR").context("OUT_DIR")?);
    Ok(())
}
