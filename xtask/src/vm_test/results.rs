//! Reading `vm-test:` lines and printing the kernel × test matrix.
//!
//! The guest side (`vm-tests/src/report.rs`) prints, per kernel:
//! `vm-test: BEGIN <kernel> <test>` before a test, `vm-test:
//! PASS|FAIL|SKIP <kernel> <test> <reason>` after it, `vm-test: INFO
//! <kernel> …` facts, and `vm-test: END <kernel> <n>` once all `n` tests
//! reported. Lines on a serial console may carry junk in front (firmware
//! escape sequences), so the marker is looked for anywhere in the line.
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

/// The marker every parseable line carries.
const MARKER: &str = "vm-test: ";

/// How a test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Passed.
    Pass,
    /// Failed.
    Fail,
    /// Could not run here, with a reason.
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        })
    }
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A test started.
    Begin {
        /// `uname -r`.
        kernel: String,
        /// Test name.
        test: String,
    },
    /// A test's result.
    Result(TestResult),
    /// A fact about the kernel.
    Info {
        /// `uname -r`.
        kernel: String,
        /// The rest of the line.
        text: String,
    },
    /// All `count` tests reported.
    End {
        /// `uname -r`.
        kernel: String,
        /// Tests reported.
        count: usize,
    },
    /// The guest's init answered a probe boot.
    Ping,
}

/// One test's result on one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// PASS, FAIL or SKIP.
    pub status: Status,
    /// `uname -r` (or what the host knew instead, for a kernel it could
    /// not boot).
    pub kernel: String,
    /// Test name.
    pub test: String,
    /// Why, or what was seen.
    pub reason: String,
}

impl fmt::Display for TestResult {
    /// The guest's own format, so a line can be grepped for across both.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vm-test: {} {} {} {}",
            self.status, self.kernel, self.test, self.reason
        )
    }
}

/// Parses one console line; `None` for anything that is not ours.
pub fn parse(line: &str) -> Option<Line> {
    let at = line.find(MARKER)?;
    let rest = line[at + MARKER.len()..].trim_end_matches(['\r', '\n']);
    let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let mut fields = rest.splitn(3, ' ');
    let kernel = fields.next().unwrap_or_default().to_owned();
    let second = fields.next().unwrap_or_default().to_owned();
    let third = fields.next().unwrap_or_default().to_owned();
    let status = match word {
        "PASS" => Status::Pass,
        "FAIL" => Status::Fail,
        "SKIP" => Status::Skip,
        "BEGIN" if !second.is_empty() => {
            return Some(Line::Begin {
                kernel,
                test: second,
            });
        }
        "INFO" => {
            return Some(Line::Info {
                kernel,
                text: rest.split_once(' ').map_or("", |(_, t)| t).to_owned(),
            });
        }
        "END" => {
            return Some(Line::End {
                kernel,
                count: second.parse().ok()?,
            });
        }
        "PING" => return Some(Line::Ping),
        _ => return None,
    };
    if kernel.is_empty() || second.is_empty() {
        return None;
    }
    Some(Line::Result(TestResult {
        status,
        kernel,
        test: second,
        reason: third,
    }))
}

/// Everything one kernel (a VM or the host) reported.
#[derive(Debug, Clone)]
pub struct Column {
    /// Matrix heading, e.g. `x86_64 6.1`.
    pub name: String,
    /// `uname -r`, once known.
    pub release: String,
    /// Results in the order reported.
    pub results: Vec<TestResult>,
    /// How it ran: accelerator and wall time, or why it did not.
    pub note: String,
}

impl Column {
    /// Counts of (pass, fail, skip).
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |s| self.results.iter().filter(|r| r.status == s).count();
        (n(Status::Pass), n(Status::Fail), n(Status::Skip))
    }
}

/// The matrix: one row per test (in first-seen order), one column per
/// kernel, then every non-PASS result in full, then how each kernel ran.
pub fn matrix(columns: &[Column]) -> String {
    // Rows in the order the fullest column reported them (a VM's `init`
    // comes first there; the host has none), then any others.
    let mut by_size: Vec<&Column> = columns.iter().collect();
    by_size.sort_by_key(|c| std::cmp::Reverse(c.results.len()));
    let mut rows: Vec<&str> = Vec::new();
    for c in by_size {
        for r in &c.results {
            if !rows.contains(&r.test.as_str()) {
                rows.push(&r.test);
            }
        }
    }
    let first = rows.iter().map(|r| r.len()).max().unwrap_or(4).max(4) + 2;
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| c.name.len().max(c.release.len()).max(4) + 2)
        .collect();
    let mut out = String::new();
    let mut row = |cells: Vec<String>| {
        let mut line = format!("{:first$}", cells[0]);
        for (cell, w) in cells[1..].iter().zip(&widths) {
            let _ = write!(line, "{cell:w$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    row(std::iter::once("test".to_owned())
        .chain(columns.iter().map(|c| c.name.clone()))
        .collect());
    row(std::iter::once(String::new())
        .chain(columns.iter().map(|c| c.release.clone()))
        .collect());
    for test in &rows {
        let mut cells = vec![(*test).to_owned()];
        for c in columns {
            let cell = c
                .results
                .iter()
                .find(|r| r.test == *test)
                .map_or_else(|| "-".to_owned(), |r| r.status.to_string());
            cells.push(cell);
        }
        row(cells);
    }
    let mut by_status: BTreeMap<u8, Vec<&TestResult>> = BTreeMap::new();
    for r in columns.iter().flat_map(|c| &c.results) {
        match r.status {
            Status::Fail => by_status.entry(0).or_default().push(r),
            Status::Skip => by_status.entry(1).or_default().push(r),
            Status::Pass => {}
        }
    }
    if !by_status.is_empty() {
        out.push_str("\nnot passed:\n");
        for r in by_status.values().flatten() {
            let _ = writeln!(out, "{r}");
        }
    }
    out.push_str("\nruns:\n");
    for c in columns {
        let (p, f, s) = c.counts();
        let _ = writeln!(
            out,
            "  {}: {p} passed, {f} failed, {s} skipped — {}",
            c.name, c.note
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guest_lines() {
        assert_eq!(
            parse("\u{1b}[2Jvm-test: PASS 6.1.0-56-amd64 probe/tcp_resets loaded and attached\r"),
            Some(Line::Result(TestResult {
                status: Status::Pass,
                kernel: "6.1.0-56-amd64".into(),
                test: "probe/tcp_resets".into(),
                reason: "loaded and attached".into(),
            }))
        );
        assert_eq!(
            parse("vm-test: SKIP 5.10 probe/service_gap kernel lacks it: no tracepoint sock/x"),
            Some(Line::Result(TestResult {
                status: Status::Skip,
                kernel: "5.10".into(),
                test: "probe/service_gap".into(),
                reason: "kernel lacks it: no tracepoint sock/x".into(),
            }))
        );
        assert_eq!(
            parse("vm-test: BEGIN 6.12 hot-swap"),
            Some(Line::Begin {
                kernel: "6.12".into(),
                test: "hot-swap".into()
            })
        );
        assert_eq!(
            parse("vm-test: END 6.12 12"),
            Some(Line::End {
                kernel: "6.12".into(),
                count: 12
            })
        );
        assert_eq!(parse("vm-test: PING 6.12"), Some(Line::Ping));
        assert_eq!(parse("[    1.2] random: crng init done"), None);
        assert_eq!(parse("vm-test: PASS 6.12"), None);
    }

    #[test]
    fn a_result_prints_as_the_guest_prints_it() {
        let line = "vm-test: FAIL host hot-swap client 1 broke: frame 3: reset";
        let Some(Line::Result(r)) = parse(line) else {
            panic!("not parsed");
        };
        assert_eq!(r.to_string(), line);
    }

    #[test]
    fn the_matrix_has_a_cell_per_kernel_and_test() {
        let result = |status, test: &str| TestResult {
            status,
            kernel: "k".into(),
            test: test.into(),
            reason: "why".into(),
        };
        let columns = vec![
            Column {
                name: "host".into(),
                release: "6.18".into(),
                results: vec![result(Status::Pass, "probe/a")],
                note: "ran".into(),
            },
            Column {
                name: "x86_64 6.1".into(),
                release: "6.1.0-56-amd64".into(),
                results: vec![
                    result(Status::Pass, "init"),
                    result(Status::Skip, "probe/a"),
                ],
                note: "tcg".into(),
            },
        ];
        let m = matrix(&columns);
        assert!(m.contains("probe/a  PASS"), "{m}");
        assert!(m.contains("init     -"), "{m}");
        assert!(m.contains("vm-test: SKIP k probe/a why"), "{m}");
        assert!(
            m.contains("x86_64 6.1: 1 passed, 0 failed, 1 skipped — tcg"),
            "{m}"
        );
    }
}
