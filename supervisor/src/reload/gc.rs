//! Store garbage collection: objects no refs name and no slot maps.

use std::collections::HashSet;

use super::Reloader;
use crate::store::{JournalEntry, JournalEvent};

impl Reloader {
    /// Removes from the store every object that no refs name and no slot
    /// has mapped: libraries refused after they were staged, and versions
    /// that fell out of every plugin's bounded history. Each removal is
    /// journalled (`collected`) before the file goes, so the journal never
    /// names an object that vanished unannounced. Runs under the reloader's
    /// lock, after a rescan: no reload is staging meanwhile.
    ///
    /// The dependency declarations cached per object are pruned to the
    /// mapped versions here too: without that the cache grew by one entry
    /// per reload for the life of the process (an unmapped version's
    /// declaration is read again from its kept manifest if it returns).
    pub fn collect_garbage(&mut self) {
        let mapped: HashSet<String> = self
            .slots
            .values()
            .flat_map(|slot| slot.mapped_hashes())
            .collect();
        self.nodes.retain(|sha, _| mapped.contains(sha));
        let mut keep: HashSet<String> = HashSet::new();
        for plugin in self.store.plugins_with_refs() {
            let Ok(refs) = self.store.refs(&plugin) else {
                // Unreadable refs: keep everything rather than guess.
                return;
            };
            keep.extend(
                refs.active
                    .iter()
                    .chain(refs.known_good.iter())
                    .chain(refs.history.iter())
                    .chain(refs.quarantined.iter())
                    .map(|r| r.sha256.clone()),
            );
        }
        keep.extend(mapped);
        for sha in self.store.object_hashes() {
            if keep.contains(&sha) {
                continue;
            }
            let plugin = self
                .store
                .manifest(&sha)
                .and_then(|m| String::from_utf8(m).ok())
                .and_then(|m| m.parse::<toml::Table>().ok())
                .and_then(|t| t.get("name")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| "unknown".to_owned());
            let mut entry = JournalEntry::now(&plugin, JournalEvent::Collected);
            entry.sha256 = Some(sha.clone());
            entry.reason = Some("no refs name it and no slot maps it".to_owned());
            let removed = self
                .store
                .journal(&entry)
                .and_then(|()| self.store.remove_object(&sha));
            match removed {
                Ok(()) => {
                    tracing::debug!(plugin, sha256 = %sha, "removed an unreferenced object from the store");
                }
                Err(e) => {
                    tracing::warn!(plugin, sha256 = %sha, error = %e, "could not remove an unreferenced object");
                    return;
                }
            }
        }
    }
}
