//! The load generator shared by the 1000-reload soak and the naive-restart
//! peer, so both sides see exactly the same clients: paced TCP line
//! clients on persistent connections plus open gRPC `Exchange` streams.
//!
//! A request counts as failed when it was sent and not answered (a write
//! or read error, end of stream, or an `ERR` answer); a refused or failed
//! (re)connect is counted apart. The gap of a client is the longest
//! interval between two consecutive answers it got; every client also
//! counts its answers per 10 ms, for the timeline plot.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use plugvisor_tests::LineClient;
use plugvisor_tests::pb::Request;
use plugvisor_tests::pb::plugin_client::PluginClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Width of one timeline bucket.
pub const BUCKET: Duration = Duration::from_millis(10);

/// What the clients are to do.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Persistent TCP connections.
    pub tcp_conns: usize,
    /// Frames per second on each.
    pub tcp_rate: u32,
    /// Open `Exchange` streams (one HTTP/2 connection).
    pub streams: usize,
    /// Messages per second on each.
    pub stream_rate: u32,
}

impl Shape {
    /// Requests per second the shape asks for in all.
    pub fn offered(&self) -> u32 {
        self.tcp_conns as u32 * self.tcp_rate + self.streams as u32 * self.stream_rate
    }
}

/// What one client saw.
#[derive(Debug, Default, Clone)]
pub struct ClientStats {
    /// Answered requests.
    pub ok: u64,
    /// Sent and not answered.
    pub failed: u64,
    /// Connects (or stream opens) that failed.
    pub connect_errors: u64,
    /// gRPC streams the server ended with `UNAVAILABLE`, a status clients
    /// retry on (a draining plugvisor); the message in flight is counted
    /// here, not in `failed`.
    pub retryable_ends: u64,
    /// Longest interval between two consecutive answers.
    pub max_gap: Duration,
    /// Answers per [`BUCKET`] since the load started.
    pub timeline: Vec<u32>,
    /// Every gap at least [`LONG_GAP`] longer than the client's pacing
    /// interval: (its start, its length), in seconds since the load started.
    pub long_gaps: Vec<(f64, f64)>,
    /// The client's pacing interval.
    pub interval: Duration,
}

/// Gaps at least this much longer than a client's pacing interval are kept
/// one by one, to be told apart: during an upgrade or not.
pub const LONG_GAP: Duration = Duration::from_millis(5);

impl ClientStats {
    fn answered(&mut self, start: Instant, last: &mut Option<Instant>) {
        let now = Instant::now();
        self.ok += 1;
        if let Some(prev) = *last {
            let gap = now - prev;
            self.max_gap = self.max_gap.max(gap);
            if gap >= self.interval + LONG_GAP {
                self.long_gaps
                    .push(((prev - start).as_secs_f64(), gap.as_secs_f64()));
            }
        }
        *last = Some(now);
        let i = ((now - start).as_millis() / BUCKET.as_millis()) as usize;
        if self.timeline.len() <= i {
            self.timeline.resize(i + 1, 0);
        }
        self.timeline[i] += 1;
    }
}

/// Everything the clients saw, by kind.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// TCP clients.
    pub tcp: Vec<ClientStats>,
    /// gRPC streams.
    pub grpc: Vec<ClientStats>,
    /// How long the load ran.
    pub elapsed: Duration,
}

impl Report {
    fn all(&self) -> impl Iterator<Item = &ClientStats> {
        self.tcp.iter().chain(&self.grpc)
    }

    /// Answered requests, all clients.
    pub fn ok(&self) -> u64 {
        self.all().map(|c| c.ok).sum()
    }

    /// Failed requests, all clients.
    pub fn failed(&self) -> u64 {
        self.all().map(|c| c.failed).sum()
    }

    /// gRPC streams ended with a retryable status, all clients.
    pub fn retryable_ends(&self) -> u64 {
        self.all().map(|c| c.retryable_ends).sum()
    }

    /// Failed connects of the raw TCP clients alone (a refused connect).
    pub fn tcp_connect_errors(&self) -> u64 {
        self.tcp.iter().map(|c| c.connect_errors).sum()
    }

    /// Failed requests on the raw TCP clients alone.
    pub fn tcp_failed(&self) -> u64 {
        self.tcp.iter().map(|c| c.failed).sum()
    }

    /// The longest gap a raw TCP client saw.
    pub fn tcp_max_gap(&self) -> Duration {
        self.tcp.iter().map(|c| c.max_gap).max().unwrap_or_default()
    }

    /// Every long gap of the raw TCP clients (see [`Report::long_gaps`]).
    pub fn tcp_long_gaps(&self) -> Vec<(f64, f64)> {
        self.tcp
            .iter()
            .flat_map(|c| c.long_gaps.iter().copied())
            .collect()
    }

    /// Failed connects and stream opens, all clients.
    pub fn connect_errors(&self) -> u64 {
        self.all().map(|c| c.connect_errors).sum()
    }

    /// The longest gap any client saw.
    pub fn max_gap(&self) -> Duration {
        self.all().map(|c| c.max_gap).max().unwrap_or_default()
    }

    /// Answered requests per second.
    pub fn rate(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64()
    }

    /// Every gap of at least [`LONG_GAP`] any client saw: (start, length)
    /// in seconds since the load started.
    pub fn long_gaps(&self) -> Vec<(f64, f64)> {
        self.all()
            .flat_map(|c| c.long_gaps.iter().copied())
            .collect()
    }

    /// Answers per [`BUCKET`], all clients summed.
    pub fn timeline(&self) -> Vec<u32> {
        let len = self.all().map(|c| c.timeline.len()).max().unwrap_or(0);
        let mut out = vec![0; len];
        for c in self.all() {
            for (o, v) in out.iter_mut().zip(&c.timeline) {
                *o += v;
            }
        }
        out
    }
}

/// Running clients; [`Load::finish`] stops them and collects what they saw.
pub struct Load {
    stop: Arc<AtomicBool>,
    tcp: Vec<JoinHandle<ClientStats>>,
    grpc: Option<JoinHandle<Vec<ClientStats>>>,
    /// When the clients started (timeline origin).
    pub start: Instant,
    /// The same moment in seconds since the Unix epoch (to place the
    /// daemon's log timestamps on the timeline).
    pub start_unix: f64,
}

impl Load {
    /// Starts `shape` against a TCP and a gRPC listener.
    pub fn start(tcp: SocketAddr, grpc: SocketAddr, shape: Shape) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let start_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let tcp = (0..shape.tcp_conns)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || tcp_client(tcp, i, shape.tcp_rate, start, &stop))
            })
            .collect();
        let grpc = (shape.streams > 0).then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || grpc_clients(grpc, shape, start, &stop))
        });
        Load {
            stop,
            tcp,
            grpc,
            start,
            start_unix,
        }
    }

    /// Stops the clients and returns what they saw.
    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let elapsed = self.start.elapsed();
        Report {
            tcp: self
                .tcp
                .into_iter()
                .map(|h| h.join().expect("tcp client"))
                .collect(),
            grpc: self
                .grpc
                .map(|h| h.join().expect("grpc clients"))
                .unwrap_or_default(),
            elapsed,
        }
    }
}

/// Sleeps until `next`, then moves it one `interval` on; if the client
/// fell far behind (the server was away) it starts afresh instead of
/// bursting to catch up.
fn pace(next: &mut Instant, interval: Duration) {
    let now = Instant::now();
    if *next > now {
        std::thread::sleep(*next - now);
    } else if now - *next > Duration::from_millis(50) {
        *next = now;
    }
    *next += interval;
}

fn tcp_client(
    addr: SocketAddr,
    id: usize,
    rate: u32,
    start: Instant,
    stop: &AtomicBool,
) -> ClientStats {
    let interval = Duration::from_secs(1) / rate.max(1);
    let mut s = ClientStats {
        interval,
        ..ClientStats::default()
    };
    let mut last = None;
    let mut conn: Option<LineClient> = None;
    let mut next = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        pace(&mut next, interval);
        let Some(c) = conn.as_mut() else {
            if let Ok(c) = LineClient::connect(addr) {
                conn = Some(c);
            } else {
                s.connect_errors += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        };
        n += 1;
        match c.call(&format!("c{id}-{n}")) {
            Ok(r) if !r.starts_with("ERR") => s.answered(start, &mut last),
            Ok(_) => s.failed += 1,
            Err(_) => {
                s.failed += 1;
                conn = None;
            }
        }
    }
    s
}

fn grpc_clients(
    addr: SocketAddr,
    shape: Shape,
    start: Instant,
    stop: &Arc<AtomicBool>,
) -> Vec<ClientStats> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        let tasks: Vec<_> = (0..shape.streams)
            .map(|id| {
                let channel = channel.clone();
                let stop = stop.clone();
                tokio::spawn(stream_client(channel, id, shape.stream_rate, start, stop))
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("stream task"));
        }
        out
    })
}

async fn stream_client(
    channel: tonic::transport::Channel,
    id: usize,
    rate: u32,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> ClientStats {
    const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
    let interval = Duration::from_secs(1) / rate.max(1);
    let mut s = ClientStats {
        interval,
        ..ClientStats::default()
    };
    let mut last = None;
    let mut n = 0u64;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'open: while !stop.load(Ordering::Relaxed) {
        let (tx, rx) = mpsc::channel::<Request>(1);
        let Ok(opened) = PluginClient::new(channel.clone())
            .exchange(ReceiverStream::new(rx))
            .await
        else {
            s.connect_errors += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let mut inbound = opened.into_inner();
        while !stop.load(Ordering::Relaxed) {
            ticker.tick().await;
            n += 1;
            let payload = format!("s{id}-{n}").into_bytes();
            if tx.send(Request { payload }).await.is_err() {
                // The call is over: its status says whether to retry.
                match inbound.message().await {
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        s.retryable_ends += 1;
                    }
                    _ => s.failed += 1,
                }
                continue 'open;
            }
            match tokio::time::timeout(ANSWER_TIMEOUT, inbound.message()).await {
                Ok(Ok(Some(r))) if r.error.is_empty() => s.answered(start, &mut last),
                Ok(Ok(Some(_))) => s.failed += 1,
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                    s.retryable_ends += 1;
                    continue 'open;
                }
                _ => {
                    s.failed += 1;
                    continue 'open;
                }
            }
        }
    }
    s
}
