//! Reading what the kernel counted and sent, into the metrics registry.
//!
//! Counters and histograms are read from the per-CPU maps at gather time
//! (a metrics refresher), so a scrape — and a rule — always sees the
//! kernel's current numbers. The ring buffer is drained by a task as soon
//! as it is readable: each closed reload window becomes an observation of
//! `plugvisor_kernel_reload_duration_seconds`, each connection broken
//! inside one a warning naming the listener and the reload. aya-log
//! records from the programs are flushed into the daemon's logs.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya_log::EbpfLogger;
use plugvisor_probes_common::{Event, EventKind, GapHist, ListenerCounters, Probe, maps, window};
use prometheus::IntCounter;
use tokio::io::unix::AsyncFd;

use super::WatchedListener;
use crate::metrics::{HistogramSnapshot, ListenerSeries, Metrics, ProbeStage};

/// aya-log's reader, forwarding through the `log` facade (which the
/// daemon's tracing subscriber collects).
pub type Logger = EbpfLogger<&'static dyn log::Log>;

use crate::markers::PluginNames;

/// Totals last exported, to turn the kernel's monotonic sums into deltas.
#[derive(Default, Clone, Copy)]
struct Seen {
    broken: u64,
    broken_in_crash: u64,
    broken_in_upgrade: u64,
    resets_sent: u64,
    resets_received: u64,
    retransmits: u64,
    goaway: u64,
    rst_stream: u64,
}

/// Exported service-gap buckets with `[metrics] detail = ["service_gap"]`:
/// `2^FIRST_GAP_BUCKET` ns (≈1 µs) up to `2^LAST_GAP_BUCKET` ns (≈34 s),
/// every log2 step; the kernel's finer buckets fold into the first one and
/// its coarser ones into `+Inf`.
const FIRST_GAP_BUCKET: usize = 10;
const LAST_GAP_BUCKET: usize = 35;

/// The default: every second log2 step, `2^12` ns (≈4 µs) to `2^34` ns
/// (≈17 s), 12 buckets. A request through userspace takes tens of µs,
/// and factor-4 steps still put each decade of gaps in buckets of its own
/// for the p99 the stall alert reads; 10 listeners × 2 windows cost 300
/// series instead of 580.
const DEFAULT_GAP_BUCKETS: std::ops::RangeInclusive<usize> = 12..=34;

/// Turns the kernel's per-CPU log2 histograms into one cumulative
/// snapshot, with every bucket (`all`) or the default set.
fn gap_snapshot(per_cpu: impl Iterator<Item = GapHist>, all: bool) -> HistogramSnapshot {
    let mut sum = GapHist::default();
    for h in per_cpu {
        for (a, b) in sum.buckets.iter_mut().zip(h.buckets) {
            *a += b;
        }
        sum.sum_ns += h.sum_ns;
    }
    let count: u64 = sum.buckets.iter().sum();
    let exported = |i: usize| {
        if all {
            (FIRST_GAP_BUCKET..=LAST_GAP_BUCKET).contains(&i)
        } else {
            DEFAULT_GAP_BUCKETS.contains(&i) && (i - DEFAULT_GAP_BUCKETS.start()).is_multiple_of(2)
        }
    };
    let mut cumulative = 0;
    let mut buckets = Vec::with_capacity(LAST_GAP_BUCKET - FIRST_GAP_BUCKET + 1);
    for (i, n) in sum.buckets.iter().enumerate().take(LAST_GAP_BUCKET + 1) {
        cumulative += n;
        if exported(i) {
            // Kernel bucket i holds gaps shorter than 2^i ns.
            buckets.push(((1u64 << i) as f64 / 1e9, cumulative));
        }
    }
    HistogramSnapshot {
        buckets,
        sum: sum.sum_ns as f64 / 1e9,
        count,
    }
}

/// Adds the growth of a kernel total to a counter.
fn advance(counter: &IntCounter, seen: &mut u64, total: u64) {
    if total > *seen {
        counter.inc_by(total - *seen);
        *seen = total;
    }
}

/// The kernel maps a refresher reads.
struct Maps {
    counters: PerCpuArray<MapData, ListenerCounters>,
    gaps: PerCpuArray<MapData, GapHist>,
    dropped: PerCpuArray<MapData, u64>,
}

/// Takes the maps the observer needs out of `ebpf` and starts reading them.
pub fn start(
    ebpf: &mut Ebpf,
    listeners: &[WatchedListener],
    plugins: &PluginNames,
    metrics: Arc<Metrics>,
    logger: Option<Logger>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let take = |ebpf: &mut Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| format!("map {name} missing"))
    };
    let maps = Maps {
        counters: PerCpuArray::try_from(take(ebpf, maps::LISTENER_COUNTERS)?)
            .map_err(|e| e.to_string())?,
        gaps: PerCpuArray::try_from(take(ebpf, maps::GAP_HIST)?).map_err(|e| e.to_string())?,
        dropped: PerCpuArray::try_from(take(ebpf, maps::DROPPED)?).map_err(|e| e.to_string())?,
    };
    let ring: RingBuf<MapData> =
        RingBuf::try_from(take(ebpf, maps::EVENTS)?).map_err(|e| e.to_string())?;

    // Every series present from the start, so "0 broken" is a value, not
    // an absence; resolved once, not per scrape.
    let series: Vec<ListenerSeries> = listeners
        .iter()
        .map(|l| {
            let s = metrics.listener(&l.name, l.protocol);
            s.connections.set(0);
            s
        })
        .collect();
    let dropped: Vec<IntCounter> = Probe::ALL
        .iter()
        .map(|p| metrics.probe_events_dropped(*p))
        .collect();

    let listener_names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    let listeners = listeners.to_vec();
    let seen = Mutex::new((
        vec![Seen::default(); listeners.len()],
        [0u64; Probe::COUNT as usize],
    ));
    let m = metrics.clone();
    metrics.add_refresher(Box::new(move || {
        let mut seen = seen.lock().expect("observer lock");
        let (per_listener, dropped_seen) = &mut *seen;
        for (i, l) in listeners.iter().enumerate() {
            refresh_listener(&m, &maps, i, l, &series[i], &mut per_listener[i]);
        }
        for p in Probe::ALL {
            if let Ok(values) = maps.dropped.get(&(p as u32), 0) {
                let total: u64 = values.iter().sum();
                advance(&dropped[p as usize], &mut dropped_seen[p as usize], total);
            }
        }
    }));

    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for
    // as long as it lives — which is as long as the AsyncFd that owns it.
    let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| format!("polling ring buffer: {e}"))?;
    if let Some(logger) = logger {
        // SAFETY: as above, for the logger's own ring buffer fd.
        match unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) } {
            Ok(fd) => {
                tokio::spawn(forward_logs(fd));
            }
            Err(e) => tracing::debug!(error = %e, "eBPF log forwarding unavailable"),
        }
    }
    Ok(tokio::spawn(drain(
        fd,
        plugins.clone(),
        listener_names,
        metrics,
    )))
}

fn refresh_listener(
    m: &Metrics,
    maps: &Maps,
    i: usize,
    l: &WatchedListener,
    series: &ListenerSeries,
    seen: &mut Seen,
) {
    let Ok(values) = maps.counters.get(&(i as u32), 0) else {
        m.probe_failure(Probe::SockState.as_str(), ProbeStage::Read);
        return;
    };
    let sum = values
        .iter()
        .fold(ListenerCounters::default(), |mut acc, c| {
            acc.opened += c.opened;
            acc.closed += c.closed;
            acc.broken_in_reload += c.broken_in_reload;
            acc.resets_sent += c.resets_sent;
            acc.resets_received += c.resets_received;
            acc.retransmits += c.retransmits;
            acc.goaway += c.goaway;
            acc.rst_stream += c.rst_stream;
            acc.broken_in_crash += c.broken_in_crash;
            acc.broken_in_upgrade += c.broken_in_upgrade;
            acc
        });
    let name = l.name.as_str();
    series
        .connections
        .set(sum.opened.saturating_sub(sum.closed) as i64);
    advance(&series.broken, &mut seen.broken, sum.broken_in_reload);
    advance(
        &series.broken_in_crash,
        &mut seen.broken_in_crash,
        sum.broken_in_crash,
    );
    advance(
        &series.broken_in_upgrade,
        &mut seen.broken_in_upgrade,
        sum.broken_in_upgrade,
    );
    advance(&series.resets_sent, &mut seen.resets_sent, sum.resets_sent);
    advance(
        &series.resets_received,
        &mut seen.resets_received,
        sum.resets_received,
    );
    advance(&series.retransmits, &mut seen.retransmits, sum.retransmits);
    if let Some(goaway) = &series.goaway {
        advance(goaway, &mut seen.goaway, sum.goaway);
    }
    if let Some(resets) = &series.stream_resets {
        advance(resets, &mut seen.rst_stream, sum.rst_stream);
    }
    for (w, label) in [(window::STEADY, "steady"), (window::RELOAD, "reload")] {
        match maps.gaps.get(&(i as u32 * 2 + w), 0) {
            Ok(values) => m.service_gap_seconds.set(
                &[name, label],
                gap_snapshot(values.iter().copied(), m.detail().service_gap),
            ),
            Err(_) => {
                m.probe_failure(Probe::ServiceGap.as_str(), ProbeStage::Read);
            }
        }
    }
}

async fn forward_logs(mut fd: AsyncFd<Logger>) {
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

async fn drain(
    mut fd: AsyncFd<RingBuf<MapData>>,
    plugins: PluginNames,
    listener_names: Vec<String>,
    metrics: Arc<Metrics>,
) {
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                metrics.probe_failure(Probe::ReloadMarkers.as_str(), ProbeStage::Read);
                tracing::error!(error = %e, "eBPF ring buffer unreadable; kernel reload latency no longer observed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole `Event` (size checked); read unaligned.
            let event: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            handle_event(&event, &plugins, &listener_names, &metrics);
        }
        guard.clear_ready();
    }
}

fn handle_event(event: &Event, plugins: &PluginNames, listeners: &[String], metrics: &Metrics) {
    let plugin_name = |i: u32| {
        plugins
            .read()
            .expect("plugin names")
            .get(i as usize)
            .cloned()
    };
    if event.kind == EventKind::ReloadEnd as u32 {
        let Some(plugin) = plugin_name(event.subject) else {
            return;
        };
        // Per reload, for comparing with the userspace figures of the
        // `reloaded` line of the same `seq` (the histogram's buckets are
        // too coarse for that).
        tracing::debug!(
            plugin,
            reload_seq = event.seq,
            window_ns = event.value,
            "kernel-measured reload window"
        );
        metrics.kernel_reload(&plugin, Duration::from_nanos(event.value));
    } else if event.kind == EventKind::HostRecovered as u32 {
        let Some(plugin) = plugin_name(event.subject) else {
            return;
        };
        tracing::debug!(
            plugin,
            host_pid = event.seq,
            recovery_ns = event.value,
            "kernel-measured recovery from a plugin host's crash"
        );
        metrics.kernel_crash_recovery(&plugin, Duration::from_nanos(event.value));
    } else if event.kind == EventKind::BrokenConnection as u32 {
        let old = (event.value >> 32) as u32;
        let new = event.value as u32;
        let listener = listeners
            .get(event.subject as usize)
            .map_or("?", String::as_str);
        tracing::warn!(
            listener,
            reload_seq = event.seq,
            old_state = old,
            new_state = new,
            "kernel saw a connection leave ESTABLISHED while a reload window was open"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_buckets_are_cumulative_and_fold_the_ends() {
        let mut a = GapHist::default();
        a.buckets[3] = 2; // 4..8 ns: folds into the first exported bucket
        a.buckets[20] = 5; // < 2^20 ns ≈ 1.05 ms
        a.sum_ns = 5_000_000;
        let mut b = GapHist::default();
        b.buckets[20] = 1;
        b.buckets[39] = 1; // beyond the last exported bucket: only in +Inf
        let s = gap_snapshot([a, b].into_iter(), true);
        assert_eq!(s.count, 9);
        assert_eq!(s.buckets.len(), 26);
        assert_eq!(s.buckets.first().unwrap().1, 2);
        let at_1ms = s
            .buckets
            .iter()
            .find(|(le, _)| (*le - 1_048_576e-9).abs() < 1e-12)
            .unwrap();
        assert_eq!(at_1ms.1, 8);
        assert_eq!(
            s.buckets.last().unwrap().1,
            8,
            "the 2^39 ns gap is only counted in +Inf"
        );
        assert!((s.sum - 0.005).abs() < 1e-12);

        // The default keeps every second bucket, 2^12 … 2^34 ns, with the
        // same cumulative counts at the bounds it keeps.
        let d = gap_snapshot([a, b].into_iter(), false);
        assert_eq!(d.buckets.len(), 12);
        assert_eq!(d.count, 9);
        let les: Vec<f64> = d.buckets.iter().map(|(le, _)| *le).collect();
        assert!((les[0] - 4096e-9).abs() < 1e-15, "{les:?}");
        assert!(
            (les[11] - (1u64 << 34) as f64 / 1e9).abs() < 1e-9,
            "{les:?}"
        );
        assert_eq!(d.buckets[0].1, 2);
        assert_eq!(
            d.buckets
                .iter()
                .find(|(le, _)| (*le - 1_048_576e-9).abs() < 1e-12)
                .unwrap()
                .1,
            8
        );
        assert_eq!(d.buckets.last().unwrap().1, 8);
    }
}
