//! Running commands with errors that say which command failed and how.
use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

/// The workspace root: xtask lives one level below it.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// A command that runs from the workspace root, so `cargo` finds the
/// workspace whatever directory xtask was started from.
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.current_dir(workspace_root());
    c
}

/// `cargo` from `PATH` (the rustup proxy), not the toolchain binary in
/// `$CARGO`: the proxy is what finds `cargo fmt`/`cargo clippy` and honours
/// `+nightly`, exactly as when a person types the command.
pub fn cargo() -> Command {
    cmd("cargo")
}

/// The command line as a person would type it, with the environment
/// variables this command sets in front, for progress lines and errors.
pub fn display(c: &Command) -> String {
    let mut parts = Vec::new();
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            parts.push(format!("{}={}", k.to_string_lossy(), quote(v)));
        }
    }
    parts.push(quote(c.get_program()));
    parts.extend(c.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
        format!("'{}'", s.replace('\'', r"'\''"))
    } else {
        s.into_owned()
    }
}

/// Runs `c` with the terminal as its stdio; fails naming the command and
/// its exit status.
pub fn run(c: &mut Command) -> Result<()> {
    println!("$ {}", display(c));
    let status = c
        .status()
        .with_context(|| format!("could not start `{}`", display(c)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(c));
    }
    Ok(())
}

/// Runs `c` and returns its stdout; on failure the error carries stderr.
/// Quiet: used for probes whose output xtask interprets itself.
pub fn output(c: &mut Command) -> Result<String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", display(c)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(c),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(c)))
}

/// Runs `c`, copying each line of its stdout to ours as it arrives (so a
/// long test run is watchable) and handing it to `on_line`; stderr goes
/// straight to the terminal. Fails like [`run`].
pub fn run_streaming(c: &mut Command, mut on_line: impl FnMut(&str)) -> Result<()> {
    println!("$ {}", display(c));
    let mut child = c
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", display(c)))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut term = std::io::stdout();
    for line in BufReader::new(stdout).lines() {
        let line = line.with_context(|| format!("reading output of `{}`", display(c)))?;
        // A failed write to our own stdout is not a reason to abandon the
        // child; keep reading so it does not block on a full pipe.
        let _ = writeln!(term, "{line}");
        on_line(&line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", display(c)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(c));
    }
    Ok(())
}

/// The cargo target directory (honours `CARGO_TARGET_DIR` and
/// `build.target-dir`, which a hard-coded `target/` would not).
pub fn target_dir() -> Result<PathBuf> {
    let json = output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let meta: serde_json::Value =
        serde_json::from_str(&json).context("parsing `cargo metadata` output")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("`cargo metadata` has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// Finds `program` on `PATH`, like the shell would.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// `Duration` as seconds with one decimal, for step timings.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
