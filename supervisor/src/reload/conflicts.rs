//! Dependency conflicts across plugins: packages blocked until another
//! plugin switches (tried again after every switch), the conflicts that
//! stand among the active versions (`plugvisor status`,
//! `plugvisor_dependency_conflicts`), and the order a start or rescan
//! takes packages in.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use semver::Version;

use super::{AttemptOutcome, ReloadOptions, Reloader};
use crate::catalog::{self, Manifest};
use crate::dependencies::{self as deps, Conflict, ConflictKind};

/// A dependency conflict as `plugvisor status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandingConflict {
    /// The plugin the conflict holds back or concerns.
    pub plugin: String,
    /// Its kind.
    pub kind: ConflictKind,
    /// In words, with what serves meanwhile.
    pub message: String,
}

/// A package that waits on other plugins: its version and what blocks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Blocked {
    pub(super) version: Version,
    pub(super) conflicts: Vec<Conflict>,
}

impl Blocked {
    /// The same package blocked by the same conflicts (plugin, kind and
    /// other plugin), whatever their wording.
    pub(super) fn same_as(&self, other: &Blocked) -> bool {
        self.version == other.version
            && self.conflicts.len() == other.conflicts.len()
            && self
                .conflicts
                .iter()
                .zip(&other.conflicts)
                .all(|(a, b)| a.key() == b.key())
    }
}

impl Reloader {
    /// Tries every package that waits on other plugins again, until a
    /// pass switches none (each switch may unblock another).
    pub(super) fn retry_blocked(&mut self) {
        loop {
            let waiting: Vec<String> = self.blocked.keys().cloned().collect();
            let mut switched = false;
            for plugin in waiting {
                let options = ReloadOptions {
                    force: true,
                    allow_downgrade_to: None,
                };
                let report = self.attempt(&plugin, &options, true);
                switched |= report.outcome == AttemptOutcome::Success;
            }
            if !switched {
                return;
            }
        }
    }

    /// Dependency declarations of the active version of every plugin.
    pub(super) fn active_set(&mut self) -> deps::Set {
        let mut set = deps::Set::new();
        let actives: Vec<(String, Arc<crate::slot::Installed>)> = self
            .slots
            .iter()
            .filter_map(|(name, slot)| slot.active().map(|a| (name.clone(), a)))
            .collect();
        for (name, active) in actives {
            let sha = active.loaded.sha256().to_owned();
            let node = if let Some(n) = self.nodes.get(&sha) {
                n.clone()
            } else {
                // Started from the store, or switched to by a rollback: the
                // manifest it was activated with is kept beside the object.
                let path = self.store.manifest_path(&sha);
                let node = self
                    .store
                    .manifest(&sha)
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|t| Manifest::parse(&t, &path).ok())
                    .map_or_else(
                        || {
                            deps::Node::standalone(
                                active.loaded.version().clone(),
                                plugvisor_sdk::ABI_VERSION,
                            )
                        },
                        |m| node_of(&m),
                    );
                self.nodes.insert(sha, node.clone());
                node
            };
            set.insert(name, node);
        }
        set
    }

    /// Resolves the dependencies of the active versions again and publishes
    /// `plugvisor_dependency_conflicts`: 1 for every (plugin, kind) that a
    /// standing conflict or a blocked package has, 0 for those that had one
    /// and no longer do. The reload path calls it after every attempt;
    /// anything else that changes an active version (a rollback that swaps
    /// to a mapped version) must call it too.
    pub fn refresh_dependency_conflicts(&mut self) {
        let set = self.active_set();
        self.standing = deps::resolve(&set, plugvisor_sdk::ABI_VERSION);
        let mut now: BTreeSet<(String, ConflictKind)> = self
            .standing
            .iter()
            .map(|c| (c.plugin.clone(), c.kind))
            .collect();
        for (plugin, b) in &self.blocked {
            now.extend(b.conflicts.iter().map(|c| (plugin.clone(), c.kind)));
        }
        for (plugin, kind) in self.conflict_series.difference(&now) {
            self.metrics.dependency_conflict(plugin, *kind, false);
        }
        for (plugin, kind) in &now {
            self.metrics.dependency_conflict(plugin, *kind, true);
        }
        self.conflict_series = now;
    }

    /// The dependency conflicts that stand now, in words: packages that
    /// wait on other plugins, and conflicts among the active versions.
    pub fn dependency_conflicts(&self) -> Vec<StandingConflict> {
        let mut out = Vec::new();
        for (plugin, b) in &self.blocked {
            let serving = self
                .slots
                .get(plugin)
                .and_then(|s| s.active())
                .map_or_else(|| "nothing".to_owned(), |a| a.version().to_owned());
            for c in &b.conflicts {
                out.push(StandingConflict {
                    plugin: plugin.clone(),
                    kind: c.kind,
                    message: format!(
                        "package {} waits: {}; {serving} serves meanwhile",
                        b.version, c.message
                    ),
                });
            }
        }
        for c in &self.standing {
            out.push(StandingConflict {
                plugin: c.plugin.clone(),
                kind: c.kind,
                message: format!("active versions: {}", c.message),
            });
        }
        out
    }

    /// `plugins` reordered so that a plugin comes after the plugins its
    /// package requires (when both are in the list), otherwise keeping
    /// their order. A start or a rescan then takes `codec` before the
    /// `echo` that needs it, instead of refusing `echo` first and taking
    /// it on the retry. Unreadable packages and cycles keep their place.
    pub fn in_dependency_order(&self, plugins: &[String]) -> Vec<String> {
        fn visit(
            p: &str,
            requires: &HashMap<String, Vec<String>>,
            seen: &mut BTreeSet<String>,
            out: &mut Vec<String>,
        ) {
            if !seen.insert(p.to_owned()) {
                return;
            }
            for d in requires.get(p).into_iter().flatten() {
                if requires.contains_key(d) {
                    visit(d, requires, seen, out);
                }
            }
            out.push(p.to_owned());
        }
        let requires: HashMap<String, Vec<String>> = plugins
            .iter()
            .map(|p| {
                let deps = catalog::read_package(&self.plugins_dir, p)
                    .map(|pkg| pkg.manifest.requires.keys().cloned().collect())
                    .unwrap_or_default();
                (p.clone(), deps)
            })
            .collect();
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(plugins.len());
        for p in plugins {
            visit(p, &requires, &mut seen, &mut out);
        }
        out
    }
}

/// What the resolver needs from a manifest.
pub(super) fn node_of(m: &Manifest) -> deps::Node {
    deps::Node {
        version: m.version.clone(),
        abi: m.abi,
        requires: m.requires.clone(),
        conflicts: m.conflicts.clone(),
    }
}
