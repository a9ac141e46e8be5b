//! `host-crash`: echo in a plugin host (`isolation = "process"`) with
//! limits, on this kernel's cgroups — cgroup v2 in the guests (init mounts
//! it), whatever the host machine has — killed from outside under live
//! connections.
//!
//! Passes when the host sits in a cgroup of its own with `memory_max` and
//! `pids_max` written where that mechanism keeps them, its memory is
//! exported from the kernel's accounting, and after the SIGKILL a new host
//! serves every connection, none of which broke: by the clients and, where
//! the probes are up, by the kernel (one recovery timed from the exit, 0
//! connections closed or reset across it, every client still established).
#![expect(
    clippy::float_cmp,
    reason = "metric values are integer counts carried in f64; exact comparison is the point"
)]
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plugvisor_probes_common::Probe;
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, TrustOptions, echo_version, wait_until,
};

use crate::report::Outcome;

const LISTENER: &str = "echo-tcp";
const PLUGIN: &str = "echo";
/// Bound on every wait (TCG guests are slow).
const WAIT: Duration = Duration::from_secs(60);
/// Connections held through the crash.
const CLIENTS: usize = 4;
const MEMORY_MAX: u64 = 64 << 20;
const PIDS_MAX: u64 = 32;

/// Runs the test on echo `version` from `lib`.
pub fn run(version: &str, lib: &Path) -> Outcome {
    if let Err(e) = users_for_hosts() {
        return Outcome::Fail(e);
    }
    // Every field spelled out: `DaemonOptions::default()` builds the
    // workspace's echo with cargo, which a guest does not have.
    let d = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp(LISTENER, PLUGIN)],
        env: Vec::new(),
        probes: "auto",
        packages: vec![(PLUGIN.into(), lib.to_path_buf(), version.to_owned())],
        drain_timeout: None,
        wrapper: Vec::new(),
        trial: "1s",
        thresholds: None,
        extra_config: format!(
            "[plugin.{PLUGIN}]\nisolation = \"process\"\nmemory_max = \"64M\"\npids_max = {PIDS_MAX}\n"
        ),
        trust: TrustOptions::default(),
        state_dir: None,
        ring_buffer_bytes: None,
        binary: None,
        init_timeout: None,
    });
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| crash(&d, version)))
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panicked".to_owned());
            Outcome::Fail(msg)
        });
    if matches!(outcome, Outcome::Fail(_)) {
        eprintln!(
            "--- plugvisor log (host-crash) ---\n{}--- end ---",
            d.log_text()
        );
    }
    outcome
}

fn crash(d: &Daemon, version: &str) -> Outcome {
    let deadline = Instant::now() + WAIT;
    let m = || d.metrics();
    let answer = |c: &mut LineClient, what: &str| {
        c.call(what)
            .ok()
            .and_then(|r| echo_version(&r).map(str::to_owned))
    };
    let mut clients: Vec<LineClient> = (0..CLIENTS)
        .map(|_| LineClient::connect(d.addr(LISTENER)).expect("connect"))
        .collect();
    wait_until(deadline, "echo serves from its host", || {
        clients
            .iter_mut()
            .all(|c| answer(c, "before").as_deref() == Some(version))
    });
    let hosts = d.plugin_hosts();
    let [host] = hosts[..] else {
        return Outcome::Fail(format!("expected one plugin host, found {hosts:?}"));
    };
    let mechanism = m()
        .matching(
            "plugvisor_plugin_isolation",
            &[("plugin", PLUGIN), ("mode", "process")],
        )
        .find(|(_, v)| *v == 1.0)
        .map(|(l, _)| l["limits"].clone())
        .unwrap_or_default();
    let limits = match host_limits(host, &mechanism) {
        Ok(l) => l,
        Err(e) => return Outcome::Fail(format!("{mechanism}: {e}")),
    };
    wait_until(deadline, "the host's memory from the kernel", || {
        m().sum(
            "plugvisor_plugin_memory_bytes",
            &[("plugin", PLUGIN), ("version", version)],
        ) > 0.0
    });
    let memory = m().sum(
        "plugvisor_plugin_memory_bytes",
        &[("plugin", PLUGIN), ("version", version)],
    );

    let kernel = d.metrics().get(
        "plugvisor_probe_up",
        &[("probe", Probe::HostCrashes.as_str())],
    ) == Some(1.0)
        && d.metrics().get(
            "plugvisor_probe_up",
            &[("probe", Probe::SockState.as_str())],
        ) == Some(1.0);
    let resets = || {
        m().sum(
            "plugvisor_tcp_resets_total",
            &[("listener", LISTENER), ("direction", "sent")],
        )
    };
    let resets_before = resets();
    // SAFETY: plain syscall on a child of the daemon this test started.
    unsafe { libc::kill(host as i32, libc::SIGKILL) };
    wait_until(deadline, "a new host serves every connection", || {
        m().sum(
            "plugvisor_plugin_host_restarts_total",
            &[("plugin", PLUGIN), ("reason", "signal")],
        ) == 1.0
            && clients
                .iter_mut()
                .all(|c| answer(c, "after").as_deref() == Some(version))
    });
    let now = d.plugin_hosts();
    if now.len() != 1 || now[0] == host {
        return Outcome::Fail(format!("hosts after the kill: {now:?} (killed {host})"));
    }
    let clients_side = format!(
        "host {host} ({mechanism}: {limits}; {:.1} MiB charged) killed, {CLIENTS} connections answered by its replacement",
        memory / f64::from(1 << 20)
    );
    if !kernel {
        return Outcome::Skip(format!(
            "{clients_side}; the kernel cannot judge here: probe {} or {} down",
            Probe::HostCrashes.as_str(),
            Probe::SockState.as_str()
        ));
    }
    kernel_verdict(d, &clients_side, resets_before)
}

/// What the kernel saw of the crash: one recovery timed, nothing closed
/// or reset by plugvisor across it, every client still established.
fn kernel_verdict(d: &Daemon, clients_side: &str, resets_before: f64) -> Outcome {
    let deadline = Instant::now() + WAIT;
    let m = || d.metrics();
    let resets = || {
        m().sum(
            "plugvisor_tcp_resets_total",
            &[("listener", LISTENER), ("direction", "sent")],
        )
    };
    wait_until(deadline, "the kernel timed the recovery", || {
        m().get(
            "plugvisor_kernel_crash_recovery_seconds_count",
            &[("plugin", PLUGIN)],
        ) == Some(1.0)
    });
    let metrics = m();
    let broken = metrics.sum(
        "plugvisor_crash_broken_connections_total",
        &[("listener", LISTENER)],
    );
    let open = metrics.sum("plugvisor_tcp_connections", &[("listener", LISTENER)]);
    let reset = resets() - resets_before;
    if broken != 0.0 || reset != 0.0 || open != CLIENTS as f64 {
        return Outcome::Fail(format!(
            "{clients_side}; but the kernel counted {broken} broken across the crash, {reset} \
             RST sent, {open} established (want 0, 0, {CLIENTS})"
        ));
    }
    let recovery_ms = metrics.sum(
        "plugvisor_kernel_crash_recovery_seconds_sum",
        &[("plugin", PLUGIN)],
    ) * 1e3;
    Outcome::Pass(format!(
        "{clients_side}; kernel: exit → first answer {recovery_ms:.1} ms, 0 broken, 0 RST, \
         {CLIENTS} established"
    ))
}

/// The limits as the kernel holds them for `host`, read back from its
/// cgroup under the mechanism the daemon said it uses.
fn host_limits(host: u32, mechanism: &str) -> Result<String, String> {
    let own = std::fs::read_to_string(format!("/proc/{host}/cgroup"))
        .map_err(|e| format!("/proc/{host}/cgroup: {e}"))?;
    let line = |prefix: &str| {
        own.lines().find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (ctrls, path) = rest.split_once(':')?;
            (ctrls.split(',').any(|c| c == prefix) || (prefix.is_empty() && ctrls.is_empty()))
                .then(|| path.to_owned())
        })
    };
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let mount_of = |fstype: &str, option: Option<&str>| -> Result<PathBuf, String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
        mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&fstype)
                    && option.is_none_or(|o| {
                        f.get(3).is_some_and(|opts| opts.split(',').any(|x| x == o))
                    }))
                .then(|| PathBuf::from(f[1]))
            })
            .ok_or_else(|| {
                format!(
                    "no {fstype} mount{}",
                    option.map(|o| format!(" with {o}")).unwrap_or_default()
                )
            })
    };
    match mechanism {
        "cgroup2" => {
            let path = line("").ok_or("the host is in no unified cgroup")?;
            let dir = mount_of("cgroup2", None)?.join(path.trim_start_matches('/'));
            let memory = read(dir.join("memory.max"))?;
            let pids = read(dir.join("pids.max")).unwrap_or_else(|_| "-".into());
            if memory != MEMORY_MAX.to_string() {
                return Err(format!("{}/memory.max is {memory}", dir.display()));
            }
            if pids != PIDS_MAX.to_string() {
                return Err(format!("{}/pids.max is {pids}", dir.display()));
            }
            Ok(format!(
                "{} memory.max {memory}, pids.max {pids}",
                dir.display()
            ))
        }
        "cgroup1" => {
            let path = line("memory").ok_or("the host is in no v1 memory cgroup")?;
            let dir = mount_of("cgroup", Some("memory"))?.join(path.trim_start_matches('/'));
            let memory = read(dir.join("memory.limit_in_bytes"))?;
            if memory != MEMORY_MAX.to_string() {
                return Err(format!(
                    "{}/memory.limit_in_bytes is {memory}",
                    dir.display()
                ));
            }
            Ok(format!("{} memory.limit_in_bytes {memory}", dir.display()))
        }
        other => Err(format!(
            "the daemon holds hosts by {other:?}, not a cgroup, though this kernel has them"
        )),
    }
}

/// A guest's initramfs has no user database; the hosts drop to `nobody`
/// (the fallback user), which must resolve.
fn users_for_hosts() -> Result<(), String> {
    let passwd = Path::new("/etc/passwd");
    if passwd.exists() {
        return Ok(());
    }
    std::fs::write(
        passwd,
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )
    .and_then(|()| std::fs::write("/etc/group", "root:x:0:\nnogroup:x:65534:\n"))
    .map_err(|e| format!("writing a user database for the hosts: {e}"))
}
