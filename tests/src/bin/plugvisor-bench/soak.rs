//! 1000 reloads under TCP frames and open gRPC streams: what the clients
//! saw, the kernel's broken-connection count, the daemon's RSS and fds.
//! The load's shape is shared with the naive upgrade (`naive.rs`), so the
//! two compare.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, ListenerSpec, PackageTweaks, echo_version_series, install_package,
    wait_until,
};

use crate::load;
use crate::reload::{Reload, bench_log_env, kernel_windows, reload_records, settle_writeback};

/// A kB field of `/proc/PID/status` (`VmRSS`, `RssAnon`, …).
pub fn status_kb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn rss_kb(pid: u32) -> f64 {
    status_kb(pid, "VmRSS")
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Distinct store objects mapped into the process.
fn mapped_objects(pid: u32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut paths: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("/objects/"))
        .collect();
    paths.sort_unstable();
    paths.dedup();
    paths.len()
}

/// The load both the soak and the naive peer run under.
pub fn shape(quick: bool) -> load::Shape {
    if quick {
        load::Shape {
            tcp_conns: 2,
            tcp_rate: 500,
            streams: 1,
            stream_rate: 200,
        }
    } else {
        load::Shape {
            tcp_conns: 8,
            tcp_rate: 750,
            streams: 4,
            stream_rate: 250,
        }
    }
}

/// A TCP and a gRPC listener on the echo plugin, one per kind of client
/// in the load.
pub fn two_listeners() -> Vec<ListenerSpec> {
    vec![
        ListenerSpec::tcp("echo-tcp", "echo"),
        ListenerSpec::grpc("echo-grpc", "echo"),
    ]
}

/// What the soak found.
pub struct Soak {
    /// Reloads done.
    pub reloads: usize,
    /// What the clients saw.
    pub load: load::Report,
    /// The daemon's `reloaded` lines.
    pub records: Vec<Reload>,
    /// The kernel-measured window of each reload, by `seq`.
    pub kernel: HashMap<u64, f64>,
    /// Connections the kernel saw broken in a reload window
    /// (`plugvisor_reload_broken_connections_total`).
    pub broken: f64,
    /// TCP resets sent (`plugvisor_tcp_resets_total`).
    pub resets_sent: f64,
    /// gRPC GOAWAY frames (`plugvisor_grpc_goaway_total`).
    pub goaway: f64,
    /// gRPC stream resets (`plugvisor_grpc_stream_resets_total`).
    pub rst_stream: f64,
    /// Every probe attached: without them the kernel's zeros above mean
    /// nothing.
    pub probes_up: bool,
    /// RSS kB with the listeners up and no client yet.
    pub idle_rss_kb: f64,
    /// RSS kB with the load running, before the first reload.
    pub before_rss_kb: f64,
    /// RSS kB after the last reload.
    pub after_rss_kb: f64,
    /// Open fds with the load running, before the first reload.
    pub before_fds: usize,
    /// Open fds after the last reload.
    pub after_fds: usize,
    /// Distinct store objects mapped after the last reload.
    pub mapped_after: usize,
    /// Size of the series' first library.
    pub lib_bytes: u64,
    /// Seconds since the load started at which each reload was committed.
    pub commits: Vec<f64>,
    /// The load's start, seconds since the Unix epoch.
    pub start_unix: f64,
    /// (reloads done, RSS kB, anonymous RSS kB, fds), every 100 reloads.
    pub samples: Vec<(usize, f64, f64, usize)>,
}

/// Reloads the echo plugin back to back under [`shape`]'s load, each
/// committed as soon as the previous one serves.
pub fn soak(quick: bool) -> Soak {
    let reloads = if quick { 10 } else { 1000 };
    let series = echo_version_series(7, reloads);
    settle_writeback();
    let daemon = Daemon::start(DaemonOptions {
        listeners: two_listeners(),
        env: bench_log_env(),
        ..Default::default()
    });
    let pid = daemon.pid();
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss_kb = rss_kb(pid);
    let success = |d: &Daemon| {
        d.metrics().sum(
            "plugvisor_reloads_total",
            &[("plugin", "echo"), ("outcome", "success")],
        )
    };
    let base = success(&daemon);
    let load = load::Load::start(
        daemon.addr("echo-tcp"),
        daemon.addr("echo-grpc"),
        shape(quick),
    );
    std::thread::sleep(Duration::from_millis(500));
    let before_rss_kb = rss_kb(pid);
    let before_fds = fds(pid);
    let mut commits = Vec::with_capacity(reloads);
    let mut samples = vec![(0, before_rss_kb, status_kb(pid, "RssAnon"), before_fds)];
    for (i, (v, lib)) in series.iter().enumerate() {
        commits.push(load.start.elapsed().as_secs_f64());
        install_package(
            &daemon.plugins_dir,
            "echo",
            v,
            lib,
            &PackageTweaks::default(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let want = base + (i + 1) as f64;
        wait_until(deadline, "reload under load", || {
            let done = success(&daemon) >= want;
            if !done {
                std::thread::sleep(Duration::from_millis(5));
            }
            done
        });
        if (i + 1) % 100 == 0 || i + 1 == reloads {
            samples.push((i + 1, rss_kb(pid), status_kb(pid, "RssAnon"), fds(pid)));
            eprintln!("soak: {} reloads, RSS {:.0} kB", i + 1, rss_kb(pid));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let start_unix = load.start_unix;
    let report = load.finish();
    std::thread::sleep(Duration::from_millis(300));
    let m = daemon.metrics();
    let probes_up = m
        .matching("plugvisor_probe_up", &[])
        .all(|(_, v)| (v - 1.0).abs() < f64::EPSILON);
    let s = Soak {
        reloads,
        records: reload_records(&daemon),
        kernel: kernel_windows(&daemon),
        broken: m.sum("plugvisor_reload_broken_connections_total", &[]),
        resets_sent: m.sum("plugvisor_tcp_resets_total", &[("direction", "sent")]),
        goaway: m.sum("plugvisor_grpc_goaway_total", &[]),
        rst_stream: m.sum("plugvisor_grpc_stream_resets_total", &[]),
        probes_up,
        idle_rss_kb,
        before_rss_kb,
        after_rss_kb: rss_kb(pid),
        before_fds,
        after_fds: fds(pid),
        mapped_after: mapped_objects(pid),
        lib_bytes: std::fs::metadata(&series[0].1).map_or(0, |m| m.len()),
        load: report,
        commits,
        samples,
        start_unix,
    };
    eprintln!(
        "soak: {} reloads, {} answered, {} failed, broken {}, max gap {:?}",
        s.reloads,
        s.load.ok(),
        s.load.failed(),
        s.broken,
        s.load.max_gap()
    );
    s
}
