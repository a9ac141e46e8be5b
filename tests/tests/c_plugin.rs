//! A plugin written in C, against `plugin-sdk/include/plugvisor.h` alone:
//! it loads, serves TCP and gRPC, hot-swaps to its next version under live
//! clients with nothing broken (as the clients and the kernel see it), and
//! a C library whose descriptor lies is refused with a clear error while
//! the previous version serves on.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use plugvisor_tests::pb::Request;
use plugvisor_tests::pb::plugin_client::PluginClient;
use plugvisor_tests::{
    ClientReport, Daemon, DaemonOptions, LineClient, ListenerSpec, PackageTweaks, build_c_plugin,
    echo_version, follow_tcp, grpc_channel, install_package, require_root, wait_until,
};

/// The versions the C plugin is swapped to, after the Rust echo 1.0.0 the
/// daemon starts with.
const VERSIONS: [&str; 2] = ["2.0.0", "2.1.0"];

/// A gRPC client on one HTTP/2 connection making `Invoke` calls until told
/// to stop and it has seen `last` answer.
fn grpc_client(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    last: &'static str,
) -> JoinHandle<ClientReport> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut r = ClientReport::default();
            let mut client = PluginClient::new(grpc_channel(addr).await.expect("gRPC connect"));
            let mut call = async |payload: String| {
                client
                    .invoke(Request {
                        payload: payload.into_bytes(),
                    })
                    .await
                    .map(tonic::Response::into_inner)
            };
            while !(stop.load(Ordering::Relaxed)
                && r.versions.last().map(String::as_str) == Some(last))
            {
                let frame = format!("g-f{}", r.frames);
                match call(frame.clone()).await {
                    Ok(resp) => {
                        let text = String::from_utf8_lossy(&resp.payload).into_owned();
                        match echo_version(&text) {
                            Some(v) if text.ends_with(&frame) && v == resp.plugin_version => {
                                if r.versions.last() != Some(&resp.plugin_version) {
                                    r.versions.push(resp.plugin_version.clone());
                                }
                            }
                            _ => r.errors.push(format!("wrong answer {resp:?} to {frame:?}")),
                        }
                    }
                    Err(status) => {
                        r.errors.push(status.to_string());
                        return r;
                    }
                }
                r.frames += 1;
            }
            r.still_open = call("last".to_owned())
                .await
                .is_ok_and(|resp| resp.payload.ends_with(b"last"));
            r
        })
    })
}

fn lang(addr: SocketAddr) -> String {
    LineClient::connect(addr)
        .and_then(|mut c| c.call("lang"))
        .unwrap()
}

#[test]
fn a_c_plugin_serves_tcp_and_grpc_and_hot_swaps_under_live_clients() {
    if !require_root("a_c_plugin_serves_tcp_and_grpc_and_hot_swaps_under_live_clients") {
        return;
    }
    let libs: Vec<_> = VERSIONS
        .iter()
        .map(|v| build_c_plugin("echo", v, 1))
        .collect();
    let mut daemon = Daemon::start(DaemonOptions {
        listeners: vec![
            ListenerSpec::tcp("echo-tcp", "echo"),
            ListenerSpec::grpc("echo-grpc", "echo"),
        ],
        ..Default::default()
    });
    let (tcp, grpc) = (daemon.addr("echo-tcp"), daemon.addr("echo-grpc"));
    assert_eq!(lang(tcp), "[echo 1.0.0] lang", "starts on the Rust echo");

    let stop = Arc::new(AtomicBool::new(false));
    let last = VERSIONS[VERSIONS.len() - 1];
    let mut clients: Vec<_> = (0..4)
        .map(|c| follow_tcp(tcp, c, stop.clone(), last.to_owned()))
        .collect();
    clients.push(grpc_client(grpc, stop.clone(), last));
    wait_until(
        Instant::now() + Duration::from_secs(30),
        "the kernel sees the TCP clients",
        || {
            daemon
                .metrics()
                .get("plugvisor_tcp_connections", &[("listener", "echo-tcp")])
                == Some(4.0)
        },
    );
    for (v, lib) in VERSIONS.iter().zip(&libs) {
        daemon.install_and_await("echo", v, lib, &format!("the C echo {v} active"));
        daemon.assert_running();
        assert_eq!(lang(tcp), format!("[echo {v}] c"), "the C library answers");
    }
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<ClientReport> = clients.into_iter().map(|h| h.join().unwrap()).collect();
    let reloads: Vec<String> = VERSIONS.iter().map(|v| (*v).to_owned()).collect();
    for (i, r) in reports.iter().enumerate() {
        r.assert_followed(&format!("client {i}"), &reloads);
    }
    let m = daemon.metrics();
    for (listener, protocol) in [("echo-tcp", "tcp"), ("echo-grpc", "grpc")] {
        assert_eq!(
            m.get(
                "plugvisor_reload_broken_connections_total",
                &[("listener", listener), ("protocol", protocol)]
            ),
            Some(0.0),
            "the kernel saw {listener} connections break during a reload"
        );
    }
}

#[test]
fn a_c_plugin_whose_descriptor_lies_is_refused_and_the_previous_version_serves() {
    let daemon = Daemon::start(DaemonOptions {
        probes: "off",
        ..Default::default()
    });
    let tcp = daemon.addr("echo-tcp");
    daemon.install_and_await(
        "echo",
        "2.0.0",
        &build_c_plugin("echo", "2.0.0", 1),
        "the C echo 2.0.0 active",
    );

    // Each lie, with what the refusal must name. The manifest is honest
    // (echo, the version, abi 1); the library's descriptor is not.
    let lies = [
        (
            "2.1.0",
            build_c_plugin("echo", "2.1.0", 7),
            "implements plugin ABI 7, this plugvisor speaks ABI 1",
        ),
        (
            "2.2.0",
            build_c_plugin("other", "2.2.0", 1),
            "says it is other 2.2.0, the manifest says echo 2.2.0",
        ),
    ];
    for (n, (version, lib, why)) in lies.iter().enumerate() {
        install_package(
            &daemon.plugins_dir,
            "echo",
            version,
            lib,
            &PackageTweaks::default(),
        );
        wait_until(
            Instant::now() + Duration::from_secs(20),
            &format!("echo {version} refused"),
            || {
                daemon.metrics().get(
                    "plugvisor_reloads_total",
                    &[("plugin", "echo"), ("outcome", "rejected")],
                ) == Some((n + 1) as f64)
            },
        );
        let entry = daemon
            .journal()
            .into_iter()
            .rev()
            .find(|e| e["event"] == "rejected" && e["version"] == *version)
            .unwrap_or_else(|| panic!("no rejected entry for {version} in the journal"));
        let reason = entry["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(why),
            "refusal of {version} says {reason:?}, not {why:?}"
        );
        assert!(
            daemon.log_text().contains(why),
            "the log does not say why {version} was refused ({why})"
        );
        assert_eq!(
            lang(tcp),
            "[echo 2.0.0] c",
            "the previous C version serves on"
        );
    }
}

/// `plugvisor pack` and `verify` take a C library as they take a Rust one
/// — named by its bare file name in the current directory too, as an
/// author types it next to the library just built.
#[test]
fn a_c_plugin_is_packed_signed_and_verified_from_its_own_directory() {
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(
        build_c_plugin("echo", "1.3.0", 1),
        t.path().join("libc_echo.so"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(plugvisor_tests::binary())
            .args(args)
            .current_dir(t.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "plugvisor {args:?} failed:\n{text}");
        text
    };
    run(&["keygen", "--out", "keys"]);
    let packed = run(&[
        "pack",
        "staging/echo",
        "--library",
        "libc_echo.so",
        "--key",
        "keys/plugvisor.key",
    ]);
    assert!(packed.contains("packed echo 1.3.0"), "{packed}");
    let verified = run(&[
        "verify",
        "staging/echo",
        "--public-key",
        "keys/plugvisor.pub",
    ]);
    assert!(
        verified.contains("echo 1.3.0 would be accepted")
            && verified.contains("descriptor echo 1.3.0 (ABI 1)"),
        "{verified}"
    );
}
