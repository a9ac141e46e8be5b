//! The bundled example plugin: on the embedded default, a fresh
//! `plugins_dir` is seeded with the `echo` package built beside the binary,
//! so `plugvisor run` with no flags serves something real.
use std::path::{Path, PathBuf};

use crate::catalog::MANIFEST_FILE;
use crate::{loader, pack};

/// File name of the bundled example library.
pub const BUNDLED_ECHO: &str = "libplugvisor_echo.so";

/// The example plugin as `cargo build --release` (which `cargo xtask test`
/// runs before the tests) leaves it, for unit tests that load a real
/// library.
#[cfg(test)]
pub(crate) fn built_echo_library() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    ["release", "debug"]
        .iter()
        .map(|p| root.join(p).join(BUNDLED_ECHO))
        .find(|p| p.is_file())
        .expect("libplugvisor_echo.so: run `cargo build --release` first")
}

/// Why the bundled plugin could not be seeded.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The library is not next to the executable.
    #[error("bundled plugin {path} not found (build it with `cargo build --release`)")]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Reading or writing failed.
    #[error("seeding {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The library is not a loadable plugin.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// The package could not be written.
    #[error(transparent)]
    Pack(#[from] pack::PackError),
}

/// Where the bundled library is expected: beside the running executable.
pub fn bundled_echo_path() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()
        .map(|d| d.join(BUNDLED_ECHO))
}

/// Seeds `plugins_dir/echo` from the bundled library unless a package is
/// already there. Returns the seeded version.
pub fn seed_echo(plugins_dir: &Path) -> Result<Option<String>, BundleError> {
    let dir = plugins_dir.join("echo");
    if dir.join(MANIFEST_FILE).exists() {
        return Ok(None);
    }
    let lib = bundled_echo_path().ok_or_else(|| BundleError::Missing {
        path: PathBuf::from(BUNDLED_ECHO),
    })?;
    if !lib.is_file() {
        return Err(BundleError::Missing { path: lib });
    }
    let id = loader::inspect(&lib)?;
    write_package(&dir, &id.name, &id.version, id.abi, &lib)?;
    Ok(Some(id.version))
}

/// Writes a package the way an operator should: the library under a new
/// name first, then the manifest renamed into place (the commit point).
/// The same code as `plugvisor pack`, unsigned.
pub fn write_package(
    dir: &Path,
    name: &str,
    version: &str,
    abi: u32,
    lib: &Path,
) -> Result<(), BundleError> {
    let version = semver::Version::parse(version).map_err(|e| BundleError::Io {
        path: lib.to_owned(),
        source: std::io::Error::other(format!("version {version:?} is not semver: {e}")),
    })?;
    pack::pack(
        dir,
        pack::PackOptions {
            library: Some(lib.to_owned()),
            name: Some(name.to_owned()),
            version: Some(version),
            abi: Some(abi),
            ..Default::default()
        },
    )?;
    Ok(())
}
