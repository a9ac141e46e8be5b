//! `plugvisor-vm-tests`: the probe tests that `cargo xtask vm-test` runs
//! inside every kernel it can boot, and on the host's own kernel.
//!
//! # Two ways to run
//!
//! * **As PID 1 in a VM.** xtask packs this binary as `/init` of an
//!   initramfs, beside the real `plugvisor` binary, a version-stamped echo
//!   plugin, and the dynamic loader and shared libraries they need. As
//!   init it mounts what the probes need (proc, sys, dev, bpffs, tracefs,
//!   debugfs, cgroup2), brings up loopback, runs the tests, and powers the
//!   machine off. Its settings come from the kernel command line
//!   (`vmtest.mode=run|ping`, `vmtest.echo_stamp=VERSION`).
//! * **On the host**, started by xtask with `--plugvisor-dir DIR --echo LIB
//!   --echo-stamp VERSION`: the same tests against the running kernel.
//!
//! # What it prints
//!
//! One line per test, which the host parses (the contract with
//! `xtask/src/vm_test`):
//!
//! ```text
//! vm-test: PASS|FAIL|SKIP <kernel> <test> <reason>
//! ```
//!
//! `<kernel>` is `uname -r`; `<reason>` is the rest of the line. Around
//! them: `vm-test: BEGIN <kernel> <test>` before each test (so a host that
//! sees a guest die knows which test it died in), `vm-test: INFO <kernel>
//! …` facts about the kernel, and `vm-test: END <kernel> <n>` when all `n`
//! tests have reported. Anything else on the console is diagnostics.
//!
//! # The tests
//!
//! * `init` (VM only): the mounts and loopback.
//! * `probe/<probe>`, one per probe: loaded and attached through the
//!   daemon's own code (`plugvisor::probes::start_reporting`). A probe that
//!   fails where the kernel lacks its hook (tracepoint, uprobe PMU,
//!   cgroup2) is SKIP with the reason; one that fails where the hook is
//!   there (a verifier refusal, say) is FAIL; one that attaches although
//!   the hook is missing is FAIL too — there is no silent pass.
//! * `http2-frames`: crafted HTTP/2 byte streams (several frames per
//!   write, headers split across packets, a large DATA frame and then
//!   GOAWAY in one write, more frames than one program run walks) sent
//!   from a watched port; every GOAWAY and RST_STREAM counted once.
//! * Then the real `plugvisor` binary, started on a config of its own
//!   (`plugvisor_tests::Daemon`): `daemon` (it serves), `degrade` (its
//!   `plugvisor_probe_up` agrees with the probe checks and it serves on
//!   whatever is down), `tcp-states` and `tcp-reset` (loopback traffic and
//!   an RST seen by the kernel), `uprobe-markers` (a reload's window
//!   measured in the kernel), `hot-swap` (a reload under live connections:
//!   0 broken, by the clients and by the kernel).
//! * `host-crash`: a second daemon runs echo in a plugin host with
//!   `memory_max` and `pids_max` — in a cgroup v2 of its own in the guests
//!   (init mounts cgroup2), in whatever this machine offers on the host —
//!   and the limits are read back from the kernel; the host is SIGKILLed
//!   under live connections and a new one serves them all, none broken by
//!   the clients' count or the kernel's (`host_crashes` probe).
//!
//! A test that panics (the harness asserts) is reported as FAIL with the
//! panic's message; the next test still runs.
mod h2_frames;
mod host_crash;
mod init;
mod probe_checks;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::process::ExitCode;

use report::Reporter;

/// What the tests need from outside.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Directory holding the `plugvisor` binary (the harness's
    /// `PLUGVISOR_TARGET_DIR`).
    pub plugvisor_dir: PathBuf,
    /// The echo plugin, built stamped with `echo_stamp`.
    pub echo: PathBuf,
    /// The version the echo library was stamped with at build time; the
    /// versions the tests install are rewritten from it.
    pub echo_stamp: String,
}

/// Where xtask puts things in the initramfs.
mod guest {
    /// Directory of the `plugvisor` binary.
    pub const PLUGVISOR_DIR: &str = "/bin";
    /// The stamped echo plugin.
    pub const ECHO: &str = "/lib/plugvisor/libplugvisor_echo.so";
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        init::run_as_init();
    }
    match parse_host_args(std::env::args().skip(1)) {
        Ok(setup) => {
            use_plugvisor_dir(&setup.plugvisor_dir);
            let mut rep = Reporter::new(report::kernel_release());
            run_all(&mut rep, &setup);
            rep.end();
            if rep.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("plugvisor-vm-tests: {e}");
            eprintln!(
                "usage: plugvisor-vm-tests --plugvisor-dir DIR --echo LIB --echo-stamp VERSION"
            );
            ExitCode::from(2)
        }
    }
}

fn parse_host_args(mut args: impl Iterator<Item = String>) -> Result<Setup, String> {
    let (mut dir, mut echo, mut stamp) = (None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--plugvisor-dir" => dir = Some(PathBuf::from(value)),
            "--echo" => echo = Some(PathBuf::from(value)),
            "--echo-stamp" => stamp = Some(value),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok(Setup {
        plugvisor_dir: dir.ok_or("--plugvisor-dir is required")?,
        echo: echo.ok_or("--echo is required")?,
        echo_stamp: stamp.ok_or("--echo-stamp is required")?,
    })
}

/// Points the harness at the `plugvisor` binary to test. Called while
/// the process has one thread (before any test starts).
pub fn use_plugvisor_dir(dir: &std::path::Path) {
    // SAFETY: no other thread exists yet to read the environment.
    unsafe { std::env::set_var("PLUGVISOR_TARGET_DIR", dir) };
}

/// Runs every test after `init`, in order.
pub fn run_all(rep: &mut Reporter, setup: &Setup) {
    rep.info(&report::kernel_facts());
    let checks = probe_checks::report_all(rep);
    rep.run("http2-frames", || h2_frames::run(checks.as_deref()));
    scenarios::run(rep, setup, checks.as_deref());
}
