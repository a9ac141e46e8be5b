//! The sockets plugvisor owns. Bound once at start, never closed by a
//! reload; each hands frames to its plugin's [`crate::slot::Slot`] and
//! knows nothing of the loader, the store or the catalog.
pub mod grpc;
mod h2_written;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
}

/// Binds every configured listener; any failure refuses the start.
pub fn bind_all(configs: &[ListenerConfig]) -> Result<Vec<Bound>, BindError> {
    let mut out = Vec::with_capacity(configs.len());
    for c in configs {
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
        });
    }
    Ok(out)
}

/// Starts listening on `bound` and serving it on `slot` until `shutdown`
/// flips to true; the task ends when the listener has drained, or `drain`
/// after `shutdown` at the latest.
pub fn spawn(
    bound: Bound,
    slot: Arc<Slot>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    drain: Duration,
) -> Result<tokio::task::JoinHandle<()>, StartError> {
    let Bound {
        config,
        socket,
        local_addr,
    } = bound;
    let listener = socket.listen(BACKLOG).map_err(|source| BindError {
        name: config.name.clone(),
        addr: local_addr,
        source,
    })?;
    Ok(match config.protocol {
        Protocol::Tcp => tokio::spawn(tcp::serve(
            listener,
            config.name,
            slot,
            shutdown,
            drain,
            config.request_timeout,
        )),
        Protocol::Grpc => {
            // Assembled before spawning so a failure refuses the start
            // instead of leaving a dead listener behind.
            let server =
                grpc::Server::new(config.name, slot, shutdown.clone(), config.request_timeout)?;
            tokio::spawn(server.serve(listener, shutdown, drain))
        }
    })
}
