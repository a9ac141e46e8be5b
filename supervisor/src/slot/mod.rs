//! A slot: the place a listener sends frames to, and the one pointer a
//! reload changes.
//!
//! The active version sits behind an `ArcSwapOption`: a switch is one
//! atomic store, with no moment in which no version serves, and a request
//! holds its version (a guard or an `Arc`) until it finishes, so it
//! finishes on the version it started on. The last `keep_loaded` versions
//! stay mapped, so going back to one of them is the same pointer swap.
//!
//! A request runs on a runner of the slot's [`CallPool`] (a thread of
//! tokio's blocking pool), never on an async worker, and is bounded by its
//! listener's `request_timeout`: a `handle` that hangs
//! is answered with a timeout error and abandoned, still holding its
//! version — which therefore stays mapped (its `Arc` is alive) until the
//! call returns, if ever. At most [`MAX_STUCK_HANDLES`] abandoned calls per
//! version; beyond that new requests to that version are shed with a clear
//! error. The bound is per version so that a fixed version (or a rollback)
//! serves again at once; the calls stuck in the bad one stay counted in
//! `plugvisor_plugin_calls_stuck` until they return.
//!
//! Listeners that advertise readiness (the gRPC health service) learn of a
//! change of active version through [`Slot::subscribe`], a `watch` channel
//! updated right after each swap; the request path never touches it.
pub mod calls;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use prometheus::{Histogram, IntCounter};
use semver::Version;
use tokio::sync::watch;

use crate::host::{self, Exit, Loaded};
use crate::loader::{self, HandleError, InitBound, LoadedVersion, StuckCalls};
use crate::metrics::{Metrics, PluginCall, RequestCounters};
use calls::{Abandon, CallError, CallPool};

/// Abandoned `handle` calls (still running past their `request_timeout`)
/// allowed per plugin version before new requests to it are shed. Each
/// holds a thread of the blocking pool.
pub const MAX_STUCK_HANDLES: usize = 16;

/// Why a frame was not answered by a plugin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DispatchError {
    /// The slot has no active version (none loaded yet).
    #[error("plugin {plugin:?} has no active version")]
    NoActiveVersion {
        /// The plugin.
        plugin: String,
    },
    /// The plugin failed this request.
    #[error(transparent)]
    Plugin(#[from] HandleError),
    /// The slot refuses work (disabled by an operator).
    #[error("plugin {plugin:?} is disabled; {hint}")]
    Disabled {
        /// The plugin.
        plugin: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The plugin did not answer within the listener's `request_timeout`.
    #[error(
        "plugin {plugin:?} {version} did not answer within {timeout:?} (the listener's request_timeout); the request was abandoned"
    )]
    Timeout {
        /// The plugin.
        plugin: String,
        /// The version that did not answer.
        version: String,
        /// The bound.
        timeout: Duration,
    },
    /// Too many earlier calls to this version are stuck: this one was not made.
    #[error(
        "plugin {plugin:?} {version}: {stuck} earlier requests are stuck past their timeout (at most {limit}); new requests to this version are refused until they return or another version is activated"
    )]
    Shed {
        /// The plugin.
        plugin: String,
        /// The active version.
        version: String,
        /// Calls stuck now.
        stuck: usize,
        /// [`MAX_STUCK_HANDLES`].
        limit: usize,
    },
    /// The version's plugin host died with this request in flight (or no
    /// version was left to send it to).
    #[error(
        "plugin {plugin:?} {version} crashed ({cause}) while handling this request; the connection stays open and the next request goes to whatever serves now"
    )]
    Crashed {
        /// The plugin.
        plugin: String,
        /// The version whose host died.
        version: String,
        /// How it died.
        cause: String,
    },
}

/// What a slot lets in, from most to least open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Admission {
    /// Everything.
    Open = 0,
    /// Work on existing connections, but no new connections (the last step
    /// of degrade).
    ShedNewConnections = 1,
    /// No work at all (`plugvisor disable`).
    Disabled = 2,
}

impl Admission {
    fn from_u8(v: u8) -> Admission {
        match v {
            1 => Admission::ShedNewConnections,
            2 => Admission::Disabled,
            _ => Admission::Open,
        }
    }
}

/// A version installed in a slot, with its request counters resolved once
/// (no label lookup per request).
pub struct Installed {
    /// The loaded version, in this process or in a host.
    pub loaded: Loaded,
    version_label: String,
    ok: IntCounter,
    error: IntCounter,
    panic: IntCounter,
    crashed: IntCounter,
    // A panic is a bug in the plugin: the first one of each version is
    // logged with its message, the rest only counted (a version that
    // panics on every request must not flood the log).
    panic_logged: AtomicBool,
    // Calls into this version abandoned after their timeout, still running.
    stuck: Arc<VersionStuck>,
}

/// Abandoned calls of one version, also counted for the whole plugin.
struct VersionStuck {
    count: AtomicUsize,
    plugin: Arc<StuckCalls>,
    timeouts: IntCounter,
}

impl Abandon for VersionStuck {
    fn gave_up(&self) {
        self.timeouts.inc();
        self.plugin.enter();
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn returned_late(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.plugin.leave();
    }
}

impl Installed {
    fn handle_in_process(
        &self,
        loaded: &LoadedVersion,
        request: &[u8],
    ) -> Result<Vec<u8>, HandleError> {
        let r = loaded.handle(request);
        self.count(&r);
        r
    }

    fn count(&self, r: &Result<Vec<u8>, HandleError>) {
        match r {
            Ok(_) => self.ok.inc(),
            Err(HandleError::Plugin(_)) => self.error.inc(),
            Err(HandleError::Panic(message)) => {
                self.panic.inc();
                if !self.panic_logged.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        plugin = self.loaded.plugin(),
                        version = %self.version_label,
                        "plugin panicked while handling a request: {message}; that request was answered with an error and the version serves on (further panics of this version are counted in plugvisor_requests_total{{outcome=\"panic\"}}, not logged)"
                    );
                }
            }
        }
    }

    /// The version's string form.
    pub fn version(&self) -> &str {
        &self.version_label
    }
}

/// What a dead host was to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRole {
    /// It ran the active version: requests fail until it is replaced.
    Active,
    /// It ran a standby version, now dropped from the mapped set.
    Standby,
    /// Nothing the slot still holds (replaced or evicted already).
    Gone,
}

/// One plugin's slot.
pub struct Slot {
    plugin: String,
    keep_loaded: usize,
    active: ArcSwapOption<Installed>,
    // Newest last; includes the active version.
    mapped: Mutex<VecDeque<Arc<Installed>>>,
    // (version, state) series of plugin_info this slot has published.
    published: Mutex<Vec<(String, &'static str)>>,
    // The active version's string form, for listeners that report readiness.
    active_version: watch::Sender<Option<String>>,
    // The known-good version: never evicted from `mapped`, so rolling back
    // to it is a pointer swap, never a dlopen.
    pinned: Mutex<Option<Version>>,
    admission: AtomicU8,
    // Degrade's built-in fallback: answer each request with its own bytes.
    passthrough: AtomicBool,
    // Abandoned calls still running, and the counters of timeouts and
    // sheds, resolved once (no label lookup per request).
    stuck_init: Arc<StuckCalls>,
    stuck_handle: Arc<StuckCalls>,
    init_timeouts: IntCounter,
    handle_timeouts: IntCounter,
    init_shed: IntCounter,
    handle_shed: IntCounter,
    calls: Arc<CallPool>,
    // Set when the active version's host died; the first answer after it
    // observes the recovery time, and tells the kernel which dead hosts
    // (pids) it recovered from.
    recovering: Mutex<Option<(Instant, Vec<u32>)>>,
    recovering_flag: AtomicBool,
    recovery: Histogram,
    // The plugin's index in the probes' name list (the markers pass it).
    probe_index: AtomicU32,
    metrics: Arc<Metrics>,
}

impl Slot {
    /// An empty slot for `plugin` keeping at most `keep_loaded` versions mapped.
    pub fn new(plugin: &str, keep_loaded: usize, metrics: Arc<Metrics>) -> Slot {
        let init = metrics.calls(plugin, PluginCall::Init);
        let handle = metrics.calls(plugin, PluginCall::Handle);
        Slot {
            stuck_init: Arc::new(StuckCalls::new(loader::MAX_STUCK_INITS, init.stuck)),
            stuck_handle: Arc::new(StuckCalls::new(MAX_STUCK_HANDLES, handle.stuck)),
            init_timeouts: init.timeouts,
            handle_timeouts: handle.timeouts,
            init_shed: init.shed,
            handle_shed: handle.shed,
            calls: CallPool::new(),
            plugin: plugin.to_owned(),
            keep_loaded: keep_loaded.max(1),
            active: ArcSwapOption::empty(),
            mapped: Mutex::new(VecDeque::new()),
            published: Mutex::new(Vec::new()),
            active_version: watch::Sender::new(None),
            pinned: Mutex::new(None),
            admission: AtomicU8::new(Admission::Open as u8),
            passthrough: AtomicBool::new(false),
            recovering: Mutex::new(None),
            recovering_flag: AtomicBool::new(false),
            recovery: metrics.crash_recovery(plugin),
            probe_index: AtomicU32::new(u32::MAX),
            metrics,
        }
    }

    /// The index the kernel knows this plugin by (its place in the probes'
    /// plugin name list), passed to the crash markers.
    pub fn set_probe_index(&self, index: u32) {
        self.probe_index.store(index, Ordering::Relaxed);
    }

    /// What the slot lets in now.
    pub fn admission(&self) -> Admission {
        Admission::from_u8(self.admission.load(Ordering::Acquire))
    }

    /// Changes what the slot lets in.
    pub fn set_admission(&self, a: Admission) {
        self.admission.store(a as u8, Ordering::Release);
    }

    /// Whether a listener should accept a new connection for this slot.
    pub fn admits_connections(&self) -> bool {
        self.admission() == Admission::Open
    }

    /// Answers every request with its own bytes instead of calling the
    /// plugin (degrade's built-in fallback), or stops doing so.
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Release);
    }

    /// Whether the built-in pass-through is answering.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Acquire)
    }

    /// Keeps `version` mapped whatever `keep_loaded` says (the known-good one).
    pub fn pin(&self, version: Option<Version>) {
        *self.pinned.lock().expect("slot lock") = version;
    }

    fn refusal(&self) -> Option<DispatchError> {
        (self.admission() == Admission::Disabled).then(|| DispatchError::Disabled {
            plugin: self.plugin.clone(),
            hint: "`plugvisor enable` restores it",
        })
    }

    /// Follows the active version: the receiver holds its string form, or
    /// `None` while the slot has none, and is notified after every switch.
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.active_version.subscribe()
    }

    /// The plugin this slot serves.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// Handles one frame on the active version and says which version
    /// answered. The plugin runs on a runner of the slot's [`CallPool`],
    /// never on an async worker; after `timeout` the call is abandoned and
    /// answered with [`DispatchError::Timeout`]. A zero `timeout` means no
    /// bound: the plugin is called inline, on the caller's thread. While [`MAX_STUCK_HANDLES`] abandoned
    /// calls still run, new ones are shed ([`DispatchError::Shed`]).
    pub async fn call(
        &self,
        request: Vec<u8>,
        timeout: Duration,
    ) -> (Result<Vec<u8>, DispatchError>, Option<String>) {
        if let Some(e) = self.refusal() {
            return (Err(e), None);
        }
        if self.passthrough() {
            return (Ok(request), Some("passthrough".to_owned()));
        }
        let Some(installed) = self.active.load_full() else {
            return (
                Err(DispatchError::NoActiveVersion {
                    plugin: self.plugin.clone(),
                }),
                None,
            );
        };
        let (result, version) = match &installed.loaded {
            Loaded::Process(_) => self.call_host(installed, request, timeout).await,
            Loaded::InProcess(_) => self.call_in_process(installed, request, timeout).await,
        };
        if result.is_ok() && self.recovering_flag.load(Ordering::Relaxed) {
            self.recovered();
        }
        (result, version)
    }

    /// A call into a version mapped in this process.
    async fn call_in_process(
        &self,
        installed: Arc<Installed>,
        request: Vec<u8>,
        timeout: Duration,
    ) -> (Result<Vec<u8>, DispatchError>, Option<String>) {
        let version = installed.version_label.clone();
        let stuck_here = installed.stuck.count.load(Ordering::Acquire);
        if stuck_here >= MAX_STUCK_HANDLES {
            self.handle_shed.inc();
            let e = DispatchError::Shed {
                plugin: self.plugin.clone(),
                version: version.clone(),
                stuck: stuck_here,
                limit: MAX_STUCK_HANDLES,
            };
            return (Err(e), Some(version));
        }
        if timeout.is_zero() {
            // `request_timeout = "0s"`: no bound, called right here on the
            // async worker — the fastest path, for a plugin trusted never
            // to block (one that hangs then holds this worker for good).
            let Loaded::InProcess(l) = &installed.loaded else {
                unreachable!("called for in-process versions only")
            };
            return (
                installed.handle_in_process(l, &request).map_err(Into::into),
                Some(version),
            );
        }
        let stuck = installed.stuck.clone();
        // The call owns an Arc of the version: one that never returns keeps
        // it mapped for good, which is what running code needs.
        let result = self
            .calls
            .call(
                timeout,
                move || {
                    let Loaded::InProcess(l) = &installed.loaded else {
                        unreachable!("called for in-process versions only")
                    };
                    installed.handle_in_process(l, &request)
                },
                &stuck,
            )
            .await;
        match result {
            Ok(r) => (r.map_err(Into::into), Some(version)),
            // The SDK catches a plugin's panics; this is one in the glue.
            Err(CallError::Panicked) => (
                Err(HandleError::Panic("the call panicked outside the plugin".into()).into()),
                Some(version),
            ),
            Err(CallError::TimedOut) => {
                tracing::warn!(
                    plugin = %self.plugin,
                    version,
                    ?timeout,
                    stuck = self.stuck_handle.count(),
                    "request timed out: the plugin's handle did not return; the call is abandoned and its version stays mapped"
                );
                let e = DispatchError::Timeout {
                    plugin: self.plugin.clone(),
                    version: version.clone(),
                    timeout,
                };
                (Err(e), Some(version))
            }
        }
    }

    /// A call into a version in a plugin host. A request the host never
    /// got (it was already dead) goes, once, to what serves after it; one
    /// in flight when it died is lost, and answered so.
    async fn call_host(
        &self,
        installed: Arc<Installed>,
        request: Vec<u8>,
        timeout: Duration,
    ) -> (Result<Vec<u8>, DispatchError>, Option<String>) {
        // No bound asked for; a host still gets one so that a hang is
        // found (and the host replaced) in the end.
        let timeout = if timeout.is_zero() {
            host::UNBOUNDED_CALL
        } else {
            timeout
        };
        let started = Instant::now();
        let mut installed = installed;
        let mut retried = false;
        loop {
            let Loaded::Process(h) = &installed.loaded else {
                // A retry found an in-process version serving now.
                return Box::pin(self.call_in_process(installed, request, timeout)).await;
            };
            let version = installed.version_label.clone();
            match h.handle(&request, timeout).await {
                Ok(bytes) => {
                    installed.ok.inc();
                    return (Ok(bytes), Some(version));
                }
                Err(host::CallError::Plugin(e)) => {
                    let r = Err(e);
                    installed.count(&r);
                    return (r.map_err(Into::into), Some(version));
                }
                Err(host::CallError::TimedOut) => {
                    // The host's side counts the call as stuck (in the
                    // plugin's gauge) until it answers, and kills the host
                    // if it stays stuck: nothing is shed here.
                    self.handle_timeouts.inc();
                    let e = DispatchError::Timeout {
                        plugin: self.plugin.clone(),
                        version: version.clone(),
                        timeout,
                    };
                    return (Err(e), Some(version));
                }
                Err(host::CallError::Lost(exit)) => {
                    installed.crashed.inc();
                    let e = DispatchError::Crashed {
                        plugin: self.plugin.clone(),
                        version: version.clone(),
                        cause: exit.cause.to_string(),
                    };
                    return (Err(e), Some(version));
                }
                Err(host::CallError::NotDelivered(exit)) => {
                    let cause =
                        exit.map_or_else(|| "its host is gone".to_owned(), |e| e.cause.to_string());
                    let crashed = DispatchError::Crashed {
                        plugin: self.plugin.clone(),
                        version: version.clone(),
                        cause,
                    };
                    let left = timeout.saturating_sub(started.elapsed());
                    if retried {
                        return (Err(crashed), Some(version));
                    }
                    match self.replacement_of(&installed, left).await {
                        Some(next) => {
                            installed = next;
                            retried = true;
                        }
                        None => return (Err(crashed), Some(version)),
                    }
                }
            }
        }
    }

    /// Waits, at most `bound`, until something other than `dead` is the
    /// active version (a rollback or a restarted host), and returns it.
    async fn replacement_of(
        &self,
        dead: &Arc<Installed>,
        bound: Duration,
    ) -> Option<Arc<Installed>> {
        let mut rx = self.active_version.subscribe();
        let wait = async {
            loop {
                if let Some(a) = self.active.load_full()
                    && !Arc::ptr_eq(&a, dead)
                    && a.loaded.alive()
                {
                    return Some(a);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(bound, wait).await.ok().flatten()
    }

    /// The first answer after the active host's death: the recovery is over.
    fn recovered(&self) {
        if let Some((at, dead)) = self.recovering.lock().expect("slot lock").take() {
            self.recovery.observe(at.elapsed().as_secs_f64());
            let plugin = self.probe_index.load(Ordering::Relaxed);
            for pid in dead {
                crate::markers::plugvisor_host_recovered(plugin, pid);
            }
        }
        self.recovering_flag.store(false, Ordering::Relaxed);
    }

    /// What the death of a host means for this slot: whether it ran the
    /// active version, a standby (now dropped from the mapped set), or
    /// nothing this slot still holds.
    pub fn host_died(&self, exit: &Exit) -> HostRole {
        let holds = |i: &Arc<Installed>| i.loaded.host().is_some_and(|h| h.pid() == exit.pid);
        let active = self.active.load_full();
        if active.as_ref().is_some_and(holds) {
            let mut recovering = self.recovering.lock().expect("slot lock");
            // A replacement that dies before its first answer: the crash
            // goes on, measured here from the latest death, in the kernel
            // from each one.
            let mut dead = recovering.take().map(|(_, d)| d).unwrap_or_default();
            dead.push(exit.pid);
            *recovering = Some((exit.at, dead));
            drop(recovering);
            self.recovering_flag.store(true, Ordering::Relaxed);
            return HostRole::Active;
        }
        let (removed, still_mapped) = {
            let mut mapped = self.mapped.lock().expect("slot lock");
            let before = mapped.len();
            mapped.retain(|i| !holds(i));
            let still = mapped.iter().any(|i| *i.loaded.version() == exit.version);
            (before != mapped.len(), still)
        };
        if removed {
            if !still_mapped {
                self.metrics
                    .forget_requests(&self.plugin, &exit.version.to_string());
            }
            self.publish_info();
            HostRole::Standby
        } else {
            HostRole::Gone
        }
    }

    /// How `init` of a new version of this plugin is bounded: `timeout`,
    /// and this plugin's count of abandoned init calls.
    pub fn init_bound(&self, timeout: Duration) -> InitBound {
        InitBound {
            timeout,
            stuck: self.stuck_init.clone(),
        }
    }

    /// This plugin's count of `handle` calls stuck past their timeout
    /// (`plugvisor_plugin_calls_stuck{call="handle"}`), which a plugin
    /// host keeps too.
    pub fn handle_stuck(&self) -> Arc<StuckCalls> {
        self.stuck_handle.clone()
    }

    /// Counts an `init` of this plugin that overran its timeout (or one
    /// not made because too many are stuck).
    pub fn count_init_trouble(&self, shed: bool) {
        if shed {
            self.init_shed.inc();
        } else {
            self.init_timeouts.inc();
        }
    }

    /// The active version, if any.
    pub fn active(&self) -> Option<Arc<Installed>> {
        self.active.load_full()
    }

    /// Every mapped version (the active one among them), oldest first.
    pub fn mapped(&self) -> Vec<Arc<Installed>> {
        self.mapped
            .lock()
            .expect("slot lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Versions mapped in this slot, oldest first.
    pub fn mapped_versions(&self) -> Vec<Version> {
        self.mapped
            .lock()
            .expect("slot lock")
            .iter()
            .map(|i| i.loaded.version().clone())
            .collect()
    }

    /// The sha256 of every mapped version's object (the store keeps them).
    pub fn mapped_hashes(&self) -> Vec<String> {
        self.mapped
            .lock()
            .expect("slot lock")
            .iter()
            .map(|i| i.loaded.sha256().to_owned())
            .collect()
    }

    /// Makes `loaded` the active version; returns the previous one.
    ///
    /// The swap is the only step between "old serves" and "new serves";
    /// bookkeeping (mapped list, metrics) happens after it.
    pub fn install(&self, loaded: Loaded) -> Option<Arc<Installed>> {
        self.install_timed(loaded).0
    }

    /// [`Slot::install`], also returning how long the pointer swap alone
    /// took — the only moment a request could find neither version (it
    /// cannot: the store is atomic, but this bounds any stall) — and when
    /// it ended, i.e. when the new version started serving. The counters
    /// resolved before it and the bookkeeping after it are not part of it.
    pub fn install_timed(&self, loaded: Loaded) -> (Option<Arc<Installed>>, Duration, Instant) {
        let version_label = loaded.version().to_string();
        let RequestCounters {
            ok,
            error,
            panic,
            crashed,
        } = self.metrics.requests(&self.plugin, &version_label);
        let installed = Arc::new(Installed {
            ok,
            error,
            panic,
            crashed,
            panic_logged: AtomicBool::new(false),
            stuck: Arc::new(VersionStuck {
                count: AtomicUsize::new(0),
                plugin: self.stuck_handle.clone(),
                timeouts: self.handle_timeouts.clone(),
            }),
            version_label: version_label.clone(),
            loaded,
        });
        let t = Instant::now();
        let previous = self.active.swap(Some(installed.clone()));
        let serving = Instant::now();
        // `send_replace` stores the value even when nobody subscribed yet.
        self.active_version.send_replace(Some(version_label));
        self.remember(installed);
        (previous, serving - t, serving)
    }

    /// Switches back to a version that is still mapped (a pointer swap, no
    /// `dlopen`). Returns the previous active version, or `None` if
    /// `version` is not mapped.
    pub fn switch_to_mapped(&self, version: &Version) -> Option<Option<Arc<Installed>>> {
        let target = {
            let mapped = self.mapped.lock().expect("slot lock");
            mapped
                .iter()
                .find(|i| i.loaded.version() == version && i.loaded.alive())
                .cloned()
        }?;
        let previous = self.active.swap(Some(target.clone()));
        self.active_version
            .send_replace(Some(target.version().to_owned()));
        self.remember(target);
        Some(previous)
    }

    fn remember(&self, installed: Arc<Installed>) {
        let evicted: Vec<Arc<Installed>> = {
            let mut mapped = self.mapped.lock().expect("slot lock");
            // A version whose host died is of no use mapped (the one it
            // replaces, after a restart, shares its request series: they
            // are not forgotten).
            mapped.retain(|i| !Arc::ptr_eq(i, &installed) && i.loaded.alive());
            mapped.push_back(installed);
            let pinned = self.pinned.lock().expect("slot lock").clone();
            let active = self.active.load_full();
            // Oldest first, but never the pinned known-good version nor the
            // active one.
            let mut evicted = Vec::new();
            while mapped.len() > self.keep_loaded {
                let Some(pos) = mapped.iter().position(|i| {
                    Some(i.loaded.version()) != pinned.as_ref()
                        && !active.as_ref().is_some_and(|a| Arc::ptr_eq(a, i))
                }) else {
                    break;
                };
                evicted.extend(mapped.remove(pos));
            }
            evicted
        };
        for old in &evicted {
            self.metrics.forget_requests(&self.plugin, old.version());
        }
        self.publish_info();
        // `evicted` drops here; each old version is shut down and unmapped
        // when its last in-flight request lets go of it.
    }

    /// Refreshes `plugvisor_plugin_info` for this plugin.
    fn publish_info(&self) {
        let active = self.active.load_full();
        let mapped = self.mapped.lock().expect("slot lock");
        let mut published = self.published.lock().expect("slot lock");
        for (version, state) in published.drain(..) {
            self.metrics
                .forget_plugin_info(&self.plugin, &version, state);
        }
        for i in mapped.iter() {
            let is_active = active.as_ref().is_some_and(|a| Arc::ptr_eq(a, i));
            let state = if is_active { "active" } else { "standby" };
            self.metrics.plugin_info(&self.plugin, i.version(), state);
            published.push((i.version().to_owned(), state));
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::loader;
    use crate::seed::built_echo_library as echo_library;

    /// Loads the echo plugin from its own copy (dlopen needs a distinct path
    /// to give a distinct image).
    fn load_copy(dir: &std::path::Path, n: u32) -> Loaded {
        let path = dir.join(format!("echo-{n}.so"));
        std::fs::copy(echo_library(), &path).unwrap();
        let version = Version::parse(plugvisor_echo::VERSION).unwrap();
        loader::load(
            "echo",
            &version,
            plugvisor_sdk::ABI_VERSION,
            &format!("{n:064}"),
            &path,
            &loader::InitBound::standalone(Duration::from_secs(10)),
        )
        .map(|(l, _)| Loaded::InProcess(l))
        .unwrap()
    }

    /// `Slot::call` on a runtime of its own.
    fn call(slot: &Slot, frame: &[u8]) -> Result<Vec<u8>, DispatchError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(slot.call(frame.to_vec(), Duration::from_secs(10)))
            .0
    }

    #[test]
    fn empty_slot_refuses_with_a_reason() {
        let slot = Slot::new("echo", 2, Arc::new(Metrics::new()));
        let err = call(&slot, b"x").unwrap_err();
        assert!(
            matches!(err, DispatchError::NoActiveVersion { .. }),
            "{err}"
        );
    }

    #[test]
    fn a_request_finishes_on_the_version_it_started_on() {
        let t = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let slot = Slot::new("echo", 2, metrics.clone());
        assert!(slot.install(load_copy(t.path(), 1)).is_none());
        let held = slot.active().unwrap();
        let previous = slot.install(load_copy(t.path(), 2)).unwrap();
        assert!(Arc::ptr_eq(&held, &previous));
        // The old version still serves the request that holds it…
        let Loaded::InProcess(l) = &held.loaded else {
            unreachable!()
        };
        assert!(l.handle(b"a").unwrap().ends_with(b"a"));
        // …and new requests go to the new one.
        let now = slot.active().unwrap();
        assert!(!Arc::ptr_eq(&held, &now));
        assert_eq!(
            call(&slot, b"ping").unwrap(),
            format!("[echo {}] ping", plugvisor_echo::VERSION).into_bytes()
        );
    }

    #[test]
    fn mapped_versions_are_bounded_and_switchable() {
        let t = tempfile::tempdir().unwrap();
        let slot = Slot::new("echo", 2, Arc::new(Metrics::new()));
        for n in 1..=3 {
            slot.install(load_copy(t.path(), n));
        }
        assert_eq!(
            slot.mapped_versions().len(),
            2,
            "keep_loaded bounds the mapped set"
        );
        let v = slot.mapped_versions()[0].clone();
        let before = slot.active().unwrap();
        let previous = slot.switch_to_mapped(&v).expect("mapped version").unwrap();
        assert!(Arc::ptr_eq(&before, &previous));
        assert!(slot.switch_to_mapped(&Version::new(9, 9, 9)).is_none());
    }

    #[test]
    fn subscribers_follow_the_active_version() {
        let t = tempfile::tempdir().unwrap();
        let slot = Slot::new("echo", 2, Arc::new(Metrics::new()));
        let mut rx = slot.subscribe();
        assert_eq!(*rx.borrow_and_update(), None);
        slot.install(load_copy(t.path(), 1));
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow_and_update().as_deref(),
            Some(plugvisor_echo::VERSION)
        );
        let v = slot.mapped_versions()[0].clone();
        slot.install(load_copy(t.path(), 2));
        slot.switch_to_mapped(&v).unwrap();
        assert!(rx.has_changed().unwrap(), "a switch back notifies too");
    }

    #[test]
    fn request_counters_are_per_version() {
        let t = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let slot = Slot::new("echo", 2, metrics.clone());
        slot.install(load_copy(t.path(), 1));
        for _ in 0..3 {
            call(&slot, b"x").unwrap();
        }
        let v = plugvisor_echo::VERSION;
        assert_eq!(
            metrics
                .requests_total
                .with_label_values(&["echo", v, "ok"])
                .get(),
            3
        );
    }
}
