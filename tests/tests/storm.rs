//! An event storm in `plugins_dir`: more than a thousand writes within
//! about a second — libraries written in small chunks, signatures written
//! in pieces, manifests committed by rename, and noise (notes, editor swap
//! files, a directory that is no package) — while a client sends frames.
//! Each committed manifest is loaded once, in order; nothing half-written
//! is ever loaded or even refused; the client never sees an error.
#![expect(
    clippy::too_many_lines,
    reason = "one black-box scenario that reads top to bottom"
)]
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, TrustOptions, build_echo_version, echo_version, journal,
    keygen, pack, wait_until,
};

/// A package prepared offline: its files' names and bytes.
struct Staged {
    version: &'static str,
    lib_name: String,
    lib: Vec<u8>,
    sig: Vec<u8>,
    manifest: Vec<u8>,
}

fn stage(staging: &Path, version: &'static str, key: &Path) -> Staged {
    let dir = staging.join(version);
    pack(&dir, &build_echo_version(version), Some(key), &[]);
    let manifest = std::fs::read(dir.join("plugin.toml")).unwrap();
    let lib_name = String::from_utf8_lossy(&manifest)
        .lines()
        .find_map(|l| l.strip_prefix("library = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    Staged {
        version,
        lib: std::fs::read(dir.join(&lib_name)).unwrap(),
        lib_name,
        sig: std::fs::read(dir.join("plugin.toml.sig")).unwrap(),
        manifest,
    }
}

/// Writes `bytes` to `path` in `pieces` separate write(2) calls (each one
/// an inotify event), pausing `pause` between them; counts the writes.
fn write_in_pieces(path: &Path, bytes: &[u8], pieces: usize, pause: Duration, n: &AtomicUsize) {
    let mut f = std::fs::File::create(path).unwrap();
    let size = bytes.len().div_ceil(pieces).max(1);
    for chunk in bytes.chunks(size) {
        f.write_all(chunk).unwrap();
        n.fetch_add(1, Ordering::Relaxed);
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

/// The contract's commit: library (new name), signature, then the manifest
/// written beside and renamed into place.
fn commit(dir: &Path, s: &Staged, sig_pause: Duration, n: &AtomicUsize) {
    write_in_pieces(&dir.join(&s.lib_name), &s.lib, 120, Duration::ZERO, n);
    write_in_pieces(&dir.join("plugin.toml.sig"), &s.sig, 3, sig_pause, n);
    let tmp = dir.join(".plugin.toml.tmp");
    write_in_pieces(&tmp, &s.manifest, 3, Duration::ZERO, n);
    std::fs::rename(&tmp, dir.join("plugin.toml")).unwrap();
}

#[test]
fn a_storm_of_writes_loads_each_committed_manifest_once() {
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(keys.path());
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        trust: TrustOptions {
            public_keys: vec![public],
            require_signature: true,
            sign_with: Some(secret.clone()),
        },
        ..Default::default()
    });
    let staging = tempfile::tempdir().unwrap();
    let spaced: Vec<Staged> = ["1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0"]
        .into_iter()
        .map(|v| stage(staging.path(), v, &secret))
        .collect();
    let burst: Vec<Staged> = ["1.6.0", "1.7.0"]
        .into_iter()
        .map(|v| stage(staging.path(), v, &secret))
        .collect();
    let dir = daemon.plugins_dir.join("echo");
    let junk = daemon.plugins_dir.join("junk");
    std::fs::create_dir_all(&junk).unwrap();

    // A client sends frames throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        let mut c = LineClient::connect(daemon.addr("echo-tcp")).unwrap();
        std::thread::spawn(move || {
            let (mut seen, mut errors) = (Vec::<String>::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match c.call("frame") {
                    Ok(r) => match echo_version(&r) {
                        Some(v) if seen.last().map(String::as_str) != Some(v) => {
                            seen.push(v.to_owned());
                        }
                        Some(_) => {}
                        None => errors.push(r),
                    },
                    Err(e) => {
                        errors.push(e.to_string());
                        break;
                    }
                }
            }
            (seen, errors)
        })
    };

    // Noise: writes that are no commit at all.
    let writes = Arc::new(AtomicUsize::new(0));
    let noise_stop = Arc::new(AtomicBool::new(false));
    let noise = {
        let (writes, noise_stop) = (writes.clone(), noise_stop.clone());
        let targets: Vec<PathBuf> = vec![
            dir.join("NOTES.txt"),
            dir.join(".plugin.toml.swp"),
            junk.join("data"),
        ];
        std::thread::spawn(move || {
            let mut files: Vec<std::fs::File> = targets
                .iter()
                .map(|p| std::fs::File::create(p).unwrap())
                .collect();
            let mut i = 0usize;
            while !noise_stop.load(Ordering::Relaxed) {
                files[i % 3].write_all(b"noise noise noise\n").unwrap();
                writes.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_micros(700));
            }
        })
    };

    // Five commits spaced wider than the watcher's quiet period, then two
    // back to back, the last with its signature written slowly in pieces —
    // the daemon may well look while it is incomplete.
    let start = Instant::now();
    for (i, s) in spaced.iter().enumerate() {
        commit(&dir, s, Duration::ZERO, &writes);
        let next = start + Duration::from_millis(150 * (i as u64 + 1));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    commit(&dir, &burst[0], Duration::ZERO, &writes);
    commit(&dir, &burst[1], Duration::from_millis(40), &writes);
    noise_stop.store(true, Ordering::Relaxed);
    noise.join().unwrap();
    let storm = start.elapsed();
    let total_writes = writes.load(Ordering::Relaxed);
    eprintln!("storm: {total_writes} writes in {storm:?}");
    assert!(total_writes >= 1000, "only {total_writes} writes");
    assert!(
        storm < Duration::from_millis(1500),
        "the storm took {storm:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    wait_until(deadline, "1.7.0 serves", || {
        daemon.serving("echo-tcp").as_deref() == Some("1.7.0")
    });
    // Let anything late (a deferred re-check) happen before judging.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let (seen, errors) = client.join().unwrap();
    assert!(errors.is_empty(), "the client saw errors: {errors:?}");

    let waited = daemon
        .log_lines()
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("does not match this manifest yet"))
        })
        .count();
    eprintln!("storm: the daemon waited {waited} time(s) for a commit in progress");
    assert_eq!(daemon.reloads("echo", "rejected"), 0, "nothing was refused");
    assert_eq!(daemon.reloads("echo", "failed"), 0);
    assert!(daemon.refusals_since(0).is_empty());
    let activated: Vec<String> = journal(&daemon.state_dir)
        .into_iter()
        .filter(|e| e["event"] == "activated")
        .map(|e| e["version"].as_str().unwrap().to_owned())
        .collect();
    // 1.0.0 at start; each spaced commit once, in order; of the burst, the
    // first at most once (it may be superseded before it is looked at).
    let mut expected: Vec<String> = std::iter::once("1.0.0")
        .chain(spaced.iter().map(|s| s.version))
        .map(str::to_owned)
        .collect();
    if activated.iter().any(|v| v == "1.6.0") {
        expected.push("1.6.0".into());
    }
    expected.push("1.7.0".into());
    assert_eq!(activated, expected, "one load per committed manifest");
    assert_eq!(
        daemon.reloads("echo", "success"),
        activated.len() as u64,
        "reloads_total agrees with the journal"
    );
    // The client only ever moved forward.
    let mut sorted = seen.clone();
    sorted.sort_by_key(|v| semver_key(v));
    assert_eq!(seen, sorted, "versions seen by the client: {seen:?}");
    // Nothing half-written reached the store (fault matrix, issue #9).
    let s = plugvisor_tests::state_check::assert_state_consistent(&daemon.state_dir);
    assert_eq!(s.active_version("echo"), Some("1.7.0"));
    assert!(s.temp_files.is_empty(), "{:?}", s.temp_files);
}

fn semver_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap()).collect()
}
