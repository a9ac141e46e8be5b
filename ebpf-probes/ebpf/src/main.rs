//! plugvisor's kernel side.
//!
//! Hooks, and why these:
//! * `sock/inet_sock_set_state` (tracepoint, stable ABI, present where
//!   kprobes are compiled out) sees every TCP state change with ports
//!   already in host order. Only the server side of a watched listener is
//!   counted (`sport` is the listener's port), so one connection counts once
//!   however many states it walks through on its way down.
//! * uprobes on the daemon's own `plugvisor_reload_begin` /
//!   `plugvisor_reload_end` markers open and close the reload window in
//!   the kernel's clock; the window's length is the kernel-measured reload
//!   latency, and a connection that leaves ESTABLISHED while it is open is
//!   "broken during a reload".
//!
//! Counting happens here (per-CPU counters); the ring buffer only carries
//! the end of each window and each broken connection.
#![no_std]
#![no_main]
// The eBPF crate is built with nightly (aya-build); the atomic-add intrinsic
// is the one way to emit BPF's atomic add from Rust.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, tracepoint, uprobe},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, TracePointContext},
};
use plugvisor_probes_common::{
    Event, EventKind, IPPROTO_TCP, ListenerCounters, MAX_LISTENERS, Probe, ReloadWindow,
    TracepointLayout, WatchedPort, tcp_state,
};

#[map]
static WATCHED_PORTS: HashMap<u16, WatchedPort> = HashMap::with_max_entries(MAX_LISTENERS, 0);

#[map]
static RELOAD_WINDOW: Array<ReloadWindow> = Array::with_max_entries(1, 0);

#[map]
static LISTENER_COUNTERS: PerCpuArray<ListenerCounters> =
    PerCpuArray::with_max_entries(MAX_LISTENERS, 0);

#[map]
static LAYOUT: Array<TracepointLayout> = Array::with_max_entries(1, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(Probe::COUNT, 0);

/// Adds one to a counter in a map value.
///
/// An atomic add, even on per-CPU values: a program running in process
/// context (a `connect()`) can be interrupted on its CPU by the softirq
/// that completes the peer's handshake over loopback, and a plain
/// load-add-store then loses one of the two updates.
/// The BPF target has no `AtomicU64::fetch_add`; the intrinsic with its
/// result unused compiles to the `lock xadd` instruction every kernel with
/// eBPF accepts.
#[inline(always)]
fn bump(counter: *mut u64) {
    // SAFETY: `counter` points into a map value, valid and 8-byte aligned
    // for the duration of the program.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, 1,
        );
    }
}

/// Sends `event`, counting a full ring buffer against `probe` instead.
fn emit(probe: Probe, event: &Event) {
    if EVENTS.output::<Event>(event, 0).is_err()
        && let Some(dropped) = DROPPED.get_ptr_mut(probe as u32)
    {
        bump(dropped);
    }
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(layout) = LAYOUT.get(0) else {
        return Ok(());
    };
    if layout.ready == 0 {
        return Ok(());
    }
    // SAFETY: offsets come from this kernel's format file; read_at uses
    // bpf_probe_read, so a wrong offset yields garbage, never a fault.
    let protocol: u16 = unsafe { ctx.read_at(layout.protocol as usize) }.map_err(i64::from)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let sport: u16 = unsafe { ctx.read_at(layout.sport as usize) }.map_err(i64::from)?;
    // SAFETY: the value is copied out before anything else touches the map.
    let Some(watched) = (unsafe { WATCHED_PORTS.get(&sport) }).copied() else {
        return Ok(());
    };
    let old: i32 = unsafe { ctx.read_at(layout.oldstate as usize) }.map_err(i64::from)?;
    let new: i32 = unsafe { ctx.read_at(layout.newstate as usize) }.map_err(i64::from)?;
    let Some(counters) = LISTENER_COUNTERS.get_ptr_mut(watched.listener) else {
        return Ok(());
    };
    if new == tcp_state::ESTABLISHED && old != tcp_state::ESTABLISHED {
        // SAFETY: in-bounds field of the map value.
        bump(unsafe { &raw mut (*counters).opened });
    } else if old == tcp_state::ESTABLISHED && new != tcp_state::ESTABLISHED {
        // SAFETY: in-bounds field of the map value.
        bump(unsafe { &raw mut (*counters).closed });
        if let Some(window) = RELOAD_WINDOW.get(0)
            && window.open > 0
        {
            // SAFETY: in-bounds field of the map value.
            bump(unsafe { &raw mut (*counters).broken_in_reload });
            let event = Event {
                kind: EventKind::BrokenConnection as u32,
                subject: watched.listener,
                seq: window.seq,
                // SAFETY: plain helper call.
                ts_ns: unsafe { bpf_ktime_get_ns() },
                value: (u64::from(old as u32) << 32) | u64::from(new as u32),
            };
            emit(Probe::SockState, &event);
        }
    }
    Ok(())
}

#[uprobe]
pub fn reload_begin(ctx: ProbeContext) -> u32 {
    let plugin: u32 = ctx.arg(0).unwrap_or(u32::MAX);
    let seq: u64 = ctx.arg(1).unwrap_or(0);
    if let Some(window) = RELOAD_WINDOW.get_ptr_mut(0) {
        // SAFETY: reloads are serialised by the daemon; a lost race here
        // can only misattribute the window's plugin index, never fault.
        unsafe {
            (*window).plugin = plugin;
            (*window).seq = seq;
            (*window).begin_ns = bpf_ktime_get_ns();
            (*window).open = (*window).open.saturating_add(1);
        }
    }
    0
}

#[uprobe]
pub fn reload_end(ctx: ProbeContext) -> u32 {
    let plugin: u32 = ctx.arg(0).unwrap_or(u32::MAX);
    let seq: u64 = ctx.arg(1).unwrap_or(0);
    let Some(window) = RELOAD_WINDOW.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: see reload_begin.
    let (open, begin_ns, open_seq) = unsafe { ((*window).open, (*window).begin_ns, (*window).seq) };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: see reload_begin.
    unsafe { (*window).open = open.saturating_sub(1) };
    // A window whose begin we never saw (probe attached mid-reload) has no
    // duration worth reporting.
    if open == 0 || open_seq != seq {
        return 0;
    }
    let event = Event {
        kind: EventKind::ReloadEnd as u32,
        subject: plugin,
        seq,
        ts_ns: now,
        value: now.saturating_sub(begin_ns),
    };
    emit(Probe::ReloadMarkers, &event);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
