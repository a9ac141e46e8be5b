//! `probe/<probe>`: each probe loaded and attached by the daemon's own code,
//! judged against what this kernel offers.
//!
//! The kernel's hooks are looked up independently of the loader (tracefs
//! event directories, the uprobe PMU, a cgroup2 mount), so a probe's
//! outcome is checked from both sides:
//!
//! | loader | hooks present | result |
//! | --- | --- | --- |
//! | attached | yes | PASS |
//! | failed | a hook missing | SKIP: the kernel cannot have this probe |
//! | failed | yes | FAIL: it should work here (a verifier refusal, say) |
//! | attached | a hook missing | FAIL: a silent pass is a bug |
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, RwLock};

use plugvisor::config::Protocol;
use plugvisor::metrics::Metrics;
use plugvisor::probes::{self, WatchedListener, layout};
use plugvisor_probes_common::Probe;

use crate::report::{Outcome, Reporter};

/// A kernel facility a probe hooks into.
#[derive(Debug, Clone, Copy)]
enum Hook {
    /// A tracepoint `category/event`.
    Tracepoint(&'static str, &'static str),
    /// The uprobe PMU (`CONFIG_UPROBE_EVENTS`).
    Uprobes,
    /// A mounted cgroup2 hierarchy (for `cgroup_skb`).
    Cgroup2,
}

/// Where tracefs may be mounted.
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

impl Hook {
    /// `None` if the kernel has it, else what is missing.
    fn missing(self) -> Option<String> {
        match self {
            Hook::Tracepoint(category, event) => {
                let found = TRACEFS_ROOTS.iter().any(|root| {
                    Path::new(root)
                        .join("events")
                        .join(category)
                        .join(event)
                        .is_dir()
                });
                (!found).then(|| format!("no tracepoint {category}/{event}"))
            }
            Hook::Uprobes => (!Path::new("/sys/bus/event_source/devices/uprobe").is_dir())
                .then(|| "no uprobe PMU (CONFIG_UPROBE_EVENTS)".to_owned()),
            Hook::Cgroup2 => {
                let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
                let found = mounts
                    .lines()
                    .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"));
                (!found).then(|| "no cgroup2 hierarchy mounted".to_owned())
            }
        }
    }
}

/// The hooks `probe` needs, including those of probes it builds on.
fn hooks(probe: Probe) -> &'static [Hook] {
    const SOCK_STATE: Hook = Hook::Tracepoint("sock", "inet_sock_set_state");
    match probe {
        Probe::SockState => &[SOCK_STATE],
        Probe::ReloadMarkers => &[Hook::Uprobes],
        Probe::TcpResets => &[
            Hook::Tracepoint("tcp", "tcp_send_reset"),
            Hook::Tracepoint("tcp", "tcp_receive_reset"),
        ],
        Probe::TcpRetransmits => &[Hook::Tracepoint("tcp", "tcp_retransmit_skb")],
        // The service gap follows the sockets the state probe tracks.
        Probe::ServiceGap => &[
            Hook::Tracepoint("sock", "sock_recv_length"),
            Hook::Tracepoint("sock", "sock_send_length"),
            SOCK_STATE,
        ],
        Probe::Http2Frames => &[Hook::Cgroup2],
        Probe::HostCrashes => &[
            Hook::Tracepoint("sched", "sched_process_exit"),
            Hook::Uprobes,
        ],
    }
}

/// One probe's check: whether it came up, the loader's errors if not.
#[derive(Debug, Clone)]
pub struct ProbeCheck {
    /// The probe.
    pub probe: Probe,
    /// Whether it attached (the registry's `plugvisor_probe_up`).
    pub up: bool,
}

/// Runs `probe/<probe>` for every probe; returns their results for the
/// daemon tests to compare against (`None` if the loader itself could not
/// be run).
pub fn report_all(rep: &mut Reporter) -> Option<Vec<ProbeCheck>> {
    let results = match load_all() {
        Ok(r) => r,
        Err(e) => {
            for p in Probe::ALL {
                rep.run(&format!("probe/{}", p.as_str()), || {
                    Outcome::Fail(format!("could not run the probe loader: {e}"))
                });
            }
            return None;
        }
    };
    let mut checks = Vec::new();
    for (probe, up, errors) in results {
        let outcome = rep.run(&format!("probe/{}", probe.as_str()), || {
            let missing: Vec<String> = hooks(probe).iter().filter_map(|h| h.missing()).collect();
            match judge(up, &errors, &missing) {
                Outcome::Pass(r) => Outcome::Pass(match layout_note(probe) {
                    Some(note) => format!("{r}; {note}"),
                    None => r,
                }),
                other => other,
            }
        });
        checks.push(ProbeCheck {
            probe,
            up: up && matches!(outcome, Outcome::Pass(_)),
        });
    }
    Some(checks)
}

/// Which of the layouts the loader handles this kernel has, where kernels
/// differ (worth seeing in the matrix).
fn layout_note(probe: Probe) -> Option<String> {
    if probe != Probe::TcpResets {
        return None;
    }
    let (_, format) = layout::read_format("tcp", "tcp_send_reset").ok()?;
    Some(if layout::field_offset(&format, "sport").is_some() {
        "tcp_send_reset has a host-order sport".to_owned()
    } else {
        "tcp_send_reset has saddr as a sockaddr".to_owned()
    })
}

/// The table in the module docs: `up` and `errors` from the loader,
/// `missing` the hooks this kernel lacks.
fn judge(up: bool, errors: &[String], missing: &[String]) -> Outcome {
    match (up, errors.is_empty(), missing.is_empty()) {
        (true, true, true) => Outcome::Pass("loaded and attached".into()),
        (true, true, false) => Outcome::Fail(format!(
            "attached although the kernel has {}: a silent pass",
            missing.join(", ")
        )),
        (true, false, _) => Outcome::Fail(format!(
            "probe_up is 1 but the loader reported: {}",
            errors.join("; ")
        )),
        (false, _, false) => Outcome::Skip(format!(
            "kernel lacks it: {}; loader: {}",
            missing.join(", "),
            errors.join("; ")
        )),
        (false, true, true) => Outcome::Fail("probe_up is 0 and the loader said nothing".into()),
        (false, false, true) => Outcome::Fail(errors.join("; ")),
    }
}

/// Loads and attaches every probe through `plugvisor::probes`, as the
/// daemon does, then detaches them all: `(probe, up, errors)` per probe.
fn load_all() -> Result<Vec<(Probe, bool, Vec<String>)>, String> {
    // The uprobes attach to the markers in this very binary (the loader
    // uses /proc/self/exe): keep them linked in.
    std::hint::black_box(plugvisor::markers::plugvisor_reload_begin as extern "C" fn(u32, u64));
    std::hint::black_box(plugvisor::markers::plugvisor_reload_end as extern "C" fn(u32, u64, u32));
    std::hint::black_box(plugvisor::markers::plugvisor_host_serving as extern "C" fn(u32));
    std::hint::black_box(plugvisor::markers::plugvisor_host_retired as extern "C" fn(u32));
    std::hint::black_box(plugvisor::markers::plugvisor_host_recovered as extern "C" fn(u32, u32));
    std::hint::black_box(plugvisor::markers::plugvisor_upgrade_begin as extern "C" fn());
    std::hint::black_box(plugvisor::markers::plugvisor_upgrade_end as extern "C" fn());
    // The observer's ring buffer reader is a tokio task.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let _in_runtime = rt.enter();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("a loopback port to watch: {e}"))?
        .port();
    let listener = WatchedListener {
        name: "vm-test".into(),
        port,
        protocol: Protocol::Tcp,
    };
    let metrics = Arc::new(Metrics::new());
    let plugins = Arc::new(RwLock::new(vec!["echo".to_owned()]));
    let (running, errors) = probes::start_reporting(
        &plugvisor::config::ProbesConfig::default(),
        &[listener],
        &plugins,
        &metrics,
    );
    let results = Probe::ALL
        .iter()
        .map(|&p| {
            let up = metrics
                .probe_up
                .vec()
                .with_label_values(&[p.as_str()])
                .get()
                == 1;
            let errs = errors
                .iter()
                .filter(|e| e.probe() == p.as_str())
                .map(ToString::to_string)
                .collect();
            (p, up, errs)
        })
        .collect();
    // Detach before the daemon tests start their own copy.
    drop(running);
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_every_combination() {
        let err = vec!["attaching: EINVAL".to_owned()];
        let lacks = vec!["no tracepoint tcp/tcp_send_reset".to_owned()];
        let judged = |up, errors: &[String], missing: &[String]| match judge(up, errors, missing) {
            Outcome::Pass(_) => "pass",
            Outcome::Skip(_) => "skip",
            Outcome::Fail(_) => "fail",
        };
        assert_eq!(judged(true, &[], &[]), "pass");
        assert_eq!(judged(false, &err, &lacks), "skip");
        // Where the kernel has the hooks, a failure is ours to fix.
        assert_eq!(judged(false, &err, &[]), "fail");
        // No silent pass, no silent failure.
        assert_eq!(judged(true, &[], &lacks), "fail");
        assert_eq!(judged(true, &err, &[]), "fail");
        assert_eq!(judged(false, &[], &[]), "fail");
    }

    #[test]
    fn a_missing_tracepoint_is_named() {
        assert_eq!(
            Hook::Tracepoint("nosuch", "event").missing().as_deref(),
            Some("no tracepoint nosuch/event")
        );
    }
}
