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

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
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
    let start = |conns: &mut JoinSet<()>, stream: TcpStream, pending: Vec<u8>| {
        conns.spawn(connection(
            Conn {
                stream,
                pending,
                listener: name.clone(),
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
    listener: String,
}

/// What a connection's wait for its next frame ended with.
enum Next {
    Read(std::io::Result<usize>),
    Stop,
}

async fn connection(
    conn: Conn,
    slot: Arc<Slot>,
    mut shutdown: watch::Receiver<bool>,
    request_timeout: Duration,
    hand_off: HandOff,
) {
    let Conn {
        stream,
        pending,
        listener,
    } = conn;
    let (read, mut write) = stream.into_split();
    // What the replaced process had read comes first, then the socket.
    let mut reader = BufReader::new(std::io::Cursor::new(pending).chain(read));
    let mut frame = Vec::with_capacity(256);
    let mut out = Vec::with_capacity(256);
    loop {
        frame.clear();
        let next = {
            let mut limited = (&mut reader).take(MAX_FRAME as u64);
            tokio::select! {
                // A partial read stays in `frame` when the stop wins, so
                // a hand-off loses none of it.
                r = limited.read_until(b'\n', &mut frame) => Next::Read(r),
                _ = shutdown.changed() => Next::Stop,
            }
        };
        let n = match next {
            Next::Read(Ok(n)) => n,
            Next::Read(Err(_)) => return,
            Next::Stop => {
                if let Some(to) = hand_off.destination() {
                    move_out(listener, reader, write, frame, &to);
                }
                return;
            }
        };
        if n == 0 {
            return;
        }
        if frame.last() == Some(&b'\n') {
            frame.pop();
            if frame.last() == Some(&b'\r') {
                frame.pop();
            }
        } else if n >= MAX_FRAME {
            let _ = write
                .write_all(format!("ERR frame longer than {MAX_FRAME} bytes\n").as_bytes())
                .await;
            return;
        }
        // Otherwise EOF came in the middle of a line: answer it as a frame.
        out.clear();
        let (result, _version) = slot.call(frame.clone(), request_timeout).await;
        match result {
            Ok(resp) => out.extend(resp.into_iter().map(|b| if b == b'\n' { b' ' } else { b })),
            Err(DispatchError::Plugin(e)) => {
                out.extend_from_slice(format!("ERR {e}").replace('\n', " ").as_bytes());
            }
            Err(e) => out.extend_from_slice(format!("ERR {e}").as_bytes()),
        }
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Sends the connection to the new process: the socket, and what was read
/// from it and not answered — the partial frame, then what the buffer and
/// the replaced process's leftovers still hold, in that order.
fn move_out(
    listener: String,
    reader: BufReader<tokio::io::Chain<std::io::Cursor<Vec<u8>>, tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
    mut pending: Vec<u8>,
    to: &std::sync::mpsc::Sender<Moving>,
) {
    pending.extend_from_slice(reader.buffer());
    let (earlier, read) = reader.into_inner().into_inner();
    let from = usize::try_from(earlier.position()).unwrap_or(usize::MAX);
    pending.extend_from_slice(earlier.get_ref().get(from..).unwrap_or_default());
    let stream = match read.reunite(write).map(TcpStream::into_std) {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::warn!(listener = %listener, error = %e, "could not hand a connection over; it closes");
            return;
        }
        Err(_) => unreachable!("the halves of one stream reunite"),
    };
    let _ = to.send(Moving {
        listener,
        stream,
        pending,
    });
}
