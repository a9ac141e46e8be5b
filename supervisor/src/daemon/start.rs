//! The start order, step by step, into a running [`Daemon`] and the
//! [`Sources`] its event loop reads.

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::{Arc, Mutex, RwLock};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use super::events::Sources;
use super::rescan::rescan;
use super::thresholds::load_thresholds;
use super::upgrade::{self, Inheritance, Invocation};
use super::{Daemon, DaemonError};
use crate::actions::Actions;
use crate::config::Config;
use crate::control::{Command, socket};
use crate::host::{Exit, Isolation, Limits, Mechanism, Resources, Spawner};
use crate::listeners::handoff::{Adopted, HandOff};
use crate::metrics::{Detail, Metrics};
use crate::probes::{self, WatchedListener};
use crate::reload::Reloader;
use crate::rules::{self, Engine};
use crate::store::Store;
use crate::systemd::Notifier;
use crate::trust::TrustPolicy;
use crate::{catalog, listeners, seed};

/// Starts everything, in order, up to "ready".
pub(super) async fn start(config: Config) -> Result<(Daemon, Sources), DaemonError> {
    let invocation = Invocation::current();
    // First: an upgrade's old process waits on its offer of sockets, and
    // socket activation's variables must be read before anything else runs.
    let inherited: Inheritance = upgrade::inherit(&config)?;
    let notifier = Arc::new(notifier());
    // From the start: a slow start-up (probes, first loads) is still alive.
    let watchdog = notifier.spawn_watchdog();
    let metrics = Arc::new(Metrics::with_detail(metrics_detail(&config.metrics)));
    prepare_plugins_dir(&config)?;
    let trust = load_trust(&config)?;
    if config.is_embedded_default() {
        seed_echo(&config);
    }
    let (store, report) = open_store(&config, &metrics)?;
    let (bound, watched) = bind(&config, inherited.listeners)?;
    let plugin_names = Arc::new(RwLock::new(config.plugins()));
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
    // Before the first load: a host that dies from then on is news.
    let host_exits = isolate(&mut reloader, &config);
    // Created before the first scan: a deferred package schedules its
    // second look through it.
    let (commands, commands_rx) = mpsc::channel::<Command>(64);
    let (reloader, adopted) = first_loads(reloader, &config, inherited.hosts, &commands).await;

    let mut actions = Actions::default();
    actions.fallbacks = config.fallbacks();
    let rules = start_rules(&config, &metrics)?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let hand_off = HandOff::default();
    let (listeners, adopt) = spawn_listeners(
        bound,
        &reloader,
        &shutdown_rx,
        &config,
        &hand_off,
        inherited.predecessor.is_some(),
    )?;

    let health = start_signals(&config, &metrics, &reloader);

    let (metrics_stop, metrics_task, metrics_socket) =
        serve_metrics(&config, &metrics, inherited.metrics)?;

    let (admin_task, admin_socket, admin_stop) = serve_admin(&config, inherited.admin, &commands)?;

    let (watch_tx, watch_rx) = mpsc::unbounded_channel();
    let packages_watcher =
        catalog::watch::start(&config.plugins_dir, config.reload.debounce, watch_tx)?;

    let (restarts, restarts_rx) = mpsc::unbounded_channel();
    let sig = |kind| signal(kind).map_err(DaemonError::Signals);
    let mut sources = Sources {
        sigterm: sig(SignalKind::terminate())?,
        sigint: sig(SignalKind::interrupt())?,
        sighup: sig(SignalKind::hangup())?,
        sigusr1: sig(SignalKind::user_defined1())?,
        sigusr2: sig(SignalKind::user_defined2())?,
        thresholds_changed: rules.changed,
        packages_changed: watch_rx,
        commands: commands_rx,
        host_exits,
        restarts: restarts_rx,
        successors: None,
        ticker: Sources::ticker(rules.engine.interval()),
        _thresholds_watcher: rules.watcher,
        _packages_watcher: packages_watcher,
    };

    let predecessor = inherited.predecessor.map(|(c, pid)| (c, pid, adopted));
    let (ready_status, successors) = ready(&config, &notifier, predecessor, adopt, &metrics)?;
    sources.successors = successors;
    let sync = start_sync(&config, &metrics, &reloader)?;
    let daemon = Daemon {
        config,
        notifier,
        watchdog,
        metrics,
        reloader,
        actions,
        engine: rules.engine,
        commands,
        shutdown,
        listeners,
        hand_off,
        metrics_socket,
        admin_socket,
        invocation,
        handed_over: false,
        parked: false,
        health,
        probes,
        metrics_stop: Some(metrics_stop),
        metrics_task,
        admin_task,
        admin_stop,
        ready_status,
        crashes: super::crashes::Crashes::default(),
        restarts,
        sync,
        report,
    };
    Ok((daemon, sources))
}

/// Reports to the coordinator (`[report.mqtt]`): started before the first
/// loads so that their journal entries are news, and woken by each
/// journal append.
fn start_report(
    config: &Config,
    metrics: &Arc<Metrics>,
    store: &mut Store,
) -> Result<Option<crate::report::ReportHandle>, DaemonError> {
    let Some(mqtt) = &config.report.mqtt else {
        return Ok(None);
    };
    let node = config.sync.as_ref().map(crate::fleet::sync::node_name);
    let handle = crate::report::start(mqtt, node.as_deref(), &config.state_dir, metrics.clone())?;
    store.wake_on_journal(handle.journal_wake());
    Ok(Some(handle))
}

/// Follows the fleet's TUF repository (`[sync]`), from once this process
/// serves: a first poll never holds up the start.
fn start_sync(
    config: &Config,
    metrics: &Arc<Metrics>,
    reloader: &Arc<Mutex<Reloader>>,
) -> Result<Option<crate::fleet::sync::SyncHandle>, DaemonError> {
    let Some(sync) = &config.sync else {
        return Ok(None);
    };
    crate::fleet::sync::start(
        sync.clone(),
        &config.plugins_dir,
        &config.state_dir,
        metrics.clone(),
        reloader.clone(),
    )
    .map(Some)
    .map_err(|e| {
        DaemonError::Sync(format!(
            "starting the fleet sync under {}: {e}",
            config.state_dir.display()
        ))
    })
}

/// Runs the plugins `[plugin.NAME] isolation` names in plugin hosts of
/// this binary; returns where their deaths are reported.
fn isolate(reloader: &mut Reloader, config: &Config) -> mpsc::UnboundedReceiver<Exit> {
    let (exits, host_exits) = mpsc::unbounded_channel();
    let hosting = config.hosting();
    for (plugin, h) in &hosting {
        if h.isolation == Isolation::InProcess && (h.limits.any() || h.user.is_some()) {
            tracing::warn!(plugin = %plugin, "[plugin.{plugin}] sets limits or a user, which only a plugin host can have; it runs in-process (isolation = \"in-process\"), so they do not apply");
        }
    }
    let resources = if hosting.values().any(|h| h.isolation == Isolation::Process) {
        let r = Resources::discover();
        let mechanism = r.mechanism(&Limits {
            memory_max: Some(1),
            ..Limits::default()
        });
        tracing::info!(
            limits = mechanism.as_str(),
            why_not = %r.why_not.join("; "),
            "plugin hosts are held to their limits by {}",
            match mechanism {
                Mechanism::Cgroup2 => "a cgroup v2 each",
                Mechanism::Cgroup1 => "a v1 cgroup each (the memory controller, and cpu, cpuacct, pids where mounted)",
                _ => "rlimits (memory_max as RLIMIT_AS; cpu_max and pids_max cannot be held)",
            }
        );
        r
    } else {
        Resources::rlimits_only()
    };
    reloader.set_isolation(
        hosting,
        Some(Spawner::this_binary(
            tokio::runtime::Handle::current(),
            exits,
            Arc::new(resources),
        )),
    );
    host_exits
}

/// `/metrics`, until the returned sender fires, on the inherited socket if
/// it is bound where the config says. It outlives the listeners' drain, so
/// the drain itself (GOAWAYs, connections closing) can still be scraped.
/// Also returns a duplicate of its socket, to offer on an upgrade.
fn serve_metrics(
    config: &Config,
    metrics: &Arc<Metrics>,
    inherited: Option<OwnedFd>,
) -> Result<
    (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
        OwnedFd,
    ),
    DaemonError,
> {
    let err = |source| DaemonError::Metrics {
        addr: config.metrics.listen,
        source,
    };
    let listener = match inherited.and_then(|fd| upgrade::metrics_socket(fd, config.metrics.listen))
    {
        Some(l) => l,
        None => std::net::TcpListener::bind(config.metrics.listen).map_err(err)?,
    };
    let dup = listener.as_fd().try_clone_to_owned().map_err(err)?;
    let (metrics_stop, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = crate::metrics::serve(listener, metrics.clone(), async move {
        let _ = metrics_stop_rx.await;
    })
    .map_err(err)?;
    tracing::info!(addr = %config.metrics.listen, "metrics at /metrics");
    Ok((metrics_stop, metrics_task, dup))
}

/// The service manager's notification channel, if it gave one.
fn notifier() -> Notifier {
    Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "not notifying the service manager");
        Notifier::disabled()
    })
}

/// The `[trust]` keys, and a word on what they are.
fn load_trust(config: &Config) -> Result<TrustPolicy, DaemonError> {
    let trust = TrustPolicy::load(&config.trust.public_keys, config.trust.require_signature)?;
    tracing::info!(
        require_signature = trust.require_signature(),
        keys = %trust.keys().iter().map(|k| k.id.as_str()).collect::<Vec<_>>().join(","),
        "package trust"
    );
    Ok(trust)
}

/// The admin socket (inherited from the process this one replaces, if it
/// is at the configured path) served, a duplicate to offer on an upgrade,
/// and what stops it.
fn serve_admin(
    config: &Config,
    inherited: Option<OwnedFd>,
    commands: &mpsc::Sender<Command>,
) -> Result<(tokio::task::JoinHandle<()>, OwnedFd, watch::Sender<bool>), DaemonError> {
    let listener = match inherited.and_then(|fd| upgrade::admin_socket(fd, &config.admin.socket)) {
        Some(l) => l,
        None => socket::bind(&config.admin.socket)?,
    };
    let dup = listener.as_fd().try_clone_to_owned().map_err(|source| {
        DaemonError::Admin(socket::AdminError::Io {
            path: config.admin.socket.clone(),
            action: "duplicating the socket",
            source,
        })
    })?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(socket::serve(listener, commands.clone(), stopped));
    Ok((task, dup, stop))
}

/// Says "ready" — to the service manager, and to the process this one
/// replaces, which then hands over its connections — and then waits at
/// `[upgrade] socket` for the next one (not before: until this process
/// serves, the socket at that path is the previous one's). Returns the
/// status line the service manager is told while serving.
fn ready(
    config: &Config,
    notifier: &Notifier,
    predecessor: Option<(crate::handover::Channel, u32, Vec<u32>)>,
    adopt: BTreeMap<String, mpsc::UnboundedSender<Adopted>>,
    metrics: &Arc<Metrics>,
) -> Result<(String, Option<mpsc::Receiver<crate::handover::Channel>>), DaemonError> {
    tracing::info!(pid = std::process::id(), "plugvisor ready");
    // Every outcome present from the first scrape, so a rate over them is
    // 0 rather than absent.
    metrics.upgrades_at_zero();
    let status = format!(
        "serving {} listener(s); metrics on {}",
        config.listeners.len(),
        config.metrics.listen
    );
    match predecessor {
        Some(predecessor) => {
            notifier.ready_replacing(&status);
            let bound = config.shutdown.drain_timeout + super::EXIT_TIMEOUT;
            upgrade::succeed(predecessor, adopt, metrics.clone(), bound);
        }
        None => notifier.ready(&status),
    }
    let successors = config
        .upgrade
        .socket
        .as_deref()
        .map(upgrade::wait_for_successors)
        .transpose()?;
    Ok((status, successors))
}

/// For an upgrade: one channel per raw TCP listener, its sender for the
/// thread that receives the old process's connections and its receiver
/// for the listener.
fn adoption(
    config: &Config,
    upgrading: bool,
) -> (
    BTreeMap<String, mpsc::UnboundedSender<Adopted>>,
    BTreeMap<String, mpsc::UnboundedReceiver<Adopted>>,
) {
    let mut senders = BTreeMap::new();
    let mut receivers = BTreeMap::new();
    if upgrading {
        for l in config
            .listeners
            .iter()
            .filter(|l| l.protocol == crate::config::Protocol::Tcp)
        {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.insert(l.name.clone(), tx);
            receivers.insert(l.name.clone(), rx);
        }
    }
    (senders, receivers)
}

/// The store, and a word if it cannot take writes; with `[report.mqtt]`,
/// the reporter that follows its journal.
fn open_store(
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<(Store, Option<crate::report::ReportHandle>), DaemonError> {
    let mut store = Store::open(&config.state_dir)?;
    let report = start_report(config, metrics, &mut store)?;
    if let Err(e) = store.check_writable() {
        // Serve on from what the store holds; say once why nothing new is
        // recorded (each refused write also says so as it happens).
        tracing::error!(state_dir = %config.state_dir.display(), "state_dir is not writable ({e}): serving the versions the store holds; reloads are refused and rollbacks and trial results go unrecorded until it is writable again");
    }
    Ok((store, report))
}

/// Every listener bound (or inherited), and what the probes watch of each.
fn bind(
    config: &Config,
    inherited: listeners::Inherited,
) -> Result<(Vec<listeners::Bound>, Vec<WatchedListener>), DaemonError> {
    let bound = listeners::bind_all(&config.listeners, inherited)?;
    for b in &bound {
        tracing::info!(listener = %b.config.name, addr = %b.local_addr, protocol = b.config.protocol.as_str(), plugin = %b.config.plugin, inherited = b.inherited, "bound listener");
    }
    let watched = bound
        .iter()
        .map(|b| WatchedListener {
            name: b.config.name.clone(),
            port: b.local_addr.port(),
            protocol: b.config.protocol,
        })
        .collect();
    Ok((bound, watched))
}

/// The signal sources measure the service as it runs, so they start once
/// it serves. The poller must not wait behind a reload (which holds the
/// reloader through dlopen and init): it skips a busy moment.
fn start_signals(
    config: &Config,
    metrics: &Arc<Metrics>,
    reloader: &Arc<Mutex<Reloader>>,
) -> crate::signals::health::HealthChecks {
    crate::signals::resources::start(metrics, &config.state_dir);
    let hosts = reloader.clone();
    crate::signals::plugin_hosts::start(
        metrics,
        Box::new(move || {
            let r = hosts.try_lock().ok()?;
            Some(r.slots().values().cloned().collect())
        }),
    );
    let reloader = reloader.clone();
    crate::signals::health::start(
        &config.health_checks,
        Box::new(move || {
            let r = reloader.try_lock().ok()?;
            Some(r.slots().values().cloned().collect())
        }),
        metrics,
    )
}

/// The rules engine on the thresholds file, and the watcher that says
/// when the file changes.
struct Rules {
    engine: Engine,
    changed: mpsc::UnboundedReceiver<()>,
    watcher: Option<crate::fswatch::Watcher>,
}

fn start_rules(config: &Config, metrics: &Arc<Metrics>) -> Result<Rules, DaemonError> {
    let listener_plugins = config
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.plugin.clone()))
        .collect();
    let mut engine = Engine::new(metrics.clone(), listener_plugins);
    if let Some(path) = &config.thresholds {
        load_thresholds(&mut engine, path, metrics);
    }
    let (tx, changed) = mpsc::unbounded_channel::<()>();
    let watcher = match &config.thresholds {
        Some(path) => Some(rules::watch_file(path, config.reload.debounce, tx)?),
        None => None,
    };
    Ok(Rules {
        engine,
        changed,
        watcher,
    })
}

/// Every bound listener serving its plugin's slot. When `upgrading`, also
/// where the old process's raw TCP connections go, per listener.
#[expect(
    clippy::type_complexity,
    reason = "the listeners and their adoption channels, made together"
)]
fn spawn_listeners(
    bound: Vec<listeners::Bound>,
    reloader: &Arc<Mutex<Reloader>>,
    shutdown: &watch::Receiver<bool>,
    config: &Config,
    hand_off: &HandOff,
    upgrading: bool,
) -> Result<
    (
        Vec<listeners::Running>,
        BTreeMap<String, mpsc::UnboundedSender<Adopted>>,
    ),
    DaemonError,
> {
    let (adopt, mut adopted) = adoption(config, upgrading);
    let mut running = Vec::new();
    for b in bound {
        let slot = reloader
            .lock()
            .expect("reloader lock")
            .slot(&b.config.plugin);
        let extras = listeners::Extras {
            hand_off: hand_off.clone(),
            adopted: adopted.remove(&b.config.name),
        };
        running.push(listeners::spawn(
            b,
            slot,
            shutdown.clone(),
            config.shutdown.drain_timeout,
            extras,
        )?);
    }
    Ok((running, adopt))
}

/// Creates `plugins_dir` if it is missing and refuses one that others may
/// write: whoever may write plugins_dir may run code in this process.
fn prepare_plugins_dir(config: &Config) -> Result<(), DaemonError> {
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
    catalog::strict::check_path("plugins_dir", &config.plugins_dir).map_err(|e| {
        DaemonError::PluginsDir {
            path: config.plugins_dir.clone(),
            message: e.reason,
        }
    })
}

/// The embedded default serves the bundled echo plugin.
fn seed_echo(config: &Config) {
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

/// The first loads: every plugin from the store (adopting the plugin
/// hosts the process this one replaces offered, where they fit), then a
/// scan of `plugins_dir`. Returns the reloader, shared from here on, and
/// the old process's pids of the hosts adopted.
async fn first_loads(
    mut reloader: Reloader,
    config: &Config,
    hosts: Vec<crate::host::parent::Handed>,
    commands: &mpsc::Sender<Command>,
) -> (Arc<Mutex<Reloader>>, Vec<u32>) {
    reloader.offer_hosts(hosts);
    boot(&mut reloader, config);
    let reloader = Arc::new(Mutex::new(reloader));
    rescan(&reloader, None, false, commands).await;
    let adopted = reloader
        .lock()
        .expect("reloader lock")
        .let_go_of_unadopted();
    (reloader, adopted)
}

/// Every configured plugin up on the version its refs call active, after
/// quarantining what killed the last process in `dlopen` or `init`.
fn boot(reloader: &mut Reloader, config: &Config) {
    reloader.recover_interrupted_loads();
    for plugin in config.plugins() {
        reloader.slot(&plugin);
        reloader.boot_from_store(&plugin);
    }
    reloader.refresh_dependency_conflicts();
}

/// The detail series `[metrics] detail` opts into.
fn metrics_detail(c: &crate::config::MetricsConfig) -> Detail {
    use crate::config::MetricsDetail;
    Detail {
        reload_phases: c.detail.contains(&MetricsDetail::ReloadPhases),
        service_gap: c.detail.contains(&MetricsDetail::ServiceGap),
        crash_recovery: c.detail.contains(&MetricsDetail::CrashRecovery),
        health_checks: c.detail.contains(&MetricsDetail::HealthChecks),
    }
}
