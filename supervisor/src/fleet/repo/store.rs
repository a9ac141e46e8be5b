//! The operator-side release store: `releases.json` (every release added,
//! staged or published) and the package files `add` copies into
//! `DIR/store/PLUGIN/VERSION/` — neither served — plus the atomic file
//! writes every part of the repository uses.
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{RELEASES_FILE, RepoError, io};
use crate::catalog;
use crate::fleet::release::Release;
use crate::store;
use crate::trust::SIGNATURE_FILE;

/// A release in `releases.json`: its record and where [`add`] put its files.
///
/// [`add`]: super::add
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagedRelease {
    /// The record published as the manifest target's `custom.plugvisor`.
    pub release: Release,
    /// Its files in the store.
    pub stored: StoredFiles,
    /// Whether a publish has listed it: its bytes are then fixed.
    #[serde(default)]
    pub published: bool,
}

/// Where a release's files are, relative to the repository directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredFiles {
    /// `plugin.toml`.
    pub manifest: PathBuf,
    /// The library.
    pub library: PathBuf,
    /// `plugin.toml.sig`, when the package is signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<PathBuf>,
}

impl StagedRelease {
    /// Each file as (target name, stored path relative to the repository,
    /// whether it is the manifest).
    pub(super) fn files(&self) -> Vec<(&str, &Path, bool)> {
        let f = &self.release.files;
        let mut files = vec![
            (f.manifest.as_str(), self.stored.manifest.as_path(), true),
            (f.library.as_str(), self.stored.library.as_path(), false),
        ];
        if let (Some(name), Some(path)) = (&f.signature, &self.stored.signature) {
            files.push((name.as_str(), path.as_path(), false));
        }
        files
    }
}

/// `releases.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReleasesFile {
    pub(super) releases: Vec<StagedRelease>,
}

impl ReleasesFile {
    pub(super) fn next_sequence(&self) -> u64 {
        self.releases
            .iter()
            .map(|r| r.release.sequence)
            .max()
            .unwrap_or(0)
            + 1
    }
}

pub(super) fn load_releases(dir: &Path) -> Result<ReleasesFile, RepoError> {
    let path = dir.join(RELEASES_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RepoError::NotInitialised {
                dir: dir.to_owned(),
                missing: path,
            });
        }
        Err(e) => return Err(io("reading", &path)(e)),
    };
    serde_json::from_slice(&bytes).map_err(|source| RepoError::Releases {
        action: "parsing",
        path,
        source,
    })
}

pub(super) fn save_releases(dir: &Path, file: &ReleasesFile) -> Result<(), RepoError> {
    let path = dir.join(RELEASES_FILE);
    let mut bytes = serde_json::to_vec_pretty(file).map_err(|source| RepoError::Releases {
        action: "serialising",
        path: path.clone(),
        source,
    })?;
    bytes.push(b'\n');
    write_file(&path, &bytes, 0o644)
}

/// The first file of `pkg` whose bytes differ from `old`'s stored copy, as
/// (the package's file, the stored file); `None` when all are the same.
pub(super) fn first_difference(
    dir: &Path,
    old: &StagedRelease,
    new: &StoredFiles,
    pkg: &catalog::Package,
    library_sha256: &str,
) -> Result<Option<(PathBuf, PathBuf)>, RepoError> {
    let stored_manifest = dir.join(&old.stored.manifest);
    if std::fs::read(&stored_manifest).ok().as_deref() != Some(pkg.manifest_bytes.as_slice()) {
        return Ok(Some((pkg.manifest_path.clone(), stored_manifest)));
    }
    let stored_library = dir.join(&old.stored.library);
    let same_library = old.stored.library == new.library
        && stored_library.is_file()
        && store::sha256_file(&stored_library).map_err(|source| RepoError::Hash { source })?
            == library_sha256;
    if !same_library {
        return Ok(Some((pkg.library_path.clone(), stored_library)));
    }
    let stored_sig = old.stored.signature.as_ref().map(|s| dir.join(s));
    let old_sig = stored_sig.as_ref().and_then(|p| std::fs::read(p).ok());
    if old_sig != pkg.signature {
        let sig = pkg.dir.join(SIGNATURE_FILE);
        return Ok(Some((
            sig,
            stored_sig.unwrap_or_else(|| dir.join(&new.manifest).with_file_name(SIGNATURE_FILE)),
        )));
    }
    Ok(None)
}

/// Copies the package's files into `DIR/<store_rel>` (replacing what was
/// there), the library checked against `sha256` after the copy: the
/// package may change while it is read.
pub(super) fn store_package(
    dir: &Path,
    store_rel: &Path,
    stored: &StoredFiles,
    pkg: &catalog::Package,
    sha256: &str,
) -> Result<(), RepoError> {
    let store_dir = dir.join(store_rel);
    if store_dir.exists() {
        std::fs::remove_dir_all(&store_dir).map_err(io("removing", &store_dir))?;
    }
    std::fs::create_dir_all(&store_dir).map_err(io("creating", &store_dir))?;
    let library = dir.join(&stored.library);
    let tmp = library.with_file_name(format!(".library.tmp-{}", std::process::id()));
    std::fs::copy(&pkg.library_path, &tmp).map_err(io("copying the library to", &tmp))?;
    let copied = store::sha256_file(&tmp).map_err(|source| RepoError::Hash { source })?;
    if copied != sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(RepoError::LibraryMismatch {
            package: pkg.dir.clone(),
            library: pkg.library_path.clone(),
            expected: sha256.to_owned(),
            actual: copied,
        });
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
        .map_err(io("chmod", &tmp))?;
    std::fs::rename(&tmp, &library).map_err(io("renaming into place", &library))?;
    if let (Some(sig), Some(path)) = (&pkg.signature, &stored.signature) {
        write_file(&dir.join(path), sig, 0o644)?;
    }
    write_file(&dir.join(&stored.manifest), &pkg.manifest_bytes, 0o644)?;
    sync_dir(&store_dir)
}

/// Writes `bytes` to `path` the atomic way: a temp file beside it with
/// `mode`, fsynced, renamed over `path`.
pub(super) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), RepoError> {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        // The umask may have widened or narrowed it.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io("chmod", &tmp))?;
        f.write_all(bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), RepoError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}
