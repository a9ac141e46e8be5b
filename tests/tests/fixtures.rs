//! The misbehaving builds of `echo` do exactly the harm they are named for,
//! and the daemon reports it: the signals the rules engine reads are real.
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use plugvisor_tests::{Daemon, DaemonOptions, LineClient, build_plugin_version, wait_until};

/// A fixture crate built as `echo` at `version`, ready for `packages`.
fn as_echo(package: &str, lib: &str, version: &str) -> Vec<(String, PathBuf, String)> {
    vec![(
        "echo".into(),
        build_plugin_version(package, lib, version),
        version.into(),
    )]
}

#[test]
fn a_panic_costs_one_request_not_the_process_or_the_connection() {
    let mut daemon = Daemon::start(DaemonOptions {
        packages: as_echo(
            "plugvisor-fixture-panic-handle",
            "fixture_panic_handle",
            "1.0.1",
        ),
        probes: "off",
        ..Default::default()
    });
    let mut c = LineClient::connect(daemon.addr("echo-tcp")).unwrap();
    assert_eq!(c.call("before").unwrap(), "[echo 1.0.1] before");
    let resp = c.call("panic").unwrap();
    assert!(
        resp.starts_with("ERR") && resp.contains("panicked"),
        "a panic is answered as an error: {resp}"
    );
    assert_eq!(
        c.call("after").unwrap(),
        "[echo 1.0.1] after",
        "the same connection serves on"
    );
    daemon.assert_running();
    let m = daemon.metrics();
    let panics = [
        ("plugin", "echo"),
        ("version", "1.0.1"),
        ("outcome", "panic"),
    ];
    assert_eq!(m.get("plugvisor_requests_total", &panics), Some(1.0));
    assert_eq!(
        m.get(
            "plugvisor_requests_total",
            &[("plugin", "echo"), ("outcome", "error")]
        ),
        Some(0.0),
        "a panic is not counted as a plain error"
    );
}

#[test]
fn fail_after_serves_n_requests_then_fails_every_one() {
    const N: u32 = 3;
    let daemon = Daemon::start(DaemonOptions {
        packages: as_echo(
            "plugvisor-fixture-fail-after",
            "fixture_fail_after",
            "1.0.2",
        ),
        env: vec![("PLUGVISOR_FIXTURE_FAIL_AFTER".into(), N.to_string())],
        probes: "off",
        ..Default::default()
    });
    // The harness's own readiness ping was one of the N.
    let mut c = LineClient::connect(daemon.addr("echo-tcp")).unwrap();
    let mut answered = Vec::new();
    for i in 0..N + 4 {
        answered.push(c.call(&format!("r{i}")).unwrap());
    }
    let first_err = answered
        .iter()
        .position(|r| r.starts_with("ERR"))
        .expect("requests fail after the first N");
    assert!(
        answered[..first_err]
            .iter()
            .all(|r| r.starts_with("[echo 1.0.2] r")),
        "{answered:?}"
    );
    assert!(
        answered[first_err..].iter().all(|r| r.starts_with("ERR")),
        "once failing, every request fails: {answered:?}"
    );
    let m = daemon.metrics();
    let by = |outcome| {
        m.get(
            "plugvisor_requests_total",
            &[("plugin", "echo"), ("outcome", outcome)],
        )
    };
    assert_eq!(by("ok"), Some(f64::from(N)));
    assert_eq!(
        by("error"),
        Some((answered.len() - first_err) as f64),
        "every failure is counted as an error"
    );
}

#[test]
fn segv_takes_the_whole_daemon_down() {
    let mut daemon = Daemon::start(DaemonOptions {
        packages: as_echo("plugvisor-fixture-segv", "fixture_segv", "1.0.3"),
        probes: "off",
        ..Default::default()
    });
    let mut c = LineClient::connect(daemon.addr("echo-tcp")).unwrap();
    assert_eq!(c.call("fine").unwrap(), "[echo 1.0.3] fine");
    assert!(
        c.call("crash").is_err(),
        "the connection dies with the process"
    );
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.signal(),
        Some(libc::SIGSEGV),
        "a real segfault, not a caught panic: {status}"
    );
}

#[test]
fn leak_grows_the_resident_set_by_a_mebibyte_per_request() {
    const REQUESTS: usize = 64;
    let daemon = Daemon::start(DaemonOptions {
        packages: as_echo("plugvisor-fixture-leak", "fixture_leak", "1.0.4"),
        probes: "off",
        ..Default::default()
    });
    let rss = || {
        daemon
            .metrics()
            .get("process_resident_memory_bytes", &[])
            .expect("the process collector exports RSS")
    };
    let before = rss();
    let mut c = LineClient::connect(daemon.addr("echo-tcp")).unwrap();
    for i in 0..REQUESTS {
        assert_eq!(
            c.call(&format!("{i}")).unwrap(),
            format!("[echo 1.0.4] {i}")
        );
    }
    // The pages were written before each answer; the scrape reads RSS now.
    let grown_by_at_least = ((REQUESTS - 4) << 20) as f64;
    let deadline = Instant::now() + Duration::from_secs(5);
    wait_until(deadline, "RSS reflects the leak", || {
        rss() - before >= grown_by_at_least
    });
}
