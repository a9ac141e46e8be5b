//! The misbehaving builds of `echo` do exactly the harm they are named for,
//! and the daemon reports it: the signals the rules engine reads are real.
//! The panic, leak and segfault fixtures are rows of the fault matrix in
//! `faults.rs` (a panic and a leak beside a good echo with live clients; a
//! segfault and the restart on the known-good version).
use std::path::PathBuf;

use plugvisor_tests::{Daemon, DaemonOptions, LineClient, build_plugin_version};

/// A fixture crate built as `echo` at `version`, ready for `packages`.
fn as_echo(package: &str, lib: &str, version: &str) -> Vec<(String, PathBuf, String)> {
    vec![(
        "echo".into(),
        build_plugin_version(package, lib, version),
        version.into(),
    )]
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
