//! Plugins that load fine and misbehave while serving: a panic in
//! `handle`, and a leak the memory rule must degrade and clear.

use plugvisor_tests::{LineClient, PackageTweaks, build_fixture_as, echo_version, wait_until};

use crate::{Matrix, Row, deadline, rules, write_atomically};

pub(super) const ROWS: &[Row] = &[
    ("plugin panics in handle", |m| {
        // After the thresholds rows: the alert rule that sees it was
        // loaded before four invalid files came and went.
        let lib = build_fixture_as(
            "plugvisor-fixture-panic-handle",
            "fixture_panic_handle",
            "fixture",
            "1.1.0",
        );
        m.install("fixture", "1.1.0", &lib, PackageTweaks::default());
        let addr = m.d.addr("fixture-tcp");
        wait_until(deadline(), "fixture 1.1.0 serves", || {
            LineClient::connect(addr)
                .and_then(|mut c| c.call("v"))
                .is_ok_and(|r| echo_version(&r) == Some("1.1.0"))
        });
        let mut c = LineClient::connect(addr).unwrap();
        assert_eq!(c.call("before").unwrap(), "[fixture 1.1.0] before");
        let resp = c.call("panic").unwrap();
        assert!(
            resp.starts_with("ERR") && resp.contains("panicked"),
            "a panic is answered as an error: {resp}"
        );
        assert_eq!(
            c.call("after").unwrap(),
            "[fixture 1.1.0] after",
            "the same connection serves on"
        );
        let panics = [
            ("plugin", "fixture"),
            ("version", "1.1.0"),
            ("outcome", "panic"),
        ];
        assert_eq!(
            m.d.metrics().get("plugvisor_requests_total", &panics),
            Some(1.0)
        );
        assert_eq!(
            m.d.metrics().get(
                "plugvisor_requests_total",
                &[
                    ("plugin", "fixture"),
                    ("version", "1.1.0"),
                    ("outcome", "error")
                ]
            ),
            Some(0.0),
            "a panic is not counted as a plain error"
        );
        let said: Vec<String> = m.d.log_lines()[m.log_from..]
            .iter()
            .filter(|l| l["level"] == "ERROR" && l["fields"]["plugin"] == "fixture")
            .filter_map(|l| l["fields"]["message"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(said.len(), 1, "{said:#?}");
        assert!(
            said[0].contains("plugin panicked while handling a request")
                && said[0].contains("panic-handle fixture: asked to panic"),
            "{said:?}"
        );
        assert_eq!(m.plugin_status("fixture")["active"], "1.1.0");
        wait_until(deadline(), "the alert rule fires", || {
            m.d.log_lines()[m.log_from..].iter().any(|l| {
                l["fields"]["message"] == "alert" && l["fields"]["rule"] == "fixture-panics"
            })
        });
    }),
    ("plugin leaks memory", |m| {
        let lib = build_fixture_as("plugvisor-fixture-leak", "fixture_leak", "fixture", "1.2.0");
        m.install("fixture", "1.2.0", &lib, PackageTweaks::default());
        let addr = m.d.addr("fixture-tcp");
        wait_until(deadline(), "fixture 1.2.0 serves", || {
            LineClient::connect(addr)
                .and_then(|mut c| c.call("v"))
                .is_ok_and(|r| echo_version(&r) == Some("1.2.0"))
        });
        // The daemon's RSS in-process, the worst of the fixture's hosts
        // in plugin hosts (1.2.0's, once it leaks).
        let rss = |m: &Matrix| m.isolation.memory(&m.d.metrics());
        // The memory rule, re-based on the RSS of now (a panic's backtrace,
        // when RUST_BACKTRACE is set, costs the plugin's std tens of MiB of
        // symbol tables for good), degrades it: the leak's own hook drops
        // what it kept, and the rule clears.
        let base = rss(m);
        m.rules = rules(m.isolation, base);
        write_atomically(&m.d.thresholds_path(), m.rules.as_bytes());
        wait_until(deadline(), "the re-based rules are loaded", || {
            m.d.log_lines()[m.log_from..]
                .iter()
                .any(|l| l["fields"]["message"] == "thresholds loaded")
        });
        let mut c = LineClient::connect(addr).unwrap();
        let mut sent = 0u32;
        let mut peak = base;
        while m
            .d
            .metrics()
            .get("plugvisor_degraded", &[("plugin", "fixture")])
            != Some(1.0)
        {
            assert!(sent < 400, "never degraded after {sent} MiB leaked");
            assert_eq!(
                c.call(&format!("{sent}")).unwrap(),
                format!("[fixture 1.2.0] {sent}")
            );
            sent += 1;
            peak = peak.max(rss(m));
        }
        // Each request kept a written MiB until the hook let go (the rule
        // fires at its next tick, so the last few may not show in a scrape).
        let mib = f64::from(1 << 20);
        assert!(
            peak - base >= 60.0 * mib,
            "RSS grew by {:.0} MiB only after {sent} requests",
            (peak - base) / mib
        );
        // (Read from the log: the rule may clear before status is asked.)
        assert!(
            m.d.log_lines()[m.log_from..].iter().any(|l| {
                l["fields"]["message"] == "degraded"
                    && l["fields"]["plugin"] == "fixture"
                    && l["fields"]["step"] == "hook"
                    && l["fields"]["reason"] == "fixture-rss"
            }),
            "the plugin's own hook shed what it kept"
        );
        wait_until(deadline(), "cleared once memory fell below clear", || {
            m.d.metrics()
                .get("plugvisor_degraded", &[("plugin", "fixture")])
                == Some(0.0)
        });
        assert_eq!(
            m.d.metrics().get(
                "plugvisor_degradations_total",
                &[("plugin", "fixture"), ("reason", "fixture-rss")]
            ),
            Some(1.0)
        );
        let journal = m.d.journal();
        let entry = journal.iter().rfind(|e| e["event"] == "degrade").unwrap();
        assert_eq!(entry["plugin"], "fixture");
        assert_eq!(entry["rule"], "fixture-rss");
        assert!(entry["observed"].as_f64().unwrap() > entry["threshold"].as_f64().unwrap());
        assert!(
            journal[m.journal_from..]
                .iter()
                .any(|e| e["event"] == "degrade-cleared" && e["plugin"] == "fixture"),
            "the clearing is journaled too"
        );
        assert!(
            c.call("still serving")
                .unwrap()
                .starts_with("[fixture 1.2.0]")
        );
    }),
];
