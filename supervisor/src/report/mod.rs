//! Telling the coordinator (`[report.mqtt]`, `docs/REPORTING.md`): every
//! journal entry as an event, each plugin's state, and the node's birth
//! and death, over MQTT with QoS 1.
//!
//! The journal (`state_dir/journal.jsonl`, appended and fsynced by
//! whatever acts) is the source: the reporter follows it by byte offset,
//! woken as each entry is written, and turns each line into an event in
//! the [`outbox`] (appended, fsynced, numbered) before it is published. An
//! event leaves the outbox only on the broker's PUBACK. So nothing that
//! was journaled is lost to a broker outage, a restart or a `kill -9`: the
//! next process goes on from the outbox and the offset it recorded. And
//! nothing on the reload or request path waits for MQTT: the journal write
//! is all they do, with or without reporting.
//!
//! One process reports at a time: the reporter holds an exclusive lock on
//! `state_dir/report/lock`, and a new process (an upgrade) starts
//! reporting when the old one has let go — it sends DISCONNECT first, so
//! the broker publishes no Last Will for a node that never went down.
use std::collections::BTreeMap;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::config::MqttConfig;
use crate::metrics::Metrics;
use crate::store::JournalEntry;

pub mod link;
pub mod outbox;
pub mod payload;

use link::{Link, LinkEvent, Topics};
use outbox::Outbox;
pub use payload::pb;

/// How long a clean stop waits for the outbox to empty before it says
/// goodbye (what is left is sent by the next process).
const FLUSH_ON_STOP: Duration = Duration::from_secs(2);
/// The reporter's own look at the journal and the states, besides being
/// woken.
const TICK: Duration = Duration::from_secs(1);

/// Why reporting could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// `[report.mqtt]` names something unusable (a CA file, credentials).
    #[error("[report.mqtt] {0}")]
    Config(String),
    /// The outbox or its cursor could not be read or written.
    #[error("report outbox: {action} {path}: {message}")]
    Outbox {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        message: String,
    },
}

/// The link as `plugvisor status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReportStatus {
    /// The broker URL.
    pub broker: String,
    /// The client id (the node's name in every payload).
    pub client_id: String,
    /// The topic prefix.
    pub topic_prefix: String,
    /// Whether the broker accepted the connection and it stands.
    pub connected: bool,
    /// Since when (Unix seconds) it is as `connected` says.
    pub since: u64,
    /// Events in the outbox, waiting for a PUBACK.
    pub outbox_events: u64,
    /// Events acknowledged by the broker since this process started.
    pub published: u64,
    /// Events the outbox's bound dropped since this process started.
    pub dropped: u64,
    /// When the broker last acknowledged an event (Unix seconds).
    pub last_publish: Option<u64>,
    /// Why the link is down, when it is.
    pub last_error: Option<String>,
    /// The number of the current (or last) connection's birth.
    pub birth: u64,
}

/// The running reporter.
pub struct ReportHandle {
    status: Arc<Mutex<ReportStatus>>,
    states: watch::Sender<Vec<pb::PluginState>>,
    wake: Arc<Notify>,
    stop: Option<oneshot::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReportHandle {
    /// What `plugvisor status` shows.
    pub fn status(&self) -> ReportStatus {
        self.status.lock().expect("report status lock").clone()
    }

    /// What the store notifies as it appends to the journal.
    pub fn journal_wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The plugins' states now (the node name, time and sequence are
    /// filled in here); each one that changed is published, retained.
    pub fn set_states(&self, mut states: Vec<pb::PluginState>) {
        states.sort_by(|a, b| a.plugin.cmp(&b.plugin));
        self.states.send_if_modified(|old| {
            if *old == states {
                false
            } else {
                *old = states;
                true
            }
        });
    }

    /// Stops: the journal's last entries go out (boundedly), then the
    /// death (`node_down`: the node stops; not after an upgrade, whose new
    /// process says its own birth) and DISCONNECT.
    pub async fn stop(mut self, node_down: bool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(node_down);
        }
        let bound = FLUSH_ON_STOP + Duration::from_secs(2);
        if tokio::time::timeout(bound, &mut self.task).await.is_err() {
            tracing::warn!("report: the MQTT link did not close in {bound:?}");
            self.task.abort();
        }
    }
}

/// Checks what `[report.mqtt]` names (CA and key files, credentials) the
/// way the link will read them, for `run --check` and the start.
pub fn check(config: &MqttConfig) -> Result<(), ReportError> {
    link::options(config, "check").map(drop)
}

/// Starts reporting: from the journal under `state_dir` into the outbox
/// under `state_dir/report`, and from there to the broker. `node` is the
/// default client id (`[sync] node`).
pub fn start(
    config: &MqttConfig,
    node: Option<&str>,
    state_dir: &Path,
    metrics: Arc<Metrics>,
) -> Result<ReportHandle, ReportError> {
    let client_id = config.client_id(node);
    let topics = Topics {
        prefix: config.prefix(&client_id),
        node: client_id.clone(),
    };
    crate::config::check_prefix(&topics.prefix).map_err(ReportError::Config)?;
    let options = link::options(config, &client_id)?;
    let journal = state_dir.join(crate::store::JOURNAL_FILE);
    // A node that never reported before starts at the journal's end as it
    // is now, before this start's own entries: those are news.
    let journal_now = std::fs::metadata(&journal).map_or(0, |m| m.len());
    let status = Arc::new(Mutex::new(ReportStatus {
        broker: config.broker.clone(),
        client_id,
        topic_prefix: topics.prefix.clone(),
        ..ReportStatus::default()
    }));
    let (states, states_rx) = watch::channel(Vec::new());
    let (stop, stop_rx) = oneshot::channel();
    let wake = Arc::new(Notify::new());
    metrics.report_connected(false);
    let reporter = Reporter {
        dir: state_dir.join("report"),
        journal,
        journal_now,
        max_bytes: config.outbox_max_bytes,
        topics,
        status: status.clone(),
        metrics,
        wake: wake.clone(),
    };
    let task = tokio::spawn(reporter.run(options, states_rx, stop_rx));
    Ok(ReportHandle {
        status,
        states,
        wake,
        stop: Some(stop),
        task,
    })
}

struct Reporter {
    dir: PathBuf,
    journal: PathBuf,
    journal_now: u64,
    max_bytes: u64,
    topics: Topics,
    status: Arc<Mutex<ReportStatus>>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
}

/// What one connection has been sent.
#[derive(Default)]
struct Sent {
    birth: Option<u64>,
    announced: bool,
    events_through: u64,
    states: BTreeMap<String, pb::PluginState>,
}

impl Reporter {
    async fn run(
        self,
        options: rumqttc::MqttOptions,
        mut states: watch::Receiver<Vec<pb::PluginState>>,
        mut stop: oneshot::Receiver<bool>,
    ) {
        let Some(_lock) = self.lock(&mut stop).await else {
            return;
        };
        let mut outbox = match tokio::task::block_in_place(|| self.open_outbox()) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "report: cannot keep an outbox; nothing is reported (serving is not affected)");
                self.status.lock().expect("report status lock").last_error = Some(e.to_string());
                return;
            }
        };
        let births_file = self.dir.join("births");
        let (link, mut events) =
            Link::start(options, &self.topics, move || next_birth(&births_file));
        let mut sent = Sent::default();
        let mut failures = 0u32;
        let mut tick = tokio::time::interval(TICK);
        loop {
            let journal = tokio::select! {
                node_down = &mut stop => {
                    let now = states.borrow().clone();
                    self.finish(&mut outbox, link, &mut events, &mut sent, &now, node_down.unwrap_or(true)).await;
                    return;
                }
                Some(ev) = events.recv() => {
                    // Disk work (an acknowledgement can compact the
                    // outbox) off the async workers: they carry requests.
                    tokio::task::block_in_place(|| {
                        self.on_link(ev, &mut outbox, &mut sent, &mut failures);
                    });
                    false
                }
                () = self.wake.notified() => true,
                _ = tick.tick() => true,
                Ok(()) = states.changed() => false,
            };
            if journal {
                // An fsync per event: off the async workers too.
                tokio::task::block_in_place(|| self.take_journal(&mut outbox));
            }
            self.send(&link, &outbox, &mut sent, &states.borrow());
        }
    }

    /// Waits for the reporting lock (held by a process being replaced),
    /// unless told to stop first.
    async fn lock(&self, stop: &mut oneshot::Receiver<bool>) -> Option<std::fs::File> {
        if let Err(e) = std::fs::create_dir_all(&self.dir) {
            tracing::error!(dir = %self.dir.display(), error = %e, "report: cannot create the report directory; nothing is reported");
            return None;
        }
        let path = self.dir.join("lock");
        let file = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "report: cannot open the lock; nothing is reported");
                return None;
            }
        };
        let mut said = false;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Some(file);
            }
            if !said {
                tracing::info!(file = %path.display(), "report: another plugvisor reports for this node; waiting for it to let go");
                said = true;
            }
            tokio::select! {
                _ = &mut *stop => return None,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    fn open_outbox(&self) -> Result<Outbox, ReportError> {
        let (mut outbox, dropped) = Outbox::open(&self.dir, self.max_bytes)?;
        if outbox.fresh() {
            outbox.set_journal_offset(self.journal_now)?;
        }
        self.dropped(dropped);
        self.outbox_size(&outbox);
        Ok(outbox)
    }

    /// Every whole journal line past the outbox's offset, into the outbox.
    fn take_journal(&self, outbox: &mut Outbox) {
        let mut offset = outbox.journal_offset();
        let bytes = match read_from(&self.journal, offset) {
            Ok(Some(b)) => b,
            Ok(None) => {
                // Shorter than what was taken: a new journal (the state
                // directory was replaced). Its entries are all news.
                tracing::warn!(journal = %self.journal.display(), offset, "report: the journal is shorter than what was reported from it; following the new one from its start");
                if let Err(e) = outbox.set_journal_offset(0) {
                    tracing::error!(error = %e, "report: cannot record the journal offset");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(journal = %self.journal.display(), error = %e, "report: cannot read the journal");
                return;
            }
        };
        let mut dropped = 0;
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            if !line.ends_with(b"\n") {
                break; // being written
            }
            offset += line.len() as u64;
            let Ok(entry) = serde_json::from_slice::<JournalEntry>(line) else {
                // A line this version cannot read is skipped, not a stop.
                continue;
            };
            let node = &self.topics.node;
            match outbox.push(offset, |seq| {
                payload::event(node, seq, &entry).encode_to_vec()
            }) {
                Ok((_, d)) => dropped += d,
                Err(e) => {
                    // Retried at the next wake: the offset did not move.
                    tracing::error!(error = %e, "report: cannot append to the outbox");
                    break;
                }
            }
        }
        self.dropped(dropped);
        self.outbox_size(outbox);
    }

    /// How many events wait, into the metric and the status.
    fn outbox_size(&self, outbox: &Outbox) {
        self.metrics.report_outbox(outbox.len());
        self.status
            .lock()
            .expect("report status lock")
            .outbox_events = outbox.len() as u64;
    }

    fn dropped(&self, n: u64) {
        if n == 0 {
            return;
        }
        tracing::warn!(
            dropped = n,
            "report: the outbox is full (outbox_max_bytes); the oldest events are dropped"
        );
        self.metrics.report_events("dropped", n);
        self.status.lock().expect("report status lock").dropped += n;
    }

    fn on_link(&self, ev: LinkEvent, outbox: &mut Outbox, sent: &mut Sent, failures: &mut u32) {
        match ev {
            LinkEvent::Connected { birth } => {
                tracing::info!(broker = %self.status.lock().expect("report status lock").broker, birth, replaying = outbox.len(), "report: connected");
                *failures = 0;
                // Everything in the outbox goes again on a new connection.
                let events_through = outbox
                    .pending()
                    .next()
                    .map_or(outbox.next_sequence() - 1, |r| r.sequence - 1);
                *sent = Sent {
                    birth: Some(birth),
                    events_through,
                    ..Sent::default()
                };
                self.metrics.report_connected(true);
                let mut st = self.status.lock().expect("report status lock");
                st.connected = true;
                st.since = now_s();
                st.last_error = None;
                st.birth = birth;
            }
            LinkEvent::Acked(seq) => {
                let before = outbox.len();
                if let Err(e) = outbox.ack(seq) {
                    tracing::error!(error = %e, "report: cannot record an acknowledgement (the event may be sent again)");
                }
                let acked = (before - outbox.len()) as u64;
                self.metrics.report_events("published", acked);
                self.metrics.report_outbox(outbox.len());
                let mut st = self.status.lock().expect("report status lock");
                st.published += acked;
                st.outbox_events = outbox.len() as u64;
                st.last_publish = Some(now_s());
                self.metrics.report_last_publish(now_s());
            }
            LinkEvent::AckedOther => {}
            LinkEvent::Disconnected { error, refused } => {
                *failures = failures.saturating_add(1);
                *sent = Sent::default();
                self.metrics.report_connected(false);
                let mut st = self.status.lock().expect("report status lock");
                if st.connected || st.since == 0 {
                    st.since = now_s();
                }
                st.connected = false;
                if refused {
                    tracing::error!(broker = %st.broker, error = %error, "report: the broker refused this node (check [report.mqtt] credentials and client_id); events wait in the outbox");
                } else if failures.is_power_of_two() {
                    tracing::warn!(broker = %st.broker, error = %error, failures = *failures, outbox = outbox.len(), "report: the MQTT link is down; events wait in the outbox");
                }
                st.last_error = Some(error);
            }
        }
    }

    /// Publishes what this connection has not had yet: the birth first,
    /// then states that changed, then the outbox's events in order.
    fn send(&self, link: &Link, outbox: &Outbox, sent: &mut Sent, states: &[pb::PluginState]) {
        let Some(birth) = sent.birth else {
            return;
        };
        if !sent.announced {
            let online = payload::node(&self.topics.node, true, birth, outbox.next_sequence());
            if !link.publish(self.topics.node_topic(), online.encode_to_vec(), true, None) {
                return;
            }
            sent.announced = true;
        }
        let last_event = outbox.next_sequence() - 1;
        for s in states {
            let mut s = s.clone();
            s.schema_version = payload::SCHEMA_VERSION;
            s.node.clone_from(&self.topics.node);
            if sent
                .states
                .get(&s.plugin)
                .is_some_and(|old| same_state(old, &s))
            {
                continue;
            }
            s.timestamp_ms = crate::store::now_ms();
            s.event_sequence = last_event;
            if !link.publish(
                self.topics.plugin_topic(&s.plugin),
                s.encode_to_vec(),
                true,
                None,
            ) {
                return;
            }
            sent.states.insert(s.plugin.clone(), s);
        }
        let gone: Vec<String> = sent
            .states
            .keys()
            .filter(|p| !states.iter().any(|s| &s.plugin == *p))
            .cloned()
            .collect();
        for p in gone {
            // An empty retained message clears the retained state.
            if !link.publish(self.topics.plugin_topic(&p), Vec::new(), true, None) {
                return;
            }
            sent.states.remove(&p);
        }
        for r in outbox.pending() {
            if r.sequence <= sent.events_through {
                continue;
            }
            if !link.publish(
                self.topics.event_topic(),
                r.payload.clone(),
                false,
                Some(r.sequence),
            ) {
                return;
            }
            sent.events_through = r.sequence;
        }
    }

    /// The last journal entries out (boundedly), the death if the node
    /// goes down, and DISCONNECT.
    async fn finish(
        &self,
        outbox: &mut Outbox,
        link: Link,
        events: &mut mpsc::UnboundedReceiver<LinkEvent>,
        sent: &mut Sent,
        states: &[pb::PluginState],
        node_down: bool,
    ) {
        self.take_journal(outbox);
        let mut failures = 0;
        let flushed = tokio::time::timeout(FLUSH_ON_STOP, async {
            loop {
                if !link.connected() {
                    // Nothing to wait for: the outbox keeps them for the
                    // next start.
                    return;
                }
                self.send(&link, outbox, sent, states);
                if outbox.is_empty() && link.outstanding() == 0 {
                    return;
                }
                match events.recv().await {
                    Some(ev) => self.on_link(ev, outbox, sent, &mut failures),
                    None => return,
                }
            }
        })
        .await;
        if flushed.is_err() {
            tracing::info!(
                left = outbox.len(),
                "report: stopping with events in the outbox; the next start sends them"
            );
        }
        if node_down && link.connected() {
            let death = payload::node(
                &self.topics.node,
                false,
                sent.birth.unwrap_or(0),
                outbox.next_sequence(),
            );
            if link.publish(self.topics.node_topic(), death.encode_to_vec(), true, None) {
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while let Some(ev) = events.recv().await {
                        if matches!(ev, LinkEvent::AckedOther) {
                            return;
                        }
                    }
                })
                .await;
            }
        }
        link.close(Duration::from_secs(1)).await;
        self.metrics.report_connected(false);
    }
}

/// A state unchanged but for its time and event sequence.
fn same_state(a: &pb::PluginState, b: &pb::PluginState) -> bool {
    let strip = |s: &pb::PluginState| pb::PluginState {
        timestamp_ms: 0,
        event_sequence: 0,
        ..s.clone()
    };
    strip(a) == strip(b)
}

/// The journal from `offset` on; `None` when it is shorter than that.
fn read_from(journal: &Path, offset: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::{Read as _, Seek as _};
    let mut f = match std::fs::File::open(journal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(if offset == 0 { Some(Vec::new()) } else { None });
        }
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len < offset {
        return Ok(None);
    }
    f.seek(std::io::SeekFrom::Start(offset))?;
    let mut bytes = Vec::with_capacity(usize::try_from(len - offset).unwrap_or(0));
    f.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// The next birth number, kept in `path` (each connection attempt takes
/// one, so a Last Will names the connection it belongs to).
fn next_birth(path: &Path) -> u64 {
    let n = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    if let Err(e) = std::fs::write(path, n.to_string()) {
        tracing::warn!(file = %path.display(), error = %e, "report: cannot record the birth number");
    }
    n
}

fn now_s() -> u64 {
    crate::store::now_ms() / 1000
}
