//! Reporting to the coordinator (`[report.mqtt]`, `docs/REPORTING.md`):
//! how long a journal entry takes to reach a subscriber through Debian's
//! mosquitto on loopback, and reload latency with reporting on beside the
//! same reloads with it off (it must not move: a reload only writes the
//! journal either way).
use std::time::{Duration, Instant, UNIX_EPOCH};

use plugvisor_tests::{
    Daemon, DaemonOptions, ListenerSpec, Mosquitto, PackageTweaks, Subscriber, echo_version_series,
    install_package, wait_until,
};

use crate::reload::{bench_log_env, reload_records, settle_writeback};
use crate::stats::Dist;

/// What the reporting run measured.
pub struct Reporting {
    /// Journal entry written → the subscriber has the event, ms (the
    /// journal stamps milliseconds, so each figure is up to 1 ms high).
    pub delivered_ms: Vec<f64>,
    /// Reload `total` phase with reporting on, µs.
    pub reload_on_us: Vec<f64>,
    /// The same with reporting off, µs.
    pub reload_off_us: Vec<f64>,
}

fn node(extra: String) -> Daemon {
    Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("bench-tcp", "echo")],
        probes: "off",
        env: bench_log_env(),
        extra_config: extra,
        ..Default::default()
    })
}

fn reload(d: &Daemon, version: &str, lib: &std::path::Path) {
    install_package(
        &d.plugins_dir,
        "echo",
        version,
        lib,
        &PackageTweaks::default(),
    );
    wait_until(Instant::now() + Duration::from_secs(20), "reload", || {
        d.metrics().get(
            "plugvisor_plugin_info",
            &[
                ("plugin", "echo"),
                ("version", version),
                ("state", "active"),
            ],
        ) == Some(1.0)
    });
}

/// Reloads through one series on two nodes in turn, one reporting to a
/// broker and one not, and times each event's way to a subscriber.
pub fn reporting(quick: bool) -> Reporting {
    let reloads = if quick { 5 } else { 60 };
    let broker = Mosquitto::start(None);
    let sub = Subscriber::start(&broker, "bench-coordinator", "plugvisor/bench-0/event");
    let on = node(format!(
        "[report.mqtt]\nbroker = \"{}\"\nclient_id = \"bench-0\"\n",
        broker.url()
    ));
    let off = node(String::new());
    wait_until(
        Instant::now() + Duration::from_secs(20),
        "the first events",
        || !sub.events().is_empty(),
    );
    let series = echo_version_series(6, reloads);
    settle_writeback();
    // Interleaved, so both see the same machine.
    for (v, lib) in &series {
        reload(&on, v, lib);
        reload(&off, v, lib);
    }
    let journal = on.journal().len();
    wait_until(
        Instant::now() + Duration::from_secs(30),
        "every event",
        || sub.unique_events().len() >= journal,
    );
    let mut delivered_ms = Vec::new();
    let received: std::collections::HashMap<u64, f64> = sub
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/event"))
        .filter_map(|m| {
            use prost::Message as _;
            let e = plugvisor_tests::report_pb::Event::decode(m.payload.as_slice()).ok()?;
            let at = m.received.duration_since(UNIX_EPOCH).ok()?.as_secs_f64() * 1e3;
            Some((e.sequence, at - e.timestamp_ms as f64))
        })
        .collect();
    for e in sub.unique_events() {
        if e.kind() == plugvisor_tests::report_pb::event::Kind::Activated
            && series.iter().any(|(v, _)| *v == e.version)
        {
            if let Some(ms) = received.get(&e.sequence) {
                delivered_ms.push(*ms);
            }
        }
    }
    let total = |d: &Daemon| -> Vec<f64> {
        reload_records(d)
            .iter()
            .map(|r| r.phase("total") / 1e3)
            .collect()
    };
    let r = Reporting {
        delivered_ms,
        reload_on_us: total(&on),
        reload_off_us: total(&off),
    };
    eprintln!(
        "reporting: event → subscriber p50 {:.1} ms; reload total p50 on {:.0} µs, off {:.0} µs",
        Dist::of(&r.delivered_ms).p50,
        Dist::of(&r.reload_on_us).p50,
        Dist::of(&r.reload_off_us).p50
    );
    r
}

/// The report's section.
pub fn render(md: &mut String, r: &Reporting) {
    use std::fmt::Write as _;
    let d = Dist::of(&r.delivered_ms);
    let on = Dist::of(&r.reload_on_us);
    let off = Dist::of(&r.reload_off_us);
    let _ = writeln!(
        md,
        "\n## Reporting over MQTT: event → subscriber, and reloads with it on and off\n\n\
         {} echo reloads on each of two nodes in turn, one with `[report.mqtt]` to Debian's mosquitto on loopback and one without; probes off ([`REPORTING.md`](REPORTING.md)). Event → subscriber is from the journal entry's time (milliseconds, so up to 1 ms high) to the subscriber's receipt of the `activated` event: the store's wake, the journal read, the outbox's append and fsync, the publish, the broker.\n\n\
         | measure | n | p50 | p99 | max |\n| --- | --- | --- | --- | --- |\n\
         | journal entry → event at the subscriber | {} | {:.1} ms | {:.1} ms | {:.1} ms |\n\
         | reload, total, reporting on | {} | {:.0} µs | {:.0} µs | {:.0} µs |\n\
         | reload, total, reporting off | {} | {:.0} µs | {:.0} µs | {:.0} µs |\n\n\
         Reload with reporting on ÷ off: {:.2}× at p50, {:.2}× at p99.",
        r.reload_off_us.len(),
        d.n,
        d.p50,
        d.p99,
        d.max,
        on.n,
        on.p50,
        on.p99,
        on.max,
        off.n,
        off.p50,
        off.p99,
        off.max,
        on.p50 / off.p50,
        on.p99 / off.p99,
    );
}
