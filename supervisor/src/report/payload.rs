//! The protobuf payloads (`proto/plugvisor/report/v1/report.proto`) and
//! how a journal entry, a plugin's state and a birth or death become one.
use crate::store::{JournalEntry, JournalEvent};

/// The generated `plugvisor.report.v1` messages.
#[allow(clippy::pedantic, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/plugvisor.report.v1.rs"));
}

/// The `schema_version` every payload carries (the proto's header says
/// when it changes).
pub const SCHEMA_VERSION: u32 = 1;

/// A reason longer than this is cut (with `…`): an event stays far below
/// the packet size the client and most brokers accept.
const MAX_REASON: usize = 4096;

/// The proto's kind for a journal event word; one for one, so a new
/// journal event does not compile until it has a kind on the wire.
pub fn kind(event: JournalEvent) -> pb::event::Kind {
    use pb::event::Kind;
    match event {
        JournalEvent::Activated => Kind::Activated,
        JournalEvent::Rejected => Kind::Rejected,
        JournalEvent::Failed => Kind::Failed,
        JournalEvent::KnownGood => Kind::KnownGood,
        JournalEvent::Rollback => Kind::Rollback,
        JournalEvent::Degrade => Kind::Degrade,
        JournalEvent::DegradeCleared => Kind::DegradeCleared,
        JournalEvent::Disable => Kind::Disable,
        JournalEvent::Enable => Kind::Enable,
        JournalEvent::TrialInterrupted => Kind::TrialInterrupted,
        JournalEvent::TrialResumed => Kind::TrialResumed,
        JournalEvent::CrashInLoad => Kind::CrashInLoad,
        JournalEvent::Collected => Kind::Collected,
        JournalEvent::HostCrashed => Kind::HostCrashed,
        JournalEvent::HostRestarted => Kind::HostRestarted,
        JournalEvent::Sync => Kind::Sync,
    }
}

/// The event for journal entry `e`, numbered `sequence`.
pub fn event(node: &str, sequence: u64, e: &JournalEntry) -> pb::Event {
    pb::Event {
        schema_version: SCHEMA_VERSION,
        node: node.to_owned(),
        sequence,
        timestamp_ms: e.ts_ms,
        kind: kind(e.event).into(),
        plugin: e.plugin.clone(),
        version: e.version.clone().unwrap_or_default(),
        from_version: e.from_version.clone().unwrap_or_default(),
        reason: e.reason.as_deref().map(cut).unwrap_or_default(),
        rule: e.rule.clone().unwrap_or_default(),
        observed: e.observed,
        threshold: e.threshold,
        sha256: e.sha256.clone().unwrap_or_default(),
    }
}

/// A birth (`online`) or a death (`offline`) of `node`.
pub fn node(node: &str, online: bool, birth: u64, next_sequence: u64) -> pb::Node {
    pb::Node {
        schema_version: SCHEMA_VERSION,
        node: node.to_owned(),
        status: if online {
            pb::node::Status::Online
        } else {
            pb::node::Status::Offline
        }
        .into(),
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        birth,
        timestamp_ms: crate::store::now_ms(),
        next_sequence,
    }
}

fn cut(reason: &str) -> String {
    if reason.len() <= MAX_REASON {
        return reason.to_owned();
    }
    let mut end = MAX_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn a_journal_entry_becomes_an_event_with_every_field() {
        let mut e = JournalEntry::now("echo", JournalEvent::Rollback);
        e.version = Some("2.0.0".into());
        e.from_version = Some("1.0.0".into());
        e.reason = Some("error_rate".into());
        e.rule = Some("error_rate".into());
        e.observed = Some(0.25);
        e.threshold = Some(0.05);
        let bytes = event("edge-1", 7, &e).encode_to_vec();
        let back = pb::Event::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.schema_version, SCHEMA_VERSION);
        assert_eq!(back.sequence, 7);
        assert_eq!(back.kind(), pb::event::Kind::Rollback);
        assert_eq!(back.plugin, "echo");
        assert_eq!(back.version, "2.0.0");
        assert_eq!(back.from_version, "1.0.0");
        assert_eq!(back.observed, Some(0.25));
        assert_eq!(back.threshold, Some(0.05));
        assert_eq!(back.timestamp_ms, e.ts_ms);
    }

    #[test]
    fn a_long_reason_is_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_REASON);
        let c = cut(&long);
        assert!(c.len() <= MAX_REASON + "…".len());
        assert!(c.ends_with('…'));
    }
}
