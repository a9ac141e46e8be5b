//! plugvisor's task runner, run as `cargo xtask <command>`.
//!
//! It orchestrates; it does not hide the ordinary cargo commands. Each step
//! prints the command it runs, so anything xtask does can be repeated by
//! hand:
//!
//! * `setup` — the once-per-machine tools the build and tests need (apt
//!   packages, the nightly's `rust-src`, a bpf-linker built against the
//!   nightly's own LLVM). Idempotent.
//! * `build` — `cargo build` of the workspace; the eBPF object is built by
//!   `supervisor/build.rs`, the plugins are cdylibs in the target dir.
//! * `test` — what CI runs (`.ci/run`): setup, lints, build, unit tests,
//!   the black-box integration tests and a short run of every fuzz target,
//!   with one summary line at the end.
//! * `bench` — measures side by side (probe overhead, reload latency) and
//!   writes `docs/BENCHMARKS.md`; `--quick` is CI's smoke run of it.
//! * `dashboards` — writes the Grafana dashboards in `dashboards/` from
//!   their definitions in `dashboards.rs`; `--check` verifies them.
//! * `vm-test` — boots Debian's kernels (x86_64, and arm64 with `--arch`)
//!   in qemu and runs the probe tests inside each, and on the host; prints
//!   a kernel × test matrix (`docs/VM-TESTS.md`).
//! * `demo` — starts the daemon with its embedded default config, drives
//!   live TCP traffic through two hot reloads and reports what the clients
//!   and the kernel saw.
mod bench;
mod build;
mod dashboards;
mod demo;
mod demo_picture;
mod setup;
mod test;
mod util;
mod vm_test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command line of `cargo xtask`.
#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "plugvisor's task runner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// One subcommand per module.
#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need on this machine (idempotent).
    Setup,
    /// Build the workspace: daemon, eBPF object and plugins.
    Build(build::Args),
    /// Run what CI runs: setup, fmt, clippy, build, unit and integration tests, fuzz.
    Test(test::Args),
    /// Run the daemon and hot-reload the echo plugin under live traffic.
    Demo(demo::Args),
    /// Measure side by side and write docs/BENCHMARKS.md.
    Bench(bench::Args),
    /// Write the Grafana dashboards in dashboards/ (--check: verify them).
    Dashboards(dashboards::Args),
    /// Boot Debian's kernels in qemu and run the probe tests in each (and on the host).
    VmTest(vm_test::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Build(args) => build::run(&args),
        // Prints its own error so its summary line stays the last line.
        Command::Test(args) => return test::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Dashboards(args) => dashboards::run(&args),
        Command::VmTest(args) => vm_test::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
