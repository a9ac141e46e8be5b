//! The raw TCP listener: newline-delimited frames, one line in, one line out.
//!
//! A response that itself contains newlines has them replaced by spaces,
//! so the framing stays one line per request. Errors are answered in-band
//! as `ERR <reason>` lines; the connection stays open. A frame the plugin
//! does not answer within the listener's `request_timeout` gets an `ERR`
//! line naming the timeout, and the connection goes on with the next one.
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::slot::{Admission, DispatchError, Slot};

/// Longest accepted frame, newline included.
pub const MAX_FRAME: usize = 64 * 1024;

/// Accepts connections until `shutdown`, then drains them: each connection
/// finishes the frame it is on and closes; whatever is still open after
/// `drain` (`[shutdown] drain_timeout`) is closed. Each frame is bounded
/// by `request_timeout`.
pub async fn serve(
    listener: TcpListener,
    name: String,
    slot: Arc<Slot>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    request_timeout: Duration,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    if slot.admits_connections() {
                        conns.spawn(connection(stream, slot.clone(), shutdown.clone(), request_timeout));
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

async fn connection(
    stream: TcpStream,
    slot: Arc<Slot>,
    mut shutdown: watch::Receiver<bool>,
    request_timeout: Duration,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut frame = Vec::with_capacity(256);
    let mut out = Vec::with_capacity(256);
    loop {
        frame.clear();
        let mut limited = (&mut reader).take(MAX_FRAME as u64);
        let n = tokio::select! {
            r = limited.read_until(b'\n', &mut frame) => match r {
                Ok(n) => n,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
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
