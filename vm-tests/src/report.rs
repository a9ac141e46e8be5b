//! The lines the host parses: `vm-test: PASS|FAIL|SKIP <kernel> <test> <reason>`.
use std::io::Write as _;
use std::panic::AssertUnwindSafe;

/// How one test ended, with the reason printed after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It did what it should; the reason says what was seen.
    Pass(String),
    /// It cannot run on this kernel; the reason says why.
    Skip(String),
    /// It ran and was wrong, or could not run where it should have.
    Fail(String),
}

/// Longest reason printed on a result line; the full text goes to the
/// console above it.
const MAX_REASON: usize = 400;

/// Prints results for one kernel and counts them.
pub struct Reporter {
    kernel: String,
    reported: usize,
    failed: usize,
}

impl Reporter {
    /// A reporter for the kernel `uname -r` calls `kernel`.
    pub fn new(kernel: String) -> Reporter {
        Reporter {
            kernel,
            reported: 0,
            failed: 0,
        }
    }

    /// Tests that failed so far.
    pub fn failed(&self) -> usize {
        self.failed
    }

    /// A fact about the kernel, not a test.
    pub fn info(&self, text: &str) {
        line(&format!("vm-test: INFO {} {text}", self.kernel));
    }

    /// Prints the result line of `test`.
    pub fn report(&mut self, test: &str, outcome: &Outcome) {
        let (word, reason) = match outcome {
            Outcome::Pass(r) => ("PASS", r),
            Outcome::Skip(r) => ("SKIP", r),
            Outcome::Fail(r) => ("FAIL", r),
        };
        let short = one_line(reason);
        if short.len() < reason.len() {
            // The whole of a long or multi-line reason (a verifier log) is
            // worth keeping in the console log.
            eprintln!("{test}: {reason}");
        }
        self.reported += 1;
        if matches!(outcome, Outcome::Fail(_)) {
            self.failed += 1;
        }
        line(&format!("vm-test: {word} {} {test} {short}", self.kernel));
    }

    /// Runs `f` as test `test` and reports its outcome; a panic inside it
    /// (the harness's asserts) is a FAIL carrying the panic's message.
    pub fn run(&mut self, test: &str, f: impl FnOnce() -> Outcome) -> Outcome {
        line(&format!("vm-test: BEGIN {} {test}", self.kernel));
        let outcome = match std::panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(o) => o,
            Err(payload) => Outcome::Fail(format!("panicked: {}", panic_message(&*payload))),
        };
        self.report(test, &outcome);
        outcome
    }

    /// The closing line: every test has reported.
    pub fn end(&self) {
        line(&format!("vm-test: END {} {}", self.kernel, self.reported));
    }
}

/// Writes one whole line to stdout at once, so it cannot interleave with
/// another writer's output mid-line on the console.
fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{text}\n").as_bytes());
    let _ = out.flush();
}

/// The reason as one line of at most [`MAX_REASON`] bytes.
fn one_line(reason: &str) -> String {
    let mut s = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.is_empty() {
        s.push('-');
    }
    if s.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" …");
    }
    s
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// `uname -r` of the running kernel.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

/// Facts about this kernel worth a line in every report: architecture,
/// whether it carries BTF (CO-RE needs it; plugvisor's probes read
/// tracepoint offsets from tracefs instead, so they work without).
pub fn kernel_facts() -> String {
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    format!(
        "arch={} btf={} version={:?}",
        std::env::consts::ARCH,
        if btf { "yes" } else { "no" },
        std::fs::read_to_string("/proc/version")
            .unwrap_or_default()
            .trim()
    )
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn reasons_fit_on_one_line() {
        assert_eq!(one_line("a\n  b\tc"), "a b c");
        assert_eq!(one_line(""), "-");
        let long = "x".repeat(1000);
        assert!(one_line(&long).len() < 410);
    }
}
