//! The bundled example plugin: on the embedded default, a fresh
//! `plugins_dir` is seeded with the `echo` package built beside the binary,
//! so `plugvisor run` with no flags serves something real.
use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::catalog::MANIFEST_FILE;
use crate::loader;

/// File name of the bundled example library.
pub const BUNDLED_ECHO: &str = "libplugvisor_echo.so";

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
pub fn write_package(
    dir: &Path,
    name: &str,
    version: &str,
    abi: u32,
    lib: &Path,
) -> Result<(), BundleError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BundleError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let bytes = std::fs::read(lib).map_err(io(lib))?;
    let sha = hex::encode(Sha256::digest(&bytes));
    let lib_name = format!("lib{}-{version}.so", name.replace('-', "_"));
    let lib_path = dir.join(&lib_name);
    std::fs::write(&lib_path, &bytes).map_err(io(&lib_path))?;
    let manifest = format!(
        "name = \"{name}\"\nversion = \"{version}\"\nlibrary = \"{lib_name}\"\nsha256 = \"{sha}\"\nabi = {abi}\n"
    );
    let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(manifest.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    let target = dir.join(MANIFEST_FILE);
    std::fs::rename(&tmp, &target).map_err(io(&target))
}
