//! The command line as an operator uses it: config checks, the admin
//! socket and its permissions, `reload`, `status`, SIGUSR1 and SIGTERM.
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, PackageTweaks, binary, build_echo_version, echo_version,
    install_package, wait_until,
};

#[test]
fn check_accepts_a_valid_config_and_names_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "plugins_dir = \"/tmp/p\"\nstate_dir = \"/tmp/s\"\n[[listener]]\nname = \"echo-tcp\"\nprotocol = \"tcp\"\nbind = \"127.0.0.1:7001\"\nplugin = \"echo\"\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["run", "--check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "plugins_dir = \"/tmp/p\"\n[reload]\ntrail = \"30s\"\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["run", "--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("trail") && err.contains("bad.toml"), "{err}");
    // The same config is refused by `run` itself, before anything starts.
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trail"));
}

#[test]
fn admin_socket_reload_status_signals() {
    let mut daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let sock = daemon.dir.path().join("admin.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode");

    let (code, out, err) = daemon.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("echo") && out.contains("1.0.0") && out.contains("echo-tcp"),
        "{out}"
    );
    let (code, out, _) = daemon.cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["result"]["plugins"][0]["active"], "1.0.0");

    // `reload` acts on the package even when the watcher missed nothing,
    // and prints the outcome.
    let lib = build_echo_version("1.5.0");
    install_package(
        &daemon.plugins_dir,
        "echo",
        "1.5.0",
        &lib,
        &PackageTweaks::default(),
    );
    let (code, out, err) = daemon.cli(&["reload", "echo"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("reloaded 1.0.0 -> 1.5.0") || out.contains("unchanged, 1.5.0 is serving"),
        "{out}"
    );
    let resp = LineClient::connect(daemon.addr("echo-tcp"))
        .unwrap()
        .call("x")
        .unwrap();
    assert_eq!(echo_version(&resp), Some("1.5.0"));

    // A refused reload exits non-zero and says why.
    install_package(
        &daemon.plugins_dir,
        "echo",
        "1.6.0",
        &build_echo_version("1.6.0"),
        &PackageTweaks {
            sha256: Some("ef".repeat(32)),
            ..Default::default()
        },
    );
    let (code, out, _) = daemon.cli(&["reload", "echo"]);
    assert_ne!(code, 0);
    assert!(
        out.contains("rejected") && out.contains("sha256") && out.contains("still serving 1.5.0"),
        "{out}"
    );
    let (code, out, err) = daemon.cli(&["reload", "nope"]);
    assert_ne!(code, 0, "reload of an unknown plugin fails");
    assert!(out.contains("no package for plugin \"nope\""), "{out}{err}");
    assert_eq!(
        daemon
            .metrics()
            .get("plugvisor_reloads_total", &[("plugin", "nope")]),
        None,
        "no series for a typo"
    );

    // SIGUSR1 re-scans: a package placed while the watcher is blind to it
    // (same bytes re-committed) is re-processed and reported as unchanged,
    // and a genuinely new one is taken.
    let lib = build_echo_version("1.7.0");
    install_package(
        &daemon.plugins_dir,
        "echo",
        "1.7.0",
        &lib,
        &PackageTweaks::default(),
    );
    daemon.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(15);
    wait_until(deadline, "1.7.0 serves", || {
        LineClient::connect(daemon.addr("echo-tcp"))
            .and_then(|mut c| c.call("x"))
            .is_ok_and(|r| echo_version(&r) == Some("1.7.0"))
    });
    assert_eq!(daemon.stop(), Some(0));
    assert!(!sock.exists(), "socket removed on exit");
}

#[test]
fn restart_comes_up_on_the_active_version_from_the_store() {
    let mut daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let lib = build_echo_version("1.8.0");
    install_package(
        &daemon.plugins_dir,
        "echo",
        "1.8.0",
        &lib,
        &PackageTweaks::default(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    wait_until(deadline, "1.8.0 serves", || {
        LineClient::connect(daemon.addr("echo-tcp"))
            .and_then(|mut c| c.call("x"))
            .is_ok_and(|r| echo_version(&r) == Some("1.8.0"))
    });
    assert_eq!(daemon.stop(), Some(0));
    // The package directory is gone; the store still has what was active.
    std::fs::remove_dir_all(daemon.plugins_dir.join("echo")).unwrap();
    daemon.restart();
    let resp = LineClient::connect(daemon.addr("echo-tcp"))
        .unwrap()
        .call("x")
        .unwrap();
    assert_eq!(echo_version(&resp), Some("1.8.0"));
    let refs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(daemon.state_dir.join("refs/echo.json")).unwrap())
            .unwrap();
    assert_eq!(refs["active"]["version"], "1.8.0");
}
