//! A plugin host died while it served (`isolation = "process"`): what the
//! daemon does about it. The connections are the daemon's, so none of them
//! closed; only the requests in flight on that host were lost, and new
//! ones wait briefly for what replaces it.
//!
//! - A version **on trial** that crashes is rolled back at once to its
//!   known-good version (a pointer swap: the known-good host is kept
//!   warm) and quarantined, reason `crash`.
//! - A **known-good** version (or one with nothing to go back to) is
//!   restarted in a new host: at once the first time, then with backoff
//!   ([`restart_delay`]). After [`CRASHES_BEFORE_DEGRADE`] crashes within
//!   [`CRASH_WINDOW`] it is also degraded (its hook, its fallback, then
//!   shedding new connections), reason `crash-loop`, and the restarts go
//!   on at the backoff's pace.
//! - A **standby** (mapped, not serving) that dies is dropped from the
//!   mapped set; switching to it later loads it again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Daemon;
use crate::actions::Why;
use crate::host::Exit;
use crate::reload::CRASH;
use crate::slot::HostRole;
use crate::store::{JournalEntry, JournalEvent, Refs};

/// How far back crashes of one plugin count towards a crash loop.
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);

/// Crashes within [`CRASH_WINDOW`] after which a plugin is degraded.
pub const CRASHES_BEFORE_DEGRADE: usize = 3;

/// The `reason` of a degrade because a plugin keeps crashing.
pub const CRASH_LOOP: &str = "crash-loop";

/// How long to wait before restarting after the `n`th crash in the window
/// (1-based): at once, then 100 ms doubling, at most 10 s.
pub fn restart_delay(n: usize) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let ms = 100u64.saturating_mul(1 << (n - 2).min(7));
    Duration::from_millis(ms.min(10_000))
}

/// Recent crashes of each plugin.
#[derive(Debug, Default)]
pub(super) struct Crashes {
    by_plugin: std::collections::HashMap<String, VecDeque<Instant>>,
}

impl Crashes {
    /// Counts one at `at`; returns how many fall in the window now.
    fn count(&mut self, plugin: &str, at: Instant) -> usize {
        let q = self.by_plugin.entry(plugin.to_owned()).or_default();
        q.push_back(at);
        while q
            .front()
            .is_some_and(|t| at.duration_since(*t) > CRASH_WINDOW)
        {
            q.pop_front();
        }
        q.len()
    }
}

impl Daemon {
    /// A host died: roll back, restart, or forget it.
    pub(super) fn host_exited(&mut self, exit: &Exit) {
        let plugin = exit.plugin.clone();
        let mut r = self.reloader.lock().expect("reloader lock");
        let Some(slot) = r.slots().get(&plugin).cloned() else {
            crate::markers::plugvisor_host_retired(exit.pid);
            return;
        };
        let role = slot.host_died(exit);
        if role != HostRole::Active {
            // Nothing will answer in its place: no crash window to time.
            crate::markers::plugvisor_host_retired(exit.pid);
        }
        if role == HostRole::Gone {
            return;
        }
        r.metrics().host_restart(&plugin, exit.cause.reason());
        let mut entry = JournalEntry::now(&plugin, JournalEvent::HostCrashed);
        entry.version = Some(exit.version.to_string());
        entry.sha256 = Some(exit.sha256.clone());
        entry.reason = Some(format!(
            "{} ({}); {}",
            exit.cause,
            exit.cause.reason(),
            if role == HostRole::Active {
                "it was serving"
            } else {
                "it was a standby"
            }
        ));
        if let Err(e) = r.store().journal(&entry) {
            tracing::error!(plugin, error = %e, "could not journal the host's crash");
        }
        if role == HostRole::Standby {
            tracing::warn!(plugin, version = %exit.version, cause = %exit.cause, "a standby's plugin host died; it is no longer mapped");
            return;
        }
        let refs = match r.store().refs(&plugin) {
            Ok(refs) => refs,
            Err(e) => {
                tracing::error!(plugin, error = %e, "cannot read refs after a host crash; restarting the version that crashed");
                Refs::default()
            }
        };
        let on_trial = refs.trial_since_ms.is_some()
            && refs
                .known_good
                .as_ref()
                .is_some_and(|k| k.version != exit.version);
        if on_trial {
            let why = Why {
                reason: CRASH.to_owned(),
                ..Why::default()
            };
            match self.actions.rollback(&mut r, &plugin, None, &why) {
                Ok(_) => return,
                Err(e) => {
                    tracing::error!(plugin, version = %exit.version, error = %e, "the version on trial crashed and cannot be rolled back; restarting it");
                }
            }
        }
        let n = self.crashes.count(&plugin, exit.at);
        if n >= CRASHES_BEFORE_DEGRADE && self.actions.degraded(&plugin).is_none() {
            let why = Why {
                reason: CRASH_LOOP.to_owned(),
                observed: Some(n as f64),
                threshold: Some(CRASHES_BEFORE_DEGRADE as f64),
                ..Why::default()
            };
            if let Err(e) = self.actions.degrade(&r, &plugin, 1, &why) {
                tracing::error!(plugin, error = %e, "could not degrade a crash-looping plugin");
            }
        }
        let delay = restart_delay(n);
        if delay.is_zero() {
            drop(r);
            self.restart_host(&plugin, exit.pid);
            return;
        }
        tracing::warn!(plugin, version = %exit.version, crashes = n, "restarting its plugin host in {delay:?} ({n} crashes in {CRASH_WINDOW:?})");
        let (restarts, pid) = (self.restarts.clone(), exit.pid);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = restarts.send((plugin, pid));
        });
    }

    /// Starts a new host for the version whose host `dead_pid` was, if that
    /// dead host still holds the slot (a rollback or a reload may have
    /// replaced it since).
    pub(super) fn restart_host(&mut self, plugin: &str, dead_pid: u32) {
        let mut r = self.reloader.lock().expect("reloader lock");
        let Some(slot) = r.slots().get(plugin).cloned() else {
            return;
        };
        let Some(active) = slot.active() else {
            return;
        };
        if active.loaded.host().is_none_or(|h| h.pid() != dead_pid) {
            return;
        }
        let v = crate::store::VersionRef {
            version: active.loaded.version().clone(),
            sha256: active.loaded.sha256().to_owned(),
        };
        let t0 = Instant::now();
        match r.load_from_store(plugin, &v) {
            Ok(loaded) => {
                slot.install(loaded);
                let mut entry = JournalEntry::now(plugin, JournalEvent::HostRestarted);
                entry.version = Some(v.version.to_string());
                entry.sha256 = Some(v.sha256.clone());
                if let Err(e) = r.store().journal(&entry) {
                    tracing::error!(plugin, error = %e, "could not journal the host's restart");
                }
                tracing::info!(plugin, version = %v.version, took_ms = t0.elapsed().as_millis() as u64, "plugin host restarted; serving again");
            }
            Err(e) => {
                tracing::error!(plugin, version = %v.version, error = %e, "restarting the plugin host failed; trying again after a while");
                let restarts = self.restarts.clone();
                let plugin = plugin.to_owned();
                tokio::spawn(async move {
                    tokio::time::sleep(restart_delay(CRASHES_BEFORE_DEGRADE + 1)).await;
                    let _ = restarts.send((plugin, dead_pid));
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_once_and_is_capped() {
        assert_eq!(restart_delay(1), Duration::ZERO);
        assert_eq!(restart_delay(2), Duration::from_millis(100));
        assert_eq!(restart_delay(3), Duration::from_millis(200));
        assert_eq!(restart_delay(40), Duration::from_secs(10));
    }

    #[test]
    fn only_crashes_in_the_window_count() {
        let mut c = Crashes::default();
        let t = Instant::now();
        assert_eq!(c.count("a", t), 1);
        assert_eq!(c.count("a", t + Duration::from_secs(1)), 2);
        assert_eq!(c.count("b", t), 1, "per plugin");
        assert_eq!(c.count("a", t + CRASH_WINDOW + Duration::from_secs(2)), 1);
    }
}
