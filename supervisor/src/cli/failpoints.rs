//! `plugvisor-failpoints failpoints`: the crash points `FAILPOINTS` can
//! arm (failpoints build only).
use std::process::ExitCode;

/// Prints every crash point's name, one per line.
pub fn run() -> ExitCode {
    for p in crate::failpoints::CrashPoint::ALL {
        println!("{}", p.as_str());
    }
    ExitCode::SUCCESS
}
