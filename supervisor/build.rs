//! Two build steps:
//!
//! 1. The gRPC contract (`proto/plugvisor/v1/plugin.proto`) and the MQTT
//!    report's messages (`proto/plugvisor/report/v1/report.proto`) are
//!    compiled with protox, a protobuf compiler written in Rust, so building
//!    needs no system `protoc`. tonic-build generates the server from the resulting
//!    descriptor set, and the encoded set is left in `OUT_DIR` for server
//!    reflection (`listeners/grpc.rs`).
//! 2. The eBPF programs (`ebpf-probes/ebpf`) are built with the nightly
//!    toolchain and bpf-linker, and the object is left in `OUT_DIR` for
//!    `include_bytes_aligned!` in `probes/mod.rs`.
use std::path::Path;

use anyhow::Context as _;
use prost::Message as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
    compile_protos(Path::new(&manifest_dir), Path::new(&out_dir))?;

    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .join("../ebpf-probes/ebpf")
        .canonicalize()
        .context("locating ebpf-probes/ebpf")?;
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to ebpf-probes/ebpf")?;
    // The common crate is a path dependency of the eBPF crate; watch it too.
    println!("cargo:rerun-if-changed={ebpf_dir}/../common");
    preflight();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "plugvisor-probes-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// What building the eBPF object needs and a fresh machine lacks, said in
/// one line with the command that installs it — an expected condition,
/// so no error chain and no backtrace.
fn preflight() {
    // aya-build's own switch for a build that does not compile the probes.
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        return;
    }
    let on_path = |program: &str| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
    };
    let missing = |what: &str| -> ! {
        eprintln!(
            "error: building plugvisor's eBPF probes needs {what}; run `cargo xtask setup` (it installs everything the build and the tests need, idempotently)"
        );
        std::process::exit(1);
    };
    if !on_path("rustup") {
        missing("rustup (the nightly toolchain builds the eBPF crate)");
    }
    if !on_path("bpf-linker") {
        missing("bpf-linker on PATH, built against the nightly's LLVM");
    }
    let sysroot = std::process::Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output();
    match sysroot {
        Ok(out) if out.status.success() => {
            let root = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !Path::new(&root)
                .join("lib/rustlib/src/rust/library/Cargo.lock")
                .is_file()
            {
                missing("the rust-src component of the nightly toolchain");
            }
        }
        _ => missing("the nightly toolchain"),
    }
}

/// Generates the `plugvisor.v1` server code and writes
/// `plugvisor_v1_descriptor.bin` (read by `tonic::include_file_descriptor_set!`).
fn compile_protos(manifest_dir: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let include = manifest_dir.join("proto");
    println!("cargo:rerun-if-changed={}", include.display());
    let fds = protox::compile(["plugvisor/v1/plugin.proto"], [&include])
        .context("compiling proto/plugvisor/v1/plugin.proto")?;
    std::fs::write(
        out_dir.join("plugvisor_v1_descriptor.bin"),
        fds.encode_to_vec(),
    )
    .context("writing the descriptor set for reflection")?;
    // The daemon only serves; the tests crate generates its own client.
    tonic_build::configure()
        .build_client(false)
        .compile_fds(fds)
        .context("generating the plugvisor.v1 server")?;
    // What a node reports over MQTT: messages only, no service.
    let report = protox::compile(["plugvisor/report/v1/report.proto"], [&include])
        .context("compiling proto/plugvisor/report/v1/report.proto")?;
    tonic_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(report)
        .context("generating the plugvisor.report.v1 messages")
}
