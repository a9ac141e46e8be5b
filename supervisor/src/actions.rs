//! What a firing rule — or an operator — does to a plugin: roll back,
//! degrade, disable. Besides the reload path, only this module changes a
//! slot or the store.
//!
//! Every action says why in four places at once: the log line, the journal
//! (rule, observed value, threshold, from and to versions, time), the
//! metrics (`plugvisor_rollbacks_total{plugin,reason}`,
//! `plugvisor_degradations_total{plugin,reason}`, `plugvisor_degraded`), and
//! `plugvisor status` (the last action per plugin).
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::config::Fallback;
use crate::failpoints::{CrashPoint, crash_point};
use crate::reload::Reloader;
use crate::slot::{Admission, Slot};
use crate::store::{JournalEntry, JournalEvent, StoreError, VersionRef, now_ms};

use crate::reload::MANUAL;

/// Why an action is taken.
#[derive(Debug, Clone, Default)]
pub struct Why {
    /// The `reason` label: the rule's name, `manual`, …
    pub reason: String,
    /// The rule, if a rule acted.
    pub rule: Option<String>,
    /// The value the rule observed.
    pub observed: Option<f64>,
    /// The threshold it crossed.
    pub threshold: Option<f64>,
}

impl Why {
    /// An operator's command.
    pub fn manual() -> Why {
        Why {
            reason: MANUAL.to_owned(),
            ..Why::default()
        }
    }
}

/// Why an action could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// No such plugin.
    #[error("no plugin {plugin:?} is loaded")]
    UnknownPlugin {
        /// The plugin.
        plugin: String,
    },
    /// Nothing to roll back to.
    #[error("plugin {plugin:?} has no known-good version to roll back to (name one with --to)")]
    NoKnownGood {
        /// The plugin.
        plugin: String,
    },
    /// The target version is not in the store.
    #[error(
        "plugin {plugin:?}: version {version} was never activated here, so it is not in the store"
    )]
    UnknownVersion {
        /// The plugin.
        plugin: String,
        /// The version asked for.
        version: String,
    },
    /// Already there.
    #[error("plugin {plugin:?} is already on {version}")]
    AlreadyActive {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
    },
    /// Loading the target from the store failed.
    #[error(transparent)]
    Load(#[from] crate::loader::LoadError),
    /// The store could not record it.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The kinds of action, as the admin socket, `plugvisor status` and the
/// journal name them ([`ActionKind::as_str`], the same word in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    /// Back to an earlier version.
    Rollback,
    /// A step down that keeps serving.
    Degrade,
    /// The degrade cleared with its rule.
    DegradeCleared,
    /// The operator disabled the plugin.
    Disable,
    /// The operator enabled it again.
    Enable,
}

impl ActionKind {
    /// The word for it.
    pub const fn as_str(self) -> &'static str {
        match self {
            ActionKind::Rollback => "rollback",
            ActionKind::Degrade => "degrade",
            ActionKind::DegradeCleared => "degrade-cleared",
            ActionKind::Disable => "disable",
            ActionKind::Enable => "enable",
        }
    }

    /// The journal's record of it.
    pub const fn journal_event(self) -> JournalEvent {
        match self {
            ActionKind::Rollback => JournalEvent::Rollback,
            ActionKind::Degrade => JournalEvent::Degrade,
            ActionKind::DegradeCleared => JournalEvent::DegradeCleared,
            ActionKind::Disable => JournalEvent::Disable,
            ActionKind::Enable => JournalEvent::Enable,
        }
    }
}

/// What an action did, for the admin socket and `plugvisor status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActionReport {
    /// The plugin.
    pub plugin: String,
    /// What was done.
    pub action: ActionKind,
    /// Degrade: which step served (hook, fallback, passthrough, shed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Version before.
    pub from_version: Option<String>,
    /// Version after.
    pub to_version: Option<String>,
    /// The reason label.
    pub reason: String,
    /// The rule, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The observed value, if a rule acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<f64>,
    /// The threshold, if a rule acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// When (ms since the epoch).
    pub ts_ms: u64,
}

/// How a plugin is degraded now, so clearing undoes exactly that.
#[derive(Debug, Clone)]
pub enum DegradeStep {
    /// The plugin's own `degrade(level)` hook sheds optional work.
    Hook,
    /// The configured fallback version serves; `previous` comes back after.
    Fallback {
        /// The version to return to.
        previous: Version,
    },
    /// The built-in pass-through answers.
    Passthrough,
    /// New connections are refused.
    Shed,
}

impl DegradeStep {
    fn as_str(&self) -> &'static str {
        match self {
            DegradeStep::Hook => "hook",
            DegradeStep::Fallback { .. } => "fallback",
            DegradeStep::Passthrough => "passthrough",
            DegradeStep::Shed => "shed",
        }
    }
}

/// Action state the daemon keeps between actions.
#[derive(Default)]
pub struct Actions {
    /// The last action per plugin.
    pub last: HashMap<String, ActionReport>,
    degraded: HashMap<String, DegradeStep>,
    /// Degrade fallbacks from the config.
    pub fallbacks: HashMap<String, Fallback>,
    // Plugins whose passed trial could not be recorded (said once, then
    // retried quietly every tick until the store takes it).
    unrecorded_trials: HashSet<String>,
}

fn report(plugin: &str, action: ActionKind, why: &Why) -> ActionReport {
    ActionReport {
        plugin: plugin.to_owned(),
        action,
        step: None,
        from_version: None,
        to_version: None,
        reason: why.reason.clone(),
        rule: why.rule.clone(),
        observed: why.observed,
        threshold: why.threshold,
        ts_ms: now_ms(),
    }
}

/// The slot `plugin` serves from; an action on a plugin no listener uses
/// is refused by name.
fn slot_of(r: &Reloader, plugin: &str) -> Result<Arc<Slot>, ActionError> {
    r.slots()
        .get(plugin)
        .cloned()
        .ok_or_else(|| ActionError::UnknownPlugin {
            plugin: plugin.to_owned(),
        })
}

fn journal(r: &Reloader, rep: &ActionReport) {
    let mut e = JournalEntry::now(&rep.plugin, rep.action.journal_event());
    e.version.clone_from(&rep.to_version);
    e.from_version.clone_from(&rep.from_version);
    e.reason = Some(match &rep.step {
        Some(step) => format!("{} (step: {step})", rep.reason),
        None => rep.reason.clone(),
    });
    e.rule.clone_from(&rep.rule);
    e.observed = rep.observed;
    e.threshold = rep.threshold;
    if let Err(err) = r.store().journal(&e) {
        tracing::error!(plugin = %rep.plugin, error = %err, "could not journal the action");
    }
}

impl Actions {
    /// Rolls `plugin` back to `to`, or to its known-good version: a pointer
    /// swap when the version is mapped (the known-good one always is),
    /// else a load from the store. The version rolled back from is
    /// quarantined.
    pub fn rollback(
        &mut self,
        r: &mut Reloader,
        plugin: &str,
        to: Option<&Version>,
        why: &Why,
    ) -> Result<ActionReport, ActionError> {
        let slot = slot_of(r, plugin)?;
        let mut refs = r.store().refs(plugin)?;
        let from = slot.active().ok_or_else(|| ActionError::UnknownPlugin {
            plugin: plugin.to_owned(),
        })?;
        let target: VersionRef = match to {
            None => refs
                .known_good
                .clone()
                .ok_or_else(|| ActionError::NoKnownGood {
                    plugin: plugin.to_owned(),
                })?,
            Some(v) => refs
                .history
                .iter()
                .rev()
                .find(|h| &h.version == v)
                .cloned()
                .ok_or_else(|| ActionError::UnknownVersion {
                    plugin: plugin.to_owned(),
                    version: v.to_string(),
                })?,
        };
        if from.loaded.version() == &target.version {
            return Err(ActionError::AlreadyActive {
                plugin: plugin.to_owned(),
                version: target.version.to_string(),
            });
        }
        let from_ref = VersionRef {
            version: from.loaded.version().clone(),
            sha256: from.loaded.sha256().to_owned(),
        };
        let key = target.version.to_string();
        crash_point(CrashPoint::RollbackBeforeSwap, &key);
        let window = r.window(plugin);
        if slot.switch_to_mapped(&target.version).is_none() {
            let loaded = r.load_from_store(plugin, &target)?;
            slot.install(loaded);
        }
        drop(window);
        crash_point(CrashPoint::RollbackAfterSwap, &key);
        if !refs.is_quarantined(&from_ref) {
            refs.quarantined.push(from_ref.clone());
        }
        refs.active = Some(target.clone());
        refs.trial_since_ms = None;
        // Never leave the quarantined version as the one a crash in a
        // later trial would come back to.
        if refs.known_good.is_none() || refs.known_good.as_ref() == Some(&from_ref) {
            refs.known_good = Some(target.clone());
        }
        r.store().write_refs(plugin, &refs)?;
        crash_point(CrashPoint::RollbackAfterRefs, &key);
        slot.pin(refs.known_good.as_ref().map(|k| k.version.clone()));
        // Another plugin may have been blocked on (or by) the version left.
        r.refresh_dependency_conflicts();
        r.metrics().rollback(plugin, &why.reason);
        let mut rep = report(plugin, ActionKind::Rollback, why);
        rep.from_version = Some(from_ref.version.to_string());
        rep.to_version = Some(target.version.to_string());
        tracing::warn!(
            plugin,
            from = %from_ref.version,
            to = %target.version,
            reason = %why.reason,
            rule = why.rule.as_deref().unwrap_or("-"),
            observed = why.observed,
            threshold = why.threshold,
            "rolled back; {} is quarantined until a newer version arrives",
            from_ref.version
        );
        journal(r, &rep);
        self.last.insert(plugin.to_owned(), rep.clone());
        Ok(rep)
    }

    /// Degrades `plugin`: its own hook first; if it has none or it fails,
    /// the configured fallback; last, shedding new connections.
    pub fn degrade(
        &mut self,
        r: &Reloader,
        plugin: &str,
        level: u32,
        why: &Why,
    ) -> Result<ActionReport, ActionError> {
        let slot = slot_of(r, plugin)?;
        let active = slot.active();
        let step = if active.as_ref().and_then(|a| a.loaded.degrade(level)) == Some(true) {
            DegradeStep::Hook
        } else {
            match (self.fallbacks.get(plugin), &active) {
                (Some(Fallback::Version(v)), Some(a))
                    if a.loaded.version() != v && slot.switch_to_mapped(v).is_some() =>
                {
                    DegradeStep::Fallback {
                        previous: a.loaded.version().clone(),
                    }
                }
                (Some(Fallback::Passthrough), _) => {
                    slot.set_passthrough(true);
                    DegradeStep::Passthrough
                }
                _ => {
                    slot.set_admission(Admission::ShedNewConnections);
                    DegradeStep::Shed
                }
            }
        };
        r.metrics().degradation(plugin, &why.reason);
        let mut rep = report(plugin, ActionKind::Degrade, why);
        rep.step = Some(step.as_str().to_owned());
        rep.from_version = active.as_ref().map(|a| a.version().to_owned());
        rep.to_version = slot.active().map(|a| a.version().to_owned());
        tracing::warn!(
            plugin,
            level,
            step = step.as_str(),
            reason = %why.reason,
            observed = why.observed,
            threshold = why.threshold,
            "degraded"
        );
        journal(r, &rep);
        self.degraded.insert(plugin.to_owned(), step);
        self.last.insert(plugin.to_owned(), rep.clone());
        Ok(rep)
    }

    /// Undoes the degrade of `plugin` (its rule cleared).
    pub fn clear_degrade(&mut self, r: &Reloader, plugin: &str, why: &Why) -> Option<ActionReport> {
        let step = self.degraded.remove(plugin)?;
        let slot = r.slots().get(plugin)?.clone();
        match &step {
            DegradeStep::Hook => {
                if let Some(a) = slot.active() {
                    let _ = a.loaded.degrade(0);
                }
            }
            DegradeStep::Fallback { previous } => {
                let _ = slot.switch_to_mapped(previous);
            }
            DegradeStep::Passthrough => slot.set_passthrough(false),
            DegradeStep::Shed => slot.set_admission(Admission::Open),
        }
        r.metrics().set_degraded(plugin, false);
        let mut rep = report(plugin, ActionKind::DegradeCleared, why);
        rep.step = Some(step.as_str().to_owned());
        rep.to_version = slot.active().map(|a| a.version().to_owned());
        tracing::info!(plugin, step = step.as_str(), reason = %why.reason, "degrade cleared: full service again");
        journal(r, &rep);
        self.last.insert(plugin.to_owned(), rep.clone());
        Some(rep)
    }

    /// Whether `plugin` is degraded, and how.
    pub fn degraded(&self, plugin: &str) -> Option<&'static str> {
        self.degraded.get(plugin).map(DegradeStep::as_str)
    }

    /// `plugvisor disable` / `enable`: refuse all work, or restore it.
    pub fn set_enabled(
        &mut self,
        r: &Reloader,
        plugin: &str,
        enabled: bool,
    ) -> Result<ActionReport, ActionError> {
        let slot = slot_of(r, plugin)?;
        let degraded_shed = matches!(self.degraded.get(plugin), Some(DegradeStep::Shed));
        slot.set_admission(match (enabled, degraded_shed) {
            (false, _) => Admission::Disabled,
            (true, true) => Admission::ShedNewConnections,
            (true, false) => Admission::Open,
        });
        let action = if enabled {
            ActionKind::Enable
        } else {
            ActionKind::Disable
        };
        let mut rep = report(plugin, action, &Why::manual());
        rep.to_version = slot.active().map(|a| a.version().to_owned());
        tracing::warn!(plugin, "{}d by the operator", action.as_str());
        journal(r, &rep);
        self.last.insert(plugin.to_owned(), rep.clone());
        Ok(rep)
    }

    /// Marks versions whose trial passed with no rule firing as known-good
    /// (and pins them mapped). `firing` names plugins a rule is firing for.
    pub fn promote_trials(&mut self, r: &Reloader, trial: Duration, firing: &[String]) {
        let now = now_ms();
        let plugins: Vec<String> = r.slots().keys().cloned().collect();
        for plugin in plugins {
            let Ok(mut refs) = r.store().refs(&plugin) else {
                continue;
            };
            let Some(since) = refs.trial_since_ms else {
                continue;
            };
            if now.saturating_sub(since) < trial.as_millis() as u64 || firing.contains(&plugin) {
                continue;
            }
            let Some(active) = refs.active.clone() else {
                continue;
            };
            // Only what serves can pass a trial: the refs may still name a
            // version this process did not start on (a crash-in-trial
            // rollback the store could not record at start).
            let serving = r
                .slots()
                .get(&plugin)
                .and_then(|s| s.active())
                .is_some_and(|a| a.loaded.sha256() == active.sha256);
            if !serving {
                continue;
            }
            let key = active.version.to_string();
            crash_point(CrashPoint::TrialBeforeRefs, &key);
            refs.known_good = Some(active.clone());
            refs.trial_since_ms = None;
            if let Err(e) = r.store().write_refs(&plugin, &refs) {
                if self.unrecorded_trials.insert(plugin.clone()) {
                    tracing::error!(plugin, error = %e, "could not record the passed trial; retrying every evaluation until state_dir takes it");
                }
                continue;
            }
            self.unrecorded_trials.remove(&plugin);
            crash_point(CrashPoint::TrialAfterRefs, &key);
            if let Some(slot) = r.slots().get(&plugin) {
                slot.pin(Some(active.version.clone()));
            }
            let mut e = JournalEntry::now(&plugin, JournalEvent::KnownGood);
            e.version = Some(active.version.to_string());
            e.sha256 = Some(active.sha256.clone());
            e.reason = Some(format!("trial of {trial:?} passed with no rule firing"));
            let _ = r.store().journal(&e);
            tracing::info!(plugin, version = %active.version, "trial passed: known-good");
        }
    }
}
