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
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::num::NonZeroU64;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tough::editor::RepositoryEditor;
use tough::editor::signed::{PathExists, SignedRepository, SignedRole};
use tough::key_source::KeySource;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{KeyHolder, RoleKeys, RoleType, Root, Signed};
use tough::sign::Sign;
use tough::{ExpirationEnforcement, Repository, RepositoryLoader, TargetName};

use super::release::{CUSTOM_KEY, NodeSelector, Release, ReleaseFiles, Wave};
use crate::catalog::{self, CatalogError, MANIFEST_FILE};
use crate::store::{self, StoreError};
use crate::trust::SIGNATURE_FILE;

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

/// The TUF specification version the metadata follows (tough's).
const SPEC_VERSION: &str = "1.0.0";
/// The key file of each top-level role, in KEYDIR.
const KEY_FILES: [(RoleType, &str); 4] = [
    (RoleType::Root, "root.pem"),
    (RoleType::Targets, "targets.pem"),
    (RoleType::Snapshot, "snapshot.pem"),
    (RoleType::Timestamp, "timestamp.pem"),
];
/// The roles that sign a publish: all but root, which stays offline.
const ONLINE_ROLES: [RoleType; 3] = [RoleType::Targets, RoleType::Snapshot, RoleType::Timestamp];
/// The PEM label of a PKCS#8 private key.
const PEM_LABEL: &str = "PRIVATE KEY";

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

/// What [`sign_root`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct RootSigned {
    /// The new root, `DIR/metadata/N+1.root.json` (`root.json` is the same
    /// bytes).
    pub root: PathBuf,
    /// Its version, N+1.
    pub version: u64,
    /// The root it follows, `N.root.json`.
    pub previous: PathBuf,
    /// The key directory it lists.
    pub keys: PathBuf,
    /// Whether the keys were there already (and used) rather than made.
    pub reused_keys: bool,
    /// Each role's key id, as the new root lists it.
    pub key_ids: BTreeMap<String, String>,
    /// The key ids that signed it.
    pub signed_by: Vec<String>,
    /// When the new root expires.
    pub root_expires: jiff::Timestamp,
    /// Whether a client that trusts root N takes it (TUF 1.0 §5.3.4): it
    /// carries the signature of a threshold of root N's root keys and of
    /// its own. `false` is a root no node will follow.
    pub accepted: bool,
}

/// What [`rotate_root`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Rotated {
    /// The new root.
    pub root: RootSigned,
    /// The targets, snapshot and timestamp signed with the new keys.
    pub published: Published,
}

/// A release in `releases.json`: its record and where [`add`] put its files.
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
    fn files(&self) -> Vec<(&str, &Path, bool)> {
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
struct ReleasesFile {
    releases: Vec<StagedRelease>,
}

impl ReleasesFile {
    fn next_sequence(&self) -> u64 {
        self.releases
            .iter()
            .map(|r| r.release.sequence)
            .max()
            .unwrap_or(0)
            + 1
    }
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
    let actual =
        store::sha256_file(&pkg.library_path).map_err(|source| RepoError::Hash { source })?;
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

/// Rotates every key of the repository (TUF 1.0 §5.3.4): makes four new
/// keys in `new_keys` (or uses the four there), writes root N+1 listing
/// them — signed by the root key in `old_keys`, which must be the one the
/// latest root N lists, and by the new root key, as a client that trusts N
/// requires — then publishes targets, snapshot and timestamp signed with
/// the new keys. Later publishes take `new_keys`. Nodes keep their
/// `1.root.json`: tough walks from it to the latest root.
pub fn rotate_root(
    dir: &Path,
    old_keys: &Path,
    new_keys: &Path,
    root_expires: Duration,
) -> Result<Rotated, RepoError> {
    let metadata = dir.join(METADATA_DIR);
    let (root_path, root) = latest_root(dir, &metadata)?;
    let (_, root_file) = KEY_FILES[0];
    let old_root_key = old_keys.join(root_file);
    check_keys(
        &root_path,
        &root,
        &[(RoleType::Root, read_key("root", &old_root_key)?)],
    )?;
    let signed = sign_root(
        dir,
        new_keys,
        &[old_root_key, new_keys.join(root_file)],
        root_expires,
    )?;
    if !signed.accepted {
        return Err(RepoError::Verify {
            path: signed.root,
            message: format!(
                "a client trusting {} would not take it",
                root_path.display()
            ),
        });
    }
    let published = publish(dir, new_keys, &Expiry::default())?;
    Ok(Rotated {
        root: signed,
        published,
    })
}

/// Writes root N+1 (N: the latest root in `DIR/metadata`) listing the four
/// keys of `new_keys` (made there unless all four are), valid for
/// `root_expires`, signed by exactly the key files `signers` — whether or
/// not that makes a root clients take: [`RootSigned::accepted`] says. As
/// `N+1.root.json`, then `root.json`. [`rotate_root`] signs with the old
/// and the new root key; signing with the new one only is what an attacker
/// without the old root key can do, and nodes refuse it.
pub fn sign_root(
    dir: &Path,
    new_keys: &Path,
    signers: &[PathBuf],
    root_expires: Duration,
) -> Result<RootSigned, RepoError> {
    let metadata = dir.join(METADATA_DIR);
    let (previous_path, previous) = latest_root(dir, &metadata)?;
    if signers.is_empty() {
        return Err(RepoError::NoRootSigners {
            root: previous_path,
        });
    }
    let reused_keys = ensure_keys(new_keys)?;
    let keys = read_role_keys(new_keys)?;
    let signers = signers
        .iter()
        .map(|p| read_key("root", p))
        .collect::<Result<Vec<_>, _>>()?;
    let version = previous.signed.version.saturating_add(1);
    let expires = expires_at(jiff::Timestamp::now(), root_expires, "root")?;
    let (root, key_ids) = build_root(&keys, version, expires)?;
    let signed = run_async(dir, || sign_root_with(root, &signers))?;
    let new = signed.signed();
    let accepted = previous.signed.verify_role(new).is_ok() && new.signed.verify_role(new).is_ok();
    let path = metadata.join(format!("{version}.root.json"));
    write_file(&path, signed.buffer(), 0o644)?;
    write_file(&metadata.join(ROOT_FILE), signed.buffer(), 0o644)?;
    sync_dir(&metadata)?;
    Ok(RootSigned {
        root: path,
        version: version.get(),
        previous: previous_path,
        keys: new_keys.to_owned(),
        reused_keys,
        key_ids,
        signed_by: new
            .signatures
            .iter()
            .map(|s| hex::encode(&s.keyid))
            .collect(),
        root_expires: expires,
        accepted,
    })
}

// ---- keys ----

fn role_name(role: RoleType) -> &'static str {
    match role {
        RoleType::Root => "root",
        RoleType::Targets => "targets",
        RoleType::Snapshot => "snapshot",
        RoleType::Timestamp => "timestamp",
        RoleType::DelegatedTargets => "delegated-targets",
    }
}

/// Makes the four keys in `keys` unless all are there; `Ok(true)` when
/// they were there.
fn ensure_keys(keys: &Path) -> Result<bool, RepoError> {
    let missing: Vec<&str> = KEY_FILES
        .iter()
        .map(|(_, f)| *f)
        .filter(|f| !keys.join(f).exists())
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    if missing.len() != KEY_FILES.len() {
        return Err(RepoError::PartialKeys {
            keys: keys.to_owned(),
            missing: missing.join(", "),
        });
    }
    // Secret keys: a directory of their own, private to the operator.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(keys)
        .map_err(io("creating", keys))?;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    for (role, file) in KEY_FILES {
        let path = keys.join(file);
        // PKCS#8 v1: what `openssl genpkey -algorithm ED25519` writes and
        // reads, so the keys can be moved to other tools.
        let der = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8v1(&rng).map_err(|_| {
            RepoError::KeyGenerate {
                role: role_name(role),
                path: path.clone(),
            }
        })?;
        write_file(&path, pem_encode(PEM_LABEL, der.as_ref()).as_bytes(), 0o600)?;
    }
    Ok(false)
}

/// A key file read and checked: PKCS#8 in PEM (as `init` writes) or DER.
#[derive(Clone)]
struct KeyFile {
    role: &'static str,
    path: PathBuf,
    der: Vec<u8>,
    public: tough::schema::key::Key,
}

// Not derived: the DER is the secret key.
impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFile")
            .field("role", &self.role)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn read_key(role: &'static str, path: &Path) -> Result<KeyFile, RepoError> {
    let bad = |message: String| RepoError::Key {
        role,
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    // tough's `parse_keypair` reads Ed25519 keys as DER only (PEM only for
    // RSA), so the PEM armour comes off here.
    let der = if bytes.starts_with(b"-----BEGIN") {
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8 PEM".into()))?;
        pem_decode(PEM_LABEL, text).map_err(bad)?
    } else {
        bytes
    };
    let public = tough::sign::parse_keypair(&der)
        .map_err(|e| bad(format!("not a PKCS#8 Ed25519 or ECDSA key: {e}")))?
        .tuf_key();
    Ok(KeyFile {
        role,
        path: path.to_owned(),
        der,
        public,
    })
}

/// A [`KeyFile`] as tough signs with it.
#[derive(Debug)]
struct KeyFileSource(KeyFile);

#[tough::async_trait]
impl KeySource for KeyFileSource {
    async fn as_sign(
        &self,
    ) -> Result<Box<dyn Sign>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(Box::new(tough::sign::parse_keypair(&self.0.der)?))
    }

    async fn write(
        &self,
        _value: &str,
        _key_id_hex: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Err(format!("{} is not rewritten by plugvisor", self.0.path.display()).into())
    }
}

fn sources<'a>(keys: impl IntoIterator<Item = &'a KeyFile>) -> Vec<Box<dyn KeySource>> {
    keys.into_iter()
        .map(|k| Box::new(KeyFileSource(k.clone())) as Box<dyn KeySource>)
        .collect()
}

// ---- metadata ----

/// Builds and signs the first root, writes it as `1.root.json` and
/// `root.json`; returns each role's key id.
async fn write_root(
    metadata: &Path,
    keys: &[KeyFile],
    expires: jiff::Timestamp,
) -> Result<BTreeMap<String, String>, RepoError> {
    let (root, ids) = build_root(keys, NonZeroU64::MIN, expires)?;
    let root_key = keys
        .iter()
        .zip(KEY_FILES)
        .find(|(_, (role, _))| *role == RoleType::Root)
        .map(|(k, _)| k)
        .expect("the root key is read");
    let signed = sign_root_with(root, std::slice::from_ref(root_key)).await?;
    write_file(&metadata.join(FIRST_ROOT), signed.buffer(), 0o644)?;
    write_file(&metadata.join(ROOT_FILE), signed.buffer(), 0o644)?;
    Ok(ids)
}

/// The root of version `version` listing `keys` (in [`KEY_FILES`] order),
/// one per role with threshold 1, consistent snapshots on; and each role's
/// key id.
fn build_root(
    keys: &[KeyFile],
    version: NonZeroU64,
    expires: jiff::Timestamp,
) -> Result<(Root, BTreeMap<String, String>), RepoError> {
    let mut root = Root {
        spec_version: SPEC_VERSION.to_owned(),
        consistent_snapshot: true,
        version,
        expires,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    let mut ids = BTreeMap::new();
    for (key, (role, _)) in keys.iter().zip(KEY_FILES) {
        let id = key_id(key)?;
        ids.insert(role_name(role).to_owned(), hex::encode(&id));
        root.keys.insert(id.clone(), key.public.clone());
        root.roles.insert(
            role,
            RoleKeys {
                keyids: vec![id],
                threshold: NonZeroU64::MIN,
                _extra: HashMap::new(),
            },
        );
    }
    Ok((root, ids))
}

fn key_id(key: &KeyFile) -> Result<Decoded<Hex>, RepoError> {
    key.public.key_id().map_err(|e| RepoError::Key {
        role: key.role,
        path: key.path.clone(),
        message: format!("computing its key id: {e}"),
    })
}

/// Signs `root` with exactly `signers` (each once), whether or not the
/// root lists them: tough's editor signs a role only with keys listed for
/// it, so the keys are listed for root in a copy that only says who signs.
async fn sign_root_with(root: Root, signers: &[KeyFile]) -> Result<SignedRole<Root>, RepoError> {
    let first = signers.first().expect("a root has a signer");
    let mut holder = root.clone();
    let mut ids = Vec::new();
    for k in signers {
        let id = key_id(k)?;
        holder.keys.insert(id.clone(), k.public.clone());
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    holder.roles.insert(
        RoleType::Root,
        RoleKeys {
            keyids: ids.clone(),
            threshold: NonZeroU64::MIN,
            _extra: HashMap::new(),
        },
    );
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let signed = SignedRole::new(root, &KeyHolder::Root(holder), &sources(signers), &rng)
        .await
        .map_err(tuf("signing the root with", &first.path))?;
    // tough checks no threshold for a root (a rotated one is signed by two
    // roots' keys): every signer must have signed.
    if signed.signed().signatures.len() != ids.len() {
        return Err(RepoError::Verify {
            path: first.path.clone(),
            message: format!(
                "the root carries {} signatures, {} keys were to sign it",
                signed.signed().signatures.len(),
                ids.len()
            ),
        });
    }
    Ok(signed)
}

/// The four keys of `keys`, in [`KEY_FILES`] order.
fn read_role_keys(keys: &Path) -> Result<Vec<KeyFile>, RepoError> {
    KEY_FILES
        .iter()
        .map(|(role, file)| read_key(role_name(*role), &keys.join(file)))
        .collect()
}

/// The newest `N.root.json` in `metadata`.
fn latest_root(dir: &Path, metadata: &Path) -> Result<(PathBuf, Signed<Root>), RepoError> {
    let entries = std::fs::read_dir(metadata).map_err(io("listing", metadata))?;
    let newest = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name.strip_suffix(".root.json")?.parse().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
        .ok_or_else(|| RepoError::NotInitialised {
            dir: dir.to_owned(),
            missing: metadata.join(FIRST_ROOT),
        })?;
    let root = read_root(&newest)?;
    Ok((newest, root))
}

fn read_root(path: &Path) -> Result<Signed<Root>, RepoError> {
    let bytes = std::fs::read(path).map_err(io("reading", path))?;
    serde_json::from_slice(&bytes).map_err(|e| RepoError::Verify {
        path: path.to_owned(),
        message: format!("not a signed root: {e}"),
    })
}

/// Refuses to publish under a root no node reaches: each `N.root.json`
/// from 2 to `latest` must carry the signature of the root key of the one
/// before and of its own, and say its version, as a client checks when it
/// walks them (TUF 1.0 §5.3.4, 5.3.5).
fn check_root_chain(metadata: &Path, latest: u64) -> Result<(), RepoError> {
    let mut previous_path = metadata.join(FIRST_ROOT);
    let mut previous = read_root(&previous_path)?;
    for version in 2..=latest {
        let path = metadata.join(format!("{version}.root.json"));
        let root = read_root(&path)?;
        let chained = root.signed.version.get() == version
            && previous.signed.verify_role(&root).is_ok()
            && root.signed.verify_role(&root).is_ok();
        if !chained {
            return Err(RepoError::BrokenRootChain {
                root: path,
                previous: previous_path,
            });
        }
        (previous_path, previous) = (path, root);
    }
    Ok(())
}

/// Loads the repository as a node would, from `1.root.json` on. Expired
/// metadata is accepted: refreshing it is what a publish is for.
async fn load(dir: &Path) -> Result<Repository, RepoError> {
    load_as_of(dir, None).await
}

/// [`load`], as a node did while `N.root.json` was the latest root
/// (`roots_up_to`: N; later roots are not fetched).
async fn load_as_of(dir: &Path, roots_up_to: Option<u64>) -> Result<Repository, RepoError> {
    let metadata = dir.join(METADATA_DIR);
    let first_root = metadata.join(FIRST_ROOT);
    let root = std::fs::read(&first_root).map_err(io("reading", &first_root))?;
    let (metadata_url, targets_url) = file_urls(dir)?;
    let mut loader = RepositoryLoader::new(&root, metadata_url, targets_url)
        .expiration_enforcement(ExpirationEnforcement::Unsafe);
    if let Some(n) = roots_up_to {
        loader = loader.transport(RootsUpTo(n));
    }
    loader
        .load()
        .await
        .map_err(tuf("loading the repository in", &metadata))
}

/// What was published last, verified: as a node loads it now — or, right
/// after a new root (the publish of [`rotate_root`], or one after it was
/// interrupted), as a node loaded it under the newest earlier root whose
/// keys signed it.
async fn load_previous(dir: &Path, latest_root: u64) -> Result<Repository, RepoError> {
    let now = load(dir).await;
    if now.is_ok() {
        return now;
    }
    for n in (1..latest_root).rev() {
        if let Ok(repo) = load_as_of(dir, Some(n)).await {
            return Ok(repo);
        }
    }
    now
}

/// The local filesystem without the roots after version N: the repository
/// as it was while N was the latest.
#[derive(Debug, Clone, Copy)]
struct RootsUpTo(u64);

#[tough::async_trait]
impl tough::Transport for RootsUpTo {
    async fn fetch(
        &self,
        url: reqwest::Url,
    ) -> Result<tough::TransportStream, tough::TransportError> {
        let later = url
            .path_segments()
            .and_then(Iterator::last)
            .and_then(|name| name.strip_suffix(".root.json"))
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|v| v > self.0);
        if later {
            return Err(tough::TransportError::new(
                tough::TransportErrorKind::FileNotFound,
                url,
            ));
        }
        tough::FilesystemTransport.fetch(url).await
    }
}

/// A target to place: its name, the stored file, its sha256.
type TargetFile = (TargetName, PathBuf, String);

/// The publish itself (see [`publish`]); `expires` is targets, snapshot,
/// timestamp.
async fn publish_async(
    dir: &Path,
    keys: &[(RoleType, KeyFile)],
    expires: [jiff::Timestamp; 3],
    releases: &[StagedRelease],
) -> Result<Published, RepoError> {
    let metadata = dir.join(METADATA_DIR);
    let (root_path, root) = latest_root(dir, &metadata)?;
    check_root_chain(&metadata, root.signed.version.get())?;
    check_keys(&root_path, &root, keys)?;
    // The first publish (from `init`) has nothing to load.
    let previous = if metadata.join("timestamp.json").exists() {
        Some(load_previous(dir, root.signed.version.get()).await?)
    } else {
        None
    };
    let next = |v: Option<NonZeroU64>| v.map_or(NonZeroU64::MIN, |v| v.saturating_add(1));
    let versions = [
        next(previous.as_ref().map(|r| r.targets().signed.version)),
        next(previous.as_ref().map(|r| r.snapshot().signed.version)),
        next(previous.as_ref().map(|r| r.timestamp().signed.version)),
    ];

    let mut editor = RepositoryEditor::new(&root_path)
        .await
        .map_err(tuf("reading the root", &root_path))?;
    let files = add_targets(&mut editor, dir, releases, previous.as_ref()).await?;
    editor
        .targets_version(versions[0])
        .map_err(tuf("setting the targets version in", &metadata))?;
    editor
        .targets_expires(expires[0])
        .map_err(tuf("setting the targets expiry in", &metadata))?;
    editor
        .snapshot_version(versions[1])
        .snapshot_expires(expires[1])
        .timestamp_version(versions[2])
        .timestamp_expires(expires[2]);
    let signed = editor
        .sign(&sources(keys.iter().map(|(_, k)| k)))
        .await
        .map_err(tuf("signing the metadata for", &metadata))?;
    write_out(dir, &signed, &files, versions).await?;

    // What a node will see.
    let repo = load(dir).await?;
    let loaded = [
        repo.targets().signed.version,
        repo.snapshot().signed.version,
        repo.timestamp().signed.version,
    ];
    if loaded != versions {
        return Err(RepoError::Verify {
            path: metadata,
            message: format!("loaded versions {loaded:?}, wrote {versions:?}"),
        });
    }
    Ok(Published {
        metadata,
        targets: dir.join(TARGETS_DIR),
        targets_version: versions[0].get(),
        snapshot_version: versions[1].get(),
        timestamp_version: versions[2].get(),
        targets_expires: expires[0],
        snapshot_expires: expires[1],
        timestamp_expires: expires[2],
        root_expires: root.signed.expires,
        releases: releases.iter().map(|r| r.release.clone()).collect(),
    })
}

/// Refuses keys the root does not list for their role, naming the file
/// (tough would only say that no key was found).
fn check_keys(
    root_path: &Path,
    root: &Signed<Root>,
    keys: &[(RoleType, KeyFile)],
) -> Result<(), RepoError> {
    for (role, key) in keys {
        let listed = root.signed.roles.get(role).is_some_and(|rk| {
            rk.keyids
                .iter()
                .any(|id| root.signed.keys.get(id) == Some(&key.public))
        });
        if !listed {
            return Err(RepoError::KeyNotInRoot {
                role: key.role,
                path: key.path.clone(),
                root: root_path.to_owned(),
            });
        }
    }
    Ok(())
}

/// Adds every file of `releases` as a target (the manifest's with the
/// release as custom metadata), refusing a stored file whose bytes are no
/// longer those `previous` published under its name.
async fn add_targets(
    editor: &mut RepositoryEditor,
    dir: &Path,
    releases: &[StagedRelease],
    previous: Option<&Repository>,
) -> Result<Vec<TargetFile>, RepoError> {
    let mut files = Vec::new();
    for staged in releases {
        for (name, stored, is_manifest) in staged.files() {
            let path = dir.join(stored);
            let (_, mut target) = RepositoryEditor::build_target(&path)
                .await
                .map_err(tuf("hashing the target", &path))?;
            let target_name = TargetName::new(name).map_err(tuf("naming the target", &path))?;
            let sha256 = hex::encode(&target.hashes.sha256);
            if let Some(old) = previous
                .and_then(|r| r.targets().signed.targets.get(&target_name))
                .filter(|old| old.hashes.sha256 != target.hashes.sha256)
            {
                return Err(RepoError::StoreChanged {
                    stored: path,
                    target: name.to_owned(),
                    actual: sha256,
                    published: hex::encode(&old.hashes.sha256),
                    targets: dir.join(TARGETS_DIR),
                });
            }
            if is_manifest {
                let value = serde_json::to_value(&staged.release)
                    .expect("a release always serialises to JSON");
                target.custom.insert(CUSTOM_KEY.to_owned(), value);
            }
            editor
                .add_target(target_name.clone(), target)
                .map_err(tuf("adding the target", &path))?;
            files.push((target_name, path, sha256));
        }
    }
    Ok(files)
}

/// Writes a signed publish in the order that keeps the served repository
/// whole at every instant: target files first (before any metadata names
/// them); then the metadata, written beside and renamed into place —
/// targets and snapshot (new names, no client reads them yet), then the
/// timestamp, which commits the new version.
async fn write_out(
    dir: &Path,
    signed: &SignedRepository,
    files: &[TargetFile],
    versions: [NonZeroU64; 3],
) -> Result<(), RepoError> {
    let metadata = dir.join(METADATA_DIR);
    let targets_dir = dir.join(TARGETS_DIR);
    std::fs::create_dir_all(&targets_dir).map_err(io("creating", &targets_dir))?;
    for (name, path, sha256) in files {
        signed
            .copy_target(path, &targets_dir, PathExists::Skip, Some(name))
            .await
            .map_err(tuf("copying the target", path))?;
        link_spec_layout(&targets_dir, name.raw(), sha256)?;
    }
    let staging = metadata.join(format!(".publish-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io("removing", &staging))?;
    }
    let written = signed
        .write(&staging)
        .await
        .map_err(tuf("writing the metadata into", &staging));
    let renamed = written.and_then(|()| {
        for name in [
            format!("{}.targets.json", versions[0]),
            format!("{}.snapshot.json", versions[1]),
            "timestamp.json".to_owned(),
        ] {
            let from = staging.join(&name);
            std::fs::rename(&from, metadata.join(&name))
                .map_err(io("renaming into place", &from))?;
        }
        sync_dir(&metadata)
    });
    let _ = std::fs::remove_dir_all(&staging);
    renamed
}

/// Also places the target where the TUF specification's clients look with
/// consistent snapshots, `<dir>/<sha256>.<base name>` (tough, and so
/// plugvisor, prefixes the whole name): a hard link to tough's copy.
fn link_spec_layout(targets_dir: &Path, name: &str, sha256: &str) -> Result<(), RepoError> {
    let (sub, base) = name.rsplit_once('/').unwrap_or(("", name));
    let path = targets_dir.join(sub).join(format!("{sha256}.{base}"));
    if path.exists() {
        return Ok(());
    }
    let parent = path.parent().unwrap_or(targets_dir);
    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    let tough_copy = targets_dir.join(format!("{sha256}.{name}"));
    std::fs::hard_link(&tough_copy, &path)
        .or_else(|_| std::fs::copy(&tough_copy, &path).map(|_| ()))
        .map_err(io("placing a copy of the target at", &path))
}

fn expires_at(
    now: jiff::Timestamp,
    after: Duration,
    role: &'static str,
) -> Result<jiff::Timestamp, RepoError> {
    let err = |message: String| RepoError::Expiry {
        role,
        duration: humantime::format_duration(after).to_string(),
        message,
    };
    // Whole seconds: what a reader of the metadata expects to see.
    now.checked_add(after)
        .and_then(|t| t.round(jiff::Unit::Second))
        .map_err(|e| err(e.to_string()))
}

// ---- releases.json and the store ----

fn load_releases(dir: &Path) -> Result<ReleasesFile, RepoError> {
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

fn save_releases(dir: &Path, file: &ReleasesFile) -> Result<(), RepoError> {
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
fn first_difference(
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
fn store_package(
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
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), RepoError> {
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

fn sync_dir(dir: &Path) -> Result<(), RepoError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
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

// ---- PEM ----

/// RFC 7468 text (the `pem` crate tough itself uses).
fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The DER inside `text`, which must be one `label` block.
fn pem_decode(label: &str, text: &str) -> Result<Vec<u8>, String> {
    let p = pem::parse(text).map_err(|e| e.to_string())?;
    if p.tag() != label {
        return Err(format!("a {:?} block, not {label:?}", p.tag()));
    }
    Ok(p.into_contents())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::release::{Node, desired};
    use sha2::Digest as _;

    /// A package directory `PLUGIN` under `root` whose fake library the
    /// manifest pins (or, with `tamper`, does not).
    fn package(root: &Path, plugin: &str, version: &str, tamper: bool) -> PathBuf {
        let dir = root.join(format!("{plugin}-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        let library = format!("lib{plugin}-{version}.so");
        let bytes = format!("not really {plugin} {version}").into_bytes();
        let sha = hex::encode(sha2::Sha256::digest(&bytes));
        std::fs::write(dir.join(&library), &bytes).unwrap();
        if tamper {
            std::fs::write(dir.join(&library), b"something else").unwrap();
        }
        std::fs::write(
            dir.join(MANIFEST_FILE),
            format!(
                "name = \"{plugin}\"\nversion = \"{version}\"\nlibrary = \"{library}\"\nsha256 = \"{sha}\"\nabi = 1\n"
            ),
        )
        .unwrap();
        dir
    }

    /// The repository as a new node loads it, with its datastore (which
    /// must outlive it).
    struct Loaded {
        repo: Repository,
        _datastore: tempfile::TempDir,
    }

    impl std::ops::Deref for Loaded {
        type Target = Repository;
        fn deref(&self) -> &Repository {
            &self.repo
        }
    }

    fn loaded(dir: &Path) -> Loaded {
        try_loaded(dir).unwrap()
    }

    /// [`loaded`], with tough's error.
    fn try_loaded(dir: &Path) -> Result<Loaded, Box<tough::error::Error>> {
        let datastore = tempfile::tempdir().unwrap();
        let root = std::fs::read(dir.join(METADATA_DIR).join(FIRST_ROOT)).unwrap();
        let (m, t) = file_urls(dir).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let repo = runtime
            .block_on(
                RepositoryLoader::new(&root, m, t)
                    .datastore(datastore.path())
                    .load(),
            )
            .map_err(Box::new)?;
        Ok(Loaded {
            repo,
            _datastore: datastore,
        })
    }

    fn releases_of(repo: &Repository) -> Vec<Release> {
        repo.targets()
            .signed
            .targets
            .values()
            .filter_map(|t| t.custom.get(CUSTOM_KEY))
            .map(|v| serde_json::from_value(v.clone()).unwrap())
            .collect()
    }

    fn read_target(repo: &Repository, name: &str) -> Vec<u8> {
        use tough::IntoVec as _;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            repo.read_target(&TargetName::new(name).unwrap())
                .await
                .unwrap()
                .unwrap()
                .into_vec()
                .await
                .unwrap()
        })
    }

    #[test]
    fn pem_round_trips() {
        assert!(pem_encode("X", b"Man").contains("\nTWFu\n"));
        assert!(pem_encode("X", b"Ma").contains("\nTWE=\n"));
        for len in [0, 1, 2, 3, 47, 48, 49, 100] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let text = pem_encode(PEM_LABEL, &bytes);
            assert!(text.lines().all(|l| l.len() <= 64));
            assert_eq!(pem_decode(PEM_LABEL, &text).unwrap(), bytes, "{len}");
        }
        assert!(
            pem_decode(
                PEM_LABEL,
                "-----BEGIN PRIVATE KEY-----\n*\n-----END PRIVATE KEY-----"
            )
            .is_err()
        );
    }

    /// A new repository in `t/repo` with echo 1.0.0 (signed) published:
    /// (repository, keys, package, release).
    fn one_release_published(t: &Path) -> (PathBuf, PathBuf, PathBuf, Release) {
        let dir = t.join("repo");
        let keys = default_keys(&dir);
        init(&dir, &keys, Duration::from_secs(365 * 24 * 3600)).unwrap();
        let one = package(t, "echo", "1.0.0", false);
        std::fs::write(one.join(SIGNATURE_FILE), b"a signature").unwrap();
        let r1 = add(&dir, &one, NodeSelector::default(), Vec::new()).unwrap();
        publish(&dir, &keys, &Expiry::default()).unwrap();
        (dir, keys, one, r1)
    }

    #[test]
    fn init_add_publish_as_a_node_sees_it() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("repo");
        let keys = default_keys(&dir);
        let report = init(&dir, &keys, Duration::from_secs(365 * 24 * 3600)).unwrap();
        assert!(!report.reused_keys);
        assert_eq!(report.root, dir.join("metadata/1.root.json"));
        assert_eq!(report.published.targets_version, 1);
        assert_eq!(report.key_ids.len(), 4);
        for (_, f) in KEY_FILES {
            let mode = std::fs::metadata(keys.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
            let text = std::fs::read_to_string(keys.join(f)).unwrap();
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
        }
        assert!(matches!(
            init(&dir, &keys, Duration::from_secs(3600)),
            Err(RepoError::AlreadyInitialised { .. })
        ));
        let repo = loaded(&dir);
        assert!(repo.root().signed.consistent_snapshot);
        assert!(repo.targets().signed.targets.is_empty());

        // Version 1.0.0, signed: three targets.
        let one = package(t.path(), "echo", "1.0.0", false);
        std::fs::write(one.join(SIGNATURE_FILE), b"a signature").unwrap();
        let r1 = add(&dir, &one, NodeSelector::default(), Vec::new()).unwrap();
        assert_eq!(r1.sequence, 1);
        assert_eq!(r1.files.manifest, "echo/1.0.0/plugin.toml");
        assert_eq!(r1.files.library, "echo/1.0.0/libecho-1.0.0.so");
        assert_eq!(
            r1.files.signature.as_deref(),
            Some("echo/1.0.0/plugin.toml.sig")
        );
        let p = publish(&dir, &keys, &Expiry::default()).unwrap();
        assert_eq!(
            (p.targets_version, p.snapshot_version, p.timestamp_version),
            (2, 2, 2)
        );
        assert!(dir.join("metadata/2.targets.json").is_file());
        assert!(dir.join("metadata/2.snapshot.json").is_file());
        let repo = loaded(&dir);
        assert_eq!(repo.targets().signed.version.get(), 2);
        let targets = &repo.targets().signed.targets;
        assert_eq!(targets.len(), 3);
        let lib_bytes = std::fs::read(one.join("libecho-1.0.0.so")).unwrap();
        let lib = &targets[&TargetName::new("echo/1.0.0/libecho-1.0.0.so").unwrap()];
        assert_eq!(lib.length, lib_bytes.len() as u64);
        assert_eq!(
            lib.hashes.sha256.as_ref(),
            sha2::Sha256::digest(&lib_bytes).as_slice()
        );
        assert!(
            lib.custom.is_empty(),
            "custom metadata on the manifest only"
        );
        assert_eq!(read_target(&repo, "echo/1.0.0/libecho-1.0.0.so"), lib_bytes);
        assert_eq!(
            read_target(&repo, "echo/1.0.0/plugin.toml.sig"),
            b"a signature"
        );
        assert_eq!(releases_of(&repo), vec![r1.clone()]);
        // The specification's layout too.
        let sha = hex::encode(sha2::Sha256::digest(&lib_bytes));
        assert!(
            dir.join(format!("targets/echo/1.0.0/{sha}.libecho-1.0.0.so"))
                .is_file()
        );

        // Published bytes are fixed; the same bytes again are fine.
        add(&dir, &one, NodeSelector::default(), Vec::new()).unwrap();
        std::fs::write(one.join(SIGNATURE_FILE), b"another signature").unwrap();
        let err = add(&dir, &one, NodeSelector::default(), Vec::new()).unwrap_err();
        assert!(matches!(err, RepoError::Republished { .. }), "{err}");
        assert!(err.to_string().contains("bump the version"), "{err}");
    }

    #[test]
    fn each_publish_and_a_rollback_make_new_versions_and_the_rollback_is_desired() {
        let t = tempfile::tempdir().unwrap();
        let (dir, keys, _, r1) = one_release_published(t.path());
        assert_eq!(loaded(&dir).targets().signed.version.get(), 2);

        // 1.1.0 in waves, then a rollback to 1.0.0.
        let two = package(t.path(), "echo", "1.1.0", false);
        let wave = Wave {
            seeds_below: 10,
            start: "2020-01-01T00:00:00Z".parse().unwrap(),
        };
        let r2 = add(&dir, &two, NodeSelector::default(), vec![wave]).unwrap();
        assert!(r2.sequence > 1);
        let p = publish(&dir, &keys, &Expiry::default()).unwrap();
        assert_eq!(p.targets_version, 3);
        let node = Node {
            name: "edge-1".into(),
            labels: BTreeMap::new(),
            seed: 3,
        };
        let now = jiff::Timestamp::now();
        let repo = loaded(&dir);
        let all = releases_of(&repo);
        assert_eq!(all.len(), 2);
        assert_eq!(
            desired(&all, "echo", &node, now).unwrap().version,
            r2.version
        );

        let version = r1.version.clone();
        let p = rollback(&dir, &keys, "echo", &version, &Expiry::default()).unwrap();
        assert_eq!(p.targets_version, 4);
        let repo = loaded(&dir);
        assert_eq!(repo.targets().signed.version.get(), 4);
        let all = releases_of(&repo);
        let chosen = desired(&all, "echo", &node, now).unwrap();
        assert_eq!(chosen.version, version);
        assert!(chosen.sequence > r2.sequence && chosen.waves.is_empty());
        let late = Node { seed: 2000, ..node };
        assert_eq!(desired(&all, "echo", &late, now).unwrap().version, version);

        // Nothing new: still new versions (fresh expiry).
        let p = publish(&dir, &keys, &Expiry::default()).unwrap();
        assert_eq!((p.targets_version, p.timestamp_version), (5, 5));
        assert_eq!(loaded(&dir).timestamp().signed.version.get(), 5);

        let err = rollback(
            &dir,
            &keys,
            "echo",
            &semver::Version::new(9, 0, 0),
            &Expiry::default(),
        )
        .unwrap_err();
        assert!(matches!(err, RepoError::UnknownRelease { .. }), "{err}");
    }

    #[test]
    fn a_library_that_is_not_what_its_manifest_pins_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("repo");
        init(&dir, &default_keys(&dir), Duration::from_secs(3600)).unwrap();
        let bad = package(t.path(), "echo", "1.0.0", true);
        let err = add(&dir, &bad, NodeSelector::default(), Vec::new()).unwrap_err();
        assert!(matches!(err, RepoError::LibraryMismatch { .. }), "{err}");
        let s = err.to_string();
        assert!(
            s.contains("libecho-1.0.0.so") && s.contains("plugvisor pack"),
            "{s}"
        );
        assert!(releases(&dir).unwrap().is_empty());
        assert!(!dir.join("store/echo").exists());
    }

    #[tokio::test]
    async fn works_from_inside_a_runtime_and_reuses_keys() {
        let t = tempfile::tempdir().unwrap();
        let keys = t.path().join("keys");
        let first = init(&t.path().join("a"), &keys, Duration::from_secs(3600)).unwrap();
        let second = init(&t.path().join("b"), &keys, Duration::from_secs(3600)).unwrap();
        assert!(second.reused_keys);
        assert_eq!(first.key_ids, second.key_ids);
        std::fs::remove_file(keys.join("snapshot.pem")).unwrap();
        let err = init(&t.path().join("c"), &keys, Duration::from_secs(3600)).unwrap_err();
        assert!(matches!(err, RepoError::PartialKeys { .. }), "{err}");
        // Another repository's keys do not sign this one.
        let other = t.path().join("other-keys");
        init(&t.path().join("d"), &other, Duration::from_secs(3600)).unwrap();
        let err = publish(&t.path().join("a"), &other, &Expiry::default()).unwrap_err();
        assert!(matches!(err, RepoError::KeyNotInRoot { .. }), "{err}");
    }
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    #[test]
    fn a_rotated_root_is_followed_from_the_first_and_signs_with_the_new_keys() {
        let t = tempfile::tempdir().unwrap();
        let (dir, keys, _, r1) = one_release_published(t.path());
        let new_keys = t.path().join("new-keys");

        // The old root key must be the one the root lists.
        let other = t.path().join("other-keys");
        ensure_keys(&other).unwrap();
        let err = rotate_root(&dir, &other, &new_keys, YEAR).unwrap_err();
        assert!(matches!(err, RepoError::KeyNotInRoot { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&other.join("root.pem").display().to_string()),
            "{err}"
        );
        assert!(!dir.join("metadata/2.root.json").exists());

        let rotated = rotate_root(&dir, &keys, &new_keys, YEAR).unwrap();
        let root = &rotated.root;
        assert!(!root.reused_keys && root.accepted);
        assert_eq!(root.version, 2);
        assert_eq!(root.root, dir.join("metadata/2.root.json"));
        assert_eq!(root.previous, dir.join("metadata/1.root.json"));
        assert_eq!(
            std::fs::read(dir.join("metadata/root.json")).unwrap(),
            std::fs::read(&root.root).unwrap()
        );
        let old_ids = read_role_keys(&keys)
            .unwrap()
            .iter()
            .map(|k| hex::encode(key_id(k).unwrap()))
            .collect::<Vec<_>>();
        let new_ids = read_role_keys(&new_keys)
            .unwrap()
            .iter()
            .map(|k| hex::encode(key_id(k).unwrap()))
            .collect::<Vec<_>>();
        assert!(
            old_ids.iter().all(|id| !new_ids.contains(id)),
            "all new keys"
        );
        assert_eq!(root.key_ids["targets"], new_ids[1]);
        let mut signed_by = root.signed_by.clone();
        signed_by.sort();
        let mut both = vec![old_ids[0].clone(), new_ids[0].clone()];
        both.sort();
        assert_eq!(signed_by, both, "the old and the new root key");
        assert_eq!(rotated.published.targets_version, 3);

        // A node that trusts 1.root.json only walks to 2, and takes
        // metadata the new keys signed.
        let repo = loaded(&dir);
        assert_eq!(repo.root().signed.version.get(), 2);
        assert_eq!(repo.targets().signed.version.get(), 3);
        let signers = |sigs: &[tough::schema::Signature]| {
            sigs.iter()
                .map(|s| hex::encode(&s.keyid))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            signers(&repo.targets().signatures),
            vec![new_ids[1].clone()]
        );
        assert_eq!(
            signers(&repo.snapshot().signatures),
            vec![new_ids[2].clone()]
        );
        assert_eq!(
            signers(&repo.timestamp().signatures),
            vec![new_ids[3].clone()]
        );
        assert_eq!(releases_of(&repo), vec![r1]);

        // The old keys publish no more, and say which root refuses them.
        let err = publish(&dir, &keys, &Expiry::default()).unwrap_err();
        assert!(matches!(err, RepoError::KeyNotInRoot { .. }), "{err}");
        assert!(err.to_string().contains("2.root.json"), "{err}");
        let two = package(t.path(), "echo", "1.1.0", false);
        let r2 = add(&dir, &two, NodeSelector::default(), Vec::new()).unwrap();
        let p = publish(&dir, &new_keys, &Expiry::default()).unwrap();
        assert_eq!(p.targets_version, 4);
        assert_eq!(releases_of(&loaded(&dir)).len(), 2);

        // And again, 2 -> 3, the keys of 2 signing out: still followed
        // from 1.root.json.
        let third = t.path().join("third-keys");
        let rotated = rotate_root(&dir, &new_keys, &third, YEAR).unwrap();
        assert_eq!(rotated.root.version, 3);
        let repo = loaded(&dir);
        assert_eq!(repo.root().signed.version.get(), 3);
        assert!(releases_of(&repo).contains(&r2));

        // The same keys again: the root re-signed, with a new expiry.
        let resigned = rotate_root(&dir, &third, &third, YEAR).unwrap();
        assert!(resigned.root.reused_keys && resigned.root.accepted);
        assert_eq!(resigned.root.signed_by.len(), 1);
        assert_eq!(loaded(&dir).root().signed.version.get(), 4);
    }

    #[test]
    fn a_root_not_signed_by_the_current_root_key_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (dir, _, _, _) = one_release_published(t.path());
        let attacker = t.path().join("attacker-keys");
        let err = sign_root(&dir, &attacker, &[], YEAR).unwrap_err();
        assert!(matches!(err, RepoError::NoRootSigners { .. }), "{err}");
        let forged = sign_root(&dir, &attacker, &[attacker.join("root.pem")], YEAR).unwrap();
        assert_eq!(forged.version, 2);
        assert!(!forged.accepted);
        assert_eq!(forged.signed_by.len(), 1);
        // The operator's own tooling refuses to publish under it…
        let err = publish(&dir, &attacker, &Expiry::default()).unwrap_err();
        assert!(matches!(err, RepoError::BrokenRootChain { .. }), "{err}");
        assert!(err.to_string().contains("2.root.json"), "{err}");
        // …and a node refuses it, naming the root.
        let err = try_loaded(&dir).err().expect("a forged root 2 is refused");
        let message = err.to_string();
        assert!(
            matches!(
                *err,
                tough::error::Error::VerifyMetadata {
                    role: RoleType::Root,
                    ..
                }
            ),
            "{message}"
        );
        assert!(message.contains("root"), "{message}");
    }
}
