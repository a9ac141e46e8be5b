//! plugvisor replacing itself (`plugvisor upgrade`), as an operator sees
//! it: under live TCP clients, a connect storm and gRPC streams, no connect
//! is refused, no raw TCP connection closes (each moves to the new process
//! with what it had half sent), gRPC streams end only with a status a
//! client retries on, and the command's exit code says whether the new
//! process serves. A new binary that refuses the config or dies at start
//! leaves the old one serving. Socket activation with Debian's
//! `systemd-socket-activate` (PID 1 here is not systemd).
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plugvisor_tests::live::{Live, LiveOptions};
use plugvisor_tests::pb::Request;
use plugvisor_tests::pb::plugin_client::PluginClient;
use plugvisor_tests::state_check::assert_state_consistent;
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, become_subreaper, binary,
    build_plugin_version, echo_version, grpc_channel, parent_and_state, plugin_hosts_of_store,
    require_root, wait_until,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Upgrades in a row under load.
const UPGRADES: usize = 3;
/// Persistent raw TCP clients.
const TCP_CLIENTS: usize = 8;
/// How long an old process may take to drain its gRPC connections and exit.
const OLD_EXITS_WITHIN: Duration = Duration::from_secs(20);

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

fn daemon() -> Daemon {
    become_subreaper();
    Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        drain_timeout: Some("5s"),
        ..Default::default()
    })
}

/// New connections, one frame each, until stopped: counts answered ones
/// and every failure (a refused connect above all).
struct Storm {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Storm {
    fn start(addr: SocketAddr) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (halt, count, failed) = (stop.clone(), answered.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            let mut frame = 0u64;
            while !halt.load(Ordering::Relaxed) {
                frame += 1;
                let sent = format!("storm{frame}");
                match LineClient::connect(addr).and_then(|mut c| c.call(&sent)) {
                    Ok(resp) if resp.ends_with(&format!("] {sent}")) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(resp) => failed
                        .lock()
                        .unwrap()
                        .push(format!("answer {resp:?} to {sent}")),
                    Err(e) => failed.lock().unwrap().push(format!("{sent}: {e}")),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Storm {
            stop,
            answered,
            failures,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (
            self.answered.load(Ordering::Relaxed),
            std::mem::take(&mut *self.failures.lock().unwrap()),
        )
    }
}

/// What one `Exchange` stream saw: answers, then how it ended.
async fn exchange_until_it_ends(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (u64, Option<tonic::Status>) {
    let channel = grpc_channel(addr).await.unwrap();
    let (tx, rx) = mpsc::channel::<Request>(1);
    let mut inbound = PluginClient::new(channel)
        .exchange(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut answered = 0;
    while !stop.load(Ordering::Relaxed) {
        let sent = format!("x{answered}");
        if tx
            .send(Request {
                payload: sent.clone().into_bytes(),
            })
            .await
            .is_err()
        {
            // The call is over; its status says how.
            return match inbound.message().await {
                Err(status) => (answered, Some(status)),
                Ok(_) => (answered, None),
            };
        }
        let message = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("an answer on the Exchange stream within 10 s");
        match message {
            Ok(Some(r)) => {
                assert!(r.error.is_empty(), "error answer {:?}", r.error);
                answered += 1;
            }
            Ok(None) => return (answered, None),
            Err(status) => return (answered, Some(status)),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (answered, None)
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one black-box scenario that reads top to bottom"
)]
fn upgrades_under_load_refuse_no_connect_and_move_every_raw_tcp_connection() {
    let mut d = daemon();
    let tcp = d.addr("echo-tcp");
    let grpc = d.addr("echo-grpc");
    let live = Live::start(&LiveOptions {
        tcp: vec![tcp; TCP_CLIENTS],
        grpc: Vec::new(),
        pause: Duration::from_millis(2),
    });
    let storm = Storm::start(tcp);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut moved_total = 0;
    for round in 0..UPGRADES {
        // A client that sent half a frame before the upgrade finishes it
        // after: the half travels with the connection.
        let mut half = TcpStream::connect(tcp).unwrap();
        half.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        half.write_all(b"first ").unwrap();
        // And two whole frames in one write, pipelined.
        let mut piped = LineClient::connect(tcp).unwrap();
        assert!(echo_version(&piped.call("warm").unwrap()).is_some());

        let stop_stream = Arc::new(AtomicBool::new(false));
        let stream = rt.spawn(exchange_until_it_ends(grpc, stop_stream.clone()));
        // The stream is flowing before the upgrade starts.
        std::thread::sleep(Duration::from_millis(200));
        let old = d.pid();
        let (code, answer) = d.upgrade(None, OLD_EXITS_WITHIN);
        assert_eq!(code, 0, "round {round}: {answer:#}");
        let result = &answer["result"];
        assert_eq!(result["old_pid"].as_u64(), Some(u64::from(old)));
        let moved = result["connections_moved"]["echo-tcp"]
            .as_u64()
            .unwrap_or(0);
        // The live clients, the half-sent frame and the pipelining client
        // at least (storm connections in flight may add to it).
        assert!(
            moved >= TCP_CLIENTS as u64 + 2,
            "round {round}: {moved} raw TCP connections moved: {answer:#}"
        );
        moved_total += moved;
        assert_ne!(d.pid(), old);

        half.write_all(b"second\n").unwrap();
        let mut line = String::new();
        BufReader::new(&half).read_line(&mut line).unwrap();
        assert!(
            line.trim_end().ends_with("] first second"),
            "the half-sent frame after the upgrade: {line:?}"
        );
        piped
            .stream()
            .try_clone()
            .unwrap()
            .write_all(b"p1\np2\n")
            .unwrap();
        assert!(piped.read_line().unwrap().ends_with("] p1"));
        assert!(piped.read_line().unwrap().ends_with("] p2"));

        // The gRPC stream of the old process ended with a status a client
        // retries on; a new one goes to the new process.
        let (answered, ended) = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), stream)
                .await
                .expect("the old process ends its Exchange stream within its drain")
                .unwrap()
        });
        assert!(answered > 0, "the stream never flowed");
        let status = ended.expect("the old process's stream ends with a status");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        stop_stream.store(true, Ordering::Relaxed);
        let again = Arc::new(AtomicBool::new(false));
        let fresh = rt.spawn(exchange_until_it_ends(grpc, again.clone()));
        std::thread::sleep(Duration::from_millis(200));
        again.store(true, Ordering::Relaxed);
        let (fresh_answers, fresh_end) = rt.block_on(fresh).unwrap();
        assert!(fresh_answers > 0 && fresh_end.is_none(), "{fresh_end:?}");

        // The new process counts what it took over, and the kernel saw no
        // raw TCP connection closed or reset across the upgrade.
        wait_until(
            deadline(),
            "the new process closes its upgrade window",
            || {
                d.log_text()
                    .matches("upgrade over: the old process is gone")
                    .count()
                    > round
            },
        );
        let m = d.metrics();
        assert_eq!(
            m.get(
                "plugvisor_upgrade_broken_connections_total",
                &[("listener", "echo-tcp"), ("protocol", "tcp")]
            ),
            Some(0.0),
            "round {round}"
        );
        assert_eq!(
            m.get(
                "plugvisor_connections_handed_over_total",
                &[("listener", "echo-tcp")]
            ),
            Some(moved as f64)
        );
        assert_eq!(
            m.get("plugvisor_upgrades_total", &[("outcome", "success")]),
            Some(1.0)
        );
    }
    // The live clients answered on after the last upgrade, on the same
    // connections: not one error, not one reconnect.
    let before = live.take();
    wait_until(
        deadline(),
        "live clients answer after the last upgrade",
        || live.take().frames > 0,
    );
    let after = live.stop();
    for t in [&before, &after] {
        assert!(t.errors.is_empty(), "live TCP clients: {:?}", t.errors);
    }
    let (storm_answered, storm_failures) = storm.stop();
    assert!(storm_answered > 0);
    assert!(
        storm_failures.is_empty(),
        "new connections during {UPGRADES} upgrades: {} failed, e.g. {:?}",
        storm_failures.len(),
        &storm_failures[..storm_failures.len().min(5)]
    );
    eprintln!(
        "{UPGRADES} upgrades: {moved_total} raw TCP connections moved, {storm_answered} new connections answered, 0 refused"
    );
    assert_eq!(d.stop(), Some(0));
}

/// A shell script standing in for a new binary.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The old process after a failed upgrade: same pid, the same connection
/// still answered, the failure counted.
fn serves_on(d: &mut Daemon, old: u32, client: &mut LineClient, outcome: &str) {
    d.assert_running();
    assert_eq!(d.pid(), old);
    assert!(echo_version(&client.call("still here").unwrap()).is_some());
    assert!(
        echo_version(
            &LineClient::connect(d.addr("echo-tcp"))
                .unwrap()
                .call("new")
                .unwrap()
        )
        .is_some()
    );
    assert_eq!(
        d.metrics()
            .get("plugvisor_upgrades_total", &[("outcome", outcome)]),
        Some(1.0)
    );
}

#[test]
fn a_binary_that_refuses_the_config_is_never_started() {
    let mut d = daemon();
    let old = d.pid();
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    let bad = script(
        d.dir.path(),
        "refuses",
        "echo 'plugvisor: config: unknown field `frobnicate`' >&2; exit 1",
    );
    let (code, answer) = d.upgrade(Some(&bad), OLD_EXITS_WITHIN);
    assert_ne!(code, 0);
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("config check failed"), "{error}");
    assert!(error.contains("unknown field `frobnicate`"), "{error}");
    assert!(error.contains("serves on"), "{error}");
    serves_on(&mut d, old, &mut client, "check_failed");
}

#[test]
fn a_binary_that_dies_at_start_leaves_the_old_one_serving() {
    let mut d = daemon();
    let old = d.pid();
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    // Passes the check (the real binary answers it), dies when it runs.
    let real = binary();
    let dies = script(
        d.dir.path(),
        "dies",
        &format!(
            "for a in \"$@\"; do [ \"$a\" = --check ] && exec {} \"$@\"; done\nkill -SEGV $$",
            real.display()
        ),
    );
    let (code, answer) = d.upgrade(Some(&dies), OLD_EXITS_WITHIN);
    assert_ne!(code, 0);
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("before it was ready"), "{error}");
    assert!(error.contains("serves on"), "{error}");
    serves_on(&mut d, old, &mut client, "failed");
    // The trial the upgrade interrupted goes on here, and says so.
    let journal = d.journal();
    let events: Vec<&str> = journal.iter().filter_map(|e| e["event"].as_str()).collect();
    let interrupted = events.iter().rposition(|e| *e == "trial-interrupted");
    let resumed = events.iter().rposition(|e| *e == "trial-resumed");
    assert!(
        interrupted.is_some() && resumed > interrupted,
        "journal events: {events:?}"
    );
}

#[test]
fn socket_activation_serves_the_passed_socket_and_queues_connects_before_start() {
    let tool = "/usr/bin/systemd-socket-activate";
    assert!(
        Path::new(tool).exists(),
        "{tool} is missing (Debian's systemd package; cargo xtask setup installs it)"
    );
    let listener = ListenerSpec::tcp("echo-tcp", "echo");
    let addr = listener.addr();
    // systemd-socket-activate listens first and starts plugvisor on the
    // first connection: the harness's own first connect waits in the
    // backlog while the daemon starts, and is served.
    let d = Daemon::start(DaemonOptions {
        listeners: vec![listener],
        wrapper: vec![
            tool.to_owned(),
            "--listen".to_owned(),
            addr.to_string(),
            "--fdname=echo-tcp".to_owned(),
        ],
        ..Default::default()
    });
    let lines = d.log_lines();
    let bound = lines
        .iter()
        .find(|l| l["fields"]["message"] == "bound listener")
        .expect("a bound listener line");
    assert_eq!(bound["fields"]["inherited"], true, "{bound}");
    assert!(
        lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("socket activation"))),
        "no socket-activation line in the log"
    );
    assert!(echo_version(&LineClient::connect(addr).unwrap().call("hi").unwrap()).is_some());
}

/// A process holding only the config of a running daemon: what a new pod
/// of a rolling update is. Killed on drop.
struct Peer {
    child: std::process::Child,
    log: PathBuf,
}

impl Peer {
    fn start(config: &Path, log: PathBuf) -> Peer {
        let child = std::process::Command::new(binary())
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .env("PLUGVISOR_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Peer { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- new pod's plugvisor log ---\n{}", self.log());
        }
    }
}

#[test]
fn a_new_process_sharing_only_the_upgrade_socket_takes_over() {
    let shared = tempfile::tempdir().unwrap();
    let socket = shared.path().join("upgrade.sock");
    let mut old = Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        drain_timeout: Some("5s"),
        extra_config: format!("[upgrade]\nsocket = \"{}\"\n", socket.display()),
        ..Default::default()
    });
    let tcp = old.addr("echo-tcp");
    wait_until(
        deadline(),
        "the old daemon waits at the upgrade socket",
        || socket.exists(),
    );
    let live = Live::start(&LiveOptions {
        tcp: vec![tcp; 4],
        grpc: Vec::new(),
        pause: Duration::from_millis(2),
    });
    let storm = Storm::start(tcp);
    // The new pod: the same config, started by nobody the old one knows.
    let new = Peer::start(&old.config, shared.path().join("new.log"));
    wait_until(deadline(), "the new process took over", || {
        new.log().contains("every raw TCP connection taken over")
    });
    let m = old.metrics();
    assert_eq!(
        m.get("plugvisor_upgrades_total", &[("outcome", "success")]),
        Some(1.0),
        "/metrics answers from the new process"
    );
    assert!(
        m.get(
            "plugvisor_connections_handed_over_total",
            &[("listener", "echo-tcp")]
        )
        .unwrap_or(0.0)
            >= 4.0
    );
    // The old one hands over, drains, and idles: exiting would have its
    // container restarted.
    wait_until(
        deadline(),
        "the old process idles after the hand-over",
        || old.log_text().contains("idle until SIGTERM"),
    );
    old.assert_running();
    let before = live.take();
    wait_until(
        deadline(),
        "live clients answer through the new process",
        || live.take().frames > 0,
    );
    // The old pod is deleted: its SIGTERM ends it at once, and cleanly.
    assert_eq!(old.stop(), Some(0));
    wait_until(
        deadline(),
        "live clients answer after the old one is gone",
        || live.take().frames > 0,
    );
    let after = live.stop();
    for t in [&before, &after] {
        assert!(t.errors.is_empty(), "live TCP clients: {:?}", t.errors);
    }
    let (answered, failures) = storm.stop();
    assert!(answered > 0);
    assert!(failures.is_empty(), "new connections: {failures:?}");
    // The new one waits at the socket for the next.
    assert!(
        new.log().contains("waiting at the upgrade socket"),
        "{}",
        new.log()
    );
}

#[test]
fn a_kill_9_of_the_old_process_mid_hand_over_leaves_the_new_one_serving() {
    become_subreaper();
    // echo built from the `hang` fixture: `sleep MS` answers late, which
    // holds the hand-over open (a connection moves only at a frame
    // boundary) while the test kills the old process.
    let slow = build_plugin_version("plugvisor-fixture-hang", "fixture_hang", "1.0.0");
    let mut d = Daemon::start(DaemonOptions {
        packages: vec![("echo".into(), slow, "1.0.0".into())],
        drain_timeout: Some("10s"),
        ..Default::default()
    });
    let tcp = d.addr("echo-tcp");
    let old = d.pid();
    let mut idle: Vec<LineClient> = (0..3).map(|_| LineClient::connect(tcp).unwrap()).collect();
    for c in &mut idle {
        assert!(echo_version(&c.call("hello").unwrap()).is_some());
    }
    let mut busy = LineClient::connect(tcp).unwrap();
    busy.stream()
        .try_clone()
        .unwrap()
        .write_all(b"sleep 5000\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let log_from = d.log_text().len();
    let config = d.config.clone();
    let upgrade = std::thread::spawn(move || {
        std::process::Command::new(binary())
            .args(["upgrade", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    });
    wait_until(
        deadline(),
        "the new process serves and the hand-over began",
        || d.log_text()[log_from..].contains("upgrade: the new process serves; handing over"),
    );
    let new_pid: u32 = d
        .log_lines()
        .iter()
        .filter(|l| l["fields"]["message"] == "plugvisor ready")
        .filter_map(|l| l["fields"]["pid"].as_u64())
        .map(|p| u32::try_from(p).unwrap())
        .find(|p| *p != old)
        .expect("the new process said ready");
    // The idle connections moved at once; the busy one waits for its frame.
    wait_until(
        deadline(),
        "the idle connections are in the new process",
        || {
            d.metrics()
                .get(
                    "plugvisor_connections_handed_over_total",
                    &[("listener", "echo-tcp")],
                )
                .unwrap_or(0.0)
                >= 3.0
        },
    );
    d.kill9();
    d.follow(new_pid);
    let out = upgrade.join().unwrap();
    assert!(
        !out.status.success(),
        "upgrade said it succeeded though its daemon was killed: {out:?}"
    );
    // The new process serves on: the moved connections, new ones, the
    // admin socket and /metrics.
    d.assert_running();
    for c in &mut idle {
        assert!(echo_version(&c.call("after").unwrap()).is_some());
    }
    assert!(echo_version(&LineClient::connect(tcp).unwrap().call("new").unwrap()).is_some());
    assert_eq!(d.status()["plugins"][0]["active"], "1.0.0");
    // What the kill cost: the one connection still in the old process (its
    // frame in flight), closed by the kernel with it.
    assert!(
        busy.read_line().is_err(),
        "the connection that was still in the killed process"
    );
    // And the kernel counted it: the control for the 0 the other tests
    // read.
    if require_root("the kernel's count across an upgrade") {
        wait_until(
            deadline(),
            "the new process closes its upgrade window",
            || {
                d.log_text()
                    .contains("upgrade over: the old process is gone")
            },
        );
        // The kernel's counters are final once the window closed; the
        // observer reads them into /metrics on its own tick.
        wait_until(
            deadline(),
            "the kernel counts the connection the kill broke",
            || {
                d.metrics().get(
                    "plugvisor_upgrade_broken_connections_total",
                    &[("listener", "echo-tcp"), ("protocol", "tcp")],
                ) >= Some(1.0)
            },
        );
    }
    assert_state_consistent(&d.state_dir);
    assert_eq!(d.stop(), Some(0));
}

#[test]
fn upgrades_back_to_back_each_answer_before_the_old_process_exits() {
    // Nothing to drain and no probes to detach: the old process exits
    // right after the hand-over, and its answer to `upgrade` must still be
    // written first (it once was lost: the command saw EOF).
    become_subreaper();
    let mut d = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    for round in 0..5 {
        let (code, answer) = d.upgrade(None, OLD_EXITS_WITHIN);
        assert_eq!(code, 0, "round {round}: {answer:#}");
        assert_eq!(answer["result"]["connections_moved"]["echo-tcp"], 1);
        assert!(echo_version(&client.call("still").unwrap()).is_some());
    }
    assert_eq!(d.stop(), Some(0));
}

fn host_restarts(d: &Daemon) -> u64 {
    d.metrics()
        .matching(
            "plugvisor_plugin_host_restarts_total",
            &[("plugin", "echo")],
        )
        .map(|(_, v)| v as u64)
        .sum()
}

/// With `isolation = "process"`, the new process adopts the old one's
/// plugin host — the same process serves on, `init` does not run again —
/// across upgrade after upgrade, under live clients; the host outlives the
/// daemon that started it, and the adopter still sees it die (a pidfd: it
/// is not its child) and starts a new one.
#[test]
fn plugin_hosts_are_adopted_across_upgrades_not_started_again() {
    if !require_root("the kernel's count across host adoption") {
        return;
    }
    become_subreaper();
    let mut d = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        drain_timeout: Some("5s"),
        extra_config: "[plugin.echo]\nisolation = \"process\"\n".into(),
        ..Default::default()
    });
    let tcp = d.addr("echo-tcp");
    let hosts = plugin_hosts_of_store(&d.state_dir);
    assert_eq!(hosts.len(), 1, "one host for echo: {hosts:?}");
    let live = Live::start(&LiveOptions {
        tcp: vec![tcp; TCP_CLIENTS],
        grpc: Vec::new(),
        pause: Duration::from_millis(2),
    });
    let mut client = LineClient::connect(tcp).unwrap();
    for round in 0..3 {
        let old = d.pid();
        let (code, answer) = d.upgrade(None, OLD_EXITS_WITHIN);
        assert_eq!(code, 0, "round {round}: {answer:#}");
        assert_eq!(answer["result"]["hosts"], 1, "{answer:#}");
        assert_eq!(answer["result"]["hosts_adopted"], 1, "{answer:#}");
        // The daemon that started the host is gone; the host is not.
        assert_eq!(
            plugin_hosts_of_store(&d.state_dir),
            hosts,
            "round {round}: the same host process serves"
        );
        let (parent, _) = parent_and_state(hosts[0]).unwrap();
        assert_ne!(
            parent, old,
            "the old daemon exited: the host was re-parented"
        );
        assert!(echo_version(&client.call(&format!("round{round}")).unwrap()).is_some());
        assert!(
            d.log_text().matches("plugin host adopted").count() > round,
            "round {round}: the new process says it adopted the host"
        );
    }
    let traffic = live.stop();
    assert!(traffic.frames > 0);
    assert!(
        traffic.errors.is_empty(),
        "live TCP clients: {:?}",
        traffic.errors
    );
    assert_eq!(host_restarts(&d), 0, "no host was restarted");
    let m = d.metrics();
    assert_eq!(
        m.get(
            "plugvisor_upgrade_broken_connections_total",
            &[("listener", "echo-tcp"), ("protocol", "tcp")]
        ),
        Some(0.0)
    );

    // The adopted host dies: the daemon that adopted it sees that without
    // being its parent, and a new host serves.
    // SAFETY: kill(2) on the host this test found.
    unsafe { libc::kill(hosts[0] as i32, libc::SIGKILL) };
    wait_until(deadline(), "the adopter restarts the host", || {
        host_restarts(&d) >= 1
    });
    wait_until(deadline(), "a new host serves", || {
        let now = plugin_hosts_of_store(&d.state_dir);
        now.len() == 1 && now != hosts
    });
    let mut fresh = LineClient::connect(tcp).unwrap();
    assert!(echo_version(&fresh.call("after").unwrap()).is_some());
    d.assert_running();
    assert_eq!(d.stop(), Some(0));
    wait_until(deadline(), "no host outlives the daemon", || {
        plugin_hosts_of_store(&d.state_dir).is_empty()
    });
}

/// A new process whose config holds the plugin to other limits does not
/// adopt the old host (it would run under the old limits): it starts its
/// own, and the old host ends with the old daemon.
#[test]
fn a_host_under_other_limits_is_started_anew_and_the_old_one_ends() {
    become_subreaper();
    let mut d = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        drain_timeout: Some("5s"),
        extra_config: "[plugin.echo]\nisolation = \"process\"\nmemory_max = \"256MiB\"\n".into(),
        ..Default::default()
    });
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    let before = plugin_hosts_of_store(&d.state_dir);
    assert_eq!(before.len(), 1);
    let config = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        config.replace("memory_max = \"256MiB\"", "memory_max = \"384MiB\""),
    )
    .unwrap();
    let (code, answer) = d.upgrade(None, OLD_EXITS_WITHIN);
    assert_eq!(code, 0, "{answer:#}");
    assert_eq!(answer["result"]["hosts"], 1, "{answer:#}");
    assert_eq!(answer["result"]["hosts_adopted"], 0, "{answer:#}");
    assert!(echo_version(&client.call("moved").unwrap()).is_some());
    wait_until(deadline(), "the old host ends with the old daemon", || {
        let now = plugin_hosts_of_store(&d.state_dir);
        now.len() == 1 && now != before
    });
    assert!(
        d.log_text()
            .contains("not adopting the old daemon's plugin host"),
        "the new process says why it did not adopt"
    );
    assert_eq!(host_restarts(&d), 0);
    assert_eq!(d.stop(), Some(0));
}
