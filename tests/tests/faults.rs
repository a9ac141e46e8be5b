//! The fault matrix (issue #9, part B): the real binary driven through bad
//! packages, bad signatures, broken dependencies, misbehaving plugins,
//! hostile manifests and thresholds files, a full and a read-only
//! `state_dir`, a client that may not use the admin socket, a crashing
//! plugin, a config with a typo and a starved eBPF ring buffer.
//!
//! Most cases are rows of one table applied in turn to one long-lived
//! daemon (`matrix`), which serves a good `echo` to live clients — two
//! persistent TCP connections and a gRPC `Exchange` stream — all the while.
//! The rows live by theme under `faults/` (libraries, signatures, identity,
//! dependencies, manifests, thresholds, runtime, host; `faults/mod.rs`
//! keeps their order); this file is the runner and the checks they share.
//! After every row the same three things are checked:
//!
//! * (a) the good version still serves: the live clients saw no error and
//!   only the good versions, and a fresh TCP connection and a fresh gRPC
//!   call are answered by the version that should serve;
//! * (b) `state_dir` is whole (`assert_state_consistent`: journal lines,
//!   refs, every object's sha256), nothing half-written is left in it, no
//!   object that was there is gone, and the refs name what serves;
//! * (c) the operator was told, in the row itself: the cause in words in the
//!   log line (one line per refusal), the journal, the metric that moved,
//!   and `plugvisor status` where it shows the thing.
//!
//! The daemon runs with `require_signature` (every package below is signed
//! unless the row is about signatures) and its `state_dir` on a small tmpfs
//! the test mounted, so the full and read-only rows can happen to it live.
//! Cases that take the process down or happen at start have daemons of
//! their own (the other tests in this file). Each row names its test in
//! `docs/RELIABILITY.md`.
#![expect(
    clippy::too_many_lines,
    reason = "each test is one black-box scenario that reads top to bottom"
)]
#![expect(
    clippy::float_cmp,
    reason = "metric values are integer counts carried in f64; exact comparison is the point"
)]
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use plugvisor_tests::live::{Live, LiveOptions, Tally};
use plugvisor_tests::pb::Request;
use plugvisor_tests::pb::plugin_client::PluginClient;
use plugvisor_tests::state_check::{assert_state_consistent, check_state};
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, Metrics, PackageTweaks, TrustOptions, binary,
    build_named_plugin, build_plugin_version, echo_version_series, grpc_channel, install_package,
    keygen, require_root, sha256_file, wait_until,
};

/// The echo series every good version comes from (shared with the soak:
/// one cargo build).
const SERIES_MAJOR: u64 = 7;
/// Versions of the series the matrix may use.
const SERIES_LEN: usize = 60;
/// Size of the tmpfs that holds the matrix's `state_dir`.
const STATE_FS_SIZE: &str = "48m";
/// How long a row waits for the daemon to act on what it did.
const ACT_TIMEOUT: Duration = Duration::from_secs(20);

fn deadline() -> Instant {
    Instant::now() + ACT_TIMEOUT
}

/// A tmpfs the test mounted; lazily unmounted on drop (after the daemon
/// that used it is gone).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path));
        Tmpfs {
            path: path.to_owned(),
        }
    }

    /// `mount -o remount,OPTS`: `ro` or `rw`.
    fn remount(&self, opts: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.path));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One `plugvisor.v1.Plugin/Invoke` on a fresh connection; the version
/// that answered.
fn grpc_invoke(addr: SocketAddr) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let call = async {
            let channel = grpc_channel(addr).await.map_err(|e| e.to_string())?;
            let r = PluginClient::new(channel)
                .invoke(Request {
                    payload: b"fresh".to_vec(),
                })
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            if r.error.is_empty() {
                Ok(r.plugin_version)
            } else {
                Err(r.error)
            }
        };
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .map_err(|_| "no answer within 5 s".to_owned())?
    })
}

/// What a refusal must say (c).
struct Refusal<'a> {
    plugin: &'a str,
    /// `rejected` (bad package) or `failed` (good package, could not start).
    outcome: &'a str,
    /// Words the log line and the journal entry must contain.
    cause: &'a [&'a str],
    /// The end of the file the log line names.
    file: &'a str,
    /// Whether the refusal can be in the journal (not when `state_dir`
    /// cannot be written).
    journaled: bool,
}

/// The long-lived daemon and what the rows share.
struct Matrix {
    // Declared in drop order: clients, then the daemon, then its state fs.
    live: Live,
    d: Daemon,
    state_fs: Tmpfs,
    _state_parent: tempfile::TempDir,
    trusted: PathBuf,
    untrusted: PathBuf,
    series: Vec<(String, PathBuf)>,
    next: usize,
    /// The echo version that must serve.
    good: String,
    /// The metrics and log length when the row began.
    before: Metrics,
    log_from: usize,
    journal_from: usize,
    /// Objects in the store after the last row: none may disappear.
    objects: BTreeSet<String>,
    /// RSS when the rules were written.
    rules: String,
    /// Where the plugins run.
    isolation: Isolation,
}

impl Matrix {
    /// The next unused version of the series (version, library).
    fn fresh(&mut self) -> (String, PathBuf) {
        let v = self.series[self.next].clone();
        self.next += 1;
        v
    }

    /// Installs a package signed by the trusted key (unless `t` says
    /// otherwise), the contract's way: library, signature, then manifest.
    fn install(&self, name: &str, version: &str, lib: &Path, t: PackageTweaks) {
        let t = PackageTweaks {
            sign_with: t.sign_with.or_else(|| Some(self.trusted.clone())),
            ..t
        };
        install_package(&self.d.plugins_dir, name, version, lib, &t);
    }

    /// Copies the next echo library into the echo package by hand and
    /// returns its version, the package directory, the manifest that would commit it and
    /// that manifest's signature by the trusted key — neither written yet,
    /// for rows that write them their own wrong way.
    fn stage_next_by_hand(&mut self) -> (String, PathBuf, String, String) {
        let (v, lib) = self.fresh();
        let dir = self.d.plugins_dir.join("echo");
        let lib_name = format!("libecho-{v}.so");
        std::fs::copy(&lib, dir.join(&lib_name)).unwrap();
        let manifest = format!(
            "name = \"echo\"\nversion = \"{v}\"\nlibrary = \"{lib_name}\"\nsha256 = \"{}\"\nabi = 1\n",
            sha256_file(&lib)
        );
        let sig = plugvisor_tests::sign_manifest(&self.trusted, manifest.as_bytes());
        (v, dir, manifest, sig)
    }

    /// Installs the next echo version with `extra` appended to its manifest
    /// (a `[requires]` or `conflicts` line); returns the version.
    fn install_next_with(&mut self, extra: &str) -> String {
        let (v, lib) = self.fresh();
        let t = PackageTweaks {
            extra: Some(extra.to_owned()),
            ..Default::default()
        };
        self.install("echo", &v, &lib, t);
        v
    }

    /// Installs the next good echo version and waits until it serves.
    fn advance(&mut self, why: &str) {
        let (v, lib) = self.fresh();
        self.install("echo", &v, &lib, PackageTweaks::default());
        wait_until(deadline(), &format!("{why}: echo {v} serves"), || {
            self.d.serving("echo-tcp").as_deref() == Some(v.as_str())
        });
        self.good = v;
    }

    fn plugin_status(&self, plugin: &str) -> serde_json::Value {
        self.d.status()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["plugin"] == plugin)
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until no plugin is on trial: nothing is left for the daemon
    /// to write on its own (the rows that take `state_dir` away want it
    /// quiet).
    fn settle(&self) {
        wait_until(deadline(), "every plugin known-good", || {
            self.d.status()["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["state"] == "known-good")
        });
    }

    /// (c) for a refused package: counted once, said in exactly one ERROR
    /// line naming plugin, file and cause, and journaled with the cause.
    fn refused(&self, r: &Refusal) -> serde_json::Value {
        let key = [("plugin", r.plugin), ("outcome", r.outcome)];
        let before = self
            .before
            .get("plugvisor_reloads_total", &key)
            .unwrap_or(0.0) as u64;
        wait_until(
            deadline(),
            &format!("{} refused ({})", r.plugin, r.outcome),
            || self.d.reloads(r.plugin, r.outcome) > before,
        );
        let lines: Vec<serde_json::Value> = self
            .d
            .refusals_since(self.log_from)
            .into_iter()
            .filter(|l| l["fields"]["plugin"] == r.plugin)
            .collect();
        assert_eq!(lines.len(), 1, "one log line per refusal: {lines:#?}");
        assert_eq!(self.d.reloads(r.plugin, r.outcome), before + 1);
        let line = lines.into_iter().next().unwrap();
        let message = line["fields"]["message"].as_str().unwrap();
        assert_eq!(line["level"], "ERROR", "{message}");
        assert_eq!(line["fields"]["outcome"], r.outcome, "{message}");
        for word in r.cause {
            assert!(message.contains(word), "{message:?} should say {word:?}");
        }
        let file = line["fields"]["file"].as_str().unwrap();
        assert!(
            file.ends_with(r.file),
            "file {file:?} should end with {:?}",
            r.file
        );
        if r.plugin == "echo" {
            assert_eq!(line["fields"]["serving"], self.good.as_str(), "{message}");
        }
        if r.journaled {
            let entries: Vec<serde_json::Value> = self.d.journal()[self.journal_from..]
                .iter()
                .filter(|e| e["plugin"] == r.plugin && e["event"] == r.outcome)
                .cloned()
                .collect();
            assert_eq!(entries.len(), 1, "one journal entry: {entries:#?}");
            let entry = &entries[0];
            let reason = entry["reason"].as_str().unwrap_or_default();
            for word in r.cause {
                assert!(
                    reason.contains(word),
                    "journal {reason:?} should say {word:?}"
                );
            }
        }
        line
    }

    /// (c) for a dependency refusal: the gauge of its kind is 1 and
    /// `plugvisor status` shows the conflict with what serves meanwhile;
    /// then a plain good version clears it (gauge back to 0).
    fn dependency_refused(&mut self, kind: &str, cause: &str) {
        self.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["dependency conflict", cause],
            file: "echo/plugin.toml",
            journaled: true,
        });
        let gauge = |m: &Matrix| {
            m.d.metrics().get(
                "plugvisor_dependency_conflicts",
                &[("plugin", "echo"), ("kind", kind)],
            )
        };
        wait_until(
            deadline(),
            &format!("dependency_conflicts{{kind={kind}}} 1"),
            || gauge(self) == Some(1.0),
        );
        let (code, out, _) = self.d.cli(&["status"]);
        assert_eq!(code, 0);
        for words in [
            "DEPENDENCY CONFLICT",
            kind,
            &format!("{} serves meanwhile", self.good),
        ] {
            assert!(out.contains(words), "status should say {words:?}:\n{out}");
        }
        self.advance("a plain package clears the conflict");
        wait_until(
            deadline(),
            &format!("dependency_conflicts{{kind={kind}}} 0"),
            || gauge(self) == Some(0.0),
        );
    }

    /// (c) for a refused thresholds file: logged with the cause, the
    /// gauge at 0, `status` says so and still lists the rules in force;
    /// then the good file is restored (gauge back to 1).
    fn thresholds_refused(&self, cause: &[&str]) {
        let valid = |m: &Matrix| m.d.metrics().get("plugvisor_rules_config_valid", &[]);
        wait_until(deadline(), "rules_config_valid 0", || {
            valid(self) == Some(0.0)
        });
        let lines: Vec<String> = self.d.log_lines()[self.log_from..]
            .iter()
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("thresholds file refused"))
            })
            .map(|l| l["fields"]["message"].as_str().unwrap().to_owned())
            .collect();
        assert!(!lines.is_empty(), "no refusal logged");
        for l in &lines {
            assert!(l.contains("previous rules stay in force"), "{l}");
            for word in cause {
                assert!(l.contains(word), "{l:?} should say {word:?}");
            }
        }
        let status = self.d.status();
        assert_eq!(status["rules_config_valid"], false);
        let rules: BTreeSet<&str> = status["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(
            rules,
            BTreeSet::from(["fixture-panics", "fixture-rss"]),
            "the rules in force stay"
        );
        write_atomically(&self.d.thresholds_path(), self.rules.as_bytes());
        wait_until(deadline(), "rules_config_valid 1 again", || {
            valid(self) == Some(1.0)
        });
    }

    /// The uniform checks (a) and (b) after a row. `before` is the version
    /// that served when the row began.
    fn check(&mut self, row: &str, before: &str) {
        // (a) fresh clients are answered by the good version…
        wait_until(
            deadline(),
            &format!("{row}: fresh TCP answered by {}", self.good),
            || self.d.serving("echo-tcp").as_deref() == Some(self.good.as_str()),
        );
        assert_eq!(
            grpc_invoke(self.d.addr("echo-grpc")).as_deref(),
            Ok(self.good.as_str()),
            "{row}: fresh gRPC call"
        );
        // …and the live ones saw nothing but good versions.
        let Tally {
            frames,
            versions,
            errors,
        } = self.live.take();
        assert!(
            errors.is_empty(),
            "{row}: live clients saw errors: {errors:#?}"
        );
        assert!(frames > 0, "{row}: the live clients made no progress");
        let allowed = BTreeSet::from([before.to_owned(), self.good.clone()]);
        assert!(
            versions.is_subset(&allowed),
            "{row}: live clients were answered by {versions:?}, only {allowed:?} may serve"
        );
        assert_eq!(
            self.d.metrics().get(
                "plugvisor_plugin_info",
                &[
                    ("plugin", "echo"),
                    ("version", &self.good),
                    ("state", "active")
                ]
            ),
            Some(1.0),
            "{row}: plugin_info names the good version active"
        );
        // (b) the store is whole and says what serves.
        wait_until(
            deadline(),
            &format!("{row}: refs name {}", self.good),
            || {
                check_state(&self.d.state_dir)
                    .is_ok_and(|s| s.active_version("echo") == Some(self.good.as_str()))
            },
        );
        let s = assert_state_consistent(&self.d.state_dir);
        assert!(
            s.temp_files.is_empty(),
            "{row}: half-written files left in state_dir: {:?}",
            s.temp_files
        );
        // Gone is lost unless the daemon announced it: it collects
        // objects no refs name (refused libraries, versions past the
        // bounded history), journalling each one first.
        let collected: BTreeSet<String> = s
            .journal
            .iter()
            .filter(|l| l.event == "collected")
            .filter_map(|l| l.raw["sha256"].as_str().map(str::to_owned))
            .collect();
        let lost: Vec<&String> = self
            .objects
            .difference(&s.objects)
            .filter(|o| !collected.contains(*o))
            .collect();
        assert!(
            lost.is_empty(),
            "{row}: objects lost from the store: {lost:?}"
        );
        self.objects = s.objects;
        self.d.assert_running();
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Where the matrix's plugins run, and so where the fixture's memory is
/// counted: the daemon's own RSS, or the fixture's hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    InProcess,
    Process,
}

impl Isolation {
    /// The metric (and label selector) the memory rule watches.
    fn memory_metric(self) -> (&'static str, &'static str) {
        match self {
            Isolation::InProcess => ("process_resident_memory_bytes", ""),
            Isolation::Process => (
                "plugvisor_plugin_memory_bytes",
                "labels = { plugin = \"fixture\" }\n",
            ),
        }
    }

    /// The fixture's memory as the rule sees it (the worst of its hosts).
    fn memory(self, m: &Metrics) -> f64 {
        match self {
            Isolation::InProcess => m.get("process_resident_memory_bytes", &[]).unwrap(),
            Isolation::Process => m
                .matching("plugvisor_plugin_memory_bytes", &[("plugin", "fixture")])
                .map(|(_, v)| v)
                .reduce(f64::max)
                .unwrap(),
        }
    }

    /// The config lines that put every plugin of the matrix in this mode.
    fn config(self) -> String {
        match self {
            Isolation::InProcess => String::new(),
            Isolation::Process => {
                let mut config = String::new();
                for p in ["echo", "fixture", "codec", "legacy-echo"] {
                    let _ = write!(config, "[plugin.{p}]\nisolation = \"process\"\n");
                }
                config
            }
        }
    }
}

/// The matrix's thresholds file: a memory rule that degrades the fixture
/// 64 MiB above `base` and clears 32 MiB above it, and an alert on any
/// panic of the fixture.
fn rules(isolation: Isolation, base: f64) -> String {
    let mib = f64::from(1 << 20);
    let (metric, labels) = isolation.memory_metric();
    format!(
        "evaluation_interval = \"250ms\"\n\
         [[rule]]\nname = \"fixture-rss\"\nmetric = \"{metric}\"\n{labels}op = \">\"\nthreshold = {}\nclear = {}\nplugin = \"fixture\"\naction = \"degrade\"\nlevel = 1\ncooldown = \"0s\"\n\
         [[rule]]\nname = \"fixture-panics\"\nmetric = \"plugvisor_requests_total\"\nlabels = {{ plugin = \"fixture\", outcome = \"panic\" }}\nfunction = \"increase\"\nwindow = \"2s\"\nop = \">\"\nthreshold = 0\nplugin = \"fixture\"\naction = \"alert\"\ncooldown = \"0s\"\n",
        (base + 64.0 * mib).round(),
        (base + 32.0 * mib).round()
    )
}

/// One row of the matrix: its name (as `docs/RELIABILITY.md` names it)
/// and what it does to the daemon, with its own checks of (c).
type Row = (&'static str, fn(&mut Matrix));

// A plain `mod rows;` would look for `tests/rows.rs`, which cargo would
// build as a test target of its own; `faults/` has no `main.rs`, so it is
// not one.
#[path = "faults/mod.rs"]
mod rows;

#[test]
fn matrix() {
    run_matrix(Isolation::InProcess);
}

/// The same rows with every plugin in plugin hosts: what the catalog,
/// the store and the rules do does not depend on where a version runs.
#[test]
fn matrix_in_plugin_hosts() {
    run_matrix(Isolation::Process);
}

fn run_matrix(isolation: Isolation) {
    if !require_root("matrix (mounts a tmpfs as state_dir)") {
        return;
    }
    let started = Instant::now();
    let keys = tempfile::tempdir().unwrap();
    let (trusted, public) = keygen(&keys.path().join("trusted"));
    let (untrusted, _) = keygen(&keys.path().join("untrusted"));
    let series = echo_version_series(SERIES_MAJOR, SERIES_LEN);
    let state_parent = tempfile::tempdir().unwrap();
    let state_fs = Tmpfs::mount(&state_parent.path().join("state"), STATE_FS_SIZE);
    let d = Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
            ListenerSpec::tcp("fixture-tcp", "fixture"),
        ],
        probes: "off",
        packages: vec![
            ("echo".into(), series[0].1.clone(), series[0].0.clone()),
            (
                "fixture".into(),
                build_named_plugin("fixture", "1.0.0"),
                "1.0.0".into(),
            ),
        ],
        trial: "1s",
        thresholds: Some("evaluation_interval = \"250ms\"\n".into()),
        trust: TrustOptions {
            public_keys: vec![public],
            require_signature: true,
            sign_with: Some(trusted.clone()),
        },
        state_dir: Some(state_fs.path.clone()),
        extra_config: isolation.config(),
        ..Default::default()
    });
    let live = Live::start(&LiveOptions {
        tcp: vec![d.addr("echo-tcp"), d.addr("echo-tcp")],
        grpc: vec![d.addr("echo-grpc")],
        pause: Duration::from_millis(2),
    });
    let mut m = Matrix {
        isolation,
        live,
        good: series[0].0.clone(),
        series,
        next: 1,
        before: d.metrics(),
        log_from: 0,
        journal_from: 0,
        objects: BTreeSet::new(),
        rules: String::new(),
        d,
        state_fs,
        _state_parent: state_parent,
        trusted,
        untrusted,
    };
    // Other plugins the dependency rows need: codec (which requires
    // echo) and legacy-echo.
    m.install(
        "codec",
        "1.1.0",
        &build_named_plugin("codec", "1.1.0"),
        PackageTweaks {
            extra: Some("[requires]\necho = \"*\"\n".into()),
            ..Default::default()
        },
    );
    m.install(
        "legacy-echo",
        "0.1.0",
        &build_named_plugin("legacy-echo", "0.1.0"),
        PackageTweaks::default(),
    );
    wait_until(deadline(), "codec and legacy-echo active", || {
        m.plugin_status("codec")["active"] == "1.1.0"
            && m.plugin_status("legacy-echo")["active"] == "0.1.0"
    });
    // The rules every thresholds row must leave in force: an alert on
    // fixture panics, and a memory rule over the fixture's memory as it is
    // now.
    m.rules = rules(isolation, isolation.memory(&m.d.metrics()));
    write_atomically(&m.d.thresholds_path(), m.rules.as_bytes());
    wait_until(deadline(), "rules loaded", || {
        m.d.metrics()
            .get("plugvisor_rule_state", &[("rule", "fixture-rss")])
            .is_some()
    });
    // A file at rest is read once: the daemon's own reads of it are not
    // changes (they once re-read it every debounce period, forever).
    let loads = |m: &Matrix| {
        m.d.log_lines()
            .iter()
            .filter(|l| l["fields"]["message"] == "thresholds loaded")
            .count()
    };
    std::thread::sleep(Duration::from_millis(300));
    let settled = loads(&m);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        loads(&m),
        settled,
        "an unchanged thresholds file is not re-read"
    );
    m.check("start", &m.good.clone());

    let mut timings = BTreeMap::new();
    for (i, (name, row)) in rows::all().enumerate() {
        let t = Instant::now();
        let before = m.good.clone();
        m.before = m.d.metrics();
        m.log_from = m.d.log_lines().len();
        m.journal_from = m.d.journal().len();
        eprintln!(
            "row {:2}: {name} (rss {:.1} MiB)",
            i + 1,
            m.before
                .get("process_resident_memory_bytes", &[])
                .unwrap_or(0.0)
                / f64::from(1 << 20)
        );
        row(&mut m);
        m.check(name, &before);
        timings.insert(i + 1, (name, t.elapsed()));
    }
    let tally = m.live.take();
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    // The rows ran where they were meant to: in hosts, the serving
    // versions each in a process of its own (echo, fixture, codec,
    // legacy-echo at least); in-process, none.
    let hosts = m.d.plugin_hosts().len();
    match isolation {
        Isolation::Process => assert!(hosts >= 4, "{hosts} plugin hosts"),
        Isolation::InProcess => assert_eq!(hosts, 0),
    }
    for (i, (name, took)) in &timings {
        eprintln!("row {i:2} {took:>10.2?}  {name}");
    }
    eprintln!(
        "matrix ({isolation:?}): {} rows in {:.1?}, echo {} serving",
        rows::all().count(),
        started.elapsed(),
        m.good
    );
}

/// A daemon (probes off, 1 s trial, `env` for the fixtures) whose echo
/// 1.0.0 has become known-good, with the segv fixture then committed as
/// echo 2.0.0; returns the daemon and the fixture's library.
fn segv_over_known_good(env: Vec<(String, String)>) -> (Daemon, PathBuf) {
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        trial: "1s",
        env,
        ..Default::default()
    });
    wait_until(deadline(), "1.0.0 known-good", || {
        d.status()["plugins"][0]["state"] == "known-good"
    });
    let segv = build_plugin_version("plugvisor-fixture-segv", "fixture_segv", "2.0.0");
    install_package(
        &d.plugins_dir,
        "echo",
        "2.0.0",
        &segv,
        &PackageTweaks::default(),
    );
    (d, segv)
}

/// A plugin that segfaults takes the process down — nothing in-process can
/// stop that — and the restart comes up on the known-good version, with
/// the journal, the log and the metrics saying why, and the crashed
/// version kept out.
#[test]
fn segfault_restarts_on_the_known_good_version() {
    let (mut d, _) = segv_over_known_good(Vec::new());
    wait_until(deadline(), "2.0.0 serves", || {
        d.serving("echo-tcp").as_deref() == Some("2.0.0")
    });
    // It serves before the store has recorded it; the crash must come
    // after the record, as the test's claim about the refs needs.
    wait_until(deadline(), "2.0.0 recorded in the journal", || {
        d.journal()
            .iter()
            .any(|e| e["event"] == "activated" && e["version"] == "2.0.0")
    });
    let live = Live::start(&LiveOptions {
        tcp: vec![d.addr("echo-tcp")],
        grpc: Vec::new(),
        pause: Duration::from_millis(2),
    });
    let mut c = LineClient::connect(d.addr("echo-tcp")).unwrap();
    assert_eq!(c.call("fine").unwrap(), "[echo 2.0.0] fine");
    assert!(
        c.call("crash").is_err(),
        "the connection dies with the process"
    );
    let status = d.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.signal(),
        Some(libc::SIGSEGV),
        "a real segfault, not a caught panic: {status}"
    );
    // What the crash left behind is whole: 2.0.0 is on trial in the refs.
    let s = assert_state_consistent(&d.state_dir);
    assert!(s.refs["echo"].on_trial);
    assert_eq!(s.active_version("echo"), Some("2.0.0"));
    d.restart();
    assert_eq!(d.serving("echo-tcp").as_deref(), Some("1.0.0"));
    // The clients that were connected saw their connections go; the ones
    // that came back are answered by the known-good version.
    let _ = live.take();
    std::thread::sleep(Duration::from_millis(300));
    let after = live.stop();
    assert!(
        after.errors.is_empty(),
        "after the restart: {:?}",
        after.errors
    );
    assert_eq!(after.versions, BTreeSet::from(["1.0.0".to_owned()]));

    let j = d.journal();
    let rb = j.iter().rev().find(|e| e["event"] == "rollback").unwrap();
    assert_eq!(
        (
            rb["reason"].as_str(),
            rb["from_version"].as_str(),
            rb["version"].as_str()
        ),
        (Some("crash-in-trial"), Some("2.0.0"), Some("1.0.0"))
    );
    assert!(
        d.log_lines().iter().any(|l| l["level"] == "ERROR"
            && l["fields"]["message"].as_str().is_some_and(|m| m
                .contains("died while 2.0.0 was on trial")
                && m.contains("crash-in-trial"))),
        "the restart says why"
    );
    assert_eq!(
        d.metrics().get(
            "plugvisor_rollbacks_total",
            &[("plugin", "echo"), ("reason", "crash-in-trial")]
        ),
        Some(1.0)
    );
    // The package that crashed is still in plugins_dir: refused once, by name.
    let refusals = d.refusals_since(0);
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    assert!(
        refusals[0]["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("version 2.0.0 is quarantined"),
        "{refusals:#?}"
    );
    let s = assert_state_consistent(&d.state_dir);
    assert_eq!(s.active_version("echo"), Some("1.0.0"));
    assert!(!s.refs["echo"].on_trial);
    assert!(
        s.refs["echo"]
            .quarantined
            .iter()
            .any(|q| q.version == "2.0.0")
    );
}

/// A plugin that segfaults inside `init` kills the process before any
/// refs name it. Without a record of the attempt, the restart would see
/// the package again, load it, and die again — a crash loop under any
/// supervisor. The load mark names it: the restart quarantines it
/// (`crash-in-load`), stays up on the version it had, and a newer version
/// loads as usual.
#[test]
fn a_segfault_in_init_is_quarantined_not_retried_on_restart() {
    let (mut d, segv) =
        segv_over_known_good(vec![("PLUGVISOR_FIXTURE_SEGV_INIT".into(), "2.0.0".into())]);
    let status = d.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.signal(),
        Some(libc::SIGSEGV),
        "init really segfaulted: {status}"
    );
    let s = assert_state_consistent(&d.state_dir);
    assert_eq!(
        s.loading.get("echo").map(String::as_str),
        Some("2.0.0"),
        "the load mark names the version that was being loaded"
    );
    assert_eq!(
        s.active_version("echo"),
        Some("1.0.0"),
        "no refs named 2.0.0"
    );

    d.restart();
    assert_eq!(d.serving("echo-tcp").as_deref(), Some("1.0.0"));
    // The rescan at start saw the package and refused it by name, instead
    // of loading it again.
    wait_until(deadline(), "the package refused as quarantined", || {
        d.refusals_since(0).iter().any(|r| {
            r["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("version 2.0.0 is quarantined"))
        })
    });
    d.assert_running();
    assert!(
        d.log_lines().iter().any(|l| l["level"] == "ERROR"
            && l["fields"]["message"].as_str().is_some_and(|m| m
                .contains("died while loading echo 2.0.0")
                && m.contains("crash-in-load"))),
        "the restart says why"
    );
    let j = d.journal();
    let crash = j
        .iter()
        .find(|e| e["event"] == "crash-in-load")
        .expect("a crash-in-load journal entry");
    assert_eq!(crash["plugin"], "echo");
    assert_eq!(crash["version"], "2.0.0");
    assert_eq!(crash["sha256"].as_str(), Some(sha256_file(&segv).as_str()));
    assert_eq!(d.reloads("echo", "failed"), 1);
    let s = assert_state_consistent(&d.state_dir);
    assert!(s.loading.is_empty(), "the mark is cleared: {:?}", s.loading);
    assert!(
        s.refs["echo"]
            .quarantined
            .iter()
            .any(|q| q.version == "2.0.0")
    );

    // A newer version is not held back by the quarantine.
    let next = plugvisor_tests::build_echo_version("3.0.0");
    install_package(
        &d.plugins_dir,
        "echo",
        "3.0.0",
        &next,
        &PackageTweaks::default(),
    );
    wait_until(deadline(), "3.0.0 serves", || {
        d.serving("echo-tcp").as_deref() == Some("3.0.0")
    });
    assert_eq!(d.stop(), Some(0));
}

/// Every file under `dir` with the sha256 of its bytes.
fn tree_digest(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), sha256_file(&p));
            }
        }
    }
    out
}

/// A typo in the config stops a restart before anything is touched: exit
/// non-zero, the key and its line named; `state_dir` byte for byte as it
/// was; the corrected config comes up on the same version.
#[test]
fn a_config_with_an_unknown_key_is_refused_at_start() {
    let mut d = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let (v, lib) = echo_version_series(SERIES_MAJOR, 1).remove(0);
    install_package(&d.plugins_dir, "echo", &v, &lib, &PackageTweaks::default());
    wait_until(deadline(), "the new version serves", || {
        d.serving("echo-tcp").as_deref() == Some(v.as_str())
    });
    assert_eq!(d.stop(), Some(0));
    let good = std::fs::read_to_string(&d.config).unwrap();
    let line = good.lines().position(|l| l == "[reload]").unwrap() + 2;
    std::fs::write(
        &d.config,
        good.replace("[reload]\n", "[reload]\nkeep_loded = 4\n"),
    )
    .unwrap();
    let before = tree_digest(&d.state_dir);
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("unknown field `keep_loded`")
            && err.contains(&format!("line {line}"))
            && err.contains(&d.config.display().to_string())
            && err.contains("expected one of")
            && err.contains("`keep_loaded`"),
        "the key, its line and the keys that exist: {err}"
    );
    assert_eq!(tree_digest(&d.state_dir), before, "state_dir untouched");
    assert_state_consistent(&d.state_dir);
    std::fs::write(&d.config, good).unwrap();
    d.restart();
    assert_eq!(d.serving("echo-tcp").as_deref(), Some(v.as_str()));
}

/// A `state_dir` that is read-only when the daemon starts (a flash device
/// the kernel remounted `ro` after errors): the daemon comes up on what
/// the store holds, says once why nothing new can be recorded, refuses
/// reloads with the cause, and takes them again once it is writable.
#[test]
fn a_read_only_state_dir_at_start_serves_from_the_store() {
    if !require_root("a_read_only_state_dir_at_start (mounts a tmpfs)") {
        return;
    }
    let parent = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&parent.path().join("state"), "16m");
    let series = echo_version_series(SERIES_MAJOR, 3);
    let mut d = Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        probes: "off",
        trial: "1s",
        packages: vec![("echo".into(), series[0].1.clone(), series[0].0.clone())],
        state_dir: Some(fs.path.clone()),
        ..Default::default()
    });
    let (v1, lib1) = series[1].clone();
    install_package(
        &d.plugins_dir,
        "echo",
        &v1,
        &lib1,
        &PackageTweaks::default(),
    );
    wait_until(deadline(), "v1 known-good", || {
        d.status()["plugins"][0]["state"] == "known-good"
            && d.status()["plugins"][0]["active"] == v1.as_str()
    });
    assert_eq!(d.stop(), Some(0));
    fs.remount("ro");
    let before = tree_digest(&d.state_dir);
    d.restart();
    let live = Live::start(&LiveOptions {
        tcp: vec![d.addr("echo-tcp")],
        grpc: vec![d.addr("echo-grpc")],
        pause: Duration::from_millis(2),
    });
    assert_eq!(d.serving("echo-tcp").as_deref(), Some(v1.as_str()));
    let said: Vec<String> = d
        .log_lines()
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("state_dir is not writable"))
        })
        .map(|l| l["fields"]["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        said.len(),
        1,
        "said once, at the start on a read-only fs: {said:?}"
    );
    assert!(said[0].contains("Read-only file system"), "{said:?}");
    assert_eq!(
        d.metrics().get("plugvisor_state_dir_free_bytes", &[]),
        Some(0.0)
    );
    // A new package: refused with the cause, v1 serves on.
    let from = d.log_lines().len();
    let (v2, lib2) = series[2].clone();
    install_package(
        &d.plugins_dir,
        "echo",
        &v2,
        &lib2,
        &PackageTweaks::default(),
    );
    wait_until(deadline(), "v2 refused", || {
        d.reloads("echo", "failed") == 1
    });
    let refusals = d.refusals_since(from);
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    let message = refusals[0]["fields"]["message"].as_str().unwrap();
    assert!(message.contains("Read-only file system"), "{message}");
    assert_eq!(refusals[0]["fields"]["serving"], v1.as_str());
    assert_eq!(d.serving("echo-tcp").as_deref(), Some(v1.as_str()));
    assert_eq!(tree_digest(&d.state_dir), before, "nothing written");
    assert_state_consistent(&d.state_dir);
    // Writable again: the next look takes v2.
    fs.remount("rw");
    d.signal(libc::SIGUSR1);
    wait_until(deadline(), "v2 serves", || {
        d.serving("echo-tcp").as_deref() == Some(v2.as_str())
    });
    let t = live.stop();
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    assert!(t.frames > 0);
    assert!(
        t.versions
            .is_subset(&BTreeSet::from([v1.clone(), v2.clone()]))
    );
    wait_until(deadline(), "refs record v2", || {
        check_state(&d.state_dir).is_ok_and(|s| s.active_version("echo") == Some(v2.as_str()))
    });
    let s = assert_state_consistent(&d.state_dir);
    assert!(s.temp_files.is_empty(), "{:?}", s.temp_files);
    drop(d);
}

/// Server sockets of `port` that are ESTABLISHED, from `/proc/net/tcp`.
fn established(port: u16) -> usize {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].rsplit(':').next() == Some(&format!("{port:04X}")) && f[3] == "01"
        })
        .count()
}

/// The eBPF ring buffer overflows: a connection storm breaks more
/// connections inside one reload window than the ring holds while the
/// daemon is not scheduled (SIGSTOP — as a starved or frozen consumer
/// would be). Every event that did not fit is counted as dropped, the
/// kernel's own counter misses none, the daemon serves on.
/// Whether every thread of `pid` is in the stopped state (`T`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
    })
}

#[test]
fn a_ring_buffer_overflow_is_counted_and_serving_goes_on() {
    const STORM: usize = 400;
    /// One page: about a hundred 40-byte records.
    const RING: u32 = 4096;
    if !require_root("a_ring_buffer_overflow_is_counted_and_serving_goes_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("init-mark");
    let d = Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        probes: "on",
        ring_buffer_bytes: Some(RING),
        env: vec![
            ("PLUGVISOR_FIXTURE_INIT_MS".into(), "3000".into()),
            (
                "PLUGVISOR_FIXTURE_INIT_MARK".into(),
                mark.display().to_string(),
            ),
        ],
        ..Default::default()
    });
    let live = Live::start(&LiveOptions {
        tcp: vec![d.addr("echo-tcp")],
        grpc: vec![d.addr("echo-grpc")],
        pause: Duration::from_millis(2),
    });
    let port = d.addr("echo-tcp").port();
    let mut storm: Vec<LineClient> = (0..STORM)
        .map(|_| LineClient::connect(d.addr("echo-tcp")).unwrap())
        .collect();
    for c in &mut storm {
        assert!(c.call("hello").unwrap().starts_with("[echo 1.0.0]"));
    }
    let broken = |d: &Daemon| {
        d.metrics()
            .get(
                "plugvisor_reload_broken_connections_total",
                &[("listener", "echo-tcp")],
            )
            .unwrap()
    };
    let dropped = |d: &Daemon| {
        d.metrics()
            .get(
                "plugvisor_probe_events_dropped_total",
                &[("probe", "inet_sock_set_state")],
            )
            .unwrap()
    };
    assert_eq!((broken(&d), dropped(&d)), (0.0, 0.0));
    // Another plugin's reload opens the window (one window for all
    // listeners) and holds it for three seconds of init.
    let slow = build_plugin_version("plugvisor-fixture-slow-init", "fixture_slow_init", "1.0.0");
    install_package(
        &d.plugins_dir,
        "slow",
        "1.0.0",
        &slow,
        &PackageTweaks::default(),
    );
    wait_until(deadline(), "slow's init runs (window open)", || {
        mark.exists()
    });
    // Server sockets of the listener still established: the storm's and
    // the live client's.
    let live_tcp = established(port) - STORM;
    d.signal(libc::SIGSTOP);
    // kill(2) returns before the stop has reached every thread; a thread
    // still running would drain the ring while the storm fills it.
    wait_until(deadline(), "every thread of plugvisor stopped", || {
        all_threads_stopped(d.pid())
    });
    drop(storm);
    let all_closed = Instant::now() + Duration::from_secs(10);
    while established(port) > live_tcp && Instant::now() < all_closed {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = established(port);
    d.signal(libc::SIGCONT);
    assert_eq!(
        left, live_tcp,
        "the kernel saw every storm connection close while plugvisor was stopped"
    );
    wait_until(deadline(), "slow serves (window closed)", || {
        d.status()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["plugin"] == "slow" && p["active"] == "1.0.0")
    });
    let warned = |d: &Daemon| {
        d.log_lines()
            .iter()
            .filter(|l| {
                l["fields"]["message"]
                    == "kernel saw a connection leave ESTABLISHED while a reload window was open"
            })
            .count()
    };
    // The kernel's counter is exact; the ring carried what fitted, the
    // rest is counted as dropped: together, every connection.
    wait_until(deadline(), "every broken connection accounted for", || {
        broken(&d) == STORM as f64 && warned(&d) as f64 + dropped(&d) == STORM as f64
    });
    let lost = dropped(&d);
    assert!(
        lost >= (STORM / 2) as f64,
        "a {RING}-byte ring cannot hold {STORM} events: only {lost} dropped"
    );
    eprintln!(
        "ring overflow: {STORM} broken connections, {} events delivered, {lost} dropped",
        warned(&d)
    );
    let t = live.stop();
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    assert!(t.frames > 0);
    assert_eq!(d.serving("echo-tcp").as_deref(), Some("1.0.0"));
    assert_eq!(
        d.metrics()
            .get("plugvisor_probe_up", &[("probe", "inet_sock_set_state")]),
        Some(1.0),
        "the probe stays up"
    );
    assert_state_consistent(&d.state_dir);
}
