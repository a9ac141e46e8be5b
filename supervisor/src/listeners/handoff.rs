//! Raw TCP connections leaving this process for the one that replaces it
//! (`plugvisor upgrade`), and arriving in that one.
//!
//! A connection moves only at a frame boundary: never while its plugin is
//! answering a frame, so the answer it is owed is written before the move
//! and nothing is answered twice. It takes along what it had read and not
//! yet answered (a partial frame, or whole frames the client pipelined),
//! which the new process reads before the socket.
use std::sync::{Arc, Mutex};

/// A connection on its way out.
#[derive(Debug)]
pub struct Moving {
    /// The listener that accepted it.
    pub listener: String,
    /// The socket, deregistered from this process's runtime.
    pub stream: std::net::TcpStream,
    /// Bytes read from it and not yet answered, in order.
    pub pending: Vec<u8>,
}

/// A connection that arrived from the replaced process: the socket and what
/// to read before it.
pub type Adopted = (std::net::TcpStream, Vec<u8>);

/// Where the raw TCP connections go when the listeners stop: set (by the
/// upgrade) before the stop, they move there instead of closing.
#[derive(Debug, Clone, Default)]
pub struct HandOff(Arc<Mutex<Option<std::sync::mpsc::Sender<Moving>>>>);

impl HandOff {
    /// From now on, a stopping connection goes to `to`.
    pub fn direct_to(&self, to: std::sync::mpsc::Sender<Moving>) {
        *self.0.lock().expect("hand-off lock") = Some(to);
    }

    /// Back to closing on stop (an upgrade that failed); drops the sender,
    /// so whoever reads the channel sees its end once every connection
    /// holding a clone has moved.
    pub fn release(&self) {
        self.0.lock().expect("hand-off lock").take();
    }

    /// Where a stopping connection goes, if anywhere.
    pub(super) fn destination(&self) -> Option<std::sync::mpsc::Sender<Moving>> {
        self.0.lock().expect("hand-off lock").clone()
    }
}
