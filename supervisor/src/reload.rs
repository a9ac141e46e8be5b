//! The reload path: package → verified object in the store → loaded and
//! initialised → swapped into the slot → recorded.
//!
//! Everything that reads many bytes (manifest checks, hash-while-copy)
//! happens before the reload window opens; inside the window there is only
//! `dlopen`, the descriptor checks, `init` and one pointer swap. Every
//! refusal leaves the previous version serving and is said once: in the
//! log (plugin, file, reason), the journal, and
//! `plugvisor_reloads_total{outcome}`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::catalog::{self, CatalogError, Package};
use crate::loader::{self, LoadError, LoadedVersion};
use crate::markers::ReloadWindow;
use crate::metrics::{Metrics, Phase, ReloadOutcome};
use crate::probes::observer::PluginNames;
use crate::slot::Slot;
use crate::store::{JournalEntry, Store, StoreError, VersionRef};

/// The `reason` of a rollback done at start because the process died
/// during a trial.
pub const CRASH_IN_TRIAL: &str = "crash-in-trial";

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
        "plugin {plugin:?}: version {version} was rolled back and is quarantined; publish a newer version"
    )]
    Quarantined {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
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
                | CatalogError::LibraryMissing { path, .. },
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
            ReloadError::Load(LoadError::InitFailed { .. })
            | ReloadError::VersionReused { .. }
            | ReloadError::Quarantined { .. } => package_dir.join(catalog::MANIFEST_FILE),
        }
    }
}

/// What one reload attempt did, as reported to the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The plugin.
    pub plugin: String,
    /// success | rejected | failed | unchanged.
    pub outcome: String,
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
        }
    }

    /// The slot of `plugin`, created empty if it has none yet.
    pub fn slot(&mut self, plugin: &str) -> Arc<Slot> {
        if let Some(s) = self.slots.get(plugin) {
            return s.clone();
        }
        let slot = Arc::new(Slot::new(plugin, self.keep_loaded, self.metrics.clone()));
        // Present at 0 from the start, so the first rollback is an increase
        // PromQL can see (a series born at 1 has no increase).
        for reason in [crate::actions::MANUAL, CRASH_IN_TRIAL] {
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

    /// Brings `plugin` up on the version its refs call active, straight from
    /// the store (used at start, before the packages are looked at).
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
        // Boot counting: a trial that never ended means the last process
        // died on it. Come up on the known-good version instead and keep
        // the one on trial out.
        if refs.trial_since_ms.is_some()
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
            let mut entry = JournalEntry::now(plugin, "rollback");
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
                    outcome: "success".into(),
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
        &self,
        plugin: &str,
        v: &VersionRef,
    ) -> Result<LoadedVersion, LoadError> {
        let object = self.store.object_path(&v.sha256);
        loader::load(
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
    #[expect(
        clippy::too_many_lines,
        reason = "the reload path reads top to bottom in the order it runs; its phases share the timings"
    )]
    pub fn reload(&mut self, plugin: &str, force: bool) -> ReloadReport {
        let t0 = Instant::now();
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
                outcome: "unknown".into(),
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
            outcome: String::new(),
            active_version: from_version.clone(),
            package_version: None,
            from_version: from_version.clone(),
            message: None,
            total_us: None,
            switch_us: None,
        };

        // Verify: manifest parsed, validated, library located.
        let package = match catalog::read_package(&self.plugins_dir, plugin) {
            Ok(p) => p,
            Err(e) => {
                // An unchanged bad manifest is reported once, not on every event.
                let fp = std::fs::read(package_dir.join(catalog::MANIFEST_FILE))
                    .map(|b| {
                        use sha2::Digest as _;
                        hex::encode(sha2::Sha256::digest(b))
                    })
                    .unwrap_or_default();
                if !force && self.fingerprints.get(plugin) == Some(&fp) {
                    report.outcome = "unchanged".into();
                    return report;
                }
                self.fingerprints.insert(plugin.to_owned(), fp);
                return self.refuse(report, &package_dir, &ReloadError::Catalog(e));
            }
        };
        report.package_version = Some(package.manifest.version.to_string());
        if !force && self.fingerprints.get(plugin) == Some(&package.fingerprint) {
            report.outcome = "unchanged".into();
            return report;
        }
        self.fingerprints
            .insert(plugin.to_owned(), package.fingerprint.clone());
        if let Some(active) = &from {
            if active.loaded.version() == &package.manifest.version {
                if active.loaded.sha256() == package.manifest.sha256 {
                    report.outcome = "unchanged".into();
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
        if package.manifest.abi != plugvisor_sdk::ABI_VERSION {
            let e = LoadError::ManifestAbi {
                plugin: plugin.to_owned(),
                path: package.manifest_path.clone(),
                declared: package.manifest.abi,
                expected: plugvisor_sdk::ABI_VERSION,
            };
            return self.refuse(report, &package_dir, &ReloadError::Load(e));
        }
        let candidate = VersionRef {
            version: package.manifest.version.clone(),
            sha256: package.manifest.sha256.clone(),
        };
        if self
            .store
            .refs(plugin)
            .is_ok_and(|r| r.is_quarantined(&candidate))
        {
            return self.refuse(
                report,
                &package_dir,
                &ReloadError::Quarantined {
                    plugin: plugin.to_owned(),
                    version: candidate.version.to_string(),
                },
            );
        }
        let verify = t0.elapsed();

        // Stage: hash while copying into the store — before the window opens.
        let t1 = Instant::now();
        let staged = match self
            .store
            .stage(plugin, &package.library_path, &package.manifest.sha256)
        {
            Ok(s) => s,
            Err(e) => return self.refuse(report, &package_dir, &ReloadError::Store(e)),
        };
        let stage = t1.elapsed();

        // The window: dlopen, checks, init, swap.
        self.seq += 1;
        let t2 = Instant::now();
        let mut window = ReloadWindow::open(self.plugin_index(plugin), self.seq);
        let (loaded, timings) = match loader::load(
            plugin,
            &package.manifest.version,
            package.manifest.abi,
            &staged.sha256,
            &staged.path,
        ) {
            Ok(l) => l,
            Err(e) => {
                window.set_outcome(1);
                drop(window);
                return self.refuse(report, &package_dir, &ReloadError::Load(e));
            }
        };
        let t_swap = Instant::now();
        slot.install(loaded);
        let switch = t_swap.elapsed();
        window.set_outcome(0);
        drop(window);
        let window_time = t2.elapsed();
        let total = t0.elapsed();

        for (phase, d) in [
            (Phase::Verify, verify),
            (Phase::Stage, stage),
            (Phase::Load, timings.load),
            (Phase::Init, timings.init),
            (Phase::Switch, switch),
            (Phase::Total, total),
        ] {
            self.observe(plugin, phase, d);
        }
        self.metrics
            .reloads_total
            .with_label_values(&[plugin, ReloadOutcome::Success.as_str()])
            .inc();
        let new_ref = VersionRef {
            version: package.manifest.version.clone(),
            sha256: staged.sha256.clone(),
        };
        if let Err(e) = self.record_activation(plugin, &new_ref, from_version.as_deref()) {
            // The new version serves; only the record of it failed. Say so loudly.
            tracing::error!(plugin, error = %e, "activated, but the store could not record it");
        }
        tracing::info!(
            plugin,
            from = from_version.as_deref().unwrap_or("-"),
            to = %package.manifest.version,
            total_us = total.as_micros() as u64,
            window_us = window_time.as_micros() as u64,
            "reloaded"
        );
        report.outcome = ReloadOutcome::Success.as_str().into();
        report.active_version = Some(package.manifest.version.to_string());
        report.total_us = Some(total.as_micros() as u64);
        report.switch_us = Some(window_time.as_micros() as u64);
        report
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
    ) -> Result<(), StoreError> {
        let mut refs = self.store.refs(plugin)?;
        refs.active = Some(new.clone());
        refs.history.push(new.clone());
        // On trial until `[reload] trial` passes with no rule firing.
        refs.trial_since_ms = Some(crate::store::now_ms());
        self.store.write_refs(plugin, &refs)?;
        let mut entry = JournalEntry::now(plugin, "activated");
        entry.version = Some(new.version.to_string());
        entry.from_version = from.map(str::to_owned);
        entry.sha256 = Some(new.sha256.clone());
        self.store.journal(&entry)
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
        let mut entry = JournalEntry::now(&report.plugin, outcome.as_str());
        entry.version.clone_from(&report.package_version);
        entry.from_version.clone_from(&report.active_version);
        entry.reason = Some(e.to_string());
        if let Err(je) = self.store.journal(&entry) {
            tracing::error!(plugin = %report.plugin, error = %je, "could not journal the refusal");
        }
        report.outcome = outcome.as_str().into();
        report.message = Some(e.to_string());
        report
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
