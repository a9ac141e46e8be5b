//! The reload path: package → verified object in the store → loaded and
//! initialised → swapped into the slot → recorded.
//!
//! A package is taken only if, in this order: the catalog accepts it
//! (permissions, manifest, library inside the package), it is not the
//! version already serving, its signature satisfies `[trust]`, it is not
//! lower than the highest version ever activated (unless a rollback names
//! it), its dependencies hold against the other active versions (`deps`),
//! and its library hashes to what the manifest pins.
//!
//! Everything that reads many bytes (manifest checks, hash-while-copy)
//! happens before the reload window opens; inside the window there is only
//! `dlopen`, the descriptor checks, `init` and one pointer swap. Every
//! refusal leaves the previous version serving and is said once: in the
//! log (plugin, file, reason), the journal, and
//! `plugvisor_reloads_total{outcome}`.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::catalog::{self, CatalogError, Manifest, Package};
use crate::dependencies::{self as deps, Conflict, ConflictKind};
use crate::failpoints::{CrashPoint, crash_point};
use crate::loader::{self, LoadError, LoadedVersion};
use crate::markers::PluginNames;
use crate::markers::ReloadWindow;
use crate::metrics::{Metrics, Phase, ReloadOutcome};
use crate::slot::Slot;
use crate::store::{JournalEntry, JournalEvent, Refs, Store, StoreError, VersionRef};
use crate::trust::{self, TrustError, TrustPolicy};

/// How long a signature that names another manifest (or does not parse)
/// is given for the commit to finish — the `.sig` is written first, then
/// the manifest renamed into place — before the pair is refused as it
/// stands.
pub const SIGNATURE_GRACE: Duration = Duration::from_secs(2);

/// The `reason` of a rollback done at start because the process died
/// during a trial.
pub const CRASH_IN_TRIAL: &str = "crash-in-trial";

/// The `reason` of an operator's own rollback.
pub const MANUAL: &str = "manual";

/// Journal event of a version whose `dlopen` or `init` killed the previous
/// process (see [`Reloader::recover_interrupted_loads`]).
pub const CRASH_IN_LOAD: &str = "crash-in-load";

/// Why a reload did not switch versions.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The package is unreadable or invalid.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The library failed verification or the store could not take it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The library could not be loaded or initialised.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// This version was rolled back from; a newer one is needed.
    #[error(
        "plugin {plugin:?}: version {version} is quarantined (rolled back from, its init timed out, or it crashed the process while loading); publish a newer version"
    )]
    Quarantined {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
    },
    /// The signature does not satisfy `[trust]`.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// Lower than the highest version ever activated, and no rollback names it.
    #[error(
        "plugin {plugin:?}: version {version} is lower than {highest}, the highest version activated; refused as a downgrade (only an explicit rollback may name a lower version)"
    )]
    Downgrade {
        /// The plugin.
        plugin: String,
        /// The package's version.
        version: String,
        /// The highest version activated.
        highest: String,
    },
    /// The switch would leave the active versions with a dependency conflict.
    #[error(
        "plugin {plugin:?} {version}: dependency conflict: {}",
        join_conflicts(conflicts)
    )]
    Dependencies {
        /// The plugin.
        plugin: String,
        /// The package's version.
        version: String,
        /// What blocks it.
        conflicts: Vec<Conflict>,
    },
    /// Same version as the active one, different bytes.
    #[error(
        "plugin {plugin:?}: version {version} is already active with sha256 {active}, the package has {package}; bump the version"
    )]
    VersionReused {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// Active object hash.
        active: String,
        /// Package library hash.
        package: String,
    },
}

fn join_conflicts(conflicts: &[Conflict]) -> String {
    conflicts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ReloadError {
    /// `rejected` for bad input, `failed` for a good package that did not start.
    pub fn outcome(&self) -> ReloadOutcome {
        match self {
            ReloadError::Store(StoreError::Io { .. }) => ReloadOutcome::Failed,
            ReloadError::Load(e) if !e.is_rejection() => ReloadOutcome::Failed,
            _ => ReloadOutcome::Rejected,
        }
    }

    /// The file most relevant to the error, for the log line.
    fn file(&self, package_dir: &Path) -> PathBuf {
        match self {
            ReloadError::Catalog(
                CatalogError::ManifestSyntax { path, .. }
                | CatalogError::ManifestInvalid { path, .. }
                | CatalogError::NameMismatch { path, .. }
                | CatalogError::LibraryEscapes { path, .. }
                | CatalogError::ManifestTooLarge { path, .. }
                | CatalogError::NoPackage { path, .. }
                | CatalogError::Read { path, .. }
                | CatalogError::LibraryMissing { path, .. }
                | CatalogError::Unsafe(catalog::UnsafePath { path, .. }),
            )
            | ReloadError::Trust(
                TrustError::Io { path, .. }
                | TrustError::BadKeyFile { path, .. }
                | TrustError::SecretKeyExposed { path, .. }
                | TrustError::KeyExists { path }
                | TrustError::Unsigned { path, .. }
                | TrustError::MalformedSignature { path, .. }
                | TrustError::BadSignature { path, .. },
            )
            | ReloadError::Store(
                StoreError::ChecksumMismatch { library: path, .. }
                | StoreError::Io { path, .. }
                | StoreError::CorruptRefs { path, .. },
            )
            | ReloadError::Load(
                LoadError::Open { path, .. }
                | LoadError::NoDescriptor { path, .. }
                | LoadError::AbiMismatch { path, .. }
                | LoadError::ManifestAbi { path, .. }
                | LoadError::IdentityMismatch { path, .. },
            ) => path.clone(),
            ReloadError::Load(
                LoadError::InitFailed { .. }
                | LoadError::InitTimeout { .. }
                | LoadError::TooManyStuckInits { .. },
            )
            | ReloadError::VersionReused { .. }
            | ReloadError::Quarantined { .. }
            | ReloadError::Downgrade { .. }
            | ReloadError::Dependencies { .. } => package_dir.join(catalog::MANIFEST_FILE),
        }
    }
}

/// What one reload attempt came to, as the admin socket, `plugvisor
/// reload` and the logs name it (`as_str`, and the same lowercase word in
/// JSON). The first three are also `plugvisor_reloads_total{outcome}`
/// ([`ReloadOutcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttemptOutcome {
    /// The new version serves.
    Success,
    /// The package was refused; the previous version serves on.
    Rejected,
    /// The package looked right but loading it failed.
    Failed,
    /// Nothing to do: the package is what was already acted on.
    Unchanged,
    /// The signature belongs to a commit still in progress; looked at
    /// again after [`SIGNATURE_GRACE`].
    Deferred,
    /// No such plugin: neither configured nor packaged.
    Unknown,
}

impl AttemptOutcome {
    /// The word for it.
    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Success => "success",
            AttemptOutcome::Rejected => "rejected",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Unchanged => "unchanged",
            AttemptOutcome::Deferred => "deferred",
            AttemptOutcome::Unknown => "unknown",
        }
    }
}

impl From<ReloadOutcome> for AttemptOutcome {
    fn from(o: ReloadOutcome) -> AttemptOutcome {
        match o {
            ReloadOutcome::Success => AttemptOutcome::Success,
            ReloadOutcome::Rejected => AttemptOutcome::Rejected,
            ReloadOutcome::Failed => AttemptOutcome::Failed,
        }
    }
}

/// What one reload attempt did, as reported to the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The plugin.
    pub plugin: String,
    /// What the attempt came to.
    pub outcome: AttemptOutcome,
    /// Version now serving (after the attempt).
    pub active_version: Option<String>,
    /// Version the package offered.
    pub package_version: Option<String>,
    /// Version serving before.
    pub from_version: Option<String>,
    /// Why, when not a success.
    pub message: Option<String>,
    /// Microseconds from manifest read to new version serving.
    pub total_us: Option<u64>,
    /// Microseconds of the switch itself (dlopen, checks, init, swap).
    pub switch_us: Option<u64>,
}

/// How one reload attempt may deviate from the defaults.
#[derive(Debug, Clone, Default)]
pub struct ReloadOptions {
    /// Re-process the manifest even if its bytes were seen before.
    pub force: bool,
    /// Accept the package if it is this version, even if it is lower than
    /// the highest version ever activated (an explicit rollback).
    pub allow_downgrade_to: Option<Version>,
}

/// A dependency conflict as `plugvisor status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandingConflict {
    /// The plugin the conflict holds back or concerns.
    pub plugin: String,
    /// Its kind.
    pub kind: ConflictKind,
    /// In words, with what serves meanwhile.
    pub message: String,
}

/// A package that waits on other plugins: its version and what blocks it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Blocked {
    version: Version,
    conflicts: Vec<Conflict>,
}

impl Blocked {
    /// The same package blocked by the same conflicts (plugin, kind and
    /// other plugin), whatever their wording.
    fn same_as(&self, other: &Blocked) -> bool {
        self.version == other.version
            && self.conflicts.len() == other.conflicts.len()
            && self
                .conflicts
                .iter()
                .zip(&other.conflicts)
                .all(|(a, b)| a.key() == b.key())
    }
}

/// Owns the slots and the store; all version changes go through here.
pub struct Reloader {
    plugins_dir: PathBuf,
    store: Store,
    metrics: Arc<Metrics>,
    keep_loaded: usize,
    slots: HashMap<String, Arc<Slot>>,
    plugin_names: PluginNames,
    // Manifest bytes' hash last acted on, per plugin: an unchanged manifest
    // is not re-processed on a watcher event.
    fingerprints: HashMap<String, String>,
    seq: u64,
    trust: TrustPolicy,
    // Packages refused for dependency conflicts: tried again whenever
    // another plugin switches, since that may unblock them.
    blocked: BTreeMap<String, Blocked>,
    // Conflicts among the active versions, as last resolved.
    standing: Vec<Conflict>,
    // (plugin, kind) series of dependency_conflicts now at 1.
    conflict_series: BTreeSet<(String, ConflictKind)>,
    // Dependency declarations of loaded objects, by sha256.
    nodes: HashMap<String, deps::Node>,
    // Packages whose signature names another manifest: the fingerprint
    // and when that was first seen (see SIGNATURE_GRACE).
    deferred: HashMap<String, (String, Instant)>,
    // `[reload] init_timeout`.
    init_timeout: Duration,
}

impl Reloader {
    /// A reloader over `plugins_dir` and `store`.
    pub fn new(
        plugins_dir: PathBuf,
        store: Store,
        metrics: Arc<Metrics>,
        keep_loaded: usize,
        plugin_names: PluginNames,
    ) -> Reloader {
        Reloader {
            plugins_dir,
            store,
            metrics,
            keep_loaded,
            slots: HashMap::new(),
            plugin_names,
            fingerprints: HashMap::new(),
            seq: 0,
            trust: TrustPolicy::default(),
            blocked: BTreeMap::new(),
            standing: Vec::new(),
            conflict_series: BTreeSet::new(),
            nodes: HashMap::new(),
            deferred: HashMap::new(),
            init_timeout: crate::config::DEFAULT_INIT_TIMEOUT,
        }
    }

    /// Sets how long a plugin's `init` may run (`[reload] init_timeout`).
    pub fn set_init_timeout(&mut self, timeout: Duration) {
        self.init_timeout = timeout;
    }

    /// Loads `object` as `version` of `plugin` with `init` bounded by
    /// `[reload] init_timeout`, counting an init that overran or was not
    /// made because too many are stuck.
    fn load_object(
        &mut self,
        plugin: &str,
        version: &Version,
        abi: u32,
        sha256: &str,
        object: &Path,
    ) -> Result<(LoadedVersion, loader::LoadTimings), LoadError> {
        let slot = self.slot(plugin);
        let result = loader::load(
            plugin,
            version,
            abi,
            sha256,
            object,
            &slot.init_bound(self.init_timeout),
        );
        match &result {
            Err(LoadError::InitTimeout { .. }) => slot.count_init_trouble(false),
            Err(LoadError::TooManyStuckInits { .. }) => slot.count_init_trouble(true),
            _ => {}
        }
        result
    }

    /// Sets the signature policy (`[trust]`); the default accepts unsigned
    /// packages and ignores signatures.
    pub fn set_trust(&mut self, policy: TrustPolicy) {
        self.trust = policy;
    }

    /// The slot of `plugin`, created empty if it has none yet.
    pub fn slot(&mut self, plugin: &str) -> Arc<Slot> {
        if let Some(s) = self.slots.get(plugin) {
            return s.clone();
        }
        let slot = Arc::new(Slot::new(plugin, self.keep_loaded, self.metrics.clone()));
        // Present at 0 from the start, so the first rollback is an increase
        // PromQL can see (a series born at 1 has no increase).
        for reason in [MANUAL, CRASH_IN_TRIAL] {
            self.metrics
                .rollbacks_total
                .with_label_values(&[plugin, reason]);
        }
        self.slots.insert(plugin.to_owned(), slot.clone());
        // Present from the start: a counter series born at 1 on its first
        // rejection is invisible to `increase()`, so an alert on it would
        // miss exactly the first one.
        for outcome in ReloadOutcome::ALL {
            self.metrics
                .reloads_total
                .with_label_values(&[plugin, outcome.as_str()]);
        }
        let mut names = self.plugin_names.write().expect("plugin names");
        if !names.iter().any(|n| n == plugin) {
            names.push(plugin.to_owned());
        }
        slot
    }

    /// Every slot, by plugin name.
    pub fn slots(&self) -> &HashMap<String, Arc<Slot>> {
        &self.slots
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn plugin_index(&self, plugin: &str) -> u32 {
        self.plugin_names
            .read()
            .expect("plugin names")
            .iter()
            .position(|n| n == plugin)
            .unwrap_or(usize::MAX) as u32
    }

    /// Removes from the store every object that no refs name and no slot
    /// has mapped: libraries refused after they were staged, and versions
    /// that fell out of every plugin's bounded history. Each removal is
    /// journalled (`collected`) before the file goes, so the journal never
    /// names an object that vanished unannounced. Runs under the reloader's
    /// lock, after a rescan: no reload is staging meanwhile.
    ///
    /// The dependency declarations cached per object are pruned to the
    /// mapped versions here too: without that the cache grew by one entry
    /// per reload for the life of the process (an unmapped version's
    /// declaration is read again from its kept manifest if it returns).
    pub fn collect_garbage(&mut self) {
        let mapped: HashSet<String> = self
            .slots
            .values()
            .flat_map(|slot| slot.mapped_hashes())
            .collect();
        self.nodes.retain(|sha, _| mapped.contains(sha));
        let mut keep: HashSet<String> = HashSet::new();
        for plugin in self.store.plugins_with_refs() {
            let Ok(refs) = self.store.refs(&plugin) else {
                // Unreadable refs: keep everything rather than guess.
                return;
            };
            keep.extend(
                refs.active
                    .iter()
                    .chain(refs.known_good.iter())
                    .chain(refs.history.iter())
                    .chain(refs.quarantined.iter())
                    .map(|r| r.sha256.clone()),
            );
        }
        keep.extend(mapped);
        for sha in self.store.object_hashes() {
            if keep.contains(&sha) {
                continue;
            }
            let plugin = self
                .store
                .manifest(&sha)
                .and_then(|m| String::from_utf8(m).ok())
                .and_then(|m| m.parse::<toml::Table>().ok())
                .and_then(|t| t.get("name")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| "unknown".to_owned());
            let mut entry = JournalEntry::now(&plugin, JournalEvent::Collected);
            entry.sha256 = Some(sha.clone());
            entry.reason = Some("no refs name it and no slot maps it".to_owned());
            let removed = self
                .store
                .journal(&entry)
                .and_then(|()| self.store.remove_object(&sha));
            match removed {
                Ok(()) => {
                    tracing::debug!(plugin, sha256 = %sha, "removed an unreferenced object from the store");
                }
                Err(e) => {
                    tracing::warn!(plugin, sha256 = %sha, error = %e, "could not remove an unreferenced object");
                    return;
                }
            }
        }
    }

    /// Marks every trial still running as interrupted by a clean stop (see
    /// [`Refs::trial_interrupted`]); called once the listeners have
    /// drained, just before the process exits.
    pub fn interrupt_trials(&self) {
        let plugins: Vec<String> = self.slots.keys().cloned().collect();
        for plugin in plugins {
            let Ok(mut refs) = self.store.refs(&plugin) else {
                continue;
            };
            if refs.trial_since_ms.is_none() || refs.trial_interrupted {
                continue;
            }
            refs.trial_interrupted = true;
            let mut entry = JournalEntry::now(&plugin, JournalEvent::TrialInterrupted);
            entry.version = refs.active.as_ref().map(|a| a.version.to_string());
            entry.reason = Some("clean stop during the trial".to_owned());
            match self
                .store
                .write_refs(&plugin, &refs)
                .and_then(|()| self.store.journal(&entry))
            {
                Ok(()) => tracing::info!(
                    plugin,
                    version = entry.version.as_deref().unwrap_or("-"),
                    "stopping during a trial: the next start resumes it"
                ),
                Err(e) => tracing::error!(
                    plugin,
                    error = %e,
                    "could not record the interrupted trial; the next start will count it as a crash"
                ),
            }
        }
    }

    /// The last process stopped cleanly during `active`'s trial: that says
    /// nothing against the version, so its trial starts over. Returns the
    /// start's message.
    fn resume_interrupted_trial(
        &self,
        plugin: &str,
        refs: &mut Refs,
        active: &VersionRef,
    ) -> String {
        tracing::info!(
            plugin,
            version = %active.version,
            "plugvisor stopped cleanly while {} was on trial; its trial starts over",
            active.version
        );
        refs.trial_interrupted = false;
        if refs.trial_since_ms.is_some() {
            refs.trial_since_ms = Some(crate::store::now_ms());
        }
        let mut entry = JournalEntry::now(plugin, JournalEvent::TrialResumed);
        entry.version = Some(active.version.to_string());
        entry.sha256 = Some(active.sha256.clone());
        entry.reason = Some("clean stop during the trial".to_owned());
        if let Err(e) = self
            .store
            .write_refs(plugin, refs)
            .and_then(|()| self.store.journal(&entry))
        {
            // Unrecorded, a later crash would read as a crash in this
            // trial, which is what it would be.
            tracing::error!(plugin, error = %e, "could not record the resumed trial");
        }
        format!(
            "started from the store; the trial of {} starts over",
            active.version
        )
    }

    /// Quarantines every version whose `dlopen` or `init` the previous
    /// process never returned from — it died in the plugin's constructors
    /// or `init` (a segfault, an abort), before any refs named the version
    /// — so the rescan that follows does not load it again and crash again:
    /// without this a plugin that crashes in `init` is a crash loop under
    /// any supervisor that restarts plugvisor. Journalled as
    /// `crash-in-load`; a newer version of the plugin loads as usual. Runs
    /// at start, before the packages are looked at.
    pub fn recover_interrupted_loads(&mut self) {
        for (plugin, version) in self.store.interrupted_loads() {
            if let Some(v) = version {
                tracing::error!(
                    plugin,
                    version = %v.version,
                    sha256 = %v.sha256,
                    "the previous process died while loading {} {} (dlopen or init); quarantined until a newer version appears ({CRASH_IN_LOAD})",
                    plugin,
                    v.version
                );
                self.quarantine(&plugin, &v);
                let mut entry = JournalEntry::now(&plugin, JournalEvent::CrashInLoad);
                entry.version = Some(v.version.to_string());
                entry.sha256 = Some(v.sha256.clone());
                entry.reason = Some(
                    "the previous process died inside this version's dlopen or init; quarantined"
                        .to_owned(),
                );
                if let Err(e) = self.store.journal(&entry) {
                    tracing::error!(plugin, error = %e, "could not journal the crash in load");
                }
                self.metrics
                    .reloads_total
                    .with_label_values(&[&plugin, ReloadOutcome::Failed.as_str()])
                    .inc();
            }
            if let Err(e) = self.store.clear_loading(&plugin) {
                tracing::warn!(plugin, error = %e, "could not clear the load mark");
            }
        }
    }

    /// Brings `plugin` up on the version its refs call active, straight from
    /// the store (used at start, before the packages are looked at).
    ///
    /// Boot counting: a trial that never ended, and was not interrupted by
    /// a clean stop, means the last process died on it. It comes up on the
    /// known-good version instead and keeps the one on trial out.
    pub fn boot_from_store(&mut self, plugin: &str) -> Option<ReloadReport> {
        let mut refs = match self.store.refs(plugin) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(plugin, error = %e, "cannot read refs; starting from the package instead");
                return None;
            }
        };
        let mut active = refs.active.clone()?;
        let mut message = "started from the store".to_owned();
        if refs.trial_interrupted {
            message = self.resume_interrupted_trial(plugin, &mut refs, &active);
        } else if refs.trial_since_ms.is_some()
            && let Some(good) = refs.known_good.clone()
            && good != active
        {
            tracing::error!(
                plugin,
                crashed = %active.version,
                known_good = %good.version,
                "the previous process died while {} was on trial; starting on the known-good {} (crash-in-trial)",
                active.version,
                good.version
            );
            refs.quarantined.push(active.clone());
            refs.active = Some(good.clone());
            refs.trial_since_ms = None;
            let mut entry = JournalEntry::now(plugin, JournalEvent::Rollback);
            entry.version = Some(good.version.to_string());
            entry.from_version = Some(active.version.to_string());
            entry.sha256 = Some(good.sha256.clone());
            entry.reason = Some(CRASH_IN_TRIAL.to_owned());
            if let Err(e) = self
                .store
                .write_refs(plugin, &refs)
                .and_then(|()| self.store.journal(&entry))
            {
                tracing::error!(plugin, error = %e, "could not record the crash-in-trial rollback");
            }
            self.metrics
                .rollbacks_total
                .with_label_values(&[plugin, CRASH_IN_TRIAL])
                .inc();
            message = format!(
                "crash-in-trial: started on known-good {} instead of {}",
                good.version, active.version
            );
            active = good;
        }
        let slot = self.slot(plugin);
        match self.load_from_store(plugin, &active) {
            Ok(loaded) => {
                slot.install(loaded);
                slot.pin(refs.known_good.as_ref().map(|k| k.version.clone()));
                if let Some(good) = refs.known_good.as_ref().filter(|g| **g != active) {
                    // Keep the known-good version mapped too, so a rollback
                    // to it is a pointer swap from the first minute.
                    match self.load_from_store(plugin, good) {
                        Ok(l) => {
                            slot.install(l);
                            let _ = slot.switch_to_mapped(&active.version);
                        }
                        Err(e) => {
                            tracing::warn!(plugin, error = %e, "known-good version does not load");
                        }
                    }
                }
                tracing::info!(plugin, version = %active.version, "{message}");
                Some(ReloadReport {
                    plugin: plugin.to_owned(),
                    outcome: AttemptOutcome::Success,
                    active_version: Some(active.version.to_string()),
                    package_version: None,
                    from_version: None,
                    message: Some(message),
                    total_us: None,
                    switch_us: None,
                })
            }
            Err(e) => {
                tracing::error!(plugin, error = %e, "active version in the store does not load");
                None
            }
        }
    }

    /// Loads a version straight from its object in the store.
    pub fn load_from_store(
        &mut self,
        plugin: &str,
        v: &VersionRef,
    ) -> Result<LoadedVersion, LoadError> {
        let object = self.store.object_path(&v.sha256);
        self.load_object(
            plugin,
            &v.version,
            plugvisor_sdk::ABI_VERSION,
            &v.sha256,
            &object,
        )
        .map(|(l, _)| l)
    }

    /// Opens a reload window for `plugin` (the kernel attributes what
    /// happens until it is dropped to this switch).
    pub fn window(&mut self, plugin: &str) -> ReloadWindow {
        self.seq += 1;
        ReloadWindow::open(self.plugin_index(plugin), self.seq)
    }

    /// Looks at the package of `plugin` and switches to it if it is new.
    /// `force` re-processes a manifest even if its bytes were seen before.
    pub fn reload(&mut self, plugin: &str, force: bool) -> ReloadReport {
        self.reload_with(
            plugin,
            &ReloadOptions {
                force,
                allow_downgrade_to: None,
            },
        )
    }

    /// The hook for an explicit rollback to a package in `plugins_dir`:
    /// like [`Reloader::reload`] with `force`, but a package of exactly
    /// `version` is accepted even if it is lower than the highest version
    /// ever activated. The highest-activated mark stays where it was, so
    /// any *other* lower version is still refused afterwards; the journal
    /// entry says the downgrade was explicit.
    pub fn reload_allowing_downgrade(&mut self, plugin: &str, version: &Version) -> ReloadReport {
        self.reload_with(
            plugin,
            &ReloadOptions {
                force: true,
                allow_downgrade_to: Some(version.clone()),
            },
        )
    }

    /// One reload attempt with `options`. After a switch, packages that
    /// were waiting on other plugins are tried again, and the dependency
    /// conflicts (metric, status) are resolved anew.
    pub fn reload_with(&mut self, plugin: &str, options: &ReloadOptions) -> ReloadReport {
        let report = self.attempt(plugin, options, false);
        if report.outcome == AttemptOutcome::Success {
            self.retry_blocked();
        }
        self.refresh_dependency_conflicts();
        report
    }

    /// Tries every package that waits on other plugins again, until a
    /// pass switches none (each switch may unblock another).
    fn retry_blocked(&mut self) {
        loop {
            let waiting: Vec<String> = self.blocked.keys().cloned().collect();
            let mut switched = false;
            for plugin in waiting {
                let options = ReloadOptions {
                    force: true,
                    allow_downgrade_to: None,
                };
                let report = self.attempt(&plugin, &options, true);
                switched |= report.outcome == AttemptOutcome::Success;
            }
            if !switched {
                return;
            }
        }
    }

    /// The attempt itself; `retry` marks a re-try of a blocked package,
    /// which stays quiet if it is still blocked by exactly the same
    /// conflicts (it was already reported once).
    #[expect(
        clippy::too_many_lines,
        reason = "the reload path reads top to bottom in the order it runs; its phases share the timings"
    )]
    fn attempt(&mut self, plugin: &str, options: &ReloadOptions, retry: bool) -> ReloadReport {
        let t0 = Instant::now();
        let force = options.force;
        let package_dir = self.plugins_dir.join(plugin);
        if !self.slots.contains_key(plugin) && !package_dir.join(catalog::MANIFEST_FILE).exists() {
            // Neither configured nor packaged: a typo, not a plugin. No slot,
            // no series, no journal entry.
            let e = CatalogError::NoPackage {
                plugin: plugin.to_owned(),
                path: package_dir.join(catalog::MANIFEST_FILE),
            };
            return ReloadReport {
                plugin: plugin.to_owned(),
                outcome: AttemptOutcome::Unknown,
                active_version: None,
                package_version: None,
                from_version: None,
                message: Some(e.to_string()),
                total_us: None,
                switch_us: None,
            };
        }
        let slot = self.slot(plugin);
        let from = slot.active();
        let from_version = from.as_ref().map(|a| a.version().to_owned());
        let mut report = ReloadReport {
            plugin: plugin.to_owned(),
            // Every path out of the attempt sets it.
            outcome: AttemptOutcome::Unknown,
            active_version: from_version.clone(),
            package_version: None,
            from_version: from_version.clone(),
            message: None,
            total_us: None,
            switch_us: None,
        };

        // Verify: permissions, manifest parsed and validated, library located.
        let package = match catalog::read_package(&self.plugins_dir, plugin) {
            Ok(p) => p,
            Err(e) => {
                // An unchanged bad package is reported once, not on every
                // event. The reason is part of what was seen: fixing the
                // permissions leaves the bytes alone but is a change.
                let fp = std::fs::read(package_dir.join(catalog::MANIFEST_FILE))
                    .map(|b| {
                        use sha2::Digest as _;
                        hex::encode(sha2::Sha256::digest(b))
                    })
                    .unwrap_or_default();
                let fp = format!("{fp}!{e}");
                if !force && self.fingerprints.get(plugin) == Some(&fp) {
                    report.outcome = AttemptOutcome::Unchanged;
                    return report;
                }
                self.fingerprints.insert(plugin.to_owned(), fp);
                self.blocked.remove(plugin);
                return self.refuse(report, &package_dir, &ReloadError::Catalog(e));
            }
        };
        report.package_version = Some(package.manifest.version.to_string());
        if !force && self.fingerprints.get(plugin) == Some(&package.fingerprint) {
            report.outcome = AttemptOutcome::Unchanged;
            return report;
        }
        if let Some(active) = &from {
            if active.loaded.version() == &package.manifest.version {
                self.fingerprints
                    .insert(plugin.to_owned(), package.fingerprint.clone());
                self.blocked.remove(plugin);
                self.deferred.remove(plugin);
                if active.loaded.sha256() == package.manifest.sha256 {
                    // Also the case of a `.sig` written for a manifest that
                    // is not renamed into place yet: nothing to do until it is.
                    report.outcome = AttemptOutcome::Unchanged;
                    return report;
                }
                let e = ReloadError::VersionReused {
                    plugin: plugin.to_owned(),
                    version: package.manifest.version.to_string(),
                    active: active.loaded.sha256().to_owned(),
                    package: package.manifest.sha256.clone(),
                };
                return self.refuse(report, &package_dir, &e);
            }
        }

        // Signature: the manifest's exact bytes under a trusted key.
        let verdict = match self.trust.check(
            plugin,
            &package.manifest_path,
            &package.manifest_bytes,
            package.signature.as_deref(),
        ) {
            Ok(v) => v,
            Err(e) => {
                let in_progress = package
                    .signature
                    .as_deref()
                    .is_some_and(|sig| trust::may_be_in_progress(&package.manifest_bytes, sig));
                if in_progress {
                    if let Some(r) = self.defer(plugin, &package, &mut report, &e) {
                        return r;
                    }
                }
                self.fingerprints
                    .insert(plugin.to_owned(), package.fingerprint.clone());
                self.blocked.remove(plugin);
                return self.refuse(report, &package_dir, &ReloadError::Trust(e));
            }
        };
        self.deferred.remove(plugin);
        self.fingerprints
            .insert(plugin.to_owned(), package.fingerprint.clone());

        // Anti-downgrade: never below the highest version ever activated,
        // unless a rollback names this very version.
        let refs = match self.store.refs(plugin) {
            Ok(r) => r,
            Err(e) => return self.refuse(report, &package_dir, &ReloadError::Store(e)),
        };
        let mut downgrade_from = None;
        if let Some(highest) = refs.downgrade_below(&package.manifest.version) {
            if options.allow_downgrade_to.as_ref() != Some(&package.manifest.version) {
                self.blocked.remove(plugin);
                let e = ReloadError::Downgrade {
                    plugin: plugin.to_owned(),
                    version: package.manifest.version.to_string(),
                    highest: highest.to_string(),
                };
                return self.refuse(report, &package_dir, &e);
            }
            downgrade_from = Some(highest.clone());
        }
        let candidate_ref = VersionRef {
            version: package.manifest.version.clone(),
            sha256: package.manifest.sha256.clone(),
        };
        if self
            .store
            .refs(plugin)
            .is_ok_and(|r| r.is_quarantined(&candidate_ref))
        {
            return self.refuse(
                report,
                &package_dir,
                &ReloadError::Quarantined {
                    plugin: plugin.to_owned(),
                    version: candidate_ref.version.to_string(),
                },
            );
        }

        // Dependencies and ABI, against the other active versions.
        let candidate = node_of(&package.manifest);
        let current = self.active_set();
        let conflicts = deps::check_switch(
            &current,
            plugin,
            candidate.clone(),
            plugvisor_sdk::ABI_VERSION,
        );
        if !conflicts.is_empty() {
            let blocked = Blocked {
                version: package.manifest.version.clone(),
                conflicts: conflicts.clone(),
            };
            if retry
                && self
                    .blocked
                    .get(plugin)
                    .is_some_and(|b| b.same_as(&blocked))
            {
                // Still blocked by the same conflicts (the wording may name
                // another version of the other plugin): already said once.
                self.blocked.insert(plugin.to_owned(), blocked);
                report.outcome = AttemptOutcome::Rejected;
                return report;
            }
            self.blocked.insert(plugin.to_owned(), blocked);
            let e = ReloadError::Dependencies {
                plugin: plugin.to_owned(),
                version: package.manifest.version.to_string(),
                conflicts,
            };
            return self.refuse(report, &package_dir, &e);
        }
        self.blocked.remove(plugin);
        let verify = t0.elapsed();
        let version_key = package.manifest.version.to_string();
        crash_point(CrashPoint::ReloadAfterVerify, &version_key);

        // Stage: hash while copying into the store — before the window
        // opens. Flushing it to disk waits until after the switch (see
        // `Store::stage`).
        let t1 = Instant::now();
        let staged = match self
            .store
            .stage(plugin, &package.library_path, &package.manifest.sha256)
        {
            Ok(s) => s,
            Err(e) => return self.refuse(report, &package_dir, &ReloadError::Store(e)),
        };
        let stage = t1.elapsed();
        crash_point(CrashPoint::ReloadAfterStage, &version_key);

        // Foreign code runs from dlopen until load_object returns: if it
        // kills the process, this mark tells the next start which version
        // did (see `recover_interrupted_loads`). Written before the window
        // opens, so the kernel's reload window holds only the switch.
        if let Err(e) = self.store.mark_loading(plugin, &candidate_ref) {
            tracing::warn!(plugin, error = %e, "could not mark the load; a crash in it would be retried on restart");
        }

        // The window: dlopen, checks, init, swap.
        self.seq += 1;
        let t2 = Instant::now();
        let mut window = ReloadWindow::open(self.plugin_index(plugin), self.seq);
        let result = self.load_object(
            plugin,
            &package.manifest.version,
            package.manifest.abi,
            &staged.sha256,
            &staged.path,
        );
        if let Err(e) = self.store.clear_loading(plugin) {
            tracing::warn!(plugin, error = %e, "could not clear the load mark");
        }
        let (loaded, timings) = match result {
            Ok(l) => l,
            Err(e) => {
                window.set_outcome(1);
                drop(window);
                if matches!(e, LoadError::InitTimeout { .. }) {
                    // Trying it again would only strand another thread.
                    self.quarantine(plugin, &candidate_ref);
                }
                return self.refuse(report, &package_dir, &ReloadError::Load(e));
            }
        };
        crash_point(CrashPoint::ReloadAfterInit, &version_key);
        let t_install = Instant::now();
        let (previous, switch, serving) = slot.install_timed(loaded);
        let publish = t_install.elapsed().saturating_sub(switch);
        window.set_outcome(0);
        drop(window);
        let window_time = t2.elapsed();
        // Manifest read → new version serving: up to the swap, not the
        // bookkeeping and the end marker after it.
        let total = serving - t0;
        self.nodes.insert(staged.sha256.clone(), candidate);

        let phases = [
            (Phase::Verify, verify),
            (Phase::Stage, stage),
            (Phase::Load, timings.load),
            (Phase::Init, timings.init),
            (Phase::Switch, switch),
            (Phase::Publish, publish),
            (Phase::Total, total),
        ];
        for (phase, d) in phases {
            self.observe(plugin, phase, d);
        }
        // The new version serves; now make it durable, before the refs
        // name it. Kept beside it: the manifest, so the version's
        // dependencies are known when it is started from the store or
        // switched back to.
        if let Err(e) = self.store.make_durable(&staged).and_then(|()| {
            self.store
                .save_manifest(&staged.sha256, &package.manifest_bytes)
        }) {
            // A version the store cannot keep is one a restart could not
            // come back to: serve what served before (still mapped, a
            // pointer swap) and refuse the reload with the store's reason.
            if let Some(previous) = previous {
                slot.switch_to_mapped(previous.loaded.version());
                return self.refuse(report, &package_dir, &ReloadError::Store(e));
            }
            tracing::error!(plugin, error = %e, "activated, but the store could not keep the object or its manifest");
        }
        self.metrics
            .reloads_total
            .with_label_values(&[plugin, ReloadOutcome::Success.as_str()])
            .inc();
        let new_ref = VersionRef {
            version: package.manifest.version.clone(),
            sha256: staged.sha256.clone(),
        };
        let why = downgrade_from.as_ref().map(|h| {
            format!(
                "explicit rollback to {} below the highest activated version {h}",
                package.manifest.version
            )
        });
        crash_point(CrashPoint::ReloadAfterSwitch, &version_key);
        if let Err(e) = self.record_activation(plugin, &new_ref, from_version.as_deref(), why) {
            // The new version serves; only the record of it failed. Say so loudly.
            tracing::error!(plugin, error = %e, "activated, but the store could not record it");
        }
        crash_point(CrashPoint::ReloadAfterJournal, &version_key);
        let signed_by = match &verdict {
            trust::Verdict::Signed { key_id } => key_id.as_str(),
            trust::Verdict::Unsigned => "unsigned",
            trust::Verdict::Unchecked => "unchecked",
        };
        tracing::info!(
            plugin,
            from = from_version.as_deref().unwrap_or("-"),
            to = %package.manifest.version,
            signed_by,
            total_us = total.as_micros() as u64,
            window_us = window_time.as_micros() as u64,
            seq = self.seq,
            verify_ns = phases[0].1.as_nanos() as u64,
            stage_ns = phases[1].1.as_nanos() as u64,
            load_ns = phases[2].1.as_nanos() as u64,
            init_ns = phases[3].1.as_nanos() as u64,
            switch_ns = phases[4].1.as_nanos() as u64,
            publish_ns = phases[5].1.as_nanos() as u64,
            total_ns = total.as_nanos() as u64,
            window_ns = window_time.as_nanos() as u64,
            // Everything the attempt did, the fsyncs after the switch too.
            attempt_ns = t0.elapsed().as_nanos() as u64,
            "reloaded"
        );
        report.outcome = AttemptOutcome::Success;
        report.active_version = Some(package.manifest.version.to_string());
        report.total_us = Some(total.as_micros() as u64);
        report.switch_us = Some(window_time.as_micros() as u64);
        report
    }

    /// A signature that names another manifest or does not parse: most
    /// likely a commit in progress (the `.sig` is written before the
    /// manifest is renamed into place, perhaps not atomically), so wait up
    /// to [`SIGNATURE_GRACE`] for the pair to settle. Returns the report to
    /// give while waiting, or `None` once the grace has run out for this
    /// very pair (then it is refused as it stands).
    fn defer(
        &mut self,
        plugin: &str,
        package: &Package,
        report: &mut ReloadReport,
        e: &TrustError,
    ) -> Option<ReloadReport> {
        match self.deferred.get(plugin) {
            Some((fp, since)) if *fp == package.fingerprint => {
                if since.elapsed() >= SIGNATURE_GRACE {
                    self.deferred.remove(plugin);
                    return None;
                }
            }
            _ => {
                tracing::info!(
                    plugin,
                    file = %package.manifest_path.with_file_name(trust::SIGNATURE_FILE).display(),
                    "the signature does not match this manifest yet (made for another, or incomplete); waiting {SIGNATURE_GRACE:?} for the commit to finish"
                );
                self.deferred.insert(
                    plugin.to_owned(),
                    (package.fingerprint.clone(), Instant::now()),
                );
            }
        }
        report.outcome = AttemptOutcome::Deferred;
        report.message = Some(e.to_string());
        Some(report.clone())
    }

    /// Dependency declarations of the active version of every plugin.
    fn active_set(&mut self) -> deps::Set {
        let mut set = deps::Set::new();
        let actives: Vec<(String, Arc<crate::slot::Installed>)> = self
            .slots
            .iter()
            .filter_map(|(name, slot)| slot.active().map(|a| (name.clone(), a)))
            .collect();
        for (name, active) in actives {
            let sha = active.loaded.sha256().to_owned();
            let node = if let Some(n) = self.nodes.get(&sha) {
                n.clone()
            } else {
                // Started from the store, or switched to by a rollback: the
                // manifest it was activated with is kept beside the object.
                let path = self.store.manifest_path(&sha);
                let node = self
                    .store
                    .manifest(&sha)
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|t| Manifest::parse(&t, &path).ok())
                    .map_or_else(
                        || {
                            deps::Node::standalone(
                                active.loaded.version().clone(),
                                plugvisor_sdk::ABI_VERSION,
                            )
                        },
                        |m| node_of(&m),
                    );
                self.nodes.insert(sha, node.clone());
                node
            };
            set.insert(name, node);
        }
        set
    }

    /// Resolves the dependencies of the active versions again and publishes
    /// `plugvisor_dependency_conflicts`: 1 for every (plugin, kind) that a
    /// standing conflict or a blocked package has, 0 for those that had one
    /// and no longer do. The reload path calls it after every attempt;
    /// anything else that changes an active version (a rollback that swaps
    /// to a mapped version) must call it too.
    pub fn refresh_dependency_conflicts(&mut self) {
        let set = self.active_set();
        self.standing = deps::resolve(&set, plugvisor_sdk::ABI_VERSION);
        let mut now: BTreeSet<(String, ConflictKind)> = self
            .standing
            .iter()
            .map(|c| (c.plugin.clone(), c.kind))
            .collect();
        for (plugin, b) in &self.blocked {
            now.extend(b.conflicts.iter().map(|c| (plugin.clone(), c.kind)));
        }
        let gauge = &self.metrics.dependency_conflicts;
        for (plugin, kind) in self.conflict_series.difference(&now) {
            gauge.with_label_values(&[plugin, kind.as_str()]).set(0);
        }
        for (plugin, kind) in &now {
            gauge.with_label_values(&[plugin, kind.as_str()]).set(1);
        }
        self.conflict_series = now;
    }

    /// The dependency conflicts that stand now, in words: packages that
    /// wait on other plugins, and conflicts among the active versions.
    pub fn dependency_conflicts(&self) -> Vec<StandingConflict> {
        let mut out = Vec::new();
        for (plugin, b) in &self.blocked {
            let serving = self
                .slots
                .get(plugin)
                .and_then(|s| s.active())
                .map_or_else(|| "nothing".to_owned(), |a| a.version().to_owned());
            for c in &b.conflicts {
                out.push(StandingConflict {
                    plugin: plugin.clone(),
                    kind: c.kind,
                    message: format!(
                        "package {} waits: {}; {serving} serves meanwhile",
                        b.version, c.message
                    ),
                });
            }
        }
        for c in &self.standing {
            out.push(StandingConflict {
                plugin: c.plugin.clone(),
                kind: c.kind,
                message: format!("active versions: {}", c.message),
            });
        }
        out
    }

    fn observe(&self, plugin: &str, phase: Phase, d: Duration) {
        self.metrics
            .reload_duration_seconds
            .with_label_values(&[plugin, phase.as_str()])
            .observe(d.as_secs_f64());
    }

    fn record_activation(
        &self,
        plugin: &str,
        new: &VersionRef,
        from: Option<&str>,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        let mut refs = self.store.refs(plugin)?;
        refs.record_activation(new);
        // On trial until `[reload] trial` passes with no rule firing.
        refs.trial_since_ms = Some(crate::store::now_ms());
        self.store.write_refs(plugin, &refs)?;
        crash_point(CrashPoint::ReloadAfterRefs, &new.version.to_string());
        let mut entry = JournalEntry::now(plugin, JournalEvent::Activated);
        entry.version = Some(new.version.to_string());
        entry.from_version = from.map(str::to_owned);
        entry.sha256 = Some(new.sha256.clone());
        entry.reason = reason;
        self.store.journal(&entry)
    }

    /// Keeps `v` of `plugin` out for good (a newer version is needed), as
    /// a rollback does to the version it leaves.
    fn quarantine(&self, plugin: &str, v: &VersionRef) {
        let result = self.store.refs(plugin).and_then(|mut refs| {
            if refs.is_quarantined(v) {
                return Ok(());
            }
            refs.quarantined.push(v.clone());
            self.store.write_refs(plugin, &refs)
        });
        if let Err(e) = result {
            tracing::error!(plugin, version = %v.version, error = %e, "could not record the quarantine");
        }
    }

    fn refuse(
        &self,
        mut report: ReloadReport,
        package_dir: &Path,
        e: &ReloadError,
    ) -> ReloadReport {
        let outcome = e.outcome();
        let file = e.file(package_dir);
        tracing::error!(
            plugin = %report.plugin,
            file = %file.display(),
            outcome = outcome.as_str(),
            serving = report.active_version.as_deref().unwrap_or("none"),
            "reload refused: {e}"
        );
        self.metrics
            .reloads_total
            .with_label_values(&[&report.plugin, outcome.as_str()])
            .inc();
        let mut entry = JournalEntry::now(
            &report.plugin,
            match outcome {
                ReloadOutcome::Success => JournalEvent::Activated,
                ReloadOutcome::Rejected => JournalEvent::Rejected,
                ReloadOutcome::Failed => JournalEvent::Failed,
            },
        );
        entry.version.clone_from(&report.package_version);
        entry.from_version.clone_from(&report.active_version);
        entry.reason = Some(e.to_string());
        if let Err(je) = self.store.journal(&entry) {
            tracing::error!(plugin = %report.plugin, error = %je, "could not journal the refusal");
        }
        report.outcome = outcome.into();
        report.message = Some(e.to_string());
        report
    }

    /// `plugins` reordered so that a plugin comes after the plugins its
    /// package requires (when both are in the list), otherwise keeping
    /// their order. A start or a rescan then takes `codec` before the
    /// `echo` that needs it, instead of refusing `echo` first and taking
    /// it on the retry. Unreadable packages and cycles keep their place.
    pub fn in_dependency_order(&self, plugins: &[String]) -> Vec<String> {
        fn visit(
            p: &str,
            requires: &HashMap<String, Vec<String>>,
            seen: &mut BTreeSet<String>,
            out: &mut Vec<String>,
        ) {
            if !seen.insert(p.to_owned()) {
                return;
            }
            for d in requires.get(p).into_iter().flatten() {
                if requires.contains_key(d) {
                    visit(d, requires, seen, out);
                }
            }
            out.push(p.to_owned());
        }
        let requires: HashMap<String, Vec<String>> = plugins
            .iter()
            .map(|p| {
                let deps = catalog::read_package(&self.plugins_dir, p)
                    .map(|pkg| pkg.manifest.requires.keys().cloned().collect())
                    .unwrap_or_default();
                (p.clone(), deps)
            })
            .collect();
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(plugins.len());
        for p in plugins {
            visit(p, &requires, &mut seen, &mut out);
        }
        out
    }

    /// Names of the packages present in `plugins_dir`.
    pub fn packages(&self) -> Vec<String> {
        match catalog::list(&self.plugins_dir) {
            Ok(names) => names,
            Err(e) => {
                tracing::error!(error = %e, "cannot list plugins_dir");
                Vec::new()
            }
        }
    }

    /// The package of `plugin` as the catalog reads it now.
    pub fn package(&self, plugin: &str) -> Result<Package, CatalogError> {
        catalog::read_package(&self.plugins_dir, plugin)
    }
}

/// What the resolver needs from a manifest.
fn node_of(m: &Manifest) -> deps::Node {
    deps::Node {
        version: m.version.clone(),
        abi: m.abi,
        requires: m.requires.clone(),
        conflicts: m.conflicts.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use super::*;
    use crate::seed::built_echo_library as echo_library;
    use crate::store::Refs;

    /// The hook an explicit rollback calls: only the version it names may
    /// go below the highest version ever activated, and the mark stays.
    #[test]
    fn a_lower_version_needs_an_explicit_rollback() {
        let t = tempfile::tempdir().unwrap();
        let plugins = t.path().join("plugins");
        let store = Store::open(&t.path().join("state")).unwrap();
        let highest = Version::new(99, 0, 0);
        // As if 99.0.0 had been active once.
        store
            .write_refs(
                "echo",
                &Refs {
                    highest_activated: Some(highest.clone()),
                    ..Refs::default()
                },
            )
            .unwrap();
        let version = Version::parse(plugvisor_echo::VERSION).unwrap();
        crate::seed::write_package(
            &plugins.join("echo"),
            "echo",
            plugvisor_echo::VERSION,
            plugvisor_sdk::ABI_VERSION,
            &echo_library(),
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut r = Reloader::new(
            plugins,
            store,
            metrics.clone(),
            2,
            Arc::new(RwLock::new(vec!["echo".to_owned()])),
        );

        let rep = r.reload("echo", false);
        assert_eq!(rep.outcome, AttemptOutcome::Rejected, "{rep:?}");
        assert!(
            rep.message.as_deref().unwrap().contains("downgrade"),
            "{rep:?}"
        );
        assert!(r.slot("echo").active().is_none());
        // A rollback that names another version does not open the door.
        let rep = r.reload_allowing_downgrade("echo", &Version::new(98, 0, 0));
        assert_eq!(rep.outcome, AttemptOutcome::Rejected, "{rep:?}");
        // The one it names does.
        let rep = r.reload_allowing_downgrade("echo", &version);
        assert_eq!(rep.outcome, AttemptOutcome::Success, "{rep:?}");
        assert_eq!(r.slot("echo").active().unwrap().loaded.version(), &version);
        let refs = r.store().refs("echo").unwrap();
        assert_eq!(refs.highest_activated, Some(highest), "the mark stays");
        assert_eq!(refs.active.unwrap().version, version);
        let journal = r.store().read_journal().unwrap();
        let last = journal.last().unwrap();
        assert_eq!(last.event, JournalEvent::Activated);
        assert!(
            last.reason
                .as_deref()
                .is_some_and(|w| w.contains("explicit rollback")),
            "{last:?}"
        );
        assert_eq!(
            metrics
                .reloads_total
                .with_label_values(&["echo", "rejected"])
                .get(),
            2
        );
    }

    #[test]
    fn packages_are_taken_in_dependency_order() {
        let t = tempfile::tempdir().unwrap();
        let plugins = t.path().join("plugins");
        let sha = "ab".repeat(32);
        for (name, requires) in [
            ("alpha", "zeta = \"*\"\n"),
            ("mid", "alpha = \"*\"\nnot-here = \"*\"\n"),
            ("zeta", ""),
            ("solo", ""),
        ] {
            let dir = plugins.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("lib.so"), b"x").unwrap();
            std::fs::write(
                dir.join(catalog::MANIFEST_FILE),
                format!(
                    "name = \"{name}\"\nversion = \"1.0.0\"\nlibrary = \"lib.so\"\nsha256 = \"{sha}\"\nabi = 1\n[requires]\n{requires}"
                ),
            )
            .unwrap();
        }
        let r = Reloader::new(
            plugins,
            Store::open(&t.path().join("state")).unwrap(),
            Arc::new(Metrics::new()),
            2,
            Arc::new(RwLock::new(Vec::new())),
        );
        let names = ["mid", "solo", "alpha", "zeta", "typo"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(
            r.in_dependency_order(&names),
            ["zeta", "alpha", "mid", "solo", "typo"]
                .map(str::to_owned)
                .to_vec()
        );
    }
}
