//! The connection sweep (#21): 10 → 100 → 1 000 → 10 000 raw TCP
//! connections held open on one echo listener (probes on). At each size:
//! the daemon's RSS growth per idle connection (every connection has sent
//! one frame and waits), reloads under that crowd (each followed by a round
//! in which every connection sends one frame), their latency and swap, and
//! the crowd's throughput in those rounds. Beside it, Debian's nginx on the
//! same machine with the same number of idle keep-alive connections after
//! one request each — the memory a mature event-driven server spends on an
//! idle connection.
use std::net::SocketAddr;
use std::time::Duration;

use plugvisor_tests::{
    Crowd, Daemon, DaemonOptions, ListenerSpec, Nginx, echo_version_series, raise_open_files_limit,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::reload::{bench_log_env, reload_records};
use crate::soak::status_kb;
use crate::stats::Dist;

/// How long the crowd sits idle before its memory is read: past tokio's
/// 10 s keep-alive of idle blocking threads (`--quick`: 2 s).
fn idle(quick: bool) -> Duration {
    Duration::from_secs(if quick { 2 } else { 11 })
}

/// One size of the sweep.
pub struct Step {
    /// Connections held.
    pub connections: usize,
    /// Daemon RSS before the crowd connected and with it idle, KiB.
    pub rss_kb: (f64, f64),
    /// nginx's worker RSS before and with the same crowd idle, KiB.
    pub nginx_rss_kb: (f64, f64),
    /// Reload `total` (manifest → serving), µs, per reload.
    pub reload_us: Vec<f64>,
    /// The swap alone (`switch` phase), µs, per reload.
    pub switch_us: Vec<f64>,
    /// Answers per second in the rounds after each reload.
    pub rounds_per_s: Vec<f64>,
    /// Failed answers across the rounds.
    pub failed: usize,
    /// Kernel-counted broken connections across the reloads.
    pub broken: f64,
}

/// The whole sweep.
pub struct Sweep {
    /// Each size, smallest first.
    pub steps: Vec<Step>,
    /// Reloads at each size.
    pub reloads: usize,
}

/// Opens `n` keep-alive connections to nginx, one GET on each, and keeps
/// them open until the returned runtime and streams are dropped.
fn nginx_crowd(
    addr: SocketAddr,
    n: usize,
) -> (tokio::runtime::Runtime, Vec<tokio::net::TcpStream>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let conns = rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for chunk in 0..n.div_ceil(256) {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..256.min(n - chunk * 256) {
                set.spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
                    s.write_all(b"GET /ok HTTP/1.1\r\nHost: bench\r\n\r\n")
                        .await
                        .ok()?;
                    let mut got = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !got.ends_with(b"ok\n") {
                        let k = s.read(&mut buf).await.ok()?;
                        if k == 0 {
                            return None;
                        }
                        got.extend_from_slice(&buf[..k]);
                    }
                    Some(s)
                });
            }
            while let Some(r) = set.join_next().await {
                if let Ok(Some(s)) = r {
                    out.push(s);
                }
            }
        }
        out
    });
    (rt, conns)
}

/// nginx's worker RSS with `n` idle keep-alive connections: (before, with).
fn nginx_rss(n: usize, quick: bool) -> (f64, f64) {
    let root = tempfile::tempdir().expect("temp dir");
    std::fs::write(root.path().join("ok"), "ok\n").expect("writing the page");
    let server = Nginx::start_for_connections(root.path(), n + 64);
    let pid = server.pid().expect("nginx runs");
    let addr = server.addr();
    // One request first, so the worker's first-use allocations are in the
    // baseline, as the daemon's are.
    drop(nginx_crowd(addr, 1));
    std::thread::sleep(Duration::from_millis(200));
    let before = status_kb(pid, "VmRSS");
    let (rt, conns) = nginx_crowd(addr, n);
    assert_eq!(conns.len(), n, "nginx took every connection");
    std::thread::sleep(idle(quick));
    let with = status_kb(pid, "VmRSS");
    drop(conns);
    drop(rt);
    (before, with)
}

fn step(n: usize, reloads: usize, series: &[(String, std::path::PathBuf)], quick: bool) -> Step {
    let (base_version, base_lib) = &series[0];
    let mut d = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("sweep-tcp", "echo")],
        probes: "on",
        packages: vec![("echo".into(), base_lib.clone(), base_version.clone())],
        env: bench_log_env(),
        ..Default::default()
    });
    let addr = d.addr("sweep-tcp");
    // A warm daemon: one connection's worth of first-use allocations (the
    // runtime's I/O driver, the slot's runner) before the baseline.
    {
        let mut one = Crowd::open(addr, 1, None, 0, 0).expect("one connection");
        let _ = one.round("warm");
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = status_kb(d.pid(), "VmRSS");
    let mut crowd = Crowd::open(addr, n, None, 0, 0).expect("the crowd connects");
    let first = crowd.round("first");
    assert!(
        first.errors.is_empty(),
        "{:?}",
        &first.errors[..first.errors.len().min(3)]
    );
    // Idle: past tokio's 10 s keep-alive of the blocking threads the burst
    // of first frames woke, which are not the connections' cost.
    std::thread::sleep(idle(quick));
    let with = status_kb(d.pid(), "VmRSS");
    let mut failed = 0;
    let mut rounds_per_s = Vec::new();
    for (v, lib) in series.iter().skip(1).take(reloads) {
        d.install_and_await("echo", v, lib, "a reload under the crowd");
        let r = crowd.round(v);
        failed += r.errors.len();
        rounds_per_s.push(r.answers as f64 / r.elapsed.as_secs_f64());
    }
    let records = reload_records(&d);
    let tail = &records[records.len().saturating_sub(reloads)..];
    let broken = d.metrics().sum(
        "plugvisor_reload_broken_connections_total",
        &[("listener", "sweep-tcp")],
    );
    drop(crowd);
    let _ = d.stop();
    Step {
        connections: n,
        rss_kb: (before, with),
        nginx_rss_kb: nginx_rss(n, quick),
        reload_us: tail.iter().map(|r| r.phase("total") / 1e3).collect(),
        switch_us: tail.iter().map(|r| r.phase("switch") / 1e3).collect(),
        rounds_per_s,
        failed,
        broken,
    }
}

/// Runs the sweep: 10 → 10 000 connections (10 → 1 000 with `quick`).
pub fn sweep(quick: bool) -> Sweep {
    raise_open_files_limit();
    let sizes: &[usize] = if quick {
        &[10, 100, 1_000]
    } else {
        &[10, 100, 1_000, 10_000]
    };
    let reloads = if quick { 3 } else { 20 };
    let series = echo_version_series(8, reloads + 1);
    Sweep {
        steps: sizes
            .iter()
            .map(|&n| step(n, reloads, &series, quick))
            .collect(),
        reloads,
    }
}

impl Step {
    /// Daemon RSS growth per connection, bytes.
    pub fn per_conn(&self) -> f64 {
        (self.rss_kb.1 - self.rss_kb.0) * 1024.0 / self.connections as f64
    }

    /// nginx worker RSS growth per connection, bytes.
    pub fn nginx_per_conn(&self) -> f64 {
        (self.nginx_rss_kb.1 - self.nginx_rss_kb.0) * 1024.0 / self.connections as f64
    }
}

/// Summary rows: memory per idle connection at the largest size, and
/// reload latency there against the smallest.
pub fn summary(md: &mut String, s: &Sweep) {
    use std::fmt::Write as _;
    let (Some(small), Some(big)) = (s.steps.first(), s.steps.last()) else {
        return;
    };
    let _ = writeln!(
        md,
        "| userspace memory per idle TCP connection, {} connections (daemon RSS growth ÷ connections) | ≤ nginx | {:.2} KB | Debian's nginx, same crowd: {:.2} KB | {:.2}× nginx | {} |",
        big.connections,
        big.per_conn() / 1024.0,
        big.nginx_per_conn() / 1024.0,
        big.per_conn() / big.nginx_per_conn(),
        if big.per_conn() <= big.nginx_per_conn() {
            "met"
        } else {
            "**missed**"
        }
    );
    let (r_small, r_big) = (Dist::of(&small.reload_us), Dist::of(&big.reload_us));
    let (w_small, w_big) = (Dist::of(&small.switch_us), Dist::of(&big.switch_us));
    let ratio = r_big.p50 / r_small.p50;
    let _ = writeln!(
        md,
        "| reload latency and swap at {} connections vs {} ({} reloads each; 0 failed, 0 broken) | within 1.2× | total p50 {:.0} µs, swap p50 {:.1} µs; failed {}, broken {} | at {}: total p50 {:.0} µs, swap p50 {:.1} µs | {:.2}× total, {:.2}× swap | {} |",
        big.connections,
        small.connections,
        s.reloads,
        r_big.p50,
        w_big.p50,
        big.failed,
        big.broken,
        small.connections,
        r_small.p50,
        w_small.p50,
        ratio,
        w_big.p50 / w_small.p50,
        if ratio <= 1.2 && big.failed == 0 && big.broken == 0.0 {
            "met"
        } else {
            "**missed**"
        }
    );
}

/// The sweep's section.
pub fn render(md: &mut String, s: &Sweep) {
    use std::fmt::Write as _;
    let _ = writeln!(
        md,
        "\n## Connection sweep: 10 → 10 000 connections\n\n\
         One raw TCP echo listener, probes on; at each size a fresh daemon, warmed by one connection, then the crowd connects and each connection sends one frame and waits (idle, 11 s: past tokio's keep-alive of the blocking threads the first frames woke). *RSS per connection*: the daemon's `VmRSS` growth ÷ connections. *nginx*: Debian's nginx 1.22 (one worker, `worker_connections` sized to the crowd, keep-alive 600 s) with the same number of keep-alive connections after one `GET` each, its worker's `VmRSS` growth ÷ connections. Then {} reloads, each followed by a round in which every connection sends one frame: *reload total* is manifest → serving from the daemon's log, *swap* its `switch` phase, *throughput* the round's answers per second (every connection at once; the client runs on the same 2 cores).\n\n\
         | connections | daemon RSS idle → with crowd | per connection | nginx per connection | reload total p50 / p99 µs | swap p50 / p99 µs | throughput p50 answers/s | failed | broken (kernel) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        s.reloads
    );
    for st in &s.steps {
        let (r, w, t) = (
            Dist::of(&st.reload_us),
            Dist::of(&st.switch_us),
            Dist::of(&st.rounds_per_s),
        );
        let _ = writeln!(
            md,
            "| {} | {:.1} → {:.1} MB | {:.2} KB | {:.2} KB | {:.0} / {:.0} | {:.1} / {:.1} | {:.0} | {} | {} |",
            st.connections,
            st.rss_kb.0 / 1024.0,
            st.rss_kb.1 / 1024.0,
            st.per_conn() / 1024.0,
            st.nginx_per_conn() / 1024.0,
            r.p50,
            r.p99,
            w.p50,
            w.p99,
            t.p50,
            st.failed,
            st.broken
        );
    }
}
