//! PID 1 in a VM: what a distribution's init would have set up before a
//! daemon like plugvisor starts, and nothing more; then the tests, then
//! power off. (The same shape as aya's own VM test init.)
use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::report::{Outcome, Reporter};
use crate::{Setup, guest};

/// One filesystem init mounts.
struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
}

/// What the probes and the daemon need: `/proc` and `/sys` (tracepoint
/// formats, uprobe PMU type), `/dev` (`/dev/null` for child stdio), a
/// writable `/tmp` and `/run`, bpffs, tracefs (and debugfs, where older
/// tools look for tracing), and cgroup2 for the `cgroup_skb` probe.
const MOUNTS: [Mount; 9] = [
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
    },
    Mount {
        source: "bpffs",
        target: "/sys/fs/bpf",
        fstype: "bpf",
    },
    Mount {
        source: "tracefs",
        target: "/sys/kernel/tracing",
        fstype: "tracefs",
    },
    Mount {
        source: "debugfs",
        target: "/sys/kernel/debug",
        fstype: "debugfs",
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
    },
];

/// Runs as PID 1: set up, test, power off. Never returns.
pub fn run_as_init() -> ! {
    let setup_errors = setup_system();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut rep = Reporter::new(crate::report::kernel_release());
    if param(&cmdline, "vmtest.mode").as_deref() == Some("ping") {
        // The host's probe boot (is KVM usable?): alive is all it asks.
        println!("vm-test: PING {}", crate::report::kernel_release());
        power_off();
    }
    rep.run("init", || {
        if setup_errors.is_empty() {
            Outcome::Pass(format!(
                "mounted {}; lo up",
                MOUNTS.map(|m| m.fstype).join(", ")
            ))
        } else {
            Outcome::Fail(setup_errors.join("; "))
        }
    });
    let setup = Setup {
        plugvisor_dir: PathBuf::from(guest::PLUGVISOR_DIR),
        echo: PathBuf::from(guest::ECHO),
        echo_stamp: param(&cmdline, "vmtest.echo_stamp").unwrap_or_default(),
    };
    crate::use_plugvisor_dir(&setup.plugvisor_dir);
    crate::run_all(&mut rep, &setup);
    rep.end();
    power_off();
}

/// `key=value` from the kernel command line.
fn param(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

/// Mounts and loopback; returns what failed (the `init` test reports it).
fn setup_system() -> Vec<String> {
    let mut errors = Vec::new();
    for m in &MOUNTS {
        if let Err(e) = mount(m) {
            errors.push(e);
        }
    }
    if let Err(e) = loopback_up() {
        errors.push(e);
    }
    errors
}

fn mount(m: &Mount) -> Result<(), String> {
    let target = Path::new(m.target);
    if !target.is_dir() {
        std::fs::create_dir_all(target).map_err(|e| format!("mkdir {}: {e}", m.target))?;
    }
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (source, dir, fstype) = (c(m.source), c(m.target), c(m.fstype));
    // SAFETY: mount(2) with valid NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "mount {} on {}: {}",
            m.fstype,
            m.target,
            std::io::Error::last_os_error()
        ))
    }
}

/// `ip link set lo up`, with the two ioctls it amounts to.
fn loopback_up() -> Result<(), String> {
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "socket for lo: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: an all-zero ifreq is a valid value of this plain C struct.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS on a valid ifreq naming "lo";
    // ifru_flags is the union member these ioctls use.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &raw mut req) < 0 {
            Err("SIOCGIFFLAGS lo")
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &raw const req) < 0 {
                Err("SIOCSIFFLAGS lo")
            } else {
                Ok(())
            }
        }
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    result.map_err(|what| format!("{what}: {err}"))
}

/// Syncs and powers off; with `-no-reboot` qemu then exits.
fn power_off() -> ! {
    // SAFETY: sync(2) and reboot(2) take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot(2) returns only on failure; PID 1 exiting panics the kernel,
    // which `panic=-1` turns into a reboot that `-no-reboot` turns into an exit.
    eprintln!(
        "vm-test: power off failed: {}",
        std::io::Error::last_os_error()
    );
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::param;

    #[test]
    fn reads_kernel_parameters() {
        let c = "console=ttyS0 vmtest.mode=run vmtest.echo_stamp=7.0.100000 panic=-1\n";
        assert_eq!(param(c, "vmtest.mode").as_deref(), Some("run"));
        assert_eq!(param(c, "vmtest.echo_stamp").as_deref(), Some("7.0.100000"));
        assert_eq!(param(c, "vmtest.other"), None);
    }
}
