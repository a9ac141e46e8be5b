//! Builds the eBPF programs (`ebpf-probes/ebpf`) with the nightly toolchain
//! and bpf-linker, and leaves the object in `OUT_DIR` for
//! `include_bytes_aligned!` in `probes/loader.rs`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .join("../ebpf-probes/ebpf")
        .canonicalize()
        .context("locating ebpf-probes/ebpf")?;
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to ebpf-probes/ebpf")?;
    // The common crate is a path dependency of the eBPF crate; watch it too.
    println!("cargo:rerun-if-changed={ebpf_dir}/../common");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "plugvisor-probes-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
