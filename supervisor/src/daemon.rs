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

use crate::actions::{Actions, Why};
use crate::config::Config;
use crate::control::socket;
use crate::control::{Command, ConflictStatus, ListenerStatus, PluginStatus, Status, Versions};
use crate::metrics::Metrics;
use crate::probes::{self, WatchedListener};
use crate::reload::{AttemptOutcome, ReloadReport, Reloader, SIGNATURE_GRACE};
use crate::rules::{self, Decision, DecisionKind, Engine, Thresholds};
use crate::store::Store;
use crate::systemd::Notifier;
use crate::{catalog, listeners, seed};

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
}

/// Runs the daemon until SIGTERM or SIGINT.
#[expect(
    clippy::too_many_lines,
    reason = "the start order is the point of this function and reads best in one place"
)]
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let notifier = Arc::new(Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "not notifying the service manager");
        Notifier::disabled()
    }));
    // From the start: a slow start-up (probes, first loads) is still alive.
    let watchdog = notifier.spawn_watchdog();
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
    let trust =
        crate::trust::TrustPolicy::load(&config.trust.public_keys, config.trust.require_signature)?;
    tracing::info!(
        require_signature = trust.require_signature(),
        keys = %trust.keys().iter().map(|k| k.id.as_str()).collect::<Vec<_>>().join(","),
        "package trust"
    );
    if config.is_embedded_default() {
        match seed::seed_echo(&config.plugins_dir) {
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
    if let Err(e) = store.check_writable() {
        // Serve on from what the store holds; say once why nothing new is
        // recorded (each refused write also says so as it happens).
        tracing::error!(state_dir = %config.state_dir.display(), "state_dir is not writable ({e}): serving the versions the store holds; reloads are refused and rollbacks and trial results go unrecorded until it is writable again");
    }

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
    let probes = probes::start(&config.probes, &watched, &plugin_names, &metrics)?;

    let mut reloader = Reloader::new(
        config.plugins_dir.clone(),
        store,
        metrics.clone(),
        config.reload.keep_loaded,
        plugin_names,
    );
    reloader.set_trust(trust);
    reloader.set_init_timeout(config.reload.init_timeout);
    reloader.recover_interrupted_loads();
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

    let mut actions = Actions::default();
    actions.fallbacks = config.fallbacks();
    let listener_plugins = config
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.plugin.clone()))
        .collect();
    let mut engine = Engine::new(metrics.clone(), listener_plugins);
    if let Some(path) = &config.thresholds {
        load_thresholds(&mut engine, path, &metrics);
    }
    let (rules_tx, mut rules_rx) = mpsc::unbounded_channel::<()>();
    let _rules_watcher = match &config.thresholds {
        Some(path) => Some(rules::watch_file(path, config.reload.debounce, rules_tx)?),
        None => None,
    };
    let mut ticker = tokio::time::interval(engine.interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

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

    // The signal sources measure the service as it runs, so they start
    // once it serves. The poller must not wait behind a reload (which holds
    // the reloader through dlopen and init): it skips a busy moment.
    crate::signals::resources::start(&metrics, &config.state_dir);
    let health = {
        let reloader = reloader.clone();
        crate::signals::health::start(
            &config.health_checks,
            Box::new(move || {
                let r = reloader.try_lock().ok()?;
                Some(r.slots().values().cloned().collect())
            }),
            &metrics,
        )
    };

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

    let admin_listener = socket::bind(&config.admin.socket)?;
    let admin_task = tokio::spawn(socket::serve(admin_listener, cmd_tx.clone()));

    let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<BTreeSet<String>>();
    let _watcher = catalog::watch::start(&config.plugins_dir, config.reload.debounce, watch_tx)?;

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).map_err(DaemonError::Signals)?;

    tracing::info!(pid = std::process::id(), "plugvisor ready");
    let ready_status = format!(
        "serving {} listener(s); metrics on {}",
        config.listeners.len(),
        config.metrics.listen
    );
    notifier.ready(&ready_status);
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
                // thresholds and the packages are what a HUP acts on.
                tracing::info!("SIGHUP: re-reading the thresholds file and rescanning plugins_dir");
                notifier.reloading("SIGHUP: re-reading thresholds and rescanning plugins_dir");
                if let Some(path) = &config.thresholds {
                    load_thresholds(&mut engine, path, &metrics);
                    ticker = retick(ticker, engine.interval());
                }
                rescan(&reloader, None, false, &cmd_tx).await;
                notifier.ready(&ready_status);
            }
            Some(()) = rules_rx.recv() => {
                while rules_rx.try_recv().is_ok() {}
                if let Some(path) = &config.thresholds {
                    load_thresholds(&mut engine, path, &metrics);
                    ticker = retick(ticker, engine.interval());
                }
            }
            _ = ticker.tick() => {
                let decisions = engine.evaluate();
                let mut r = reloader.lock().expect("reloader lock");
                for d in decisions {
                    act(&mut actions, &mut r, &d);
                }
                actions.promote_trials(&r, config.reload.trial, &engine.firing_plugins());
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
                    let _ = reply.send(status(&reloader, &config, &metrics, &actions, &engine));
                }
                Command::Rollback { plugin, to, reply } => {
                    let result = match to.as_deref().map(semver::Version::parse).transpose() {
                        Err(e) => Err(format!("--to {}: {e}", to.unwrap_or_default())),
                        Ok(to) => {
                            let mut r = reloader.lock().expect("reloader lock");
                            actions.rollback(&mut r, &plugin, to.as_ref(), &Why::manual()).map_err(|e| e.to_string())
                        }
                    };
                    let _ = reply.send(result);
                }
                Command::SetEnabled { plugin, enabled, reply } => {
                    let r = reloader.lock().expect("reloader lock");
                    let _ = reply.send(actions.set_enabled(&r, &plugin, enabled).map_err(|e| e.to_string()));
                }
                Command::Versions { plugin, reply } => {
                    let _ = reply.send(versions(&reloader, &plugin));
                }
            },
        }
    }

    notifier.stopping("draining");
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
    // Last, so that nothing can fire a rule or end a trial after it.
    reloader.lock().expect("reloader lock").interrupt_trials();
    let _ = metrics_stop_tx.send(());
    let _ = metrics_task.await;
    let _ = std::fs::remove_file(&config.admin.socket);
    drop(health);
    drop(probes);
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("plugvisor stopped");
    Ok(())
}

/// Reads the thresholds file into `engine`; an invalid file is said with
/// line and column and leaves the rules in force as they were.
fn load_thresholds(engine: &mut Engine, path: &std::path::Path, metrics: &Metrics) {
    match Thresholds::load(path) {
        Ok(t) => {
            let (n, interval) = (t.rules.len(), t.evaluation_interval);
            engine.replace(t);
            metrics.rules_config_valid.set(1);
            tracing::info!(file = %path.display(), rules = n, ?interval, "thresholds loaded");
        }
        Err(e) => {
            metrics.rules_config_valid.set(0);
            tracing::error!(file = %path.display(), "thresholds file refused, previous rules stay in force: {e}");
        }
    }
}

/// A new ticker if the evaluation interval changed.
fn retick(ticker: tokio::time::Interval, every: Duration) -> tokio::time::Interval {
    if ticker.period() == every {
        return ticker;
    }
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// Carries out one rule decision.
fn act(actions: &mut Actions, r: &mut Reloader, d: &Decision) {
    let why = Why {
        reason: d.rule.clone(),
        rule: Some(d.rule.clone()),
        observed: Some(d.observed),
        threshold: Some(d.threshold),
    };
    let Some(plugin) = d.plugin.as_deref() else {
        tracing::warn!(rule = %d.rule, observed = d.observed, threshold = d.threshold, "alert: rule names no plugin to act on");
        return;
    };
    let result = match d.kind {
        DecisionKind::Rollback => actions.rollback(r, plugin, None, &why).map(|_| ()),
        DecisionKind::Degrade(level) => actions.degrade(r, plugin, level, &why).map(|_| ()),
        DecisionKind::ClearDegrade => {
            actions.clear_degrade(r, plugin, &why);
            Ok(())
        }
        DecisionKind::Alert => {
            tracing::warn!(rule = %d.rule, plugin, observed = d.observed, threshold = d.threshold, "alert");
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::error!(rule = %d.rule, plugin, "action not taken: {e}");
    }
}

fn versions(reloader: &Arc<Mutex<Reloader>>, plugin: &str) -> Result<Versions, String> {
    let r = reloader.lock().expect("reloader lock");
    let slot = r
        .slots()
        .get(plugin)
        .cloned()
        .ok_or_else(|| format!("no plugin {plugin:?} is loaded"))?;
    let refs = r.store().refs(plugin).map_err(|e| e.to_string())?;
    let v = |x: &crate::store::VersionRef| x.version.to_string();
    Ok(Versions {
        plugin: plugin.to_owned(),
        active: slot.active().map(|a| a.version().to_owned()),
        known_good: refs.known_good.as_ref().map(v),
        on_trial: refs.trial_since_ms.is_some(),
        mapped: slot
            .mapped_versions()
            .iter()
            .map(ToString::to_string)
            .collect(),
        history: refs.history.iter().map(v).collect(),
        quarantined: refs.quarantined.iter().map(v).collect(),
    })
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
        .filter(|r| r.outcome == AttemptOutcome::Deferred)
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
            .filter(|n| crate::name::valid_name(n))
            .collect();
        let reports = r
            .in_dependency_order(&names)
            .iter()
            .map(|n| r.reload(n, force))
            .filter(|rep| force || rep.outcome != AttemptOutcome::Unchanged)
            .collect::<Vec<_>>();
        if !reports.is_empty() {
            r.collect_garbage();
        }
        reports
    })
    .await;
    result.unwrap_or_else(|e| {
        tracing::error!(error = %e, "reload task panicked");
        Vec::new()
    })
}

fn status(
    reloader: &Arc<Mutex<Reloader>>,
    config: &Config,
    metrics: &Metrics,
    actions: &Actions,
    engine: &Engine,
) -> Status {
    let r = reloader.lock().expect("reloader lock");
    let mut plugins: Vec<PluginStatus> = r
        .slots()
        .values()
        .map(|s| {
            let refs = r.store().refs(s.plugin()).unwrap_or_default();
            PluginStatus {
                plugin: s.plugin().to_owned(),
                active: s.active().map(|a| a.version().to_owned()),
                mapped: s
                    .mapped_versions()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                state: if refs.trial_since_ms.is_some() {
                    "trial"
                } else {
                    "known-good"
                }
                .to_owned(),
                known_good: refs.known_good.map(|k| k.version.to_string()),
                degraded: actions.degraded(s.plugin()).map(str::to_owned),
                disabled: s.admission() == crate::slot::Admission::Disabled,
                last_action: actions.last.get(s.plugin()).cloned(),
            }
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
        .map(|p| (p.as_str().to_owned(), metrics.probe_is_up(*p)))
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
        rules: engine.status(),
        rules_config_valid: metrics.rules_config_valid.get() == 1,
        conflicts,
    }
}
