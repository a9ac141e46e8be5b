//! Plugin hosts (`isolation = "process"`) against the in-process modes,
//! side by side in one run, each side a fresh daemon, sides alternating:
//!
//! * one request at a time on one TCP connection — *inline* (in-process,
//!   `request_timeout = "0s"`), *bounded* (in-process, the default 5 s
//!   bound: a runner thread per call), *process* (a host, the default
//!   bound) — the round trip the client sees, so the difference of two
//!   sides is what that mode adds;
//! * throughput of the TCP storm and gRPC unary workloads (`overhead.rs`),
//!   in-process (the default) vs process;
//! * crash → first answer from the known-good version (its host warm) for
//!   a version on trial that segfaults, under 20 TCP clients and 4
//!   `Exchange` streams, with every connection they hold checked;
//! * manifest → serving (the daemon's own `reloaded` line), per mode;
//! * the resident memory of a host and of the daemon, idle.
use std::time::{Duration, Instant};

use plugvisor_tests::live::{Live, LiveOptions};
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, PackageTweaks, build_echo_version,
    build_plugin_version, install_package, wait_until,
};

use crate::overhead::{grpc_unary, tcp_storm};

/// The three ways a request can reach a plugin.
pub const SIDES: [&str; 3] = ["inline", "bounded", "process"];

/// What one run found.
#[derive(Default)]
pub struct Isolation {
    /// Round trip per call in µs, per side of [`SIDES`] (all trials).
    pub rtt_us: [Vec<f64>; 3],
    /// Storm connections/s `[in-process, process]`, one per trial.
    pub tcp: [Vec<f64>; 2],
    /// gRPC unary calls/s `[in-process, process]`.
    pub grpc: [Vec<f64>; 2],
    /// Client side: the crash's error answer to the first good answer, ms.
    pub crash_client_ms: Vec<f64>,
    /// Daemon side (`plugvisor_crash_recovery_seconds`): death to first
    /// answer, ms.
    pub crash_daemon_ms: Vec<f64>,
    /// Kernel side (`plugvisor_kernel_crash_recovery_seconds`): the host's
    /// exit (`sched_process_exit`) to the first answer, ms.
    pub crash_kernel_ms: Vec<f64>,
    /// Connections the kernel saw plugvisor close or reset across the
    /// crashes (`plugvisor_crash_broken_connections_total`).
    pub crash_kernel_broken: f64,
    /// Live client requests lost in flight, over all crash rounds.
    pub crash_lost: usize,
    /// Live client connections or streams broken, over all crash rounds.
    pub crash_broken: usize,
    /// Manifest → serving, µs, `[in-process, process]`.
    pub reload_us: [Vec<f64>; 2],
    /// A host's resident memory, KiB: (anonymous, file-backed).
    pub host_rss_kib: Vec<(u64, u64)>,
    /// The daemon's resident memory idle, KiB, `[in-process, process]`.
    pub daemon_rss_kib: [Vec<u64>; 2],
    /// Trials per side.
    pub trials: usize,
}

fn daemon(side: &str, trial: &'static str) -> Daemon {
    let tcp = ListenerSpec::tcp("echo-tcp", "echo");
    Daemon::start(DaemonOptions {
        probes: "off",
        trial,
        listeners: vec![
            if side == "inline" {
                tcp.request_timeout("0s")
            } else {
                tcp
            },
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        extra_config: if side == "process" {
            "[plugin.echo]\nisolation = \"process\"\n".into()
        } else {
            String::new()
        },
        ..Default::default()
    })
}

fn round_trips(d: &Daemon, calls: usize) -> Vec<f64> {
    let mut c = LineClient::connect(d.addr("echo-tcp")).unwrap();
    for _ in 0..calls / 10 {
        c.call("warm").unwrap();
    }
    (0..calls)
        .map(|_| {
            let t = Instant::now();
            c.call("ping").unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

/// `VmRSS`-style figures of `pid`: (RssAnon, RssFile + RssShmem) in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("RssAnon:"), field("RssFile:") + field("RssShmem:"))
}

/// Manifest → serving of 2.0.0, from the daemon's `reloaded` line.
fn reload_us(d: &Daemon) -> f64 {
    d.install_and_await(
        "echo",
        "2.0.0",
        &build_echo_version("2.0.0"),
        "2.0.0 serves",
    );
    let mut v = f64::NAN;
    wait_until(
        Instant::now() + Duration::from_secs(10),
        "its reloaded line",
        || {
            v = d
                .log_lines()
                .iter()
                .filter(|l| l["fields"]["message"] == "reloaded" && l["fields"]["to"] == "2.0.0")
                .find_map(|l| l["fields"]["total_us"].as_f64())
                .unwrap_or(f64::NAN);
            v.is_finite()
        },
    );
    v
}

/// One crash round: 1.0.0 known-good, 2.0.0 (segv) on trial crashes.
fn crash_round(r: &mut Isolation) {
    let mut d = Daemon::start(DaemonOptions {
        // The kernel's word on the crash is one of the measures.
        probes: "on",
        trial: "2s",
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        packages: vec![("echo".into(), build_echo_version("1.0.0"), "1.0.0".into())],
        extra_config: "[plugin.echo]\nisolation = \"process\"\n".into(),
        ..Default::default()
    });
    let soon = || Instant::now() + Duration::from_secs(30);
    wait_until(soon(), "1.0.0 known-good", || {
        d.status()["plugins"][0]["state"] == "known-good"
    });
    let segv = build_plugin_version("plugvisor-fixture-segv", "fixture_segv", "2.0.0");
    install_package(
        &d.plugins_dir,
        "echo",
        "2.0.0",
        &segv,
        &PackageTweaks::default(),
    );
    wait_until(soon(), "2.0.0 on trial", || {
        d.serving("echo-tcp").as_deref() == Some("2.0.0")
    });
    let live = Live::start(&LiveOptions {
        tcp: vec![d.addr("echo-tcp"); 20],
        grpc: vec![d.addr("echo-grpc"); 4],
        pause: Duration::from_millis(2),
    });
    let mut client = LineClient::connect(d.addr("echo-tcp")).unwrap();
    let err = client.call("crash").unwrap();
    let t0 = Instant::now();
    assert!(err.contains("crashed ("), "{err}");
    loop {
        let a = client.call("x").unwrap();
        if a == "[echo 1.0.0] x" {
            break;
        }
    }
    r.crash_client_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    std::thread::sleep(Duration::from_millis(200));
    let tally = live.stop();
    d.assert_running();
    r.crash_lost += tally
        .errors
        .iter()
        .filter(|e| e.contains("crashed ("))
        .count();
    r.crash_broken += tally
        .errors
        .iter()
        .filter(|e| !e.contains("crashed ("))
        .count();
    if let Some(s) = d.metrics().get(
        "plugvisor_crash_recovery_seconds_sum",
        &[("plugin", "echo")],
    ) {
        r.crash_daemon_ms.push(s * 1e3);
    }
    let kernel = |m: &plugvisor_tests::Metrics| {
        m.get(
            "plugvisor_kernel_crash_recovery_seconds_count",
            &[("plugin", "echo")],
        ) == Some(1.0)
    };
    wait_until(soon(), "the kernel's recovery time", || {
        kernel(&d.metrics())
    });
    let m = d.metrics();
    r.crash_kernel_ms.push(
        m.sum(
            "plugvisor_kernel_crash_recovery_seconds_sum",
            &[("plugin", "echo")],
        ) * 1e3,
    );
    r.crash_kernel_broken += m.sum("plugvisor_crash_broken_connections_total", &[]);
}

/// Every measure of this module.
pub fn isolation(quick: bool) -> Isolation {
    let (trials, calls, dur, rounds) = if quick {
        (1, 500, Duration::from_millis(500), 1)
    } else {
        (3, 5000, Duration::from_secs(3), 5)
    };
    let mut r = Isolation {
        trials,
        ..Isolation::default()
    };
    for trial in 0..trials {
        let mut order: Vec<usize> = (0..3).collect();
        order.rotate_left(trial % 3);
        for side in order {
            let name = SIDES[side];
            let daemon = daemon(name, "30s");
            r.rtt_us[side].extend(round_trips(&daemon, calls));
            if side != 0 {
                let i = usize::from(name == "process");
                std::thread::sleep(Duration::from_millis(300));
                r.daemon_rss_kib[i].push({
                    let (anon, file) = rss_kib(daemon.pid());
                    anon + file
                });
                if i == 1 {
                    for host in daemon.plugin_hosts() {
                        r.host_rss_kib.push(rss_kib(host));
                    }
                }
                r.tcp[i].push(tcp_storm(daemon.addr("echo-tcp"), 2, dur));
                r.grpc[i].push(grpc_unary(daemon.addr("echo-grpc"), 8, dur));
                r.reload_us[i].push(reload_us(&daemon));
            }
            eprintln!("isolation trial {trial} {name}: done");
        }
    }
    for _ in 0..rounds {
        crash_round(&mut r);
    }
    r
}

/// The markdown section.
pub fn render(md: &mut String, r: &Isolation) {
    use std::fmt::Write as _;
    let med = |v: &[f64]| crate::stats::Dist::of(v).p50;
    let _ = writeln!(md, "\n## Plugin hosts (`isolation = \"process\"`)\n");
    let _ = writeln!(
        md,
        "Echo, request `ping`, one at a time on one TCP connection over loopback: the round trip the client \
         sees, {} trial(s) per side, sides alternating, a fresh daemon each. *inline*: in-process, \
         `request_timeout = \"0s\"` (the plugin called on the connection's task); *bounded*: in-process, \
         the default bound (each call handed to a runner thread); *process*: a plugin host over a \
         socketpair, the default bound. The differences are what each mode adds to a request.\n",
        r.trials
    );
    let _ = writeln!(md, "| side | p50 µs | p99 µs | p50 − inline | goal |");
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | --- |");
    let inline = crate::stats::Dist::of(&r.rtt_us[0]);
    for (i, side) in SIDES.iter().enumerate() {
        let d = crate::stats::Dist::of(&r.rtt_us[i]);
        let goal = match *side {
            "process" => {
                let bounded = crate::stats::Dist::of(&r.rtt_us[1]).p50;
                let added = d.p50 - inline.p50;
                format!(
                    "≤ 10 µs over inline and below bounded: {}",
                    if added <= 10.0 && d.p50 < bounded {
                        "met"
                    } else {
                        "**missed**"
                    }
                )
            }
            _ => "—".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {side} | {:.1} | {:.1} | {:+.1} | {goal} |",
            d.p50,
            d.p99,
            d.p50 - inline.p50
        );
    }
    let _ = writeln!(
        md,
        "\nThroughput, in-process (the default bound) vs process, medians of {} trial(s). Goal ≥ 90 %.\n",
        r.trials
    );
    let _ = writeln!(
        md,
        "| workload | in-process | process | process/in-process |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    for (name, v) in [
        (
            "loopback connect/send/close storm (2 threads), conn/s",
            &r.tcp,
        ),
        (
            "gRPC unary Invoke (8 in flight, 1 channel), calls/s",
            &r.grpc,
        ),
    ] {
        let (a, b) = (med(&v[0]), med(&v[1]));
        let _ = writeln!(md, "| {name} | {a:.0} | {b:.0} | {:.1} % |", b / a * 100.0);
    }
    let c = crate::stats::Dist::of(&r.crash_client_ms);
    let dm = crate::stats::Dist::of(&r.crash_daemon_ms);
    let km = crate::stats::Dist::of(&r.crash_kernel_ms);
    let _ = writeln!(
        md,
        "\nCrash → first answer from the known-good version (its host warm), a version on trial \
         segfaulting in `handle` under 20 TCP clients and 4 `Exchange` streams, {} round(s), a fresh \
         daemon each. *client*: from the crash's error answer to the next good answer on the same \
         connection; *daemon*: `plugvisor_crash_recovery_seconds` (the host's reaping to the first \
         answer); *kernel*: `plugvisor_kernel_crash_recovery_seconds` (the host's exit in \
         `sched_process_exit` to the first answer's uprobe). Goal ≤ 20 ms p99, 0 connections closed.\n",
        c.n
    );
    let _ = writeln!(md, "| measure | p50 ms | p99 (max) ms |");
    let _ = writeln!(md, "| --- | ---: | ---: |");
    let _ = writeln!(md, "| client | {:.2} | {:.2} |", c.p50, c.max);
    let _ = writeln!(md, "| daemon | {:.2} | {:.2} |", dm.p50, dm.max);
    let _ = writeln!(md, "| kernel | {:.2} | {:.2} |", km.p50, km.max);
    let _ = writeln!(
        md,
        "\nLive clients over all rounds: {} requests lost in flight on the dead host (each answered \
         `crashed (SIGSEGV)`), **{} connections or streams broken**; the kernel counted **{} \
         connections closed or reset by plugvisor** across the crashes \
         (`plugvisor_crash_broken_connections_total`).\n",
        r.crash_lost, r.crash_broken, r.crash_kernel_broken
    );
    render_costs(md, r);
}

/// Manifest → serving and resident memory.
fn render_costs(md: &mut String, r: &Isolation) {
    use std::fmt::Write as _;
    let med = |v: &[f64]| crate::stats::Dist::of(v).p50;
    let (ri, rp) = (med(&r.reload_us[0]), med(&r.reload_us[1]));
    let _ = writeln!(
        md,
        "Manifest → serving (the daemon's `reloaded` line, `total_us`), medians: in-process {:.0} µs, \
         process {:.0} µs ({:+.2} ms; goal ≤ +2 ms: {}). A host is spawned, drops its privileges, \
         loads and inits before the window opens, so the window itself is the same swap.\n",
        ri,
        rp,
        (rp - ri) / 1e3,
        if rp - ri <= 2000.0 {
            "met"
        } else {
            "**missed**"
        }
    );
    let anon: Vec<f64> = r.host_rss_kib.iter().map(|h| h.0 as f64).collect();
    let file: Vec<f64> = r.host_rss_kib.iter().map(|h| h.1 as f64).collect();
    let daemon_in: Vec<f64> = r.daemon_rss_kib[0].iter().map(|k| *k as f64).collect();
    let daemon_pr: Vec<f64> = r.daemon_rss_kib[1].iter().map(|k| *k as f64).collect();
    let _ = writeln!(
        md,
        "Resident memory, idle, medians: a host {:.1} MiB anonymous + {:.1} MiB file-backed (the \
         plugvisor binary's and the library's pages, shared with the page cache); the daemon {:.1} MiB \
         in-process, {:.1} MiB with its plugin in a host. Goals: a host ≤ 4 MB + its library, the \
         daemon ≤ 20 MB.",
        med(&anon) / 1024.0,
        med(&file) / 1024.0,
        med(&daemon_in) / 1024.0,
        med(&daemon_pr) / 1024.0
    );
}
