//! The admin unix socket: the CLI's way into the running daemon.
//!
//! Created with mode 0600 and checked again per connection with
//! `SO_PEERCRED` (only root and the daemon's own user are served). One JSON
//! request per line, one JSON response per line.
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::{AdminRequest, AdminResponse, Command};
use crate::reload::AttemptOutcome;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client waits for the daemon before giving up.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a refused client is given to send its request before it is
/// told why it was refused.
const REFUSAL_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the admin socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Creating or binding the socket failed.
    #[error("admin socket {path}: {action}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The daemon's answer was not understood.
    #[error("admin socket {path}: bad response: {message}")]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let io = |action, source| AdminError::Io {
        path: path.to_owned(),
        action,
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io("creating its directory", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing the stale socket", e)),
    }
    // Bind under a restrictive umask so there is no window with wider access.
    // SAFETY: umask is process-wide but only read/written here, at start.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| io("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("chmod 0600", e))?;
    Ok(listener)
}

/// How long a stopping admin socket waits for the requests it took to be
/// answered: an upgrade's own answer is written after the hand-over, by
/// the process that is about to exit.
pub const ANSWER_BEFORE_EXIT: Duration = Duration::from_secs(5);

/// Serves admin requests, turning them into [`Command`]s, until `stop`
/// flips; then waits (at most [`ANSWER_BEFORE_EXIT`]) for every request
/// already taken to be answered.
pub async fn serve(
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = handlers.join_next(), if !handlers.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let allowed = stream
            .peer_cred()
            .is_ok_and(|c| c.uid() == 0 || c.uid() == own_uid);
        let commands = commands.clone();
        handlers.spawn(async move {
            if !allowed {
                let uid = stream.peer_cred().map(|c| c.uid()).ok();
                tracing::warn!(
                    ?uid,
                    "admin socket: refused a client that is neither root nor the daemon's user"
                );
                let mut stream = stream;
                // Read the request first: a client that is still writing it
                // when the answer comes and the socket closes sees EPIPE,
                // not the answer that says why.
                let mut line = String::new();
                {
                    let mut reader =
                        BufReader::new(tokio::io::AsyncReadExt::take(&mut stream, MAX_REQUEST));
                    let _ = tokio::time::timeout(REFUSAL_READ_TIMEOUT, reader.read_line(&mut line))
                        .await;
                }
                let resp = AdminResponse {
                    ok: false,
                    result: serde_json::Value::Null,
                    error: Some(
                        "permission denied: only root or the daemon's user may use this socket"
                            .into(),
                    ),
                };
                let _ = write_line(&mut stream, &resp).await;
                return;
            }
            handle(stream, commands).await;
        });
    }
    // Stop taking requests (the listener closes here, or lives on in the
    // process that took it over), and answer those taken.
    drop(listener);
    let _ = tokio::time::timeout(ANSWER_BEFORE_EXIT, async {
        while handlers.join_next().await.is_some() {}
    })
    .await;
}

async fn write_line(stream: &mut UnixStream, resp: &AdminResponse) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(resp).expect("responses serialise");
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn handle(mut stream: UnixStream, commands: mpsc::Sender<Command>) {
    let mut line = String::new();
    {
        let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(&mut stream, MAX_REQUEST));
        if reader.read_line(&mut line).await.is_err() {
            return;
        }
    }
    let resp = match serde_json::from_str::<AdminRequest>(line.trim()) {
        Err(e) => AdminResponse {
            ok: false,
            result: serde_json::Value::Null,
            error: Some(format!("bad request: {e}")),
        },
        Ok(req) => execute(req, &commands).await,
    };
    let _ = write_line(&mut stream, &resp).await;
}

#[expect(
    clippy::too_many_lines,
    reason = "one arm per admin request, each a few lines; splitting it would scatter the protocol"
)]
async fn execute(req: AdminRequest, commands: &mpsc::Sender<Command>) -> AdminResponse {
    let gone = || AdminResponse {
        ok: false,
        result: serde_json::Value::Null,
        error: Some("daemon is shutting down".into()),
    };
    match req {
        AdminRequest::Status => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Status { reply: tx }).await.is_err() {
                return gone();
            }
            match rx.await {
                Ok(status) => AdminResponse {
                    ok: true,
                    result: serde_json::to_value(status).unwrap_or_default(),
                    error: None,
                },
                Err(_) => gone(),
            }
        }
        AdminRequest::Rollback { plugin, to } => {
            let (tx, rx) = oneshot::channel();
            ask(
                commands,
                Command::Rollback {
                    plugin,
                    to,
                    reply: tx,
                },
                rx,
            )
            .await
        }
        AdminRequest::Disable { plugin } => {
            let (tx, rx) = oneshot::channel();
            ask(
                commands,
                Command::SetEnabled {
                    plugin,
                    enabled: false,
                    reply: tx,
                },
                rx,
            )
            .await
        }
        AdminRequest::Enable { plugin } => {
            let (tx, rx) = oneshot::channel();
            ask(
                commands,
                Command::SetEnabled {
                    plugin,
                    enabled: true,
                    reply: tx,
                },
                rx,
            )
            .await
        }
        AdminRequest::Versions { plugin } => {
            let (tx, rx) = oneshot::channel();
            ask(commands, Command::Versions { plugin, reply: tx }, rx).await
        }
        AdminRequest::Upgrade { binary } => {
            let (tx, rx) = oneshot::channel();
            let cmd = Command::Upgrade {
                binary,
                reply: Some(tx),
            };
            ask(commands, cmd, rx).await
        }
        AdminRequest::Reload { plugin } => {
            let (tx, rx) = oneshot::channel();
            let cmd = Command::Rescan {
                plugins: Some(vec![plugin]),
                force: true,
                reply: Some(tx),
            };
            if commands.send(cmd).await.is_err() {
                return gone();
            }
            match rx.await {
                Ok(reports) => {
                    let ok = reports.iter().all(|r| {
                        matches!(
                            r.outcome,
                            AttemptOutcome::Success | AttemptOutcome::Unchanged
                        )
                    });
                    let error = (!ok).then(|| {
                        reports
                            .iter()
                            .filter_map(|r| r.message.clone())
                            .collect::<Vec<_>>()
                            .join("; ")
                    });
                    AdminResponse {
                        ok,
                        result: serde_json::to_value(reports).unwrap_or_default(),
                        error,
                    }
                }
                Err(_) => gone(),
            }
        }
    }
}

/// Sends `cmd` and turns its `Result` answer into a response.
async fn ask<T: serde::Serialize>(
    commands: &mpsc::Sender<Command>,
    cmd: Command,
    rx: oneshot::Receiver<Result<T, String>>,
) -> AdminResponse {
    let gone = || AdminResponse {
        ok: false,
        result: serde_json::Value::Null,
        error: Some("daemon is shutting down".into()),
    };
    if commands.send(cmd).await.is_err() {
        return gone();
    }
    match rx.await {
        Ok(Ok(v)) => AdminResponse {
            ok: true,
            result: serde_json::to_value(v).unwrap_or_default(),
            error: None,
        },
        Ok(Err(e)) => AdminResponse {
            ok: false,
            result: serde_json::Value::Null,
            error: Some(e),
        },
        Err(_) => gone(),
    }
}

/// Sends one request to the daemon at `path` and returns its answer.
pub async fn request(path: &Path, req: &AdminRequest) -> Result<AdminResponse, AdminError> {
    let io = |action, source| AdminError::Io {
        path: path.to_owned(),
        action,
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(|e| {
        let action = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                "connecting: only root or the daemon's user may use the admin socket (mode 0600)"
            }
            _ => "connecting (is plugvisor running?)",
        };
        io(action, e)
    })?;
    let mut line = serde_json::to_vec(req).expect("requests serialise");
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| io("sending", e))?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    tokio::time::timeout(CLIENT_TIMEOUT, reader.read_line(&mut answer))
        .await
        .map_err(|_| {
            io(
                "waiting for the answer",
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            )
        })?
        .map_err(|e| io("reading the answer", e))?;
    serde_json::from_str(answer.trim()).map_err(|e| AdminError::Protocol {
        path: path.to_owned(),
        message: format!("{e}: {answer:?}"),
    })
}
