//! Scale (#21): ten thousand raw TCP connections and a thousand gRPC
//! `Exchange` streams, all open at once on loopback, ride through reloads
//! without a failed request or a broken connection — as the clients see it
//! and as the kernel counts it — and every one of them is answered by the
//! new version after each reload. No time is asserted; the connection
//! sweep's figures are in `cargo xtask bench`.
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Crowd, Daemon, DaemonOptions, ListenerSpec, echo_version_series, raise_open_files_limit,
    require_root, wait_until,
};

const TCP: usize = 10_000;
const STREAMS: usize = 1_000;
/// HTTP/2 connections the streams share (50 streams each).
const CHANNELS: usize = 20;
const RELOADS: usize = 100;

#[test]
fn ten_thousand_connections_and_a_thousand_streams_ride_through_a_hundred_reloads() {
    if !require_root(
        "ten_thousand_connections_and_a_thousand_streams_ride_through_a_hundred_reloads",
    ) {
        return;
    }
    // The crowd's sockets and the daemon's are both counted against this
    // machine's descriptors; the daemon raises its own soft limit.
    let limit = raise_open_files_limit();
    assert!(
        limit >= (TCP + STREAMS) as u64 + 1024,
        "the open files hard limit ({limit}) is below what {TCP} connections need"
    );
    let series = echo_version_series(7, RELOADS + 1);
    let (base_version, base_lib) = &series[0];
    let mut d = Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("crowd-tcp", "echo"),
            ListenerSpec::grpc("crowd-grpc", "echo"),
        ],
        probes: "on",
        packages: vec![("echo".into(), base_lib.clone(), base_version.clone())],
        ..Default::default()
    });
    assert!(
        d.log_text().contains("open files limit"),
        "the daemon says what its open files limit is"
    );

    let mut crowd = Crowd::open(
        d.addr("crowd-tcp"),
        TCP,
        Some(d.addr("crowd-grpc")),
        STREAMS,
        CHANNELS,
    )
    .unwrap_or_else(|e| panic!("opening the crowd: {e}"));
    let first = crowd.round("warm");
    assert!(
        first.errors.is_empty(),
        "before any reload: {:?}",
        &first.errors[..first.errors.len().min(5)]
    );
    assert_eq!(
        first.versions.get(base_version.as_str()),
        Some(&(TCP + STREAMS))
    );
    wait_until(
        Instant::now() + Duration::from_secs(30),
        "the kernel counts every connection",
        || {
            d.metrics()
                .get("plugvisor_tcp_connections", &[("listener", "crowd-tcp")])
                == Some(TCP as f64)
        },
    );

    let mut slowest = Duration::ZERO;
    for (i, (version, lib)) in series.iter().enumerate().skip(1) {
        d.install_and_await("echo", version, lib, &format!("reload {i} to {version}"));
        let round = crowd.round(&format!("r{i}"));
        assert!(
            round.errors.is_empty(),
            "reload {i}: {} of {} failed, e.g. {:?}",
            round.errors.len(),
            round.answers,
            &round.errors[..round.errors.len().min(5)]
        );
        assert_eq!(
            round.versions.get(version.as_str()),
            Some(&(TCP + STREAMS)),
            "after reload {i} every connection and stream is answered by {version}: {:?}",
            round.versions
        );
        slowest = slowest.max(round.elapsed);
    }
    d.assert_running();

    kernel_saw_nothing_break(&d.metrics());
    eprintln!(
        "{TCP} connections + {STREAMS} streams across {RELOADS} reloads: 0 failed; slowest round {slowest:?}"
    );
    drop(crowd);
    assert_eq!(d.stop(), Some(0), "SIGTERM drains and exits 0");
}

/// The kernel's word on the run: no connection broke inside a reload
/// window, every connection is still counted, and the observer dropped no
/// event at this load.
fn kernel_saw_nothing_break(m: &plugvisor_tests::Metrics) {
    for (listener, protocol) in [("crowd-tcp", "tcp"), ("crowd-grpc", "grpc")] {
        assert_eq!(
            m.get(
                "plugvisor_reload_broken_connections_total",
                &[("listener", listener), ("protocol", protocol)]
            ),
            Some(0.0),
            "the kernel saw no {listener} connection break across {RELOADS} reloads"
        );
    }
    assert_eq!(
        m.get("plugvisor_tcp_connections", &[("listener", "crowd-tcp")]),
        Some(TCP as f64),
        "the kernel still counts every connection"
    );
    let dropped = m.sum("plugvisor_probe_events_dropped_total", &[]);
    assert!(
        dropped < 0.5,
        "the observer kept up: {dropped} kernel events were dropped"
    );
    assert_eq!(
        m.get("plugvisor_probe_up", &[("probe", "inet_sock_set_state")]),
        Some(1.0)
    );
}
