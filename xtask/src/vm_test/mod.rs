//! `cargo xtask vm-test`: every probe on every kernel we can boot.
//!
//! For each architecture asked for (`--arch x86_64` by default,
//! `aarch64`, or `all`):
//!
//! 1. build `plugvisor`, the test binary `plugvisor-vm-tests` and the echo
//!    plugin (stamped with [`ECHO_STAMP`]) for it — for aarch64 with
//!    Debian's cross toolchain; the eBPF object follows the target
//!    (aya-build passes `bpf_target_arch`, so the uprobes read arm64's
//!    `pt_regs`);
//! 2. write an initramfs with the test binary as `/init` and what it needs
//!    ([`initramfs`]);
//! 3. for each of Debian's kernels in [`KERNELS`], fetch the image
//!    ([`kernels`], cached in `.vm-cache/`), boot it in qemu — KVM when a
//!    short probe boot shows it works, TCG otherwise; qemu is killed on a
//!    kernel panic or a timeout ([`qemu`]) — and collect the guest's
//!    `vm-test:` lines.
//!
//! The host's own kernel runs the same binary directly (`--no-host` to
//! leave it out). At the end a kernel × test matrix ([`results`]), every
//! FAIL and SKIP with its reason, and how each kernel ran. Exit status 1
//! if anything failed; a SKIP is never counted as a pass.
//!
//! `cargo xtask test` runs [`run_for_ci`]: what fits CI's time budget
//! (see `docs/VM-TESTS.md`).
mod initramfs;
mod kernels;
mod qemu;
mod results;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::util;
use qemu::{Accel, Boot, BootSpec};
use results::{Column, Line, Status, TestResult};

/// The version the echo plugin is built with; the guest rewrites it into
/// the versions it installs (`StampedLibrary` in the test harness).
const ECHO_STAMP: &str = "7.0.100000";
/// The test binary's package.
const VM_TESTS_CRATE: &str = "plugvisor-vm-tests";

/// A guest architecture. The host is assumed to be x86_64 (Debian's
/// cross toolchain builds for arm64 from there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// 64-bit PCs.
    #[value(name = "x86_64")]
    X86_64,
    /// arm64: most edge nodes.
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    /// Debian's name.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// Rust's name (matrix headings).
    pub fn rust(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The target triple to cross-build for, `None` for the host's own.
    fn cross_target(self) -> Option<&'static str> {
        match self {
            Arch::X86_64 => None,
            Arch::Aarch64 => Some("aarch64-unknown-linux-gnu"),
        }
    }

    fn qemu(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }

    /// The Debian package holding [`Arch::qemu`].
    fn qemu_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
        }
    }

    fn machine_args(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => &[],
            // A plain ARMv8.0 core: `max` would emulate pointer
            // authentication, which costs TCG dearly for nothing here.
            Arch::Aarch64 => &["-machine", "virt", "-cpu", "cortex-a72"],
        }
    }

    fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// Where the guest's loader looks first (a system directory of
    /// Debian's glibc on that arch).
    fn guest_lib_dir(self) -> &'static str {
        match self {
            Arch::X86_64 => "/lib/x86_64-linux-gnu",
            Arch::Aarch64 => "/lib/aarch64-linux-gnu",
        }
    }

    /// Where the libraries of this arch are on the host.
    fn host_lib_dirs(self) -> &'static [&'static str] {
        match self {
            Arch::X86_64 => &[
                "/lib/x86_64-linux-gnu",
                "/usr/lib/x86_64-linux-gnu",
                "/lib64",
            ],
            Arch::Aarch64 => &["/usr/aarch64-linux-gnu/lib"],
        }
    }

    fn lib_hint(self) -> &'static str {
        match self {
            Arch::X86_64 => "",
            Arch::Aarch64 => " (cargo xtask setup installs libc6-dev-arm64-cross)",
        }
    }
}

/// One of Debian's kernels.
#[derive(Debug, Clone, Copy)]
pub struct KernelSpec {
    /// Guest architecture.
    pub arch: Arch,
    /// Debian suite whose archive has it.
    pub suite: &'static str,
    /// The metapackage that names the current image package.
    pub meta: &'static str,
    /// Short name (`--kernel`, matrix headings).
    pub label: &'static str,
}

/// The kernels booted: bullseye's 5.10 (still common on edge boards),
/// bookworm's default (6.1) and its 6.12, on both architectures.
pub const KERNELS: [KernelSpec; 6] = [
    KernelSpec {
        arch: Arch::X86_64,
        suite: "bullseye",
        meta: "linux-image-amd64",
        label: "5.10",
    },
    KernelSpec {
        arch: Arch::X86_64,
        suite: "bookworm",
        meta: "linux-image-amd64",
        label: "6.1",
    },
    KernelSpec {
        arch: Arch::X86_64,
        suite: "bookworm",
        meta: "linux-image-6.12-amd64",
        label: "6.12",
    },
    KernelSpec {
        arch: Arch::Aarch64,
        suite: "bullseye",
        meta: "linux-image-arm64",
        label: "5.10",
    },
    KernelSpec {
        arch: Arch::Aarch64,
        suite: "bookworm",
        meta: "linux-image-arm64",
        label: "6.1",
    },
    KernelSpec {
        arch: Arch::Aarch64,
        suite: "bookworm",
        meta: "linux-image-6.12-arm64",
        label: "6.12",
    },
];

/// Which architectures `--arch` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchChoice {
    /// x86_64 kernels.
    #[value(name = "x86_64")]
    X86_64,
    /// arm64 kernels.
    #[value(name = "aarch64")]
    Aarch64,
    /// Both.
    All,
}

/// `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM if a probe boot shows it works, else TCG.
    Auto,
    /// KVM, without probing.
    Kvm,
    /// TCG always.
    Tcg,
}

/// Flags of `cargo xtask vm-test`.
#[derive(clap::Args)]
pub struct Args {
    /// Guest architectures to boot.
    #[arg(long, value_enum, default_value = "x86_64")]
    pub arch: ArchChoice,
    /// Only these kernels (`6.1`, `6.12`); repeatable. Default: all of the arch.
    #[arg(long = "kernel")]
    pub kernels: Vec<String>,
    /// Do not run the tests on the host's own kernel.
    #[arg(long)]
    pub no_host: bool,
    /// Kill a guest after this many seconds (default: by arch and accelerator).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// How qemu runs x86_64 guests.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelChoice,
    /// More kernel command line for every guest (debugging a boot).
    #[arg(long, default_value = "")]
    pub append: String,
}

/// Totals over every kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    /// PASS lines.
    pub passed: u64,
    /// FAIL lines.
    pub failed: u64,
    /// SKIP lines.
    pub skipped: u64,
}

/// `cargo xtask vm-test`.
pub fn run(args: &Args) -> Result<()> {
    let summary = run_matrix(args)?;
    if summary.failed > 0 {
        bail!("{} vm-test(s) failed", summary.failed);
    }
    Ok(())
}

/// What `cargo xtask test` runs: the host and the x86_64 kernels. The
/// arm64 boots are left to `cargo xtask vm-test --arch aarch64`: the cold
/// cross-build of the workspace alone costs more than CI's budget has
/// left (docs/VM-TESTS.md has the numbers).
pub fn run_for_ci() -> Result<Summary> {
    run_matrix(&Args {
        arch: ArchChoice::X86_64,
        kernels: Vec::new(),
        no_host: false,
        timeout: None,
        accel: AccelChoice::Auto,
        append: String::new(),
    })
}

fn cache_dir() -> PathBuf {
    std::env::var_os("PLUGVISOR_VM_CACHE")
        .map_or_else(|| util::workspace_root().join(".vm-cache"), PathBuf::from)
}

/// Runs everything `args` selects, prints the matrix, returns the totals.
fn run_matrix(args: &Args) -> Result<Summary> {
    let cache = cache_dir();
    let logs = cache.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let arches: Vec<Arch> = match args.arch {
        ArchChoice::X86_64 => vec![Arch::X86_64],
        ArchChoice::Aarch64 => vec![Arch::Aarch64],
        ArchChoice::All => vec![Arch::X86_64, Arch::Aarch64],
    };
    for k in &args.kernels {
        if !KERNELS.iter().any(|s| s.label == k) {
            bail!(
                "unknown --kernel {k}; known: {:?}",
                KERNELS.map(|s| s.label)
            );
        }
    }
    let mut columns = Vec::new();
    let mut kvm = KvmVerdict::default();
    for arch in arches {
        let specs: Vec<&KernelSpec> = KERNELS
            .iter()
            .filter(|s| s.arch == arch)
            .filter(|s| args.kernels.is_empty() || args.kernels.iter().any(|k| k == s.label))
            .collect();
        run_arch(arch, &specs, args, &cache, &mut kvm, &mut columns)?;
    }
    println!("\n{}", results::matrix(&columns));
    let mut s = Summary::default();
    for c in &columns {
        let (p, f, k) = c.counts();
        s.passed += p as u64;
        s.failed += f as u64;
        s.skipped += k as u64;
    }
    println!(
        "vm-test: {} passed, {} failed, {} skipped (logs in {})",
        s.passed,
        s.failed,
        s.skipped,
        logs.display()
    );
    Ok(s)
}

/// Builds for `arch`, runs the host (x86_64) and boots `specs`, adding a
/// column for each. What cannot be run becomes a SKIP or FAIL column, and
/// the next arch still runs.
fn run_arch(
    arch: Arch,
    specs: &[&KernelSpec],
    args: &Args,
    cache: &Path,
    kvm: &mut KvmVerdict,
    columns: &mut Vec<Column>,
) -> Result<()> {
    let run_host = arch == Arch::X86_64 && !args.no_host;
    if let Err(reason) = toolchain_ready(arch) {
        not_run_all(columns, arch, specs, Status::Skip, &reason);
        return Ok(());
    }
    let started = Instant::now();
    let built = match build(arch) {
        Ok(b) => b,
        Err(e) => {
            // One broken cross-build must not hide the other arch's results.
            let reason = format!("building for {}: {e:#}", arch.rust());
            if run_host {
                columns.push(not_run("host", "host", Status::Fail, &reason));
            }
            not_run_all(columns, arch, specs, Status::Fail, &reason);
            return Ok(());
        }
    };
    println!(
        "vm-test: {} build took {}",
        arch.rust(),
        util::secs(started.elapsed())
    );
    if run_host {
        columns.push(run_host_tests(&built, &cache.join("logs"))?);
    }
    if specs.is_empty() {
        return Ok(());
    }
    if util::which(arch.qemu()).is_none() {
        let reason = format!(
            "{} not found (cargo xtask setup installs {})",
            arch.qemu(),
            arch.qemu_package()
        );
        not_run_all(columns, arch, specs, Status::Skip, &reason);
        return Ok(());
    }
    let initrd = cache.join(format!("initramfs-{}.cpio", arch.rust()));
    let contents = initramfs::Contents {
        init: &built.init,
        plugvisor: &built.plugvisor,
        echo: &built.echo,
    };
    match initramfs::write(arch, &contents, &initrd) {
        Ok(size) => println!(
            "vm-test: {} initramfs {} ({:.1} MB)",
            arch.rust(),
            initrd.display(),
            size as f64 / 1e6
        ),
        Err(e) => {
            let reason = format!("writing the {} initramfs: {e:#}", arch.rust());
            not_run_all(columns, arch, specs, Status::Fail, &reason);
            return Ok(());
        }
    }
    for spec in specs {
        columns.push(run_kernel(spec, cache, &initrd, args, kvm));
    }
    Ok(())
}

fn column_name(spec: &KernelSpec) -> String {
    format!("{} {}", spec.arch.rust(), spec.label)
}

/// A column per kernel that could not be booted at all, with why.
fn not_run_all(
    columns: &mut Vec<Column>,
    arch: Arch,
    specs: &[&KernelSpec],
    status: Status,
    reason: &str,
) {
    for spec in specs {
        let kernel = format!("{}-{}", arch.debian(), spec.label);
        columns.push(not_run(&column_name(spec), &kernel, status, reason));
    }
}

/// A column with one `boot` result: a kernel (or the host) that did not run.
fn not_run(name: &str, kernel: &str, status: Status, reason: &str) -> Column {
    let result = TestResult {
        status,
        kernel: kernel.to_owned(),
        test: "boot".into(),
        reason: reason.to_owned(),
    };
    println!("{result}");
    Column {
        name: name.to_owned(),
        release: "?".into(),
        results: vec![result],
        note: "not run".into(),
    }
}

/// Whether `arch`'s binaries can be built here; `Err` says what is missing.
fn toolchain_ready(arch: Arch) -> Result<(), String> {
    let Some(target) = arch.cross_target() else {
        return Ok(());
    };
    let installed = util::output(Command::new("rustup").args(["target", "list", "--installed"]))
        .map_err(|e| format!("rustup: {e:#}"))?;
    if !installed.lines().any(|l| l.trim() == target) {
        return Err(format!(
            "the Rust target {target} is not installed (cargo xtask setup adds it)"
        ));
    }
    if util::which("aarch64-linux-gnu-gcc").is_none() {
        return Err(
            "aarch64-linux-gnu-gcc not found (cargo xtask setup installs gcc-aarch64-linux-gnu)"
                .into(),
        );
    }
    if !Path::new("/usr/aarch64-linux-gnu/lib/crt1.o").is_file() {
        return Err(
            "arm64 C runtime missing (cargo xtask setup installs libc6-dev-arm64-cross)".into(),
        );
    }
    Ok(())
}

/// What goes into the guest.
struct Built {
    init: PathBuf,
    plugvisor: PathBuf,
    echo: PathBuf,
}

/// Builds plugvisor and the test binary, and the echo plugin stamped with
/// [`ECHO_STAMP`] in a target dir of its own (the ordinary build's echo
/// stays 1.0.0, so neither rebuilds the other's).
fn build(arch: Arch) -> Result<Built> {
    let target_dir = util::target_dir()?;
    let mut cargo = util::cargo();
    cargo.args([
        "build",
        "--release",
        "-p",
        "plugvisor",
        "-p",
        VM_TESTS_CRATE,
    ]);
    let mut echo = util::cargo();
    let echo_dir = target_dir.join("vm-tests/echo");
    echo.env("PLUGVISOR_PLUGIN_VERSION", ECHO_STAMP)
        .args(["build", "--release", "-p", "plugvisor-echo", "--target-dir"])
        .arg(&echo_dir);
    let (bin_dir, echo_out) = match arch.cross_target() {
        None => (target_dir.join("release"), echo_dir.join("release")),
        Some(t) => {
            cargo.args(["--target", t]);
            echo.args(["--target", t]);
            (
                target_dir.join(t).join("release"),
                echo_dir.join(t).join("release"),
            )
        }
    };
    util::run(&mut cargo)?;
    util::run(&mut echo)?;
    Ok(Built {
        init: bin_dir.join(VM_TESTS_CRATE),
        plugvisor: bin_dir.join("plugvisor"),
        echo: echo_out.join("libplugvisor_echo.so"),
    })
}

/// Default bound on one boot (tests included).
fn default_timeout(arch: Arch, accel: Accel) -> Duration {
    // A whole run takes 5–23 s under TCG here; these are over 13 times
    // the slowest, and bound what a hung guest costs a CI run.
    Duration::from_secs(match (arch, accel) {
        (_, Accel::Kvm) => 120,
        (Arch::X86_64, Accel::Tcg) => 300,
        (Arch::Aarch64, Accel::Tcg) => 420,
    })
}

/// Fetches and boots one kernel; every outcome, even a failed download,
/// becomes a column.
fn run_kernel(
    spec: &KernelSpec,
    cache: &Path,
    initrd: &Path,
    args: &Args,
    kvm: &mut KvmVerdict,
) -> Column {
    let name = column_name(spec);
    let fetch_start = Instant::now();
    let kernel = match kernels::fetch(cache, spec) {
        Ok(k) => k,
        Err(e) => {
            let kernel = format!("{}-{}", spec.arch.debian(), spec.label);
            let reason = format!("kernel image not available: {e:#}");
            return not_run(&name, &kernel, Status::Skip, &reason);
        }
    };
    let fetched = fetch_start.elapsed();
    if !kernel.not_built_in.is_empty() {
        println!(
            "vm-test: note: {} has {} as modules; the guest loads none",
            kernel.package,
            kernel.not_built_in.join(", ")
        );
    }
    let log = cache
        .join("logs")
        .join(format!("{}-{}.log", spec.arch.rust(), spec.label));
    let (accel, why) = kvm.choose(spec.arch, args.accel, &kernel.image, initrd, cache);
    let timeout = args
        .timeout
        .map_or_else(|| default_timeout(spec.arch, accel), Duration::from_secs);
    println!(
        "\n==> vm-test: {name} ({}) under {} ({why}), at most {}",
        kernel.package,
        accel.as_str(),
        util::secs(timeout)
    );
    let boot = qemu::boot(&BootSpec {
        arch: spec.arch,
        accel,
        kernel: &kernel.image,
        initrd,
        append: &format!(
            "vmtest.mode=run vmtest.echo_stamp={ECHO_STAMP} {}",
            args.append
        ),
        timeout,
        log: &log,
        stop_at_ping: false,
    });
    let note = |took: Duration| {
        format!(
            "{} under {}, {} (kernel fetch {}), console in {}",
            kernel.package,
            accel.as_str(),
            util::secs(took),
            util::secs(fetched),
            log.display()
        )
    };
    match boot {
        Ok(b) => {
            let took = b.took;
            column_from(name, &kernel.package, b, note(took))
        }
        Err(e) => Column {
            name,
            release: kernel.package.clone(),
            results: vec![TestResult {
                status: Status::Fail,
                kernel: kernel.package.clone(),
                test: "boot".into(),
                reason: format!("{e:#}"),
            }],
            note: note(Duration::ZERO),
        },
    }
}

/// The results of one run, with a FAIL added when the guest (or host run)
/// stopped before it said `END`: for the test it was in, or `boot`.
fn column_from(name: String, fallback_kernel: &str, boot: Boot, note: String) -> Column {
    let mut release = None;
    let mut results = Vec::new();
    let mut running: Option<String> = None;
    let mut ended = None;
    for line in boot.lines {
        match line {
            Line::Begin { kernel, test } => {
                release.get_or_insert(kernel);
                running = Some(test);
            }
            Line::Result(r) => {
                release.get_or_insert(r.kernel.clone());
                if running.as_deref() == Some(r.test.as_str()) {
                    running = None;
                }
                results.push(r);
            }
            Line::Info { kernel, .. } => {
                release.get_or_insert(kernel);
            }
            Line::End { count, .. } => ended = Some(count),
            Line::Ping => {}
        }
    }
    let release = release.unwrap_or_else(|| fallback_kernel.to_owned());
    let why = format!("stopped before END: {}", boot.end);
    match ended {
        None => {
            let r = TestResult {
                status: Status::Fail,
                kernel: release.clone(),
                test: running.unwrap_or_else(|| "boot".into()),
                reason: why,
            };
            println!("{r}");
            results.push(r);
        }
        Some(n) if n != results.len() => {
            let r = TestResult {
                status: Status::Fail,
                kernel: release.clone(),
                test: "report".into(),
                reason: format!("END says {n} tests, {} reported", results.len()),
            };
            println!("{r}");
            results.push(r);
        }
        Some(_) => {}
    }
    Column {
        name,
        release,
        results,
        note,
    }
}

/// The same tests on the host's kernel, as root, directly.
fn run_host_tests(built: &Built, logs: &Path) -> Result<Column> {
    let name = "host".to_owned();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_owned());
    println!("\n==> vm-test: host ({release})");
    if util::output(Command::new("id").arg("-u"))?.trim() != "0" {
        let r = TestResult {
            status: Status::Skip,
            kernel: release.clone(),
            test: "host".into(),
            reason: "needs root to load eBPF programs".into(),
        };
        println!("{r}");
        return Ok(Column {
            name,
            release,
            results: vec![r],
            note: "not run".into(),
        });
    }
    let plugvisor_dir = built
        .plugvisor
        .parent()
        .context("plugvisor binary has no directory")?;
    let mut cmd = Command::new(&built.init);
    cmd.arg("--plugvisor-dir")
        .arg(plugvisor_dir)
        .arg("--echo")
        .arg(&built.echo)
        .args(["--echo-stamp", ECHO_STAMP])
        .stdin(Stdio::null());
    let log = logs.join("host.log");
    let boot = qemu::watch(cmd, Duration::from_secs(300), &log)?;
    let took = boot.took;
    Ok(column_from(
        name,
        &release,
        boot,
        format!(
            "directly, {}, output in {}",
            util::secs(took),
            log.display()
        ),
    ))
}

/// Whether KVM works for x86_64 guests here, found once per machine by a
/// short probe boot and remembered in the cache (keyed by the host kernel
/// and the qemu version, so a change of either probes again).
#[derive(Default)]
struct KvmVerdict {
    decided: Option<(Accel, String)>,
}

impl KvmVerdict {
    fn choose(
        &mut self,
        arch: Arch,
        choice: AccelChoice,
        kernel: &Path,
        initrd: &Path,
        cache: &Path,
    ) -> (Accel, String) {
        if arch != Arch::X86_64 {
            return (Accel::Tcg, "an arm64 guest on an x86_64 host".into());
        }
        match choice {
            AccelChoice::Tcg => return (Accel::Tcg, "--accel tcg".into()),
            AccelChoice::Kvm => return (Accel::Kvm, "--accel kvm".into()),
            AccelChoice::Auto => {}
        }
        if let Some(d) = &self.decided {
            return d.clone();
        }
        let d = probe_kvm(kernel, initrd, cache);
        self.decided = Some(d.clone());
        d
    }
}

fn probe_kvm(kernel: &Path, initrd: &Path, cache: &Path) -> (Accel, String) {
    if let Err(e) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return (Accel::Tcg, format!("/dev/kvm: {e}"));
    }
    let qemu_version = util::output(Command::new(Arch::X86_64.qemu()).arg("--version"))
        .map(|v| v.lines().next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let key = format!(
        "{} | {qemu_version}",
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let verdict_file = cache.join("kvm-verdict");
    if let Ok(text) = fs::read_to_string(&verdict_file)
        && let Some((k, v)) = text.split_once('\n')
        && k == key
    {
        let v = v.trim();
        let accel = if v.starts_with("usable") {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        return (
            accel,
            format!("{v}; remembered in {}", verdict_file.display()),
        );
    }
    println!(
        "vm-test: probing KVM with a boot of at most {}",
        util::secs(qemu::KVM_PROBE_TIMEOUT)
    );
    let probe = qemu::boot(&BootSpec {
        arch: Arch::X86_64,
        accel: Accel::Kvm,
        kernel,
        initrd,
        append: "vmtest.mode=ping",
        timeout: qemu::KVM_PROBE_TIMEOUT,
        log: &cache.join("logs/kvm-probe.log"),
        stop_at_ping: true,
    });
    let (accel, verdict) = match probe {
        Ok(b) if b.lines.contains(&Line::Ping) => (
            Accel::Kvm,
            format!(
                "usable: a probe boot reached init in {}",
                util::secs(b.took)
            ),
        ),
        Ok(b) => (
            Accel::Tcg,
            format!("unusable: a probe boot did not reach init ({})", b.end),
        ),
        Err(e) => (Accel::Tcg, format!("unusable: {e:#}")),
    };
    let _ = fs::write(&verdict_file, format!("{key}\n{verdict}\n"));
    (accel, verdict)
}
