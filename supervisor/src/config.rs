//! `plugvisor.toml`: parsed, validated, or refused loudly.
//!
//! Unknown keys are errors and a bad file never falls back to defaults.
//! With no `--config`, the daemon runs on [`Config::embedded_default`].
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::host::limits::Limits;
use crate::host::{Hosting, Isolation};
use crate::name::valid_name;

mod health_check;
mod report;
pub use health_check::{HealthCheckConfig, HealthCheckKind, HealthTarget, HttpTarget};
pub use report::{BrokerAddr, MqttConfig, MqttCredentials, ReportConfig, check_prefix};

/// The host name: a node's default name (`[sync] node`, `[report.mqtt]
/// client_id`), or `localhost` when there is none.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The embedded default configuration (relative paths resolve against the
/// working directory).
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("parsing config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The file parsed but a value is not acceptable.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// One sub-directory per plugin package.
    pub plugins_dir: PathBuf,
    /// Content-addressed store, refs and journal.
    pub state_dir: PathBuf,
    /// Operator-tuned thresholds file (optional).
    pub thresholds: Option<PathBuf>,
    /// `/metrics` endpoint.
    pub metrics: MetricsConfig,
    /// Admin unix socket.
    pub admin: AdminConfig,
    /// eBPF probes.
    pub probes: ProbesConfig,
    /// Package signatures.
    pub trust: TrustConfig,
    /// Reload behaviour.
    pub reload: ReloadConfig,
    /// SIGTERM behaviour.
    pub shutdown: ShutdownConfig,
    /// Upgrades of plugvisor itself between processes that share only a
    /// socket path (a new pod beside the old one).
    pub upgrade: UpgradeConfig,
    /// Following a TUF repository of plugin releases (`[sync]`; absent:
    /// packages reach `plugins_dir` by other means).
    pub sync: Option<SyncConfig>,
    /// What the node pushes to its coordinator (`[report.mqtt]`).
    pub report: ReportConfig,
    /// Listeners owned by plugvisor.
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Degrade fallback per plugin when its own `degrade` hook cannot help:
    /// a version to pin (`"1.2.0"`, must still be mapped) or `"passthrough"`
    /// (answer each request with its own bytes). Without one, degrade's last
    /// step sheds new connections.
    pub fallback: std::collections::BTreeMap<String, String>,
    /// Per-plugin settings, `[plugin.NAME]` (where its code runs).
    #[serde(rename = "plugin")]
    pub plugins: std::collections::BTreeMap<String, PluginConfig>,
    /// Dependencies checked from plugvisor, exported as
    /// `plugvisor_health_check_up{check}` (see [`HealthCheckConfig`]).
    #[serde(rename = "health_check")]
    pub health_checks: Vec<HealthCheckConfig>,
    /// Where the file was read from (`None` for the embedded default).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            plugins_dir: PathBuf::from("/var/lib/plugvisor/plugins"),
            state_dir: PathBuf::from("/var/lib/plugvisor/state"),
            thresholds: None,
            metrics: MetricsConfig::default(),
            admin: AdminConfig::default(),
            probes: ProbesConfig::default(),
            trust: TrustConfig::default(),
            reload: ReloadConfig::default(),
            shutdown: ShutdownConfig::default(),
            upgrade: UpgradeConfig::default(),
            sync: None,
            report: ReportConfig::default(),
            listeners: Vec::new(),
            fallback: std::collections::BTreeMap::new(),
            plugins: std::collections::BTreeMap::new(),
            health_checks: Vec::new(),
            source: None,
        }
    }
}

/// `[plugin.NAME]`: one plugin's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Where its versions run: `"process"` (a plugin host each, a crash
    /// costs only its own requests) or `"in-process"` (the default for
    /// now; see docs/ISOLATION.md).
    pub isolation: Isolation,
    /// A host's memory limit (`"256MiB"`): cgroup `memory.max` (v2), the
    /// v1 memory limit, or `RLIMIT_AS`.
    pub memory_max: Option<String>,
    /// A host's CPU share (`"50%"` of one CPU): cgroup `cpu.max`.
    pub cpu_max: Option<String>,
    /// A host's threads and processes: cgroup `pids.max`.
    pub pids_max: Option<u64>,
    /// The user a host runs as (default `plugvisor-plugin`, else `nobody`).
    pub user: Option<String>,
}

impl PluginConfig {
    /// The limits, parsed (checked when the config is read).
    pub fn limits(&self) -> Result<Limits, String> {
        Ok(Limits {
            memory_max: self
                .memory_max
                .as_deref()
                .map(crate::host::limits::parse_size)
                .transpose()
                .map_err(|e| format!("memory_max: {e}"))?,
            cpu_max: self
                .cpu_max
                .as_deref()
                .map(crate::host::limits::parse_cpu)
                .transpose()
                .map_err(|e| format!("cpu_max: {e}"))?,
            pids_max: match self.pids_max {
                Some(0) => return Err("pids_max: at least 1".to_owned()),
                p => p,
            },
        })
    }
}

impl Config {
    /// How each plugin with a `[plugin.NAME]` table is hosted. The limits
    /// were checked when the file was read.
    pub fn hosting(&self) -> std::collections::HashMap<String, Hosting> {
        self.plugins
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    Hosting {
                        isolation: p.isolation,
                        limits: p.limits().unwrap_or_default(),
                        user: p.user.clone(),
                    },
                )
            })
            .collect()
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving `/metrics`.
    pub listen: SocketAddr,
    /// Detail series beyond the default set, opt-in because each costs
    /// every scrape of every node (`docs/MONITORING.md#series-budget`).
    pub detail: Vec<MetricsDetail>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            detail: Vec::new(),
        }
    }
}

/// A set of detail series (`[metrics] detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsDetail {
    /// Buckets for every reload phase, not only `total`, on a fine
    /// doubling scale from 10 µs (the default exports the other phases'
    /// `_sum` and `_count` only).
    ReloadPhases,
    /// Every log2 bucket of the kernel's service-gap histograms (26 per
    /// listener and window instead of 12).
    ServiceGap,
    /// Buckets for `plugvisor_crash_recovery_seconds` and
    /// `plugvisor_kernel_crash_recovery_seconds` (else `_sum`, `_count`).
    CrashRecovery,
    /// Buckets for `plugvisor_health_check_duration_seconds` (else
    /// `_sum`, `_count`).
    HealthChecks,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Path of the unix socket (created with mode 0600).
    pub socket: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: PathBuf::from("/run/plugvisor/admin.sock"),
        }
    }
}

/// `[probes] mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMode {
    /// Try; keep serving without probes if eBPF cannot be used.
    #[default]
    Auto,
    /// Refuse to start without probes.
    On,
    /// Never load probes.
    Off,
}

/// `[probes]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// auto | on | off.
    pub mode: ProbeMode,
    /// Size of the ring buffer that carries kernel events to userspace
    /// (ends of reload windows, connections broken inside one), in bytes:
    /// a power of two, at least 4096 (one page). An event that finds it
    /// full is counted in `plugvisor_probe_events_dropped_total`.
    pub ring_buffer_bytes: u32,
    /// Connections the probes follow at once, across every listener: the
    /// size of the kernel's per-connection maps (LRU hashes). Beyond it
    /// the least recently active connection's state is evicted, and a
    /// break of that connection would go uncounted.
    pub max_connections: u32,
}

/// Default `[probes] ring_buffer_bytes`: room for about 6500 events.
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 256 * 1024;

/// Default `[probes] max_connections`: six times the ten thousand an edge
/// gateway is sized for; each entry costs the kernel well under 100 bytes.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;

impl ProbesConfig {
    /// What is wrong with the sizes, if anything.
    fn validate(&self) -> Result<(), String> {
        let ring = self.ring_buffer_bytes;
        if ring < 4096 || !ring.is_power_of_two() {
            return Err(format!(
                "[probes] ring_buffer_bytes = {ring}: a power of two of at least 4096 (one page)"
            ));
        }
        let max = self.max_connections;
        if !(1024..=1 << 22).contains(&max) {
            return Err(format!(
                "[probes] max_connections = {max}: between 1024 and 4194304"
            ));
        }
        Ok(())
    }
}

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig {
            mode: ProbeMode::default(),
            ring_buffer_bytes: DEFAULT_RING_BUFFER_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// `[trust]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// ed25519 public key files (`plugvisor keygen` writes them). A package
    /// with a `plugin.toml.sig` must verify under one of them.
    pub public_keys: Vec<PathBuf>,
    /// Refuse packages without a signature (needs at least one key).
    pub require_signature: bool,
}

/// `[reload]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// How long a new version stays `trial` before it becomes known-good.
    #[serde(deserialize_with = "duration")]
    pub trial: Duration,
    /// Mapped versions kept per plugin (the active one included).
    pub keep_loaded: usize,
    /// Quiet period of the `plugins_dir` watcher before it acts.
    #[serde(deserialize_with = "duration")]
    pub debounce: Duration,
    /// How long a plugin's `init` may run before the load is refused and
    /// the version quarantined. The thread stuck in it cannot be killed:
    /// it is abandoned and its library stays mapped until restart.
    #[serde(deserialize_with = "duration")]
    pub init_timeout: Duration,
}

/// `[reload] init_timeout` when the config does not set it.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// `[[listener]] request_timeout` when the config does not set it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            trial: Duration::from_secs(30),
            keep_loaded: 4,
            debounce: Duration::from_millis(200),
            init_timeout: DEFAULT_INIT_TIMEOUT,
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long each listener waits for open connections and
    /// streams to finish before it closes what is left. TCP connections get
    /// to finish the frame they are on; gRPC connections get HTTP/2's
    /// two-phase GOAWAY and their in-flight calls finish.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
}

impl SyncConfig {
    fn check(&self) -> Result<(), String> {
        for (key, url) in [
            ("metadata_url", &self.metadata_url),
            ("targets_url", &self.targets_url),
        ] {
            let u = reqwest::Url::parse(url).map_err(|e| format!("{key} {url:?}: {e}"))?;
            if !matches!(u.scheme(), "http" | "https" | "file") {
                return Err(format!("{key} {url:?}: http, https or file"));
            }
        }
        if self.interval.is_zero() {
            return Err("interval must be more than 0".into());
        }
        if self.seed.is_some_and(|s| s >= ROLLOUT_SEEDS) {
            return Err(format!("seed must be below {ROLLOUT_SEEDS}"));
        }
        if self.node.as_deref().is_some_and(str::is_empty) {
            return Err("node: a name, or leave it out (the host name)".into());
        }
        Ok(())
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// `[upgrade]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpgradeConfig {
    /// A unix socket path where the running daemon waits for the process
    /// that replaces it (mode 0600). A daemon that starts and finds another
    /// answering there takes over its sockets and raw TCP connections, as
    /// `plugvisor upgrade` does; the one replaced then stays idle until its
    /// SIGTERM. For a new pod beside the old one (a DaemonSet's rolling
    /// update with `maxSurge: 1`), the path on a shared hostPath. Unset:
    /// only `plugvisor upgrade` and `SIGUSR2` upgrade.
    pub socket: Option<PathBuf>,
}

/// Rollout seeds are in `[0, ROLLOUT_SEEDS)` (Bottlerocket's 2048).
pub const ROLLOUT_SEEDS: u32 = 2048;

/// `[sync]`: the TUF repository this node follows (`docs/FLEET.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Where the repository's metadata is (`root.json`, `timestamp.json`…).
    pub metadata_url: String,
    /// Where its targets (the packages' files) are.
    pub targets_url: String,
    /// The trusted `root.json`, shipped out of band: the one thing the node
    /// must trust before it has ever synced.
    pub root: PathBuf,
    /// How often the repository is polled; each wait is this, ±10 %.
    #[serde(default = "default_sync_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// This node's name (default: the host name).
    #[serde(default)]
    pub node: Option<String>,
    /// This node's labels, which releases select nodes by.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// This node's rollout seed in `[0, 2048)` (default: derived from the
    /// node name, so it is stable and spread evenly).
    #[serde(default)]
    pub seed: Option<u32>,
    /// Unable to sync for longer than this: the node stops taking releases
    /// (state `expired`) and keeps serving what it has.
    #[serde(default = "default_max_offline", deserialize_with = "duration")]
    pub max_offline: Duration,
    /// The largest package file the node downloads (the TUF-pinned length
    /// is checked first; this bounds what a compromised targets role could
    /// make a node fetch).
    #[serde(default = "default_max_package", deserialize_with = "size")]
    pub max_package_size: u64,
}

fn default_sync_interval() -> Duration {
    Duration::from_secs(300)
}

fn default_max_offline() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

fn default_max_package() -> u64 {
    256 << 20
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    crate::host::limits::parse_size(&s).map_err(serde::de::Error::custom)
}

/// Wire protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Newline-delimited frames over TCP.
    Tcp,
    /// `plugvisor.v1.Plugin` over HTTP/2.
    Grpc,
}

impl Protocol {
    /// The `protocol` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Grpc => "grpc",
        }
    }
}

/// `[[listener]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name, used as the `listener` label.
    pub name: String,
    /// tcp | grpc.
    pub protocol: Protocol,
    /// Address to bind.
    pub bind: SocketAddr,
    /// Plugin that serves it.
    pub plugin: String,
    /// How long the plugin may take to answer one request (a TCP frame, a
    /// gRPC message) before the request is answered with a timeout error
    /// and the call abandoned. `"0s"` means no bound: the plugin is called
    /// inline on the async worker — the fastest path, for a plugin trusted
    /// never to block, since one that hangs then holds that worker.
    #[serde(default = "default_request_timeout", deserialize_with = "duration")]
    pub request_timeout: Duration,
}

fn default_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("duration {s:?}: {e}")))
}

/// A plugin's configured degrade fallback (`[fallback]`), the step the
/// degrade action takes when the plugin's own hook cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// A pinned older version (must be mapped).
    Version(semver::Version),
    /// Answer each request with its own bytes.
    Passthrough,
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.source = Some(path.to_owned());
        config.validate(path)
    }

    /// The built-in configuration used when `plugvisor run` gets no `--config`.
    pub fn embedded_default() -> Config {
        let path = Path::new("<embedded default>");
        Self::parse(EMBEDDED_DEFAULT, path)
            .and_then(|c| c.validate(path))
            .expect("the embedded default config is valid (checked by a unit test)")
    }

    fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    fn validate(self, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        for (plugin, v) in &self.fallback {
            if !valid_name(plugin) {
                return Err(invalid(format!(
                    "[fallback] {plugin:?} is not a plugin name"
                )));
            }
            if v != "passthrough" && semver::Version::parse(v).is_err() {
                return Err(invalid(format!(
                    "[fallback] {plugin} = {v:?}: a semver version or \"passthrough\""
                )));
            }
        }
        for (plugin, p) in &self.plugins {
            if !valid_name(plugin) {
                return Err(invalid(format!(
                    "[plugin.{plugin}]: {plugin:?} is not a plugin name"
                )));
            }
            p.limits()
                .map_err(|e| invalid(format!("[plugin.{plugin}] {e}")))?;
            if p.user.as_deref().is_some_and(str::is_empty) {
                return Err(invalid(format!(
                    "[plugin.{plugin}] user: a user name, or leave it out"
                )));
            }
        }
        if let Some(sync) = &self.sync {
            sync.check().map_err(|e| invalid(format!("[sync] {e}")))?;
        }
        if let Some(mqtt) = &self.report.mqtt {
            mqtt.check()
                .map_err(|e| invalid(format!("[report.mqtt] {e}")))?;
        }
        if self.reload.init_timeout.is_zero() {
            return Err(invalid(
                "[reload] init_timeout must be more than 0 (every init is bounded)".into(),
            ));
        }
        if self.reload.keep_loaded == 0 {
            return Err(invalid(
                "[reload] keep_loaded must be at least 1 (the active version)".into(),
            ));
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for l in &self.listeners {
            if !valid_name(&l.name) {
                return Err(invalid(format!(
                    "listener name {:?}: use [a-z0-9_-], at most 64",
                    l.name
                )));
            }
            if !valid_name(&l.plugin) {
                return Err(invalid(format!(
                    "listener {:?}: plugin name {:?} is not valid",
                    l.name, l.plugin
                )));
            }
            if !names.insert(l.name.clone()) {
                return Err(invalid(format!("listener {:?} is defined twice", l.name)));
            }
            if !binds.insert(l.bind) {
                return Err(invalid(format!(
                    "listener {:?}: address {} is used twice",
                    l.name, l.bind
                )));
            }
        }
        if self.listeners.len() > plugvisor_probes_common::MAX_LISTENERS as usize {
            return Err(invalid(format!(
                "{} listeners configured; at most {} are supported",
                self.listeners.len(),
                plugvisor_probes_common::MAX_LISTENERS
            )));
        }
        health_check::validate_all(&self.health_checks).map_err(invalid)?;
        self.probes.validate().map_err(invalid)?;
        if self.trust.require_signature && self.trust.public_keys.is_empty() {
            return Err(invalid(
                "[trust] require_signature = true needs at least one key in public_keys".into(),
            ));
        }
        // A key file that cannot be read would refuse every signed package
        // later; say so now (and in `run --check`).
        for key in &self.trust.public_keys {
            crate::trust::read_public_key(key)
                .map_err(|e| invalid(format!("[trust] public_keys: {e}")))?;
        }
        Ok(self)
    }

    /// Whether this is the embedded default (the daemon then seeds the
    /// bundled example plugin).
    pub fn is_embedded_default(&self) -> bool {
        self.source.is_none()
    }

    /// The `[fallback]` table, parsed.
    pub fn fallbacks(&self) -> std::collections::HashMap<String, Fallback> {
        self.fallback
            .iter()
            .filter_map(|(plugin, v)| {
                let f = if v == "passthrough" {
                    Fallback::Passthrough
                } else {
                    Fallback::Version(semver::Version::parse(v).ok()?)
                };
                Some((plugin.clone(), f))
            })
            .collect()
    }

    /// Distinct plugin names that listeners refer to, in listener order.
    pub fn plugins(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        self.listeners
            .iter()
            .filter(|l| seen.insert(l.plugin.clone()))
            .map(|l| l.plugin.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default();
        assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.listeners[0].plugin, "echo");
        assert!(
            c.listeners
                .iter()
                .any(|l| l.protocol == Protocol::Grpc && l.name == "echo-grpc"),
            "the default serves echo over gRPC too"
        );
        assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.reload.init_timeout, DEFAULT_INIT_TIMEOUT);
        assert!(
            c.listeners
                .iter()
                .all(|l| l.request_timeout == DEFAULT_REQUEST_TIMEOUT)
        );
        assert!(c.is_embedded_default());
    }

    #[test]
    fn design_example_parses() {
        let text = r#"
plugins_dir = "/var/lib/plugvisor/plugins"
state_dir = "/var/lib/plugvisor/state"
thresholds = "/etc/plugvisor/thresholds.toml"
[metrics]
listen = "127.0.0.1:9464"
[admin]
socket = "/run/plugvisor/admin.sock"
[probes]
mode = "auto"
[trust]
public_keys = []
require_signature = false
[reload]
trial = "30s"
keep_loaded = 4
[[listener]]
name = "echo-tcp"
protocol = "tcp"
bind = "127.0.0.1:7001"
plugin = "echo"
"#;
        let c = Config::parse(text, Path::new("t"))
            .unwrap()
            .validate(Path::new("t"))
            .unwrap();
        assert_eq!(c.reload.trial, Duration::from_secs(30));
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.probes.mode, ProbeMode::Auto);
    }

    #[test]
    fn grpc_listener_and_drain_timeout_parse() {
        let text = r#"
[shutdown]
drain_timeout = "2500ms"
[[listener]]
name = "echo-grpc"
protocol = "grpc"
bind = "127.0.0.1:7002"
plugin = "echo"
"#;
        let c = Config::parse(text, Path::new("t"))
            .unwrap()
            .validate(Path::new("t"))
            .unwrap();
        assert_eq!(c.listeners[0].protocol, Protocol::Grpc);
        assert_eq!(c.shutdown.drain_timeout, Duration::from_millis(2500));
        let err = Config::parse("[shutdown]\ndrain = \"1s\"\n", Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("drain"), "{err}");
    }

    #[test]
    fn metrics_detail_takes_known_sets_and_refuses_others() {
        let c = Config::parse(
            "[metrics]\ndetail = [\"reload_phases\", \"service_gap\"]\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(
            c.metrics.detail,
            vec![MetricsDetail::ReloadPhases, MetricsDetail::ServiceGap]
        );
        assert!(
            Config::parse("", Path::new("t"))
                .unwrap()
                .metrics
                .detail
                .is_empty()
        );
        let err = Config::parse("[metrics]\ndetail = [\"everything\"]\n", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("everything") && err.contains("reload_phases"),
            "the error names the bad entry and the known ones: {err}"
        );
    }

    #[test]
    fn trust_needs_readable_keys() {
        let t = tempfile::tempdir().unwrap();
        let err = Config::parse("[trust]\nrequire_signature = true\n", Path::new("t"))
            .unwrap()
            .validate(Path::new("t"))
            .unwrap_err();
        assert!(err.to_string().contains("at least one key"), "{err}");
        let missing = t.path().join("missing.pub");
        let text = format!(
            "[trust]\npublic_keys = [{:?}]\n",
            missing.display().to_string()
        );
        let err = Config::parse(&text, Path::new("t"))
            .unwrap()
            .validate(Path::new("t"))
            .unwrap_err();
        assert!(err.to_string().contains("missing.pub"), "{err}");
        let key = crate::trust::SecretKey::generate().unwrap();
        let (sk, pk) = (t.path().join("k"), t.path().join("k.pub"));
        crate::trust::write_key_pair(&key, &sk, &pk).unwrap();
        let text = format!(
            "[trust]\npublic_keys = [{:?}]\nrequire_signature = true\n",
            pk.display().to_string()
        );
        let c = Config::parse(&text, Path::new("t"))
            .unwrap()
            .validate(Path::new("t"))
            .unwrap();
        assert!(c.trust.require_signature);
        // A secret key is not a public key.
        let text = format!("[trust]\npublic_keys = [{:?}]\n", sk.display().to_string());
        assert!(
            Config::parse(&text, Path::new("t"))
                .unwrap()
                .validate(Path::new("t"))
                .is_err()
        );
    }

    #[test]
    fn ring_buffer_size_is_a_power_of_two_of_a_page_or_more() {
        let parse = |bytes: u32| {
            Config::parse(
                &format!("[probes]\nring_buffer_bytes = {bytes}\n"),
                Path::new("t"),
            )
            .and_then(|c| c.validate(Path::new("t")))
        };
        assert_eq!(
            Config::parse("", Path::new("t"))
                .unwrap()
                .probes
                .ring_buffer_bytes,
            DEFAULT_RING_BUFFER_BYTES
        );
        assert_eq!(parse(4096).unwrap().probes.ring_buffer_bytes, 4096);
        for bad in [0, 2048, 5000] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("ring_buffer_bytes"), "{err}");
        }
    }

    #[test]
    fn timeouts_parse_and_a_zero_init_timeout_is_refused() {
        let text = r#"
[reload]
init_timeout = "2s"
[[listener]]
name = "a"
protocol = "tcp"
bind = "127.0.0.1:1"
plugin = "echo"
request_timeout = "250ms"
"#;
        let c = Config::parse(text, Path::new("t"))
            .unwrap()
            .validate(Path::new("t"))
            .unwrap();
        assert_eq!(c.reload.init_timeout, Duration::from_secs(2));
        assert_eq!(c.listeners[0].request_timeout, Duration::from_millis(250));
        let err = Config::parse(&text.replace("\"2s\"", "\"0s\""), Path::new("t"))
            .unwrap()
            .validate(Path::new("t"))
            .unwrap_err();
        assert!(err.to_string().contains("init_timeout"), "{err}");
        // An unbounded request path is the operator's choice to make.
        let c = Config::parse(&text.replace("\"250ms\"", "\"0s\""), Path::new("t"))
            .unwrap()
            .validate(Path::new("t"))
            .unwrap();
        assert!(c.listeners[0].request_timeout.is_zero());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("plugins_dri = \"x\"\n", Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("plugins_dri"), "{err}");
    }

    #[test]
    fn unknown_nested_key_is_refused() {
        let err =
            Config::parse("[reload]\ntrial = \"1s\"\nkeep = 3\n", Path::new("t")).unwrap_err();
        assert!(err.to_string().contains("keep"), "{err}");
    }

    #[test]
    fn bad_duration_and_duplicates_are_refused() {
        assert!(Config::parse("[reload]\ntrial = \"soon\"\n", Path::new("t")).is_err());
        let dup = r#"
[[listener]]
name = "a"
protocol = "tcp"
bind = "127.0.0.1:1"
plugin = "echo"
[[listener]]
name = "a"
protocol = "tcp"
bind = "127.0.0.1:2"
plugin = "echo"
"#;
        let err = Config::parse(dup, Path::new("t"))
            .unwrap()
            .validate(Path::new("t"))
            .unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");
    }
}
