//! plugvisor under a service manager: the test plays systemd's side of
//! `sd_notify(3)` — it binds the `NOTIFY_SOCKET` datagram socket, starts the
//! real daemon with it, and reads what the daemon says: `READY=1` once it
//! serves, `RELOADING=1` … `READY=1` around a `SIGHUP`, `WATCHDOG=1` at
//! half `WATCHDOG_USEC`, `STOPPING=1` on `SIGTERM`.
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use plugvisor_tests::{Daemon, DaemonOptions, LineClient, echo_version};

/// The longest the test waits for one notification.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// The next datagram, or `None` when `timeout` passes first.
fn next(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("reading NOTIFY_SOCKET: {e}"),
    }
}

/// The next datagram that is not a watchdog ping.
fn next_state(sock: &UnixDatagram) -> String {
    let deadline = Instant::now() + NOTIFY_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = next(sock, left.max(Duration::from_millis(1)))
            .expect("no notification within the timeout");
        if msg != "WATCHDOG=1\n" {
            return msg;
        }
    }
}

fn options(env: Vec<(String, String)>) -> DaemonOptions {
    DaemonOptions {
        env,
        // The protocol, not the kernel, is under test here.
        probes: "off",
        ..Default::default()
    }
}

#[test]
fn says_ready_reloading_and_stopping_over_a_path_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut daemon = Daemon::start(options(vec![(
        "NOTIFY_SOCKET".into(),
        path.display().to_string(),
    )]));

    let ready = next_state(&sock);
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving 1 listener(s)"),
        "first notification: {ready:?}"
    );
    // Ready means serving.
    let resp = LineClient::connect(daemon.addr("echo-tcp"))
        .unwrap()
        .call("hi")
        .unwrap();
    assert_eq!(echo_version(&resp), Some("1.0.0"), "{resp}");
    assert_eq!(
        next(&sock, Duration::from_millis(500)),
        None,
        "nothing more without a reason (no watchdog asked for)"
    );

    daemon.signal(libc::SIGHUP);
    let reloading = next_state(&sock);
    let mut lines = reloading.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{reloading:?}");
    let usec: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    // CLOCK_MONOTONIC, as systemd compares it: this test's own clock, near now.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
    assert!(
        usec <= now && now - usec < 10_000_000,
        "MONOTONIC_USEC {usec} is not CLOCK_MONOTONIC near {now}"
    );
    let again = next_state(&sock);
    assert!(
        again.starts_with("READY=1\n"),
        "after the reload: {again:?}"
    );

    assert_eq!(daemon.stop(), Some(0));
    let stopping = next_state(&sock);
    assert!(
        stopping.starts_with("STOPPING=1\n"),
        "on SIGTERM: {stopping:?}"
    );
}

#[test]
fn pings_the_watchdog_at_half_the_timeout_over_an_abstract_socket() {
    const WATCHDOG_USEC: u64 = 400_000;
    let name = format!("plugvisor-test-notify-{}", std::process::id());
    let sock =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    let daemon = Daemon::start(options(vec![
        ("NOTIFY_SOCKET".into(), format!("@{name}")),
        ("WATCHDOG_USEC".into(), WATCHDOG_USEC.to_string()),
    ]));
    assert!(next_state(&sock).starts_with("READY=1\n"));

    // Count pings over two seconds: one every 200 ms is 10.
    let window = Duration::from_secs(2);
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < window {
        if let Some(msg) = next(
            &sock,
            window
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1)),
        ) {
            assert_eq!(msg, "WATCHDOG=1\n", "only pings while idle");
            pings += 1;
        }
    }
    let expected = (window.as_micros() / u128::from(WATCHDOG_USEC / 2)) as i32;
    assert!(
        (expected - 2..=expected + 1).contains(&pings),
        "{pings} pings in {window:?}, expected about {expected}"
    );
    drop(daemon);
}

#[test]
fn a_watchdog_meant_for_another_pid_is_not_pinged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let daemon = Daemon::start(options(vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        ("WATCHDOG_USEC".into(), "200000".into()),
        // The manager's pid, not the daemon's: the watchdog is someone else's.
        ("WATCHDOG_PID".into(), "1".into()),
    ]));
    assert!(next_state(&sock).starts_with("READY=1\n"));
    assert_eq!(
        next(&sock, Duration::from_secs(1)),
        None,
        "no WATCHDOG=1 for another process's watchdog"
    );
    drop(daemon);
}
