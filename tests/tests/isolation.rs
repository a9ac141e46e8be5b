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

/// A daemon running echo in plugin hosts, with a TCP and a gRPC listener
/// and `packages` installed before it starts; its probes must attach (the
/// kernel's word on each crash is part of what is judged).
fn process_daemon(
    trial: &'static str,
    packages: Vec<(String, std::path::PathBuf, String)>,
) -> Daemon {
    configured_daemon(trial, packages, "", None)
}

/// [`process_daemon`] with more lines in `[plugin.echo]` and a
/// `request_timeout` on the TCP listener.
fn configured_daemon(
    trial: &'static str,
    packages: Vec<(String, std::path::PathBuf, String)>,
    plugin_lines: &str,
    tcp_timeout: Option<&'static str>,
) -> Daemon {
    let tcp = ListenerSpec::tcp("echo-tcp", "echo");
    Daemon::start(DaemonOptions {
        probes: "on",
        trial,
        listeners: vec![
            match tcp_timeout {
                Some(t) => tcp.request_timeout(t),
                None => tcp,
            },
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        packages,
        extra_config: format!("[plugin.echo]\nisolation = \"process\"\n{plugin_lines}"),
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

/// RSTs the kernel saw plugvisor send on each listener, to compare across
/// a crash (the tests' own short-lived probing connections may end so).
fn resets_sent(d: &Daemon) -> [u64; 2] {
    let m = d.metrics();
    ["echo-tcp", "echo-grpc"].map(|listener| {
        m.get(
            "plugvisor_tcp_resets_total",
            &[("listener", listener), ("direction", "sent")],
        )
        .expect("the reset counter is exported from the start") as u64
    })
}

/// The kernel's word on `crashes` crashes of echo's hosts, while the live
/// clients (and `own` connections of the test's) are still connected: it
/// saw each death and the first answer after it (the recovery histogram's
/// count), no connection of either listener left ESTABLISHED between the
/// two, plugvisor reset none since `resets_before` (taken with the clients
/// connected, before the first crash), and every TCP client is still
/// established.
fn the_kernel_saw_every_connection_survive(
    d: &Daemon,
    crashes: u64,
    own: usize,
    resets_before: [u64; 2],
) {
    let m = || d.metrics();
    wait_until(deadline(), "the kernel timed each recovery", || {
        m().get(
            "plugvisor_kernel_crash_recovery_seconds_count",
            &[("plugin", "echo")],
        ) == Some(crashes as f64)
    });
    assert_eq!(
        resets_sent(d),
        resets_before,
        "the kernel saw plugvisor reset a connection across the crash"
    );
    let m = m();
    for listener in ["echo-tcp", "echo-grpc"] {
        assert_eq!(
            m.get(
                "plugvisor_crash_broken_connections_total",
                &[("listener", listener)]
            ),
            Some(0.0),
            "{listener}: the kernel saw a connection close across a crash"
        );
    }
    assert_eq!(
        m.get("plugvisor_tcp_connections", &[("listener", "echo-tcp")]),
        Some((TCP_CLIENTS + own) as f64),
        "every TCP client still established, in the kernel's count"
    );
    eprintln!(
        "kernel: {crashes} crash(es), exit → first answer {:.2} ms in all",
        m.get(
            "plugvisor_kernel_crash_recovery_seconds_sum",
            &[("plugin", "echo")]
        )
        .unwrap_or(f64::NAN)
            * 1e3
    );
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
    assert_eq!(d.plugin_hosts().len(), 1, "1.0.0 runs in a host of its own");
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
    let resets = resets_sent(&d);
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
    the_kernel_saw_every_connection_survive(&d, 1, 1, resets);
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
    let first_host = d.plugin_hosts();
    assert_eq!(first_host.len(), 1);
    // The daemon was given `--log-format json` on its command line; its
    // hosts log the same way.
    let environ = std::fs::read(format!("/proc/{}/environ", first_host[0])).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|e| e == b"PLUGVISOR_LOG_FORMAT=json"),
        "the host inherits the daemon's log format"
    );
    let resets = resets_sent(&d);

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
    let second_host = d.plugin_hosts();
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
    the_kernel_saw_every_connection_survive(&d, 2, 1, resets);
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

/// One row of the fault matrix: a known-good version (the `segv` fixture
/// as 1.0.0) under 20 live TCP clients and 4 `Exchange` streams is sent
/// `payload` on a connection of its own. Its host dies of it; the answer
/// names `cause`; a new host serves 1.0.0 on the same connection; the
/// death is counted as `reason` and journaled; no client connection or
/// stream closed, and only requests in flight on the dead host failed.
fn fault_row(
    payload: &str,
    answer_has: &str,
    reason: &str,
    plugin_lines: &str,
    tcp_timeout: Option<&'static str>,
) -> Daemon {
    let segv = build_plugin_version("plugvisor-fixture-segv", "fixture_segv", "1.0.0");
    let mut d = configured_daemon(
        "1s",
        vec![("echo".into(), segv, "1.0.0".into())],
        plugin_lines,
        tcp_timeout,
    );
    let pid = d.pid();
    wait_until(deadline(), "1.0.0 known-good", || {
        d.status()["plugins"][0]["state"] == "known-good"
    });
    let live = live(&d);
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    let before = d.plugin_hosts();
    assert_eq!(before.len(), 1);
    let resets = resets_sent(&d);
    let answer = client
        .call(payload)
        .expect("the connection outlives the host");
    assert!(
        answer.starts_with("ERR ") && answer.contains(answer_has),
        "{payload}: {answer}"
    );
    wait_until(deadline(), "a new host serves 1.0.0", || {
        restarts(&d, reason) == 1
            && client
                .call("again")
                .is_ok_and(|a| a == "[echo 1.0.0] again")
    });
    assert_ne!(d.plugin_hosts(), before, "{payload}: a new host process");
    the_kernel_saw_every_connection_survive(&d, 1, 1, resets);
    std::thread::sleep(Duration::from_millis(300));
    let tally = live.stop();
    d.assert_running();
    assert_eq!(d.pid(), pid, "the daemon itself never went down");
    let lost = only_in_flight_requests_failed(&tally, 1);
    assert_eq!(tally.versions, BTreeSet::from(["1.0.0".to_owned()]));
    eprintln!(
        "{payload}: {} frames answered by live clients, {lost} lost in flight",
        tally.frames
    );
    let j = d.journal();
    let crash = j
        .iter()
        .find(|e| e["event"] == "host-crashed")
        .expect("journaled");
    assert_eq!(crash["version"], "1.0.0");
    assert!(j.iter().any(|e| e["event"] == "host-restarted"), "{j:#?}");
    assert!(d.status()["plugins"][0]["state"] == "known-good");
    assert_state_consistent(&d.state_dir);
    d
}

#[test]
fn fault_matrix_abort_in_handle() {
    fault_row("abort", "crashed (SIGABRT)", "abort", "", None);
}

/// Rust's guard-page handler reports a stack overflow and aborts.
#[test]
fn fault_matrix_stack_overflow_in_handle() {
    fault_row("overflow", "crashed (SIGABRT)", "abort", "", None);
}

#[test]
fn fault_matrix_exit_from_handle() {
    fault_row("exit", "crashed (exit status 3)", "exit", "", None);
}

/// A leak past `memory_max`: the kernel's OOM killer ends the host (its
/// cgroup's own count says so), not the daemon. Before it, the host's
/// memory, CPU and threads are exported from the kernel's accounting.
#[test]
fn fault_matrix_leak_past_memory_max() {
    let d = fault_row(
        "leak",
        "crashed (killed by the kernel: out of memory",
        "oom",
        "memory_max = \"64MiB\"\npids_max = 64\n",
        None,
    );
    let m = d.metrics();
    let labels = [("plugin", "echo"), ("version", "1.0.0")];
    let memory = m.get("plugvisor_plugin_memory_bytes", &labels).unwrap();
    assert!(
        memory > 0.0 && memory < 64.0 * 1024.0 * 1024.0,
        "the new host's memory, within its limit: {memory}"
    );
    assert!(m.get("plugvisor_plugin_threads", &labels).unwrap() >= 1.0);
    assert!(
        m.get("plugvisor_plugin_cpu_seconds_total", &labels)
            .unwrap()
            > 0.0,
        "the leak itself burned CPU, and the counter kept it across the restart"
    );
    let limits = m
        .matching("plugvisor_plugin_isolation", &[("plugin", "echo")])
        .next()
        .map(|(l, _)| l["limits"].clone());
    assert!(
        matches!(limits.as_deref(), Some("cgroup1" | "cgroup2")),
        "this node has a memory cgroup: {limits:?}"
    );
}

/// A call that hangs past its `request_timeout` and as long again: the
/// host is killed and replaced, which frees the stuck thread and mapping.
#[test]
fn fault_matrix_hang_past_the_bound() {
    let d = fault_row("hang", "did not answer within", "hang", "", Some("500ms"));
    assert_eq!(
        d.metrics().get(
            "plugvisor_plugin_calls_stuck",
            &[("plugin", "echo"), ("call", "handle")]
        ),
        Some(0.0),
        "the stuck call went with its host"
    );
}

/// A host's call that never returns does not keep the host alive past its
/// daemon: killed with -9 (no chance to clean up), the daemon's end of the
/// channel closes, and the host, its call still stuck in the plugin,
/// exits.
#[test]
fn a_host_with_a_call_stuck_exits_when_the_daemon_is_killed() {
    use std::io::Write as _;
    let segv = build_plugin_version("plugvisor-fixture-segv", "fixture_segv", "1.0.0");
    let mut d = process_daemon("30s", vec![("echo".into(), segv, "1.0.0".into())]);
    let hosts = d.plugin_hosts();
    assert_eq!(hosts.len(), 1);
    let mut stuck = std::net::TcpStream::connect(d.addr("echo-tcp")).unwrap();
    stuck.write_all(b"hang\n").unwrap();
    wait_until(deadline(), "the call runs in the host", || {
        thread_count(hosts[0]) >= 3
    });
    d.signal(libc::SIGKILL);
    d.wait_exit(ACT_TIMEOUT);
    wait_until(deadline(), "the orphaned host exits", || exited(hosts[0]));
}

/// Threads of process `pid` now (0 once it is gone).
fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count)
}

/// Whether `pid` has exited: gone, or a zombie its new parent has not
/// reaped (PID 1 of a container may not).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// What a plugin host cannot do, tried for real by the `hostile`
/// fixture: the kernel refuses it the admin socket, `state_dir` and
/// `bpf()`; it is not root. The same library in-process (in this root
/// daemon) is allowed all of it — which is what `process` takes away.
#[test]
fn a_plugin_host_is_refused_the_admin_socket_state_dir_and_bpf() {
    // SAFETY: plain query.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the daemon under test runs as root, as in production"
    );
    let hostile = build_plugin_version("plugvisor-fixture-hostile", "fixture_hostile", "1.0.0");
    let tries = |d: &Daemon| {
        let mut c = LineClient::connect(d.addr("echo-tcp")).unwrap();
        let admin = d.dir.path().join("admin.sock");
        [
            c.call("whoami").unwrap(),
            c.call(&format!("connect {}", admin.display())).unwrap(),
            c.call(&format!("write {}", d.state_dir.display())).unwrap(),
            c.call("bpf").unwrap(),
        ]
    };
    let planted = |d: &Daemon| d.state_dir.join("planted-by-a-plugin").exists();

    let d = process_daemon(
        "30s",
        vec![("echo".into(), hostile.clone(), "1.0.0".into())],
    );
    let [who, admin, write, bpf] = tries(&d);
    assert_ne!(who, "uid=0", "a host is not root");
    for (what, said) in [
        ("admin socket", &admin),
        ("state_dir", &write),
        ("bpf()", &bpf),
    ] {
        assert!(said.starts_with("refused: "), "{what}: {said}");
    }
    assert!(bpf.contains("Operation not permitted"), "{bpf}");
    assert!(!planted(&d));
    eprintln!("in a host: {who}; admin socket {admin}; state_dir {write}; bpf {bpf}");
    drop(d);

    let d = Daemon::start(DaemonOptions {
        probes: "off",
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        packages: vec![("echo".into(), hostile, "1.0.0".into())],
        ..Default::default()
    });
    let [who, admin, write, bpf] = tries(&d);
    assert_eq!(
        [who.as_str(), admin.as_str(), write.as_str(), bpf.as_str()],
        ["uid=0", "allowed", "allowed", "allowed"],
        "in-process the same plugin can do all of it"
    );
    assert!(planted(&d));
}

/// A rule on a plugin host's own memory — the kernel's count for that
/// host alone, which an in-process plugin cannot have — rolls back a
/// version on trial that leaks, while the known-good version's host, its
/// own series beside it, stays warm and takes over.
#[test]
fn a_leak_rule_on_the_hosts_own_memory_rolls_the_leaking_version_back() {
    let rule = r#"evaluation_interval = "250ms"

[[rule]]
name = "host-leak"
metric = "plugvisor_plugin_memory_bytes"
labels = { plugin = "echo", version = "2.0.0" }
op = ">"
threshold = "48MiB"
action = "rollback"
"#;
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        trial: "3s",
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        packages: vec![("echo".into(), build_echo_version("1.0.0"), "1.0.0".into())],
        thresholds: Some(rule.into()),
        extra_config: "[plugin.echo]\nisolation = \"process\"\nmemory_max = \"256MiB\"\n".into(),
        ..Default::default()
    });
    let pid = d.pid();
    wait_until(deadline(), "1.0.0 known-good", || {
        d.status()["plugins"][0]["state"] == "known-good"
    });
    // The leak fixture is named echo: a bad build of it.
    let leak = build_plugin_version("plugvisor-fixture-leak", "fixture_leak", "2.0.0");
    install_package(
        &d.plugins_dir,
        "echo",
        "2.0.0",
        &leak,
        &PackageTweaks::default(),
    );
    wait_until(deadline(), "2.0.0 on trial", || {
        d.serving("echo-tcp").as_deref() == Some("2.0.0")
    });
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    let labels = [("plugin", "echo"), ("version", "2.0.0")];
    let before = d
        .metrics()
        .get("plugvisor_plugin_memory_bytes", &labels)
        .unwrap();
    let mut sent = 0;
    while d.serving("echo-tcp").as_deref() == Some("2.0.0") && sent < 200 {
        let a = client
            .call("x")
            .expect("the connection stays open throughout");
        assert!(a.ends_with(" x"), "{a}");
        // Two leaking requests a round: this one, and `serving`'s probe.
        sent += 2;
        // A leak, not a burst: the rule sees it grow (it runs every 250 ms).
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_until(deadline(), "rolled back to 1.0.0", || {
        d.serving("echo-tcp").as_deref() == Some("1.0.0")
    });
    assert_eq!(
        client.call("after").unwrap(),
        "[echo 1.0.0] after",
        "same connection"
    );
    assert_eq!(d.pid(), pid);
    // The swap is what serves; the journal line is written just after it.
    let mut rb = serde_json::Value::Null;
    wait_until(deadline(), "the rollback journaled", || {
        match d
            .journal()
            .into_iter()
            .rev()
            .find(|e| e["event"] == "rollback")
        {
            Some(e) => {
                rb = e;
                true
            }
            None => false,
        }
    });
    assert_eq!(rb["reason"], "host-leak");
    eprintln!(
        "2.0.0's host: {:.1} MiB before, rolled back after {sent} leaking requests",
        before / 1_048_576.0
    );
    assert!(
        sent >= 40,
        "the rule fired on the leak, not on the host's start ({sent} requests)"
    );
    assert_state_consistent(&d.state_dir);
}
