//! Dependencies between plugins as signals: a package whose `[requires]`,
//! `conflicts` or `abi` do not hold against the active versions is refused
//! (one log line, `rejected`, the old version serves on), the conflict
//! shows as `plugvisor_dependency_conflicts{plugin,kind} 1` and in
//! `plugvisor status`, and when another plugin's switch resolves it the
//! waiting package is taken by itself and the gauge drops to 0.
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, PackageTweaks, build_echo_version, build_named_plugin, install_package,
    wait_until,
};

fn install(daemon: &Daemon, name: &str, version: &str, extra: &str) {
    let lib = if name == "echo" {
        build_echo_version(version)
    } else {
        build_named_plugin(name, version)
    };
    install_package(
        &daemon.plugins_dir,
        name,
        version,
        &lib,
        &PackageTweaks {
            extra: Some(extra.to_owned()),
            ..Default::default()
        },
    );
}

fn install_abi(daemon: &Daemon, name: &str, version: &str, abi: u32) {
    install_package(
        &daemon.plugins_dir,
        name,
        version,
        &build_named_plugin(name, version),
        &PackageTweaks {
            abi: Some(abi),
            ..Default::default()
        },
    );
}

fn gauge(daemon: &Daemon, plugin: &str, kind: &str) -> Option<f64> {
    daemon.metrics().get(
        "plugvisor_dependency_conflicts",
        &[("plugin", plugin), ("kind", kind)],
    )
}

/// Waits for `plugvisor_dependency_conflicts{plugin,kind}` to read `value`
/// (it is published after the attempt's counter, so a moment later).
fn gauge_becomes(daemon: &Daemon, plugin: &str, kind: &str, value: f64) {
    wait_for(
        &format!("dependency_conflicts{{plugin={plugin},kind={kind}}} = {value}"),
        || gauge(daemon, plugin, kind) == Some(value),
    );
}

/// The version of `plugin` that is active, from `plugvisor status --json`.
fn active(daemon: &Daemon, plugin: &str) -> Option<String> {
    let (code, out, err) = daemon.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["result"]["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plugin"] == plugin)
        .and_then(|p| p["active"].as_str().map(str::to_owned))
}

/// Waits for one more refusal of `plugin`; returns its message.
fn refused(daemon: &Daemon, plugin: &str, before: u64, from: usize, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_until(deadline, &format!("{what}: refused"), || {
        daemon.reloads(plugin, "rejected") == before + 1
    });
    let lines: Vec<_> = daemon
        .refusals_since(from)
        .into_iter()
        .filter(|l| l["fields"]["plugin"] == plugin)
        .collect();
    assert_eq!(lines.len(), 1, "{what}: one log line, got {lines:#?}");
    assert!(
        lines[0]["fields"]["file"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{plugin}/plugin.toml")),
        "{what}: {:?}",
        lines[0]["fields"]["file"]
    );
    lines[0]["fields"]["message"].as_str().unwrap().to_owned()
}

fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    wait_until(Instant::now() + Duration::from_secs(30), what, cond);
}

#[test]
fn missing_and_version_conflicts_block_until_resolved() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });

    // missing: echo 2.0.0 needs codec, which is not there.
    let from = daemon.log_lines().len();
    install(
        &daemon,
        "echo",
        "2.0.0",
        "[requires]\ncodec = \">=1.2, <2\"\n",
    );
    let msg = refused(&daemon, "echo", 0, from, "missing");
    assert!(
        msg.contains("dependency conflict")
            && msg.contains("echo 2.0.0 requires codec >=1.2, <2; codec is not active (missing)"),
        "{msg}"
    );
    gauge_becomes(&daemon, "echo", "missing", 1.0);
    assert_eq!(daemon.serving("echo-tcp").as_deref(), Some("1.0.0"));
    let (code, out, _) = daemon.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("DEPENDENCY CONFLICT")
            && out.contains("missing")
            && out.contains("package 2.0.0 waits")
            && out.contains("1.0.0 serves meanwhile"),
        "{out}"
    );

    // codec arrives: it is taken, and echo 2.0.0, waiting on it, follows
    // by itself.
    install(&daemon, "codec", "1.2.0", "");
    wait_for("echo 2.0.0 serves once codec is there", || {
        daemon.serving("echo-tcp").as_deref() == Some("2.0.0")
    });
    assert_eq!(active(&daemon, "codec").as_deref(), Some("1.2.0"));
    gauge_becomes(&daemon, "echo", "missing", 0.0);
    let (_, out, _) = daemon.cli(&["status"]);
    assert!(out.contains("no dependency conflicts"), "{out}");

    // version: codec 2.0.0 would leave echo's range: refused, codec 1.2.0
    // serves on.
    let from = daemon.log_lines().len();
    install(&daemon, "codec", "2.0.0", "");
    let msg = refused(&daemon, "codec", 0, from, "version");
    assert!(
        msg.contains("echo 2.0.0 requires codec >=1.2, <2; codec is 2.0.0 (version)"),
        "{msg}"
    );
    gauge_becomes(&daemon, "codec", "version", 1.0);
    assert_eq!(active(&daemon, "codec").as_deref(), Some("1.2.0"));

    // echo 2.1.0 widens its range: taken, and codec 2.0.0 follows.
    install(
        &daemon,
        "echo",
        "2.1.0",
        "[requires]\ncodec = \">=1.2, <3\"\n",
    );
    wait_for("codec 2.0.0 follows echo 2.1.0", || {
        active(&daemon, "codec").as_deref() == Some("2.0.0")
    });
    assert_eq!(daemon.serving("echo-tcp").as_deref(), Some("2.1.0"));
    gauge_becomes(&daemon, "codec", "version", 0.0);
    assert_eq!(daemon.reloads("echo", "rejected"), 1);
    assert_eq!(daemon.reloads("codec", "rejected"), 1);
}

#[test]
fn cycle_conflict_and_abi_are_refused_and_shown() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    install(&daemon, "codec", "1.0.0", "");
    wait_for("codec 1.0.0 active", || {
        active(&daemon, "codec").as_deref() == Some("1.0.0")
    });
    install(
        &daemon,
        "echo",
        "2.0.0",
        "conflicts = [\"legacy-echo\"]\n[requires]\ncodec = \"^1\"\n",
    );
    wait_for("echo 2.0.0 serves", || {
        daemon.serving("echo-tcp").as_deref() == Some("2.0.0")
    });

    // cycle: codec 1.1.0 would require echo, which requires codec.
    let from = daemon.log_lines().len();
    install(&daemon, "codec", "1.1.0", "[requires]\necho = \"*\"\n");
    let msg = refused(&daemon, "codec", 0, from, "cycle");
    assert!(
        msg.contains("requirement cycle codec -> echo -> codec (cycle)"),
        "{msg}"
    );
    gauge_becomes(&daemon, "codec", "cycle", 1.0);
    assert_eq!(active(&daemon, "codec").as_deref(), Some("1.0.0"));

    // conflict: echo declared one with legacy-echo.
    let from = daemon.log_lines().len();
    install(&daemon, "legacy-echo", "0.1.0", "");
    let msg = refused(&daemon, "legacy-echo", 0, from, "conflict");
    assert!(
        msg.contains("echo 2.0.0 declares a conflict with legacy-echo 0.1.0 (conflict)"),
        "{msg}"
    );
    gauge_becomes(&daemon, "legacy-echo", "conflict", 1.0);
    assert_eq!(active(&daemon, "legacy-echo"), None);

    // An unrelated switch retries the blocked packages, quietly: they are
    // still blocked by the same, which was said once.
    install(
        &daemon,
        "echo",
        "2.0.1",
        "conflicts = [\"legacy-echo\"]\n[requires]\ncodec = \"^1\"\n",
    );
    wait_for("echo 2.0.1 serves", || {
        daemon.serving("echo-tcp").as_deref() == Some("2.0.1")
    });
    // (status waits for the reload pass, retries included, to finish)
    assert_eq!(active(&daemon, "codec").as_deref(), Some("1.0.0"));
    assert_eq!(daemon.reloads("codec", "rejected"), 1);
    assert_eq!(daemon.reloads("legacy-echo", "rejected"), 1);

    // abi: a manifest for another plugin ABI.
    let from = daemon.log_lines().len();
    install_abi(&daemon, "codec", "1.2.0", 7);
    let msg = refused(&daemon, "codec", 1, from, "abi");
    assert!(
        msg.contains("the manifest declares plugin ABI 7, this plugvisor speaks ABI 1 (abi)"),
        "{msg}"
    );
    gauge_becomes(&daemon, "codec", "abi", 1.0);
    // codec's waiting package is now this one: its cycle is gone.
    gauge_becomes(&daemon, "codec", "cycle", 0.0);

    let (code, out, _) = daemon.cli(&["status"]);
    assert_eq!(code, 0);
    for words in [
        "DEPENDENCY CONFLICT",
        "legacy-echo",
        "conflict",
        "package 1.2.0 waits",
        "plugin ABI 7",
        "nothing serves meanwhile",
    ] {
        assert!(out.contains(words), "status should say {words:?}:\n{out}");
    }
    let (_, json, _) = daemon.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let kinds: Vec<&str> = v["result"]["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["abi", "conflict"], "{json}");

    // Through all of it echo served and codec 1.0.0 stayed.
    assert_eq!(active(&daemon, "codec").as_deref(), Some("1.0.0"));
    assert_eq!(daemon.reloads("echo", "rejected"), 0);
}
