//! `dlopen` of a staged object, the descriptor checks, `init`, and the
//! safe wrapper every request goes through.
//!
//! Order matters: the ABI version is read (it is the first field at offset
//! 0 in every ABI) before anything else in the descriptor is trusted, and
//! name and version are compared with the manifest before any entry point
//! is called — a library that claims to be something else never runs.
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use plugvisor_sdk::{ABI_VERSION, DESCRIPTOR_SYMBOL, PluginDescriptor, PvBuf, status};
use semver::Version;

/// Why a library was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `dlopen` refused the file (not an ELF object, truncated, missing deps…).
    #[error("plugin {plugin:?}: cannot load {path}: {message}")]
    Open {
        /// The plugin.
        plugin: String,
        /// The object.
        path: PathBuf,
        /// The dynamic loader's message.
        message: String,
    },
    /// The library has no `plugvisor_plugin` descriptor.
    #[error(
        "plugin {plugin:?}: {path} exports no `{DESCRIPTOR_SYMBOL}` descriptor; not a plugvisor plugin"
    )]
    NoDescriptor {
        /// The plugin.
        plugin: String,
        /// The object.
        path: PathBuf,
    },
    /// The descriptor's ABI differs from the host's, or from the manifest's `abi`.
    #[error(
        "plugin {plugin:?}: {path} implements plugin ABI {found}, this plugvisor speaks ABI {expected}"
    )]
    AbiMismatch {
        /// The plugin.
        plugin: String,
        /// The object.
        path: PathBuf,
        /// What the host (and manifest) expect.
        expected: u32,
        /// What the library says.
        found: u32,
    },
    /// The manifest declares an ABI this host does not speak.
    #[error(
        "plugin {plugin:?}: the manifest declares plugin ABI {declared}, this plugvisor speaks ABI {expected}"
    )]
    ManifestAbi {
        /// The plugin.
        plugin: String,
        /// The object.
        path: PathBuf,
        /// The manifest's `abi`.
        declared: u32,
        /// The host's ABI.
        expected: u32,
    },
    /// Descriptor name or version differ from the manifest.
    #[error(
        "plugin {plugin:?}: {path} says it is {found_name} {found_version}, the manifest says {plugin} {expected_version}"
    )]
    IdentityMismatch {
        /// The plugin (manifest name).
        plugin: String,
        /// The object.
        path: PathBuf,
        /// Manifest version.
        expected_version: String,
        /// Descriptor name.
        found_name: String,
        /// Descriptor version.
        found_version: String,
    },
    /// The plugin's `init` returned an error or panicked.
    #[error("plugin {plugin:?} {version}: init failed: {message}")]
    InitFailed {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// The plugin's message.
        message: String,
    },
}

impl LoadError {
    /// Whether the package itself is bad (`rejected`), as opposed to a
    /// well-formed package that failed to start (`failed`).
    pub fn is_rejection(&self) -> bool {
        !matches!(self, LoadError::InitFailed { .. })
    }
}

/// Why one request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandleError {
    /// The plugin returned an error.
    #[error("plugin error: {0}")]
    Plugin(String),
    /// The plugin panicked; the SDK caught it at the boundary.
    #[error("plugin panicked: {0}")]
    Panic(String),
}

/// What a library's descriptor says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// ABI version.
    pub abi: u32,
    /// Name.
    pub name: String,
    /// Version string as the library has it.
    pub version: String,
}

/// How long each step of a load took.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTimings {
    /// `dlopen` plus descriptor checks.
    pub load: Duration,
    /// The plugin's `init`.
    pub init: Duration,
}

/// A loaded, initialised plugin version.
pub struct LoadedVersion {
    plugin: String,
    version: Version,
    sha256: String,
    object: PathBuf,
    descriptor: *const PluginDescriptor,
    instance: *mut c_void,
    // Dropped after `shutdown` ran (see Drop); keeps the code mapped while
    // any Arc to this version is alive.
    library: Option<Library>,
}

// SAFETY: the SDK contract makes `handle` callable concurrently (the
// instance is `Sync`); the descriptor is immutable static data of a library
// we keep mapped for as long as this value lives.
unsafe impl Send for LoadedVersion {}
// SAFETY: see above.
unsafe impl Sync for LoadedVersion {}

impl std::fmt::Debug for LoadedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedVersion")
            .field("plugin", &self.plugin)
            .field("version", &self.version.to_string())
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// Checks, from its headers alone, that `path` is a shared object for this
/// machine whose loadable segments lie inside the file.
///
/// `dlopen` maps segments straight from the file: a truncated library maps
/// pages past its end and the first touch during relocation is a SIGBUS
/// that takes the whole daemon down. A few hundred bytes of header reads
/// rule that out before the dynamic loader ever sees the file.
fn check_elf(path: &Path) -> Result<(), String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    #[cfg(target_arch = "x86_64")]
    const MACHINE: u16 = 62;
    #[cfg(target_arch = "aarch64")]
    const MACHINE: u16 = 183;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    let mut h = [0u8; EHDR];
    f.read_exact(&mut h)
        .map_err(|_| format!("not an ELF object ({size} bytes)"))?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    if &h[..4] != b"\x7fELF" {
        return Err("not an ELF object (bad magic)".into());
    }
    if h[4] != 2 || h[5] != 1 {
        return Err("not a 64-bit little-endian ELF object".into());
    }
    if u16_at(&h, 16) != 3 {
        return Err(format!(
            "ELF type {} is not a shared object",
            u16_at(&h, 16)
        ));
    }
    if u16_at(&h, 18) != MACHINE {
        return Err(format!(
            "ELF machine {} is not this machine's ({MACHINE})",
            u16_at(&h, 18)
        ));
    }
    let phoff = u64_at(&h, 32);
    let phentsize = usize::from(u16_at(&h, 54));
    let phnum = usize::from(u16_at(&h, 56));
    if phentsize != PHDR || phnum == 0 {
        return Err("ELF program headers are malformed".into());
    }
    let ph_end = phoff
        .checked_add((phnum * PHDR) as u64)
        .filter(|&e| e <= size);
    if ph_end.is_none() {
        return Err(format!(
            "truncated: program headers end past the file's {size} bytes"
        ));
    }
    let mut ph = vec![0u8; phnum * PHDR];
    f.seek(SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut ph))
        .map_err(|e| e.to_string())?;
    let (mut loads, mut dynamic) = (0, 0);
    for p in ph.chunks_exact(PHDR) {
        let kind = u32_at(p, 0);
        if kind != PT_LOAD && kind != PT_DYNAMIC {
            continue;
        }
        let (offset, filesz) = (u64_at(p, 8), u64_at(p, 32));
        if offset.checked_add(filesz).is_none_or(|end| end > size) {
            return Err(format!(
                "truncated: a segment spans bytes {offset}..{} of a {size}-byte file",
                offset.saturating_add(filesz)
            ));
        }
        if kind == PT_LOAD {
            loads += 1;
        } else {
            dynamic += 1;
        }
    }
    if loads == 0 || dynamic == 0 {
        return Err("ELF object has no loadable or dynamic segment".into());
    }
    Ok(())
}

fn open(
    plugin: &str,
    path: &Path,
) -> Result<(Library, *const PluginDescriptor, Identity), LoadError> {
    check_elf(path).map_err(|message| LoadError::Open {
        plugin: plugin.to_owned(),
        path: path.to_owned(),
        message,
    })?;
    // RTLD_NOW: an unresolved symbol fails here, not in the middle of a
    // request. RTLD_LOCAL: versions never see each other's symbols.
    // SAFETY: running a library's constructors is inherent to loading it;
    // the package passed checksum verification before we got here.
    let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
        LoadError::Open {
            plugin: plugin.to_owned(),
            path: path.to_owned(),
            message: e.to_string(),
        }
    })?;
    // SAFETY: we only take the symbol's address; its layout is checked below.
    let descriptor: *const PluginDescriptor =
        match unsafe { library.get::<*const PluginDescriptor>(DESCRIPTOR_SYMBOL.as_bytes()) } {
            Ok(sym) => sym.into_raw().cast(),
            Err(_) => {
                return Err(LoadError::NoDescriptor {
                    plugin: plugin.to_owned(),
                    path: path.to_owned(),
                });
            }
        };
    if descriptor.is_null() {
        return Err(LoadError::NoDescriptor {
            plugin: plugin.to_owned(),
            path: path.to_owned(),
        });
    }
    // SAFETY: offset 0 holds a u32 ABI version in every ABI; nothing else is read yet.
    let abi = unsafe { descriptor.cast::<u32>().read() };
    if abi != ABI_VERSION {
        return Err(LoadError::AbiMismatch {
            plugin: plugin.to_owned(),
            path: path.to_owned(),
            expected: ABI_VERSION,
            found: abi,
        });
    }
    // SAFETY: ABI matches, so the descriptor has this layout.
    let d = unsafe { &*descriptor };
    if (d.descriptor_size as usize) < size_of::<PluginDescriptor>() {
        return Err(LoadError::AbiMismatch {
            plugin: plugin.to_owned(),
            path: path.to_owned(),
            expected: ABI_VERSION,
            found: abi,
        });
    }
    // SAFETY: the strings are static data in the library.
    let name = String::from_utf8_lossy(unsafe { d.name.as_bytes() }).into_owned();
    // SAFETY: as above.
    let version = String::from_utf8_lossy(unsafe { d.version.as_bytes() }).into_owned();
    Ok((library, descriptor, Identity { abi, name, version }))
}

/// Reads a library's identity without initialising it (used to package
/// the bundled plugin).
pub fn inspect(path: &Path) -> Result<Identity, LoadError> {
    open("<inspect>", path).map(|(_, _, id)| id)
}

/// Loads `object` for `plugin`, checks it against the manifest's `version`
/// and `abi`, and runs `init`.
pub fn load(
    plugin: &str,
    version: &Version,
    abi: u32,
    sha256: &str,
    object: &Path,
) -> Result<(LoadedVersion, LoadTimings), LoadError> {
    let t0 = Instant::now();
    if abi != ABI_VERSION {
        return Err(LoadError::ManifestAbi {
            plugin: plugin.to_owned(),
            path: object.to_owned(),
            declared: abi,
            expected: ABI_VERSION,
        });
    }
    let (library, descriptor, id) = open(plugin, object)?;
    if id.name != plugin || Version::parse(&id.version).ok().as_ref() != Some(version) {
        return Err(LoadError::IdentityMismatch {
            plugin: plugin.to_owned(),
            path: object.to_owned(),
            expected_version: version.to_string(),
            found_name: id.name,
            found_version: id.version,
        });
    }
    let load = t0.elapsed();
    let t1 = Instant::now();
    // SAFETY: descriptor validated above.
    let d = unsafe { &*descriptor };
    let mut instance: *mut c_void = std::ptr::null_mut();
    let mut err = PvBuf::EMPTY;
    // SAFETY: valid out-pointers; ABI checked.
    let st = unsafe { (d.init)(&raw mut instance, &raw mut err) };
    let init = t1.elapsed();
    if st != status::OK {
        // SAFETY: err was filled by this plugin (or is empty).
        let message = unsafe { take_buf(d, err) };
        let message = String::from_utf8_lossy(&message).into_owned();
        return Err(LoadError::InitFailed {
            plugin: plugin.to_owned(),
            version: version.to_string(),
            message: if message.is_empty() {
                format!("status {st}")
            } else {
                message
            },
        });
    }
    Ok((
        LoadedVersion {
            plugin: plugin.to_owned(),
            version: version.clone(),
            sha256: sha256.to_owned(),
            object: object.to_owned(),
            descriptor,
            instance,
            library: Some(library),
        },
        LoadTimings { load, init },
    ))
}

/// Copies a plugin-owned buffer out and gives it back to the plugin.
///
/// # Safety
/// `buf` was produced by the plugin behind `d` (or is empty).
unsafe fn take_buf(d: &PluginDescriptor, buf: PvBuf) -> Vec<u8> {
    if buf.ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: the plugin handed us ptr/len.
    let out = unsafe { std::slice::from_raw_parts(buf.ptr, buf.len) }.to_vec();
    // SAFETY: returned to its own allocator.
    unsafe { (d.free)(buf) };
    out
}

impl LoadedVersion {
    /// Plugin name.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// Version.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// sha256 of the object.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Path of the object in the store.
    pub fn object(&self) -> &Path {
        &self.object
    }

    fn descriptor(&self) -> &PluginDescriptor {
        // SAFETY: the library stays mapped while self lives.
        unsafe { &*self.descriptor }
    }

    /// Handles one request.
    pub fn handle(&self, request: &[u8]) -> Result<Vec<u8>, HandleError> {
        let d = self.descriptor();
        let mut out = PvBuf::EMPTY;
        // SAFETY: instance from init; request is a valid slice; out is writable.
        let st =
            unsafe { (d.handle)(self.instance, request.as_ptr(), request.len(), &raw mut out) };
        // SAFETY: out was filled by this plugin.
        let bytes = unsafe { take_buf(d, out) };
        match st {
            status::OK => Ok(bytes),
            status::PANIC => Err(HandleError::Panic(
                String::from_utf8_lossy(&bytes).into_owned(),
            )),
            other => {
                let msg = String::from_utf8_lossy(&bytes).into_owned();
                Err(HandleError::Plugin(if msg.is_empty() {
                    format!("status {other}")
                } else {
                    msg
                }))
            }
        }
    }

    /// The plugin's own health verdict (`true` if it has no health hook).
    pub fn healthy(&self) -> bool {
        let d = self.descriptor();
        // SAFETY: instance from init.
        d.health
            .is_none_or(|h| unsafe { h(self.instance) } == status::OK)
    }

    /// Calls the plugin's degrade hook. `None` if it has none or does not support it.
    pub fn degrade(&self, level: u32) -> Option<bool> {
        let d = self.descriptor();
        let hook = d.degrade?;
        // SAFETY: instance from init.
        match unsafe { hook(self.instance, level) } {
            status::UNSUPPORTED => None,
            st => Some(st == status::OK),
        }
    }
}

impl Drop for LoadedVersion {
    fn drop(&mut self) {
        // Last Arc gone: no request runs on this version any more.
        let d = self.descriptor();
        // SAFETY: instance from init; this is the last use.
        unsafe { (d.shutdown)(self.instance) };
        // dlclose: glibc keeps the image mapped if the library registered
        // TLS destructors that have not run yet, so this is safe for Rust
        // plugins; for others it returns the memory.
        drop(self.library.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn elf_check_refuses_what_dlopen_would_choke_on() {
        let t = tempfile::tempdir().unwrap();
        let empty = write(t.path(), "empty.so", b"");
        assert!(check_elf(&empty).unwrap_err().contains("not an ELF"));
        let script = write(
            t.path(),
            "script.so",
            b"#!/bin/sh\necho hi\n and some more bytes to pass 64 .......................",
        );
        assert!(check_elf(&script).unwrap_err().contains("bad magic"));
        // A real shared object passes; the same object cut short does not.
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
        ]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect("libc");
        check_elf(libc).unwrap();
        let bytes = std::fs::read(libc).unwrap();
        let cut = write(t.path(), "cut.so", &bytes[..bytes.len() / 2]);
        assert!(
            check_elf(&cut).unwrap_err().contains("truncated"),
            "{:?}",
            check_elf(&cut)
        );
        let mut other_machine = bytes[..4096].to_vec();
        other_machine[18] = 0x28; // EM_ARM
        let arm = write(t.path(), "arm.so", &other_machine);
        assert!(check_elf(&arm).unwrap_err().contains("machine"));
    }
}
