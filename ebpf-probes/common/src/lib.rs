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
//! * `WATCHED_SOCKS` (LRU hash, socket address → [`SockState`]) remembers
//!   the server-side sockets of watched listeners from ESTABLISHED until
//!   CLOSE, so probes whose tracepoints carry only a socket pointer
//!   (`sock_recv_length`, `sock_send_length`) can tell ours from the rest.
//! * `GAP_HIST` (per-CPU array indexed by `listener * 2 + window`) is the
//!   service-gap histogram: log2 buckets of the time from request bytes read
//!   to the next response bytes written on a watched socket.
//! * `H2_FLOWS` (LRU hash, socket cookie → [`H2Flow`]) tracks where the next
//!   HTTP/2 frame header lies in each gRPC connection's outgoing byte
//!   stream, for the `cgroup_skb` egress program that counts server-sent
//!   GOAWAY and RST_STREAM frames.
//! * `HOST_PIDS` (hash, process id → [`HostLife`]) holds the plugin hosts
//!   that serve, put there by the uprobe on the daemon's
//!   `plugvisor_host_serving` marker; `sched/sched_process_exit` stamps a
//!   host's death there in the kernel's clock and opens a crash window
//!   (`CRASH_WINDOWS`, the number open), which the uprobe on
//!   `plugvisor_host_recovered` — the first answer by what replaced it —
//!   closes. A connection that leaves ESTABLISHED while one is open is
//!   "broken across a crash"; the window's length is the kernel-measured
//!   recovery.
//! * `EVENTS` (ring buffer) carries only what userspace must act on: the end
//!   of a reload window (with its kernel-measured duration), each
//!   connection broken inside one (so the daemon can name the reload in its
//!   log) and the end of each crash window. A failed reserve is counted in
//!   `DROPPED`.
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
    /// LRU hash: socket address → [`super::SockState`].
    pub const WATCHED_SOCKS: &str = "WATCHED_SOCKS";
    /// Per-CPU array of [`super::GapHist`], indexed by `listener * 2 + window`.
    pub const GAP_HIST: &str = "GAP_HIST";
    /// LRU hash: socket cookie → [`super::H2Flow`].
    pub const H2_FLOWS: &str = "H2_FLOWS";
    /// Program array of one: `h2_egress` itself, which it tail-calls to
    /// walk on through a packet with more frames than one run may.
    pub const H2_TAIL: &str = "H2_TAIL";
    /// Ring buffer of [`super::Event`].
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU array of `u64`, indexed by [`super::Probe`]: ring buffer reserve failures.
    pub const DROPPED: &str = "DROPPED";
    /// Hash: process id (initial pid namespace) → [`super::HostLife`].
    pub const HOST_PIDS: &str = "HOST_PIDS";
    /// Array of one `u64`: crash windows open right now.
    pub const CRASH_WINDOWS: &str = "CRASH_WINDOWS";
    /// Array of one `u64`: upgrade windows open right now (a new plugvisor
    /// taking over from the old one, until the old one is gone).
    pub const UPGRADE_WINDOWS: &str = "UPGRADE_WINDOWS";
}

/// Names of the programs in the object file.
pub mod programs {
    /// Tracepoint `sock/inet_sock_set_state`.
    pub const INET_SOCK_SET_STATE: &str = "inet_sock_set_state";
    /// Uprobe on `plugvisor_reload_begin`.
    pub const RELOAD_BEGIN: &str = "reload_begin";
    /// Uprobe on `plugvisor_reload_end`.
    pub const RELOAD_END: &str = "reload_end";
    /// Tracepoint `tcp/tcp_send_reset`.
    pub const TCP_SEND_RESET: &str = "tcp_send_reset";
    /// Tracepoint `tcp/tcp_receive_reset`.
    pub const TCP_RECEIVE_RESET: &str = "tcp_receive_reset";
    /// Tracepoint `tcp/tcp_retransmit_skb`.
    pub const TCP_RETRANSMIT_SKB: &str = "tcp_retransmit_skb";
    /// Tracepoint `sock/sock_recv_length`.
    pub const SOCK_RECV_LENGTH: &str = "sock_recv_length";
    /// Tracepoint `sock/sock_send_length`.
    pub const SOCK_SEND_LENGTH: &str = "sock_send_length";
    /// `cgroup_skb` egress: HTTP/2 frame inspection.
    pub const H2_EGRESS: &str = "h2_egress";
    /// Tracepoint `sched/sched_process_exit`: a plugin host's death.
    pub const HOST_EXIT: &str = "host_exit";
    /// Uprobe on `plugvisor_host_serving`.
    pub const HOST_SERVING: &str = "host_serving";
    /// Uprobe on `plugvisor_host_retired`.
    pub const HOST_RETIRED: &str = "host_retired";
    /// Uprobe on `plugvisor_host_recovered`.
    pub const HOST_RECOVERED: &str = "host_recovered";
    /// Uprobe on `plugvisor_upgrade_begin`.
    pub const UPGRADE_BEGIN: &str = "upgrade_begin";
    /// Uprobe on `plugvisor_upgrade_end`.
    pub const UPGRADE_END: &str = "upgrade_end";
}

/// Names of the marker functions in the daemon the uprobes attach to.
pub mod markers {
    /// Called right before a reload window opens (dlopen, checks, init, swap).
    pub const RELOAD_BEGIN: &str = "plugvisor_reload_begin";
    /// Called right after the window closes, whatever the outcome.
    pub const RELOAD_END: &str = "plugvisor_reload_end";
    /// Called when a plugin host starts to serve (its death is a crash).
    pub const HOST_SERVING: &str = "plugvisor_host_serving";
    /// Called before a host is stopped on purpose, or after the death of
    /// one that nothing replaces (its death is no crash to recover from).
    pub const HOST_RETIRED: &str = "plugvisor_host_retired";
    /// Called at the first answer by what replaced a dead host.
    pub const HOST_RECOVERED: &str = "plugvisor_host_recovered";
    /// Called by a new plugvisor right before it tells the old one it
    /// serves (the old one then hands over and drains).
    pub const UPGRADE_BEGIN: &str = "plugvisor_upgrade_begin";
    /// Called once the old plugvisor is gone (or its drain's bound passed).
    pub const UPGRADE_END: &str = "plugvisor_upgrade_end";
}

/// Probes, as indices into `DROPPED` and as the `probe` label.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `sock/inet_sock_set_state`.
    SockState = 0,
    /// The two reload marker uprobes.
    ReloadMarkers = 1,
    /// `tcp/tcp_send_reset` and `tcp/tcp_receive_reset`.
    TcpResets = 2,
    /// `tcp/tcp_retransmit_skb`.
    TcpRetransmits = 3,
    /// `sock/sock_recv_length` and `sock/sock_send_length`.
    ServiceGap = 4,
    /// `cgroup_skb` egress HTTP/2 frame inspection.
    Http2Frames = 5,
    /// `sched/sched_process_exit` and the three host marker uprobes.
    HostCrashes = 6,
}

impl Probe {
    /// Number of probes.
    pub const COUNT: u32 = 7;
    /// Every probe, in index order.
    pub const ALL: [Probe; 7] = [
        Probe::SockState,
        Probe::ReloadMarkers,
        Probe::TcpResets,
        Probe::TcpRetransmits,
        Probe::ServiceGap,
        Probe::Http2Frames,
        Probe::HostCrashes,
    ];

    /// The stable `probe` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Probe::SockState => "inet_sock_set_state",
            Probe::ReloadMarkers => "reload_markers",
            Probe::TcpResets => "tcp_resets",
            Probe::TcpRetransmits => "tcp_retransmits",
            Probe::ServiceGap => "service_gap",
            Probe::Http2Frames => "http2_frames",
            Probe::HostCrashes => "host_crashes",
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
    /// The daemon's process id as the kernel numbers it (in the initial pid
    /// namespace, which a containerised daemon cannot know), learned by the
    /// begin marker's uprobe. `sock_*_length` fire for every socket call on
    /// the machine and only the daemon's can be ours, so they check this
    /// before any map lookup. 0 until the first reload.
    pub tgid: u32,
    /// Padding, explicit so the layout has no hidden bytes.
    pub pad: u32,
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
    /// RSTs sent by the server side.
    pub resets_sent: u64,
    /// RSTs received by the server side.
    pub resets_received: u64,
    /// Segments the server side retransmitted.
    pub retransmits: u64,
    /// HTTP/2 GOAWAY frames the server sent.
    pub goaway: u64,
    /// HTTP/2 RST_STREAM frames the server sent.
    pub rst_stream: u64,
    /// Of `closed`, those that left while a plugin host's crash was not yet
    /// recovered from, closed by plugvisor or reset (not the client's own
    /// close).
    pub broken_in_crash: u64,
    /// Of `closed`, those that left while an upgrade window was open,
    /// closed by plugvisor or reset (not the client's own close): a raw
    /// TCP connection that moved to the new process never leaves
    /// ESTABLISHED; a gRPC connection the old process drains does.
    pub broken_in_upgrade: u64,
}

/// A serving plugin host, as the kernel tracks it.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct HostLife {
    /// `bpf_ktime_get_ns` of its death; 0 while it lives.
    pub died_ns: u64,
}

/// A watched server-side socket, from ESTABLISHED until CLOSE.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct SockState {
    /// Listener index.
    pub listener: u32,
    /// Non-zero if a reload window was open when the pending request was read.
    pub window_at_recv: u32,
    /// `bpf_ktime_get_ns` of the first read of a request not yet answered (0 = none).
    pub recv_ns: u64,
}

/// Number of log2 buckets of a [`GapHist`]; bucket `i` holds gaps in
/// `[2^(i-1), 2^i)` ns, the last one everything longer.
pub const GAP_BUCKETS: usize = 40;

/// Windows of the service gap (`window` label), as the second index of `GAP_HIST`.
pub mod window {
    /// No reload window was open.
    pub const STEADY: u32 = 0;
    /// A reload window was open when the request was read or answered.
    pub const RELOAD: u32 = 1;
}

/// A log2 histogram of service gaps, in nanoseconds.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct GapHist {
    /// Counts per bucket.
    pub buckets: [u64; GAP_BUCKETS],
    /// Sum of all gaps, ns.
    pub sum_ns: u64,
}

impl Default for GapHist {
    fn default() -> Self {
        GapHist {
            buckets: [0; GAP_BUCKETS],
            sum_ns: 0,
        }
    }
}

/// Where the next HTTP/2 frame header lies in one connection's outgoing bytes.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct H2Flow {
    /// TCP sequence number of the next frame header.
    pub next_seq: u32,
    /// Listener index.
    pub listener: u32,
    /// How many of that header's first four bytes (length and type) an
    /// earlier packet carried: a header split across packets.
    pub have: u32,
    /// Those bytes.
    pub partial: [u8; 4],
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
    /// Offset of `const void * skaddr`.
    pub skaddr: u32,
    /// Non-zero once userspace has filled this in; programs do nothing before.
    pub ready: u32,
    /// `tcp/tcp_send_reset`: offset of the local port.
    pub send_reset_sport: u32,
    /// Non-zero if that port is in network byte order (newer kernels carry
    /// a `sockaddr` instead of a host-order `sport` field).
    pub send_reset_sport_be: u32,
    /// `tcp/tcp_receive_reset`: offset of `sport` (host order).
    pub receive_reset_sport: u32,
    /// `tcp/tcp_retransmit_skb`: offset of `sport` (host order).
    pub retransmit_sport: u32,
    /// `sock/sock_{recv,send}_length`: offset of `void * sk`.
    pub length_sk: u32,
    /// `sock/sock_{recv,send}_length`: offset of `int ret`.
    pub length_ret: u32,
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
    /// A crash window closed: `subject` is the plugin index, `seq` the dead
    /// host's pid, `value` the ns from its death to the first answer by
    /// its replacement.
    HostRecovered = 3,
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
    /// `TCP_CLOSE_WAIT`: the peer closed first.
    pub const CLOSE_WAIT: i32 = 8;
}

/// HTTP/2 frame types counted by the egress probe.
pub mod h2 {
    /// RST_STREAM.
    pub const RST_STREAM: u8 = 3;
    /// SETTINGS.
    pub const SETTINGS: u8 = 4;
    /// GOAWAY.
    pub const GOAWAY: u8 = 7;
    /// Highest frame type defined by RFC 9113 (CONTINUATION).
    pub const MAX_KNOWN_TYPE: u8 = 9;
    /// Length of a frame header.
    pub const FRAME_HEADER: u32 = 9;
    /// Frame headers walked per program run (a bounded loop for the
    /// verifier). A packet with more frames than this — a GSO-sized skb of
    /// small frames — is walked on by tail calls into the same program,
    /// up to the kernel's 33, so `34 * 256` headers per packet: more than
    /// a 64 KiB skb can hold (9 bytes each at the least).
    pub const FRAMES_PER_RUN: u32 = 256;
    /// Bytes of a frame header the probe reads: length (3) and type (1).
    pub const HEADER_PREFIX: u32 = 4;
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
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::GapHist {}
    unsafe impl aya::Pod for super::H2Flow {}
    unsafe impl aya::Pod for super::HostLife {}
}
