//! `plugvisor-bench`: the measurements behind `docs/BENCHMARKS.md`, run by
//! `cargo xtask bench`.
//!
//! Every comparison is made side by side in one run, alternating the two
//! sides trial by trial so drift on this noisy 2-core machine hits both
//! alike; results are medians over trials. Nothing here asserts a time.
//!
//! Measures so far:
//! * probe overhead — throughput of a loopback connect/send/close storm and
//!   of gRPC unary calls with every eBPF probe attached vs none;
//! * reload latency — manifest commit to new version serving, per phase, and
//!   the kernel-measured reload window, from plugvisor's own histograms.
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use plugvisor_tests::pb::Request;
use plugvisor_tests::pb::plugin_client::PluginClient;
use plugvisor_tests::{
    Daemon, DaemonOptions, ListenerSpec, PackageTweaks, build_echo_version, install_package,
    wait_until,
};

struct Args {
    quick: bool,
    out: Option<std::path::PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--out" => args.out = it.next().map(Into::into),
            other => {
                eprintln!(
                    "usage: plugvisor-bench [--quick] [--out FILE]; unknown argument {other}"
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Overhead {
    tcp: [Vec<f64>; 2],
    grpc: [Vec<f64>; 2],
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
            o.tcp[side].push(tcp_storm(daemon.addr("echo-tcp"), 2, dur));
            o.grpc[side].push(grpc_unary(daemon.addr("echo-grpc"), 8, dur));
            eprintln!(
                "probe overhead trial {trial} probes {mode}: tcp {:.0}/s grpc {:.0}/s",
                o.tcp[side].last().unwrap(),
                o.grpc[side].last().unwrap()
            );
        }
    }
    o
}

struct ReloadLatency {
    reloads: usize,
    rows: Vec<(String, f64, f64, f64)>,
}

fn reload_latency(quick: bool) -> ReloadLatency {
    let reloads = if quick { 5 } else { 100 };
    let versions: Vec<String> = (1..=reloads).map(|i| format!("3.0.{i}")).collect();
    let libs: Vec<_> = versions.iter().map(|v| build_echo_version(v)).collect();
    let daemon = Daemon::start(DaemonOptions::default());
    for (v, lib) in versions.iter().zip(&libs) {
        install_package(
            &daemon.plugins_dir,
            "echo",
            v,
            lib,
            &PackageTweaks::default(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        wait_until(deadline, "reload", || {
            daemon.metrics().get(
                "plugvisor_plugin_info",
                &[("plugin", "echo"), ("version", v), ("state", "active")],
            ) == Some(1.0)
        });
    }
    let m = daemon.metrics();
    let mut rows = Vec::new();
    for phase in ["verify", "stage", "load", "init", "switch", "total"] {
        let l = [("plugin", "echo"), ("phase", phase)];
        let q = |q| {
            m.quantile("plugvisor_reload_duration_seconds", &l, q)
                .unwrap_or(f64::NAN)
                * 1e6
        };
        rows.push((format!("userspace: {phase}"), q(0.5), q(0.99), f64::NAN));
    }
    let l = [("plugin", "echo")];
    let q = |q| {
        m.quantile("plugvisor_kernel_reload_duration_seconds", &l, q)
            .unwrap_or(f64::NAN)
            * 1e6
    };
    let mean = m.sum("plugvisor_kernel_reload_duration_seconds_sum", &l)
        / m.sum("plugvisor_kernel_reload_duration_seconds_count", &l)
        * 1e6;
    rows.push((
        "kernel: reload window (uprobe to uprobe)".into(),
        q(0.5),
        q(0.99),
        mean,
    ));
    ReloadLatency { reloads, rows }
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

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

fn main() {
    let args = parse_args();
    let started = Instant::now();
    let overhead = probe_overhead(args.quick);
    let reload = reload_latency(args.quick);
    let trials = if args.quick { 1 } else { 7 };
    let mut breach_1s = breach_to_rollback("1s", trials);
    let mut breach_250 = breach_to_rollback("250ms", trials);

    let mut md = String::new();
    let command = if args.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Produced by `{command}` on {} (took {:.0} s).",
        machine(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        md,
        "Medians over trials; sides alternate trial by trial. No test asserts any of these times.\n"
    );

    let _ = writeln!(md, "## Probe overhead\n");
    let _ = writeln!(
        md,
        "Throughput with every eBPF probe attached (`[probes] mode = \"on\"`) vs none (`\"off\"`), \
         {} trial(s) of {:.1} s per side. Goal: ≥ 97 %.\n",
        overhead.trials,
        overhead.dur.as_secs_f64()
    );
    let _ = writeln!(md, "| workload | probes off | probes on | ratio on/off |");
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    let mut o = overhead;
    for (name, sides) in [
        (
            "loopback connect/send/close storm (2 threads), conn/s",
            &mut o.tcp,
        ),
        (
            "gRPC unary Invoke (8 in flight, 1 channel), calls/s",
            &mut o.grpc,
        ),
    ] {
        let off = median(&mut sides[0]);
        let on = median(&mut sides[1]);
        let _ = writeln!(
            md,
            "| {name} | {off:.0} | {on:.0} | {:.1} % |",
            on / off * 100.0
        );
    }

    let _ = writeln!(md, "\n## Breach → rollback\n");
    let _ = writeln!(
        md,
        "A version that fails every request replaces a known-good one under a client sending without pause; \
         an error rule (`increase(plugvisor_requests_total{{outcome=\\\"error\\\"}}) > 3`, action rollback) brings \
         the known-good version back. Measured on the client from the answer that took the error count over \
         the threshold to the first answer of the known-good version; {trials} trial(s) per tick. Goal: ≤ 1 s at \
         the default tick, ≤ 300 ms at 250 ms.\n"
    );
    let _ = writeln!(md, "| evaluation_interval | median ms | max ms |");
    let _ = writeln!(md, "| --- | ---: | ---: |");
    for (tick, v) in [("1s (default)", &mut breach_1s), ("250ms", &mut breach_250)] {
        let med = median(v) * 1e3;
        let max = v.iter().copied().fold(0.0, f64::max) * 1e3;
        let _ = writeln!(md, "| {tick} | {med:.0} | {max:.0} |");
    }
    let _ = writeln!(
        md,
        "\nThe floor is the tick: a breach waits for the next evaluation (on average half a tick), then the \
         rollback itself is a pointer swap plus an fsynced journal entry."
    );
    let _ = writeln!(
        md,
        "\n## Reload latency (echo plugin, {} reloads, no client load)\n",
        reload.reloads
    );
    let _ = writeln!(md, "| measure | p50 µs | p99 µs | mean µs |");
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    for (name, p50, p99, mean) in &reload.rows {
        let mean = if mean.is_nan() {
            "—".to_owned()
        } else {
            format!("{mean:.1}")
        };
        let _ = writeln!(md, "| {name} | {p50:.1} | {p99:.1} | {mean} |");
    }
    let _ = writeln!(
        md,
        "\nQuantiles come from plugvisor's own Prometheus histograms (doubling buckets from 10 µs), \
         interpolated within a bucket as PromQL's `histogram_quantile` does."
    );

    print!("{md}");
    if let Some(out) = args.out {
        std::fs::write(&out, &md).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
        eprintln!("wrote {}", out.display());
    }
}
