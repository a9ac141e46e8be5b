//! `cargo xtask test`: what CI runs (`.ci/run`), and what a developer runs
//! before pushing.
//!
//! Steps run in order and stop at the first failure, naming it: setup,
//! `cargo fmt --check`, clippy, the release build (the integration tests
//! load its plugin cdylibs), unit tests, then the black-box integration
//! tests one at a time (they change kernel state: eBPF programs, ports),
//! the probe tests on the host and in Debian's x86_64 kernels under qemu
//! (`cargo xtask vm-test`; its PASS and FAIL lines count in the tally, its
//! SKIP lines are printed with their reasons), then every fuzz target for
//! [`FUZZ_SECONDS`] (`fuzz/run.sh`).
//! The last line is always `xtask test: N passed, M failed`, summed over
//! every `cargo test` run, so a CI log can be judged from its tail.
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{build, setup, util};

/// The black-box integration test crate.
const INTEGRATION_CRATE: &str = "plugvisor-tests";

/// How long each fuzz target runs in every `cargo xtask test`: enough to
/// catch a shallow regression in a parser, short enough for every CI run.
/// Longer runs and their results are in `docs/FUZZING.md`.
const FUZZ_SECONDS: u32 = 20;

/// Flags of `cargo xtask test`; CI uses none.
#[derive(clap::Args)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each is an independent command-line switch"
)]
pub struct Args {
    /// Skip `cargo xtask setup` (this machine is already set up).
    #[arg(long)]
    pub skip_setup: bool,
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Skip the fuzz targets.
    #[arg(long)]
    pub no_fuzz: bool,
    /// Skip the VM tests (`cargo xtask vm-test`).
    #[arg(long)]
    pub no_vm: bool,
    /// Run the integration tests with Debian's `stress-ng --cpu N` loading
    /// every core beside them (N = the core count), as a busy CI machine
    /// would: every test waits for the event it needs within a bound
    /// meant for such a machine, so the suite must pass this way too.
    #[arg(long)]
    pub stress: bool,
}

/// `stress-ng` loading every core while it lives; killed on drop.
struct Stress(std::process::Child);

impl Stress {
    fn start() -> Result<Stress> {
        let cpus = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let child = std::process::Command::new("stress-ng")
            .args(["--cpu", &cpus.to_string(), "--quiet"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting stress-ng (cargo xtask setup installs it)")?;
        println!("xtask test: stress-ng --cpu {cpus} runs beside the integration tests");
        Ok(Stress(child))
    }
}

impl Drop for Stress {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Tests passed and failed, from libtest's `test result:` lines.
#[derive(Default, Debug, PartialEq, Eq)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// Adds the counts of `test result: ok. 3 passed; 1 failed; …`; other
    /// lines are ignored.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs the steps, prints the summary line last, and turns the outcome
/// into the exit code (the error is printed here, before the summary, so
/// the summary stays the final line).
pub fn run(args: &Args) -> ExitCode {
    let mut tally = Tally::default();
    let mut timings = Vec::new();
    let result = steps(args, &mut tally, &mut timings);

    let timings: Vec<String> = timings
        .iter()
        .map(|(name, took)| format!("{name} {}", util::secs(*took)))
        .collect();
    println!("\nxtask test: step timings: {}", timings.join(", "));
    let code = match result {
        Ok(()) if tally.failed == 0 => ExitCode::SUCCESS,
        Ok(()) => {
            eprintln!("error: {} test(s) failed", tally.failed);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    println!(
        "xtask test: {} passed, {} failed",
        tally.passed, tally.failed
    );
    code
}

fn steps(
    args: &Args,
    tally: &mut Tally,
    timings: &mut Vec<(&'static str, Duration)>,
) -> Result<()> {
    if !args.skip_setup {
        step("setup", timings, setup::run)?;
    }
    if !args.no_lint {
        step("fmt", timings, || {
            util::run(util::cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
        // Without --workspace: default-members leave out the eBPF crate,
        // which only compiles for the BPF target.
        step("clippy", timings, || {
            util::run(util::cargo().args([
                "clippy",
                "--release",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The failpoints build (plugvisor-failpoints, the crash-point
            // tests' binary) compiles code the default features leave out.
            util::run(util::cargo().args([
                "clippy",
                "--release",
                "-p",
                "plugvisor",
                "--features",
                "failpoints",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The fuzz targets are their own workspace and are otherwise
            // first compiled by the fuzz step, at the end of the run: a
            // library rename that breaks them should fail here, in a
            // minute. The shared target dir reuses the workspace's build.
            util::run(
                util::cargo()
                    .args(["clippy", "--release", "--manifest-path", "fuzz/Cargo.toml"])
                    .arg("--target-dir")
                    .arg(util::target_dir()?)
                    .args(["--all-targets", "--", "-D", "warnings"]),
            )
        })?;
    }
    step("build", timings, || {
        build::run(&build::Args { debug: false })
    })?;
    step("unit tests", timings, || {
        util::run_streaming(
            util::cargo()
                .args(["test", "--workspace", "--exclude", build::EBPF_CRATE])
                .args(["--release", "--lib", "--bins"])
                // The import-direction check of the supervisor crate
                // (supervisor/imports.toml) reads sources, not a daemon.
                .args(["--test", "import_direction"])
                // Run every test binary even after a failure, so the
                // summary counts all of them.
                .arg("--no-fail-fast"),
            |line| tally.add_line(line),
        )
    })?;
    step("integration tests", timings, || {
        let _stress = args.stress.then(Stress::start).transpose()?;
        let release_dir = util::target_dir()?.join("release");
        util::run_streaming(
            util::cargo()
                .env("PLUGVISOR_TARGET_DIR", &release_dir)
                .env(
                    "PLUGVISOR_KUBERNETES_VALIDATE",
                    setup::kubernetes_validate_venv()?.join("bin/kubernetes-validate"),
                )
                .args([
                    "test",
                    "--release",
                    "-p",
                    INTEGRATION_CRATE,
                    "--no-fail-fast",
                ])
                .args(["--", "--test-threads=1"]),
            |line| tally.add_line(line),
        )
    })?;
    if !args.no_vm {
        step("vm-test", timings, || {
            let s = crate::vm_test::run_for_ci()?;
            tally.passed += s.passed;
            tally.failed += s.failed;
            if s.failed > 0 {
                bail!("{} vm-test(s) failed", s.failed);
            }
            Ok(())
        })?;
    }
    if !args.no_fuzz {
        // Every target `cargo fuzz list` knows, so a new one is run without
        // touching this file. A crash fails the step and leaves its input
        // in fuzz/artifacts/.
        step("fuzz", timings, || {
            let script = util::workspace_root().join("fuzz/run.sh");
            util::run(util::cmd(script).args(["all", &FUZZ_SECONDS.to_string()]))
        })?;
    }
    // The README's first command, as a new user runs it: setup first (its
    // own idempotent check lines come before any build), then the demo's
    // build, traffic and reloads. After the integration tests, whose
    // daemons never take the demo's fixed ports.
    step("demo --once", timings, demo_once)?;
    // The benchmark harness, briefly: it must not rot between full runs.
    // Its times are not judged here.
    step("bench --quick", timings, || {
        crate::bench::run(&crate::bench::Args { quick: true })
    })?;
    if tally.failed > 0 {
        bail!("{} test(s) failed", tally.failed);
    }
    Ok(())
}

/// `cargo xtask demo --once` as a user runs it; fails unless setup's lines
/// come before the first build.
fn demo_once() -> Result<()> {
    let mut first_setup = None;
    let mut first_build = None;
    let mut n = 0usize;
    util::run_streaming(util::cargo().args(["xtask", "demo", "--once"]), |line| {
        n += 1;
        if line.starts_with("setup: ") {
            first_setup.get_or_insert(n);
        }
        if line.starts_with("$ cargo build") {
            first_build.get_or_insert(n);
        }
    })?;
    match (first_setup, first_build) {
        (Some(s), Some(b)) if s < b => Ok(()),
        _ => bail!(
            "`cargo xtask demo` must run setup before it builds: first setup line {first_setup:?}, first build line {first_build:?}"
        ),
    }
}

/// Runs one step between a header and a footer with its duration; an error
/// is labelled with the step's name.
fn step(
    name: &'static str,
    timings: &mut Vec<(&'static str, Duration)>,
    f: impl FnOnce() -> Result<()>,
) -> Result<()> {
    println!("\n==> xtask test: {name}");
    let start = Instant::now();
    let result = f();
    let took = start.elapsed();
    timings.push((name, took));
    match result {
        Ok(()) => {
            println!("<== xtask test: {name} ok ({})", util::secs(took));
            Ok(())
        }
        Err(e) => {
            println!("<== xtask test: {name} FAILED ({})", util::secs(took));
            Err(e.context(format!("step `{name}` failed")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn tallies_libtest_summaries() {
        let mut t = Tally::default();
        t.add_line(
            "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; \
             0 filtered out; finished in 0.31s",
        );
        t.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; \
             0 filtered out; finished in 10.00s",
        );
        t.add_line("test reload_keeps_connections ... ok");
        t.add_line("running 5 tests");
        assert_eq!(
            t,
            Tally {
                passed: 15,
                failed: 2
            }
        );
    }
}
