//! The naive upgrade, as a peer to the soak: SIGTERM, then the daemon
//! started again with the new version on the same ports, under the soak's
//! load.
use std::time::{Duration, Instant};

use plugvisor_tests::{Daemon, DaemonOptions, PackageTweaks, echo_version_series, install_package};

use crate::load;
use crate::soak::{shape, two_listeners};

/// What the naive upgrades found.
pub struct Naive {
    /// Restarts done.
    pub restarts: usize,
    /// What the clients saw.
    pub load: load::Report,
    /// SIGTERM sent → new daemon answering on every listener, seconds.
    pub downtime: Vec<f64>,
    /// (SIGTERM sent, new daemon answering), seconds since the load started.
    pub windows: Vec<(f64, f64)>,
}

/// The naive upgrade under the soak's load: SIGTERM, start the daemon with
/// the new version on the same ports, repeatedly.
pub fn naive_restart(quick: bool) -> Naive {
    let restarts = if quick { 1 } else { 10 };
    let series = echo_version_series(8, restarts);
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
    let mut downtime = Vec::new();
    let mut windows = Vec::new();
    for (v, lib) in &series {
        install_package(
            &daemon.plugins_dir,
            "echo",
            v,
            lib,
            &PackageTweaks::default(),
        );
        let t = Instant::now();
        let from = load.start.elapsed().as_secs_f64();
        daemon.stop();
        daemon.restart();
        downtime.push(t.elapsed().as_secs_f64());
        windows.push((from, load.start.elapsed().as_secs_f64()));
        std::thread::sleep(Duration::from_secs(1));
    }
    let report = load.finish();
    eprintln!(
        "naive restart: {restarts} restarts, {} answered, {} failed, {} connect errors, max gap {:?}",
        report.ok(),
        report.failed(),
        report.connect_errors(),
        report.max_gap()
    );
    Naive {
        restarts,
        load: report,
        downtime,
        windows,
    }
}
