//! Throughput against the limit (#21): the same echo work served by a bare
//! tokio/tonic server with no plugvisor in between (`bare-echo`, what a
//! user would write by hand) beside plugvisor with its probes on, in both
//! isolation modes (`in-process`, the default, and `process`), on three
//! workloads: a connect/send/close storm, persistent connections sending
//! back to back, and gRPC unary calls. Sides alternate trial by trial.
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plugvisor_tests::{Daemon, DaemonOptions, LineClient, ListenerSpec, free_port, target_dir};

use crate::overhead::{grpc_unary, tcp_storm};
use crate::stats::Dist;

/// The sides, in the order of the arrays below.
pub const SIDES: [&str; 3] = ["bare tokio", "plugvisor in-process", "plugvisor process"];

/// Throughput per side and workload, one value per trial.
pub struct Baseline {
    /// Connect/send/close storm, requests per second.
    pub storm: [Vec<f64>; 3],
    /// Persistent connections, requests per second.
    pub persistent: [Vec<f64>; 3],
    /// gRPC unary, calls per second.
    pub grpc: [Vec<f64>; 3],
    /// Trials per side.
    pub trials: usize,
    /// Length of each workload.
    pub dur: Duration,
}

/// `conns` connections each sending a frame the moment the last answer
/// came, for `dur`; answers per second.
fn persistent(addr: SocketAddr, conns: usize, dur: Duration) -> f64 {
    let deadline = Instant::now() + dur;
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            std::thread::spawn(move || {
                let Ok(mut c) = LineClient::connect(addr) else {
                    return 0u64;
                };
                let mut n = 0;
                while Instant::now() < deadline {
                    if c.call("persistent").is_ok() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    total as f64 / dur.as_secs_f64()
}

struct Bare {
    child: Child,
    tcp: SocketAddr,
    grpc: SocketAddr,
}

impl Bare {
    fn start() -> Bare {
        let tcp = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(target_dir().join("bare-echo"))
            .arg(tcp.to_string())
            .arg(grpc.to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("starting bare-echo (built with the workspace)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(tcp).is_err()
            || std::net::TcpStream::connect(grpc).is_err()
        {
            assert!(Instant::now() < deadline, "bare-echo did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Bare { child, tcp, grpc }
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn daemon(process: bool) -> Daemon {
    Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        probes: "on",
        extra_config: if process {
            "[plugin.echo]\nisolation = \"process\"\n".into()
        } else {
            String::new()
        },
        ..Default::default()
    })
}

/// Runs every side on every workload, alternating.
pub fn baseline(quick: bool) -> Baseline {
    let (trials, dur) = if quick {
        (1, Duration::from_millis(500))
    } else {
        (3, Duration::from_secs(3))
    };
    let mut b = Baseline {
        storm: Default::default(),
        persistent: Default::default(),
        grpc: Default::default(),
        trials,
        dur,
    };
    for trial in 0..trials {
        for k in 0..3 {
            let side = (trial + k) % 3;
            let (bare, d);
            let (tcp, grpc) = if side == 0 {
                bare = Bare::start();
                (bare.tcp, bare.grpc)
            } else {
                d = daemon(side == 2);
                (d.addr("echo-tcp"), d.addr("echo-grpc"))
            };
            b.storm[side].push(tcp_storm(tcp, 2, dur));
            b.persistent[side].push(persistent(tcp, 8, dur));
            b.grpc[side].push(grpc_unary(grpc, 8, dur));
            let _ = std::io::stderr().flush();
            eprintln!(
                "baseline trial {trial} {}: storm {:.0}/s persistent {:.0}/s grpc {:.0}/s",
                SIDES[side],
                b.storm[side].last().unwrap_or(&0.0),
                b.persistent[side].last().unwrap_or(&0.0),
                b.grpc[side].last().unwrap_or(&0.0)
            );
        }
    }
    b
}

fn median(v: &[f64]) -> f64 {
    Dist::of(v).p50
}

/// Summary rows: each plugvisor side's throughput ÷ the bare server's.
pub fn summary(md: &mut String, b: &Baseline) {
    use std::fmt::Write as _;
    for side in 1..3 {
        let ratios: Vec<(&str, f64)> = [
            ("storm", &b.storm),
            ("persistent", &b.persistent),
            ("gRPC unary", &b.grpc),
        ]
        .into_iter()
        .map(|(w, v)| (w, median(&v[side]) / median(&v[0])))
        .collect();
        let worst = ratios.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            md,
            "| throughput, {} (probes on) ÷ a bare tokio server, same echo work | ≥ 90 % | {} | bare tokio/tonic (`bare-echo`) | worst {:.1} % | {} |",
            SIDES[side],
            ratios
                .iter()
                .map(|(w, r)| format!("{w} {:.1} %", r * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
            worst * 100.0,
            if worst >= 0.9 { "met" } else { "**missed**" }
        );
    }
}

/// The section.
pub fn render(md: &mut String, b: &Baseline) {
    use std::fmt::Write as _;
    let _ = writeln!(
        md,
        "\n## Throughput against a bare tokio server\n\n\
         The same echo work (`[echo VERSION] frame`, raw TCP and `plugvisor.v1.Plugin`) served by `bare-echo` — tokio and tonic, no plugin boundary, no hot swap, no probes — beside plugvisor with every probe attached, its echo plugin in process and in a plugin host process. Workloads: *storm* (2 threads connecting, sending one frame, closing), *persistent* (8 connections sending back to back), *gRPC unary* (8 calls in flight on one channel); {} trials of {:?} each, the sides alternating. Client and server share the 2 cores. Median requests per second:\n\n\
         | workload | bare tokio | plugvisor in-process | ÷ bare | plugvisor process | ÷ bare |\n| --- | ---: | ---: | ---: | ---: | ---: |",
        b.trials, b.dur
    );
    for (w, v) in [
        ("storm", &b.storm),
        ("persistent", &b.persistent),
        ("gRPC unary", &b.grpc),
    ] {
        let (bare, inp, pro) = (median(&v[0]), median(&v[1]), median(&v[2]));
        let _ = writeln!(
            md,
            "| {w} | {bare:.0} | {inp:.0} | {:.1} % | {pro:.0} | {:.1} % |",
            inp / bare * 100.0,
            pro / bare * 100.0
        );
    }
}
