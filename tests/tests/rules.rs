//! Thresholds that act, trial and known-good, rollback and its quarantine,
//! crash recovery, disable/enable — through the real binary, its CLI, its
//! thresholds file and its journal.
#![expect(
    clippy::too_many_lines,
    reason = "each test is one black-box scenario that reads top to bottom"
)]

use std::time::{Duration, Instant};

use plugvisor_tests::pb::plugin_client::PluginClient;
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, PackageTweaks, build_echo_version,
    build_named_plugin, echo_version, grpc_channel, install_package, pb, require_root, wait_until,
};

fn serving(d: &Daemon) -> Option<String> {
    LineClient::connect(d.addr("echo-tcp"))
        .ok()?
        .call("v")
        .ok()
        .and_then(|r| echo_version(&r).map(str::to_owned))
}

fn wait_serving(d: &Daemon, v: &str) {
    wait_until(
        Instant::now() + Duration::from_secs(15),
        &format!("{v} serves"),
        || serving(d).as_deref() == Some(v),
    );
}

fn plugin_status(d: &Daemon) -> serde_json::Value {
    d.status()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plugin"] == "echo")
        .unwrap()
        .clone()
}

#[test]
fn trial_then_known_good_then_manual_rollback_quarantines() {
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        trial: "1s",
        ..Default::default()
    });
    wait_until(
        Instant::now() + Duration::from_secs(10),
        "1.0.0 passes its trial",
        || plugin_status(&d)["state"] == "known-good",
    );
    assert_eq!(plugin_status(&d)["known_good"], "1.0.0");

    let v2 = build_echo_version("2.0.0");
    install_package(
        &d.plugins_dir,
        "echo",
        "2.0.0",
        &v2,
        &PackageTweaks::default(),
    );
    wait_serving(&d, "2.0.0");
    let p = plugin_status(&d);
    assert_eq!(p["state"], "trial");
    assert_eq!(p["known_good"], "1.0.0");

    let (code, out, err) = d.cli(&["rollback", "echo"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("rollback 2.0.0 -> 1.0.0 reason=manual"),
        "{out}"
    );
    assert_eq!(serving(&d).as_deref(), Some("1.0.0"));
    let m = d.metrics();
    assert_eq!(
        m.get(
            "plugvisor_rollbacks_total",
            &[("plugin", "echo"), ("reason", "manual")]
        ),
        Some(1.0)
    );
    let j = d.journal();
    let rb = j
        .iter()
        .rev()
        .find(|e| e["event"] == "rollback")
        .expect("journalled");
    assert_eq!(
        (
            rb["from_version"].as_str(),
            rb["version"].as_str(),
            rb["reason"].as_str()
        ),
        (Some("2.0.0"), Some("1.0.0"), Some("manual"))
    );

    // The quarantined version is not loaded again from the same package…
    let (code, out, _) = d.cli(&["reload", "echo"]);
    assert_ne!(code, 0);
    assert!(out.contains("quarantined"), "{out}");
    assert_eq!(serving(&d).as_deref(), Some("1.0.0"));
    let (code, out, _) = d.cli(&["versions", "echo"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("quarantined  2.0.0") && out.contains("known-good   1.0.0"),
        "{out}"
    );
    // …until a newer version appears.
    let v21 = build_echo_version("2.1.0");
    install_package(
        &d.plugins_dir,
        "echo",
        "2.1.0",
        &v21,
        &PackageTweaks::default(),
    );
    wait_serving(&d, "2.1.0");
    // An explicit rollback to a named version.
    let (code, out, err) = d.cli(&["rollback", "echo", "--to", "1.0.0"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(serving(&d).as_deref(), Some("1.0.0"));
    let (code, _, err) = d.cli(&["rollback", "echo", "--to", "9.9.9"]);
    assert_ne!(code, 0);
    assert!(err.contains("never activated"), "{err}");
}

#[test]
fn kill9_during_a_trial_restarts_on_known_good() {
    let mut d = Daemon::start(DaemonOptions {
        probes: "off",
        trial: "1s",
        ..Default::default()
    });
    wait_until(
        Instant::now() + Duration::from_secs(10),
        "1.0.0 known-good",
        || plugin_status(&d)["state"] == "known-good",
    );
    // From here on a long trial, so 3.0.0 is still on trial when the process dies.
    let v3 = build_echo_version("3.0.0");
    install_package(
        &d.plugins_dir,
        "echo",
        "3.0.0",
        &v3,
        &PackageTweaks::default(),
    );
    wait_serving(&d, "3.0.0");
    assert_eq!(plugin_status(&d)["state"], "trial");
    d.kill9();
    d.restart();
    assert_eq!(
        serving(&d).as_deref(),
        Some("1.0.0"),
        "came up on known-good, not on the version that was on trial"
    );
    let j = d.journal();
    let rb = j
        .iter()
        .rev()
        .find(|e| e["event"] == "rollback")
        .expect("journalled");
    assert_eq!(rb["reason"], "crash-in-trial");
    assert_eq!(rb["from_version"], "3.0.0");
    assert_eq!(
        d.metrics().get(
            "plugvisor_rollbacks_total",
            &[("plugin", "echo"), ("reason", "crash-in-trial")]
        ),
        Some(1.0)
    );
    // The package on disk is still 3.0.0; it stays out.
    assert!(d.log_text().contains("quarantined"));
    assert_eq!(serving(&d).as_deref(), Some("1.0.0"));
}

/// A clean stop (SIGTERM) during a trial is not a crash: the next start
/// comes up on the version that was on trial and runs its trial again,
/// to the end.
#[test]
fn a_clean_stop_during_a_trial_resumes_it() {
    let mut d = Daemon::start(DaemonOptions {
        probes: "off",
        trial: "3s",
        ..Default::default()
    });
    let known_good = |d: &Daemon| plugin_status(d)["state"] == "known-good";
    wait_until(
        Instant::now() + Duration::from_secs(10),
        "1.0.0 known-good",
        || known_good(&d),
    );
    install_package(
        &d.plugins_dir,
        "echo",
        "3.0.0",
        &build_echo_version("3.0.0"),
        &PackageTweaks::default(),
    );
    wait_serving(&d, "3.0.0");
    assert_eq!(plugin_status(&d)["state"], "trial");
    assert_eq!(d.stop(), Some(0));
    let j = d.journal();
    assert!(
        j.iter()
            .any(|e| e["event"] == "trial-interrupted" && e["version"] == "3.0.0"),
        "the stop is journalled: {j:#?}"
    );
    d.restart();
    assert_eq!(
        serving(&d).as_deref(),
        Some("3.0.0"),
        "a clean stop is not a crash: the version on trial comes back"
    );
    assert_eq!(plugin_status(&d)["state"], "trial", "its trial starts over");
    assert!(
        d.log_text().contains("its trial starts over"),
        "the start says why"
    );
    assert!(
        !d.journal().iter().any(|e| e["event"] == "rollback"),
        "no crash-in-trial rollback"
    );
    wait_until(
        Instant::now() + Duration::from_secs(10),
        "3.0.0 passes its resumed trial",
        || known_good(&d),
    );
    assert_eq!(serving(&d).as_deref(), Some("3.0.0"));
    plugvisor_tests::state_check::assert_state_consistent(&d.state_dir);
}

#[test]
fn disable_refuses_clearly_and_enable_restores() {
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let mut open = LineClient::connect(d.addr("echo-tcp")).unwrap();
    assert!(open.call("a").unwrap().starts_with("[echo"));
    let (code, out, err) = d.cli(&["disable", "echo"]);
    assert_eq!(code, 0, "{out}{err}");
    let r = open.call("b").unwrap();
    assert!(r.starts_with("ERR") && r.contains("disabled"), "{r}");
    let mut fresh = LineClient::connect(d.addr("echo-tcp")).unwrap();
    let r = fresh.call("c").unwrap_or_default();
    assert!(r.contains("disabled"), "a new connection is told why: {r}");
    assert_eq!(plugin_status(&d)["disabled"], true);
    let (code, _, _) = d.cli(&["enable", "echo"]);
    assert_eq!(code, 0);
    assert!(open.call("d").unwrap().starts_with("[echo 1.0.0]"));
}

/// A rule on a kernel-observed family: more than 3 connections on the
/// listener degrades echo (its own hook turns the transforms off); at or
/// below 1 it clears. Then an invalid thresholds file is refused with line
/// and column and the rule in force keeps acting; then dry_run reports
/// without acting.
#[test]
fn degrade_by_rule_clears_with_hysteresis_and_survives_a_bad_file() {
    if !require_root("degrade_by_rule_clears_with_hysteresis_and_survives_a_bad_file") {
        return;
    }
    let rule = |dry: bool| {
        format!(
            "evaluation_interval = \"250ms\"\n[[rule]]\nname = \"too-many-conns\"\nmetric = \"plugvisor_tcp_connections\"\nlabels = {{ listener = \"echo-*\" }}\nop = \">\"\nthreshold = 3\nclear = 1\naction = \"degrade\"\ncooldown = \"0s\"\ndry_run = {dry}\n"
        )
    };
    let d = Daemon::start(DaemonOptions {
        thresholds: Some(rule(false)),
        ..Default::default()
    });
    let deadline = || Instant::now() + Duration::from_secs(10);
    let upper = |c: &mut LineClient| c.call("upper abc").unwrap();
    let mut first = LineClient::connect(d.addr("echo-tcp")).unwrap();
    assert_eq!(upper(&mut first), "[echo 1.0.0] ABC");
    let mut more: Vec<LineClient> = (0..3)
        .map(|_| LineClient::connect(d.addr("echo-tcp")).unwrap())
        .collect();
    wait_until(deadline(), "degraded", || {
        d.metrics().get("plugvisor_degraded", &[("plugin", "echo")]) == Some(1.0)
    });
    assert_eq!(
        upper(&mut first),
        "[echo 1.0.0] upper abc",
        "the plugin's own degrade hook shed the transform"
    );
    let m = d.metrics();
    assert_eq!(
        m.get(
            "plugvisor_degradations_total",
            &[("plugin", "echo"), ("reason", "too-many-conns")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get("plugvisor_rule_state", &[("rule", "too-many-conns")]),
        Some(2.0)
    );
    let p = plugin_status(&d);
    assert_eq!(p["degraded"], "hook");
    assert_eq!(p["last_action"]["rule"], "too-many-conns");
    assert_eq!(p["last_action"]["threshold"], 3.0);
    // 2 connections: below the threshold but not yet at clear — still degraded.
    more.truncate(1);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        d.metrics().get("plugvisor_degraded", &[("plugin", "echo")]),
        Some(1.0),
        "hysteresis holds it"
    );
    more.clear();
    wait_until(deadline(), "cleared", || {
        d.metrics().get("plugvisor_degraded", &[("plugin", "echo")]) == Some(0.0)
    });
    assert_eq!(upper(&mut first), "[echo 1.0.0] ABC", "full service again");
    assert!(d.journal().iter().any(|e| e["event"] == "degrade-cleared"));

    // A broken file: refused with line and column, the old rule stays.
    std::fs::write(
        d.thresholds_path(),
        rule(false).replace("op = \">\"", "op = \">>\""),
    )
    .unwrap();
    wait_until(deadline(), "invalid file noticed", || {
        d.metrics().get("plugvisor_rules_config_valid", &[]) == Some(0.0)
    });
    let refusal = d
        .log_text()
        .lines()
        .find(|l| l.contains("thresholds file refused"))
        .map(str::to_owned)
        .unwrap();
    assert!(
        refusal.contains("thresholds.toml:6:6:"),
        "line and column: {refusal}"
    );
    let again: Vec<LineClient> = (0..3)
        .map(|_| LineClient::connect(d.addr("echo-tcp")).unwrap())
        .collect();
    wait_until(deadline(), "the previous rule still acts", || {
        d.metrics().get(
            "plugvisor_degradations_total",
            &[("plugin", "echo"), ("reason", "too-many-conns")],
        ) == Some(2.0)
    });
    drop(again);
    wait_until(deadline(), "cleared again", || {
        d.metrics().get("plugvisor_degraded", &[("plugin", "echo")]) == Some(0.0)
    });

    // dry_run: evaluated and reported, nothing done. SIGHUP also re-reads.
    std::fs::write(d.thresholds_path(), rule(true)).unwrap();
    d.signal(libc::SIGHUP);
    wait_until(deadline(), "valid again", || {
        d.metrics().get("plugvisor_rules_config_valid", &[]) == Some(1.0)
    });
    let _many: Vec<LineClient> = (0..3)
        .map(|_| LineClient::connect(d.addr("echo-tcp")).unwrap())
        .collect();
    wait_until(deadline(), "firing in dry run", || {
        d.metrics()
            .get("plugvisor_rule_state", &[("rule", "too-many-conns")])
            == Some(2.0)
    });
    std::thread::sleep(Duration::from_millis(600));
    let m = d.metrics();
    assert_eq!(
        m.get("plugvisor_degraded", &[("plugin", "echo")]),
        Some(0.0),
        "dry run does not act"
    );
    assert_eq!(
        m.get(
            "plugvisor_degradations_total",
            &[("plugin", "echo"), ("reason", "too-many-conns")]
        ),
        Some(2.0)
    );
    assert!(d.log_text().contains("dry run: would degrade echo"));
    assert_eq!(upper(&mut first), "[echo 1.0.0] ABC");
}

fn bad_build(package: &str, lib: &str, version: &str) -> std::path::PathBuf {
    plugvisor_tests::build_plugin_version(package, lib, version)
}

/// An error-rate rule rolls a failing version back within two evaluation
/// ticks of the breach (the engine's own tick count, no wall clock), while
/// the client's connection never breaks: it sees ERR answers, then the
/// known-good version again.
#[test]
fn error_rate_rule_rolls_back_within_two_ticks_without_a_connection_error() {
    let rules = "evaluation_interval = \"250ms\"\n[[rule]]\nname = \"error-burst\"\nmetric = \"plugvisor_requests_total\"\nlabels = { plugin = \"*\", outcome = \"error\" }\nfunction = \"increase\"\nwindow = \"30s\"\nop = \">\"\nthreshold = 3\naction = \"rollback\"\ncooldown = \"10s\"\n";
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        trial: "1s",
        thresholds: Some(rules.into()),
        env: vec![("PLUGVISOR_FIXTURE_FAIL_AFTER".into(), "2".into())],
        ..Default::default()
    });
    wait_until(
        Instant::now() + Duration::from_secs(10),
        "1.0.0 known-good",
        || plugin_status(&d)["state"] == "known-good",
    );
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    let bad = bad_build(
        "plugvisor-fixture-fail-after",
        "fixture_fail_after",
        "2.0.0",
    );
    install_package(
        &d.plugins_dir,
        "echo",
        "2.0.0",
        &bad,
        &PackageTweaks::default(),
    );
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "no rollback; saw {seen:?}");
        let r = client.call("x").expect("the connection never breaks");
        let tag = if r.starts_with("ERR") {
            "ERR".to_owned()
        } else {
            echo_version(&r).unwrap_or("?").to_owned()
        };
        if seen.last() != Some(&tag) {
            seen.push(tag.clone());
        }
        if tag == "1.0.0" && seen.contains(&"ERR".to_owned()) {
            break;
        }
    }
    assert_eq!(
        seen,
        ["1.0.0", "2.0.0", "ERR", "1.0.0"],
        "known-good, the bad version, its failures, known-good again"
    );
    let rule = d.status()["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "error-burst")
        .unwrap()
        .clone();
    let (breach, acted) = (
        rule["breach_tick"].as_u64().unwrap(),
        rule["acted_tick"].as_u64().unwrap(),
    );
    assert!(
        acted - breach <= 2,
        "acted at tick {acted}, breach at tick {breach}"
    );
    let m = d.metrics();
    assert_eq!(
        m.get(
            "plugvisor_rollbacks_total",
            &[("plugin", "echo"), ("reason", "error-burst")]
        ),
        Some(1.0)
    );
    let j = d.journal();
    let rb = j.iter().rev().find(|e| e["event"] == "rollback").unwrap();
    assert_eq!(rb["rule"], "error-burst");
    assert_eq!(rb["threshold"], 3.0);
    assert!(rb["observed"].as_f64().unwrap() > 3.0);
    assert_eq!(
        (rb["from_version"].as_str(), rb["version"].as_str()),
        (Some("2.0.0"), Some("1.0.0"))
    );
    let p = plugin_status(&d);
    assert_eq!(p["last_action"]["reason"], "error-burst");
    // A rollback does not clear by itself: 2.0.0 stays out.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(serving(&d).as_deref(), Some("1.0.0"));
}

/// A daemon serving plugin `svc` (the `named` fixture: no degrade hook of
/// its own) on a TCP and a gRPC listener, with a rule that degrades it while
/// the health check of a dependency on `dep_port` reads down.
fn hookless_daemon(dep_port: u16, extra: &str) -> Daemon {
    Daemon::start(DaemonOptions {
        probes: "off",
        listeners: vec![
            ListenerSpec::tcp("svc-tcp", "svc"),
            ListenerSpec::grpc("svc-grpc", "svc"),
        ],
        packages: vec![(
            "svc".into(),
            build_named_plugin("svc", "1.0.0"),
            "1.0.0".into(),
        )],
        thresholds: Some(
            "evaluation_interval = \"250ms\"\n[[rule]]\nname = \"dep-down\"\nmetric = \"plugvisor_health_check_up\"\nlabels = { check = \"dep\" }\nop = \"<\"\nthreshold = 1\nplugin = \"svc\"\naction = \"degrade\"\ncooldown = \"0s\"\n"
                .into(),
        ),
        extra_config: format!(
            "[[health_check]]\nname = \"dep\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:{dep_port}\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfailures_before_down = 1\nplugin = \"svc\"\n{extra}"
        ),
        ..Default::default()
    })
}

fn degraded(d: &Daemon, plugin: &str) -> Option<f64> {
    d.metrics().get("plugvisor_degraded", &[("plugin", plugin)])
}

fn svc_call(addr: std::net::SocketAddr, frame: &str) -> String {
    LineClient::connect(addr).unwrap().call(frame).unwrap()
}

/// The degrade steps past a plugin's own hook, for a plugin without one:
/// with a `[fallback]` version mapped, the slot serves it until the rule
/// clears; with none, both listener kinds refuse new connections with a
/// reason while connections already open are served on.
#[test]
fn degrade_without_a_hook_falls_back_then_sheds() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dep = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dep_port = dep.local_addr().unwrap().port();
    let deadline = || Instant::now() + Duration::from_secs(10);

    // The fallback step: 1.0.0 stays mapped when 1.1.0 arrives.
    let mut d = hookless_daemon(dep_port, "[fallback]\nsvc = \"1.0.0\"\n");
    let tcp = d.addr("svc-tcp");
    install_package(
        &d.plugins_dir,
        "svc",
        "1.1.0",
        &build_named_plugin("svc", "1.1.0"),
        &PackageTweaks::default(),
    );
    wait_until(deadline(), "1.1.0 serves", || {
        svc_call(tcp, "x") == "[svc 1.1.0] x"
    });
    drop(dep);
    wait_until(deadline(), "degraded", || degraded(&d, "svc") == Some(1.0));
    assert_eq!(svc_call(tcp, "x"), "[svc 1.0.0] x", "the fallback serves");
    let status = d.status();
    let svc = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plugin"] == "svc")
        .unwrap();
    assert_eq!(svc["degraded"], "fallback", "{svc}");
    let dep = std::net::TcpListener::bind(("127.0.0.1", dep_port)).unwrap();
    wait_until(deadline(), "degrade cleared", || {
        degraded(&d, "svc") == Some(0.0)
    });
    assert_eq!(svc_call(tcp, "x"), "[svc 1.1.0] x", "back on 1.1.0");
    assert_eq!(d.stop(), Some(0));

    // The shed step: no fallback configured.
    let mut d = hookless_daemon(dep_port, "");
    let tcp = d.addr("svc-tcp");
    let grpc = d.addr("svc-grpc");
    let mut open_tcp = LineClient::connect(tcp).unwrap();
    let invoke = |client: &mut PluginClient<tonic::transport::Channel>| {
        rt.block_on(client.invoke(pb::Request {
            payload: b"g".to_vec(),
        }))
        .map(|r| r.into_inner().payload)
        .map_err(Box::new)
    };
    let mut open_grpc = PluginClient::new(rt.block_on(grpc_channel(grpc)).unwrap());
    assert_eq!(invoke(&mut open_grpc).unwrap(), b"[svc 1.0.0] g");
    drop(dep);
    wait_until(deadline(), "degraded", || degraded(&d, "svc") == Some(1.0));

    let refused = svc_call(tcp, "x");
    assert!(
        refused.starts_with("ERR") && refused.contains("degraded and shedding load"),
        "a new TCP connection is told why: {refused}"
    );
    let mut new_grpc = PluginClient::new(rt.block_on(grpc_channel(grpc)).unwrap());
    let status = invoke(&mut new_grpc).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("svc is degraded and shedding load"),
        "a new gRPC connection is told why: {status:?}"
    );
    assert_eq!(
        open_tcp.call("still").unwrap(),
        "[svc 1.0.0] still",
        "an open TCP connection is served on"
    );
    assert_eq!(
        invoke(&mut open_grpc).unwrap(),
        b"[svc 1.0.0] g",
        "an open gRPC connection is served on"
    );
    let m = d.metrics();
    assert_eq!(
        m.get(
            "plugvisor_degradations_total",
            &[("plugin", "svc"), ("reason", "dep-down")]
        ),
        Some(1.0)
    );
    let shed = d
        .journal()
        .into_iter()
        .filter(|e| e["event"] == "degrade" && e["reason"] == "dep-down (step: shed)")
        .count();
    assert_eq!(shed, 1, "the journal names the step");

    // Once the dependency is back, the connection accepted while shedding
    // is served again: a channel keeps its connection for life.
    let _dep = std::net::TcpListener::bind(("127.0.0.1", dep_port)).unwrap();
    wait_until(deadline(), "degrade cleared", || {
        degraded(&d, "svc") == Some(0.0)
    });
    assert_eq!(invoke(&mut new_grpc).unwrap(), b"[svc 1.0.0] g");
    assert_eq!(svc_call(tcp, "x"), "[svc 1.0.0] x");
    assert_eq!(d.stop(), Some(0));
}
