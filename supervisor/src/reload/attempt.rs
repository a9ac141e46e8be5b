//! One reload attempt, in the order it runs: verify the package (catalog,
//! same version, signature, anti-downgrade, quarantine, dependencies),
//! stage it into the store, open the reload window, load and `init`, swap,
//! then make it durable and record it — or refuse it, once, in the log,
//! the journal and `plugvisor_reloads_total{outcome}`.

use std::path::Path;
use std::time::{Duration, Instant};

use semver::Version;

use super::conflicts::{Blocked, node_of};
use super::{AttemptOutcome, ReloadError, ReloadOptions, ReloadReport, Reloader, SIGNATURE_GRACE};
use crate::catalog::{self, CatalogError, Package};
use crate::dependencies as deps;
use crate::failpoints::{CrashPoint, crash_point};
use crate::host::parent::{Confinement, Handed};
use crate::host::{Host, HostSpec, Isolation, Loaded, Mechanism, Spawner, privileges};
use crate::loader::{self, LoadError};
use crate::markers::ReloadWindow;
use crate::metrics::{Phase, ReloadOutcome};
use crate::slot::{Installed, Slot};
use crate::store::{JournalEntry, JournalEvent, StoreError, VersionRef};
use crate::trust::{self, TrustError};

/// What every phase of one attempt needs to know.
struct Attempt<'a> {
    plugin: &'a str,
    package_dir: &'a Path,
    // When the attempt began: the start of the reload's total time.
    t0: Instant,
}

/// A package every check accepted, with what the switch needs of the
/// checks' results.
struct Verified {
    package: Package,
    candidate: VersionRef,
    verdict: trust::Verdict,
    // The highest activated version, when this is an explicit rollback
    // below it.
    downgrade_from: Option<Version>,
    node: deps::Node,
    verify: Duration,
}

/// How an attempt ends before the switch.
enum Stop {
    /// Nothing to do: the package is what was already acted on.
    Unchanged,
    /// Still blocked by the conflicts it was refused for on its first try.
    StillBlocked,
    /// The signature belongs to a commit still in progress (why).
    Deferred(String),
    /// Refused.
    Refused(Box<ReloadError>),
}

impl Stop {
    fn refused(e: ReloadError) -> Stop {
        Stop::Refused(Box::new(e))
    }
}

/// What the switch measured, for the record.
struct Switched {
    sha256: String,
    phases: [(Phase, Duration); 7],
    window: Duration,
}

impl Reloader {
    /// Loads `object` as `version` of `plugin` with `init` bounded by
    /// `[reload] init_timeout`, counting an init that overran or was not
    /// made because too many are stuck.
    pub(super) fn load_object(
        &mut self,
        plugin: &str,
        version: &Version,
        abi: u32,
        sha256: &str,
        object: &Path,
    ) -> Result<(Loaded, loader::LoadTimings), LoadError> {
        let slot = self.slot(plugin);
        self.publish_isolation(plugin);
        let handed = self
            .adoptable
            .remove(&(plugin.to_owned(), sha256.to_owned()));
        let result = match (self.isolation_of(plugin), &self.spawner) {
            (Isolation::Process, Some(spawner)) => self
                .confinement(plugin, version)
                .and_then(|confinement| {
                    let spec = HostSpec {
                        plugin: plugin.to_owned(),
                        version: version.clone(),
                        abi,
                        sha256: sha256.to_owned(),
                        object: object.to_owned(),
                    };
                    if let Some(adopted) = adopt(spawner, handed, &spec, &confinement, &slot) {
                        return Ok(adopted);
                    }
                    spawner
                        .spawn(&spec, &confinement, self.init_timeout, slot.handle_stuck())
                        .map(|(h, t)| (h, t, None))
                })
                .map(|(h, t, adopted_from)| {
                    self.adopted.extend(adopted_from);
                    (Loaded::Process(h), t)
                }),
            _ => loader::load(
                plugin,
                version,
                abi,
                sha256,
                object,
                &slot.init_bound(self.init_timeout),
            )
            .map(|(l, t)| (Loaded::InProcess(l), t)),
        };
        match &result {
            Err(LoadError::InitTimeout { .. } | LoadError::InitKilled { .. }) => {
                slot.count_init_trouble(false);
            }
            Err(LoadError::TooManyStuckInits { .. }) => slot.count_init_trouble(true),
            _ => {}
        }
        result
    }

    /// What `plugin`'s hosts are held to and who they run as. The user is
    /// looked up at each load: one the node gains later is found then.
    fn confinement(&self, plugin: &str, version: &Version) -> Result<Confinement, LoadError> {
        let hosting = self.isolation.get(plugin).cloned().unwrap_or_default();
        // SAFETY: plain query.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = if root {
            Some(
                privileges::resolve(hosting.user.as_deref()).map_err(|message| {
                    LoadError::HostFailed {
                        plugin: plugin.to_owned(),
                        version: version.to_string(),
                        message,
                    }
                })?,
            )
        } else {
            // Not root: a host cannot change user, and is no more than
            // the daemon already is.
            None
        };
        Ok(Confinement {
            limits: hosting.limits,
            run_as,
        })
    }

    /// Says once per plugin where its code runs and what holds it to its
    /// limits (`plugvisor_plugin_isolation`).
    fn publish_isolation(&mut self, plugin: &str) {
        if self.isolation_published.insert(plugin.to_owned()) {
            let mode = self.isolation_of(plugin);
            let limits = match (mode, &self.spawner) {
                (Isolation::Process, Some(s)) => {
                    let limits = self
                        .isolation
                        .get(plugin)
                        .map(|h| h.limits)
                        .unwrap_or_default();
                    s.resources().mechanism(&limits)
                }
                _ => Mechanism::None,
            };
            self.metrics
                .plugin_isolation(plugin, mode.as_str(), limits.as_str());
        }
    }

    /// The attempt itself; `retry` marks a re-try of a blocked package,
    /// which stays quiet if it is still blocked by exactly the same
    /// conflicts (it was already reported once).
    pub(super) fn attempt(
        &mut self,
        plugin: &str,
        options: &ReloadOptions,
        retry: bool,
    ) -> ReloadReport {
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
            from_version,
            message: None,
            total_us: None,
            switch_us: None,
        };
        let attempt = Attempt {
            plugin,
            package_dir: &package_dir,
            t0,
        };
        match self.verify(&attempt, options, retry, from.as_deref(), &mut report) {
            Ok(v) => self.switch(&attempt, &slot, &v, report),
            Err(stop) => self.stop(&attempt, stop, report),
        }
    }

    /// Verify, in order: the catalog reads the package, it is not the
    /// version already serving, its signature holds, it is not a
    /// downgrade, not quarantined, and its dependencies hold. `Err` says
    /// how an attempt that ends here ends; `report` learns the package's
    /// version as soon as the catalog has read it.
    fn verify(
        &mut self,
        a: &Attempt<'_>,
        options: &ReloadOptions,
        retry: bool,
        from: Option<&Installed>,
        report: &mut ReloadReport,
    ) -> Result<Verified, Stop> {
        let plugin = a.plugin;
        let package = self.read_package(a, options.force)?;
        report.package_version = Some(package.manifest.version.to_string());
        if !options.force && self.fingerprints.get(plugin) == Some(&package.fingerprint) {
            return Err(Stop::Unchanged);
        }
        if let Some(active) = from {
            self.check_not_serving(a, active, &package)?;
        }
        let verdict = self.check_signature(a, &package)?;
        let downgrade_from = self.check_history(a, &package, options)?;
        let node = self.check_dependencies(a, &package, retry)?;
        let verify = a.t0.elapsed();
        crash_point(
            CrashPoint::ReloadAfterVerify,
            &package.manifest.version.to_string(),
        );
        Ok(Verified {
            candidate: VersionRef {
                version: package.manifest.version.clone(),
                sha256: package.manifest.sha256.clone(),
            },
            package,
            verdict,
            downgrade_from,
            node,
            verify,
        })
    }

    /// Permissions, manifest parsed and validated, library located.
    fn read_package(&mut self, a: &Attempt<'_>, force: bool) -> Result<Package, Stop> {
        let plugin = a.plugin;
        catalog::read_package(&self.plugins_dir, plugin).map_err(|e| {
            // An unchanged bad package is reported once, not on every
            // event. The reason is part of what was seen: fixing the
            // permissions leaves the bytes alone but is a change.
            let fp = std::fs::read(a.package_dir.join(catalog::MANIFEST_FILE))
                .map(|b| {
                    use sha2::Digest as _;
                    hex::encode(sha2::Sha256::digest(b))
                })
                .unwrap_or_default();
            let fp = format!("{fp}!{e}");
            if !force && self.fingerprints.get(plugin) == Some(&fp) {
                return Stop::Unchanged;
            }
            self.fingerprints.insert(plugin.to_owned(), fp);
            self.blocked.remove(plugin);
            Stop::refused(ReloadError::Catalog(e))
        })
    }

    /// The package's version is the one serving: nothing to do if it is
    /// the same library, a refusal if the version number was reused for
    /// other bytes.
    fn check_not_serving(
        &mut self,
        a: &Attempt<'_>,
        active: &Installed,
        package: &Package,
    ) -> Result<(), Stop> {
        let plugin = a.plugin;
        if active.loaded.version() != &package.manifest.version {
            return Ok(());
        }
        self.fingerprints
            .insert(plugin.to_owned(), package.fingerprint.clone());
        self.blocked.remove(plugin);
        self.deferred.remove(plugin);
        if active.loaded.sha256() == package.manifest.sha256 {
            // Also the case of a `.sig` written for a manifest that
            // is not renamed into place yet: nothing to do until it is.
            return Err(Stop::Unchanged);
        }
        let e = ReloadError::VersionReused {
            plugin: plugin.to_owned(),
            version: package.manifest.version.to_string(),
            active: active.loaded.sha256().to_owned(),
            package: package.manifest.sha256.clone(),
        };
        Err(Stop::refused(e))
    }

    /// Signature: the manifest's exact bytes under a trusted key.
    fn check_signature(
        &mut self,
        a: &Attempt<'_>,
        package: &Package,
    ) -> Result<trust::Verdict, Stop> {
        let plugin = a.plugin;
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
                    if let Some(stop) = self.defer(plugin, package, &e) {
                        return Err(stop);
                    }
                }
                self.fingerprints
                    .insert(plugin.to_owned(), package.fingerprint.clone());
                self.blocked.remove(plugin);
                return Err(Stop::refused(ReloadError::Trust(e)));
            }
        };
        self.deferred.remove(plugin);
        self.fingerprints
            .insert(plugin.to_owned(), package.fingerprint.clone());
        Ok(verdict)
    }

    /// Anti-downgrade: never below the highest version ever activated,
    /// unless a rollback names this very version; and never a quarantined
    /// version. `Ok(Some(highest))` is an explicit rollback below it.
    fn check_history(
        &mut self,
        a: &Attempt<'_>,
        package: &Package,
        options: &ReloadOptions,
    ) -> Result<Option<Version>, Stop> {
        let plugin = a.plugin;
        let refs = match self.store.refs(plugin) {
            Ok(r) => r,
            Err(e) => {
                return Err(Stop::refused(ReloadError::Store(e)));
            }
        };
        let mut downgrade_from = None;
        if let Some(highest) = refs.downgrade_below(&package.manifest.version) {
            let signed = self.fleet_downgrades.get(plugin) == Some(&package.manifest.version);
            if options.allow_downgrade_to.as_ref() != Some(&package.manifest.version) && !signed {
                self.blocked.remove(plugin);
                let e = ReloadError::Downgrade {
                    plugin: plugin.to_owned(),
                    version: package.manifest.version.to_string(),
                    highest: highest.to_string(),
                };
                return Err(Stop::refused(e));
            }
            downgrade_from = Some(highest.clone());
        }
        let candidate_ref = VersionRef {
            version: package.manifest.version.clone(),
            sha256: package.manifest.sha256.clone(),
        };
        if refs.is_quarantined(&candidate_ref) {
            return Err(Stop::refused(ReloadError::Quarantined {
                plugin: plugin.to_owned(),
                version: candidate_ref.version.to_string(),
            }));
        }
        Ok(downgrade_from)
    }

    /// Dependencies and ABI, against the other active versions. A blocked
    /// package waits in `blocked` to be tried again after the next switch.
    fn check_dependencies(
        &mut self,
        a: &Attempt<'_>,
        package: &Package,
        retry: bool,
    ) -> Result<deps::Node, Stop> {
        let plugin = a.plugin;
        let candidate = node_of(&package.manifest);
        let current = self.active_set();
        let conflicts = deps::check_switch(
            &current,
            plugin,
            candidate.clone(),
            plugvisor_sdk::ABI_VERSION,
        );
        if conflicts.is_empty() {
            self.blocked.remove(plugin);
            return Ok(candidate);
        }
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
            return Err(Stop::StillBlocked);
        }
        self.blocked.insert(plugin.to_owned(), blocked);
        let e = ReloadError::Dependencies {
            plugin: plugin.to_owned(),
            version: package.manifest.version.to_string(),
            conflicts,
        };
        Err(Stop::refused(e))
    }

    /// Stage, then the window (dlopen, checks, init, swap), then make the
    /// new version durable and record it.
    fn switch(
        &mut self,
        a: &Attempt<'_>,
        slot: &Slot,
        v: &Verified,
        report: ReloadReport,
    ) -> ReloadReport {
        let plugin = a.plugin;
        let version_key = v.package.manifest.version.to_string();
        // Stage: hash while copying into the store — before the window
        // opens. Flushing it to disk waits until after the switch (see
        // `Store::stage`).
        let t1 = Instant::now();
        let staged =
            match self
                .store
                .stage(plugin, &v.package.library_path, &v.package.manifest.sha256)
            {
                Ok(s) => s,
                Err(e) => return self.refuse(report, a.package_dir, &ReloadError::Store(e)),
            };
        let stage = t1.elapsed();
        crash_point(CrashPoint::ReloadAfterStage, &version_key);

        // Foreign code runs from dlopen until load_object returns: if it
        // kills the process, this mark tells the next start which version
        // did (see `recover_interrupted_loads`). Written before the window
        // opens, so the kernel's reload window holds only the switch.
        if let Err(e) = self.store.mark_loading(plugin, &v.candidate) {
            tracing::warn!(plugin, error = %e, "could not mark the load; a crash in it would be retried on restart");
        }

        // The window: dlopen, checks, init, swap.
        self.seq += 1;
        let t2 = Instant::now();
        let mut window = ReloadWindow::open(self.plugin_index(plugin), self.seq);
        let result = self.load_object(
            plugin,
            &v.package.manifest.version,
            v.package.manifest.abi,
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
                    self.quarantine(plugin, &v.candidate);
                }
                return self.refuse(report, a.package_dir, &ReloadError::Load(e));
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
        let total = serving - a.t0;
        self.nodes.insert(staged.sha256.clone(), v.node.clone());
        let phases = [
            (Phase::Verify, v.verify),
            (Phase::Stage, stage),
            (Phase::Load, timings.load),
            (Phase::Init, timings.init),
            (Phase::Switch, switch),
            (Phase::Publish, publish),
            (Phase::Total, total),
        ];
        for (phase, d) in phases {
            self.metrics.reload_phase(plugin, phase, d);
        }
        // The new version serves; now make it durable, before the refs
        // name it. Kept beside it: the manifest, so the version's
        // dependencies are known when it is started from the store or
        // switched back to.
        if let Err(e) = self.store.make_durable(&staged).and_then(|()| {
            self.store
                .save_manifest(&staged.sha256, &v.package.manifest_bytes)
        }) {
            // A version the store cannot keep is one a restart could not
            // come back to: serve what served before (still mapped, a
            // pointer swap) and refuse the reload with the store's reason.
            if let Some(previous) = previous {
                slot.switch_to_mapped(previous.loaded.version());
                return self.refuse(report, a.package_dir, &ReloadError::Store(e));
            }
            tracing::error!(plugin, error = %e, "activated, but the store could not keep the object or its manifest");
        }
        let switched = Switched {
            sha256: staged.sha256,
            phases,
            window: window_time,
        };
        self.record(a, v, &switched, report)
    }

    /// An attempt that ended before the switch: the report says how, and a
    /// refusal is said once in the log, the journal and the metric.
    fn stop(&self, a: &Attempt<'_>, stop: Stop, mut report: ReloadReport) -> ReloadReport {
        match stop {
            Stop::Unchanged => report.outcome = AttemptOutcome::Unchanged,
            // Counted and journalled when it was first refused.
            Stop::StillBlocked => report.outcome = AttemptOutcome::Rejected,
            Stop::Deferred(why) => {
                report.outcome = AttemptOutcome::Deferred;
                report.message = Some(why);
            }
            Stop::Refused(e) => return self.refuse(report, a.package_dir, &e),
        }
        report
    }

    /// The new version serves and is durable: count it, name it in the
    /// refs and the journal, and log the phases.
    fn record(
        &mut self,
        a: &Attempt<'_>,
        v: &Verified,
        switched: &Switched,
        mut report: ReloadReport,
    ) -> ReloadReport {
        let plugin = a.plugin;
        let version = &v.package.manifest.version;
        let version_key = version.to_string();
        self.metrics.reload(plugin, ReloadOutcome::Success);
        let new_ref = VersionRef {
            version: version.clone(),
            sha256: switched.sha256.clone(),
        };
        let why = v.downgrade_from.as_ref().map(|h| {
            format!("explicit rollback to {version} below the highest activated version {h}")
        });
        crash_point(CrashPoint::ReloadAfterSwitch, &version_key);
        if let Err(e) =
            self.record_activation(plugin, &new_ref, report.from_version.as_deref(), why)
        {
            // The new version serves; only the record of it failed. Say so loudly.
            tracing::error!(plugin, error = %e, "activated, but the store could not record it");
        }
        crash_point(CrashPoint::ReloadAfterJournal, &version_key);
        let signed_by = match &v.verdict {
            trust::Verdict::Signed { key_id } => key_id.as_str(),
            trust::Verdict::Unsigned => "unsigned",
            trust::Verdict::Unchecked => "unchecked",
        };
        let phases = &switched.phases;
        let total = phases[6].1;
        let window_time = switched.window;
        tracing::info!(
            plugin,
            from = report.from_version.as_deref().unwrap_or("-"),
            to = %version,
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
            attempt_ns = a.t0.elapsed().as_nanos() as u64,
            "reloaded"
        );
        report.outcome = AttemptOutcome::Success;
        report.active_version = Some(version.to_string());
        report.total_us = Some(total.as_micros() as u64);
        report.switch_us = Some(window_time.as_micros() as u64);
        report
    }

    /// A signature that names another manifest or does not parse: most
    /// likely a commit in progress (the `.sig` is written before the
    /// manifest is renamed into place, perhaps not atomically), so wait up
    /// to [`SIGNATURE_GRACE`] for the pair to settle. Returns how the
    /// attempt ends while waiting, or `None` once the grace has run out for this
    /// very pair (then it is refused as it stands).
    fn defer(&mut self, plugin: &str, package: &Package, e: &TrustError) -> Option<Stop> {
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
        Some(Stop::Deferred(e.to_string()))
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
    pub(super) fn quarantine(&self, plugin: &str, v: &VersionRef) {
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
        self.metrics.reload(&report.plugin, outcome);
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
}

/// Adopts `handed` — a host the daemon this one replaces ran — for `spec`,
/// if it runs that very version under the same limits; `None` (after
/// saying why) when a new host must be started instead. Returns the host,
/// zero load and init times (neither ran), and the old daemon's pid of it.
fn adopt(
    spawner: &Spawner,
    handed: Option<Handed>,
    spec: &HostSpec,
    confinement: &Confinement,
    slot: &Slot,
) -> Option<(Host, loader::LoadTimings, Option<u32>)> {
    let handed = handed?;
    let old_pid = handed.about.pid;
    if let Err(why) = handed.fits(spec, confinement) {
        tracing::info!(plugin = %spec.plugin, version = %spec.version, pid = old_pid, "not adopting the old daemon's plugin host ({why}): starting a new one");
        return None;
    }
    match spawner.adopt(handed, slot.handle_stuck()) {
        Ok(host) => Some((host, loader::LoadTimings::default(), Some(old_pid))),
        Err(e) => {
            tracing::warn!(error = %e, "starting a new plugin host instead");
            None
        }
    }
}
