//! What a release is in a TUF repository: the custom metadata plugvisor
//! puts in the `custom` field of a release's manifest target (TUF 1.0
//! §4.5 — nothing outside the specification), and how a node decides which
//! release is meant for it now.
//!
//! A release is a plugin package as three (or two) targets,
//! `PLUGIN/VERSION/plugin.toml`, `PLUGIN/VERSION/<library>` and, when the
//! fleet signs packages too, `PLUGIN/VERSION/plugin.toml.sig`. The manifest
//! target carries `custom.plugvisor`, a [`Release`]: which plugin and
//! version, the names of its files, the nodes it is for, its waves, and a
//! sequence number. Every release ever published may stay listed; what a
//! node takes is [`desired`]: of the releases of a plugin meant for it
//! (its name or labels match) whose wave has reached it, the one published
//! last (the highest sequence). A rollback is a new targets version that
//! publishes an older release again with a new, higher sequence: the
//! fleet's explicit, signed downgrade.
//!
//! Waves follow Bottlerocket's: each node has a seed in `[0, 2048)`; a wave
//! says "nodes whose seed is below N may take it from time T". A release
//! without waves reaches every node it is for at once.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The key under a target's `custom` field.
pub const CUSTOM_KEY: &str = "plugvisor";

/// Seeds are in `[0, SEEDS)`.
pub const SEEDS: u32 = crate::config::ROLLOUT_SEEDS;

/// A release, as its manifest target's `custom.plugvisor` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The plugin.
    pub plugin: String,
    /// Its version (the manifest's).
    pub version: semver::Version,
    /// The target names of the package's files.
    pub files: ReleaseFiles,
    /// The nodes it is for (empty: every node).
    #[serde(default)]
    pub nodes: NodeSelector,
    /// When nodes may take it, by seed (empty: all at once).
    #[serde(default)]
    pub waves: Vec<Wave>,
    /// Publication order: a node takes the applicable release with the
    /// highest.
    pub sequence: u64,
}

/// The target names of a release's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseFiles {
    /// `plugin.toml`.
    pub manifest: String,
    /// The library, named as in the manifest's `library`.
    pub library: String,
    /// `plugin.toml.sig`, when the package is signed.
    #[serde(default)]
    pub signature: Option<String>,
}

/// Which nodes a release is for: a node matches when its name is listed,
/// or when it carries every label given. Both empty: every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSelector {
    /// Node names (node groups written out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Labels every matching node carries.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// One wave of a staged rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// Nodes whose seed is below this (1 ..= 2048) are in this wave or an
    /// earlier one.
    pub seeds_below: u32,
    /// When this wave starts (RFC 3339).
    pub start: jiff::Timestamp,
}

/// What a node is, for the selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its seed, in `[0, SEEDS)`.
    pub seed: u32,
}

impl Node {
    /// The seed a node name gives when the config sets none: stable, so
    /// an operator can tell which nodes a wave takes, and spread evenly.
    pub fn seed_of(name: &str) -> u32 {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(name.as_bytes());
        u32::from(u16::from_be_bytes([d[0], d[1]])) % SEEDS
    }
}

impl NodeSelector {
    /// Whether `node` is one of these.
    pub fn matches(&self, node: &Node) -> bool {
        let named = self.names.is_empty() || self.names.contains(&node.name);
        let labelled = self
            .labels
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v));
        if self.names.is_empty() || self.labels.is_empty() {
            named && labelled
        } else {
            // Both given: either way in.
            self.names.contains(&node.name) || labelled
        }
    }
}

impl Release {
    /// When this release reaches `node`: `Some(None)` at once (no waves),
    /// `Some(Some(t))` from `t`, `None` never (its seed is in no wave).
    pub fn reaches(&self, node: &Node) -> Option<Option<jiff::Timestamp>> {
        if self.waves.is_empty() {
            return Some(None);
        }
        self.waves
            .iter()
            .filter(|w| node.seed < w.seeds_below)
            .map(|w| w.start)
            .min()
            .map(Some)
    }

    /// Checks what a publisher could get wrong: wave bounds, file names
    /// under `PLUGIN/VERSION/`.
    pub fn check(&self) -> Result<(), String> {
        for w in &self.waves {
            if w.seeds_below == 0 || w.seeds_below > SEEDS {
                return Err(format!(
                    "a wave's seeds_below is {}; it must be in 1 ..= {SEEDS}",
                    w.seeds_below
                ));
            }
        }
        let dir = format!("{}/{}/", self.plugin, self.version);
        let names = [Some(&self.files.manifest), Some(&self.files.library)]
            .into_iter()
            .chain([self.files.signature.as_ref()]);
        for name in names.flatten() {
            let rest = name.strip_prefix(&dir).unwrap_or_default();
            if rest.is_empty() || rest.contains('/') || rest.starts_with('.') {
                return Err(format!("target {name:?} is not a file under {dir}"));
            }
        }
        Ok(())
    }
}

/// The release of `plugin` meant for `node` at `now`, of `releases` (each
/// already read from its target's custom metadata): among those for this
/// node that have reached it, the one with the highest sequence.
pub fn desired<'a>(
    releases: impl IntoIterator<Item = &'a Release>,
    plugin: &str,
    node: &Node,
    now: jiff::Timestamp,
) -> Option<&'a Release> {
    releases
        .into_iter()
        .filter(|r| r.plugin == plugin && r.nodes.matches(node))
        .filter(|r| {
            matches!(r.reaches(node), Some(None))
                || r.reaches(node).flatten().is_some_and(|t| t <= now)
        })
        .max_by_key(|r| r.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str, sequence: u64) -> Release {
        Release {
            plugin: "echo".into(),
            version: version.parse().unwrap(),
            files: ReleaseFiles {
                manifest: format!("echo/{version}/plugin.toml"),
                library: format!("echo/{version}/libecho.so"),
                signature: None,
            },
            nodes: NodeSelector::default(),
            waves: Vec::new(),
            sequence,
        }
    }

    fn node(name: &str, seed: u32, labels: &[(&str, &str)]) -> Node {
        Node {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            seed,
        }
    }

    #[test]
    fn the_last_published_release_that_reached_the_node_is_desired() {
        let now: jiff::Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let old = release("1.0.0", 1);
        let mut new = release("1.1.0", 2);
        new.waves = vec![
            Wave {
                seeds_below: 20,
                start: "2026-12-07T11:00:00Z".parse().unwrap(),
            },
            Wave {
                seeds_below: SEEDS,
                start: "2026-12-08T11:00:00Z".parse().unwrap(),
            },
        ];
        let all = [old.clone(), new.clone()];
        let early = node("a", 3, &[]);
        let late = node("b", 1500, &[]);
        assert_eq!(desired(&all, "echo", &early, now), Some(&new));
        assert_eq!(desired(&all, "echo", &late, now), Some(&old));
        let tomorrow: jiff::Timestamp = "2026-12-08T12:00:00Z".parse().unwrap();
        assert_eq!(desired(&all, "echo", &late, tomorrow), Some(&new));
        // A rollback: 1.0.0 again, published after 1.1.0.
        let rollback = release("1.0.0", 3);
        let all = [old, new, rollback.clone()];
        assert_eq!(desired(&all, "echo", &early, now), Some(&rollback));
        assert_eq!(desired(&all, "other", &early, now), None);
    }

    #[test]
    fn selectors_match_by_name_or_by_every_label() {
        let n = node("edge-1", 0, &[("site", "plant-3"), ("arch", "arm64")]);
        let mut s = NodeSelector::default();
        assert!(s.matches(&n), "empty: every node");
        s.labels.insert("site".into(), "plant-3".into());
        assert!(s.matches(&n));
        s.labels.insert("arch".into(), "amd64".into());
        assert!(!s.matches(&n), "every label must match");
        s.names.push("edge-1".into());
        assert!(s.matches(&n), "named");
        let only_names = NodeSelector {
            names: vec!["edge-2".into()],
            labels: BTreeMap::new(),
        };
        assert!(!only_names.matches(&n));
    }

    #[test]
    fn seeds_are_stable_and_in_range_and_bad_releases_are_refused() {
        assert_eq!(Node::seed_of("edge-0042"), Node::seed_of("edge-0042"));
        assert!((0..200).all(|i| Node::seed_of(&format!("n{i}")) < SEEDS));
        let mut r = release("1.0.0", 1);
        assert!(r.check().is_ok());
        r.files.library = "echo/1.0.0/../../etc/passwd".into();
        assert!(r.check().is_err());
        let mut r = release("1.0.0", 1);
        r.waves.push(Wave {
            seeds_below: 0,
            start: jiff::Timestamp::UNIX_EPOCH,
        });
        assert!(r.check().is_err());
    }
}
