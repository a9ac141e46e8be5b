//! The sockets plugvisor owns. Bound once at start, never closed by a
//! reload; each hands frames to its plugin's [`crate::slot::Slot`] and
//! knows nothing of the loader, the store or the catalog.
//!
//! A listening socket may also come from elsewhere ([`Inherited`]): from
//! the process this one replaces (`plugvisor upgrade`) or from the service
//! manager (socket activation). It is used as it is, so connections
//! waiting in its backlog are accepted here and none is refused.
pub mod grpc;
mod h2_written;
pub mod handoff;
pub mod tcp;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{ListenerConfig, Protocol};
use crate::slot::Slot;

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("listener {name:?}: binding {addr}: {source}")]
pub struct BindError {
    /// Listener name.
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// The I/O error.
    pub source: std::io::Error,
}

/// Why a bound listener could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `listen(2)` failed.
    #[error(transparent)]
    Listen(#[from] BindError),
    /// The gRPC services could not be assembled.
    #[error(transparent)]
    Grpc(#[from] grpc::GrpcError),
}

/// Backlog of each listening socket.
const BACKLOG: u32 = 1024;

/// Listening sockets this process did not create, by listener name.
pub type Inherited = BTreeMap<String, OwnedFd>;

/// A bound listener, not yet accepting connections.
///
/// Binding and listening are two steps so the kernel probes can learn the
/// port (which may have been 0 in the config) and attach before the first
/// connection can be established: every connection is then seen from its
/// first state change, and the kernel's count starts exact.
pub struct Bound {
    /// Its configuration.
    pub config: ListenerConfig,
    /// The socket (bound, not listening).
    pub socket: tokio::net::TcpSocket,
    /// The address actually bound (port 0 resolved).
    pub local_addr: SocketAddr,
    /// Whether the socket was inherited (already listening) rather than
    /// bound here.
    pub inherited: bool,
}

/// Whether a socket bound at `actual` serves a listener configured at
/// `wanted` (port 0: any port).
pub fn serves(wanted: SocketAddr, actual: SocketAddr) -> bool {
    wanted.ip() == actual.ip() && (wanted.port() == 0 || wanted.port() == actual.port())
}

/// An inherited socket as a tokio socket, if it is a TCP socket bound where
/// `config` wants it; otherwise says why not (and the socket closes).
fn adopt_socket(
    config: &ListenerConfig,
    fd: OwnedFd,
) -> Option<(tokio::net::TcpSocket, SocketAddr)> {
    // tokio needs non-blocking sockets; a service manager's may not be.
    if let Err(e) = set_nonblocking(&fd) {
        tracing::warn!(listener = %config.name, error = %e, "inherited socket unusable; binding anew");
        return None;
    }
    // SAFETY: the fd is ours (moved in) and open; TcpSocket takes it over.
    let socket = unsafe { tokio::net::TcpSocket::from_raw_fd(fd.into_raw_fd()) };
    match socket.local_addr() {
        Ok(addr) if serves(config.bind, addr) => Some((socket, addr)),
        Ok(addr) => {
            tracing::warn!(listener = %config.name, inherited = %addr, configured = %config.bind, "the inherited socket is bound elsewhere than the config says; binding anew");
            None
        }
        Err(e) => {
            tracing::warn!(listener = %config.name, error = %e, "inherited socket is not a TCP socket; binding anew");
            None
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only touch the descriptor's status flags.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Binds every configured listener, taking an inherited socket where one
/// of the listener's name is bound where the config says; any failure
/// refuses the start. Inherited sockets no listener took are closed.
pub fn bind_all(
    configs: &[ListenerConfig],
    mut inherited: Inherited,
) -> Result<Vec<Bound>, BindError> {
    let mut out = Vec::with_capacity(configs.len());
    for c in configs {
        if let Some((socket, local_addr)) =
            inherited.remove(&c.name).and_then(|fd| adopt_socket(c, fd))
        {
            out.push(Bound {
                config: c.clone(),
                socket,
                local_addr,
                inherited: true,
            });
            continue;
        }
        let err = |source| BindError {
            name: c.name.clone(),
            addr: c.bind,
            source,
        };
        let socket = if c.bind.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(err)?;
        socket.set_reuseaddr(true).map_err(err)?;
        socket.bind(c.bind).map_err(err)?;
        let local_addr = socket.local_addr().map_err(err)?;
        out.push(Bound {
            config: c.clone(),
            socket,
            local_addr,
            inherited: false,
        });
    }
    for name in inherited.keys() {
        tracing::warn!(listener = %name, "an inherited socket names no configured listener; closed");
    }
    Ok(out)
}

/// A listener serving: its task, and a duplicate of its listening socket
/// to offer the process that replaces this one.
pub struct Running {
    /// Its configuration.
    pub config: ListenerConfig,
    /// The serving task; it ends when the listener has drained.
    pub task: tokio::task::JoinHandle<()>,
    /// The listening socket (a duplicate; the task holds the original).
    pub socket: OwnedFd,
}

/// What a listener serves with besides its socket and slot.
pub struct Extras {
    /// Where its raw TCP connections go on an upgrade.
    pub hand_off: handoff::HandOff,
    /// Raw TCP connections the replaced process hands to this one.
    pub adopted: Option<mpsc::UnboundedReceiver<handoff::Adopted>>,
}

/// Starts listening on `bound` and serving it on `slot` until `shutdown`
/// flips to true; the task ends when the listener has drained, or `drain`
/// after `shutdown` at the latest.
pub fn spawn(
    bound: Bound,
    slot: Arc<Slot>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
    extras: Extras,
) -> Result<Running, StartError> {
    let Bound {
        config,
        socket,
        local_addr,
        inherited: _,
    } = bound;
    let listen_err = |source| BindError {
        name: config.name.clone(),
        addr: local_addr,
        source,
    };
    // listen(2) again on an inherited socket only sets its backlog.
    let listener = socket.listen(BACKLOG).map_err(listen_err)?;
    let dup = listener.as_fd().try_clone_to_owned().map_err(listen_err)?;
    let task = match config.protocol {
        Protocol::Tcp => tokio::spawn(tcp::serve(
            listener,
            tcp::Serving {
                name: config.name.clone(),
                slot,
                shutdown,
                drain,
                request_timeout: config.request_timeout,
                hand_off: extras.hand_off,
                adopted: extras.adopted,
            },
        )),
        Protocol::Grpc => {
            // Assembled before spawning so a failure refuses the start
            // instead of leaving a dead listener behind.
            let server = grpc::Server::new(
                config.name.clone(),
                slot,
                shutdown.clone(),
                config.request_timeout,
            )?;
            tokio::spawn(server.serve(listener, shutdown, drain))
        }
    };
    Ok(Running {
        config,
        task,
        socket: dup,
    })
}
