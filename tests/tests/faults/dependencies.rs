//! Manifests whose `[requires]` or `conflicts` cannot be met by what is
//! active: a missing dependency, one out of range, a cycle, a conflict.

use crate::Row;

pub(super) const ROWS: &[Row] = &[
    ("dependency missing", |m| {
        let v = m.install_next_with("[requires]\nnot-here = \">=1\"\n");
        m.dependency_refused(
            "missing",
            &format!("echo {v} requires not-here >=1; not-here is not active (missing)"),
        );
    }),
    ("dependency out of range", |m| {
        let v = m.install_next_with("[requires]\nlegacy-echo = \">=1\"\n");
        m.dependency_refused(
            "version",
            &format!("echo {v} requires legacy-echo >=1; legacy-echo is 0.1.0 (version)"),
        );
    }),
    ("dependency cycle", |m| {
        // codec 1.1.0 (active) requires echo.
        m.install_next_with("[requires]\ncodec = \"^1\"\n");
        m.dependency_refused("cycle", "requirement cycle echo -> codec -> echo (cycle)");
    }),
    ("conflicting plugin active", |m| {
        let v = m.install_next_with("conflicts = [\"legacy-echo\"]\n");
        m.dependency_refused(
            "conflict",
            &format!("echo {v} declares a conflict with legacy-echo 0.1.0 (conflict)"),
        );
    }),
];
