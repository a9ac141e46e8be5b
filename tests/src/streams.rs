//! What a long-lived client — a TCP connection or a gRPC `Exchange`
//! stream — saw while the plugin behind it was reloaded version after
//! version, and the claim the reload tests make about it. The TCP and the
//! gRPC test make the same claim, so it is written once and the two cannot
//! drift apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crate::clients::{LineClient, echo_version};

/// What one long-lived client saw across a run of reloads.
#[derive(Debug, Default)]
pub struct ClientReport {
    /// Frames answered while the reloads ran (the last frame not counted).
    pub frames: u64,
    /// Everything that went wrong, one line each.
    pub errors: Vec<String>,
    /// The versions that answered, in order, each change once.
    pub versions: Vec<String>,
    /// A last frame was answered after the reloads.
    pub still_open: bool,
}

impl ClientReport {
    /// Asserts that client `who` ("client 3", "stream 7") followed reloads
    /// from 1.0.0 (the version [`crate::DaemonOptions`] starts with)
    /// through `reloads` in order: no error, still open after them, saw
    /// the version change, ended on the last of `reloads`, and never went
    /// back to an older version.
    pub fn assert_followed(&self, who: &str, reloads: &[String]) {
        assert!(
            self.errors.is_empty(),
            "{who} saw errors: {:?}",
            self.errors
        );
        assert!(self.still_open, "{who} did not survive the reloads");
        assert!(
            self.versions.len() >= 2,
            "{who} never saw the version change: {:?}",
            self.versions
        );
        assert_eq!(
            self.versions.last().map(String::as_str),
            Some(reloads.last().unwrap().as_str()),
            "{who}"
        );
        // Versions only move forward under one connection or stream.
        let idx: Vec<usize> = self
            .versions
            .iter()
            .map(|v| {
                if v == "1.0.0" {
                    0
                } else {
                    reloads.iter().position(|x| x == v).unwrap() + 1
                }
            })
            .collect();
        assert!(
            idx.windows(2).all(|w| w[0] < w[1]),
            "{who} saw versions out of order: {:?}",
            self.versions
        );
    }
}

/// A TCP client on one connection to the echo at `addr` (connected before
/// this returns), sending `c{id}-f{n}` frames one after another until
/// `stop` is set and it has seen `last` answer — an event, not a fixed
/// time — then one more frame to show the connection is still open.
///
/// # Panics
/// When the connection cannot be made.
pub fn follow_tcp(
    addr: SocketAddr,
    id: usize,
    stop: Arc<AtomicBool>,
    last: String,
) -> JoinHandle<ClientReport> {
    let mut client = LineClient::connect(addr).expect("connect");
    std::thread::spawn(move || {
        let mut r = ClientReport::default();
        while !(stop.load(Ordering::Relaxed) && r.versions.last() == Some(&last)) {
            let frame = format!("c{id}-f{}", r.frames);
            match client.call(&frame) {
                Ok(resp) => match echo_version(&resp) {
                    Some(v) if resp.ends_with(&frame) => {
                        if r.versions.last().map(String::as_str) != Some(v) {
                            r.versions.push(v.to_owned());
                        }
                    }
                    _ => r.errors.push(format!("wrong answer {resp:?} to {frame:?}")),
                },
                Err(e) => {
                    r.errors.push(e.to_string());
                    return r;
                }
            }
            r.frames += 1;
        }
        r.still_open = client.call("last").is_ok_and(|resp| resp.ends_with("last"));
        r
    })
}
