//! Watches `plugins_dir` (debounced) and reports which packages changed.
//!
//! Only the package name is reported; the reload path re-reads the manifest
//! and does nothing when its bytes are what it already acted on, so writes
//! of a library alone, editor temp files and event storms cost a stat and a
//! hash of a small file, never a load.
//!
//! A storm can overflow the kernel's inotify queue: events are then lost,
//! and notify says so with a "rescan" event (or an error). Then every
//! package directory is reported, so a manifest committed inside the lost
//! events is still seen.
//!
//! Events that only say a file was opened or read are ignored: the reload
//! path reads the files it is told about, and acting on its own reads
//! would re-read every package every debounce period, forever.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

/// Keeps the watcher alive; dropping it stops watching.
pub struct Watcher {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

/// Why the watcher could not start.
#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {source}")]
pub struct WatchError {
    /// The directory.
    pub path: PathBuf,
    /// notify's error.
    pub source: notify::Error,
}

/// Starts watching `plugins_dir`; changed package names arrive on `tx`.
pub fn start(
    plugins_dir: &Path,
    debounce: Duration,
    tx: mpsc::UnboundedSender<BTreeSet<String>>,
) -> Result<Watcher, WatchError> {
    let root = plugins_dir
        .canonicalize()
        .unwrap_or_else(|_| plugins_dir.to_owned());
    let root_for_events = root.clone();
    let mut debouncer =
        new_debouncer(
            debounce,
            None,
            move |result: DebounceEventResult| match result {
                Ok(events) => {
                    let names: BTreeSet<String> = if events.iter().any(|e| e.need_rescan()) {
                        tracing::warn!("plugins_dir watcher lost events; rescanning every package");
                        all_packages(&root_for_events)
                    } else {
                        events
                            .iter()
                            .filter(|e| may_change_content(&e.kind))
                            .flat_map(|e| e.paths.iter())
                            .filter_map(|p| package_of(&root_for_events, p))
                            .collect()
                    };
                    if !names.is_empty() {
                        let _ = tx.send(names);
                    }
                }
                Err(errors) => {
                    for e in errors {
                        tracing::warn!(error = %e, "plugins_dir watcher error; rescanning every package");
                    }
                    let _ = tx.send(all_packages(&root_for_events));
                }
            },
        )
        .map_err(|source| WatchError {
            path: root.clone(),
            source,
        })?;
    debouncer
        .watch(&root, RecursiveMode::Recursive)
        .map_err(|source| WatchError {
            path: root.clone(),
            source,
        })?;
    Ok(Watcher {
        _debouncer: debouncer,
    })
}

/// Whether an event of this kind may mean the bytes or the names changed:
/// everything but an open or a close after reading.
pub fn may_change_content(kind: &EventKind) -> bool {
    !matches!(kind, EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

/// Every entry of `root` (the reload path skips those without a manifest).
fn all_packages(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The package directory name a path under `root` belongs to.
fn package_of(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let first = rel.components().next()?;
    first.as_os_str().to_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_not_changes() {
        use notify::event::{CreateKind, ModifyKind};
        assert!(!may_change_content(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(may_change_content(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(may_change_content(&EventKind::Create(CreateKind::File)));
        assert!(may_change_content(&EventKind::Modify(ModifyKind::Any)));
    }

    #[test]
    fn package_names_from_paths() {
        let root = Path::new("/p");
        assert_eq!(
            package_of(root, Path::new("/p/echo/plugin.toml")).as_deref(),
            Some("echo")
        );
        assert_eq!(
            package_of(root, Path::new("/p/echo")).as_deref(),
            Some("echo")
        );
        assert_eq!(package_of(root, Path::new("/elsewhere/x")), None);
        assert_eq!(package_of(root, Path::new("/p")), None);
    }
}
