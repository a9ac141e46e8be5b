//! `plugvisor run`: start everything in order, apply commands one at a
//! time, drain on SIGTERM.
//!
//! Start order matters: listeners are bound before anything else can fail
//! late, probes are attached before the first plugin loads (so the kernel
//! sees the first reload too), and the first load comes from the store's
//! refs — the version that was active — before the packages are looked at.
//!
//! Where each part lives: `start` (the start order, into a running
//! `Daemon`), `events` (every source — signals, the `plugins_dir` and
//! thresholds watchers, the rule ticker, the admin socket — becomes one
//! `events::Event`, applied one at a time), `rescan` (reloads off the
//! async workers, and the second look at a deferred package),
//! `thresholds` (loading the thresholds file, carrying out a rule's
//! decision), `status` (what `plugvisor status` and `versions` show),
//! `crashes` (a plugin host died: roll back, restart, degrade),
//! `upgrade` (this process replaced by a new one: `plugvisor upgrade`,
//! `SIGUSR2`; and a new process taking over, or socket-activated).
//! This file holds the error type and the run from start to drain.

mod crashes;
mod events;
mod rescan;
mod start;
mod status;
mod thresholds;
pub mod upgrade;

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::actions::Actions;
use crate::config::Config;
use crate::control::{Command, socket};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::rules::Engine;
use crate::systemd::Notifier;
use crate::{listeners, probes};

/// How long past `[shutdown] drain_timeout` the daemon waits for its
/// listener tasks before it exits anyway. Each listener bounds its own drain
/// by `drain_timeout`; this only covers one that fails to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `plugins_dir` could not be created or seeded.
    #[error("plugins_dir {path}: {message}")]
    PluginsDir {
        /// The directory.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A listener could not bind.
    #[error(transparent)]
    Bind(#[from] listeners::BindError),
    /// A bound listener could not start serving.
    #[error(transparent)]
    Listener(#[from] listeners::StartError),
    /// Probes are required (`mode = "on"`) and failed.
    #[error("{0} ([probes] mode = \"on\" requires the probes)")]
    Probes(#[from] probes::ProbeError),
    /// The admin socket could not be created.
    #[error(transparent)]
    Admin(#[from] socket::AdminError),
    /// The metrics endpoint could not bind.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The `plugins_dir` watcher could not start.
    #[error(transparent)]
    Watch(#[from] crate::fswatch::WatchError),
    /// A `[trust]` key file could not be read.
    #[error("[trust]: {0}")]
    Trust(#[from] crate::trust::TrustError),
    /// Installing a signal handler failed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    /// Taking over from the plugvisor this process replaces failed.
    #[error("taking over from the running plugvisor: {0}")]
    Upgrade(crate::handover::HandoverError),
    /// The fleet sync could not start.
    #[error("{0}")]
    Sync(String),
    /// Reporting (`[report.mqtt]`) could not start.
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let (mut daemon, mut sources) = start::start(config).await?;
    daemon.serve(&mut sources).await;
    // Requests queued for the loop will not be carried out: dropping them
    // tells their clients so now, not after the drain's bound.
    sources.commands.close();
    while sources.commands.try_recv().is_ok() {}
    let parked = daemon.parked;
    daemon.drain().await;
    if parked {
        // Handed over to a new pod: exiting now would have this container
        // restarted, and it would take the sockets back. Idle instead.
        tracing::info!("handed over through the upgrade socket; idle until SIGTERM");
        tokio::select! {
            _ = sources.sigterm.recv() => {}
            _ = sources.sigint.recv() => {}
        }
    }
    Ok(())
}

/// A running daemon: what the event loop acts on, and what the drain
/// stops.
struct Daemon {
    config: Config,
    notifier: Arc<Notifier>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    reloader: Arc<Mutex<Reloader>>,
    actions: Actions,
    engine: Engine,
    // The admin socket's channel; also how a deferred package schedules
    // its second look.
    commands: mpsc::Sender<Command>,
    shutdown: watch::Sender<bool>,
    listeners: Vec<listeners::Running>,
    // Where the raw TCP connections go when an upgrade stops the listeners.
    hand_off: listeners::handoff::HandOff,
    // Duplicates of the /metrics and admin sockets, to offer on an upgrade.
    metrics_socket: OwnedFd,
    admin_socket: OwnedFd,
    // What an upgrade starts again.
    invocation: upgrade::Invocation,
    // Set once an upgrade handed everything to a new process.
    handed_over: bool,
    // Set when that process came through `[upgrade] socket`: after the
    // drain this one idles until SIGTERM instead of exiting.
    parked: bool,
    health: crate::signals::health::HealthChecks,
    probes: Option<probes::Probes>,
    metrics_stop: Option<tokio::sync::oneshot::Sender<()>>,
    metrics_task: tokio::task::JoinHandle<()>,
    admin_task: tokio::task::JoinHandle<()>,
    // Stops the admin socket taking requests; those taken are still answered.
    admin_stop: watch::Sender<bool>,
    // What the service manager is told while serving.
    ready_status: String,
    // Recent plugin host crashes, and where a delayed restart is sent.
    crashes: crashes::Crashes,
    restarts: mpsc::UnboundedSender<(String, u32)>,
    // The fleet sync (`[sync]`), once started.
    sync: Option<crate::fleet::sync::SyncHandle>,
    // The MQTT reporter (`[report.mqtt]`), once started.
    report: Option<crate::report::ReportHandle>,
}

impl Daemon {
    /// Stops accepting, drains the listeners within their bound, records
    /// the trials the stop interrupts, and stops /metrics last. After an
    /// upgrade only the drain is left: the new process has the sockets,
    /// the connections that could move and the trials, and tells the
    /// service manager itself.
    async fn drain(mut self) {
        if self.handed_over {
            // The new process reports from now on (it waits for this one
            // to let go); this node did not go down, so no death.
            if let Some(r) = self.report.take() {
                r.stop(false).await;
            }
        }
        if !self.handed_over {
            self.notifier.stopping("draining");
            let _ = self.shutdown.send(true);
        }
        let _ = self.admin_stop.send(true);
        let exit_bound = self.config.shutdown.drain_timeout + EXIT_TIMEOUT;
        // The duplicates kept to offer an upgrade go first: once a
        // listener's task drops its socket, a connect must be refused at
        // once, not wait in a backlog nobody will accept from.
        let tasks: Vec<_> = self.listeners.into_iter().map(|l| l.task).collect();
        let drained = tokio::time::timeout(exit_bound, async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("listeners did not drain in {exit_bound:?}; exiting anyway");
        }
        if !self.handed_over {
            // Last, so that nothing can fire a rule or end a trial after it.
            self.reloader
                .lock()
                .expect("reloader lock")
                .interrupt_trials();
        }
        if let Some(r) = self.report.take() {
            // After the trials' last journal entries, so they are sent.
            r.stop(true).await;
        }
        if let Some(stop) = self.metrics_stop {
            let _ = stop.send(());
        }
        let _ = self.metrics_task.await;
        // The answers to requests taken before the stop (an upgrade's own,
        // after a hand-over) are written before the process exits.
        let _ = self.admin_task.await;
        if !self.handed_over {
            // After an upgrade the path is the new process's socket.
            let _ = std::fs::remove_file(&self.config.admin.socket);
        }
        drop(self.health);
        drop(self.probes);
        if let Some(w) = self.watchdog {
            w.abort();
        }
        tracing::info!("plugvisor stopped");
    }
}
