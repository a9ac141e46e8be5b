//! Booting a kernel with the initramfs in qemu, watching its console, and
//! killing it on a kernel panic or a timeout.
use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::Arch;
use super::results::{self, Line};
use crate::util;

/// Console lines that mean the guest kernel is gone.
const PANIC_MARKERS: [&str; 3] = [
    "Kernel panic - not syncing",
    "---[ end Kernel panic",
    "watchdog: BUG: soft lockup",
];
/// After a panic line, how long the rest of its report may take to print.
const PANIC_GRACE: Duration = Duration::from_secs(5);
/// After `END`, how long the guest may take to power off.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// How long a probe boot under KVM may take to reach init. A normal one
/// takes a second or two; the KVM here that hangs never gets there.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// How qemu runs the guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// qemu's own emulator.
    Tcg,
}

impl Accel {
    /// qemu's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How a boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// qemu exited by itself (the guest powered off) with this status.
    Exited(String),
    /// The guest kernel panicked (the panic line); qemu was killed.
    Panic(String),
    /// The guest did not finish within the timeout; qemu was killed.
    Timeout(Duration),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Exited(status) => write!(f, "qemu exited ({status})"),
            End::Panic(line) => write!(f, "kernel panic: {line}"),
            End::Timeout(t) => write!(f, "timed out after {}: killed", util::secs(*t)),
        }
    }
}

/// What one boot printed and how it ended.
pub struct Boot {
    /// Parsed `vm-test:` lines, in order.
    pub lines: Vec<Line>,
    /// How it ended.
    pub end: End,
    /// Wall time from start to end.
    pub took: Duration,
}

/// One boot's settings.
pub struct BootSpec<'a> {
    /// Guest architecture.
    pub arch: Arch,
    /// Accelerator.
    pub accel: Accel,
    /// `vmlinuz`.
    pub kernel: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// Extra kernel command line (the guest init's `vmtest.*` settings).
    pub append: &'a str,
    /// Kill qemu after this long.
    pub timeout: Duration,
    /// The whole console goes here.
    pub log: &'a Path,
    /// Stop at the first line that parses as `PING` (a probe boot).
    pub stop_at_ping: bool,
}

/// Boots, streams the console into the log, echoes `vm-test:` lines, and
/// returns once qemu exits or has been killed.
pub fn boot(spec: &BootSpec<'_>) -> Result<Boot> {
    let mut cmd = Command::new(spec.arch.qemu());
    cmd.args(spec.arch.machine_args())
        // One host thread for the vCPUs under TCG: multi-threaded TCG
        // raced the kernel's live code patching (6.12 panicked in
        // sched_clock_cpu on a half-patched NOP, one boot in a few).
        .args([
            "-accel",
            match spec.accel {
                Accel::Tcg => "tcg,thread=single",
                Accel::Kvm => "kvm",
            },
        ])
        .args(["-m", "1024", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(spec.kernel)
        .arg("-initrd")
        .arg(spec.initrd)
        .arg("-append")
        .arg(format!(
            "console={} panic=-1 loglevel=4 {}",
            spec.arch.console(),
            spec.append
        ))
        .stdin(Stdio::null());
    run(cmd, spec.timeout, spec.log, spec.stop_at_ping)
}

/// Runs the test binary on the host with the same console handling.
pub fn watch(cmd: Command, timeout: Duration, log: &Path) -> Result<Boot> {
    run(cmd, timeout, log, false)
}

fn run(mut cmd: Command, timeout: Duration, log: &Path, stop_at_ping: bool) -> Result<Boot> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    println!("$ {}", util::display(&cmd));
    let mut log = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", util::display(&cmd)))?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers = [
        forward(child.stdout.take().expect("piped"), tx.clone()),
        forward(child.stderr.take().expect("piped"), tx),
    ];

    let deadline = start + timeout;
    let mut lines = Vec::new();
    let mut stop_by: Option<Instant> = None;
    let mut panic: Option<String> = None;
    let end = loop {
        let now = Instant::now();
        let limit = stop_by.map_or(deadline, |s| s.min(deadline));
        if now >= limit {
            kill(&mut child);
            break match panic {
                Some(p) => End::Panic(p),
                None if stop_by.is_some() && now < deadline => {
                    // Done, but it did not power off in time: killed.
                    End::Exited("killed after the tests ended".into())
                }
                None => End::Timeout(timeout),
            };
        }
        match rx.recv_timeout(limit - now) {
            Ok(line) => {
                let _ = writeln!(log, "{line}");
                if let Some(parsed) = results::parse(&line) {
                    match &parsed {
                        Line::Result(r) => println!("{r}"),
                        Line::Info { kernel, text } => println!("vm-test: INFO {kernel} {text}"),
                        Line::End { .. } => {
                            stop_by = Some(Instant::now() + POWEROFF_GRACE);
                        }
                        Line::Ping if stop_at_ping => {
                            stop_by = Some(Instant::now());
                        }
                        Line::Begin { .. } | Line::Ping => {}
                    }
                    lines.push(parsed);
                } else if PANIC_MARKERS.iter().any(|m| line.contains(m)) {
                    println!("{line}");
                    if panic.is_none() {
                        panic = Some(line.trim().to_owned());
                        stop_by = Some(Instant::now() + PANIC_GRACE);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Both pipes closed: qemu has exited.
                let status = child.wait().context("waiting for qemu")?;
                break match panic {
                    Some(p) => End::Panic(p),
                    None => End::Exited(status.to_string()),
                };
            }
        }
    };
    if matches!(end, End::Exited(_)) {
        for r in readers {
            let _ = r.join();
        }
    }
    // Killed: a reader still blocked on a pipe some leftover process holds
    // open ends with that process; nothing more is read from it.
    Ok(Boot {
        lines,
        end,
        took: start.elapsed(),
    })
}

/// Sends each line of `pipe` to `tx` (lossy UTF-8: a serial console can
/// carry anything).
fn forward(
    pipe: impl std::io::Read + Send + 'static,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_owned();
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Kills the qemu this module started, and reaps it.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch_sh(script: &str, timeout: Duration) -> Boot {
        let log = std::env::temp_dir().join(format!("xtask-watch-{}.log", std::process::id()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        let boot = watch(cmd, timeout, &log).unwrap();
        let _ = std::fs::remove_file(log);
        boot
    }

    #[test]
    fn a_guest_that_powers_off_after_end_exits() {
        let b = watch_sh(
            "echo 'vm-test: PASS k t fine'; echo 'vm-test: END k 1'",
            Duration::from_secs(60),
        );
        assert!(matches!(b.end, End::Exited(_)), "{:?}", b.end);
        assert_eq!(b.lines.len(), 2);
    }

    #[test]
    fn a_kernel_panic_kills_the_guest() {
        // A panic that does not end in a reboot: killed after its report.
        let b = watch_sh(
            "echo 'vm-test: BEGIN k t'; echo '[ 1.0] Kernel panic - not syncing: test'; exec sleep 120",
            Duration::from_secs(60),
        );
        assert!(
            matches!(&b.end, End::Panic(p) if p.contains("not syncing: test")),
            "{:?}",
            b.end
        );
    }

    #[test]
    fn a_silent_guest_is_killed_at_the_timeout() {
        let b = watch_sh(
            "echo 'vm-test: BEGIN k t'; exec sleep 120",
            Duration::from_secs(1),
        );
        assert_eq!(b.end, End::Timeout(Duration::from_secs(1)));
        assert_eq!(b.lines.len(), 1);
    }
}
