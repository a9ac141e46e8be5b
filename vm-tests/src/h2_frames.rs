//! `http2-frames`: the HTTP/2 frame probe counts every GOAWAY and
//! RST_STREAM a watched gRPC listener sends exactly once, however the
//! bytes are cut into packets.
//!
//! The server side here is not a real HTTP/2 server but a socket on a
//! watched port that writes crafted byte streams, because the cuts are
//! the point: several frames in one write, a frame header split over two
//! writes at every offset that matters, a large DATA frame followed by
//! GOAWAY in the same write (the kernel cuts it into GSO-sized skbs
//! wherever it likes), and a write of more small frames than one run of
//! the program walks (the tail-call path). Each stream goes over a
//! connection of its own and is judged by the growth of
//! `plugvisor_grpc_goaway_total` and `plugvisor_grpc_stream_resets_total`,
//! with `plugvisor_probe_events_dropped_total{probe="http2_frames"}` (the
//! probe losing its place in a connection) required to stay flat.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use plugvisor::config::Protocol;
use plugvisor::metrics::Metrics;
use plugvisor::probes::{self, WatchedListener};
use plugvisor_probes_common::Probe;

use crate::probe_checks::ProbeCheck;
use crate::report::Outcome;

/// The listener's name in the metrics.
const LISTENER: &str = "h2-crafted";

/// Pause between two writes, so that each leaves as a packet of its own
/// (the socket has `TCP_NODELAY`; the previous packet is long gone).
const BETWEEN_WRITES: Duration = Duration::from_millis(20);

/// Frame types (RFC 9113 §6).
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;

/// One HTTP/2 frame.
fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("frame length")
        .to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, 0];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn goaway(last: u32) -> Vec<u8> {
    let mut p = last.to_be_bytes().to_vec();
    p.extend_from_slice(&0u32.to_be_bytes());
    frame(GOAWAY, 0, &p)
}

fn rst(stream: u32) -> Vec<u8> {
    frame(RST_STREAM, stream, &8u32.to_be_bytes())
}

fn settings() -> Vec<u8> {
    frame(SETTINGS, 0, &[])
}

/// A byte stream, as the writes that make it, and what the probe must count.
struct Case {
    name: String,
    writes: Vec<Vec<u8>>,
    goaway: u64,
    rst: u64,
}

/// Every case; each begins with SETTINGS, as a server's stream does.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();

    let mut several = settings();
    several.extend(frame(PING, 0, &[1; 8]));
    several.extend(goaway((1 << 31) - 1));
    several.extend(rst(1));
    several.extend(frame(DATA, 3, &[7; 10]));
    several.extend(frame(HEADERS, 3, &[0; 5]));
    several.extend(goaway(3));
    cases.push(Case {
        name: "several frames in one write".into(),
        writes: vec![several],
        goaway: 2,
        rst: 1,
    });

    // A header cut after each of its first bytes (the probe reads length
    // and type, bytes 0..4) and in its second half.
    for cut in [1, 2, 3, 4, 5, 8] {
        let mut first = settings();
        first.extend(frame(DATA, 1, &[7; 20]));
        let g = goaway(1);
        first.extend_from_slice(&g[..cut]);
        let mut second = g[cut..].to_vec();
        let r = rst(1);
        second.extend_from_slice(&r[..cut.min(3)]);
        let mut third = r[cut.min(3)..].to_vec();
        third.extend(goaway(1));
        cases.push(Case {
            name: format!("a header cut after byte {cut}"),
            writes: vec![first, second, third],
            goaway: 2,
            rst: 1,
        });
    }

    let mut large = frame(DATA, 1, &vec![7; 200_000]);
    large.extend(goaway(1));
    large.extend(rst(1));
    cases.push(Case {
        name: "a 200 kB DATA frame, then GOAWAY, in one write".into(),
        writes: vec![settings(), large],
        goaway: 1,
        rst: 1,
    });

    // 4 kB frames over GSO-sized skbs: many headers land across a cut.
    let mut spanning = Vec::new();
    for i in 0..40 {
        spanning.extend(frame(DATA, 1, &vec![7; 4000 + i]));
        spanning.extend(rst(1));
    }
    cases.push(Case {
        name: "40 DATA+RST_STREAM pairs of ~4 kB in one write".into(),
        writes: vec![settings(), spanning],
        goaway: 0,
        rst: 40,
    });

    let mut many = settings();
    for s in 0..2000 {
        many.extend(rst(2 * s + 1));
    }
    many.extend(goaway(4001));
    cases.push(Case {
        name: "2000 RST_STREAM frames and a GOAWAY in one write".into(),
        writes: vec![many],
        goaway: 1,
        rst: 2000,
    });
    cases
}

/// The counters the probe feeds, as the registry shows them now.
fn counts(metrics: &Metrics) -> (u64, u64, u64) {
    metrics.gather();
    (
        metrics
            .grpc_goaway_total
            .with_label_values(&[LISTENER])
            .get(),
        metrics
            .grpc_stream_resets_total
            .with_label_values(&[LISTENER])
            .get(),
        metrics
            .probe_events_dropped_total
            .with_label_values(&[Probe::Http2Frames.as_str()])
            .get(),
    )
}

/// Sends one case's stream from the watched side of a fresh connection;
/// the client reads it all, so nothing waits on a window.
fn send(listener: &TcpListener, case: &Case) -> Result<(), String> {
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut client = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    let (mut server, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    server.set_nodelay(true).map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        client.read_to_end(&mut all).map(|_| all.len())
    });
    for (i, w) in case.writes.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(BETWEEN_WRITES);
        }
        server.write_all(w).map_err(|e| format!("write: {e}"))?;
    }
    server
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let got = reader
        .join()
        .map_err(|_| "the reader panicked".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    let sent: usize = case.writes.iter().map(Vec::len).sum();
    if got != sent {
        return Err(format!("the client read {got} of {sent} bytes"));
    }
    Ok(())
}

/// Runs `http2-frames`.
pub fn run(checks: Option<&[ProbeCheck]>) -> Outcome {
    let up = checks.and_then(|c| c.iter().find(|c| c.probe == Probe::Http2Frames));
    if !up.is_some_and(|c| c.up) {
        return Outcome::Skip("the http2_frames probe is not up on this kernel".into());
    }
    match crafted() {
        Ok(summary) => Outcome::Pass(summary),
        Err(e) => Outcome::Fail(e),
    }
}

fn crafted() -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let _in_runtime = rt.enter();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let metrics = Arc::new(Metrics::new());
    let plugins = Arc::new(RwLock::new(vec!["echo".to_owned()]));
    let (running, errors) = probes::start_reporting(
        &plugvisor::config::ProbesConfig::default(),
        &[WatchedListener {
            name: LISTENER.into(),
            port,
            protocol: Protocol::Grpc,
        }],
        &plugins,
        &metrics,
    );
    let up = metrics
        .probe_up
        .vec()
        .with_label_values(&[Probe::Http2Frames.as_str()])
        .get();
    if up != 1 {
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        return Err(format!(
            "the probe did not come up a second time: {}",
            errors.join("; ")
        ));
    }
    let mut wrong = Vec::new();
    let cases = cases();
    let (mut frames, mut bytes) = (0, 0);
    for case in &cases {
        let before = counts(&metrics);
        send(&listener, case).map_err(|e| format!("{}: {e}", case.name))?;
        // The counters are the kernel's own, bumped as each packet left.
        let after = counts(&metrics);
        let seen = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
        if seen != (case.goaway, case.rst, 0) {
            wrong.push(format!(
                "{}: counted (GOAWAY, RST_STREAM, places lost) {seen:?}, sent ({}, {}, 0)",
                case.name, case.goaway, case.rst
            ));
        }
        frames += case.goaway + case.rst;
        bytes += case.writes.iter().map(Vec::len).sum::<usize>();
    }
    drop(running);
    if wrong.is_empty() {
        Ok(format!(
            "{} crafted streams ({frames} GOAWAY and RST_STREAM frames in {bytes} bytes): each counted once",
            cases.len()
        ))
    } else {
        Err(wrong.join("; "))
    }
}
