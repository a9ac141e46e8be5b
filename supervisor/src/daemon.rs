//! `plugvisor run`: start everything in order, apply commands one at a
//! time, drain on SIGTERM.
//!
//! Start order matters: listeners are bound before anything else can fail
//! late, probes are attached before the first plugin loads (so the kernel
//! sees the first reload too), and the first load comes from the store's
//! refs — the version that was active — before the packages are looked at.
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::control::{Command, ConflictStatus, ListenerStatus, PluginStatus, Status};
use crate::metrics::Metrics;
use crate::probes::{self, WatchedListener};
use crate::reload::{ReloadReport, Reloader, SIGNATURE_GRACE};
use crate::store::Store;
use crate::{admin, bundle, catalog, listeners};

/// How long past `[shutdown] drain_timeout` the daemon waits for its
/// listener tasks before it exits anyway. Each listener bounds its own drain
/// by `drain_timeout`; this only covers one that fails to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after [`SIGNATURE_GRACE`] a deferred package is looked at
/// again, so the grace has surely run out by then.
const DEFERRED_RECHECK_MARGIN: Duration = Duration::from_millis(100);

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
    Admin(#[from] admin::AdminError),
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
    Watch(#[from] catalog::watch::WatchError),
    /// A `[trust]` key file could not be read.
    #[error("[trust]: {0}")]
    Trust(#[from] crate::trust::TrustError),
    /// Installing a signal handler failed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the daemon until SIGTERM or SIGINT.
#[expect(
    clippy::too_many_lines,
    reason = "the start order is the point of this function and reads best in one place"
)]
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let metrics = Arc::new(Metrics::new());
    if !config.plugins_dir.exists() {
        // Created 0755 whatever the umask: the check below refuses a
        // group-writable plugins_dir, and the daemon must not refuse the
        // one it made itself.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(&config.plugins_dir)
            .and_then(|()| {
                std::fs::set_permissions(
                    &config.plugins_dir,
                    std::fs::Permissions::from_mode(0o755),
                )
            })
            .map_err(|e| DaemonError::PluginsDir {
                path: config.plugins_dir.clone(),
                message: e.to_string(),
            })?;
    }
    // Whoever may write plugins_dir may run code in this process.
    catalog::strict::check_path("plugins_dir", &config.plugins_dir).map_err(|e| {
        DaemonError::PluginsDir {
            path: config.plugins_dir.clone(),
            message: e.reason,
        }
    })?;
    let trust = crate::trust::TrustPolicy::load(&config.trust)?;
    tracing::info!(
        require_signature = trust.require_signature(),
        keys = %trust.keys().iter().map(|k| k.id.as_str()).collect::<Vec<_>>().join(","),
        "package trust"
    );
    if config.is_embedded_default() {
        match bundle::seed_echo(&config.plugins_dir) {
            Ok(Some(v)) => {
                tracing::info!(version = %v, dir = %config.plugins_dir.display(), "seeded the bundled echo plugin");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not seed the bundled echo plugin; the echo listeners answer errors until a package arrives");
            }
        }
    }
    let store = Store::open(&config.state_dir)?;

    let bound = listeners::bind_all(&config.listeners)?;
    for b in &bound {
        tracing::info!(listener = %b.config.name, addr = %b.local_addr, protocol = b.config.protocol.as_str(), plugin = %b.config.plugin, "bound listener");
    }

    let plugin_names = Arc::new(RwLock::new(config.plugins()));
    let watched: Vec<WatchedListener> = bound
        .iter()
        .map(|b| WatchedListener {
            name: b.config.name.clone(),
            port: b.local_addr.port(),
            protocol: b.config.protocol,
        })
        .collect();
    let probes = probes::start(config.probes.mode, &watched, &plugin_names, &metrics)?;

    let mut reloader = Reloader::new(
        config.plugins_dir.clone(),
        store,
        metrics.clone(),
        config.reload.keep_loaded,
        plugin_names,
    );
    reloader.set_trust(trust);
    for plugin in config.plugins() {
        reloader.slot(&plugin);
        reloader.boot_from_store(&plugin);
    }
    reloader.refresh_dependency_conflicts();
    let reloader = Arc::new(Mutex::new(reloader));
    // Created before the first scan: a deferred package schedules its
    // second look through it.
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(64);
    rescan(&reloader, None, false, &cmd_tx).await;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut listener_tasks = Vec::new();
    for b in bound {
        let slot = reloader
            .lock()
            .expect("reloader lock")
            .slot(&b.config.plugin);
        listener_tasks.push(listeners::spawn(
            b,
            slot,
            shutdown_rx.clone(),
            config.shutdown.drain_timeout,
        )?);
    }

    // /metrics outlives the listeners' drain, so the drain itself (GOAWAYs,
    // connections closing) can still be scraped.
    let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = crate::metrics::serve(config.metrics.listen, metrics.clone(), async move {
        let _ = metrics_stop_rx.await;
    })
    .await
    .map_err(|source| DaemonError::Metrics {
        addr: config.metrics.listen,
        source,
    })?;
    tracing::info!(addr = %config.metrics.listen, "metrics at /metrics");

    let admin_listener = admin::bind(&config.admin.socket)?;
    let admin_task = tokio::spawn(admin::serve(admin_listener, cmd_tx.clone()));

    let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<BTreeSet<String>>();
    let _watcher = catalog::watch::start(&config.plugins_dir, config.reload.debounce, watch_tx)?;

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).map_err(DaemonError::Signals)?;

    tracing::info!(pid = std::process::id(), "plugvisor ready");
    loop {
        // Shutdown first: a storm of reloads must not starve it.
        tokio::select! {
            biased;
            _ = sigterm.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: draining"); break; }
            _ = sigusr1.recv() => {
                tracing::info!("SIGUSR1: rescanning plugins_dir");
                rescan(&reloader, None, true, &cmd_tx).await;
            }
            _ = sighup.recv() => {
                // Config changes that need new sockets take a restart; the
                // packages are what a HUP can act on without one.
                tracing::info!("SIGHUP: rescanning plugins_dir");
                rescan(&reloader, None, false, &cmd_tx).await;
            }
            Some(names) = watch_rx.recv() => {
                // Coalesce a burst of events into one pass.
                let mut names = names;
                while let Ok(more) = watch_rx.try_recv() {
                    names.extend(more);
                }
                rescan(&reloader, Some(names.into_iter().collect()), false, &cmd_tx).await;
            }
            Some(cmd) = cmd_rx.recv() => match cmd {
                Command::Rescan { plugins, force, reply } => {
                    let reports = rescan(&reloader, plugins, force, &cmd_tx).await;
                    if let Some(reply) = reply {
                        let _ = reply.send(reports);
                    }
                }
                Command::Status { reply } => {
                    let _ = reply.send(status(&reloader, &config, &metrics));
                }
            },
        }
    }

    let _ = shutdown_tx.send(true);
    admin_task.abort();
    let exit_bound = config.shutdown.drain_timeout + EXIT_TIMEOUT;
    let drained = tokio::time::timeout(exit_bound, async {
        for t in listener_tasks {
            let _ = t.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("listeners did not drain in {exit_bound:?}; exiting anyway");
    }
    let _ = metrics_stop_tx.send(());
    let _ = metrics_task.await;
    let _ = std::fs::remove_file(&config.admin.socket);
    drop(probes);
    tracing::info!("plugvisor stopped");
    Ok(())
}

/// Runs reloads for `plugins` (or every package and slot) off the async
/// workers: `dlopen` and `init` block. A package that was deferred (its
/// signature names a manifest not yet in place) is looked at again once
/// the grace has passed, whether or not another event arrives.
async fn rescan(
    reloader: &Arc<Mutex<Reloader>>,
    plugins: Option<Vec<String>>,
    force: bool,
    commands: &mpsc::Sender<Command>,
) -> Vec<ReloadReport> {
    let reports = rescan_now(reloader, plugins, force).await;
    let deferred: Vec<String> = reports
        .iter()
        .filter(|r| r.outcome == "deferred")
        .map(|r| r.plugin.clone())
        .collect();
    if !deferred.is_empty() {
        let commands = commands.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SIGNATURE_GRACE + DEFERRED_RECHECK_MARGIN).await;
            let _ = commands
                .send(Command::Rescan {
                    plugins: Some(deferred),
                    force: false,
                    reply: None,
                })
                .await;
        });
    }
    reports
}

async fn rescan_now(
    reloader: &Arc<Mutex<Reloader>>,
    plugins: Option<Vec<String>>,
    force: bool,
) -> Vec<ReloadReport> {
    let reloader = reloader.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut r = reloader.lock().expect("reloader lock");
        let names: Vec<String> = plugins.unwrap_or_else(|| {
            let mut all: BTreeSet<String> = r.packages().into_iter().collect();
            all.extend(r.slots().keys().cloned());
            all.into_iter().collect()
        });
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| crate::config::valid_name(n))
            .collect();
        r.in_dependency_order(&names)
            .iter()
            .map(|n| r.reload(n, force))
            .filter(|rep| force || rep.outcome != "unchanged")
            .collect::<Vec<_>>()
    })
    .await;
    result.unwrap_or_else(|e| {
        tracing::error!(error = %e, "reload task panicked");
        Vec::new()
    })
}

fn status(reloader: &Arc<Mutex<Reloader>>, config: &Config, metrics: &Metrics) -> Status {
    let r = reloader.lock().expect("reloader lock");
    let mut plugins: Vec<PluginStatus> = r
        .slots()
        .values()
        .map(|s| PluginStatus {
            plugin: s.plugin().to_owned(),
            active: s.active().map(|a| a.version().to_owned()),
            mapped: s
                .mapped_versions()
                .iter()
                .map(ToString::to_string)
                .collect(),
        })
        .collect();
    plugins.sort_by(|a, b| a.plugin.cmp(&b.plugin));
    let conflicts = r
        .dependency_conflicts()
        .into_iter()
        .map(|c| ConflictStatus {
            plugin: c.plugin,
            kind: c.kind.as_str().to_owned(),
            message: c.message,
        })
        .collect();
    let probes = plugvisor_probes_common::Probe::ALL
        .iter()
        .map(|p| {
            (
                p.as_str().to_owned(),
                metrics.probe_up.with_label_values(&[p.as_str()]).get() == 1,
            )
        })
        .collect();
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        plugins,
        listeners: config
            .listeners
            .iter()
            .map(|l| ListenerStatus {
                name: l.name.clone(),
                protocol: l.protocol.as_str().to_owned(),
                addr: l.bind.to_string(),
                plugin: l.plugin.clone(),
            })
            .collect(),
        probes,
        conflicts,
    }
}
