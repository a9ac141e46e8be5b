//! The one debounced file watcher: `plugins_dir` (for the catalog) and the
//! thresholds file's directory (for the rules) both go through it, so the
//! two agree on what counts as a change and on what a lost event means.
//!
//! What it reports is paths, not meanings: each user turns them into what
//! it acts on (a package name, "the thresholds file changed").
//!
//! Events that only say a file was opened or read are dropped here: the
//! daemon reads the files it is told about, and acting on its own reads
//! would re-read them every debounce period, forever.
//!
//! A storm can overflow the kernel's inotify queue: events are then lost,
//! and notify says so with a "rescan" event (or an error). That is
//! reported as [`Change::Lost`], so the user can look at everything
//! instead of trusting a partial list.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

/// Keeps a watch alive; dropping it stops watching.
pub struct Watcher {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

/// Why a watch could not start.
#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {source}")]
pub struct WatchError {
    /// The directory.
    pub path: PathBuf,
    /// notify's error.
    pub source: notify::Error,
}

/// What one debounce period saw.
#[derive(Debug)]
pub enum Change {
    /// Paths whose bytes or names may have changed.
    Paths(BTreeSet<PathBuf>),
    /// Events were lost (queue overflow or a watcher error, named here):
    /// anything under the watch may have changed.
    Lost(String),
}

/// Watches `dir` (and, if `recursive`, everything under it), calling
/// `on_change` once per debounce period that saw a change. Not called for
/// a period that saw only reads.
pub fn watch(
    dir: &Path,
    recursive: bool,
    debounce: Duration,
    mut on_change: impl FnMut(Change) + Send + 'static,
) -> Result<Watcher, WatchError> {
    let err = |source| WatchError {
        path: dir.to_owned(),
        source,
    };
    let mut debouncer =
        new_debouncer(
            debounce,
            None,
            move |result: DebounceEventResult| match result {
                Ok(events) => {
                    if events.iter().any(|e| e.need_rescan()) {
                        on_change(Change::Lost("the kernel's event queue overflowed".into()));
                        return;
                    }
                    let paths: BTreeSet<PathBuf> = events
                        .iter()
                        .filter(|e| may_change_content(e.kind))
                        .flat_map(|e| e.paths.iter().cloned())
                        .collect();
                    if !paths.is_empty() {
                        on_change(Change::Paths(paths));
                    }
                }
                Err(errors) => {
                    let why: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    on_change(Change::Lost(why.join("; ")));
                }
            },
        )
        .map_err(err)?;
    let mode = if recursive {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    debouncer.watch(dir, mode).map_err(err)?;
    Ok(Watcher {
        _debouncer: debouncer,
    })
}

/// Whether an event of this kind may mean the bytes or the names changed:
/// everything but an open or a close after reading.
fn may_change_content(kind: EventKind) -> bool {
    !matches!(kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_not_changes() {
        use notify::event::{CreateKind, ModifyKind};
        assert!(!may_change_content(EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!may_change_content(EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(may_change_content(EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(may_change_content(EventKind::Create(CreateKind::File)));
        assert!(may_change_content(EventKind::Modify(ModifyKind::Any)));
    }
}
