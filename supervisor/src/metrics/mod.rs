//! The metrics registry: the single source of truth that Prometheus scrapes.
//!
//! Every family is created once here. Label values come from bounded sets
//! (`as_str()` of small enums, plugin and listener names from the config,
//! versions bounded by `keep_loaded`) — never a peer address, port or
//! connection id.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto;

mod cached;
mod record;

use self::cached::Cached;
pub use self::cached::{Generation, LabelledVec, PhaseHistogramVec, Tracked, TrackedHistogramVec};

pub use self::record::{CallSeries, HealthSeries, ListenerSeries, RequestCounters, set_or_absent};

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Outcome of a reload attempt (`plugvisor_reloads_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new version serves.
    Success,
    /// The package was refused (bad manifest, checksum, ELF, descriptor, ABI…).
    Rejected,
    /// The package looked right but loading it failed (I/O, init error).
    Failed,
}

impl ReloadOutcome {
    /// Every outcome, for series created at 0 before the first reload.
    pub const ALL: [ReloadOutcome; 3] = [
        ReloadOutcome::Success,
        ReloadOutcome::Rejected,
        ReloadOutcome::Failed,
    ];

    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Success => "success",
            ReloadOutcome::Rejected => "rejected",
            ReloadOutcome::Failed => "failed",
        }
    }
}

/// Outcome of an upgrade of plugvisor itself (`plugvisor_upgrades_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeOutcome {
    /// The new process serves (counted by the new process, which is the
    /// one scraped from then on).
    Success,
    /// The new binary refused the config (`run --check`); nothing started.
    CheckFailed,
    /// The new process exited or was not ready in time; the old one serves on.
    Failed,
}

impl UpgradeOutcome {
    /// Every outcome, for series created at 0.
    pub const ALL: [UpgradeOutcome; 3] = [
        UpgradeOutcome::Success,
        UpgradeOutcome::CheckFailed,
        UpgradeOutcome::Failed,
    ];

    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            UpgradeOutcome::Success => "success",
            UpgradeOutcome::CheckFailed => "check_failed",
            UpgradeOutcome::Failed => "failed",
        }
    }
}

/// Phase of a reload (`plugvisor_reload_duration_seconds{phase}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Manifest parse and validation.
    Verify,
    /// Hash-while-copy into the store.
    Stage,
    /// `dlopen` and descriptor checks.
    Load,
    /// The plugin's `init`.
    Init,
    /// The atomic pointer swap alone.
    Switch,
    /// The slot's bookkeeping around the swap: per-version request
    /// counters resolved before it, the mapped list and `plugin_info`
    /// after it (new versions already serve meanwhile).
    Publish,
    /// Manifest commit to new version serving.
    Total,
}

impl Phase {
    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Phase::Verify => "verify",
            Phase::Stage => "stage",
            Phase::Load => "load",
            Phase::Init => "init",
            Phase::Switch => "switch",
            Phase::Publish => "publish",
            Phase::Total => "total",
        }
    }
}

/// Outcome of one request (`plugvisor_requests_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The plugin answered.
    Ok,
    /// The plugin returned an error.
    Error,
    /// The plugin panicked (caught at the boundary).
    Panic,
    /// The plugin's host process died with the request in flight.
    Crashed,
}

impl RequestOutcome {
    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Ok => "ok",
            RequestOutcome::Error => "error",
            RequestOutcome::Panic => "panic",
            RequestOutcome::Crashed => "crashed",
        }
    }
}

/// An entry point of a plugin that plugvisor bounds in time
/// (`plugvisor_plugin_call_timeouts_total{call}` and its siblings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginCall {
    /// `init`, bounded by `[reload] init_timeout`.
    Init,
    /// `handle`, bounded by the listener's `request_timeout`.
    Handle,
}

impl PluginCall {
    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            PluginCall::Init => "init",
            PluginCall::Handle => "handle",
        }
    }
}

/// Stage at which a probe failed (`plugvisor_probe_failures_total{stage}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeStage {
    /// Loading the object or a program into the kernel.
    Load,
    /// Attaching a program.
    Attach,
    /// Reading maps or the ring buffer.
    Read,
}

impl ProbeStage {
    /// Every stage, for series created at 0 before the first failure.
    pub const ALL: [ProbeStage; 3] = [ProbeStage::Load, ProbeStage::Attach, ProbeStage::Read];

    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProbeStage::Load => "load",
            ProbeStage::Attach => "attach",
            ProbeStage::Read => "read",
        }
    }
}

/// Every plugvisor family, registered in one registry.
pub struct Metrics {
    /// The registry `/metrics` encodes (and the rules engine reads).
    pub registry: Registry,
    /// `plugvisor_build_info{version}` = 1.
    pub build_info: Tracked<IntGaugeVec>,
    /// `plugvisor_plugin_info{plugin,version,state}` = 1.
    pub plugin_info: Tracked<IntGaugeVec>,
    /// `plugvisor_reloads_total{plugin,outcome}`.
    pub reloads_total: Tracked<IntCounterVec>,
    /// `plugvisor_reload_duration_seconds{plugin,phase}`.
    pub reload_duration_seconds: PhaseHistogramVec,
    /// `plugvisor_kernel_reload_duration_seconds{plugin}`.
    pub kernel_reload_duration_seconds: TrackedHistogramVec,
    /// `plugvisor_kernel_crash_recovery_seconds{plugin}`: a plugin host's
    /// exit to the first answer by its replacement, in the kernel's clock.
    pub kernel_crash_recovery_seconds: HistogramVec,
    /// `plugvisor_requests_total{plugin,version,outcome}`.
    pub requests_total: IntCounterVec,
    /// `plugvisor_dependency_conflicts{plugin,kind}`: 1 while the conflict
    /// stands, 0 once it is resolved.
    pub dependency_conflicts: Tracked<IntGaugeVec>,
    /// `plugvisor_tcp_connections{listener}` (kernel-observed).
    pub tcp_connections: IntGaugeVec,
    /// `plugvisor_reload_broken_connections_total{listener,protocol}` (kernel-observed).
    pub reload_broken_connections_total: IntCounterVec,
    /// `plugvisor_crash_broken_connections_total{listener,protocol}`
    /// (kernel-observed): connections plugvisor closed, or that were reset,
    /// while a plugin host's crash was not yet recovered from.
    pub crash_broken_connections_total: IntCounterVec,
    /// `plugvisor_upgrade_broken_connections_total{listener,protocol}`
    /// (kernel: closed by plugvisor or reset while this process took over
    /// from the one it replaced).
    pub upgrade_broken_connections_total: IntCounterVec,
    /// `plugvisor_probe_up{probe}`.
    pub probe_up: Tracked<IntGaugeVec>,
    /// `plugvisor_probe_failures_total{probe,stage}`.
    pub probe_failures_total: Tracked<IntCounterVec>,
    /// `plugvisor_probe_events_dropped_total{probe}`.
    pub probe_events_dropped_total: IntCounterVec,
    /// `plugvisor_tcp_resets_total{listener,direction}` (kernel-observed).
    pub tcp_resets_total: IntCounterVec,
    /// `plugvisor_tcp_retransmits_total{listener}` (kernel-observed).
    pub tcp_retransmits_total: IntCounterVec,
    /// `plugvisor_grpc_goaway_total{listener}` (server-sent, kernel-observed).
    pub grpc_goaway_total: IntCounterVec,
    /// `plugvisor_grpc_stream_resets_total{listener}` (server-sent RST_STREAM, kernel-observed).
    pub grpc_stream_resets_total: IntCounterVec,
    /// `plugvisor_service_gap_seconds{listener,window}` (kernel log2 histogram).
    pub service_gap_seconds: Arc<KernelHistogramVec>,
    /// `plugvisor_rule_state{rule}`: 0 ok, 1 pending, 2 firing.
    pub rule_state: Tracked<IntGaugeVec>,
    /// `plugvisor_rules_config_valid`: 0 while the thresholds file on disk is invalid.
    pub rules_config_valid: prometheus::IntGauge,
    /// `plugvisor_rollbacks_total{plugin,reason}`.
    pub rollbacks_total: Tracked<IntCounterVec>,
    /// `plugvisor_upgrades_total{outcome}`: upgrades of plugvisor itself.
    pub upgrades_total: Tracked<IntCounterVec>,
    /// `plugvisor_connections_handed_over_total{listener}`: raw TCP
    /// connections this process took over from the one it replaced.
    pub connections_handed_over_total: Tracked<IntCounterVec>,
    /// `plugvisor_sync_state{plugin,state}`: 1 for each plugin's current
    /// fleet sync state, 0 for the others.
    pub sync_state: Tracked<IntGaugeVec>,
    /// `plugvisor_sync_last_success_timestamp_seconds` (no labels).
    pub sync_last_success_timestamp_seconds: GaugeVec,
    /// `plugvisor_sync_download_bytes_total` (no labels): metadata and
    /// targets fetched from the repository.
    pub sync_download_bytes_total: IntCounterVec,
    /// `plugvisor_sync_errors_total{stage}`.
    pub sync_errors_total: Tracked<IntCounterVec>,
    /// `plugvisor_report_connected` (no labels): 1 while the MQTT link
    /// stands.
    pub report_connected: IntGaugeVec,
    /// `plugvisor_report_events_total{outcome}`: published, dropped.
    pub report_events_total: IntCounterVec,
    /// `plugvisor_report_outbox_events` (no labels).
    pub report_outbox_events: IntGaugeVec,
    /// `plugvisor_report_last_publish_timestamp_seconds` (no labels).
    pub report_last_publish_timestamp_seconds: GaugeVec,
    /// `plugvisor_degradations_total{plugin,reason}`.
    pub degradations_total: Tracked<IntCounterVec>,
    /// `plugvisor_degraded{plugin}`: 1 while degraded.
    pub degraded: Tracked<IntGaugeVec>,
    /// `plugvisor_cgroup_memory_current_bytes` (no labels; absent where
    /// the daemon's memory cgroup cannot be read).
    pub cgroup_memory_current_bytes: GaugeVec,
    /// `plugvisor_cgroup_memory_max_bytes` (no labels; `+Inf` when the
    /// cgroup has no limit, absent where it cannot be read).
    pub cgroup_memory_max_bytes: GaugeVec,
    /// `plugvisor_system_memory_available_bytes` (no labels; `MemAvailable`).
    pub system_memory_available_bytes: GaugeVec,
    /// `plugvisor_state_dir_free_bytes` (no labels; statvfs of `state_dir`).
    pub state_dir_free_bytes: GaugeVec,
    /// `plugvisor_health_check_up{check,plugin}`: 1 up, 0 down, absent
    /// until the first verdict.
    pub health_check_up: Tracked<IntGaugeVec>,
    /// `plugvisor_health_check_duration_seconds{check,plugin}`.
    pub health_check_duration_seconds: HistogramVec,
    /// `plugvisor_health_check_failures_total{check,plugin}`.
    pub health_check_failures_total: IntCounterVec,
    /// `plugvisor_plugin_call_timeouts_total{plugin,call}`: calls into a
    /// plugin that overran their bound and were given up on.
    pub plugin_call_timeouts_total: IntCounterVec,
    /// `plugvisor_plugin_calls_stuck{plugin,call}`: calls given up on that
    /// still run (each holds a thread and keeps its version mapped).
    pub plugin_calls_stuck: IntGaugeVec,
    /// `plugvisor_plugin_calls_shed_total{plugin,call}`: calls not made
    /// because too many earlier ones are stuck.
    pub plugin_calls_shed_total: IntCounterVec,
    /// `plugvisor_plugin_host_restarts_total{plugin,reason}`: plugin host
    /// processes that died while serving and were replaced, by why.
    pub plugin_host_restarts_total: Tracked<IntCounterVec>,
    /// `plugvisor_plugin_isolation{plugin,mode,limits}` = 1: where the
    /// plugin's code runs and what bounds its resources.
    pub plugin_isolation: Tracked<IntGaugeVec>,
    /// `plugvisor_crash_recovery_seconds{plugin}`: a host's death to the
    /// first answer by what replaced it.
    pub crash_recovery_seconds: HistogramVec,
    /// `plugvisor_plugin_memory_bytes{plugin,version}`: memory the kernel
    /// charges to that version's plugin host (its cgroup, else its RSS).
    pub plugin_memory_bytes: GaugeVec,
    /// `plugvisor_plugin_cpu_seconds_total{plugin,version}`: CPU time its
    /// hosts used, user and system.
    pub plugin_cpu_seconds_total: CounterVec,
    /// `plugvisor_plugin_threads{plugin,version}`: threads in its host.
    pub plugin_threads: IntGaugeVec,
    /// Run before every gather, so values read from elsewhere (the
    /// kernel's maps) are current at the moment they are read.
    refreshers: Mutex<Vec<Refresher>>,
    /// Families kept out of `registry`, encoded once per change.
    cached: Vec<Cached>,
    detail: Detail,
    /// The size of the last encoding, so the next one allocates once.
    last_len: AtomicUsize,
    // Every plugvisor family as declared, series or not (a gather leaves
    // out a labelled family with no series yet).
    families: Vec<Family>,
}

/// One declared family: its name and its label names, in order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Family {
    /// The family name (`plugvisor_reloads_total`).
    pub name: String,
    /// Its label names.
    pub labels: Vec<String>,
}

/// The registry being filled, and the families declared into it.
struct Declared<'a> {
    registry: &'a Registry,
    families: Mutex<Vec<Family>>,
    cached: Mutex<Vec<Cached>>,
}

impl Declared<'_> {
    fn declare(&self, desc: &[&Desc]) {
        let mut families = self.families.lock().expect("families lock");
        families.extend(desc.iter().map(|d| Family {
            name: d.fq_name.clone(),
            labels: d.variable_labels.clone(),
        }));
    }

    fn register(&self, c: Box<dyn Collector>) -> prometheus::Result<()> {
        self.declare(&c.desc());
        self.registry.register(c)
    }

    /// A family encoded once per change ([`cached`]), outside the registry.
    fn register_cached(&self, c: Cached) {
        self.declare(&c.desc());
        self.cached.lock().expect("cached lock").push(c);
    }
}

/// A hook that brings some families up to date before a gather.
pub type Refresher = Box<dyn Fn() + Send + Sync>;

/// Default buckets of every latency histogram: 100 µs to 5 s in 11
/// buckets (14 series with `+Inf`, `_sum`, `_count`), 1-2.5-5 steps where
/// plugvisor's latencies live — reloads ~1–20 ms, kernel reload windows
/// ~0.5–1 ms — and wider ones above, where health checks and crash
/// recoveries time out. A doubling scale from 10 µs was 24 series a
/// histogram, most of a 50-plugin node's scrape
/// (`docs/MONITORING.md#series-budget`).
const LATENCY_BUCKETS: [f64; 11] = [
    100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1.0, 5.0,
];

/// Buckets of the reload phases with `[metrics] detail = ["reload_phases"]`:
/// 10 µs … ~10 s, doubling, so the µs-scale phases (switch, publish,
/// init) are resolved too.
fn fine_latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(10e-6, 2.0, 21).expect("static bucket spec")
}

/// Which detail series a registry exports beyond the default set
/// (`[metrics] detail`; the series budget in `docs/MONITORING.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "four independent opt-ins, each yes or no; not states of one thing"
)]
pub struct Detail {
    /// Buckets for every reload phase on the fine scale, not only `total`.
    pub reload_phases: bool,
    /// Every log2 bucket of the kernel's service-gap histograms.
    pub service_gap: bool,
    /// Buckets for the crash recoveries, daemon and kernel side (else
    /// `_sum` and `_count` only).
    pub crash_recovery: bool,
    /// Buckets for the health checks' durations (else `_sum` and
    /// `_count` only).
    pub health_checks: bool,
}

impl Metrics {
    /// Creates and registers every family, plus the process collector,
    /// with the default set of series.
    pub fn new() -> Metrics {
        Metrics::with_detail(Detail::default())
    }

    /// Like [`Metrics::new`], with the detail series `detail` opts into.
    #[expect(
        clippy::too_many_lines,
        reason = "one declaration per family, in one place, is the point of this module"
    )]
    pub fn with_detail(detail: Detail) -> Metrics {
        let registry = Registry::new();
        let declared = Declared {
            registry: &registry,
            families: Mutex::new(Vec::new()),
            cached: Mutex::new(Vec::new()),
        };
        let r = &declared;
        let m = Metrics {
            build_info: tracked_gauge(
                r,
                "plugvisor_build_info",
                "plugvisor build; value is 1",
                &["version"],
            ),
            plugin_info: tracked_gauge(
                r,
                "plugvisor_plugin_info",
                "Mapped plugin versions and their state; value is 1",
                &["plugin", "version", "state"],
            ),
            reloads_total: tracked_counter(
                r,
                "plugvisor_reloads_total",
                "Reload attempts by outcome (success, rejected, failed)",
                &["plugin", "outcome"],
            ),
            reload_duration_seconds: {
                let h = PhaseHistogramVec::new(
                    "plugvisor_reload_duration_seconds",
                    "Userspace-measured reload latency by phase (verify, stage, load, init, switch, publish, total); \
                     buckets for total only unless [metrics] detail has reload_phases",
                    detail.reload_phases,
                );
                r.register_cached(h.cached());
                h
            },
            kernel_reload_duration_seconds: {
                let h = TrackedHistogramVec::new(
                    "plugvisor_kernel_reload_duration_seconds",
                    "Reload window length measured in the kernel between the reload-begin and reload-end uprobes",
                    &["plugin"],
                );
                r.register_cached(h.cached());
                h
            },
            kernel_crash_recovery_seconds: histogram_or_count(
                detail.crash_recovery,
                r,
                "plugvisor_kernel_crash_recovery_seconds",
                "From a plugin host's exit (sched_process_exit) to the first answer by its replacement (uprobe), in the kernel's clock",
                &["plugin"],
            ),
            requests_total: counter(
                r,
                "plugvisor_requests_total",
                "Requests handled, by the plugin version that handled them",
                &["plugin", "version", "outcome"],
            ),
            dependency_conflicts: tracked_gauge(
                r,
                "plugvisor_dependency_conflicts",
                "1 while a plugin has a dependency conflict of this kind (missing, version, cycle, conflict, abi), 0 once resolved",
                &["plugin", "kind"],
            ),
            tcp_connections: gauge(
                r,
                "plugvisor_tcp_connections",
                "Established server-side TCP connections per listener, as the kernel sees them",
                &["listener"],
            ),
            reload_broken_connections_total: counter(
                r,
                "plugvisor_reload_broken_connections_total",
                "Connections that were closed or reset while a reload window was open, as the kernel saw them",
                &["listener", "protocol"],
            ),
            upgrade_broken_connections_total: counter(
                r,
                "plugvisor_upgrade_broken_connections_total",
                "Connections plugvisor closed, or that were reset, while this process took over from the plugvisor it replaced, until that one was gone (kernel-observed; a client's own hang-up is not counted)",
                &["listener", "protocol"],
            ),
            crash_broken_connections_total: counter(
                r,
                "plugvisor_crash_broken_connections_total",
                "Connections that plugvisor closed, or that were reset, between a plugin host's death and the first answer by its replacement, as the kernel saw them",
                &["listener", "protocol"],
            ),
            probe_up: tracked_gauge(
                r,
                "plugvisor_probe_up",
                "1 while the eBPF probe is loaded and attached",
                &["probe"],
            ),
            probe_failures_total: tracked_counter(
                r,
                "plugvisor_probe_failures_total",
                "eBPF probe failures by stage (load, attach, read)",
                &["probe", "stage"],
            ),
            probe_events_dropped_total: counter(
                r,
                "plugvisor_probe_events_dropped_total",
                "Ring buffer records the kernel could not reserve",
                &["probe"],
            ),
            tcp_resets_total: counter(
                r,
                "plugvisor_tcp_resets_total",
                "TCP resets on the server side of a listener, sent or received, as the kernel saw them",
                &["listener", "direction"],
            ),
            tcp_retransmits_total: counter(
                r,
                "plugvisor_tcp_retransmits_total",
                "TCP segments the server side of a listener retransmitted, as the kernel saw them",
                &["listener"],
            ),
            grpc_goaway_total: counter(
                r,
                "plugvisor_grpc_goaway_total",
                "HTTP/2 GOAWAY frames sent by a gRPC listener, seen on the wire by the kernel",
                &["listener"],
            ),
            grpc_stream_resets_total: counter(
                r,
                "plugvisor_grpc_stream_resets_total",
                "HTTP/2 RST_STREAM frames sent by a gRPC listener, seen on the wire by the kernel",
                &["listener"],
            ),
            service_gap_seconds: {
                let h = Arc::new(KernelHistogramVec::new(
                    "plugvisor_service_gap_seconds",
                    "Kernel-measured time from a request's bytes being read to the next response bytes \
                     being written, by whether a reload window was open (window: reload, steady)",
                    &["listener", "window"],
                ));
                r.register_cached(Cached::new(
                    Box::new(KernelHistogramCollector(h.clone())),
                    h.generation.clone(),
                ));
                h
            },
            rule_state: tracked_gauge(
                r,
                "plugvisor_rule_state",
                "State of each thresholds rule: 0 ok, 1 pending, 2 firing",
                &["rule"],
            ),
            rules_config_valid: {
                let g = prometheus::IntGauge::new(
                    "plugvisor_rules_config_valid",
                    "1 when the thresholds file in force is the one on disk; 0 while the file on disk is invalid",
                )
                .expect("valid metric definition");
                r.register(Box::new(g.clone()))
                    .expect("each family registers once");
                g.set(1);
                g
            },
            rollbacks_total: tracked_counter(
                r,
                "plugvisor_rollbacks_total",
                "Rollbacks by plugin and reason (the rule's name, manual, or crash-in-trial)",
                &["plugin", "reason"],
            ),
            upgrades_total: tracked_counter(
                r,
                "plugvisor_upgrades_total",
                "Upgrades of plugvisor itself by outcome: success (counted by the new process), check_failed, failed (counted by the old one, which serves on)",
                &["outcome"],
            ),
            connections_handed_over_total: tracked_counter(
                r,
                "plugvisor_connections_handed_over_total",
                "Raw TCP connections this process took over, open, from the plugvisor it replaced",
                &["listener"],
            ),
            sync_state: tracked_gauge(
                r,
                "plugvisor_sync_state",
                "Fleet sync state per plugin: 1 for the current one of synced, pending, stale, blocked, expired",
                &["plugin", "state"],
            ),
            sync_last_success_timestamp_seconds: float_gauge(
                r,
                "plugvisor_sync_last_success_timestamp_seconds",
                "When the TUF repository was last read and verified (Unix seconds; absent until it has been)",
                &[],
            ),
            sync_download_bytes_total: counter(
                r,
                "plugvisor_sync_download_bytes_total",
                "Bytes fetched from the TUF repository: metadata and package files",
                &[],
            ),
            sync_errors_total: tracked_counter(
                r,
                "plugvisor_sync_errors_total",
                "Fleet sync failures by stage: timestamp, snapshot, targets, download, verify, commit",
                &["stage"],
            ),
            report_connected: gauge(
                r,
                "plugvisor_report_connected",
                "1 while the MQTT link to the coordinator's broker stands ([report.mqtt])",
                &[],
            ),
            report_events_total: counter(
                r,
                "plugvisor_report_events_total",
                "Events reported over MQTT by outcome: published (acknowledged by the broker), dropped (the outbox's bound)",
                &["outcome"],
            ),
            report_outbox_events: gauge(
                r,
                "plugvisor_report_outbox_events",
                "Events in the on-disk outbox, waiting for the broker's PUBACK",
                &[],
            ),
            report_last_publish_timestamp_seconds: float_gauge(
                r,
                "plugvisor_report_last_publish_timestamp_seconds",
                "When the broker last acknowledged an event (Unix seconds; absent until it has)",
                &[],
            ),
            degradations_total: tracked_counter(
                r,
                "plugvisor_degradations_total",
                "Degradations by plugin and reason (the rule's name)",
                &["plugin", "reason"],
            ),
            degraded: tracked_gauge(
                r,
                "plugvisor_degraded",
                "1 while the plugin is degraded",
                &["plugin"],
            ),
            cgroup_memory_current_bytes: float_gauge(
                r,
                "plugvisor_cgroup_memory_current_bytes",
                "Memory charged to plugvisor's own cgroup (v2 memory.current, v1 memory.usage_in_bytes)",
                &[],
            ),
            cgroup_memory_max_bytes: float_gauge(
                r,
                "plugvisor_cgroup_memory_max_bytes",
                "Memory limit of plugvisor's own cgroup (v2 memory.max, v1 memory.limit_in_bytes); +Inf when unlimited",
                &[],
            ),
            system_memory_available_bytes: float_gauge(
                r,
                "plugvisor_system_memory_available_bytes",
                "Memory available for new work on this node without swapping (/proc/meminfo MemAvailable)",
                &[],
            ),
            state_dir_free_bytes: float_gauge(
                r,
                "plugvisor_state_dir_free_bytes",
                "Bytes an unprivileged writer can still write on the filesystem holding state_dir (statvfs f_bavail)",
                &[],
            ),
            health_check_up: tracked_gauge(
                r,
                "plugvisor_health_check_up",
                "1 while a health check passes, 0 once it is down (plugin:<name> checks are the plugin's own health hook)",
                &["check", "plugin"],
            ),
            health_check_duration_seconds: histogram_or_count(
                detail.health_checks,
                r,
                "plugvisor_health_check_duration_seconds",
                "Time each health check attempt took, failed ones included",
                &["check", "plugin"],
            ),
            health_check_failures_total: counter(
                r,
                "plugvisor_health_check_failures_total",
                "Health check attempts that failed",
                &["check", "plugin"],
            ),
            plugin_call_timeouts_total: counter(
                r,
                "plugvisor_plugin_call_timeouts_total",
                "Calls into a plugin (init, handle) that overran their timeout and were given up on",
                &["plugin", "call"],
            ),
            plugin_calls_stuck: gauge(
                r,
                "plugvisor_plugin_calls_stuck",
                "Calls given up on after their timeout that still run, each holding a thread and its version mapped",
                &["plugin", "call"],
            ),
            plugin_calls_shed_total: counter(
                r,
                "plugvisor_plugin_calls_shed_total",
                "Calls refused without calling the plugin because too many earlier calls are stuck",
                &["plugin", "call"],
            ),
            plugin_host_restarts_total: tracked_counter(
                r,
                "plugvisor_plugin_host_restarts_total",
                "Plugin host processes that died while serving, by reason (segfault, abort, oom, hang, exit, signal)",
                &["plugin", "reason"],
            ),
            plugin_isolation: tracked_gauge(
                r,
                "plugvisor_plugin_isolation",
                "1 for where each plugin's code runs (mode: process, in-process) and what bounds its resources (limits: cgroup2, cgroup1, rlimit, none)",
                &["plugin", "mode", "limits"],
            ),
            crash_recovery_seconds: histogram_or_count(
                detail.crash_recovery,
                r,
                "plugvisor_crash_recovery_seconds",
                "From a plugin host's death to the first answer by the version that replaced it",
                &["plugin"],
            ),
            plugin_memory_bytes: float_gauge(
                r,
                "plugvisor_plugin_memory_bytes",
                "Memory the kernel charges to each mapped version's plugin host (its cgroup; its resident set on a node without cgroups)",
                &["plugin", "version"],
            ),
            plugin_cpu_seconds_total: float_counter(
                r,
                "plugvisor_plugin_cpu_seconds_total",
                "CPU time (user and system) used by each version's plugin hosts, as the kernel counts it",
                &["plugin", "version"],
            ),
            plugin_threads: gauge(
                r,
                "plugvisor_plugin_threads",
                "Threads in each mapped version's plugin host (its cgroup's tasks, else its own)",
                &["plugin", "version"],
            ),
            families: declared.families.into_inner().expect("families lock"),
            cached: declared.cached.into_inner().expect("cached lock"),
            detail,
            last_len: AtomicUsize::new(0),
            registry,
            refreshers: Mutex::new(Vec::new()),
        };
        m.build_info
            .update(&[env!("CARGO_PKG_VERSION")], |g| g.set(1));
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            m.registry
                .register(Box::new(pc))
                .expect("process collector registers once");
        }
        m
    }

    /// The detail series this registry exports beyond the default set.
    pub fn detail(&self) -> Detail {
        self.detail
    }

    /// Every plugvisor family this registry declares, with its label
    /// names — also those with no series yet (the standard `process_*`
    /// families are not among them).
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// Registers a hook run before every [`Metrics::gather`].
    pub fn add_refresher(&self, f: Refresher) {
        self.refreshers.lock().expect("refreshers lock").push(f);
    }

    fn refresh(&self) {
        for f in self.refreshers.lock().expect("refreshers lock").iter() {
            f();
        }
    }

    /// Current values of every family (refreshers run first).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.refresh();
        let mut families = self.registry.gather();
        families.extend(self.cached.iter().flat_map(Cached::collect));
        families
    }

    /// The text exposition of every family: the registry's, encoded now,
    /// then each cached family's, encoded again only if it changed.
    pub fn encode(&self) -> Vec<u8> {
        self.refresh();
        let mut buf = Vec::with_capacity(self.last_len.load(Ordering::Relaxed) + 4096);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding into a Vec cannot fail");
        for c in &self.cached {
            c.encode_into(&mut buf);
        }
        self.last_len.store(buf.len(), Ordering::Relaxed);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn gauge(r: &Declared<'_>, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("each family registers once");
    g
}

/// A gauge family that changes only through the record functions,
/// encoded once per change.
fn tracked_gauge(
    r: &Declared<'_>,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Tracked<IntGaugeVec> {
    let t = Tracked::new(
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition"),
    );
    r.register_cached(t.cached());
    t
}

/// A counter family of rare events, encoded once per change.
fn tracked_counter(
    r: &Declared<'_>,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Tracked<IntCounterVec> {
    let t = Tracked::new(
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition"),
    );
    r.register_cached(t.cached());
    t
}

/// A float gauge: `+Inf` (an unlimited cgroup) is a value an integer gauge
/// cannot hold, and byte counts stay exact up to 2^53 (8 PiB).
fn float_gauge(r: &Declared<'_>, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(g.clone()))
        .expect("each family registers once");
    g
}

/// A float counter: CPU seconds are not whole.
fn float_counter(r: &Declared<'_>, name: &str, help: &str, labels: &[&str]) -> CounterVec {
    let c = CounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("each family registers once");
    c
}

fn counter(r: &Declared<'_>, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(c.clone()))
        .expect("each family registers once");
    c
}

fn histogram(r: &Declared<'_>, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric definition");
    r.register(Box::new(h.clone()))
        .expect("each family registers once");
    h
}

/// A latency histogram with [`LATENCY_BUCKETS`] when `buckets`, else with
/// `_sum` and `_count` only (a lone `+Inf` bucket): per-plugin families of
/// events an operator counts and averages (a crash recovery, a health
/// check) but rarely reads a quantile of, at 3 series a plugin instead of
/// 14.
fn histogram_or_count(
    buckets: bool,
    r: &Declared<'_>,
    name: &str,
    help: &str,
    labels: &[&str],
) -> HistogramVec {
    if buckets {
        return histogram(r, name, help, labels);
    }
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(vec![f64::INFINITY]),
        labels,
    )
    .expect("valid metric definition");
    r.register(Box::new(h.clone()))
        .expect("each family registers once");
    h
}

/// A histogram family whose buckets are counted elsewhere (in the kernel)
/// and copied in whole at gather time.
pub struct KernelHistogramVec {
    desc: Desc,
    name: String,
    help: String,
    labels: Vec<String>,
    series: Mutex<BTreeMap<Vec<String>, HistogramSnapshot>>,
    generation: Generation,
}

/// One series of a [`KernelHistogramVec`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, cumulative count), ascending; `+Inf` implied by `count`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of observations, seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl KernelHistogramVec {
    fn new(name: &str, help: &str, labels: &[&str]) -> Self {
        let desc = Desc::new(
            name.to_owned(),
            help.to_owned(),
            labels.iter().map(|l| (*l).to_owned()).collect(),
            std::collections::HashMap::new(),
        )
        .expect("valid metric definition");
        KernelHistogramVec {
            desc,
            name: name.to_owned(),
            help: help.to_owned(),
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            series: Mutex::new(BTreeMap::new()),
            generation: Generation::default(),
        }
    }

    /// Replaces the series with label values `values`; the family's text
    /// is encoded again only if this changed it (an idle listener's
    /// histograms do not change between scrapes).
    pub fn set(&self, values: &[&str], snapshot: HistogramSnapshot) {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let mut series = self.series.lock().expect("histogram lock");
        if series.get(&key) != Some(&snapshot) {
            series.insert(key, snapshot);
            drop(series);
            self.generation.bump();
        }
    }
}

struct KernelHistogramCollector(Arc<KernelHistogramVec>);

impl Collector for KernelHistogramCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let h = &self.0;
        let series = h.series.lock().expect("histogram lock");
        if series.is_empty() {
            return Vec::new();
        }
        let mut mf = proto::MetricFamily::default();
        mf.set_name(h.name.clone());
        mf.set_help(h.help.clone());
        mf.set_field_type(proto::MetricType::HISTOGRAM);
        for (values, snap) in series.iter() {
            let mut m = proto::Metric::default();
            let labels = h
                .labels
                .iter()
                .zip(values)
                .map(|(name, value)| {
                    let mut lp = proto::LabelPair::default();
                    lp.set_name(name.clone());
                    lp.set_value(value.clone());
                    lp
                })
                .collect();
            m.set_label(labels);
            let mut hist = proto::Histogram::default();
            hist.set_sample_count(snap.count);
            hist.set_sample_sum(snap.sum);
            let buckets = snap
                .buckets
                .iter()
                .map(|&(le, cumulative)| {
                    let mut b = proto::Bucket::default();
                    b.set_upper_bound(le);
                    b.set_cumulative_count(cumulative);
                    b
                })
                .collect();
            hist.set_bucket(buckets);
            m.set_histogram(hist);
            mf.mut_metric().push(m);
        }
        vec![mf]
    }
}

/// Serves `GET /metrics` on `listener` (bound by the caller, or inherited
/// from the process this one replaced) until `shutdown` resolves.
pub fn serve(
    listener: std::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use axum::{Router, http::header, routing::get};
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metrics reference operators read (`docs/MONITORING.md`) names
    /// exactly the families the daemon declares, with their labels in
    /// order: a family added, renamed or relabelled without its row (or a
    /// row left behind) fails here.
    #[test]
    fn the_metrics_reference_lists_every_family_with_its_labels() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/MONITORING.md");
        let text = std::fs::read_to_string(path).unwrap();
        let mut documented = std::collections::BTreeSet::new();
        for row in text.lines().filter(|l| l.starts_with("| `")) {
            let first = row.split(" | ").next().unwrap();
            for token in first.split('`').skip(1).step_by(2) {
                let (name, labels) = match token.split_once('{') {
                    Some((n, l)) => (n, l.trim_end_matches('}')),
                    None => (token, ""),
                };
                let is_family = name.starts_with("plugvisor_")
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if is_family {
                    documented.insert(Family {
                        name: name.to_owned(),
                        labels: labels
                            .split(',')
                            .filter(|l| !l.is_empty())
                            .map(str::to_owned)
                            .collect(),
                    });
                }
            }
        }
        let declared: std::collections::BTreeSet<Family> =
            Metrics::new().families().iter().cloned().collect();
        let missing: Vec<_> = declared.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&declared).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "docs/MONITORING.md and the registry disagree.\nDeclared, not documented: {missing:?}\nDocumented, not declared: {stale:?}"
        );
        assert!(
            declared.len() > 30,
            "only {} families declared",
            declared.len()
        );
    }

    /// A cached family's text follows every change made through the
    /// record functions — a value, a new series, a removed one — and a
    /// histogram's text follows its observations.
    #[test]
    fn cached_families_are_encoded_again_after_each_change() {
        let m = Metrics::new();
        let text = |m: &Metrics| String::from_utf8(m.encode()).unwrap();
        m.plugin_at_zero("echo", &["manual"]);
        let t = text(&m);
        assert!(t.contains("plugvisor_degraded{plugin=\"echo\"} 0"), "{t}");
        assert!(
            t.contains("plugvisor_dependency_conflicts{kind=\"cycle\",plugin=\"echo\"} 0"),
            "{t}"
        );
        m.set_degraded("echo", true);
        m.reload("echo", ReloadOutcome::Rejected);
        m.plugin_info("echo", "1.0.0", "active");
        let t = text(&m);
        assert!(t.contains("plugvisor_degraded{plugin=\"echo\"} 1"), "{t}");
        assert!(
            t.contains("plugvisor_reloads_total{outcome=\"rejected\",plugin=\"echo\"} 1"),
            "{t}"
        );
        assert!(
            t.contains(
                "plugvisor_plugin_info{plugin=\"echo\",state=\"active\",version=\"1.0.0\"} 1"
            ),
            "{t}"
        );
        m.forget_plugin_info("echo", "1.0.0", "active");
        assert!(!text(&m).contains("plugvisor_plugin_info{"));
        m.reload_phase("echo", Phase::Total, std::time::Duration::from_millis(3));
        m.reload_phase("echo", Phase::Switch, std::time::Duration::from_micros(2));
        let t = text(&m);
        assert!(
            t.contains("plugvisor_reload_duration_seconds_bucket{phase=\"total\",plugin=\"echo\",le=\"0.005\"} 1"),
            "{t}"
        );
        assert!(
            t.contains(
                "plugvisor_reload_duration_seconds_count{phase=\"switch\",plugin=\"echo\"} 1"
            ),
            "{t}"
        );
        assert!(
            !t.contains("plugvisor_reload_duration_seconds_bucket{phase=\"switch\",plugin=\"echo\",le=\"0.005\"}"),
            "by default only the total has buckets: {t}"
        );
        m.reload_phase("echo", Phase::Total, std::time::Duration::from_millis(3));
        assert!(text(&m).contains(
            "plugvisor_reload_duration_seconds_count{phase=\"total\",plugin=\"echo\"} 2"
        ));
        // Each family once, and the rules engine sees the cached ones too.
        let t = text(&m);
        assert_eq!(
            t.matches("# TYPE plugvisor_reload_duration_seconds histogram")
                .count(),
            1
        );
        assert!(m.gather().iter().any(|f| f.name() == "plugvisor_degraded"));
    }

    /// With `[metrics] detail = ["reload_phases"]` every phase has buckets.
    #[test]
    fn reload_phase_detail_buckets_every_phase() {
        let m = Metrics::with_detail(Detail {
            reload_phases: true,
            ..Detail::default()
        });
        m.reload_phase("echo", Phase::Switch, std::time::Duration::from_micros(2));
        let t = String::from_utf8(m.encode()).unwrap();
        assert!(
            t.contains("plugvisor_reload_duration_seconds_bucket{phase=\"switch\",plugin=\"echo\",le=\"0.00002\"} 1"),
            "{t}"
        );
    }

    #[test]
    fn families_are_exported_with_contract_names() {
        let m = Metrics::new();
        m.reload("echo", ReloadOutcome::Success);
        m.probe_up.update(&["inet_sock_set_state"], |g| g.set(1));
        let text = String::from_utf8(m.encode()).unwrap();
        for family in [
            "plugvisor_build_info",
            "plugvisor_reloads_total{outcome=\"success\",plugin=\"echo\"} 1",
            "plugvisor_probe_up{probe=\"inet_sock_set_state\"} 1",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(family), "missing {family} in\n{text}");
        }
    }
}
