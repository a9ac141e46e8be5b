//! The headline claim: plugins are swapped under live TCP traffic and not
//! one connection breaks — as the clients see it and as the kernel does.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plugvisor_tests::{
    ClientReport, Daemon, DaemonOptions, LineClient, PackageTweaks, build_echo_version,
    echo_version, echo_version_series, follow_tcp, install_package, require_root, sha256_file,
    wait_until,
};

const CONNECTIONS: usize = 20;
const RELOADS: usize = 50;

#[test]
fn fifty_reloads_under_twenty_live_connections_break_nothing() {
    if !require_root("fifty_reloads_under_twenty_live_connections_break_nothing") {
        return;
    }
    // Build every version first so the reloads follow each other quickly.
    let versions: Vec<String> = (1..=RELOADS).map(|i| format!("1.1.{i}")).collect();
    let libs: Vec<_> = versions.iter().map(|v| build_echo_version(v)).collect();

    let mut daemon = Daemon::start(DaemonOptions::default());
    let addr = daemon.addr("echo-tcp");
    let before = daemon.metrics();
    assert_eq!(
        before.get("plugvisor_probe_up", &[("probe", "inet_sock_set_state")]),
        Some(1.0)
    );
    assert_eq!(
        before.get("plugvisor_probe_up", &[("probe", "reload_markers")]),
        Some(1.0)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let last = versions.last().unwrap().clone();
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|c| follow_tcp(addr, c, stop.clone(), last.clone()))
        .collect();

    let deadline = Instant::now() + Duration::from_secs(30);
    wait_until(deadline, "kernel sees all client connections", || {
        daemon
            .metrics()
            .get("plugvisor_tcp_connections", &[("listener", "echo-tcp")])
            == Some(CONNECTIONS as f64)
    });

    for (i, (v, lib)) in versions.iter().zip(&libs).enumerate() {
        daemon.install_and_await("echo", v, lib, &format!("reload {} to {v}", i + 1));
        daemon.assert_running();
    }
    assert_eq!(
        daemon
            .metrics()
            .get("plugvisor_tcp_connections", &[("listener", "echo-tcp")]),
        Some(CONNECTIONS as f64),
        "the kernel still sees every connection after the reloads"
    );
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<ClientReport> = clients.into_iter().map(|h| h.join().unwrap()).collect();

    let m = daemon.metrics();
    let total_frames: u64 = reports.iter().map(|r| r.frames).sum();
    for (i, r) in reports.iter().enumerate() {
        r.assert_followed(&format!("client {i}"), &versions);
    }
    assert_eq!(
        m.get(
            "plugvisor_reloads_total",
            &[("plugin", "echo"), ("outcome", "success")]
        ),
        Some((RELOADS + 1) as f64)
    );
    assert_eq!(
        m.get(
            "plugvisor_reload_broken_connections_total",
            &[("listener", "echo-tcp"), ("protocol", "tcp")]
        ),
        Some(0.0),
        "the kernel saw connections break during a reload"
    );
    assert_eq!(
        m.get(
            "plugvisor_kernel_reload_duration_seconds_count",
            &[("plugin", "echo")]
        ),
        Some((RELOADS + 1) as f64),
        "every reload window was seen by the kernel"
    );
    // Old versions stay mapped, but no more than keep_loaded (4).
    let mapped = m
        .matching("plugvisor_plugin_info", &[("plugin", "echo")])
        .count();
    assert_eq!(mapped, 4, "mapped versions are bounded by keep_loaded");

    let q = |name: &str, labels: &[(&str, &str)], q: f64| {
        m.quantile(name, labels, q).unwrap_or(f64::NAN) * 1e6
    };
    eprintln!(
        "{total_frames} frames over {CONNECTIONS} connections across {RELOADS} reloads, 0 errors"
    );
    for phase in [
        "verify", "stage", "load", "init", "switch", "publish", "total",
    ] {
        let l = [("plugin", "echo"), ("phase", phase)];
        eprintln!(
            "reload phase {phase:>7}: p50 {:>8.1} us  p99 {:>8.1} us",
            q("plugvisor_reload_duration_seconds", &l, 0.5),
            q("plugvisor_reload_duration_seconds", &l, 0.99)
        );
    }
    let l = [("plugin", "echo")];
    eprintln!(
        "kernel reload window: p50 {:.1} us  p99 {:.1} us (mean {:.1} us)",
        q("plugvisor_kernel_reload_duration_seconds", &l, 0.5),
        q("plugvisor_kernel_reload_duration_seconds", &l, 0.99),
        m.sum("plugvisor_kernel_reload_duration_seconds_sum", &l)
            / m.sum("plugvisor_kernel_reload_duration_seconds_count", &l)
            * 1e6
    );
    assert_eq!(daemon.stop(), Some(0), "SIGTERM drains and exits 0");
}

/// The version series that soaks and benchmarks rely on: each member is a
/// distinct library the loader accepts and that answers with its own
/// version (a patch that missed one copy of the version would be refused
/// as a name/version mismatch or would answer with the wrong tag).
#[test]
fn patched_version_series_loads_and_answers_with_each_version() {
    let series = echo_version_series(5, 3);
    let shas: std::collections::HashSet<String> =
        series.iter().map(|(_, lib)| sha256_file(lib)).collect();
    assert_eq!(
        shas.len(),
        3,
        "every member of the series is a distinct library"
    );

    let mut daemon = Daemon::start(DaemonOptions::default());
    let mut client = LineClient::connect(daemon.addr("echo-tcp")).expect("connect");
    for (version, lib) in &series {
        install_package(
            &daemon.plugins_dir,
            "echo",
            version,
            lib,
            &PackageTweaks::default(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        wait_until(deadline, &format!("reload to {version}"), || {
            echo_version(&client.call("version").unwrap()) == Some(version.as_str())
        });
        assert_eq!(
            client.call("version").unwrap(),
            format!("[echo {version}] {version}")
        );
    }
    assert_eq!(daemon.stop(), Some(0));
}
