//! Plugins in host processes (`[plugin.NAME] isolation = "process"`): a
//! version that segfaults, or whose host is killed from outside, costs
//! only the requests in flight on its host. The daemon — the same pid —
//! keeps every listener and every client connection; a version on trial
//! is rolled back at once, a known-good one is restarted in a new host.
//!
//! Each test runs 20 persistent TCP clients and 4 gRPC `Exchange` streams
//! through the crash and judges everything they saw: an error is allowed
//! only if it is a request lost with the host (`crashed`), at most one per
//! client (each has one request in flight at a time), and no connection or
//! stream may break.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use plugvisor_tests::live::{Live, LiveOptions, Tally};
use plugvisor_tests::state_check::assert_state_consistent;
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, PackageTweaks, build_echo_version,
    build_plugin_version, install_package, wait_until,
};

/// How long the daemon gets to act on anything here (a loaded CI machine).
const ACT_TIMEOUT: Duration = Duration::from_secs(30);

const TCP_CLIENTS: usize = 20;
const GRPC_STREAMS: usize = 4;

fn deadline() -> Instant {
    Instant::now() + ACT_TIMEOUT
}

/// A daemon (probes off) running echo in plugin hosts, with a TCP and a
/// gRPC listener and `packages` installed before it starts.
fn process_daemon(
    trial: &'static str,
    packages: Vec<(String, std::path::PathBuf, String)>,
) -> Daemon {
    Daemon::start(DaemonOptions {
        probes: "off",
        trial,
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        packages,
        extra_config: "[plugin.echo]\nisolation = \"process\"\n".into(),
        ..Default::default()
    })
}

fn live(d: &Daemon) -> Live {
    Live::start(&LiveOptions {
        tcp: vec![d.addr("echo-tcp"); TCP_CLIENTS],
        grpc: vec![d.addr("echo-grpc"); GRPC_STREAMS],
        pause: Duration::from_millis(2),
    })
}

/// Every error the live clients saw is a request lost with a host, at
/// most one per client; returns how many were lost.
fn only_in_flight_requests_failed(tally: &Tally, crashes: usize) -> usize {
    for e in &tally.errors {
        assert!(
            e.contains("crashed (")
                && !e.contains("connection broke")
                && !e.contains("stream error"),
            "a live client saw more than a lost request: {e}\nall: {:#?}",
            tally.errors
        );
    }
    assert!(
        tally.errors.len() <= (TCP_CLIENTS + GRPC_STREAMS) * crashes,
        "more requests failed than can have been in flight: {:#?}",
        tally.errors
    );
    tally.errors.len()
}

/// The pids of the plugin hosts the daemon `parent` runs now.
fn hosts_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, …
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && cmdline.split(|b| *b == 0).any(|a| a == b"plugin-host") {
            out.push(pid);
        }
    }
    out
}

fn restarts(d: &Daemon, reason: &str) -> u64 {
    d.metrics()
        .get(
            "plugvisor_plugin_host_restarts_total",
            &[("plugin", "echo"), ("reason", reason)],
        )
        .unwrap_or(0.0) as u64
}

/// A version on trial that segfaults in `handle`: the request that
/// crashed it is answered with the cause, the same connection goes on,
/// the known-good version (its host kept warm) serves at once, and the
/// crashed version is quarantined — the daemon never restarted.
#[test]
fn a_version_on_trial_that_segfaults_is_rolled_back_and_no_connection_closes() {
    let mut d = process_daemon(
        "4s",
        vec![("echo".into(), build_echo_version("1.0.0"), "1.0.0".into())],
    );
    let pid = d.pid();
    wait_until(deadline(), "1.0.0 known-good", || {
        d.status()["plugins"][0]["state"] == "known-good"
    });
    assert_eq!(
        d.metrics().get(
            "plugvisor_plugin_isolation",
            &[("plugin", "echo"), ("mode", "process")]
        ),
        Some(1.0)
    );
    assert_eq!(hosts_of(pid).len(), 1, "1.0.0 runs in a host of its own");
    let segv = build_plugin_version("plugvisor-fixture-segv", "fixture_segv", "2.0.0");
    install_package(
        &d.plugins_dir,
        "echo",
        "2.0.0",
        &segv,
        &PackageTweaks::default(),
    );
    wait_until(deadline(), "2.0.0 serves and is recorded", || {
        d.serving("echo-tcp").as_deref() == Some("2.0.0")
            && d.journal()
                .iter()
                .any(|e| e["event"] == "activated" && e["version"] == "2.0.0")
    });
    let live = live(&d);
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    assert_eq!(client.call("fine").unwrap(), "[echo 2.0.0] fine");
    let answer = client
        .call("crash")
        .expect("the connection outlives the crash");
    assert!(
        answer.starts_with("ERR plugin \"echo\" 2.0.0 crashed (SIGSEGV)"),
        "{answer}"
    );
    wait_until(deadline(), "1.0.0 serves again", || {
        d.serving("echo-tcp").as_deref() == Some("1.0.0")
    });
    assert_eq!(
        client.call("after").unwrap(),
        "[echo 1.0.0] after",
        "same connection"
    );
    std::thread::sleep(Duration::from_millis(300));
    let tally = live.stop();
    d.assert_running();
    assert_eq!(d.pid(), pid, "the daemon itself never went down");
    let lost = only_in_flight_requests_failed(&tally, 1);
    assert!(tally.versions.contains("1.0.0"), "{:?}", tally.versions);
    eprintln!(
        "live clients: {} frames answered, {lost} lost in flight",
        tally.frames
    );

    the_record_says_crash_and_rollback(&d);
}

/// The journal, the metrics and the store after a crash on trial and its
/// rollback from 2.0.0 to 1.0.0.
fn the_record_says_crash_and_rollback(d: &Daemon) {
    let j = d.journal();
    let crash = j
        .iter()
        .find(|e| e["event"] == "host-crashed")
        .expect("journaled");
    assert_eq!(crash["version"], "2.0.0");
    assert!(
        crash["reason"].as_str().unwrap().contains("SIGSEGV"),
        "{crash}"
    );
    let rb = j
        .iter()
        .rev()
        .find(|e| e["event"] == "rollback")
        .expect("rolled back");
    assert_eq!(
        (
            rb["reason"].as_str(),
            rb["from_version"].as_str(),
            rb["version"].as_str()
        ),
        (Some("crash"), Some("2.0.0"), Some("1.0.0"))
    );
    let metrics = d.metrics();
    assert_eq!(
        metrics.get(
            "plugvisor_rollbacks_total",
            &[("plugin", "echo"), ("reason", "crash")]
        ),
        Some(1.0)
    );
    assert_eq!(restarts(d, "segfault"), 1);
    // The crash was survived, and the first answer after it observed how
    // long the recovery took.
    assert_eq!(
        metrics.get(
            "plugvisor_crash_recovery_seconds_count",
            &[("plugin", "echo")]
        ),
        Some(1.0)
    );
    eprintln!(
        "crash → first answer by the known-good version: {:.2} ms",
        metrics
            .get(
                "plugvisor_crash_recovery_seconds_sum",
                &[("plugin", "echo")]
            )
            .unwrap_or(f64::NAN)
            * 1e3
    );
    let s = assert_state_consistent(&d.state_dir);
    assert_eq!(s.active_version("echo"), Some("1.0.0"));
    assert!(
        s.refs["echo"]
            .quarantined
            .iter()
            .any(|q| q.version == "2.0.0")
    );
}

/// A known-good version whose host dies — of a segfault, then of a
/// SIGKILL from outside — is restarted in a new host and serves on; no
/// rollback, no client connection closed, the reason counted each time.
#[test]
fn a_known_good_version_whose_host_dies_is_restarted_and_serves_on() {
    let segv = build_plugin_version("plugvisor-fixture-segv", "fixture_segv", "1.0.0");
    let mut d = process_daemon("1s", vec![("echo".into(), segv, "1.0.0".into())]);
    let pid = d.pid();
    wait_until(deadline(), "1.0.0 known-good", || {
        d.status()["plugins"][0]["state"] == "known-good"
    });
    let live = live(&d);
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    let first_host = hosts_of(pid);
    assert_eq!(first_host.len(), 1);

    let answer = client
        .call("crash")
        .expect("the connection outlives the crash");
    assert!(answer.contains("crashed (SIGSEGV)"), "{answer}");
    wait_until(deadline(), "a new host serves 1.0.0", || {
        restarts(&d, "segfault") == 1
            && client
                .call("again")
                .is_ok_and(|a| a == "[echo 1.0.0] again")
    });
    let second_host = hosts_of(pid);
    assert_eq!(second_host.len(), 1, "{second_host:?}");
    assert_ne!(first_host, second_host, "a new process");

    // SAFETY: plain syscall on a child of the daemon this test started.
    unsafe { libc::kill(second_host[0] as i32, libc::SIGKILL) };
    wait_until(deadline(), "restarted after the SIGKILL", || {
        restarts(&d, "signal") == 1
            && client
                .call("third")
                .is_ok_and(|a| a == "[echo 1.0.0] third")
    });
    std::thread::sleep(Duration::from_millis(300));
    let tally = live.stop();
    d.assert_running();
    assert_eq!(d.pid(), pid);
    only_in_flight_requests_failed(&tally, 2);
    assert_eq!(tally.versions, BTreeSet::from(["1.0.0".to_owned()]));

    let j = d.journal();
    let events = |ev: &str| j.iter().filter(|e| e["event"] == ev).count();
    assert_eq!(events("host-crashed"), 2, "{j:#?}");
    assert_eq!(events("host-restarted"), 2, "{j:#?}");
    assert_eq!(
        events("rollback"),
        0,
        "a known-good version is restarted, not rolled back"
    );
    assert!(d.status()["plugins"][0]["state"] == "known-good");
    assert_state_consistent(&d.state_dir);
}

/// A version whose `init` segfaults never serves: the host dies, the load
/// fails with the cause, and the version that served goes on — no restart
/// of the daemon, no crash loop.
#[test]
fn a_segfault_in_init_fails_the_load_and_the_old_version_serves_on() {
    let mut d = process_daemon(
        "30s",
        vec![("echo".into(), build_echo_version("1.0.0"), "1.0.0".into())],
    );
    // The fixture reads it in `init`; hosts inherit the daemon's environment.
    d.stop();
    d.set_env("PLUGVISOR_FIXTURE_SEGV_INIT", Some("2.0.0"));
    d.restart();
    let pid = d.pid();
    wait_until(deadline(), "1.0.0 serves", || {
        d.serving("echo-tcp").as_deref() == Some("1.0.0")
    });
    let live = live(&d);
    let segv = build_plugin_version("plugvisor-fixture-segv", "fixture_segv", "2.0.0");
    install_package(
        &d.plugins_dir,
        "echo",
        "2.0.0",
        &segv,
        &PackageTweaks::default(),
    );
    wait_until(deadline(), "the load failed", || {
        d.reloads("echo", "failed") == 1
    });
    let tally = live.stop();
    d.assert_running();
    assert_eq!(d.pid(), pid);
    assert!(tally.errors.is_empty(), "{:#?}", tally.errors);
    assert_eq!(d.serving("echo-tcp").as_deref(), Some("1.0.0"));
    let j = d.journal();
    let failed = j
        .iter()
        .find(|e| e["event"] == "failed")
        .expect("journaled");
    assert!(
        failed["reason"].as_str().unwrap().contains("SIGSEGV"),
        "{failed}"
    );
    assert_state_consistent(&d.state_dir);
}
