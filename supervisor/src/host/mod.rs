//! Where a plugin version's code runs: in the daemon's process
//! (`isolation = "in-process"`, the [`loader`] alone) or in a plugin host
//! process of its own (`isolation = "process"`).
//!
//! A host is the plugvisor binary run as `plugvisor plugin-host` with one
//! end of a socketpair as fd 3 ([`wire`] is what crosses it). The daemon
//! keeps every listening socket and every client connection; only the
//! call crosses to the host and back. So a host that segfaults, aborts, is
//! OOM-killed or hangs costs the calls in flight on it, and nothing else:
//! [`parent`] sees it go, fails those calls with the cause, and tells the
//! daemon ([`Exit`]), which rolls back or restarts ([`crate::daemon`]).
//!
//! [`Loaded`] is what a slot holds, whichever the mode.

pub mod child;
pub mod limits;
pub mod parent;
pub mod privileges;
pub mod wire;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use semver::Version;

use crate::loader::LoadedVersion;
pub use limits::{Limits, Mechanism, Resources, Usage};
pub use parent::{CallError, Host, Spawner};

/// How long a health or degrade call to a host may take before the host
/// counts as not answering.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(2);

/// The bound a call to a host gets when its listener asks for none
/// (`request_timeout = "0s"`): a host is never trusted not to hang.
pub const UNBOUNDED_CALL: Duration = Duration::from_secs(3600);

/// Which version a host loads, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// The plugin.
    pub plugin: String,
    /// Its version (the manifest's).
    pub version: Version,
    /// The manifest's ABI.
    pub abi: u32,
    /// The object's sha256.
    pub sha256: String,
    /// The object in the store.
    pub object: PathBuf,
}

/// How one plugin is hosted: `[plugin.NAME]` as the reload path uses it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hosting {
    /// Where its versions run.
    pub isolation: Isolation,
    /// What each host is held to.
    pub limits: limits::Limits,
    /// The user its hosts run as (`None`: the default user).
    pub user: Option<String>,
}

/// How a host ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Killed by a signal (not by plugvisor).
    Signal(i32),
    /// Exited with this status.
    Exited(i32),
    /// plugvisor killed it: a call stayed stuck past its bound.
    Hang,
    /// plugvisor killed it: `init` overran `[reload] init_timeout`.
    InitTimeout,
    /// The kernel's OOM killer ended it: it reached its `memory_max`.
    Oom,
    /// Its exit status could not be read.
    Unknown,
}

impl Cause {
    /// The cause an exit status gives.
    pub fn from_status(s: std::process::ExitStatus) -> Cause {
        use std::os::unix::process::ExitStatusExt as _;
        match (s.signal(), s.code()) {
            (Some(sig), _) => Cause::Signal(sig),
            (None, Some(code)) => Cause::Exited(code),
            _ => Cause::Unknown,
        }
    }

    /// The `reason` label of `plugvisor_plugin_host_restarts_total`:
    /// `segfault` (SIGSEGV, SIGBUS, SIGILL, SIGFPE), `abort` (SIGABRT; a
    /// Rust stack overflow ends so too), `oom` (SIGKILL while its memory
    /// limit was hit), `hang`, `exit` (any exit status), `signal` (any
    /// other signal, such as a SIGKILL from outside).
    pub fn reason(self) -> &'static str {
        match self {
            Cause::Signal(libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE) => "segfault",
            Cause::Signal(libc::SIGABRT) => "abort",
            Cause::Signal(_) | Cause::Unknown => "signal",
            Cause::Exited(_) => "exit",
            Cause::Hang | Cause::InitTimeout => "hang",
            Cause::Oom => "oom",
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Signal(sig) => f.write_str(signal_name(*sig)),
            Cause::Exited(code) => write!(f, "exit status {code}"),
            Cause::Hang => f.write_str("killed by plugvisor: hung"),
            Cause::InitTimeout => f.write_str("killed by plugvisor: init overran init_timeout"),
            Cause::Oom => f.write_str("killed by the kernel: out of memory (memory_max)"),
            Cause::Unknown => f.write_str("unknown cause"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGSYS => "SIGSYS",
        _ => "a signal",
    }
}

/// A host that ended on its own (or was killed for hanging) while it
/// served: what the daemon acts on.
#[derive(Debug, Clone)]
pub struct Exit {
    /// The plugin.
    pub plugin: String,
    /// The version it ran.
    pub version: Version,
    /// That version's object.
    pub sha256: String,
    /// Its process id.
    pub pid: u32,
    /// How it ended.
    pub cause: Cause,
    /// When it was reaped.
    pub at: Instant,
}

/// The two ways a version's code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// In a plugin host process of its own.
    Process,
    /// In the daemon's own process (dlopen).
    #[default]
    InProcess,
}

impl Isolation {
    /// The config and label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Process => "process",
            Isolation::InProcess => "in-process",
        }
    }
}

/// A loaded version, wherever its code runs.
#[derive(Debug)]
pub enum Loaded {
    /// Mapped into the daemon.
    InProcess(LoadedVersion),
    /// Running in a host process.
    Process(Host),
}

impl Loaded {
    /// Plugin name.
    pub fn plugin(&self) -> &str {
        match self {
            Loaded::InProcess(l) => l.plugin(),
            Loaded::Process(h) => &h.spec().plugin,
        }
    }

    /// Version.
    pub fn version(&self) -> &Version {
        match self {
            Loaded::InProcess(l) => l.version(),
            Loaded::Process(h) => &h.spec().version,
        }
    }

    /// sha256 of the object.
    pub fn sha256(&self) -> &str {
        match self {
            Loaded::InProcess(l) => l.sha256(),
            Loaded::Process(h) => &h.spec().sha256,
        }
    }

    /// Where its code runs.
    pub fn isolation(&self) -> Isolation {
        match self {
            Loaded::InProcess(_) => Isolation::InProcess,
            Loaded::Process(_) => Isolation::Process,
        }
    }

    /// The host, when the version runs in one.
    pub fn host(&self) -> Option<&Host> {
        match self {
            Loaded::InProcess(_) => None,
            Loaded::Process(h) => Some(h),
        }
    }

    /// Whether it can still answer: a dead host cannot.
    pub fn alive(&self) -> bool {
        self.host().is_none_or(|h| h.exit().is_none())
    }

    /// The plugin's own health verdict (`true` if it has no health hook).
    /// Blocks: call it off the async workers.
    pub fn healthy(&self) -> bool {
        match self {
            Loaded::InProcess(l) => l.healthy(),
            Loaded::Process(h) => h.healthy(HOOK_TIMEOUT),
        }
    }

    /// Calls the plugin's degrade hook: `None` if it has none.
    pub fn degrade(&self, level: u32) -> Option<bool> {
        match self {
            Loaded::InProcess(l) => l.degrade(level),
            Loaded::Process(h) => h.degrade(level, HOOK_TIMEOUT),
        }
    }
}
