//! Clients that keep talking to a daemon while a test does harm to it:
//! persistent TCP connections and gRPC `Exchange` streams, each sending one
//! frame after another and checking every answer. A test takes a
//! [`Tally`] whenever it wants to judge what they saw since the last one —
//! how many frames were answered, which versions answered them, and every
//! error (an error answer, a wrong answer, a broken connection or stream).
//!
//! The clients never close their connections while they run, so they add
//! nothing to what the kernel counts as broken during a reload.
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::pb::Request;
use crate::pb::plugin_client::PluginClient;
use crate::{LineClient, echo_version, grpc_channel, wait_until};

/// The longest a client waits for one answer before it calls it an error.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client whose connection broke waits before reconnecting.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// What the clients saw since the last [`Live::take`].
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Frames answered correctly.
    pub frames: u64,
    /// Versions that answered them (`[name VERSION] …`, `plugin_version`).
    pub versions: BTreeSet<String>,
    /// Everything that went wrong, one line each, naming the client.
    pub errors: Vec<String>,
}

/// Which clients to run.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// One persistent TCP client per entry (an address may repeat).
    pub tcp: Vec<SocketAddr>,
    /// One `Exchange` stream, on its own HTTP/2 connection, per entry.
    pub grpc: Vec<SocketAddr>,
    /// Pause between a client's answer and its next frame (keeps a long
    /// test from eating the cores it shares).
    pub pause: Duration,
}

/// Running clients; stopped and joined on drop.
pub struct Live {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

impl Live {
    /// Starts the clients and waits (at most 15 s) until each has had an
    /// answer.
    pub fn start(opts: &LiveOptions) -> Live {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let ready = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for (i, addr) in opts.tcp.iter().enumerate() {
            let (stop, tally, ready, addr, pause) = (
                stop.clone(),
                tally.clone(),
                ready.clone(),
                *addr,
                opts.pause,
            );
            threads.push(std::thread::spawn(move || {
                tcp_client(&format!("tcp{i}"), addr, pause, &stop, &tally, &ready);
            }));
        }
        for (i, addr) in opts.grpc.iter().enumerate() {
            let (stop, tally, ready, addr, pause) = (
                stop.clone(),
                tally.clone(),
                ready.clone(),
                *addr,
                opts.pause,
            );
            threads.push(std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(grpc_client(
                    &format!("grpc{i}"),
                    addr,
                    pause,
                    &stop,
                    &tally,
                    &ready,
                ));
            }));
        }
        let clients = opts.tcp.len() + opts.grpc.len();
        let live = Live {
            stop,
            tally,
            threads,
        };
        wait_until(
            Instant::now() + Duration::from_secs(15),
            "every live client has an answer",
            || {
                let errors = &live.tally.lock().unwrap().errors;
                assert!(
                    errors.is_empty(),
                    "live clients failed to start: {errors:?}"
                );
                ready.load(Ordering::Relaxed) == clients
            },
        );
        live
    }

    /// What the clients saw since the last take.
    pub fn take(&self) -> Tally {
        std::mem::take(&mut *self.tally.lock().unwrap())
    }

    /// Stops the clients and returns what they saw since the last take.
    pub fn stop(mut self) -> Tally {
        self.halt();
        self.take()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Checks one answer `resp` to `sent`; returns the version that answered.
fn check(resp: &str, sent: &str) -> Result<String, String> {
    let version = echo_version(resp).ok_or_else(|| format!("answer {resp:?} to {sent:?}"))?;
    if !resp.ends_with(&format!("] {sent}")) {
        return Err(format!("wrong answer {resp:?} to {sent:?}"));
    }
    Ok(version.to_owned())
}

fn tcp_client(
    name: &str,
    addr: SocketAddr,
    pause: Duration,
    stop: &AtomicBool,
    tally: &Mutex<Tally>,
    ready: &AtomicUsize,
) {
    // Everything is published the moment it happens: a take sees every
    // frame answered and every error met before it.
    let error = |e: String| tally.lock().unwrap().errors.push(format!("{name}: {e}"));
    let mut client: Option<LineClient> = None;
    let mut n = 0u64;
    let mut answered_once = false;
    while !stop.load(Ordering::Relaxed) {
        let c = match client.as_mut() {
            Some(c) => c,
            None => match LineClient::connect(addr) {
                Ok(c) => client.insert(c),
                Err(e) => {
                    error(format!("connecting to {addr}: {e}"));
                    std::thread::sleep(RECONNECT_PAUSE);
                    continue;
                }
            },
        };
        let sent = format!("{name}-f{n}");
        n += 1;
        match c.call(&sent) {
            Ok(resp) => match check(&resp, &sent) {
                Ok(v) => {
                    let mut t = tally.lock().unwrap();
                    t.frames += 1;
                    t.versions.insert(v);
                    if !answered_once {
                        answered_once = true;
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => error(e),
            },
            Err(e) => {
                error(format!("connection broke: {e}"));
                client = None;
                std::thread::sleep(RECONNECT_PAUSE);
            }
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

async fn grpc_client(
    name: &str,
    addr: SocketAddr,
    pause: Duration,
    stop: &AtomicBool,
    tally: &Mutex<Tally>,
    ready: &AtomicUsize,
) {
    let mut n = 0u64;
    let mut answered_once = false;
    while !stop.load(Ordering::Relaxed) {
        let channel = match grpc_channel(addr).await {
            Ok(c) => c,
            Err(e) => {
                let e = format!("{name}: connecting to {addr}: {e}");
                tally.lock().unwrap().errors.push(e);
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        let (tx, rx) = mpsc::channel::<Request>(1);
        let mut inbound = match PluginClient::new(channel)
            .exchange(ReceiverStream::new(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let e = format!("{name}: opening the Exchange stream: {status}");
                tally.lock().unwrap().errors.push(e);
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        // One stream for as long as it lives; a broken one is an error.
        while !stop.load(Ordering::Relaxed) {
            let sent = format!("{name}-m{n}");
            n += 1;
            let outcome = async {
                tx.send(Request {
                    payload: sent.clone().into_bytes(),
                })
                .await
                .map_err(|_| "the request stream closed".to_owned())?;
                let resp = match tokio::time::timeout(ANSWER_TIMEOUT, inbound.message()).await {
                    Err(_) => return Err(format!("no answer within {ANSWER_TIMEOUT:?}")),
                    Ok(Err(status)) => return Err(format!("stream error: {status}")),
                    Ok(Ok(None)) => return Err("the server ended the stream".to_owned()),
                    Ok(Ok(Some(r))) => r,
                };
                if !resp.error.is_empty() {
                    return Err(format!("error answer {:?} to {sent:?}", resp.error));
                }
                let v = check(&String::from_utf8_lossy(&resp.payload), &sent)?;
                if v == resp.plugin_version {
                    Ok(v)
                } else {
                    Err(format!(
                        "payload says {v}, plugin_version says {}",
                        resp.plugin_version
                    ))
                }
            }
            .await;
            let broken = {
                let mut t = tally.lock().unwrap();
                match outcome {
                    Ok(v) => {
                        t.frames += 1;
                        t.versions.insert(v);
                        if !answered_once {
                            answered_once = true;
                            ready.fetch_add(1, Ordering::Relaxed);
                        }
                        false
                    }
                    Err(e) => {
                        t.errors.push(format!("{name}: {e}"));
                        true
                    }
                }
            };
            if broken {
                break;
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
}
