//! Resource limits and the kernel's own accounting, per plugin host.
//!
//! Each host gets a cgroup of its own when the node lets plugvisor make
//! one, so its memory, CPU time and threads are the kernel's count for that
//! host alone, and `memory_max`, `cpu_max`, `pids_max` are the kernel's to
//! enforce:
//!
//! 1. **cgroup v2**, when the daemon's own cgroup in the unified hierarchy
//!    is writable and offers the `memory` controller (systemd
//!    `Delegate=yes`, a container given its own cgroup namespace, a node
//!    booted with the unified hierarchy). The hosts live in
//!    `<own cgroup>/plugvisor-hosts/<plugin>-<version>-<n>`. A v2 cgroup
//!    with processes in it cannot hand controllers to its children, so a
//!    daemon that is not alone in the hierarchy's root first moves itself
//!    into the leaf `<own cgroup>/daemon` (what systemd's documentation
//!    asks of a delegated service).
//! 2. **cgroup v1**, when the `memory` controller is mounted on v1 (the
//!    hybrid layout): the same layout under each v1 controller that is
//!    mounted (`memory`, and `cpu`, `cpuacct`, `pids` when present).
//! 3. **rlimits** otherwise: `memory_max` becomes `RLIMIT_AS` (address
//!    space, not resident memory: set it with room for thread stacks);
//!    `cpu_max` and `pids_max` cannot be held by an rlimit and are not.
//!    Accounting then comes from `/proc/PID`.
//!
//! The mechanism in use is logged once and exported as the `limits` label
//! of `plugvisor_plugin_isolation`.
//!
//! A host joins its cgroup between `fork` and `exec` (it writes `0` to
//! `cgroup.procs`), so nothing it allocates — not even the dynamic
//! loader's — is charged elsewhere; its cgroup is removed once it is
//! reaped.
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The leaf the daemon moves itself into when its v2 cgroup must hand
/// controllers to the hosts' cgroups.
const DAEMON_LEAF: &str = "daemon";

/// Where the hosts' cgroups are made, under the daemon's own.
const HOSTS_DIR: &str = "plugvisor-hosts";

/// cgroup v1's `cpu.cfs_period_us` and v2's `cpu.max` period: 100 ms, the
/// kernel's default.
const CPU_PERIOD_US: u64 = 100_000;

/// What a plugin's config asks its hosts to be held to (`[plugin.NAME]`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// `memory_max`, in bytes.
    pub memory_max: Option<u64>,
    /// `cpu_max`, as a share of one CPU (`"50%"` is 0.5, `"200%"` two).
    pub cpu_max: Option<f64>,
    /// `pids_max`: threads and processes.
    pub pids_max: Option<u64>,
}

impl Limits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.memory_max.is_some() || self.cpu_max.is_some() || self.pids_max.is_some()
    }
}

/// Parses a size: `268435456`, `256MiB`, `1GiB`, `512KiB`, `64MB`, `1G`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (such as 256MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("{text:?} is not a usable memory limit")),
        Some(b) => Ok(b),
    }
}

/// Parses a CPU share: `"50%"` (half of one CPU), `"150%"`.
pub fn parse_cpu(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let pct = t
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("{text:?} is not a CPU share (such as \"50%\")"))?;
    if !(pct.is_finite() && pct >= 1.0) {
        return Err(format!("{text:?}: a CPU share is at least 1%"));
    }
    Ok(pct / 100.0)
}

/// How a node holds its hosts to their limits: the `limits` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// A cgroup v2 per host.
    Cgroup2,
    /// A v1 cgroup per host, in each mounted v1 controller.
    Cgroup1,
    /// rlimits on the host process.
    Rlimit,
    /// Nothing can be held.
    None,
}

impl Mechanism {
    /// The label spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Cgroup2 => "cgroup2",
            Mechanism::Cgroup1 => "cgroup1",
            Mechanism::Rlimit => "rlimit",
            Mechanism::None => "none",
        }
    }
}

/// The v1 controllers a host cgroup is made in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V1 {
    Memory,
    Cpu,
    Cpuacct,
    Pids,
}

impl V1 {
    const ALL: [V1; 4] = [V1::Memory, V1::Cpu, V1::Cpuacct, V1::Pids];

    fn name(self) -> &'static str {
        match self {
            V1::Memory => "memory",
            V1::Cpu => "cpu",
            V1::Cpuacct => "cpuacct",
            V1::Pids => "pids",
        }
    }
}

/// Where this node's hosts get their cgroups.
#[derive(Debug, Clone)]
pub enum CgroupRoot {
    /// `<own v2 cgroup>/plugvisor-hosts`, with these controllers enabled.
    V2 {
        /// The directory hosts' cgroups are made in.
        dir: PathBuf,
        /// Controllers enabled for them (`memory` always).
        controllers: Vec<String>,
    },
    /// `<own v1 cgroup>/plugvisor-hosts` in each mounted controller.
    V1 {
        /// (controller, the directory hosts' cgroups are made in); a
        /// directory appears once even when controllers share a mount.
        dirs: Vec<(V1Set, PathBuf)>,
    },
}

/// The v1 controllers one mount carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct V1Set(u8);

impl V1Set {
    fn with(self, c: V1) -> V1Set {
        V1Set(self.0 | 1 << c as u8)
    }

    fn has(self, c: V1) -> bool {
        self.0 & (1 << c as u8) != 0
    }
}

/// Hosts' resource handling on this node: found once when the daemon
/// starts.
#[derive(Debug)]
pub struct Resources {
    root: Option<CgroupRoot>,
    seq: AtomicU64,
    /// Why cgroup v2 (and v1) were not used, for the log.
    pub why_not: Vec<String>,
}

impl Resources {
    /// Finds and prepares this node's cgroups for hosts (see the module
    /// docs for the order). Never fails: a node without usable cgroups
    /// falls back to rlimits, and says why.
    pub fn discover() -> Resources {
        let mut why_not = Vec::new();
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = match prepare_v2(&cgroup, &mountinfo) {
            Ok(r) => Some(r),
            Err(e) => {
                why_not.push(format!("cgroup v2: {e}"));
                match prepare_v1(&cgroup, &mountinfo) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        why_not.push(format!("cgroup v1: {e}"));
                        None
                    }
                }
            }
        };
        Resources {
            root,
            seq: AtomicU64::new(0),
            why_not,
        }
    }

    /// No cgroups, whatever the node has: rlimits only (tests, and
    /// daemons that must not touch the node's cgroups).
    pub fn rlimits_only() -> Resources {
        Resources {
            root: None,
            seq: AtomicU64::new(0),
            why_not: vec!["not asked to use cgroups".to_owned()],
        }
    }

    /// The mechanism hosts with `limits` are held by.
    pub fn mechanism(&self, limits: &Limits) -> Mechanism {
        match (&self.root, limits.any()) {
            (Some(CgroupRoot::V2 { .. }), _) => Mechanism::Cgroup2,
            (Some(CgroupRoot::V1 { .. }), _) => Mechanism::Cgroup1,
            (None, true) => Mechanism::Rlimit,
            (None, false) => Mechanism::None,
        }
    }

    /// Where hosts' cgroups are made, if anywhere.
    pub fn root(&self) -> Option<&CgroupRoot> {
        self.root.as_ref()
    }

    /// Makes the cgroup a new host of `plugin` `version` will join, with
    /// `limits` written; `None` on a node without cgroups.
    pub fn create(
        &self,
        plugin: &str,
        version: &str,
        limits: &Limits,
    ) -> io::Result<Option<HostCgroup>> {
        let Some(root) = &self.root else {
            return Ok(None);
        };
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{plugin}-{version}-{}-{n}", std::process::id());
        let cg = match root {
            CgroupRoot::V2 { dir, controllers } => {
                let d = dir.join(&name);
                mkdir_fresh(&d)?;
                let cg = HostCgroup {
                    kind: Kind::V2,
                    dirs: vec![(V1Set::default(), d.clone())],
                };
                if let Some(m) = limits.memory_max {
                    write(&d.join("memory.max"), &m.to_string())?;
                    // A leak must end in the OOM killer, not in swap.
                    let _ = write(&d.join("memory.swap.max"), "0");
                }
                if let Some(c) = limits.cpu_max {
                    if !controllers.iter().any(|c| c == "cpu") {
                        return Err(unsupported(
                            "cpu_max",
                            "the cpu controller is not delegated",
                        ));
                    }
                    write(&d.join("cpu.max"), &cpu_max_line(c))?;
                }
                if let Some(p) = limits.pids_max {
                    if !controllers.iter().any(|c| c == "pids") {
                        return Err(unsupported(
                            "pids_max",
                            "the pids controller is not delegated",
                        ));
                    }
                    write(&d.join("pids.max"), &p.to_string())?;
                }
                cg
            }
            CgroupRoot::V1 { dirs } => {
                let mut made = Vec::new();
                for (set, base) in dirs {
                    let d = base.join(&name);
                    mkdir_fresh(&d)?;
                    made.push((*set, d));
                }
                let cg = HostCgroup {
                    kind: Kind::V1,
                    dirs: made,
                };
                if let Some(m) = limits.memory_max {
                    let d = cg.v1_dir(V1::Memory).expect("v1 root has memory");
                    write(&d.join("memory.limit_in_bytes"), &m.to_string())?;
                    let _ = write(&d.join("memory.memsw.limit_in_bytes"), &m.to_string());
                }
                if let Some(c) = limits.cpu_max {
                    let d = cg
                        .v1_dir(V1::Cpu)
                        .ok_or_else(|| unsupported("cpu_max", "no v1 cpu controller is mounted"))?;
                    write(&d.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(
                        &d.join("cpu.cfs_quota_us"),
                        &((c * CPU_PERIOD_US as f64) as u64).to_string(),
                    )?;
                }
                if let Some(p) = limits.pids_max {
                    let d = cg.v1_dir(V1::Pids).ok_or_else(|| {
                        unsupported("pids_max", "no v1 pids controller is mounted")
                    })?;
                    write(&d.join("pids.max"), &p.to_string())?;
                }
                cg
            }
        };
        Ok(Some(cg))
    }
}

fn unsupported(what: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{what} cannot be held on this node: {why}"),
    )
}

fn cpu_max_line(share: f64) -> String {
    let quota = ((share * CPU_PERIOD_US as f64) as u64).max(1000);
    format!("{quota} {CPU_PERIOD_US}")
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

fn mkdir_fresh(d: &Path) -> io::Result<()> {
    // A leftover of an earlier daemon with the same pid: empty by now.
    let _ = std::fs::remove_dir(d);
    std::fs::create_dir(d)
        .map_err(|e| io::Error::new(e.kind(), format!("creating cgroup {}: {e}", d.display())))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Kind {
    V1,
    V2,
}

/// One host's cgroup (one directory per v1 mount, or one v2 directory).
#[derive(Debug)]
pub struct HostCgroup {
    kind: Kind,
    dirs: Vec<(V1Set, PathBuf)>,
}

/// A host's use of resources, as the kernel counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Memory charged (cgroup) or resident (`/proc`), in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU time, user and system, in seconds.
    pub cpu_seconds: Option<f64>,
    /// Threads (tasks in the cgroup, or the process's threads).
    pub threads: Option<u64>,
}

impl HostCgroup {
    fn v1_dir(&self, c: V1) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(s, _)| s.has(c))
            .map(|(_, d)| d.as_path())
    }

    fn file(&self, v1: V1, v2_name: &str, v1_name: &str) -> Option<PathBuf> {
        match self.kind {
            Kind::V2 => Some(self.dirs[0].1.join(v2_name)),
            Kind::V1 => self.v1_dir(v1).map(|d| d.join(v1_name)),
        }
    }

    /// The `cgroup.procs` files the host writes `0` to as it starts.
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .map(|(_, d)| {
                CString::new(d.join("cgroup.procs").as_os_str().as_bytes())
                    .expect("a path read from the kernel has no NUL")
            })
            .collect()
    }

    /// What the host's cgroup has used.
    pub fn usage(&self) -> Usage {
        let memory_bytes = self
            .file(V1::Memory, "memory.current", "memory.usage_in_bytes")
            .and_then(|f| read_u64(&f));
        let cpu_seconds = match self.kind {
            Kind::V2 => std::fs::read_to_string(self.dirs[0].1.join("cpu.stat"))
                .ok()
                .and_then(|s| keyed(&s, "usage_usec"))
                .map(|us| us as f64 / 1e6),
            Kind::V1 => self
                .v1_dir(V1::Cpuacct)
                .and_then(|d| read_u64(&d.join("cpuacct.usage")))
                .map(|ns| ns as f64 / 1e9),
        };
        let threads = self
            .file(V1::Pids, "pids.current", "pids.current")
            .and_then(|f| read_u64(&f));
        Usage {
            memory_bytes,
            cpu_seconds,
            threads,
        }
    }

    /// How many times the kernel's OOM killer acted in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let text = match self.kind {
            Kind::V2 => std::fs::read_to_string(self.dirs[0].1.join("memory.events")),
            Kind::V1 => match self.v1_dir(V1::Memory) {
                Some(d) => std::fs::read_to_string(d.join("memory.oom_control")),
                None => return 0,
            },
        };
        text.ok().and_then(|t| keyed(&t, "oom_kill")).unwrap_or(0)
    }

    /// Which mechanism this cgroup is.
    pub fn mechanism(&self) -> Mechanism {
        match self.kind {
            Kind::V1 => Mechanism::Cgroup1,
            Kind::V2 => Mechanism::Cgroup2,
        }
    }
}

/// Where a host's cgroup is, as an upgrade's offer carries it: the daemon
/// that adopts the host reads its usage there and removes it once the
/// host is gone.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CgroupPlace {
    kind: Kind,
    dirs: Vec<(V1Set, PathBuf)>,
}

impl HostCgroup {
    /// Where it is.
    pub fn place(&self) -> CgroupPlace {
        CgroupPlace {
            kind: self.kind,
            dirs: self.dirs.clone(),
        }
    }

    /// The cgroup at `place`, made by the daemon this one replaced: this
    /// one removes it once its host is gone.
    pub fn adopt(place: CgroupPlace) -> HostCgroup {
        HostCgroup {
            kind: place.kind,
            dirs: place.dirs,
        }
    }

    /// Lets go of the cgroup without removing it: its host lives on,
    /// adopted by another daemon, which removes it when the host is gone.
    pub fn hand_over(self) {
        std::mem::forget(self);
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        for (_, d) in &self.dirs {
            // Empty once its host is reaped; a v1 memory cgroup may take a
            // moment to let go of its last pages.
            for _ in 0..20 {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        }
    }
}

/// A process's use of resources from `/proc/PID` (no cgroup of its own).
pub fn proc_usage(pid: u32) -> Usage {
    let page = page_size();
    let memory_bytes = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page);
    let cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command, which may hold spaces and ')'.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the whole line.
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / clock_ticks())
        });
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))?
                .trim()
                .parse()
                .ok()
        });
    Usage {
        memory_bytes,
        cpu_seconds,
        threads,
    }
}

fn page_size() -> u64 {
    // SAFETY: plain query.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

fn clock_ticks() -> f64 {
    // SAFETY: plain query.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key N` in a cgroup's flat-keyed file.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A cgroup filesystem mount: where, which part of the hierarchy it
/// shows, its type and super options.
struct Mount<'a> {
    root: &'a str,
    point: &'a str,
    fstype: &'a str,
    superopts: &'a str,
    read_only: bool,
}

fn mounts(mountinfo: &str) -> Vec<Mount<'_>> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            let p: Vec<&str> = post.split(' ').collect();
            Some(Mount {
                root: f.get(3)?,
                point: f.get(4)?,
                read_only: f.get(5)?.split(',').any(|o| o == "ro"),
                fstype: p.first()?,
                superopts: p.get(2).copied().unwrap_or(""),
            })
        })
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .collect()
}

/// The directory of `path` (a cgroup path from `/proc/self/cgroup`) under
/// a mount that shows the part of the hierarchy from `root` down.
fn under_mount(m: &Mount<'_>, path: &str) -> Option<PathBuf> {
    let rel = if m.root == "/" {
        path
    } else {
        path.strip_prefix(m.root)?
    };
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        PathBuf::from(m.point)
    } else {
        Path::new(m.point).join(rel)
    })
}

fn prepare_v2(cgroup: &str, mountinfo: &str) -> Result<CgroupRoot, String> {
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no unified hierarchy")?;
    let m = mounts(mountinfo)
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .ok_or("no cgroup2 filesystem is mounted")?;
    if m.read_only {
        return Err(format!("{} is mounted read-only", m.point));
    }
    let own = under_mount(&m, path).ok_or("this process's cgroup is outside the mount")?;
    let offered = std::fs::read_to_string(own.join("cgroup.controllers"))
        .map_err(|e| format!("reading {}/cgroup.controllers: {e}", own.display()))?;
    let offered: Vec<String> = offered.split_whitespace().map(str::to_owned).collect();
    if !offered.iter().any(|c| c == "memory") {
        return Err(format!(
            "{} offers no memory controller (offers: {})",
            own.display(),
            if offered.is_empty() {
                "none".to_owned()
            } else {
                offered.join(" ")
            }
        ));
    }
    let controllers: Vec<String> = ["memory", "cpu", "pids"]
        .into_iter()
        .filter(|c| offered.iter().any(|o| o == c))
        .map(str::to_owned)
        .collect();
    let enable = controllers
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    let is_root = path == "/";
    if !is_root {
        // No internal processes: the daemon steps into a leaf of its own
        // before its cgroup hands controllers down.
        let leaf = own.join(DAEMON_LEAF);
        if !leaf.is_dir() {
            std::fs::create_dir(&leaf).map_err(|e| format!("creating {}: {e}", leaf.display()))?;
        }
        std::fs::write(leaf.join("cgroup.procs"), "0")
            .map_err(|e| format!("moving the daemon into {}: {e}", leaf.display()))?;
    }
    std::fs::write(own.join("cgroup.subtree_control"), &enable).map_err(|e| {
        format!(
            "enabling {enable} in {}/cgroup.subtree_control: {e}",
            own.display()
        )
    })?;
    let dir = own.join(HOSTS_DIR);
    if !dir.is_dir() {
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(dir.join("cgroup.subtree_control"), &enable).map_err(|e| {
        format!(
            "enabling {enable} in {}/cgroup.subtree_control: {e}",
            dir.display()
        )
    })?;
    Ok(CgroupRoot::V2 { dir, controllers })
}

fn prepare_v1(cgroup: &str, mountinfo: &str) -> Result<CgroupRoot, String> {
    let ms = mounts(mountinfo);
    let mut dirs: Vec<(V1Set, PathBuf)> = Vec::new();
    for l in cgroup.lines() {
        let mut parts = l.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let set = ctrls.split(',').fold(V1Set::default(), |s, c| {
            V1::ALL
                .iter()
                .find(|v| v.name() == c)
                .map_or(s, |v| s.with(*v))
        });
        if set == V1Set::default() {
            continue;
        }
        let Some(m) = ms.iter().find(|m| {
            m.fstype == "cgroup"
                && !m.read_only
                && ctrls
                    .split(',')
                    .all(|c| m.superopts.split(',').any(|o| o == c))
        }) else {
            continue;
        };
        let Some(own) = under_mount(m, path) else {
            continue;
        };
        let dir = own.join(HOSTS_DIR);
        if !dir.is_dir() && std::fs::create_dir(&dir).is_err() {
            continue;
        }
        dirs.push((set, dir));
    }
    if !dirs.iter().any(|(s, _)| s.has(V1::Memory)) {
        return Err("no writable v1 memory controller".to_owned());
    }
    Ok(CgroupRoot::V1 { dirs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_shares_parse_and_bad_ones_say_why() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("64MB").unwrap(), 64_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(
            parse_size("5 parsecs")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_size("0").is_err());
        assert!((parse_cpu("50%").unwrap() - 0.5).abs() < 1e-9);
        assert!((parse_cpu("200%").unwrap() - 2.0).abs() < 1e-9);
        assert!(parse_cpu("0.5").is_err());
        assert!(parse_cpu("0%").is_err());
        assert_eq!(cpu_max_line(0.5), "50000 100000");
    }

    #[test]
    fn flat_keyed_files_read_by_key() {
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(2));
        assert_eq!(
            keyed("usage_usec 1500000\nuser_usec 1\n", "usage_usec"),
            Some(1_500_000)
        );
        assert_eq!(keyed(events, "nope"), None);
    }

    #[test]
    fn a_process_in_a_sub_tree_mount_is_found_under_it() {
        let mi = "30 25 0:26 /process_api /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n";
        let m = &mounts(mi)[0];
        assert_eq!(
            under_mount(m, "/process_api/abc"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/abc"))
        );
        assert_eq!(under_mount(m, "/elsewhere"), None);
    }

    #[test]
    fn this_processes_own_usage_is_read_from_proc() {
        let u = proc_usage(std::process::id());
        assert!(u.memory_bytes.unwrap() > 0);
        assert!(u.threads.unwrap() >= 1);
        assert!(u.cpu_seconds.is_some());
    }
}
