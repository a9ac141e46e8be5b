//! The tests that run the real `plugvisor` binary: real loopback TCP
//! traffic, a real reload, what the kernel saw of both in `/metrics`.
//!
//! One daemon serves them all, started with the harness the black-box
//! tests use (`plugvisor_tests::Daemon`), on echo version 1 of a series
//! rewritten from one stamped build ([`StampedLibrary`]): `uprobe-markers`
//! reloads it to version 2 with no traffic, `hot-swap` to version 3 under
//! live connections.
#![expect(
    clippy::float_cmp,
    reason = "metric values are integer counts carried in f64; exact comparison is the point"
)]
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plugvisor_probes_common::Probe;
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, PackageTweaks, StampedLibrary, TrustOptions,
    echo_version, install_package, wait_until,
};

use crate::Setup;
use crate::probe_checks::ProbeCheck;
use crate::report::{Outcome, Reporter};

/// The listener every test talks to.
const LISTENER: &str = "echo-tcp";
/// The plugin behind it.
const PLUGIN: &str = "echo";
/// Bound on every wait. Generous: under TCG a guest runs tens of times
/// slower than the host (a whole run takes 5–23 s there), and other work
/// may share the machine's cores.
const WAIT: Duration = Duration::from_secs(60);
/// Persistent connections through the hot swap.
const CLIENTS: usize = 4;
/// The tests after `probe/*`, in order.
const TESTS: [&str; 6] = [
    "daemon",
    "degrade",
    "tcp-states",
    "tcp-reset",
    "uprobe-markers",
    "hot-swap",
];

/// Runs the daemon tests.
pub fn run(rep: &mut Reporter, setup: &Setup, checks: Option<&[ProbeCheck]>) {
    let versions = match Versions::make(setup) {
        Ok(v) => v,
        Err(e) => {
            for t in TESTS.iter().chain(&["host-crash"]) {
                rep.run(t, || {
                    Outcome::Fail(format!("no echo versions to install: {e}"))
                });
            }
            return;
        }
    };
    let failed_before = rep.failed();
    let mut daemon: Option<Daemon> = None;
    rep.run("daemon", || {
        let d = start_daemon(&versions);
        let v = serving_version(&d);
        let outcome = if v.as_deref() == Some(versions.name(0)) {
            Outcome::Pass(format!(
                "plugvisor serves {PLUGIN} {} on {}",
                versions.name(0),
                d.addr(LISTENER)
            ))
        } else {
            Outcome::Fail(format!("expected {} to serve, got {v:?}", versions.name(0)))
        };
        daemon = Some(d);
        outcome
    });
    let Some(d) = daemon.as_mut() else {
        for t in TESTS[1..].iter().chain(&["host-crash"]) {
            rep.run(t, || Outcome::Fail("the daemon did not start".into()));
        }
        return;
    };
    rep.run("degrade", || degrade(d, checks));
    rep.run("tcp-states", || {
        needs(d, &[Probe::SockState]).unwrap_or_else(|| tcp_states(d))
    });
    rep.run("tcp-reset", || {
        needs(d, &[Probe::TcpResets]).unwrap_or_else(|| tcp_reset(d))
    });
    rep.run("uprobe-markers", || {
        needs(d, &[Probe::ReloadMarkers]).unwrap_or_else(|| uprobe_markers(d, &versions))
    });
    rep.run("hot-swap", || hot_swap(d, &versions));
    if rep.failed() > failed_before {
        // The console log is all a VM leaves behind.
        eprintln!(
            "--- plugvisor log ---\n{}--- end of plugvisor log ---",
            d.log_text()
        );
    }
    if let Some(code) = d.stop()
        && code != 0
    {
        eprintln!("plugvisor exited {code} on SIGTERM; log:\n{}", d.log_text());
    }
    let (version, lib) = &versions.list[0];
    rep.run("host-crash", || crate::host_crash::run(version, lib));
}

/// Echo versions 1…3 of one stamped build, in a directory of their own.
struct Versions {
    _dir: tempfile::TempDir,
    list: Vec<(String, PathBuf)>,
}

impl Versions {
    fn make(setup: &Setup) -> Result<Versions, String> {
        let stamp = &setup.echo_stamp;
        let (prefix, last) = stamp
            .rsplit_once('.')
            .ok_or_else(|| format!("echo stamp {stamp:?} is not a version"))?;
        let base: u64 = last
            .parse()
            .map_err(|_| format!("echo stamp {stamp:?} does not end in a number"))?;
        let stamped = StampedLibrary::read(&setup.echo, stamp)?;
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mut list = Vec::new();
        for i in 1..=3 {
            let version = format!("{prefix}.{}", base + i);
            let path = dir.path().join(format!("libplugvisor_echo-{version}.so"));
            stamped.write_version(&version, &path)?;
            list.push((version, path));
        }
        Ok(Versions { _dir: dir, list })
    }

    fn name(&self, i: usize) -> &str {
        &self.list[i].0
    }

    fn install(&self, d: &Daemon, i: usize) {
        let (version, lib) = &self.list[i];
        install_package(
            &d.plugins_dir,
            PLUGIN,
            version,
            lib,
            &PackageTweaks::default(),
        );
    }
}

fn start_daemon(versions: &Versions) -> Daemon {
    let (version, lib) = versions.list[0].clone();
    Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp(LISTENER, PLUGIN)],
        env: Vec::new(),
        probes: "auto",
        packages: vec![(PLUGIN.into(), lib, version)],
        drain_timeout: None,
        wrapper: Vec::new(),
        trial: "30s",
        thresholds: None,
        extra_config: String::new(),
        trust: TrustOptions::default(),
        state_dir: None,
        ring_buffer_bytes: None,
        binary: None,
        init_timeout: None,
    })
}

/// The version a fresh connection is answered by.
fn serving_version(d: &Daemon) -> Option<String> {
    let mut c = LineClient::connect(d.addr(LISTENER)).ok()?;
    let resp = c.call("version").ok()?;
    echo_version(&resp).map(str::to_owned)
}

fn probe_up(d: &Daemon, p: Probe) -> bool {
    d.metrics()
        .get("plugvisor_probe_up", &[("probe", p.as_str())])
        .is_some_and(|v| v == 1.0)
}

/// SKIP when a probe the test reads is down in the daemon on this kernel
/// (`degrade` and `probe/*` say why).
fn needs(d: &Daemon, probes: &[Probe]) -> Option<Outcome> {
    let down: Vec<&str> = probes
        .iter()
        .filter(|p| !probe_up(d, **p))
        .map(|p| p.as_str())
        .collect();
    (!down.is_empty()).then(|| {
        Outcome::Skip(format!(
            "needs probe {}, down in plugvisor on this kernel (probe_up 0)",
            down.join(", ")
        ))
    })
}

fn metric(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    d.metrics().sum(name, labels)
}

fn connections(d: &Daemon) -> f64 {
    metric(d, "plugvisor_tcp_connections", &[("listener", LISTENER)])
}

/// plugvisor degrades per probe as the checks found this kernel: every
/// probe up where it could be attached, `probe_up 0` with its failure
/// counted where not, and serving either way.
fn degrade(d: &Daemon, checks: Option<&[ProbeCheck]>) -> Outcome {
    let Some(checks) = checks else {
        return Outcome::Fail("the probe checks did not run; nothing to compare with".into());
    };
    let m = d.metrics();
    let mut mismatches = Vec::new();
    let mut down = Vec::new();
    for c in checks {
        let name = c.probe.as_str();
        let daemon_up = m.get("plugvisor_probe_up", &[("probe", name)]) == Some(1.0);
        if daemon_up != c.up {
            mismatches.push(format!(
                "{name}: probe_up {} in plugvisor, the check found it {}",
                u8::from(daemon_up),
                if c.up { "working" } else { "not working" }
            ));
        } else if !daemon_up {
            let failures = m.sum("plugvisor_probe_failures_total", &[("probe", name)]);
            if failures < 1.0 {
                mismatches.push(format!("{name}: down but no failure counted"));
            }
            down.push(name);
        }
    }
    let serving = serving_version(d);
    if serving.is_none() {
        mismatches.push("plugvisor does not answer on its listener".into());
    }
    // Said once in the log, naming what is down.
    let warnings: Vec<String> = d
        .log_lines()
        .into_iter()
        .filter(|l| l["level"] == "WARN")
        .filter_map(|l| l["fields"]["message"].as_str().map(str::to_owned))
        .filter(|m| m.contains("eBPF probes unavailable"))
        .collect();
    match (down.is_empty(), warnings.as_slice()) {
        (true, []) => {}
        (true, w) => mismatches.push(format!("all probes up, yet the log warns: {w:?}")),
        (false, [w]) if down.iter().all(|p| w.contains(p)) => {}
        (false, w) => mismatches.push(format!(
            "expected one warning naming {down:?} in the log, found {w:?}"
        )),
    }
    if !mismatches.is_empty() {
        return Outcome::Fail(mismatches.join("; "));
    }
    Outcome::Pass(if down.is_empty() {
        format!(
            "all {} probes up in plugvisor, as the checks found; serving",
            checks.len()
        )
    } else {
        format!(
            "down here, as the checks found: {} (probe_up 0, failure counted, one warning \
             naming it in the log); the other {} up; serving on",
            down.join(", "),
            checks.len() - down.len()
        )
    })
}

/// Connections going up and down, seen by `inet_sock_set_state`.
fn tcp_states(d: &Daemon) -> Outcome {
    let deadline = Instant::now() + WAIT;
    wait_until(deadline, "start-up connections gone", || {
        connections(d) == 0.0
    });
    let addr = d.addr(LISTENER);
    let mut clients: Vec<LineClient> = (0..3)
        .map(|_| LineClient::connect(addr).expect("connect"))
        .collect();
    for c in &mut clients {
        c.call("hello").expect("echo answers");
    }
    wait_until(deadline, "3 established", || connections(d) == 3.0);
    clients.truncate(1);
    wait_until(deadline, "2 closed by FIN leave", || connections(d) == 1.0);
    clients.pop().expect("one left").reset();
    wait_until(deadline, "1 closed by RST leaves", || connections(d) == 0.0);
    Outcome::Pass("tcp_connections 0 → 3 (established) → 1 (2 FIN) → 0 (1 RST)".into())
}

/// Resets in both directions on the server side: a client's RST seen by
/// `tcp_receive_reset`, and one plugvisor's kernel sends (it closes a
/// connection with unread bytes after an oversized frame) seen by
/// `tcp_send_reset` — whose layout differs between kernels (a host-order
/// `sport` on 5.10 and 6.1, a `sockaddr` on 6.12), which is why it is
/// tested on each.
fn tcp_reset(d: &Daemon) -> Outcome {
    let deadline = Instant::now() + WAIT;
    let received = [("listener", LISTENER), ("direction", "received")];
    let sent = [("listener", LISTENER), ("direction", "sent")];
    let received0 = metric(d, "plugvisor_tcp_resets_total", &received);
    let sent0 = metric(d, "plugvisor_tcp_resets_total", &sent);

    let mut c = LineClient::connect(d.addr(LISTENER)).expect("connect");
    c.call("about to reset").expect("echo answers");
    c.reset();
    wait_until(deadline, "the client's RST counted", || {
        metric(d, "plugvisor_tcp_resets_total", &received) == received0 + 1.0
    });
    let sent_after_client = metric(d, "plugvisor_tcp_resets_total", &sent);
    if sent_after_client != sent0 {
        return Outcome::Fail(format!(
            "a reset received was also counted as sent ({sent0} → {sent_after_client})"
        ));
    }

    // More than a frame may hold, with no newline: plugvisor answers ERR
    // and closes with bytes unread, so its kernel resets the connection.
    let mut c = LineClient::connect(d.addr(LISTENER)).expect("connect");
    let mut w = c.stream().try_clone().expect("clone stream");
    let _ = w.write_all(&vec![b'x'; 200 * 1024]);
    let resp = c.read_line();
    if !resp.as_deref().is_ok_and(|r| r.starts_with("ERR")) {
        return Outcome::Fail(format!("an oversized frame was answered {resp:?}, not ERR"));
    }
    wait_until(deadline, "the server's RST counted", || {
        metric(d, "plugvisor_tcp_resets_total", &sent) > sent0
    });
    Outcome::Pass(format!(
        "tcp_resets_total{{direction=\"received\"}} {received0} → {} (client SO_LINGER 0), \
         {{direction=\"sent\"}} {sent0} → {} (server closes with unread bytes)",
        received0 + 1.0,
        metric(d, "plugvisor_tcp_resets_total", &sent)
    ))
}

const KERNEL_WINDOWS: &str = "plugvisor_kernel_reload_duration_seconds_count";
const KERNEL_WINDOW_SECONDS: &str = "plugvisor_kernel_reload_duration_seconds_sum";

/// A reload with no traffic: the window between the two marker uprobes
/// measured in the kernel.
fn uprobe_markers(d: &Daemon, versions: &Versions) -> Outcome {
    let deadline = Instant::now() + WAIT;
    let plugin = [("plugin", PLUGIN)];
    let success = [("plugin", PLUGIN), ("outcome", "success")];
    let windows = metric(d, KERNEL_WINDOWS, &plugin);
    let seconds = metric(d, KERNEL_WINDOW_SECONDS, &plugin);
    let reloads = metric(d, "plugvisor_reloads_total", &success);
    versions.install(d, 1);
    wait_until(deadline, "version 2 serves", || {
        serving_version(d).as_deref() == Some(versions.name(1))
    });
    wait_until(deadline, "the reload counted", || {
        metric(d, "plugvisor_reloads_total", &success) == reloads + 1.0
    });
    wait_until(deadline, "the kernel's window observed", || {
        metric(d, KERNEL_WINDOWS, &plugin) == windows + 1.0
    });
    let took = metric(d, KERNEL_WINDOW_SECONDS, &plugin) - seconds;
    if took <= 0.0 {
        return Outcome::Fail(format!(
            "the kernel measured a window of {took} s for reload {} → {}",
            versions.name(0),
            versions.name(1)
        ));
    }
    Outcome::Pass(format!(
        "reload {} → {}: both markers fired, window {:.0} µs in the kernel's clock",
        versions.name(0),
        versions.name(1),
        took * 1e6
    ))
}

/// What one client thread saw.
struct ClientLog {
    versions: Vec<String>,
    frames: u64,
    error: Option<String>,
}

/// What the client threads of `hot-swap` share.
#[derive(Clone)]
struct Traffic {
    stop: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    /// Clients that have been answered by `target`.
    seen_target: Arc<Mutex<usize>>,
    target: String,
}

impl Traffic {
    /// Client number `client` sends frames on `conn` without pause until told to stop,
    /// noting each change of the version that answers, then one last frame.
    fn spawn_client(
        &self,
        client: usize,
        mut conn: LineClient,
    ) -> std::thread::JoinHandle<ClientLog> {
        let first = conn.call("hello").expect("echo answers");
        let shared = self.clone();
        std::thread::spawn(move || {
            let mut log = ClientLog {
                versions: echo_version(&first)
                    .map(str::to_owned)
                    .into_iter()
                    .collect(),
                frames: 1,
                error: None,
            };
            let mut n = 0u64;
            while !shared.stop.load(Ordering::Relaxed) {
                n += 1;
                match conn.call(&format!("client {client} frame {n}")) {
                    Ok(resp) => {
                        let v = echo_version(&resp).unwrap_or("?").to_owned();
                        if log.versions.last() != Some(&v) {
                            if v == shared.target {
                                *shared.seen_target.lock().expect("lock") += 1;
                            }
                            log.versions.push(v);
                        }
                        log.frames += 1;
                        shared.frames.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        log.error = Some(format!("frame {n}: {e}"));
                        break;
                    }
                }
            }
            // Still usable after the swap: one more frame.
            if log.error.is_none() {
                match conn.call("last") {
                    Ok(resp) if echo_version(&resp) == Some(shared.target.as_str()) => {}
                    Ok(resp) => log.error = Some(format!("last frame answered {resp:?}")),
                    Err(e) => log.error = Some(format!("last frame: {e}")),
                }
            }
            log
        })
    }
}

/// A reload under live connections: every connection keeps working, in
/// order, and neither the clients nor the kernel see one break.
fn hot_swap(d: &Daemon, versions: &Versions) -> Outcome {
    let deadline = Instant::now() + WAIT;
    let target = versions.name(2).to_owned();
    let kernel_counts = probe_up(d, Probe::SockState) && probe_up(d, Probe::ReloadMarkers);
    let broken_before = metric(d, "plugvisor_reload_broken_connections_total", &[]);
    let windows = metric(d, KERNEL_WINDOWS, &[("plugin", PLUGIN)]);
    if kernel_counts {
        wait_until(deadline, "no connections left", || connections(d) == 0.0);
    }

    let traffic = Traffic {
        stop: Arc::new(AtomicBool::new(false)),
        frames: Arc::new(AtomicU64::new(0)),
        seen_target: Arc::new(Mutex::new(0usize)),
        target: target.clone(),
    };
    let addr = d.addr(LISTENER);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let c = LineClient::connect(addr).expect("connect");
            traffic.spawn_client(i, c)
        })
        .collect();
    let (stop, frames, seen_target) = (&traffic.stop, &traffic.frames, &traffic.seen_target);

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if kernel_counts {
            wait_until(deadline, "the kernel sees every client", || {
                connections(d) == CLIENTS as f64
            });
        }
        wait_until(deadline, "traffic flowing", || {
            frames.load(Ordering::Relaxed) >= 10 * CLIENTS as u64
        });
        versions.install(d, 2);
        wait_until(deadline, "every client answered by the new version", || {
            *seen_target.lock().expect("lock") == CLIENTS
        });
        let after = frames.load(Ordering::Relaxed);
        wait_until(deadline, "traffic flowing after the swap", || {
            frames.load(Ordering::Relaxed) >= after + 10 * CLIENTS as u64
        });
        if kernel_counts {
            let open = connections(d);
            assert!(
                open == CLIENTS as f64,
                "the kernel counts {open} established connections after the swap, not {CLIENTS}"
            );
        }
    }));
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<ClientLog> = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }

    let total: u64 = logs.iter().map(|l| l.frames).sum();
    let mut problems = Vec::new();
    for (i, l) in logs.iter().enumerate() {
        if let Some(e) = &l.error {
            problems.push(format!("client {i} broke: {e}"));
        }
        if l.versions.len() != 2 || l.versions[1] != target {
            problems.push(format!(
                "client {i} saw versions {:?}, not one switch to {target}",
                l.versions
            ));
        }
    }
    if !problems.is_empty() {
        return Outcome::Fail(problems.join("; "));
    }
    let from = &logs[0].versions[0];
    if !kernel_counts {
        return Outcome::Skip(format!(
            "clients: 0 of {CLIENTS} broken over {total} frames ({from} → {target}); the kernel \
             cannot count here: probe {} or {} down",
            Probe::SockState.as_str(),
            Probe::ReloadMarkers.as_str()
        ));
    }
    wait_until(deadline, "the kernel's window observed", || {
        metric(d, KERNEL_WINDOWS, &[("plugin", PLUGIN)]) == windows + 1.0
    });
    let broken = metric(d, "plugvisor_reload_broken_connections_total", &[]) - broken_before;
    if broken != 0.0 {
        return Outcome::Fail(format!(
            "the kernel counted {broken} connection(s) broken in the reload window; the clients saw none"
        ));
    }
    Outcome::Pass(format!(
        "{CLIENTS} connections, {total} frames, {from} → {target}: 0 broken by the clients, \
         0 by the kernel (reload_broken_connections_total, {CLIENTS} established through the window)"
    ))
}
