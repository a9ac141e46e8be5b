//! `[report.mqtt]`: where the node tells its coordinator what it runs and
//! what it did (`docs/REPORTING.md`).
//!
//! ```toml
//! [report.mqtt]
//! broker = "mqtt://127.0.0.1:1883"      # mqtts://host:port with ca_file (cert_file + key_file: a client certificate)
//! client_id = "edge-0042"               # default: [sync] node, else the host name
//! credentials = "/etc/plugvisor/mqtt.credentials"   # TOML: username = "…", password = "…"
//! topic_prefix = "plugvisor/edge-0042"  # default: plugvisor/<client_id>; must not begin with '$'
//! keep_alive = "30s"
//! outbox_max_bytes = 16777216           # or "16MiB"
//! ```
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `[report]`: the reports a node pushes (today: MQTT).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// `[report.mqtt]`; absent: nothing is pushed.
    pub mqtt: Option<MqttConfig>,
}

/// `[report.mqtt]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883).
    pub broker: String,
    /// The MQTT client id, which is also the node's name in every payload
    /// (default: `[sync] node`, else the host name).
    #[serde(default)]
    pub client_id: Option<String>,
    /// A TOML file with `username` and `password` (kept out of the config
    /// so that the config can be world-readable).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// Every topic starts with this (default `plugvisor/<client_id>`).
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// MQTT keep-alive: how soon the broker notices a dead node and
    /// publishes its Last Will (about 1.5 × this).
    #[serde(default = "default_keep_alive", deserialize_with = "super::duration")]
    pub keep_alive: Duration,
    /// The on-disk outbox's bound: past it the oldest events are dropped
    /// (and counted).
    #[serde(default = "default_outbox_max", deserialize_with = "bytes")]
    pub outbox_max_bytes: u64,
    /// PEM CA certificate(s) the broker's certificate must chain to
    /// (`mqtts://` needs it).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (with `key_file`), for brokers that want one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// The smallest outbox: one page, a few dozen events.
pub const MIN_OUTBOX_BYTES: u64 = 4096;

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

fn default_outbox_max() -> u64 {
    16 << 20
}

/// A byte size as an integer or a string such as `"16MiB"`.
fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Int(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Int(n) => Ok(n),
        Size::Text(s) => crate::host::limits::parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Where the broker is, from `broker`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `mqtts://`.
    pub tls: bool,
}

/// The user name and password in a `credentials` file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttCredentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for MqttCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A password never reaches a log line.
        f.debug_struct("MqttCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl MqttConfig {
    /// The broker's host, port and whether it speaks TLS.
    pub fn broker_addr(&self) -> Result<BrokerAddr, String> {
        let url = reqwest::Url::parse(&self.broker)
            .map_err(|e| format!("broker {:?}: {e}", self.broker))?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(format!(
                    "broker {:?}: scheme {other:?}; mqtt:// or mqtts://",
                    self.broker
                ));
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("broker {:?}: no host", self.broker))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok(BrokerAddr { host, port, tls })
    }

    /// Reads the `credentials` file, if there is one.
    pub fn read_credentials(&self) -> Result<Option<MqttCredentials>, String> {
        let Some(path) = &self.credentials else {
            return Ok(None);
        };
        read_credentials(path).map(Some)
    }

    /// The client id: `client_id`, else `node` (`[sync] node`), else the
    /// host name.
    pub fn client_id(&self, node: Option<&str>) -> String {
        self.client_id
            .clone()
            .or_else(|| node.map(str::to_owned))
            .unwrap_or_else(super::host_name)
    }

    /// The topic prefix for `client_id`.
    pub fn prefix(&self, client_id: &str) -> String {
        self.topic_prefix
            .clone()
            .unwrap_or_else(|| format!("plugvisor/{client_id}"))
    }

    pub(super) fn check(&self) -> Result<(), String> {
        let broker = self.broker_addr()?;
        if self.client_id.as_deref().is_some_and(str::is_empty) {
            return Err("client_id: a name, or leave it out".into());
        }
        if let Some(prefix) = &self.topic_prefix {
            check_prefix(prefix)?;
        }
        if self.keep_alive < Duration::from_secs(1) {
            return Err("keep_alive: at least 1s".into());
        }
        if self.outbox_max_bytes < MIN_OUTBOX_BYTES {
            return Err(format!(
                "outbox_max_bytes = {}: at least {MIN_OUTBOX_BYTES}",
                self.outbox_max_bytes
            ));
        }
        if broker.tls && self.ca_file.is_none() {
            return Err(format!(
                "broker {:?} is mqtts:// and needs ca_file (the CA its certificate chains to)",
                self.broker
            ));
        }
        if !broker.tls && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return Err(format!(
                "ca_file / cert_file are for mqtts://; broker {:?} is plain",
                self.broker
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("cert_file and key_file go together".into());
        }
        for (key, file) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if let Some(f) = file {
                std::fs::metadata(f).map_err(|e| format!("{key} {}: {e}", f.display()))?;
            }
        }
        self.read_credentials()?;
        Ok(())
    }
}

fn read_credentials(path: &Path) -> Result<MqttCredentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("credentials {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        format!(
            "credentials {}: want `username = \"…\"` and `password = \"…\"`: {}",
            path.display(),
            e.message()
        )
    })
}

/// A topic prefix: not empty, no wildcards, no leading `$` (topics that
/// begin with `$` are not matched by a `#` subscription, MQTT 3.1.1
/// §4.7.2, so a coordinator subscribed to `#` would never see them).
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.ends_with('/') {
        return Err(format!(
            "topic_prefix {prefix:?}: not empty, no trailing '/'"
        ));
    }
    if prefix.starts_with('$') {
        return Err(format!(
            "topic_prefix {prefix:?} begins with '$': a '#' subscription does not match such topics (MQTT 4.7.2)"
        ));
    }
    if prefix.contains(['+', '#', '\0']) {
        return Err(format!(
            "topic_prefix {prefix:?}: '+', '#' are wildcards, not topic characters"
        ));
    }
    Ok(())
}
