//! The thresholds file and the rules' decisions, as the event loop
//! applies them.

use std::time::Duration;

use super::events::Sources;
use crate::actions::{Actions, Why};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::rules::{Decision, DecisionKind, Engine, Thresholds};

/// Reads the thresholds file into `engine`; an invalid file is said with
/// line and column and leaves the rules in force as they were.
pub(super) fn load_thresholds(engine: &mut Engine, path: &std::path::Path, metrics: &Metrics) {
    match Thresholds::load(path) {
        Ok(t) => {
            let (n, interval) = (t.rules.len(), t.evaluation_interval);
            engine.replace(t);
            metrics.rules_config_valid.set(1);
            tracing::info!(file = %path.display(), rules = n, ?interval, "thresholds loaded");
        }
        Err(e) => {
            metrics.rules_config_valid.set(0);
            tracing::error!(file = %path.display(), "thresholds file refused, previous rules stay in force: {e}");
        }
    }
}

/// A new ticker if the evaluation interval changed.
pub(super) fn retick(ticker: &mut tokio::time::Interval, every: Duration) {
    if ticker.period() != every {
        *ticker = Sources::ticker(every);
    }
}

/// Carries out one rule decision.
pub(super) fn act(actions: &mut Actions, r: &mut Reloader, d: &Decision) {
    let why = Why {
        reason: d.rule.clone(),
        rule: Some(d.rule.clone()),
        observed: Some(d.observed),
        threshold: Some(d.threshold),
    };
    let Some(plugin) = d.plugin.as_deref() else {
        tracing::warn!(rule = %d.rule, observed = d.observed, threshold = d.threshold, "alert: rule names no plugin to act on");
        return;
    };
    let result = match d.kind {
        DecisionKind::Rollback => actions.rollback(r, plugin, None, &why).map(|_| ()),
        DecisionKind::Degrade(level) => actions.degrade(r, plugin, level, &why).map(|_| ()),
        DecisionKind::ClearDegrade => {
            actions.clear_degrade(r, plugin, &why);
            Ok(())
        }
        DecisionKind::Alert => {
            tracing::warn!(rule = %d.rule, plugin, observed = d.observed, threshold = d.threshold, "alert");
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::error!(rule = %d.rule, plugin, "action not taken: {e}");
    }
}
