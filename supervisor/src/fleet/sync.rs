//! `[sync]`: this node follows the fleet's TUF repository.
//!
//! Each round:
//! 1. **timestamp first.** `timestamp.json` is fetched alone; if it is the
//!    very document already verified last time (and not expired), nothing
//!    in the repository changed and the round ends there (a no-op poll
//!    costs one small GET). Nothing is trusted from that fetch: it equals
//!    what tough verified.
//! 2. **The `tough` client** loads timestamp → snapshot → targets (and any
//!    new root) against the trusted root, with its datastore under
//!    `state_dir/sync/tuf`: a mirror serving older metadata (rollback), or
//!    metadata past its expiry (freeze), is refused there, across
//!    restarts too.
//! 3. **Which release**: every target whose `custom.plugvisor` describes a
//!    release ([`release`]); per plugin, the one [`release::desired`] names
//!    for this node now.
//! 4. **Download** each file of it not cached yet into `state_dir/sync/cache`:
//!    to a `.part` file, resumed with an HTTP range after an interruption,
//!    bounded by the TUF-pinned length (and `max_package_size`), checked
//!    against the pinned sha256, then renamed to its hash. A file that
//!    does not match is deleted and counted (`verify`), never committed.
//! 5. **Commit** into `plugins_dir/PLUGIN/` as an operator would: library,
//!    then signature, then the manifest, each fsynced and renamed into
//!    place. Everything downstream — signature and checksum checks, the
//!    trial, the rules, rollback — is the same as for any package. A
//!    published rollback (the desired version below the active one) is
//!    allowed through as an explicit downgrade
//!    ([`Reloader::allow_fleet_downgrade`]).
//!
//! Failures back off (5 s doubling, at most the poll interval), so a 404
//! or a 5xx never turns into a tight loop; the node serves on throughout.
//!
//! States per plugin (`plugvisor_sync_state`, `plugvisor status`):
//! `synced`, `pending` (the repository unreachable, or a release on its
//! way), `stale` (the repository asks for a version below the active one:
//! followed, alerted), `blocked` (the desired version was refused or
//! rolled back here; the reason is kept), `expired` (no verified metadata
//! for longer than `max_offline`: no new releases, serving on).
use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use semver::Version;
use serde::{Deserialize, Serialize};

use super::release::{self, CUSTOM_KEY, Node, Release};
use crate::catalog::MANIFEST_FILE;
use crate::config::SyncConfig;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::store::{JournalEntry, JournalEvent};
use crate::trust::SIGNATURE_FILE;

/// The first wait after a failure; it doubles up to the poll interval.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);

/// Under `state_dir/sync`: when the repository was last verified (Unix
/// seconds).
const LAST_SUCCESS: &str = "last-success";

/// How long a single HTTP request may take (a stalled server is a failed
/// round, retried later, not a round that never ends).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// One plugin's state as a round found it: plugin, desired version,
/// active version, state, why.
type StateRow = (String, String, Option<Version>, State, Option<String>);

/// The states, as exported.
pub const STATES: [&str; 5] = ["synced", "pending", "stale", "blocked", "expired"];

/// The error stages, as exported.
pub const STAGES: [&str; 6] = [
    "timestamp",
    "snapshot",
    "targets",
    "download",
    "verify",
    "commit",
];

/// A plugin's sync state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The desired version is active.
    Synced,
    /// The repository cannot be read, or the desired version is on its way.
    Pending,
    /// The desired version is below the active one (a published rollback,
    /// being followed).
    Stale,
    /// The desired version was refused or rolled back on this node.
    Blocked,
    /// No verified metadata for longer than `max_offline`.
    Expired,
}

impl State {
    /// The exported spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Synced => "synced",
            State::Pending => "pending",
            State::Stale => "stale",
            State::Blocked => "blocked",
            State::Expired => "expired",
        }
    }
}

/// One plugin's sync, as `plugvisor status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginSync {
    /// Its state.
    pub state: State,
    /// The version the repository wants here.
    pub desired: Option<String>,
    /// The version active here.
    pub active: Option<String>,
    /// Since when (Unix seconds) it has been in this state.
    pub since: u64,
    /// Why it is blocked or pending, when it is.
    pub reason: Option<String>,
}

/// The node's sync, as `plugvisor status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncStatus {
    /// This node's name.
    pub node: String,
    /// Its rollout seed.
    pub seed: u32,
    /// When the repository was last read and verified (Unix seconds).
    pub last_success: Option<u64>,
    /// The last round's error, if it failed.
    pub last_error: Option<String>,
    /// Per plugin the repository has a release for (for this node).
    pub plugins: BTreeMap<String, PluginSync>,
}

/// Why a round failed, and at which stage.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Fetching or verifying metadata failed.
    #[error("reading the TUF repository at {url} ({stage}): {message}")]
    Metadata {
        /// `timestamp`, `snapshot` or `targets`.
        stage: &'static str,
        /// The metadata URL.
        url: String,
        /// tough's words.
        message: String,
    },
    /// Downloading a package file failed (it resumes next round).
    #[error("downloading {target} of {plugin} {version} from {url}: {message}")]
    Download {
        /// The plugin.
        plugin: String,
        /// The release.
        version: String,
        /// The target name.
        target: String,
        /// Its URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// A downloaded file is not the one the metadata pins.
    #[error("{target} of {plugin} {version}: {message}; deleted, not committed")]
    Verify {
        /// The plugin.
        plugin: String,
        /// The release.
        version: String,
        /// The target name.
        target: String,
        /// What did not match.
        message: String,
    },
    /// Writing the package into `plugins_dir` failed.
    #[error("committing {plugin} {version} into {dir}: {message}")]
    Commit {
        /// The plugin.
        plugin: String,
        /// The release.
        version: String,
        /// The package directory.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl SyncError {
    fn stage(&self) -> &'static str {
        match self {
            SyncError::Metadata { stage, .. } => stage,
            SyncError::Download { .. } => "download",
            SyncError::Verify { .. } => "verify",
            SyncError::Commit { .. } => "commit",
        }
    }
}

/// A running sync: its status, for `plugvisor status`.
#[derive(Debug, Clone)]
pub struct SyncHandle {
    status: Arc<Mutex<SyncStatus>>,
}

impl SyncHandle {
    /// What the sync knows now.
    pub fn status(&self) -> SyncStatus {
        self.status.lock().expect("sync status lock").clone()
    }
}

/// A release's file, as the verified targets metadata pins it.
#[derive(Debug, Clone)]
struct Pinned {
    target: String,
    length: u64,
    sha256: String,
}

/// A release this node should run, with its files pinned.
#[derive(Debug, Clone)]
struct Wanted {
    release: Release,
    manifest: Pinned,
    library: Pinned,
    signature: Option<Pinned>,
}

/// The sync of one node.
struct Syncer {
    config: SyncConfig,
    node: Node,
    plugins_dir: PathBuf,
    dir: PathBuf,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    reloader: Arc<Mutex<Reloader>>,
    status: Arc<Mutex<SyncStatus>>,
    // The verified metadata's wanted releases, kept for rounds that find
    // nothing new (and for the state while the repository is away).
    wanted: BTreeMap<String, Wanted>,
    // When each plugin's release was committed here (Unix ms), to tell a
    // refusal of it from one of an older package.
    committed_at: BTreeMap<String, u64>,
    last_success: Option<SystemTime>,
    started: SystemTime,
}

/// The node's name: `[sync] node`, else the host name.
pub fn node_name(config: &SyncConfig) -> String {
    config.node.clone().unwrap_or_else(crate::config::host_name)
}

/// Checks that `root` is a TUF root the node can start from: readable, a
/// signed document of `_type` root. (Its signatures are tough's to check,
/// at the first poll.)
pub fn check_root(root: &Path) -> Result<(), String> {
    let bytes = std::fs::read(root).map_err(|e| format!("[sync] root {}: {e}", root.display()))?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("[sync] root {}: not JSON: {e}", root.display()))?;
    if doc["signed"]["_type"] != "root" {
        return Err(format!(
            "[sync] root {}: not a TUF root.json (signed._type is {}); give it DIR/metadata/1.root.json of `plugvisor repo init`",
            root.display(),
            doc["signed"]["_type"]
        ));
    }
    Ok(())
}

/// Starts following the repository `config` names, on the current tokio
/// runtime. Packages go into `plugins_dir`; the sync's own files (the TUF
/// datastore, the download cache) under `state_dir/sync`.
pub fn start(
    config: SyncConfig,
    plugins_dir: &Path,
    state_dir: &Path,
    metrics: Arc<Metrics>,
    reloader: Arc<Mutex<Reloader>>,
) -> std::io::Result<SyncHandle> {
    let dir = state_dir.join("sync");
    std::fs::create_dir_all(dir.join("tuf"))?;
    std::fs::create_dir_all(dir.join("cache"))?;
    let name = node_name(&config);
    let node = Node {
        seed: config.seed.unwrap_or_else(|| Node::seed_of(&name)),
        name,
        labels: config.labels.clone(),
    };
    // reqwest is built without a TLS provider of its own (as tough builds
    // it): the process installs one, the first caller wins.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(std::io::Error::other)?;
    let status = Arc::new(Mutex::new(SyncStatus {
        node: node.name.clone(),
        seed: node.seed,
        ..SyncStatus::default()
    }));
    metrics.sync_at_zero(&STAGES);
    tracing::info!(node = %node.name, seed = node.seed, labels = ?node.labels, metadata = %config.metadata_url, "fleet sync: following the TUF repository");
    let wanted = wanted_from_datastore(&dir.join("tuf"), &node);
    let last_success = std::fs::read_to_string(dir.join(LAST_SUCCESS))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
    if let Some(t) = last_success {
        metrics.sync_succeeded(unix(t) as f64);
        status.lock().expect("sync status lock").last_success = Some(unix(t));
    }
    let mut syncer = Syncer {
        config,
        node,
        plugins_dir: plugins_dir.to_owned(),
        dir,
        http,
        metrics,
        reloader,
        status: status.clone(),
        wanted,
        committed_at: BTreeMap::new(),
        last_success,
        started: SystemTime::now(),
    };
    tokio::spawn(async move { syncer.run().await });
    Ok(SyncHandle { status })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// `d` ± 10 %, so a fleet started together does not poll together.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let r = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX); // 0 ..= 1
    d.mul_f64(0.9 + 0.2 * r)
}

impl Syncer {
    async fn run(&mut self) {
        let mut failures = 0u32;
        let mut last_error: Option<String> = None;
        loop {
            let wait = match self.round().await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(
                            after = failures,
                            "fleet sync: the repository is read again"
                        );
                    }
                    failures = 0;
                    last_error = None;
                    self.config.interval
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    self.metrics.sync_error(e.stage());
                    // A new error, and the 1st, 2nd, 4th, 8th… failure in
                    // a row: an outage is said, not repeated every poll.
                    let text = e.to_string();
                    if failures.is_power_of_two() || last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(error = %e, stage = e.stage(), failures, "fleet sync: round failed; serving on from the local store");
                    }
                    last_error = Some(text.clone());
                    self.status.lock().expect("sync status lock").last_error = Some(text);
                    FIRST_BACKOFF
                        .saturating_mul(2u32.saturating_pow(failures - 1))
                        .min(self.config.interval)
                }
            };
            self.publish_states();
            tokio::time::sleep(jitter(wait)).await;
        }
    }

    /// One poll: metadata, then each wanted release fetched and committed.
    async fn round(&mut self) -> Result<(), SyncError> {
        if self.metadata_changed().await? {
            self.load_metadata().await?;
        }
        let now = SystemTime::now();
        self.last_success = Some(now);
        // Kept across restarts: how long a node has been without verified
        // metadata (`expired`) does not start again with the process.
        if let Err(e) = std::fs::write(self.dir.join(LAST_SUCCESS), unix(now).to_string()) {
            tracing::warn!(error = %e, "fleet sync: could not record the last success");
        }
        self.metrics.sync_succeeded(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        {
            let mut st = self.status.lock().expect("sync status lock");
            st.last_success = Some(unix(now));
            st.last_error = None;
        }
        // Said before the downloads: a slow release on its way (or a
        // rollback being followed) shows as what it is, not as the state
        // of the previous round.
        self.publish_states();
        let wanted: Vec<Wanted> = self.wanted.values().cloned().collect();
        for w in wanted {
            self.bring(&w).await?;
        }
        self.prune_cache();
        Ok(())
    }

    /// Deletes cached files (and partial downloads) no wanted release
    /// names: the cache holds what the node is meant to run, not every
    /// release it ever took (those are in the store).
    fn prune_cache(&self) {
        let keep: std::collections::BTreeSet<&str> = self
            .wanted
            .values()
            .flat_map(|w| {
                [Some(&w.manifest), Some(&w.library), w.signature.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|p| p.sha256.as_str())
            })
            .collect();
        for e in std::fs::read_dir(self.dir.join("cache"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let sha = name.strip_suffix(".part").unwrap_or(&name);
            if !keep.contains(sha) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!(file = %e.path().display(), error = %err, "fleet sync: could not prune the cache");
                }
            }
        }
    }

    /// Whether `timestamp.json` differs from the one verified last (or
    /// there is none yet). A failed fetch is the timestamp stage's error.
    async fn metadata_changed(&self) -> Result<bool, SyncError> {
        let stored = self.dir.join("tuf").join("timestamp.json");
        let Ok(known) = std::fs::read(&stored) else {
            return Ok(true);
        };
        if self.wanted.is_empty() || expired(&known) {
            // A fresh start reads the releases once anyway; metadata past
            // its expiry goes to tough, which refuses it (freeze).
            return Ok(true);
        }
        let url = format!(
            "{}/timestamp.json",
            self.config.metadata_url.trim_end_matches('/')
        );
        let failed = |message: String| SyncError::Metadata {
            stage: "timestamp",
            url: url.clone(),
            message,
        };
        if url.starts_with("file:") {
            return Ok(true);
        }
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| failed(e.to_string()))?;
        // tough bounds timestamp.json to 1 MiB; so does this.
        let body = read_bounded(resp, 1 << 20).await.map_err(failed)?;
        self.metrics.sync_downloaded(body.len() as u64);
        // tough keeps what it verified re-serialised: compare as JSON.
        let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
        Ok(json(&body).is_none() || json(&body) != json(&known))
    }

    /// Loads and verifies the repository with `tough`, and keeps the
    /// releases wanted here.
    async fn load_metadata(&mut self) -> Result<(), SyncError> {
        let url = self.config.metadata_url.clone();
        let failed = |stage: &'static str, message: String| SyncError::Metadata {
            stage,
            url: url.clone(),
            message,
        };
        let root = std::fs::read(&self.config.root).map_err(|e| {
            failed(
                "timestamp",
                format!("the trusted root {}: {e}", self.config.root.display()),
            )
        })?;
        let parse = |u: &str| reqwest::Url::parse(&format!("{}/", u.trim_end_matches('/')));
        let metadata_url =
            parse(&self.config.metadata_url).map_err(|e| failed("timestamp", e.to_string()))?;
        let targets_url =
            parse(&self.config.targets_url).map_err(|e| failed("targets", e.to_string()))?;
        let repo = tough::RepositoryLoader::new(&root, metadata_url, targets_url)
            .datastore(self.dir.join("tuf"))
            .transport(Counting {
                inner: tough::DefaultTransport::new(),
                metrics: self.metrics.clone(),
            })
            .load()
            .await
            .map_err(|e| {
                let message = e.to_string();
                failed(stage_of(&message), message)
            })?;
        let (wanted, releases) = wanted_of(
            repo.all_targets()
                .map(|(name, target)| (name.raw().to_owned(), target)),
            &self.node,
        );
        tracing::info!(
            targets_version = repo.targets().signed.version.get(),
            releases,
            for_this_node = wanted.len(),
            "fleet sync: repository verified"
        );
        self.wanted = wanted;
        Ok(())
    }

    /// Makes `w` the package in `plugins_dir` (unless it is already, or a
    /// refusal here blocks it).
    async fn bring(&mut self, w: &Wanted) -> Result<(), SyncError> {
        let plugin = &w.release.plugin;
        let package = self.plugins_dir.join(plugin);
        let current = std::fs::read(package.join(MANIFEST_FILE)).ok();
        let manifest_path = self.cached(&w.manifest.sha256);
        if current.is_some()
            && manifest_path.exists()
            && std::fs::read(&manifest_path).ok() == current
        {
            return Ok(()); // Committed already.
        }
        let active = self.active_version(plugin);
        if let Some(a) = &active {
            if *a > w.release.version {
                tracing::warn!(plugin, active = %a, desired = %w.release.version, "fleet sync: the repository asks for an older version (a published rollback); following it");
            }
        }
        let mut files = vec![&w.library];
        files.extend(&w.signature);
        files.push(&w.manifest);
        for f in files {
            self.fetch(w, f).await?;
        }
        self.commit(w, &package, active.as_ref())
    }

    fn cached(&self, sha256: &str) -> PathBuf {
        self.dir.join("cache").join(sha256)
    }

    /// Brings one pinned file into the cache: resumed, bounded, checked.
    async fn fetch(&self, w: &Wanted, f: &Pinned) -> Result<(), SyncError> {
        let done = self.cached(&f.sha256);
        if done.exists() {
            return Ok(());
        }
        let plugin = w.release.plugin.clone();
        let version = w.release.version.to_string();
        let verify = |message: String| SyncError::Verify {
            plugin: plugin.clone(),
            version: version.clone(),
            target: f.target.clone(),
            message,
        };
        if f.length > self.config.max_package_size {
            return Err(verify(format!(
                "its pinned length {} is past [sync] max_package_size {}",
                f.length, self.config.max_package_size
            )));
        }
        // Consistent snapshots, as tough writes and reads them: a target
        // is served as `<sha256>.<name>`.
        let url = format!(
            "{}/{}.{}",
            self.config.targets_url.trim_end_matches('/'),
            f.sha256,
            f.target
        );
        let part = done.with_extension("part");
        let download = |message: String| SyncError::Download {
            plugin: plugin.clone(),
            version: version.clone(),
            target: f.target.clone(),
            url: url.clone(),
            message,
        };
        let have = std::fs::metadata(&part).map_or(0, |m| m.len());
        if have > f.length {
            let _ = std::fs::remove_file(&part);
            return Err(verify(format!(
                "a partial download of {have} bytes is past its pinned length {}",
                f.length
            )));
        }
        if have < f.length {
            let mut req = self.http.get(&url);
            if have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let resp = req
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|e| download(e.to_string()))?;
            // 206: the rest; 200: the server ignored the range, start over.
            let resumed = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(resumed)
                .write(true)
                .truncate(!resumed)
                .open(&part)
                .map_err(|e| download(format!("opening {}: {e}", part.display())))?;
            let mut written = if resumed { have } else { 0 };
            if have > 0 {
                tracing::info!(target = %f.target, from = have, resumed, "fleet sync: resuming a download");
            }
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| download(e.to_string()))?;
                written += chunk.len() as u64;
                self.metrics.sync_downloaded(chunk.len() as u64);
                if written > f.length {
                    drop(out);
                    let _ = std::fs::remove_file(&part);
                    return Err(verify(format!(
                        "the server sent more than its pinned length {}",
                        f.length
                    )));
                }
                out.write_all(&chunk)
                    .map_err(|e| download(format!("writing {}: {e}", part.display())))?;
            }
            out.sync_all()
                .map_err(|e| download(format!("syncing {}: {e}", part.display())))?;
            if written < f.length {
                return Err(download(format!(
                    "the transfer ended at {written} of {} bytes; it resumes next round",
                    f.length
                )));
            }
        }
        let sha = crate::store::sha256_file(&part).map_err(|e| download(e.to_string()))?;
        if sha != f.sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(verify(format!(
                "sha256 {sha}, the metadata pins {}",
                f.sha256
            )));
        }
        std::fs::rename(&part, &done)
            .map_err(|e| download(format!("renaming {}: {e}", part.display())))?;
        Ok(())
    }

    /// Writes the cached release into `package` — library, signature,
    /// manifest last — as `plugvisor pack` would.
    fn commit(
        &mut self,
        w: &Wanted,
        package: &Path,
        active: Option<&Version>,
    ) -> Result<(), SyncError> {
        let plugin = w.release.plugin.clone();
        let failed = |message: String| SyncError::Commit {
            plugin: plugin.clone(),
            version: w.release.version.to_string(),
            dir: package.to_owned(),
            message,
        };
        let read = |p: &Pinned| {
            std::fs::read(self.cached(&p.sha256))
                .map_err(|e| failed(format!("reading the cached {}: {e}", p.target)))
        };
        let manifest = read(&w.manifest)?;
        let library = read(&w.library)?;
        let signature = w.signature.as_ref().map(read).transpose()?;
        if !package.exists() {
            std::fs::create_dir_all(package).map_err(|e| failed(e.to_string()))?;
            std::fs::set_permissions(package, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| failed(e.to_string()))?;
        }
        let lib_name = w
            .release
            .files
            .library
            .rsplit('/')
            .next()
            .unwrap_or(&w.release.files.library);
        let write = |name: &str, bytes: &[u8]| {
            crate::pack::write_atomic(&package.join(name), bytes).map_err(|e| failed(e.to_string()))
        };
        write(lib_name, &library)?;
        match &signature {
            Some(s) => write(SIGNATURE_FILE, s)?,
            None => match std::fs::remove_file(package.join(SIGNATURE_FILE)) {
                // A signature of an older manifest would fail the new one.
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed(e.to_string())),
            },
        }
        let downgrade = active.is_some_and(|a| *a > w.release.version);
        self.reloader
            .lock()
            .expect("reloader lock")
            .allow_fleet_downgrade(&plugin, downgrade.then(|| w.release.version.clone()));
        write(MANIFEST_FILE, &manifest)?;
        crate::pack::sync_dir(package).map_err(|e| failed(e.to_string()))?;
        self.committed_at
            .insert(plugin.clone(), crate::store::now_ms());
        tracing::info!(plugin, version = %w.release.version, downgrade, dir = %package.display(), "fleet sync: release committed into plugins_dir");
        Ok(())
    }

    fn active_version(&self, plugin: &str) -> Option<Version> {
        let r = self.reloader.lock().expect("reloader lock");
        r.slots()
            .get(plugin)
            .and_then(|s| s.active())
            .map(|i| i.loaded.version().clone())
    }

    /// Why the desired version is not active here, from the journal: a
    /// refusal, a failed load or a rollback of it since it was committed.
    fn refusal(&self, journal: &[JournalEntry], plugin: &str, version: &Version) -> Option<String> {
        let since = self.committed_at.get(plugin).copied().unwrap_or(0);
        let v = version.to_string();
        journal
            .iter()
            .rev()
            .filter(|e| e.plugin == plugin && e.ts_ms >= since)
            .find(|e| match e.event {
                JournalEvent::Rejected | JournalEvent::Failed | JournalEvent::CrashInLoad => {
                    e.version.as_deref() == Some(&v)
                }
                JournalEvent::Rollback => e.from_version.as_deref() == Some(&v),
                _ => false,
            })
            .map(|e| {
                format!(
                    "{} here: {}",
                    e.event.as_str(),
                    e.reason.as_deref().unwrap_or("no reason recorded")
                )
            })
    }

    /// A `sync` journal entry for each plugin whose state (or desired
    /// version) is not the one the journal last said: the coordinator
    /// learns of it as an event, once, across restarts too.
    fn journal_changes(&self, journal: &[JournalEntry], states: &[StateRow]) {
        let news: Vec<JournalEntry> = states
            .iter()
            .filter(|(plugin, desired, _, state, _)| {
                let said = journal
                    .iter()
                    .rev()
                    .find(|e| e.event == JournalEvent::Sync && &e.plugin == plugin);
                !said.is_some_and(|e| {
                    e.version.as_deref() == Some(desired.as_str())
                        && e.reason.as_deref().and_then(|r| r.split(':').next())
                            == Some(state.as_str())
                })
            })
            .map(|(plugin, desired, active, state, reason)| {
                let mut e = JournalEntry::now(plugin, JournalEvent::Sync);
                e.version = Some(desired.clone());
                e.from_version = active.as_ref().map(ToString::to_string);
                e.reason = Some(match reason {
                    Some(why) => format!("{}: {why}", state.as_str()),
                    None => state.as_str().to_owned(),
                });
                e
            })
            .collect();
        if news.is_empty() {
            return;
        }
        let r = self.reloader.lock().expect("reloader lock");
        for e in &news {
            if let Err(err) = r.store().journal(e) {
                tracing::warn!(plugin = %e.plugin, error = %err, "fleet sync: could not journal a state change");
            }
        }
    }

    /// Each plugin's state, into the status and the metric.
    fn publish_states(&self) {
        let now = SystemTime::now();
        let since_success = self
            .last_success
            .unwrap_or(self.started)
            .elapsed()
            .unwrap_or_default();
        let offline = self.last_success.is_none() || since_success > self.config.interval * 2;
        let expired = since_success > self.config.max_offline;
        let last_error = self
            .status
            .lock()
            .expect("sync status lock")
            .last_error
            .clone();
        // Read once for every plugin's refusal, not once per plugin.
        let journal = if self.wanted.is_empty() {
            Vec::new()
        } else {
            self.reloader
                .lock()
                .expect("reloader lock")
                .store()
                .read_journal()
                .unwrap_or_default()
        };
        // Everything that needs the reloader first, and the status lock
        // only after: `plugvisor status` takes them the other way round
        // (holding both at once here deadlocked the two).
        let mut states = Vec::with_capacity(self.wanted.len());
        for (plugin, w) in &self.wanted {
            let active = self.active_version(plugin);
            let (state, reason) = if expired {
                (
                    State::Expired,
                    Some(format!(
                        "no verified metadata for {}s (max_offline)",
                        since_success.as_secs()
                    )),
                )
            } else if let Some(why) = self.refusal(&journal, plugin, &w.release.version) {
                (State::Blocked, Some(why))
            } else if offline {
                // What the repository wants now is not known: the last
                // verified wish is shown, with why it cannot be read.
                (State::Pending, last_error.clone())
            } else if active.as_ref() == Some(&w.release.version) {
                (State::Synced, None)
            } else if active.as_ref().is_some_and(|a| *a > w.release.version) {
                (
                    State::Stale,
                    Some("the repository asks for an older version".into()),
                )
            } else {
                (State::Pending, Some("on its way".into()))
            };
            self.metrics.sync_state(plugin, state.as_str(), &STATES);
            states.push((
                plugin.clone(),
                w.release.version.to_string(),
                active,
                state,
                reason,
            ));
        }
        self.journal_changes(&journal, &states);
        let mut st = self.status.lock().expect("sync status lock");
        let mut plugins = BTreeMap::new();
        for (plugin, desired, active, state, reason) in states {
            let since = st
                .plugins
                .get(&plugin)
                .filter(|p| p.state == state)
                .map_or(unix(now), |p| p.since);
            plugins.insert(
                plugin,
                PluginSync {
                    state,
                    desired: Some(desired),
                    active: active.map(|v| v.to_string()),
                    since,
                    reason,
                },
            );
        }
        st.plugins = plugins;
    }
}

/// The releases listed in `targets` (name, target) and, per plugin, the
/// one wanted on `node` now, with its files pinned. Returns (wanted, how
/// many releases were listed).
fn wanted_of<'a>(
    targets: impl Iterator<Item = (String, &'a tough::schema::Target)>,
    node: &Node,
) -> (BTreeMap<String, Wanted>, usize) {
    let mut releases: Vec<(Release, Pinned)> = Vec::new();
    let mut files: BTreeMap<String, Pinned> = BTreeMap::new();
    for (name, target) in targets {
        let pinned = Pinned {
            target: name,
            length: target.length,
            sha256: hex::encode(&target.hashes.sha256),
        };
        if let Some(custom) = target.custom.get(CUSTOM_KEY) {
            match serde_json::from_value::<Release>(custom.clone()) {
                Ok(r) if r.check().is_ok() && r.files.manifest == pinned.target => {
                    releases.push((r, pinned.clone()));
                }
                Ok(r) => {
                    tracing::warn!(target = %pinned.target, plugin = %r.plugin, "fleet sync: a release whose files are not where its manifest target is; ignored");
                }
                Err(e) => {
                    tracing::warn!(target = %pinned.target, error = %e, "fleet sync: unreadable release metadata; ignored");
                }
            }
        }
        files.insert(pinned.target.clone(), pinned);
    }
    let now = jiff::Timestamp::now();
    let plugins: std::collections::BTreeSet<&str> =
        releases.iter().map(|(r, _)| r.plugin.as_str()).collect();
    let mut wanted = BTreeMap::new();
    for plugin in plugins {
        let Some(r) = release::desired(releases.iter().map(|(r, _)| r), plugin, node, now) else {
            continue;
        };
        let manifest = releases
            .iter()
            .find(|(x, _)| x == r)
            .map(|(_, p)| p.clone())
            .expect("desired is one of them");
        let Some(library) = files.get(&r.files.library).cloned() else {
            tracing::warn!(plugin, version = %r.version, "fleet sync: the release's library is not a target; skipped");
            continue;
        };
        let signature = r.files.signature.as_ref().map(|s| files.get(s).cloned());
        if signature.as_ref().is_some_and(Option::is_none) {
            tracing::warn!(plugin, version = %r.version, "fleet sync: the release's signature is not a target; skipped");
            continue;
        }
        let signature = signature.flatten();
        wanted.insert(
            plugin.to_owned(),
            Wanted {
                release: r.clone(),
                manifest,
                library,
                signature,
            },
        );
    }
    (wanted, releases.len())
}

/// The releases wanted here by the targets metadata tough verified last
/// (its datastore), to say each plugin's state from the start, even while
/// the repository cannot be reached.
fn wanted_from_datastore(tuf: &Path, node: &Node) -> BTreeMap<String, Wanted> {
    let Ok(bytes) = std::fs::read(tuf.join("targets.json")) else {
        return BTreeMap::new();
    };
    match serde_json::from_slice::<tough::schema::Signed<tough::schema::Targets>>(&bytes) {
        Ok(t) => {
            wanted_of(
                t.signed
                    .targets
                    .iter()
                    .map(|(name, target)| (name.raw().to_owned(), target)),
                node,
            )
            .0
        }
        Err(e) => {
            tracing::warn!(error = %e, "fleet sync: the last verified targets metadata is unreadable; states wait for the first poll");
            BTreeMap::new()
        }
    }
}

/// Whether a verified `timestamp.json` has expired (unreadable: treated as
/// expired, so tough looks at it again).
fn expired(timestamp: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(timestamp)
        .ok()
        .and_then(|v| {
            v["signed"]["expires"]
                .as_str()?
                .parse::<jiff::Timestamp>()
                .ok()
        })
        .is_none_or(|t| t <= jiff::Timestamp::now())
}

/// Reads at most `max` bytes of a response's body.
async fn read_bounded(resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if body.len() + chunk.len() > max {
            return Err(format!("more than {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The stage a `tough` error belongs to, by the role it names.
fn stage_of(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("targets") {
        "targets"
    } else if m.contains("snapshot") {
        "snapshot"
    } else {
        "timestamp"
    }
}

/// tough's own transport, with every byte it fetches counted in
/// `plugvisor_sync_download_bytes_total`.
#[derive(Clone)]
struct Counting {
    inner: tough::DefaultTransport,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Counting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counting").finish_non_exhaustive()
    }
}

impl tough::Transport for Counting {
    // What `#[async_trait]` would write: the trait is declared with it.
    fn fetch<'life0, 'async_trait>(
        &'life0 self,
        url: reqwest::Url,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<tough::TransportStream, tough::TransportError>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let stream = self.inner.fetch(url).await?;
            let metrics = self.metrics.clone();
            let counted = stream.inspect(move |chunk| {
                if let Ok(bytes) = chunk {
                    metrics.sync_downloaded(bytes.len() as u64);
                }
            });
            Ok(Box::pin(counted) as tough::TransportStream)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_staged_and_backoff_is_bounded() {
        assert_eq!(
            stage_of("Failed to load snapshot.json: expired"),
            "snapshot"
        );
        assert_eq!(
            stage_of("targets.json version 3 is older than 4"),
            "targets"
        );
        assert_eq!(stage_of("connection refused"), "timestamp");
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(100));
            assert!(
                j >= Duration::from_secs(90) && j <= Duration::from_secs(110),
                "{j:?}"
            );
        }
    }
}
