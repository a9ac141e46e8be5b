//! The one vocabulary of control: signals, the `plugins_dir` watcher and
//! the admin socket all become a [`Command`] for the daemon task, which
//! applies them one at a time (reloads never overlap).
pub mod socket;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::actions::ActionReport;
use crate::reload::ReloadReport;
use crate::rules::RuleStatus;

/// A request to the daemon task.
#[derive(Debug)]
pub enum Command {
    /// Look at packages and switch those that changed.
    Rescan {
        /// Only these plugins (`None` = every package and every slot).
        plugins: Option<Vec<String>>,
        /// Re-process manifests even if their bytes were seen before.
        force: bool,
        /// Where to send the reports (the admin socket waits on it).
        reply: Option<oneshot::Sender<Vec<ReloadReport>>>,
    },
    /// Report the current state.
    Status {
        /// Where to send it.
        reply: oneshot::Sender<Status>,
    },
    /// `plugvisor rollback PLUGIN [--to VERSION]`.
    Rollback {
        /// The plugin.
        plugin: String,
        /// The version to go to (default: known-good).
        to: Option<String>,
        /// Where to send the outcome.
        reply: oneshot::Sender<Result<ActionReport, String>>,
    },
    /// `plugvisor disable|enable PLUGIN`.
    SetEnabled {
        /// The plugin.
        plugin: String,
        /// Enable (true) or disable.
        enabled: bool,
        /// Where to send the outcome.
        reply: oneshot::Sender<Result<ActionReport, String>>,
    },
    /// `plugvisor versions PLUGIN`.
    Versions {
        /// The plugin.
        plugin: String,
        /// Where to send them.
        reply: oneshot::Sender<Result<Versions, String>>,
    },
    /// `plugvisor upgrade [--binary PATH]` (or `SIGUSR2`, with no reply).
    Upgrade {
        /// The new binary (default: the one this daemon was started from).
        binary: Option<std::path::PathBuf>,
        /// Where to send the outcome, once the new process serves or
        /// has failed to.
        reply: Option<oneshot::Sender<Result<UpgradeReport, String>>>,
    },
}

/// What `plugvisor upgrade` reports when the new process serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// The process that was replaced (it drains its gRPC connections and
    /// exits).
    pub old_pid: u32,
    /// The process that serves now.
    pub new_pid: u32,
    /// The binary it runs.
    pub binary: String,
    /// Raw TCP connections moved to it, open, per listener.
    pub connections_moved: std::collections::BTreeMap<String, u64>,
    /// Milliseconds from the start of the upgrade to the new process's
    /// "ready".
    pub ready_ms: u64,
    /// Plugin hosts the new process adopted (running on, `init` not run
    /// again), of those this one had.
    #[serde(default)]
    pub hosts_adopted: usize,
    /// Plugin hosts this one had.
    #[serde(default)]
    pub hosts: usize,
}

/// `plugvisor versions PLUGIN`: what the store and the slot know.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versions {
    /// The plugin.
    pub plugin: String,
    /// Serving now.
    pub active: Option<String>,
    /// Last version that passed its trial.
    pub known_good: Option<String>,
    /// Whether `active` is on trial.
    pub on_trial: bool,
    /// Mapped in memory (instant rollback targets).
    pub mapped: Vec<String>,
    /// Activated, oldest first.
    pub history: Vec<String>,
    /// Rolled back from; refused until a newer version.
    pub quarantined: Vec<String>,
}

/// A request on the admin socket (one JSON object per line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum AdminRequest {
    /// `plugvisor status`.
    Status,
    /// `plugvisor reload PLUGIN`.
    Reload {
        /// The plugin.
        plugin: String,
    },
    /// `plugvisor rollback PLUGIN [--to VERSION]`.
    Rollback {
        /// The plugin.
        plugin: String,
        /// The version to go to (default: known-good).
        #[serde(default)]
        to: Option<String>,
    },
    /// `plugvisor versions PLUGIN`.
    Versions {
        /// The plugin.
        plugin: String,
    },
    /// `plugvisor disable PLUGIN`.
    Disable {
        /// The plugin.
        plugin: String,
    },
    /// `plugvisor enable PLUGIN`.
    Enable {
        /// The plugin.
        plugin: String,
    },
    /// `plugvisor upgrade [--binary PATH]`.
    Upgrade {
        /// The new binary (default: the one the daemon was started from).
        #[serde(default)]
        binary: Option<std::path::PathBuf>,
    },
}

/// The answer on the admin socket (one JSON object per line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminResponse {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The result (shape depends on the request).
    #[serde(default)]
    pub result: serde_json::Value,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// State as `plugvisor status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// plugvisor's version.
    pub version: String,
    /// Per plugin.
    pub plugins: Vec<PluginStatus>,
    /// Per listener.
    pub listeners: Vec<ListenerStatus>,
    /// Probe name → up.
    pub probes: Vec<(String, bool)>,
    /// Thresholds rules and their state.
    #[serde(default)]
    pub rules: Vec<RuleStatus>,
    /// Whether the thresholds file on disk is the one in force.
    #[serde(default = "yes")]
    pub rules_config_valid: bool,
    /// Dependency conflicts that stand now (empty when all is resolved).
    #[serde(default)]
    pub conflicts: Vec<ConflictStatus>,
    /// The fleet sync, when `[sync]` is on.
    #[serde(default)]
    pub sync: Option<crate::fleet::sync::SyncStatus>,
    /// The MQTT link to the coordinator, when `[report.mqtt]` is on.
    #[serde(default)]
    pub report: Option<crate::report::ReportStatus>,
}

fn yes() -> bool {
    true
}

/// One dependency conflict in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConflictStatus {
    /// The plugin it holds back or concerns.
    pub plugin: String,
    /// missing | version | cycle | conflict | abi.
    pub kind: String,
    /// In words.
    pub message: String,
}

/// One plugin in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginStatus {
    /// Name.
    pub plugin: String,
    /// Version serving now.
    pub active: Option<String>,
    /// Versions mapped (oldest first).
    pub mapped: Vec<String>,
    /// `trial` or `known-good` (of the active version).
    #[serde(default)]
    pub state: String,
    /// The last version that passed its trial.
    #[serde(default)]
    pub known_good: Option<String>,
    /// How it is degraded, if it is (hook, fallback, passthrough, shed).
    #[serde(default)]
    pub degraded: Option<String>,
    /// Whether an operator disabled it.
    #[serde(default)]
    pub disabled: bool,
    /// The last action taken on it, with why.
    #[serde(default)]
    pub last_action: Option<ActionReport>,
}

/// One listener in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Name.
    pub name: String,
    /// tcp | grpc.
    pub protocol: String,
    /// Bound address.
    pub addr: String,
    /// Plugin behind it.
    pub plugin: String,
}
