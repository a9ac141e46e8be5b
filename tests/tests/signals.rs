//! Resource levels and health checks, as the metrics a rule reads: present
//! where the node can tell, absent (never a fake 0) where it cannot, and
//! following what they measure — a dependency going down and coming back.
#![expect(
    clippy::float_cmp,
    reason = "metric values are integer counts carried in f64; exact comparison is the point"
)]
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use plugvisor_tests::{Daemon, DaemonOptions, Metrics, wait_until};

/// Fast checks, so a test sees up → down → up in a second or two.
fn check_config(name: &str, kind: &str, target: &str, plugin: Option<&str>) -> String {
    let plugin = plugin.map_or(String::new(), |p| format!("plugin = \"{p}\"\n"));
    format!(
        "[[health_check]]\nname = \"{name}\"\nkind = \"{kind}\"\ntarget = \"{target}\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nfailures_before_down = 3\n{plugin}"
    )
}

fn up(m: &Metrics, check: &str) -> Option<f64> {
    m.get("plugvisor_health_check_up", &[("check", check)])
}

fn failures(m: &Metrics, check: &str) -> f64 {
    m.get("plugvisor_health_check_failures_total", &[("check", check)])
        .expect("the failure counter exists from the start")
}

fn wait_up(daemon: &Daemon, check: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    wait_until(deadline, &format!("{check} up = {want}"), || {
        up(&daemon.metrics(), check) == Some(want)
    });
}

/// Whether this machine gives the daemon (our child, in our cgroup) a
/// readable memory cgroup at the usual mount points.
fn memory_cgroup_readable() -> bool {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup.lines().any(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let path = path.unwrap_or_default().trim_start_matches('/');
        match controllers {
            Some("") => std::path::Path::new("/sys/fs/cgroup")
                .join(path)
                .join("memory.current")
                .is_file(),
            Some(c) if c.split(',').any(|c| c == "memory") => {
                std::path::Path::new("/sys/fs/cgroup/memory")
                    .join(path)
                    .join("memory.usage_in_bytes")
                    .is_file()
            }
            _ => false,
        }
    })
}

#[test]
fn resource_levels_are_exported_where_the_node_can_tell() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let m = daemon.metrics();
    let positive = |name: &str| {
        let v = m.get(name, &[]).unwrap_or_else(|| panic!("{name} missing"));
        assert!(v > 0.0, "{name} = {v}");
        v
    };
    positive("plugvisor_system_memory_available_bytes");
    positive("plugvisor_state_dir_free_bytes");
    positive("process_resident_memory_bytes");
    positive("process_open_fds");
    let current = m.get("plugvisor_cgroup_memory_current_bytes", &[]);
    let max = m.get("plugvisor_cgroup_memory_max_bytes", &[]);
    if memory_cgroup_readable() {
        let current = current.expect("this machine has a readable memory cgroup");
        let rss = positive("process_resident_memory_bytes");
        assert!(
            current >= rss * 0.5,
            "the cgroup holds at least the daemon: {current} vs RSS {rss}"
        );
        let max = max.expect("a limit, or +Inf for none");
        assert!(max >= current, "limit {max} below usage {current}");
    }
    assert!(
        current.is_none_or(|v| v > 0.0),
        "an unreadable cgroup is absent, never 0"
    );
}

#[test]
fn plugin_health_hook_is_a_check() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    wait_up(&daemon, "plugin:echo", 1.0);
    let m = daemon.metrics();
    assert_eq!(
        m.get(
            "plugvisor_health_check_up",
            &[("check", "plugin:echo"), ("plugin", "echo")]
        ),
        Some(1.0)
    );
    assert_eq!(failures(&m, "plugin:echo"), 0.0);
    assert!(
        m.sum(
            "plugvisor_health_check_duration_seconds_count",
            &[("check", "plugin:echo")]
        ) >= 1.0
    );
}

#[test]
fn tcp_check_goes_down_after_failures_and_comes_back() {
    // Connections the daemon makes queue in the backlog unaccepted: a
    // completed handshake is all a tcp check asks for.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        extra_config: check_config("cache", "tcp", &addr.to_string(), Some("echo")),
        ..Default::default()
    });
    wait_up(&daemon, "cache", 1.0);
    let m = daemon.metrics();
    assert_eq!(
        m.get(
            "plugvisor_health_check_up",
            &[("check", "cache"), ("plugin", "echo")]
        ),
        Some(1.0),
        "the plugin that relies on the check is its plugin label"
    );
    let failed_before = failures(&m, "cache");

    let closed_at = Instant::now();
    drop(listener);
    wait_up(&daemon, "cache", 0.0);
    let m = daemon.metrics();
    assert!(
        failures(&m, "cache") - failed_before >= 3.0,
        "down only after failures_before_down = 3 failed attempts"
    );
    assert!(
        closed_at.elapsed() >= Duration::from_millis(400),
        "three attempts 200 ms apart cannot all fail sooner"
    );

    let _reopened = TcpListener::bind(addr).unwrap();
    wait_up(&daemon, "cache", 1.0);
}

/// A tiny HTTP/1.1 server on loopback answering every request with the
/// status it is set to. Stopped and joined on drop.
struct HttpStub {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpStub {
    fn start(status: u16) -> HttpStub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(status));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (status.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let code = st.load(Ordering::Relaxed);
                let _ = write!(
                    s,
                    "HTTP/1.1 {code} Status\r\nContent-Length: 3\r\nConnection: close\r\n\r\nhi\n"
                );
            }
        });
        HttpStub {
            addr,
            status,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::Relaxed);
    }
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn http_check_follows_the_status() {
    let stub = HttpStub::start(200);
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        extra_config: check_config(
            "api",
            "http",
            &format!("http://{}/healthz", stub.addr),
            None,
        ),
        ..Default::default()
    });
    wait_up(&daemon, "api", 1.0);
    assert_eq!(
        daemon.metrics().get(
            "plugvisor_health_check_up",
            &[("check", "api"), ("plugin", "")]
        ),
        Some(1.0),
        "a check no plugin relies on has an empty plugin label"
    );
    let failed_before = failures(&daemon.metrics(), "api");

    stub.set(500);
    wait_up(&daemon, "api", 0.0);
    assert!(failures(&daemon.metrics(), "api") - failed_before >= 3.0);
    assert!(
        daemon
            .log_text()
            .contains("answered HTTP 500, expected 200"),
        "the log says why it is down"
    );

    stub.set(200);
    wait_up(&daemon, "api", 1.0);
    let m = daemon.metrics();
    assert!(
        m.sum(
            "plugvisor_health_check_duration_seconds_count",
            &[("check", "api")]
        ) >= 5.0,
        "every attempt is timed"
    );
}
