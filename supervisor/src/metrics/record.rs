//! Typed record functions: the only code that names label values.
//!
//! Every part records what happened through a method here, with the
//! label set as an enum where the set is closed (outcome, phase, kind,
//! stage, call) and as the configured name where it is not (plugin,
//! listener, rule, check). A label's spelling, its order in the family and
//! whether a series exists at 0 before its first event are decided once,
//! here, rather than at every call site (vector's typed internal events
//! are the model). Long-lived series are handed out as handles
//! ([`ListenerSeries`], [`CallSeries`], [`RequestCounters`],
//! [`HealthSeries`]) so a hot path does not look labels up again.

use std::time::Duration;

use plugvisor_probes_common::Probe;
use prometheus::{GaugeVec, Histogram, IntCounter, IntGauge};

use super::{
    Metrics, Phase, PluginCall, ProbeStage, ReloadOutcome, RequestOutcome, UpgradeOutcome,
};
use crate::config::Protocol;
use crate::dependencies::ConflictKind;

/// The kernel-observed series of one listener.
#[derive(Clone)]
pub struct ListenerSeries {
    /// `plugvisor_tcp_connections{listener}`.
    pub connections: IntGauge,
    /// `plugvisor_reload_broken_connections_total{listener,protocol}`.
    pub broken: IntCounter,
    /// `plugvisor_crash_broken_connections_total{listener,protocol}`.
    pub broken_in_crash: IntCounter,
    /// `plugvisor_upgrade_broken_connections_total{listener,protocol}`.
    pub broken_in_upgrade: IntCounter,
    /// `plugvisor_tcp_resets_total{listener,direction="sent"}`.
    pub resets_sent: IntCounter,
    /// `plugvisor_tcp_resets_total{listener,direction="received"}`.
    pub resets_received: IntCounter,
    /// `plugvisor_tcp_retransmits_total{listener}`.
    pub retransmits: IntCounter,
    /// `plugvisor_grpc_goaway_total{listener}` (gRPC listeners only).
    pub goaway: Option<IntCounter>,
    /// `plugvisor_grpc_stream_resets_total{listener}` (gRPC listeners only).
    pub stream_resets: Option<IntCounter>,
}

/// The series of one bounded entry point of one plugin.
pub struct CallSeries {
    /// `plugvisor_plugin_calls_stuck{plugin,call}`.
    pub stuck: IntGauge,
    /// `plugvisor_plugin_call_timeouts_total{plugin,call}`.
    pub timeouts: IntCounter,
    /// `plugvisor_plugin_calls_shed_total{plugin,call}`.
    pub shed: IntCounter,
}

/// `plugvisor_requests_total{plugin,version,outcome}` of one version.
pub struct RequestCounters {
    /// `outcome="ok"`.
    pub ok: IntCounter,
    /// `outcome="error"`.
    pub error: IntCounter,
    /// `outcome="panic"`.
    pub panic: IntCounter,
    /// `outcome="crashed"`.
    pub crashed: IntCounter,
}

/// The series of one health check of one plugin.
pub struct HealthSeries {
    /// `plugvisor_health_check_duration_seconds{check,plugin}`.
    pub duration: Histogram,
    /// `plugvisor_health_check_failures_total{check,plugin}`.
    pub failures: IntCounter,
}

const REQUEST_OUTCOMES: [RequestOutcome; 4] = [
    RequestOutcome::Ok,
    RequestOutcome::Error,
    RequestOutcome::Panic,
    RequestOutcome::Crashed,
];

/// The reload path.
impl Metrics {
    /// Every reload outcome of `plugin`, and its rollbacks for each of
    /// `rollback_reasons`, at 0: a counter series born at 1 on its first
    /// event is invisible to `increase()`, so an alert on it would miss
    /// exactly the first one. Its state gauges (`degraded`, each kind of
    /// `dependency_conflicts`) exist at 0 too, so a healthy node's panel
    /// says 0 rather than "No data". A series that already exists keeps
    /// its value.
    pub fn plugin_at_zero(&self, plugin: &str, rollback_reasons: &[&str]) {
        for reason in rollback_reasons {
            self.rollbacks_total.touch(&[plugin, reason]);
        }
        for outcome in ReloadOutcome::ALL {
            self.reloads_total.touch(&[plugin, outcome.as_str()]);
        }
        self.degraded.touch(&[plugin]);
        for kind in ConflictKind::ALL {
            self.dependency_conflicts.touch(&[plugin, kind.as_str()]);
        }
    }

    /// One reload attempt of `plugin` that came to `outcome`.
    pub fn reload(&self, plugin: &str, outcome: ReloadOutcome) {
        self.reloads_total
            .update(&[plugin, outcome.as_str()], prometheus::IntCounter::inc);
    }

    /// How long `phase` of a reload of `plugin` took.
    pub fn reload_phase(&self, plugin: &str, phase: Phase, d: Duration) {
        self.reload_duration_seconds
            .observe(plugin, phase, d.as_secs_f64());
    }

    /// Whether `plugin` has a dependency conflict of `kind` now.
    pub fn dependency_conflict(&self, plugin: &str, kind: ConflictKind, standing: bool) {
        self.dependency_conflicts
            .update(&[plugin, kind.as_str()], |m| m.set(i64::from(standing)));
    }
}

/// Plugin hosts.
impl Metrics {
    /// Where `plugin`'s code runs (`mode`) and what bounds it (`limits`);
    /// replaces what was said before.
    pub fn plugin_isolation(&self, plugin: &str, mode: &str, limits: &str) {
        for m in ["process", "in-process"] {
            for l in ["cgroup2", "cgroup1", "rlimit", "none"] {
                if (m, l) != (mode, limits) {
                    self.plugin_isolation.remove(&[plugin, m, l]);
                }
            }
        }
        self.plugin_isolation
            .update(&[plugin, mode, limits], |m| m.set(1));
    }

    /// Sets `plugin`'s fleet sync state (`plugvisor_sync_state`): 1 for
    /// `state`, 0 for every other of `states`.
    pub fn sync_state(&self, plugin: &str, state: &str, states: &[&str]) {
        for s in states {
            self.sync_state
                .update(&[plugin, s], |m| m.set(i64::from(*s == state)));
        }
    }

    /// Every sync error stage at 0, so a rate over them is 0, not absent.
    pub fn sync_at_zero(&self, stages: &[&str]) {
        for s in stages {
            self.sync_errors_total.touch(&[s]);
        }
        self.sync_download_bytes_total
            .with_label_values::<&str>(&[]);
    }

    /// A sync failure at `stage`.
    pub fn sync_error(&self, stage: &str) {
        self.sync_errors_total
            .update(&[stage], prometheus::IntCounter::inc);
    }

    /// Bytes fetched from the repository.
    pub fn sync_downloaded(&self, bytes: u64) {
        self.sync_download_bytes_total
            .with_label_values::<&str>(&[])
            .inc_by(bytes);
    }

    /// The repository was read and verified at `unix_seconds`.
    pub fn sync_succeeded(&self, unix_seconds: f64) {
        self.sync_last_success_timestamp_seconds
            .with_label_values::<&str>(&[])
            .set(unix_seconds);
    }

    /// Whether the MQTT link stands (`plugvisor_report_connected`); the
    /// first call also puts each event outcome at 0.
    pub fn report_connected(&self, up: bool) {
        self.report_connected
            .with_label_values::<&str>(&[])
            .set(i64::from(up));
        for o in ["published", "dropped"] {
            self.report_events_total.with_label_values(&[o]);
        }
    }

    /// `n` events reported with `outcome` (published, dropped).
    pub fn report_events(&self, outcome: &str, n: u64) {
        self.report_events_total
            .with_label_values(&[outcome])
            .inc_by(n);
    }

    /// Events waiting in the outbox.
    pub fn report_outbox(&self, events: usize) {
        self.report_outbox_events
            .with_label_values::<&str>(&[])
            .set(i64::try_from(events).unwrap_or(i64::MAX));
    }

    /// The broker acknowledged an event at `unix_seconds`.
    pub fn report_last_publish(&self, unix_seconds: u64) {
        self.report_last_publish_timestamp_seconds
            .with_label_values::<&str>(&[])
            .set(unix_seconds as f64);
    }

    /// Every upgrade outcome at 0, so a rate over them exists from the
    /// first scrape.
    pub fn upgrades_at_zero(&self) {
        for o in UpgradeOutcome::ALL {
            self.upgrades_total.touch(&[o.as_str()]);
        }
    }

    /// An upgrade of plugvisor itself ended with `outcome`.
    pub fn upgrade(&self, outcome: UpgradeOutcome) {
        self.upgrades_total
            .update(&[outcome.as_str()], prometheus::IntCounter::inc);
    }

    /// `listener`'s count of connections taken over, at 0.
    pub fn handed_over_at_zero(&self, listener: &str) {
        self.connections_handed_over_total.touch(&[listener]);
    }

    /// A raw TCP connection of `listener` arrived from the replaced process.
    pub fn handed_over(&self, listener: &str) {
        self.connections_handed_over_total
            .update(&[listener], prometheus::IntCounter::inc);
    }

    /// Every restart reason of `plugin`, at 0 (see [`Metrics::plugin_at_zero`]).
    pub fn host_restarts_at_zero(&self, plugin: &str, reasons: &[&str]) {
        for reason in reasons {
            self.plugin_host_restarts_total.touch(&[plugin, reason]);
        }
    }

    /// A host of `plugin` died while serving, for `reason`.
    pub fn host_restart(&self, plugin: &str, reason: &str) {
        self.plugin_host_restarts_total
            .update(&[plugin, reason], prometheus::IntCounter::inc);
    }

    /// The histogram of `plugin`'s crash recoveries (resolved once per
    /// crash, observed by the first answer after it).
    pub fn crash_recovery(&self, plugin: &str) -> Histogram {
        self.crash_recovery_seconds.with_label_values(&[plugin])
    }

    /// The hosts of `plugin` `version` use `memory_bytes` and `threads` now.
    pub fn plugin_host_levels(&self, plugin: &str, version: &str, memory_bytes: f64, threads: i64) {
        self.plugin_memory_bytes
            .with_label_values(&[plugin, version])
            .set(memory_bytes);
        self.plugin_threads
            .with_label_values(&[plugin, version])
            .set(threads);
    }

    /// A host of `plugin` `version` used `seconds` more CPU (the series
    /// appears at its first read, at 0).
    pub fn plugin_host_cpu(&self, plugin: &str, version: &str, seconds: f64) {
        let c = self
            .plugin_cpu_seconds_total
            .with_label_values(&[plugin, version]);
        if seconds > 0.0 {
            c.inc_by(seconds);
        }
    }

    /// `plugin` `version` has no host any more: its resource series go.
    pub fn forget_plugin_host(&self, plugin: &str, version: &str) {
        let _ = self
            .plugin_memory_bytes
            .remove_label_values(&[plugin, version]);
        let _ = self.plugin_threads.remove_label_values(&[plugin, version]);
        let _ = self
            .plugin_cpu_seconds_total
            .remove_label_values(&[plugin, version]);
    }
}

/// Actions and the rules that take them.
impl Metrics {
    /// A rollback of `plugin` for `reason` (a rule's name, `manual`,
    /// `crash-in-trial`).
    pub fn rollback(&self, plugin: &str, reason: &str) {
        self.rollbacks_total
            .update(&[plugin, reason], prometheus::IntCounter::inc);
    }

    /// The rollback series of `plugin` for `reason`, at 0.
    pub fn rollback_at_zero(&self, plugin: &str, reason: &str) {
        self.rollbacks_total.touch(&[plugin, reason]);
    }

    /// A degradation of `plugin` for `reason`; it is degraded from now.
    pub fn degradation(&self, plugin: &str, reason: &str) {
        self.set_degraded(plugin, true);
        self.degradations_total
            .update(&[plugin, reason], prometheus::IntCounter::inc);
    }

    /// The degradation series of `plugin` for `reason`, at 0.
    pub fn degradation_at_zero(&self, plugin: &str, reason: &str) {
        self.degradations_total.touch(&[plugin, reason]);
    }

    /// Whether `plugin` is degraded.
    pub fn set_degraded(&self, plugin: &str, degraded: bool) {
        self.degraded
            .update(&[plugin], |m| m.set(i64::from(degraded)));
    }

    /// The state of rule `rule`: 0 ok, 1 pending, 2 firing.
    pub fn rule_state(&self, rule: &str, state: i64) {
        self.rule_state.update(&[rule], |m| m.set(state));
    }

    /// Drops the state series of a rule the thresholds file no longer has.
    pub fn forget_rule(&self, rule: &str) {
        self.rule_state.remove(&[rule]);
    }
}

/// The probes.
impl Metrics {
    /// Every probe down and every failure series at 0, before anything is
    /// tried.
    pub fn probes_at_zero(&self) {
        for p in Probe::ALL {
            self.set_probe_up(p, false);
            for stage in ProbeStage::ALL {
                self.probe_failures_total
                    .touch(&[p.as_str(), stage.as_str()]);
            }
        }
    }

    /// A failure of `probe` (by its label, which may name a probe group) at
    /// `stage`.
    pub fn probe_failure(&self, probe: &str, stage: ProbeStage) {
        self.probe_failures_total
            .update(&[probe, stage.as_str()], prometheus::IntCounter::inc);
    }

    /// Whether `probe` is loaded and attached.
    pub fn set_probe_up(&self, probe: Probe, up: bool) {
        self.probe_up
            .update(&[probe.as_str()], |m| m.set(i64::from(up)));
    }

    /// Whether `probe` is loaded and attached, as last recorded.
    pub fn probe_is_up(&self, probe: Probe) -> bool {
        self.probe_up
            .update(&[probe.as_str()], prometheus::IntGauge::get)
            == 1
    }

    /// `plugvisor_probe_events_dropped_total{probe}`, created at 0.
    pub fn probe_events_dropped(&self, probe: Probe) -> IntCounter {
        self.probe_events_dropped_total
            .with_label_values(&[probe.as_str()])
    }

    /// The kernel-observed series of listener `name`, every one present
    /// from the start, so "0 broken" is a value, not an absence.
    pub fn listener(&self, name: &str, protocol: Protocol) -> ListenerSeries {
        let grpc = protocol == Protocol::Grpc;
        ListenerSeries {
            connections: self.tcp_connections.with_label_values(&[name]),
            broken: self
                .reload_broken_connections_total
                .with_label_values(&[name, protocol.as_str()]),
            broken_in_crash: self
                .crash_broken_connections_total
                .with_label_values(&[name, protocol.as_str()]),
            broken_in_upgrade: self
                .upgrade_broken_connections_total
                .with_label_values(&[name, protocol.as_str()]),
            resets_sent: self.tcp_resets_total.with_label_values(&[name, "sent"]),
            resets_received: self.tcp_resets_total.with_label_values(&[name, "received"]),
            retransmits: self.tcp_retransmits_total.with_label_values(&[name]),
            goaway: grpc.then(|| self.grpc_goaway_total.with_label_values(&[name])),
            stream_resets: grpc.then(|| self.grpc_stream_resets_total.with_label_values(&[name])),
        }
    }

    /// A reload window of `plugin` the kernel measured.
    pub fn kernel_reload(&self, plugin: &str, d: Duration) {
        self.kernel_reload_duration_seconds
            .observe(&[plugin], d.as_secs_f64());
    }

    /// A plugin host's crash of `plugin`, recovered from, as the kernel timed it.
    pub fn kernel_crash_recovery(&self, plugin: &str, d: Duration) {
        self.kernel_crash_recovery_seconds
            .with_label_values(&[plugin])
            .observe(d.as_secs_f64());
    }
}

/// Slots: requests, versions, bounded calls.
impl Metrics {
    /// The request counters of `version` of `plugin`, created at 0.
    pub fn requests(&self, plugin: &str, version: &str) -> RequestCounters {
        let c = |o: RequestOutcome| {
            self.requests_total
                .with_label_values(&[plugin, version, o.as_str()])
        };
        RequestCounters {
            ok: c(RequestOutcome::Ok),
            error: c(RequestOutcome::Error),
            panic: c(RequestOutcome::Panic),
            crashed: c(RequestOutcome::Crashed),
        }
    }

    /// Drops the request series of a version no longer mapped.
    pub fn forget_requests(&self, plugin: &str, version: &str) {
        for o in REQUEST_OUTCOMES {
            let _ = self
                .requests_total
                .remove_label_values(&[plugin, version, o.as_str()]);
        }
    }

    /// `plugvisor_plugin_info{plugin,version,state}` = 1.
    pub fn plugin_info(&self, plugin: &str, version: &str, state: &str) {
        self.plugin_info
            .update(&[plugin, version, state], |m| m.set(1));
    }

    /// Drops a `plugvisor_plugin_info` series that no longer holds.
    pub fn forget_plugin_info(&self, plugin: &str, version: &str, state: &str) {
        self.plugin_info.remove(&[plugin, version, state]);
    }

    /// The series of entry point `call` of `plugin`, at 0 from the start,
    /// so the first timeout is an increase PromQL can see.
    pub fn calls(&self, plugin: &str, call: PluginCall) -> CallSeries {
        let labels = [plugin, call.as_str()];
        CallSeries {
            stuck: self.plugin_calls_stuck.with_label_values(&labels),
            timeouts: self.plugin_call_timeouts_total.with_label_values(&labels),
            shed: self.plugin_calls_shed_total.with_label_values(&labels),
        }
    }
}

/// Signals: health checks and resources.
impl Metrics {
    /// The series of health check `check` of `plugin`; the failures
    /// counter is present at 0 from the start, so `increase()` has a base.
    pub fn health(&self, check: &str, plugin: &str) -> HealthSeries {
        let labels = [check, plugin];
        HealthSeries {
            duration: self
                .health_check_duration_seconds
                .with_label_values(&labels),
            failures: self.health_check_failures_total.with_label_values(&labels),
        }
    }

    /// The verdict of `check` of `plugin`; its series exists from the
    /// first verdict on.
    pub fn health_up(&self, check: &str, plugin: &str, up: bool) {
        self.health_check_up
            .update(&[check, plugin], |m| m.set(i64::from(up)));
    }
}

/// Sets a label-less gauge, or removes its series when there is no value
/// (a resource that cannot be read is absent, not 0).
pub fn set_or_absent(g: &GaugeVec, value: Option<f64>) {
    match value {
        Some(v) => g.with_label_values(&[] as &[&str]).set(v),
        None => {
            let _ = g.remove_label_values(&[] as &[&str]);
        }
    }
}
