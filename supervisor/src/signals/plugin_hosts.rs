//! Each plugin host's resource use, as the kernel counts it, read at
//! gather time: `plugvisor_plugin_memory_bytes`, `_cpu_seconds_total`,
//! `_threads`, per plugin and version — what a leak rule reads
//! (`docs/RULES.md`). A plugin that runs in-process has no series: its use
//! is the daemon's own (`process_*`).
//!
//! A version's CPU counter adds what each of its hosts used since the
//! last read, so a host replaced after a crash does not make it go down;
//! memory and threads are the hosts' levels now. A version no longer
//! mapped loses its series.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::health::SlotSource;
use crate::metrics::Metrics;

/// (plugin, version)
type Series = (String, String);

#[derive(Default)]
struct Seen {
    // Each host's CPU seconds at the last read, by pid.
    cpu: HashMap<u32, f64>,
    series: HashSet<Series>,
}

/// Registers the refresher.
pub fn start(metrics: &Arc<Metrics>, slots: SlotSource) {
    let seen = Mutex::new(Seen::default());
    let m = Arc::downgrade(metrics);
    metrics.add_refresher(Box::new(move || {
        let Some(m) = m.upgrade() else { return };
        // A reload holds the slots: the last values stand.
        let Some(slots) = slots() else { return };
        let mut seen = seen.lock().expect("sampler lock");
        let mut now: HashMap<Series, (f64, i64)> = HashMap::new();
        let mut cpu_now = HashMap::new();
        for slot in slots {
            for installed in slot.mapped() {
                let Some(host) = installed.loaded.host() else {
                    continue;
                };
                if host.exit().is_some() {
                    continue;
                }
                let key = (slot.plugin().to_owned(), installed.version().to_owned());
                let usage = host.usage();
                let level = now.entry(key.clone()).or_default();
                level.0 += usage.memory_bytes.unwrap_or(0) as f64;
                level.1 += usage.threads.unwrap_or(0) as i64;
                if let Some(cpu) = usage.cpu_seconds {
                    let before = seen.cpu.get(&host.pid()).copied().unwrap_or(0.0);
                    m.plugin_host_cpu(&key.0, &key.1, cpu - before);
                    cpu_now.insert(host.pid(), cpu.max(before));
                }
            }
        }
        for ((plugin, version), (bytes, threads)) in &now {
            m.plugin_host_levels(plugin, version, *bytes, *threads);
        }
        let current: HashSet<Series> = now.into_keys().collect();
        for (plugin, version) in seen.series.difference(&current) {
            m.forget_plugin_host(plugin, version);
        }
        seen.series = current;
        seen.cpu = cpu_now;
    }));
}
