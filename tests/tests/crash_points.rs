//! kill -9 at every named step of a reload, a trial and a rollback, then a
//! restart: plugvisor must come up serving one consistent version — and
//! exactly the one each step calls for — with `state_dir` whole and the
//! journal telling what happened.
//!
//! The daemon under test is `plugvisor-failpoints` (the `failpoints`
//! feature build); `FAILPOINTS="<step>=return(<key>)"` makes it SIGKILL
//! itself when it reaches that step for that version (or object hash), so
//! it first comes up normally on 1.0.0. The restart runs without
//! `FAILPOINTS`.
//!
//! What each step must give, and why:
//! * before the refs record the new version (verify, mid-copy into the
//!   store, staged, initialised, switched): the refs still name 1.0.0, the
//!   restart boots it from the store, finds the 2.0.0 package untouched
//!   and takes it again — so 2.0.0, freshly on trial. Nothing the crash
//!   interrupted ran any code of the package (or it ran it fine), so
//!   retrying it is right.
//! * once the refs name 2.0.0 on trial (after refs, after journal, and a
//!   trial that had not been marked good yet): the process died during
//!   the trial, so boot counting starts on the known-good 1.0.0 and
//!   quarantines 2.0.0 (`crash-in-trial` in the journal).
//! * once the refs mark the trial good: 2.0.0, known-good.
//! * a rollback to 1.0.0 from a known-good 2.0.0: until its refs are
//!   written nothing of it is recorded, so 2.0.0; after, 1.0.0 with 2.0.0
//!   quarantined (the journal line was not written yet: the refs are the
//!   commit point, the journal the account of it).
//!
//! Every point is run twice: with echo in the daemon and in plugin hosts
//! (`isolation = "process"`). The steps and what they must give are the
//! same; in hosts, the kill -9 must also take the daemon's hosts with it
//! (each sees its channel close and exits: none is left behind), and after
//! the restart the version serves from a host again.
use std::os::unix::process::ExitStatusExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use plugvisor_tests::state_check::{StateSummary, assert_state_consistent};
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, ListenerSpec, PackageTweaks, build_echo_version,
    echo_version, failpoints_binary, install_package, sha256_file, wait_until,
};

/// How the crash is provoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// 2.0.0 arrives in `plugins_dir` while 1.0.0 is known-good.
    Reload,
    /// 2.0.0 arrives and its trial runs out with no rule firing.
    Trial,
    /// 2.0.0 is known-good too; `plugvisor rollback echo --to 1.0.0`.
    Rollback,
}

/// One step and what must hold after the restart.
struct Case {
    point: &'static str,
    scenario: Scenario,
    /// The version served after the restart.
    serves: &'static str,
    /// Whether the restart rolled back for a crash in the trial.
    crash_in_trial: bool,
}

/// Every crash point, with what it must give. A point the daemon lists
/// but this table lacks fails [`every_crash_point_has_a_case`].
const CASES: &[Case] = &[
    Case {
        point: "reload-after-verify",
        scenario: Scenario::Reload,
        serves: "2.0.0",
        crash_in_trial: false,
    },
    Case {
        point: "store-object-before-rename",
        scenario: Scenario::Reload,
        serves: "2.0.0",
        crash_in_trial: false,
    },
    Case {
        point: "reload-after-stage",
        scenario: Scenario::Reload,
        serves: "2.0.0",
        crash_in_trial: false,
    },
    Case {
        point: "reload-after-init",
        scenario: Scenario::Reload,
        serves: "2.0.0",
        crash_in_trial: false,
    },
    Case {
        point: "reload-after-switch",
        scenario: Scenario::Reload,
        serves: "2.0.0",
        crash_in_trial: false,
    },
    Case {
        point: "reload-after-refs",
        scenario: Scenario::Reload,
        serves: "1.0.0",
        crash_in_trial: true,
    },
    Case {
        point: "reload-after-journal",
        scenario: Scenario::Reload,
        serves: "1.0.0",
        crash_in_trial: true,
    },
    Case {
        point: "trial-before-refs",
        scenario: Scenario::Trial,
        serves: "1.0.0",
        crash_in_trial: true,
    },
    Case {
        point: "trial-after-refs",
        scenario: Scenario::Trial,
        serves: "2.0.0",
        crash_in_trial: false,
    },
    Case {
        point: "rollback-before-swap",
        scenario: Scenario::Rollback,
        serves: "2.0.0",
        crash_in_trial: false,
    },
    Case {
        point: "rollback-after-swap",
        scenario: Scenario::Rollback,
        serves: "2.0.0",
        crash_in_trial: false,
    },
    Case {
        point: "rollback-after-refs",
        scenario: Scenario::Rollback,
        serves: "1.0.0",
        crash_in_trial: false,
    },
];

const WAIT: Duration = Duration::from_secs(30);

fn journal_has(d: &Daemon, event: &str, version: &str) -> bool {
    d.journal()
        .iter()
        .any(|e| e["event"] == event && e["version"].as_str() == Some(version))
}

fn served(d: &Daemon) -> String {
    let r = LineClient::connect(d.addr("echo-tcp"))
        .and_then(|mut c| c.call("ping"))
        .expect("the restarted daemon answers");
    echo_version(&r)
        .unwrap_or_else(|| panic!("not an echo answer: {r:?}"))
        .to_owned()
}

fn case(point: &str) -> &'static Case {
    CASES
        .iter()
        .find(|c| c.point == point)
        .unwrap_or_else(|| panic!("no case for {point}"))
}

/// Installs 2.0.0 (and drives the scenario) until the armed step kills
/// the daemon; returns the state as the crash left it.
fn crash(d: &mut Daemon, c: &Case, v2: &std::path::Path) -> StateSummary {
    let deadline = Instant::now() + WAIT;
    wait_until(deadline, "1.0.0 to pass its trial", || {
        journal_has(d, "known-good", "1.0.0")
    });
    install_package(
        &d.plugins_dir,
        "echo",
        "2.0.0",
        v2,
        &PackageTweaks::default(),
    );
    if c.scenario == Scenario::Rollback {
        wait_until(deadline, "2.0.0 to pass its trial", || {
            journal_has(d, "known-good", "2.0.0")
        });
        // The daemon dies under the command: its answer is lost with it.
        let _ = d.cli(&["rollback", "echo", "--to", "1.0.0"]);
    }
    let status = d.wait_exit(WAIT);
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{}: killed by its failpoint, not {status}",
        c.point
    );
    let log = d.log_lines();
    let last = log
        .iter()
        .rfind(|l| l["fields"]["failpoint"].is_string())
        .unwrap_or_else(|| panic!("{}: no failpoint line in the log", c.point));
    assert_eq!(last["fields"]["failpoint"], c.point, "died where armed");
    // Consistent even as the crash left it, before any recovery ran.
    assert_state_consistent(&d.state_dir)
}

/// The refs and journal after the restart, as the case calls for.
fn assert_outcome(c: &Case, after: &StateSummary) {
    let refs = &after.refs["echo"];
    assert_eq!(
        refs.active.as_ref().map(|a| a.version.as_str()),
        Some(c.serves),
        "{}: the refs agree with what serves",
        c.point
    );
    let quarantined = |v: &str| refs.quarantined.iter().any(|q| q.version == v);
    let rollbacks: Vec<_> = after
        .journal_of("echo")
        .filter(|l| l.event == "rollback")
        .collect();
    if c.crash_in_trial {
        assert_eq!(rollbacks.len(), 1, "{}: {rollbacks:?}", c.point);
        let r = rollbacks[0];
        assert_eq!(r.reason.as_deref(), Some("crash-in-trial"));
        assert_eq!(r.from_version.as_deref(), Some("2.0.0"));
        assert_eq!(r.version.as_deref(), Some("1.0.0"));
        assert!(quarantined("2.0.0"), "{refs:?}");
        assert!(!refs.on_trial);
        // The package is still there: refused, never taken again.
        assert!(
            after.journal_of("echo").any(|l| l.event == "rejected"
                && l.version.as_deref() == Some("2.0.0")
                && l.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("quarantined"))),
            "{:?}",
            after.journal
        );
    } else {
        assert!(rollbacks.is_empty(), "{}: {rollbacks:?}", c.point);
    }
    match (c.scenario, c.serves) {
        (Scenario::Reload, "2.0.0") => {
            // Taken again from the package, on trial from the start.
            let last = after
                .journal_of("echo")
                .filter(|l| l.event == "activated")
                .last()
                .unwrap();
            assert_eq!(last.version.as_deref(), Some("2.0.0"));
            assert!(refs.on_trial);
            assert!(!quarantined("2.0.0"));
        }
        (Scenario::Trial, "2.0.0") => {
            assert_eq!(
                refs.known_good.as_ref().map(|k| k.version.as_str()),
                Some("2.0.0")
            );
            assert!(!refs.on_trial);
        }
        (Scenario::Rollback, "2.0.0") => {
            assert!(
                !quarantined("2.0.0"),
                "nothing of the rollback was recorded"
            );
        }
        (Scenario::Rollback, "1.0.0") => {
            assert!(quarantined("2.0.0"), "{refs:?}");
            assert!(!refs.on_trial);
        }
        _ => {}
    }
}

/// Where echo's code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isolation {
    InProcess,
    Process,
}

/// Plugin hosts started by a daemon whose environment carries `marker`
/// (hosts inherit it; after a kill -9 they are no longer its children).
fn hosts_marked(marker: &str) -> Vec<u32> {
    let needle = format!("PLUGVISOR_TEST_RUN={marker}");
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !cmdline.split(|b| *b == 0).any(|a| a == b"plugin-host") {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|e| e == needle.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

fn run(point: &str, isolation: Isolation) {
    let c = case(point);
    let v1 = build_echo_version("1.0.0");
    let v2 = build_echo_version("2.0.0");
    let key = if c.point == "store-object-before-rename" {
        sha256_file(&v2)
    } else if c.scenario == Scenario::Rollback {
        "1.0.0".to_owned()
    } else {
        "2.0.0".to_owned()
    };
    let marker = format!("{}-{point}-{isolation:?}", std::process::id());
    let mut d = Daemon::start(DaemonOptions {
        probes: "off",
        trial: "300ms",
        binary: Some(failpoints_binary()),
        packages: vec![("echo".into(), v1, "1.0.0".into())],
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        env: vec![
            ("FAILPOINTS".into(), format!("{}=return({key})", c.point)),
            ("PLUGVISOR_TEST_RUN".into(), marker.clone()),
        ],
        extra_config: match isolation {
            Isolation::InProcess => String::new(),
            Isolation::Process => "[plugin.echo]\nisolation = \"process\"\n".to_owned(),
        },
        ..DaemonOptions::default()
    });
    if isolation == Isolation::Process {
        // The marker finds the hosts (so "none left" below means something).
        wait_until(Instant::now() + WAIT, "1.0.0 in a marked host", || {
            !hosts_marked(&marker).is_empty()
        });
    }
    let at_crash = crash(&mut d, c, &v2);
    if isolation == Isolation::Process {
        wait_until(
            Instant::now() + WAIT,
            "the dead daemon's plugin hosts gone",
            || hosts_marked(&marker).is_empty(),
        );
    }
    if c.point == "store-object-before-rename" {
        assert!(
            at_crash
                .temp_files
                .iter()
                .any(|t| t.starts_with("objects") && !at_crash.objects.contains(&key)),
            "the copy was cut short: a temp file, no object: {:?}",
            at_crash.temp_files
        );
    }

    d.set_env("FAILPOINTS", None);
    d.restart();
    // The first rescan runs before the listeners open: what answers now
    // is what the restart settled on.
    assert_eq!(
        served(&d),
        c.serves,
        "{}: the version after restart",
        c.point
    );
    let after = assert_state_consistent(&d.state_dir);
    assert!(
        after.temp_files.iter().all(|t| !t.starts_with("objects")),
        "an interrupted copy is cleaned up at start: {:?}",
        after.temp_files
    );
    assert_outcome(c, &after);
    if isolation == Isolation::Process {
        // The version that serves, and a known-good one kept warm
        // beside a version on trial.
        let hosts = d.plugin_hosts();
        assert!(
            (1..=2).contains(&hosts.len()),
            "{}: the version serves from a host after the restart: {hosts:?}",
            c.point
        );
    }
    // And it stays there: one more look at the package changes nothing.
    let (code, out, err) = d.cli(&["reload", "echo"]);
    assert!(code == 0 || out.contains("quarantined"), "{out}{err}");
    assert_eq!(served(&d), c.serves, "{}: stable after a rescan", c.point);
    assert_state_consistent(&d.state_dir);
}

/// The crash points the daemon declares (`plugvisor-failpoints failpoints`).
fn listed_points() -> Vec<String> {
    let out = Command::new(failpoints_binary())
        .arg("failpoints")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(!listed.is_empty());
    listed
}

#[test]
fn every_crash_point_has_a_case() {
    let listed = listed_points();
    for p in &listed {
        assert!(
            CASES.iter().any(|c| c.point == p),
            "crash point {p} has no case in tests/tests/crash_points.rs: say what a kill -9 there must give"
        );
    }
    for c in CASES {
        assert!(
            listed.iter().any(|p| p == c.point),
            "case {} names no crash point of the daemon",
            c.point
        );
    }
}

/// Every point the daemon declares, in its order; a failure names the point.
#[test]
fn kill9_at_every_crash_point_restarts_on_a_consistent_version() {
    for point in listed_points() {
        eprintln!("--- kill -9 at {point}");
        run(&point, Isolation::InProcess);
    }
}

/// The same with echo in plugin hosts.
#[test]
fn kill9_at_every_crash_point_with_plugin_hosts_restarts_on_a_consistent_version() {
    for point in listed_points() {
        eprintln!("--- kill -9 at {point} (plugin hosts)");
        run(&point, Isolation::Process);
    }
}
