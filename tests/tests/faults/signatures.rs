//! Signatures that must not pass under `require_signature`: by a key the
//! daemon does not trust, tampered with, or missing.

use plugvisor_tests::{PackageTweaks, install_package, wait_until};

use crate::{Refusal, Row, deadline, write_atomically};

pub(super) const ROWS: &[Row] = &[
    ("signed by an untrusted key", |m| {
        let (v, lib) = m.fresh();
        let key = m.untrusted.clone();
        m.install(
            "echo",
            &v,
            &lib,
            PackageTweaks {
                sign_with: Some(key),
                ..Default::default()
            },
        );
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["does not verify", "no trusted key made it"],
            file: "plugin.toml.sig",
            journaled: true,
        });
    }),
    ("signature that does not verify (tampered)", |m| {
        // Signed by the trusted key, then one digit of the signature
        // changed before the commit.
        let (_, dir, manifest, sig) = m.stage_next_by_hand();
        let flipped: String = sig
            .lines()
            .map(|l| match l.strip_prefix("signature ") {
                Some(hex) => {
                    let first = if hex.starts_with('0') { '1' } else { '0' };
                    format!("signature {first}{}\n", &hex[1..])
                }
                None => format!("{l}\n"),
            })
            .collect();
        write_atomically(&dir.join("plugin.toml.sig"), flipped.as_bytes());
        write_atomically(&dir.join("plugin.toml"), manifest.as_bytes());
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["does not verify"],
            file: "plugin.toml.sig",
            journaled: true,
        });
    }),
    ("no signature while require_signature is set", |m| {
        // The package that serves back in place first: the daemon may look
        // between the old signature's removal and the new manifest, and
        // must then find the serving version, not the last row's package.
        let good = m.good.clone();
        let good_lib = m.series.iter().find(|(v, _)| *v == good).unwrap().1.clone();
        m.install("echo", &good, &good_lib, PackageTweaks::default());
        wait_until(deadline(), "the serving package is back in place", || {
            m.d.cli(&["reload", "echo"])
                .1
                .contains(&format!("unchanged, {good} is serving"))
        });
        let (v, lib) = m.fresh();
        std::fs::remove_file(m.d.plugins_dir.join("echo/plugin.toml.sig")).unwrap();
        install_package(
            &m.d.plugins_dir,
            "echo",
            &v,
            &lib,
            &PackageTweaks::default(),
        );
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["is not signed", "require_signature"],
            file: "echo/plugin.toml",
            journaled: true,
        });
    }),
];
