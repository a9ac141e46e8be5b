//! Reading what the kernel counted and sent, into the metrics registry.
//!
//! Counters are read from the per-CPU maps at gather time (a metrics
//! refresher), so a scrape — and a rule — always sees the kernel's current
//! numbers. The ring buffer is drained by a task as soon as it is readable:
//! each closed reload window becomes an observation of
//! `plugvisor_kernel_reload_duration_seconds`, each connection broken
//! inside one a warning naming the listener and the reload.
use std::sync::{Arc, Mutex, RwLock};

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray, RingBuf};
use plugvisor_probes_common::{Event, EventKind, ListenerCounters, Probe, maps};
use tokio::io::unix::AsyncFd;

use super::WatchedListener;
use crate::metrics::{Metrics, ProbeStage};

/// Plugin names by the index the reload markers pass to the kernel.
pub type PluginNames = Arc<RwLock<Vec<String>>>;

/// Totals last exported, to turn the kernel's monotonic sums into deltas.
#[derive(Default, Clone, Copy)]
struct Seen {
    broken: u64,
}

/// Takes the maps the observer needs out of `ebpf` and starts reading them.
pub fn start(
    ebpf: &mut Ebpf,
    listeners: &[WatchedListener],
    plugins: &PluginNames,
    metrics: Arc<Metrics>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let take = |ebpf: &mut Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| format!("map {name} missing"))
    };
    let counters: PerCpuArray<MapData, ListenerCounters> =
        PerCpuArray::try_from(take(ebpf, maps::LISTENER_COUNTERS)?).map_err(|e| e.to_string())?;
    let dropped: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(take(ebpf, maps::DROPPED)?).map_err(|e| e.to_string())?;
    let ring: RingBuf<MapData> =
        RingBuf::try_from(take(ebpf, maps::EVENTS)?).map_err(|e| e.to_string())?;

    for l in listeners {
        // Present from the start, so "0 broken" is a value, not an absence.
        metrics
            .reload_broken_connections_total
            .with_label_values(&[&l.name, l.protocol.as_str()]);
        metrics.tcp_connections.with_label_values(&[&l.name]).set(0);
    }
    for p in Probe::ALL {
        metrics
            .probe_events_dropped_total
            .with_label_values(&[p.as_str()]);
    }

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
            let Ok(values) = counters.get(&(i as u32), 0) else {
                m.probe_failures_total
                    .with_label_values(&[Probe::SockState.as_str(), ProbeStage::Read.as_str()])
                    .inc();
                continue;
            };
            let sum = values
                .iter()
                .fold(ListenerCounters::default(), |mut acc, c| {
                    acc.opened += c.opened;
                    acc.closed += c.closed;
                    acc.broken_in_reload += c.broken_in_reload;
                    acc
                });
            let open = sum.opened.saturating_sub(sum.closed);
            m.tcp_connections
                .with_label_values(&[&l.name])
                .set(open as i64);
            let delta = sum.broken_in_reload.saturating_sub(per_listener[i].broken);
            if delta > 0 {
                m.reload_broken_connections_total
                    .with_label_values(&[&l.name, l.protocol.as_str()])
                    .inc_by(delta);
                per_listener[i].broken = sum.broken_in_reload;
            }
        }
        for p in Probe::ALL {
            if let Ok(values) = dropped.get(&(p as u32), 0) {
                let total: u64 = values.iter().sum();
                let delta = total.saturating_sub(dropped_seen[p as usize]);
                if delta > 0 {
                    m.probe_events_dropped_total
                        .with_label_values(&[p.as_str()])
                        .inc_by(delta);
                    dropped_seen[p as usize] = total;
                }
            }
        }
    }));

    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for
    // as long as it lives — which is as long as the AsyncFd that owns it.
    let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| format!("polling ring buffer: {e}"))?;
    Ok(tokio::spawn(drain(
        fd,
        plugins.clone(),
        listener_names,
        metrics,
    )))
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
                metrics
                    .probe_failures_total
                    .with_label_values(&[Probe::ReloadMarkers.as_str(), ProbeStage::Read.as_str()])
                    .inc();
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
        let seconds = event.value as f64 / 1e9;
        metrics
            .kernel_reload_duration_seconds
            .with_label_values(&[&plugin])
            .observe(seconds);
        tracing::debug!(
            plugin,
            seq = event.seq,
            kernel_us = event.value / 1000,
            "reload window closed"
        );
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
