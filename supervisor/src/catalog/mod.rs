//! The catalog: what packages `plugins_dir` holds, read and checked, and
//! the watcher that notices when a manifest is committed.
//!
//! A package is `plugins_dir/<name>/plugin.toml` plus the library it names.
//! Nothing here touches the store or a slot; the reload path asks the
//! catalog for a [`Package`] and decides.
//!
//! A package may carry a detached signature, `plugin.toml.sig`, written
//! *before* the manifest is renamed into place. The catalog reads the
//! manifest, then the signature, then the manifest again, and retries if
//! the manifest changed in between, so the pair it hands on was on disk
//! together (see `trust` for what happens when a signature names another
//! manifest).
pub mod manifest;
pub mod strict;
pub mod watch;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

pub use manifest::Manifest;
pub use strict::UnsafePath;

use crate::trust::SIGNATURE_FILE;

/// File name of the manifest inside a package directory.
pub const MANIFEST_FILE: &str = "plugin.toml";

/// Largest signature file read (a real one is under 300 bytes).
const MAX_SIGNATURE_BYTES: u64 = 4096;
/// How often the manifest–signature pair is re-read when the manifest
/// changes under the reader, before the last pair read is used.
const CONSISTENT_READ_ATTEMPTS: usize = 3;

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
    /// A directory or file of the package may be written by someone other
    /// than the daemon's user or root.
    #[error(transparent)]
    Unsafe(#[from] UnsafePath),
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
    /// The manifest's exact bytes (what a signature covers).
    pub manifest_bytes: Vec<u8>,
    /// sha256 of the manifest's bytes.
    pub manifest_sha256: String,
    /// The detached signature's bytes, if `plugin.toml.sig` exists.
    pub signature: Option<Vec<u8>>,
    /// sha256 of the manifest's bytes, plus that of the signature if there
    /// is one: what the reload path has already acted on. A re-signed
    /// package (same manifest, new signature) is a change.
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

/// Reads and checks the package of `plugin` in `plugins_dir` (whose
/// permissions are checked too).
pub fn read_package(plugins_dir: &Path, plugin: &str) -> Result<Package, CatalogError> {
    strict::check_path("plugins_dir", plugins_dir)?;
    read_package_at(&plugins_dir.join(plugin), Some(plugin))
}

/// Reads and checks the package in `dir`. With `expected_name`, the
/// manifest must name that plugin (the daemon passes the directory's name;
/// `plugvisor verify` of a package not yet in `plugins_dir` passes none).
pub fn read_package_at(dir: &Path, expected_name: Option<&str>) -> Result<Package, CatalogError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let plugin = expected_name.unwrap_or("<package>");
    if !manifest_path.exists() {
        return Err(CatalogError::NoPackage {
            plugin: plugin.to_owned(),
            path: manifest_path,
        });
    }
    let canonical_dir = dir.canonicalize().map_err(|source| CatalogError::Read {
        path: dir.to_owned(),
        source,
    })?;
    strict::check_path("package directory", &canonical_dir)?;
    let (bytes, signature) = read_consistent(plugin, &manifest_path)?;
    let manifest_sha256 = hex::encode(Sha256::digest(&bytes));
    let fingerprint = match &signature {
        None => manifest_sha256.clone(),
        Some(sig) => format!("{manifest_sha256}+{}", hex::encode(Sha256::digest(sig))),
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| CatalogError::ManifestSyntax {
        path: manifest_path.clone(),
        message: format!("not UTF-8: {e}"),
    })?;
    let manifest = Manifest::parse(text, &manifest_path)?;
    if let Some(expected) = expected_name {
        if manifest.name != expected {
            return Err(CatalogError::NameMismatch {
                path: manifest_path,
                expected: expected.to_owned(),
                found: manifest.name,
            });
        }
    }
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
    strict::check_path("library", &library_path)?;
    Ok(Package {
        dir: dir.to_owned(),
        manifest_path,
        manifest,
        manifest_bytes: bytes,
        manifest_sha256,
        signature,
        fingerprint,
        library_path,
    })
}

/// The manifest's bytes and the signature's (if any), read as a pair that
/// was on disk together: manifest, signature, manifest again — retried
/// while the manifest changes under us. Both files' permissions are checked
/// on the open file (no window between the check and the read).
fn read_consistent(
    plugin: &str,
    manifest_path: &Path,
) -> Result<(Vec<u8>, Option<Vec<u8>>), CatalogError> {
    let sig_path = manifest_path.with_file_name(SIGNATURE_FILE);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let manifest = read_manifest_bytes(plugin, manifest_path)?;
        let signature = read_bounded(&sig_path, "signature", MAX_SIGNATURE_BYTES)?;
        let again = read_manifest_bytes(plugin, manifest_path)?;
        if manifest == again || attempt >= CONSISTENT_READ_ATTEMPTS {
            return Ok((again, signature));
        }
    }
}

fn read_manifest_bytes(plugin: &str, path: &Path) -> Result<Vec<u8>, CatalogError> {
    match read_bounded(path, "manifest", manifest::MAX_MANIFEST_BYTES + 1)? {
        None => Err(CatalogError::NoPackage {
            plugin: plugin.to_owned(),
            path: path.to_owned(),
        }),
        Some(bytes) if bytes.len() as u64 > manifest::MAX_MANIFEST_BYTES => {
            Err(CatalogError::ManifestTooLarge {
                path: path.to_owned(),
                size: std::fs::metadata(path).map_or(bytes.len() as u64, |m| m.len()),
                max: manifest::MAX_MANIFEST_BYTES,
            })
        }
        Some(bytes) => Ok(bytes),
    }
}

/// At most `limit` bytes of `path`, `None` if it does not exist.
fn read_bounded(
    path: &Path,
    what: &'static str,
    limit: u64,
) -> Result<Option<Vec<u8>>, CatalogError> {
    let read = |source| CatalogError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    let meta = file.metadata().map_err(read)?;
    strict::check_metadata(what, path, &meta)?;
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    file.take(limit).read_to_end(&mut bytes).map_err(read)?;
    Ok(Some(bytes))
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
    fn a_signature_is_read_with_the_manifest_and_changes_the_fingerprint() {
        let t = tempfile::tempdir().unwrap();
        let dir = write_pkg(t.path(), "echo", "lib.so");
        std::fs::write(dir.join("lib.so"), b"x").unwrap();
        let unsigned = read_package(t.path(), "echo").unwrap();
        assert_eq!(unsigned.signature, None);
        assert_eq!(unsigned.fingerprint, unsigned.manifest_sha256);
        std::fs::write(dir.join(SIGNATURE_FILE), b"sig").unwrap();
        let signed = read_package(t.path(), "echo").unwrap();
        assert_eq!(signed.signature.as_deref(), Some(&b"sig"[..]));
        assert_eq!(signed.manifest_sha256, unsigned.manifest_sha256);
        assert_ne!(
            signed.fingerprint, unsigned.fingerprint,
            "re-signing is a change"
        );
    }

    #[test]
    fn writable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        };
        let t = tempfile::tempdir().unwrap();
        let dir = write_pkg(t.path(), "echo", "lib.so");
        let lib = dir.join("lib.so");
        std::fs::write(&lib, b"x").unwrap();
        for (path, bad, good, what) in [
            (t.path().to_owned(), 0o777, 0o755, "plugins_dir"),
            (dir.clone(), 0o775, 0o755, "package directory"),
            (dir.join(MANIFEST_FILE), 0o666, 0o644, "manifest"),
            (lib.clone(), 0o646, 0o644, "library"),
        ] {
            mode(&path, bad);
            let err = read_package(t.path(), "echo").unwrap_err();
            assert!(
                matches!(&err, CatalogError::Unsafe(u) if u.what == what),
                "{what}: {err}"
            );
            assert!(err.to_string().contains("chmod go-w"), "{err}");
            mode(&path, good);
        }
        std::fs::write(dir.join(SIGNATURE_FILE), b"sig").unwrap();
        mode(&dir.join(SIGNATURE_FILE), 0o666);
        assert!(matches!(
            read_package(t.path(), "echo"),
            Err(CatalogError::Unsafe(u)) if u.what == "signature"
        ));
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
