//! The guest's initramfs: the test binary as `/init`, the real `plugvisor`
//! binary, the stamped echo plugin, and the dynamic loader and shared
//! libraries all three need — not static binaries, because plugvisor
//! `dlopen`s its plugins.
//!
//! Written directly in the kernel's `newc` cpio format (a 110-byte ASCII
//! header per entry), uncompressed: under TCG the kernel would spend
//! longer inflating it than qemu spends reading it.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use super::Arch;
use crate::util;

/// Where things go in the guest (the test binary's `guest` module agrees).
pub mod guest {
    /// The test binary, run by the kernel as PID 1.
    pub const INIT: &str = "/init";
    /// The daemon.
    pub const PLUGVISOR: &str = "/bin/plugvisor";
    /// The stamped echo plugin.
    pub const ECHO: &str = "/lib/plugvisor/libplugvisor_echo.so";
}

/// The host files that go into one arch's initramfs.
pub struct Contents<'a> {
    /// `plugvisor-vm-tests`.
    pub init: &'a Path,
    /// `plugvisor`.
    pub plugvisor: &'a Path,
    /// `libplugvisor_echo.so`, stamped.
    pub echo: &'a Path,
}

/// Writes the initramfs for `arch` to `out`; returns its size in bytes.
pub fn write(arch: Arch, contents: &Contents<'_>, out: &Path) -> Result<u64> {
    let tmp = out.with_extension("tmp");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    for dir in ["/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/root"] {
        cpio.dir(dir)?;
    }
    let elves = [
        (guest::INIT, contents.init, 0o755),
        (guest::PLUGVISOR, contents.plugvisor, 0o755),
        (guest::ECHO, contents.echo, 0o755),
    ];
    let mut libs = Libraries::new(arch);
    for (to, from, mode) in elves {
        cpio.file(to, from, mode)?;
        libs.add_needs_of(from)?;
    }
    for (to, from) in libs.resolved {
        cpio.file(&to, &from, 0o755)?;
    }
    let mut w = cpio.finish()?;
    w.flush()
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(w);
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(std::fs::metadata(out)?.len())
}

/// The loader and the shared libraries a set of ELF files needs, found
/// on the host (for arm64, in Debian's cross libc), with the path each
/// gets in the guest.
struct Libraries {
    arch: Arch,
    /// (guest path, host path), deduplicated.
    resolved: BTreeSet<(String, PathBuf)>,
    seen: BTreeSet<String>,
}

impl Libraries {
    fn new(arch: Arch) -> Libraries {
        Libraries {
            arch,
            resolved: BTreeSet::new(),
            seen: BTreeSet::new(),
        }
    }

    /// Adds the interpreter and the `NEEDED` closure of `elf`.
    fn add_needs_of(&mut self, elf: &Path) -> Result<()> {
        let (interp, needed) = read_dynamic(elf)?;
        if let Some(interp) = interp {
            let name = file_name(&interp);
            if self.seen.insert(format!("interp:{interp}")) {
                let host = self.find(&name)?;
                self.resolved.insert((interp, host));
            }
        }
        for lib in needed {
            if !self.seen.insert(lib.clone()) {
                continue;
            }
            let host = self.find(&lib)?;
            self.resolved
                .insert((format!("{}/{lib}", self.arch.guest_lib_dir()), host.clone()));
            self.add_needs_of(&host)?;
        }
        Ok(())
    }

    fn find(&self, name: &str) -> Result<PathBuf> {
        self.arch
            .host_lib_dirs()
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .with_context(|| {
                format!(
                    "{name} ({}) not found in {:?}{}",
                    self.arch.debian(),
                    self.arch.host_lib_dirs(),
                    self.arch.lib_hint()
                )
            })
    }
}

fn file_name(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

/// `PT_INTERP` and the `NEEDED` entries of an ELF file, read with
/// binutils' `readelf` (which reads every architecture's ELF).
fn read_dynamic(elf: &Path) -> Result<(Option<String>, Vec<String>)> {
    let headers = util::output(Command::new("readelf").args(["-lW"]).arg(elf))?;
    let interp = headers.lines().find_map(|l| {
        let rest = l.split("[Requesting program interpreter: ").nth(1)?;
        Some(rest.trim_end_matches(']').trim().to_owned())
    });
    let dynamic = util::output(Command::new("readelf").args(["-dW"]).arg(elf))?;
    Ok((interp, parse_needed(&dynamic)))
}

/// `0x…01 (NEEDED)  Shared library: [libc.so.6]` → `libc.so.6`.
fn parse_needed(readelf_d: &str) -> Vec<String> {
    readelf_d
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let start = l.find('[')? + 1;
            let end = l[start..].find(']')? + start;
            Some(l[start..end].to_owned())
        })
        .collect()
}

/// A `newc` cpio archive writer that creates parent directories itself.
struct Cpio<W: std::io::Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: std::io::Write> Cpio<W> {
    fn new(out: W) -> Cpio<W> {
        Cpio {
            out,
            ino: 0,
            dirs: BTreeSet::new(),
        }
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        let path = path.trim_end_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, 0o040_755, &[])
    }

    fn file(&mut self, path: &str, from: &Path, mode: u32) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        // Follows symlinks: the guest gets the library itself.
        let data = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        self.entry(path, 0o100_000 | mode, &data)
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        // Names in the archive are relative to the root.
        let name = path.trim_start_matches('/');
        self.ino += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        self.header(self.ino, mode, nlink, data.len(), name)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn header(&mut self, ino: u32, mode: u32, nlink: u32, size: usize, name: &str) -> Result<()> {
        let Ok(size) = u32::try_from(size) else {
            bail!("{name} is too large for a cpio entry");
        };
        let namesize = name.len() + 1;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check.
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            0,
            0,
            namesize as u32,
            0,
        ];
        let mut h = String::from("070701");
        for f in fields {
            let _ = write!(h, "{f:08x}");
        }
        self.out.write_all(h.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(h.len() + namesize)
    }

    /// Pads to the next multiple of 4 after `len` bytes.
    fn pad(&mut self, len: usize) -> Result<()> {
        let n = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..n])?;
        Ok(())
    }

    fn finish(mut self) -> Result<W> {
        self.header(0, 0, 1, 0, "TRAILER!!!")?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_needed_entries() {
        let d = " 0x0000000000000001 (NEEDED)             Shared library: [libgcc_s.so.1]\n \
                 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n \
                 0x000000000000000c (INIT)               0x5000\n";
        assert_eq!(parse_needed(d), vec!["libgcc_s.so.1", "libc.so.6"]);
    }

    #[test]
    fn writes_newc_with_parents_and_padding() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("data");
        std::fs::write(&f, b"hello").unwrap();
        let mut c = Cpio::new(Vec::new());
        c.file("/a/b/data", &f, 0o644).unwrap();
        let bytes = c.finish().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // Every entry starts on a 4-byte boundary with the newc magic.
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(
            text.matches("070701").count(),
            4,
            "a, a/b, a/b/data, trailer"
        );
        assert_eq!(bytes.len() % 4, 0);
        let data_at = text.find("a/b/data\0").unwrap() + "a/b/data\0".len();
        let data_at = data_at + (4 - data_at % 4) % 4;
        assert_eq!(&bytes[data_at..data_at + 5], b"hello");
        assert!(text.contains("TRAILER!!!"));
    }
}
