//! Reload latency without client load: a daemon reloads a series of
//! versions of one plugin, and its own `reloaded` log lines and the
//! observer's kernel-measured windows say what each reload cost. Also the
//! floors those figures are held against: one sha256, write and fsync
//! pass over the same library.
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, ListenerSpec, PackageTweaks, build_sized_plugin, echo_version_series,
    install_package, library_version_series, target_dir, wait_until,
};

use crate::stats::Dist;

/// The phases of the daemon's `reloaded` log line, in order.
pub const PHASES: [&str; 7] = [
    "verify", "stage", "load", "init", "switch", "publish", "total",
];

/// One successful reload as the daemon logged it (nanoseconds).
#[derive(Debug, Clone)]
pub struct Reload {
    /// The daemon's reload sequence number, which pairs the line with the
    /// observer's kernel-measured window.
    pub seq: u64,
    /// Nanoseconds per phase, in the order of [`PHASES`].
    pub phases: [f64; 7],
    /// The reload window as the daemon timed it, from before the begin
    /// marker returns to after the end marker is called: the span the
    /// kernel's uprobes on those markers time as well.
    pub window: f64,
    /// When the line was logged (seconds since the Unix epoch) and how
    /// long the whole attempt had taken by then (seconds).
    pub logged_unix: f64,
    /// See `logged_unix`.
    pub attempt: f64,
}

/// Seconds since the Unix epoch of an RFC 3339 UTC timestamp as the
/// daemon's JSON log writes it (`2025-01-02T03:04:05.678901Z`).
fn unix_seconds(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

impl Reload {
    /// One phase by its name in [`PHASES`].
    pub fn phase(&self, name: &str) -> f64 {
        self.phases[PHASES.iter().position(|p| *p == name).expect("known phase")]
    }
}

/// Every `reloaded` line of the daemon's log, oldest first.
pub fn reload_records(d: &Daemon) -> Vec<Reload> {
    d.log_lines()
        .iter()
        .filter(|l| l["fields"]["message"] == "reloaded")
        .filter_map(|l| {
            let f = &l["fields"];
            let ns = |k: &str| f[format!("{k}_ns")].as_u64().map(|v| v as f64);
            let mut phases = [0.0; 7];
            for (i, p) in PHASES.iter().enumerate() {
                phases[i] = ns(p)?;
            }
            Some(Reload {
                seq: f["seq"].as_u64()?,
                phases,
                window: ns("window")?,
                logged_unix: l["timestamp"].as_str().and_then(unix_seconds)?,
                attempt: ns("attempt")? / 1e9,
            })
        })
        .collect()
}

/// The kernel-measured window of each reload, by `seq` (the observer's
/// debug lines).
pub fn kernel_windows(d: &Daemon) -> HashMap<u64, f64> {
    d.log_lines()
        .iter()
        .filter(|l| l["fields"]["message"] == "kernel-measured reload window")
        .filter_map(|l| {
            let f = &l["fields"];
            Some((f["reload_seq"].as_u64()?, f["window_ns"].as_u64()? as f64))
        })
        .collect()
}

/// The daemon's own log filter plus the observer's per-reload lines.
pub fn bench_log_env() -> Vec<(String, String)> {
    vec![(
        "PLUGVISOR_LOG".into(),
        "info,plugvisor::probes::observer=debug".into(),
    )]
}

/// Reloads of one plugin, no client load.
pub struct ReloadRun {
    /// What the report calls the run (plugin or size).
    pub label: String,
    /// A library of the series (for the floor measurements).
    pub lib: Option<PathBuf>,
    /// Size of the series' first library: sizes differ by a few bytes
    /// within a series.
    pub bytes: u64,
    /// Every reload the daemon logged.
    pub reloads: Vec<Reload>,
    /// The kernel-measured window of each reload, by `seq`.
    pub kernel: HashMap<u64, f64>,
}

impl ReloadRun {
    /// The distribution of one phase over the run.
    pub fn phase(&self, name: &str) -> Dist {
        Dist::of(
            &self
                .reloads
                .iter()
                .map(|r| r.phase(name))
                .collect::<Vec<_>>(),
        )
    }

    /// The switch alone: the reload window (dlopen, checks, init, swap, and
    /// the slot's bookkeeping), after verification and staging.
    pub fn window(&self) -> Dist {
        Dist::of(&self.reloads.iter().map(|r| r.window).collect::<Vec<_>>())
    }

    /// The switch alone: dlopen and checks, init, the swap — what a
    /// version change costs once verification and staging are done. The
    /// reload window around it also holds the two marker calls (and with
    /// probes attached their uprobe traps) and the slot's bookkeeping.
    pub fn switch_alone(&self) -> Dist {
        Dist::of(
            &self
                .reloads
                .iter()
                .map(|r| r.phase("load") + r.phase("init") + r.phase("switch"))
                .collect::<Vec<_>>(),
        )
    }

    /// Userspace window minus kernel window, per reload seen by both.
    pub fn user_minus_kernel(&self) -> Vec<f64> {
        self.reloads
            .iter()
            .filter_map(|r| self.kernel.get(&r.seq).map(|k| r.window - k))
            .collect()
    }
}

/// Flushes every dirty page to disk: writing a series of hundreds of
/// megabytes just before a run would otherwise leave the kernel's
/// writeback throttling on every write the run makes.
pub fn settle_writeback() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// Installs every library of `series` (ascending versions) in turn and
/// waits for each to serve.
fn reload_run(
    label: &str,
    plugin: &str,
    base: (&Path, &str),
    series: &[(String, PathBuf)],
) -> ReloadRun {
    settle_writeback();
    let daemon = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("bench-tcp", plugin)],
        packages: vec![(plugin.into(), base.0.to_owned(), base.1.into())],
        env: bench_log_env(),
        ..Default::default()
    });
    for (v, lib) in series {
        install_package(
            &daemon.plugins_dir,
            plugin,
            v,
            lib,
            &PackageTweaks::default(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        wait_until(deadline, "reload", || {
            daemon.metrics().get(
                "plugvisor_plugin_info",
                &[("plugin", plugin), ("version", v), ("state", "active")],
            ) == Some(1.0)
        });
    }
    // The kernel's events cross the ring buffer a moment later.
    std::thread::sleep(Duration::from_millis(300));
    let bytes = series
        .first()
        .and_then(|(_, p)| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let run = ReloadRun {
        label: label.into(),
        lib: series.first().map(|(_, p)| p.clone()),
        bytes,
        reloads: reload_records(&daemon),
        kernel: kernel_windows(&daemon),
    };
    eprintln!(
        "reload latency {label}: {} reloads, total p50 {:.0} µs p99 {:.0} µs",
        run.reloads.len(),
        run.phase("total").p50 / 1e3,
        run.phase("total").p99 / 1e3
    );
    run
}

/// Sizes of the `sized` fixture and of the Go peer: (label, Rust funcs,
/// Rust data KiB, Go funcs, Go data KiB), calibrated so the files land at
/// about 2.1 MB and 8.4 MB (the report prints the real sizes).
pub fn sizes(quick: bool) -> Vec<(&'static str, usize, usize, usize, usize)> {
    if quick {
        // The harness end to end, on small builds CI can afford.
        vec![("small", 64, 64, 50, 64)]
    } else {
        vec![
            ("2.1 MB", 1500, 925, 400, 200),
            ("8.4 MB", 6000, 4895, 4000, 3690),
        ]
    }
}

/// The `sized` fixture's reloads at each of [`sizes`].
pub fn sized_runs(quick: bool) -> Vec<ReloadRun> {
    let reloads = if quick { 5 } else { 100 };
    sizes(quick)
        .into_iter()
        .enumerate()
        .map(|(i, (label, funcs, data_kb, _, _))| {
            let major = 20 + i as u64;
            let base_version = format!("{major}.0.100000");
            let base = build_sized_plugin(&base_version, funcs, data_kb);
            let prefix = format!("libsized-{funcs}f-{data_kb}k");
            let series = library_version_series(&base, &prefix, major, reloads);
            reload_run(label, "sized", (&base, &base_version), &series)
        })
        .collect()
}

/// The echo plugin's reloads: its library is the smallest, so the daemon's
/// own share of a reload shows with little hashing and copying around it.
pub fn echo_run(quick: bool) -> ReloadRun {
    let reloads = if quick { 5 } else { 100 };
    let series = echo_version_series(3, reloads);
    let base = plugvisor_tests::build_echo_version("3.0.100000");
    reload_run("echo", "echo", (&base, "3.0.100000"), &series)
}

/// What one pass over a library costs on this machine, in isolation:
/// sha256 of the bytes in memory, writing them to a new file, fsync
/// (nanoseconds, medians).
#[derive(Debug, Clone, Copy)]
pub struct Costs {
    /// sha256 of the bytes in memory.
    pub sha: f64,
    /// Writing them to a new file (page cache; writeback throttling
    /// included when the disk is busy).
    pub write: f64,
    /// fsync of that file.
    pub fsync: f64,
}

/// [`Costs`] of `lib`, 15 passes.
pub fn pass_costs(lib: &Path) -> Costs {
    use sha2::Digest as _;
    settle_writeback();
    let bytes = std::fs::read(lib).expect("reading a library");
    let dir = tempfile::tempdir_in(target_dir()).expect("temp dir");
    let (mut sha, mut write, mut fsync) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..15 {
        let t = Instant::now();
        std::hint::black_box(sha2::Sha256::digest(&bytes));
        sha.push(t.elapsed().as_nanos() as f64);
        let path = dir.path().join(format!("copy-{i}"));
        let t = Instant::now();
        let mut f = std::fs::File::create(&path).expect("creating a copy");
        f.write_all(&bytes).expect("writing a copy");
        write.push(t.elapsed().as_nanos() as f64);
        let t = Instant::now();
        f.sync_all().expect("fsync");
        fsync.push(t.elapsed().as_nanos() as f64);
    }
    Costs {
        sha: Dist::of(&sha).p50,
        write: Dist::of(&write).p50,
        fsync: Dist::of(&fsync).p50,
    }
}
