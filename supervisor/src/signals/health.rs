//! Health checks as signals a rule can read.
//!
//! Two sources feed the same three families, labelled `check` and `plugin`:
//!
//! * every plugin's own `health()` hook, as `check="plugin:<name>"`
//!   (`plugin="<name>"`). It is polled every [`PLUGIN_INTERVAL`] and right
//!   after the slot switches versions, on the blocking pool (a hook is
//!   foreign code and may block) and bounded by [`PLUGIN_TIMEOUT`]. A slot
//!   with no active version, a hook that says unhealthy and a hook that has
//!   not returned in time all read down at once: the plugin's own verdict
//!   is not a flaky network, so there is no `failures_before_down` to ride
//!   out. A hook still stuck at the next poll is not called again.
//! * the configured `[[health_check]]`s of the dependencies a plugin relies
//!   on (`tcp`: a connect; `http`: a minimal HTTP/1.1 `GET` whose status
//!   must be `expect_status`), each in its own task, each attempt bounded by
//!   its `timeout`. `plugin` is the config's `plugin` key, empty if none.
//!
//! `plugvisor_health_check_up` is 1 or 0 and absent until the first verdict:
//! a check reads up after one passing attempt and down only after
//! `failures_before_down` consecutive failed ones, so one lost packet does
//! not fire a rollback, and a check that never ran is not a fake 0.
//! `plugvisor_health_check_duration_seconds` observes every attempt (a
//! timed-out one as its timeout), `plugvisor_health_check_failures_total`
//! counts the failed ones. A change of verdict is logged once, with the
//! last error.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::config::{HealthCheckConfig, HealthTarget, HttpTarget};
use crate::metrics::{HealthSeries, Metrics};
use crate::slot::Slot;

/// How often each plugin's `health()` hook is polled (besides right after
/// a version switch).
pub const PLUGIN_INTERVAL: Duration = Duration::from_secs(2);

/// How long a plugin's `health()` hook may take before it reads down.
pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Bytes read looking for an HTTP status line before giving up on it.
const MAX_STATUS_LINE: usize = 16 * 1024;

/// Bytes of an HTTP response read after the status line, so the
/// connection closes with FIN rather than a reset for unread data.
const MAX_DRAIN: usize = 64 * 1024;

/// How long that courtesy read may take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The plugins' slots as the daemon holds them now; `None` when they
/// cannot be looked at this moment (a reload holds them), in which case
/// the previous list is used.
pub type SlotSource = Box<dyn Fn() -> Option<Vec<Arc<Slot>>> + Send + Sync>;

/// Why one attempt of a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The connection could not be made.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// `host:port`.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The connection broke while the request was sent or the answer read.
    #[error("talking to {target}: {source}")]
    Io {
        /// `host:port`.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The answer did not start with an HTTP/1.x status line.
    #[error("{target} did not answer with an HTTP status line: {detail}")]
    NotHttp {
        /// `host:port`.
        target: String,
        /// What was wrong.
        detail: String,
    },
    /// The HTTP status was not the expected one.
    #[error("{target} answered HTTP {status}, expected {expected}")]
    Status {
        /// `host:port`.
        target: String,
        /// What it answered.
        status: u16,
        /// `expect_status`.
        expected: u16,
    },
    /// The attempt did not finish within the check's timeout.
    #[error("no answer within {after:?}")]
    Timeout {
        /// The timeout.
        after: Duration,
    },
    /// The plugin's slot has no active version.
    #[error("plugin {plugin:?} has no active version")]
    NoActiveVersion {
        /// The plugin.
        plugin: String,
    },
    /// The plugin's hook said it is not healthy.
    #[error("plugin {plugin:?} {version} reports itself unhealthy")]
    Unhealthy {
        /// The plugin.
        plugin: String,
        /// The active version.
        version: String,
    },
    /// The plugin's hook did not return in time.
    #[error("plugin {plugin:?} {version}: health hook has not returned within {after:?}")]
    Hung {
        /// The plugin.
        plugin: String,
        /// The version whose hook hangs.
        version: String,
        /// The timeout.
        after: Duration,
    },
    /// The task running the hook failed.
    #[error("plugin {plugin:?}: the health poll failed: {message}")]
    Task {
        /// The plugin.
        plugin: String,
        /// The join error.
        message: String,
    },
}

/// A check's verdict, from its attempts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    consecutive_failures: u32,
    up: Option<bool>,
}

impl Verdict {
    /// Records one attempt; returns the new state if the verdict changed
    /// (the first verdict is a change).
    pub fn record(&mut self, ok: bool, failures_before_down: u32) -> Option<bool> {
        if ok {
            self.consecutive_failures = 0;
        } else {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            if self.consecutive_failures < failures_before_down.max(1) {
                return None;
            }
        }
        (self.up != Some(ok)).then(|| {
            self.up = Some(ok);
            ok
        })
    }

    /// Up, down, or `None` before the first verdict.
    pub fn up(&self) -> Option<bool> {
        self.up
    }

    /// Failed attempts since the last passing one.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
}

/// One check's series and verdict.
struct Series {
    metrics: Arc<Metrics>,
    check: String,
    plugin: String,
    duration: Histogram,
    failures: IntCounter,
    failures_before_down: u32,
    verdict: Verdict,
}

impl Series {
    fn new(metrics: &Arc<Metrics>, check: &str, plugin: &str, failures_before_down: u32) -> Series {
        let HealthSeries { duration, failures } = metrics.health(check, plugin);
        Series {
            duration,
            failures,
            metrics: metrics.clone(),
            check: check.to_owned(),
            plugin: plugin.to_owned(),
            failures_before_down,
            verdict: Verdict::default(),
        }
    }

    /// Records an attempt; `took` is `None` for one that was not made (a
    /// hook still stuck from before), which counts but is not timed.
    fn observe(&mut self, result: Result<(), CheckError>, took: Option<Duration>) {
        if let Some(t) = took {
            self.duration.observe(t.as_secs_f64());
        }
        if let Err(e) = &result {
            self.failures.inc();
            tracing::debug!(check = %self.check, error = %e, "health check attempt failed");
        }
        let Some(up) = self
            .verdict
            .record(result.is_ok(), self.failures_before_down)
        else {
            return;
        };
        // Created here, not in `new`: no series until there is a verdict.
        self.metrics.health_up(&self.check, &self.plugin, up);
        match result {
            Ok(()) => {
                tracing::info!(check = %self.check, plugin = %self.plugin, "health check up");
            }
            Err(e) => tracing::warn!(
                check = %self.check,
                plugin = %self.plugin,
                failures = self.verdict.consecutive_failures(),
                error = %e,
                "health check down"
            ),
        }
    }
}

/// The running checks; dropping it stops them.
pub struct HealthChecks {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the plugin health poller and one task per configured check.
pub fn start(
    checks: &[HealthCheckConfig],
    slots: SlotSource,
    metrics: &Arc<Metrics>,
) -> HealthChecks {
    let mut tasks = vec![tokio::spawn(run_plugins(slots, metrics.clone()))];
    for c in checks {
        let target = match c.parsed_target() {
            Ok(t) => t,
            Err(e) => {
                // Config validation parses every target first; this is a
                // guard, not a path.
                tracing::error!(check = %c.name, error = %e, "health check not started");
                continue;
            }
        };
        let series = Series::new(
            metrics,
            &c.name,
            c.plugin.as_deref().unwrap_or(""),
            c.failures_before_down,
        );
        tracing::info!(check = %c.name, kind = c.kind.as_str(), target = %c.target, interval = ?c.interval, "health check started");
        tasks.push(tokio::spawn(run_dependency(c.clone(), target, series)));
    }
    HealthChecks { tasks }
}

async fn run_dependency(check: HealthCheckConfig, target: HealthTarget, mut series: Series) {
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let expected = check.expected_status();
    loop {
        ticker.tick().await;
        let t0 = Instant::now();
        let result = match tokio::time::timeout(check.timeout, attempt(&target, expected)).await {
            Ok(r) => r,
            Err(_) => Err(CheckError::Timeout {
                after: check.timeout,
            }),
        };
        series.observe(result, Some(t0.elapsed()));
    }
}

/// One attempt at a dependency.
pub async fn attempt(target: &HealthTarget, expected: u16) -> Result<(), CheckError> {
    match target {
        HealthTarget::Tcp { host, port } => {
            // Connect and close: the dependency accepts connections.
            TcpStream::connect((host.as_str(), *port))
                .await
                .map(drop)
                .map_err(|source| CheckError::Connect {
                    target: format!("{host}:{port}"),
                    source,
                })
        }
        HealthTarget::Http(t) => {
            let status = http_status(t).await?;
            if status == expected {
                Ok(())
            } else {
                Err(CheckError::Status {
                    target: t.authority.clone(),
                    status,
                    expected,
                })
            }
        }
    }
}

/// `GET t.path` over HTTP/1.1; the status of the answer.
async fn http_status(t: &HttpTarget) -> Result<u16, CheckError> {
    let target = || t.authority.clone();
    let mut stream = TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|source| CheckError::Connect {
            target: target(),
            source,
        })?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: plugvisor/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        t.path,
        t.authority,
        env!("CARGO_PKG_VERSION")
    );
    let io = |source| CheckError::Io {
        target: target(),
        source,
    };
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let line_end = loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            break i;
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Err(CheckError::NotHttp {
                target: target(),
                detail: format!("no line end in the first {MAX_STATUS_LINE} bytes"),
            });
        }
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(CheckError::NotHttp {
                target: target(),
                detail: "the connection closed before a status line".into(),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let status = parse_status_line(&buf[..line_end]).map_err(|detail| CheckError::NotHttp {
        target: target(),
        detail,
    })?;
    // The verdict is in; reading the rest of the answer is only courtesy,
    // so it is not timed and cannot fail the check.
    tokio::spawn(async move {
        let drain = async {
            let mut left = MAX_DRAIN;
            while left > 0 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    });
    Ok(status)
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
pub fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let shown = || String::from_utf8_lossy(&line[..line.len().min(64)]).into_owned();
    let rest = line
        .strip_prefix(b"HTTP/1.")
        .and_then(|r| r.get(1..))
        .and_then(|r| r.strip_prefix(b" "))
        .ok_or_else(|| format!("{:?} is not an HTTP/1.x status line", shown()))?;
    let code = rest.get(..3).filter(|c| c.iter().all(u8::is_ascii_digit));
    let ends = rest.get(3).is_none_or(|&b| b == b' ');
    match code {
        Some(c) if ends => Ok(c.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'))),
        _ => Err(format!("{:?} has no three-digit status", shown())),
    }
}

/// One plugin the poller follows.
struct Watched {
    slot: Arc<Slot>,
    switches: watch::Receiver<Option<String>>,
    series: Series,
    // A hook call that outlived its timeout: (its task, the version).
    hung: Option<(JoinHandle<bool>, String)>,
}

async fn run_plugins(slots: SlotSource, metrics: Arc<Metrics>) {
    let mut watched: HashMap<String, Watched> = HashMap::new();
    loop {
        for slot in slots().unwrap_or_default() {
            watched
                .entry(slot.plugin().to_owned())
                .or_insert_with(|| Watched {
                    switches: slot.subscribe(),
                    series: Series::new(
                        &metrics,
                        &format!("plugin:{}", slot.plugin()),
                        slot.plugin(),
                        1,
                    ),
                    slot,
                    hung: None,
                });
        }
        futures::future::join_all(watched.values_mut().map(poll_plugin)).await;
        let tick = tokio::time::sleep(PLUGIN_INTERVAL);
        if watched.is_empty() {
            tick.await;
            continue;
        }
        // A new version is checked as soon as it serves.
        let switched = futures::future::select_all(
            watched.values_mut().map(|w| Box::pin(w.switches.changed())),
        );
        tokio::select! {
            () = tick => {}
            _ = switched => {}
        }
    }
}

async fn poll_plugin(w: &mut Watched) {
    let plugin = w.slot.plugin().to_owned();
    if let Some((task, version)) = &w.hung {
        if !task.is_finished() {
            let e = CheckError::Hung {
                plugin,
                version: version.clone(),
                after: PLUGIN_TIMEOUT,
            };
            w.series.observe(Err(e), None);
            return;
        }
        w.hung = None;
    }
    let t0 = Instant::now();
    let Some(active) = w.slot.active() else {
        w.series.observe(
            Err(CheckError::NoActiveVersion { plugin }),
            Some(t0.elapsed()),
        );
        return;
    };
    let version = active.version().to_owned();
    let mut task = tokio::task::spawn_blocking(move || active.loaded.healthy());
    let result = match tokio::time::timeout(PLUGIN_TIMEOUT, &mut task).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(CheckError::Unhealthy { plugin, version }),
        Ok(Err(e)) => Err(CheckError::Task {
            plugin,
            message: e.to_string(),
        }),
        Err(_) => {
            w.hung = Some((task, version.clone()));
            Err(CheckError::Hung {
                plugin,
                version,
                after: PLUGIN_TIMEOUT,
            })
        }
    };
    w.series.observe(result, Some(t0.elapsed()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_only_after_consecutive_failures() {
        let mut v = Verdict::default();
        assert_eq!(v.up(), None);
        assert_eq!(v.record(false, 3), None, "one failure is no verdict yet");
        assert_eq!(
            v.record(true, 3),
            Some(true),
            "the first verdict is a change"
        );
        assert_eq!(v.record(true, 3), None);
        assert_eq!(v.record(false, 3), None);
        assert_eq!(v.record(false, 3), None);
        assert_eq!(v.record(true, 3), None, "a pass resets the count");
        assert_eq!(v.record(false, 3), None);
        assert_eq!(v.record(false, 3), None);
        assert_eq!(v.record(false, 3), Some(false));
        assert_eq!(v.consecutive_failures(), 3);
        assert_eq!(v.record(false, 3), None, "down stays down, once");
        assert_eq!(v.record(true, 3), Some(true));
        let mut once = Verdict::default();
        assert_eq!(once.record(false, 1), Some(false), "threshold 1: at once");
        assert_eq!(once.record(false, 0), None, "0 behaves as 1");
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Ok(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Service Unavailable"),
            Ok(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 204"), Ok(204));
        for bad in [
            &b"HTTP/2 200"[..],
            b"SSH-2.0-OpenSSH_9.2",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 abc OK",
            b"",
        ] {
            assert!(parse_status_line(bad).is_err(), "{bad:?}");
        }
    }

    /// A one-shot HTTP server on loopback answering `status`.
    async fn serve_once(status: &'static str) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = vec![0u8; 1024];
            let n = s.read(&mut req).await.unwrap();
            let req = String::from_utf8_lossy(&req[..n]).into_owned();
            assert!(req.starts_with("GET /healthz?deep=1 HTTP/1.1\r\n"), "{req}");
            assert!(req.contains(&format!("\r\nHost: {addr}\r\n")), "{req}");
            s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\nok").as_bytes())
                .await
                .unwrap();
        });
        addr
    }

    fn http_target(addr: std::net::SocketAddr) -> HealthTarget {
        HealthTarget::Http(HttpTarget {
            host: addr.ip().to_string(),
            port: addr.port(),
            authority: addr.to_string(),
            path: "/healthz?deep=1".into(),
        })
    }

    #[tokio::test]
    async fn http_attempt_judges_the_status() {
        let ok = serve_once("200 OK").await;
        attempt(&http_target(ok), 200).await.unwrap();
        let bad = serve_once("500 Internal Server Error").await;
        let err = attempt(&http_target(bad), 200).await.unwrap_err();
        assert!(
            matches!(
                err,
                CheckError::Status {
                    status: 500,
                    expected: 200,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tcp_attempt_needs_a_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let target = HealthTarget::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        attempt(&target, 200).await.unwrap();
        drop(l);
        let err = attempt(&target, 200).await.unwrap_err();
        assert!(matches!(err, CheckError::Connect { .. }), "{err}");
    }
}
