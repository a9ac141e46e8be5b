//! Fleet sync (`[sync]`, `docs/FLEET.md`): a release published with
//! `plugvisor repo` → serving on a node that follows the repository
//! through Debian's nginx on loopback, and what the node fetched for it
//! against the package's size; then what a poll that finds nothing new
//! costs.
use std::time::{Duration, Instant};

use plugvisor_tests::{
    Daemon, DaemonOptions, FleetRepo, LineClient, ListenerSpec, Nginx, echo_version,
};

use crate::stats::Dist;

/// The node's poll interval: part of every publish → serving.
pub const INTERVAL_MS: u64 = 100;

/// What the fleet run measured.
pub struct Fleet {
    /// `plugvisor repo publish`, ms (signing and writing the metadata).
    pub publish_ms: Vec<f64>,
    /// The publish command returned → the first answer by the new
    /// version on the node, ms.
    pub to_serving_ms: Vec<f64>,
    /// Bytes the node fetched for each release (metadata and files).
    pub release_bytes: Vec<u64>,
    /// Each release's package size (manifest and library).
    pub package_bytes: Vec<u64>,
    /// Requests and bytes of the polls in `QUIET` with nothing new.
    pub quiet_requests: Vec<String>,
    /// Their bytes.
    pub quiet_bytes: u64,
    /// How long the quiet window was.
    pub quiet: Duration,
}

fn serving(d: &Daemon) -> String {
    LineClient::connect(d.addr("echo-tcp"))
        .ok()
        .and_then(|mut c| c.call("which").ok())
        .and_then(|a| echo_version(&a).map(str::to_owned))
        .unwrap_or_default()
}

fn body_bytes(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum()
}

/// Publishes `releases` echo versions one after another and times each.
pub fn fleet(quick: bool) -> Fleet {
    let releases = if quick { 2 } else { 6 };
    let repo = FleetRepo::init();
    repo.publish(&[]);
    let server = Nginx::start(&repo.path(), None);
    let d = Daemon::start(DaemonOptions {
        listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
        probes: "off",
        extra_config: repo.sync_config(&server, "bench-0", 0, "", &format!("{INTERVAL_MS}ms")),
        ..Default::default()
    });
    let mut f = Fleet {
        publish_ms: Vec::new(),
        to_serving_ms: Vec::new(),
        release_bytes: Vec::new(),
        package_bytes: Vec::new(),
        quiet_requests: Vec::new(),
        quiet_bytes: 0,
        quiet: Duration::from_secs(if quick { 1 } else { 3 }),
    };
    for i in 0..releases {
        let version = format!("3.0.{i}");
        // The build and `add` are the operator's, before the publish.
        f.package_bytes.push(repo.add(&version, &[]));
        let from = server.requests().len();
        let t = Instant::now();
        repo.publish(&[]);
        f.publish_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let published = Instant::now();
        let deadline = published + Duration::from_secs(30);
        while serving(&d) != version {
            assert!(Instant::now() < deadline, "release {version} never served");
            std::thread::sleep(Duration::from_millis(2));
        }
        f.to_serving_ms
            .push(published.elapsed().as_secs_f64() * 1e3);
        // Let the round that committed it end before counting its bytes.
        std::thread::sleep(Duration::from_millis(INTERVAL_MS * 3));
        let lines = server.requests()[from..].to_vec();
        f.release_bytes.push(body_bytes(&lines));
    }
    let from = server.requests().len();
    std::thread::sleep(f.quiet);
    f.quiet_requests = server.requests()[from..].to_vec();
    f.quiet_bytes = body_bytes(&f.quiet_requests);
    f
}

/// The report's section.
pub fn render(md: &mut String, f: &Fleet) {
    use std::fmt::Write as _;
    let to = Dist::of(&f.to_serving_ms);
    let publish = Dist::of(&f.publish_ms);
    let fetched: Vec<f64> = f.release_bytes.iter().map(|b| *b as f64).collect();
    let package: Vec<f64> = f.package_bytes.iter().map(|b| *b as f64).collect();
    let (fetched, package) = (Dist::of(&fetched), Dist::of(&package));
    let polls = f.quiet_requests.len();
    let only_timestamp = f
        .quiet_requests
        .iter()
        .all(|r| r.starts_with("GET /metadata/timestamp.json 200"));
    let _ = writeln!(
        md,
        "\n## Fleet sync: publish → serving\n\n\
         {} echo releases published one after another with `plugvisor repo add` + `publish` to a TUF repository served by nginx on loopback; one node follows it with `[sync] interval = \"{INTERVAL_MS}ms\"` (so up to {INTERVAL_MS} ms of each figure is the wait for the next poll) and probes off ([`FLEET.md`](FLEET.md)).\n\n\
         | measure | p50 | max |\n| --- | --- | --- |\n\
         | `plugvisor repo publish` (sign, write, read back) | {:.0} ms | {:.0} ms |\n\
         | publish returned → first answer by the new version | {:.0} ms | {:.0} ms |\n\
         | bytes the node fetched per release (metadata + files) | {:.0} | {:.0} |\n\
         | the release's package (manifest + library) | {:.0} | {:.0} |\n\n\
         Fetched per release: {:.3}× the package (p50). With nothing new, {} polls in {:.0} s fetched {} bytes in all{}.",
        f.to_serving_ms.len(),
        publish.p50,
        publish.max,
        to.p50,
        to.max,
        fetched.p50,
        fetched.max,
        package.p50,
        package.max,
        fetched.p50 / package.p50.max(1.0),
        polls,
        f.quiet.as_secs_f64(),
        f.quiet_bytes,
        if only_timestamp {
            ", each one `timestamp.json` and nothing else"
        } else {
            " (not only `timestamp.json`: see the access log)"
        }
    );
}
