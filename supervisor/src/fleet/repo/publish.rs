//! Signing and writing a publish: the previous repository loaded as a
//! node loads it, every staged release added as targets, targets,
//! snapshot and timestamp signed with the online keys, and all of it
//! written in the order that keeps the served repository whole — what
//! [`publish`](fn@super::publish), [`rollback`](super::rollback) and a
//! root rotation end with.
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tough::editor::RepositoryEditor;
use tough::editor::signed::{PathExists, SignedRepository};
use tough::schema::RoleType;
use tough::{ExpirationEnforcement, Repository, RepositoryLoader, TargetName};

use super::keys::{KeyFile, check_keys, sources};
use super::root::{check_root_chain, latest_root};
use super::store::{StagedRelease, sync_dir};
use super::{FIRST_ROOT, METADATA_DIR, Published, RepoError, TARGETS_DIR, file_urls, io, tuf};
use crate::fleet::release::CUSTOM_KEY;

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
///
/// [`rotate_root`]: super::rotate_root
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
///
/// [`publish`]: fn@super::publish
pub(super) async fn publish_async(
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

pub(super) fn expires_at(
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
