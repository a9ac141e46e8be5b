//! The report's four charts, drawn with `plot.rs` into the plots directory
//! the markdown links to.
use std::path::Path;

use crate::inprocess::values;
use crate::plot::{Axes, Kind, Series, cdf, chart};
use crate::report::mb;
use crate::soak::shape;
use crate::{Results, load};

/// Draws every chart into `dir`, stopping at the first that fails: the
/// report then says why instead of linking to what is missing.
pub fn draw(dir: &Path, r: &Results) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    reload_latency(dir, r)?;
    switch(dir, r)?;
    restart_vs_reload(dir, r)?;
    soak(dir, r)?;
    sweep(dir, r)
}

/// Reload latency per size, with the Go peer's plugin.Open beside it.
fn reload_latency(dir: &Path, r: &Results) -> Result<(), String> {
    let mut s: Vec<Series> = std::iter::once(&r.echo)
        .chain(&r.sized)
        .map(|run| Series {
            name: format!(
                "plugvisor {} ({}): manifest → serving",
                run.label,
                mb(run.bytes)
            ),
            points: cdf(&run
                .reloads
                .iter()
                .map(|x| x.phase("total") / 1e6)
                .collect::<Vec<_>>()),
            kind: Kind::Line,
        })
        .collect();
    if let Ok(go) = &r.go {
        s.extend(go.iter().map(|g| Series {
            name: format!(
                "Go plugin.Open {} ({}), no verification",
                g.label,
                mb(g.bytes)
            ),
            points: cdf(&g.open_ns.iter().map(|x| x / 1e6).collect::<Vec<_>>()),
            kind: Kind::Line,
        }));
    }
    chart(
        &dir.join("reload-latency.png"),
        &Axes {
            title: "Reload latency, no client load (CDF)",
            x: "milliseconds",
            y: "fraction of reloads",
            log_x: false,
            y_max: None,
        },
        &s,
    )
}

/// The switch alone and the swap inside it.
fn switch(dir: &Path, r: &Results) -> Result<(), String> {
    let mut s: Vec<Series> = std::iter::once(&r.echo)
        .chain(&r.sized)
        .map(|run| Series {
            name: format!("switch alone, {} (dlopen, init, swap)", run.label),
            points: cdf(&run
                .reloads
                .iter()
                .map(|x| x.phase("load") + x.phase("init") + x.phase("switch"))
                .collect::<Vec<_>>()),
            kind: Kind::Line,
        })
        .collect();
    s.push(Series {
        name: "swap alone, daemon (echo)".into(),
        points: cdf(&r
            .echo
            .reloads
            .iter()
            .map(|x| x.phase("switch"))
            .collect::<Vec<_>>()),
        kind: Kind::Line,
    });
    if let Ok(v) = &r.inproc {
        s.push(Series {
            name: "longest answer interval across a swap (in process)".into(),
            points: cdf(&values(&v["switch"]["gap_across_swap_ns"])),
            kind: Kind::Line,
        });
    }
    chart(
        &dir.join("switch.png"),
        &Axes {
            title: "The switch and the swap (CDF, log scale)",
            x: "nanoseconds",
            y: "fraction",
            log_x: true,
            y_max: None,
        },
        &s,
    )
}

/// What the clients saw: naive restart vs hot reloads, same load, in
/// 50 ms buckets.
fn restart_vs_reload(dir: &Path, r: &Results) -> Result<(), String> {
    // 10 ms buckets folded five by five.
    const FOLD: usize = 5;
    let per_s = 1000.0 / (load::BUCKET.as_millis() as f64 * FOLD as f64);
    let timeline = |rep: &load::Report, limit: usize| -> Vec<(f64, f64)> {
        rep.timeline()
            .chunks(FOLD)
            .take(limit)
            .enumerate()
            .map(|(i, n)| (i as f64 / per_s, f64::from(n.iter().sum::<u32>()) * per_s))
            .collect()
    };
    let len = r.naive.load.timeline().len().div_ceil(FOLD);
    let offered = f64::from(shape(r.quick).offered());
    chart(
        &dir.join("restart-vs-reload.png"),
        &Axes {
            title: "Answers per second under the same load: naive restart vs hot reload",
            x: "seconds since the load started",
            y: "answers/s (50 ms buckets)",
            log_x: false,
            y_max: Some(offered * 1.5),
        },
        &[
            Series {
                name: format!("naive: SIGTERM + start ({} restarts)", r.naive.restarts),
                points: timeline(&r.naive.load, len),
                kind: Kind::Line,
            },
            Series {
                name: format!(
                    "plugvisor hot reload ({} reloads in the same span)",
                    r.soak
                        .commits
                        .iter()
                        .filter(|t| **t < len as f64 / per_s)
                        .count()
                ),
                points: timeline(&r.soak.load, len),
                kind: Kind::Line,
            },
        ],
    )
}

/// Every reload of the soak.
fn soak(dir: &Path, r: &Results) -> Result<(), String> {
    chart(
        &dir.join("soak.png"),
        &Axes {
            title: &format!(
                "{} reloads under {:.0} requests/s: manifest → serving per reload",
                r.soak.reloads,
                r.soak.load.rate()
            ),
            x: "reload",
            y: "milliseconds",
            log_x: false,
            y_max: None,
        },
        &[Series {
            name: "total: verify, stage, load, init, switch (manifest read → swap)".into(),
            points: r
                .soak
                .records
                .iter()
                .enumerate()
                .map(|(i, x)| (i as f64, x.phase("total") / 1e6))
                .collect(),
            kind: Kind::Points,
        }],
    )
}

/// The connection sweep: memory per connection beside nginx's, reload
/// latency and throughput, against the connections held (log scale).
fn sweep(dir: &Path, r: &Results) -> Result<(), String> {
    use crate::stats::Dist;
    let steps = &r.sweep.steps;
    let line = |name: &str, f: &dyn Fn(&crate::connections::Step) -> f64| Series {
        name: name.into(),
        points: steps.iter().map(|s| (s.connections as f64, f(s))).collect(),
        kind: Kind::Line,
    };
    let axes = |title: &'static str, y: &'static str| Axes {
        title,
        x: "connections held",
        y,
        log_x: true,
        y_max: None,
    };
    chart(
        &dir.join("connections-memory.png"),
        &axes(
            "Userspace memory per idle TCP connection",
            "KB per connection",
        ),
        &[
            line("plugvisor (daemon RSS growth)", &|s| s.per_conn() / 1024.0),
            line("nginx 1.22 (worker RSS growth)", &|s| {
                s.nginx_per_conn() / 1024.0
            }),
        ],
    )?;
    chart(
        &dir.join("connections-reload.png"),
        &axes(
            "Reload under a crowd: manifest → serving, and the swap",
            "microseconds",
        ),
        &[
            line("total p50", &|s| Dist::of(&s.reload_us).p50),
            line("total p99", &|s| Dist::of(&s.reload_us).p99),
            line("swap p50", &|s| Dist::of(&s.switch_us).p50),
        ],
    )?;
    chart(
        &dir.join("connections-throughput.png"),
        &axes(
            "Every connection sends one frame: answers per second",
            "answers per second",
        ),
        &[line("plugvisor, p50 over the rounds", &|s| {
            Dist::of(&s.rounds_per_s).p50
        })],
    )
}
