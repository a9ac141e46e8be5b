//! `cargo xtask build`: the ordinary workspace build, nothing hidden.
//!
//! The eBPF object is built by `supervisor/build.rs` (aya-build, nightly,
//! bpf-linker), so this is plain `cargo build`. The plugins are cdylibs
//! left next to the daemon in the target dir (`libplugvisor_echo.so`,
//! `libfixture_*.so`), which is where the daemon and the tests look.
use anyhow::Result;

use crate::util;

/// The eBPF crate only compiles for `bpfel-unknown-none` (it is `no_std`
/// and needs `panic = "abort"` core); `supervisor/build.rs` builds it for
/// that target. `--workspace` would also build it for the host and fail,
/// so workspace-wide commands exclude it.
pub const EBPF_CRATE: &str = "plugvisor-probes-ebpf";

/// Flags of `cargo xtask build`.
#[derive(clap::Args)]
pub struct Args {
    /// Build the dev profile instead of release.
    #[arg(long)]
    pub debug: bool,
}

/// Builds every host crate of the workspace.
pub fn run(args: &Args) -> Result<()> {
    let mut c = util::cargo();
    c.args(["build", "--workspace", "--exclude", EBPF_CRATE]);
    if !args.debug {
        c.arg("--release");
    }
    util::run(&mut c)
}
