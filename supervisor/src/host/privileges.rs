//! What a plugin host gives up before it opens the plugin's library.
//!
//! plugvisor runs as root (for eBPF), so without this every plugin's
//! native code would run as root too. A host, after `exec` and before
//! `dlopen`:
//!
//! 1. empties its capability bounding set, then becomes the plugin's
//!    `user` (uid, gid, no supplementary groups) — which also empties its
//!    permitted, effective and ambient capabilities;
//! 2. sets `no_new_privs`, so no setuid binary or file capability can give
//!    any of it back;
//! 3. installs a seccomp filter that answers `EPERM` to the system calls
//!    a plugin has no business making (`bpf`, `perf_event_open`, `ptrace`,
//!    module loading, `mount`, namespaces, `kexec`, …). It is a deny-list,
//!    not an allow-list: a plugin is arbitrary native code with its own
//!    libraries, and an allow-list that guessed wrong would kill a
//!    working plugin; the list costs one filter run per system call.
//!
//! What it can then reach is what that user can: the admin socket is
//! `0600 root`, the store and `state_dir` are root's, and the library
//! itself arrives as an open file descriptor (fd 4), so the host needs no
//! access to the store at all.
use std::ffi::CString;
use std::io;

/// The user a host runs as when its plugin names none — the one the
/// packages create.
pub const DEFAULT_USER: &str = "plugvisor-plugin";

/// The user taken when [`DEFAULT_USER`] does not exist on the node.
pub const FALLBACK_USER: &str = "nobody";

/// A user to run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

/// Looks `name` up in the user database.
pub fn lookup(name: &str) -> Option<RunAs> {
    let c = CString::new(name).ok()?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 << 10];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; the result points into
    // `pw` and `buf`, which outlive its use here.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &raw mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut out,
        )
    };
    (rc == 0 && !out.is_null()).then(|| RunAs {
        name: name.to_owned(),
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// Who a plugin's hosts run as: the `user` its config names (which must
/// exist), else [`DEFAULT_USER`], else [`FALLBACK_USER`].
pub fn resolve(configured: Option<&str>) -> Result<RunAs, String> {
    match configured {
        Some(name) => lookup(name).ok_or_else(|| format!("user {name:?} does not exist on this node")),
        None => lookup(DEFAULT_USER).or_else(|| lookup(FALLBACK_USER)).ok_or_else(|| {
            format!("neither {DEFAULT_USER:?} nor {FALLBACK_USER:?} exists on this node; name a `user` for the plugin")
        }),
    }
}

/// What the host ended up as: said in its `Ready` message, so the daemon
/// can log it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dropped {
    /// Its real and effective uid.
    pub uid: u32,
    /// Its effective capability set (a bit mask), from the kernel.
    pub cap_eff: u64,
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// The seccomp filter is in place.
    pub seccomp: bool,
}

/// Gives up everything but `run_as`'s rights, in the order of the module
/// docs. A daemon that is not root cannot change user; the rest still
/// applies.
pub fn drop_to(run_as: Option<(u32, u32)>) -> io::Result<Dropped> {
    // SAFETY: plain syscalls on this process's own credentials.
    unsafe {
        if libc::geteuid() == 0
            && let Some((uid, gid)) = run_as
        {
            for cap in 0..=last_cap() {
                // EINVAL past the kernel's last: nothing to drop.
                libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0);
            }
            check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
            check(libc::setresgid(gid, gid, gid), "setresgid")?;
            check(libc::setresuid(uid, uid, uid), "setresuid")?;
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "prctl(PR_SET_NO_NEW_PRIVS)",
        )?;
    }
    install_seccomp()?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map_or("", str::trim)
            .to_owned()
    };
    Ok(Dropped {
        // SAFETY: plain query.
        uid: unsafe { libc::geteuid() },
        cap_eff: u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(u64::MAX),
        no_new_privs: field("NoNewPrivs:") == "1",
        seccomp: field("Seccomp:") == "2",
    })
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// The system calls a host is refused (`EPERM`).
const DENIED: &[libc::c_long] = &[
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_fanotify_init,
];

fn install_seccomp() -> io::Result<()> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let arch = if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    };
    let rules = DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| io::Error::other(format!("building the seccomp filter: {e}")))?;
    let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| {
        io::Error::other(format!("compiling the seccomp filter: {e}"))
    })?;
    // All threads: the host has only its main thread yet, but a library's
    // constructor must not find one unfiltered.
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| io::Error::other(format!("installing the seccomp filter: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_and_a_missing_one_is_named() {
        assert_eq!(lookup("root").unwrap().uid, 0);
        assert!(lookup("no-such-user-plugvisor").is_none());
        let e = resolve(Some("no-such-user-plugvisor")).unwrap_err();
        assert!(
            e.contains("\"no-such-user-plugvisor\" does not exist"),
            "{e}"
        );
        // The default resolves on any node with `nobody`.
        let d = resolve(None).unwrap();
        assert!(d.name == DEFAULT_USER || d.name == FALLBACK_USER);
    }
}
