//! systemd's service notification protocol (`sd_notify(3)`), spoken
//! directly: a few newline-separated `KEY=VALUE` lines in one datagram to
//! the unix socket named by `$NOTIFY_SOCKET`.
//!
//! Written out rather than linked (libsystemd) so the daemon stays one
//! static-ish binary that runs the same on edge nodes without systemd; when
//! `$NOTIFY_SOCKET` is unset every call here is a no-op.
//!
//! What plugvisor says, and when (see `daemon.rs`):
//! * `READY=1` once listeners serve, probes are attached and `/metrics`
//!   answers — so `systemctl start` returns when the service really works;
//! * `RELOADING=1` (with `MONOTONIC_USEC`, as `Type=notify-reload` wants)
//!   when a `SIGHUP` arrives, and `READY=1` again when it has been acted on;
//! * `STOPPING=1` when a drain begins;
//! * `WATCHDOG=1` every half `$WATCHDOG_USEC` while the runtime is alive, if
//!   the service manager asked for it (`WatchdogSec=`);
//! * on `plugvisor upgrade`, `RELOADING=1` from the old process, then
//!   `MAINPID=` and `READY=1` from the new one once it serves
//!   (`NotifyAccess=all`), as `sd_notify(3)` describes for a service that
//!   replaces its main process.
//!
//! It also reads socket activation's variables (`sd_listen_fds(3)`):
//! [`listen_fds`].
use std::io;
use std::os::fd::{FromRawFd as _, OwnedFd};
// Abstract names are Linux's; so is plugvisor (eBPF).
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Why `$NOTIFY_SOCKET` or `$WATCHDOG_USEC` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither an absolute path nor `@abstract`.
    #[error("NOTIFY_SOCKET={value:?} is neither an absolute path nor an abstract name (@…)")]
    InvalidSocket {
        /// The variable's value.
        value: String,
    },
    /// The socket address could not be built (too long, NUL byte…).
    #[error("NOTIFY_SOCKET={value:?}: {source}")]
    Address {
        /// The variable's value.
        value: String,
        /// What the OS said.
        source: io::Error,
    },
    /// `$WATCHDOG_USEC` is not a positive integer.
    #[error("WATCHDOG_USEC={value:?} is not a positive number of microseconds")]
    InvalidWatchdog {
        /// The variable's value.
        value: String,
    },
    /// Sending the datagram failed.
    #[error("sending {state:?} to NOTIFY_SOCKET: {source}")]
    Send {
        /// The first line of what was sent.
        state: String,
        /// What the OS said.
        source: io::Error,
    },
}

/// The notification channel to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier that says nothing (no service manager).
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        let socket = std::env::var("NOTIFY_SOCKET").ok();
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Notifier::from_values(
            socket.as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        )
    }

    /// [`Notifier::from_env`] on given values, for tests.
    pub fn from_values(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        own_pid: u32,
    ) -> Result<Notifier, NotifyError> {
        let Some(value) = socket.filter(|s| !s.is_empty()) else {
            return Ok(Notifier::disabled());
        };
        let addr = socket_addr(value)?;
        let sock = UnixDatagram::unbound().map_err(|source| NotifyError::Address {
            value: value.to_owned(),
            source,
        })?;
        Ok(Notifier {
            target: Some((sock, addr)),
            watchdog: watchdog_interval(watchdog_usec, watchdog_pid, own_pid)?,
        })
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often [`Notifier::watchdog`] must be called: half the manager's
    /// timeout, as `sd_watchdog_enabled(3)` advises. `None`: no watchdog.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1`, with a human-readable status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    /// `RELOADING=1` with the monotonic timestamp systemd (≥ 253) checks.
    pub fn reloading(&self, status: &str) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS={status}\n",
            monotonic_usec()
        ));
    }

    /// `MAINPID=` (this process) and `READY=1`: a new process took over
    /// from the one the service manager started (`plugvisor upgrade`).
    pub fn ready_replacing(&self, status: &str) {
        self.send(&format!(
            "MAINPID={}\nREADY=1\nSTATUS={status}\n",
            std::process::id()
        ));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}\n"));
    }

    /// `WATCHDOG=1`: still alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1\n");
    }

    /// Sends `message`; a failure is logged, never fatal: the service keeps
    /// serving even if its manager stopped listening.
    fn send(&self, message: &str) {
        if let Err(e) = self.try_send(message) {
            tracing::warn!(error = %e, "sd_notify");
        }
    }

    /// Sends `message` as one datagram.
    pub fn try_send(&self, message: &str) -> Result<(), NotifyError> {
        let Some((sock, addr)) = &self.target else {
            return Ok(());
        };
        sock.send_to_addr(message.as_bytes(), addr)
            .map(drop)
            .map_err(|source| NotifyError::Send {
                state: message.lines().next().unwrap_or_default().to_owned(),
                source,
            })
    }

    /// Sends `WATCHDOG=1` every [`Notifier::watchdog_interval`] from a task
    /// of its own until the runtime stops; `None` if no watchdog is wanted.
    ///
    /// A task rather than a branch of the control loop: a reload may
    /// legitimately wait seconds on a plugin's `init`, and that must not get
    /// the daemon killed. What the pings prove is that the runtime — which
    /// serves every listener — still schedules work.
    pub fn spawn_watchdog(self: &std::sync::Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.watchdog?;
        let me = self.clone();
        tracing::info!(interval = ?every, "systemd watchdog enabled");
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.watchdog();
            }
        }))
    }
}

/// The first fd socket activation passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The sockets the service manager passed (socket activation:
/// `$LISTEN_PID`, `$LISTEN_FDS`, `$LISTEN_FDNAMES`), by name, owned and
/// close-on-exec. Empty unless `$LISTEN_PID` is this process. The
/// variables are cleared either way, so nothing this process starts takes
/// them for its own (`sd_listen_fds(3)`'s `unset_environment`). An fd
/// with no name is named `unknown`, as systemd does.
pub fn listen_fds() -> Vec<(String, OwnedFd)> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: called at start, before other threads read the environment.
        unsafe { std::env::remove_var(var) };
    }
    let ours = pid
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = count
        .and_then(|n| n.trim().parse::<i32>().ok())
        .unwrap_or(0);
    if !ours || count <= 0 {
        return Vec::new();
    }
    let names: Vec<String> = names
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    (0..count)
        .filter_map(|i| {
            let fd = LISTEN_FDS_START + i;
            // SAFETY: F_SETFD only sets the descriptor's flags; a closed
            // fd fails.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
                return None;
            }
            let name = names
                .get(usize::try_from(i).ok()?)
                .filter(|n| !n.is_empty())
                .cloned()
                .unwrap_or_else(|| "unknown".to_owned());
            // SAFETY: the service manager passed this fd to us alone; it is
            // open (checked above) and nothing else in the process owns it.
            Some((name, unsafe { OwnedFd::from_raw_fd(fd) }))
        })
        .collect()
}

/// `/path` or `@abstract` (the leading `@` stands for the NUL byte).
fn socket_addr(value: &str) -> Result<SocketAddr, NotifyError> {
    let err = |source| NotifyError::Address {
        value: value.to_owned(),
        source,
    };
    if let Some(name) = value.strip_prefix('@') {
        return SocketAddr::from_abstract_name(name.as_bytes()).map_err(err);
    }
    if value.starts_with('/') {
        return SocketAddr::from_pathname(value).map_err(err);
    }
    Err(NotifyError::InvalidSocket {
        value: value.to_owned(),
    })
}

/// Half of `$WATCHDOG_USEC`, if it is meant for this process
/// (`$WATCHDOG_PID` unset or ours).
fn watchdog_interval(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if let Some(pid) = pid.filter(|s| !s.is_empty()) {
        // Meant for another process (a wrapper that exec'd us, say).
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(Duration::from_micros(n) / 2)),
        _ => Err(NotifyError::InvalidWatchdog {
            value: usec.to_owned(),
        }),
    }
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares against.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn unset_socket_is_silent() {
        let n = Notifier::from_values(None, Some("1000000"), None, 1).unwrap();
        assert!(!n.enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x");
        assert!(n.try_send("READY=1\n").is_ok());
    }

    #[test]
    fn path_socket_receives_each_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_values(path.to_str(), None, None, 1).unwrap();
        n.ready("serving");
        assert_eq!(recv(&server), "READY=1\nSTATUS=serving\n");
        n.reloading("hup");
        let msg = recv(&server);
        assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
        let usec: u64 = msg.lines().nth(1).unwrap()["MONOTONIC_USEC=".len()..]
            .parse()
            .unwrap();
        assert!(usec > 0);
        n.stopping("bye");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=bye\n");
        n.watchdog();
        assert_eq!(recv(&server), "WATCHDOG=1\n");
    }

    #[test]
    fn abstract_socket_receives() {
        let name = format!("plugvisor-notify-unit-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier::from_values(Some(&format!("@{name}")), None, None, 1).unwrap();
        n.ready("ok");
        assert_eq!(recv(&server), "READY=1\nSTATUS=ok\n");
    }

    #[test]
    fn bad_socket_values_are_refused() {
        assert!(matches!(
            Notifier::from_values(Some("relative/path"), None, None, 1),
            Err(NotifyError::InvalidSocket { .. })
        ));
        let long = format!("/{}", "x".repeat(200));
        assert!(matches!(
            Notifier::from_values(Some(&long), None, None, 1),
            Err(NotifyError::Address { .. })
        ));
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_and_only_for_us() {
        assert_eq!(
            watchdog_interval(Some("3000000"), None, 7).unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            watchdog_interval(Some("3000000"), Some("7"), 7).unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            watchdog_interval(Some("3000000"), Some("8"), 7).unwrap(),
            None
        );
        assert_eq!(watchdog_interval(None, Some("7"), 7).unwrap(), None);
        assert!(watchdog_interval(Some("0"), None, 7).is_err());
        assert!(watchdog_interval(Some("soon"), None, 7).is_err());
    }
}
