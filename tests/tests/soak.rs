//! Soak: 1000 hot reloads of `echo` under load — persistent TCP clients
//! and an open gRPC `Exchange` stream sending all the while — with the
//! eBPF probes watching. Afterwards: no client saw an error, the kernel saw
//! no connection break, the resident set grew by no more than the versions
//! kept mapped may take, the fds are where they were, the daemon logged
//! no error, and `state_dir` is whole. What it cost is printed: reloads
//! per second, RSS and fds before and after, and how much `state_dir` grew
//! (every version's object is kept in the store; see
//! `docs/RELIABILITY.md`).
//!
//! It runs twice: with echo in the daemon (`in-process`) and in plugin
//! hosts (`process`: a thousand hosts started and retired, at most
//! `keep_loaded` alive at the end, none of them left behind, and the
//! libraries mapped in the hosts, never in the daemon).
#![expect(
    clippy::too_many_lines,
    reason = "one black-box scenario that reads top to bottom"
)]
#![expect(
    clippy::float_cmp,
    reason = "metric values are integer counts carried in f64; exact comparison is the point"
)]
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use plugvisor_tests::live::{Live, LiveOptions};
use plugvisor_tests::state_check::assert_state_consistent;
use plugvisor_tests::{
    Daemon, DaemonOptions, ListenerSpec, PackageTweaks, echo_version_series, install_package,
    plugin_hosts_of, require_root, sha256_file, wait_until,
};

/// Reloads measured (`PLUGVISOR_SOAK_RELOADS` overrides it, to look for
/// slow growth by hand; CI runs the default).
const RELOADS: usize = 1000;

fn reloads() -> usize {
    std::env::var("PLUGVISOR_SOAK_RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RELOADS)
}
/// Reloads before the first measure: the mapped set is full and the
/// allocator has seen a reload or twenty.
const WARMUP: usize = 20;
/// `[reload] keep_loaded` (the daemon's default).
const KEEP_LOADED: u64 = 4;
/// What the resident set may grow by besides the mapped versions: the
/// allocator's free lists and caches that a thousand reloads settle into
/// (plugvisor caps glibc at two arenas; measured growth here 0.1-0.3 MiB).
const RSS_ALLOWANCE: u64 = 2 << 20;
/// What the daemon's resident set may grow by over the second half of the
/// reloads when echo runs in plugin hosts (see the assertion).
const PROCESS_RSS_ALLOWANCE: u64 = 3 << 20;
/// The echo series (shared with the fault matrix: one build).
const SERIES_MAJOR: u64 = 7;
/// The soak gives up (fails) after this long; it is a bound, not a target.
const SOAK_BOUND: Duration = Duration::from_secs(600);

/// Resident set of `pid` in bytes (`VmRSS`).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// Open fds of `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Distinct store objects `pid` has mapped.
fn mapped_objects(pid: u32, state_dir: &Path) -> BTreeSet<String> {
    let objects = state_dir.join("objects").display().to_string();
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with(&objects))
        .map(str::to_owned)
        .collect()
}

/// Bytes of every file under `dir`.
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

#[test]
fn a_thousand_reloads_under_load() {
    soak(Isolation::InProcess);
}

#[test]
fn a_thousand_reloads_under_load_in_plugin_hosts() {
    soak(Isolation::Process);
}

/// Where echo's code runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isolation {
    InProcess,
    Process,
}

/// The libraries of the store mapped by `pid` and, in the process mode, by
/// its plugin hosts: (in the daemon, in the hosts).
fn mapped_where(pid: u32, state_dir: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let in_hosts = plugin_hosts_of(pid)
        .into_iter()
        .flat_map(|h| mapped_objects(h, state_dir))
        .collect();
    (mapped_objects(pid, state_dir), in_hosts)
}

fn soak(isolation: Isolation) {
    if !require_root("a_thousand_reloads_under_load (counts broken connections in the kernel)") {
        return;
    }
    let reloads = reloads();
    let series = echo_version_series(SERIES_MAJOR, 1 + WARMUP + reloads);
    let lib_size = std::fs::metadata(&series[0].1).unwrap().len();
    let d = Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        probes: "on",
        packages: vec![("echo".into(), series[0].1.clone(), series[0].0.clone())],
        extra_config: match isolation {
            Isolation::InProcess => String::new(),
            Isolation::Process => "[plugin.echo]\nisolation = \"process\"\n".to_owned(),
        },
        ..Default::default()
    });
    let pid = d.pid();
    let live = Live::start(&LiveOptions {
        tcp: vec![d.addr("echo-tcp"); 4],
        grpc: vec![d.addr("echo-grpc")],
        pause: Duration::from_millis(1),
    });
    let pkg = d.plugins_dir.join("echo");
    let mut previous_lib: Option<std::path::PathBuf> = None;
    // One reload: the package committed the operator's way, `plugvisor
    // reload` to act on it now (the watcher may get there first), the
    // previous library removed once it no longer serves.
    let mut reload = |(version, lib): &(String, std::path::PathBuf)| {
        install_package(
            &d.plugins_dir,
            "echo",
            version,
            lib,
            &PackageTweaks::default(),
        );
        let (code, out, err) = d.cli(&["reload", "echo"]);
        assert_eq!(code, 0, "reload to {version}: {out}{err}");
        assert!(
            out.contains(&format!("-> {version} in"))
                || out.contains(&format!("{version} is serving")),
            "reload to {version}: {out}"
        );
        if let Some(old) = previous_lib.take() {
            std::fs::remove_file(old).unwrap();
        }
        previous_lib = Some(pkg.join(format!("libecho-{version}-{}.so", &sha256_file(lib)[..8])));
    };
    for v in &series[1..=WARMUP] {
        reload(v);
    }
    let (rss_before, fds_before) = (rss(pid), fds(pid));
    let disk_before = disk_usage(&d.state_dir);
    let _ = live.take();

    let started = Instant::now();
    let mut rss_settled = rss_before;
    for (i, v) in series[WARMUP + 1..].iter().enumerate() {
        assert!(
            started.elapsed() < SOAK_BOUND,
            "only {i} reloads in {SOAK_BOUND:?}"
        );
        reload(v);
        if (i + 1) % 250 == 0 || i + 1 == reloads / 2 {
            // Growth that levels off is the allocator settling; growth in
            // step with the reloads is a leak.
            if i + 1 == reloads / 2 {
                rss_settled = rss(pid);
            }
            eprintln!(
                "soak: RSS after {} reloads: {:.1} MiB",
                i + 1,
                rss(pid) as f64 / f64::from(1 << 20)
            );
        }
    }
    let took = started.elapsed();
    let last = &series.last().unwrap().0;

    // The clients were answered throughout, by the versions as they came.
    let tally = live.stop();
    assert!(
        tally.errors.is_empty(),
        "client errors: {:#?}",
        tally.errors
    );
    let published: BTreeSet<String> = series.iter().map(|(v, _)| v.clone()).collect();
    assert!(tally.versions.is_subset(&published), "{:?}", tally.versions);
    assert!(tally.versions.contains(last), "the last version answered");
    // Connections the clients closed settle before fds are counted.
    wait_until(
        Instant::now() + Duration::from_secs(10),
        "fds back where they were",
        || fds(pid) <= fds_before,
    );
    let (rss_after, fds_after) = (rss(pid), fds(pid));
    let disk_after = disk_usage(&d.state_dir);
    if isolation == Isolation::Process {
        // A retired host is told to stop and given a grace to do so.
        wait_until(
            Instant::now() + Duration::from_secs(10),
            "retired plugin hosts gone",
            || d.plugin_hosts().len() as u64 <= KEEP_LOADED,
        );
    }
    let (mapped, in_hosts) = mapped_where(pid, &d.state_dir);
    let m = d.metrics();
    let broken = m.sum("plugvisor_reload_broken_connections_total", &[]);
    let successes = d.reloads("echo", "success");
    let errors: Vec<String> = d
        .log_lines()
        .iter()
        .filter(|l| l["level"] == "ERROR")
        .map(ToString::to_string)
        .collect();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "soak ({isolation:?}): {reloads} reloads in {took:.1?} ({:.1} reloads/s) under {} answered frames ({:.0}/s); \
         RSS {:.1} -> {:.1} MiB (budget +{:.1} MiB: {KEEP_LOADED} x {:.2} MiB library + {:.0} MiB); \
         fds {fds_before} -> {fds_after}; {} objects mapped in the daemon, {} in {} plugin hosts; state_dir {:.1} -> {:.1} MiB \
         (+{:.1} KiB per reload); kernel-broken connections {broken}",
        reloads as f64 / took.as_secs_f64(),
        tally.frames,
        tally.frames as f64 / took.as_secs_f64(),
        mib(rss_before),
        mib(rss_after),
        mib(KEEP_LOADED * lib_size + RSS_ALLOWANCE),
        mib(lib_size),
        mib(RSS_ALLOWANCE),
        mapped.len(),
        in_hosts.len(),
        d.plugin_hosts().len(),
        mib(disk_before),
        mib(disk_after),
        (disk_after - disk_before) as f64 / 1024.0 / reloads as f64,
    );

    assert_eq!(
        successes,
        (1 + WARMUP + reloads) as u64,
        "every version was taken once"
    );
    assert_eq!(broken, 0.0, "the kernel saw no connection break");
    // The store keeps what the refs name (a bounded history of 16 per
    // plugin) and what is mapped; the rest is collected. The journal grows
    // by a line or two per reload.
    let disk_bound = (16 + KEEP_LOADED) * lib_size + (1 << 20);
    assert!(
        disk_after.saturating_sub(disk_before) <= disk_bound,
        "state_dir grew by {:.1} MiB over {reloads} reloads, more than the {:.1} MiB the store may keep",
        mib(disk_after - disk_before),
        mib(disk_bound)
    );
    assert!(
        m.get("plugvisor_probe_up", &[("probe", "inet_sock_set_state")]) == Some(1.0),
        "the probe watched all along"
    );
    assert!(errors.is_empty(), "error lines in the log: {errors:#?}");
    match isolation {
        Isolation::InProcess => assert!(
            mapped.len() as u64 <= KEEP_LOADED,
            "at most {KEEP_LOADED} versions mapped, found {}: {mapped:#?}",
            mapped.len()
        ),
        Isolation::Process => {
            assert!(
                mapped.is_empty(),
                "the daemon maps no plugin library: {mapped:#?}"
            );
            let hosts = d.plugin_hosts();
            assert!(
                !hosts.is_empty() && hosts.len() as u64 <= KEEP_LOADED,
                "1 to {KEEP_LOADED} plugin hosts left after {reloads} reloads, found {hosts:?}"
            );
            assert_eq!(
                in_hosts.len(),
                hosts.len(),
                "each host maps its own version, and only it: {in_hosts:#?}"
            );
            assert_eq!(
                d.metrics().sum(
                    "plugvisor_plugin_host_restarts_total",
                    &[("plugin", "echo")]
                ),
                0.0,
                "no host died on its own"
            );
        }
    }
    match isolation {
        Isolation::InProcess => assert!(
            rss_after <= rss_before + KEEP_LOADED * lib_size + RSS_ALLOWANCE,
            "RSS grew from {:.1} to {:.1} MiB",
            mib(rss_before),
            mib(rss_after)
        ),
        // No library is mapped in the daemon; what it does per host
        // (a spawn from the blocking pool, a reaper, a cgroup made and
        // removed on a thread of its own) settles over the first
        // thousand or so (+4.5 MiB seen here, flat from ~1500 on over a
        // 3000-reload run): the second half may grow by no more than the
        // allowance and that settling's tail — 6 KiB a reload is caught.
        Isolation::Process => assert!(
            rss_after <= rss_settled + PROCESS_RSS_ALLOWANCE,
            "RSS grew from {:.1} MiB after {} reloads to {:.1} MiB after {reloads}",
            mib(rss_settled),
            reloads / 2,
            mib(rss_after)
        ),
    }
    assert!(fds_after <= fds_before, "fds {fds_before} -> {fds_after}");
    let s = assert_state_consistent(&d.state_dir);
    assert_eq!(s.active_version("echo"), Some(last.as_str()));
    assert!(s.temp_files.is_empty(), "{:?}", s.temp_files);
}
