//! The no-op programs (the baseline of per-packet costs) come from lb-agent's build of lb-ebpf:
//! its build script says where it put the objects (`links = "lb_ebpf"`).

fn main() {
    let dir = std::env::var("DEP_LB_EBPF_OUT_DIR").expect("lb-agent's build script names its OUT_DIR");
    println!("cargo:rustc-env=LB_EBPF_OBJECTS={dir}");
}
