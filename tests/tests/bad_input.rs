//! Bad packages are refused with one clear log line, counted as
//! `rejected`, and the previous version serves on without a failed request.
#![expect(
    clippy::too_many_lines,
    reason = "each test is one black-box scenario that reads top to bottom"
)]
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, PackageTweaks, build_echo_version, echo_version,
    install_package, library, wait_until,
};

struct Case {
    name: &'static str,
    lib: PathBuf,
    version: &'static str,
    tweaks: PackageTweaks,
    /// Words the log line must contain (besides plugin and file).
    reason: &'static str,
    /// The file the log line must name (suffix).
    file_suffix: String,
}

fn cases() -> Vec<Case> {
    let good = build_echo_version("2.0.0");
    let dir = tempfile::Builder::new()
        .prefix("plugvisor-bad-")
        .tempdir()
        .unwrap()
        .keep();
    let not_elf = dir.join("not-elf.so");
    std::fs::write(&not_elf, b"#!/bin/sh\necho this is not a shared library\n").unwrap();
    let truncated = dir.join("truncated.so");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    vec![
        Case {
            name: "sha256 mismatch",
            lib: good.clone(),
            version: "2.0.0",
            tweaks: PackageTweaks {
                sha256: Some("ab".repeat(32)),
                ..Default::default()
            },
            reason: "sha256",
            file_suffix: ".so".into(),
        },
        Case {
            name: "not an ELF object",
            lib: not_elf,
            version: "2.0.0",
            tweaks: PackageTweaks::default(),
            reason: "cannot load",
            file_suffix: ".so".into(),
        },
        Case {
            name: "truncated ELF object",
            lib: truncated,
            version: "2.0.0",
            tweaks: PackageTweaks::default(),
            reason: "cannot load",
            file_suffix: ".so".into(),
        },
        Case {
            name: "library without descriptor",
            lib: library("fixture_no_descriptor"),
            version: "2.0.0",
            tweaks: PackageTweaks::default(),
            reason: "no `plugvisor_plugin` descriptor",
            file_suffix: ".so".into(),
        },
        Case {
            name: "ABI version mismatch",
            lib: library("fixture_abi_mismatch"),
            version: "9.0.0",
            tweaks: PackageTweaks::default(),
            reason: "implements plugin ABI 2",
            file_suffix: ".so".into(),
        },
        Case {
            name: "manifest abi other than the host's",
            lib: good.clone(),
            version: "2.0.0",
            tweaks: PackageTweaks {
                abi: Some(7),
                ..Default::default()
            },
            reason: "the manifest declares plugin ABI 7",
            file_suffix: "plugin.toml".into(),
        },
        Case {
            name: "descriptor version differs from manifest",
            lib: good.clone(),
            version: "2.0.0",
            tweaks: PackageTweaks {
                version: Some("3.0.0".into()),
                ..Default::default()
            },
            reason: "says it is echo 2.0.0, the manifest says echo 3.0.0",
            file_suffix: ".so".into(),
        },
        Case {
            name: "library escapes the package directory",
            lib: good.clone(),
            version: "2.0.0",
            tweaks: PackageTweaks {
                library: Some("../../outside.so".into()),
                ..Default::default()
            },
            reason: "escapes the package directory",
            file_suffix: "plugin.toml".into(),
        },
        Case {
            name: "manifest is not valid TOML",
            lib: good,
            version: "2.0.0",
            tweaks: PackageTweaks {
                raw_manifest: Some("name = \"echo\nversion = [".into()),
                ..Default::default()
            },
            reason: "line",
            file_suffix: "plugin.toml".into(),
        },
    ]
}

#[test]
fn each_bad_package_is_refused_and_the_old_version_serves_on() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let addr = daemon.addr("echo-tcp");

    // One client sends continuously through every refusal.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let mut client = LineClient::connect(addr).unwrap();
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match client.call(&format!("f{n}")) {
                    Ok(resp) if echo_version(&resp) == Some("1.0.0") => {}
                    Ok(resp) => errors.push(resp),
                    Err(e) => {
                        errors.push(e.to_string());
                        break;
                    }
                }
                n += 1;
            }
            (n, errors)
        })
    };

    let cases = cases();
    let case_count = cases.len();
    let rejected = |d: &Daemon| {
        d.metrics().get(
            "plugvisor_reloads_total",
            &[("plugin", "echo"), ("outcome", "rejected")],
        )
    };
    for (i, case) in cases.into_iter().enumerate() {
        let log_lines_before = daemon.log_lines().len();
        install_package(
            &daemon.plugins_dir,
            "echo",
            case.version,
            &case.lib,
            &case.tweaks,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        wait_until(
            deadline,
            &format!("{}: counted as rejected", case.name),
            || rejected(&daemon) == Some((i + 1) as f64),
        );
        let refusals: Vec<serde_json::Value> = daemon.log_lines()[log_lines_before..]
            .iter()
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("reload refused"))
            })
            .cloned()
            .collect();
        assert_eq!(
            refusals.len(),
            1,
            "{}: expected exactly one log line, got {refusals:#?}",
            case.name
        );
        let line = &refusals[0];
        let message = line["fields"]["message"].as_str().unwrap();
        assert_eq!(line["level"], "ERROR", "{}", case.name);
        assert_eq!(line["fields"]["plugin"], "echo", "{}", case.name);
        let file = line["fields"]["file"].as_str().unwrap();
        assert!(
            file.ends_with(&case.file_suffix),
            "{}: file {file:?} should end with {:?}",
            case.name,
            case.file_suffix
        );
        assert!(
            message.contains(case.reason),
            "{}: {message:?} should say {:?}",
            case.name,
            case.reason
        );
        assert_eq!(line["fields"]["serving"], "1.0.0", "{}", case.name);
        // The old version still answers, on a fresh connection too.
        let resp = LineClient::connect(addr)
            .unwrap()
            .call("still there?")
            .unwrap();
        assert_eq!(echo_version(&resp), Some("1.0.0"), "{}: {resp}", case.name);
    }

    stop.store(true, Ordering::Relaxed);
    let (frames, errors) = traffic.join().unwrap();
    assert!(
        errors.is_empty(),
        "client saw errors during refusals: {errors:?}"
    );
    assert!(frames > 0);
    let m = daemon.metrics();
    assert_eq!(
        m.get(
            "plugvisor_reloads_total",
            &[("plugin", "echo"), ("outcome", "success")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "plugvisor_plugin_info",
            &[
                ("plugin", "echo"),
                ("version", "1.0.0"),
                ("state", "active")
            ]
        ),
        Some(1.0)
    );
    // Every refusal is in the journal, with its reason.
    let journal = std::fs::read_to_string(daemon.state_dir.join("journal.jsonl")).unwrap();
    let rejected_entries = journal
        .lines()
        .filter(|l| l.contains("\"event\":\"rejected\""))
        .count();
    assert_eq!(rejected_entries, case_count);
}

#[test]
fn a_good_package_after_a_bad_one_is_taken() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let lib = build_echo_version("2.1.0");
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.1.0",
        &lib,
        &PackageTweaks {
            sha256: Some("cd".repeat(32)),
            ..Default::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    wait_until(deadline, "rejected", || {
        daemon.metrics().get(
            "plugvisor_reloads_total",
            &[("plugin", "echo"), ("outcome", "rejected")],
        ) == Some(1.0)
    });
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.1.0",
        &lib,
        &PackageTweaks::default(),
    );
    wait_until(deadline, "the corrected package serves", || {
        LineClient::connect(daemon.addr("echo-tcp"))
            .and_then(|mut c| c.call("v"))
            .is_ok_and(|r| echo_version(&r) == Some("2.1.0"))
    });
}
