//! The event loop: every source — signals, the `plugins_dir` and
//! thresholds watchers, the rule ticker, the admin socket — becomes one
//! [`Event`], and events are applied one at a time, in the order
//! [`Sources::next`] yields them (shutdown first).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::signal::unix::Signal;
use tokio::sync::mpsc;

use super::Daemon;
use super::rescan::rescan;
use super::status::{status, versions};
use super::thresholds::{act, load_thresholds, retick};
use crate::actions::Why;
use crate::control::Command;
use crate::fswatch::Watcher;
use crate::host::Exit;

/// Where events come from.
pub(super) struct Sources {
    pub(super) sigterm: Signal,
    pub(super) sigint: Signal,
    pub(super) sighup: Signal,
    pub(super) sigusr1: Signal,
    pub(super) sigusr2: Signal,
    pub(super) thresholds_changed: mpsc::UnboundedReceiver<()>,
    pub(super) packages_changed: mpsc::UnboundedReceiver<BTreeSet<String>>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) host_exits: mpsc::UnboundedReceiver<Exit>,
    pub(super) restarts: mpsc::UnboundedReceiver<(String, u32)>,
    /// Processes that connected to `[upgrade] socket` to take over.
    pub(super) successors: Option<mpsc::Receiver<crate::handover::Channel>>,
    pub(super) ticker: tokio::time::Interval,
    // Kept for as long as the loop runs: dropping one stops its events.
    pub(super) _thresholds_watcher: Option<Watcher>,
    pub(super) _packages_watcher: Watcher,
}

/// One thing the daemon acts on.
pub(super) enum Event {
    /// SIGTERM or SIGINT: drain and exit.
    Stop(&'static str),
    /// SIGUSR1: every package, re-processed.
    ForcedRescan,
    /// SIGHUP: the thresholds file again, and a rescan.
    Hangup,
    /// SIGUSR2: upgrade to the binary this daemon was started from.
    Upgrade,
    /// A new process at `[upgrade] socket` asks to take over.
    Successor(crate::handover::Channel),
    /// The thresholds file changed on disk.
    ThresholdsChanged,
    /// Time to evaluate the rules.
    Tick,
    /// Packages changed in `plugins_dir`.
    PackagesChanged(BTreeSet<String>),
    /// A command from the admin socket (or a deferred package's second look).
    Command(Command),
    /// A plugin host died while it served.
    HostExited(Exit),
    /// Time to restart the host that died (plugin, its pid), after backoff.
    RestartHost(String, u32),
}

impl Sources {
    /// A rule ticker that skips ticks it missed rather than bursting.
    pub(super) fn ticker(every: Duration) -> tokio::time::Interval {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }

    /// The next event. Shutdown first: a storm of reloads must not starve
    /// it. A burst of watcher events is coalesced into one.
    async fn next(&mut self) -> Event {
        tokio::select! {
            biased;
            _ = self.sigterm.recv() => Event::Stop("SIGTERM"),
            _ = self.sigint.recv() => Event::Stop("SIGINT"),
            // Before everything but shutdown: while a crashed host is not
            // replaced, its plugin's requests fail.
            Some(exit) = self.host_exits.recv() => Event::HostExited(exit),
            Some((plugin, pid)) = self.restarts.recv() => Event::RestartHost(plugin, pid),
            _ = self.sigusr1.recv() => Event::ForcedRescan,
            _ = self.sighup.recv() => Event::Hangup,
            _ = self.sigusr2.recv() => Event::Upgrade,
            Some(channel) = next_successor(&mut self.successors) => Event::Successor(channel),
            Some(()) = self.thresholds_changed.recv() => {
                while self.thresholds_changed.try_recv().is_ok() {}
                Event::ThresholdsChanged
            }
            _ = self.ticker.tick() => Event::Tick,
            Some(mut names) = self.packages_changed.recv() => {
                while let Ok(more) = self.packages_changed.try_recv() {
                    names.extend(more);
                }
                Event::PackagesChanged(names)
            }
            Some(cmd) = self.commands.recv() => Event::Command(cmd),
        }
    }
}

/// The next process at the upgrade socket, or never when there is none.
async fn next_successor(
    successors: &mut Option<mpsc::Receiver<crate::handover::Channel>>,
) -> Option<crate::handover::Channel> {
    match successors {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// Applies events until one says stop.
    pub(super) async fn serve(&mut self, sources: &mut Sources) {
        loop {
            match sources.next().await {
                Event::Stop(signal) => {
                    tracing::info!("{signal}: draining");
                    return;
                }
                event => self.apply(event).await,
            }
            self.report_states();
            if self.handed_over {
                // A new process serves; what is left here is the drain.
                return;
            }
            // The evaluation interval follows the thresholds file.
            retick(&mut sources.ticker, self.engine.interval());
        }
    }

    async fn apply(&mut self, event: Event) {
        match event {
            Event::Stop(_) => {}
            Event::ForcedRescan => {
                tracing::info!("SIGUSR1: rescanning plugins_dir");
                rescan(&self.reloader, None, true, &self.commands).await;
            }
            Event::Hangup => {
                // Config changes that need new sockets take a restart; the
                // thresholds and the packages are what a HUP acts on.
                tracing::info!("SIGHUP: re-reading the thresholds file and rescanning plugins_dir");
                self.notifier
                    .reloading("SIGHUP: re-reading thresholds and rescanning plugins_dir");
                self.reload_thresholds();
                rescan(&self.reloader, None, false, &self.commands).await;
                self.notifier.ready(&self.ready_status);
            }
            Event::ThresholdsChanged => self.reload_thresholds(),
            Event::Successor(channel) => {
                let socket = self.config.upgrade.socket.clone().unwrap_or_default();
                if let Err(e) = self.hand_to_peer(channel, &socket).await {
                    tracing::error!(error = %e, "upgrade through the upgrade socket failed");
                }
            }
            Event::Upgrade => {
                tracing::info!("SIGUSR2: upgrading");
                self.command(Command::Upgrade {
                    binary: None,
                    reply: None,
                })
                .await;
            }
            Event::Tick => {
                let decisions = self.engine.evaluate();
                let mut r = self.reloader.lock().expect("reloader lock");
                for d in decisions {
                    act(&mut self.actions, &mut r, &d);
                }
                self.actions.promote_trials(
                    &r,
                    self.config.reload.trial,
                    &self.engine.firing_plugins(),
                );
            }
            Event::PackagesChanged(names) => {
                rescan(
                    &self.reloader,
                    Some(names.into_iter().collect()),
                    false,
                    &self.commands,
                )
                .await;
            }
            Event::Command(cmd) => self.command(cmd).await,
            Event::HostExited(exit) => self.host_exited(&exit),
            Event::RestartHost(plugin, pid) => self.restart_host(&plugin, pid),
        }
    }

    /// The plugins' states to the reporter, which publishes those that
    /// changed (`[report.mqtt]`).
    fn report_states(&self) {
        if let Some(report) = &self.report {
            report.set_states(super::status::report_states(&self.status_now()));
        }
    }

    /// The whole daemon as `plugvisor status` shows it.
    fn status_now(&self) -> crate::control::Status {
        status(
            &self.reloader,
            &self.config,
            &self.metrics,
            &self.actions,
            &self.engine,
            self.sync.as_ref(),
            self.report.as_ref(),
        )
    }

    fn reload_thresholds(&mut self) {
        if let Some(path) = &self.config.thresholds {
            load_thresholds(&mut self.engine, path, &self.metrics);
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Rescan {
                plugins,
                force,
                reply,
            } => {
                let reports = rescan(&self.reloader, plugins, force, &self.commands).await;
                if let Some(reply) = reply {
                    let _ = reply.send(reports);
                }
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status_now());
            }
            Command::Rollback { plugin, to, reply } => {
                let result = match to.as_deref().map(semver::Version::parse).transpose() {
                    Err(e) => Err(format!("--to {}: {e}", to.unwrap_or_default())),
                    Ok(to) => {
                        let mut r = self.reloader.lock().expect("reloader lock");
                        self.actions
                            .rollback(&mut r, &plugin, to.as_ref(), &Why::manual())
                            .map_err(|e| e.to_string())
                    }
                };
                let _ = reply.send(result);
            }
            Command::SetEnabled {
                plugin,
                enabled,
                reply,
            } => {
                let r = self.reloader.lock().expect("reloader lock");
                let _ = reply.send(
                    self.actions
                        .set_enabled(&r, &plugin, enabled)
                        .map_err(|e| e.to_string()),
                );
            }
            Command::Versions { plugin, reply } => {
                let _ = reply.send(versions(&self.reloader, &plugin));
            }
            Command::Upgrade { binary, reply } => {
                let result = self.upgrade(binary).await.map_err(|e| {
                    tracing::error!(error = %e, "upgrade failed");
                    e.to_string()
                });
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
        }
    }
}
