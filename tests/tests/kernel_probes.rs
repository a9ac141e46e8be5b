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
    let resp = oversized.call("");
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
