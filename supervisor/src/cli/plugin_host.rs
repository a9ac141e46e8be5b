//! `plugvisor plugin-host …` (hidden): the process one plugin version runs
//! in when its plugin is configured `isolation = "process"`. Started only
//! by the daemon, with its channel as fd 3; see [`crate::host`].
use std::os::fd::FromRawFd as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use semver::Version;

use crate::host::{HostSpec, child};

/// The fd the daemon hands the host its channel on.
const CHANNEL_FD: i32 = 3;

/// What the daemon tells a host to load.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The plugin.
    #[arg(long)]
    pub plugin: String,
    /// Its version.
    #[arg(long)]
    pub version: Version,
    /// The manifest's ABI.
    #[arg(long)]
    pub abi: u32,
    /// The object's sha256.
    #[arg(long)]
    pub sha256: String,
    /// The object in the store (for messages: the host reads it from the
    /// fd the daemon opened, [`OBJECT_FD`]).
    #[arg(long)]
    pub object: PathBuf,
    /// The uid to run as (with `--gid`).
    #[arg(long, requires = "gid")]
    pub uid: Option<u32>,
    /// The gid to run as.
    #[arg(long, requires = "uid")]
    pub gid: Option<u32>,
}

/// The fd the daemon hands the library on: the host needs no access to
/// the store.
const OBJECT_FD: i32 = 4;

/// The fd of the host's control channel (see [`crate::host::child`]).
const CONTROL_FD: i32 = 5;

/// Runs the host until the daemon lets go of it.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let spec = HostSpec {
        plugin: args.plugin,
        version: args.version,
        abi: args.abi,
        sha256: args.sha256,
        object: args.object,
    };
    // SAFETY: fd 3 is the channel the daemon set up for this process
    // (checked: it is a socket, else this was not started by a daemon).
    let fd_kind = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        (libc::fstat(CHANNEL_FD, &raw mut st) == 0).then_some(st.st_mode & libc::S_IFMT)
    };
    anyhow::ensure!(
        fd_kind == Some(libc::S_IFSOCK),
        "plugin-host is started by the plugvisor daemon, with its channel as fd {CHANNEL_FD}; it is not for use by hand"
    );
    // SAFETY: fd 3 is ours (see above) and nothing else owns it.
    let stream = unsafe { UnixStream::from_raw_fd(CHANNEL_FD) };
    // SAFETY: F_GETFD only reads flags. fd 5, when open, is the control
    // channel the daemon set up; nothing else in this process owns it.
    let control = (unsafe { libc::fcntl(CONTROL_FD, libc::F_GETFD) } >= 0).then(|| {
        // SAFETY: see above.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(CONTROL_FD) };
        let _ = crate::handover::set_cloexec(CONTROL_FD, true);
        crate::handover::Channel::from_fd(fd)
    });
    let object = PathBuf::from(format!("/proc/self/fd/{OBJECT_FD}"));
    child::serve(&spec, &object, args.uid.zip(args.gid), stream, control)
        .with_context(|| format!("plugin host of {} {}", spec.plugin, spec.version))?;
    Ok(ExitCode::SUCCESS)
}
