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
//! * `tcp/tcp_send_reset`, `tcp/tcp_receive_reset`, `tcp/tcp_retransmit_skb`
//!   (tracepoints) count resets and retransmits of the server side of a
//!   watched listener.
//! * `sock/sock_recv_length` and `sock/sock_send_length` (tracepoints) give
//!   the service gap: time from a request's bytes being read to the next
//!   response bytes being written on a watched socket, bucketed in the
//!   kernel by whether a reload window was open — a stall is as visible as a
//!   break. They carry only a socket pointer, so `inet_sock_set_state`
//!   keeps `WATCHED_SOCKS` (our server-side sockets) for them.
//! * HTTP/2 frames (GOAWAY, RST_STREAM) the server sends on gRPC listeners
//!   are counted by a `cgroup_skb` egress program on the daemon's own cgroup.
//!   Why that hook: it sees exactly the bytes that leave, in order, with TCP
//!   sequence numbers that tell where each frame header lies even when a
//!   frame spans packets; it needs no registration of sockets, so
//!   connections already open when it attached are picked up (at the first
//!   packet that starts on a plausible frame header); and it only reads —
//!   unlike `sk_msg`, which moves every watched socket onto the sockmap
//!   send path, or syscall tracepoints, which would have to map fds to
//!   sockets and walk user-space iovecs. A connection is recognised as
//!   HTTP/2 by the server's first frame, SETTINGS on stream 0.
//!
//! * `sched/sched_process_exit` (tracepoint) sees a plugin host die — any
//!   signal, any exit — in the kernel's clock, whatever the daemon learns
//!   later; uprobes on the daemon's `plugvisor_host_serving`,
//!   `plugvisor_host_retired` and `plugvisor_host_recovered` markers say
//!   which processes are serving hosts and when the first answer by a
//!   replacement went out. Between the two a crash window is open, and a
//!   connection that leaves ESTABLISHED then was broken across the crash.
//!
//! Counting happens here (per-CPU counters and log2 histograms); the ring
//! buffer only carries the end of each window and each broken connection.
#![no_std]
#![no_main]
// The eBPF crate is built with nightly (aya-build); the atomic-add intrinsic
// is the one way to emit BPF's atomic add from Rust.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    helpers::{bpf_get_current_pid_tgid, bpf_get_socket_cookie},
    macros::{cgroup_skb, map, tracepoint, uprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{ProbeContext, SkBuffContext, TracePointContext},
};
use aya_log_ebpf::info;
use plugvisor_probes_common::{
    Event, EventKind, GAP_BUCKETS, GapHist, H2Flow, HostLife, IPPROTO_TCP, ListenerCounters,
    MAX_LISTENERS, Probe, ReloadWindow, SockState, TracepointLayout, WatchedPort, h2, tcp_state,
    window,
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

/// Sockets tracked at once; an LRU so a flood of connections evicts the
/// oldest instead of failing inserts.
const MAX_SOCKS: u32 = 65_536;

#[map]
static WATCHED_SOCKS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

#[map]
static GAP_HIST: PerCpuArray<GapHist> = PerCpuArray::with_max_entries(MAX_LISTENERS * 2, 0);

#[map]
static H2_FLOWS: LruHashMap<u64, H2Flow> = LruHashMap::with_max_entries(MAX_SOCKS, 0);

#[map]
static H2_TAIL: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(Probe::COUNT, 0);

/// Serving plugin hosts at once: far more than `keep_loaded` × plugins.
const MAX_HOSTS: u32 = 4096;

#[map]
static HOST_PIDS: HashMap<u32, HostLife> = HashMap::with_max_entries(MAX_HOSTS, 0);

#[map]
static CRASH_WINDOWS: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static UPGRADE_WINDOWS: Array<u64> = Array::with_max_entries(1, 0);

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
    let skaddr: u64 = unsafe { ctx.read_at(layout.skaddr as usize) }.map_err(i64::from)?;
    if new == tcp_state::CLOSE {
        // Gone for good: stop tracking it for the service gap.
        let _ = WATCHED_SOCKS.remove(&skaddr);
    }
    if new == tcp_state::ESTABLISHED && old != tcp_state::ESTABLISHED {
        let state = SockState {
            listener: watched.listener,
            window_at_recv: 0,
            recv_ns: 0,
        };
        let _ = WATCHED_SOCKS.insert(&skaddr, &state, 0);
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
        // Across a crash only plugvisor's side counts: it closed the
        // connection (FIN_WAIT1) or it was reset (CLOSE). A client that
        // hangs up on its own — say, reconnecting after the error answer
        // to its lost request — leaves to CLOSE_WAIT.
        if new != tcp_state::CLOSE_WAIT && CRASH_WINDOWS.get(0).is_some_and(|open| *open > 0) {
            // SAFETY: in-bounds field of the map value.
            bump(unsafe { &raw mut (*counters).broken_in_crash });
        }
        // Across an upgrade, the same: what plugvisor closed or what was
        // reset, never a client's own hang-up.
        if new != tcp_state::CLOSE_WAIT && UPGRADE_WINDOWS.get(0).is_some_and(|open| *open > 0) {
            // SAFETY: in-bounds field of the map value.
            bump(unsafe { &raw mut (*counters).broken_in_upgrade });
        }
    }
    Ok(())
}

/// The layout, once userspace has written it.
#[inline(always)]
fn layout() -> Option<&'static TracepointLayout> {
    LAYOUT.get(0).filter(|l| l.ready != 0)
}

/// Counters of the listener on local `port`, if it is watched.
#[inline(always)]
fn counters_for_port(port: u16) -> Option<*mut ListenerCounters> {
    // SAFETY: the value is copied out at once.
    let watched = unsafe { WATCHED_PORTS.get(&port) }.copied()?;
    LISTENER_COUNTERS.get_ptr_mut(watched.listener)
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let Some(layout) = layout() else { return 0 };
    // SAFETY: offsets from this kernel's format file; bpf_probe_read underneath.
    let Ok(raw) = (unsafe { ctx.read_at::<u16>(layout.send_reset_sport as usize) }) else {
        return 0;
    };
    let port = if layout.send_reset_sport_be != 0 {
        u16::from_be(raw)
    } else {
        raw
    };
    if let Some(c) = counters_for_port(port) {
        // SAFETY: in-bounds field of the map value.
        bump(unsafe { &raw mut (*c).resets_sent });
    }
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let Some(layout) = layout() else { return 0 };
    // SAFETY: as above.
    let Ok(port) = (unsafe { ctx.read_at::<u16>(layout.receive_reset_sport as usize) }) else {
        return 0;
    };
    if let Some(c) = counters_for_port(port) {
        // SAFETY: in-bounds field of the map value.
        bump(unsafe { &raw mut (*c).resets_received });
    }
    0
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let Some(layout) = layout() else { return 0 };
    // SAFETY: as above.
    let Ok(port) = (unsafe { ctx.read_at::<u16>(layout.retransmit_sport as usize) }) else {
        return 0;
    };
    if let Some(c) = counters_for_port(port) {
        // SAFETY: in-bounds field of the map value.
        bump(unsafe { &raw mut (*c).retransmits });
    }
    0
}

/// The watched socket and byte count of a `sock_*_length` event, if it is
/// one of ours and moved data.
#[inline(always)]
fn length_event(ctx: &TracePointContext) -> Option<*mut SockState> {
    let layout = layout()?;
    let daemon = RELOAD_WINDOW.get(0).map_or(0, |w| w.tgid);
    if daemon != 0 && (bpf_get_current_pid_tgid() >> 32) as u32 != daemon {
        return None;
    }
    // SAFETY: the offset is the tracepoint's own field, from its format
    // file; read_at checks the access with bpf_probe_read.
    let ret: i32 = unsafe { ctx.read_at(layout.length_ret as usize) }.ok()?;
    if ret <= 0 {
        return None;
    }
    // SAFETY: as above.
    let sk: u64 = unsafe { ctx.read_at(layout.length_sk as usize) }.ok()?;
    WATCHED_SOCKS.get_ptr_mut(&sk)
}

#[inline(always)]
fn window_open() -> bool {
    RELOAD_WINDOW.get(0).is_some_and(|w| w.open > 0)
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    let Some(state) = length_event(&ctx) else {
        return 0;
    };
    // SAFETY: map value pointer; a racing update on another CPU can only
    // shift which read starts the gap, never fault.
    unsafe {
        if (*state).recv_ns == 0 {
            (*state).recv_ns = bpf_ktime_get_ns();
            (*state).window_at_recv = u32::from(window_open());
        }
    }
    0
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    let Some(state) = length_event(&ctx) else {
        return 0;
    };
    // SAFETY: as above.
    let (recv_ns, at_recv, listener) =
        unsafe { ((*state).recv_ns, (*state).window_at_recv, (*state).listener) };
    if recv_ns == 0 {
        return 0;
    }
    // SAFETY: as above.
    unsafe { (*state).recv_ns = 0 };
    // SAFETY: plain helper call.
    let gap = unsafe { bpf_ktime_get_ns() }.saturating_sub(recv_ns);
    let win = if at_recv != 0 || window_open() {
        window::RELOAD
    } else {
        window::STEADY
    };
    let Some(hist) = GAP_HIST.get_ptr_mut(listener * 2 + win) else {
        return 0;
    };
    let bucket = ((64 - gap.leading_zeros()) as usize).min(GAP_BUCKETS - 1);
    // SAFETY: per-CPU value; bucket is clamped to the array.
    unsafe {
        bump(&raw mut (*hist).buckets[bucket]);
        let sum = &raw mut (*hist).sum_ns;
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            sum, gap,
        );
    }
    0
}

/// Whether sequence number `a` comes before `b` (RFC 1982 arithmetic).
#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Whether a header's type is one HTTP/2 defines; the only check a
/// header allows (its 24-bit length is always in range).
#[inline(always)]
fn plausible(kind: u8) -> bool {
    kind <= h2::MAX_KNOWN_TYPE
}

/// One packet's place in its connection's byte stream.
struct Packet {
    /// Offset of the TCP payload in the skb.
    payload: u32,
    /// Sequence numbers of its first byte and of the byte after its last.
    seq: u32,
    end: u32,
}

impl Packet {
    /// Loads the byte at sequence number `pos`, which lies in the packet.
    #[inline(always)]
    fn byte(&self, ctx: &SkBuffContext, pos: u32) -> Option<u8> {
        ctx.load::<u8>((self.payload + pos.wrapping_sub(self.seq)) as usize)
            .ok()
    }
}

/// Counts that the probe lost its place in a connection's frames (and
/// will pick it up again at a packet that starts on a plausible header).
#[inline(always)]
fn lost_place() {
    if let Some(dropped) = DROPPED.get_ptr_mut(Probe::Http2Frames as u32) {
        bump(dropped);
    }
}

#[cgroup_skb(egress)]
pub fn h2_egress(ctx: SkBuffContext) -> i32 {
    let _ = try_h2_egress(&ctx);
    // Inspection only: every packet passes.
    1
}

/// Walks the frame headers in one outgoing packet of a watched gRPC
/// connection, counting GOAWAY and RST_STREAM.
///
/// A connection's place is kept in `H2_FLOWS` as the sequence number of
/// its next header, so a frame may span any number of packets; a header
/// itself may be split between two (its first bytes are kept too); a
/// retransmitted packet is walked only from where the last one ended, so
/// nothing is counted twice; and a packet with more frames than one run
/// may walk is finished by tail calls into this same program.
fn try_h2_egress(ctx: &SkBuffContext) -> Option<()> {
    let port = ctx.skb.local_port() as u16;
    // SAFETY: the value is copied out at once.
    let watched = unsafe { WATCHED_PORTS.get(&port) }.copied()?;
    if watched.protocol != 1 {
        return None;
    }
    // IP header (the skb starts at it on cgroup egress), then TCP.
    let first: u8 = ctx.load(0).ok()?;
    let (ip_len, proto) = match first >> 4 {
        4 => (u32::from(first & 0x0f) * 4, ctx.load::<u8>(9).ok()?),
        6 => (40, ctx.load::<u8>(6).ok()?),
        _ => return None,
    };
    if u16::from(proto) != IPPROTO_TCP {
        return None;
    }
    let seq = u32::from_be(ctx.load::<u32>(ip_len as usize + 4).ok()?);
    let doff = u32::from(ctx.load::<u8>(ip_len as usize + 12).ok()? >> 4) * 4;
    let payload = ip_len + doff;
    let len = ctx.len();
    if len <= payload {
        return None;
    }
    let pkt = Packet {
        payload,
        seq,
        end: seq.wrapping_add(len - payload),
    };
    // SAFETY: plain helper call on this program's own skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };

    // SAFETY: the value is copied out at once.
    let known = unsafe { H2_FLOWS.get(&cookie) }.copied();
    let mut flow = match known {
        // No gap between what we have seen and this packet.
        Some(f) if !before(f.next_seq.wrapping_add(f.have), seq) => f,
        _ => {
            if known.is_some() {
                lost_place();
            }
            // New to us (the server's first frame is SETTINGS on stream
            // 0; a connection open before we attached starts here), or
            // a packet we never saw: start at this packet if it begins
            // with a plausible header.
            let kind: u8 = ctx.load((payload + 3) as usize).ok()?;
            if !plausible(kind) {
                let _ = H2_FLOWS.remove(&cookie);
                return None;
            }
            H2Flow {
                next_seq: seq,
                listener: watched.listener,
                have: 0,
                partial: [0; 4],
            }
        }
    };
    let counters = LISTENER_COUNTERS.get_ptr_mut(watched.listener)?;
    for _ in 0..h2::FRAMES_PER_RUN {
        let next = flow.next_seq;
        if !before(next, pkt.end) {
            // The next header starts in a later packet.
            let _ = H2_FLOWS.insert(&cookie, &flow, 0);
            return Some(());
        }
        let mut prefix = flow.partial;
        if flow.have == 0
            && !before(pkt.end, next.wrapping_add(h2::HEADER_PREFIX))
            && let Ok(whole) = ctx.load::<[u8; 4]>((payload + next.wrapping_sub(seq)) as usize)
        {
            prefix = whole;
        } else {
            // The header's start is split: some bytes from an earlier
            // packet, or some in a later one.
            let mut have = flow.have;
            for i in 0..h2::HEADER_PREFIX {
                if i < have {
                    continue;
                }
                let pos = next.wrapping_add(i);
                if !before(pos, pkt.end) {
                    break;
                }
                prefix[i as usize & 3] = pkt.byte(ctx, pos)?;
                have = i + 1;
            }
            if have < h2::HEADER_PREFIX {
                flow.have = have;
                flow.partial = prefix;
                let _ = H2_FLOWS.insert(&cookie, &flow, 0);
                return Some(());
            }
        }
        let [l0, l1, l2, kind] = prefix;
        if !plausible(kind) {
            lost_place();
            let _ = H2_FLOWS.remove(&cookie);
            return None;
        }
        if kind == h2::GOAWAY {
            // SAFETY: in-bounds field of the map value.
            bump(unsafe { &raw mut (*counters).goaway });
        } else if kind == h2::RST_STREAM {
            // SAFETY: in-bounds field of the map value.
            bump(unsafe { &raw mut (*counters).rst_stream });
        }
        let flen = u32::from_be_bytes([0, l0, l1, l2]);
        flow.next_seq = next.wrapping_add(h2::FRAME_HEADER + flen);
        flow.have = 0;
        flow.partial = [0; 4];
    }
    // More frames in this packet than one run walks: go on in a fresh run
    // from the place saved here.
    let _ = H2_FLOWS.insert(&cookie, &flow, 0);
    if before(flow.next_seq, pkt.end) {
        // SAFETY: the tail call replaces this run; nothing here needs
        // dropping. It returns only if it failed (no program set, or the
        // kernel's tail-call limit reached).
        unsafe { H2_TAIL.tail_call(ctx, 0) };
        // The rest of this packet goes unread; the next packet shows a
        // gap, which is counted there.
    }
    Some(())
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
            (*window).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
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
    let duration = now.saturating_sub(begin_ns);
    info!(
        &ctx,
        "reload {} of plugin {}: window closed after {} ns", seq, plugin, duration
    );
    let event = Event {
        kind: EventKind::ReloadEnd as u32,
        subject: plugin,
        seq,
        ts_ns: now,
        value: duration,
    };
    emit(Probe::ReloadMarkers, &event);
    0
}

#[uprobe]
pub fn upgrade_begin(_ctx: ProbeContext) -> u32 {
    upgrade_windows_add(1);
    0
}

#[uprobe]
pub fn upgrade_end(_ctx: ProbeContext) -> u32 {
    if UPGRADE_WINDOWS.get(0).is_some_and(|open| *open > 0) {
        upgrade_windows_add(u64::MAX);
    }
    0
}

/// Adds `delta` (two's complement for a decrement) to the number of open
/// upgrade windows.
#[inline(always)]
fn upgrade_windows_add(delta: u64) {
    if let Some(open) = UPGRADE_WINDOWS.get_ptr_mut(0) {
        // SAFETY: a map value, valid and aligned while the program runs.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                open, delta,
            );
        }
    }
}

/// Adds `delta` (two's complement for a decrement) to the number of open
/// crash windows.
#[inline(always)]
fn crash_windows_add(delta: u64) {
    if let Some(open) = CRASH_WINDOWS.get_ptr_mut(0) {
        // SAFETY: a map value, valid and aligned while the program runs;
        // hosts die on any CPU at once, so the add is atomic.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                open, delta,
            );
        }
    }
}

#[tracepoint]
pub fn host_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    // The thread-group leader's exit is the process's: every thread of a
    // process killed by a signal or `exit_group` goes, the leader with them.
    if tgid != tid {
        return 0;
    }
    let Some(host) = HOST_PIDS.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: map value pointer; only this leader's exit writes it.
    unsafe {
        if (*host).died_ns == 0 {
            (*host).died_ns = bpf_ktime_get_ns();
            crash_windows_add(1);
        }
    }
    0
}

#[uprobe]
pub fn host_serving(ctx: ProbeContext) -> u32 {
    let pid: u32 = ctx.arg(0).unwrap_or(0);
    if pid != 0 {
        let _ = HOST_PIDS.insert(&pid, &HostLife::default(), 0);
    }
    0
}

/// Forgets host `pid`; a crash window its death opened closes unmeasured.
#[inline(always)]
fn forget_host(pid: u32) -> Option<u64> {
    // SAFETY: the value is copied out before the entry is removed.
    let died_ns = unsafe { HOST_PIDS.get(&pid) }.map(|h| h.died_ns)?;
    HOST_PIDS.remove(&pid).ok()?;
    if died_ns != 0 {
        crash_windows_add(u64::MAX);
    }
    Some(died_ns)
}

#[uprobe]
pub fn host_retired(ctx: ProbeContext) -> u32 {
    let pid: u32 = ctx.arg(0).unwrap_or(0);
    let _ = forget_host(pid);
    0
}

#[uprobe]
pub fn host_recovered(ctx: ProbeContext) -> u32 {
    let plugin: u32 = ctx.arg(0).unwrap_or(u32::MAX);
    let pid: u32 = ctx.arg(1).unwrap_or(0);
    let Some(died_ns) = forget_host(pid) else {
        return 0;
    };
    if died_ns == 0 {
        // The daemon saw a death the kernel did not (a pid namespace the
        // host's number does not match in): nothing to measure.
        return 0;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let event = Event {
        kind: EventKind::HostRecovered as u32,
        subject: plugin,
        seq: u64::from(pid),
        ts_ns: now,
        value: now.saturating_sub(died_ns),
    };
    emit(Probe::HostCrashes, &event);
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
