//! The channel between a running plugvisor and the binary that replaces it
//! (`plugvisor upgrade`, `SIGUSR2`): what crosses it, and how file
//! descriptors cross with it.
//!
//! The model is the one HAProxy, nginx, Envoy and shellflip share — the old
//! process hands its listening sockets to the new one, so the kernel's
//! backlog is never without an owner and no connect is refused — plus one
//! step they do not take: plugvisor owns its raw TCP connections and holds
//! nothing per connection but a read buffer, so it moves them too, at a
//! frame boundary, with the bytes it had read and not yet answered.
//!
//! The channel is a `SOCK_SEQPACKET` unix socket pair: each message keeps
//! its boundary and carries its descriptors (`SCM_RIGHTS`) with it, so a
//! connection's fd and its pending bytes cannot be paired wrongly. The new
//! process finds its end through [`UPGRADE_FD_ENV`]. One conversation:
//!
//! 1. old → new: [`Message::Offer`] with every listening socket (TCP
//!    listeners by name, the metrics endpoint, the admin socket) and, on a
//!    binary upgrade, a second channel into each plugin host;
//! 2. new → old: [`Message::Ready`] once it serves (or it exits, or the old
//!    one gives up after its timeout and serves on);
//! 3. old → new: one [`Message::Connection`] per raw TCP connection, as each
//!    reaches a frame boundary, then [`Message::Done`].
//!
//! A plugin host's control channel is a channel of the same kind: the
//! daemon sends it [`Message::Adopt`] with a new call stream and a new
//! control channel, the host answers [`Message::Adopted`] once it serves
//! that stream too, and the daemon offers both to its successor. Two
//! daemons never write one stream: each has its own into the host.
//!
//! Blocking calls: each side runs them on a thread of its own.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The environment variable that tells a new process which inherited fd is
/// its end of the hand-over channel.
pub const UPGRADE_FD_ENV: &str = "PLUGVISOR_UPGRADE_FD";

/// Largest message: a connection's pending bytes (a partial frame of up to
/// 64 KiB, what its read buffer held, and what an earlier hand-over left
/// unread) and a header. Well under the socket's default send buffer.
pub const MAX_MESSAGE: usize = 160 * 1024;

/// Most descriptors in one message (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// What crosses the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Message {
    /// The old process's listening sockets, in the order of the message's
    /// descriptors.
    Offer {
        /// The old process's pid.
        pid: u32,
        /// One per descriptor.
        sockets: Vec<Offered>,
        /// Plugin hosts the new process may adopt, as the host module
        /// describes them; three descriptors each (a call stream, a
        /// control channel, a pidfd), after the sockets'. Absent from an
        /// offer of a binary that adopts none.
        #[serde(default)]
        hosts: Vec<serde_json::Value>,
    },
    /// The new process serves.
    Ready {
        /// Its pid.
        pid: u32,
        /// The old process's pids of the plugin hosts it adopted: the old
        /// process leaves those running when it exits.
        #[serde(default)]
        adopted: Vec<u32>,
    },
    /// A raw TCP connection (the message's one descriptor), at a frame
    /// boundary; the message's payload is what was read from it and not
    /// yet answered.
    Connection {
        /// The listener it was accepted on.
        listener: String,
    },
    /// Every connection has been sent.
    Done {
        /// How many.
        connections: u64,
    },
    /// Daemon → plugin host, on the host's control channel: serve calls on
    /// the message's first descriptor as well, and take its second as a
    /// control channel of its own (what a successor daemon will hold).
    Adopt,
    /// Plugin host → daemon: it serves the stream an [`Message::Adopt`]
    /// gave it.
    Adopted {
        /// The host's pid.
        pid: u32,
    },
}

/// One listening socket in an [`Message::Offer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Offered {
    /// A `[[listener]]`, by name.
    Listener {
        /// Its name.
        name: String,
    },
    /// The `/metrics` endpoint.
    Metrics,
    /// The admin unix socket.
    Admin,
}

/// A message as received, with its payload and descriptors.
#[derive(Debug)]
pub struct Received {
    /// The message.
    pub message: Message,
    /// Bytes that came after it.
    pub payload: Vec<u8>,
    /// The descriptors it carried, close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// Why the hand-over channel failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A system call on the channel failed.
    #[error("hand-over channel: {action}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The peer sent something this side does not understand.
    #[error("hand-over channel: {0}")]
    Protocol(String),
    /// Nothing arrived in time.
    #[error("hand-over channel: nothing from the other process in {0:?}")]
    Timeout(Duration),
    /// The other process closed its end.
    #[error("hand-over channel: the other process closed it")]
    Closed,
}

fn io_err(action: &'static str) -> impl FnOnce(io::Error) -> HandoverError {
    move |source| HandoverError::Io { action, source }
}

/// One end of the channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    /// Where messages are received (kept: one message per connection).
    buf: Vec<u8>,
}

impl Channel {
    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> Result<(Channel, Channel), HandoverError> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, which we own.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io_err("socketpair")(io::Error::last_os_error()));
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Channel::new(a), Channel::new(b)))
    }

    /// The channel a replacing process was started with, if it was:
    /// [`UPGRADE_FD_ENV`] names the fd. Takes it (close-on-exec from now on,
    /// so a plugin host never inherits it) and clears the variable.
    pub fn from_env() -> Result<Option<Channel>, HandoverError> {
        let Some(value) = std::env::var_os(UPGRADE_FD_ENV) else {
            return Ok(None);
        };
        // SAFETY: called at start, before other threads read the environment.
        unsafe { std::env::remove_var(UPGRADE_FD_ENV) };
        let fd: RawFd = value.to_str().and_then(|v| v.parse().ok()).ok_or_else(|| {
            HandoverError::Protocol(format!(
                "{UPGRADE_FD_ENV}={} is not an fd number",
                value.display()
            ))
        })?;
        // SAFETY: F_GETFD only reads flags; a closed fd fails with EBADF.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(HandoverError::Protocol(format!(
                "{UPGRADE_FD_ENV}={fd} is not an open descriptor"
            )));
        }
        // SAFETY: the old process passed this fd to us for this purpose
        // alone; nothing else in this process refers to it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_cloexec(fd.as_raw_fd(), true).map_err(io_err("setting close-on-exec"))?;
        Ok(Some(Channel::new(fd)))
    }

    /// A channel on a `SOCK_SEQPACKET` socket this process holds (one it
    /// was passed, or inherited).
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel::new(fd)
    }

    /// The channel's socket, to pass on (and close here).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    fn new(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            buf: Vec::new(),
        }
    }

    /// The raw fd, to be inherited by the new process (see
    /// [`set_cloexec`]).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The channel's socket, to pass it on to another process.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// Sends one message with `payload` after it and `fds` attached.
    pub fn send(
        &self,
        message: &Message,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), HandoverError> {
        if fds.len() > MAX_FDS {
            return Err(HandoverError::Protocol(format!(
                "{} descriptors in one message (at most {MAX_FDS})",
                fds.len()
            )));
        }
        let header = serde_json::to_vec(message).expect("messages serialise");
        let mut buf = Vec::with_capacity(4 + header.len() + payload.len());
        buf.extend_from_slice(
            &u32::try_from(header.len())
                .expect("small header")
                .to_le_bytes(),
        );
        buf.extend_from_slice(&header);
        buf.extend_from_slice(payload);
        if buf.len() > MAX_MESSAGE {
            return Err(HandoverError::Protocol(format!(
                "a message of {} bytes (at most {MAX_MESSAGE})",
                buf.len()
            )));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let fd_bytes = std::mem::size_of_val(raw.as_slice());
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(u32::try_from(fd_bytes).expect("few fds")) } as usize;
        let mut control = vec![0u8; if raw.is_empty() { 0 } else { space }];
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len();
            // SAFETY: the control buffer is CMSG_SPACE(fd_bytes) long, so the
            // first header and its data fit.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len =
                    libc::CMSG_LEN(u32::try_from(fd_bytes).expect("few fds")) as usize;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    fd_bytes,
                );
            }
        }
        loop {
            // SAFETY: msg points at live buffers for the duration of the call.
            let n =
                unsafe { libc::sendmsg(self.fd.as_raw_fd(), &raw const msg, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    return Err(HandoverError::Closed);
                }
                _ => return Err(io_err("sendmsg")(e)),
            }
        }
    }

    /// Waits up to `timeout` (`None`: for ever) for the next message.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Received, HandoverError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let wait_ms = deadline.map_or(-1, |d| {
                i32::try_from(d.saturating_duration_since(Instant::now()).as_millis())
                    .unwrap_or(i32::MAX)
            });
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&raw mut pfd, 1, wait_ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("poll")(e));
            }
            if rc == 0 {
                return Err(HandoverError::Timeout(timeout.unwrap_or_default()));
            }
            break;
        }
        self.buf.resize(MAX_MESSAGE, 0);
        let buf = &mut self.buf;
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe {
            libc::CMSG_SPACE(u32::try_from(MAX_FDS * std::mem::size_of::<RawFd>()).expect("small"))
        } as usize;
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        let n = loop {
            // SAFETY: msg points at live buffers for the duration of the call.
            let n =
                unsafe { libc::recvmsg(self.fd.as_raw_fd(), &raw mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break usize::try_from(n).expect("non-negative");
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("recvmsg")(e));
            }
        };
        let fds = take_fds(&msg);
        if n == 0 {
            return Err(HandoverError::Closed);
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(HandoverError::Protocol(
                "a message or its descriptors were truncated".into(),
            ));
        }
        let buf = &buf[..n];
        let Some(len) = buf
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .filter(|len| 4 + len <= n)
        else {
            return Err(HandoverError::Protocol(format!(
                "a message of {n} bytes has no header"
            )));
        };
        let message = serde_json::from_slice(&buf[4..4 + len])
            .map_err(|e| HandoverError::Protocol(format!("unreadable message: {e}")))?;
        let payload = buf[4 + len..].to_vec();
        Ok(Received {
            message,
            payload,
            fds,
        })
    }
}

/// A `sockaddr_un` for `path`, and its length.
fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt as _;
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or with a NUL byte",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, libc::socklen_t::try_from(len).expect("short path")))
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Channel {
    /// Connects to a running plugvisor waiting at `path` (`[upgrade]
    /// socket`); `None` when nobody listens there (no such file, or a
    /// stale one).
    pub fn connect(path: &Path) -> Result<Option<Channel>, HandoverError> {
        let fd = seqpacket_socket().map_err(io_err("socket"))?;
        let (addr, len) = unix_addr(path).map_err(io_err("the upgrade socket's path"))?;
        // SAFETY: addr is a valid sockaddr_un of length len.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        if rc == 0 {
            return Ok(Some(Channel::new(fd)));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT | libc::ECONNREFUSED) => Ok(None),
            _ => Err(io_err("connecting to the running plugvisor")(e)),
        }
    }
}

/// Where a running plugvisor waits for the process that replaces it
/// (`[upgrade] socket`): a `SOCK_SEQPACKET` unix socket, mode 0600, whose
/// clients must be root or the daemon's own user.
#[derive(Debug)]
pub struct Waiting {
    fd: OwnedFd,
}

impl Waiting {
    /// Binds `path`, replacing what is there (the previous process's
    /// socket, once it has handed over).
    pub fn bind(path: &Path) -> Result<Waiting, HandoverError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(io_err("creating the upgrade socket's directory"))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing the old upgrade socket")(e)),
        }
        let fd = seqpacket_socket().map_err(io_err("socket"))?;
        let (addr, len) = unix_addr(path).map_err(io_err("the upgrade socket's path"))?;
        // SAFETY: umask is process-wide; set around bind alone, so the
        // socket never exists with wider access.
        let old = unsafe { libc::umask(0o177) };
        // SAFETY: addr is a valid sockaddr_un of length len.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        if rc != 0 {
            return Err(io_err("binding the upgrade socket")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: listen(2) on our socket.
        if unsafe { libc::listen(fd.as_raw_fd(), 4) } != 0 {
            return Err(io_err("listening on the upgrade socket")(
                io::Error::last_os_error(),
            ));
        }
        Ok(Waiting { fd })
    }

    /// Waits for the next process that wants to take over; refuses (closes)
    /// one that is neither root nor this process's user.
    pub fn accept(&self) -> Result<Channel, HandoverError> {
        loop {
            // SAFETY: accept4 on our listening socket; no address wanted.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("accepting on the upgrade socket")(e));
            }
            // SAFETY: a new descriptor from accept4, ours alone.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            match peer_uid(&fd) {
                // SAFETY: geteuid has no preconditions.
                Ok(uid) if uid == 0 || uid == unsafe { libc::geteuid() } => {
                    return Ok(Channel::new(fd));
                }
                other => tracing::warn!(
                    peer = ?other.ok(),
                    "upgrade socket: refused a process that is neither root nor the daemon's user"
                ),
            }
        }
    }
}

fn peer_uid(fd: &OwnedFd) -> io::Result<u32> {
    // SAFETY: a zeroed ucred is valid; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).expect("small");
    // SAFETY: SO_PEERCRED into a ucred of the given length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cred.uid)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The descriptors in a received message's `SCM_RIGHTS`, owned.
fn take_fds(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut out = Vec::new();
    // SAFETY: walks the control buffer the kernel filled, by its own
    // headers; each fd in SCM_RIGHTS is new in this process and ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                let count = bytes / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let mut raw = [0u8; std::mem::size_of::<RawFd>()];
                    std::ptr::copy_nonoverlapping(
                        data.add(i * raw.len()),
                        raw.as_mut_ptr(),
                        raw.len(),
                    );
                    let fd = RawFd::from_ne_bytes(raw);
                    out.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    out
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only touch the descriptor's flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A close-on-exec duplicate of `fd`, owned: what a listener keeps of its
/// socket so it can offer it while the socket itself serves in a task.
pub fn duplicate(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn messages_carry_payload_and_descriptors() {
        let (a, mut b) = Channel::pair().unwrap();
        let (mut x, y) = std::os::unix::net::UnixStream::pair().unwrap();
        a.send(
            &Message::Connection {
                listener: "echo-tcp".into(),
            },
            b"half a fra",
            &[y.as_fd()],
        )
        .unwrap();
        drop(y);
        let got = b.recv(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            got.message,
            Message::Connection {
                listener: "echo-tcp".into()
            }
        );
        assert_eq!(got.payload, b"half a fra");
        assert_eq!(got.fds.len(), 1);
        // The descriptor that arrived is the same socket: what is written
        // to it reaches the other end of the pair.
        let mut moved = std::os::unix::net::UnixStream::from(got.fds.into_iter().next().unwrap());
        moved.write_all(b"hi").unwrap();
        let mut two = [0u8; 2];
        x.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"hi");
    }

    #[test]
    fn boundaries_hold_and_a_closed_end_is_told() {
        let (a, mut b) = Channel::pair().unwrap();
        a.send(
            &Message::Ready {
                pid: 7,
                adopted: vec![],
            },
            &[],
            &[],
        )
        .unwrap();
        a.send(&Message::Done { connections: 3 }, &[], &[]).unwrap();
        assert_eq!(
            b.recv(None).unwrap().message,
            Message::Ready {
                pid: 7,
                adopted: vec![]
            }
        );
        let done = b.recv(None).unwrap();
        assert_eq!(done.message, Message::Done { connections: 3 });
        assert!(done.payload.is_empty() && done.fds.is_empty());
        assert!(matches!(
            b.recv(Some(Duration::from_millis(20))),
            Err(HandoverError::Timeout(_))
        ));
        drop(a);
        assert!(matches!(b.recv(None), Err(HandoverError::Closed)));
    }

    #[test]
    fn a_waiting_daemon_is_found_at_its_path_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("upgrade.sock");
        assert!(Channel::connect(&path).unwrap().is_none());
        let waiting = Waiting::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let client = Channel::connect(&path).unwrap().expect("someone waits");
        let mut served = waiting.accept().unwrap();
        client
            .send(
                &Message::Ready {
                    pid: 1,
                    adopted: vec![],
                },
                &[],
                &[],
            )
            .unwrap();
        assert_eq!(
            served.recv(None).unwrap().message,
            Message::Ready {
                pid: 1,
                adopted: vec![]
            }
        );
        // Closed: the path is stale, and nobody is found there.
        drop(waiting);
        assert!(Channel::connect(&path).unwrap().is_none());
    }

    #[test]
    fn an_oversized_message_is_refused_before_it_is_sent() {
        let (a, _b) = Channel::pair().unwrap();
        let big = vec![b'x'; MAX_MESSAGE];
        assert!(matches!(
            a.send(&Message::Done { connections: 0 }, &big, &[]),
            Err(HandoverError::Protocol(_))
        ));
    }
}
