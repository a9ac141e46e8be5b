//! What `plugvisor status` and `plugvisor versions` show, assembled from
//! the slots, the store's refs, the actions and the rules engine.

use std::sync::{Arc, Mutex};

use crate::actions::Actions;
use crate::config::Config;
use crate::control::{ConflictStatus, ListenerStatus, PluginStatus, Status, Versions};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::rules::Engine;

/// The versions of `plugin`: active, known-good, mapped, history,
/// quarantined.
pub(super) fn versions(reloader: &Arc<Mutex<Reloader>>, plugin: &str) -> Result<Versions, String> {
    let r = reloader.lock().expect("reloader lock");
    let slot = r
        .slots()
        .get(plugin)
        .cloned()
        .ok_or_else(|| format!("no plugin {plugin:?} is loaded"))?;
    let refs = r.store().refs(plugin).map_err(|e| e.to_string())?;
    let v = |x: &crate::store::VersionRef| x.version.to_string();
    Ok(Versions {
        plugin: plugin.to_owned(),
        active: slot.active().map(|a| a.version().to_owned()),
        known_good: refs.known_good.as_ref().map(v),
        on_trial: refs.trial_since_ms.is_some(),
        mapped: slot
            .mapped_versions()
            .iter()
            .map(ToString::to_string)
            .collect(),
        history: refs.history.iter().map(v).collect(),
        quarantined: refs.quarantined.iter().map(v).collect(),
    })
}

/// The whole daemon as `plugvisor status` shows it.
pub(super) fn status(
    reloader: &Arc<Mutex<Reloader>>,
    config: &Config,
    metrics: &Metrics,
    actions: &Actions,
    engine: &Engine,
    sync: Option<&crate::fleet::sync::SyncHandle>,
    report: Option<&crate::report::ReportHandle>,
) -> Status {
    // Before the reloader's lock: the sync takes the two one at a time.
    let sync = sync.map(crate::fleet::sync::SyncHandle::status);
    let r = reloader.lock().expect("reloader lock");
    let mut plugins: Vec<PluginStatus> = r
        .slots()
        .values()
        .map(|s| {
            let refs = r.store().refs(s.plugin()).unwrap_or_default();
            PluginStatus {
                plugin: s.plugin().to_owned(),
                active: s.active().map(|a| a.version().to_owned()),
                mapped: s
                    .mapped_versions()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                state: if refs.trial_since_ms.is_some() {
                    "trial"
                } else {
                    "known-good"
                }
                .to_owned(),
                known_good: refs.known_good.map(|k| k.version.to_string()),
                degraded: actions.degraded(s.plugin()).map(str::to_owned),
                disabled: s.admission() == crate::slot::Admission::Disabled,
                last_action: actions.last.get(s.plugin()).cloned(),
            }
        })
        .collect();
    plugins.sort_by(|a, b| a.plugin.cmp(&b.plugin));
    let conflicts = r
        .dependency_conflicts()
        .into_iter()
        .map(|c| ConflictStatus {
            plugin: c.plugin,
            kind: c.kind.as_str().to_owned(),
            message: c.message,
        })
        .collect();
    let probes = plugvisor_probes_common::Probe::ALL
        .iter()
        .map(|p| (p.as_str().to_owned(), metrics.probe_is_up(*p)))
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        plugins,
        listeners: config
            .listeners
            .iter()
            .map(|l| ListenerStatus {
                name: l.name.clone(),
                protocol: l.protocol.as_str().to_owned(),
                addr: l.bind.to_string(),
                plugin: l.plugin.clone(),
            })
            .collect(),
        probes,
        rules: engine.status(),
        rules_config_valid: metrics.rules_config_valid.get() == 1,
        conflicts,
        sync,
        report: report.map(crate::report::ReportHandle::status),
    }
}

/// Each plugin's state as the coordinator is told it (`[report.mqtt]`),
/// from the same parts as `plugvisor status`.
pub(super) fn report_states(status: &Status) -> Vec<crate::report::pb::PluginState> {
    status
        .plugins
        .iter()
        .map(|p| {
            let sync = status.sync.as_ref().and_then(|s| s.plugins.get(&p.plugin));
            crate::report::pb::PluginState {
                plugin: p.plugin.clone(),
                version: p.active.clone().unwrap_or_default(),
                state: p.state.clone(),
                known_good: p.known_good.clone().unwrap_or_default(),
                sync_state: sync
                    .map(|s| s.state.as_str().to_owned())
                    .unwrap_or_default(),
                sync_desired: sync.and_then(|s| s.desired.clone()).unwrap_or_default(),
                conflicts: status
                    .conflicts
                    .iter()
                    .filter(|c| c.plugin == p.plugin)
                    .map(|c| crate::report::pb::Conflict {
                        kind: c.kind.clone(),
                        message: c.message.clone(),
                    })
                    .collect(),
                degraded: p.degraded.clone().unwrap_or_default(),
                disabled: p.disabled,
                ..Default::default()
            }
        })
        .collect()
}
