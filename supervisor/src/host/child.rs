//! The host process's side: load one version, say it is ready, then answer
//! calls until the daemon closes the stream.
//!
//! The host is the plugvisor binary itself (`plugvisor plugin-host`, a
//! hidden verb), so a host is exactly as old as the daemon that spawned it
//! and speaks its [`wire`](super::wire) format. It loads through the same
//! [`loader`] as the in-process mode — the same ELF, ABI and identity
//! checks, the same `init` — but here a crash, an `abort()` or an OOM kill
//! takes only this process, and the daemon sees the end of the stream.
//!
//! One thread reads calls and never runs plugin code, so a `handle` that
//! hangs holds up only itself; each call runs on a worker of a small pool
//! that grows when every worker is busy and shrinks when idle. Workers
//! write their own answers, one whole message at a time under a lock.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::HostSpec;
use super::wire::{self, Kind, Message};
use crate::loader::{self, HandleError, InitBound, LoadError, LoadedVersion};

/// How long an idle worker waits for the next call before its thread ends.
const WORKER_PARK: Duration = Duration::from_secs(2);

/// `init` in a host is bounded by the daemon, which kills the host when it
/// overruns `[reload] init_timeout`; the loader's own bound only needs to
/// be longer than any that could be configured.
const INIT_UNBOUNDED: Duration = Duration::from_secs(365 * 24 * 3600);

/// Gives up the daemon's privileges (to `run_as`, see
/// [`privileges`](super::privileges)), loads `spec` from `object` (the
/// library as this process has it open, `/proc/self/fd/4`) and serves it
/// over `stream` until the daemon closes it. Returns when the host should
/// exit; `Err` only when the stream itself failed.
pub fn serve(
    spec: &HostSpec,
    object: &Path,
    run_as: Option<(u32, u32)>,
    stream: UnixStream,
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
    let pool = Pool::new();
    let mut reader = io::BufReader::with_capacity(64 << 10, stream);
    loop {
        let message = match wire::read_message(&mut reader) {
            Ok(Some(m)) => m,
            // The daemon let go of this version, or died: either way nobody
            // will read an answer again.
            Ok(None) => break,
            Err(e) => return Err(e),
        };
        let (loaded, out) = (loaded.clone(), out.clone());
        pool.submit(Box::new(move || answer(&loaded, &out, &message)));
    }
    if pool.busy() == 0 {
        // Idle: the plugin gets its `shutdown`, as in-process. A call still
        // running would have its instance freed under it, so a host with
        // calls stuck just exits.
        drop(Arc::try_unwrap(loaded).ok());
    }
    Ok(())
}

/// Runs one call and writes its answer.
fn answer(loaded: &LoadedVersion, out: &Mutex<UnixStream>, m: &Message) {
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

type Job = Box<dyn FnOnce() + Send>;

/// Worker threads for the calls: one per call in flight at most, kept a
/// while when idle.
struct Pool {
    state: Mutex<PoolState>,
    wake: Condvar,
    busy: AtomicUsize,
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Job>,
    idle: usize,
}

impl Pool {
    fn new() -> Arc<Pool> {
        Arc::new(Pool {
            state: Mutex::new(PoolState::default()),
            wake: Condvar::new(),
            busy: AtomicUsize::new(0),
        })
    }

    /// Calls running now.
    fn busy(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }

    fn submit(self: &Arc<Self>, job: Job) {
        let spawn = {
            let mut s = self.state.lock().expect("pool lock");
            s.jobs.push_back(job);
            // Each parked worker takes one job; more jobs than parked
            // workers means this one needs a thread of its own.
            s.idle < s.jobs.len()
        };
        if spawn {
            let pool = self.clone();
            let started = std::thread::Builder::new()
                .name("call".into())
                .spawn(move || pool.work());
            if started.is_err() {
                // Out of threads (pids_max): the call waits for a worker
                // that is busy now to come back for it.
                tracing::warn!("cannot start another call thread; calls queue");
            }
        } else {
            self.wake.notify_one();
        }
    }

    fn work(&self) {
        let mut s = self.state.lock().expect("pool lock");
        loop {
            if let Some(job) = s.jobs.pop_front() {
                drop(s);
                self.busy.fetch_add(1, Ordering::AcqRel);
                job();
                self.busy.fetch_sub(1, Ordering::AcqRel);
                s = self.state.lock().expect("pool lock");
                continue;
            }
            s.idle += 1;
            let (next, _) = self
                .wake
                .wait_timeout_while(s, WORKER_PARK, |s| s.jobs.is_empty())
                .expect("pool lock");
            s = next;
            s.idle -= 1;
            if s.jobs.is_empty() {
                return;
            }
        }
    }
}
