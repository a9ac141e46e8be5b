//! Plugin libraries built for a test: the workspace's plugins and fixtures
//! compiled with a version (and for some fixtures a name) stamped in, and
//! series of distinct versions made from one build by rewriting the stamp.
//! Builds are kept under `target/release/stamped` and reused across test
//! runs, so only the first run pays for cargo.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use crate::target_dir;

/// Builds the echo plugin stamped with `version` (once per version per test
/// run) and returns the library's path.
pub fn build_echo_version(version: &str) -> PathBuf {
    build_plugin_version("plugvisor-echo", "plugvisor_echo", version)
}

/// Builds workspace plugin `package` (library `lib`) stamped with `version`.
pub fn build_plugin_version(package: &str, lib: &str, version: &str) -> PathBuf {
    build_stamped(
        package,
        lib,
        &format!("lib{lib}-{version}.so"),
        &[("PLUGVISOR_PLUGIN_VERSION", version)],
    )
}

/// Builds the `named` fixture as plugin `name` at `version` (a distinct
/// plugin per name, for dependency tests). It answers `[NAME VERSION] frame`.
pub fn build_named_plugin(name: &str, version: &str) -> PathBuf {
    build_stamped(
        "plugvisor-fixture-named",
        "fixture_named",
        &format!("lib{name}-{version}.so"),
        &[
            ("PLUGVISOR_PLUGIN_NAME", name),
            ("PLUGVISOR_PLUGIN_VERSION", version),
        ],
    )
}

/// Builds fixture crate `package` (library `lib`) as plugin `name` at
/// `version`, for the fixtures whose name can be stamped
/// (`PLUGVISOR_PLUGIN_NAME`): a misbehaving plugin loaded beside a good
/// echo instead of as echo.
pub fn build_fixture_as(package: &str, lib: &str, name: &str, version: &str) -> PathBuf {
    build_stamped(
        package,
        lib,
        &format!("lib{name}-{version}.so"),
        &[
            ("PLUGVISOR_PLUGIN_NAME", name),
            ("PLUGVISOR_PLUGIN_VERSION", version),
        ],
    )
}

/// Builds the C echo plugin (`plugins/c-echo/echo.c`, with nothing but
/// `plugin-sdk/include/plugvisor.h`) as plugin `name` at `version`, its
/// descriptor claiming plugin ABI `abi` — the stamps a C build takes as
/// `-D` flags, as `cargo xtask build` compiles its default. It answers
/// `[NAME VERSION] frame`, and `c` to `lang`.
pub fn build_c_plugin(name: &str, version: &str, abi: u32) -> PathBuf {
    static BUILD_LOCK: Mutex<()> = Mutex::new(());
    let _g = BUILD_LOCK.lock().unwrap();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out_dir = target_dir().join("stamped").join("c-echo");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(format!("libc_{name}-{version}-abi{abi}.so"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args([
            "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
        ])
        .arg("-I")
        .arg(workspace.join("plugin-sdk/include"))
        .arg(format!("-DPV_NAME=\"{name}\""))
        .arg(format!("-DPV_VERSION=\"{version}\""))
        .arg(format!("-DPV_ABI={abi}"))
        .arg("-o")
        .arg(&out)
        .arg(workspace.join("plugins/c-echo/echo.c"))
        .status()
        .unwrap_or_else(|e| panic!("running {cc} (a C compiler is needed): {e}"));
    assert!(status.success(), "{cc} could not build the C echo plugin");
    out
}

/// The newest modification time of any file under `dir`.
fn newest_under(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                if e.file_name() != "target" {
                    stack.push(e.path());
                }
            } else if let Ok(t) = meta.modified() {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

/// Builds `package` with `env` set (cargo rebuilds when an `option_env!`
/// it read changes) and keeps the library as `file`. A kept library is
/// used again (also by later test runs) until a plugin or SDK source is
/// newer than it.
fn build_stamped(package: &str, lib: &str, file: &str, env: &[(&str, &str)]) -> PathBuf {
    static BUILD_LOCK: Mutex<()> = Mutex::new(());
    let _g = BUILD_LOCK.lock().unwrap();
    let out_dir = target_dir().join("stamped").join(package);
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(file);
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let sources = ["plugins", "plugin-sdk"]
        .iter()
        .filter_map(|d| newest_under(&workspace.join(d)))
        .max();
    let stale = match (std::fs::metadata(&out).and_then(|m| m.modified()), sources) {
        (Ok(built), Some(src)) => src > built,
        (Ok(_), None) => false,
        (Err(_), _) => true,
    };
    if stale {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let build_dir = target_dir().join("stamped").join("build");
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                package,
                "--target-dir",
            ])
            .arg(&build_dir)
            .envs(env.iter().copied())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building {package} with {env:?}");
        std::fs::copy(build_dir.join(format!("release/lib{lib}.so")), &out).unwrap();
    }
    out
}

/// `count` distinct builds of the echo plugin, versions `MAJOR.0.100001`,
/// `MAJOR.0.100002`, … in ascending order, as `(version, library)`.
///
/// One cargo build stamps `MAJOR.0.100000`; every other version is that
/// library with the version's bytes rewritten in place (same length, so
/// no offset moves). Each result is a real, distinct library — its own
/// sha256, its descriptor and its responses carry its own version — at the
/// cost of one build instead of `count`, which is what makes 1000-reload
/// soaks and benchmarks affordable.
///
/// # Panics
/// When `count` exceeds 99 999 or the stamped version is not found in the
/// built library.
pub fn echo_version_series(major: u64, count: usize) -> Vec<(String, PathBuf)> {
    version_series("plugvisor-echo", "plugvisor_echo", major, count)
}

/// [`echo_version_series`] for any workspace plugin `package` (library
/// `lib`) that stamps its version from `PLUGVISOR_PLUGIN_VERSION`.
pub fn version_series(
    package: &str,
    lib: &str,
    major: u64,
    count: usize,
) -> Vec<(String, PathBuf)> {
    let base = build_plugin_version(package, lib, &format!("{major}.0.100000"));
    library_version_series(&base, &format!("lib{lib}"), major, count)
}

/// The series of [`version_series`] from an already built library `base`
/// stamped `MAJOR.0.100000` (its descriptor's version read at run time, not
/// folded into code); the results are named `PREFIX-VERSION.so`.
///
/// # Panics
/// When `count` exceeds 99 999 or the stamped version is not in `base`.
pub fn library_version_series(
    base: &Path,
    prefix: &str,
    major: u64,
    count: usize,
) -> Vec<(String, PathBuf)> {
    assert!(count < 100_000, "at most 99 999 versions in a series");
    let base_version = format!("{major}.0.100000");
    let stamped = StampedLibrary::read(base, &base_version).unwrap();
    let dir = target_dir()
        .join("stamped")
        .join(format!("{prefix}-series"));
    std::fs::create_dir_all(&dir).unwrap();
    (1..=count)
        .map(|i| {
            let version = format!("{major}.0.{}", 100_000 + i);
            let out = dir.join(format!("{prefix}-{version}.so"));
            if !out.is_file() {
                stamped.write_version(&version, &out).unwrap();
            }
            (version, out)
        })
        .collect()
}

/// Builds the `sized` fixture (plugin `sized`) at `version` with `funcs`
/// generated functions and a `data_kb` KiB data table (see its
/// `build.rs`); for the reload benchmarks.
pub fn build_sized_plugin(version: &str, funcs: usize, data_kb: usize) -> PathBuf {
    let (funcs, data_kb) = (funcs.to_string(), data_kb.to_string());
    build_stamped(
        "plugvisor-fixture-sized",
        "fixture_sized",
        &format!("libsized-{funcs}f-{data_kb}k-{version}.so"),
        &[
            ("PLUGVISOR_PLUGIN_VERSION", version),
            ("PLUGVISOR_FIXTURE_FUNCS", &funcs),
            ("PLUGVISOR_FIXTURE_DATA_KB", &data_kb),
        ],
    )
}

/// A plugin library built with a version stamp (`PLUGVISOR_PLUGIN_VERSION`),
/// from which libraries of other versions of the same length are made by
/// rewriting the stamp's bytes in place: no offset moves, and each result
/// is a real, distinct library (its own sha256; its descriptor and its
/// responses carry its own version). [`echo_version_series`] uses it, and
/// so does `plugvisor-vm-tests`, which has no cargo inside a VM.
pub struct StampedLibrary {
    bytes: Vec<u8>,
    base_version: String,
    hits: Vec<usize>,
}

impl StampedLibrary {
    /// Reads `path`, built stamped with `base_version`.
    pub fn read(path: &Path, base_version: &str) -> Result<StampedLibrary, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let needle = base_version.as_bytes();
        let hits: Vec<usize> = bytes
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .collect();
        if hits.is_empty() {
            return Err(format!(
                "version stamp {base_version} not found in {}",
                path.display()
            ));
        }
        Ok(StampedLibrary {
            bytes,
            base_version: base_version.to_owned(),
            hits,
        })
    }

    /// Writes the library stamped `version` to `out` (through a temporary
    /// file and a rename, so `out` is never half-written).
    pub fn write_version(&self, version: &str, out: &Path) -> Result<(), String> {
        if version.len() != self.base_version.len() {
            return Err(format!(
                "version {version} is not as long as the stamp {}",
                self.base_version
            ));
        }
        let mut patched = self.bytes.clone();
        for &at in &self.hits {
            patched[at..at + version.len()].copy_from_slice(version.as_bytes());
        }
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, &patched).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, out).map_err(|e| format!("renaming to {}: {e}", out.display()))
    }
}
