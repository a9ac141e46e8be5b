//! The one vocabulary of control: signals, the `plugins_dir` watcher and
//! the admin socket all become a [`Command`] for the daemon task, which
//! applies them one at a time (reloads never overlap).
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::reload::ReloadReport;

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
    /// Dependency conflicts that stand now (empty when all is resolved).
    #[serde(default)]
    pub conflicts: Vec<ConflictStatus>,
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
