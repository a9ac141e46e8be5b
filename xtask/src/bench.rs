//! `cargo xtask bench`: builds the workspace and the in-process benchmark
//! example, then runs `plugvisor-bench` (in the tests crate, beside the
//! harness it shares with the black-box tests), which measures side by
//! side and writes `docs/BENCHMARKS.md` and the PNG plots in `docs/plots/`.
//!
//! `--quick` runs every measure briefly and writes to the target dir
//! instead: CI runs it to catch a broken harness, never to judge times. It
//! skips, saying so, what the machine lacks (Go for the `plugin.Open`
//! peer); the full run installs `golang-go` if it is missing, since the
//! peer is part of what it reports.
use anyhow::Result;

use crate::{build, setup, util};

/// Flags of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {
    /// A short run of every measure (for CI); results go to target/, not docs/.
    #[arg(long)]
    pub quick: bool,
}

/// Builds, then runs the benchmark driver.
pub fn run(args: &Args) -> Result<()> {
    if !args.quick {
        setup::apt_install(&[(
            "golang-go",
            "go build -buildmode=plugin, the seed's plugin.Open peer",
        )])?;
    }
    build::workspace(&build::Args { debug: false })?;
    // Resolved with the whole workspace, like the build above, so the
    // daemon's library is not compiled a second time with other features.
    util::run(util::cargo().args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        build::EBPF_CRATE,
        "--example",
        "bench_inprocess",
    ]))?;
    let release = util::target_dir()?.join("release");
    let (out, plots) = if args.quick {
        (
            release.join("BENCHMARKS-quick.md"),
            release.join("bench-plots-quick"),
        )
    } else {
        let docs = util::workspace_root().join("docs");
        (docs.join("BENCHMARKS.md"), docs.join("plots"))
    };
    let mut c = util::cmd(release.join("plugvisor-bench"));
    c.env("PLUGVISOR_TARGET_DIR", &release)
        .arg("--out")
        .arg(&out)
        .arg("--plots")
        .arg(&plots)
        .arg("--inprocess")
        .arg(release.join("examples/bench_inprocess"));
    if args.quick {
        c.arg("--quick");
    }
    util::run(&mut c)
}
