//! The messages between the daemon and a plugin host, on one unix stream
//! socket (a `socketpair`, the host's end inherited as fd 3).
//!
//! Every message is a 13-byte header — payload length (`u32`), call id
//! (`u64`), kind (`u8`), little-endian — then the payload. A stream, not
//! `SOCK_SEQPACKET`: a request is as large as its listener allows, and a
//! seqpacket message is bounded by the socket buffer. Ids let many calls
//! be in flight at once and be answered in any order; the host answers
//! each call exactly once, or dies, and a death fails every call still
//! waiting (the daemon's side sees the end of the stream).
//!
//! The request and answer payloads are the plugin's own bytes, untouched:
//! nothing on the hot path is encoded. The two one-off messages that carry
//! structure — why a load failed, how long it took — are JSON.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// This format's version. A daemon adopts a running host (on an upgrade)
/// only if the host speaks the same; it starts a new one otherwise. Raise
/// it with any change to the header, the kinds or the payloads.
pub const VERSION: u32 = 1;

/// Header bytes before every payload.
pub const HEADER: usize = 13;

/// The largest payload either side accepts: a peer that claims more is
/// broken (or not a plugin host) and its stream is closed.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    // Daemon → host.
    /// Call `handle` with the payload.
    Handle = 1,
    /// Call `health`.
    Health = 2,
    /// Call `degrade` with the level (payload: `u32`).
    Degrade = 3,

    // Host → daemon.
    /// The library loaded and `init` returned OK (payload: [`Ready`]).
    Ready = 10,
    /// The load failed (payload: the loader's error, JSON).
    LoadFailed = 11,
    /// `handle` answered (payload: the answer).
    Answer = 12,
    /// `handle` returned an error (payload: its message).
    PluginError = 13,
    /// `handle` panicked; the SDK caught it (payload: the message).
    Panic = 14,
    /// `health` answered (payload: one byte, 1 healthy).
    HealthAnswer = 15,
    /// `degrade` answered (payload: one byte, see [`DEGRADE_OK`]…).
    DegradeAnswer = 16,
}

impl Kind {
    /// The kind a byte names, if any.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Handle,
            2 => Kind::Health,
            3 => Kind::Degrade,
            10 => Kind::Ready,
            11 => Kind::LoadFailed,
            12 => Kind::Answer,
            13 => Kind::PluginError,
            14 => Kind::Panic,
            15 => Kind::HealthAnswer,
            16 => Kind::DegradeAnswer,
            _ => return None,
        })
    }
}

/// `degrade` answers: done, refused by the plugin, no such hook.
pub const DEGRADE_OK: u8 = 1;
/// See [`DEGRADE_OK`].
pub const DEGRADE_FAILED: u8 = 2;
/// See [`DEGRADE_OK`].
pub const DEGRADE_UNSUPPORTED: u8 = 3;

/// What a host says once its version serves.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Ready {
    /// `dlopen` and the descriptor checks, in microseconds.
    pub load_us: u64,
    /// The plugin's `init`, in microseconds.
    pub init_us: u64,
    /// What the host gave up before it opened the library.
    pub dropped: super::privileges::Dropped,
}

/// One message read off the stream.
#[derive(Debug)]
pub struct Message {
    /// The call it belongs to (0 for the one-off messages).
    pub id: u64,
    /// What it is.
    pub kind: Kind,
    /// Its bytes.
    pub payload: Vec<u8>,
}

/// The header of a message of `len` payload bytes.
pub fn header(id: u64, kind: Kind, len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..12].copy_from_slice(&id.to_le_bytes());
    h[12] = kind as u8;
    h
}

/// Splits a header into payload length, id and kind; `Err` when the kind
/// is unknown or the length past [`MAX_PAYLOAD`].
pub fn parse_header(h: &[u8; HEADER]) -> io::Result<(usize, u64, Kind)> {
    let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
    let id = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
    let kind = Kind::from_u8(h[12]).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown message kind {}", h[12]),
        )
    })?;
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is past the {MAX_PAYLOAD}-byte bound"),
        ));
    }
    Ok((len, id, kind))
}

/// Reads one whole message, blocking; `Ok(None)` at a clean end of stream.
pub fn read_message(r: &mut impl Read) -> io::Result<Option<Message>> {
    let mut h = [0u8; HEADER];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let (len, id, kind) = parse_header(&h)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(Message { id, kind, payload }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_back_as_written() {
        let mut bytes = header(7, Kind::Answer, 3).to_vec();
        bytes.extend_from_slice(b"abc");
        bytes.extend_from_slice(&header(8, Kind::Health, 0));
        let mut r = &bytes[..];
        let m = read_message(&mut r).unwrap().unwrap();
        assert_eq!(
            (m.id, m.kind, &m.payload[..]),
            (7, Kind::Answer, &b"abc"[..])
        );
        let m = read_message(&mut r).unwrap().unwrap();
        assert_eq!((m.id, m.kind, m.payload.len()), (8, Kind::Health, 0));
        assert!(read_message(&mut r).unwrap().is_none(), "clean end");
    }

    #[test]
    fn a_broken_peer_is_an_error_not_an_allocation() {
        let mut h = header(1, Kind::Answer, 0);
        h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_header(&h).is_err(), "length past the bound");
        let mut h = header(1, Kind::Answer, 0);
        h[12] = 99;
        assert!(parse_header(&h).is_err(), "unknown kind");
        let cut = &header(1, Kind::Answer, 5)[..];
        let mut r = [cut, b"ab"].concat();
        let mut rd = &r[..];
        assert!(read_message(&mut rd).is_err(), "payload cut short");
        r.clear();
    }
}
