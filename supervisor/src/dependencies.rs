//! Dependencies between plugins, resolved against the versions that are
//! active (or would be, after a switch).
//!
//! A manifest may say which other plugins it needs (`[requires]`, semver
//! ranges), which it cannot run beside (`conflicts`), and which plugin ABI
//! it implements (`abi`). None of that is a property of one package: it is
//! a property of the *set* of active versions. So the check is always over
//! a whole set — the active one with the candidate swapped in — and it runs
//! again whenever any plugin changes (a switch, a rollback, a start from
//! the store), because a change of one plugin can break or unblock another.
//!
//! Everything here is pure: sets in, conflicts out. The reload path decides
//! what a conflict means (a refused switch, a gauge at 1, a line in
//! `plugvisor status`).
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use semver::{Version, VersionReq};

/// What the resolver needs to know about one active (or candidate) version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The version.
    pub version: Version,
    /// Plugin ABI the version implements (the manifest's `abi`).
    pub abi: u32,
    /// Other plugins it needs, with the versions it accepts.
    pub requires: BTreeMap<String, VersionReq>,
    /// Plugins that must not be active beside it.
    pub conflicts: Vec<String>,
}

impl Node {
    /// A version that needs nothing and conflicts with nothing.
    pub fn standalone(version: Version, abi: u32) -> Node {
        Node {
            version,
            abi,
            requires: BTreeMap::new(),
            conflicts: Vec::new(),
        }
    }
}

/// A set of versions by plugin name: at most one version per plugin.
pub type Set = BTreeMap<String, Node>;

/// Kind of a dependency conflict (`plugvisor_dependency_conflicts{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConflictKind {
    /// A required plugin is not active.
    Missing,
    /// A required plugin is active in a version outside the range.
    Version,
    /// Requirements form a cycle.
    Cycle,
    /// A plugin declared a conflict with one that is active.
    Conflict,
    /// A manifest's plugin ABI differs from the host's or its dependency's.
    Abi,
}

impl ConflictKind {
    /// Every kind, in label order.
    pub const ALL: [ConflictKind; 5] = [
        ConflictKind::Missing,
        ConflictKind::Version,
        ConflictKind::Cycle,
        ConflictKind::Conflict,
        ConflictKind::Abi,
    ];

    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ConflictKind::Missing => "missing",
            ConflictKind::Version => "version",
            ConflictKind::Cycle => "cycle",
            ConflictKind::Conflict => "conflict",
            ConflictKind::Abi => "abi",
        }
    }
}

/// One conflict in a set, said in words.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    /// The plugin whose manifest the conflict comes from.
    pub plugin: String,
    /// What kind of conflict (the `kind` label).
    pub kind: ConflictKind,
    /// The other plugin involved, if any.
    pub other: Option<String>,
    /// What is wrong, in words, without the kind.
    pub message: String,
}

impl Conflict {
    /// Identity of a conflict regardless of its wording: two sets have "the
    /// same" conflict when plugin, kind and the other plugin agree.
    pub fn key(&self) -> (&str, ConflictKind, Option<&str>) {
        (&self.plugin, self.kind, self.other.as_deref())
    }

    /// Whether `plugin` is involved, as the declaring side or the other.
    pub fn involves(&self, plugin: &str) -> bool {
        self.plugin == plugin || self.other.as_deref() == Some(plugin)
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind.as_str())
    }
}

/// Every conflict in `set`, sorted: unmet requirements (`missing`,
/// `version`), declared conflicts, manifests for another plugin ABI than
/// `host_abi`, and requirement cycles. (A plugin and what it requires
/// cannot disagree on the ABI without one of them disagreeing with the
/// host, which is reported for that one.)
pub fn resolve(set: &Set, host_abi: u32) -> Vec<Conflict> {
    let mut out = Vec::new();
    for (name, node) in set {
        if node.abi != host_abi {
            out.push(Conflict {
                plugin: name.clone(),
                kind: ConflictKind::Abi,
                other: None,
                message: format!(
                    "{name} {}: the manifest declares plugin ABI {}, this plugvisor speaks ABI {host_abi}",
                    node.version, node.abi
                ),
            });
        }
        for (dep, req) in &node.requires {
            let conflict = |kind, message| Conflict {
                plugin: name.clone(),
                kind,
                other: Some(dep.clone()),
                message,
            };
            match set.get(dep) {
                None => out.push(conflict(
                    ConflictKind::Missing,
                    format!(
                        "{name} {} requires {dep} {req}; {dep} is not active",
                        node.version
                    ),
                )),
                Some(d) if !req.matches(&d.version) => out.push(conflict(
                    ConflictKind::Version,
                    format!(
                        "{name} {} requires {dep} {req}; {dep} is {}",
                        node.version, d.version
                    ),
                )),
                Some(_) => {}
            }
        }
        for other in &node.conflicts {
            if let Some(o) = set.get(other) {
                out.push(Conflict {
                    plugin: name.clone(),
                    kind: ConflictKind::Conflict,
                    other: Some(other.clone()),
                    message: format!(
                        "{name} {} declares a conflict with {other} {}",
                        node.version, o.version
                    ),
                });
            }
        }
    }
    for (name, cycle) in cycles(set) {
        out.push(Conflict {
            plugin: name,
            kind: ConflictKind::Cycle,
            other: None,
            message: format!("requirement cycle {}", cycle.join(" -> ")),
        });
    }
    out.sort();
    out.dedup();
    out
}

/// The conflicts that forbid making `candidate` the version of `plugin` in
/// `current` (the active set): every conflict of the candidate itself, and
/// every conflict the switch would create for another plugin (a dependent
/// whose range the new version leaves, a plugin that declared a conflict
/// with it). Conflicts that already stand in `current` and do not come from
/// the candidate do not block it: a plugin is not held hostage by a problem
/// elsewhere that its own switch does not touch.
pub fn check_switch(current: &Set, plugin: &str, candidate: Node, host_abi: u32) -> Vec<Conflict> {
    let before: BTreeSet<(String, ConflictKind, Option<String>)> = resolve(current, host_abi)
        .iter()
        .map(|c| {
            let (p, k, o) = c.key();
            (p.to_owned(), k, o.map(str::to_owned))
        })
        .collect();
    let mut proposed = current.clone();
    proposed.insert(plugin.to_owned(), candidate);
    resolve(&proposed, host_abi)
        .into_iter()
        .filter(|c| {
            let (p, k, o) = c.key();
            c.plugin == plugin || !before.contains(&(p.to_owned(), k, o.map(str::to_owned)))
        })
        .collect()
}

/// Every plugin that lies on a requirement cycle, with one cycle through it
/// (starting and ending at that plugin). Only edges between members of the
/// set count: a requirement of a plugin that is not there is `missing`, not
/// part of a cycle.
fn cycles(set: &Set) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for start in set.keys() {
        // Breadth-first from the start's requirements back to the start:
        // the shortest cycle through it, for the message.
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue: VecDeque<&str> = VecDeque::new();
        let mut found = false;
        for dep in set[start].requires.keys() {
            if set.contains_key(dep) && !parent.contains_key(dep.as_str()) {
                parent.insert(dep, start);
                queue.push_back(dep);
            }
        }
        while let Some(n) = queue.pop_front() {
            if n == start {
                found = true;
                break;
            }
            for dep in set[n].requires.keys() {
                if set.contains_key(dep) && !parent.contains_key(dep.as_str()) {
                    parent.insert(dep, n);
                    queue.push_back(dep);
                }
            }
        }
        if found {
            // Walk back from the start (reached last) to the start.
            let mut path = vec![start.clone()];
            let mut at = parent[start.as_str()];
            while at != start {
                path.push(at.to_owned());
                at = parent[at];
            }
            path.push(start.clone());
            path.reverse();
            out.push((start.clone(), path));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABI: u32 = 1;

    fn node(version: &str, requires: &[(&str, &str)], conflicts: &[&str]) -> Node {
        Node {
            version: Version::parse(version).unwrap(),
            abi: ABI,
            requires: requires
                .iter()
                .map(|(n, r)| ((*n).to_owned(), VersionReq::parse(r).unwrap()))
                .collect(),
            conflicts: conflicts.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    fn set(nodes: Vec<(&str, Node)>) -> Set {
        nodes.into_iter().map(|(n, v)| (n.to_owned(), v)).collect()
    }

    fn kinds(conflicts: &[Conflict]) -> Vec<(&str, ConflictKind)> {
        conflicts
            .iter()
            .map(|c| (c.plugin.as_str(), c.kind))
            .collect()
    }

    #[test]
    fn a_satisfied_set_has_no_conflicts() {
        let s = set(vec![
            (
                "echo",
                node("1.3.0", &[("codec", ">=1.2, <2")], &["legacy-echo"]),
            ),
            ("codec", node("1.4.0", &[], &[])),
        ]);
        assert!(resolve(&s, ABI).is_empty());
    }

    #[test]
    fn missing_requirement() {
        let s = set(vec![("echo", node("1.0.0", &[("codec", ">=1.2")], &[]))]);
        let c = resolve(&s, ABI);
        assert_eq!(kinds(&c), vec![("echo", ConflictKind::Missing)]);
        assert_eq!(c[0].other.as_deref(), Some("codec"));
        assert!(c[0].message.contains("codec is not active"), "{}", c[0]);
    }

    #[test]
    fn version_out_of_range() {
        let s = set(vec![
            ("echo", node("1.0.0", &[("codec", ">=1.2, <2")], &[])),
            ("codec", node("2.0.0", &[], &[])),
        ]);
        let c = resolve(&s, ABI);
        assert_eq!(kinds(&c), vec![("echo", ConflictKind::Version)]);
        assert!(c[0].to_string().contains("codec is 2.0.0"), "{}", c[0]);
        assert!(c[0].to_string().ends_with("(version)"), "{}", c[0]);
    }

    #[test]
    fn declared_conflict() {
        let s = set(vec![
            ("echo", node("1.0.0", &[], &["legacy-echo"])),
            ("legacy-echo", node("0.9.0", &[], &[])),
        ]);
        let c = resolve(&s, ABI);
        assert_eq!(kinds(&c), vec![("echo", ConflictKind::Conflict)]);
        assert!(c[0].involves("legacy-echo"));
        // A conflict with a plugin that is not active is no conflict.
        let s = set(vec![("echo", node("1.0.0", &[], &["legacy-echo"]))]);
        assert!(resolve(&s, ABI).is_empty());
    }

    #[test]
    fn abi_other_than_the_hosts() {
        let mut odd = node("2.0.0", &[], &[]);
        odd.abi = 7;
        let s = set(vec![
            ("echo", node("1.0.0", &[("codec", "*")], &[])),
            ("codec", odd),
        ]);
        let c = resolve(&s, ABI);
        assert_eq!(
            kinds(&c),
            vec![("codec", ConflictKind::Abi)],
            "said once, for codec"
        );
        assert!(
            c[0].message
                .contains("the manifest declares plugin ABI 7, this plugvisor speaks ABI 1"),
            "{}",
            c[0]
        );
    }

    #[test]
    fn cycles_are_found_with_their_path() {
        let s = set(vec![
            ("a", node("1.0.0", &[("b", "*")], &[])),
            ("b", node("1.0.0", &[("c", "*")], &[])),
            ("c", node("1.0.0", &[("a", "*")], &[])),
            ("d", node("1.0.0", &[("a", "*")], &[])),
        ]);
        let c = resolve(&s, ABI);
        assert_eq!(
            kinds(&c),
            vec![
                ("a", ConflictKind::Cycle),
                ("b", ConflictKind::Cycle),
                ("c", ConflictKind::Cycle)
            ],
            "d depends on the cycle but is not on it"
        );
        assert_eq!(c[0].message, "requirement cycle a -> b -> c -> a");
        // Two plugins requiring each other.
        let s = set(vec![
            ("echo", node("2.0.0", &[("codec", "*")], &[])),
            ("codec", node("2.0.0", &[("echo", "*")], &[])),
        ]);
        assert_eq!(
            kinds(&resolve(&s, ABI)),
            vec![
                ("codec", ConflictKind::Cycle),
                ("echo", ConflictKind::Cycle)
            ]
        );
    }

    #[test]
    fn a_switch_is_blocked_by_its_own_conflicts() {
        let current = set(vec![("echo", node("1.0.0", &[], &[]))]);
        let c = check_switch(
            &current,
            "echo",
            node("2.0.0", &[("codec", "^1")], &[]),
            ABI,
        );
        assert_eq!(kinds(&c), vec![("echo", ConflictKind::Missing)]);
    }

    #[test]
    fn a_switch_that_breaks_a_dependent_is_blocked() {
        let current = set(vec![
            ("echo", node("1.0.0", &[("codec", ">=1.2, <2")], &[])),
            ("codec", node("1.2.0", &[], &[])),
        ]);
        let c = check_switch(&current, "codec", node("2.0.0", &[], &[]), ABI);
        assert_eq!(kinds(&c), vec![("echo", ConflictKind::Version)]);
        assert!(c[0].involves("codec"));
        // A compatible one is not.
        assert!(check_switch(&current, "codec", node("1.9.0", &[], &[]), ABI).is_empty());
        // A newcomer that an active plugin declared a conflict with is
        // blocked: the declaration stands against whoever arrives.
        let current = set(vec![("echo", node("1.0.0", &[], &["legacy-echo"]))]);
        let c = check_switch(&current, "legacy-echo", node("0.1.0", &[], &[]), ABI);
        assert_eq!(kinds(&c), vec![("echo", ConflictKind::Conflict)]);
    }

    #[test]
    fn a_standing_conflict_elsewhere_does_not_block_an_unrelated_switch() {
        let current = set(vec![
            ("echo", node("1.0.0", &[("codec", "^2")], &[])),
            ("codec", node("1.0.0", &[], &[])),
            ("other", node("1.0.0", &[], &[])),
        ]);
        assert_eq!(
            kinds(&resolve(&current, ABI)),
            vec![("echo", ConflictKind::Version)]
        );
        assert!(check_switch(&current, "other", node("1.1.0", &[], &[]), ABI).is_empty());
        // But the plugin with the standing conflict must fix it to move on.
        let c = check_switch(
            &current,
            "echo",
            node("1.1.0", &[("codec", "^2")], &[]),
            ABI,
        );
        assert_eq!(kinds(&c), vec![("echo", ConflictKind::Version)]);
        assert!(
            check_switch(
                &current,
                "echo",
                node("1.1.0", &[("codec", "^1")], &[]),
                ABI
            )
            .is_empty()
        );
    }

    #[test]
    fn a_switch_that_closes_a_cycle_is_blocked() {
        let current = set(vec![
            ("echo", node("2.0.0", &[("codec", "*")], &[])),
            ("codec", node("1.0.0", &[], &[])),
        ]);
        let c = check_switch(&current, "codec", node("2.0.0", &[("echo", "*")], &[]), ABI);
        assert_eq!(
            kinds(&c),
            vec![
                ("codec", ConflictKind::Cycle),
                ("echo", ConflictKind::Cycle)
            ]
        );
    }
}
