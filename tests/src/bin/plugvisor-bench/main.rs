//! `plugvisor-bench`: the measurements behind `docs/BENCHMARKS.md` and
//! `docs/plots/`, run by `cargo xtask bench`.
//!
//! Every comparison is made side by side in one run, alternating the two
//! sides trial by trial where there are trials, so drift on this noisy
//! 2-core machine hits both alike. Nothing here asserts a time.
//!
//! Measures, one module each:
//! * probe overhead (`overhead.rs`) — throughput of a loopback
//!   connect/send/close storm and of gRPC unary calls with every eBPF probe
//!   attached vs none, and the probes' own CPU time in the same workloads
//!   from the kernel's BPF run-time statistics (`probecost.rs`);
//! * reload latency (`reload.rs`) — manifest read to new version serving,
//!   per phase, for the echo plugin and the `sized` fixture at about 2.1 MB
//!   and 8.4 MB, per reload from the daemon's `reloaded` log lines, and the
//!   kernel's uprobe-to-uprobe window for the same reloads; beside it the
//!   seed's mechanism, Go's `plugin.Open`, on Go plugins of the same sizes
//!   (`gopeer.rs`);
//! * in process (`inprocess.rs`, running
//!   `supervisor/examples/bench_inprocess.rs`): slot dispatch vs a direct
//!   call, the swap and the gap a dispatching thread sees across it,
//!   `/metrics` encoding with 50 plugins × 10 listeners;
//! * 1000 reloads under TCP frames and open gRPC streams (`soak.rs`) —
//!   failed requests, the kernel's broken-connection count, RSS and fds —
//!   and the naive upgrade (SIGTERM, start the new version) under the same
//!   load (`naive.rs`), and plugvisor upgrading itself under it
//!   (`upgrade.rs`);
//! * breach → rollback at the default and a fast rule tick (`breach.rs`);
//! * plugin hosts vs the in-process modes (`isolation.rs`): per-request
//!   overhead, throughput, crash → answer, manifest → serving, RSS.
//!
//! `report.rs` writes the markdown and `charts.rs` the plots from what they
//! found; `load.rs` is the client load, `plot.rs` draws a chart, `stats.rs`
//! summarises a sample.
mod baseline;
mod breach;
mod charts;
mod connections;
mod fleet;
mod gopeer;
mod inprocess;
mod isolation;
mod load;
mod naive;
mod overhead;
mod plot;
mod probecost;
mod reload;
mod report;
mod reporting;
mod scale;
mod soak;
mod stats;
mod upgrade;

use std::path::PathBuf;
use std::time::Instant;

use plugvisor_tests::target_dir;

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

/// Everything one run measured.
struct Results {
    quick: bool,
    overhead: overhead::Overhead,
    costs: probecost::ProbeCosts,
    echo: reload::ReloadRun,
    sized: Vec<reload::ReloadRun>,
    go: Result<Vec<gopeer::GoRun>, String>,
    inproc: Result<serde_json::Value, String>,
    soak: soak::Soak,
    naive: naive::Naive,
    upgrade: upgrade::Upgrades,
    breach_1s: Vec<f64>,
    breach_250: Vec<f64>,
    isolation: isolation::Isolation,
    fleet: fleet::Fleet,
    reporting: reporting::Reporting,
    scale: scale::Scale,
    sweep: connections::Sweep,
    baseline: baseline::Baseline,
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
    let overhead = overhead::probe_overhead(q);
    let costs = probecost::probe_costs(q, overhead::tcp_storm, overhead::grpc_unary);
    if let Err(e) = &costs {
        eprintln!("SKIP probe run-time statistics: {e}");
    }
    let echo = reload::echo_run(q);
    let sized = reload::sized_runs(q);
    let go = gopeer::go_peer(q);
    if let Err(e) = &go {
        eprintln!("SKIP Go plugin.Open peer: {e}");
    }
    let stage_libs: Vec<PathBuf> = sized.iter().filter_map(|r| r.lib.clone()).collect();
    let inproc = inprocess::inprocess(args.inprocess.as_deref(), &stage_libs, q);
    if let Err(e) = &inproc {
        eprintln!("SKIP in-process measures: {e}");
    }
    let soak = soak::soak(q);
    let naive = naive::naive_restart(q);
    let upgrade = upgrade::upgrades(q);
    let trials = if q { 1 } else { 7 };
    let breach_1s = breach::breach_to_rollback("1s", trials);
    let breach_250 = breach::breach_to_rollback("250ms", trials);
    let isolation = isolation::isolation(q);
    let fleet = fleet::fleet(q);
    let reporting = reporting::reporting(q);
    let scale = scale::scale(q);
    let sweep = connections::sweep(q);
    let baseline = baseline::baseline(q);
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
        upgrade,
        breach_1s,
        breach_250,
        isolation,
        fleet,
        reporting,
        scale,
        sweep,
        baseline,
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
