//! Watches `plugins_dir` (through [`crate::fswatch`]) and reports which
//! packages changed.
//!
//! Only the package name is reported; the reload path re-reads the manifest
//! and does nothing when its bytes are what it already acted on, so writes
//! of a library alone, editor temp files and event storms cost a stat and a
//! hash of a small file, never a load.
//!
//! When the watcher lost events (an overflowed inotify queue, a watcher
//! error), every package directory is reported, so a manifest committed
//! inside the lost events is still seen.
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::fswatch::{self, Change, WatchError, Watcher};

/// Starts watching `plugins_dir`; changed package names arrive on `tx`.
pub fn start(
    plugins_dir: &Path,
    debounce: Duration,
    tx: mpsc::UnboundedSender<BTreeSet<String>>,
) -> Result<Watcher, WatchError> {
    let root = plugins_dir
        .canonicalize()
        .unwrap_or_else(|_| plugins_dir.to_owned());
    let events_root = root.clone();
    fswatch::watch(&root, true, debounce, move |change| {
        let names: BTreeSet<String> = match change {
            Change::Paths(paths) => paths
                .iter()
                .filter_map(|p| package_of(&events_root, p))
                .collect(),
            Change::Lost(why) => {
                tracing::warn!(%why, "plugins_dir watcher lost events; rescanning every package");
                all_packages(&events_root)
            }
        };
        if !names.is_empty() {
            let _ = tx.send(names);
        }
    })
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
