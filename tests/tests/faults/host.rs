//! The machine around the daemon: a user who may not use the admin socket,
//! and a `state_dir` that fills up or turns read-only under the daemon.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use plugvisor_tests::state_check::assert_state_consistent;
use plugvisor_tests::{PackageTweaks, binary, sha256_file};

use crate::{Refusal, Row};

pub(super) const ROWS: &[Row] = &[
    ("a non-root user at the admin socket", |m| {
        // The CLI needs the socket's path only: a minimal config others
        // may read, in a directory they may traverse.
        let dir = m.d.dir.path();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        let config = dir.join("nobody.toml");
        std::fs::write(
            &config,
            format!(
                "plugins_dir = \"{}\"\nstate_dir = \"{}\"\n[admin]\nsocket = \"{}\"\n",
                m.d.plugins_dir.display(),
                m.d.state_dir.display(),
                dir.join("admin.sock").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A copy of the CLI others may run, wherever the checkout is.
        let cli = dir.join("plugvisor-cli");
        std::fs::copy(binary(), &cli).unwrap();
        std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
        let as_nobody = || {
            let out = Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(&cli)
                .args(["status", "--config"])
                .arg(&config)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        // The socket's mode keeps others out before the daemon sees them.
        let (code, err) = as_nobody();
        assert_ne!(code, Some(0), "{err}");
        assert!(
            err.contains("only root or the daemon's user may use the admin socket")
                && err.contains("Permission denied")
                && !err.contains("is plugvisor running"),
            "{err}"
        );
        assert_eq!(
            err.matches("Permission denied").count(),
            1,
            "said once: {err}"
        );
        // Loosened by mistake, the daemon refuses by the peer's uid and
        // says so to the client and in its log.
        let sock = dir.join("admin.sock");
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (code, err) = as_nobody();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_ne!(code, Some(0), "{err}");
        assert!(
            err.contains("permission denied: only root or the daemon's user may use this socket"),
            "{err}"
        );
        let warned: Vec<serde_json::Value> = m.d.log_lines()[m.log_from..]
            .iter()
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|s| s.contains("admin socket: refused a client"))
            })
            .cloned()
            .collect();
        assert_eq!(warned.len(), 1, "{warned:#?}");
        assert_eq!(warned[0]["level"], "WARN");
        assert!(
            warned[0]["fields"]["uid"]
                .as_str()
                .unwrap()
                .contains("65534")
        );
        // Root still gets in.
        assert_eq!(m.d.cli(&["status"]).0, 0);
    }),
    ("state_dir full during a store write", |m| {
        m.settle();
        let filler = m.d.state_dir.join("filler");
        {
            let mut f = std::fs::File::create(&filler).unwrap();
            let chunk = vec![0u8; 1 << 20];
            loop {
                match f.write_all(&chunk) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => panic!("filling state_dir: {e}"),
                }
            }
            let _ = f.sync_all();
        }
        assert_eq!(
            m.d.metrics().get("plugvisor_state_dir_free_bytes", &[]),
            Some(0.0),
            "the operator's gauge reads full"
        );
        let (v, lib) = m.fresh();
        m.install("echo", &v, &lib, PackageTweaks::default());
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "failed",
            cause: &["No space left on device"],
            file: &format!(
                "{}/objects/.tmp-{}-{}",
                m.d.state_dir.display(),
                m.d.pid(),
                sha256_file(&lib)
            ),
            journaled: false,
        });
        // Asked again until the journal itself cannot take the line: it
        // must stay whole (no torn line for the next entry to run into).
        let mut tries = 0;
        while !m.d.log_text().contains("could not journal the refusal") {
            assert!(tries < 60, "the journal never filled up");
            let (code, out, _) = m.d.cli(&["reload", "echo"]);
            assert_ne!(code, 0, "{out}");
            assert!(
                out.contains("failed")
                    && out.contains("No space left on device")
                    && out.contains(&format!("still serving {}", m.good)),
                "{out}"
            );
            tries += 1;
        }
        let summary = assert_state_consistent(&m.d.state_dir);
        assert!(summary.temp_files.is_empty(), "{:?}", summary.temp_files);
        // Space comes back: the same package is taken on the next reload.
        std::fs::remove_file(&filler).unwrap();
        let (code, out, err) = m.d.cli(&["reload", "echo"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("-> {v}")), "{out}");
        m.good = v;
    }),
    ("state_dir read-only at run time", |m| {
        m.settle();
        m.state_fs.remount("ro");
        let free = m.d.metrics().get("plugvisor_state_dir_free_bytes", &[]);
        let (v, lib) = m.fresh();
        m.install("echo", &v, &lib, PackageTweaks::default());
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "failed",
            cause: &["Read-only file system"],
            file: &format!("/objects/.tmp-{}-{}", m.d.pid(), sha256_file(&lib)),
            journaled: false,
        });
        assert!(
            m.d.log_lines()[m.log_from..].iter().any(|l| {
                l["fields"]["message"] == "could not journal the refusal"
                    && l["fields"]["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("Read-only file system"))
            }),
            "the lost journal line is said"
        );
        let summary = assert_state_consistent(&m.d.state_dir);
        assert!(summary.temp_files.is_empty(), "{:?}", summary.temp_files);
        assert_eq!(
            free,
            Some(0.0),
            "a read-only state_dir has no bytes writable"
        );
        m.state_fs.remount("rw");
        let (code, out, err) = m.d.cli(&["reload", "echo"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("-> {v}")), "{out}");
        m.good = v;
    }),
];
