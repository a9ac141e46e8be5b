//! The outbox: every event on disk from before it is published until the
//! broker's PUBACK, so a broker outage, a restart or a `kill -9` loses
//! nothing (rumqttc keeps its in-flight packets only in memory).
//!
//! Two files under `state_dir/report/`:
//! - `outbox`: records appended and fsynced, each `len u32 | crc32 u32 |
//!   sequence u64 | journal_end u64 | payload` (little-endian; the CRC
//!   covers what follows it). A torn tail — a `kill -9` mid-append — fails
//!   its length or CRC and is cut off at the next open.
//! - `cursor` (JSON, replaced by rename, fsynced): the next sequence
//!   number, how far into the journal events have been taken, and the
//!   sequence up to which every event is acknowledged or dropped. Written
//!   before the outbox is compacted and when the bound drops events, so
//!   what the cursor says and what the outbox holds never both forget an
//!   event, and a sequence number is never handed out twice.
//! - `acked` (the highest sequence acknowledged, replaced by rename, not
//!   fsynced): a hint that spares a restart from sending again what the
//!   broker already has. Lost or torn in a crash, it costs duplicates
//!   (QoS 1 allows them, consumers drop them by sequence), never an event;
//!   and it keeps an acknowledgement from costing fsyncs, so the outbox's
//!   one fsync per event is all reporting adds to the disk.
//!
//! The bound (`outbox_max_bytes`) counts the events not yet acknowledged;
//! past it the oldest are dropped and counted. Sequence numbers never go
//! back, so a consumer sees a drop as a gap.
use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ReportError;

const OUTBOX: &str = "outbox";
const CURSOR: &str = "cursor";
const ACKED: &str = "acked";
/// The outbox file is compacted once it is this large (and mostly done).
const COMPACT_AT: u64 = 64 << 10;
/// `len`, `crc32`, `sequence`, `journal_end`.
const HEADER: usize = 4 + 4 + 8 + 8;
/// A record larger than this is not one the daemon wrote.
const MAX_RECORD: u32 = 1 << 20;

/// An event waiting for its PUBACK.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its sequence number.
    pub sequence: u64,
    /// The journal offset just past the entry it came from.
    pub journal_end: u64,
    /// The encoded `plugvisor.report.v1.Event`.
    pub payload: Vec<u8>,
}

impl Record {
    fn size(&self) -> u64 {
        (HEADER + self.payload.len()) as u64
    }
}

/// What the cursor file keeps.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Cursor {
    next_sequence: u64,
    journal_offset: u64,
    done_through: u64,
}

/// The outbox of one node (`state_dir/report`).
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    file: File,
    file_len: u64,
    pending: VecDeque<Record>,
    pending_bytes: u64,
    // Acknowledged out of order, ahead of `cursor.done_through`.
    acked_ahead: BTreeSet<u64>,
    cursor: Cursor,
    max_bytes: u64,
    fresh: bool,
}

impl Outbox {
    /// Opens (creating) the outbox under `dir`; a torn last record is cut
    /// off, and past `max_bytes` the oldest are dropped (the count is
    /// returned with the outbox).
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Outbox, u64), ReportError> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let cursor_path = dir.join(CURSOR);
        let (cursor, fresh) = match std::fs::read(&cursor_path) {
            Ok(bytes) => (
                serde_json::from_slice(&bytes).map_err(|e| ReportError::Outbox {
                    action: "parsing",
                    path: cursor_path.clone(),
                    message: e.to_string(),
                })?,
                false,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Cursor::default(), true),
            Err(e) => return Err(io("reading", &cursor_path)(e)),
        };
        let path = dir.join(OUTBOX);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io("opening", &path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io("reading", &path))?;
        let (records, valid) = parse(&bytes);
        if valid < bytes.len() {
            tracing::warn!(
                file = %path.display(),
                cut_bytes = bytes.len() - valid,
                "report outbox: cut off from the first record that does not check (a stop mid-write, or damage)"
            );
            file.set_len(valid as u64)
                .and_then(|()| file.sync_data())
                .map_err(io("truncating", &path))?;
        }
        let mut outbox = Outbox {
            dir: dir.to_owned(),
            file,
            file_len: valid as u64,
            pending: VecDeque::new(),
            pending_bytes: 0,
            acked_ahead: BTreeSet::new(),
            cursor,
            max_bytes,
            fresh: fresh && records.is_empty(),
        };
        outbox.cursor.next_sequence = outbox.cursor.next_sequence.max(1);
        if let Some(hint) = std::fs::read_to_string(dir.join(ACKED))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
        {
            outbox.cursor.done_through = outbox.cursor.done_through.max(hint);
        }
        for r in records {
            outbox.cursor.next_sequence = outbox.cursor.next_sequence.max(r.sequence + 1);
            outbox.cursor.journal_offset = outbox.cursor.journal_offset.max(r.journal_end);
            if r.sequence > outbox.cursor.done_through {
                outbox.pending_bytes += r.size();
                outbox.pending.push_back(r);
            }
        }
        let dropped = outbox.bound()?;
        Ok((outbox, dropped))
    }

    /// Whether this outbox was made just now (no cursor, no records): the
    /// reporter then starts at the journal's end rather than replaying a
    /// node's whole history.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// How far into the journal events have been taken.
    pub fn journal_offset(&self) -> u64 {
        self.cursor.journal_offset
    }

    /// Starts taking the journal at `offset` (a fresh outbox, or a journal
    /// that is shorter than the offset: replaced or cut).
    pub fn set_journal_offset(&mut self, offset: u64) -> Result<(), ReportError> {
        self.cursor.journal_offset = offset;
        self.fresh = false;
        self.write_cursor()
    }

    /// The sequence number the next event gets.
    pub fn next_sequence(&self) -> u64 {
        self.cursor.next_sequence
    }

    /// Appends the event `payload(sequence)` for the journal entry that
    /// ends at `journal_end`, fsynced before it returns. Returns its
    /// sequence and how many old events the bound dropped for it.
    pub fn push(
        &mut self,
        journal_end: u64,
        payload: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<(u64, u64), ReportError> {
        let sequence = self.cursor.next_sequence;
        let record = Record {
            sequence,
            journal_end,
            payload: payload(sequence),
        };
        let bytes = encode(&record);
        let path = self.dir.join(OUTBOX);
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Best effort: a half-written record would be cut at the next
            // open anyway; cutting it now keeps later appends readable.
            let _ = self.file.set_len(self.file_len);
            return Err(io("appending to", &path)(e));
        }
        self.file_len += bytes.len() as u64;
        self.cursor.next_sequence = sequence + 1;
        self.cursor.journal_offset = journal_end;
        self.pending_bytes += record.size();
        self.pending.push_back(record);
        let dropped = self.bound()?;
        Ok((sequence, dropped))
    }

    /// The events not yet acknowledged, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &Record> {
        self.pending.iter()
    }

    /// How many events wait for a PUBACK.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none does.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The broker acknowledged `sequence`: it leaves the outbox (with every
    /// older one it already acknowledged). The file is compacted once
    /// nothing waits, or once most of it is acknowledged.
    pub fn ack(&mut self, sequence: u64) -> Result<(), ReportError> {
        if sequence <= self.cursor.done_through {
            return Ok(());
        }
        self.acked_ahead.insert(sequence);
        while let Some(front) = self.pending.front() {
            if !self.acked_ahead.remove(&front.sequence) {
                break;
            }
            self.cursor.done_through = front.sequence;
            self.pending_bytes -= front.size();
            self.pending.pop_front();
        }
        self.write_acked();
        self.compact()
    }

    /// The acknowledged hint, without an fsync (see the module doc).
    fn write_acked(&self) {
        let tmp = self.dir.join(format!("{ACKED}.tmp"));
        let written = std::fs::write(&tmp, self.cursor.done_through.to_string())
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(ACKED)));
        if let Err(e) = written {
            tracing::debug!(error = %e, "report outbox: cannot record the acknowledged hint");
        }
    }

    /// Drops the oldest events past the bound; how many.
    fn bound(&mut self) -> Result<u64, ReportError> {
        let mut dropped = 0;
        while self.pending_bytes > self.max_bytes {
            let Some(old) = self.pending.pop_front() else {
                break;
            };
            self.pending_bytes -= old.size();
            self.cursor.done_through = old.sequence;
            self.acked_ahead.retain(|&s| s > old.sequence);
            dropped += 1;
        }
        if dropped > 0 {
            // Said at once: a restart must not drop (and count) them again.
            self.write_cursor()?;
            self.compact()?;
        }
        Ok(dropped)
    }

    /// Rewrites the file without what is done when that is most of it.
    fn compact(&mut self) -> Result<(), ReportError> {
        let live = self.pending_bytes;
        if self.file_len < COMPACT_AT.max(2 * live) {
            return Ok(());
        }
        // The cursor first: once the file forgets a record, the cursor
        // still says how far the journal was taken and which sequence is
        // next.
        self.write_cursor()?;
        let path = self.dir.join(OUTBOX);
        if self.pending.is_empty() {
            self.file
                .set_len(0)
                .and_then(|()| self.file.sync_data())
                .map_err(io("truncating", &path))?;
            self.file_len = 0;
            return Ok(());
        }
        let tmp = self.dir.join(format!("{OUTBOX}.tmp"));
        let mut bytes = Vec::with_capacity(usize::try_from(live).unwrap_or(0));
        for r in &self.pending {
            bytes.extend_from_slice(&encode(r));
        }
        write_synced(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path).map_err(io("replacing", &path))?;
        sync_dir(&self.dir)?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io("opening", &path))?;
        self.file_len = bytes.len() as u64;
        Ok(())
    }

    fn write_cursor(&self) -> Result<(), ReportError> {
        let path = self.dir.join(CURSOR);
        let tmp = self.dir.join(format!("{CURSOR}.tmp"));
        let bytes = serde_json::to_vec(&self.cursor).expect("the cursor serialises");
        write_synced(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path).map_err(io("replacing", &path))?;
        sync_dir(&self.dir)
    }
}

fn encode(r: &Record) -> Vec<u8> {
    let len = u32::try_from(r.payload.len()).expect("an event is far below 4 GiB");
    let mut body = Vec::with_capacity(16 + r.payload.len());
    body.extend_from_slice(&r.sequence.to_le_bytes());
    body.extend_from_slice(&r.journal_end.to_le_bytes());
    body.extend_from_slice(&r.payload);
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The whole records in `bytes`, and where the valid part ends.
fn parse(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let word = |o: usize| u32::from_le_bytes(bytes[at + o..at + o + 4].try_into().unwrap());
        let len = word(0);
        if len > MAX_RECORD || bytes.len() - at - 8 < 16 + len as usize {
            break;
        }
        let body = &bytes[at + 8..at + 8 + 16 + len as usize];
        if crc32fast::hash(body) != word(4) {
            break;
        }
        records.push(Record {
            sequence: u64::from_le_bytes(body[..8].try_into().unwrap()),
            journal_end: u64::from_le_bytes(body[8..16].try_into().unwrap()),
            payload: body[16..].to_vec(),
        });
        at += 8 + body.len();
    }
    (records, at)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let mut f = File::create(path).map_err(io("creating", path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io("writing", path))
}

fn sync_dir(dir: &Path) -> Result<(), ReportError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ReportError + 'a {
    move |e| ReportError::Outbox {
        action,
        path: path.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(o: &mut Outbox, end: u64) -> u64 {
        o.push(end, |s| format!("event {s}").into_bytes())
            .unwrap()
            .0
    }

    fn sequences(o: &Outbox) -> Vec<u64> {
        o.pending().map(|r| r.sequence).collect()
    }

    #[test]
    fn events_survive_a_reopen_until_acknowledged_and_numbers_never_go_back() {
        let t = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(t.path(), 1 << 20).unwrap();
        assert!(o.fresh());
        assert_eq!(push(&mut o, 10), 1);
        assert_eq!(push(&mut o, 20), 2);
        assert_eq!(push(&mut o, 30), 3);
        o.ack(1).unwrap();
        drop(o);
        let (mut o, dropped) = Outbox::open(t.path(), 1 << 20).unwrap();
        assert_eq!(dropped, 0);
        assert!(!o.fresh());
        assert_eq!(sequences(&o), [2, 3]);
        assert_eq!(o.journal_offset(), 30);
        o.ack(2).unwrap();
        o.ack(3).unwrap();
        assert!(o.is_empty());
        drop(o);
        let (o, _) = Outbox::open(t.path(), 1 << 20).unwrap();
        assert!(o.is_empty());
        assert_eq!(o.next_sequence(), 4);
        drop(o);
        // The acknowledged hint lost (a crash before it reached the disk):
        // the events come again — duplicates, never a loss or a reused
        // number.
        std::fs::remove_file(t.path().join(ACKED)).unwrap();
        let (mut o, _) = Outbox::open(t.path(), 1 << 20).unwrap();
        assert_eq!(sequences(&o), [1, 2, 3]);
        assert_eq!(push(&mut o, 40), 4);
    }

    #[test]
    fn a_large_done_outbox_is_compacted_and_the_cursor_remembers() {
        let t = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(t.path(), 1 << 20).unwrap();
        let big = vec![7u8; 1024];
        let mut last = 0;
        for end in 1..=80 {
            last = o.push(end * 100, |_| big.clone()).unwrap().0;
            o.ack(last).unwrap();
        }
        let len = std::fs::metadata(t.path().join(OUTBOX)).unwrap().len();
        assert!(len < COMPACT_AT, "compacted: {len} bytes");
        // Nothing left to say about the acknowledged ones, even without the
        // hint: the durable cursor was written before the file was cut.
        drop(o);
        std::fs::remove_file(t.path().join(ACKED)).unwrap();
        let (o, _) = Outbox::open(t.path(), 1 << 20).unwrap();
        assert!(o.pending().all(|r| r.sequence > 60), "{:?}", sequences(&o));
        assert_eq!(o.next_sequence(), last + 1);
        assert_eq!(o.journal_offset(), 8000);
    }

    #[test]
    fn a_torn_last_record_is_cut_and_the_rest_kept() {
        let t = tempfile::tempdir().unwrap();
        let (mut o, _) = Outbox::open(t.path(), 1 << 20).unwrap();
        push(&mut o, 10);
        push(&mut o, 20);
        drop(o);
        let path = t.path().join(OUTBOX);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[7, 0, 0, 0, 1, 2]);
        std::fs::write(&path, &bytes).unwrap();
        let (mut o, _) = Outbox::open(t.path(), 1 << 20).unwrap();
        assert_eq!(sequences(&o), [1, 2]);
        assert_eq!(push(&mut o, 30), 3);
        drop(o);
        // A damaged record (here its length) is where the readable part
        // ends: it and what follows are cut, what precedes is kept.
        let mut bytes = std::fs::read(&path).unwrap();
        let second = HEADER + "event 1".len() + 3;
        bytes[second] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (o, _) = Outbox::open(t.path(), 1 << 20).unwrap();
        assert_eq!(sequences(&o), [1]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (HEADER + "event 1".len()) as u64
        );
    }

    #[test]
    fn past_the_bound_the_oldest_are_dropped_and_counted() {
        let t = tempfile::tempdir().unwrap();
        let one = (HEADER + "event 1".len()) as u64;
        let (mut o, _) = Outbox::open(t.path(), 3 * one).unwrap();
        let mut dropped = 0;
        for end in 1..=5 {
            dropped += o
                .push(end, |s| format!("event {s}").into_bytes())
                .unwrap()
                .1;
        }
        assert_eq!(dropped, 2);
        assert_eq!(sequences(&o), [3, 4, 5]);
        drop(o);
        let (o, dropped) = Outbox::open(t.path(), 3 * one).unwrap();
        assert_eq!(dropped, 0);
        assert_eq!(sequences(&o), [3, 4, 5]);
        assert_eq!(o.next_sequence(), 6);
        // A smaller bound at the next start drops more, oldest first.
        drop(o);
        let (o, dropped) = Outbox::open(t.path(), one).unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(sequences(&o), [5]);
    }
}
