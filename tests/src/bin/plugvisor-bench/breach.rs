//! Breach → rollback at a given rule tick.
use std::time::{Duration, Instant};

use plugvisor_tests::{Daemon, DaemonOptions, PackageTweaks, install_package, wait_until};

/// Breach → rollback: a version that fails every request after its first
/// few is installed under live traffic with an error rule; measured on the
/// client from the moment the error count crossed the threshold to the
/// first answer from the known-good version.
pub fn breach_to_rollback(interval: &str, trials: usize) -> Vec<f64> {
    const THRESHOLD: u32 = 3;
    let bad = plugvisor_tests::build_plugin_version(
        "plugvisor-fixture-fail-after",
        "fixture_fail_after",
        "2.0.0",
    );
    let mut out = Vec::new();
    for _ in 0..trials {
        let rules = format!(
            "evaluation_interval = \"{interval}\"\n[[rule]]\nname = \"errors\"\nmetric = \"plugvisor_requests_total\"\nlabels = {{ plugin = \"echo\", outcome = \"error\" }}\nfunction = \"increase\"\nwindow = \"30s\"\nop = \">\"\nthreshold = {THRESHOLD}\naction = \"rollback\"\ncooldown = \"0s\"\n"
        );
        let daemon = Daemon::start(DaemonOptions {
            probes: "off",
            trial: "3s",
            thresholds: Some(rules),
            env: vec![("PLUGVISOR_FIXTURE_FAIL_AFTER".into(), "0".into())],
            ..Default::default()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        wait_until(deadline, "1.0.0 known-good", || {
            daemon.status()["plugins"][0]["state"] == "known-good"
        });
        let mut c = plugvisor_tests::LineClient::connect(daemon.addr("echo-tcp")).unwrap();
        install_package(
            &daemon.plugins_dir,
            "echo",
            "2.0.0",
            &bad,
            &PackageTweaks::default(),
        );
        let mut errors = 0;
        let mut crossed = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "no rollback within 20 s");
            let r = c.call("x").unwrap();
            if r.starts_with("ERR") {
                errors += 1;
                if errors == THRESHOLD + 1 {
                    crossed = Some(Instant::now());
                }
            } else if r.starts_with("[echo 1.0.0]")
                && let Some(t) = crossed
            {
                out.push(t.elapsed().as_secs_f64());
                break;
            }
        }
    }
    out
}
