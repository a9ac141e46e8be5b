//! The gRPC listener, as a stock client sees it: `plugvisor.v1.Plugin`
//! streams that flow on across hot reloads, the standard health and
//! reflection services, and a graceful drain on SIGTERM.
#![expect(
    clippy::too_many_lines,
    reason = "each test is one black-box scenario that reads top to bottom"
)]
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plugvisor_tests::pb::plugin_client::PluginClient;
use plugvisor_tests::pb::{Request, Response};
use plugvisor_tests::{
    ClientReport, Daemon, DaemonOptions, GRPC_SERVICE, ListenerSpec, PackageTweaks,
    build_echo_version, echo_version, grpc_channel, grpc_health, install_package, wait_until,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// HTTP/2 connections the streams are spread over.
const CONNECTIONS: usize = 4;
/// Concurrent `Exchange` streams on each connection.
const STREAMS_PER_CONNECTION: usize = 4;
const RELOADS: usize = 50;
/// The longest a test waits for one response.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn grpc_daemon(listener: &str, opts: DaemonOptions) -> Daemon {
    Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::grpc(listener, "echo")],
        ..opts
    })
}

fn request(payload: &str) -> Request {
    Request {
        payload: payload.as_bytes().to_vec(),
    }
}

/// Checks one echo answer to `sent`; returns its version.
fn check_answer(resp: &Response, sent: &str) -> Result<String, String> {
    if !resp.error.is_empty() {
        return Err(format!("plugin error {:?} to {sent:?}", resp.error));
    }
    let text = String::from_utf8_lossy(&resp.payload);
    let v = echo_version(&text).ok_or_else(|| format!("not an echo answer: {text:?}"))?;
    if v != resp.plugin_version {
        return Err(format!(
            "payload says {v}, plugin_version says {}",
            resp.plugin_version
        ));
    }
    if !text.ends_with(sent) {
        return Err(format!("wrong answer {text:?} to {sent:?}"));
    }
    Ok(resp.plugin_version.clone())
}

#[derive(Debug, Default)]
struct StreamReport {
    /// As a TCP connection reports it: both are judged alike.
    client: ClientReport,
    /// After the client half-closed, the server ended the stream with OK.
    clean_end: bool,
}

/// One `Exchange` stream sending message after message (each waits for its
/// answer) until `stop`, then one last message and a half-close.
async fn run_stream(channel: Channel, id: usize, stop: Arc<AtomicBool>) -> StreamReport {
    let mut r = StreamReport::default();
    let (tx, rx) = mpsc::channel::<Request>(1);
    let mut inbound = match PluginClient::new(channel)
        .exchange(ReceiverStream::new(rx))
        .await
    {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            r.client
                .errors
                .push(format!("opening the stream: {status}"));
            return r;
        }
    };
    loop {
        let last = stop.load(Ordering::Relaxed);
        let sent = if last {
            format!("s{id}-last")
        } else {
            format!("s{id}-f{}", r.client.frames)
        };
        if tx.send(request(&sent)).await.is_err() {
            r.client.errors.push("the request stream closed".into());
            return r;
        }
        let resp = match tokio::time::timeout(ANSWER_TIMEOUT, inbound.message()).await {
            Err(_) => Err(format!("no answer to {sent:?} within {ANSWER_TIMEOUT:?}")),
            Ok(Err(status)) => Err(format!("stream error: {status}")),
            Ok(Ok(None)) => Err("the server ended the stream".into()),
            Ok(Ok(Some(resp))) => Ok(resp),
        };
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) => {
                r.client.errors.push(e);
                return r;
            }
        };
        match check_answer(&resp, &sent) {
            Ok(v) => {
                if r.client.versions.last() != Some(&v) {
                    r.client.versions.push(v);
                }
            }
            Err(e) => r.client.errors.push(e),
        }
        if last {
            r.client.still_open = true;
            break;
        }
        r.client.frames += 1;
    }
    drop(tx);
    r.clean_end = matches!(
        tokio::time::timeout(ANSWER_TIMEOUT, inbound.message()).await,
        Ok(Ok(None))
    );
    r
}

#[test]
fn sixteen_exchange_streams_flow_across_fifty_reloads() {
    // Build every version first so the reloads follow each other quickly.
    let versions: Vec<String> = (1..=RELOADS).map(|i| format!("1.2.{i}")).collect();
    let libs: Vec<_> = versions.iter().map(|v| build_echo_version(v)).collect();

    let mut daemon = grpc_daemon("echo-grpc", DaemonOptions::default());
    let addr = daemon.addr("echo-grpc");
    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let channels: Vec<Channel> = rt.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..CONNECTIONS {
            channels.push(grpc_channel(addr).await.expect("connect"));
        }
        channels
    });
    let streams: Vec<_> = (0..CONNECTIONS * STREAMS_PER_CONNECTION)
        .map(|id| {
            let channel = channels[id % CONNECTIONS].clone();
            rt.spawn(run_stream(channel, id, stop.clone()))
        })
        .collect();

    // Every stream is flowing on the first version before the reloads start.
    let deadline = Instant::now() + Duration::from_secs(10);
    wait_until(deadline, "every stream answered on 1.0.0", || {
        daemon
            .metrics()
            .get(
                "plugvisor_requests_total",
                &[("plugin", "echo"), ("version", "1.0.0"), ("outcome", "ok")],
            )
            .unwrap_or(0.0)
            >= (10 * CONNECTIONS * STREAMS_PER_CONNECTION) as f64
    });

    for (i, (v, lib)) in versions.iter().zip(&libs).enumerate() {
        daemon.install_and_await("echo", v, lib, &format!("reload {} to {v}", i + 1));
        daemon.assert_running();
    }
    // Let every stream see the last version before stopping them.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<StreamReport> = rt.block_on(async {
        let mut reports = Vec::new();
        for s in streams {
            reports.push(s.await.expect("stream task"));
        }
        reports
    });

    let m = daemon.metrics();
    let total_frames: u64 = reports.iter().map(|r| r.client.frames).sum();
    for (i, r) in reports.iter().enumerate() {
        r.client.assert_followed(&format!("stream {i}"), &versions);
        assert!(
            r.clean_end,
            "stream {i}: after the client's half-close the server did not end it with OK"
        );
    }
    assert_eq!(
        m.get(
            "plugvisor_reloads_total",
            &[("plugin", "echo"), ("outcome", "success")]
        ),
        Some((RELOADS + 1) as f64)
    );

    // What the kernel saw on the wire during the reloads (before the
    // SIGTERM below, whose drain sends GOAWAY by design).
    if plugvisor_tests::require_root("grpc kernel counters") {
        let m = daemon.metrics();
        assert_eq!(
            m.get("plugvisor_probe_up", &[("probe", "http2_frames")]),
            Some(1.0)
        );
        let l = [("listener", "echo-grpc")];
        assert_eq!(
            m.get("plugvisor_grpc_goaway_total", &l),
            Some(0.0),
            "a reload sent GOAWAY"
        );
        assert_eq!(
            m.get("plugvisor_grpc_stream_resets_total", &l),
            Some(0.0),
            "a reload reset a stream"
        );
        assert_eq!(
            m.get(
                "plugvisor_reload_broken_connections_total",
                &[("listener", "echo-grpc"), ("protocol", "grpc")]
            ),
            Some(0.0),
            "the kernel saw a gRPC connection break during a reload"
        );
        assert_eq!(
            m.get("plugvisor_tcp_connections", &l),
            Some(CONNECTIONS as f64)
        );
    }

    let seen: usize = reports.iter().map(|r| r.client.versions.len()).sum();
    eprintln!(
        "{total_frames} messages over {} Exchange streams on {CONNECTIONS} connections across {RELOADS} reloads, 0 errors; {seen} version changes seen in total",
        reports.len()
    );
    drop(channels);
    assert_eq!(daemon.stop(), Some(0), "SIGTERM drains and exits 0");
}

/// Lists services through reflection `v1` or `v1alpha`.
async fn reflected_services(channel: Channel, v1alpha: bool) -> Vec<String> {
    if v1alpha {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut inbound = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        match inbound.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("v1alpha ListServices answered {other:?}"),
        }
    } else {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut inbound = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        match inbound.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("v1 ListServices answered {other:?}"),
        }
    }
}

/// The file that defines `symbol`, through reflection v1 (raw
/// `FileDescriptorProto` bytes).
async fn reflected_file(channel: Channel, symbol: &str) -> Vec<Vec<u8>> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
    };
    let mut inbound = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    match inbound.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::FileDescriptorResponse(f)) => f.file_descriptor_proto,
        other => panic!("FileContainingSymbol {symbol} answered {other:?}"),
    }
}

#[test]
fn health_and_reflection_answer_stock_clients() {
    let mut daemon = grpc_daemon(
        "echo-grpc",
        DaemonOptions {
            probes: "off",
            ..Default::default()
        },
    );
    let addr = daemon.addr("echo-grpc");
    assert_eq!(grpc_health(addr, GRPC_SERVICE), Ok(ServingStatus::Serving));
    assert_eq!(grpc_health(addr, ""), Ok(ServingStatus::Serving));
    let unknown = grpc_health(addr, "no.such.Service").unwrap_err();
    assert!(unknown.contains("not registered"), "{unknown}");

    let rt = runtime();
    rt.block_on(async {
        let channel = grpc_channel(addr).await.unwrap();
        for v1alpha in [false, true] {
            let services = reflected_services(channel.clone(), v1alpha).await;
            for want in [GRPC_SERVICE, "grpc.health.v1.Health"] {
                assert!(
                    services.iter().any(|s| s == want),
                    "reflection (v1alpha: {v1alpha}) lists {services:?}, not {want}"
                );
            }
        }
        let files = reflected_file(channel, GRPC_SERVICE).await;
        assert!(
            files
                .iter()
                .any(|f| f.windows(25).any(|w| w == b"plugvisor/v1/plugin.proto")),
            "reflection serves plugvisor/v1/plugin.proto for {GRPC_SERVICE}"
        );
    });
    assert_eq!(daemon.stop(), Some(0));
}

async fn invoke(addr: SocketAddr, payload: &str) -> Result<Response, tonic::Status> {
    let channel = grpc_channel(addr).await.unwrap();
    PluginClient::new(channel)
        .invoke(request(payload))
        .await
        .map(tonic::Response::into_inner)
}

#[test]
fn invoke_names_the_version_and_an_empty_slot_is_not_serving() {
    // A listener whose plugin has no package yet.
    let mut daemon = grpc_daemon(
        "echo-grpc",
        DaemonOptions {
            packages: Vec::new(),
            probes: "off",
            ..Default::default()
        },
    );
    let addr = daemon.addr("echo-grpc");
    assert_eq!(
        grpc_health(addr, GRPC_SERVICE),
        Ok(ServingStatus::NotServing)
    );
    assert_eq!(grpc_health(addr, ""), Ok(ServingStatus::NotServing));

    let rt = runtime();
    let status = rt.block_on(invoke(addr, "hello")).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("echo-grpc") && status.message().contains("no active version"),
        "a clear status names the listener and the reason: {status:?}"
    );

    // An Exchange stream opened now is answered in-band and stays open; a
    // health Watch opened now follows the slot.
    let (tx, mut inbound, mut watch) = rt.block_on(async {
        let channel = grpc_channel(addr).await.unwrap();
        let (tx, rx) = mpsc::channel::<Request>(1);
        let inbound = PluginClient::new(channel.clone())
            .exchange(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut watch = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: GRPC_SERVICE.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::NotServing as i32);
        (tx, inbound, watch)
    });
    rt.block_on(async {
        tx.send(request("early")).await.unwrap();
        let resp = tokio::time::timeout(ANSWER_TIMEOUT, inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(resp.payload.is_empty());
        assert_eq!(resp.plugin_version, "");
        assert!(resp.error.contains("no active version"), "{resp:?}");
    });

    // The package arrives: health turns SERVING and the same stream is
    // answered by the new version.
    install_package(
        &daemon.plugins_dir,
        "echo",
        "1.0.0",
        &build_echo_version("1.0.0"),
        &PackageTweaks::default(),
    );
    rt.block_on(async {
        let next = tokio::time::timeout(Duration::from_secs(20), watch.message())
            .await
            .expect("the Watch stream reports the change")
            .unwrap()
            .unwrap();
        assert_eq!(next.status, ServingStatus::Serving as i32);
        tx.send(request("late")).await.unwrap();
        let resp = tokio::time::timeout(ANSWER_TIMEOUT, inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(check_answer(&resp, "late"), Ok("1.0.0".to_owned()));
    });
    assert_eq!(grpc_health(addr, GRPC_SERVICE), Ok(ServingStatus::Serving));

    let resp = rt.block_on(invoke(addr, "hello")).unwrap();
    assert_eq!(resp.payload, b"[echo 1.0.0] hello");
    assert_eq!(resp.plugin_version, "1.0.0");
    assert_eq!(resp.error, "");
    drop((tx, inbound, watch));
    assert_eq!(daemon.stop(), Some(0));
}

/// What the client of one stream saw, and when, relative to SIGTERM.
#[derive(Debug)]
struct Ending {
    answered: u64,
    outcome: Result<Option<Response>, tonic::Status>,
    at: Instant,
}

#[test]
fn sigterm_drains_grpc_gracefully_and_exits_zero() {
    const DRAIN: Duration = Duration::from_secs(3);
    let mut daemon = grpc_daemon(
        "echo-grpc",
        DaemonOptions {
            drain_timeout: Some("3s"),
            ..Default::default()
        },
    );
    let addr = daemon.addr("echo-grpc");
    let rt = runtime();
    // An Exchange stream sending without pause, and a health Watch on a
    // second connection (a stream that only the drain bound ends).
    let (exchange, watch, watch_open) = rt.block_on(async {
        let channel = grpc_channel(addr).await.unwrap();
        let (tx, rx) = mpsc::channel::<Request>(1);
        let mut inbound = PluginClient::new(channel)
            .exchange(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let exchange = tokio::spawn(async move {
            let mut answered = 0;
            loop {
                // A closed request side means the server ended the call;
                // its status comes on the response side.
                let _ = tx.send(request(&format!("f{answered}"))).await;
                match tokio::time::timeout(ANSWER_TIMEOUT, inbound.message())
                    .await
                    .expect("the stream stalled: no answer and no end")
                {
                    Ok(Some(resp)) if resp.error.is_empty() => answered += 1,
                    outcome => {
                        return Ending {
                            answered,
                            outcome,
                            at: Instant::now(),
                        };
                    }
                }
            }
        });
        let mut watch = HealthClient::new(grpc_channel(addr).await.unwrap())
            .watch(HealthCheckRequest {
                service: GRPC_SERVICE.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32);
        let watch_open = Arc::new(AtomicBool::new(true));
        let open = watch_open.clone();
        let watch = tokio::spawn(async move {
            let mut statuses = Vec::new();
            let end = loop {
                match watch.message().await {
                    Ok(Some(s)) => statuses.push(s.status),
                    other => break other.map(|_| ()),
                }
            };
            open.store(false, Ordering::Relaxed);
            (statuses, end, Instant::now())
        });
        (exchange, watch, watch_open)
    });
    // Traffic is flowing.
    std::thread::sleep(Duration::from_millis(300));

    let t0 = Instant::now();
    daemon.signal(libc::SIGTERM);
    // While it drains (the Watch holds it), new connections are refused.
    wait_until(
        t0 + Duration::from_secs(1),
        "new connections are refused while draining",
        || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        },
    );
    daemon.assert_running();
    // The kernel's view of the drain, scraped while the Watch holds it open
    // (/metrics outlives the listeners): each of the two connections gets
    // the two-phase GOAWAY, and the Exchange the server ended while its
    // client was still sending gets one RST_STREAM (NO_ERROR, RFC 9113 §8.1)
    // — the server-side stream reset the counter exists to see.
    if plugvisor_tests::require_root("grpc drain kernel counters") {
        // The bound is the drain itself: /metrics is up until the process
        // exits, whatever the machine's load; the counts come within
        // milliseconds when the drain is right (a PING round trip).
        let l = [("listener", "echo-grpc")];
        let want = (Some(4.0), Some(1.0));
        let (seen, after) = loop {
            let m = daemon.metrics();
            let seen = (
                m.get("plugvisor_grpc_goaway_total", &l),
                m.get("plugvisor_grpc_stream_resets_total", &l),
            );
            if seen == want || t0.elapsed() >= DRAIN {
                break (seen, t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        eprintln!(
            "kernel counts after SIGTERM: (GOAWAY, RST_STREAM) = {seen:?} at {after:?} (listener {addr})"
        );
        assert_eq!(
            seen, want,
            "(GOAWAY, RST_STREAM) seen by the kernel {after:?} after SIGTERM: two GOAWAYs on each of the two connections and one RST_STREAM were expected"
        );
    }
    // (`stop` sends SIGTERM again; the draining daemon no longer listens
    // for it.)
    let code = daemon.stop();
    let exited = t0.elapsed();
    assert_eq!(code, Some(0), "SIGTERM drains and exits 0");
    assert!(
        exited < DRAIN + Duration::from_secs(2),
        "exited {exited:?} after SIGTERM; the drain bound is {DRAIN:?}"
    );

    let (ending, (statuses, watch_end, watch_ended)) = rt.block_on(async {
        let ending = exchange.await.unwrap();
        let watch = tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .expect("the Watch stream ended with the process")
            .unwrap();
        (ending, watch)
    });
    assert!(!watch_open.load(Ordering::Relaxed));
    assert!(ending.answered > 0, "the stream was flowing before SIGTERM");
    // What tonic surfaces: the server ends the stream, after the message it
    // was answering, with status UNAVAILABLE (in HTTP/2 trailers, after the
    // connection's GOAWAY); no transport error and no message lost in
    // between.
    let status = ending.outcome.expect_err("the stream ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("draining"), "{status:?}");
    let ended_after = ending.at.duration_since(t0);
    assert!(
        ended_after < Duration::from_secs(1),
        "the Exchange stream ended {ended_after:?} after SIGTERM: it should not wait for the drain bound"
    );
    // Health said NOT_SERVING before the process went away.
    assert_eq!(
        statuses.last().copied(),
        Some(ServingStatus::NotServing as i32),
        "Watch saw {statuses:?}"
    );
    eprintln!(
        "SIGTERM: Exchange ended after {ended_after:?} with {:?} ({} messages answered before); exit 0 after {exited:?} (drain bound {DRAIN:?}); the health Watch ended after {:?} with {watch_end:?}",
        status.code(),
        ending.answered,
        watch_ended.duration_since(t0)
    );
}
