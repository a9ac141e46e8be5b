//! The probes' own CPU time, from the kernel's BPF run-time statistics.
//!
//! Throughput with probes on vs off is what an operator feels, but on a
//! shared two-vCPU VM its run-to-run spread (±5 %) is larger than the
//! probes' cost. The kernel can count that cost directly: with
//! `BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)` held open it adds, per program,
//! how often it ran and how many nanoseconds it spent. Set against the
//! CPU time the workload used meanwhile (clients, daemon, and the
//! kernel's irq and softirq time), that is the share of CPU the probes took — an upper bound on the throughput
//! they can cost a CPU-bound workload, measured without on/off noise.
//!
//! What it leaves out, said next to the figures: the hooks' dispatch into
//! a program (a static-key branch and an indirect call per event) and the
//! statistics' own two clock reads per run, which it counts as probe time.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use plugvisor_tests::{Daemon, DaemonOptions, ListenerSpec};

/// The programs of `ebpf-probes/ebpf`, by their full names. The kernel
/// keeps the first 15 bytes of a program's name.
const PROGRAMS: [&str; 9] = [
    "inet_sock_set_state",
    "tcp_send_reset",
    "tcp_receive_reset",
    "tcp_retransmit_skb",
    "sock_recv_length",
    "sock_send_length",
    "h2_egress",
    "reload_begin",
    "reload_end",
];

/// One program's share of one workload.
pub struct ProgramCost {
    /// The program's full name.
    pub name: &'static str,
    /// Times it ran.
    pub runs: u64,
    /// Nanoseconds it spent in all.
    pub ns: u64,
}

/// One workload with run-time statistics on.
pub struct WorkloadCost {
    /// What ran.
    pub name: &'static str,
    /// Operations it completed (connections or calls).
    pub ops: f64,
    /// CPU time the workload used meanwhile (see [`workload_cpu_ns`]),
    /// nanoseconds.
    pub cpu_ns: u64,
    /// Each program that ran at least once.
    pub programs: Vec<ProgramCost>,
}

impl WorkloadCost {
    /// Nanoseconds spent in all probes.
    pub fn probe_ns(&self) -> u64 {
        self.programs.iter().map(|p| p.ns).sum()
    }

    /// Probe runs in all.
    pub fn probe_runs(&self) -> u64 {
        self.programs.iter().map(|p| p.runs).sum()
    }

    /// The probes' share of the workload's CPU time.
    pub fn share(&self) -> f64 {
        self.probe_ns() as f64 / self.cpu_ns.max(1) as f64
    }
}

/// Everything the measure found, or why it could not run.
pub type ProbeCosts = Result<Vec<WorkloadCost>, String>;

fn ticks_to_ns(ticks: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks * 1_000_000_000 / hz.unsigned_abs()
}

/// CPU time the workload has used so far, nanoseconds: user and system
/// time of this process (the clients) and of the daemon, plus the
/// machine's irq and softirq time (loopback delivery partly runs there,
/// and the probes with it). Other processes on this shared machine are
/// left out, so a busy neighbour does not dilute the share.
pub fn workload_cpu_ns(daemon_pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or("/proc/stat has no cpu line")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq …
    let irq: u64 = [5, 6].iter().filter_map(|i| f.get(*i)).sum();
    let path = format!("/proc/{daemon_pid}/stat");
    let daemon = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the command name, which may hold spaces: utime and
    // stime are the 14th and 15th of the line.
    let rest = &daemon[daemon.rfind(')').ok_or("malformed stat")? + 2..];
    let d: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let daemon_ticks = d.get(11).copied().unwrap_or(0) + d.get(12).copied().unwrap_or(0);
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    // SAFETY: zeroed and then filled by getrusage.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| {
        t.tv_sec.unsigned_abs() * 1_000_000_000 + t.tv_usec.unsigned_abs() * 1000
    };
    Ok(ticks_to_ns(irq + daemon_ticks) + tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// Runs `work` (which returns operations per second over `dur`) and
/// returns its rate and the workload CPU nanoseconds per operation
/// (NaN when `/proc` could not be read).
pub fn with_cpu(daemon_pid: u32, dur: Duration, work: impl FnOnce() -> f64) -> (f64, f64) {
    let c0 = workload_cpu_ns(daemon_pid);
    let rate = work();
    let c1 = workload_cpu_ns(daemon_pid);
    let per_op = match (c0, c1) {
        (Ok(a), Ok(b)) => b.saturating_sub(a) as f64 / (rate * dur.as_secs_f64()).max(1.0),
        _ => f64::NAN,
    };
    (rate, per_op)
}

/// Run count and run time of this daemon's programs: ours by name, and
/// loaded since `since` (programs of earlier daemons are gone by then).
fn snapshot(since: SystemTime) -> Result<Vec<(&'static str, u64, u64)>, String> {
    let mut out = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|e| format!("listing BPF programs: {e}"))?;
        if info.loaded_at().is_none_or(|t| t < since) {
            continue;
        }
        let Some(name) = info.name_as_str().filter(|n| !n.is_empty()) else {
            continue;
        };
        if let Some(full) = PROGRAMS.iter().find(|p| p.starts_with(name)) {
            let run_ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            out.push((*full, info.run_count(), run_ns));
        }
    }
    Ok(out)
}

fn measure(
    name: &'static str,
    daemon_pid: u32,
    since: SystemTime,
    work: impl FnOnce() -> f64,
    dur: Duration,
) -> Result<WorkloadCost, String> {
    let before = snapshot(since)?;
    let cpu0 = workload_cpu_ns(daemon_pid)?;
    let rate = work();
    let cpu1 = workload_cpu_ns(daemon_pid)?;
    let after = snapshot(since)?;
    let mut programs: Vec<ProgramCost> = after
        .iter()
        .map(|(n, runs, ns)| {
            let (r0, t0) = before
                .iter()
                .find(|(b, _, _)| b == n)
                .map_or((0, 0), |(_, r, t)| (*r, *t));
            ProgramCost {
                name: n,
                runs: runs - r0,
                ns: ns - t0,
            }
        })
        .filter(|p| p.runs > 0)
        .collect();
    programs.sort_by_key(|p| std::cmp::Reverse(p.ns));
    Ok(WorkloadCost {
        name,
        ops: rate * dur.as_secs_f64(),
        cpu_ns: cpu1.saturating_sub(cpu0),
        programs,
    })
}

/// Runs the overhead bench's two workloads once more, probes on, with the
/// kernel's run-time statistics enabled for the duration.
pub fn probe_costs(
    quick: bool,
    tcp_storm: fn(SocketAddr, usize, Duration) -> f64,
    grpc_unary: fn(SocketAddr, usize, Duration) -> f64,
) -> ProbeCosts {
    let dur = if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(3)
    };
    // Rounded down to whole seconds by the kernel's load time: look back a little.
    let since = SystemTime::now() - Duration::from_secs(2);
    let daemon = Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        probes: "on",
        ..Default::default()
    });
    // Statistics stay on while this descriptor is open, and only then.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| format!("BPF_ENABLE_STATS refused: {e}"))?;
    let loaded = snapshot(since)?;
    if loaded.len() < PROGRAMS.len() {
        return Err(format!(
            "found {} of plugvisor's {} programs loaded",
            loaded.len(),
            PROGRAMS.len()
        ));
    }
    let t = Instant::now();
    let tcp = daemon.addr("echo-tcp");
    let grpc = daemon.addr("echo-grpc");
    let out = vec![
        measure(
            "loopback connect/send/close storm (2 threads)",
            daemon.pid(),
            since,
            || tcp_storm(tcp, 2, dur),
            dur,
        )?,
        measure(
            "gRPC unary Invoke (8 in flight, 1 channel)",
            daemon.pid(),
            since,
            || grpc_unary(grpc, 8, dur),
            dur,
        )?,
    ];
    for w in &out {
        eprintln!(
            "probe cost {}: {} runs, {:.1} ms in probes of {:.1} ms of workload CPU ({:.2} %), after {:.1} s",
            w.name,
            w.probe_runs(),
            w.probe_ns() as f64 / 1e6,
            w.cpu_ns as f64 / 1e6,
            w.share() * 100.0,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(out)
}
