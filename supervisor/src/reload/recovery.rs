//! Start and stop across crashes: boot from the store with boot counting
//! (a trial the last process died in comes up on the known-good version),
//! quarantine of a version whose `dlopen`/`init` killed the last process,
//! and a trial interrupted by a clean stop, resumed on the next start.

use super::{AttemptOutcome, CRASH_IN_LOAD, CRASH_IN_TRIAL, ReloadReport, Reloader};
use crate::host::Loaded;
use crate::loader::LoadError;
use crate::metrics::ReloadOutcome;
use crate::store::{JournalEntry, JournalEvent, Refs, VersionRef};

impl Reloader {
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

    /// An upgrade marked the trials interrupted (see
    /// [`Reloader::interrupt_trials`]) and then failed: this process serves
    /// on, and each such trial starts over, journalled as resumed.
    pub fn resume_trials_after_failed_upgrade(&self) {
        let plugins: Vec<String> = self.slots.keys().cloned().collect();
        for plugin in plugins {
            let Ok(mut refs) = self.store.refs(&plugin) else {
                continue;
            };
            if !refs.trial_interrupted {
                continue;
            }
            if let Some(active) = refs.active.clone() {
                self.resume_interrupted_trial(&plugin, &mut refs, &active);
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
                self.metrics.reload(&plugin, ReloadOutcome::Failed);
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
            self.metrics.rollback(plugin, CRASH_IN_TRIAL);
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
    pub fn load_from_store(&mut self, plugin: &str, v: &VersionRef) -> Result<Loaded, LoadError> {
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
}
