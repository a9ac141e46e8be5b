//! Clients of the daemon's sockets, written against the wire and not the
//! daemon's code: the newline-delimited TCP protocol, gRPC (channel and
//! health check), and the plain HTTP GETs `/metrics` and Prometheus's
//! API need.
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;

/// The plugin service's name, as health and reflection report it.
pub const GRPC_SERVICE: &str = "plugvisor.v1.Plugin";

/// A gRPC channel (one HTTP/2 connection, made now, 2 s connect timeout)
/// to a listener. No per-call timeout: streams are meant to live long; the
/// tests bound each wait themselves.
pub async fn grpc_channel(
    addr: SocketAddr,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
}

/// One `grpc.health.v1.Health/Check` of `service` (blocking, on a runtime of
/// its own, for synchronous test code).
pub fn grpc_health(addr: SocketAddr, service: &str) -> Result<ServingStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let check = async {
            let channel = grpc_channel(addr).await.map_err(|e| e.to_string())?;
            let resp = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map_err(|s| s.to_string())?;
            ServingStatus::try_from(resp.into_inner().status).map_err(|e| e.to_string())
        };
        tokio::time::timeout(Duration::from_secs(5), check)
            .await
            .map_err(|_| "health check: no answer within 5 s".to_owned())?
    })
}

/// A client of the newline-delimited TCP listener.
pub struct LineClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineClient {
    /// Connects with a 5 s I/O timeout.
    pub fn connect(addr: SocketAddr) -> std::io::Result<LineClient> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(LineClient {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends one frame, returns the response line (without newline).
    pub fn call(&mut self, frame: &str) -> std::io::Result<String> {
        self.writer.write_all(format!("{frame}\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches('\n').to_owned())
    }

    /// Reads one line without sending anything first (for an answer the
    /// server gives to bytes already written, after which it may have closed).
    pub fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches('\n').to_owned())
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }

    /// Closes with SO_LINGER 0: the kernel sends RST instead of FIN.
    pub fn reset(self) {
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on an fd we own, with a valid struct.
        unsafe {
            libc::setsockopt(
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const l).cast(),
                size_of::<libc::linger>() as u32,
            );
        }
        drop(self);
    }
}

/// The version in an echo response (`[echo 1.2.3] …`).
pub fn echo_version(resp: &str) -> Option<&str> {
    resp.strip_prefix('[')?.split(']').next()?.split(' ').nth(1)
}

/// A minimal HTTP/1.0 GET of a page that must answer 200; another status
/// is an error carrying the status line.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    match http_get_status(addr, path)? {
        (200, body) => Ok(body),
        (code, body) => Err(std::io::Error::other(format!(
            "HTTP {code}: {}",
            body.lines().next().unwrap_or_default()
        ))),
    }
}

/// A minimal HTTP/1.0 GET that returns the status code and body whatever
/// the status (an API's error body says why it refused).
pub fn http_get_status(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or(std::io::ErrorKind::InvalidData)?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(std::io::ErrorKind::InvalidData)?;
    Ok((code, body.to_owned()))
}

/// Percent-encodes `s` for a URL query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
