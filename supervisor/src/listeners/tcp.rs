//! The raw TCP listener: newline-delimited frames, one line in, one line out.
//!
//! A response that itself contains newlines has them replaced by spaces,
//! so the framing stays one line per request. Errors are answered in-band
//! as `ERR <reason>` lines; the connection stays open. A frame the plugin
//! does not answer within the listener's `request_timeout` gets an `ERR`
//! line naming the timeout, and the connection goes on with the next one.
//!
//! On an upgrade each connection moves to the new process at its next frame
//! boundary ([`super::handoff`]) instead of closing, and the new process's
//! listener adopts it.
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::handoff::{Adopted, HandOff, Moving};
use crate::slot::{Admission, DispatchError, Slot};

/// Longest accepted frame, newline included.
pub const MAX_FRAME: usize = 64 * 1024;

/// What a raw TCP listener serves with besides its socket.
pub struct Serving {
    /// The listener's name.
    pub name: String,
    /// Its plugin's slot.
    pub slot: Arc<Slot>,
    /// Flips to true when the listener must stop.
    pub shutdown: watch::Receiver<bool>,
    /// How long the stop may take (`[shutdown] drain_timeout`).
    pub drain: Duration,
    /// Each frame's bound.
    pub request_timeout: Duration,
    /// Where connections go instead of closing when an upgrade stops us.
    pub hand_off: HandOff,
    /// Connections the replaced process handed to this one.
    pub adopted: Option<mpsc::UnboundedReceiver<Adopted>>,
}

/// Accepts connections until `shutdown`, then drains them: each connection
/// finishes the frame it is on and closes (or moves to the new process, if
/// an upgrade set the hand-off); whatever is still open after `drain` is
/// closed. Each frame is bounded by `request_timeout`.
pub async fn serve(listener: TcpListener, serving: Serving) {
    let Serving {
        name,
        slot,
        mut shutdown,
        drain,
        request_timeout,
        hand_off,
        mut adopted,
    } = serving;
    let mut conns = JoinSet::new();
    // Each connection's own view of the stop. Cloned from a receiver that
    // never marks the stop seen, so even a connection started after it
    // sees it at once.
    let stop = shutdown.clone();
    let listener_name: Arc<str> = Arc::from(name.as_str());
    let start = |conns: &mut JoinSet<()>, stream: TcpStream, pending: Vec<u8>| {
        conns.spawn(connection(
            Conn {
                stream,
                pending,
                listener: listener_name.clone(),
            },
            slot.clone(),
            stop.clone(),
            request_timeout,
            hand_off.clone(),
        ));
    };
    loop {
        tokio::select! {
            Some((stream, pending)) = recv_adopted(&mut adopted) => {
                match stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream)) {
                    Ok(stream) => start(&mut conns, stream, pending),
                    Err(e) => tracing::warn!(listener = %name, error = %e, "could not adopt a connection from the replaced process"),
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    if slot.admits_connections() {
                        start(&mut conns, stream, Vec::new());
                    } else {
                        // Degraded to shedding (or disabled): say so and close,
                        // rather than leave the client waiting.
                        let why = format!(
                            "ERR listener {name} refuses new connections: plugin {} is {}\n",
                            slot.plugin(),
                            if slot.admission() == Admission::Disabled { "disabled" } else { "degraded and shedding load" }
                        );
                        conns.spawn(async move {
                            let _ = stream.write_all(why.as_bytes()).await;
                            let _ = stream.shutdown().await;
                        });
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    // Before the wait: on an upgrade the new process accepts from its copy
    // of this socket, and this one must stop taking connections it would
    // only have to move.
    drop(listener);
    let open = conns.len();
    if tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!(listener = %name, open, "drain timeout; closing remaining connections");
        conns.abort_all();
    }
}

/// The next connection handed over, or never when there is no channel.
async fn recv_adopted(adopted: &mut Option<mpsc::UnboundedReceiver<Adopted>>) -> Option<Adopted> {
    if let Some(rx) = adopted {
        if let Some(a) = rx.recv().await {
            return Some(a);
        }
        // The hand-over is over; stop asking.
        *adopted = None;
    }
    std::future::pending().await
}

/// A connection to serve and what was read from it before (by the
/// replaced process).
struct Conn {
    stream: TcpStream,
    pending: Vec<u8>,
    listener: Arc<str>,
}

/// How much a read takes at most: a busy client's pipelined frames in one
/// syscall, into a buffer on the stack.
const READ_CHUNK: usize = 4096;

/// What a connection's wait for its next frame ended with.
enum Next {
    /// A whole frame, its newline (and a `\r` before it) taken off.
    Frame(Vec<u8>),
    /// The client closed in the middle of a line: answer it as a frame,
    /// then close.
    Last(Vec<u8>),
    /// Closed, or an error: nothing more to answer.
    Closed,
    /// A line longer than [`MAX_FRAME`].
    TooLong,
    /// The listener is stopping.
    Stop,
}

/// Serves one connection.
///
/// An idle connection holds no buffer: `buf` keeps only bytes read and not
/// yet answered, and is empty, with nothing allocated, between frames. It
/// waits for readability first and reads through the stack, so ten
/// thousand idle clients cost their tasks and sockets, not ten thousand
/// read buffers (`docs/BENCHMARKS.md`, the connection sweep).
async fn connection(
    conn: Conn,
    slot: Arc<Slot>,
    mut shutdown: watch::Receiver<bool>,
    request_timeout: Duration,
    hand_off: HandOff,
) {
    let Conn {
        mut stream,
        pending,
        listener,
    } = conn;
    // What the replaced process had read comes first, then the socket.
    let mut buf = pending;
    // How much of `buf` is known to hold no newline.
    let mut scanned = 0;
    loop {
        let next = next_frame(&stream, &mut buf, &mut scanned, &mut shutdown).await;
        let (frame, last) = match next {
            Next::Frame(f) => (f, false),
            Next::Last(f) => (f, true),
            Next::Closed => return,
            Next::TooLong => {
                let _ = stream
                    .write_all(format!("ERR frame longer than {MAX_FRAME} bytes\n").as_bytes())
                    .await;
                return;
            }
            Next::Stop => {
                if let Some(to) = hand_off.destination() {
                    move_out(&listener, stream, buf, &to);
                }
                return;
            }
        };
        // Boxed: the call's state is held only while a frame is answered,
        // not in every idle connection's task.
        let (result, _version) = Box::pin(slot.call(frame, request_timeout)).await;
        let mut out = match result {
            Ok(resp) => resp
                .into_iter()
                .map(|b| if b == b'\n' { b' ' } else { b })
                .collect(),
            Err(DispatchError::Plugin(e)) => format!("ERR {e}").replace('\n', " ").into_bytes(),
            Err(e) => format!("ERR {e}").into_bytes(),
        };
        out.push(b'\n');
        if stream.write_all(&out).await.is_err() || last {
            return;
        }
    }
}

/// Waits for the next frame of `stream`: from what `buf` already holds,
/// else from the socket, reading only once it is readable.
async fn next_frame(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    scanned: &mut usize,
    shutdown: &mut watch::Receiver<bool>,
) -> Next {
    loop {
        let window = buf.len().min(MAX_FRAME);
        if let Some(i) = buf[*scanned..window].iter().position(|&b| b == b'\n') {
            let end = *scanned + i;
            // The rest (pipelined frames) stays; the frame takes the
            // allocation with it, so a drained `buf` holds none.
            let rest = buf.split_off(end + 1);
            let mut frame = std::mem::replace(buf, rest);
            *scanned = 0;
            frame.truncate(end);
            if frame.last() == Some(&b'\r') {
                frame.pop();
            }
            return Next::Frame(frame);
        }
        *scanned = window;
        if buf.len() >= MAX_FRAME {
            return Next::TooLong;
        }
        tokio::select! {
            // A partial frame stays in `buf` when the stop wins, so a
            // hand-off loses none of it.
            ready = stream.readable() => {
                if ready.is_err() {
                    return Next::Closed;
                }
            }
            _ = shutdown.changed() => return Next::Stop,
        }
        match read_some(stream, buf) {
            Ok(0) if buf.is_empty() => return Next::Closed,
            Ok(0) => {
                *scanned = 0;
                return Next::Last(std::mem::take(buf));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Next::Closed,
        }
    }
}

/// Reads what the socket has (up to [`READ_CHUNK`]) through a buffer on
/// the stack and appends exactly that to `buf`: a frame costs an
/// allocation of its own size, not a chunk's. Ten thousand connections
/// sending at once then leave the allocator holding ten thousand frames'
/// worth, not ten thousand chunks'.
fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let want = READ_CHUNK.min(MAX_FRAME + 1 - buf.len());
    let n = stream.try_read(&mut chunk[..want])?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Sends the connection to the new process: the socket, and what was read
/// from it and not answered (a partial frame, or pipelined frames), in
/// order.
fn move_out(
    listener: &str,
    stream: TcpStream,
    pending: Vec<u8>,
    to: &std::sync::mpsc::Sender<Moving>,
) {
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(listener = %listener, error = %e, "could not hand a connection over; it closes");
            return;
        }
    };
    let _ = to.send(Moving {
        listener: listener.to_owned(),
        stream,
        pending,
    });
}
