//! `plugvisor-bench`: the measurements behind `docs/BENCHMARKS.md` and
//! `docs/plots/`, run by `cargo xtask bench`.
//!
//! Every comparison is made side by side in one run, alternating the two
//! sides trial by trial where there are trials, so drift on this noisy
//! 2-core machine hits both alike. Nothing here asserts a time.
//!
//! Measures:
//! * probe overhead — throughput of a loopback connect/send/close storm and
//!   of gRPC unary calls with every eBPF probe attached vs none, and the
//!   probes' own CPU time in the same workloads from the kernel's BPF
//!   run-time statistics (`probecost.rs`);
//! * reload latency — manifest read to new version serving, per phase, for
//!   the echo plugin and the `sized` fixture at about 2.1 MB and 8.4 MB,
//!   per reload from the daemon's `reloaded` log lines, and the kernel's
//!   uprobe-to-uprobe window for the same reloads; beside it the seed's
//!   mechanism, Go's `plugin.Open`, on Go plugins of the same sizes;
//! * in process (`supervisor/examples/bench_inprocess.rs`): slot dispatch
//!   vs a direct call, the swap and the gap a dispatching thread sees
//!   across it, `/metrics` encoding with 50 plugins × 10 listeners;
//! * 1000 reloads under TCP frames and open gRPC streams — failed
//!   requests, the kernel's broken-connection count, RSS and fds — and the
//!   naive upgrade (SIGTERM, start the new version) under the same load;
//! * breach → rollback at the default and a fast rule tick.
mod charts;
mod gopeer;
mod load;
mod plot;
mod probecost;
mod reload;
mod report;
mod stats;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plugvisor_tests::pb::Request;
use plugvisor_tests::pb::plugin_client::PluginClient;
use plugvisor_tests::{
    Daemon, DaemonOptions, ListenerSpec, PackageTweaks, echo_version_series, install_package,
    target_dir, wait_until,
};
use reload::{
    Reload, ReloadRun, bench_log_env, kernel_windows, reload_records, settle_writeback, sizes,
};
use stats::Dist;

struct Args {
    quick: bool,
    out: Option<PathBuf>,
    plots: Option<PathBuf>,
    inprocess: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        out: None,
        plots: None,
        inprocess: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = it.next().map(Into::into),
            "--plots" => args.plots = it.next().map(Into::into),
            "--inprocess" => args.inprocess = it.next().map(Into::into),
            other => {
                eprintln!(
                    "usage: plugvisor-bench [--quick] [--out FILE] [--plots DIR] [--inprocess BIN]; unknown argument {other}"
                );
                std::process::exit(2);
            }
        }
    }
    args
}

/// Connections opened, used for one frame and closed, for `dur`, on `threads` threads.
fn tcp_storm(addr: SocketAddr, threads: usize, dur: Duration) -> f64 {
    let deadline = Instant::now() + dur;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let Ok(mut s) = TcpStream::connect(addr) else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    if s.write_all(b"storm\n").is_err() {
                        continue;
                    }
                    let mut line = String::new();
                    if BufReader::new(&s).read_line(&mut line).is_ok_and(|n| n > 0) {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / dur.as_secs_f64()
}

/// Unary `Invoke` calls for `dur` from `concurrency` tasks on one channel.
fn grpc_unary(addr: SocketAddr, concurrency: usize, dur: Duration) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + dur;
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let mut client = PluginClient::new(channel.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while tokio::time::Instant::now() < deadline {
                        if client
                            .invoke(Request {
                                payload: b"unary".to_vec(),
                            })
                            .await
                            .is_ok()
                        {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total as f64 / dur.as_secs_f64()
    })
}

struct Overhead {
    tcp: [Vec<f64>; 2],
    grpc: [Vec<f64>; 2],
    // Workload CPU nanoseconds per operation (see probecost::workload_cpu_ns).
    tcp_cpu: [Vec<f64>; 2],
    grpc_cpu: [Vec<f64>; 2],
    trials: usize,
    dur: Duration,
}

fn probe_overhead(quick: bool) -> Overhead {
    let (trials, dur) = if quick {
        (1, Duration::from_millis(500))
    } else {
        (5, Duration::from_secs(3))
    };
    let mut o = Overhead {
        tcp: [Vec::new(), Vec::new()],
        grpc: [Vec::new(), Vec::new()],
        tcp_cpu: [Vec::new(), Vec::new()],
        grpc_cpu: [Vec::new(), Vec::new()],
        trials,
        dur,
    };
    for trial in 0..trials {
        // Alternate which side goes first, so slow drift favours neither.
        let order = if trial % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let mode = if side == 0 { "off" } else { "on" };
            let daemon = Daemon::start(DaemonOptions {
                listeners: vec![
                    ListenerSpec::tcp("echo-tcp", "echo"),
                    ListenerSpec::grpc("echo-grpc", "echo"),
                ],
                probes: mode,
                ..Default::default()
            });
            if side == 1 {
                let m = daemon.metrics();
                let down: Vec<_> = m
                    .matching("plugvisor_probe_up", &[])
                    .filter(|(_, v)| (*v - 1.0).abs() > f64::EPSILON)
                    .collect();
                assert!(down.is_empty(), "probes not all up with mode on: {down:?}");
            }
            let pid = daemon.pid();
            let (rate, cpu) =
                probecost::with_cpu(pid, dur, || tcp_storm(daemon.addr("echo-tcp"), 2, dur));
            o.tcp[side].push(rate);
            o.tcp_cpu[side].push(cpu);
            let (rate, cpu) =
                probecost::with_cpu(pid, dur, || grpc_unary(daemon.addr("echo-grpc"), 8, dur));
            o.grpc[side].push(rate);
            o.grpc_cpu[side].push(cpu);
            eprintln!(
                "probe overhead trial {trial} probes {mode}: tcp {:.0}/s grpc {:.0}/s",
                o.tcp[side].last().unwrap(),
                o.grpc[side].last().unwrap()
            );
        }
    }
    o
}

/// Breach → rollback: a version that fails every request after its first
/// few is installed under live traffic with an error rule; measured on the
/// client from the moment the error count crossed the threshold to the
/// first answer from the known-good version.
fn breach_to_rollback(interval: &str, trials: usize) -> Vec<f64> {
    const THRESHOLD: u32 = 3;
    let bad = plugvisor_tests::build_plugin_version(
        "plugvisor-fixture-fail-after",
        "fixture_fail_after",
        "2.0.0",
    );
    let mut out = Vec::new();
    for _ in 0..trials {
        let rules = format!(
            "evaluation_interval = \"{interval}\"\n[[rule]]\nname = \"errors\"\nmetric = \"plugvisor_requests_total\"\nlabels = {{ plugin = \"echo\", outcome = \"error\" }}\nfunction = \"increase\"\nwindow = \"30s\"\nop = \">\"\nthreshold = {THRESHOLD}\naction = \"rollback\"\ncooldown = \"0s\"\n"
        );
        let daemon = Daemon::start(DaemonOptions {
            probes: "off",
            trial: "3s",
            thresholds: Some(rules),
            env: vec![("PLUGVISOR_FIXTURE_FAIL_AFTER".into(), "0".into())],
            ..Default::default()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        wait_until(deadline, "1.0.0 known-good", || {
            daemon.status()["plugins"][0]["state"] == "known-good"
        });
        let mut c = plugvisor_tests::LineClient::connect(daemon.addr("echo-tcp")).unwrap();
        install_package(
            &daemon.plugins_dir,
            "echo",
            "2.0.0",
            &bad,
            &PackageTweaks::default(),
        );
        let mut errors = 0;
        let mut crossed = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no rollback within 20 s");
            let r = c.call("x").unwrap();
            if r.starts_with("ERR") {
                errors += 1;
                if errors == THRESHOLD + 1 {
                    crossed = Some(Instant::now());
                }
            } else if r.starts_with("[echo 1.0.0]")
                && let Some(t) = crossed
            {
                out.push(t.elapsed().as_secs_f64());
                break;
            }
        }
    }
    out
}

/// Go's `plugin.Open`, one open per fresh process, alternating sizes.
struct GoRun {
    label: String,
    bytes: u64,
    open_ns: Vec<f64>,
}

fn go_peer(quick: bool) -> Result<Vec<GoRun>, String> {
    plugvisor_tests::tool("go")?;
    let loader = gopeer::loader()?;
    let runs = if quick { 3 } else { 60 };
    let mut out = Vec::new();
    let mut plugins = Vec::new();
    for (label, _, _, funcs, data_kb) in sizes(quick) {
        let p = gopeer::plugin(funcs, data_kb)?;
        // Warm the page cache, as the Rust side's libraries are.
        gopeer::open_once(&loader, &p.path)?;
        out.push(GoRun {
            label: label.into(),
            bytes: p.bytes,
            open_ns: Vec::new(),
        });
        plugins.push(p.path);
    }
    for _ in 0..runs {
        for (run, path) in out.iter_mut().zip(&plugins) {
            run.open_ns.push(gopeer::open_once(&loader, path)?);
        }
    }
    for r in &out {
        let d = Dist::of(&r.open_ns);
        eprintln!(
            "go plugin.Open {} ({} bytes): p50 {:.0} µs p99 {:.0} µs",
            r.label,
            r.bytes,
            d.p50 / 1e3,
            d.p99 / 1e3
        );
    }
    Ok(out)
}

/// The in-process measurements (a JSON object), or why they were skipped.
fn inprocess(
    bin: Option<&Path>,
    stage_libs: &[PathBuf],
    quick: bool,
) -> Result<serde_json::Value, String> {
    let bin = bin.map_or_else(
        || target_dir().join("examples/bench_inprocess"),
        Path::to_path_buf,
    );
    if !bin.is_file() {
        return Err(format!(
            "{} missing: `cargo build --release -p plugvisor --example bench_inprocess` (cargo xtask bench does)",
            bin.display()
        ));
    }
    let mut c = std::process::Command::new(&bin);
    // The version-series base: its version string leaves room for
    // distinct same-length versions (see the example's `version_copy`).
    c.arg(plugvisor_tests::build_echo_version("3.0.100000"));
    if quick {
        c.arg("--quick");
    }
    for lib in stage_libs {
        c.arg("--stage").arg(lib);
    }
    let out = c
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{} printed no JSON: {e}", bin.display()))
}

fn values(v: &serde_json::Value) -> Vec<f64> {
    v["values"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default()
}

/// A kB field of `/proc/PID/status` (`VmRSS`, `RssAnon`, …).
fn status_kb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn rss_kb(pid: u32) -> f64 {
    status_kb(pid, "VmRSS")
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Distinct store objects mapped into the process.
fn mapped_objects(pid: u32) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut paths: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("/objects/"))
        .collect();
    paths.sort_unstable();
    paths.dedup();
    paths.len()
}

/// The load both the soak and the naive peer run under.
fn shape(quick: bool) -> load::Shape {
    if quick {
        load::Shape {
            tcp_conns: 2,
            tcp_rate: 500,
            streams: 1,
            stream_rate: 200,
        }
    } else {
        load::Shape {
            tcp_conns: 8,
            tcp_rate: 750,
            streams: 4,
            stream_rate: 250,
        }
    }
}

fn two_listeners() -> Vec<ListenerSpec> {
    vec![
        ListenerSpec::tcp("echo-tcp", "echo"),
        ListenerSpec::grpc("echo-grpc", "echo"),
    ]
}

struct Soak {
    reloads: usize,
    load: load::Report,
    records: Vec<Reload>,
    kernel: HashMap<u64, f64>,
    broken: f64,
    resets_sent: f64,
    goaway: f64,
    rst_stream: f64,
    probes_up: bool,
    idle_rss_kb: f64,
    before_rss_kb: f64,
    after_rss_kb: f64,
    before_fds: usize,
    after_fds: usize,
    mapped_after: usize,
    lib_bytes: u64,
    /// Seconds since the load started at which each reload was committed.
    commits: Vec<f64>,
    /// The load's start, seconds since the Unix epoch.
    start_unix: f64,
    /// (reloads done, RSS kB, anonymous RSS kB, fds), every 100 reloads.
    samples: Vec<(usize, f64, f64, usize)>,
}

fn soak(quick: bool) -> Soak {
    let reloads = if quick { 10 } else { 1000 };
    let series = echo_version_series(7, reloads);
    settle_writeback();
    let daemon = Daemon::start(DaemonOptions {
        listeners: two_listeners(),
        env: bench_log_env(),
        ..Default::default()
    });
    let pid = daemon.pid();
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss_kb = rss_kb(pid);
    let success = |d: &Daemon| {
        d.metrics().sum(
            "plugvisor_reloads_total",
            &[("plugin", "echo"), ("outcome", "success")],
        )
    };
    let base = success(&daemon);
    let load = load::Load::start(
        daemon.addr("echo-tcp"),
        daemon.addr("echo-grpc"),
        shape(quick),
    );
    std::thread::sleep(Duration::from_millis(500));
    let before_rss_kb = rss_kb(pid);
    let before_fds = fds(pid);
    let mut commits = Vec::with_capacity(reloads);
    let mut samples = vec![(0, before_rss_kb, status_kb(pid, "RssAnon"), before_fds)];
    for (i, (v, lib)) in series.iter().enumerate() {
        commits.push(load.start.elapsed().as_secs_f64());
        install_package(
            &daemon.plugins_dir,
            "echo",
            v,
            lib,
            &PackageTweaks::default(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let want = base + (i + 1) as f64;
        wait_until(deadline, "reload under load", || {
            let done = success(&daemon) >= want;
            if !done {
                std::thread::sleep(Duration::from_millis(5));
            }
            done
        });
        if (i + 1) % 100 == 0 || i + 1 == reloads {
            samples.push((i + 1, rss_kb(pid), status_kb(pid, "RssAnon"), fds(pid)));
            eprintln!("soak: {} reloads, RSS {:.0} kB", i + 1, rss_kb(pid));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let start_unix = load.start_unix;
    let report = load.finish();
    std::thread::sleep(Duration::from_millis(300));
    let m = daemon.metrics();
    let probes_up = m
        .matching("plugvisor_probe_up", &[])
        .all(|(_, v)| (v - 1.0).abs() < f64::EPSILON);
    let s = Soak {
        reloads,
        records: reload_records(&daemon),
        kernel: kernel_windows(&daemon),
        broken: m.sum("plugvisor_reload_broken_connections_total", &[]),
        resets_sent: m.sum("plugvisor_tcp_resets_total", &[("direction", "sent")]),
        goaway: m.sum("plugvisor_grpc_goaway_total", &[]),
        rst_stream: m.sum("plugvisor_grpc_stream_resets_total", &[]),
        probes_up,
        idle_rss_kb,
        before_rss_kb,
        after_rss_kb: rss_kb(pid),
        before_fds,
        after_fds: fds(pid),
        mapped_after: mapped_objects(pid),
        lib_bytes: std::fs::metadata(&series[0].1).map_or(0, |m| m.len()),
        load: report,
        commits,
        samples,
        start_unix,
    };
    eprintln!(
        "soak: {} reloads, {} answered, {} failed, broken {}, max gap {:?}",
        s.reloads,
        s.load.ok(),
        s.load.failed(),
        s.broken,
        s.load.max_gap()
    );
    s
}

struct Naive {
    restarts: usize,
    load: load::Report,
    /// SIGTERM sent → new daemon answering on every listener, seconds.
    downtime: Vec<f64>,
    /// (SIGTERM sent, new daemon answering), seconds since the load started.
    windows: Vec<(f64, f64)>,
}

/// The naive upgrade under the soak's load: SIGTERM, start the daemon with
/// the new version on the same ports, repeatedly.
fn naive_restart(quick: bool) -> Naive {
    let restarts = if quick { 1 } else { 10 };
    let series = echo_version_series(8, restarts);
    let mut daemon = Daemon::start(DaemonOptions {
        listeners: two_listeners(),
        probes: "off",
        drain_timeout: Some("2s"),
        ..Default::default()
    });
    let load = load::Load::start(
        daemon.addr("echo-tcp"),
        daemon.addr("echo-grpc"),
        shape(quick),
    );
    std::thread::sleep(Duration::from_secs(1));
    let mut downtime = Vec::new();
    let mut windows = Vec::new();
    for (v, lib) in &series {
        install_package(
            &daemon.plugins_dir,
            "echo",
            v,
            lib,
            &PackageTweaks::default(),
        );
        let t = Instant::now();
        let from = load.start.elapsed().as_secs_f64();
        daemon.stop();
        daemon.restart();
        downtime.push(t.elapsed().as_secs_f64());
        windows.push((from, load.start.elapsed().as_secs_f64()));
        std::thread::sleep(Duration::from_secs(1));
    }
    let report = load.finish();
    eprintln!(
        "naive restart: {restarts} restarts, {} answered, {} failed, {} connect errors, max gap {:?}",
        report.ok(),
        report.failed(),
        report.connect_errors(),
        report.max_gap()
    );
    Naive {
        restarts,
        load: report,
        downtime,
        windows,
    }
}

/// Everything one run measured.
struct Results {
    quick: bool,
    overhead: Overhead,
    costs: probecost::ProbeCosts,
    echo: ReloadRun,
    sized: Vec<ReloadRun>,
    go: Result<Vec<GoRun>, String>,
    inproc: Result<serde_json::Value, String>,
    soak: Soak,
    naive: Naive,
    breach_1s: Vec<f64>,
    breach_250: Vec<f64>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let args = parse_args();
    let started = Instant::now();
    let load_before = loadavg();
    let q = args.quick;
    let overhead = probe_overhead(q);
    let costs = probecost::probe_costs(q, tcp_storm, grpc_unary);
    if let Err(e) = &costs {
        eprintln!("SKIP probe run-time statistics: {e}");
    }
    let echo = reload::echo_run(q);
    let sized = reload::sized_runs(q);
    let go = go_peer(q);
    if let Err(e) = &go {
        eprintln!("SKIP Go plugin.Open peer: {e}");
    }
    let stage_libs: Vec<PathBuf> = sized.iter().filter_map(|r| r.lib.clone()).collect();
    let inproc = inprocess(args.inprocess.as_deref(), &stage_libs, q);
    if let Err(e) = &inproc {
        eprintln!("SKIP in-process measures: {e}");
    }
    let soak = soak(q);
    let naive = naive_restart(q);
    let trials = if q { 1 } else { 7 };
    let breach_1s = breach_to_rollback("1s", trials);
    let breach_250 = breach_to_rollback("250ms", trials);
    let r = Results {
        quick: q,
        overhead,
        costs,
        echo,
        sized,
        go,
        inproc,
        soak,
        naive,
        breach_1s,
        breach_250,
    };
    let plots = args
        .plots
        .clone()
        .unwrap_or_else(|| target_dir().join("bench-plots"));
    let plot_note = match charts::draw(&plots, &r) {
        Ok(()) => None,
        Err(e) => {
            eprintln!("plots: {e}");
            Some(e)
        }
    };
    let command = if q {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let md = report::render(
        &r,
        &report::Meta {
            command,
            took: started.elapsed(),
            load_before,
            load_after: loadavg(),
            plots_rel: report::plots_rel(args.out.as_deref(), &plots),
            plot_note,
            quick: q,
        },
    );
    print!("{md}");
    if let Some(out) = args.out {
        std::fs::write(&out, &md).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
        eprintln!("wrote {}", out.display());
    }
}
