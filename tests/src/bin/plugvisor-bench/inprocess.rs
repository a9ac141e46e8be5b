//! The in-process measures: `supervisor/examples/bench_inprocess.rs`, run
//! as a child, measures slot dispatch vs a direct call, the swap and the
//! gap a dispatching thread sees across it, `/metrics` encoding and
//! `Store::stage`, and prints them as one JSON object.
use std::path::{Path, PathBuf};

use plugvisor_tests::target_dir;

/// The in-process measurements (a JSON object), or why they were skipped.
pub fn inprocess(
    bin: Option<&Path>,
    stage_libs: &[PathBuf],
    quick: bool,
) -> Result<serde_json::Value, String> {
    let bin = bin.map_or_else(
        || target_dir().join("examples/bench_inprocess"),
        Path::to_path_buf,
    );
    if !bin.is_file() {
        return Err(format!(
            "{} missing: `cargo build --release -p plugvisor --example bench_inprocess` (cargo xtask bench does)",
            bin.display()
        ));
    }
    let mut c = std::process::Command::new(&bin);
    // The version-series base: its version string leaves room for
    // distinct same-length versions (see the example's `version_copy`).
    c.arg(plugvisor_tests::build_echo_version("3.0.100000"));
    if quick {
        c.arg("--quick");
    }
    for lib in stage_libs {
        c.arg("--stage").arg(lib);
    }
    let out = c
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{} printed no JSON: {e}", bin.display()))
}

/// The raw sample of one of the JSON's distributions, for the charts.
pub fn values(v: &serde_json::Value) -> Vec<f64> {
    v["values"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default()
}
