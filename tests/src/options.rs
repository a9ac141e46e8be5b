//! How a test daemon is started: its listeners, the packages installed
//! before it starts, and the config sections a test may set. Kept apart
//! from [`crate::Daemon`] so that a test reads what it asks for without
//! the machinery that writes the config.
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{build_echo_version, free_port};

/// Wire protocol of a test listener (the config's `protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Newline-delimited frames.
    Tcp,
    /// `plugvisor.v1.Plugin` over HTTP/2.
    Grpc,
}

impl Protocol {
    /// The config value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Grpc => "grpc",
        }
    }
}

/// A listener entry for a test config.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// Name.
    pub name: String,
    /// tcp or grpc.
    pub protocol: Protocol,
    /// Plugin.
    pub plugin: String,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// `request_timeout`, if not the daemon's default.
    pub request_timeout: Option<&'static str>,
}

impl ListenerSpec {
    /// A TCP listener for `plugin` on a free port.
    pub fn tcp(name: &str, plugin: &str) -> ListenerSpec {
        ListenerSpec {
            name: name.into(),
            protocol: Protocol::Tcp,
            plugin: plugin.into(),
            port: free_port(),
            request_timeout: None,
        }
    }

    /// The same listener with `request_timeout` set.
    #[must_use]
    pub fn request_timeout(self, timeout: &'static str) -> ListenerSpec {
        ListenerSpec {
            request_timeout: Some(timeout),
            ..self
        }
    }

    /// A gRPC listener for `plugin` on a free port.
    pub fn grpc(name: &str, plugin: &str) -> ListenerSpec {
        ListenerSpec {
            protocol: Protocol::Grpc,
            ..ListenerSpec::tcp(name, plugin)
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// How to start a daemon.
pub struct DaemonOptions {
    /// Listeners.
    pub listeners: Vec<ListenerSpec>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// `[probes] mode`.
    pub probes: &'static str,
    /// Packages to install before start: (plugin name, library path, version).
    pub packages: Vec<(String, PathBuf, String)>,
    /// `[shutdown] drain_timeout`, if not the daemon's default.
    pub drain_timeout: Option<&'static str>,
    /// A command the binary runs under (e.g. `setpriv` dropping capabilities).
    pub wrapper: Vec<String>,
    /// `[reload] trial`.
    pub trial: &'static str,
    /// Contents of a thresholds file (written beside the config and named by it).
    pub thresholds: Option<String>,
    /// TOML appended to the generated config, after the listeners (e.g.
    /// `[[health_check]]` tables).
    pub extra_config: String,
    /// `[trust]`, and the key the initial packages are signed with.
    pub trust: TrustOptions,
    /// `state_dir`, if not `DIR/state` (a filesystem the test mounted, say).
    pub state_dir: Option<PathBuf>,
    /// `[probes] ring_buffer_bytes`, if not the daemon's default.
    pub ring_buffer_bytes: Option<u32>,
    /// The daemon binary, if not [`binary`](crate::binary) (e.g.
    /// [`failpoints_binary`](crate::failpoints_binary)).
    pub binary: Option<PathBuf>,
    /// `[reload] init_timeout`, if not the daemon's default.
    pub init_timeout: Option<&'static str>,
}

/// `[trust]` for a test daemon.
#[derive(Debug, Clone, Default)]
pub struct TrustOptions {
    /// `public_keys`.
    pub public_keys: Vec<PathBuf>,
    /// `require_signature`.
    pub require_signature: bool,
    /// Sign the initial packages with this secret key (`plugvisor pack --key`).
    pub sign_with: Option<PathBuf>,
}

/// A `setpriv` wrapper that starts the daemon as root but without the
/// capabilities eBPF needs (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN).
pub fn without_ebpf_capabilities() -> Vec<String> {
    [
        "setpriv",
        "--bounding-set",
        "-bpf,-perfmon,-sys_admin",
        "--inh-caps",
        "-bpf,-perfmon,-sys_admin",
        "--",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
            env: Vec::new(),
            probes: "auto",
            packages: vec![("echo".into(), build_echo_version("1.0.0"), "1.0.0".into())],
            drain_timeout: None,
            wrapper: Vec::new(),
            trial: "30s",
            thresholds: None,
            extra_config: String::new(),
            trust: TrustOptions::default(),
            state_dir: None,
            ring_buffer_bytes: None,
            binary: None,
            init_timeout: None,
        }
    }
}
