//! Thousands of clients at once (#21): raw TCP connections and gRPC
//! `Exchange` streams held open on one tokio runtime, each sending one
//! frame per round — a low rate per client, the load of an edge gateway in
//! front of many quiet devices. A round says which version answered each
//! client and every error met; the connections are never reopened, so a
//! connection the daemon broke shows as an error.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::clients::{echo_version, grpc_channel};
use crate::pb::plugin_client::PluginClient;
use crate::pb::{Request, Response};

/// How long one answer may take before it counts as failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections opened at once: the listener's accept queue is 1024 deep.
const CONNECT_BATCH: usize = 256;

/// Descriptors a crowd test wants: its ten thousand clients, the
/// daemon's side of them (the daemon inherits this limit), and room.
const WANTED_OPEN_FILES: u64 = 65_536;

/// Raises this process's soft limit on open files to its hard limit (the
/// crowd's sockets are descriptors too) — as root, the hard limit too if it
/// is below [`WANTED_OPEN_FILES`] — and returns the soft limit.
///
/// # Panics
/// When the limit cannot be read.
pub fn raise_open_files_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut l) },
        0
    );
    // Only root may raise the hard limit; for others this fails and the
    // soft limit goes to the hard one below.
    if l.rlim_max < WANTED_OPEN_FILES {
        let up = libc::rlimit {
            rlim_cur: WANTED_OPEN_FILES,
            rlim_max: WANTED_OPEN_FILES,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const up) } == 0 {
            return WANTED_OPEN_FILES;
        }
    }
    l.rlim_cur = l.rlim_max;
    // SAFETY: setrlimit reads the struct it is given.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const l) };
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut l) },
        0
    );
    l.rlim_cur
}

/// One gRPC `Exchange` stream of the crowd.
struct Stream {
    tx: mpsc::Sender<Request>,
    inbound: tonic::Streaming<Response>,
}

/// The crowd: its connections and streams, and the runtime that drives
/// them.
pub struct Crowd {
    rt: tokio::runtime::Runtime,
    tcp: Vec<BufReader<TcpStream>>,
    streams: Vec<Stream>,
    /// gRPC channels (HTTP/2 connections) the streams share.
    _channels: Vec<tonic::transport::Channel>,
}

/// What one round saw.
#[derive(Debug, Default)]
pub struct Round {
    /// Answers per version.
    pub versions: BTreeMap<String, usize>,
    /// Each failed answer: which client, and what went wrong.
    pub errors: Vec<String>,
    /// How long the round took.
    pub elapsed: Duration,
    /// Answers in the round.
    pub answers: usize,
}

impl Crowd {
    /// Opens `tcp` connections to `tcp_addr` and `streams` `Exchange`
    /// streams to `grpc_addr`, spread over `channels` HTTP/2 connections.
    ///
    /// # Errors
    /// The first connection or stream that could not be opened.
    pub fn open(
        tcp_addr: SocketAddr,
        tcp: usize,
        grpc_addr: Option<SocketAddr>,
        streams: usize,
        channels: usize,
    ) -> Result<Crowd, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let conns = rt.block_on(async {
            let mut out = Vec::with_capacity(tcp);
            let mut left = tcp;
            while left > 0 {
                let batch = left.min(CONNECT_BATCH);
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..batch {
                    set.spawn(async move {
                        let s = TcpStream::connect(tcp_addr).await?;
                        s.set_nodelay(true)?;
                        Ok::<_, std::io::Error>(BufReader::with_capacity(256, s))
                    });
                }
                while let Some(r) = set.join_next().await {
                    let s = r
                        .map_err(|e| e.to_string())?
                        .map_err(|e| format!("connection {} to {tcp_addr}: {e}", out.len()))?;
                    out.push(s);
                }
                left -= batch;
            }
            Ok::<_, String>(out)
        })?;
        let (chans, opened) = match grpc_addr {
            None => (Vec::new(), Vec::new()),
            Some(addr) => rt.block_on(async {
                let mut chans = Vec::new();
                for _ in 0..channels.max(1) {
                    chans.push(
                        grpc_channel(addr)
                            .await
                            .map_err(|e| format!("gRPC channel to {addr}: {e}"))?,
                    );
                }
                let mut opened = Vec::with_capacity(streams);
                for i in 0..streams {
                    let (tx, rx) = mpsc::channel::<Request>(1);
                    let inbound = PluginClient::new(chans[i % chans.len()].clone())
                        .exchange(ReceiverStream::new(rx))
                        .await
                        .map_err(|s| format!("opening Exchange stream {i}: {s}"))?
                        .into_inner();
                    opened.push(Stream { tx, inbound });
                }
                Ok::<_, String>((chans, opened))
            })?,
        };
        Ok(Crowd {
            rt,
            tcp: conns,
            streams: opened,
            _channels: chans,
        })
    }

    /// Connections and streams held.
    pub fn len(&self) -> (usize, usize) {
        (self.tcp.len(), self.streams.len())
    }

    /// Whether the crowd holds no client at all.
    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.streams.is_empty()
    }

    /// Every client sends one frame, tagged `tag`, and waits for its
    /// answer; all at once.
    pub fn round(&mut self, tag: &str) -> Round {
        let started = Instant::now();
        let (tcp, streams) = (&mut self.tcp, &mut self.streams);
        let results: Vec<Result<String, String>> = self.rt.block_on(async {
            let tcp = tcp.iter_mut().enumerate().map(|(i, c)| {
                let sent = format!("{tag}-t{i}");
                async move {
                    let answer = async {
                        c.get_mut()
                            .write_all(format!("{sent}\n").as_bytes())
                            .await
                            .map_err(|e| format!("tcp {i}: write: {e}"))?;
                        let mut line = String::new();
                        match c.read_line(&mut line).await {
                            Ok(0) => Err(format!("tcp {i}: closed by the server")),
                            Ok(_) => Ok(line.trim_end().to_owned()),
                            Err(e) => Err(format!("tcp {i}: read: {e}")),
                        }
                    };
                    let line = tokio::time::timeout(ANSWER_TIMEOUT, answer)
                        .await
                        .map_err(|_| format!("tcp {i}: no answer within {ANSWER_TIMEOUT:?}"))??;
                    checked(&line, &sent).map_err(|e| format!("tcp {i}: {e}"))
                }
            });
            let grpc = streams.iter_mut().enumerate().map(|(i, s)| {
                let sent = format!("{tag}-g{i}");
                async move {
                    let answer = async {
                        s.tx.send(Request {
                            payload: sent.clone().into_bytes(),
                        })
                        .await
                        .map_err(|_| format!("grpc {i}: the request stream closed"))?;
                        match s.inbound.message().await {
                            Ok(Some(r)) if r.error.is_empty() => {
                                Ok(String::from_utf8_lossy(&r.payload).into_owned())
                            }
                            Ok(Some(r)) => Err(format!("grpc {i}: error answer {:?}", r.error)),
                            Ok(None) => Err(format!("grpc {i}: the server ended the stream")),
                            Err(status) => Err(format!("grpc {i}: {status}")),
                        }
                    };
                    let line = tokio::time::timeout(ANSWER_TIMEOUT, answer)
                        .await
                        .map_err(|_| format!("grpc {i}: no answer within {ANSWER_TIMEOUT:?}"))??;
                    checked(&line, &sent).map_err(|e| format!("grpc {i}: {e}"))
                }
            });
            let (mut a, b) = tokio::join!(
                futures::future::join_all(tcp),
                futures::future::join_all(grpc)
            );
            a.extend(b);
            a
        });
        let mut round = Round {
            elapsed: started.elapsed(),
            answers: results.len(),
            ..Round::default()
        };
        for r in results {
            match r {
                Ok(v) => *round.versions.entry(v).or_default() += 1,
                Err(e) => round.errors.push(e),
            }
        }
        round
    }
}

/// The version of an echo answer to `sent`, or why it is not one.
fn checked(answer: &str, sent: &str) -> Result<String, String> {
    let version = echo_version(answer).ok_or_else(|| format!("answer {answer:?} to {sent:?}"))?;
    if !answer.ends_with(&format!("] {sent}")) {
        return Err(format!("wrong answer {answer:?} to {sent:?}"));
    }
    Ok(version.to_owned())
}
