//! The `plugvisor` CLI run offline (no daemon): `keygen`, `pack` and any
//! other verb, with what it printed and how it exited.
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binary;

/// What an offline `plugvisor` command printed.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Panics with both streams unless the command succeeded.
    pub fn assert_ok(&self) {
        assert_eq!(
            self.code, 0,
            "plugvisor failed:\n{}\n{}",
            self.stdout, self.stderr
        );
    }

    /// [`CliOutput::assert_ok`], then the output.
    #[must_use]
    pub fn ok(self) -> CliOutput {
        assert_eq!(
            self.code, 0,
            "plugvisor failed:\n{}\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `plugvisor ARGS` (no daemon, no `--config` added).
pub fn plugvisor(args: &[&std::ffi::OsStr]) -> CliOutput {
    let out = Command::new(binary()).args(args).output().unwrap();
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `plugvisor keygen --out DIR`: returns (secret key, public key) paths.
pub fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    plugvisor(&["keygen".as_ref(), "--out".as_ref(), dir.as_os_str()]).assert_ok();
    (dir.join("plugvisor.key"), dir.join("plugvisor.pub"))
}

/// `plugvisor pack DIR --library LIB [--key KEY] EXTRA…`, which must succeed.
pub fn pack(dir: &Path, lib: &Path, key: Option<&Path>, extra: &[&str]) -> CliOutput {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "pack".as_ref(),
        dir.as_os_str(),
        "--library".as_ref(),
        lib.as_os_str(),
    ];
    if let Some(k) = key {
        args.push("--key".as_ref());
        args.push(k.as_os_str());
    }
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    plugvisor(&args).ok()
}
