//! plugvisor — a node-local supervisor that hot-loads native plugins into a
//! running service without breaking a connection, and proves it from the
//! kernel.
//!
//! # The model
//!
//! plugvisor owns the sockets. Each configured listener (`listeners`) is
//! bound once at start and never closed by a reload; it hands every frame to
//! a [`slot::Slot`], and the slot hands it to whatever plugin version is
//! active at that instant. A version is a shared library loaded with
//! `dlopen`; the active one sits behind an `ArcSwap`, so a switch is one
//! atomic pointer store and a request that started on a version finishes on
//! it (it holds an `Arc`).
//!
//! A new version arrives as a package directory in `plugins_dir`: a library
//! and a `plugin.toml` manifest that pins its sha256. The manifest is the
//! commit point — the `catalog` acts when it changes, never on a half-written
//! library. The reload path (`reload`; one attempt in `reload::attempt`)
//! then:
//!
//! 1. parses and validates the manifest (`catalog::manifest`), checks who
//!    may write the package (`catalog::strict`), its signature (`trust`),
//!    that it is no downgrade (the store's refs keep the highest version
//!    ever activated) and that its dependencies hold against the other
//!    active versions (`dependencies`),
//! 2. hashes the library while copying it into the content-addressed
//!    `store` (`objects/<sha256>.so`, so `dlopen` sees a distinct path per
//!    version) — all before the reload window opens,
//! 3. opens the reload window (`markers::reload_begin`, a uprobe target),
//!    `dlopen`s the object, checks the descriptor's ABI version, name and
//!    version against the manifest before calling anything, runs `init`,
//!    swaps the slot, closes the window (`markers::reload_end`),
//! 4. records the outcome in the store's refs and journal and in `metrics`
//!    (through its typed record functions, `metrics::record`).
//!
//! Any refusal leaves the previous version serving. A package refused for
//! its dependencies is tried again whenever another plugin switches. Old
//! versions stay mapped (`dlclose` is unsafe for Rust libraries with TLS
//! destructors); at most `[reload] keep_loaded` per plugin are kept.
//!
//! # Proof from the kernel
//!
//! `probes` loads eBPF programs: a tracepoint on `sock/inet_sock_set_state`
//! filtered in the kernel to the listeners' ports, and uprobes on the two
//! reload markers. The kernel counts connections per listener and those
//! that left ESTABLISHED while a reload window was open, and measures each
//! window's length; `probes::observer` exports these as
//! `plugvisor_tcp_connections`, `plugvisor_reload_broken_connections_total`
//! and `plugvisor_kernel_reload_duration_seconds`. If eBPF cannot be used,
//! plugvisor keeps serving and exports `plugvisor_probe_up 0`.
//!
//! # Signals
//!
//! Besides the kernel's counts, `signals` writes the levels a rule reads:
//! `signals::resources` (memory of the daemon's cgroup and of the node, free space
//! under `state_dir`, read at gather time beside the standard `process_*`
//! families) and `signals::health` (each plugin's own `health()` hook and the
//! configured `[[health_check]]`s of the dependencies a plugin relies on,
//! as `plugvisor_health_check_up{check}`).
//!
//! # Control
//!
//! One task (`daemon`) owns all state changes. It starts everything in order
//! (`daemon::start`), then every source — signals (`SIGUSR1` rescan,
//! `SIGHUP` re-read), the debounced `plugins_dir` and thresholds watchers,
//! the rule ticker and the admin unix socket's [`control::Command`]s
//! (`control::socket`) — becomes one event, applied one at a time
//! (`daemon::events`); shutdown is looked at first, so a storm of reloads
//! cannot starve it. Under systemd it says
//! `READY=1`, `RELOADING=1`, `STOPPING=1` and `WATCHDOG=1` (`systemd`).
//!
//! # Offline
//!
//! `pack` builds and signs packages, `trust` holds the keys and the
//! signature format, and `plugvisor verify` runs the daemon's own checks on
//! a package directory without a daemon.

//! # Which way the imports point
//!
//! The modules sit in layers, written once as data in
//! `supervisor/imports.toml` and checked by `tests/import_direction.rs`: a
//! module uses only modules of the layers below its own. From the leaves
//! up — names, the reload markers, the loader, key formats, the one file
//! watcher (`fswatch`, shared by the catalog and the rules), `systemd`
//! (sd_notify), crash points; then what the operator wrote and what
//! plugvisor keeps (`config`, `store`, `dependencies`); `metrics`, whose
//! typed record functions take those owners' types (a listener's
//! `Protocol`, a `ConflictKind`) and are the only code that names label
//! values (also checked); the parts
//! (`catalog`, `slot` with its call pool, `probes`); what reads a slot or
//! the registry (`listeners`, `signals`, `rules`); the reload path
//! (`reload`); what drives it (`actions`, `pack`); `seed` (the bundled
//! example) and `control` (the protocol and the admin socket); the daemon.
//! The command line (`cli`, one file per verb) sits above them all.
//!
//! Two choices differ from an even finer cut. The package checks live
//! with the module that owns each rule (`loader::check_manifest_abi`,
//! `loader::check_identity`, `store::check_checksum`,
//! `store::Refs::downgrade_below`), and both `reload` and `pack::verify`
//! call them, rather than in a `verify` module of their own: a check then
//! sits beside the data it reads. And the label sets of the metric
//! contract that have no other owner (`ReloadOutcome`, `Phase`,
//! `RequestOutcome`, `PluginCall`, `ProbeStage`) stay in `metrics`: they
//! *are* the contract's label values, and the reload path's own outcome
//! type (`reload::AttemptOutcome`, which adds `unchanged`, `deferred`,
//! `unknown`) maps onto `ReloadOutcome`.

// The daemon logs through `tracing` only; the command line's output (in
// `cli`) is the one place that prints, and says so.
#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod actions;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dependencies;
pub mod failpoints;
pub mod fleet;
pub mod fswatch;
pub mod handover;
pub mod host;
pub mod listeners;
pub mod loader;
pub mod markers;
pub mod metrics;
pub mod name;
pub mod pack;
pub mod probes;
pub mod reload;
pub mod report;
pub mod rules;
pub mod seed;
pub mod signals;
pub mod slot;
pub mod store;
pub mod systemd;
pub mod trust;
