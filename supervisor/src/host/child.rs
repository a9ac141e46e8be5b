//! The host process's side: load one version, say it is ready, then answer
//! calls until the daemon closes the stream.
//!
//! The host is the plugvisor binary itself (`plugvisor plugin-host`, a
//! hidden verb), so a host is exactly as old as the daemon that spawned it
//! and speaks its [`wire`](super::wire) format ([`wire::VERSION`]: a
//! daemon of another binary adopts it only if that matches). It loads through the same
//! [`loader`] as the in-process mode — the same ELF, ABI and identity
//! checks, the same `init` — but here a crash, an `abort()` or an OOM kill
//! takes only this process, and the daemon sees the end of the stream.
//!
//! Calls are read and run leader/follower style: of the host's threads,
//! one at a time reads the stream; having read a call, it hands the
//! reading on (a mutex unlock wakes the next reader) and runs the call
//! itself, so no call waits for another thread to be scheduled before
//! plugin code runs (the hand-off to a worker thread the first version of
//! this loop had cost a context switch per call). There is always a
//! thread left reading: one that takes a call when no other is free starts
//! another first, so a `handle` that hangs holds up only itself. Threads
//! beyond a couple of spares end when their call is done. Each writes its
//! own answer, one whole message at a time under a lock. The host's first
//! thread runs no plugin code: it waits for the stream to end, so a host
//! exits when the daemon lets go of it (or dies) even with a call stuck.
//!
//! A daemon being replaced (`plugvisor upgrade`) asks the host, on its
//! control channel, to serve a second stream, which the new daemon adopts;
//! each stream is served as above, and the host exits when the last one
//! ends — the old daemon's going costs it nothing.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::HostSpec;
use super::wire::{self, Kind};
use crate::handover::{Channel, HandoverError, Message};
use crate::loader::{self, HandleError, InitBound, LoadError, LoadedVersion};

/// Threads kept free (reading, or waiting to read) once a burst is over.
const SPARE_THREADS: usize = 2;

/// How long, once the stream has ended, a host waits for its other
/// threads to leave before it runs the plugin's `shutdown` (they leave at
/// once unless one is in a call, which the daemon never leaves behind
/// when it lets a version go).
const LAST_CALLS: Duration = Duration::from_millis(200);

/// `init` in a host is bounded by the daemon, which kills the host when it
/// overruns `[reload] init_timeout`; the loader's own bound only needs to
/// be longer than any that could be configured.
const INIT_UNBOUNDED: Duration = Duration::from_secs(365 * 24 * 3600);

/// Gives up the daemon's privileges (to `run_as`, see
/// [`privileges`](super::privileges)), loads `spec` from `object` (the
/// library as this process has it open, `/proc/self/fd/4`) and serves it
/// over `stream` — and over every further stream a daemon hands it on
/// `control` (see [`adopt`]) — until every one of them is closed. Returns
/// when the host should exit; `Err` only when the last stream failed.
pub fn serve(
    spec: &HostSpec,
    object: &Path,
    run_as: Option<(u32, u32)>,
    stream: UnixStream,
    control: Option<Channel>,
) -> io::Result<()> {
    let out = Arc::new(Mutex::new(stream.try_clone()?));
    let dropped = match super::privileges::drop_to(run_as) {
        Ok(d) => d,
        Err(e) => {
            let err = LoadError::HostFailed {
                plugin: spec.plugin.clone(),
                version: spec.version.to_string(),
                message: format!("giving up the daemon's privileges: {e}"),
            };
            let payload = serde_json::to_vec(&err).expect("plain enum");
            send(&out, 0, Kind::LoadFailed, &payload)?;
            return Ok(());
        }
    };
    let loaded = match loader::load(
        &spec.plugin,
        &spec.version,
        spec.abi,
        &spec.sha256,
        object,
        &InitBound::standalone(INIT_UNBOUNDED),
    ) {
        Ok((loaded, timings)) => {
            let ready = wire::Ready {
                load_us: timings.load.as_micros() as u64,
                init_us: timings.init.as_micros() as u64,
                dropped,
            };
            let payload = serde_json::to_vec(&ready).expect("plain struct");
            send(&out, 0, Kind::Ready, &payload)?;
            Arc::new(loaded)
        }
        Err(e) => {
            let payload = serde_json::to_vec(&e).expect("plain enum");
            send(&out, 0, Kind::LoadFailed, &payload)?;
            return Ok(());
        }
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
        loaded: loaded.clone(),
    });
    Calls::open(&shared, stream, out);
    if let Some(control) = control {
        adopt(&shared, control);
    }
    // This thread runs no plugin code: the host ends when the last stream
    // does, even with a call stuck in the plugin.
    let state = shared.state();
    let mut state = shared
        .changed
        .wait_while(state, |s| s.streams > 0)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(e) = state.failed.take() {
        return Err(e);
    }
    // The free threads see the end too and leave at once; one still in a
    // call would have its instance freed under it, so a host with a call
    // running past this just exits, without `shutdown`.
    let (state, _) = shared
        .changed
        .wait_timeout_while(state, LAST_CALLS, |s| s.threads > 0)
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let idle = state.threads == 0;
    drop(state);
    if idle {
        // Idle: the plugin gets its `shutdown`, as in-process.
        drop(shared);
        drop(Arc::try_unwrap(loaded).ok());
    }
    Ok(())
}

/// Listens on a control channel, on a thread of its own, until the daemon
/// that holds its other end closes it. Each [`Message::Adopt`] brings a
/// call stream, served from then on beside the others, and the control
/// channel for whoever will hold that stream: how a daemon's successor
/// takes the host over while the old daemon still sends calls on its own
/// stream (two daemons never write one stream).
fn adopt(shared: &Arc<Shared>, mut control: Channel) {
    let shared = shared.clone();
    let started = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            loop {
                let received = match control.recv(None) {
                    Ok(r) => r,
                    Err(HandoverError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "plugin host: control channel failed; no more adoptions through it");
                        return;
                    }
                };
                let Message::Adopt = received.message else {
                    tracing::warn!(message = ?received.message, "plugin host: unexpected control message; ignored");
                    continue;
                };
                let mut fds = received.fds.into_iter();
                let (Some(calls), Some(next)) = (fds.next(), fds.next()) else {
                    tracing::warn!("plugin host: an adoption without its two descriptors; ignored");
                    continue;
                };
                let stream = UnixStream::from(calls);
                let out = match stream.try_clone() {
                    Ok(o) => Arc::new(Mutex::new(o)),
                    Err(e) => {
                        tracing::warn!(error = %e, "plugin host: cannot serve an adopted stream");
                        continue;
                    }
                };
                Calls::open(&shared, stream, out);
                adopt(&shared, Channel::from_fd(next));
                let answer = Message::Adopted {
                    pid: std::process::id(),
                };
                if control.send(&answer, &[], &[]).is_err() {
                    // The daemon that asked is gone; the stream it made is
                    // its successor's, or ends with it.
                    return;
                }
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "plugin host: cannot start its control thread; it cannot be adopted");
    }
}

/// Runs one call and writes its answer.
fn answer(loaded: &LoadedVersion, out: &Mutex<UnixStream>, m: &wire::Message) {
    let (kind, payload): (Kind, Vec<u8>) = match m.kind {
        Kind::Handle => match loaded.handle(&m.payload) {
            Ok(bytes) => (Kind::Answer, bytes),
            Err(HandleError::Plugin(msg)) => (Kind::PluginError, msg.into_bytes()),
            Err(HandleError::Panic(msg)) => (Kind::Panic, msg.into_bytes()),
        },
        Kind::Health => (Kind::HealthAnswer, vec![u8::from(loaded.healthy())]),
        Kind::Degrade => {
            let level = m
                .payload
                .get(..4)
                .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
            let answer = match loaded.degrade(level) {
                Some(true) => wire::DEGRADE_OK,
                Some(false) => wire::DEGRADE_FAILED,
                None => wire::DEGRADE_UNSUPPORTED,
            };
            (Kind::DegradeAnswer, vec![answer])
        }
        // Nothing else is sent to a host; answering it would only confuse
        // the daemon, so it is dropped.
        _ => return,
    };
    // A failed write means the daemon is gone; the reader sees it too.
    let _ = send(out, m.id, kind, &payload);
}

/// Writes one whole message.
fn send(out: &Mutex<UnixStream>, id: u64, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let header = wire::header(id, kind, payload.len());
    let mut s = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if payload.len() <= 4096 {
        // One write, one wake-up on the daemon's side.
        let mut buf = Vec::with_capacity(wire::HEADER + payload.len());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(payload);
        s.write_all(&buf)
    } else {
        s.write_all(&header)?;
        s.write_all(payload)
    }
}

/// What the host's first thread waits on.
#[derive(Default)]
struct State {
    /// Call threads alive, over every stream.
    threads: usize,
    /// Streams still open.
    streams: usize,
    /// The error that ended the stream that ended last, if one did.
    failed: Option<io::Error>,
}

/// What every stream's calls share.
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    loaded: Arc<LoadedVersion>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The threads that read and run one stream's calls (see the module docs).
struct Calls {
    /// The stream while it is open; `None` once it has ended.
    reader: Mutex<Option<io::BufReader<UnixStream>>>,
    // Threads not running plugin code (reading, or waiting to read).
    free: AtomicUsize,
    shared: Arc<Shared>,
    out: Arc<Mutex<UnixStream>>,
}

impl Calls {
    /// Serves `stream` (answers on `out`, a clone of it) from now on.
    fn open(shared: &Arc<Shared>, stream: UnixStream, out: Arc<Mutex<UnixStream>>) {
        shared.state().streams += 1;
        let calls = Arc::new(Calls {
            reader: Mutex::new(Some(io::BufReader::with_capacity(64 << 10, stream))),
            free: AtomicUsize::new(0),
            shared: shared.clone(),
            out,
        });
        if !calls.start_thread() {
            // Not one thread to read it: the stream is as good as closed.
            calls.end(Ok(()));
        }
    }

    /// The stream ended (cleanly, or with an error): counted once.
    fn end(&self, how: io::Result<()>) {
        let mut state = self.shared.state();
        state.streams -= 1;
        if let Err(e) = how {
            state.failed = Some(e);
        } else if state.streams == 0 {
            state.failed = None;
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Starts one more call thread, counted free; `false` if the system
    /// gave none (pids_max): the next call is then read when a thread
    /// busy now is done.
    fn start_thread(self: &Arc<Self>) -> bool {
        self.free.fetch_add(1, Ordering::AcqRel);
        self.shared.state().threads += 1;
        let calls = self.clone();
        let started = std::thread::Builder::new()
            .name("call".into())
            .spawn(move || {
                calls.work();
                calls.shared.state().threads -= 1;
                calls.shared.changed.notify_all();
            });
        if started.is_err() {
            self.free.fetch_sub(1, Ordering::AcqRel);
            self.shared.state().threads -= 1;
            tracing::warn!("cannot start another call thread; calls queue");
            return false;
        }
        true
    }

    /// Reads and runs calls until the stream ends (or enough other threads
    /// are free).
    fn work(self: &Arc<Self>) {
        loop {
            let message = {
                let mut r = self
                    .reader
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let Some(stream) = r.as_mut() else {
                    return;
                };
                match wire::read_message(stream) {
                    Ok(Some(m)) => m,
                    end => {
                        *r = None;
                        self.end(end.map(|_| ()));
                        return;
                    }
                }
                // Unlocked here: the next free thread reads on while this
                // one runs the call.
            };
            if self.free.fetch_sub(1, Ordering::AcqRel) == 1 {
                // The last free thread: start another so a call that
                // hangs cannot keep the next ones from being read.
                self.start_thread();
            }
            answer(&self.shared.loaded, &self.out, &message);
            if self.free.fetch_add(1, Ordering::AcqRel) >= SPARE_THREADS {
                // Enough threads free already: this one ends.
                self.free.fetch_sub(1, Ordering::AcqRel);
                return;
            }
        }
    }
}
