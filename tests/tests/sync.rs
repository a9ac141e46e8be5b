//! The fleet, as its operator sees it: releases published with `plugvisor
//! repo` to a TUF repository that Debian's nginx serves on loopback, and
//! daemons with `[sync]` — several nodes with their own names, labels and
//! seeds — that follow it. Each node converges to what the rollout says and
//! nothing else; live clients see no error while sync installs a release;
//! a download cut by the server resumes and nothing half-written is
//! committed; a published rollback is followed; the attacks TUF exists for
//! are refused while the node serves on.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plugvisor_tests::live::{Live, LiveOptions};
use plugvisor_tests::{
    Daemon, DaemonOptions, FleetRepo, ListenerSpec, Nginx, await_synced, echo_serving, echo_sync,
    metadata_errors, sync_errors, wait_until,
};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// A node following `server`'s repository, polling every 300 ms.
fn node(server: &Nginx, repo: &FleetRepo, name: &str, seed: u32, labels: &str) -> Daemon {
    Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        extra_config: repo.sync_config(server, name, seed, labels, "300ms"),
        ..Default::default()
    })
}

#[test]
fn every_node_converges_to_what_the_rollout_says_and_follows_a_signed_rollback() {
    let repo = FleetRepo::init();
    // 2.0.0 for site plant-3, seeds below 100 now, the rest next century.
    repo.add(
        "2.0.0",
        &[
            "--label",
            "site=plant-3",
            "--wave",
            "100@2000-01-01T00:00:00Z",
            "--wave",
            "2048@2099-01-01T00:00:00Z",
        ],
    );
    repo.publish(&[]);
    let server = Nginx::start(&repo.path(), None);
    let early = node(&server, &repo, "edge-early", 10, "site = \"plant-3\"");
    let late = node(&server, &repo, "edge-late", 1500, "site = \"plant-3\"");
    let other = node(&server, &repo, "edge-other", 10, "site = \"plant-9\"");
    let live = Live::start(&LiveOptions {
        tcp: vec![early.addr("echo-tcp"); 4],
        grpc: vec![early.addr("echo-grpc"); 2],
        pause: Duration::from_millis(2),
    });
    await_synced(&early, "2.0.0", "the first wave takes 2.0.0");
    // The others verified the same metadata, and it is not for them (yet).
    for d in [&late, &other] {
        wait_until(deadline(), "the other nodes read the repository", || {
            d.status()["sync"]["last_success"].as_u64().is_some()
        });
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(echo_serving(d), "1.0.0");
        assert!(echo_sync(d).is_none(), "{}", d.status()["sync"]);
    }

    // 2.1.0 for every node, at once.
    repo.add("2.1.0", &[]);
    repo.publish(&[]);
    for d in [&early, &late, &other] {
        await_synced(d, "2.1.0", "every node takes 2.1.0");
    }

    // The operator's signed downgrade: 2.0.0 again, for site plant-3 —
    // where its selector points; plant-9 stays on 2.1.0.
    repo.rollback("2.0.0");
    for d in [&early, &late] {
        await_synced(d, "2.0.0", "plant-3 follows the published rollback");
    }
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(echo_serving(&other), "2.1.0");

    let traffic = live.stop();
    assert!(traffic.frames > 0);
    assert!(
        traffic.errors.is_empty(),
        "live TCP clients and gRPC streams while sync installed three releases: {:?}",
        traffic.errors
    );
    // A poll that finds nothing new fetches timestamp.json alone.
    let before = server.requests().len();
    std::thread::sleep(Duration::from_secs(2));
    let quiet: Vec<String> = server.requests()[before..].to_vec();
    assert!(!quiet.is_empty(), "the nodes poll");
    assert!(
        quiet
            .iter()
            .all(|r| r.starts_with("GET /metadata/timestamp.json 200")),
        "no-op polls: {quiet:#?}"
    );
    for d in [&early, &late, &other] {
        for stage in [
            "timestamp",
            "snapshot",
            "targets",
            "download",
            "verify",
            "commit",
        ] {
            assert_eq!(sync_errors(d, stage), 0, "{stage}");
        }
    }
}

#[test]
fn a_download_cut_by_the_server_resumes_and_nothing_half_written_is_committed() {
    let repo = FleetRepo::init();
    repo.add("2.0.0", &[]);
    repo.publish(&[]);
    // ~400 KB at 64 KB/s: the download takes seconds.
    let mut server = Nginx::start(&repo.path(), Some("64k"));
    let d = node(&server, &repo, "edge-0", 0, "");
    let cache = d.state_dir.join("sync").join("cache");
    let part_bytes = || -> u64 {
        std::fs::read_dir(&cache)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    wait_until(deadline(), "a download is under way", || {
        part_bytes() > 64 << 10
    });
    server.stop();
    // Longer than the poll: the node says pending and serves on.
    wait_until(deadline(), "the node says pending", || {
        echo_sync(&d).is_some_and(|(state, _, _)| state == "pending")
            && d.status()["sync"]["last_error"].is_string()
    });
    assert_eq!(echo_serving(&d), "1.0.0");
    let manifest = std::fs::read_to_string(d.plugins_dir.join("echo/plugin.toml")).unwrap();
    assert!(
        manifest.contains("version = \"1.0.0\""),
        "nothing of 2.0.0 committed: {manifest}"
    );
    assert!(sync_errors(&d, "download") + sync_errors(&d, "timestamp") >= 1);
    // The download failed; what it had stays, to be resumed.
    let cut_at = part_bytes();
    assert!(cut_at > 0);
    server.restart();
    await_synced(
        &d,
        "2.0.0",
        "the node finishes the download and takes 2.0.0",
    );
    let ranged: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.contains("bytes="))
        .collect();
    assert!(
        ranged
            .iter()
            .any(|r| r.contains(" 206 ") && r.ends_with(&format!("bytes={cut_at}-"))),
        "the download resumed where it was cut ({cut_at} bytes): {ranged:#?}"
    );
    assert_eq!(part_bytes(), 0, "no partial file left");
}

/// Every file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// Copies `from` over `to` (a directory tree).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

#[test]
fn the_attacks_tuf_exists_for_are_refused_and_the_node_serves_on() {
    let repo = FleetRepo::init();
    repo.add("2.0.0", &[]);
    repo.publish(&[]);
    let old_metadata = tempfile::tempdir().unwrap();
    copy_tree(&repo.path().join("metadata"), old_metadata.path());
    let server = Nginx::start(&repo.path(), None);
    let mut d = node(&server, &repo, "edge-0", 0, "");
    await_synced(&d, "2.0.0", "the node takes 2.0.0");

    // Rollback: after a newer publication, a mirror serves the old metadata.
    repo.publish(&[]);
    std::thread::sleep(Duration::from_secs(1));
    let served = repo.path().join("metadata");
    let newer = tempfile::tempdir().unwrap();
    copy_tree(&served, newer.path());
    std::fs::remove_dir_all(&served).unwrap();
    copy_tree(old_metadata.path(), &served);
    let before = metadata_errors(&d);
    wait_until(deadline(), "old metadata is refused", || {
        metadata_errors(&d) > before
    });
    assert_eq!(echo_serving(&d), "2.0.0");
    std::fs::remove_dir_all(&served).unwrap();
    copy_tree(newer.path(), &served);

    // Mix-and-match: the library of a new release swapped on the server
    // for other bytes of the same length: refused at verify, nothing
    // committed.
    repo.add("2.1.0", &[]);
    repo.publish(&[]);
    let lib = files_under(&repo.path().join("targets"))
        .into_iter()
        .find(|p| {
            let p = p.to_string_lossy();
            p.contains("2.1.0") && p.ends_with(".so")
        })
        .expect("the library target of 2.1.0");
    let len = std::fs::metadata(&lib).unwrap().len() as usize;
    std::fs::write(&lib, vec![0x7f; len]).unwrap();
    wait_until(deadline(), "the swapped library is refused", || {
        sync_errors(&d, "verify") >= 1
    });
    assert_eq!(echo_serving(&d), "2.0.0");
    assert!(
        !std::fs::read_to_string(d.plugins_dir.join("echo/plugin.toml"))
            .unwrap()
            .contains("2.1.0")
    );

    // An endless download: the same target grown past its pinned length.
    std::fs::write(&lib, vec![0x7f; len * 4]).unwrap();
    let verify_before = sync_errors(&d, "verify");
    wait_until(deadline(), "the oversized target is cut off", || {
        sync_errors(&d, "verify") > verify_before
    });
    assert_eq!(echo_serving(&d), "2.0.0");
    assert!(
        d.log_text().contains("more than its pinned length"),
        "the log says why"
    );

    // A node's own bound on a package, whatever the metadata pins.
    let small = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        extra_config: repo.sync_config(&server, "edge-small", 0, "", "300ms")
            + "max_package_size = \"1KiB\"\n",
        ..Default::default()
    });
    wait_until(
        deadline(),
        "a package past max_package_size is refused",
        || sync_errors(&small, "verify") >= 1,
    );
    assert!(
        small.log_text().contains("max_package_size"),
        "the log says why"
    );
    assert_eq!(echo_serving(&small), "1.0.0");
    assert!(
        std::fs::read_dir(small.state_dir.join("sync").join("cache"))
            .unwrap()
            .flatten()
            .all(|e| std::fs::metadata(e.path()).unwrap().len() <= 1024),
        "nothing past the bound was downloaded"
    );

    // Freeze: metadata that expires, and is not refreshed.
    repo.publish(&["--timestamp-expires", "2s"]);
    std::thread::sleep(Duration::from_secs(3));
    let before = metadata_errors(&d);
    wait_until(deadline(), "expired metadata is refused", || {
        metadata_errors(&d) > before
    });
    assert_eq!(echo_serving(&d), "2.0.0");
    d.assert_running();
}

#[test]
fn a_node_without_a_readable_root_refuses_to_start_and_says_which_file() {
    let mut d = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    assert_eq!(d.stop(), Some(0));
    let good = std::fs::read_to_string(&d.config).unwrap();
    let not_root = d.dir.path().join("targets.json");
    std::fs::write(&not_root, r#"{"signed": {"_type": "targets"}}"#).unwrap();
    for (root, says) in [
        (d.dir.path().join("missing.json"), "No such file"),
        (not_root, "not a TUF root.json"),
    ] {
        std::fs::write(
            &d.config,
            format!(
                "{good}\n[sync]\nmetadata_url = \"http://127.0.0.1:9/metadata\"\ntargets_url = \"http://127.0.0.1:9/targets\"\nroot = \"{}\"\n",
                root.display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(plugvisor_tests::binary())
            .args(["run", "--config"])
            .arg(&d.config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&root.display().to_string()) && err.contains(says),
            "{err}"
        );
    }
}

#[test]
fn states_survive_restarts_and_a_release_refused_here_is_blocked_with_the_reason() {
    let repo = FleetRepo::init();
    repo.add("2.0.0", &[]);
    repo.publish(&[]);
    let mut server = Nginx::start(&repo.path(), None);
    let mut d = node(&server, &repo, "edge-0", 0, "");
    await_synced(&d, "2.0.0", "the node takes 2.0.0");

    // Restarted while the repository is away: it serves 2.0.0 from its
    // store, knows what was wanted, and says pending with the reason.
    assert_eq!(d.stop(), Some(0));
    server.stop();
    d.restart();
    assert_eq!(echo_serving(&d), "2.0.0");
    wait_until(
        deadline(),
        "pending after a restart without the repository",
        || {
            echo_sync(&d).is_some_and(|(state, desired, active)| {
                state == "pending" && desired == "2.0.0" && active == "2.0.0"
            }) && d.status()["sync"]["plugins"]["echo"]["reason"].is_string()
        },
    );
    // The repository is back: synced, and nothing fetched again but
    // metadata (the package is committed and cached).
    server.restart();
    let from = server.requests().len();
    await_synced(&d, "2.0.0", "synced again");
    assert!(
        server.requests()[from..]
            .iter()
            .all(|r| r.contains("/metadata/")),
        "{:#?}",
        &server.requests()[from..]
    );

    // A node that requires signatures refuses the fleet's unsigned release:
    // blocked, with the daemon's own reason; 1.0.0 (signed) serves on.
    let (strict, _keys) = strict_node(&server, &repo);
    wait_until(deadline(), "the unsigned release is blocked", || {
        echo_sync(&strict).is_some_and(|(state, desired, active)| {
            state == "blocked" && desired == "2.0.0" && active == "1.0.0"
        })
    });
    let reason = strict.status()["sync"]["plugins"]["echo"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("rejected") && reason.contains("signature"),
        "{reason}"
    );
    assert_eq!(echo_serving(&strict), "1.0.0");
    let m = strict.metrics();
    assert_eq!(
        m.get(
            "plugvisor_sync_state",
            &[("plugin", "echo"), ("state", "blocked")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "plugvisor_sync_state",
            &[("plugin", "echo"), ("state", "synced")]
        ),
        Some(0.0)
    );
    // Restarted, it is still blocked: nothing wanted has changed.
    let mut strict = strict;
    assert_eq!(strict.stop(), Some(0));
    strict.restart();
    wait_until(deadline(), "still blocked after a restart", || {
        echo_sync(&strict).is_some_and(|(state, _, _)| state == "blocked")
    });
}

/// A node that requires package signatures (its echo 1.0.0 signed with
/// the returned keys' secret): the fleet's unsigned releases are refused
/// there.
fn strict_node(server: &Nginx, repo: &FleetRepo) -> (Daemon, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = plugvisor_tests::keygen(keys.path());
    let strict = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        extra_config: repo.sync_config(server, "edge-strict", 0, "", "300ms"),
        trust: plugvisor_tests::TrustOptions {
            public_keys: vec![public],
            require_signature: true,
            sign_with: Some(secret),
        },
        ..Default::default()
    });
    (strict, keys)
}

/// What a dashboard or alert query becomes in a test's Prometheus (the
/// Grafana variables filled in as `tests/tests/prometheus.rs` does).
/// The overview dashboard's sync row and the sync alerts, against a real
/// Prometheus scraping real nodes (the general dashboard test runs no
/// `[sync]`): every sync panel returns data, and the alerts for a blocked
/// release and a swapped target see them.
#[test]
fn the_sync_panels_and_alerts_hold_against_a_real_prometheus() {
    let repo = FleetRepo::init();
    repo.add("2.0.0", &[]);
    repo.publish(&[]);
    let server = Nginx::start(&repo.path(), None);
    let (strict, _keys) = strict_node(&server, &repo);
    let d = node(&server, &repo, "edge-0", 0, "");
    await_synced(&d, "2.0.0", "the node takes 2.0.0");
    wait_until(deadline(), "the strict node is blocked", || {
        echo_sync(&strict).is_some_and(|(state, _, _)| state == "blocked")
    });
    let scrape = |x: &Daemon| std::net::SocketAddr::from(([127, 0, 0, 1], x.metrics_port));
    let alerts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/alerts.yml");
    let mut prom = plugvisor_tests::Prometheus::start(&[scrape(&d), scrape(&strict)], &[alerts]);
    wait_until(
        deadline(),
        "Prometheus scrapes both nodes' sync state",
        || {
            prom.assert_running();
            prom.query("count(count by (instance) (plugvisor_sync_state))")
                .is_ok_and(|r| r.first().is_some_and(|v| v["value"][1] == "2"))
        },
    );

    // The refused release, as the alert's expression sees it.
    let blocked = prom
        .query(r#"plugvisor_sync_state{state="blocked"} == 1"#)
        .unwrap();
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    // A swapped target: verify errors on both nodes.
    repo.add("2.1.0", &[]);
    repo.publish(&[]);
    let lib = files_under(&repo.path().join("targets"))
        .into_iter()
        .find(|p| {
            let p = p.to_string_lossy();
            p.contains("2.1.0") && p.ends_with(".so")
        })
        .unwrap();
    let len = std::fs::metadata(&lib).unwrap().len() as usize;
    for p in files_under(&repo.path().join("targets")) {
        if std::fs::metadata(&p).unwrap().len() as usize == len
            && p.to_string_lossy().contains("2.1.0")
        {
            std::fs::write(&p, vec![0u8; len]).unwrap();
        }
    }
    wait_until(deadline(), "the swapped target is refused", || {
        sync_errors(&d, "verify") >= 1
    });

    let board: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/plugvisor-overview.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for p in board["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            if !expr.contains("plugvisor_sync_") {
                continue;
            }
            // Rates need two scrapes of a rise: the errors go on, so the
            // data comes within a few.
            wait_until(
                deadline(),
                &format!("panel {} returns data: {expr}", p["title"]),
                || {
                    !prom
                        .query(&plugvisor_tests::runnable(expr, 60))
                        .unwrap()
                        .is_empty()
                },
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "the sync row's three panels");
    wait_until(deadline(), "PlugvisorSyncTargetMismatch fires", || {
        let rules = prom.api("/api/v1/rules").unwrap();
        rules["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "PlugvisorSyncTargetMismatch" && r["state"] == "firing")
    });
}

#[test]
fn a_node_offline_past_max_offline_is_expired_across_a_restart_and_serves_on() {
    let repo = FleetRepo::init();
    repo.add("2.0.0", &[]);
    repo.publish(&[]);
    let mut server = Nginx::start(&repo.path(), None);
    let mut d = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        extra_config: repo.sync_config(&server, "edge-0", 0, "", "300ms")
            + "max_offline = \"2s\"\n",
        ..Default::default()
    });
    await_synced(&d, "2.0.0", "the node takes 2.0.0");
    server.stop();
    let expired = |d: &Daemon| echo_sync(d).is_some_and(|(state, _, _)| state == "expired");
    wait_until(deadline(), "expired past max_offline", || expired(&d));
    assert_eq!(
        d.metrics().get(
            "plugvisor_sync_state",
            &[("plugin", "echo"), ("state", "expired")]
        ),
        Some(1.0)
    );
    assert_eq!(echo_serving(&d), "2.0.0");
    // The age of the last verified metadata survives the process.
    assert_eq!(d.stop(), Some(0));
    d.restart();
    wait_until(deadline(), "still expired after a restart", || expired(&d));
    assert_eq!(echo_serving(&d), "2.0.0");
    server.restart();
    await_synced(&d, "2.0.0", "synced once the repository is back");
}

#[test]
fn a_published_rollback_is_stale_until_followed_even_across_a_restart() {
    let repo = FleetRepo::init();
    repo.add("2.0.0", &[]);
    repo.publish(&[]);
    // ~400 KB at 48 KB/s: each release takes seconds to arrive, long
    // enough to restart the node in the middle of one.
    let server = Nginx::start(&repo.path(), Some("48k"));
    let mut d = node(&server, &repo, "edge-0", 0, "");
    let slow = Instant::now() + Duration::from_secs(60);
    let synced_on = |d: &Daemon, v: &str| {
        echo_sync(d).is_some_and(|(state, desired, active)| {
            state == "synced" && desired == v && active == v
        })
    };
    wait_until(slow, "the node takes 2.0.0", || synced_on(&d, "2.0.0"));
    repo.add("2.1.0", &[]);
    repo.publish(&[]);
    wait_until(slow, "the node takes 2.1.0", || synced_on(&d, "2.1.0"));

    // The signed downgrade: 2.0.0 (no longer cached: the cache holds what
    // is wanted) comes slowly; meanwhile the node says stale, and why.
    repo.rollback("2.0.0");
    let stale = |d: &Daemon| {
        echo_sync(d).is_some_and(|(state, desired, active)| {
            state == "stale" && desired == "2.0.0" && active == "2.1.0"
        })
    };
    wait_until(deadline(), "stale while the rollback downloads", || {
        stale(&d)
    });
    assert_eq!(
        d.metrics().get(
            "plugvisor_sync_state",
            &[("plugin", "echo"), ("state", "stale")]
        ),
        Some(1.0)
    );
    let reason = d.status()["sync"]["plugins"]["echo"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("older version"), "{reason}");
    assert_eq!(echo_serving(&d), "2.1.0");

    // Restarted mid-download: it knows what is wanted from its datastore,
    // is stale again, serves 2.1.0 meanwhile, and then follows.
    assert_eq!(d.stop(), Some(0));
    d.restart();
    assert_eq!(echo_serving(&d), "2.1.0");
    wait_until(deadline(), "stale after the restart", || stale(&d));
    wait_until(slow, "the rollback is followed", || synced_on(&d, "2.0.0"));
    assert_eq!(echo_serving(&d), "2.0.0");
    assert_eq!(
        d.metrics().get(
            "plugvisor_sync_state",
            &[("plugin", "echo"), ("state", "stale")]
        ),
        Some(0.0)
    );
}
