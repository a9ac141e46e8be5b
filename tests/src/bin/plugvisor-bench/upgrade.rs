//! plugvisor upgrading itself (`plugvisor upgrade`) under the soak's load,
//! beside the naive restart (`naive.rs`) under the same load: refused
//! connects, failed raw TCP requests, raw TCP connections moved, gRPC
//! streams ended with a retryable status, and the longest gap a raw TCP
//! client saw across each upgrade.
use std::time::{Duration, Instant};

use plugvisor_tests::{Daemon, DaemonOptions, become_subreaper};

use crate::load;
use crate::soak::{shape, two_listeners};

/// What the upgrades found.
pub struct Upgrades {
    /// Upgrades done.
    pub count: usize,
    /// Upgrades that did not exit 0 (each with why).
    pub failures: Vec<String>,
    /// What the clients saw.
    pub load: load::Report,
    /// Raw TCP connections moved, all upgrades.
    pub moved: u64,
    /// `upgrade` started → the new process ready, ms (its own report).
    pub ready_ms: Vec<f64>,
    /// The command's whole run (check, start, hand-over), seconds.
    pub took: Vec<f64>,
    /// (command started, command returned), seconds since the load started.
    pub windows: Vec<(f64, f64)>,
}

impl Upgrades {
    /// The longest raw TCP gap that overlaps each upgrade's window, ms.
    pub fn tcp_gap_per_upgrade(&self) -> Vec<f64> {
        let gaps = self.load.tcp_long_gaps();
        self.windows
            .iter()
            .map(|&(from, to)| {
                gaps.iter()
                    .filter(|&&(start, len)| start < to && start + len > from)
                    .map(|&(_, len)| len * 1e3)
                    .fold(0.0, f64::max)
            })
            .collect()
    }
}

/// `plugvisor upgrade` (to the same binary: the hand-over is the same
/// whatever the new build) repeatedly under the soak's load.
pub fn upgrades(quick: bool) -> Upgrades {
    let count = if quick { 2 } else { 20 };
    // The new processes become this process's children as the old ones
    // exit, so they are reaped.
    become_subreaper();
    let mut daemon = Daemon::start(DaemonOptions {
        listeners: two_listeners(),
        probes: "off",
        drain_timeout: Some("2s"),
        ..Default::default()
    });
    let load = load::Load::start(
        daemon.addr("echo-tcp"),
        daemon.addr("echo-grpc"),
        shape(quick),
    );
    std::thread::sleep(Duration::from_secs(1));
    let mut failures = Vec::new();
    let mut moved = 0;
    let mut ready_ms = Vec::new();
    let mut took = Vec::new();
    let mut windows = Vec::new();
    for _ in 0..count {
        let t = Instant::now();
        let from = load.start.elapsed().as_secs_f64();
        let (code, answer) = daemon.upgrade(None, Duration::from_secs(30));
        took.push(t.elapsed().as_secs_f64());
        windows.push((from, load.start.elapsed().as_secs_f64()));
        if code == 0 {
            let r = &answer["result"];
            moved += r["connections_moved"]["echo-tcp"].as_u64().unwrap_or(0);
            ready_ms.push(r["ready_ms"].as_f64().unwrap_or(f64::NAN));
        } else {
            failures.push(answer["error"].as_str().unwrap_or("?").to_owned());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let report = load.finish();
    eprintln!(
        "upgrade: {count} upgrades ({} failed), {} answered, {} TCP failed, {} gRPC retryable ends, {} refused, {moved} moved, max TCP gap {:?}",
        failures.len(),
        report.ok(),
        report.tcp_failed(),
        report.retryable_ends(),
        report.connect_errors(),
        report.tcp_max_gap()
    );
    daemon.stop();
    Upgrades {
        count,
        failures,
        load: report,
        moved,
        ready_ms,
        took,
        windows,
    }
}
