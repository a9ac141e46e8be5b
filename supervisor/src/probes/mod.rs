//! Loading and attaching the eBPF programs, and degrading gracefully when
//! the kernel will not have them.
//!
//! Each probe is loaded and attached on its own, so one that fails (a
//! missing tracepoint, a verifier refusal) costs only its own families:
//! `plugvisor_probe_up{probe}` says which are working and
//! `plugvisor_probe_failures_total{probe,stage}` counts why not. With
//! `[probes] mode = "auto"` the daemon serves on without them and says so
//! once in the log; with `mode = "on"` it refuses to start.
pub mod layout;
pub mod observer;

use std::sync::Arc;

use aya::maps::{Array, HashMap as BpfHashMap, ProgramArray};
use aya::programs::cgroup_skb::CgroupSkbAttachType;
use aya::programs::uprobe::UProbeScope;
use aya::programs::{CgroupAttachMode, CgroupSkb, TracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use plugvisor_probes_common::{Probe, WatchedPort, maps, markers, programs};

use crate::config::{ProbeMode, ProbesConfig, Protocol};
use crate::metrics::{Metrics, ProbeStage};

/// The eBPF object built by `build.rs`.
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/plugvisor-probes"));

/// A listener the probes should watch.
#[derive(Debug, Clone)]
pub struct WatchedListener {
    /// Listener name (the `listener` label).
    pub name: String,
    /// Port in host order.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// Why probes could not be started (only surfaces with `mode = "on"`).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Loading the object or a program failed.
    #[error("loading eBPF probe {probe}: {message}")]
    Load {
        /// The probe.
        probe: &'static str,
        /// What went wrong.
        message: String,
    },
    /// Attaching a program failed.
    #[error("attaching eBPF probe {probe}: {message}")]
    Attach {
        /// The probe.
        probe: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl ProbeError {
    /// The probe that failed (its `probe` label).
    pub fn probe(&self) -> &'static str {
        match self {
            ProbeError::Load { probe, .. } | ProbeError::Attach { probe, .. } => probe,
        }
    }

    /// The stage it failed at.
    pub fn stage(&self) -> ProbeStage {
        match self {
            ProbeError::Load { .. } => ProbeStage::Load,
            ProbeError::Attach { .. } => ProbeStage::Attach,
        }
    }
}

/// Running probes. Dropping this detaches every program.
pub struct Probes {
    _ebpf: Ebpf,
    _observer: tokio::task::JoinHandle<()>,
}

/// Starts the probes as `mode` asks. `Ok(None)` means plugvisor runs
/// without (some or all of) them; the metrics say which.
pub fn start(
    config: &ProbesConfig,
    listeners: &[WatchedListener],
    plugins: &crate::markers::PluginNames,
    metrics: &Arc<Metrics>,
) -> Result<Option<Probes>, ProbeError> {
    let mode = config.mode;
    if mode == ProbeMode::Off {
        metrics.probes_at_zero();
        tracing::info!("eBPF probes are off ([probes] mode = \"off\")");
        return Ok(None);
    }
    let (result, mut errors) = start_reporting(config, listeners, plugins, metrics);
    match (mode, result) {
        (ProbeMode::On, _) if !errors.is_empty() => Err(errors.remove(0)),
        (_, Some(p)) if errors.is_empty() => {
            tracing::info!(probes = ?Probe::ALL.map(Probe::as_str), "eBPF probes attached");
            Ok(Some(p))
        }
        (_, p) => {
            // Said once, at start: the daemon serves on.
            let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
            let down: Vec<&str> = Probe::ALL
                .map(Probe::as_str)
                .into_iter()
                .filter(|name| errors.iter().any(|e| e.probe() == *name))
                .collect();
            if p.is_some() && down.len() < Probe::ALL.len() {
                // A kernel without some hook (older kernels lack the
                // sock_*_length tracepoints): the other probes still observe.
                tracing::warn!(
                    down = ?down,
                    failures = ?reasons,
                    "eBPF probes unavailable on this kernel: {}; serving, observed by the \
                     other probes (plugvisor_probe_up 0 for these)",
                    down.join(", ")
                );
            } else {
                tracing::warn!(
                    failures = ?reasons,
                    "eBPF probes unavailable; serving without kernel observation (plugvisor_probe_up 0)"
                );
            }
            Ok(p)
        }
    }
}

/// Loads and attaches every probe exactly as `mode = "auto"` does — each on
/// its own, `probe_up` and `probe_failures_total` set — and hands back
/// every failure instead of logging it. `plugvisor-vm-tests` reports these
/// per probe and per kernel; the daemon goes through [`start`].
pub fn start_reporting(
    config: &ProbesConfig,
    listeners: &[WatchedListener],
    plugins: &crate::markers::PluginNames,
    metrics: &Arc<Metrics>,
) -> (Option<Probes>, Vec<ProbeError>) {
    metrics.probes_at_zero();
    let mut errors = Vec::new();
    let result = try_start(config, listeners, plugins, metrics, &mut errors);
    for e in &errors {
        metrics.probe_failure(e.probe(), e.stage());
    }
    (result, errors)
}

fn try_start(
    config: &ProbesConfig,
    listeners: &[WatchedListener],
    plugins: &crate::markers::PluginNames,
    metrics: &Arc<Metrics>,
    errors: &mut Vec<ProbeError>,
) -> Option<Probes> {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit with a valid struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) };

    let mut ebpf = match EbpfLoader::new()
        .map_max_entries(maps::EVENTS, config.ring_buffer_bytes)
        .map_max_entries(maps::WATCHED_SOCKS, config.max_connections)
        .map_max_entries(maps::H2_FLOWS, config.max_connections)
        .load(PROBES_OBJECT)
    {
        Ok(e) => e,
        Err(e) => {
            for p in Probe::ALL {
                errors.push(ProbeError::Load {
                    probe: p.as_str(),
                    message: format!("{e:#}"),
                });
            }
            return None;
        }
    };
    // aya-log records from the programs reach the daemon's tracing logs.
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(error = %e, "eBPF log forwarding unavailable");
            None
        }
    };

    let (layout, layout_failures) = layout::read_all();
    let mut unavailable: Vec<Probe> = Vec::new();
    for (probe, e) in layout_failures {
        unavailable.push(probe);
        errors.push(ProbeError::Load {
            probe: probe.as_str(),
            message: e.to_string(),
        });
    }
    if let Err(message) = fill_maps(&mut ebpf, layout, listeners) {
        for p in Probe::ALL {
            errors.push(ProbeError::Load {
                probe: p.as_str(),
                message: message.clone(),
            });
        }
        return None;
    }

    for probe in Probe::ALL {
        if unavailable.contains(&probe) {
            continue;
        }
        // The service gap needs the socket set kept by the state probe.
        if probe == Probe::ServiceGap && unavailable.contains(&Probe::SockState) {
            errors.push(ProbeError::Attach {
                probe: probe.as_str(),
                message: "needs the inet_sock_set_state probe, which is unavailable".into(),
            });
            continue;
        }
        match attach(&mut ebpf, probe) {
            Ok(()) => metrics.set_probe_up(probe, true),
            Err(e) => {
                if probe == Probe::SockState {
                    unavailable.push(probe);
                }
                errors.push(e);
            }
        }
    }

    let observer = match observer::start(&mut ebpf, listeners, plugins, metrics.clone(), logger) {
        Ok(o) => o,
        Err(message) => {
            for p in Probe::ALL {
                metrics.set_probe_up(p, false);
                errors.push(ProbeError::Load {
                    probe: p.as_str(),
                    message: message.clone(),
                });
            }
            return None;
        }
    };
    Some(Probes {
        _ebpf: ebpf,
        _observer: observer,
    })
}

fn fill_maps(
    ebpf: &mut Ebpf,
    layout: plugvisor_probes_common::TracepointLayout,
    listeners: &[WatchedListener],
) -> Result<(), String> {
    let mut layout_map: Array<_, plugvisor_probes_common::TracepointLayout> =
        Array::try_from(ebpf.map_mut(maps::LAYOUT).ok_or("map LAYOUT missing")?)
            .map_err(|e| e.to_string())?;
    layout_map
        .set(0, layout, 0)
        .map_err(|e| format!("writing LAYOUT: {e}"))?;
    let mut ports: BpfHashMap<_, u16, WatchedPort> = BpfHashMap::try_from(
        ebpf.map_mut(maps::WATCHED_PORTS)
            .ok_or("map WATCHED_PORTS missing")?,
    )
    .map_err(|e| e.to_string())?;
    for (i, l) in listeners.iter().enumerate() {
        let value = WatchedPort {
            listener: i as u32,
            protocol: match l.protocol {
                Protocol::Tcp => 0,
                Protocol::Grpc => 1,
            },
        };
        ports
            .insert(l.port, value, 0)
            .map_err(|e| format!("watching port {}: {e}", l.port))?;
    }
    Ok(())
}

/// Loads and attaches the programs of `probe`.
fn attach(ebpf: &mut Ebpf, probe: Probe) -> Result<(), ProbeError> {
    let name = probe.as_str();
    match probe {
        Probe::SockState => attach_tracepoint(
            ebpf,
            name,
            programs::INET_SOCK_SET_STATE,
            "sock",
            "inet_sock_set_state",
        ),
        Probe::ReloadMarkers => attach_uprobes(
            ebpf,
            probe,
            &[
                (programs::RELOAD_BEGIN, markers::RELOAD_BEGIN),
                (programs::RELOAD_END, markers::RELOAD_END),
                (programs::UPGRADE_BEGIN, markers::UPGRADE_BEGIN),
                (programs::UPGRADE_END, markers::UPGRADE_END),
            ],
        ),
        Probe::TcpResets => {
            attach_tracepoint(
                ebpf,
                name,
                programs::TCP_SEND_RESET,
                "tcp",
                "tcp_send_reset",
            )?;
            attach_tracepoint(
                ebpf,
                name,
                programs::TCP_RECEIVE_RESET,
                "tcp",
                "tcp_receive_reset",
            )
        }
        Probe::TcpRetransmits => attach_tracepoint(
            ebpf,
            name,
            programs::TCP_RETRANSMIT_SKB,
            "tcp",
            "tcp_retransmit_skb",
        ),
        Probe::ServiceGap => {
            attach_tracepoint(
                ebpf,
                name,
                programs::SOCK_RECV_LENGTH,
                "sock",
                "sock_recv_length",
            )?;
            attach_tracepoint(
                ebpf,
                name,
                programs::SOCK_SEND_LENGTH,
                "sock",
                "sock_send_length",
            )
        }
        Probe::Http2Frames => attach_h2(ebpf),
        Probe::HostCrashes => {
            attach_tracepoint(
                ebpf,
                name,
                programs::HOST_EXIT,
                "sched",
                "sched_process_exit",
            )?;
            attach_uprobes(
                ebpf,
                probe,
                &[
                    (programs::HOST_SERVING, markers::HOST_SERVING),
                    (programs::HOST_RETIRED, markers::HOST_RETIRED),
                    (programs::HOST_RECOVERED, markers::HOST_RECOVERED),
                ],
            )
        }
    }
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    probe: &'static str,
    program: &str,
    category: &str,
    event: &str,
) -> Result<(), ProbeError> {
    let load = |message: String| ProbeError::Load { probe, message };
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| load(format!("program {program} missing from object")))?
        .try_into()
        .map_err(|e| load(format!("{e}")))?;
    prog.load().map_err(|e| load(format!("{program}: {e:#}")))?;
    prog.attach(category, event)
        .map_err(|e| ProbeError::Attach {
            probe,
            message: format!("{category}/{event}: {e:#}"),
        })?;
    Ok(())
}

/// The cgroup v2 directory this process lives in (`/proc/self/cgroup`'s
/// `0::` line under the cgroup2 mount from `/proc/self/mounts`).
fn own_cgroup2() -> Result<std::path::PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| format!("/proc/self/mounts: {e}"))?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| dir.to_owned())
        })
        .ok_or("no cgroup2 filesystem is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    let dir = std::path::Path::new(&mount).join(rel.trim_start_matches('/'));
    // In a cgroup v1 (or hybrid) hierarchy the unified path may not exist
    // for this process; the cgroup2 root then still sees its packets.
    Ok(if dir.is_dir() {
        dir
    } else {
        std::path::PathBuf::from(mount)
    })
}

fn attach_h2(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let probe = Probe::Http2Frames.as_str();
    let load = |message: String| ProbeError::Load { probe, message };
    let cgroup_dir = own_cgroup2().map_err(|message| ProbeError::Attach { probe, message })?;
    let cgroup = std::fs::File::open(&cgroup_dir).map_err(|e| ProbeError::Attach {
        probe,
        message: format!("opening {}: {e}", cgroup_dir.display()),
    })?;
    let prog: &mut CgroupSkb = ebpf
        .program_mut(programs::H2_EGRESS)
        .ok_or_else(|| load("program h2_egress missing from object".into()))?
        .try_into()
        .map_err(|e| load(format!("{e}")))?;
    prog.load().map_err(|e| load(format!("h2_egress: {e:#}")))?;
    // The program tail-calls itself through a one-slot program array to
    // walk a packet with more frames than one run may. The map stays in
    // `ebpf` (borrowed, not taken): the kernel empties a program array
    // once no user-space descriptor holds it.
    let fd = prog
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|e| load(format!("h2_egress descriptor: {e:#}")))?;
    let tail = ebpf
        .map_mut(maps::H2_TAIL)
        .ok_or_else(|| load(format!("map {} missing from object", maps::H2_TAIL)))?;
    ProgramArray::try_from(tail)
        .and_then(|mut tail| tail.set(0, &fd, 0))
        .map_err(|e| load(format!("{}: {e:#}", maps::H2_TAIL)))?;
    let prog: &mut CgroupSkb = ebpf
        .program_mut(programs::H2_EGRESS)
        .ok_or_else(|| load("program h2_egress missing from object".into()))?
        .try_into()
        .map_err(|e| load(format!("{e}")))?;
    // Through bpf_link (kernel ≥ 5.7) a cgroup attachment always coexists
    // with others and the kernel wants flags 0: that is aya's `Single`.
    // Its `AllowMultiple` passes BPF_F_ALLOW_MULTI, which link_create
    // refuses with EINVAL.
    prog.attach(
        &cgroup,
        CgroupSkbAttachType::Egress,
        CgroupAttachMode::Single,
    )
    .map_err(|e| ProbeError::Attach {
        probe,
        message: format!("cgroup_skb egress on {}: {e:#}", cgroup_dir.display()),
    })?;
    tracing::debug!(cgroup = %cgroup_dir.display(), "HTTP/2 frame probe attached");
    Ok(())
}

/// Attaches uprobes `(program, marker symbol)` to this process's own marker
/// functions (only this process: the plugin hosts run the same binary).
fn attach_uprobes(
    ebpf: &mut Ebpf,
    probe: Probe,
    programs: &[(&str, &str)],
) -> Result<(), ProbeError> {
    let probe = probe.as_str();
    let exe = std::env::current_exe().map_err(|e| ProbeError::Attach {
        probe,
        message: format!("locating own executable: {e}"),
    })?;
    for &(program, symbol) in programs {
        let load = |message: String| ProbeError::Load { probe, message };
        let prog: &mut UProbe = ebpf
            .program_mut(program)
            .ok_or_else(|| load(format!("program {program} missing from object")))?
            .try_into()
            .map_err(|e| load(format!("{e}")))?;
        prog.load().map_err(|e| load(format!("{program}: {e:#}")))?;
        prog.attach(symbol, &exe, UProbeScope::CallingProcess)
            .map_err(|e| ProbeError::Attach {
                probe,
                message: format!("uprobe on {symbol} in {}: {e:#}", exe.display()),
            })?;
    }
    Ok(())
}
