//! The levels a rule reads besides the kernel's counts: `resources`
//! (memory of the daemon's cgroup and of the node, free space under
//! `state_dir`, read at gather time beside the standard `process_*`
//! families) and `health` (each plugin's own `health()` hook and the
//! configured `[[health_check]]`s of what a plugin relies on, as
//! `plugvisor_health_check_up{check}`). Both write into the metrics
//! registry only; the rules engine reads them there. `plugin_hosts`
//! adds each plugin host's own memory, CPU and threads.
pub mod health;
pub mod plugin_hosts;
pub mod resources;
