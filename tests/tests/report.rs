//! The coordinator's view (`[report.mqtt]`): Debian's mosquitto on
//! loopback, a real subscriber, and daemons that report to it. Every
//! journal entry arrives as an event with its fields, numbered without a
//! gap; the node's birth and death and each plugin's state are retained;
//! a broker outage, a `kill -9` and the outbox's bound lose nothing but
//! what the bound drops, and say so; a broker that refuses the node's
//! credentials is a clear error while the node serves on.
use std::time::{Duration, Instant};

use plugvisor_tests::report_pb::{self, event::Kind, node::Status};
use plugvisor_tests::{
    Daemon, DaemonOptions, LineClient, Mosquitto, PackageTweaks, Subscriber, build_echo_version,
    install_package, wait_until,
};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

/// `[report.mqtt]` for node `node` on `broker` (`extra`: more keys).
fn report_config(broker: &Mosquitto, node: &str, extra: &str) -> String {
    format!(
        "[report.mqtt]\nbroker = \"{}\"\nclient_id = \"{node}\"\nkeep_alive = \"2s\"\n{extra}",
        broker.url()
    )
}

fn reporting(broker: &Mosquitto, node: &str, extra_config: &str) -> Daemon {
    Daemon::start(DaemonOptions {
        probes: "off",
        trial: "1s",
        extra_config: format!("{extra_config}\n{}", report_config(broker, node, "")),
        ..Default::default()
    })
}

/// The journal word of an event kind (`ACTIVATED` → `activated`).
fn word(kind: Kind) -> String {
    kind.as_str_name().to_ascii_lowercase().replace('_', "-")
}

/// Waits until the subscriber holds, once each after dropping duplicates,
/// one event per journal entry of `d` — numbered 1, 2, … in journal order
/// — and checks every field against the entry. Returns the events.
fn assert_every_entry_arrived(d: &Daemon, sub: &Subscriber) -> Vec<report_pb::Event> {
    let arrived = || sub.unique_events().len() >= d.journal().len();
    wait_until(
        deadline(),
        "every journal entry arrives as an event",
        arrived,
    );
    let journal = d.journal();
    let events = sub.unique_events();
    assert_eq!(
        events.len(),
        journal.len(),
        "one event per journal entry: {events:#?}"
    );
    for (i, (e, j)) in events.iter().zip(&journal).enumerate() {
        let s = |k: &str| j[k].as_str().unwrap_or_default().to_owned();
        assert_eq!(e.sequence, i as u64 + 1, "numbered without a gap: {e:?}");
        assert_eq!(e.schema_version, 1);
        assert_eq!(e.node, "edge-7");
        assert_eq!(word(e.kind()), s("event"), "{e:?} vs {j}");
        assert_eq!(e.plugin, s("plugin"));
        assert_eq!(e.version, s("version"), "{j}");
        assert_eq!(e.from_version, s("from_version"), "{j}");
        assert_eq!(e.reason, s("reason"), "{j}");
        assert_eq!(e.rule, s("rule"), "{j}");
        assert_eq!(e.sha256, s("sha256"), "{j}");
        assert_eq!(e.observed, j["observed"].as_f64(), "{j}");
        assert_eq!(e.threshold, j["threshold"].as_f64(), "{j}");
        assert_eq!(Some(e.timestamp_ms), j["ts_ms"].as_u64());
    }
    events
}

fn journal_words(d: &Daemon) -> Vec<String> {
    d.journal()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

fn report_status(d: &Daemon) -> serde_json::Value {
    d.status()["report"].clone()
}

/// A degrade by a rule (observed value and threshold) and its clear, a
/// refused package, a reload, a manual rollback (2.0.0 quarantined),
/// disable and enable, and a plugin host killed.
fn act_in_every_way(d: &mut Daemon, sub: &Subscriber) {
    let clients: Vec<LineClient> = (0..4)
        .map(|_| LineClient::connect(d.addr("echo-tcp")).unwrap())
        .collect();
    wait_until(deadline(), "degraded", || {
        sub.last_state("echo")
            .is_some_and(|s| !s.degraded.is_empty())
    });
    drop(clients);
    wait_until(deadline(), "the degrade clears", || {
        journal_words(d).contains(&"degrade-cleared".to_owned())
    });
    install_package(
        &d.plugins_dir,
        "echo",
        "1.5.0",
        &build_echo_version("1.5.0"),
        &PackageTweaks {
            sha256: Some("0".repeat(64)),
            ..Default::default()
        },
    );
    wait_until(deadline(), "the bad package is rejected", || {
        journal_words(d).contains(&"rejected".to_owned())
    });
    d.install_and_await(
        "echo",
        "2.0.0",
        &build_echo_version("2.0.0"),
        "2.0.0 serves",
    );
    assert_eq!(d.cli(&["rollback", "echo"]).0, 0);
    assert_eq!(d.cli(&["disable", "echo"]).0, 0);
    assert_eq!(d.cli(&["enable", "echo"]).0, 0);
    let host = d.plugin_hosts()[0];
    // SAFETY: kill on a pid the daemon reports as its plugin host.
    unsafe { libc::kill(host as i32, libc::SIGKILL) };
    wait_until(deadline(), "a new host serves", || {
        journal_words(d).contains(&"host-restarted".to_owned())
    });
}

#[test]
fn every_kind_of_event_arrives_with_its_fields_and_states_and_births_are_retained() {
    let broker = Mosquitto::start(None);
    let sub = Subscriber::start(&broker, "coordinator", "plugvisor/#");
    let rule = "evaluation_interval = \"250ms\"\n[[rule]]\nname = \"too-many-conns\"\nmetric = \"plugvisor_tcp_connections\"\nlabels = { listener = \"echo-*\" }\nop = \">\"\nthreshold = 3\nclear = 1\naction = \"degrade\"\ncooldown = \"0s\"\n";
    // Probes on: the rule reads the kernel's count of connections.
    let mut d = Daemon::start(DaemonOptions {
        trial: "1s",
        thresholds: Some(rule.into()),
        extra_config: format!(
            "[plugin.echo]\nisolation = \"process\"\n{}",
            report_config(&broker, "edge-7", "")
        ),
        ..Default::default()
    });
    // The birth, retained, with the daemon's version.
    wait_until(deadline(), "the node's birth", || {
        sub.last_node()
            .is_some_and(|n| n.status() == Status::Online)
    });
    let birth = sub.last_node().unwrap();
    assert_eq!(birth.node, "edge-7");
    assert!(!birth.daemon_version.is_empty() && birth.birth >= 1);
    wait_until(deadline(), "1.0.0 passes its trial", || {
        sub.last_state("echo")
            .is_some_and(|s| s.state == "known-good" && s.known_good == "1.0.0")
    });

    act_in_every_way(&mut d, &sub);
    let events = assert_every_entry_arrived(&d, &sub);
    let kinds: std::collections::BTreeSet<String> = events.iter().map(|e| word(e.kind())).collect();
    for k in [
        "activated",
        "known-good",
        "degrade",
        "degrade-cleared",
        "rejected",
        "rollback",
        "disable",
        "enable",
        "host-crashed",
        "host-restarted",
    ] {
        assert!(kinds.contains(k), "no {k} event among {kinds:?}");
    }
    let degrade = events.iter().find(|e| e.kind() == Kind::Degrade).unwrap();
    assert_eq!(degrade.rule, "too-many-conns");
    assert_eq!(degrade.threshold, Some(3.0));
    assert!(degrade.observed.unwrap() > 3.0);
    let rollback = events.iter().find(|e| e.kind() == Kind::Rollback).unwrap();
    assert_eq!(
        (rollback.from_version.as_str(), rollback.version.as_str()),
        ("2.0.0", "1.0.0")
    );
    assert!(!rollback.reason.is_empty());
    let rejected = events.iter().find(|e| e.kind() == Kind::Rejected).unwrap();
    assert!(rejected.reason.contains("sha256"), "{rejected:?}");

    // The retained state follows; a consumer connecting now gets it and
    // the birth at once.
    wait_until(deadline(), "the state says 1.0.0, enabled", || {
        sub.last_state("echo")
            .is_some_and(|s| s.version == "1.0.0" && !s.disabled && s.degraded.is_empty())
    });
    let late = Subscriber::start(&broker, "late-comer", "plugvisor/edge-7/#");
    wait_until(deadline(), "retained state and birth", || {
        late.last_state("echo").is_some() && late.last_node().is_some()
    });
    assert!(
        late.messages()
            .iter()
            .all(|m| m.retain && !m.topic.ends_with("/event"))
    );
    let state = late.last_state("echo").unwrap();
    assert_eq!(
        (state.node.as_str(), state.version.as_str()),
        ("edge-7", "1.0.0")
    );
    assert_eq!(state.known_good, "1.0.0");
    assert!(state.event_sequence >= 1);
    let m = d.metrics();
    assert_eq!(m.get("plugvisor_report_connected", &[]), Some(1.0));
    assert_eq!(
        m.get("plugvisor_report_events_total", &[("outcome", "published")]),
        Some(events.len() as f64)
    );
    assert_eq!(m.get("plugvisor_report_outbox_events", &[]), Some(0.0));
    assert_eq!(report_status(&d)["connected"], true);

    // A clean stop: the death, retained, with the same birth number.
    assert_eq!(d.stop(), Some(0));
    let gone = Subscriber::start(&broker, "after-stop", "plugvisor/edge-7/node");
    wait_until(deadline(), "the retained death", || {
        gone.last_node()
            .is_some_and(|n| n.status() == Status::Offline)
    });
    assert_eq!(gone.last_node().unwrap().birth, birth.birth);
}

#[test]
fn a_broker_outage_during_reloads_and_a_rollback_loses_nothing_and_keeps_order() {
    let mut broker = Mosquitto::start(None);
    let sub = Subscriber::start(&broker, "coordinator", "plugvisor/edge-7/event");
    let d = reporting(&broker, "edge-7", "");
    wait_until(deadline(), "the first events", || !sub.events().is_empty());

    broker.stop();
    wait_until(deadline(), "the node sees the link down", || {
        report_status(&d)["connected"] == false
    });
    let versions = plugvisor_tests::echo_version_series(2, 5);
    for (v, lib) in &versions {
        d.install_and_await("echo", v, lib, "a reload while the broker is down");
    }
    let rb = d.cli(&["rollback", "echo", "--to", &versions[3].0]);
    assert_eq!(rb.0, 0, "{rb:?}");
    wait_until(deadline(), "the events wait in the outbox", || {
        report_status(&d)["outbox_events"].as_u64() >= Some(6)
    });
    assert_eq!(
        d.metrics().get("plugvisor_report_connected", &[]),
        Some(0.0)
    );
    // Serving never waited for the broker: the rollback took the last
    // version back to the one before it.
    assert_eq!(d.serving("echo-tcp").as_ref(), Some(&versions[3].0));

    broker.restart();
    sub.await_connected();
    let events = assert_every_entry_arrived(&d, &sub);
    let tail: Vec<(String, String)> = events
        .iter()
        .rev()
        .take(6)
        .rev()
        .map(|e| (word(e.kind()), e.version.clone()))
        .collect();
    let mut expected: Vec<(String, String)> = versions
        .iter()
        .map(|(v, _)| ("activated".to_owned(), v.clone()))
        .collect();
    expected.push(("rollback".to_owned(), versions[3].0.clone()));
    assert_eq!(tail, expected, "in the order they happened");
    wait_until(deadline(), "the outbox empties", || {
        report_status(&d)["outbox_events"] == 0
    });
}

#[test]
fn a_kill_9_with_events_in_the_outbox_loses_none_and_the_will_says_offline() {
    let mut broker = Mosquitto::start(None);
    let sub = Subscriber::start(&broker, "coordinator", "plugvisor/edge-7/#");
    let mut d = reporting(&broker, "edge-7", "");
    wait_until(deadline(), "the birth", || {
        sub.last_node()
            .is_some_and(|n| n.status() == Status::Online)
    });
    let first = sub.last_node().unwrap().birth;

    // Killed with the broker up: the broker publishes the Last Will
    // (keep-alive 2 s), naming the connection that died.
    d.kill9();
    wait_until(deadline(), "the will", || {
        sub.last_node()
            .is_some_and(|n| n.status() == Status::Offline)
    });
    assert_eq!(sub.last_node().unwrap().birth, first);
    d.restart();
    wait_until(deadline(), "born again", || {
        sub.last_node()
            .is_some_and(|n| n.status() == Status::Online && n.birth > first)
    });

    // Events made while the broker is down, then a kill -9: they are on
    // disk, and the next process sends them.
    broker.stop();
    wait_until(deadline(), "the link is down", || {
        report_status(&d)["connected"] == false
    });
    for _ in 0..3 {
        assert_eq!(d.cli(&["disable", "echo"]).0, 0);
        assert_eq!(d.cli(&["enable", "echo"]).0, 0);
    }
    wait_until(deadline(), "six events in the outbox", || {
        d.metrics().get("plugvisor_report_outbox_events", &[]) >= Some(6.0)
    });
    d.kill9();
    broker.restart();
    sub.await_connected();
    d.restart();
    let events = assert_every_entry_arrived(&d, &sub);
    assert!(
        events
            .iter()
            .filter(|e| matches!(e.kind(), Kind::Disable | Kind::Enable))
            .count()
            == 6
    );
}

#[test]
fn past_the_outbox_bound_the_oldest_events_are_dropped_and_counted() {
    let mut broker = Mosquitto::start(None);
    let sub = Subscriber::start(&broker, "coordinator", "plugvisor/edge-7/event");
    broker.stop();
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        extra_config: report_config(&broker, "edge-7", "outbox_max_bytes = 4096\n"),
        ..Default::default()
    });
    for _ in 0..60 {
        assert_eq!(d.cli(&["disable", "echo"]).0, 0);
        assert_eq!(d.cli(&["enable", "echo"]).0, 0);
    }
    let made = d.journal().len() as u64;
    let dropped = || {
        d.metrics()
            .get("plugvisor_report_events_total", &[("outcome", "dropped")])
            .unwrap_or(0.0) as u64
    };
    wait_until(deadline(), "all taken into the outbox", || {
        report_status(&d)["outbox_events"].as_u64().unwrap_or(0) + dropped() == made
    });
    let lost = dropped();
    assert!(lost > 0, "4096 bytes cannot hold {made} events");
    assert_eq!(report_status(&d)["dropped"].as_u64(), Some(lost));
    assert!(d.log_text().contains("the oldest events are dropped"));

    broker.restart();
    sub.await_connected();
    wait_until(deadline(), "what was kept arrives", || {
        sub.unique_events().len() as u64 == made - lost
    });
    let got: Vec<u64> = sub.unique_events().iter().map(|e| e.sequence).collect();
    // The oldest went: what arrives is the newest, without a gap, and the
    // gap before it is the count a consumer can see.
    assert_eq!(got, ((lost + 1)..=made).collect::<Vec<u64>>());
}

#[test]
fn a_broker_that_refuses_the_credentials_is_a_clear_error_and_serving_goes_on() {
    let broker = Mosquitto::start(Some(("edge", "right")));
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("mqtt.credentials");
    std::fs::write(&credentials, "username = \"edge\"\npassword = \"wrong\"\n").unwrap();
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        extra_config: report_config(
            &broker,
            "edge-7",
            &format!("credentials = \"{}\"\n", credentials.display()),
        ),
        ..Default::default()
    });
    wait_until(deadline(), "the refusal is said", || {
        report_status(&d)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused"))
    });
    assert!(
        d.log_text().contains("the broker refused this node"),
        "{}",
        d.log_text()
    );
    assert!(
        !d.log_text().contains("\"wrong\""),
        "no password in the log"
    );
    assert_eq!(
        d.metrics().get("plugvisor_report_connected", &[]),
        Some(0.0)
    );
    let mut c = LineClient::connect(d.addr("echo-tcp")).unwrap();
    assert_eq!(c.call("upper x").unwrap(), "[echo 1.0.0] X");
    // The events wait for a broker that lets the node in.
    assert!(report_status(&d)["outbox_events"].as_u64() >= Some(1));

    // A credentials file that is not one is refused at the start, named.
    std::fs::write(&credentials, "user: edge\n").unwrap();
    let check = plugvisor_tests::plugvisor(&[
        std::ffi::OsStr::new("run"),
        std::ffi::OsStr::new("--check"),
        std::ffi::OsStr::new("--config"),
        d.config.as_os_str(),
    ]);
    assert_ne!(check.code, 0);
    assert!(
        check.stderr.contains(&credentials.display().to_string()),
        "{}",
        check.stderr
    );
}

#[test]
fn an_upgrade_hands_reporting_over_without_a_death_or_a_lost_event() {
    let broker = Mosquitto::start(None);
    let sub = Subscriber::start(&broker, "coordinator", "plugvisor/edge-7/#");
    let mut d = reporting(&broker, "edge-7", "");
    wait_until(deadline(), "the birth", || sub.last_node().is_some());
    let first = sub.last_node().unwrap();
    assert_eq!(d.cli(&["disable", "echo"]).0, 0);
    let (code, answer) = d.upgrade(None, Duration::from_secs(20));
    assert_eq!(code, 0, "{answer}");
    assert_eq!(d.cli(&["enable", "echo"]).0, 0);
    wait_until(deadline(), "the new process's birth", || {
        sub.last_node().is_some_and(|n| n.birth > first.birth)
    });
    assert_every_entry_arrived(&d, &sub);
    // The node never went down: no death between the two births (the old
    // process sent DISCONNECT, so the broker had no Last Will to publish).
    let statuses: Vec<Status> = sub
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/node"))
        .map(|m| {
            use prost::Message as _;
            report_pb::Node::decode(m.payload.as_slice())
                .unwrap()
                .status()
        })
        .collect();
    assert!(
        statuses.iter().all(|s| *s == Status::Online),
        "{statuses:?}"
    );
}

/// The overview dashboard's coordinator-link row and the report alerts,
/// against a real Prometheus scraping a real node whose broker is away
/// and whose outbox overflows (the general dashboard test runs no
/// `[report.mqtt]`): every panel returns data, and the alert for dropped
/// events fires.
#[test]
fn the_report_panels_and_alerts_hold_against_a_real_prometheus() {
    let mut broker = Mosquitto::start(None);
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        extra_config: report_config(&broker, "edge-7", "outbox_max_bytes = 4096\n"),
        ..Default::default()
    });
    wait_until(deadline(), "connected", || {
        report_status(&d)["connected"] == true
    });
    let alerts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/alerts.yml");
    let scrape = std::net::SocketAddr::from(([127, 0, 0, 1], d.metrics_port));
    let mut prom = plugvisor_tests::Prometheus::start(&[scrape], &[alerts]);
    wait_until(deadline(), "Prometheus scrapes the link", || {
        prom.assert_running();
        prom.query("plugvisor_report_connected == 1")
            .is_ok_and(|r| !r.is_empty())
    });
    // Events published, then the broker away and the outbox overflowing.
    assert_eq!(d.cli(&["disable", "echo"]).0, 0);
    assert_eq!(d.cli(&["enable", "echo"]).0, 0);
    wait_until(deadline(), "published", || {
        report_status(&d)["published"].as_u64() >= Some(2)
    });
    broker.stop();
    for _ in 0..60 {
        assert_eq!(d.cli(&["disable", "echo"]).0, 0);
        assert_eq!(d.cli(&["enable", "echo"]).0, 0);
    }
    wait_until(deadline(), "events dropped", || {
        report_status(&d)["dropped"].as_u64() > Some(0)
    });
    let board: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../dashboards/plugvisor-overview.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for p in board["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            if !expr.contains("plugvisor_report_") {
                continue;
            }
            wait_until(
                deadline(),
                &format!("panel {} returns data: {expr}", p["title"]),
                || {
                    !prom
                        .query(&plugvisor_tests::runnable(expr, 60))
                        .unwrap()
                        .is_empty()
                },
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3, "the coordinator-link row's three panels");
    // The link down, as PlugvisorReportDown's expression sees it (its 15 m
    // `for` is promtool's to test).
    wait_until(deadline(), "the link reads down", || {
        !prom
            .query("plugvisor_report_connected == 0")
            .unwrap()
            .is_empty()
    });
    wait_until(deadline(), "PlugvisorReportDropping fires", || {
        let rules = prom.api("/api/v1/rules").unwrap();
        rules["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "PlugvisorReportDropping" && r["state"] == "firing")
    });
}

#[test]
fn over_tls_with_a_client_certificate_the_node_reports_and_a_stranger_ca_is_refused() {
    let pki = plugvisor_tests::TestPki::new();
    let broker = Mosquitto::start_tls(&pki);
    let sub = Subscriber::start(&broker, "coordinator", "plugvisor/edge-7/#");
    let tls = |ca: &std::path::Path| {
        format!(
            "[report.mqtt]\nbroker = \"{}\"\nclient_id = \"edge-7\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            broker.tls_url(),
            ca.display(),
            pki.file("client.pem").display(),
            pki.file("client.key").display()
        )
    };
    let d = Daemon::start(DaemonOptions {
        probes: "off",
        extra_config: tls(&pki.ca()),
        ..Default::default()
    });
    wait_until(deadline(), "the birth over TLS", || {
        sub.last_node()
            .is_some_and(|n| n.status() == Status::Online)
    });
    assert_every_entry_arrived(&d, &sub);

    // A node that trusts another CA does not talk to this broker: a clear
    // error, and it serves on.
    let stranger = plugvisor_tests::TestPki::new();
    let wary = Daemon::start(DaemonOptions {
        probes: "off",
        extra_config: tls(&stranger.ca()).replace("edge-7", "edge-8"),
        ..Default::default()
    });
    wait_until(deadline(), "the broker's certificate is refused", || {
        report_status(&wary)["last_error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("certificate"))
    });
    assert_eq!(report_status(&wary)["connected"], false);
    let mut c = LineClient::connect(wary.addr("echo-tcp")).unwrap();
    assert_eq!(c.call("upper x").unwrap(), "[echo 1.0.0] X");
}
