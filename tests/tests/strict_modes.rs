//! Who may write what the daemon loads (sshd's StrictModes): a
//! `plugins_dir` others can write keeps the daemon from starting; a package
//! directory or library others can write, or a library owned by another
//! user, is refused with the fix in the message while the old version
//! serves on; a library symlinked out of its package is refused.
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, PackageTweaks, binary, build_echo_version, install_package, wait_until,
};

fn chmod(p: &std::path::Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Waits for one more rejection; returns the refusal's message and file,
/// checking that `serving` still serves.
fn refusal(
    daemon: &Daemon,
    before: u64,
    from: usize,
    serving: &str,
    what: &str,
) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_until(deadline, &format!("{what}: refused"), || {
        daemon.reloads("echo", "rejected") == before + 1
    });
    let lines = daemon.refusals_since(from);
    assert_eq!(lines.len(), 1, "{what}: one log line, got {lines:#?}");
    assert_eq!(lines[0]["fields"]["serving"], serving, "{what}");
    assert_eq!(
        daemon.serving("echo-tcp").as_deref(),
        Some(serving),
        "{what}"
    );
    (
        lines[0]["fields"]["message"].as_str().unwrap().to_owned(),
        lines[0]["fields"]["file"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn a_world_writable_plugins_dir_keeps_the_daemon_from_starting() {
    let mut daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    daemon.stop();
    chmod(&daemon.plugins_dir, 0o777);
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&daemon.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("plugins_dir")
            && err.contains("writable by group and others (mode 0777)")
            && err.contains("chmod go-w"),
        "{err}"
    );
    chmod(&daemon.plugins_dir, 0o755);
    daemon.restart();
}

#[test]
fn unsafe_packages_are_refused_and_fixing_them_is_enough() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let pkg = daemon.plugins_dir.join("echo");
    let mut rejected = 0;

    // A group-writable package directory.
    let from = daemon.log_lines().len();
    chmod(&pkg, 0o775);
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.0.0",
        &build_echo_version("2.0.0"),
        &PackageTweaks::default(),
    );
    let (msg, file) = refusal(&daemon, rejected, from, "1.0.0", "group-writable directory");
    rejected += 1;
    assert!(
        msg.contains("package directory") && msg.contains("writable by its group (mode 0775)"),
        "{msg}"
    );
    assert!(file.ends_with("/echo"), "{file}");
    // chmod alone (the manifest's bytes unchanged) is enough to retry.
    chmod(&pkg, 0o755);
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_until(deadline, "2.0.0 serves once the directory is fixed", || {
        daemon.serving("echo-tcp").as_deref() == Some("2.0.0")
    });

    // A world-writable library.
    let lib = build_echo_version("2.1.0");
    std::fs::copy(&lib, pkg.join("libecho-writable.so")).unwrap();
    chmod(&pkg.join("libecho-writable.so"), 0o646);
    let from = daemon.log_lines().len();
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.1.0",
        &lib,
        &PackageTweaks {
            library: Some("libecho-writable.so".into()),
            ..Default::default()
        },
    );
    let (msg, file) = refusal(&daemon, rejected, from, "2.0.0", "world-writable library");
    rejected += 1;
    assert!(
        msg.contains("library") && msg.contains("writable by others (mode 0646)"),
        "{msg}"
    );
    assert!(file.ends_with("libecho-writable.so"), "{file}");

    // A library owned by someone else (chown needs root; CI is root).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let lib = build_echo_version("2.2.0");
        std::fs::copy(&lib, pkg.join("libecho-foreign.so")).unwrap();
        std::os::unix::fs::chown(pkg.join("libecho-foreign.so"), Some(65534), Some(65534)).unwrap();
        let from = daemon.log_lines().len();
        install_package(
            &daemon.plugins_dir,
            "echo",
            "2.2.0",
            &lib,
            &PackageTweaks {
                library: Some("libecho-foreign.so".into()),
                ..Default::default()
            },
        );
        let (msg, _) = refusal(&daemon, rejected, from, "2.0.0", "foreign owner");
        rejected += 1;
        assert!(
            msg.contains("owned by uid 65534, neither root nor the daemon's user")
                && msg.contains("chown"),
            "{msg}"
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root, but this process is not root"
        );
        eprintln!("SKIP foreign owner: chown needs root");
    }

    // A library symlinked out of the package: refused, however it is named.
    let outside = daemon.dir.path().join("outside.so");
    let lib = build_echo_version("2.3.0");
    std::fs::copy(&lib, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, pkg.join("libecho-link.so")).unwrap();
    let from = daemon.log_lines().len();
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.3.0",
        &lib,
        &PackageTweaks {
            library: Some("libecho-link.so".into()),
            ..Default::default()
        },
    );
    let (msg, _) = refusal(
        &daemon,
        rejected,
        from,
        "2.0.0",
        "symlink out of the package",
    );
    assert!(msg.contains("escapes the package directory"), "{msg}");
}
