//! A package refused for a defect is taken once the same version is
//! published again without it. Each kind of bad package (and what the
//! operator is told about it) is a row of the fault matrix in
//! `faults.rs`, which runs them all against one daemon with live clients.
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, PackageTweaks, build_echo_version, echo_version,
    install_package, wait_until,
};

#[test]
fn a_good_package_after_a_bad_one_is_taken() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let lib = build_echo_version("2.1.0");
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.1.0",
        &lib,
        &PackageTweaks {
            sha256: Some("cd".repeat(32)),
            ..Default::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    wait_until(deadline, "rejected", || {
        daemon.metrics().get(
            "plugvisor_reloads_total",
            &[("plugin", "echo"), ("outcome", "rejected")],
        ) == Some(1.0)
    });
    install_package(
        &daemon.plugins_dir,
        "echo",
        "2.1.0",
        &lib,
        &PackageTweaks::default(),
    );
    wait_until(deadline, "the corrected package serves", || {
        LineClient::connect(daemon.addr("echo-tcp"))
            .and_then(|mut c| c.call("v"))
            .is_ok_and(|r| echo_version(&r) == Some("2.1.0"))
    });
}
