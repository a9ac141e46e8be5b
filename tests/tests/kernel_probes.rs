//! The probes count what really happens on the wire: a control that breaks
//! connections on purpose inside a reload window must move the counter by
//! exactly that many, and real connections must show up and go away.
#![expect(
    clippy::float_cmp,
    reason = "metric values are integer counts carried in f64; exact comparison is the point"
)]
#![expect(
    clippy::too_many_lines,
    reason = "each test is one black-box scenario that reads top to bottom"
)]
use std::io::{Read as _, Write as _};
use std::thread::sleep;
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, PackageTweaks, build_plugin_version,
    install_package, require_root, wait_until,
};

fn connections(d: &Daemon, listener: &str) -> Option<f64> {
    d.metrics()
        .get("plugvisor_tcp_connections", &[("listener", listener)])
}

fn broken(d: &Daemon) -> f64 {
    d.metrics()
        .sum("plugvisor_reload_broken_connections_total", &[])
}

#[test]
fn probes_count_real_loopback_connections() {
    if !require_root("probes_count_real_loopback_connections") {
        return;
    }
    let daemon = Daemon::start(DaemonOptions::default());
    let m = daemon.metrics();
    assert_eq!(
        m.get("plugvisor_probe_up", &[("probe", "inet_sock_set_state")]),
        Some(1.0)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    wait_until(deadline, "no connections left from start-up checks", || {
        connections(&daemon, "echo-tcp") == Some(0.0)
    });

    let mut clients: Vec<LineClient> = (0..7)
        .map(|_| LineClient::connect(daemon.addr("echo-tcp")).unwrap())
        .collect();
    for c in &mut clients {
        c.call("hi").unwrap();
    }
    assert_eq!(
        connections(&daemon, "echo-tcp"),
        Some(7.0),
        "kernel counts 7 established server-side sockets"
    );
    clients.truncate(3);
    wait_until(deadline, "4 closed connections leave the count", || {
        connections(&daemon, "echo-tcp") == Some(3.0)
    });
    // A connection to an unwatched port is not counted.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let _c = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
    let _s = other.accept().unwrap();
    assert_eq!(connections(&daemon, "echo-tcp"), Some(3.0));
    drop(clients);
    wait_until(deadline, "all closed", || {
        connections(&daemon, "echo-tcp") == Some(0.0)
    });
    // Closed outside any reload window: nothing is "broken".
    assert_eq!(broken(&daemon), 0.0);
}

/// The control: connections closed or reset inside a reload window — by
/// the client (FIN and RST) and by the server — are each counted once, and
/// the same closes outside the window are not counted at all.
#[test]
fn connections_closed_inside_a_reload_window_are_counted_exactly() {
    const INIT_MS: u64 = 4000;
    if !require_root("connections_closed_inside_a_reload_window_are_counted_exactly") {
        return;
    }
    let slow_v1 = build_plugin_version("plugvisor-fixture-slow-init", "fixture_slow_init", "0.1.0");
    let slow_v2 = build_plugin_version("plugvisor-fixture-slow-init", "fixture_slow_init", "0.2.0");
    let mut opts = DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::tcp("slow-tcp", "slow"),
        ],
        env: vec![("PLUGVISOR_FIXTURE_INIT_MS".into(), INIT_MS.to_string())],
        ..Default::default()
    };
    opts.packages.push(("slow".into(), slow_v1, "0.1.0".into()));
    let daemon = Daemon::start(opts);
    let echo = daemon.addr("echo-tcp");
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_until(deadline, "start-up connections gone", || {
        connections(&daemon, "echo-tcp") == Some(0.0)
    });
    assert_eq!(broken(&daemon), 0.0);

    // Seven live connections; four will be broken inside the window, three after it.
    let mut clients: Vec<LineClient> = (0..7).map(|_| LineClient::connect(echo).unwrap()).collect();
    for c in &mut clients {
        c.call("hi").unwrap();
    }

    // Open a reload window that lasts INIT_MS: the slow plugin's init sleeps.
    install_package(
        &daemon.plugins_dir,
        "slow",
        "0.2.0",
        &slow_v2,
        &PackageTweaks::default(),
    );
    // The watcher (50 ms debounce) opens the window within milliseconds;
    // give it a comfortable margin inside the 4 s init.
    sleep(Duration::from_millis(800));
    let t_break = Instant::now();
    let mut it = clients.drain(..4);
    it.next().unwrap().reset(); // client RST (SO_LINGER 0)
    it.next().unwrap().reset(); // client RST
    drop(it.next().unwrap()); // client FIN
    // Server-side close: a frame longer than the listener accepts makes
    // plugvisor answer ERR and close the connection itself.
    let mut oversized = it.next().unwrap();
    drop(it);
    let big = vec![b'x'; 70 * 1024];
    let _ = oversized.stream().try_clone().unwrap().write_all(&big);
    let resp = oversized.read_line();
    assert!(
        resp.as_deref()
            .is_ok_and(|r| r.starts_with("ERR frame longer")),
        "{resp:?}"
    );
    wait_until(
        Instant::now() + Duration::from_secs(2),
        "server closed the oversized connection",
        || {
            let mut buf = [0u8; 1];
            matches!(
                oversized.stream().try_clone().unwrap().read(&mut buf),
                Ok(0) | Err(_)
            )
        },
    );
    assert!(
        t_break.elapsed() < Duration::from_millis(INIT_MS - 1500),
        "the breaks took too long to stay inside the window; the test cannot tell"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    wait_until(deadline, "slow 0.2.0 serves", || {
        daemon.metrics().get(
            "plugvisor_plugin_info",
            &[
                ("plugin", "slow"),
                ("version", "0.2.0"),
                ("state", "active"),
            ],
        ) == Some(1.0)
    });
    wait_until(deadline, "the kernel counted 4 broken connections", || {
        broken(&daemon) >= 4.0
    });
    assert_eq!(
        broken(&daemon),
        4.0,
        "exactly the four connections broken inside the window"
    );
    assert_eq!(
        daemon.metrics().get(
            "plugvisor_reload_broken_connections_total",
            &[("listener", "echo-tcp"), ("protocol", "tcp")]
        ),
        Some(4.0)
    );

    // Outside any window, the same kinds of close are not "broken".
    let mut rest = clients.into_iter();
    rest.next().unwrap().reset();
    drop(rest.next().unwrap());
    drop(rest);
    wait_until(deadline, "closed connections leave the count", || {
        connections(&daemon, "echo-tcp") == Some(0.0)
    });
    assert_eq!(
        broken(&daemon),
        4.0,
        "closes outside a reload window are not counted"
    );
    // The window itself was measured in the kernel, and it was at least as long as init.
    let m = daemon.metrics();
    let sum = m.sum(
        "plugvisor_kernel_reload_duration_seconds_sum",
        &[("plugin", "slow")],
    );
    let count = m.sum(
        "plugvisor_kernel_reload_duration_seconds_count",
        &[("plugin", "slow")],
    );
    assert_eq!(count, 2.0, "start-up load and the reload");
    assert!(
        sum >= 2.0 * INIT_MS as f64 / 1000.0,
        "kernel window {sum}s covers both {INIT_MS} ms inits"
    );
}

/// Resets on the server side of a listener are counted by direction: a
/// client that closes with SO_LINGER 0 is a reset received; plugvisor
/// closing a connection with unread bytes (an oversized frame) sends one.
#[test]
fn resets_are_counted_by_direction() {
    if !require_root("resets_are_counted_by_direction") {
        return;
    }
    let daemon = Daemon::start(DaemonOptions::default());
    let resets = |d: &Daemon, dir: &str| {
        d.metrics().get(
            "plugvisor_tcp_resets_total",
            &[("listener", "echo-tcp"), ("direction", dir)],
        )
    };
    // Start-up may already have refused a connection attempt (a probe of
    // the harness before the socket listened): count from here.
    let received0 = resets(&daemon, "received").expect("series exists from the start");
    let sent0 = resets(&daemon, "sent").expect("series exists from the start");
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..3 {
        let mut c = LineClient::connect(daemon.addr("echo-tcp")).unwrap();
        c.call("hi").unwrap();
        c.reset();
    }
    wait_until(deadline, "3 resets received", || {
        resets(&daemon, "received") == Some(received0 + 3.0)
    });
    assert_eq!(
        resets(&daemon, "sent"),
        Some(sent0),
        "a reset received is not one sent"
    );

    // 70 KiB without a newline and more behind it: plugvisor answers ERR
    // and closes with bytes unread, so its kernel sends RST.
    let mut c = LineClient::connect(daemon.addr("echo-tcp")).unwrap();
    let mut w = c.stream().try_clone().unwrap();
    let _ = w.write_all(&vec![b'x'; 200 * 1024]);
    let resp = c.read_line();
    assert!(
        resp.as_deref()
            .is_ok_and(|r| r.starts_with("ERR frame longer")),
        "{resp:?}"
    );
    wait_until(deadline, "a reset sent by the server", || {
        resets(&daemon, "sent") >= Some(sent0 + 1.0)
    });
    assert_eq!(
        daemon.metrics().get(
            "plugvisor_tcp_retransmits_total",
            &[("listener", "echo-tcp")]
        ),
        Some(0.0),
        "loopback does not retransmit"
    );
}

/// The service gap: every answered frame is one observation; a reload whose
/// plugin init takes seconds does not stall requests, because init runs
/// beside the serving path — the gaps observed inside the reload window stay
/// as short as the steady ones.
#[test]
fn service_gap_shows_a_slow_init_does_not_stall_requests() {
    const INIT_MS: u64 = 2000;
    if !require_root("service_gap_shows_a_slow_init_does_not_stall_requests") {
        return;
    }
    let slow_v1 = build_plugin_version("plugvisor-fixture-slow-init", "fixture_slow_init", "0.1.0");
    let slow_v2 = build_plugin_version("plugvisor-fixture-slow-init", "fixture_slow_init", "0.3.0");
    let daemon = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("slow-tcp", "slow")],
        env: vec![("PLUGVISOR_FIXTURE_INIT_MS".into(), INIT_MS.to_string())],
        packages: vec![("slow".into(), slow_v1, "0.1.0".into())],
        ..Default::default()
    });
    let gap_count = |d: &Daemon, w: &str| {
        d.metrics()
            .get(
                "plugvisor_service_gap_seconds_count",
                &[("listener", "slow-tcp"), ("window", w)],
            )
            .unwrap_or(0.0)
    };
    let steady_before = gap_count(&daemon, "steady");
    let mut c = LineClient::connect(daemon.addr("slow-tcp")).unwrap();
    for i in 0..100 {
        c.call(&format!("s{i}")).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    wait_until(deadline, "100 steady gaps", || {
        gap_count(&daemon, "steady") >= steady_before + 100.0
    });

    install_package(
        &daemon.plugins_dir,
        "slow",
        "0.3.0",
        &slow_v2,
        &PackageTweaks::default(),
    );
    // Keep sending through the 2 s init; every answer comes from 0.1.0
    // until the swap, and none waits for the init.
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut during = 0;
    while start.elapsed() < Duration::from_millis(INIT_MS + 1500) {
        let t = Instant::now();
        let r = c.call("during").unwrap();
        slowest = slowest.max(t.elapsed());
        if r.starts_with("[slow 0.1.0]") {
            during += 1;
        }
    }
    assert!(c.call("after").unwrap().starts_with("[slow 0.3.0]"));
    let m = daemon.metrics();
    let reload = m
        .get(
            "plugvisor_service_gap_seconds_count",
            &[("listener", "slow-tcp"), ("window", "reload")],
        )
        .unwrap();
    assert!(
        reload >= 10.0,
        "requests answered inside the reload window were measured ({reload})"
    );
    let p99 = m
        .quantile(
            "plugvisor_service_gap_seconds",
            &[("listener", "slow-tcp"), ("window", "reload")],
            0.99,
        )
        .unwrap();
    eprintln!(
        "{during} requests served by the old version during a {INIT_MS} ms init; kernel gap in window p99 {:.1} us; slowest client round trip {slowest:?}",
        p99 * 1e6
    );
    assert!(
        p99 < 0.1,
        "kernel-measured service gap inside the reload window p99 {p99}s: the init stalled requests"
    );
    assert!(
        slowest < Duration::from_millis(INIT_MS / 2),
        "a client waited {slowest:?}"
    );
}
