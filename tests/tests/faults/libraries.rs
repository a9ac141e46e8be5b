//! Libraries the daemon must not load: damaged, truncated, empty, not ELF,
//! without a descriptor, outside their package, or not the bytes their
//! manifest pins. Each is refused before anything of it runs.

use std::path::{Path, PathBuf};

use plugvisor_tests::{PackageTweaks, library};

use crate::{Refusal, Row};

pub(super) const ROWS: &[Row] = &[
    ("corrupt library", |m| {
        let (v, lib) = m.fresh();
        let bad = corrupted(&lib, &m.d.dir.path().join("corrupt.so"));
        m.install("echo", &v, &bad, PackageTweaks::default());
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["cannot load", "ELF"],
            file: ".so",
            journaled: true,
        });
    }),
    ("truncated library", |m| {
        let (v, lib) = m.fresh();
        let bytes = std::fs::read(&lib).unwrap();
        let bad = m.d.dir.path().join("truncated.so");
        std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
        m.install("echo", &v, &bad, PackageTweaks::default());
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["cannot load", "truncated"],
            file: ".so",
            journaled: true,
        });
    }),
    ("empty library", |m| {
        let (v, _) = m.fresh();
        let bad = m.d.dir.path().join("empty.so");
        std::fs::write(&bad, b"").unwrap();
        m.install("echo", &v, &bad, PackageTweaks::default());
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["cannot load", "not an ELF object (0 bytes)"],
            file: ".so",
            journaled: true,
        });
    }),
    ("library is not ELF", |m| {
        let (v, _) = m.fresh();
        let bad = m.d.dir.path().join("script.so");
        std::fs::write(
            &bad,
            "#!/bin/sh\n# a script, not a shared library: longer than an ELF header\necho hello\n",
        )
        .unwrap();
        m.install("echo", &v, &bad, PackageTweaks::default());
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["cannot load", "not an ELF object (bad magic)"],
            file: ".so",
            journaled: true,
        });
    }),
    ("library without a descriptor", |m| {
        let (v, _) = m.fresh();
        m.install(
            "echo",
            &v,
            &library("fixture_no_descriptor"),
            PackageTweaks::default(),
        );
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["no `plugvisor_plugin` descriptor"],
            file: ".so",
            journaled: true,
        });
    }),
    ("library path escapes the package", |m| {
        let (v, lib) = m.fresh();
        m.install(
            "echo",
            &v,
            &lib,
            PackageTweaks {
                library: Some("../../outside.so".into()),
                ..Default::default()
            },
        );
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["escapes the package directory"],
            file: "plugin.toml",
            journaled: true,
        });
    }),
    ("sha256 mismatch", |m| {
        let (v, lib) = m.fresh();
        m.install(
            "echo",
            &v,
            &lib,
            PackageTweaks {
                sha256: Some("ab".repeat(32)),
                ..Default::default()
            },
        );
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["sha256", "the manifest says", &"ab".repeat(32)],
            file: ".so",
            journaled: true,
        });
    }),
];

/// `lib` with its program headers scrambled: still an ELF file by its
/// magic, not one the dynamic loader can map.
fn corrupted(lib: &Path, out: &Path) -> PathBuf {
    let mut b = std::fs::read(lib).unwrap();
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
    let phnum = usize::from(u16::from_le_bytes([b[56], b[57]]));
    for x in &mut b[phoff..phoff + phnum * 56] {
        *x ^= 0x5a;
    }
    std::fs::write(out, b).unwrap();
    out.to_owned()
}
