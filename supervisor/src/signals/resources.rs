//! Resource levels of the node and of plugvisor itself, as metrics a rule
//! can read.
//!
//! RSS, CPU, open fds and threads come from the prometheus process
//! collector (`process_*`). This module adds what it does not know:
//!
//! * `plugvisor_cgroup_memory_current_bytes` / `_max_bytes` — the memory
//!   charged to the daemon's own cgroup and its limit. cgroup v2 is tried
//!   first (`memory.current`, `memory.max` under the cgroup2 mount), then
//!   the v1 memory controller (`memory.usage_in_bytes`,
//!   `memory.limit_in_bytes`). No limit is exported as `+Inf`, so a rule
//!   on `current / max` reads 0 rather than "no data", and an absent series
//!   keeps meaning "this node cannot tell". Only the daemon's own cgroup
//!   is read: a tighter limit on an ancestor is not folded in.
//! * `plugvisor_system_memory_available_bytes` — `MemAvailable` from
//!   `/proc/meminfo`, the kernel's estimate of memory usable without swap.
//! * `plugvisor_state_dir_free_bytes` — `f_bavail × f_frsize` of `state_dir`:
//!   what an unprivileged writer can still write. A root daemon may dip into
//!   the filesystem's reserved blocks below that; a rule should not count
//!   on them. A filesystem mounted read-only (an edge node's flash
//!   remounted `ro` after errors, say) has 0 bytes writable, whatever
//!   statvfs says is free.
//!
//! Every value is read at gather time (a [`Metrics`] refresher), so a scrape
//! and a rule see the level of that moment. A value that cannot be read is
//! absent from the scrape — never a made-up 0.
//!
//! The cgroup directory is found from `/proc/self/cgroup` and
//! `/proc/self/mountinfo` (not `/proc/self/mounts`: a container often
//! mounts a sub-tree of the hierarchy, and only mountinfo says which one,
//! in its "root" field).
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{Metrics, set_or_absent};

/// v1 reports "no limit" as the largest page-aligned `i64`; anything this
/// large is no real machine's memory.
const V1_UNLIMITED_FROM: u64 = 1 << 62;

/// How often a gather may look for the memory cgroup again when it has none
/// (reading mountinfo on a node with thousands of mounts is not free, and
/// rules gather often).
const REDISCOVER_AFTER: Duration = Duration::from_secs(30);

/// Which cgroup interface a directory speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// The v1 memory controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// A memory limit as a cgroup file states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A limit in bytes.
    Bytes(u64),
    /// No limit (`max` in v2, the sentinel in v1).
    Unlimited,
}

impl Limit {
    /// The exported value: bytes, or `+Inf`.
    pub fn as_f64(self) -> f64 {
        match self {
            Limit::Bytes(b) => b as f64,
            Limit::Unlimited => f64::INFINITY,
        }
    }
}

/// The daemon's own memory cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryCgroup {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// The directory holding the memory files.
    pub dir: PathBuf,
}

impl MemoryCgroup {
    /// Finds the daemon's memory cgroup on this machine, if it has a
    /// readable one.
    pub fn discover() -> Option<MemoryCgroup> {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        candidates(&cgroup, &mountinfo)
            .into_iter()
            .find(|c| c.dir.join(c.usage_file()).is_file())
    }

    fn usage_file(&self) -> &'static str {
        match self.version {
            CgroupVersion::V2 => "memory.current",
            CgroupVersion::V1 => "memory.usage_in_bytes",
        }
    }

    fn limit_file(&self) -> &'static str {
        match self.version {
            CgroupVersion::V2 => "memory.max",
            CgroupVersion::V1 => "memory.limit_in_bytes",
        }
    }

    /// Bytes charged to the cgroup now.
    pub fn current(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir.join(self.usage_file())).ok()?;
        text.trim().parse().ok()
    }

    /// The cgroup's limit now. The v2 root cgroup has no `memory.max`:
    /// `None`, as on any read failure.
    pub fn limit(&self) -> Option<Limit> {
        let text = std::fs::read_to_string(self.dir.join(self.limit_file())).ok()?;
        parse_limit(self.version, &text)
    }
}

/// Parses a limit file's contents.
pub fn parse_limit(version: CgroupVersion, text: &str) -> Option<Limit> {
    let text = text.trim();
    if version == CgroupVersion::V2 && text == "max" {
        return Some(Limit::Unlimited);
    }
    let bytes: u64 = text.parse().ok()?;
    if version == CgroupVersion::V1 && bytes >= V1_UNLIMITED_FROM {
        return Some(Limit::Unlimited);
    }
    Some(Limit::Bytes(bytes))
}

/// `MemAvailable` from `/proc/meminfo` text, in bytes.
pub fn parse_meminfo_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let mut words = rest.split_whitespace();
        let value: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") => value.checked_mul(1024),
            None => Some(value),
            Some(_) => None,
        }
    })
}

/// One line of `/proc/self/mountinfo` that mounts a cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    version: CgroupVersion,
    /// The path inside the hierarchy that is mounted (field 4).
    root: String,
    /// Where it is mounted (field 5).
    mount_point: PathBuf,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = (bytes[i] == b'\\')
            .then(|| bytes.get(i + 1..i + 4))
            .flatten()
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        if let Some(code) = code {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mounts and the v1 mounts carrying the memory controller.
fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // Optional fields sit between field 6 and the " - " separator.
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (root, mount_point) = (left.get(3)?, left.get(4)?);
            let version = match *right.first()? {
                "cgroup2" => CgroupVersion::V2,
                "cgroup" if right.get(2)?.split(',').any(|o| o == "memory") => CgroupVersion::V1,
                _ => return None,
            };
            Some(CgroupMount {
                version,
                root: unescape(root),
                mount_point: PathBuf::from(unescape(mount_point)),
            })
        })
        .collect()
}

/// The daemon's path in the v2 hierarchy and in the v1 memory hierarchy,
/// from `/proc/self/cgroup`.
fn own_paths(cgroup: &str) -> (Option<String>, Option<String>) {
    let (mut v2, mut v1) = (None, None);
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_owned());
        }
    }
    (v2, v1)
}

/// Where `path` (a cgroup path) appears under a mount of hierarchy root
/// `root` at `mount_point`; `None` if the mount does not contain it (a
/// namespaced path such as `/../x`, or another sub-tree).
fn map_into(path: &str, root: &str, mount_point: &Path) -> Option<PathBuf> {
    let rel = if root == "/" {
        path.strip_prefix('/')?
    } else {
        let rest = path.strip_prefix(root)?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest.trim_start_matches('/')
    };
    if rel.split('/').any(|c| c == "..") {
        return None;
    }
    Some(if rel.is_empty() {
        mount_point.to_owned()
    } else {
        mount_point.join(rel)
    })
}

/// Candidate memory cgroup directories, v2 first, from the two files'
/// contents; the caller keeps the first whose files exist.
fn candidates(cgroup: &str, mountinfo: &str) -> Vec<MemoryCgroup> {
    let (v2_path, v1_path) = own_paths(cgroup);
    let mounts = cgroup_mounts(mountinfo);
    let mut out = Vec::new();
    for (version, path) in [(CgroupVersion::V2, v2_path), (CgroupVersion::V1, v1_path)] {
        let Some(path) = path else { continue };
        for m in mounts.iter().filter(|m| m.version == version) {
            if let Some(dir) = map_into(&path, &m.root, &m.mount_point) {
                out.push(MemoryCgroup { version, dir });
            }
        }
    }
    out
}

/// Bytes an unprivileged writer can still write on the filesystem that
/// holds `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero statvfs is a valid out-buffer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.f_flag & libc::ST_RDONLY != 0 {
        return Ok(0);
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Registers the refresher that keeps the resource families current, and
/// says once in the log what this node can and cannot tell.
pub fn start(metrics: &Arc<Metrics>, state_dir: &Path) {
    let cgroup = MemoryCgroup::discover();
    match &cgroup {
        Some(c) => {
            tracing::info!(version = ?c.version, dir = %c.dir.display(), "sampling the memory cgroup");
        }
        None => {
            tracing::info!("no readable memory cgroup; plugvisor_cgroup_memory_* are not exported");
        }
    }
    let cgroup = Mutex::new((cgroup, Instant::now()));
    let state_dir = state_dir.to_owned();
    let m = Arc::downgrade(metrics);
    metrics.add_refresher(Box::new(move || {
        // The registry owns this closure; a weak handle avoids a cycle.
        let Some(m) = m.upgrade() else { return };
        let (current, limit) = {
            let mut cg = cgroup.lock().expect("sampler lock");
            let read = |c: &Option<MemoryCgroup>| {
                c.as_ref()
                    .map_or((None, None), |c| (c.current(), c.limit()))
            };
            let (found, last_look) = &mut *cg;
            let mut values = read(found);
            if values.0.is_none() && last_look.elapsed() >= REDISCOVER_AFTER {
                // Moved to another cgroup, or one appeared since start.
                *found = MemoryCgroup::discover();
                *last_look = Instant::now();
                values = read(found);
            }
            values
        };
        set_or_absent(&m.cgroup_memory_current_bytes, current.map(|b| b as f64));
        set_or_absent(&m.cgroup_memory_max_bytes, limit.map(Limit::as_f64));
        let available = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .as_deref()
            .and_then(parse_meminfo_available);
        set_or_absent(
            &m.system_memory_available_bytes,
            available.map(|b| b as f64),
        );
        set_or_absent(
            &m.state_dir_free_bytes,
            available_bytes(&state_dir).ok().map(|b| b as f64),
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24684672 kB\n\
                           MemFree:        21331020 kB\n\
                           MemAvailable:   23529040 kB\n\
                           Buffers:          102400 kB\n";

    #[test]
    fn meminfo_available_is_in_bytes() {
        assert_eq!(parse_meminfo_available(MEMINFO), Some(23_529_040 * 1024));
        assert_eq!(
            parse_meminfo_available("MemTotal: 1 kB\nMemFree: 1 kB\n"),
            None,
            "kernels before 3.14 have no MemAvailable: absent, not 0"
        );
        assert_eq!(parse_meminfo_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn limits_parse_with_unlimited_as_infinity() {
        assert_eq!(
            parse_limit(CgroupVersion::V2, "max\n"),
            Some(Limit::Unlimited)
        );
        assert_eq!(
            parse_limit(CgroupVersion::V2, "536870912\n"),
            Some(Limit::Bytes(512 << 20))
        );
        assert_eq!(
            parse_limit(CgroupVersion::V1, "9223372036854771712\n"),
            Some(Limit::Unlimited)
        );
        assert_eq!(
            parse_limit(CgroupVersion::V1, "1073741824\n"),
            Some(Limit::Bytes(1 << 30))
        );
        assert_eq!(parse_limit(CgroupVersion::V1, "max"), None);
        assert_eq!(parse_limit(CgroupVersion::V2, ""), None);
        assert!(Limit::Unlimited.as_f64().is_infinite());
    }

    #[test]
    fn v2_cgroup_is_found_under_the_cgroup2_mount() {
        let cgroup = "0::/system.slice/plugvisor.service\n";
        let mountinfo = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        assert_eq!(
            candidates(cgroup, mountinfo),
            vec![MemoryCgroup {
                version: CgroupVersion::V2,
                dir: PathBuf::from("/sys/fs/cgroup/system.slice/plugvisor.service"),
            }]
        );
    }

    #[test]
    fn hybrid_host_offers_v2_then_the_v1_memory_controller() {
        // systemd's hybrid layout: cgroup2 holds no controllers, memory is v1.
        let cgroup = "\
9:name=systemd:/
4:memory:/process_api/6a96a638
2:cpu,cpuacct:/
0::/
";
        let mountinfo = "\
40 30 0:35 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 30 0:36 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct
42 30 0:37 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw
";
        assert_eq!(
            candidates(cgroup, mountinfo),
            vec![
                MemoryCgroup {
                    version: CgroupVersion::V2,
                    dir: PathBuf::from("/sys/fs/cgroup/unified"),
                },
                MemoryCgroup {
                    version: CgroupVersion::V1,
                    dir: PathBuf::from("/sys/fs/cgroup/memory/process_api/6a96a638"),
                },
            ]
        );
    }

    #[test]
    fn a_mounted_subtree_is_mapped_through_its_root() {
        // A v1 container without a cgroup namespace: the host path is
        // /docker/abc and exactly that sub-tree is mounted.
        let cgroup = "5:memory:/docker/abc\n";
        let mountinfo = "\
50 40 0:40 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
";
        assert_eq!(
            candidates(cgroup, mountinfo),
            vec![MemoryCgroup {
                version: CgroupVersion::V1,
                dir: PathBuf::from("/sys/fs/cgroup/memory"),
            }]
        );
        // A path outside the mounted sub-tree, or above a namespace root,
        // cannot be read: no candidate rather than a wrong directory.
        assert!(candidates("5:memory:/docker/abcd\n", mountinfo).is_empty());
        let ns = "60 50 0:41 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert!(candidates("0::/../other\n", ns).is_empty());
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        let cgroup = "0::/a\n";
        let mountinfo = "70 1 0:50 / /mnt/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(
            candidates(cgroup, mountinfo)[0].dir,
            PathBuf::from("/mnt/my cgroup/a")
        );
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn this_machine_reads_without_inventing_values() {
        let t = tempfile::tempdir().unwrap();
        assert!(available_bytes(t.path()).unwrap() > 0);
        assert!(available_bytes(&t.path().join("missing")).is_err());
        let m = Arc::new(Metrics::new());
        start(&m, t.path());
        let text = String::from_utf8(m.encode()).unwrap();
        assert!(text.contains("plugvisor_state_dir_free_bytes "), "{text}");
        assert!(
            text.contains("plugvisor_system_memory_available_bytes "),
            "{text}"
        );
        // The cgroup families are there exactly when this machine has a
        // readable memory cgroup, and never as a fake 0.
        let has_cgroup = MemoryCgroup::discover().is_some_and(|c| c.current().is_some());
        assert_eq!(
            text.contains("plugvisor_cgroup_memory_current_bytes "),
            has_cgroup,
            "{text}"
        );
        assert!(!text.contains("plugvisor_cgroup_memory_current_bytes 0\n"));
    }
}
