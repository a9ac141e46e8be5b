//! `[probes] mode` against a kernel that really refuses: the daemon is
//! started as root but with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN dropped
//! (setpriv), so every bpf() call fails as it would on a locked-down node.
#![expect(
    clippy::float_cmp,
    reason = "metric values are integer counts carried in f64; exact comparison is the point"
)]

use std::process::Command;
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, PackageTweaks, binary, build_echo_version, echo_version,
    install_package, require_root, wait_until, without_ebpf_capabilities,
};

#[test]
fn auto_serves_on_without_ebpf_and_says_so_once() {
    if !require_root("auto_serves_on_without_ebpf_and_says_so_once") {
        return;
    }
    let daemon = Daemon::start(DaemonOptions {
        wrapper: without_ebpf_capabilities(),
        ..Default::default()
    });
    let m = daemon.metrics();
    let up: Vec<_> = m.matching("plugvisor_probe_up", &[]).collect();
    assert!(!up.is_empty());
    for (labels, v) in &up {
        assert!(*v == 0.0, "probe {} is up without CAP_BPF", labels["probe"]);
        let failures = m.sum(
            "plugvisor_probe_failures_total",
            &[("probe", labels["probe"].as_str())],
        );
        assert!(
            failures >= 1.0,
            "no failure counted for {}",
            labels["probe"]
        );
    }
    let warnings: Vec<_> = daemon
        .log_lines()
        .into_iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("eBPF probes unavailable"))
        })
        .collect();
    assert_eq!(warnings.len(), 1, "said once: {warnings:#?}");
    assert_eq!(warnings[0]["level"], "WARN");

    // It serves, and reloads, as ever.
    let lib = build_echo_version("1.9.0");
    install_package(
        &daemon.plugins_dir,
        "echo",
        "1.9.0",
        &lib,
        &PackageTweaks::default(),
    );
    wait_until(
        Instant::now() + Duration::from_secs(15),
        "1.9.0 serves without probes",
        || {
            LineClient::connect(daemon.addr("echo-tcp"))
                .and_then(|mut c| c.call("x"))
                .is_ok_and(|r| echo_version(&r) == Some("1.9.0"))
        },
    );
    assert_eq!(
        daemon.metrics().get(
            "plugvisor_kernel_reload_duration_seconds_count",
            &[("plugin", "echo")]
        ),
        None,
        "nothing kernel-measured without probes"
    );
    // The store is whole and records the reload (fault matrix, issue #9).
    wait_until(
        Instant::now() + Duration::from_secs(15),
        "refs record 1.9.0",
        || {
            plugvisor_tests::state_check::check_state(&daemon.state_dir)
                .is_ok_and(|s| s.active_version("echo") == Some("1.9.0"))
        },
    );
    plugvisor_tests::state_check::assert_state_consistent(&daemon.state_dir);
}

#[test]
fn on_refuses_to_start_without_ebpf() {
    if !require_root("on_refuses_to_start_without_ebpf") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plugvisor.toml");
    std::fs::write(
        &config,
        format!(
            "plugins_dir = \"{0}/plugins\"\nstate_dir = \"{0}/state\"\n[metrics]\nlisten = \"127.0.0.1:{1}\"\n[admin]\nsocket = \"{0}/admin.sock\"\n[probes]\nmode = \"on\"\n[[listener]]\nname = \"echo-tcp\"\nprotocol = \"tcp\"\nbind = \"127.0.0.1:{2}\"\nplugin = \"echo\"\n",
            dir.path().display(),
            plugvisor_tests::free_port(),
            plugvisor_tests::free_port()
        ),
    )
    .unwrap();
    let wrapper = without_ebpf_capabilities();
    let out = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(binary())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started without eBPF in mode on: {err}"
    );
    assert!(
        err.contains("mode = \"on\" requires the probes") && err.contains("eBPF probe"),
        "{err}"
    );
}

#[test]
fn off_never_tries() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let m = daemon.metrics();
    assert!(m.matching("plugvisor_probe_up", &[]).all(|(_, v)| v == 0.0));
    assert_eq!(
        m.sum("plugvisor_probe_failures_total", &[]),
        0.0,
        "off is not a failure"
    );
    assert!(!daemon.log_text().contains("eBPF probes unavailable"));
}
