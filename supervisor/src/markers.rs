//! The reload markers: two empty functions whose only job is to be called.
//!
//! The eBPF uprobes attach to them by symbol (`/proc/self/exe`), so the
//! kernel sees the reload window open and close in its own clock, and can
//! attribute every TCP state change to "inside a reload" or not without a
//! round trip through userspace. `#[no_mangle]` keeps the symbol name
//! stable; `#[inline(never)]` and `black_box` keep the call in the binary.
//! Without probes attached a call costs a few nanoseconds.

/// Plugin names by the index the reload markers pass to the kernel: the
/// reload path appends a plugin the first time it opens a window for it,
/// and the probes' observer reads it to name the plugin of a window the
/// kernel measured.
pub type PluginNames = std::sync::Arc<std::sync::RwLock<Vec<String>>>;

/// Called right before a reload window opens (before `dlopen`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plugvisor_reload_begin(plugin: u32, seq: u64) {
    std::hint::black_box((plugin, seq));
}

/// Called right after the window closes, whatever the outcome
/// (`outcome` 0 = switched, 1 = refused, 2 = failed).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plugvisor_reload_end(plugin: u32, seq: u64, outcome: u32) {
    std::hint::black_box((plugin, seq, outcome));
}

/// An open reload window; closing it (drop) calls the end marker, so every
/// path out of a reload — success, refusal, failure — closes the window.
pub struct ReloadWindow {
    plugin: u32,
    seq: u64,
    outcome: u32,
}

impl ReloadWindow {
    /// Opens the window for plugin index `plugin`, reload number `seq`.
    pub fn open(plugin: u32, seq: u64) -> ReloadWindow {
        plugvisor_reload_begin(plugin, seq);
        ReloadWindow {
            plugin,
            seq,
            outcome: 2,
        }
    }

    /// Records the outcome reported when the window closes.
    pub fn set_outcome(&mut self, outcome: u32) {
        self.outcome = outcome;
    }
}

impl Drop for ReloadWindow {
    fn drop(&mut self) {
        plugvisor_reload_end(self.plugin, self.seq, self.outcome);
    }
}

/// Called once a plugin host serves: from now on its death is a crash the
/// kernel times, from the exit to [`plugvisor_host_recovered`].
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plugvisor_host_serving(pid: u32) {
    std::hint::black_box(pid);
}

/// Called before a host is stopped on purpose, and after the death of one
/// whose work nothing takes over (a standby, a host replaced by a reload):
/// the kernel forgets it.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plugvisor_host_retired(pid: u32) {
    std::hint::black_box(pid);
}

/// Called at the first answer by what replaced the dead host `pid` of
/// plugin index `plugin`: the crash is recovered from.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plugvisor_host_recovered(plugin: u32, pid: u32) {
    std::hint::black_box((plugin, pid));
}

/// Called by a new plugvisor right before it tells the process it replaces
/// that it serves: from here until [`plugvisor_upgrade_end`] the kernel
/// counts the listeners' connections that plugvisor closes or that are
/// reset (`plugvisor_upgrade_broken_connections_total`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plugvisor_upgrade_begin() {
    std::hint::black_box(());
}

/// Called once the replaced process is gone (or its drain's bound passed).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn plugvisor_upgrade_end() {
    std::hint::black_box(1u8);
}
