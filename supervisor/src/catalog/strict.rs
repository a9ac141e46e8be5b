//! Who may write what plugvisor loads, checked as sshd's `StrictModes`
//! checks `~/.ssh`: a directory or file on the way to code that runs in the
//! daemon must not be writable by group or others, and must be owned by
//! the daemon's user or by root. Otherwise anyone with that write access
//! could swap in a library (or, without signatures, a whole package) and
//! have it run with the daemon's privileges.
//!
//! Checked: `plugins_dir`, each package directory, `plugin.toml`,
//! `plugin.toml.sig` and the library (after symlinks are resolved). The
//! parents of `plugins_dir` are not walked — `/tmp` is world-writable with
//! the sticky bit and holds the tests' packages; an operator who puts
//! `plugins_dir` under a directory others can rename is warned by nothing
//! here, as with sshd for directories above the home.
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Why a path is not safe to load from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsafe permissions on {what} {path}: {reason}")]
pub struct UnsafePath {
    /// What the path is (`plugins_dir`, `package directory`, `library`, …).
    pub what: &'static str,
    /// The path.
    pub path: PathBuf,
    /// Why, with the fix.
    pub reason: String,
}

/// The daemon's effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks already-read metadata of `path`.
pub fn check_metadata(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), UnsafePath> {
    check_mode_owner(what, path, meta.mode(), meta.uid(), euid())
}

/// Checks `path` (following symlinks).
pub fn check_path(what: &'static str, path: &Path) -> Result<(), UnsafePath> {
    let meta = std::fs::metadata(path).map_err(|e| UnsafePath {
        what,
        path: path.to_owned(),
        reason: format!("cannot stat it: {e}"),
    })?;
    check_metadata(what, path, &meta)
}

fn check_mode_owner(
    what: &'static str,
    path: &Path,
    mode: u32,
    uid: u32,
    own: u32,
) -> Result<(), UnsafePath> {
    let unsafe_path = |reason: String| UnsafePath {
        what,
        path: path.to_owned(),
        reason,
    };
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "group and others",
            (true, false) => "its group",
            _ => "others",
        };
        return Err(unsafe_path(format!(
            "writable by {who} (mode {:04o}); run `chmod go-w {}`",
            mode & 0o7777,
            path.display()
        )));
    }
    if uid != 0 && uid != own {
        return Err(unsafe_path(format!(
            "owned by uid {uid}, neither root nor the daemon's user (uid {own}); run `chown {own} {}`",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_owners() {
        let p = Path::new("/x");
        assert!(check_mode_owner("library", p, 0o100_644, 0, 1000).is_ok());
        assert!(check_mode_owner("library", p, 0o100_755, 1000, 1000).is_ok());
        assert!(check_mode_owner("dir", p, 0o040_700, 1000, 1000).is_ok());
        let e = check_mode_owner("library", p, 0o100_666, 0, 0).unwrap_err();
        assert!(e.to_string().contains("group and others"), "{e}");
        assert!(e.to_string().contains("0666"), "{e}");
        let e = check_mode_owner("dir", p, 0o040_775, 0, 0).unwrap_err();
        assert!(e.to_string().contains("its group"), "{e}");
        let e = check_mode_owner("dir", p, 0o041_777, 0, 0).unwrap_err();
        assert!(e.to_string().contains("1777"), "sticky bit shown: {e}");
        let e = check_mode_owner("library", p, 0o100_644, 65534, 1000).unwrap_err();
        assert!(e.to_string().contains("uid 65534"), "{e}");
    }

    #[test]
    fn real_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("lib.so");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_path("library", &f).is_ok());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o646)).unwrap();
        assert!(check_path("library", &f).is_err());
        assert!(check_path("library", &t.path().join("missing")).is_err());
    }
}
