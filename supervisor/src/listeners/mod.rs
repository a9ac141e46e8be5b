//! The sockets plugvisor owns. Bound once at start, never closed by a
//! reload; each hands frames to its plugin's [`crate::slot::Slot`] and
//! knows nothing of the loader, the store or the catalog.
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;

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

/// A bound listener, ready to serve.
pub struct Bound {
    /// Its configuration.
    pub config: ListenerConfig,
    /// The socket.
    pub socket: tokio::net::TcpListener,
    /// The address actually bound (port 0 resolved).
    pub local_addr: SocketAddr,
}

/// Binds every configured listener; any failure refuses the start.
pub async fn bind_all(configs: &[ListenerConfig]) -> Result<Vec<Bound>, BindError> {
    let mut out = Vec::with_capacity(configs.len());
    for c in configs {
        let err = |source| BindError {
            name: c.name.clone(),
            addr: c.bind,
            source,
        };
        let socket = tokio::net::TcpListener::bind(c.bind).await.map_err(err)?;
        let local_addr = socket.local_addr().map_err(err)?;
        out.push(Bound {
            config: c.clone(),
            socket,
            local_addr,
        });
    }
    Ok(out)
}

/// Starts serving `bound` on `slot` until `shutdown` flips to true; the
/// task ends when the listener has drained.
pub fn spawn(
    bound: Bound,
    slot: Arc<Slot>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    match bound.config.protocol {
        Protocol::Tcp => tokio::spawn(tcp::serve(bound.socket, bound.config.name, slot, shutdown)),
        Protocol::Grpc => unreachable!("config validation refuses grpc listeners in this build"),
    }
}
