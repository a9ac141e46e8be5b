//! What a gRPC connection has written, as HTTP/2 frames: just enough to
//! know when the drain's final GOAWAY is on its way to the client.
//!
//! Why the listener needs to know: on SIGTERM two things happen to a
//! connection that carries an `Exchange` stream, and they race. hyper
//! starts the two-phase GOAWAY (last stream id 2^31-1 with a PING, then,
//! when the PING's ACK comes back, the real last stream id), and the
//! `Exchange` handler ends its stream with UNAVAILABLE. When the stream's
//! end went out first (about one drain in ten on a 2-core machine), a
//! client with nothing else open on the connection closed it at once; the
//! first GOAWAY then met a closed socket, no PING ACK ever came back, and
//! the second GOAWAY was never sent. The client learned "unavailable"
//! without learning which streams the server had processed — the very
//! thing the two phases exist to say (gRPC-core sends both on every
//! connection). So an `Exchange` stream ends only once its connection's
//! final GOAWAY has been written, bounded by
//! [`super::grpc::FINAL_GOAWAY_WAIT`] for a client that never answers the
//! PING.
//!
//! The scan costs a few comparisons per frame header and none per payload
//! byte: a server's outgoing bytes are frames from the first byte on (the
//! connection preface is the client's), so the frame boundaries are known
//! exactly, whatever the writes' sizes.

/// Length of an HTTP/2 frame header (RFC 9113 §4.1).
const FRAME_HEADER: usize = 9;

/// The GOAWAY frame type.
const GOAWAY: u8 = 7;

/// The last stream id of a drain's first GOAWAY: "every stream so far, and
/// maybe more in flight" (RFC 9113 §6.8).
const PROVISIONAL_LAST_STREAM: u32 = (1 << 31) - 1;

/// Follows the frames of one connection's outgoing byte stream.
#[derive(Debug, Default)]
pub struct FrameScanner {
    /// The frame header being assembled, `have` bytes of it so far.
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame not yet seen.
    remaining: u32,
    /// While in a GOAWAY's payload: its first four bytes (the last stream
    /// id) as far as seen.
    goaway: Option<([u8; 4], usize)>,
}

impl FrameScanner {
    /// Feeds bytes the connection wrote, in order. Returns whether they
    /// completed a GOAWAY with a real last stream id (a drain's final one,
    /// or a GOAWAY that ends the connection at once).
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut final_goaway = false;
        while !bytes.is_empty() {
            if self.remaining == 0 {
                let n = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == FRAME_HEADER {
                    self.have = 0;
                    let [l0, l1, l2, kind, ..] = self.header;
                    self.remaining = u32::from_be_bytes([0, l0, l1, l2]);
                    // A GOAWAY shorter than its last stream id is a
                    // protocol error we did not send; ignore it.
                    self.goaway = (kind == GOAWAY && self.remaining >= 4).then_some(([0; 4], 0));
                }
                continue;
            }
            let n = usize::try_from(self.remaining)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            if let Some((id, have)) = &mut self.goaway {
                let take = (4 - *have).min(n);
                id[*have..*have + take].copy_from_slice(&bytes[..take]);
                *have += take;
                if *have == 4 {
                    let last = u32::from_be_bytes(*id) & PROVISIONAL_LAST_STREAM;
                    final_goaway |= last != PROVISIONAL_LAST_STREAM;
                    self.goaway = None;
                }
            }
            // n <= remaining, which is a u32.
            self.remaining -= u32::try_from(n).unwrap_or(u32::MAX);
            bytes = &bytes[n..];
        }
        final_goaway
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn goaway(last: u32) -> Vec<u8> {
        let mut p = last.to_be_bytes().to_vec();
        p.extend_from_slice(&0u32.to_be_bytes());
        frame(GOAWAY, 0, &p)
    }

    /// The two phases of a drain, with DATA and a PING around them.
    fn drain_bytes() -> Vec<u8> {
        let mut b = frame(4, 0, &[]);
        b.extend(frame(0, 1, &[7; 100]));
        b.extend(goaway(PROVISIONAL_LAST_STREAM));
        b.extend(frame(6, 0, &[1; 8]));
        b.extend(frame(0, 1, &[7; 33]));
        b.extend(goaway(1));
        b
    }

    #[test]
    fn only_the_final_goaway_counts_whole_or_in_pieces() {
        let bytes = drain_bytes();
        let final_at = bytes.len() - 17 + 9 + 4;
        // Every way of splitting the stream into two writes, and one byte
        // per write: the final GOAWAY is reported once, by the write that
        // completes its last stream id.
        for split in 0..=bytes.len() {
            let mut s = FrameScanner::default();
            let (a, b) = bytes.split_at(split);
            let (fa, fb) = (s.feed(a), s.feed(b));
            assert_eq!(
                (fa, fb),
                (split >= final_at, split < final_at),
                "split at {split}"
            );
        }
        let mut s = FrameScanner::default();
        let seen: Vec<usize> = bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| s.feed(std::slice::from_ref(b)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(seen, vec![final_at - 1]);
    }

    #[test]
    fn the_provisional_goaway_alone_is_not_final() {
        let mut s = FrameScanner::default();
        let mut b = frame(4, 0, &[]);
        b.extend(goaway(PROVISIONAL_LAST_STREAM));
        b.extend(frame(6, 0, &[1; 8]));
        assert!(!s.feed(&b));
        // A GOAWAY(0) — nothing processed — is final too.
        assert!(s.feed(&goaway(0)));
    }

    #[test]
    fn goaway_bytes_inside_a_payload_are_payload() {
        let mut s = FrameScanner::default();
        let mut b = frame(0, 1, &goaway(3));
        b.extend(frame(1, 1, &goaway(5)));
        assert!(!s.feed(&b));
    }
}
