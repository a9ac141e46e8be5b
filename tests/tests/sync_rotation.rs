//! Root key rotation (TUF 1.0 §5.3.4), as the fleet's operator and an
//! attacker do it: `plugvisor repo rotate-root` replaces every key of a
//! repository Debian's nginx serves, and a node that was given only
//! `1.root.json` walks to the new root and takes what the new keys sign;
//! a root 2 signed by someone without the old root key is refused, and the
//! node serves on.
use std::path::Path;
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, FleetRepo, ListenerSpec, Nginx, await_synced, echo_serving, echo_sync,
    metadata_errors, sync_errors, wait_until,
};

const STAGES: [&str; 6] = [
    "timestamp",
    "snapshot",
    "targets",
    "download",
    "verify",
    "commit",
];

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// A node following `server`'s repository, polling every 300 ms.
fn node(server: &Nginx, repo: &FleetRepo, name: &str) -> Daemon {
    Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        extra_config: repo.sync_config(server, name, 0, "", "300ms"),
        ..Default::default()
    })
}

/// The targets versions the node's log says it verified.
fn verified_targets_versions(d: &Daemon) -> Vec<u64> {
    d.log_lines()
        .iter()
        .filter(|l| l["fields"]["message"] == "fleet sync: repository verified")
        .filter_map(|l| l["fields"]["targets_version"].as_u64())
        .collect()
}

/// Copies `from` over `to` (a directory tree), leaving out `skip` names.
fn copy_tree(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if skip.iter().any(|s| e.file_name() == *s) {
            continue;
        }
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &t, skip);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

#[test]
fn a_node_follows_a_root_rotation_from_its_first_root_and_takes_what_the_new_keys_sign() {
    let repo = FleetRepo::init();
    repo.add("2.0.0", &[]);
    repo.publish(&[]);
    let server = Nginx::start(&repo.path(), None);
    let d = node(&server, &repo, "edge-0");
    await_synced(&d, "2.0.0", "the node takes 2.0.0");

    // Every key replaced: root 2 signed by the old and the new root key,
    // then targets, snapshot and timestamp v3 signed with the new keys.
    let dir = repo.path();
    let new_keys = dir.parent().unwrap().join("keys-2");
    let out = FleetRepo::run(&[
        "rotate-root",
        dir.to_str().unwrap(),
        "--new-keys",
        new_keys.to_str().unwrap(),
    ]);
    assert!(out.contains("2.root.json"), "{out}");
    assert!(dir.join("metadata/2.root.json").is_file());
    assert_eq!(
        std::fs::read(dir.join("metadata/root.json")).unwrap(),
        std::fs::read(dir.join("metadata/2.root.json")).unwrap()
    );
    wait_until(
        deadline(),
        "the node verifies the rotated repository",
        || verified_targets_versions(&d).contains(&3),
    );
    assert_eq!(echo_serving(&d), "2.0.0");

    // The old keys publish no more; the new ones do, and the node, which
    // still trusts only 1.root.json, takes it.
    let old = plugvisor_tests::plugvisor(&[
        std::ffi::OsStr::new("repo"),
        std::ffi::OsStr::new("publish"),
        dir.as_os_str(),
    ]);
    assert_ne!(old.code, 0, "the old keys are refused");
    assert!(old.stderr.contains("2.root.json"), "{}", old.stderr);
    repo.add("2.1.0", &[]);
    repo.publish(&["--keys", new_keys.to_str().unwrap()]);
    await_synced(&d, "2.1.0", "the node takes 2.1.0, signed by the new keys");
    assert!(verified_targets_versions(&d).contains(&4));
    for stage in STAGES {
        assert_eq!(sync_errors(&d, stage), 0, "{stage}");
    }
    // It fetched the new root by its versioned name, as TUF says.
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /metadata/2.root.json 200")),
        "{:#?}",
        server.requests()
    );
}

#[test]
fn a_root_2_signed_without_the_old_root_key_is_refused_and_the_node_serves_on() {
    let repo = FleetRepo::init();
    repo.add("2.0.0", &[]);
    repo.publish(&[]);
    let server = Nginx::start(&repo.path(), None);
    let mut d = node(&server, &repo, "edge-0");
    await_synced(&d, "2.0.0", "the node takes 2.0.0");

    // The attacker, without the repository's root key, builds a whole
    // repository of their own keys: root 2 signed only by their root key
    // (`sign-root`), and 2.1.0 published with their keys; then puts it on
    // the server (the node's trusted 1.root.json is its own copy, not
    // served).
    let forged = FleetRepo::init();
    let fdir = forged.path();
    let fkeys = fdir.join("keys");
    FleetRepo::run(&[
        "sign-root",
        fdir.to_str().unwrap(),
        "--new-keys",
        fkeys.to_str().unwrap(),
        "--sign-with",
        fkeys.join("root.pem").to_str().unwrap(),
    ]);
    forged.add("2.1.0", &[]);
    forged.publish(&[]);
    forged.publish(&[]);
    let before = metadata_errors(&d);
    let served = repo.path();
    copy_tree(&fdir.join("targets"), &served.join("targets"), &[]);
    copy_tree(
        &fdir.join("metadata"),
        &served.join("metadata"),
        &["1.root.json"],
    );

    wait_until(deadline(), "the forged root is refused", || {
        metadata_errors(&d) > before
    });
    // Still refused on later polls, and nothing of it taken.
    std::thread::sleep(Duration::from_secs(1));
    assert!(metadata_errors(&d) > before + 1);
    assert_eq!(echo_serving(&d), "2.0.0");
    // Desired is still what the trusted metadata said (the state may say
    // pending: the repository cannot be read).
    let (_, desired, active) = echo_sync(&d).unwrap();
    assert_eq!((desired.as_str(), active.as_str()), ("2.0.0", "2.0.0"));
    let error = d.status()["sync"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("verify root metadata"), "{error}");
    assert!(
        !std::fs::read_to_string(d.plugins_dir.join("echo/plugin.toml"))
            .unwrap()
            .contains("2.1.0")
    );
    for stage in ["download", "verify", "commit"] {
        assert_eq!(sync_errors(&d, stage), 0, "{stage}");
    }
    d.assert_running();
}
