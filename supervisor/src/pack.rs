//! `plugvisor pack` and `plugvisor verify`, offline: build a package the
//! way the daemon wants it, and check one with the daemon's own checks.
//!
//! # The order of a commit
//!
//! The manifest is the commit point: the daemon acts when `plugin.toml`
//! changes, and only then. So [`pack`] writes, each as a temp file, fsynced
//! and renamed into place:
//!
//! 1. the library, under a new file name (`lib<name>-<version>-<sha8>.so`)
//!    that no manifest names yet;
//! 2. the signature, `plugin.toml.sig`, made over the new manifest's exact
//!    bytes — *before* that manifest is in place. A daemon that looks in
//!    between sees the old manifest with the new signature; if the old
//!    manifest is the version serving it does nothing, and otherwise it
//!    waits (`reload::SIGNATURE_GRACE`) for the manifest the signature
//!    names;
//! 3. the manifest, renamed over `plugin.toml`: the commit.
//!
//! Without a key, a stale `plugin.toml.sig` is removed before step 3 (it
//! would not match the new manifest). Files are created with mode 0644 and
//! a new package directory with 0755 whatever the umask, since the daemon
//! refuses group- or world-writable ones (`catalog::strict`).
use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use semver::{Version, VersionReq};

use crate::catalog::{self, CatalogError, MANIFEST_FILE, Manifest};
use crate::loader::{self, LoadError};
use crate::reload::ReloadError;
use crate::store::{self, Store, StoreError};
use crate::trust::{SIGNATURE_FILE, SecretKey, TrustPolicy, Verdict};

/// Why a package could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Reading or writing failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No library was given and none could be chosen.
    #[error("{dir}: {message}; name one with --library")]
    NoLibrary {
        /// The package directory.
        dir: PathBuf,
        /// What was found.
        message: String,
    },
    /// The library's descriptor could not be read (and name, version or
    /// ABI were not all given).
    #[error(transparent)]
    Inspect(#[from] LoadError),
    /// The manifest that would be written is not valid.
    #[error(transparent)]
    Manifest(#[from] CatalogError),
    /// Hashing the library failed.
    #[error(transparent)]
    Hash(#[from] StoreError),
}

/// What to pack; everything not given is taken from the library's
/// descriptor or the existing manifest.
#[derive(Debug, Default)]
pub struct PackOptions {
    /// The library: a file anywhere (copied in) or already in the package
    /// directory. Default: the one the existing manifest names, else the
    /// only `*.so` in the directory.
    pub library: Option<PathBuf>,
    /// Plugin name (default: the descriptor's).
    pub name: Option<String>,
    /// Version (default: the descriptor's).
    pub version: Option<Version>,
    /// Plugin ABI (default: the descriptor's).
    pub abi: Option<u32>,
    /// `[requires]`, replacing the existing manifest's when given.
    pub requires: Option<BTreeMap<String, VersionReq>>,
    /// `conflicts`, replacing the existing manifest's when given.
    pub conflicts: Option<Vec<String>>,
    /// Sign the manifest with this key.
    pub key: Option<SecretKey>,
}

/// What [`pack`] wrote.
#[derive(Debug, Clone)]
pub struct Packed {
    /// The manifest written.
    pub manifest: Manifest,
    /// Path of `plugin.toml`.
    pub manifest_path: PathBuf,
    /// Id of the signing key, if signed.
    pub key_id: Option<String>,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PackError + 'a {
    move |source| PackError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `target` the atomic way: a temp file beside it with
/// mode 0644, fsynced, renamed over `target`.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> Result<(), PackError> {
    let name = target
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = target.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        // The umask may have left group write on; the daemon refuses that.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io("chmod", &tmp))?;
        f.write_all(bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, target).map_err(io("renaming into place", target))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes the renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), PackError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}

/// The manifest already in `dir`, if there is one that parses.
fn existing_manifest(dir: &Path) -> Option<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    Manifest::parse(&text, &path).ok()
}

/// The library to pack when none was named.
fn choose_library(dir: &Path, existing: Option<&Manifest>) -> Result<PathBuf, PackError> {
    if let Some(m) = existing {
        let p = dir.join(&m.library);
        if p.is_file() {
            return Ok(p);
        }
    }
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "so") && p.is_file() {
                found.push(p);
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(PackError::NoLibrary {
            dir: dir.to_owned(),
            message: "no *.so in the package directory".into(),
        }),
        n => Err(PackError::NoLibrary {
            dir: dir.to_owned(),
            message: format!("{n} *.so files in the package directory"),
        }),
    }
}

/// Writes or updates the package in `dir` (see the module docs for the
/// order of the writes).
pub fn pack(dir: &Path, options: PackOptions) -> Result<Packed, PackError> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod", dir))?;
    }
    let existing = existing_manifest(dir);
    let source = match &options.library {
        Some(l) => l.clone(),
        None => choose_library(dir, existing.as_ref())?,
    };
    let identity = if options.name.is_some() && options.version.is_some() && options.abi.is_some() {
        None
    } else {
        Some(loader::inspect(&source)?)
    };
    let name = options
        .name
        .or_else(|| identity.as_ref().map(|i| i.name.clone()))
        .expect("a name was given or read");
    let version = match (options.version, &identity) {
        (Some(v), _) => v,
        (None, Some(i)) => Version::parse(&i.version).map_err(|e| {
            PackError::Manifest(CatalogError::ManifestInvalid {
                path: source.clone(),
                message: format!(
                    "the descriptor's version {:?} is not semver: {e}",
                    i.version
                ),
            })
        })?,
        (None, None) => unreachable!("identity is read when the version is not given"),
    };
    let abi = options
        .abi
        .or_else(|| identity.as_ref().map(|i| i.abi))
        .expect("an ABI was given or read");
    let sha256 = store::sha256_file(&source)?;

    // 1. The library, under a name no manifest uses yet (unless it already
    //    is a file of this package).
    let canonical_dir = dir.canonicalize().map_err(io("resolving", dir))?;
    let in_package = source
        .canonicalize()
        .ok()
        .and_then(|c| c.parent().map(|p| p == canonical_dir))
        .unwrap_or(false);
    let library = if in_package {
        source
            .file_name()
            .expect("a file has a name")
            .to_string_lossy()
            .into_owned()
    } else {
        let lib_name = format!(
            "lib{}-{version}-{}.so",
            name.replace('-', "_"),
            &sha256[..8]
        );
        let target = dir.join(&lib_name);
        if store::sha256_file(&target).ok().as_deref() != Some(sha256.as_str()) {
            let bytes = std::fs::read(&source).map_err(io("reading", &source))?;
            write_atomic(&target, &bytes)?;
        }
        lib_name
    };

    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest = Manifest {
        name,
        version,
        library,
        sha256,
        abi,
        conflicts: options
            .conflicts
            .or_else(|| existing.as_ref().map(|m| m.conflicts.clone()))
            .unwrap_or_default(),
        requires: options
            .requires
            .or_else(|| existing.as_ref().map(|m| m.requires.clone()))
            .unwrap_or_default(),
    }
    .validated(&manifest_path)?;
    let text = manifest.to_toml();

    // 2. The signature (or the removal of a stale one) before the commit.
    let sig_path = dir.join(SIGNATURE_FILE);
    let key_id = if let Some(key) = &options.key {
        write_atomic(&sig_path, key.sign(text.as_bytes()).as_bytes())?;
        Some(key.public().id)
    } else {
        match std::fs::remove_file(&sig_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing the stale", &sig_path)(e)),
        }
        None
    };

    // 3. The commit.
    write_atomic(&manifest_path, text.as_bytes())?;
    sync_dir(dir)?;
    Ok(Packed {
        manifest,
        manifest_path,
        key_id,
    })
}

/// What [`verify`] found: the package would be accepted.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The manifest.
    pub manifest: Manifest,
    /// The signature's standing.
    pub verdict: Verdict,
    /// The library's identity as its descriptor states it.
    pub identity: loader::Identity,
    /// Things worth knowing that do not refuse the package.
    pub notes: Vec<String>,
}

/// Checks the package in `dir` as the daemon would, without a daemon:
/// permissions, manifest, signature under `policy`, ABI, the library's
/// sha256, ELF headers, descriptor (ABI, name, version) and — with the
/// daemon's `store` — that it is no downgrade. Dependencies need the
/// daemon's active versions and are only listed.
///
/// The library is `dlopen`ed (to read its descriptor) only after its
/// signature and hash have been checked.
pub fn verify(
    dir: &Path,
    policy: &TrustPolicy,
    store: Option<&Store>,
) -> Result<Verified, ReloadError> {
    let package = catalog::read_package_at(dir, None)?;
    let m = &package.manifest;
    let mut notes = Vec::new();
    if dir.file_name().and_then(|n| n.to_str()) != Some(m.name.as_str()) {
        notes.push(format!(
            "the daemon expects this package in a directory named {:?} inside plugins_dir",
            m.name
        ));
    }
    let verdict = policy.check(
        &m.name,
        &package.manifest_path,
        &package.manifest_bytes,
        package.signature.as_deref(),
    )?;
    // The daemon's own checks, the same functions its reload path calls,
    // in the order a refusal is cheapest.
    loader::check_manifest_abi(&m.name, m.abi, &package.manifest_path)?;
    let actual = store::sha256_file(&package.library_path)?;
    store::check_checksum(&m.name, &package.library_path, &m.sha256, &actual)?;
    let identity = loader::inspect(&package.library_path).map_err(|e| match e {
        // inspect names no plugin; say which.
        LoadError::NoDescriptor { path, .. } => LoadError::NoDescriptor {
            plugin: m.name.clone(),
            path,
        },
        LoadError::Open { path, message, .. } => LoadError::Open {
            plugin: m.name.clone(),
            path,
            message,
        },
        LoadError::AbiMismatch {
            path,
            expected,
            found,
            ..
        } => LoadError::AbiMismatch {
            plugin: m.name.clone(),
            path,
            expected,
            found,
        },
        other => other,
    })?;
    let identity = loader::check_identity(&m.name, &m.version, &package.library_path, identity)?;
    if let Some(store) = store {
        let refs = store.refs(&m.name)?;
        if let Some(highest) = refs.downgrade_below(&m.version) {
            return Err(ReloadError::Downgrade {
                plugin: m.name.clone(),
                version: m.version.to_string(),
                highest: highest.to_string(),
            });
        }
    }
    if !m.requires.is_empty() || !m.conflicts.is_empty() {
        let requires: Vec<String> = m.requires.iter().map(|(n, r)| format!("{n} {r}")).collect();
        notes.push(format!(
            "dependencies are checked by the daemon against its active versions: requires [{}], conflicts [{}]",
            requires.join(", "),
            m.conflicts.join(", ")
        ));
    }
    Ok(Verified {
        manifest: package.manifest,
        verdict,
        identity,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_sets_a_safe_mode_and_leaves_no_temp() {
        // (The umask is process-wide, so it is not changed here: other
        // tests run in parallel. The explicit chmod is what guards a wide
        // umask.)
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("plugin.toml");
        write_atomic(&p, b"x").unwrap();
        write_atomic(&p, b"y").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(std::fs::read(&p).unwrap(), b"y");
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            1,
            "no temp left"
        );
    }

    #[test]
    fn no_library_is_named_clearly() {
        let t = tempfile::tempdir().unwrap();
        let err = pack(t.path(), PackOptions::default()).unwrap_err();
        assert!(err.to_string().contains("no *.so"), "{err}");
        std::fs::write(t.path().join("a.so"), b"x").unwrap();
        std::fs::write(t.path().join("b.so"), b"x").unwrap();
        let err = pack(t.path(), PackOptions::default()).unwrap_err();
        assert!(err.to_string().contains("2 *.so"), "{err}");
    }

    #[test]
    fn pack_signs_and_verify_accepts_then_refuses_tampering() {
        let t = tempfile::tempdir().unwrap();
        // A fake library: name, version and ABI given, so its descriptor is
        // not read by pack; verify stops at the hash check before dlopen.
        let lib = t.path().join("lib.so");
        std::fs::write(&lib, b"not really a library").unwrap();
        let dir = t.path().join("echo");
        let key = SecretKey::generate().unwrap();
        let public = key.public();
        let packed = pack(
            &dir,
            PackOptions {
                library: Some(lib.clone()),
                name: Some("echo".into()),
                version: Some(Version::new(1, 2, 3)),
                abi: Some(plugvisor_sdk::ABI_VERSION),
                requires: Some(
                    [("codec".to_owned(), VersionReq::parse(">=1.2, <2").unwrap())].into(),
                ),
                key: Some(key),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(packed.key_id.as_deref(), Some(public.id.as_str()));
        assert!(dir.join(SIGNATURE_FILE).is_file());
        let policy = TrustPolicy::new(vec![public], true);
        // The signature and hash hold; the fake library then fails the ELF check.
        let err = verify(&dir, &policy, None).unwrap_err();
        assert!(err.to_string().contains("not an ELF object"), "{err}");

        // A flipped byte in the library: the sha256 pin refuses it.
        let lib_in_pkg = dir.join(&packed.manifest.library);
        let mut bytes = std::fs::read(&lib_in_pkg).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&lib_in_pkg, &bytes).unwrap();
        let err = verify(&dir, &policy, None).unwrap_err();
        assert!(err.to_string().contains("sha256"), "{err}");

        // An edited manifest: the signature refuses it.
        let text = std::fs::read_to_string(&packed.manifest_path).unwrap();
        std::fs::write(&packed.manifest_path, text.replace("<2", "<3")).unwrap();
        let err = verify(&dir, &policy, None).unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");

        // Re-packed without a key: the stale signature goes, and an unsigned
        // package is refused where signatures are required.
        pack(
            &dir,
            PackOptions {
                library: Some(lib),
                name: Some("echo".into()),
                version: Some(Version::new(1, 2, 4)),
                abi: Some(plugvisor_sdk::ABI_VERSION),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!dir.join(SIGNATURE_FILE).exists());
        let m = existing_manifest(&dir).unwrap();
        assert!(m.requires.contains_key("codec"), "requires kept on update");
        let err = verify(&dir, &policy, None).unwrap_err();
        assert!(err.to_string().contains("is not signed"), "{err}");
    }
}
