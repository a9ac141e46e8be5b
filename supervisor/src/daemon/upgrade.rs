//! `plugvisor upgrade` (and `SIGUSR2`): this daemon replaced by a new
//! process — of a new binary, or of the same one — with no connect refused
//! and no raw TCP connection closed. [`crate::handover`] is the wire; this
//! file holds both ends of the conversation: the old process's
//! [`Daemon::upgrade`], and the new process's [`inherit`] (at start) and
//! [`succeed`] (once it serves).
//!
//! The order is the point:
//! 1. the new binary checks the config (`run --check`) before anything
//!    starts: a binary that cannot read it never gets the sockets;
//! 2. trials are marked interrupted, so the new process resumes them
//!    instead of taking the old one's exit for a crash in a trial (boot
//!    counting);
//! 3. the new process gets every listening socket, starts as any start
//!    does (probes, store, plugins) and says ready. Until then the old one
//!    serves alone; from then on both accept from the same sockets, so the
//!    backlog always has an owner;
//! 4. only then does the old one stop accepting. Its raw TCP connections
//!    move at their next frame boundary, with what was read and not yet
//!    answered; its gRPC connections drain with the two-phase GOAWAY
//!    (HTTP/2 state cannot move), and new streams go to the new process;
//! 5. a new process that exits, or is not ready within [`READY_TIMEOUT`],
//!    is killed: the old one resumes its trials, serves on, and the command
//!    fails saying why.
//!
//! While an upgrade waits for the new process the old event loop waits
//! with it (events queue). Plugin hosts are offered too: each is asked for
//! a second call stream ([`crate::host::parent::Host::second_stream`]),
//! which the new process adopts when it loads the same version under the
//! same limits — the host serves on and `init` does not run again.
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Daemon, DaemonError, EXIT_TIMEOUT};
use crate::config::{Config, Protocol};
use crate::control::UpgradeReport;
use crate::handover::{
    Channel, HandoverError, MAX_FDS, Message, Offered, UPGRADE_FD_ENV, set_cloexec,
};
use crate::host::parent::{Handed, HandedAbout};
use crate::listeners::handoff::{Adopted, Moving};
use crate::metrics::{Metrics, UpgradeOutcome};
use crate::slot::Installed;

/// How long the new binary's `run --check` may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the new process has from its start to "ready": loading every
/// active version (and its `init`) included.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a new process waits for the old one's offer of sockets.
const OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the wait for "ready" looks at whether the new process died.
const LIVENESS_POLL: Duration = Duration::from_millis(50);

/// Environment variables of the old process that must not reach the new
/// one: socket activation's (they name the old pid) and the watchdog's pid
/// (the new process becomes the main pid, and the watchdog is its job).
const NOT_INHERITED: [&str; 4] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID"];

/// Why an upgrade did not happen. In every case the running daemon serves
/// on, unchanged.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The new binary refused the config, or could not run its check.
    #[error(
        "upgrade to {binary}: the new binary's config check failed ({status}): {output}; this plugvisor serves on"
    )]
    Check {
        /// The new binary.
        binary: PathBuf,
        /// Its exit status, or why it did not finish.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// The new process could not be started.
    #[error("upgrade to {binary}: starting it: {source}; this plugvisor serves on")]
    Spawn {
        /// The new binary.
        binary: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The new process died, or was not ready in time, and was killed.
    #[error(
        "upgrade to {binary}: the new process (pid {pid}) {how} before it was ready (its log says why); this plugvisor serves on"
    )]
    NotReady {
        /// The new binary.
        binary: PathBuf,
        /// Its pid.
        pid: u32,
        /// What happened.
        how: String,
    },
    /// The hand-over channel failed before the new process was ready.
    #[error("upgrade to {binary}: {source}; this plugvisor serves on")]
    Channel {
        /// The new binary.
        binary: PathBuf,
        /// The error.
        source: HandoverError,
    },
}

/// The binary this daemon runs and the arguments it was started with: what
/// an upgrade starts again (a new file at the same path, by default).
#[derive(Debug, Clone)]
pub(super) struct Invocation {
    pub(super) binary: PathBuf,
    pub(super) args: Vec<OsString>,
}

impl Invocation {
    /// This process's own, read at start — before a package manager can
    /// replace the file, after which `/proc/self/exe` names a deleted one.
    pub(super) fn current() -> Invocation {
        let args: Vec<OsString> = std::env::args_os().collect();
        let binary = std::env::current_exe()
            .ok()
            .or_else(|| args.first().map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("plugvisor"));
        Invocation {
            binary,
            args: args.into_iter().skip(1).collect(),
        }
    }
}

impl Daemon {
    /// Replaces this process by a new one of `binary` (default: the one it
    /// was started from). On `Ok` the new process serves, this one's raw
    /// TCP connections are in it, and the caller drains what is left (gRPC)
    /// and exits; on `Err` nothing changed.
    pub(super) async fn upgrade(
        &mut self,
        binary: Option<PathBuf>,
    ) -> Result<UpgradeReport, UpgradeError> {
        let started = Instant::now();
        let binary = binary.unwrap_or_else(|| self.invocation.binary.clone());
        let args = self.invocation.args.clone();
        tracing::info!(binary = %binary.display(), "upgrade: checking the config with the new binary");
        if let Err(e) = check(&binary, &args).await {
            self.metrics.upgrade(UpgradeOutcome::CheckFailed);
            return Err(e);
        }
        self.notifier
            .reloading(&format!("upgrading to {}", binary.display()));
        self.reloader
            .lock()
            .expect("reloader lock")
            .interrupt_trials();
        let (hosts, handed) = self.hosts_for_successor().await;
        let (channel, new_pid, adopted) = match self.start_successor(&binary, &args, handed).await {
            Ok(started) => started,
            Err(e) => return Err(self.serve_on(e)),
        };
        // Theirs now: this process leaves them running when it exits.
        let mut hosts_adopted = 0;
        for i in &hosts {
            if let Some(h) = i.loaded.host().filter(|h| adopted.contains(&h.pid())) {
                h.handed_over();
                hosts_adopted += 1;
            }
        }
        let ready_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            new_pid,
            ready_ms,
            hosts_adopted,
            hosts = hosts.len(),
            "upgrade: the new process serves; handing over"
        );
        let connections_moved = self.hand_over(channel).await;
        self.handed_over = true;
        tracing::info!(
            new_pid,
            moved = connections_moved.values().sum::<u64>(),
            took_ms = started.elapsed().as_millis(),
            "upgrade: raw TCP connections handed over; draining gRPC and exiting"
        );
        Ok(UpgradeReport {
            old_pid: std::process::id(),
            new_pid,
            binary: binary.display().to_string(),
            connections_moved,
            ready_ms,
            hosts_adopted,
            hosts: hosts.len(),
        })
    }

    /// A second stream into every plugin host this process runs (the
    /// versions its slots have mapped), for the new process to adopt;
    /// as many as one message's descriptors allow beside the sockets.
    async fn hosts_for_successor(&self) -> (Vec<Arc<Installed>>, Vec<Handed>) {
        let room = (MAX_FDS - self.offer().1.len()) / 3;
        let installed: Vec<Arc<Installed>> = {
            let reloader = self.reloader.lock().expect("reloader lock");
            reloader
                .slots()
                .values()
                .flat_map(|s| s.mapped())
                .filter(|i| i.loaded.host().is_some_and(|h| h.exit().is_none()))
                .collect()
        };
        if installed.len() > room {
            tracing::warn!(
                hosts = installed.len(),
                room,
                "upgrade: more plugin hosts than one hand-over message carries; the new process starts the rest anew"
            );
        }
        tokio::task::spawn_blocking(move || {
            let mut offered = Vec::new();
            let mut handed = Vec::new();
            for i in installed.into_iter().take(room) {
                let host = i.loaded.host().expect("only hosts were taken");
                match host.second_stream() {
                    Ok(h) => {
                        handed.push(h);
                        offered.push(i);
                    }
                    Err(e) => tracing::warn!(
                        plugin = %host.spec().plugin,
                        version = %host.spec().version,
                        pid = host.pid(),
                        error = %e,
                        "upgrade: this plugin host cannot be handed over; the new process starts its own"
                    ),
                }
            }
            (offered, handed)
        })
        .await
        .expect("asking hosts for a second stream does not panic")
    }

    /// A new process connected to `[upgrade] socket` (a new pod beside
    /// this one): it is started already, so there is no check and no
    /// spawn; the offer, the wait for ready and the hand-over are the same.
    /// On `Ok` the caller drains and then waits, idle, for SIGTERM (an exit
    /// would have the pod's container restarted).
    pub(super) async fn hand_to_peer(
        &mut self,
        channel: Channel,
        socket: &Path,
    ) -> Result<UpgradeReport, UpgradeError> {
        let started = Instant::now();
        tracing::info!(socket = %socket.display(), "upgrade: a new process asks to take over");
        self.notifier.reloading("a new process takes over");
        self.reloader
            .lock()
            .expect("reloader lock")
            .interrupt_trials();
        let (sockets, fds) = self.offer();
        // No hosts: a new pod's process cannot adopt the old pod's, which
        // end with the old pod's container.
        let offered = channel
            .send(
                &Message::Offer {
                    pid: std::process::id(),
                    sockets,
                    hosts: Vec::new(),
                },
                &[],
                &fds,
            )
            .map_err(|source| UpgradeError::Channel {
                binary: socket.to_owned(),
                source,
            });
        let who = socket.to_owned();
        let ready = match offered {
            Ok(()) => tokio::task::spawn_blocking(move || wait_ready(channel, None))
                .await
                .expect("the wait for ready does not panic")
                .map_err(|how| UpgradeError::NotReady {
                    binary: who,
                    pid: 0,
                    how,
                }),
            Err(e) => Err(e),
        };
        let (channel, new_pid, _) = match ready {
            Ok(r) => r,
            Err(e) => return Err(self.serve_on(e)),
        };
        let ready_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let connections_moved = self.hand_over(channel).await;
        self.handed_over = true;
        self.parked = true;
        tracing::info!(
            new_pid,
            moved = connections_moved.values().sum::<u64>(),
            "upgrade: handed over to the new process; draining gRPC, then idle until SIGTERM"
        );
        Ok(UpgradeReport {
            old_pid: std::process::id(),
            new_pid,
            binary: socket.display().to_string(),
            connections_moved,
            ready_ms,
            hosts_adopted: 0,
            hosts: 0,
        })
    }

    /// After a new process failed to take over: this one serves on, its
    /// trials go on (journalled as resumed), the service manager hears
    /// READY=1 again and the failure is counted. Returns `e`.
    fn serve_on(&mut self, e: UpgradeError) -> UpgradeError {
        self.reloader
            .lock()
            .expect("reloader lock")
            .resume_trials_after_failed_upgrade();
        self.notifier.ready(&self.ready_status);
        self.metrics.upgrade(UpgradeOutcome::Failed);
        e
    }

    /// Starts `binary`, offers it the listening sockets and the `hosts`
    /// and waits for it to say it serves (and which hosts it adopted).
    async fn start_successor(
        &self,
        binary: &Path,
        args: &[OsString],
        hosts: Vec<Handed>,
    ) -> Result<(Channel, u32, Vec<u32>), UpgradeError> {
        let channel_err = |source| UpgradeError::Channel {
            binary: binary.to_owned(),
            source,
        };
        let (ours, theirs) = Channel::pair().map_err(channel_err)?;
        let mut cmd = std::process::Command::new(binary);
        cmd.args(args)
            .env(UPGRADE_FD_ENV, theirs.raw_fd().to_string())
            .stdin(std::process::Stdio::null());
        for var in NOT_INHERITED {
            cmd.env_remove(var);
        }
        let fd = theirs.raw_fd();
        // SAFETY: between fork and exec only fcntl runs, which is
        // async-signal-safe; it lets the new process inherit its end.
        unsafe {
            cmd.pre_exec(move || set_cloexec(fd, false));
        }
        let mut child = cmd.spawn().map_err(|source| UpgradeError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
        drop(theirs);
        let pid = child.id();
        tracing::info!(pid, "upgrade: new process started");
        let (sockets, mut fds) = self.offer();
        let mut about = Vec::with_capacity(hosts.len());
        for h in &hosts {
            about.push(serde_json::to_value(&h.about).expect("plain struct"));
            fds.extend([h.calls.as_fd(), h.control.as_fd(), h.pidfd.as_fd()]);
        }
        let offered = ours.send(
            &Message::Offer {
                pid: std::process::id(),
                sockets,
                hosts: about,
            },
            &[],
            &fds,
        );
        drop(fds);
        // The new process has its own copies now (or none, if the send
        // failed): the hosts' new streams must not stay open here.
        drop(hosts);
        if let Err(e) = offered {
            kill(&mut child);
            return Err(channel_err(e));
        }
        let binary = binary.to_owned();
        tokio::task::spawn_blocking(move || match wait_ready(ours, Some(&mut child)) {
            Ok(ready) => Ok(ready),
            Err(how) => {
                kill(&mut child);
                Err(UpgradeError::NotReady { binary, pid, how })
            }
        })
        .await
        .expect("the wait for ready does not panic")
    }

    /// Every listening socket this process has, as offered.
    fn offer(&self) -> (Vec<Offered>, Vec<BorrowedFd<'_>>) {
        let mut sockets = Vec::new();
        let mut fds = Vec::new();
        for l in &self.listeners {
            sockets.push(Offered::Listener {
                name: l.config.name.clone(),
            });
            fds.push(l.socket.as_fd());
        }
        sockets.push(Offered::Metrics);
        fds.push(self.metrics_socket.as_fd());
        sockets.push(Offered::Admin);
        fds.push(self.admin_socket.as_fd());
        (sockets, fds)
    }

    /// Stops accepting (the new process accepts from the same sockets),
    /// moves every raw TCP connection at its next frame boundary and starts
    /// the gRPC drain. Returns the connections moved, per listener.
    async fn hand_over(&mut self, channel: Channel) -> BTreeMap<String, u64> {
        // The new process answers the admin socket and /metrics from now on.
        let _ = self.admin_stop.send(true);
        if let Some(stop) = self.metrics_stop.take() {
            let _ = stop.send(());
        }
        let (to, moving) = std::sync::mpsc::channel::<Moving>();
        self.hand_off.direct_to(to);
        let sender = std::thread::Builder::new()
            .name("plugvisor-handover".into())
            .spawn(move || send_connections(&channel, &moving))
            .expect("spawning the hand-over thread");
        let _ = self.shutdown.send(true);
        // A raw TCP listener's task ends once each of its connections has
        // moved (each waits for its frame in flight, bounded by the drain).
        let (tcp, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|l| l.config.protocol == Protocol::Tcp);
        self.listeners = rest;
        let bound = self.config.shutdown.drain_timeout + EXIT_TIMEOUT;
        let moved_all = tokio::time::timeout(bound, async {
            for l in tcp {
                let _ = l.task.await;
            }
        })
        .await;
        if moved_all.is_err() {
            tracing::warn!(
                ?bound,
                "upgrade: raw TCP connections still busy; the rest close"
            );
        }
        self.hand_off.release();
        tokio::task::spawn_blocking(move || sender.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}

/// Runs `binary run … --check` with this daemon's own arguments.
async fn check(binary: &Path, args: &[OsString]) -> Result<(), UpgradeError> {
    let failed = |status: String, output: &[u8]| UpgradeError::Check {
        binary: binary.to_owned(),
        status,
        output: tail(output),
    };
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .arg("--check")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for var in NOT_INHERITED {
        cmd.env_remove(var);
    }
    let out = match tokio::time::timeout(CHECK_TIMEOUT, cmd.output()).await {
        Err(_) => return Err(failed(format!("no answer in {CHECK_TIMEOUT:?}"), &[])),
        Ok(Err(source)) => {
            return Err(UpgradeError::Spawn {
                binary: binary.to_owned(),
                source,
            });
        }
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        Ok(())
    } else {
        let mut output = out.stderr;
        output.extend_from_slice(&out.stdout);
        Err(failed(out.status.to_string(), &output))
    }
}

/// The last line or two of a command's output, for one error line.
fn tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(2);
    let joined = lines[start..].join(" / ");
    if joined.is_empty() {
        "(it printed nothing)".to_owned()
    } else {
        joined
    }
}

/// Waits for the new process's "ready" (watching it exit, when it is our
/// child); `Err` says what happened instead.
fn wait_ready(
    mut channel: Channel,
    mut child: Option<&mut std::process::Child>,
) -> Result<(Channel, u32, Vec<u32>), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match channel.recv(Some(LIVENESS_POLL)) {
            Ok(r) => match r.message {
                Message::Ready { pid, adopted } => return Ok((channel, pid, adopted)),
                other => return Err(format!("said {other:?} before it was ready")),
            },
            Err(HandoverError::Timeout(_)) => {}
            Err(HandoverError::Closed) => {
                // Its end closes as it exits: give the exit a moment to be
                // reaped, so the error can name the status.
                let until = Instant::now() + Duration::from_secs(1);
                while let Some(c) = child.as_deref_mut() {
                    if let Ok(Some(status)) = c.try_wait() {
                        return Err(format!("exited ({status})"));
                    }
                    if Instant::now() >= until {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Err("closed the hand-over channel".to_owned());
            }
            Err(e) => return Err(e.to_string()),
        }
        if let Some(Ok(Some(status))) = child.as_deref_mut().map(std::process::Child::try_wait) {
            return Err(format!("exited ({status})"));
        }
        if Instant::now() >= deadline {
            return Err(format!("was not ready in {READY_TIMEOUT:?} and was killed"));
        }
    }
}

/// Kills a new process that will not serve, and reaps it.
fn kill(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The hand-over thread of the old process: each connection that reaches
/// its frame boundary goes over the channel; then `Done`. Returns how many
/// went, per listener.
fn send_connections(
    channel: &Channel,
    moving: &std::sync::mpsc::Receiver<Moving>,
) -> BTreeMap<String, u64> {
    let mut moved: BTreeMap<String, u64> = BTreeMap::new();
    let mut lost = 0u64;
    for m in moving {
        let sent = channel.send(
            &Message::Connection {
                listener: m.listener.clone(),
            },
            &m.pending,
            &[m.stream.as_fd()],
        );
        match sent {
            Ok(()) => *moved.entry(m.listener).or_default() += 1,
            Err(e) => {
                lost += 1;
                tracing::error!(listener = %m.listener, error = %e, "upgrade: a connection could not be handed over; it closes");
            }
        }
        // Our copy closes here; the new process holds the connection.
    }
    let total = moved.values().sum();
    if let Err(e) = channel.send(&Message::Done { connections: total }, &[], &[]) {
        tracing::warn!(error = %e, "upgrade: could not tell the new process the hand-over is done");
    }
    if lost > 0 {
        tracing::error!(lost, "upgrade: connections closed instead of handed over");
    }
    moved
}

/// What this process was handed at start: by the process it replaces
/// (`plugvisor upgrade`), or by the service manager (socket activation).
#[derive(Default)]
pub(super) struct Inheritance {
    /// Listening sockets by listener name.
    pub(super) listeners: crate::listeners::Inherited,
    /// The `/metrics` socket.
    pub(super) metrics: Option<OwnedFd>,
    /// The admin socket.
    pub(super) admin: Option<OwnedFd>,
    /// The channel to the process this one replaces, and its pid.
    pub(super) predecessor: Option<(Channel, u32)>,
    /// Its plugin hosts, to adopt.
    pub(super) hosts: Vec<Handed>,
}

/// Takes what this process inherited. An upgrade's channel comes first; with
/// none, socket activation's fds (named by `LISTEN_FDNAMES`: a listener's
/// name, or `metrics` for the metrics endpoint).
pub(super) fn inherit(config: &Config) -> Result<Inheritance, DaemonError> {
    let mut inherited = Inheritance::default();
    if let Some(channel) = Channel::from_env().map_err(DaemonError::Upgrade)? {
        take_offer(channel, &mut inherited)?;
        return Ok(inherited);
    }
    if let Some(path) = &config.upgrade.socket {
        if let Some(channel) = Channel::connect(path).map_err(DaemonError::Upgrade)? {
            tracing::info!(socket = %path.display(), "a plugvisor waits at the upgrade socket: taking over from it");
            take_offer(channel, &mut inherited)?;
            return Ok(inherited);
        }
    }
    for (name, fd) in crate::systemd::listen_fds() {
        if config.listeners.iter().any(|l| l.name == name) {
            inherited.listeners.insert(name, fd);
        } else if name == "metrics" {
            inherited.metrics = Some(fd);
        } else {
            tracing::warn!(
                name,
                "socket activation passed a socket no listener is named after; closed"
            );
        }
    }
    if !inherited.listeners.is_empty() || inherited.metrics.is_some() {
        tracing::info!(
            listeners = %inherited.listeners.keys().cloned().collect::<Vec<_>>().join(","),
            metrics = inherited.metrics.is_some(),
            "socket activation: serving the sockets the service manager passed"
        );
    }
    Ok(inherited)
}

/// Receives the old process's offer of sockets on `channel`.
fn take_offer(mut channel: Channel, inherited: &mut Inheritance) -> Result<(), DaemonError> {
    let offer = channel
        .recv(Some(OFFER_TIMEOUT))
        .map_err(DaemonError::Upgrade)?;
    let Message::Offer {
        pid,
        sockets,
        hosts,
    } = offer.message
    else {
        return Err(DaemonError::Upgrade(HandoverError::Protocol(format!(
            "expected the offer of sockets, got {:?}",
            offer.message
        ))));
    };
    if sockets.len() + 3 * hosts.len() != offer.fds.len() {
        return Err(DaemonError::Upgrade(HandoverError::Protocol(format!(
            "{} sockets and {} plugin hosts offered with {} descriptors",
            sockets.len(),
            hosts.len(),
            offer.fds.len()
        ))));
    }
    let mut fds = offer.fds.into_iter();
    for (socket, fd) in sockets.into_iter().zip(fds.by_ref()) {
        match socket {
            Offered::Listener { name } => {
                inherited.listeners.insert(name, fd);
            }
            Offered::Metrics => inherited.metrics = Some(fd),
            Offered::Admin => inherited.admin = Some(fd),
        }
    }
    for about in hosts {
        let (Some(calls), Some(control), Some(pidfd)) = (fds.next(), fds.next(), fds.next()) else {
            break;
        };
        match serde_json::from_value::<HandedAbout>(about) {
            Ok(about) => inherited.hosts.push(Handed {
                about,
                calls,
                control,
                pidfd,
            }),
            // Its descriptors close here: the host serves the old process
            // alone, and this one starts its own.
            Err(e) => {
                tracing::warn!(error = %e, "an offered plugin host is described in a way this binary does not read; not adopted");
            }
        }
    }
    tracing::info!(
        from_pid = pid,
        listeners = inherited.listeners.len(),
        hosts = inherited.hosts.len(),
        "taking over from the running plugvisor"
    );
    inherited.predecessor = Some((channel, pid));
    Ok(())
}

/// Waits at `[upgrade] socket` for a process that takes over, on a thread
/// of its own; each one arrives on the returned channel.
pub(super) fn wait_for_successors(path: &Path) -> Result<mpsc::Receiver<Channel>, DaemonError> {
    let waiting = crate::handover::Waiting::bind(path).map_err(DaemonError::Upgrade)?;
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("plugvisor-upgrade-socket".into())
        .spawn(move || {
            loop {
                match waiting.accept() {
                    Ok(channel) => {
                        if tx.blocking_send(channel).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "upgrade socket: no longer waiting for a successor");
                        return;
                    }
                }
            }
        })
        .map_err(|e| DaemonError::Upgrade(HandoverError::Io {
            action: "starting the upgrade socket's thread",
            source: e,
        }))?;
    tracing::info!(socket = %path.display(), "waiting at the upgrade socket for a process that takes over");
    Ok(rx)
}

/// The new process's end once it serves: tells the old one, then adopts
/// the raw TCP connections it sends, each on its listener's channel
/// (`adopt`), on a thread of its own until `Done`.
pub(super) fn succeed(
    (mut channel, old_pid, adopted_hosts): (Channel, u32, Vec<u32>),
    adopt: BTreeMap<String, mpsc::UnboundedSender<Adopted>>,
    metrics: std::sync::Arc<Metrics>,
    old_drains_within: Duration,
) {
    for name in adopt.keys() {
        metrics.handed_over_at_zero(name);
    }
    // The kernel counts what breaks from here until the old process is
    // gone; this process's probes are attached already, the old one's
    // still are: no blind spot.
    crate::markers::plugvisor_upgrade_begin();
    if let Err(e) = channel.send(
        &Message::Ready {
            pid: std::process::id(),
            adopted: adopted_hosts,
        },
        &[],
        &[],
    ) {
        // The old process is gone (killed mid-upgrade): this one serves
        // what it has — the listening sockets — and the rest is lost.
        tracing::error!(old_pid, error = %e, "upgrade: could not tell the old process we serve");
        crate::markers::plugvisor_upgrade_end();
        return;
    }
    metrics.upgrade(UpgradeOutcome::Success);
    let spawned = std::thread::Builder::new()
        .name("plugvisor-adopt".into())
        .spawn(move || {
            adopt_connections(&mut channel, old_pid, &adopt, &metrics);
            wait_gone(old_pid, old_drains_within);
            crate::markers::plugvisor_upgrade_end();
            tracing::info!(old_pid, "upgrade over: the old process is gone (or past its drain); the kernel's count of connections broken across it is final");
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "upgrade: could not start adopting connections");
    }
}

/// Waits until process `pid` is gone (every thread exited, or reaped) or
/// `bound` has passed: the old process drains its gRPC connections after
/// the hand-over, and exits (or, handed over through `[upgrade] socket`,
/// idles).
fn wait_gone(pid: u32, bound: Duration) {
    let deadline = Instant::now() + bound;
    // A pidfd turns readable once every thread of the process has exited,
    // and so once every descriptor it held is closed. Its leader alone
    // shows as a zombie while another thread still holds the sockets: a
    // connection the kill breaks then closes after the window would (the
    // kernel's count missed it).
    // SAFETY: plain syscall; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd >= 0 {
        // SAFETY: a new descriptor nobody else owns.
        let fd = unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(
                i32::try_from(fd).expect("an fd"),
            )
        };
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            events: libc::POLLIN,
            revents: 0,
        };
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&raw mut p, 1, ms) };
            let interrupted =
                rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            if !interrupted {
                return; // gone, or the bound
            }
        }
        return;
    }
    if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return; // reaped already
    }
    // No pidfd (a kernel before 5.3): the leader's state.
    while Instant::now() < deadline {
        let gone = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X']))
        });
        if gone {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn adopt_connections(
    channel: &mut Channel,
    old_pid: u32,
    adopt: &BTreeMap<String, mpsc::UnboundedSender<Adopted>>,
    metrics: &Metrics,
) {
    let mut adopted = 0u64;
    loop {
        match channel.recv(None) {
            Ok(r) => match r.message {
                Message::Connection { listener } => {
                    let Some(fd) = r.fds.into_iter().next() else {
                        tracing::warn!(
                            listener,
                            "upgrade: a connection arrived without its socket"
                        );
                        continue;
                    };
                    let stream = std::net::TcpStream::from(fd);
                    match adopt.get(&listener) {
                        Some(to) if to.send((stream, r.payload)).is_ok() => {
                            adopted += 1;
                            metrics.handed_over(&listener);
                        }
                        _ => tracing::warn!(
                            listener,
                            "upgrade: a connection of a listener this config does not serve over raw TCP; closed"
                        ),
                    }
                }
                Message::Done { connections } => {
                    if connections == adopted {
                        tracing::info!(
                            old_pid,
                            connections,
                            "upgrade: every raw TCP connection taken over"
                        );
                    } else {
                        tracing::warn!(
                            old_pid,
                            sent = connections,
                            adopted,
                            "upgrade: fewer connections taken over than sent"
                        );
                    }
                    return;
                }
                other => tracing::warn!(?other, "upgrade: unexpected message; ignored"),
            },
            Err(HandoverError::Closed) => {
                tracing::warn!(
                    old_pid,
                    adopted,
                    "upgrade: the old process closed the channel before it was done"
                );
                return;
            }
            Err(e) => {
                tracing::error!(old_pid, error = %e, adopted, "upgrade: the hand-over channel failed");
                return;
            }
        }
    }
}

/// An inherited socket for `/metrics`, if it is bound where the config
/// wants it.
pub(super) fn metrics_socket(
    fd: OwnedFd,
    wanted: std::net::SocketAddr,
) -> Option<std::net::TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    match listener.local_addr() {
        Ok(addr) if crate::listeners::serves(wanted, addr) => Some(listener),
        other => {
            tracing::warn!(?other, configured = %wanted, "the inherited metrics socket is not where the config says; binding anew");
            None
        }
    }
}

/// An inherited admin socket, if it is bound at the configured path.
pub(super) fn admin_socket(fd: OwnedFd, wanted: &Path) -> Option<tokio::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    let at = listener.local_addr().ok();
    if at.as_ref().and_then(|a| a.as_pathname()) != Some(wanted) {
        tracing::warn!(configured = %wanted.display(), "the inherited admin socket is not where the config says; binding anew");
        return None;
    }
    listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
        .inspect_err(
            |e| tracing::warn!(error = %e, "inherited admin socket unusable; binding anew"),
        )
        .ok()
}
