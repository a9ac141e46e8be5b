//! `cargo xtask setup`: what a fresh Debian 12 machine needs before the
//! build and the tests can run. Idempotent: each step checks first and
//! prints `setup: <thing> ... already present` or `... installed`.
//!
//! * apt packages the tests call (`prometheus` and `promtool`,
//!   `systemd-analyze`, `setpriv`, `ip`, …);
//! * `kubernetes-validate` from PyPI in a venv of its own under the target
//!   dir: it ships the Kubernetes API JSON schemas inside the package, so the
//!   DaemonSet is validated offline at test time;
//! * `rust-src` for the nightly toolchain (the eBPF crate is built with
//!   `-Z build-std=core`);
//! * the `aarch64-unknown-linux-gnu` Rust target and Debian's arm64 cross
//!   toolchain, and qemu for both architectures (`cargo xtask vm-test`);
//! * `cargo-fuzz`, which runs the fuzz targets in `fuzz/` (see
//!   `docs/FUZZING.md`);
//! * a `bpf-linker` built against the nightly's own libLLVM. bpf-linker
//!   must speak the LLVM bitcode rustc emits, so its LLVM major has to match
//!   the nightly's; Debian 12 has no system LLVM that new, and 0.12 has the
//!   BTF fix aya-log needs (see `EBPF-NOTES.md`).
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::util;

/// Debian packages whose tools the tests call, and the tools they give.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("prometheus", "prometheus, promtool"),
    ("systemd", "systemd-analyze"),
    ("python3-venv", "python3 -m venv, for kubernetes-validate"),
    ("binutils", "readelf, nm"),
    ("iproute2", "ip, ss"),
    ("util-linux", "setpriv"),
    ("procps", "ps, pgrep, kill"),
    ("curl", "curl"),
    (
        "nginx-light",
        "nginx, the HTTP server of the TUF repository in the sync tests",
    ),
    (
        "mosquitto",
        "mosquitto, the MQTT broker of the report tests (and mosquitto_passwd)",
    ),
    (
        "mosquitto-clients",
        "mosquitto_sub, to watch a node's reports by hand",
    ),
    ("stress-ng", "stress-ng, for cargo xtask test --stress"),
    // cargo xtask vm-test (docs/VM-TESTS.md):
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("qemu-system-arm", "qemu-system-aarch64"),
    ("gcc-aarch64-linux-gnu", "the arm64 cross linker"),
    (
        "libc6-dev-arm64-cross",
        "arm64 libc to link against and to ship to the guest",
    ),
    (
        "debian-archive-keyring",
        "the keys the kernel images' package lists are checked with",
    ),
];

/// Rust targets the cross builds need (`cargo xtask vm-test --arch aarch64`).
const RUST_TARGETS: &[&str] = &["aarch64-unknown-linux-gnu"];

/// The Kubernetes manifest validator, pinned: its wheel carries the API
/// schemas of Kubernetes 1.25 … 1.37, so validating needs no network.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The bpf-linker release with the BTF union-name fix (see module docs).
const BPF_LINKER_VERSION: &str = "0.12.0";

/// Debian's hook that lets package scripts start services. Exit code 101
/// means "do not start": installing `prometheus` would otherwise try to
/// start the service, which fails (or worse, succeeds) in a container.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Runs every setup step in order.
pub fn run() -> Result<()> {
    apt_packages().context("installing apt packages")?;
    rust_src().context("installing rust-src for the nightly toolchain")?;
    rust_targets().context("installing Rust targets")?;
    bpf_linker().context("installing bpf-linker")?;
    kubernetes_validate().context("installing kubernetes-validate")?;
    cargo_fuzz().context("installing cargo-fuzz")?;
    Ok(())
}

/// Where `kubernetes-validate`'s venv lives: beside the build outputs, so a
/// `cargo clean` takes it too and the next setup puts it back. The tests
/// find it there (or through `PLUGVISOR_KUBERNETES_VALIDATE`).
pub fn kubernetes_validate_venv() -> Result<PathBuf> {
    Ok(util::target_dir()?.join("tools/kubernetes-validate"))
}

fn kubernetes_validate() -> Result<()> {
    let venv = kubernetes_validate_venv()?;
    let bin = venv.join("bin/kubernetes-validate");
    let wanted = KUBERNETES_VALIDATE
        .split_once("==")
        .map_or(KUBERNETES_VALIDATE, |(_, v)| v);
    let thing = format!("{KUBERNETES_VALIDATE} (venv {})", venv.display());
    if util::output(Command::new(&bin).arg("--version"))
        .is_ok_and(|out| out.split_whitespace().any(|w| w == wanted))
    {
        println!("setup: {thing} ... already present");
        return Ok(());
    }
    // Debian's own python3 (python3-venv is an apt package above); a
    // python3 on PATH elsewhere.
    let python = Path::new("/usr/bin/python3");
    let python = if python.is_file() {
        python.to_path_buf()
    } else {
        util::which("python3").context("no python3 to make a venv with")?
    };
    util::run(
        Command::new(python)
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )?;
    util::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(KUBERNETES_VALIDATE),
    )?;
    println!("setup: {thing} ... installed");
    Ok(())
}

/// `cargo fuzz`, for the fuzz targets in `fuzz/` (run by `cargo xtask
/// test` and `fuzz/run.sh`). Installed from crates.io with its lock file.
fn cargo_fuzz() -> Result<()> {
    if util::output(Command::new("cargo").args(["fuzz", "--version"])).is_ok() {
        println!("setup: cargo-fuzz ... already present");
        return Ok(());
    }
    let started = installing("cargo-fuzz", "1 min: it is compiled from source");
    util::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    done(started);
    println!("setup: cargo-fuzz ... installed");
    Ok(())
}

fn apt_packages() -> Result<()> {
    apt_install(APT_PACKAGES)
}

/// Installs the Debian `packages` (name, what it gives) that are missing,
/// saying which were already present.
pub fn apt_install(packages: &[(&str, &str)]) -> Result<()> {
    if util::which("dpkg-query").is_none() {
        let names: Vec<&str> = packages.iter().map(|(p, _)| *p).collect();
        println!(
            "setup: apt packages ... skipped (not a Debian system; \
             the tests need the tools of: {})",
            names.join(", ")
        );
        return Ok(());
    }
    let mut missing = Vec::new();
    for (package, why) in packages {
        if dpkg_installed(package) {
            println!("setup: apt package {package} ({why}) ... already present");
        } else {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root()? {
        bail!(
            "missing apt packages {missing:?}; installing them needs root: \
             run `sudo apt-get install --no-install-recommends {}` or rerun as root",
            missing.join(" ")
        );
    }

    let started = installing(
        &format!("apt packages {}", missing.join(" ")),
        "1–3 min, most of it the download",
    );
    let _no_service_starts = PolicyRcGuard::install()?;
    util::run(Command::new("apt-get").args(["update"]))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    // A package whose maintainer script failed is "half-configured", not
    // installed; apt's exit status alone would not always say so.
    for package in missing {
        if !dpkg_installed(package) {
            bail!(
                "apt-get install finished but {package} is not fully installed \
                 (see `dpkg -s {package}`)"
            );
        }
        println!("setup: apt package {package} ... installed");
    }
    done(started);
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    // dpkg-query fails for packages it has never heard of: also "missing".
    util::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status.trim() == "install ok installed")
}

fn is_root() -> Result<bool> {
    Ok(util::output(Command::new("id").arg("-u"))?.trim() == "0")
}

/// Denies service starts while apt runs; removes the hook on drop, but only
/// if this guard created it (a container image often ships its own).
struct PolicyRcGuard {
    created: bool,
}

impl PolicyRcGuard {
    fn install() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { created: false });
        }
        fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n\
             # Temporary, from `cargo xtask setup`: no service starts during apt-get install.\n\
             exit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Self { created: true })
    }
}

impl Drop for PolicyRcGuard {
    fn drop(&mut self) {
        if self.created {
            if let Err(e) = fs::remove_file(POLICY_RC_D) {
                eprintln!("setup: warning: could not remove temporary {POLICY_RC_D}: {e}");
            }
        }
    }
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = util::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

fn rust_src() -> Result<()> {
    let sysroot = if let Ok(s) = nightly_sysroot() {
        s
    } else {
        util::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        println!("setup: nightly toolchain ... installed");
        nightly_sysroot()?
    };
    // What `-Z build-std` reads.
    if sysroot.join("lib/rustlib/src/rust/library").is_dir() {
        println!("setup: rust-src (nightly) ... already present");
        return Ok(());
    }
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    println!("setup: rust-src (nightly) ... installed");
    Ok(())
}

fn rust_targets() -> Result<()> {
    let installed = util::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    for target in RUST_TARGETS {
        if installed.lines().any(|l| l.trim() == *target) {
            println!("setup: Rust target {target} ... already present");
            continue;
        }
        util::run(Command::new("rustup").args(["target", "add", target]))?;
        println!("setup: Rust target {target} ... installed");
    }
    Ok(())
}

/// The LLVM major of the nightly toolchain.
fn nightly_llvm_major() -> Result<u32> {
    llvm_major(&util::output(
        Command::new("rustc").args(["+nightly", "-vV"]),
    )?)
}

/// `LLVM version: 22.1.4` in `rustc -vV` output → 22.
fn llvm_major(rustc_vv: &str) -> Result<u32> {
    let version = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .context("`rustc +nightly -vV` prints no `LLVM version:` line")?
        .trim();
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("unexpected LLVM version {version:?} from `rustc +nightly -vV`"))
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

fn bpf_linker() -> Result<()> {
    let major = nightly_llvm_major()?;
    let cargo_home = cargo_home()?;
    // Records which LLVM major the installed bpf-linker was built for; its
    // `--version` does not say.
    let marker = cargo_home.join("bpf-linker.llvm");
    let thing = format!("bpf-linker {BPF_LINKER_VERSION} (LLVM {major})");

    match installed_bpf_linker(&cargo_home) {
        Some(path) if is_wanted_version(&path) => {
            let recorded = fs::read_to_string(&marker).ok();
            if recorded.as_deref().map(str::trim) == Some(major.to_string().as_str()) {
                println!("setup: {thing} ... already present");
                return Ok(());
            }
            // Built by hand with the recipe (or before the marker existed):
            // the dynamic link to the nightly's libLLVM tells its major.
            if links_llvm_major(&path, major) {
                write_marker(&marker, major)?;
                println!("setup: {thing} ... already present (links libLLVM {major}; recorded)");
                return Ok(());
            }
        }
        _ => {}
    }

    let started = installing(
        &thing,
        "3 min on 2 cores: it is compiled from source against the nightly's LLVM",
    );
    install_bpf_linker(major)?;
    write_marker(&marker, major)?;
    done(started);
    if util::which("bpf-linker").is_none() {
        println!(
            "setup: warning: {} is not on PATH; aya-build will not find bpf-linker",
            cargo_home.join("bin").display()
        );
    }
    println!("setup: {thing} ... installed");
    Ok(())
}

fn installed_bpf_linker(cargo_home: &Path) -> Option<PathBuf> {
    util::which("bpf-linker").or_else(|| {
        let p = cargo_home.join("bin/bpf-linker");
        p.is_file().then_some(p)
    })
}

/// True if `bpf-linker --version` runs (its libLLVM still resolves) and
/// reports the wanted minor release.
fn is_wanted_version(path: &Path) -> bool {
    let wanted_minor = BPF_LINKER_VERSION
        .rsplit_once('.')
        .map_or(BPF_LINKER_VERSION, |(m, _)| m);
    util::output(Command::new(path).arg("--version")).is_ok_and(|out| {
        out.split_whitespace().nth(1).is_some_and(|v| {
            v.strip_prefix(wanted_minor)
                .is_some_and(|rest| rest.starts_with('.'))
        })
    })
}

/// True if `ldd` shows `path` linked to a resolvable libLLVM of `major`
/// (`libLLVM.so.22.1-rust-…` or `libLLVM-22-rust-….so`).
fn links_llvm_major(path: &Path, major: u32) -> bool {
    util::output(Command::new("ldd").arg(path)).is_ok_and(|out| ldd_shows_llvm(&out, major))
}

/// Whether `ldd` output has a resolved libLLVM of `major`.
fn ldd_shows_llvm(ldd: &str, major: u32) -> bool {
    ldd.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        let matches = name.starts_with(&format!("libLLVM-{major}-"))
            || name == format!("libLLVM.so.{major}")
            || name.starts_with(&format!("libLLVM.so.{major}."));
        matches && !line.contains("not found")
    })
}

fn write_marker(marker: &Path, major: u32) -> Result<()> {
    fs::write(marker, format!("{major}\n")).with_context(|| format!("writing {}", marker.display()))
}

/// The recipe from `EBPF-NOTES.md`: link bpf-linker against the nightly's
/// own `libLLVM-<major>-*.so` (no system LLVM needed) and set an rpath so
/// it finds that library at run time.
fn install_bpf_linker(major: u32) -> Result<()> {
    let lib_dir = nightly_sysroot()?.join("lib");
    let lib = find_libllvm(&lib_dir, major)?;
    let lib_dir = lib_dir.to_str().context("non-UTF-8 nightly sysroot path")?;
    // RUSTFLAGS is split on whitespace.
    if lib_dir.contains(char::is_whitespace) {
        bail!(
            "the nightly sysroot path {lib_dir:?} contains whitespace; RUSTFLAGS cannot carry it"
        );
    }
    let rustflags = format!("-L {lib_dir} -C link-arg=-l{lib} -C link-arg=-Wl,-rpath,{lib_dir}");
    util::run(
        util::cargo()
            .env("RUSTFLAGS", rustflags)
            // Would override RUSTFLAGS if inherited.
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--no-default-features", "--features"])
            .arg(format!("llvm-{major},no-llvm-linking"))
            // Replace a bpf-linker built for another LLVM; cargo does not
            // track RUSTFLAGS, so it would otherwise keep the old binary.
            .arg("--force"),
    )
}

/// `libLLVM-22-rust-1.97.0-nightly.so` in `lib_dir` → `LLVM-22-rust-1.97.0-nightly`.
fn find_libllvm(lib_dir: &Path, major: u32) -> Result<String> {
    let prefix = format!("libLLVM-{major}-");
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("listing {}", lib_dir.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(&prefix) {
            if let Some(stem) = name.strip_suffix(".so") {
                return Ok(stem["lib".len()..].to_owned());
            }
        }
    }
    bail!(
        "no {prefix}*.so in {}: is the nightly toolchain complete?",
        lib_dir.display()
    )
}

/// Says what is about to take a while and roughly how long, so a first
/// run does not look hung; returns when it started.
fn installing(thing: &str, about: &str) -> std::time::Instant {
    println!("setup: {thing} ... installing (usually about {about})");
    std::time::Instant::now()
}

/// Says how long the step begun at `started` took.
fn done(started: std::time::Instant) {
    println!("setup: ... took {}", util::secs(started.elapsed()));
}

#[cfg(test)]
mod tests {
    use super::{ldd_shows_llvm, llvm_major};

    #[test]
    fn reads_the_llvm_major() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv).unwrap(), 22);
        assert!(llvm_major("rustc 1.97.0\n").is_err());
    }

    #[test]
    fn finds_libllvm_in_ldd_output() {
        let ldd = "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n\
                   \tlibLLVM.so.22.1-rust-1.97.0-nightly => /t/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x2)\n";
        assert!(ldd_shows_llvm(ldd, 22));
        assert!(!ldd_shows_llvm(ldd, 21));
        assert!(ldd_shows_llvm(
            "\tlibLLVM-22-rust-1.97.0-nightly.so => /x (0x3)\n",
            22
        ));
        assert!(!ldd_shows_llvm(
            "\tlibLLVM-22-rust-1.97.0-nightly.so => not found\n",
            22
        ));
    }
}
