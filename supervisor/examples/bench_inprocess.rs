//! In-process measurements for `cargo xtask bench` (the driver,
//! `plugvisor-bench`, runs this and reads one JSON object from stdout):
//!
//! * `dispatch` — a request through [`Slot::call`] (inline, and with the default timeout) (admission check,
//!   arc-swap load, the safe wrapper, the per-version counter) against a
//!   direct call of the same plugin function through its descriptor, on
//!   the echo library; alternating rounds, ns per call.
//! * `switch` — a thread dispatches without pause while the main thread
//!   installs new versions: the swap alone (arc-swap store) per install,
//!   and, on the dispatching thread, the longest interval between two
//!   consecutive answers that spans a swap against those that do not.
//! * `metrics` — `Metrics::encode` (what `GET /metrics` serves) with 50
//!   plugins and 10 listeners populated at their worst, with the default
//!   series and with every detail series.
//!
//! Usage: `bench_inprocess ECHO_LIBRARY [--quick]`. Nothing here asserts a
//! time.
use std::ffi::c_void;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use plugvisor::host::Loaded;
use plugvisor::loader::{self, LoadedVersion};
use plugvisor::metrics::{Detail, HistogramSnapshot, Metrics, Phase, ReloadOutcome};
use plugvisor::slot::{DispatchError, Slot};
use plugvisor_sdk::{DESCRIPTOR_SYMBOL, PluginDescriptor, PvBuf};
use semver::Version;
use serde_json::json;

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    json!({
        "n": v.len(),
        "p50": percentile(&v, 0.5),
        "p99": percentile(&v, 0.99),
        "max": v.last().copied().unwrap_or(f64::NAN),
        "mean": v.iter().sum::<f64>() / v.len().max(1) as f64,
        "values": v,
    })
}

/// Loads the echo library from its own copy (dlopen gives a distinct
/// image only to a distinct path), as the store would.
fn load_copy(dir: &Path, lib: &Path, n: u32) -> LoadedVersion {
    let path = dir.join(format!("echo-{n}.so"));
    std::fs::copy(lib, &path).expect("copying the echo library");
    let version = echo_version(lib);
    loader::load(
        "echo",
        &version,
        plugvisor_sdk::ABI_VERSION,
        &format!("{n:064}"),
        &path,
        &loader::InitBound::standalone(Duration::from_secs(10)),
    )
    .expect("loading the echo library")
    .0
}

fn echo_version(lib: &Path) -> Version {
    let id = loader::inspect(lib).expect("reading the echo library's descriptor");
    Version::parse(&id.version).expect("the echo library's version is semver")
}

/// The plugin's own entry points, called with no plugvisor code between.
struct Direct {
    descriptor: &'static PluginDescriptor,
    instance: *mut c_void,
    _library: libloading::os::unix::Library,
}

impl Direct {
    fn open(path: &Path) -> Direct {
        use libloading::os::unix::{RTLD_LOCAL, RTLD_NOW};
        // SAFETY: the echo library's constructors are benign.
        let library =
            unsafe { libloading::os::unix::Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
                .expect("dlopen echo");
        // SAFETY: the symbol is the SDK's descriptor, static data of a
        // library this value keeps mapped.
        let descriptor: &'static PluginDescriptor = unsafe {
            let sym = library
                .get::<*const PluginDescriptor>(DESCRIPTOR_SYMBOL.as_bytes())
                .expect("descriptor symbol");
            &*sym.into_raw().cast::<PluginDescriptor>()
        };
        let mut instance = std::ptr::null_mut();
        let mut err = PvBuf::EMPTY;
        // SAFETY: valid out-pointers.
        let st = unsafe { (descriptor.init)(&raw mut instance, &raw mut err) };
        assert_eq!(st, plugvisor_sdk::status::OK, "echo init");
        Direct {
            descriptor,
            instance,
            _library: library,
        }
    }

    /// The same work as the loader's wrapper needs at the least: call,
    /// copy the answer out, give the buffer back.
    fn call(&self, request: &[u8]) -> Vec<u8> {
        let d = self.descriptor;
        let mut out = PvBuf::EMPTY;
        // SAFETY: instance from init; request valid; out writable.
        let st =
            unsafe { (d.handle)(self.instance, request.as_ptr(), request.len(), &raw mut out) };
        assert_eq!(st, plugvisor_sdk::status::OK);
        // SAFETY: the plugin filled `out`.
        let v = unsafe { std::slice::from_raw_parts(out.ptr, out.len) }.to_vec();
        // SAFETY: returned to the plugin's allocator.
        unsafe { (d.free)(out) };
        v
    }
}

/// `Slot::call` as a listener makes it, for code with no runtime of its
/// own: with a zero timeout the plugin runs inline and the future is ready
/// at once.
fn call_inline(slot: &Slot, req: &[u8]) -> Result<Vec<u8>, DispatchError> {
    futures::executor::block_on(slot.call(req.to_vec(), Duration::ZERO)).0
}

/// [`ns_per_call`] for the bounded path: `iters` awaited `Slot::call`s
/// with `timeout` inside one task of a current-thread runtime, like a
/// connection task.
fn ns_per_bounded_call(
    rt: &tokio::runtime::Runtime,
    slot: &Slot,
    req: &[u8],
    timeout: Duration,
    iters: u32,
) -> f64 {
    rt.block_on(async {
        let t = Instant::now();
        let mut sink = 0usize;
        for _ in 0..iters {
            sink = sink.wrapping_add(
                slot.call(black_box(req).to_vec(), timeout)
                    .await
                    .0
                    .map_or(0, |v| v.len()),
            );
        }
        black_box(sink);
        t.elapsed().as_nanos() as f64 / f64::from(iters)
    })
}

fn ns_per_call(iters: u32, mut f: impl FnMut() -> usize) -> f64 {
    let t = Instant::now();
    let mut sink = 0usize;
    for _ in 0..iters {
        sink = sink.wrapping_add(f());
    }
    black_box(sink);
    t.elapsed().as_nanos() as f64 / f64::from(iters)
}

fn dispatch(dir: &Path, lib: &Path, quick: bool) -> serde_json::Value {
    let (rounds, iters) = if quick { (3, 50_000) } else { (21, 400_000) };
    let slot = Slot::new("echo", 2, Arc::new(Metrics::new()));
    slot.install(Loaded::InProcess(load_copy(dir, lib, 0)));
    let direct_path = dir.join("echo-direct.so");
    std::fs::copy(lib, &direct_path).expect("copying the echo library");
    let direct = Direct::open(&direct_path);
    let active = slot.active().expect("installed");
    let req = b"ping";
    assert_eq!(
        direct.call(req),
        call_inline(&slot, req).expect("dispatch"),
        "both paths give the same answer"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // The default `request_timeout`: every call handed to a runner thread.
    let bounded = Duration::from_secs(5);
    let bounded_iters = iters / 10;
    let (mut d, mut s, mut w, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate the order so drift favours neither side.
        let mut sides: [u8; 4] = [0, 1, 2, 3];
        sides.rotate_left(round % 4);
        for side in sides {
            match side {
                0 => d.push(ns_per_call(iters, || direct.call(black_box(req)).len())),
                1 => s.push(ns_per_call(iters, || {
                    call_inline(&slot, black_box(req)).map_or(0, |v| v.len())
                })),
                3 => b.push(ns_per_bounded_call(&rt, &slot, req, bounded, bounded_iters)),
                _ => w.push(ns_per_call(iters, || {
                    let Loaded::InProcess(version) = &active.loaded else {
                        unreachable!("installed in-process above")
                    };
                    version.handle(black_box(req)).map_or(0, |v| v.len())
                })),
            }
        }
    }
    json!({
        "rounds": rounds,
        "iters": iters,
        "direct_ns": summary(d),
        "slot_ns": summary(s),
        "wrapper_ns": summary(w),
        "bounded_iters": bounded_iters,
        "slot_bounded_ns": summary(b),
    })
}

/// A copy of the echo library answering as another version: every
/// occurrence of its version string rewritten in place with one of the
/// same length (the test harness' version-series trick; the library reads
/// its version at run time). `n` numbers the copy.
fn version_copy(dir: &Path, lib: &Path, n: u32) -> LoadedVersion {
    let base = echo_version(lib).to_string();
    let digits = base.len() - base.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    // Keep the leading digit of the number: semver allows no leading zero.
    let width = digits.saturating_sub(1).min(5);
    assert!(
        u64::from(n) < 10u64.pow(width as u32),
        "{base} leaves room for too few versions; pass the version-series base (x.0.100000)"
    );
    let version = format!("{}{n:0width$}", &base[..base.len() - width]);
    let mut bytes = std::fs::read(lib).expect("reading the echo library");
    let needle = base.as_bytes();
    let mut at = 0;
    while let Some(i) = bytes[at..].windows(needle.len()).position(|w| w == needle) {
        bytes[at + i..at + i + needle.len()].copy_from_slice(version.as_bytes());
        at += i + needle.len();
    }
    let path = dir.join(format!("echo-v{n}.so"));
    std::fs::write(&path, &bytes).expect("writing a version copy");
    loader::load(
        "echo",
        &Version::parse(&version).expect("semver"),
        plugvisor_sdk::ABI_VERSION,
        &format!("{n:064}"),
        &path,
        &loader::InitBound::standalone(Duration::from_secs(10)),
    )
    .expect("loading a version copy")
    .0
}

/// A thread dispatches without pause and notes, at each change of the
/// version that answers, the interval from the last answer of the old
/// version to the first of the new: the time no version answered it.
fn switch(dir: &Path, lib: &Path, quick: bool) -> serde_json::Value {
    let swaps = if quick { 20 } else { 400 };
    // Pre-load every version: the load is not what is measured here.
    let mut versions: Vec<LoadedVersion> = (1..=swaps).map(|n| version_copy(dir, lib, n)).collect();
    versions.reverse();
    let slot = Arc::new(Slot::new("echo", 4, Arc::new(Metrics::new())));
    slot.install(Loaded::InProcess(version_copy(dir, lib, 0)));
    let recording = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let base = Instant::now();
    let dispatcher = {
        let (slot, recording, stop, progress) = (
            slot.clone(),
            recording.clone(),
            stop.clone(),
            progress.clone(),
        );
        std::thread::spawn(move || {
            let mut steady: Vec<u64> = Vec::with_capacity(4 << 20);
            let mut changes: Vec<u64> = Vec::new();
            let mut failures = 0u64;
            let mut n = 0u64;
            let mut last = Vec::new();
            let mut prev = base.elapsed().as_nanos() as u64;
            while !stop.load(Ordering::Relaxed) {
                let answer = call_inline(&slot, black_box(b"gap"));
                let now = base.elapsed().as_nanos() as u64;
                match answer {
                    Ok(a) if a != last => {
                        if !last.is_empty() {
                            changes.push(now - prev);
                        }
                        last = a;
                    }
                    Ok(_) => {
                        if recording.load(Ordering::Relaxed) && steady.len() < steady.capacity() {
                            steady.push(now - prev);
                        }
                    }
                    Err(_) => failures += 1,
                }
                prev = now;
                n += 1;
                progress.store(n, Ordering::Relaxed);
            }
            (steady, changes, failures)
        })
    };
    // Swap only while the dispatcher is seen answering, before and after:
    // on a busy machine it may otherwise sit off-CPU through the swap.
    let answering = |k: u64| {
        let p0 = progress.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(2);
        while progress.load(Ordering::Relaxed) < p0 + k && Instant::now() < deadline {
            std::hint::spin_loop();
        }
    };
    let mut swap_ns = Vec::new();
    for _ in 0..swaps {
        recording.store(true, Ordering::Relaxed);
        answering(2000);
        let (_, swap, _) =
            slot.install_timed(Loaded::InProcess(versions.pop().expect("one per swap")));
        answering(2000);
        recording.store(false, Ordering::Relaxed);
        swap_ns.push(swap.as_nanos() as f64);
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let (steady, changes, failures) = dispatcher.join().expect("dispatcher");
    let mut steady: Vec<f64> = steady.into_iter().map(|v| v as f64).collect();
    steady.sort_by(f64::total_cmp);
    json!({
        "swaps": swaps,
        "failed_dispatches": failures,
        "version_changes_seen": changes.len(),
        "swap_ns": summary(swap_ns),
        "gap_across_swap_ns": summary(changes.into_iter().map(|v| v as f64).collect()),
        "steady_interval_ns": {
            "n": steady.len(),
            "p50": percentile(&steady, 0.5),
            "p99": percentile(&steady, 0.99),
            "p999": percentile(&steady, 0.999),
            "max": steady.last().copied().unwrap_or(f64::NAN),
        },
    })
}

/// A registry filled as a daemon with `plugins` plugins and `listeners`
/// listeners fills it at its worst, through the same record functions:
/// per plugin four mapped versions (requests and host resources each),
/// every reload phase observed, a kernel reload window, a crash recovered
/// (daemon and kernel side), every state series at zero, a rollback and
/// a degradation reason, its fleet sync state, its health check; per
/// listener the kernel-observed families and both service-gap
/// histograms, with every bucket non-zero.
fn populated_metrics(plugins: usize, listeners: usize, detail: Detail) -> Metrics {
    use plugvisor::config::Protocol;
    use plugvisor::metrics::PluginCall;
    let m = Metrics::with_detail(detail);
    m.probes_at_zero();
    m.upgrades_at_zero();
    m.sync_at_zero(&plugvisor::fleet::sync::STAGES);
    let phases = [
        Phase::Verify,
        Phase::Stage,
        Phase::Load,
        Phase::Init,
        Phase::Switch,
        Phase::Publish,
        Phase::Total,
    ];
    for p in 0..plugins {
        let plugin = format!("plugin-{p:02}");
        m.plugin_at_zero(&plugin, &["manual", "crash-in-trial", "crash"]);
        m.host_restarts_at_zero(
            &plugin,
            &["segfault", "abort", "oom", "hang", "exit", "signal"],
        );
        m.plugin_isolation(&plugin, "process", "cgroup1");
        for v in 0..4u32 {
            let version = format!("1.{v}.0");
            m.plugin_info(&plugin, &version, if v == 3 { "active" } else { "standby" });
            let r = m.requests(&plugin, &version);
            r.ok.inc_by(1000 * u64::from(v + 1));
            m.plugin_host_levels(&plugin, &version, 4e6, 3);
            m.plugin_host_cpu(&plugin, &version, 0.5);
        }
        for o in ReloadOutcome::ALL {
            m.reload(&plugin, o);
        }
        for (i, ph) in phases.iter().enumerate() {
            for k in 0..20u32 {
                m.reload_phase(
                    &plugin,
                    *ph,
                    Duration::from_secs_f64(1e-5 * f64::from(k + 1) * (i + 1) as f64),
                );
            }
        }
        m.kernel_reload(&plugin, Duration::from_micros(240));
        m.crash_recovery(&plugin).observe(0.02);
        m.kernel_crash_recovery(&plugin, Duration::from_millis(19));
        m.rollback(&plugin, "errors");
        m.degradation_at_zero(&plugin, "errors");
        m.sync_state(
            &plugin,
            "synced",
            &["synced", "pending", "stale", "blocked", "expired"],
        );
        let check = format!("plugin:{plugin}");
        m.health_up(&check, &plugin, true);
        m.health(&check, &plugin).duration.observe(1e-4);
        for call in [PluginCall::Init, PluginCall::Handle] {
            m.calls(&plugin, call);
        }
    }
    for l in 0..listeners {
        let listener = format!("listener-{l}");
        let protocol = if l % 2 == 0 {
            Protocol::Tcp
        } else {
            Protocol::Grpc
        };
        m.listener(&listener, protocol).connections.set(20);
        m.handed_over_at_zero(&listener);
        for window in ["reload", "steady"] {
            // The observer's log2 buckets: every one from 2^10 ns (~1 µs)
            // to 2^35 ns (~34 s) in detail, every second one from 2^12 to
            // 2^34 by default.
            let (range, step) = if detail.service_gap {
                (10..=35u32, 1)
            } else {
                (12..=34, 2)
            };
            let buckets = range
                .step_by(step)
                .map(|i| ((1u64 << i) as f64 / 1e9, 100 * u64::from(i - 9)))
                .collect();
            m.service_gap_seconds.set(
                &[&listener, window],
                HistogramSnapshot {
                    buckets,
                    sum: 1.5,
                    count: 2600,
                },
            );
        }
    }
    m.rule_state("errors", 0);
    m
}

/// Encodes `populated_metrics` of 50 plugins and 10 listeners, default
/// series and with every detail, alternating.
fn metrics_encode(quick: bool) -> serde_json::Value {
    let (plugins, listeners) = (50, 10);
    let all = Detail {
        reload_phases: true,
        service_gap: true,
        crash_recovery: true,
        health_checks: true,
    };
    let sets = [
        (
            "default",
            populated_metrics(plugins, listeners, Detail::default()),
        ),
        ("detail", populated_metrics(plugins, listeners, all)),
    ];
    let n = if quick { 20 } else { 500 };
    let mut us = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for _ in 0..n {
        for (i, (_, m)) in sets.iter().enumerate() {
            let t = Instant::now();
            let out = m.encode();
            us[i].push(t.elapsed().as_nanos() as f64 / 1e3);
            black_box(out);
        }
    }
    let mut out = serde_json::Map::new();
    for ((name, m), us) in sets.iter().zip(us) {
        let text = m.encode();
        let series = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty() && l[0] != b'#' && !l.starts_with(b"process_"))
            .count();
        out.insert(
            (*name).to_owned(),
            json!({
                "series": series,
                "bytes": text.len(),
                "encode_us": summary(us),
            }),
        );
    }
    json!({
        "plugins": plugins,
        "listeners": listeners,
        "sets": out,
    })
}

/// `Store::stage` alone (sha256 while copying into the store, no fsync)
/// against one sha256 pass over the same bytes in memory, alternating, for
/// each library: what staging adds to the hash it cannot avoid.
fn stage(dir: &Path, libs: &[PathBuf], quick: bool) -> serde_json::Value {
    use sha2::Digest as _;
    let rounds = if quick { 3 } else { 30 };
    let store = plugvisor::store::Store::open(&dir.join("state")).expect("store");
    let out: Vec<serde_json::Value> = libs
        .iter()
        .map(|lib| {
            let bytes = std::fs::read(lib).expect("reading a library");
            let sha = hex::encode(sha2::Sha256::digest(&bytes));
            let (mut staged, mut hashed) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let t = Instant::now();
                let s = store.stage("bench", lib, &sha).expect("staging");
                staged.push(t.elapsed().as_nanos() as f64);
                std::fs::remove_file(&s.path).expect("removing the object");
                let t = Instant::now();
                black_box(sha2::Sha256::digest(&bytes));
                hashed.push(t.elapsed().as_nanos() as f64);
            }
            json!({
                "library": lib.display().to_string(),
                "bytes": bytes.len(),
                "stage_ns": summary(staged),
                "sha256_ns": summary(hashed),
            })
        })
        .collect();
    serde_json::Value::Array(out)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let lib = PathBuf::from(
        args.next()
            .expect("usage: bench_inprocess ECHO_LIBRARY [--quick] [--stage LIB]..."),
    );
    let mut quick = false;
    let mut stage_libs = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--stage" => stage_libs.extend(args.next().map(PathBuf::from)),
            other => panic!("unknown argument {other}"),
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let out = json!({
        "dispatch": dispatch(dir.path(), &lib, quick),
        "switch": switch(dir.path(), &lib, quick),
        "metrics": metrics_encode(quick),
        "stage": stage(dir.path(), &stage_libs, quick),
    });
    println!("{out}");
}
