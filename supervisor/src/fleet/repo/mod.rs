//! `plugvisor repo`: the operator's side of the fleet's TUF repository —
//! made and signed offline with `tough::editor`, served by any static HTTP
//! server.
//!
//! # The repository directory
//!
//! ```text
//! DIR/metadata/      served at metadata_url: 1.root.json, 2.root.json … (and
//!                    root.json, the latest's bytes), N.targets.json,
//!                    N.snapshot.json, timestamp.json
//! DIR/targets/       served at targets_url: the target files
//! DIR/store/P/V/     the package files `add` copied (not served)
//! DIR/releases.json  every release added, staged or published (not served)
//! DIR/keys/          the default KEYDIR (never served)
//! ```
//!
//! The root has one Ed25519 key per role and threshold 1, and turns
//! consistent snapshots on, as `SignedRepository::write` expects: a client
//! fetches `N.snapshot.json` and `N.targets.json` by the versions the
//! newer file names, so a publish never changes a file a client may be
//! reading — except `timestamp.json`, which is renamed into place last.
//! `timestamp.json` is the repository's commit point, as `plugin.toml` is
//! a package's: everything it leads to is on disk before it changes. Target
//! files are written as tough names them (`<sha256>.<target name>`, which
//! is what plugvisor nodes fetch) and also as the TUF specification's
//! clients (python-tuf, go-tuf) look for them
//! (`<dir>/<sha256>.<base name>`), so any conforming client can read it.
//!
//! # Releases
//!
//! [`add`] checks a package (its library must hash to its manifest's
//! `sha256`), copies it into the store and records a staged [`Release`]
//! with the next sequence. [`publish`] writes a new version of targets,
//! snapshot and timestamp that lists every release of `releases.json`, its
//! manifest target carrying the [`Release`] under `custom.plugvisor` — the
//! only place plugvisor adds anything to TUF. The bytes of a published
//! release never change (a node may have them already); a fix is a new
//! version. [`rollback`] gives an older release the highest sequence and no
//! waves and publishes: a signed, explicit downgrade for every node it is
//! for. Publishing with nothing staged still writes new versions with new
//! expiry dates: what a periodic job does so nodes never see metadata
//! expire.
//!
//! Only the targets, snapshot and timestamp keys the latest root lists sign
//! a publish; the root key is needed by [`init`] and [`rotate_root`] only
//! and belongs offline otherwise.
//!
//! # Root rotation
//!
//! [`rotate_root`] replaces every key (TUF 1.0 §5.3.4): root N+1 lists new
//! keys and carries the signature of root N's root key and its own, so a
//! node that was given `1.root.json` walks `2.root.json`, `3.root.json` …
//! to it; then targets, snapshot and timestamp are published with the new
//! keys. [`sign_root`] is the step beneath, signing with exactly the keys
//! given — with the new root key alone, it is the forged root an attacker
//! without the old root key can make, which nodes (and [`publish`]) refuse.
//!
//! # Where things are
//!
//! This file holds the public entry points, the errors and the reports;
//! beneath them, each piece in a file of its own name:
//!
//! * `keys.rs` — the key files in KEYDIR and the check that a key is the
//!   one the root lists;
//! * `root.rs` — root metadata: the first root, [`rotate_root`],
//!   [`sign_root`] and the chain of roots a node walks;
//! * `publish.rs` — loading the previous repository, signing targets,
//!   snapshot and timestamp, and writing them out in order;
//! * `store.rs` — `releases.json`, the package store, atomic file writes.
//!
//! [`publish`]: fn@publish
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::release::{NodeSelector, Release, ReleaseFiles, Wave};
use crate::catalog::{self, CatalogError, MANIFEST_FILE};
use crate::store::StoreError;
use crate::trust::SIGNATURE_FILE;

mod keys;
mod publish;
mod root;
mod store;

use keys::{KEY_FILES, ONLINE_ROLES, ensure_keys, read_key, read_role_keys, role_name};
use publish::{expires_at, publish_async};
use root::write_root;
pub use root::{RootSigned, Rotated, rotate_root, sign_root};
use store::{ReleasesFile, first_difference, load_releases, save_releases, store_package};
pub use store::{StagedRelease, StoredFiles};

/// The served metadata directory inside a repository directory.
pub const METADATA_DIR: &str = "metadata";
/// The served targets directory inside a repository directory.
pub const TARGETS_DIR: &str = "targets";
/// Where `add` keeps package files, by plugin and version (not served).
pub const STORE_DIR: &str = "store";
/// The publisher's list of releases (not served).
pub const RELEASES_FILE: &str = "releases.json";
/// The key directory inside a repository directory when none is given.
pub const DEFAULT_KEYS_DIR: &str = "keys";
/// The root a node is given out of band: the first one, from which a
/// client walks every later `N.root.json`.
pub const FIRST_ROOT: &str = "1.root.json";
/// The latest root under its unversioned name (the same bytes as the
/// newest `N.root.json`).
pub const ROOT_FILE: &str = "root.json";

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The directory holds no repository yet.
    #[error(
        "{dir} is not a plugvisor TUF repository ({missing} is missing); run `plugvisor repo init {dir}` first"
    )]
    NotInitialised {
        /// The repository directory.
        dir: PathBuf,
        /// The file looked for.
        missing: PathBuf,
    },
    /// `init` on a directory that already holds a repository.
    #[error(
        "{root} exists: {dir} is a repository already; publish to it, or remove its metadata to start over"
    )]
    AlreadyInitialised {
        /// The repository directory.
        dir: PathBuf,
        /// Its first root.
        root: PathBuf,
    },
    /// KEYDIR holds some of the four keys: new ones beside them would
    /// make a root no one meant.
    #[error(
        "{keys} holds some of the repository keys but not {missing}; restore them, or give an empty key directory"
    )]
    PartialKeys {
        /// The key directory.
        keys: PathBuf,
        /// The key files it lacks.
        missing: String,
    },
    /// A key could not be generated.
    #[error("making the {role} key {path}: the key generator failed")]
    KeyGenerate {
        /// The role.
        role: &'static str,
        /// The key file.
        path: PathBuf,
    },
    /// A key file could not be read or is no usable key.
    #[error("reading the {role} key {path}: {message}")]
    Key {
        /// The role.
        role: &'static str,
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A key file is not the key the root lists for its role.
    #[error(
        "the {role} key {path} is not the one {root} lists for {role}; use the key directory of that root (after `plugvisor repo rotate-root`, its --new-keys)"
    )]
    KeyNotInRoot {
        /// The role.
        role: &'static str,
        /// The key file.
        path: PathBuf,
        /// The root read.
        root: PathBuf,
    },
    /// A root that a client trusting the one before would refuse.
    #[error(
        "{root} is not signed by the root key {previous} lists and by its own: nodes refuse it and everything published under it; remove it and copy {previous} over root.json"
    )]
    BrokenRootChain {
        /// The root refused.
        root: PathBuf,
        /// The root before it.
        previous: PathBuf,
    },
    /// `sign_root` without a key to sign with.
    #[error("no key given to sign the root after {root} with")]
    NoRootSigners {
        /// The latest root.
        root: PathBuf,
    },
    /// The package could not be read or is not valid.
    #[error("reading the package in {package}: {source}")]
    Package {
        /// The package directory.
        package: PathBuf,
        /// Why the catalog refused it.
        source: CatalogError,
    },
    /// Hashing a file failed (the error names it).
    #[error("hashing a file for the repository: {source}")]
    Hash {
        /// The store's error, with the file.
        source: StoreError,
    },
    /// The package's library does not hash to its manifest's `sha256`.
    #[error(
        "package {package}: sha256 of {library} is {actual}, its manifest says {expected}; re-pack it with `plugvisor pack`"
    )]
    LibraryMismatch {
        /// The package directory.
        package: PathBuf,
        /// The library.
        library: PathBuf,
        /// From the manifest.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The release `add` would record fails [`Release::check`].
    #[error("package {package}: {message}")]
    InvalidRelease {
        /// The package directory (or `releases.json`, for a rollback).
        package: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A published plugin version was added again with other bytes.
    #[error(
        "{plugin} {version} is already published and {file} differs from the published {stored}; bump the version and add it as a new release"
    )]
    Republished {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// The new package's file.
        file: PathBuf,
        /// The published copy in the store.
        stored: PathBuf,
    },
    /// A stored file of a published release no longer hashes to its
    /// published target.
    #[error(
        "{stored} no longer matches the published target {target} (sha256 {actual}, published {published}); restore it from {targets}"
    )]
    StoreChanged {
        /// The stored file.
        stored: PathBuf,
        /// The target name.
        target: String,
        /// Its sha256 now.
        actual: String,
        /// The sha256 published.
        published: String,
        /// The targets directory holding the published copy.
        targets: PathBuf,
    },
    /// `releases.json` could not be parsed or written.
    #[error("{action} the release list {path}: {source}")]
    Releases {
        /// What was being done.
        action: &'static str,
        /// `releases.json`.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// `rollback` to a release never added.
    #[error("{plugin} {version} is not in {path}; add it first with `plugvisor repo add`")]
    UnknownRelease {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// `releases.json`.
        path: PathBuf,
    },
    /// An expiry date out of range.
    #[error("the {role} expiry ({duration}) is out of range: {message}")]
    Expiry {
        /// The role.
        role: &'static str,
        /// The duration given.
        duration: String,
        /// Why.
        message: String,
    },
    /// tough refused or failed an operation.
    #[error("{action} {path}: {source}")]
    Tuf {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// tough's error (boxed: it is large).
        source: Box<tough::error::Error>,
    },
    /// What was written does not load back as written.
    #[error("checking the repository written in {path}: {message}")]
    Verify {
        /// The metadata directory.
        path: PathBuf,
        /// What differs.
        message: String,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RepoError + 'a {
    move |source| RepoError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn tuf<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(tough::error::Error) -> RepoError + 'a {
    move |source| RepoError::Tuf {
        action,
        path: path.to_owned(),
        source: Box::new(source),
    }
}

/// How long each role's metadata stays valid from a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// `targets.json`.
    pub targets: Duration,
    /// `snapshot.json`.
    pub snapshot: Duration,
    /// `timestamp.json`: the shortest, as it bounds how long an attacker
    /// can replay a stale repository to a node.
    pub timestamp: Duration,
}

impl Default for Expiry {
    fn default() -> Self {
        const DAY: u64 = 24 * 60 * 60;
        Expiry {
            targets: Duration::from_secs(30 * DAY),
            snapshot: Duration::from_secs(7 * DAY),
            timestamp: Duration::from_secs(DAY),
        }
    }
}

/// What [`init`] made.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    /// The root to give every node out of band (`DIR/metadata/1.root.json`).
    pub root: PathBuf,
    /// The key directory.
    pub keys: PathBuf,
    /// Whether the keys were there already (and used) rather than made.
    pub reused_keys: bool,
    /// Each role's key id, as the root lists it.
    pub key_ids: BTreeMap<String, String>,
    /// When the root expires: before then it must be re-signed.
    pub root_expires: jiff::Timestamp,
    /// The first targets, snapshot and timestamp.
    pub published: Published,
}

/// What [`publish`] (or [`rollback`]) wrote.
///
/// [`publish`]: fn@publish
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// The metadata directory (served at `metadata_url`).
    pub metadata: PathBuf,
    /// The targets directory (served at `targets_url`).
    pub targets: PathBuf,
    /// The new `targets.json` version.
    pub targets_version: u64,
    /// The new `snapshot.json` version.
    pub snapshot_version: u64,
    /// The new `timestamp.json` version.
    pub timestamp_version: u64,
    /// When the new targets expire.
    pub targets_expires: jiff::Timestamp,
    /// When the new snapshot expires.
    pub snapshot_expires: jiff::Timestamp,
    /// When the new timestamp expires: publish again before then.
    pub timestamp_expires: jiff::Timestamp,
    /// When the root expires (publishing does not renew it).
    pub root_expires: jiff::Timestamp,
    /// The releases listed, as their manifest targets carry them.
    pub releases: Vec<Release>,
}

/// The key directory used when none is given: `DIR/keys`.
pub fn default_keys(dir: &Path) -> PathBuf {
    dir.join(DEFAULT_KEYS_DIR)
}

/// The releases `releases.json` lists, staged or published.
pub fn releases(dir: &Path) -> Result<Vec<StagedRelease>, RepoError> {
    Ok(load_releases(dir)?.releases)
}

/// `file://` URLs of the metadata and targets directories, for loading the
/// repository with `tough::RepositoryLoader` without a server.
pub fn file_urls(dir: &Path) -> Result<(reqwest::Url, reqwest::Url), RepoError> {
    let url = |sub: &str| {
        let path = dir.join(sub);
        let abs = path.canonicalize().map_err(io("resolving", &path))?;
        reqwest::Url::from_directory_path(&abs).map_err(|()| RepoError::Io {
            action: "making a file URL of",
            path: abs.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an absolute path"),
        })
    };
    Ok((url(METADATA_DIR)?, url(TARGETS_DIR)?))
}

/// Creates the repository in `dir`: the four keys in `keys` (or those
/// already there), a root signed by the root key (version 1, consistent
/// snapshots, one key per role, threshold 1) valid for `root_expires`, and
/// the first targets, snapshot and timestamp, listing what `releases.json`
/// lists (nothing, for a new directory).
pub fn init(dir: &Path, keys: &Path, root_expires: Duration) -> Result<InitReport, RepoError> {
    let metadata = dir.join(METADATA_DIR);
    let first_root = metadata.join(FIRST_ROOT);
    if first_root.exists() {
        return Err(RepoError::AlreadyInitialised {
            dir: dir.to_owned(),
            root: first_root,
        });
    }
    for sub in [METADATA_DIR, TARGETS_DIR, STORE_DIR] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(io("creating", &d))?;
    }
    let reused_keys = ensure_keys(keys)?;
    let root_keys = read_role_keys(keys)?;
    let root_expires = expires_at(jiff::Timestamp::now(), root_expires, "root")?;
    let key_ids = run_async(dir, || write_root(&metadata, &root_keys, root_expires))?;
    let releases_path = dir.join(RELEASES_FILE);
    if !releases_path.exists() {
        save_releases(dir, &ReleasesFile::default())?;
    }
    let published = publish(dir, keys, &Expiry::default())?;
    Ok(InitReport {
        root: first_root,
        keys: keys.to_owned(),
        reused_keys,
        key_ids,
        root_expires,
        published,
    })
}

/// Stages the package in `package` as a release for `nodes` in `waves`:
/// checks that its library hashes to its manifest's `sha256`, copies its
/// files into `DIR/store/PLUGIN/VERSION/` and records it in
/// `releases.json` with the next sequence. Adding a plugin version already
/// there replaces its record; with other bytes only while it is not yet
/// published.
pub fn add(
    dir: &Path,
    package: &Path,
    nodes: NodeSelector,
    waves: Vec<Wave>,
) -> Result<Release, RepoError> {
    let mut file = load_releases(dir)?;
    let pkg = catalog::read_package_at(package, None).map_err(|source| RepoError::Package {
        package: package.to_owned(),
        source,
    })?;
    let m = &pkg.manifest;
    let actual = crate::store::sha256_file(&pkg.library_path)
        .map_err(|source| RepoError::Hash { source })?;
    if actual != m.sha256 {
        return Err(RepoError::LibraryMismatch {
            package: package.to_owned(),
            library: pkg.library_path.clone(),
            expected: m.sha256.clone(),
            actual,
        });
    }
    let prefix = format!("{}/{}", m.name, m.version);
    let release = Release {
        plugin: m.name.clone(),
        version: m.version.clone(),
        files: ReleaseFiles {
            manifest: format!("{prefix}/{MANIFEST_FILE}"),
            library: format!("{prefix}/{}", m.library),
            signature: pkg
                .signature
                .as_ref()
                .map(|_| format!("{prefix}/{SIGNATURE_FILE}")),
        },
        nodes,
        waves,
        sequence: file.next_sequence(),
    };
    release
        .check()
        .map_err(|message| RepoError::InvalidRelease {
            package: package.to_owned(),
            message,
        })?;
    let store_rel = Path::new(STORE_DIR)
        .join(&m.name)
        .join(m.version.to_string());
    let stored = StoredFiles {
        manifest: store_rel.join(MANIFEST_FILE),
        library: store_rel.join(&m.library),
        signature: pkg
            .signature
            .as_ref()
            .map(|_| store_rel.join(SIGNATURE_FILE)),
    };
    let existing = file
        .releases
        .iter()
        .position(|r| r.release.plugin == m.name && r.release.version == m.version);
    let unchanged = match existing {
        Some(i) => {
            let old = &file.releases[i];
            let differs = first_difference(dir, old, &stored, &pkg, &actual)?;
            match differs {
                Some((changed, published_copy)) if old.published => {
                    return Err(RepoError::Republished {
                        plugin: m.name.clone(),
                        version: m.version.to_string(),
                        file: changed,
                        stored: published_copy,
                    });
                }
                Some(_) => false,
                None => true,
            }
        }
        None => false,
    };
    if !unchanged {
        store_package(dir, &store_rel, &stored, &pkg, &m.sha256)?;
    }
    let entry = StagedRelease {
        release: release.clone(),
        stored,
        published: existing.is_some_and(|i| file.releases[i].published),
    };
    match existing {
        Some(i) => file.releases[i] = entry,
        None => file.releases.push(entry),
    }
    save_releases(dir, &file)?;
    Ok(release)
}

/// Publishes a new version of targets, snapshot and timestamp (each the
/// previous plus one) listing every release in `releases.json`, signed
/// with the targets, snapshot and timestamp keys in `keys`: target files
/// first, then `N.targets.json` and `N.snapshot.json`, then
/// `timestamp.json`, each renamed into place.
pub fn publish(dir: &Path, keys: &Path, expiry: &Expiry) -> Result<Published, RepoError> {
    let mut file = load_releases(dir)?;
    let metadata = dir.join(METADATA_DIR);
    let first_root = metadata.join(FIRST_ROOT);
    if !first_root.is_file() {
        return Err(RepoError::NotInitialised {
            dir: dir.to_owned(),
            missing: first_root,
        });
    }
    let signing = ONLINE_ROLES
        .iter()
        .map(|role| {
            let name = role_name(*role);
            let (_, f) = KEY_FILES
                .iter()
                .find(|(r, _)| r == role)
                .expect("every role has a key file");
            read_key(name, &keys.join(f)).map(|k| (*role, k))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let now = jiff::Timestamp::now();
    let expires = [
        expires_at(now, expiry.targets, "targets")?,
        expires_at(now, expiry.snapshot, "snapshot")?,
        expires_at(now, expiry.timestamp, "timestamp")?,
    ];
    let published = run_async(dir, || {
        publish_async(dir, &signing, expires, &file.releases)
    })?;
    for r in &mut file.releases {
        r.published = true;
    }
    save_releases(dir, &file)?;
    Ok(published)
}

/// Publishes `plugin` `version` (already in `releases.json`) again as the
/// newest release, without waves — every node it is for takes it at once
/// — then does what [`publish`] does.
///
/// [`publish`]: fn@publish
pub fn rollback(
    dir: &Path,
    keys: &Path,
    plugin: &str,
    version: &semver::Version,
    expiry: &Expiry,
) -> Result<Published, RepoError> {
    let mut file = load_releases(dir)?;
    let sequence = file.next_sequence();
    let path = dir.join(RELEASES_FILE);
    let entry = file
        .releases
        .iter_mut()
        .find(|r| r.release.plugin == plugin && r.release.version == *version)
        .ok_or_else(|| RepoError::UnknownRelease {
            plugin: plugin.to_owned(),
            version: version.to_string(),
            path: path.clone(),
        })?;
    entry.release.sequence = sequence;
    entry.release.waves.clear();
    entry
        .release
        .check()
        .map_err(|message| RepoError::InvalidRelease {
            package: path.clone(),
            message,
        })?;
    save_releases(dir, &file)?;
    publish(dir, keys, expiry)
}

// ---- running tough ----

/// Runs tough's async API to completion from synchronous code: on a
/// current-thread runtime of its own, on a scoped thread when the caller
/// is inside a runtime already (a runtime cannot block inside another).
fn run_async<T, F, Fut>(dir: &Path, make: F) -> Result<T, RepoError>
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T, RepoError>>,
{
    let run = move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("starting an async runtime for", dir))?
            .block_on(make())
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(run)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    } else {
        run()
    }
}

#[cfg(test)]
mod tests;
