//! Plugins that hang: in `init` (bounded by `[reload] init_timeout`) and in
//! `handle` (bounded by each listener's `request_timeout`), over TCP and
//! gRPC. In every case the version that served before keeps serving, the
//! client sees only the one request or reload that failed, the operator is
//! told which plugin, version and bound, and `state_dir` stays consistent.
//!
//! The `hang` fixture is a build of `echo` whose `init` never returns when
//! `PLUGVISOR_FIXTURE_HANG_INIT` names its version, and whose `handle`
//! never returns on the frame `hang`.
#![expect(
    clippy::too_many_lines,
    reason = "each test is one black-box scenario that reads top to bottom"
)]
use std::time::{Duration, Instant};

use plugvisor_tests::pb::Request;
use plugvisor_tests::pb::plugin_client::PluginClient;
use plugvisor_tests::state_check::assert_state_consistent;
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, PackageTweaks, build_echo_version,
    build_plugin_version, echo_version, grpc_channel, install_package, version_series, wait_until,
};

const HANG_PACKAGE: &str = "plugvisor-fixture-hang";
const HANG_LIB: &str = "fixture_hang";
/// The per-version bound on abandoned `handle` calls (`slot::MAX_STUCK_HANDLES`).
const MAX_STUCK_HANDLES: usize = 16;
/// The per-plugin bound on abandoned `init` calls (`loader::MAX_STUCK_INITS`).
const MAX_STUCK_INITS: usize = 2;

/// A counter or gauge of `plugin="echo"` and `call`, as an integer.
fn metric(d: &Daemon, name: &str, call: &str) -> u64 {
    d.metrics()
        .get(name, &[("plugin", "echo"), ("call", call)])
        .unwrap_or_else(|| panic!("{name}{{plugin=echo,call={call}}} is exported")) as u64
}

fn reloads(d: &Daemon, outcome: &str) -> u64 {
    d.metrics()
        .get(
            "plugvisor_reloads_total",
            &[("plugin", "echo"), ("outcome", outcome)],
        )
        .unwrap_or(0.0) as u64
}

/// Log lines from `from` on whose message contains `needle`.
fn logged(d: &Daemon, from: usize, needle: &str) -> Vec<serde_json::Value> {
    d.log_lines()[from..]
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle))
        })
        .cloned()
        .collect()
}

/// Calls `ping` on `client` until `done` holds, asserting every answer
/// comes from `version`; returns how many answers it saw.
fn ping_until(
    client: &mut LineClient,
    version: &str,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answers = 0;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        let r = client.call("ping").expect("the old version answers");
        assert_eq!(
            echo_version(&r),
            Some(version),
            "answer {r:?} during {what}"
        );
        answers += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    answers
}

#[test]
fn an_init_that_hangs_is_bounded_and_the_old_version_serves_on() {
    // Every build of the hang fixture hangs in init; echo 1.0.0 is the real
    // echo and serves throughout.
    let hangs = version_series(HANG_PACKAGE, HANG_LIB, 2, MAX_STUCK_INITS + 1);
    let mut d = Daemon::start(DaemonOptions {
        probes: "off",
        init_timeout: Some("1s"),
        env: vec![("PLUGVISOR_FIXTURE_HANG_INIT".into(), "*".into())],
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        ..DaemonOptions::default()
    });
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    assert_eq!(echo_version(&client.call("ping").unwrap()), Some("1.0.0"));
    assert_eq!(
        metric(&d, "plugvisor_plugin_call_timeouts_total", "init"),
        0
    );
    assert_eq!(metric(&d, "plugvisor_plugin_calls_stuck", "init"), 0);

    // Each hanging version in turn: refused after the bound, quarantined,
    // its thread counted as stuck, while 1.0.0 answers every request.
    for (i, (version, lib)) in hangs.iter().take(MAX_STUCK_INITS).enumerate() {
        let from = d.log_lines().len();
        install_package(
            &d.plugins_dir,
            "echo",
            version,
            lib,
            &PackageTweaks::default(),
        );
        let failed = |d: &Daemon| {
            d.journal()
                .iter()
                .any(|e| e["event"] == "failed" && e["version"].as_str() == Some(version.as_str()))
        };
        ping_until(&mut client, "1.0.0", "a hanging init", || failed(&d));
        let entry = d
            .journal()
            .into_iter()
            .rfind(|e| e["version"].as_str() == Some(version.as_str()))
            .unwrap();
        let reason = entry["reason"].as_str().unwrap();
        assert!(
            reason.contains("init did not return within 1s")
                && reason.contains(version.as_str())
                && reason.contains("\"echo\""),
            "the journal names plugin, version and bound: {reason}"
        );
        let lines = logged(&d, from, "init did not return within 1s");
        assert_eq!(lines.len(), 1, "said once in the log");
        assert_eq!(lines[0]["fields"]["serving"], "1.0.0");
        assert_eq!(lines[0]["fields"]["outcome"], "failed");
        let n = (i + 1) as u64;
        assert_eq!(
            metric(&d, "plugvisor_plugin_call_timeouts_total", "init"),
            n
        );
        assert_eq!(metric(&d, "plugvisor_plugin_calls_stuck", "init"), n);
        assert_eq!(reloads(&d, "failed"), n);
        let state = assert_state_consistent(&d.state_dir);
        assert!(
            state.refs["echo"]
                .quarantined
                .iter()
                .any(|q| &q.version == version),
            "{version} is quarantined: {:?}",
            state.refs["echo"]
        );
        assert_eq!(state.active_version("echo"), Some("1.0.0"));
    }

    // Asked again by force: refused as quarantined, no new thread stranded.
    let (first, _) = &hangs[0];
    install_package(
        &d.plugins_dir,
        "echo",
        first,
        &hangs[0].1,
        &PackageTweaks::default(),
    );
    let (_, out, err) = d.cli(&["reload", "echo"]);
    assert!(
        out.contains("rejected") && out.contains("quarantined"),
        "a quarantined version is refused: {out}{err}"
    );
    assert_eq!(
        metric(&d, "plugvisor_plugin_calls_stuck", "init"),
        MAX_STUCK_INITS as u64
    );

    // The bound: with MAX_STUCK_INITS threads stuck, the next version is
    // refused before it is even opened, and says why.
    let (third, third_lib) = &hangs[MAX_STUCK_INITS];
    let from = d.log_lines().len();
    install_package(
        &d.plugins_dir,
        "echo",
        third,
        third_lib,
        &PackageTweaks::default(),
    );
    ping_until(&mut client, "1.0.0", "a load past the bound", || {
        d.journal()
            .iter()
            .any(|e| e["version"].as_str() == Some(third.as_str()) && e["event"] == "failed")
    });
    let lines = logged(
        &d,
        from,
        "earlier init calls of this plugin are still running",
    );
    assert_eq!(lines.len(), 1, "the refusal names the stuck inits");
    assert_eq!(metric(&d, "plugvisor_plugin_calls_shed_total", "init"), 1);
    assert_eq!(
        metric(&d, "plugvisor_plugin_call_timeouts_total", "init"),
        MAX_STUCK_INITS as u64,
        "no init was called"
    );

    // gRPC on the same slot answered from 1.0.0 all along.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resp = rt.block_on(async {
        let mut c = PluginClient::new(grpc_channel(d.addr("echo-grpc")).await.unwrap());
        c.invoke(Request {
            payload: b"grpc".to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
    });
    assert_eq!(resp.plugin_version, "1.0.0");

    // SIGTERM with threads stuck in init: the daemon still exits, at once.
    assert_eq!(d.stop(), Some(0), "exits 0 with init threads stuck");
    let state = assert_state_consistent(&d.state_dir);
    assert_eq!(state.active_version("echo"), Some("1.0.0"));

    // A restart without the hang takes the version that was refused only
    // for the stuck threads (it never ran, so it is not quarantined).
    d.set_env("PLUGVISOR_FIXTURE_HANG_INIT", None);
    d.restart();
    wait_until(
        Instant::now() + Duration::from_secs(30),
        "the version refused for the stuck inits serves after a restart",
        || {
            LineClient::connect(d.addr("echo-tcp"))
                .and_then(|mut c| c.call("ping"))
                .is_ok_and(|r| echo_version(&r) == Some(third.as_str()))
        },
    );
    assert_eq!(metric(&d, "plugvisor_plugin_calls_stuck", "init"), 0);
    assert_state_consistent(&d.state_dir);
}

#[test]
fn a_handle_that_hangs_times_out_on_tcp_and_sheds_past_the_bound() {
    let hang = build_plugin_version(HANG_PACKAGE, HANG_LIB, "1.0.0");
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        packages: vec![("echo".into(), hang, "1.0.0".into())],
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo").request_timeout("300ms"),
            ListenerSpec::tcp("unbounded", "echo").request_timeout("0s"),
        ],
        ..DaemonOptions::default()
    });
    let addr = d.addr("echo-tcp");
    // `0s` is no bound at all: a slow call is waited for.
    let mut unbounded = LineClient::connect(d.addr("unbounded")).unwrap();
    assert_eq!(
        unbounded.call("sleep 400").unwrap(),
        "[echo 1.0.0] sleep 400"
    );
    let mut other = LineClient::connect(addr).unwrap();
    assert_eq!(echo_version(&other.call("ping").unwrap()), Some("1.0.0"));

    // One hanging frame: answered with an error naming the bound, and the
    // same connection goes on; another connection never noticed.
    let from = d.log_lines().len();
    let mut hung = LineClient::connect(addr).unwrap();
    hung.stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let waiter = std::thread::spawn(move || {
        let r = hung.call("hang").unwrap();
        (hung, r)
    });
    // While that call hangs, the other connection is served (the call does
    // not sit on an async worker).
    for _ in 0..5 {
        assert_eq!(echo_version(&other.call("ping").unwrap()), Some("1.0.0"));
    }
    let (mut hung, answer) = waiter.join().unwrap();
    assert!(
        answer.starts_with("ERR ")
            && answer.contains("\"echo\" 1.0.0 did not answer within 300ms")
            && answer.contains("request_timeout"),
        "{answer}"
    );
    assert_eq!(
        echo_version(&hung.call("after").unwrap()),
        Some("1.0.0"),
        "the connection goes on after a timed-out frame"
    );
    assert_eq!(
        metric(&d, "plugvisor_plugin_call_timeouts_total", "handle"),
        1
    );
    assert_eq!(metric(&d, "plugvisor_plugin_calls_stuck", "handle"), 1);
    let lines = logged(&d, from, "request timed out");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["fields"]["plugin"], "echo");
    assert_eq!(lines[0]["fields"]["version"], "1.0.0");
    assert_eq!(lines[0]["level"], "WARN");

    // A slow call that does return, late: timed out, then no longer stuck.
    assert!(hung.call("sleep 600").unwrap().contains("did not answer"));
    wait_until(
        Instant::now() + Duration::from_secs(10),
        "the late call to leave the stuck count",
        || metric(&d, "plugvisor_plugin_calls_stuck", "handle") == 1,
    );
    assert_eq!(
        metric(&d, "plugvisor_plugin_call_timeouts_total", "handle"),
        2
    );

    // Up to the bound, concurrently: every one times out on its own.
    let more: Vec<_> = (1..MAX_STUCK_HANDLES)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = LineClient::connect(addr).unwrap();
                c.stream()
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                c.call("hang").unwrap()
            })
        })
        .collect();
    for t in more {
        let r = t.join().unwrap();
        assert!(r.contains("did not answer within 300ms"), "{r}");
    }
    assert_eq!(
        metric(&d, "plugvisor_plugin_calls_stuck", "handle"),
        MAX_STUCK_HANDLES as u64
    );
    // Past it: shed at once with a clear refusal, the plugin not called.
    let shed = other.call("ping").unwrap();
    assert!(
        shed.starts_with("ERR ")
            && shed.contains(&format!("{MAX_STUCK_HANDLES} earlier requests are stuck")),
        "{shed}"
    );
    assert_eq!(metric(&d, "plugvisor_plugin_calls_shed_total", "handle"), 1);

    // The bound is per version: a fixed version serves at once, on the
    // same connection; the stuck calls keep the bad one mapped.
    install_package(
        &d.plugins_dir,
        "echo",
        "2.0.0",
        &build_echo_version("2.0.0"),
        &PackageTweaks::default(),
    );
    wait_until(
        Instant::now() + Duration::from_secs(30),
        "the fixed version serves",
        || {
            other
                .call("ping")
                .is_ok_and(|r| echo_version(&r) == Some("2.0.0"))
        },
    );
    assert_eq!(
        metric(&d, "plugvisor_plugin_calls_stuck", "handle"),
        MAX_STUCK_HANDLES as u64
    );
    // The new version serves before it is durable (the store's fsyncs
    // come after the switch); its journal line is written last, after
    // the refs.
    wait_until(
        Instant::now() + Duration::from_secs(30),
        "the journal records 2.0.0 activated",
        || {
            d.journal().iter().any(|e| {
                e["plugin"] == "echo" && e["event"] == "activated" && e["version"] == "2.0.0"
            })
        },
    );
    let state = assert_state_consistent(&d.state_dir);
    assert_eq!(state.active_version("echo"), Some("2.0.0"));
}

#[test]
fn a_handle_that_hangs_times_out_on_grpc() {
    let hang = build_plugin_version(HANG_PACKAGE, HANG_LIB, "1.0.0");
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        packages: vec![("echo".into(), hang, "1.0.0".into())],
        listeners: vec![ListenerSpec::grpc("echo-grpc", "echo").request_timeout("300ms")],
        ..DaemonOptions::default()
    });
    let addr = d.addr("echo-grpc");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = grpc_channel(addr).await.unwrap();
        let req = |p: &str| Request {
            payload: p.as_bytes().to_vec(),
        };

        // Invoke: DEADLINE_EXCEEDED naming plugin, version and bound, while
        // a concurrent call on the same channel is answered.
        let mut hung = PluginClient::new(channel.clone());
        let hanging = tokio::spawn(async move { hung.invoke(req("hang")).await });
        let mut ok = PluginClient::new(channel.clone());
        for _ in 0..5 {
            let r = ok.invoke(req("ping")).await.unwrap().into_inner();
            assert_eq!(r.plugin_version, "1.0.0");
            assert!(r.error.is_empty(), "{}", r.error);
        }
        let status = hanging.await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(
            status
                .message()
                .contains("\"echo\" 1.0.0 did not answer within 300ms"),
            "{status:?}"
        );

        // Exchange: the timed-out message is answered in-band and the
        // stream goes on with the next one.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut streaming = PluginClient::new(channel.clone());
        let mut inbound = streaming
            .exchange(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        for (sent, expect_error) in [("one", false), ("hang", true), ("two", false)] {
            tx.send(req(sent)).await.unwrap();
            let r = inbound.message().await.unwrap().expect("an answer");
            if expect_error {
                assert!(
                    r.error.contains("did not answer within 300ms"),
                    "in-band timeout: {r:?}"
                );
            } else {
                assert!(r.error.is_empty(), "{r:?}");
                assert!(String::from_utf8_lossy(&r.payload).ends_with(sent));
                assert_eq!(r.plugin_version, "1.0.0");
            }
        }
        drop(tx);
        assert!(inbound.message().await.unwrap().is_none(), "ends with OK");
    });
    assert_eq!(
        metric(&d, "plugvisor_plugin_call_timeouts_total", "handle"),
        2
    );
    assert_eq!(metric(&d, "plugvisor_plugin_calls_stuck", "handle"), 2);
    assert_eq!(
        metric(&d, "plugvisor_plugin_call_timeouts_total", "init"),
        0
    );
    assert_state_consistent(&d.state_dir);
}
