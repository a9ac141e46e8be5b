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
//!
//! Where each part lives: `attempt` (the path above, phase by phase),
//! `outcome` (refusal reasons, the outcome word, the report),
//! `recovery` (boot from the store, crash-in-load and crash-in-trial,
//! interrupted trials), `conflicts` (blocked packages, standing
//! conflicts, dependency order) and `gc` (store garbage collection).
//! This file holds the [`Reloader`] itself and the ways into it.

mod attempt;
mod conflicts;
mod gc;
mod outcome;
mod recovery;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use semver::Version;

use self::conflicts::Blocked;
pub use self::conflicts::StandingConflict;
pub use self::outcome::{
    AttemptOutcome, CRASH, CRASH_IN_LOAD, CRASH_IN_TRIAL, MANUAL, ReloadError, ReloadOptions,
    ReloadReport, SIGNATURE_GRACE,
};
use crate::catalog::{self, CatalogError, Package};
use crate::dependencies::{self as deps, Conflict, ConflictKind};
use crate::host::parent::Handed;
use crate::host::{Hosting, Isolation, Spawner};
use crate::markers::{PluginNames, ReloadWindow};
use crate::metrics::Metrics;
use crate::slot::Slot;
use crate::store::Store;
use crate::trust::TrustPolicy;

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
    // `[plugin.NAME] isolation`, and what starts the hosts of those in
    // `process` (none: everything loads in this process).
    isolation: HashMap<String, Hosting>,
    spawner: Option<Spawner>,
    // Plugins whose `isolation` was published as a metric.
    isolation_published: BTreeSet<String>,
    // Hosts the daemon this one replaces offered, by (plugin, sha256),
    // until the start-up loads adopt them or `let_go_of_unadopted`.
    adoptable: HashMap<(String, String), Handed>,
    // The old daemon's pids of the hosts adopted.
    adopted: Vec<u32>,
    // Downgrades the fleet's signed metadata asks for (a published
    // rollback), by plugin: accepted as an operator's explicit one is.
    fleet_downgrades: HashMap<String, semver::Version>,
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
            isolation: HashMap::new(),
            spawner: None,
            isolation_published: BTreeSet::new(),
            adoptable: HashMap::new(),
            adopted: Vec::new(),
            fleet_downgrades: HashMap::new(),
        }
    }

    /// The fleet's repository, verified, asks `plugin` back to `version`
    /// (a published rollback): a package of that version in `plugins_dir`
    /// is accepted though it is below the highest version ever activated,
    /// as `plugvisor rollback` would have it. `None` withdraws it.
    pub fn allow_fleet_downgrade(&mut self, plugin: &str, version: Option<semver::Version>) {
        match version {
            Some(v) => {
                self.fleet_downgrades.insert(plugin.to_owned(), v);
            }
            None => {
                self.fleet_downgrades.remove(plugin);
            }
        }
    }

    /// Hosts the daemon this one replaces offered: a start-up load of the
    /// same version under the same limits adopts one instead of starting
    /// a new host (and running `init` again).
    pub fn offer_hosts(&mut self, hosts: Vec<Handed>) {
        for h in hosts {
            let key = (h.about.plugin.clone(), h.about.sha256.clone());
            self.adoptable.insert(key, h);
        }
    }

    /// Closes the streams of offered hosts no load adopted (each goes on
    /// serving the old daemon until it exits, then ends) and returns the
    /// old daemon's pids of those adopted, which it must leave running.
    pub fn let_go_of_unadopted(&mut self) -> Vec<u32> {
        for ((plugin, _), h) in self.adoptable.drain() {
            tracing::info!(
                plugin,
                version = %h.about.version,
                pid = h.about.pid,
                "the old daemon's plugin host is not adopted: this daemon does not run that version now"
            );
        }
        std::mem::take(&mut self.adopted)
    }

    /// Runs the versions of each plugin `isolation` names as `process` in
    /// plugin hosts that `spawner` starts; the rest (and every plugin
    /// without a spawner) load in this process.
    pub fn set_isolation(&mut self, isolation: HashMap<String, Hosting>, spawner: Option<Spawner>) {
        self.isolation = isolation;
        self.spawner = spawner;
    }

    /// Where `plugin`'s versions run.
    pub fn isolation_of(&self, plugin: &str) -> Isolation {
        match (&self.spawner, self.isolation.get(plugin)) {
            (Some(_), Some(h)) => h.isolation,
            _ => Isolation::InProcess,
        }
    }

    /// Sets how long a plugin's `init` may run (`[reload] init_timeout`).
    pub fn set_init_timeout(&mut self, timeout: Duration) {
        self.init_timeout = timeout;
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
        // Present at 0 from the start, so the first rollback or rejection
        // is an increase PromQL can see.
        self.metrics
            .plugin_at_zero(plugin, &[MANUAL, CRASH_IN_TRIAL, CRASH]);
        self.slots.insert(plugin.to_owned(), slot.clone());
        let mut names = self.plugin_names.write().expect("plugin names");
        let index = names.iter().position(|n| n == plugin).unwrap_or_else(|| {
            names.push(plugin.to_owned());
            names.len() - 1
        });
        slot.set_probe_index(index as u32);
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

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use super::*;
    use crate::seed::built_echo_library as echo_library;
    use crate::store::{JournalEvent, Refs};

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
                .vec()
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
