//! `dlopen` of a staged object, the descriptor checks, `init`, and the
//! safe wrapper every request goes through.
//!
//! Order matters: the ABI version is read (it is the first field at offset
//! 0 in every ABI) before anything else in the descriptor is trusted, and
//! name and version are compared with the manifest before any entry point
//! is called — a library that claims to be something else never runs.
//!
//! `init` runs on a thread of its own, bounded by `[reload] init_timeout`.
//! A thread that overruns cannot be killed (there is no safe way to stop a
//! thread inside foreign code), so it is abandoned: the load is refused,
//! and the library is leaked — never `dlclose`d — because unmapping code
//! that a thread is still executing would crash the whole process. At most
//! [`MAX_STUCK_INITS`] such threads may exist per plugin ([`StuckCalls`]);
//! beyond that further loads of the plugin are refused before `dlopen`.
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use plugvisor_sdk::{ABI_VERSION, DESCRIPTOR_SYMBOL, PluginDescriptor, PvBuf, status};
use prometheus::IntGauge;
use semver::Version;

/// Abandoned `init` calls (still running past `init_timeout`) allowed per
/// plugin before further loads of that plugin are refused. Each one holds
/// a thread and a library mapping for as long as it runs.
pub const MAX_STUCK_INITS: usize = 2;

/// Why a library was not loaded. Serializable: a plugin host sends it to
/// the daemon when its load fails.
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
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
    /// The plugin's `init` did not return within `[reload] init_timeout`.
    #[error(
        "plugin {plugin:?} {version}: init did not return within {timeout:?} ([reload] init_timeout); its thread is abandoned and the library stays mapped until plugvisor restarts"
    )]
    InitTimeout {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// The bound it overran.
        timeout: Duration,
    },
    /// Too many earlier `init` calls of this plugin are still stuck.
    #[error(
        "plugin {plugin:?} {version}: not loaded: {stuck} earlier init calls of this plugin are still running past their timeout (at most {limit}); publish a fixed version and restart plugvisor to reclaim them"
    )]
    TooManyStuckInits {
        /// The plugin.
        plugin: String,
        /// The version that was not loaded.
        version: String,
        /// Stuck init calls now.
        stuck: usize,
        /// [`MAX_STUCK_INITS`].
        limit: usize,
    },
    /// The plugin host process could not be started or spoke out of turn.
    #[error("plugin {plugin:?} {version}: its plugin host did not start: {message}")]
    HostFailed {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// What went wrong.
        message: String,
    },
    /// The plugin host died while it loaded the library or ran `init`.
    #[error(
        "plugin {plugin:?} {version}: its plugin host died during load or init ({cause}); the daemon and the serving version are unaffected"
    )]
    HostDied {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// How the host ended (signal or exit status).
        cause: String,
    },
    /// `init` overran `[reload] init_timeout` in a plugin host, which was killed.
    #[error(
        "plugin {plugin:?} {version}: init did not return within {timeout:?} ([reload] init_timeout); its plugin host was killed, nothing stays behind"
    )]
    InitKilled {
        /// The plugin.
        plugin: String,
        /// The version.
        version: String,
        /// The bound it overran.
        timeout: Duration,
    },
}

impl LoadError {
    /// Whether the package itself is bad (`rejected`), as opposed to a
    /// well-formed package that failed to start (`failed`).
    pub fn is_rejection(&self) -> bool {
        !matches!(
            self,
            LoadError::InitFailed { .. }
                | LoadError::InitTimeout { .. }
                | LoadError::TooManyStuckInits { .. }
                | LoadError::HostFailed { .. }
                | LoadError::HostDied { .. }
                | LoadError::InitKilled { .. }
        )
    }

    /// The same error naming `object` as the file. A plugin host opens the
    /// library through a descriptor it inherited, whose name
    /// (`/proc/self/fd/4`) tells an operator nothing; the daemon names the
    /// store's object, as the in-process load does.
    #[must_use]
    pub fn naming(mut self, object: &Path) -> LoadError {
        match &mut self {
            LoadError::Open { path, .. }
            | LoadError::NoDescriptor { path, .. }
            | LoadError::AbiMismatch { path, .. }
            | LoadError::ManifestAbi { path, .. }
            | LoadError::IdentityMismatch { path, .. } => object.clone_into(path),
            LoadError::InitFailed { .. }
            | LoadError::InitTimeout { .. }
            | LoadError::TooManyStuckInits { .. }
            | LoadError::HostFailed { .. }
            | LoadError::HostDied { .. }
            | LoadError::InitKilled { .. } => {}
        }
        self
    }
}

/// Calls into one plugin that overran their timeout and still run on a
/// thread plugvisor gave up on, bounded by a limit and mirrored in a gauge
/// (`plugvisor_plugin_calls_stuck{plugin,call}`).
#[derive(Debug)]
pub struct StuckCalls {
    count: AtomicUsize,
    limit: usize,
    gauge: IntGauge,
}

impl StuckCalls {
    /// None stuck yet; at most `limit`.
    pub fn new(limit: usize, gauge: IntGauge) -> StuckCalls {
        gauge.set(0);
        StuckCalls {
            count: AtomicUsize::new(0),
            limit,
            gauge,
        }
    }

    /// Calls stuck now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// The most that may be stuck before new calls are refused.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether the limit is reached.
    pub fn is_full(&self) -> bool {
        self.count() >= self.limit
    }

    /// One more call overran its timeout.
    pub fn enter(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.gauge.inc();
    }

    /// A call counted by [`StuckCalls::enter`] returned at last.
    pub fn leave(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// How `init` is bounded for one load.
#[derive(Debug, Clone)]
pub struct InitBound {
    /// How long `init` may run (`[reload] init_timeout`).
    pub timeout: Duration,
    /// The plugin's abandoned init calls, shared by all its loads.
    pub stuck: Arc<StuckCalls>,
}

impl InitBound {
    /// A bound of `timeout` with its own tracker (tests, offline tools).
    pub fn standalone(timeout: Duration) -> InitBound {
        InitBound {
            timeout,
            stuck: Arc::new(StuckCalls::new(
                MAX_STUCK_INITS,
                IntGauge::new("stuck_inits", "unregistered").expect("valid gauge"),
            )),
        }
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
    // A bare file name would send dlopen searching the library path
    // (LD_LIBRARY_PATH, ld.so.cache) instead of opening the file that was
    // checked above; `./` makes it the file in the current directory.
    let dl_path = if path.parent() == Some(Path::new("")) {
        Path::new(".").join(path)
    } else {
        path.to_owned()
    };
    let library = unsafe { Library::open(Some(&dl_path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
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

/// The manifest's declared ABI must be the one this daemon speaks — checked
/// before anything is opened. One function for the reload path ([`load`])
/// and `plugvisor verify` / `pack`, so the two cannot drift.
pub fn check_manifest_abi(plugin: &str, declared: u32, path: &Path) -> Result<(), LoadError> {
    if declared == ABI_VERSION {
        Ok(())
    } else {
        Err(LoadError::ManifestAbi {
            plugin: plugin.to_owned(),
            path: path.to_owned(),
            declared,
            expected: ABI_VERSION,
        })
    }
}

/// The library's descriptor must name the manifest's plugin and version:
/// no mix-and-match of a library with another package's manifest. Shared
/// by [`load`] and `plugvisor verify` / `pack`, like
/// [`check_manifest_abi`].
pub fn check_identity(
    plugin: &str,
    version: &Version,
    path: &Path,
    id: Identity,
) -> Result<Identity, LoadError> {
    if id.name == plugin && Version::parse(&id.version).ok().as_ref() == Some(version) {
        Ok(id)
    } else {
        Err(LoadError::IdentityMismatch {
            plugin: plugin.to_owned(),
            path: path.to_owned(),
            expected_version: version.to_string(),
            found_name: id.name,
            found_version: id.version,
        })
    }
}

/// Loads `object` for `plugin`, checks it against the manifest's `version`
/// and `abi`, and runs `init` within `bound`.
pub fn load(
    plugin: &str,
    version: &Version,
    abi: u32,
    sha256: &str,
    object: &Path,
    bound: &InitBound,
) -> Result<(LoadedVersion, LoadTimings), LoadError> {
    let t0 = Instant::now();
    if bound.stuck.is_full() {
        // Refused before dlopen: every abandoned init pins a mapping.
        return Err(LoadError::TooManyStuckInits {
            plugin: plugin.to_owned(),
            version: version.to_string(),
            stuck: bound.stuck.count(),
            limit: bound.stuck.limit(),
        });
    }
    check_manifest_abi(plugin, abi, object)?;
    let (library, descriptor, id) = open(plugin, object)?;
    check_identity(plugin, version, object, id)?;
    let load = t0.elapsed();
    let t1 = Instant::now();
    // SAFETY: descriptor validated above.
    let d = unsafe { &*descriptor };
    let Some(InitReturn { st, instance, err }) = run_init(plugin, version, descriptor, bound)
    else {
        // The thread runs on inside the library: it must stay mapped for
        // the life of the process (dlclose under a running thread would
        // pull its code from under it).
        std::mem::forget(library);
        return Err(LoadError::InitTimeout {
            plugin: plugin.to_owned(),
            version: version.to_string(),
            timeout: bound.timeout,
        });
    };
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

/// What `init` handed back.
struct InitReturn {
    st: i32,
    instance: *mut c_void,
    err: PvBuf,
}

// SAFETY: the instance and buffer are plain data handed from the init
// thread to the loading thread, which alone uses them afterwards.
unsafe impl Send for InitReturn {}

/// The descriptor, sent to the init thread. It is static data of a library
/// that stays mapped while that thread runs.
struct DescriptorPtr(*const PluginDescriptor);

// SAFETY: the descriptor is immutable static data (see PluginDescriptor's Sync).
unsafe impl Send for DescriptorPtr {}

/// `init` is running; it has returned and its result was taken; it was
/// given up on (the thread cleans up after itself if it ever returns).
const INIT_RUNNING: u8 = 0;
const INIT_TAKEN: u8 = 1;
const INIT_ABANDONED: u8 = 2;

/// Runs `init` on a thread of its own and waits at most `bound.timeout`.
/// `None` when it overran: the thread is abandoned and counted in
/// `bound.stuck` until it returns, if it ever does.
fn run_init(
    plugin: &str,
    version: &Version,
    descriptor: *const PluginDescriptor,
    bound: &InitBound,
) -> Option<InitReturn> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<InitReturn>(1);
    let state = Arc::new(AtomicU8::new(INIT_RUNNING));
    let thread_state = state.clone();
    let stuck = bound.stuck.clone();
    let desc = DescriptorPtr(descriptor);
    let (name, ver) = (plugin.to_owned(), version.to_string());
    let spawned = std::thread::Builder::new()
        .name(format!("init-{plugin}"))
        .spawn(move || {
            let desc = desc;
            // SAFETY: the library stays mapped while this thread runs: the
            // loader keeps it, or leaks it when it gives up on this thread.
            let d = unsafe { &*desc.0 };
            let mut instance: *mut c_void = std::ptr::null_mut();
            let mut err = PvBuf::EMPTY;
            let started = Instant::now();
            // SAFETY: valid out-pointers; ABI checked by the caller.
            let st = unsafe { (d.init)(&raw mut instance, &raw mut err) };
            let taken = thread_state
                .compare_exchange(
                    INIT_RUNNING,
                    INIT_TAKEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok();
            if taken {
                let _ = tx.send(InitReturn { st, instance, err });
                return;
            }
            // Given up on: nobody will use what init made. Hand it back to
            // the plugin; the library itself stays mapped (leaked).
            if st == status::OK {
                // SAFETY: instance from this init, never shared.
                unsafe { (d.shutdown)(instance) };
            } else {
                // SAFETY: err was filled by this plugin (or is empty).
                let _ = unsafe { take_buf(d, err) };
            }
            stuck.leave();
            tracing::warn!(
                plugin = %name,
                version = %ver,
                after_ms = started.elapsed().as_millis() as u64,
                "an init abandoned after its timeout returned at last; its thread is free again (the library stays mapped)"
            );
        });
    if let Err(e) = spawned {
        // No thread, no init: an init that failed.
        tracing::error!(plugin, error = %e, "cannot start a thread for init");
        return Some(InitReturn {
            st: status::ERROR,
            instance: std::ptr::null_mut(),
            err: PvBuf::EMPTY,
        });
    }
    match rx.recv_timeout(bound.timeout) {
        Ok(r) => Some(r),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            // Counted before the state flips, so the thread's `leave` can
            // never come first.
            bound.stuck.enter();
            if state
                .compare_exchange(
                    INIT_RUNNING,
                    INIT_ABANDONED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                return None;
            }
            // It returned just now; its answer is on the way.
            bound.stuck.leave();
            rx.recv().ok()
        }
        // The thread ended without an answer (it cannot: init is caught at
        // the boundary); treat it as a failed init.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Some(InitReturn {
            st: status::ERROR,
            instance: std::ptr::null_mut(),
            err: PvBuf::EMPTY,
        }),
    }
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
