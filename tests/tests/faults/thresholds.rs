//! Thresholds files the daemon must refuse while the rules in force stay:
//! malformed, half-written in place, too large, nested too deep.

use crate::{Row, write_atomically};

pub(super) const ROWS: &[Row] = &[
    ("thresholds file malformed", |m| {
        // A closing quote lost: the line and column of the damage are named.
        let line = m
            .rules
            .lines()
            .position(|l| l == "name = \"fixture-panics\"")
            .unwrap()
            + 1;
        let bad = m
            .rules
            .replace("name = \"fixture-panics\"", "name = \"fixture-panics");
        write_atomically(&m.d.thresholds_path(), bad.as_bytes());
        m.thresholds_refused(&[&format!("thresholds.toml:{line}:")]);
    }),
    ("thresholds file half-written in place", |m| {
        let half = &m.rules[..m
            .rules
            .find("metric = \"plugvisor_requests_total\"")
            .unwrap()];
        std::fs::write(m.d.thresholds_path(), half).unwrap();
        m.thresholds_refused(&["thresholds.toml", "missing field `metric`"]);
    }),
    ("thresholds file of 2 MiB", |m| {
        let mut huge = m.rules.clone();
        while huge.len() < 2 << 20 {
            huge.push_str("# padding padding padding padding padding padding padding\n");
        }
        write_atomically(&m.d.thresholds_path(), huge.as_bytes());
        m.thresholds_refused(&["more than the 1048576 allowed"]);
    }),
    ("thresholds file nested 500 000 deep", |m| {
        let nested = format!("x = {}\n", "[".repeat(500_000));
        write_atomically(&m.d.thresholds_path(), nested.as_bytes());
        m.thresholds_refused(&["thresholds.toml:1:", "recursion limit exceeded"]);
    }),
];
