//! Packages that are not what they say: built for or declaring another
//! plugin ABI, or a library whose own name or version is not the
//! manifest's.

use plugvisor_tests::{PackageTweaks, build_named_plugin, library};

use crate::{Refusal, Row};

pub(super) const ROWS: &[Row] = &[
    ("library built for another plugin ABI", |m| {
        let (v, _) = m.fresh();
        m.install(
            "echo",
            &v,
            &library("fixture_abi_mismatch"),
            PackageTweaks::default(),
        );
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &["implements plugin ABI 2, this plugvisor speaks ABI 1"],
            file: ".so",
            journaled: true,
        });
    }),
    ("manifest declares another plugin ABI", |m| {
        let (v, lib) = m.fresh();
        m.install(
            "echo",
            &v,
            &lib,
            PackageTweaks {
                abi: Some(7),
                ..Default::default()
            },
        );
        m.dependency_refused(
            "abi",
            "the manifest declares plugin ABI 7, this plugvisor speaks ABI 1 (abi)",
        );
    }),
    ("library's name differs from the manifest's", |m| {
        let (v, _) = m.fresh();
        let codec = build_named_plugin("codec", "1.2.0");
        m.install("echo", &v, &codec, PackageTweaks::default());
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &[&format!(
                "says it is codec 1.2.0, the manifest says echo {v}"
            )],
            file: ".so",
            journaled: true,
        });
    }),
    ("library's version differs from the manifest's", |m| {
        let (built, lib) = m.fresh();
        let (claimed, _) = m.fresh();
        m.install("echo", &claimed, &lib, PackageTweaks::default());
        m.refused(&Refusal {
            plugin: "echo",
            outcome: "rejected",
            cause: &[&format!(
                "says it is echo {built}, the manifest says echo {claimed}"
            )],
            file: ".so",
            journaled: true,
        });
    }),
];
