//! The thresholds file as an operator's editor — or a broken config
//! management run — may leave it: the parser must never panic, an error
//! must carry a line and column inside the text, and what it accepts must
//! hold the invariants the rules engine relies on (finite thresholds, clear
//! on the non-breaching side, unique names fit for a label).
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use plugvisor::name::valid_name;
use plugvisor::rules::{Op, Thresholds, ThresholdsError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Thresholds::parse(text, Path::new("thresholds.toml")) {
        Err(ThresholdsError::Syntax { line, column, .. }) => {
            assert!(line >= 1 && column >= 1);
            assert!(
                line <= text.lines().count().max(1) + 1,
                "line {line} past the text"
            );
        }
        Err(_) => {}
        Ok(t) => {
            let mut names = HashSet::new();
            for r in &t.rules {
                assert!(
                    valid_name(&r.name) && names.insert(r.name.clone()),
                    "name {:?}",
                    r.name
                );
                assert!(r.threshold.is_finite() && r.clear_at().is_finite());
                match r.op {
                    Op::Gt | Op::Ge => assert!(r.clear_at() <= r.threshold),
                    Op::Lt | Op::Le => assert!(r.clear_at() >= r.threshold),
                    Op::Eq | Op::Ne => {}
                }
            }
        }
    }
});
