//! Hostile or careless manifests: not TOML, half-written in place, 50 MB,
//! nested past any parser's stack.

use std::io::Write as _;

use plugvisor_tests::{PackageTweaks, wait_until};

use crate::{Refusal, Row, deadline, write_atomically};

pub(super) const ROWS: &[Row] = &[
    ("manifest is not TOML", |m| {
        m.install(
            "echo",
            "0.0.0",
            &m.series[0].1.clone(),
            PackageTweaks {
                raw_manifest: Some("name = \"echo\nversion = [".into()),
                ..Default::default()
            },
        );
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["is not valid", "TOML parse error at line 1"],
            file: "echo/plugin.toml",
            journaled: true,
        });
    }),
    ("manifest half-written in place, then completed", |m| {
        // An operator copying a manifest over the old one instead of
        // renaming it into place: the daemon looks at the half it finds.
        let (v, dir, manifest, sig) = m.stage_next_by_hand();
        write_atomically(&dir.join("plugin.toml.sig"), sig.as_bytes());
        let half = manifest.find("sha256").unwrap();
        let mut f = std::fs::File::create(dir.join("plugin.toml")).unwrap();
        f.write_all(&manifest.as_bytes()[..half]).unwrap();
        f.sync_all().unwrap();
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["is not valid", "missing field `sha256`"],
            file: "echo/plugin.toml",
            journaled: true,
        });
        // The rest of the write arrives: the whole manifest is taken.
        f.write_all(&manifest.as_bytes()[half..]).unwrap();
        f.sync_all().unwrap();
        drop(f);
        wait_until(deadline(), "the completed manifest is taken", || {
            m.d.serving("echo-tcp").as_deref() == Some(v.as_str())
        });
        m.good = v;
    }),
    ("manifest of 50 MB", |m| {
        let (v, lib) = m.fresh();
        let mut huge = String::with_capacity(50 << 20);
        let mut i = 0u64;
        while huge.len() < 50 << 20 {
            let _ = std::fmt::Write::write_fmt(&mut huge, format_args!("key{i:016} = {i}\n"));
            i += 1;
        }
        m.install(
            "echo",
            &v,
            &lib,
            PackageTweaks {
                raw_manifest: Some(huge),
                ..Default::default()
            },
        );
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["more than the 65536 allowed"],
            file: "echo/plugin.toml",
            journaled: true,
        });
    }),
    ("manifest nested 60 000 deep", |m| {
        let (v, lib) = m.fresh();
        let nested = format!("name = {}\n", "[".repeat(60_000));
        m.install(
            "echo",
            &v,
            &lib,
            PackageTweaks {
                raw_manifest: Some(nested),
                ..Default::default()
            },
        );
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["is not valid", "recursion limit exceeded"],
            file: "echo/plugin.toml",
            journaled: true,
        });
    }),
];
