//! Many plugins on one node (#21): fifty plugins booting from the store,
//! a reload of all fifty at once, and what that node's `/metrics` costs a
//! fleet's Prometheus — its series, its bytes and its scrape time — on
//! the default set of series (`docs/MONITORING.md#series-budget`).
//!
//! The plugins are the C echo (`plugins/c-echo`), compiled once per name
//! and version: each is a plugin of its own, in a host process of its
//! own, as fifty distinct plugins would be.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, ListenerSpec, PackageTweaks, build_c_plugin, http_get, install_package,
    plugin_hosts_of,
};

use crate::reload::bench_log_env;
use crate::soak::status_kb;
use crate::stats::Dist;

/// Plugins on the node.
pub const PLUGINS: usize = 50;
/// Listeners on the node, each on one of the first plugins.
pub const LISTENERS: usize = 10;

/// What the many-plugins run measured.
pub struct Scale {
    /// Daemon spawned → every plugin active, ms.
    pub boot_ms: f64,
    /// The 50 manifests committed → every plugin active on its new
    /// version, ms (the watcher's 50 ms debounce included).
    pub reload_all_ms: f64,
    /// The daemon's peak RSS (VmHWM) after boot and after the reload, KiB.
    pub peak_rss_kb: (f64, f64),
    /// The daemon's RSS after the reload, KiB (the plugins run in it).
    pub rss_kb: f64,
    /// Plugin hosts' RSS summed after the reload, KiB, and their count
    /// (none with the default `isolation = "in-process"`).
    pub hosts_rss_kb: (f64, usize),
    /// Series on `/metrics` after the reload (`process_*` left out).
    pub series: usize,
    /// Its bytes.
    pub bytes: usize,
    /// `GET /metrics` over loopback, µs.
    pub scrape_us: Vec<f64>,
    /// Families whose series count most, (family, series), largest first.
    pub top: Vec<(String, usize)>,
}

fn name(i: usize) -> String {
    format!("p{i:02}")
}

fn all_active(d: &Daemon, version: &str) -> bool {
    let m = d.metrics();
    (0..PLUGINS).all(|i| {
        m.get(
            "plugvisor_plugin_info",
            &[
                ("plugin", name(i).as_str()),
                ("version", version),
                ("state", "active"),
            ],
        ) == Some(1.0)
    })
}

/// The family a sample line belongs to (`_bucket`/`_sum`/`_count` folded).
fn family(line: &str) -> &str {
    let name = line.split(['{', ' ']).next().unwrap_or_default();
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// Boots fifty plugins, reloads them all at once, and reads the scrape.
pub fn scale(quick: bool) -> Scale {
    let libs: Vec<(PathBuf, PathBuf)> = (0..PLUGINS)
        .map(|i| {
            (
                build_c_plugin(&name(i), "1.0.0", 1),
                build_c_plugin(&name(i), "1.0.1", 1),
            )
        })
        .collect();
    let listeners = (0..LISTENERS)
        .map(|l| {
            let n = format!("l{l}");
            if l % 2 == 0 {
                ListenerSpec::tcp(&n, &name(l))
            } else {
                ListenerSpec::grpc(&n, &name(l))
            }
        })
        .collect();
    let spawned = Instant::now();
    let d = Daemon::start(DaemonOptions {
        listeners,
        packages: libs
            .iter()
            .enumerate()
            .map(|(i, (v1, _))| (name(i), v1.clone(), "1.0.0".to_owned()))
            .collect(),
        env: bench_log_env(),
        ..Default::default()
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while !all_active(&d, "1.0.0") {
        assert!(
            Instant::now() < deadline,
            "50 plugins did not boot in 120 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let boot_ms = spawned.elapsed().as_secs_f64() * 1e3;
    let boot_peak = status_kb(d.pid(), "VmHWM");

    let committed = Instant::now();
    for (i, (_, v2)) in libs.iter().enumerate() {
        install_package(
            &d.plugins_dir,
            &name(i),
            "1.0.1",
            v2,
            &PackageTweaks::default(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !all_active(&d, "1.0.1") {
        assert!(
            Instant::now() < deadline,
            "50 reloads did not finish in 120 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let reload_all_ms = committed.elapsed().as_secs_f64() * 1e3;
    let reload_peak = status_kb(d.pid(), "VmHWM");
    // One sampler tick, so the scrape holds what a steady node exports.
    std::thread::sleep(Duration::from_millis(1500));
    let rss = status_kb(d.pid(), "VmRSS");
    let hosts = plugin_hosts_of(d.pid());
    let hosts_rss = hosts
        .iter()
        .fold(0.0, |sum, p| sum + status_kb(*p, "VmRSS"));

    let addr = SocketAddr::from(([127, 0, 0, 1], d.metrics_port));
    let text = http_get(addr, "/metrics").expect("GET /metrics");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or(&text);
    let samples: Vec<&str> = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("process_"))
        .collect();
    let mut by_family = std::collections::BTreeMap::<String, usize>::new();
    for l in &samples {
        *by_family.entry(family(l).to_owned()).or_default() += 1;
    }
    let mut top: Vec<(String, usize)> = by_family.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(8);
    let n = if quick { 20 } else { 200 };
    let scrape_us = (0..n)
        .map(|_| {
            let t = Instant::now();
            let _ = http_get(addr, "/metrics");
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    Scale {
        boot_ms,
        reload_all_ms,
        peak_rss_kb: (boot_peak, reload_peak),
        rss_kb: rss,
        hosts_rss_kb: (hosts_rss, hosts.len()),
        series: samples.len(),
        bytes: body.len(),
        scrape_us,
        top,
    }
}

/// The summary row of the live scrape.
pub fn summary(md: &mut String, s: &Scale) {
    use std::fmt::Write as _;
    let d = Dist::of(&s.scrape_us);
    let _ = writeln!(
        md,
        "| series of a live node, {PLUGINS} plugins × {LISTENERS} listeners after a reload of each (default set) | ≤ 5000 | {} series, {:.0} KB a scrape; `GET /metrics` p50 {:.0} µs, p99 {:.0} µs | before: ~12 500 series, 1 MB | {:.2}× budget | {} |",
        s.series,
        s.bytes as f64 / 1e3,
        d.p50,
        d.p99,
        s.series as f64 / 5000.0,
        if s.series <= 5000 {
            "met"
        } else {
            "**missed**"
        }
    );
}

/// The section of the many-plugins run.
pub fn render(md: &mut String, s: &Scale) {
    use std::fmt::Write as _;
    let d = Dist::of(&s.scrape_us);
    let _ = writeln!(
        md,
        "\n## Fifty plugins on one node\n\n\
         {PLUGINS} C echo plugins (one compiled per name), in process (the default isolation), {LISTENERS} listeners (TCP and gRPC in turn) on the first ten, probes on, default `[metrics]`. *boot*: the daemon spawned → every plugin's first version active (store opened, packages verified, loaded, probes attached). *reload all*: fifty manifests committed one after another → every plugin active on its new version (the watcher's 50 ms debounce and dependency order included). Peak RSS is the daemon's `VmHWM`; with in-process plugins it holds every mapped version.\n\n\
         | measure | value |\n| --- | ---: |\n\
         | boot → all {PLUGINS} serving | {:.0} ms |\n\
         | reload of all {PLUGINS} at once → all serving the new version | {:.0} ms |\n\
         | daemon peak RSS after boot / after the reload | {:.1} MB / {:.1} MB |\n\
         | daemon RSS with 2 versions of each mapped, per plugin | {:.1} MB, {:.2} MB |\n\
         | plugin hosts: count, RSS summed | {}, {:.1} MB |\n\
         | series on `/metrics` (without `process_*`) | {} |\n\
         | bytes a scrape | {} |\n\
         | `GET /metrics` over loopback, n / p50 / p99 | {} / {:.0} µs / {:.0} µs |\n",
        s.boot_ms,
        s.reload_all_ms,
        s.peak_rss_kb.0 / 1024.0,
        s.peak_rss_kb.1 / 1024.0,
        s.rss_kb / 1024.0,
        s.rss_kb / 1024.0 / PLUGINS as f64,
        s.hosts_rss_kb.1,
        s.hosts_rss_kb.0 / 1024.0,
        s.series,
        s.bytes,
        d.n,
        d.p50,
        d.p99,
    );
    let _ = writeln!(
        md,
        "Families with the most series:\n\n| family | series |\n| --- | ---: |"
    );
    for (f, n) in &s.top {
        let _ = writeln!(md, "| `{f}` | {n} |");
    }
}
