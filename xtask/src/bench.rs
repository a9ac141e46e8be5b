//! `cargo xtask bench`: builds the workspace and runs `plugvisor-bench`
//! (in the tests crate, beside the harness it shares with the black-box
//! tests), which measures side by side and writes `docs/BENCHMARKS.md`.
//!
//! `--quick` runs every measure briefly and writes to the target dir
//! instead: CI runs it to catch a broken harness, never to judge times.
use anyhow::Result;

use crate::{build, util};

/// Flags of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {
    /// A short run of every measure (for CI); results go to target/, not docs/.
    #[arg(long)]
    pub quick: bool,
}

/// Builds, then runs the benchmark driver.
pub fn run(args: &Args) -> Result<()> {
    build::workspace(&build::Args { debug: false })?;
    let release = util::target_dir()?.join("release");
    let out = if args.quick {
        release.join("BENCHMARKS-quick.md")
    } else {
        util::workspace_root().join("docs").join("BENCHMARKS.md")
    };
    let mut c = util::cmd(release.join("plugvisor-bench"));
    c.env("PLUGVISOR_TARGET_DIR", &release)
        .arg("--out")
        .arg(&out);
    if args.quick {
        c.arg("--quick");
    }
    util::run(&mut c)
}
