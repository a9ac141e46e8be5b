//! The catalog: what packages `plugins_dir` holds, read and checked, and
//! the watcher that notices when a manifest is committed.
//!
//! A package is `plugins_dir/<name>/plugin.toml` plus the library it names.
//! Nothing here touches the store or a slot; the reload path asks the
//! catalog for a [`Package`] and decides.
pub mod manifest;
pub mod watch;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

pub use manifest::Manifest;

/// File name of the manifest inside a package directory.
pub const MANIFEST_FILE: &str = "plugin.toml";

/// Why a package was refused by the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The package directory or manifest could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// There is no manifest for this plugin.
    #[error("no package for plugin {plugin:?}: {path} does not exist")]
    NoPackage {
        /// The plugin.
        plugin: String,
        /// The manifest path looked for.
        path: PathBuf,
    },
    /// The manifest is larger than [`manifest::MAX_MANIFEST_BYTES`].
    #[error("manifest {path} is {size} bytes, more than the {max} allowed")]
    ManifestTooLarge {
        /// The manifest.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The manifest is not valid TOML or does not match the schema.
    #[error("manifest {path} is not valid: {message}")]
    ManifestSyntax {
        /// The manifest.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The manifest parsed but a value is unacceptable.
    #[error("manifest {path} is not valid: {message}")]
    ManifestInvalid {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The manifest's name differs from its directory.
    #[error("manifest {path} names plugin {found:?} but lives in the directory of {expected:?}")]
    NameMismatch {
        /// The manifest.
        path: PathBuf,
        /// The directory name.
        expected: String,
        /// The manifest's name.
        found: String,
    },
    /// `library` points outside the package directory (by path or symlink).
    #[error("manifest {path}: library {library:?} escapes the package directory")]
    LibraryEscapes {
        /// The manifest.
        path: PathBuf,
        /// The `library` value.
        library: String,
    },
    /// The library named by the manifest is missing or unreadable.
    #[error("library {path} named by the manifest cannot be read: {source}")]
    LibraryMissing {
        /// The library.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A package as read from `plugins_dir`, manifest validated, library located.
#[derive(Debug, Clone)]
pub struct Package {
    /// The package directory.
    pub dir: PathBuf,
    /// Path of `plugin.toml`.
    pub manifest_path: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// sha256 of the manifest's bytes: what the catalog has already acted on.
    pub fingerprint: String,
    /// Canonical path of the library (inside `dir`).
    pub library_path: PathBuf,
}

/// Names of the package directories in `plugins_dir` that hold a manifest.
pub fn list(plugins_dir: &Path) -> Result<Vec<String>, CatalogError> {
    let read = |source| CatalogError::Read {
        path: plugins_dir.to_owned(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(plugins_dir).map_err(read)? {
        let entry = entry.map_err(read)?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if entry.path().join(MANIFEST_FILE).is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Reads and checks the package of `plugin`.
pub fn read_package(plugins_dir: &Path, plugin: &str) -> Result<Package, CatalogError> {
    let dir = plugins_dir.join(plugin);
    let manifest_path = dir.join(MANIFEST_FILE);
    let file = match std::fs::File::open(&manifest_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CatalogError::NoPackage {
                plugin: plugin.to_owned(),
                path: manifest_path,
            });
        }
        Err(source) => {
            return Err(CatalogError::Read {
                path: manifest_path,
                source,
            });
        }
    };
    let read = |source| CatalogError::Read {
        path: manifest_path.clone(),
        source,
    };
    let size = file.metadata().map_err(read)?.len();
    if size > manifest::MAX_MANIFEST_BYTES {
        return Err(CatalogError::ManifestTooLarge {
            path: manifest_path,
            size,
            max: manifest::MAX_MANIFEST_BYTES,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(manifest::MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    let fingerprint = hex::encode(Sha256::digest(&bytes));
    let text = String::from_utf8(bytes).map_err(|e| CatalogError::ManifestSyntax {
        path: manifest_path.clone(),
        message: format!("not UTF-8: {e}"),
    })?;
    let manifest = Manifest::parse(&text, &manifest_path)?;
    if manifest.name != plugin {
        return Err(CatalogError::NameMismatch {
            path: manifest_path,
            expected: plugin.to_owned(),
            found: manifest.name,
        });
    }
    let canonical_dir = dir.canonicalize().map_err(|source| CatalogError::Read {
        path: dir.clone(),
        source,
    })?;
    let library_path = dir
        .join(&manifest.library)
        .canonicalize()
        .map_err(|source| CatalogError::LibraryMissing {
            path: dir.join(&manifest.library),
            source,
        })?;
    // A symlink inside the package may still point elsewhere.
    if library_path.parent() != Some(canonical_dir.as_path()) {
        return Err(CatalogError::LibraryEscapes {
            path: manifest_path,
            library: manifest.library,
        });
    }
    Ok(Package {
        dir,
        manifest_path,
        manifest,
        fingerprint,
        library_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pkg(root: &Path, name: &str, library: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(MANIFEST_FILE),
            format!(
                "name = \"{name}\"\nversion = \"1.0.0\"\nlibrary = \"{library}\"\nsha256 = \"{}\"\nabi = 1\n",
                "0".repeat(64)
            ),
        )
        .unwrap();
        dir
    }

    #[test]
    fn reads_a_package_and_lists_it() {
        let t = tempfile::tempdir().unwrap();
        let dir = write_pkg(t.path(), "echo", "lib.so");
        std::fs::write(dir.join("lib.so"), b"x").unwrap();
        std::fs::create_dir(t.path().join("empty")).unwrap();
        assert_eq!(list(t.path()).unwrap(), vec!["echo".to_owned()]);
        let p = read_package(t.path(), "echo").unwrap();
        assert_eq!(p.manifest.name, "echo");
        assert_eq!(p.fingerprint.len(), 64);
    }

    #[test]
    fn symlink_out_of_package_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = write_pkg(t.path(), "echo", "lib.so");
        std::fs::write(t.path().join("outside.so"), b"x").unwrap();
        std::os::unix::fs::symlink(t.path().join("outside.so"), dir.join("lib.so")).unwrap();
        let err = read_package(t.path(), "echo").unwrap_err();
        assert!(matches!(err, CatalogError::LibraryEscapes { .. }), "{err}");
    }

    #[test]
    fn directory_and_name_must_agree() {
        let t = tempfile::tempdir().unwrap();
        let dir = write_pkg(t.path(), "echo", "lib.so");
        std::fs::write(dir.join("lib.so"), b"x").unwrap();
        std::fs::rename(&dir, t.path().join("other")).unwrap();
        let err = read_package(t.path(), "other").unwrap_err();
        assert!(matches!(err, CatalogError::NameMismatch { .. }), "{err}");
    }

    #[test]
    fn missing_library_and_missing_package() {
        let t = tempfile::tempdir().unwrap();
        write_pkg(t.path(), "echo", "lib.so");
        assert!(matches!(
            read_package(t.path(), "echo"),
            Err(CatalogError::LibraryMissing { .. })
        ));
        assert!(matches!(
            read_package(t.path(), "nope"),
            Err(CatalogError::NoPackage { .. })
        ));
    }
}
