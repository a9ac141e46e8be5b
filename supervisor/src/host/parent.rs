//! The daemon's side of a plugin host: spawn it, wait until its version
//! serves, send it calls, and notice when it dies.
//!
//! Each call gets an id and a waiter; the host's answers come back on one
//! reader task, in any order. When the host dies — any signal, any exit —
//! the task that reaps it fails every waiter with the cause
//! ([`Reply::Lost`]), so a crash costs exactly the calls in flight on it,
//! and a call made after the death is never sent ([`CallError::NotDelivered`]):
//! the slot sends it to whatever serves next.
//!
//! A call that overruns its timeout is answered with a timeout at once and
//! remembered as stuck; one still stuck [`hang_grace`] later means the
//! host is hung, and it is killed (reason `hang`), which frees its threads
//! and its mapping — what an in-process call cannot do.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdStream;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use super::limits::{CgroupPlace, HostCgroup, Limits, Resources, Usage};
use super::privileges::{Dropped, RunAs};
use super::wire::{self, Kind};
use super::{Cause, Exit, HostSpec};
use crate::handover::{Channel, Message};
use crate::loader::{HandleError, LoadError, LoadTimings, StuckCalls};

/// How long a host that lost its channel, or was told to stop, may take to
/// exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How long a write to a host may wait for room in the socket buffer: a
/// host that reads nothing for this long is frozen, and is killed.
const WRITE_STALL: Duration = Duration::from_secs(2);

/// How long a host may take to answer an [`Message::Adopt`]: it starts a
/// thread and answers, nothing more.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(2);

/// After a call's timeout, how much longer it may stay stuck before its
/// host counts as hung and is killed: as long again as the timeout itself.
pub fn hang_grace(timeout: Duration) -> Duration {
    timeout.max(Duration::from_millis(100))
}

/// Why a call to a host gave no answer from the plugin.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The plugin answered with an error or panicked.
    Plugin(HandleError),
    /// The host died with the call in flight: the call is lost.
    Lost(Exit),
    /// The host was already gone (or going): the call was never sent.
    NotDelivered(Option<Exit>),
    /// No answer within the timeout; the call is remembered as stuck.
    TimedOut,
}

/// What a waiter gets.
enum Reply {
    Message(Kind, Vec<u8>),
    Lost(Exit),
}

enum Waiter {
    Async(oneshot::Sender<Reply>),
    Blocking(std::sync::mpsc::SyncSender<Reply>),
}

impl Waiter {
    fn send(self, r: Reply) {
        match self {
            Waiter::Async(tx) => {
                let _ = tx.send(r);
            }
            Waiter::Blocking(tx) => {
                let _ = tx.try_send(r);
            }
        }
    }
}

#[derive(Default)]
struct Pending {
    calls: HashMap<u64, Waiter>,
    // Timed out, not answered yet: id → when it was given up on.
    stuck: HashMap<u64, Instant>,
    // No new calls: the host died (Some) or its channel closed (None).
    closed: bool,
    exit: Option<Exit>,
}

// Why plugvisor killed a host, if it did.
const KILLED_NONE: u8 = 0;
const KILLED_HANG: u8 = 1;
const KILLED_INIT: u8 = 2;

/// One host's connection, shared by callers, the reader and the reaper.
struct Conn {
    spec: HostSpec,
    pid: u32,
    writer: Mutex<Option<OwnedWriteHalf>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    killed: AtomicU8,
    // Set once the host said ready: only then is its death news.
    serving: AtomicBool,
    // Set when the daemon let go of it: its exit is expected.
    retired: AtomicBool,
    stuck_gauge: Arc<StuckCalls>,
    exits: mpsc::UnboundedSender<Exit>,
    // Its cgroup, removed once it is reaped.
    cgroup: Mutex<Option<HostCgroup>>,
    // The exit, for a spawner still waiting for `Ready`.
    reaped: OnceLock<Exit>,
    reaped_tx: Mutex<Option<std::sync::mpsc::SyncSender<Exit>>>,
    // Where a successor daemon's stream is asked for (see `second_stream`).
    control: Mutex<Option<Channel>>,
    // What it was started with, as a successor compares it to its own.
    confinement: String,
    // Set for a host adopted from the daemon this one replaced: not our
    // child, so it is watched and signalled through its pidfd.
    pidfd: Option<Arc<OwnedFd>>,
    // Set once a successor daemon serves with this host: it is theirs now.
    handed: AtomicBool,
}

/// A version running in a host process.
pub struct Host {
    conn: Arc<Conn>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("plugin", &self.conn.spec.plugin)
            .field("version", &self.conn.spec.version.to_string())
            .field("pid", &self.conn.pid)
            .finish_non_exhaustive()
    }
}

/// What a host is held to and who it runs as.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Confinement {
    /// Its limits.
    pub limits: Limits,
    /// The user it becomes before it opens the library (`None`: it keeps
    /// the daemon's user — only for a daemon that is not root).
    pub run_as: Option<RunAs>,
}

/// A host process just started: the daemon's ends of its channels.
struct Started {
    calls: StdStream,
    control: Channel,
    child: tokio::process::Child,
    cgroup: Option<HostCgroup>,
}

/// What a successor compares before it adopts a host: the same limits and
/// user, spelled the same by both binaries (a binary that spells them
/// otherwise starts a host of its own — the safe way to differ).
fn fingerprint(confinement: &Confinement) -> String {
    format!("{confinement:?}")
}

/// A host as a daemon being replaced describes it to its successor (in
/// the hand-over's offer, as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HandedAbout {
    /// What it runs.
    pub plugin: String,
    /// The version.
    pub version: semver::Version,
    /// The manifest's ABI.
    pub abi: u32,
    /// The object's sha256.
    pub sha256: String,
    /// The object in the store.
    pub object: PathBuf,
    /// Its pid, as the old daemon sees it.
    pub pid: u32,
    /// The [`wire::VERSION`] it speaks.
    pub wire: u32,
    /// Its limits and user (see `fingerprint`).
    pub confinement: String,
    /// Its cgroup, if it has one.
    pub cgroup: Option<CgroupPlace>,
}

/// A host a successor may adopt: its description, a call stream of its
/// own into the host, the control channel for the next hand-over, and a
/// pidfd to watch and signal it by (it is not the successor's child).
#[derive(Debug)]
pub struct Handed {
    /// What it is.
    pub about: HandedAbout,
    /// The successor's call stream.
    pub calls: OwnedFd,
    /// The successor's control channel.
    pub control: OwnedFd,
    /// The host's pidfd.
    pub pidfd: OwnedFd,
}

impl Handed {
    /// Whether a daemon that would start `spec` confined by `confinement`
    /// can adopt this host instead, and if not, why.
    pub fn fits(&self, spec: &HostSpec, confinement: &Confinement) -> Result<(), String> {
        let a = &self.about;
        if a.wire != wire::VERSION {
            return Err(format!(
                "it speaks host wire format {}, this binary {}",
                a.wire,
                wire::VERSION
            ));
        }
        if (a.plugin.as_str(), &a.version, a.sha256.as_str())
            != (spec.plugin.as_str(), &spec.version, spec.sha256.as_str())
        {
            return Err(format!("it runs {} {} ({})", a.plugin, a.version, a.sha256));
        }
        if a.confinement != fingerprint(confinement) {
            return Err("the config now holds it to other limits, or another user".into());
        }
        Ok(())
    }
}

/// The pid a pidfd refers to in this process's pid namespace (`None`: it
/// has exited, or lives in a namespace this one cannot see).
fn pidfd_pid(fd: &OwnedFd) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let pid: i64 = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))?
        .trim()
        .parse()
        .ok()?;
    u32::try_from(pid).ok().filter(|p| *p > 0)
}

/// Opens a pidfd for `pid`, which must be this process's unreaped child
/// (so the number cannot have been reused).
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nobody else owns.
    Ok(unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(i32::try_from(fd).expect("an fd"))
    })
}

/// Starts hosts: which program to run, on which runtime their I/O lives,
/// where their deaths are reported, and the node's cgroups.
#[derive(Clone)]
pub struct Spawner {
    program: PathBuf,
    runtime: tokio::runtime::Handle,
    exits: mpsc::UnboundedSender<Exit>,
    resources: Arc<Resources>,
}

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawner")
            .field("program", &self.program)
            .finish_non_exhaustive()
    }
}

impl Spawner {
    /// Hosts run `program plugin-host …` (the plugvisor binary), their I/O
    /// on `runtime`; every unexpected death is sent to `exits`.
    pub fn new(
        program: PathBuf,
        runtime: tokio::runtime::Handle,
        exits: mpsc::UnboundedSender<Exit>,
        resources: Arc<Resources>,
    ) -> Spawner {
        Spawner {
            program,
            runtime,
            exits,
            resources,
        }
    }

    /// The node's cgroups for hosts.
    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// Hosts run this process's own binary (`/proc/self/exe`: still the
    /// right file after the package manager replaced it on disk).
    pub fn this_binary(
        runtime: tokio::runtime::Handle,
        exits: mpsc::UnboundedSender<Exit>,
        resources: Arc<Resources>,
    ) -> Spawner {
        Spawner::new(PathBuf::from("/proc/self/exe"), runtime, exits, resources)
    }

    /// The host's command line: `channel` becomes its fd 3, `object` (the
    /// library, opened here) its fd 4 and `control` its fd 5; it joins
    /// `join` (its cgroup's `cgroup.procs` files) before `exec`, or takes
    /// `rlimit_as`.
    fn command(
        &self,
        spec: &HostSpec,
        confinement: &Confinement,
        [channel, object, control]: [i32; 3],
        join: Vec<std::ffi::CString>,
        rlimit_as: Option<u64>,
    ) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.arg("plugin-host")
            .arg("--plugin")
            .arg(&spec.plugin)
            .arg("--version")
            .arg(spec.version.to_string())
            .arg("--abi")
            .arg(spec.abi.to_string())
            .arg("--sha256")
            .arg(&spec.sha256)
            .arg("--object")
            .arg(&spec.object)
            .stdin(Stdio::null());
        if let Some(u) = &confinement.run_as {
            cmd.arg("--uid")
                .arg(u.uid.to_string())
                .arg("--gid")
                .arg(u.gid.to_string());
        }
        // SAFETY: only async-signal-safe calls between fork and exec; every
        // buffer they use was made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // The fds were duplicated above 9 by the parent, so none
                // is clobbered by another's dup2; dup2 leaves the new fd
                // without close-on-exec.
                if libc::dup2(channel, 3) < 0
                    || libc::dup2(object, 4) < 0
                    || libc::dup2(control, 5) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                // Nothing else of the daemon's crosses: not its listening
                // sockets, not the admin socket, not inherited systemd fds.
                libc::syscall(libc::SYS_close_range, 6u32, u32::MAX, 0u32);
                // Its own process group: a Ctrl-C meant for the daemon
                // must not kill the hosts first and look like crashes.
                libc::setpgid(0, 0);
                for f in &join {
                    let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if n != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(bytes) = rlimit_as {
                    let lim = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &raw const lim) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    /// Says once, when a host serves, what it runs as and what holds it.
    fn log_serving(&self, conn: &Conn, confinement: &Confinement, dropped: &Dropped) {
        let limits = conn.cgroup.lock().expect("host lock").as_ref().map_or_else(
            || self.resources.mechanism(&confinement.limits),
            HostCgroup::mechanism,
        );
        tracing::info!(
            plugin = %conn.spec.plugin,
            version = %conn.spec.version,
            pid = conn.pid,
            uid = dropped.uid,
            user = confinement.run_as.as_ref().map_or("(the daemon's)", |u| u.name.as_str()),
            capabilities = format_args!("{:#x}", dropped.cap_eff),
            no_new_privs = dropped.no_new_privs,
            seccomp = dropped.seccomp,
            limits = limits.as_str(),
            "plugin host serving"
        );
    }

    /// Starts the host process: its channel, its control channel, its
    /// library's fd, its cgroup (or rlimit). Returns the daemon's ends of
    /// both channels.
    fn start_process(
        &self,
        spec: &HostSpec,
        confinement: &Confinement,
    ) -> Result<Started, LoadError> {
        let failed = |message: String| LoadError::HostFailed {
            plugin: spec.plugin.clone(),
            version: spec.version.to_string(),
            message,
        };
        let (ours, theirs) = StdStream::pair().map_err(|e| failed(format!("socketpair: {e}")))?;
        let (control, their_control) =
            Channel::pair().map_err(|e| failed(format!("control channel: {e}")))?;
        let object = std::fs::File::open(&spec.object)
            .map_err(|e| failed(format!("opening {}: {e}", spec.object.display())))?;
        let high = |fd: i32| {
            // SAFETY: duplicating an fd this function owns.
            let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            if d < 0 {
                Err(failed(format!("dup: {}", io::Error::last_os_error())))
            } else {
                // SAFETY: `d` is a new fd nothing else owns.
                Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(d) })
            }
        };
        // The originals close here: a copy of the host's end kept open in
        // the daemon would hide the host's death (no end of stream).
        let (theirs, object, their_control) = {
            let (t, o, c) = (theirs, object, their_control);
            (
                high(t.as_raw_fd())?,
                high(o.as_raw_fd())?,
                high(c.raw_fd())?,
            )
        };
        let cgroup = self
            .resources
            .create(&spec.plugin, &spec.version.to_string(), &confinement.limits)
            .map_err(|e| failed(format!("its cgroup: {e}")))?;
        let join = cgroup
            .as_ref()
            .map(HostCgroup::procs_files)
            .unwrap_or_default();
        let rlimit_as = if cgroup.is_none() {
            confinement.limits.memory_max
        } else {
            None
        };
        let cmd = self.command(
            spec,
            confinement,
            [
                theirs.as_raw_fd(),
                object.as_raw_fd(),
                their_control.as_raw_fd(),
            ],
            join,
            rlimit_as,
        );
        let _rt = self.runtime.enter();
        let child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", self.program.display())))?;
        drop((theirs, object, their_control));
        Ok(Started {
            calls: ours,
            control,
            child,
            cgroup,
        })
    }

    /// Spawns a host for `spec` and waits until its `init` returned, at
    /// most `init_timeout` (then the host is killed). Blocks the caller.
    pub fn spawn(
        &self,
        spec: &HostSpec,
        confinement: &Confinement,
        init_timeout: Duration,
        stuck: Arc<StuckCalls>,
    ) -> Result<(Host, LoadTimings), LoadError> {
        let failed = |message: String| LoadError::HostFailed {
            plugin: spec.plugin.clone(),
            version: spec.version.to_string(),
            message,
        };
        let Started {
            calls: mut ours,
            control,
            mut child,
            cgroup,
        } = self.start_process(spec, confinement)?;
        let pid = child.id().unwrap_or(0);
        let (reaped_tx, reaped_rx) = std::sync::mpsc::sync_channel(1);
        let conn = Arc::new(Conn::new(
            spec.clone(),
            pid,
            self.exits.clone(),
            stuck,
            cgroup,
            (control, fingerprint(confinement)),
            None,
        ));
        *conn.reaped_tx.lock().expect("host lock") = Some(reaped_tx);
        let reaper = conn.clone();
        self.runtime.spawn(async move {
            let status = child.wait().await.ok();
            reaper.reaped(status);
        });

        ours.set_read_timeout(Some(init_timeout))
            .map_err(|e| failed(e.to_string()))?;
        let first = wire::read_message(&mut ours);
        let died = |conn: &Conn| {
            let exit = reaped_rx
                .recv_timeout(EXIT_GRACE)
                .ok()
                .or_else(|| conn.reaped.get().cloned());
            LoadError::HostDied {
                plugin: spec.plugin.clone(),
                version: spec.version.to_string(),
                cause: exit.map_or_else(
                    || "it closed its channel".to_owned(),
                    |e| e.cause.to_string(),
                ),
            }
        };
        let timings = match first {
            Ok(Some(m)) if m.kind == Kind::Ready => {
                let r: wire::Ready = serde_json::from_slice(&m.payload)
                    .map_err(|e| failed(format!("unreadable ready message: {e}")))?;
                self.log_serving(&conn, confinement, &r.dropped);
                LoadTimings {
                    load: Duration::from_micros(r.load_us),
                    init: Duration::from_micros(r.init_us),
                }
            }
            Ok(Some(m)) if m.kind == Kind::LoadFailed => {
                conn.retired.store(true, Ordering::Release);
                return Err(serde_json::from_slice::<LoadError>(&m.payload).map_or_else(
                    |e| failed(format!("unreadable load error: {e}")),
                    |e| e.naming(&spec.object),
                ));
            }
            Ok(Some(m)) => {
                conn.kill(KILLED_NONE);
                return Err(failed(format!("said {:?} before it was ready", m.kind)));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                conn.kill(KILLED_INIT);
                return Err(LoadError::InitKilled {
                    plugin: spec.plugin.clone(),
                    version: spec.version.to_string(),
                    timeout: init_timeout,
                });
            }
            Ok(None) | Err(_) => return Err(died(&conn)),
        };
        let stream = ours
            .set_read_timeout(None)
            .and_then(|()| ours.set_nonblocking(true))
            .and_then(|()| tokio::net::UnixStream::from_std(ours))
            .map_err(|e| failed(e.to_string()))?;
        let (read, write) = stream.into_split();
        *conn.writer.lock().expect("host lock") = Some(write);
        conn.serving.store(true, Ordering::Release);
        crate::markers::plugvisor_host_serving(conn.pid);
        let reader = conn.clone();
        self.runtime.spawn(async move { reader.read(read).await });
        Ok((Host { conn }, timings))
    }

    /// Takes over a host the daemon this one replaces ran (see
    /// [`Host::second_stream`]) instead of starting one: no new process, no
    /// second `init`. The caller checked it [`fits`](Handed::fits).
    pub fn adopt(&self, handed: Handed, stuck: Arc<StuckCalls>) -> Result<Host, LoadError> {
        let Handed {
            about,
            calls,
            control,
            pidfd,
        } = handed;
        let failed = |message: String| LoadError::HostFailed {
            plugin: about.plugin.clone(),
            version: about.version.to_string(),
            message: format!("adopting its running host (pid {}): {message}", about.pid),
        };
        // The number as this process sees it: the old daemon's may differ
        // (another pid namespace), and an exited host has none.
        let pid = pidfd_pid(&pidfd).ok_or_else(|| failed("it has exited".into()))?;
        let spec = HostSpec {
            plugin: about.plugin.clone(),
            version: about.version.clone(),
            abi: about.abi,
            sha256: about.sha256.clone(),
            object: about.object.clone(),
        };
        let pidfd = Arc::new(pidfd);
        let conn = Arc::new(Conn::new(
            spec,
            pid,
            self.exits.clone(),
            stuck,
            about.cgroup.map(HostCgroup::adopt),
            (Channel::from_fd(control), about.confinement),
            Some(pidfd.clone()),
        ));
        // It has served all along.
        conn.serving.store(true, Ordering::Release);
        let _rt = self.runtime.enter();
        // A pidfd polls readable once its process has exited.
        // SAFETY: the registration holds one of the pidfd's `Arc`s, so the
        // fd stays open for as long as it is registered.
        let exited = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| failed(format!("watching its pidfd: {e}")))?;
        let stream = StdStream::from(calls);
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(stream))
            .map_err(|e| failed(e.to_string()))?;
        let (read, write) = stream.into_split();
        *conn.writer.lock().expect("host lock") = Some(write);
        let reaper = conn.clone();
        self.runtime.spawn(async move {
            let _ = exited.readable().await;
            // Not our child: its exit status is its parent's to read.
            reaper.reaped(None);
        });
        crate::markers::plugvisor_host_serving(conn.pid);
        let reader = conn.clone();
        self.runtime.spawn(async move { reader.read(read).await });
        tracing::info!(
            plugin = %conn.spec.plugin,
            version = %conn.spec.version,
            pid = conn.pid,
            "plugin host adopted from the daemon this one replaces: no new process, no second init"
        );
        Ok(Host { conn })
    }
}

impl Conn {
    /// A host's connection, not serving yet (`pidfd`: an adopted host's).
    fn new(
        spec: HostSpec,
        pid: u32,
        exits: mpsc::UnboundedSender<Exit>,
        stuck_gauge: Arc<StuckCalls>,
        cgroup: Option<HostCgroup>,
        (control, confinement): (Channel, String),
        pidfd: Option<Arc<OwnedFd>>,
    ) -> Conn {
        Conn {
            spec,
            pid,
            writer: Mutex::new(None),
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            killed: AtomicU8::new(KILLED_NONE),
            serving: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            stuck_gauge,
            exits,
            cgroup: Mutex::new(cgroup),
            reaped: OnceLock::new(),
            reaped_tx: Mutex::new(None),
            control: Mutex::new(Some(control)),
            confinement,
            pidfd,
            handed: AtomicBool::new(false),
        }
    }

    /// Delivers the host's answers until its stream ends.
    async fn read(self: Arc<Self>, read: OwnedReadHalf) {
        let mut r = tokio::io::BufReader::with_capacity(64 << 10, read);
        let mut header = [0u8; wire::HEADER];
        let ended = loop {
            if let Err(e) = r.read_exact(&mut header).await {
                break e;
            }
            let (len, id, kind) = match wire::parse_header(&header) {
                Ok(h) => h,
                Err(e) => break e,
            };
            let mut payload = vec![0u8; len];
            if let Err(e) = r.read_exact(&mut payload).await {
                break e;
            }
            let waiter = {
                let mut p = self.pending.lock().expect("host lock");
                let w = p.calls.remove(&id);
                if w.is_none() && p.stuck.remove(&id).is_some() {
                    // A call given up on answered at last: no longer stuck.
                    self.stuck_gauge.leave();
                }
                w
            };
            if let Some(w) = waiter {
                w.send(Reply::Message(kind, payload));
            }
        };
        {
            let mut p = self.pending.lock().expect("host lock");
            p.closed = true;
        }
        if ended.kind() != io::ErrorKind::UnexpectedEof {
            tracing::warn!(plugin = %self.spec.plugin, version = %self.spec.version, pid = self.pid, error = %ended, "reading from the plugin host failed; it is stopped");
        }
        // The stream ends when the host exits; one that closed its end
        // and lives on is of no use, and is made to exit (unless it is a
        // successor's now: `kill` leaves those alone).
        tokio::time::sleep(EXIT_GRACE).await;
        if self.reaped.get().is_none() {
            self.kill(KILLED_NONE);
        }
    }

    /// The reaper saw the host exit: every call still waiting is lost.
    fn reaped(&self, status: Option<std::process::ExitStatus>) {
        let cgroup = self.cgroup.lock().expect("host lock").take();
        if self.handed.load(Ordering::Acquire) {
            // A successor adopted it: its death, and its cgroup, are the
            // successor's to handle. Calls of ours still on it are lost.
            if let Some(cg) = cgroup {
                cg.hand_over();
            }
            let exit = Exit {
                plugin: self.spec.plugin.clone(),
                version: self.spec.version.clone(),
                sha256: self.spec.sha256.clone(),
                pid: self.pid,
                cause: status.map_or(Cause::Unknown, Cause::from_status),
                at: Instant::now(),
            };
            let _ = self.reaped.set(exit.clone());
            let calls = {
                let mut p = self.pending.lock().expect("host lock");
                p.closed = true;
                p.exit = Some(exit.clone());
                std::mem::take(&mut p.calls)
            };
            for (_, w) in calls {
                w.send(Reply::Lost(exit.clone()));
            }
            return;
        }
        let cause = match self.killed.load(Ordering::Acquire) {
            KILLED_HANG => Cause::Hang,
            KILLED_INIT => Cause::InitTimeout,
            _ => match status.map_or(Cause::Unknown, Cause::from_status) {
                // The kernel's own count says whether the OOM killer did it
                // (the only word on an adopted host, whose status is not
                // ours to read).
                Cause::Signal(libc::SIGKILL) | Cause::Unknown
                    if cgroup.as_ref().is_some_and(|c| c.oom_kills() > 0) =>
                {
                    Cause::Oom
                }
                c => c,
            },
        };
        if let Some(cg) = cgroup {
            // rmdir may have to wait for the kernel to let go of the pages.
            std::thread::spawn(move || drop(cg));
        }
        let exit = Exit {
            plugin: self.spec.plugin.clone(),
            version: self.spec.version.clone(),
            sha256: self.spec.sha256.clone(),
            pid: self.pid,
            cause,
            at: Instant::now(),
        };
        let _ = self.reaped.set(exit.clone());
        if let Some(tx) = self.reaped_tx.lock().expect("host lock").take() {
            let _ = tx.try_send(exit.clone());
        }
        let (calls, stuck) = {
            let mut p = self.pending.lock().expect("host lock");
            p.closed = true;
            p.exit = Some(exit.clone());
            (std::mem::take(&mut p.calls), std::mem::take(&mut p.stuck))
        };
        for _ in 0..stuck.len() {
            self.stuck_gauge.leave();
        }
        let lost = calls.len();
        for (_, w) in calls {
            w.send(Reply::Lost(exit.clone()));
        }
        let retired = self.retired.load(Ordering::Acquire);
        if retired || !self.serving.load(Ordering::Acquire) {
            // No one recovers from a death not reported: the kernel
            // forgets the host (again, if its drop already did).
            crate::markers::plugvisor_host_retired(self.pid);
            tracing::debug!(plugin = %exit.plugin, version = %exit.version, pid = exit.pid, cause = %exit.cause, "plugin host exited");
            return;
        }
        tracing::error!(
            plugin = %exit.plugin,
            version = %exit.version,
            pid = exit.pid,
            cause = %exit.cause,
            lost_calls = lost,
            stuck_calls = stuck.len(),
            "plugin host died; the calls in flight on it are lost, every connection stays open"
        );
        let _ = self.exits.send(exit);
    }

    fn kill(&self, why: u8) {
        if self.reaped.get().is_some() || self.pid == 0 || self.handed.load(Ordering::Acquire) {
            return;
        }
        if why != KILLED_NONE {
            let _ =
                self.killed
                    .compare_exchange(KILLED_NONE, why, Ordering::AcqRel, Ordering::Acquire);
        }
        if let Some(pidfd) = &self.pidfd {
            // Adopted: the pid may be reused once its parent reaps it; the
            // pidfd names this process and no other.
            // SAFETY: plain syscall on a pidfd we hold.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    pidfd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0u32,
                )
            };
            return;
        }
        // Not reaped yet, so the pid is still this host's (a zombie at worst).
        // SAFETY: plain syscall.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
    }

    fn register(&self, w: Waiter) -> Result<u64, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut p = self.pending.lock().expect("host lock");
        if p.closed {
            return Err(CallError::NotDelivered(p.exit.clone()));
        }
        p.calls.insert(id, w);
        Ok(id)
    }

    fn unregister(&self, id: u64) -> Option<Waiter> {
        self.pending.lock().expect("host lock").calls.remove(&id)
    }

    /// Writes one message; blocks only while the host's socket buffer is
    /// full, at most [`WRITE_STALL`], and kills a host that stays full.
    fn write(&self, id: u64, kind: Kind, payload: &[u8]) -> io::Result<()> {
        let w = self.writer.lock().expect("host lock");
        let Some(w) = w.as_ref() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let header = wire::header(id, kind, payload.len());
        if payload.len() <= 4096 {
            let mut buf = Vec::with_capacity(wire::HEADER + payload.len());
            buf.extend_from_slice(&header);
            buf.extend_from_slice(payload);
            self.write_all(w, &buf)
        } else {
            self.write_all(w, &header)?;
            self.write_all(w, payload)
        }
    }

    /// Writes all of `bytes` with `send(2)` on the raw fd — not tokio's
    /// `try_write`, which answers from its cached readiness: after a full
    /// buffer, or once the host is gone, it can say "would block" without
    /// asking the kernel while `poll` says ready, and a loop of the two
    /// spins. The kernel's own answer ends the loop either way.
    fn write_all(&self, w: &OwnedWriteHalf, mut bytes: &[u8]) -> io::Result<()> {
        let fd = w.as_ref().as_raw_fd();
        let deadline = Instant::now() + WRITE_STALL;
        while !bytes.is_empty() {
            // SAFETY: a valid buffer of that length; the fd is open while
            // `w` (borrowed) lives.
            let n = unsafe {
                libc::send(
                    fd,
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                bytes = &bytes[n as usize..];
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    let ready = unsafe { libc::poll(&raw mut pfd, 1, left.as_millis() as i32) };
                    if ready == 0 || left.is_zero() {
                        // Nothing read for WRITE_STALL: the host is frozen.
                        self.kill(KILLED_HANG);
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }

    /// Remembers a timed-out call; if it is still unanswered a grace later,
    /// the host is hung and is killed.
    fn abandon(self: &Arc<Self>, id: u64, timeout: Duration) {
        {
            let mut p = self.pending.lock().expect("host lock");
            if p.calls.remove(&id).is_none() {
                // Answered (or lost) just now: nothing is stuck.
                return;
            }
            p.stuck.insert(id, Instant::now());
        }
        self.stuck_gauge.enter();
        let conn = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(hang_grace(timeout)).await;
            let still = conn
                .pending
                .lock()
                .expect("host lock")
                .stuck
                .contains_key(&id);
            if still {
                tracing::warn!(
                    plugin = %conn.spec.plugin,
                    version = %conn.spec.version,
                    pid = conn.pid,
                    "a call is still stuck {:?} after its timeout: the host is hung and is killed (its threads and mapping are reclaimed)",
                    hang_grace(timeout)
                );
                conn.kill(KILLED_HANG);
            }
        });
    }
}

fn reply_to_result(r: Reply) -> Result<Vec<u8>, CallError> {
    match r {
        Reply::Message(Kind::Answer | Kind::HealthAnswer | Kind::DegradeAnswer, b) => Ok(b),
        Reply::Message(Kind::Panic, b) => Err(CallError::Plugin(HandleError::Panic(
            String::from_utf8_lossy(&b).into_owned(),
        ))),
        Reply::Message(_, b) => Err(CallError::Plugin(HandleError::Plugin(
            String::from_utf8_lossy(&b).into_owned(),
        ))),
        Reply::Lost(exit) => Err(CallError::Lost(exit)),
    }
}

impl Host {
    /// What the host uses, as the kernel counts it: its cgroup's totals,
    /// or its process's own from `/proc` on a node without cgroups.
    pub fn usage(&self) -> Usage {
        if self.conn.reaped.get().is_some() {
            return Usage::default();
        }
        match self.conn.cgroup.lock().expect("host lock").as_ref() {
            Some(cg) => cg.usage(),
            None => super::limits::proc_usage(self.conn.pid),
        }
    }

    /// What the host runs.
    pub fn spec(&self) -> &HostSpec {
        &self.conn.spec
    }

    /// The host's process id.
    pub fn pid(&self) -> u32 {
        self.conn.pid
    }

    /// How the host ended, once it has.
    pub fn exit(&self) -> Option<&Exit> {
        self.conn.reaped.get()
    }

    /// Sends one request to `handle` and waits at most `timeout`.
    pub async fn handle(&self, request: &[u8], timeout: Duration) -> Result<Vec<u8>, CallError> {
        let (tx, rx) = oneshot::channel();
        let id = self.conn.register(Waiter::Async(tx))?;
        if let Err(_e) = self.conn.write(id, Kind::Handle, request) {
            self.conn.unregister(id);
            return Err(CallError::NotDelivered(self.conn.reaped.get().cloned()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => reply_to_result(r),
            // The waiter went without an answer: only a death does that,
            // and a death answers first; treat it as one.
            Ok(Err(_)) => Err(CallError::NotDelivered(self.conn.reaped.get().cloned())),
            Err(_) => {
                self.conn.abandon(id, timeout);
                Err(CallError::TimedOut)
            }
        }
    }

    /// A call that blocks the calling thread (health and degrade hooks,
    /// from the daemon's synchronous paths).
    fn call_blocking(
        &self,
        kind: Kind,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let id = self.conn.register(Waiter::Blocking(tx))?;
        if self.conn.write(id, kind, payload).is_err() {
            self.conn.unregister(id);
            return Err(CallError::NotDelivered(self.conn.reaped.get().cloned()));
        }
        if let Ok(r) = rx.recv_timeout(timeout) {
            reply_to_result(r)
        } else {
            self.conn.unregister(id);
            Err(CallError::TimedOut)
        }
    }

    /// The plugin's own health verdict; a dead or silent host is unhealthy.
    pub fn healthy(&self, timeout: Duration) -> bool {
        self.call_blocking(Kind::Health, &[], timeout)
            .is_ok_and(|b| b.first() == Some(&1))
    }

    /// Calls the plugin's degrade hook: `None` if it has none (or the host
    /// did not answer), else whether it worked.
    pub fn degrade(&self, level: u32, timeout: Duration) -> Option<bool> {
        match self
            .call_blocking(Kind::Degrade, &level.to_le_bytes(), timeout)
            .ok()?
            .first()
        {
            Some(&wire::DEGRADE_OK) => Some(true),
            Some(&wire::DEGRADE_FAILED) => Some(false),
            _ => None,
        }
    }

    /// Kills the host now (an operator's or a test's way to make it die).
    pub fn kill(&self) {
        self.conn.kill(KILLED_NONE);
    }

    /// Asks the host for a second call stream and control channel, for
    /// the daemon that replaces this one: the host serves both streams
    /// from then on, and lives until both have closed. Blocks the caller
    /// (at most [`ADOPT_TIMEOUT`]). Until [`Host::handed_over`] this daemon
    /// still owns the host; if the successor never starts, its stream
    /// simply closes.
    pub fn second_stream(&self) -> Result<Handed, String> {
        if self.conn.reaped.get().is_some() {
            return Err("it has exited".into());
        }
        let pidfd = match &self.conn.pidfd {
            Some(fd) => crate::handover::duplicate(std::os::fd::AsFd::as_fd(&**fd)),
            // Our unreaped child: the pid is still its own.
            None => pidfd_open(self.conn.pid),
        }
        .map_err(|e| format!("pidfd: {e}"))?;
        let (calls, theirs) = StdStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        let (control, their_control) = Channel::pair().map_err(|e| e.to_string())?;
        let mut guard = self.conn.control.lock().expect("host lock");
        let Some(channel) = guard.as_mut() else {
            return Err("its control channel is closed".into());
        };
        let asked = channel.send(
            &Message::Adopt,
            &[],
            &[std::os::fd::AsFd::as_fd(&theirs), their_control.as_fd()],
        );
        drop((theirs, their_control));
        let answer = asked.and_then(|()| channel.recv(Some(ADOPT_TIMEOUT)));
        match answer {
            Ok(r) if matches!(r.message, Message::Adopted { .. }) => {}
            Ok(r) => return Err(format!("it answered {:?}", r.message)),
            Err(e) => {
                // A control channel that failed once is not trusted again.
                *guard = None;
                return Err(e.to_string());
            }
        }
        drop(guard);
        let cgroup = self
            .conn
            .cgroup
            .lock()
            .expect("host lock")
            .as_ref()
            .map(HostCgroup::place);
        Ok(Handed {
            about: HandedAbout {
                plugin: self.conn.spec.plugin.clone(),
                version: self.conn.spec.version.clone(),
                abi: self.conn.spec.abi,
                sha256: self.conn.spec.sha256.clone(),
                object: self.conn.spec.object.clone(),
                pid: self.conn.pid,
                wire: wire::VERSION,
                confinement: self.conn.confinement.clone(),
                cgroup,
            },
            calls: calls.into(),
            control: control.into_fd(),
            pidfd,
        })
    }

    /// The successor serves with this host (it adopted it, or closed the
    /// stream it was given and the host ends with ours): from now on this
    /// daemon neither kills it, nor reports its death, nor removes its
    /// cgroup. Calls still in flight on our stream are answered as before.
    pub fn handed_over(&self) {
        self.conn.handed.store(true, Ordering::Release);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.conn.handed.load(Ordering::Acquire) {
            // A successor's now: closing our stream leaves it serving theirs.
            drop(self.conn.writer.lock().expect("host lock").take());
            if let Some(cg) = self.conn.cgroup.lock().expect("host lock").take() {
                cg.hand_over();
            }
            return;
        }
        // Last reference gone: no call can be in flight. Closing our end
        // tells the host to run `shutdown` and exit; one that does not is
        // killed.
        self.conn.retired.store(true, Ordering::Release);
        let dead = self.conn.reaped.get().is_some();
        if !dead {
            // Before it is told to stop: its exit is no crash. (A dead
            // one's is the daemon's to judge: it tells the kernel whether
            // anything recovers from it.)
            crate::markers::plugvisor_host_retired(self.conn.pid);
        }
        drop(self.conn.writer.lock().expect("host lock").take());
        if dead {
            return;
        }
        let conn = self.conn.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(EXIT_GRACE).await;
                conn.kill(KILLED_NONE);
            });
        }
    }
}
