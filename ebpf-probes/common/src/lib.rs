//! Types shared by plugvisor's eBPF programs and the daemon that loads them.
//!
//! Everything here is `#[repr(C)]` and `Copy`: the kernel side writes these
//! bytes into maps and the ring buffer, userspace reads the same bytes back.
//! With the `user` feature the types also implement `aya::Pod` so that
//! `aya::maps` can hand them out.
//!
//! The model, in the kernel:
//! * `WATCHED_PORTS` (hash, port in host order → [`WatchedPort`]) is filled by
//!   userspace with the listeners' ports; every program drops events for any
//!   other port before doing more work.
//! * `RELOAD_WINDOW` (array of one [`ReloadWindow`]) is written by the uprobes
//!   on the daemon's `plugvisor_reload_begin` / `plugvisor_reload_end` marker
//!   functions, so a TCP event can tell whether a reload was in progress at
//!   the moment it happened — in the kernel's own clock.
//! * `LISTENER_COUNTERS` (per-CPU array indexed by listener) holds monotonic
//!   [`ListenerCounters`]; userspace sums the CPUs and exports deltas.
//! * `EVENTS` (ring buffer) carries only what userspace must act on: the end
//!   of a reload window (with its kernel-measured duration) and each
//!   connection broken inside one (so the daemon can name the reload in its
//!   log). A failed reserve is counted in `DROPPED`.
#![no_std]

/// Upper bound of listeners the probes can tell apart (map sizes).
pub const MAX_LISTENERS: u32 = 64;

/// Names of the maps, shared so userspace looks up exactly what the kernel defines.
pub mod maps {
    /// Hash map: `u16` port (host order) → [`super::WatchedPort`].
    pub const WATCHED_PORTS: &str = "WATCHED_PORTS";
    /// Array of one [`super::ReloadWindow`].
    pub const RELOAD_WINDOW: &str = "RELOAD_WINDOW";
    /// Per-CPU array of [`super::ListenerCounters`], indexed by listener.
    pub const LISTENER_COUNTERS: &str = "LISTENER_COUNTERS";
    /// Array of one [`super::TracepointLayout`], written by userspace before attaching.
    pub const LAYOUT: &str = "LAYOUT";
    /// Ring buffer of [`super::Event`].
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU array of `u64`, indexed by [`super::Probe`]: ring buffer reserve failures.
    pub const DROPPED: &str = "DROPPED";
}

/// Names of the programs in the object file.
pub mod programs {
    /// Tracepoint `sock/inet_sock_set_state`.
    pub const INET_SOCK_SET_STATE: &str = "inet_sock_set_state";
    /// Uprobe on `plugvisor_reload_begin`.
    pub const RELOAD_BEGIN: &str = "reload_begin";
    /// Uprobe on `plugvisor_reload_end`.
    pub const RELOAD_END: &str = "reload_end";
}

/// Names of the marker functions in the daemon the uprobes attach to.
pub mod markers {
    /// Called right before a reload window opens (dlopen, checks, init, swap).
    pub const RELOAD_BEGIN: &str = "plugvisor_reload_begin";
    /// Called right after the window closes, whatever the outcome.
    pub const RELOAD_END: &str = "plugvisor_reload_end";
}

/// Probes, as indices into `DROPPED` and as the `probe` label.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `sock/inet_sock_set_state`.
    SockState = 0,
    /// The two reload marker uprobes.
    ReloadMarkers = 1,
}

impl Probe {
    /// Number of probes.
    pub const COUNT: u32 = 2;
    /// Every probe, in index order.
    pub const ALL: [Probe; 2] = [Probe::SockState, Probe::ReloadMarkers];

    /// The stable `probe` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Probe::SockState => "inet_sock_set_state",
            Probe::ReloadMarkers => "reload_markers",
        }
    }
}

/// What a watched port belongs to.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchedPort {
    /// Index of the listener in the daemon's listener table (< [`MAX_LISTENERS`]).
    pub listener: u32,
    /// 0 = raw TCP, 1 = gRPC.
    pub protocol: u32,
}

/// The reload window as the uprobes see it.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ReloadWindow {
    /// Number of windows open right now (reloads are serialised, so 0 or 1).
    pub open: u32,
    /// Plugin index passed to the begin marker.
    pub plugin: u32,
    /// Reload sequence number passed to the begin marker.
    pub seq: u64,
    /// `bpf_ktime_get_ns` at the begin marker.
    pub begin_ns: u64,
}

/// Monotonic per-listener counters (one copy per CPU; userspace sums them).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ListenerCounters {
    /// Server-side sockets that entered ESTABLISHED.
    pub opened: u64,
    /// Server-side sockets that left ESTABLISHED (closed or reset).
    pub closed: u64,
    /// Of `closed`, those that left while a reload window was open.
    pub broken_in_reload: u64,
}

/// Byte offsets of the fields of `sock/inet_sock_set_state`, read by
/// userspace from the running kernel's tracefs format file (never guessed).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct TracepointLayout {
    /// Offset of `int oldstate`.
    pub oldstate: u32,
    /// Offset of `int newstate`.
    pub newstate: u32,
    /// Offset of `__u16 sport`.
    pub sport: u32,
    /// Offset of `__u16 dport`.
    pub dport: u32,
    /// Offset of `__u16 protocol`.
    pub protocol: u32,
    /// Non-zero once userspace has filled this in; programs do nothing before.
    pub ready: u32,
}

/// Kind of an [`Event`].
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A reload window closed; `value` is its kernel-measured duration in ns.
    ReloadEnd = 1,
    /// A watched connection left ESTABLISHED while a reload window was open;
    /// `value` packs `oldstate << 32 | newstate`.
    BrokenConnection = 2,
}

/// One ring buffer record.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Event {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// Listener index (for connection events) or plugin index (reload events).
    pub subject: u32,
    /// Reload sequence number the event belongs to.
    pub seq: u64,
    /// `bpf_ktime_get_ns` when the event happened.
    pub ts_ns: u64,
    /// Kind-specific value (see [`EventKind`]).
    pub value: u64,
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod tcp_state {
    /// `TCP_ESTABLISHED`.
    pub const ESTABLISHED: i32 = 1;
    /// `TCP_CLOSE`.
    pub const CLOSE: i32 = 7;
}

/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u16 = 6;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and made of integers only,
    // with no padding the kernel could leave uninitialised that we would read as
    // something else.
    unsafe impl aya::Pod for super::WatchedPort {}
    unsafe impl aya::Pod for super::ReloadWindow {}
    unsafe impl aya::Pod for super::ListenerCounters {}
    unsafe impl aya::Pod for super::TracepointLayout {}
    unsafe impl aya::Pod for super::Event {}
}
