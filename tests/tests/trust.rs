//! Signed packages and anti-downgrade, as an operator meets them: keys made
//! and packages signed with the CLI, dropped into `plugins_dir`, taken or
//! refused by the running daemon with one log line each while the previous
//! version serves on.
#![expect(
    clippy::too_many_lines,
    reason = "each test is one black-box scenario that reads top to bottom"
)]
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, PackageTweaks, TrustOptions, build_echo_version, drop_package,
    install_package, journal, keygen, pack, plugvisor, wait_until,
};

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

/// Waits until `plugin`'s rejected count reaches `n`; returns the one
/// refusal line logged since `from` (asserting there is exactly one).
fn one_refusal(daemon: &Daemon, from: usize, n: u64, what: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_until(deadline, &format!("{what}: counted as rejected"), || {
        daemon.reloads("echo", "rejected") == n
    });
    let lines = daemon.refusals_since(from);
    assert_eq!(lines.len(), 1, "{what}: one log line, got {lines:#?}");
    let line = lines.into_iter().next().unwrap();
    assert_eq!(line["level"], "ERROR", "{what}");
    assert_eq!(line["fields"]["plugin"], "echo", "{what}");
    line
}

/// The refusal's message names every one of `needles` and its `file`
/// field is the file at fault.
fn assert_names(line: &serde_json::Value, needles: &[&str], file_suffix: &str) {
    let msg = line["fields"]["message"].as_str().unwrap();
    for n in needles {
        assert!(msg.contains(n), "{n:?} not in {msg}");
    }
    let file = line["fields"]["file"].as_str().unwrap();
    assert!(
        file.ends_with(file_suffix),
        "{file} is not the {file_suffix}"
    );
}

#[test]
fn signed_end_to_end_through_the_cli() {
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(keys.path());
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "secret key mode");
    let text = std::fs::read_to_string(&public).unwrap();
    assert!(
        text.starts_with("plugvisor ed25519 public key v1\n"),
        "{text}"
    );
    // keygen never overwrites a key.
    let again = plugvisor(&[os("keygen"), os("--out"), keys.path().as_os_str()]);
    assert_ne!(again.code, 0);
    assert!(
        again.stderr.contains("refusing to overwrite"),
        "{}",
        again.stderr
    );

    let mut daemon = Daemon::start(DaemonOptions {
        probes: "off",
        trust: TrustOptions {
            public_keys: vec![public.clone()],
            require_signature: true,
            sign_with: Some(secret.clone()),
        },
        ..Default::default()
    });
    assert_eq!(daemon.serving("echo-tcp").as_deref(), Some("1.0.0"));

    // Packed and verified offline, in a staging directory…
    let staging = tempfile::tempdir().unwrap();
    let stage = staging.path().join("echo");
    let lib = build_echo_version("2.0.0");
    let out = pack(&stage, &lib, Some(&secret), &[]);
    assert!(out.stdout.contains("packed echo 2.0.0"), "{}", out.stdout);
    assert!(out.stdout.contains("signed by key"), "{}", out.stdout);
    let v = plugvisor(&[
        os("verify"),
        stage.as_os_str(),
        os("--public-key"),
        public.as_os_str(),
    ])
    .ok();
    assert!(v.stdout.contains("would be accepted"), "{}", v.stdout);
    assert!(v.stdout.contains("signed by trusted key"), "{}", v.stdout);
    // …and with the daemon's own config (trust and store).
    let v = plugvisor(&[
        os("verify"),
        stage.as_os_str(),
        os("--config"),
        daemon.config.as_os_str(),
    ])
    .ok();
    assert!(v.stdout.contains("not a downgrade"), "{}", v.stdout);

    // …then dropped into plugins_dir: taken.
    drop_package(&stage, &daemon.plugins_dir, "echo");
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_until(deadline, "signed 2.0.0 serves", || {
        daemon.serving("echo-tcp").as_deref() == Some("2.0.0")
    });
    let key_id = std::fs::read_to_string(stage.join("plugin.toml.sig"))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("key-id ")
        .unwrap()
        .to_owned();
    // (The client can see 2.0.0 a moment before the line is logged: the
    // swap comes before the store records it.)
    wait_until(deadline, "the reload names the signing key", || {
        daemon.log_lines().iter().any(|l| {
            l["fields"]["message"] == "reloaded"
                && l["fields"]["to"] == "2.0.0"
                && l["fields"]["signed_by"] == key_id.as_str()
        })
    });

    // `pack` straight into plugins_dir writes the .sig before the manifest.
    pack(
        &daemon.plugins_dir.join("echo"),
        &build_echo_version("2.1.0"),
        Some(&secret),
        &[],
    );
    wait_until(deadline, "signed 2.1.0 serves", || {
        daemon.serving("echo-tcp").as_deref() == Some("2.1.0")
    });
    assert_eq!(daemon.reloads("echo", "rejected"), 0);

    // A restart starts on 2.1.0 and takes nothing else.
    daemon.stop();
    daemon.restart();
    assert_eq!(daemon.serving("echo-tcp").as_deref(), Some("2.1.0"));
}

#[test]
fn unsigned_wrong_key_and_tampered_packages_are_refused() {
    let keys = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(&keys.path().join("trusted"));
    let (other_secret, _) = keygen(&keys.path().join("other"));
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        trust: TrustOptions {
            public_keys: vec![public.clone()],
            require_signature: true,
            sign_with: Some(secret.clone()),
        },
        ..Default::default()
    });
    let lib = build_echo_version("2.0.0");
    let staging = tempfile::tempdir().unwrap();
    let mut rejected = 0;

    // A new manifest dropped in beside the old package's signature: the
    // signature names another manifest. The daemon waits for that manifest
    // (a commit may be in progress), then refuses the pair as it stands.
    let from = daemon.log_lines().len();
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.0.0",
        &lib,
        &PackageTweaks::default(),
    );
    rejected += 1;
    let line = one_refusal(&daemon, from, rejected, "stale signature");
    assert_names(
        &line,
        &["made for a manifest with sha256"],
        "plugin.toml.sig",
    );
    assert_eq!(line["fields"]["serving"], "1.0.0");

    // Without the stale signature the package is unsigned: refused too.
    let from = daemon.log_lines().len();
    std::fs::remove_file(daemon.plugins_dir.join("echo/plugin.toml.sig")).unwrap();
    rejected += 1;
    let line = one_refusal(&daemon, from, rejected, "unsigned");
    assert_names(&line, &["is not signed"], "plugin.toml");
    assert_eq!(line["fields"]["serving"], "1.0.0");

    // Signed by a key the daemon does not trust.
    let from = daemon.log_lines().len();
    let stage = staging.path().join("wrong-key");
    pack(&stage, &lib, Some(&other_secret), &[]);
    drop_package(&stage, &daemon.plugins_dir, "echo");
    rejected += 1;
    let line = one_refusal(&daemon, from, rejected, "wrong key");
    assert_names(&line, &["no trusted key made it"], "plugin.toml.sig");

    // Signed, then a byte of the library flipped before it was dropped in:
    // the signature holds, the sha256 pin refuses it.
    let from = daemon.log_lines().len();
    let stage = staging.path().join("flipped");
    let packed = pack(&stage, &lib, Some(&secret), &[]);
    assert!(packed.stdout.contains("signed"), "{}", packed.stdout);
    let so = std::fs::read_dir(&stage)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "so"))
        .unwrap();
    let mut bytes = std::fs::read(&so).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&so, &bytes).unwrap();
    let v = plugvisor(&[
        os("verify"),
        stage.as_os_str(),
        os("--public-key"),
        public.as_os_str(),
    ]);
    assert_ne!(v.code, 0, "verify refuses it too");
    assert!(v.stderr.contains("sha256"), "{}", v.stderr);
    drop_package(&stage, &daemon.plugins_dir, "echo");
    rejected += 1;
    let line = one_refusal(&daemon, from, rejected, "flipped library byte");
    let msg = line["fields"]["message"].as_str().unwrap();
    assert!(
        msg.contains("sha256") && msg.contains("the manifest says"),
        "{msg}"
    );
    let file = Path::new(line["fields"]["file"].as_str().unwrap());
    assert!(file.extension().is_some_and(|x| x == "so"), "{file:?}");

    // Signed, then the manifest edited (a requirement dropped): the
    // signature no longer covers it. The daemon first waits for the
    // manifest the signature names (a commit may be in progress), then
    // refuses the pair as it stands.
    let from = daemon.log_lines().len();
    let stage = staging.path().join("edited");
    pack(
        &stage,
        &build_echo_version("2.2.0"),
        Some(&secret),
        &["--conflicts", "legacy-echo"],
    );
    let manifest = stage.join("plugin.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("legacy-echo"), "{text}");
    std::fs::write(
        &manifest,
        text.lines()
            .filter(|l| !l.starts_with("conflicts"))
            .flat_map(|l| [l, "\n"])
            .collect::<String>(),
    )
    .unwrap();
    let v = plugvisor(&[
        os("verify"),
        stage.as_os_str(),
        os("--public-key"),
        public.as_os_str(),
    ]);
    assert_ne!(v.code, 0);
    assert!(v.stderr.contains("does not verify"), "{}", v.stderr);
    drop_package(&stage, &daemon.plugins_dir, "echo");
    rejected += 1;
    let line = one_refusal(&daemon, from, rejected, "edited manifest");
    let msg = line["fields"]["message"].as_str().unwrap();
    assert!(
        msg.contains("does not verify") && msg.contains("made for a manifest with sha256"),
        "{msg}"
    );

    // Through all of it, 1.0.0 served; every refusal is in the journal.
    assert_eq!(daemon.serving("echo-tcp").as_deref(), Some("1.0.0"));
    let rejected_entries = journal(&daemon.state_dir)
        .into_iter()
        .filter(|e| e["event"] == "rejected")
        .count();
    assert_eq!(rejected_entries, 5);

    // A correctly signed package is then taken.
    pack(
        &daemon.plugins_dir.join("echo"),
        &build_echo_version("2.3.0"),
        Some(&secret),
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_until(deadline, "2.3.0 serves", || {
        daemon.serving("echo-tcp").as_deref() == Some("2.3.0")
    });
}

#[test]
fn signature_without_require_is_still_checked_when_keys_are_configured() {
    let keys = tempfile::tempdir().unwrap();
    let (_, public) = keygen(&keys.path().join("trusted"));
    let (other_secret, _) = keygen(&keys.path().join("other"));
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        trust: TrustOptions {
            public_keys: vec![public],
            require_signature: false,
            sign_with: None,
        },
        ..Default::default()
    });
    assert_eq!(
        daemon.serving("echo-tcp").as_deref(),
        Some("1.0.0"),
        "unsigned is fine"
    );
    let from = daemon.log_lines().len();
    pack(
        &daemon.plugins_dir.join("echo"),
        &build_echo_version("2.0.0"),
        Some(&other_secret),
        &[],
    );
    let line = one_refusal(&daemon, from, 1, "untrusted signer");
    assert!(
        line["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("no trusted key made it")
    );
}

#[test]
fn a_downgrade_is_refused_and_journaled_across_restarts() {
    let mut daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.0.0",
        &build_echo_version("2.0.0"),
        &PackageTweaks::default(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_until(deadline, "2.0.0 serves", || {
        daemon.serving("echo-tcp").as_deref() == Some("2.0.0")
    });

    let from = daemon.log_lines().len();
    install_package(
        &daemon.plugins_dir,
        "echo",
        "1.5.0",
        &build_echo_version("1.5.0"),
        &PackageTweaks::default(),
    );
    let line = one_refusal(&daemon, from, 1, "downgrade");
    assert_names(
        &line,
        &["1.5.0 is lower than 2.0.0", "downgrade"],
        "plugin.toml",
    );
    assert_eq!(daemon.serving("echo-tcp").as_deref(), Some("2.0.0"));
    let entry = journal(&daemon.state_dir)
        .into_iter()
        .rfind(|e| e["event"] == "rejected")
        .expect("journaled");
    assert_eq!(entry["version"], "1.5.0");
    assert!(entry["reason"].as_str().unwrap().contains("downgrade"));
    let refs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(daemon.state_dir.join("refs/echo.json")).unwrap())
            .unwrap();
    assert_eq!(refs["highest_activated"], "2.0.0");

    // The highest version survives a restart: a lower one is still refused.
    daemon.stop();
    daemon.restart();
    assert_eq!(daemon.serving("echo-tcp").as_deref(), Some("2.0.0"));
    let v = plugvisor(&[
        os("verify"),
        daemon.plugins_dir.join("echo").as_os_str(),
        os("--config"),
        daemon.config.as_os_str(),
    ]);
    assert_ne!(
        v.code, 0,
        "verify with the daemon's config sees the downgrade"
    );
    assert!(v.stderr.contains("downgrade"), "{}", v.stderr);
    let from = daemon.log_lines().len();
    install_package(
        &daemon.plugins_dir,
        "echo",
        "1.6.0",
        &build_echo_version("1.6.0"),
        &PackageTweaks::default(),
    );
    let lines = {
        let deadline = Instant::now() + Duration::from_secs(20);
        wait_until(deadline, "1.6.0 refused", || {
            !daemon.refusals_since(from).is_empty()
        });
        daemon.refusals_since(from)
    };
    assert!(
        lines[0]["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("1.6.0 is lower than 2.0.0")
    );
    assert_eq!(daemon.serving("echo-tcp").as_deref(), Some("2.0.0"));
    // A higher one is taken.
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.0.1",
        &build_echo_version("2.0.1"),
        &PackageTweaks::default(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_until(deadline, "2.0.1 serves", || {
        daemon.serving("echo-tcp").as_deref() == Some("2.0.1")
    });
}

#[test]
fn verify_and_pack_name_what_is_wrong() {
    let t = tempfile::tempdir().unwrap();
    let (secret, public) = keygen(&t.path().join("keys"));
    let lib = build_echo_version("3.0.0");
    let dir = t.path().join("echo");
    // Name, version and ABI come from the descriptor; requires from flags.
    let out = pack(&dir, &lib, None, &["--requires", "codec=>=1.2, <2"]);
    assert!(out.stdout.contains("packed echo 3.0.0"), "{}", out.stdout);
    let manifest = std::fs::read_to_string(dir.join("plugin.toml")).unwrap();
    assert!(manifest.contains("[requires]"), "{manifest}");
    assert!(manifest.contains("codec = \">=1.2, <2\""), "{manifest}");
    // Unsigned: accepted without keys, refused when a key is given.
    let v = plugvisor(&[os("verify"), dir.as_os_str()]).ok();
    assert!(v.stdout.contains("unsigned"), "{}", v.stdout);
    assert!(v.stdout.contains("codec >=1.2, <2"), "{}", v.stdout);
    let v = plugvisor(&[
        os("verify"),
        dir.as_os_str(),
        os("--public-key"),
        public.as_os_str(),
    ]);
    assert_ne!(v.code, 0);
    assert!(v.stderr.contains("is not signed"), "{}", v.stderr);
    // Signed in place (pack again with the key; the library is reused).
    pack(&dir, &lib, Some(&secret), &[]);
    plugvisor(&[
        os("verify"),
        dir.as_os_str(),
        os("--public-key"),
        public.as_os_str(),
    ])
    .assert_ok();
    let libs = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "so")
        })
        .count();
    assert_eq!(libs, 1, "the same library is not copied twice");
    // A group-writable library is refused, with the fix.
    let so = dir.join(
        std::fs::read_to_string(dir.join("plugin.toml"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("library = "))
            .unwrap()
            .trim_matches('"'),
    );
    std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o664)).unwrap();
    let v = plugvisor(&[os("verify"), dir.as_os_str()]);
    assert_ne!(v.code, 0);
    assert!(v.stderr.contains("chmod go-w"), "{}", v.stderr);
    // A secret key others can read is refused by pack, as ssh would.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = plugvisor(&[os("pack"), dir.as_os_str(), os("--key"), secret.as_os_str()]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    // A non-package is named as such.
    let v = plugvisor(&[os("verify"), Path::new("/nonexistent").as_os_str()]);
    assert_ne!(v.code, 0);
    assert!(v.stderr.contains("plugin.toml"), "{}", v.stderr);
}
