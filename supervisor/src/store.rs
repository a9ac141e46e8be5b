//! The content-addressed store under `state_dir`.
//!
//! * `objects/<sha256>.so` — one file per library version, so `dlopen`
//!   always sees a distinct path (it returns the old image for a path it
//!   already has open). Written as a temp file, fsynced, renamed.
//! * `refs/<plugin>.json` — which version is active, which is known-good,
//!   the highest ever activated (anti-downgrade), and the history; replaced
//!   by atomic rename, never edited in place.
//! * `manifests/<sha256>.toml` — the manifest a version was activated
//!   with, so its `[requires]`, `conflicts` and `abi` are known when it is
//!   started from the store or switched back to.
//! * `journal.jsonl` — append-only record of every activation, refusal and
//!   failure, each line fsynced before the call returns.
//!
//! The library is hashed while it is copied: one pass over the bytes, done
//! before the reload window opens.
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Chunk size of the hash-while-copy loop.
const COPY_CHUNK: usize = 256 * 1024;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error, with the file involved.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The library's bytes do not hash to what the manifest pins.
    #[error("plugin {plugin:?}: sha256 of {library} is {actual}, the manifest says {expected}")]
    ChecksumMismatch {
        /// The plugin.
        plugin: String,
        /// The library file.
        library: PathBuf,
        /// From the manifest.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// A refs file exists but does not parse.
    #[error("refs file {path} is corrupt: {message}")]
    CorruptRefs {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A verified library in the store.
#[derive(Debug, Clone)]
pub struct StagedObject {
    /// `objects/<sha256>.so`.
    pub path: PathBuf,
    /// Its sha256 (lowercase hex).
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A version as the refs record it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRef {
    /// Semver version.
    pub version: Version,
    /// sha256 of its object.
    pub sha256: String,
}

/// The refs of one plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Refs {
    /// The version serving now.
    pub active: Option<VersionRef>,
    /// The last version that completed its trial.
    pub known_good: Option<VersionRef>,
    /// Versions activated, oldest first (bounded).
    pub history: Vec<VersionRef>,
    /// Set while `active` is on trial: when the trial started (ms since the
    /// epoch). A process that finds this set at start died during the
    /// trial, and comes up on `known_good` instead.
    pub trial_since_ms: Option<u64>,
    /// Set when plugvisor stopped cleanly (SIGTERM, SIGINT) while `active`
    /// was on trial: the next start resumes the trial instead of counting
    /// it as a crash. Only a process that dies leaves a trial without it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub trial_interrupted: bool,
    /// Versions rolled back from: not loaded again from the same package.
    pub quarantined: Vec<VersionRef>,
    /// The highest version ever activated: a lower one is refused unless a
    /// rollback names it (TUF's rollback attack). Absent in refs written
    /// before it existed; [`Refs::highest`] then falls back to the history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub highest_activated: Option<Version>,
}

impl Refs {
    /// Whether `v` was rolled back from and must not come back.
    pub fn is_quarantined(&self, v: &VersionRef) -> bool {
        self.quarantined.iter().any(|q| q == v)
    }

    /// The highest version ever activated, as far as these refs know.
    pub fn highest(&self) -> Option<&Version> {
        self.highest_activated
            .iter()
            .chain(self.active.iter().map(|r| &r.version))
            .chain(self.history.iter().map(|r| &r.version))
            .max()
    }

    /// The highest version ever activated, if `version` is below it: a
    /// downgrade, refused unless a rollback names `version` explicitly.
    /// The one anti-downgrade test, for the reload path and `plugvisor
    /// verify`.
    pub fn downgrade_below(&self, version: &Version) -> Option<&Version> {
        self.highest().filter(|highest| version < *highest)
    }

    /// Records that `new` became active: active, history and the highest
    /// activated version (which never goes down, not even on a rollback).
    pub fn record_activation(&mut self, new: &VersionRef) {
        let highest = match self.highest() {
            Some(h) if *h >= new.version => h.clone(),
            _ => new.version.clone(),
        };
        self.highest_activated = Some(highest);
        self.active = Some(new.clone());
        self.history.push(new.clone());
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The journal under `state_dir`: one JSON line per entry, appended and
/// fsynced (the MQTT reporter follows it by offset).
pub const JOURNAL_FILE: &str = "journal.jsonl";

/// Most history entries kept in a refs file.
const MAX_HISTORY: usize = 16;

/// What a journal line records. Its on-disk form is [`JournalEvent::as_str`]
/// (the same word in JSON); the state checker (`tests/src/state_check.rs`)
/// reads the journal from that format alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JournalEvent {
    /// A version was switched to (a reload, or a start on it).
    Activated,
    /// A package was refused.
    Rejected,
    /// A package looked right but loading it failed.
    Failed,
    /// A version passed its trial.
    KnownGood,
    /// A rollback, by a rule, the operator or boot counting.
    Rollback,
    /// A degrade step was taken.
    Degrade,
    /// A degrade cleared with its rule.
    DegradeCleared,
    /// The operator disabled a plugin.
    Disable,
    /// The operator enabled it again.
    Enable,
    /// The process stopped cleanly during a trial.
    TrialInterrupted,
    /// A trial interrupted by a clean stop goes on.
    TrialResumed,
    /// The previous process died in `dlopen` or `init` of this version.
    CrashInLoad,
    /// An object no refs name was removed from the store.
    Collected,
    /// A plugin host died while it served (`isolation = "process"`).
    HostCrashed,
    /// A new host took over from one that died.
    HostRestarted,
    /// The fleet sync state of a plugin changed (`[sync]`); the reason
    /// says to what and why.
    Sync,
}

impl JournalEvent {
    /// The word on disk.
    pub const fn as_str(self) -> &'static str {
        match self {
            JournalEvent::Activated => "activated",
            JournalEvent::Rejected => "rejected",
            JournalEvent::Failed => "failed",
            JournalEvent::KnownGood => "known-good",
            JournalEvent::Rollback => "rollback",
            JournalEvent::Degrade => "degrade",
            JournalEvent::DegradeCleared => "degrade-cleared",
            JournalEvent::Disable => "disable",
            JournalEvent::Enable => "enable",
            JournalEvent::TrialInterrupted => "trial-interrupted",
            JournalEvent::TrialResumed => "trial-resumed",
            JournalEvent::CrashInLoad => "crash-in-load",
            JournalEvent::Collected => "collected",
            JournalEvent::HostCrashed => "host-crashed",
            JournalEvent::HostRestarted => "host-restarted",
            JournalEvent::Sync => "sync",
        }
    }
}

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The plugin.
    pub plugin: String,
    /// What happened.
    pub event: JournalEvent,
    /// Version involved, if known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<String>,
    /// Previous active version, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from_version: Option<String>,
    /// Object hash, if known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sha256: Option<String>,
    /// Why, in words.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The rule that acted, if a rule did.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule: Option<String>,
    /// The value the rule observed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub observed: Option<f64>,
    /// The threshold it crossed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub threshold: Option<f64>,
}

impl JournalEntry {
    /// An entry stamped with the current time.
    pub fn now(plugin: &str, event: JournalEvent) -> JournalEntry {
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        JournalEntry {
            ts_ms,
            plugin: plugin.to_owned(),
            event,
            version: None,
            from_version: None,
            sha256: None,
            reason: None,
            rule: None,
            observed: None,
            threshold: None,
        }
    }
}

/// The store rooted at `state_dir`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    objects: PathBuf,
    refs: PathBuf,
    manifests: PathBuf,
    journal: PathBuf,
    loading: PathBuf,
    // Told after each journal append (the reporter, with `[report.mqtt]`).
    wake: Option<std::sync::Arc<tokio::sync::Notify>>,
}

impl Store {
    /// Opens (creating if needed) the store at `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let store = Store {
            root: state_dir.to_owned(),
            objects: state_dir.join("objects"),
            refs: state_dir.join("refs"),
            manifests: state_dir.join("manifests"),
            journal: state_dir.join(JOURNAL_FILE),
            loading: state_dir.join("loading"),
            wake: None,
        };
        for dir in [
            &store.root,
            &store.objects,
            &store.refs,
            &store.manifests,
            &store.loading,
        ] {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        // Leftovers of a copy interrupted by a crash are never referenced.
        if let Ok(entries) = std::fs::read_dir(&store.objects) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(store)
    }

    /// The store at `state_dir` if one exists there, opened without
    /// creating or cleaning anything (for offline checks such as
    /// `plugvisor verify`).
    pub fn existing(state_dir: &Path) -> Option<Store> {
        state_dir.join("refs").is_dir().then(|| Store {
            root: state_dir.to_owned(),
            objects: state_dir.join("objects"),
            refs: state_dir.join("refs"),
            manifests: state_dir.join("manifests"),
            journal: state_dir.join(JOURNAL_FILE),
            loading: state_dir.join("loading"),
            wake: None,
        })
    }

    /// Whether the store can be written now (`access(2)` with `W_OK`,
    /// which also sees a read-only mount).
    pub fn check_writable(&self) -> Result<(), std::io::Error> {
        use std::os::unix::ffi::OsStrExt as _;
        let c = std::ffi::CString::new(self.root.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated path; access(2) has no other preconditions.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// The store's root (`state_dir`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The plugins that have refs in this store (whether or not a listener
    /// serves them now).
    pub fn plugins_with_refs(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.refs) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let plugin = name.strip_suffix(".json")?;
                (!plugin.starts_with('.')).then(|| plugin.to_owned())
            })
            .collect()
    }

    /// The objects in the store, by sha256 (temp files left out).
    pub fn object_hashes(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.objects) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let sha = name.strip_suffix(".so")?;
                (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| sha.to_owned())
            })
            .collect()
    }

    /// Removes object `sha256` and the manifest kept with it: the manifest
    /// first, so that no kept manifest ever names a missing object.
    pub fn remove_object(&self, sha256: &str) -> Result<(), StoreError> {
        let manifest = self.manifest_path(sha256);
        match std::fs::remove_file(&manifest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Io {
                    action: "removing",
                    path: manifest,
                    source,
                });
            }
        }
        let object = self.object_path(sha256);
        std::fs::remove_file(&object).map_err(io("removing", &object))?;
        sync_dir(&self.objects)
    }

    /// Path of the object with hash `sha256`.
    pub fn object_path(&self, sha256: &str) -> PathBuf {
        self.objects.join(format!("{sha256}.so"))
    }

    /// Hashes `library` while copying it into `objects/`, and checks the
    /// hash against `expected` (the manifest's). On a mismatch nothing is
    /// left behind.
    ///
    /// The copy is not flushed to disk here: the reload path switches to
    /// the object first (`dlopen` reads the page cache alike) and calls
    /// [`Store::make_durable`] before any ref names it, which keeps the
    /// fsyncs — the larger part of staging on a small disk — out of
    /// "manifest commit → new version serving". A crash in between can
    /// leave a torn object under its final name that no ref names; so an
    /// object already present is trusted only once it hashes to its name
    /// again (it, not the package's copy, is what gets mapped), and is
    /// copied afresh otherwise.
    pub fn stage(
        &self,
        plugin: &str,
        library: &Path,
        expected: &str,
    ) -> Result<StagedObject, StoreError> {
        let target = self.object_path(expected);
        if let Ok(mut existing) = File::open(&target) {
            let (actual, size) = hash_all(&mut existing, &target, None)?;
            if actual == expected {
                return Ok(StagedObject {
                    path: target,
                    sha256: actual,
                    size,
                });
            }
            tracing::warn!(
                plugin,
                object = %target.display(),
                "the object in the store does not hash to its name (torn by a crash?); copying it again"
            );
        }
        let mut src = File::open(library).map_err(io("opening library", library))?;
        let tmp = self
            .objects
            .join(format!(".tmp-{}-{expected}", std::process::id()));
        let mut out = File::create(&tmp).map_err(io("creating", &tmp))?;
        let result = (|| {
            let (actual, size) = hash_all(&mut src, library, Some((&mut out, &tmp)))?;
            check_checksum(plugin, library, expected, &actual)?;
            crate::failpoints::crash_point(
                crate::failpoints::CrashPoint::StoreObjectBeforeRename,
                expected,
            );
            std::fs::rename(&tmp, &target).map_err(io("renaming into the store", &target))?;
            Ok(StagedObject {
                path: target.clone(),
                sha256: actual,
                size,
            })
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Flushes a staged object and its directory entry to disk. Called
    /// after the switch and before any ref names the object (see
    /// [`Store::stage`]); cheap when the object was already on disk.
    pub fn make_durable(&self, staged: &StagedObject) -> Result<(), StoreError> {
        File::open(&staged.path)
            .and_then(|f| f.sync_all())
            .map_err(io("syncing", &staged.path))?;
        sync_dir(&self.objects)
    }

    /// Keeps `bytes`, the manifest that pins object `sha256`, beside it
    /// (temp file, fsync, rename). Content-addressed by the object: the
    /// same library always carries the same dependency declarations, and a
    /// second manifest for it replaces the first.
    pub fn save_manifest(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.manifests.join(format!("{sha256}.toml"));
        if std::fs::read(&path).is_ok_and(|old| old == bytes) {
            return Ok(());
        }
        let tmp = self.manifests.join(format!(".{sha256}.toml.tmp"));
        replace_file(&tmp, &path, bytes)?;
        sync_dir(&self.manifests)
    }

    /// Where the manifest of object `sha256` is kept.
    pub fn manifest_path(&self, sha256: &str) -> PathBuf {
        self.manifests.join(format!("{sha256}.toml"))
    }

    /// The manifest saved with object `sha256`, if any (stores written
    /// before manifests were kept have none).
    pub fn manifest(&self, sha256: &str) -> Option<Vec<u8>> {
        std::fs::read(self.manifest_path(sha256)).ok()
    }

    /// Records that `plugin` is about to `dlopen` and `init` version `v`
    /// (`loading/<plugin>.json`), so that the next start knows if that
    /// killed the process. Written and renamed but not fsynced: it has to
    /// survive a crash of this process, which the page cache does, not of
    /// the machine — and a reload should not wait on the disk for it.
    pub fn mark_loading(&self, plugin: &str, v: &VersionRef) -> Result<(), StoreError> {
        let path = self.loading.join(format!("{plugin}.json"));
        let tmp = self.loading.join(format!(".{plugin}.json.tmp"));
        let bytes = serde_json::to_vec(v).expect("version refs serialise");
        std::fs::write(&tmp, bytes).map_err(io("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp))
    }

    /// Removes the mark of [`Store::mark_loading`]: the load returned.
    pub fn clear_loading(&self, plugin: &str) -> Result<(), StoreError> {
        let path = self.loading.join(format!("{plugin}.json"));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
                action: "removing",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Loads that never returned: the plugin and version of every mark
    /// left by a process that died inside `dlopen` or `init`. Unreadable
    /// marks are returned with `None`, so they can be cleared too.
    pub fn interrupted_loads(&self) -> Vec<(String, Option<VersionRef>)> {
        let Ok(entries) = std::fs::read_dir(&self.loading) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A mark torn before its rename was never a commitment.
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some(plugin) = name.strip_suffix(".json") else {
                continue;
            };
            let v = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            out.push((plugin.to_owned(), v));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn refs_path(&self, plugin: &str) -> PathBuf {
        self.refs.join(format!("{plugin}.json"))
    }

    /// The refs of `plugin` (empty if it has none yet).
    pub fn refs(&self, plugin: &str) -> Result<Refs, StoreError> {
        let path = self.refs_path(plugin);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::CorruptRefs {
                path: path.clone(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Refs::default()),
            Err(source) => Err(StoreError::Io {
                action: "reading",
                path,
                source,
            }),
        }
    }

    /// Replaces the refs of `plugin` atomically (temp file, fsync, rename, fsync dir).
    pub fn write_refs(&self, plugin: &str, refs: &Refs) -> Result<(), StoreError> {
        let path = self.refs_path(plugin);
        let tmp = self.refs.join(format!(".{plugin}.json.tmp"));
        let mut refs = refs.clone();
        if refs.history.len() > MAX_HISTORY {
            let excess = refs.history.len() - MAX_HISTORY;
            refs.history.drain(..excess);
        }
        let bytes = serde_json::to_vec_pretty(&refs).expect("refs serialise");
        replace_file(&tmp, &path, &bytes)?;
        sync_dir(&self.refs)
    }

    /// Appends `entry` to the journal and fsyncs it. An append that fails
    /// part-way (a full disk takes the bytes that fit) is cut off again, so
    /// the journal never keeps a torn line for the next entry to run into.
    pub fn journal(&self, entry: &JournalEntry) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(entry).expect("journal entries serialise");
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal)
            .map_err(io("opening journal", &self.journal))?;
        let whole = f
            .metadata()
            .map_err(io("reading the size of journal", &self.journal))?
            .len();
        let appended = f
            .write_all(&line)
            .map_err(io("appending to journal", &self.journal))
            .and_then(|()| f.sync_data().map_err(io("syncing journal", &self.journal)));
        if appended.is_err() {
            // Best effort: truncating frees blocks, so it works on a full disk.
            let _ = f.set_len(whole).and_then(|()| f.sync_data());
        } else if let Some(w) = &self.wake {
            w.notify_one();
        }
        appended
    }

    /// Has `wake` told after each journal append, so that a follower of
    /// the journal need not poll it.
    pub fn wake_on_journal(&mut self, wake: std::sync::Arc<tokio::sync::Notify>) {
        self.wake = Some(wake);
    }

    /// Every journal entry, oldest first (a torn last line is skipped).
    pub fn read_journal(&self) -> Result<Vec<JournalEntry>, StoreError> {
        let text = match std::fs::read_to_string(&self.journal) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    action: "reading",
                    path: self.journal.clone(),
                    source,
                });
            }
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// The library's sha256 (`actual`) must be the one the manifest pins. One
/// function for the reload path ([`Store::stage`], which hashes while it
/// copies) and `plugvisor verify` / `pack`.
pub fn check_checksum(
    plugin: &str,
    library: &Path,
    expected: &str,
    actual: &str,
) -> Result<(), StoreError> {
    if actual == expected {
        Ok(())
    } else {
        Err(StoreError::ChecksumMismatch {
            plugin: plugin.to_owned(),
            library: library.to_owned(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        })
    }
}

/// sha256 (hex) and length of everything `src` (the file at `path`)
/// still holds, read in chunks and, with `copy`, written to that file too.
///
/// With a copy to make, the hashing (this thread) and the writing (a
/// scoped thread) overlap: each chunk is read once into a buffer, hashed
/// and written from that same buffer — what is hashed is exactly what is
/// written, whatever happens to the source meanwhile — so staging costs
/// about one sha256 pass instead of a pass plus a copy.
fn hash_all(
    src: &mut File,
    path: &Path,
    copy: Option<(&mut File, &Path)>,
) -> Result<(String, u64), StoreError> {
    const BUFFERS: usize = 3;
    let small = src
        .metadata()
        .is_ok_and(|m| m.len() <= 2 * COPY_CHUNK as u64);
    let (out, out_path) = match copy {
        Some(c) if !small => c,
        // Nothing to copy, or too little to be worth a thread.
        other => return hash_sequential(src, path, other),
    };
    let (to_writer, written) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(BUFFERS);
    let (to_reader, free) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        to_reader
            .send(vec![0u8; COPY_CHUNK])
            .expect("the receiver is right here");
    }
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> std::io::Result<()> {
            for (buf, n) in written {
                out.write_all(&buf[..n])?;
                // The reader may have stopped (an error); then the buffer
                // is simply dropped.
                let _ = to_reader.send(buf);
            }
            Ok(())
        });
        let read = (|| {
            // A failed writer drops its sender: `recv` then ends the loop
            // and the writer's error is reported below.
            while let Ok(mut buf) = free.recv() {
                let n = src.read(&mut buf).map_err(io("reading", path))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                size += n as u64;
                if to_writer.send((buf, n)).is_err() {
                    break;
                }
            }
            Ok(())
        })();
        drop(to_writer);
        let wrote = writer
            .join()
            .expect("the store's writer thread does not panic");
        read?;
        wrote.map_err(io("writing", out_path))
    })?;
    Ok((hex::encode(hasher.finalize()), size))
}

/// [`hash_all`] on this thread alone.
fn hash_sequential(
    src: &mut File,
    path: &Path,
    mut copy: Option<(&mut File, &Path)>,
) -> Result<(String, u64), StoreError> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        let n = src.read(&mut buf).map_err(io("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if let Some((out, out_path)) = copy.as_mut() {
            out.write_all(&buf[..n]).map_err(io("writing", out_path))?;
        }
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// sha256 of the file at `path`, hex, read in chunks.
pub fn sha256_file(path: &Path) -> Result<String, StoreError> {
    let mut f = File::open(path).map_err(io("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(io("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Writes `bytes` to `tmp`, fsyncs it and renames it over `path`. On any
/// failure `tmp` is removed: a full or read-only disk leaves nothing
/// half-written behind.
fn replace_file(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let result = File::create(tmp)
        .map_err(io("creating", tmp))
        .and_then(|mut f| {
            f.write_all(bytes).map_err(io("writing", tmp))?;
            f.sync_all().map_err(io("syncing", tmp))
        })
        .and_then(|()| std::fs::rename(tmp, path).map_err(io("renaming", path)));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn a_load_mark_survives_until_cleared() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let store = Store::open(&state).unwrap();
        assert!(store.interrupted_loads().is_empty());
        let v = VersionRef {
            version: Version::new(2, 0, 0),
            sha256: "ab".repeat(32),
        };
        store.mark_loading("echo", &v).unwrap();
        // What the next process sees if this one dies now; a torn mark
        // (never renamed) is no mark.
        std::fs::write(state.join("loading/.other.json.tmp"), b"{").unwrap();
        let reopened = Store::open(&state).unwrap();
        assert_eq!(
            reopened.interrupted_loads(),
            vec![("echo".to_owned(), Some(v.clone()))]
        );
        assert!(!state.join("loading/.other.json.tmp").exists());
        store.clear_loading("echo").unwrap();
        store.clear_loading("echo").unwrap();
        assert!(reopened.interrupted_loads().is_empty());
    }

    #[test]
    fn stage_copies_once_and_verifies() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("state")).unwrap();
        let lib = t.path().join("lib.so");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&lib, &data).unwrap();
        let s = store.stage("echo", &lib, &sha(&data)).unwrap();
        assert_eq!(s.size, data.len() as u64);
        assert_eq!(std::fs::read(&s.path).unwrap(), data);
        assert_eq!(s.path, store.object_path(&sha(&data)));
        // Staging again reuses the object.
        let again = store.stage("echo", &lib, &sha(&data)).unwrap();
        assert_eq!(again.path, s.path);
    }

    /// A crash between the switch and `make_durable` can leave an object
    /// under its name with other bytes; staging it again must not trust it.
    #[test]
    fn a_torn_object_is_copied_again() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("state")).unwrap();
        let lib = t.path().join("lib.so");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        std::fs::write(&lib, &data).unwrap();
        let s = store.stage("echo", &lib, &sha(&data)).unwrap();
        store.make_durable(&s).unwrap();
        std::fs::write(&s.path, vec![0u8; data.len()]).unwrap();
        let again = store.stage("echo", &lib, &sha(&data)).unwrap();
        assert_eq!(again.path, s.path);
        assert_eq!(std::fs::read(&again.path).unwrap(), data);
    }

    #[test]
    fn checksum_mismatch_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("state")).unwrap();
        let lib = t.path().join("lib.so");
        std::fs::write(&lib, b"real bytes").unwrap();
        let wrong = sha(b"other bytes");
        let err = store.stage("echo", &lib, &wrong).unwrap_err();
        match err {
            StoreError::ChecksumMismatch {
                expected, actual, ..
            } => {
                assert_eq!(expected, wrong);
                assert_eq!(actual, sha(b"real bytes"));
            }
            other => panic!("unexpected {other}"),
        }
        assert_eq!(
            std::fs::read_dir(t.path().join("state/objects"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn refs_round_trip_and_corruption_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        assert_eq!(store.refs("echo").unwrap(), Refs::default());
        let v = VersionRef {
            version: Version::new(1, 2, 3),
            sha256: "ab".repeat(32),
        };
        let refs = Refs {
            active: Some(v.clone()),
            known_good: None,
            trial_since_ms: Some(7),
            trial_interrupted: false,
            quarantined: vec![v.clone()],
            history: vec![v],
            highest_activated: None,
        };
        store.write_refs("echo", &refs).unwrap();
        assert_eq!(store.refs("echo").unwrap(), refs);
        std::fs::write(t.path().join("refs/echo.json"), b"{not json").unwrap();
        assert!(matches!(
            store.refs("echo"),
            Err(StoreError::CorruptRefs { .. })
        ));
    }

    #[test]
    fn old_refs_parse_and_highest_never_goes_down() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        // A refs file as written before `highest_activated` existed.
        let sha = "ab".repeat(32);
        std::fs::write(
            t.path().join("refs/echo.json"),
            format!(
                r#"{{"active":{{"version":"1.5.0","sha256":"{sha}"}},"known_good":null,"history":[{{"version":"2.0.0","sha256":"{sha}"}},{{"version":"1.5.0","sha256":"{sha}"}}]}}"#
            ),
        )
        .unwrap();
        let mut refs = store.refs("echo").unwrap();
        assert_eq!(refs.highest_activated, None);
        assert_eq!(
            refs.highest(),
            Some(&Version::new(2, 0, 0)),
            "from the history"
        );
        let v = |s: &str| VersionRef {
            version: Version::parse(s).unwrap(),
            sha256: sha.clone(),
        };
        refs.record_activation(&v("1.0.0"));
        assert_eq!(refs.highest_activated, Some(Version::new(2, 0, 0)));
        assert_eq!(refs.active, Some(v("1.0.0")));
        refs.record_activation(&v("3.0.0"));
        store.write_refs("echo", &refs).unwrap();
        let text = std::fs::read_to_string(t.path().join("refs/echo.json")).unwrap();
        assert!(text.contains("\"highest_activated\": \"3.0.0\""), "{text}");
        assert_eq!(
            store.refs("echo").unwrap().highest(),
            Some(&Version::new(3, 0, 0))
        );
    }

    #[test]
    fn manifests_are_kept_by_object() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let sha = "cd".repeat(32);
        assert_eq!(store.manifest(&sha), None);
        store.save_manifest(&sha, b"name = \"echo\"\n").unwrap();
        store.save_manifest(&sha, b"name = \"echo\"\n").unwrap();
        assert_eq!(
            store.manifest(&sha).as_deref(),
            Some(&b"name = \"echo\"\n"[..])
        );
    }

    #[test]
    fn journal_appends_and_skips_torn_line() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        let mut e = JournalEntry::now("echo", JournalEvent::Activated);
        e.version = Some("1.0.0".into());
        store.journal(&e).unwrap();
        store
            .journal(&JournalEntry::now("echo", JournalEvent::Rejected))
            .unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(t.path().join("journal.jsonl"))
            .unwrap();
        f.write_all(b"{\"ts_ms\":1,\"plu").unwrap();
        let j = store.read_journal().unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j[0].version.as_deref(), Some("1.0.0"));
        assert_eq!(j[1].event, JournalEvent::Rejected);
    }
}
