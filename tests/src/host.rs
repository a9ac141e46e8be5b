//! What the tests need from the machine they run on: the binaries and
//! plugin libraries cargo built, programs on `PATH`, root for eBPF, and
//! free loopback ports.
use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The cargo `target/release` directory holding the binary and plugins.
pub fn target_dir() -> PathBuf {
    if let Ok(d) = std::env::var("PLUGVISOR_TARGET_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release")
}

/// The `plugvisor` binary under test.
pub fn binary() -> PathBuf {
    let p = target_dir().join("plugvisor");
    assert!(
        p.is_file(),
        "{} missing: run `cargo build --release` (cargo xtask test does)",
        p.display()
    );
    p
}

/// The `plugvisor-failpoints` binary: `plugvisor` with the crash points
/// of its `failpoints` feature armable through `FAILPOINTS`.
pub fn failpoints_binary() -> PathBuf {
    let p = target_dir().join("plugvisor-failpoints");
    assert!(
        p.is_file(),
        "{} missing: run `cargo xtask build` (it builds it with `--features failpoints`)",
        p.display()
    );
    p
}

/// A built plugin library in the target directory (`libNAME.so`).
pub fn library(name: &str) -> PathBuf {
    let p = target_dir().join(format!("lib{name}.so"));
    assert!(
        p.is_file(),
        "{} missing: run `cargo build --release --workspace`",
        p.display()
    );
    p
}

/// Whether this process may load eBPF programs. In CI (`CI` set) the
/// probe tests must run, so there a missing privilege is a failure.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: CI runs as root, but this process is not root"
        );
        eprintln!("SKIP {test}: needs root to load eBPF programs");
    }
    root
}

/// A free loopback port (bound, then released), never one this process
/// was given before: the kernel may hand the port it just took back to
/// the next bind, and a daemon given the same port for a listener and
/// for `/metrics` refuses to start (seen once in CI).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(port)
        {
            return port;
        }
    }
}

/// A program on `PATH`, or why not (for a skip or failure message).
pub fn tool(program: &str) -> Result<PathBuf, String> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{program} is not on PATH (cargo xtask setup installs it)"))
}
