//! `cargo xtask build`: the ordinary workspace build, nothing hidden.
//!
//! The eBPF object is built by `supervisor/build.rs` (aya-build, nightly,
//! bpf-linker), so this is plain `cargo build`. The plugins are cdylibs
//! left next to the daemon in the target dir (`libplugvisor_echo.so`,
//! `libfixture_*.so`), which is where the daemon and the tests look; the C
//! example plugin (`libc_echo.so`) is compiled there too, by the C
//! compiler alone.
//!
//! Then `plugvisor-failpoints`: the same command built with the
//! `failpoints` feature, for the kill -9 tests. It is a binary of its own
//! name in the same target dir, so it never replaces `plugvisor` and shares
//! every compiled dependency; only the `plugvisor` crate is compiled twice.
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

/// Builds every host crate of the workspace (what the demo and the
/// benchmarks need; they do not need the failpoints binary), and the C
/// example plugin.
pub fn workspace(args: &Args) -> Result<()> {
    let mut c = util::cargo();
    c.args(["build", "--workspace", "--exclude", EBPF_CRATE]);
    if !args.debug {
        c.arg("--release");
    }
    util::run(&mut c)?;
    c_plugin(args)
}

/// `plugins/c-echo/echo.c` against `plugin-sdk/include/plugvisor.h` alone,
/// into `libc_echo.so` beside the Rust plugins: a plugin in C is built
/// with nothing but a C compiler. (The tests build their stamped
/// versions of it the same way, in `tests/src/builds.rs`.)
fn c_plugin(args: &Args) -> Result<()> {
    let profile = if args.debug { "debug" } else { "release" };
    let out = util::target_dir()?.join(profile).join("libc_echo.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let mut c = util::cmd(&cc);
    c.args([
        "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
    ])
    .args(["-I", "plugin-sdk/include", "-o"])
    .arg(out)
    .arg("plugins/c-echo/echo.c");
    util::run(&mut c)
}

/// The daemon's crate, and its binary with crash points.
const DAEMON_CRATE: &str = "plugvisor";
const FAILPOINTS_BIN: &str = "plugvisor-failpoints";

/// Builds every host crate of the workspace, then the failpoints binary.
pub fn run(args: &Args) -> Result<()> {
    workspace(args)?;
    let mut c = util::cargo();
    c.args(["build", "-p", DAEMON_CRATE, "--features", "failpoints"])
        .args(["--bin", FAILPOINTS_BIN]);
    if !args.debug {
        c.arg("--release");
    }
    util::run(&mut c)
}
