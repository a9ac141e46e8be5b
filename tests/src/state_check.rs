//! An independent judge of `state_dir`: after any fault a test injects,
//! [`assert_state_consistent`] says whether the daemon's on-disk state is
//! still whole. It reads the files as bytes and JSON/TOML, written from the
//! format description in `supervisor/src/store.rs` and never linked to the
//! daemon's own store code, so a bug there cannot hide itself here.
//!
//! What "consistent" means:
//! * `journal.jsonl` (if present) is a sequence of complete lines, each one
//!   JSON object with `ts_ms` (integer), `plugin` and `event` (non-empty
//!   strings); the file ends with a newline (no torn last line), and the
//!   entries that say a version served (`activated`, `rollback`,
//!   `known-good`) name an object that exists when they carry a `sha256`.
//! * every `refs/<plugin>.json` parses, knows only the fields the daemon
//!   writes, and every version it names (`active`, `known_good`,
//!   `history`, `quarantined`) has a semver-shaped version and an object in
//!   `objects/`; a trial is only open on an active version.
//! * every `objects/<sha256>.so` hashes to its own name — the daemon trusts
//!   an object that is already present and never re-hashes it, so a lying
//!   object would be loaded as the version it claims to be.
//! * every `manifests/<sha256>.toml` parses, pins exactly that sha256 and
//!   sits beside its object.
//! * every `loading/<plugin>.json` (a load mark: the process died inside
//!   that version's `dlopen` or `init`; the next start quarantines it)
//!   names a semver version and an object in `objects/`.
//! * the only other files are the daemon's own temp files (`objects/.tmp-*`,
//!   removed at start; `refs/.<plugin>.json.tmp` and
//!   `manifests/.<sha256>.toml.tmp`, never read — the rename is the commit
//!   point). They are listed in [`StateSummary::temp_files`], not refused;
//!   any other stray entry in those directories is.
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// Journal events that say a version served: their object must exist.
const SERVING_EVENTS: [&str; 3] = ["activated", "rollback", "known-good"];

/// Fields a refs file may have (the daemon's `Refs`, `deny_unknown_fields`).
const REFS_FIELDS: [&str; 7] = [
    "active",
    "known_good",
    "history",
    "trial_since_ms",
    "trial_interrupted",
    "quarantined",
    "highest_activated",
];

/// One version as a refs file names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefVersion {
    /// The semver version.
    pub version: String,
    /// The sha256 of its object.
    pub sha256: String,
}

/// One plugin's refs, as read from `refs/<plugin>.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefsSummary {
    /// `active`.
    pub active: Option<RefVersion>,
    /// `known_good`.
    pub known_good: Option<RefVersion>,
    /// `history`, oldest first.
    pub history: Vec<RefVersion>,
    /// Whether `trial_since_ms` is set (the active version is on trial).
    pub on_trial: bool,
    /// `quarantined`.
    pub quarantined: Vec<RefVersion>,
}

/// One journal line.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalLine {
    /// `plugin`.
    pub plugin: String,
    /// `event`.
    pub event: String,
    /// `version`, if present.
    pub version: Option<String>,
    /// `from_version`, if present.
    pub from_version: Option<String>,
    /// `reason`, if present.
    pub reason: Option<String>,
    /// The whole line, parsed.
    pub raw: serde_json::Value,
}

/// What a consistent `state_dir` holds.
#[derive(Debug, Clone, Default)]
pub struct StateSummary {
    /// Refs by plugin name.
    pub refs: BTreeMap<String, RefsSummary>,
    /// The journal, oldest first.
    pub journal: Vec<JournalLine>,
    /// sha256 of every object in `objects/` (each verified).
    pub objects: BTreeSet<String>,
    /// sha256 of every saved manifest.
    pub manifests: BTreeSet<String>,
    /// Leftover temp files of an interrupted write (harmless, see the
    /// module docs), relative to `state_dir`.
    pub temp_files: Vec<PathBuf>,
    /// Load marks left in `loading/`: plugin → version whose `dlopen` or
    /// `init` never returned.
    pub loading: BTreeMap<String, String>,
}

impl StateSummary {
    /// The journal lines of `plugin`, oldest first.
    pub fn journal_of<'a>(&'a self, plugin: &'a str) -> impl Iterator<Item = &'a JournalLine> {
        self.journal.iter().filter(move |l| l.plugin == plugin)
    }

    /// The active version of `plugin` as its refs say.
    pub fn active_version(&self, plugin: &str) -> Option<&str> {
        self.refs
            .get(plugin)?
            .active
            .as_ref()
            .map(|a| a.version.as_str())
    }
}

/// Panics, naming every problem found, unless `state_dir` is consistent
/// (see the module docs). Returns what it found.
pub fn assert_state_consistent(state_dir: &Path) -> StateSummary {
    match check_state(state_dir) {
        Ok(s) => s,
        Err(e) => panic!("state_dir {} is inconsistent:\n{e}", state_dir.display()),
    }
}

/// Checks `state_dir` without panicking: the summary, or every problem
/// found (one per line).
pub fn check_state(state_dir: &Path) -> Result<StateSummary, String> {
    let mut problems = Vec::new();
    let mut summary = StateSummary::default();
    if !state_dir.is_dir() {
        return Err(format!("{} is not a directory", state_dir.display()));
    }
    check_objects(state_dir, &mut summary, &mut problems);
    check_manifests(state_dir, &mut summary, &mut problems);
    check_refs(state_dir, &mut summary, &mut problems);
    check_loading(state_dir, &mut summary, &mut problems);
    check_journal(state_dir, &mut summary, &mut problems);
    if problems.is_empty() {
        Ok(summary)
    } else {
        Err(problems.join("\n"))
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `MAJOR.MINOR.PATCH` with an optional `-pre` / `+build` tail.
fn is_semver(s: &str) -> bool {
    let core = s.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Entries of `dir` by file name; a missing directory is empty (a store
/// that never staged anything), an unreadable one a problem.
fn entries(dir: &Path, problems: &mut Vec<String>) -> Vec<(String, PathBuf)> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut out: Vec<(String, PathBuf)> = rd
                .filter_map(|e| match e {
                    Ok(e) => Some((e.file_name().to_string_lossy().into_owned(), e.path())),
                    Err(err) => {
                        problems.push(format!("listing {}: {err}", dir.display()));
                        None
                    }
                })
                .collect();
            out.sort();
            out
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            problems.push(format!("listing {}: {e}", dir.display()));
            Vec::new()
        }
    }
}

fn relative(state_dir: &Path, p: &Path) -> PathBuf {
    p.strip_prefix(state_dir).unwrap_or(p).to_owned()
}

fn check_objects(state_dir: &Path, summary: &mut StateSummary, problems: &mut Vec<String>) {
    for (name, path) in entries(&state_dir.join("objects"), problems) {
        if name.starts_with(".tmp-") {
            summary.temp_files.push(relative(state_dir, &path));
            continue;
        }
        let Some(sha) = name.strip_suffix(".so").filter(|s| is_sha256(s)) else {
            problems.push(format!(
                "objects/{name}: not an object name (<sha256>.so) nor a temp file"
            ));
            continue;
        };
        if !path.is_file() {
            problems.push(format!("objects/{name}: not a regular file"));
            continue;
        }
        match sha256_of(&path) {
            Ok(actual) if actual == sha => {
                summary.objects.insert(sha.to_owned());
            }
            Ok(actual) => problems.push(format!(
                "objects/{name}: content hashes to {actual}, not to its name"
            )),
            Err(e) => problems.push(format!("objects/{name}: reading: {e}")),
        }
    }
}

fn check_manifests(state_dir: &Path, summary: &mut StateSummary, problems: &mut Vec<String>) {
    for (name, path) in entries(&state_dir.join("manifests"), problems) {
        if name.starts_with('.')
            && name
                .strip_suffix(".toml.tmp")
                .is_some_and(|s| is_sha256(&s[1..]))
        {
            summary.temp_files.push(relative(state_dir, &path));
            continue;
        }
        let Some(sha) = name.strip_suffix(".toml").filter(|s| is_sha256(s)) else {
            problems.push(format!(
                "manifests/{name}: not a manifest name (<sha256>.toml) nor a temp file"
            ));
            continue;
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("manifests/{name}: reading: {e}"));
                continue;
            }
        };
        match text.parse::<toml::Table>() {
            Ok(table) => {
                match table.get("sha256").and_then(toml::Value::as_str) {
                    Some(pinned) if pinned == sha => {}
                    other => problems.push(format!(
                        "manifests/{name}: pins sha256 {other:?}, not the object it is kept for"
                    )),
                }
                if !state_dir
                    .join("objects")
                    .join(format!("{sha}.so"))
                    .is_file()
                {
                    problems.push(format!(
                        "manifests/{name}: its object objects/{sha}.so is missing"
                    ));
                }
                summary.manifests.insert(sha.to_owned());
            }
            Err(e) => problems.push(format!("manifests/{name}: not TOML: {e}")),
        }
    }
}

fn version_ref(
    v: &serde_json::Value,
    what: &str,
    problems: &mut Vec<String>,
) -> Option<RefVersion> {
    let version = v.get("version").and_then(serde_json::Value::as_str);
    let sha256 = v.get("sha256").and_then(serde_json::Value::as_str);
    let fields_ok = v.as_object().is_some_and(|o| o.len() == 2);
    match (version, sha256) {
        (Some(version), Some(sha256)) if fields_ok && is_semver(version) && is_sha256(sha256) => {
            Some(RefVersion {
                version: version.to_owned(),
                sha256: sha256.to_owned(),
            })
        }
        _ => {
            problems.push(format!(
                "{what}: not a version ref ({{version: semver, sha256: hex}}): {v}"
            ));
            None
        }
    }
}

/// The `<plugin>.json` files of `dir` (`refs`, `loading`), parsed, as
/// `(plugin, "dir/name", value)`; their temp files go to the summary, any
/// other entry and unparsable files to the problems.
fn plugin_json_files(
    state_dir: &Path,
    dir: &str,
    kind: &str,
    summary: &mut StateSummary,
    problems: &mut Vec<String>,
) -> Vec<(String, String, serde_json::Value)> {
    let mut out = Vec::new();
    for (name, path) in entries(&state_dir.join(dir), problems) {
        if name.starts_with('.') && name.ends_with(".json.tmp") {
            summary.temp_files.push(relative(state_dir, &path));
            continue;
        }
        let Some(plugin) = name.strip_suffix(".json").filter(|p| !p.is_empty()) else {
            problems.push(format!(
                "{dir}/{name}: not a {kind} (<plugin>.json) nor a temp file"
            ));
            continue;
        };
        let what = format!("{dir}/{name}");
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => out.push((plugin.to_owned(), what, v)),
            Err(e) => problems.push(format!("{what}: does not parse: {e}")),
        }
    }
    out
}

fn check_loading(state_dir: &Path, summary: &mut StateSummary, problems: &mut Vec<String>) {
    for (plugin, what, value) in
        plugin_json_files(state_dir, "loading", "load mark", summary, problems)
    {
        if let Some(v) = version_ref(&value, &what, problems) {
            // The object is staged before the mark is written.
            if !summary.objects.contains(&v.sha256) {
                problems.push(format!(
                    "{what}: names object {}, which is not in objects/",
                    v.sha256
                ));
            }
            summary.loading.insert(plugin, v.version);
        }
    }
}

fn check_refs(state_dir: &Path, summary: &mut StateSummary, problems: &mut Vec<String>) {
    for (plugin, what, value) in
        plugin_json_files(state_dir, "refs", "refs file", summary, problems)
    {
        let Some(obj) = value.as_object() else {
            problems.push(format!("{what}: not a JSON object"));
            continue;
        };
        for key in obj.keys() {
            if !REFS_FIELDS.contains(&key.as_str()) {
                problems.push(format!(
                    "{what}: unknown field {key:?} (the daemon refuses it)"
                ));
            }
        }
        let mut refs = RefsSummary::default();
        let one = |key: &str, problems: &mut Vec<String>| match obj.get(key) {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => version_ref(v, &format!("{what} {key}"), problems),
        };
        refs.active = one("active", problems);
        refs.known_good = one("known_good", problems);
        let list = |key: &str, problems: &mut Vec<String>| match obj.get(key) {
            None => Vec::new(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| version_ref(v, &format!("{what} {key}[{i}]"), problems))
                .collect(),
            Some(other) => {
                problems.push(format!("{what} {key}: not a list: {other}"));
                Vec::new()
            }
        };
        refs.history = list("history", problems);
        refs.quarantined = list("quarantined", problems);
        match obj.get("trial_since_ms") {
            None | Some(serde_json::Value::Null) => {}
            Some(v) if v.as_u64().is_some() => refs.on_trial = true,
            Some(v) => problems.push(format!("{what} trial_since_ms: not an integer: {v}")),
        }
        match obj.get("highest_activated") {
            None | Some(serde_json::Value::Null) => {}
            Some(v) if v.as_str().is_some_and(is_semver) => {}
            Some(v) => problems.push(format!("{what} highest_activated: not a version: {v}")),
        }
        if refs.on_trial && refs.active.is_none() {
            problems.push(format!("{what}: a trial is open but nothing is active"));
        }
        let named = refs
            .active
            .iter()
            .chain(&refs.known_good)
            .chain(&refs.history)
            .chain(&refs.quarantined);
        for v in named {
            if !summary.objects.contains(&v.sha256) {
                problems.push(format!(
                    "{what}: {} names object {}.so, which is missing or corrupt",
                    v.version, v.sha256
                ));
            }
        }
        summary.refs.insert(plugin, refs);
    }
}

fn check_journal(state_dir: &Path, summary: &mut StateSummary, problems: &mut Vec<String>) {
    let path = state_dir.join("journal.jsonl");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            problems.push(format!("journal.jsonl: reading: {e}"));
            return;
        }
    };
    if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
        problems.push("journal.jsonl: the last line is torn (no final newline)".to_owned());
    }
    let Ok(text) = String::from_utf8(bytes) else {
        problems.push("journal.jsonl: not UTF-8".to_owned());
        return;
    };
    // Objects the daemon removed from the store, announced in the journal
    // (`collected`) before the file went: lines naming them may outlive them.
    let collected: std::collections::HashSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "collected")
        .filter_map(|v| v["sha256"].as_str().map(str::to_owned))
        .collect();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("journal.jsonl line {n}: not JSON ({e}): {line:?}"));
                continue;
            }
        };
        let s = |k: &str| {
            value
                .get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let (Some(plugin), Some(event)) = (s("plugin"), s("event")) else {
            problems.push(format!(
                "journal.jsonl line {n}: no plugin or event: {line}"
            ));
            continue;
        };
        if plugin.is_empty()
            || event.is_empty()
            || value
                .get("ts_ms")
                .and_then(serde_json::Value::as_u64)
                .is_none()
        {
            problems.push(format!(
                "journal.jsonl line {n}: empty plugin/event or no ts_ms: {line}"
            ));
        }
        if SERVING_EVENTS.contains(&event.as_str())
            && let Some(sha) = s("sha256")
            && !summary.objects.contains(&sha)
            && !collected.contains(&sha)
        {
            problems.push(format!(
                "journal.jsonl line {n}: {event} names object {sha}.so, which is missing or corrupt"
            ));
        }
        summary.journal.push(JournalLine {
            plugin,
            event,
            version: s("version"),
            from_version: s("from_version"),
            reason: s("reason"),
            raw: value,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    /// A small store as the daemon writes it: one object, its manifest,
    /// refs naming it, a journal line.
    fn good_store() -> (tempfile::TempDir, String) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        for sub in ["objects", "refs", "manifests"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let lib = b"\x7fELF not really";
        let h = sha(lib);
        std::fs::write(d.join(format!("objects/{h}.so")), lib).unwrap();
        std::fs::write(
            d.join(format!("manifests/{h}.toml")),
            format!("name = \"echo\"\nversion = \"1.0.0\"\nlibrary = \"x.so\"\nsha256 = \"{h}\"\nabi = 1\n"),
        )
        .unwrap();
        std::fs::write(
            d.join("refs/echo.json"),
            format!(
                r#"{{"active":{{"version":"1.0.0","sha256":"{h}"}},"known_good":null,"history":[{{"version":"1.0.0","sha256":"{h}"}}],"trial_since_ms":5,"quarantined":[],"highest_activated":"1.0.0"}}"#
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("journal.jsonl"),
            format!(
                "{{\"ts_ms\":1,\"plugin\":\"echo\",\"event\":\"activated\",\"version\":\"1.0.0\",\"sha256\":\"{h}\"}}\n"
            ),
        )
        .unwrap();
        (t, h)
    }

    #[test]
    fn a_good_store_passes() {
        let (t, h) = good_store();
        std::fs::write(t.path().join(format!("objects/.tmp-77-{h}")), b"half").unwrap();
        let s = assert_state_consistent(t.path());
        assert_eq!(s.active_version("echo"), Some("1.0.0"));
        assert!(s.refs["echo"].on_trial);
        assert_eq!(s.journal_of("echo").count(), 1);
        assert_eq!(s.temp_files.len(), 1);
    }

    #[test]
    fn an_empty_state_dir_passes() {
        let t = tempfile::tempdir().unwrap();
        let s = assert_state_consistent(t.path());
        assert!(s.refs.is_empty() && s.journal.is_empty());
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        type Damage = fn(&Path, &str);
        let cases: [(&str, Damage); 8] = [
            ("content hashes to", |d, h| {
                std::fs::write(d.join(format!("objects/{h}.so")), b"flipped").unwrap();
            }),
            ("missing or corrupt", |d, h| {
                std::fs::remove_file(d.join(format!("objects/{h}.so"))).unwrap();
            }),
            ("torn", |d, _| {
                let mut j = std::fs::read(d.join("journal.jsonl")).unwrap();
                j.extend_from_slice(b"{\"ts_ms\":2,\"plu");
                std::fs::write(d.join("journal.jsonl"), j).unwrap();
            }),
            ("line 2: not JSON", |d, _| {
                let mut j = std::fs::read(d.join("journal.jsonl")).unwrap();
                j.extend_from_slice(b"{\"ts_ms\":2,\"plu{\"ts_ms\":3}\n");
                std::fs::write(d.join("journal.jsonl"), j).unwrap();
            }),
            ("refs/echo.json: does not parse", |d, _| {
                std::fs::write(d.join("refs/echo.json"), b"{\"active\":").unwrap();
            }),
            ("unknown field", |d, h| {
                std::fs::write(
                    d.join("refs/echo.json"),
                    format!(r#"{{"active":{{"version":"1.0.0","sha256":"{h}"}},"bogus":1}}"#),
                )
                .unwrap();
            }),
            ("not an object name", |d, _| {
                std::fs::write(d.join("objects/stray.so"), b"x").unwrap();
            }),
            ("pins sha256", |d, h| {
                std::fs::write(d.join(format!("manifests/{h}.toml")), "sha256 = \"00\"\n").unwrap();
            }),
        ];
        for (expect, damage) in cases {
            let (t, h) = good_store();
            damage(t.path(), &h);
            let err = check_state(t.path()).expect_err(expect);
            assert!(err.contains(expect), "expected {expect:?} in: {err}");
        }
    }
}
