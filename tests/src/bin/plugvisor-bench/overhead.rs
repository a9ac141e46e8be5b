//! Probe overhead: throughput of a loopback connect/send/close storm and
//! of gRPC unary calls with every eBPF probe attached vs none, and the CPU
//! each operation cost the workload on each side. The two workloads are
//! also the ones `probecost.rs` runs with the kernel's statistics on.
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use plugvisor_tests::pb::Request;
use plugvisor_tests::pb::plugin_client::PluginClient;
use plugvisor_tests::{Daemon, DaemonOptions, ListenerSpec};

use crate::probecost;

/// Connections opened, used for one frame and closed, for `dur`, on `threads` threads.
pub fn tcp_storm(addr: SocketAddr, threads: usize, dur: Duration) -> f64 {
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
pub fn grpc_unary(addr: SocketAddr, concurrency: usize, dur: Duration) -> f64 {
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

/// Each workload's figures as `[probes off, probes on]`, one value per
/// trial.
pub struct Overhead {
    /// Storm connections per second.
    pub tcp: [Vec<f64>; 2],
    /// gRPC calls per second.
    pub grpc: [Vec<f64>; 2],
    /// Workload CPU nanoseconds per storm connection (see
    /// [`probecost::workload_cpu_ns`]).
    pub tcp_cpu: [Vec<f64>; 2],
    /// Workload CPU nanoseconds per gRPC call.
    pub grpc_cpu: [Vec<f64>; 2],
    /// Trials per side.
    pub trials: usize,
    /// Each workload's length in a trial.
    pub dur: Duration,
}

/// Both workloads on a fresh daemon per side and trial, the sides
/// alternating which goes first.
pub fn probe_overhead(quick: bool) -> Overhead {
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
