//! `cargo xtask demo`: plugvisor's promise, shown end to end.
//!
//! The daemon runs with its embedded default config (no `--config`) in a
//! fresh `target/demo`, so what happens is what a first-time user gets: it
//! seeds `plugvisor-data/plugins/echo/` from the bundled echo plugin and
//! serves newline-delimited frames on 127.0.0.1:7001, metrics on :9464.
//!
//! Eight clients then keep one connection each and send frames without
//! pause while the echo plugin is hot-reloaded twice (1.0.0 → 1.0.1 →
//! 1.0.2), the way an operator would: a new library next to the old one,
//! then `plugin.toml` written to a temporary name and renamed, because the
//! manifest is the daemon's commit point. Every reply carries the version
//! that served it, so the clients see each switch on their live connection;
//! the kernel (eBPF) and the daemon say what they saw through `/metrics`.
//!
//! Both new versions are built before the daemon starts, so the compiler
//! does not compete with the traffic for CPU and the reloads happen at
//! known moments.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use sha2::{Digest as _, Sha256};

use crate::demo_picture::Timeline;
use crate::util;

/// Where the default config serves the echo plugin.
const ECHO_ADDR: &str = "127.0.0.1:7001";
/// Where the default config serves metrics.
const METRICS_ADDR: &str = "127.0.0.1:9464";
/// The plugin the demo reloads, and its package directory's name.
const PLUGIN: &str = "echo";
/// The versions the demo reloads to, in order.
const NEW_VERSIONS: [&str; 2] = ["1.0.1", "1.0.2"];
/// What `cargo build` builds for the demo: the daemon's library and binary,
/// and the echo plugin's library.
pub const DEMO_BUILD: [&str; 7] = [
    "-p",
    "plugvisor",
    "-p",
    "plugvisor-echo",
    "--lib",
    "--bin",
    "plugvisor",
];
/// Concurrent clients, one persistent connection each.
const CLIENTS: usize = 8;

/// How long the daemon may take to answer on both ports after start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a manifest is written every client must see the version.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Traffic on the first version before the first reload.
const BEFORE_FIRST_RELOAD: Duration = Duration::from_secs(2);
/// Traffic between the two reloads.
const BETWEEN_RELOADS: Duration = Duration::from_secs(3);
/// Traffic on the last version before the clients stop.
const AFTER_LAST_RELOAD: Duration = Duration::from_secs(2);
/// A short breath between frames: without it eight clients saturate the
/// two cores of a small VM and the daemon's reload work queues behind them.
const FRAME_PAUSE: Duration = Duration::from_millis(1);
/// Connect, read and write timeout of every socket the demo opens.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often waits check the daemon, the clients and Ctrl-C.
const POLL: Duration = Duration::from_millis(100);
/// At most this many error messages are kept per client for the report.
const KEPT_ERRORS: usize = 3;

/// Set by Ctrl-C (or SIGTERM); every wait checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// TCP connections the demo opened to the echo listener, to compare with
/// the kernel's count.
static ECHO_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Flags of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Stop the daemon after the report instead of leaving it running until
    /// Ctrl-C; exit non-zero if any client saw an error.
    #[arg(long)]
    pub once: bool,
    /// Skip `cargo xtask setup` (this machine is already set up).
    #[arg(long)]
    pub no_setup: bool,
}

/// Builds, starts the daemon, reloads under traffic and reports.
pub fn run(args: &Args) -> Result<()> {
    // The daemon runs in its own process group (see `Daemon::start`), so
    // Ctrl-C reaches only xtask, which then stops clients and daemon in
    // order.
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    // Checked first so a demo still running elsewhere keeps its directory;
    // checked again just before the start.
    ensure_free(ECHO_ADDR)?;
    ensure_free(METRICS_ADDR)?;

    // As `cargo xtask test` does: on a fresh machine the build needs
    // bpf-linker and rust-src, which only setup installs.
    if !args.no_setup {
        crate::setup::run().context("cargo xtask setup (run before the demo)")?;
    }
    // Only what the demo runs: the daemon (its eBPF object is built by
    // supervisor/build.rs) and the echo plugin it seeds — not the tests,
    // fixtures and benchmarks of the whole workspace.
    println!(
        "demo: building plugvisor (with its eBPF probes) and the echo plugin — about 3 min on 2 cores the first time, seconds after"
    );
    let started = Instant::now();
    util::run(util::cargo().args(["build", "--release"]).args(DEMO_BUILD))?;
    println!("demo: built in {}", util::secs(started.elapsed()));
    let target = util::target_dir()?;
    let demo_dir = target.join("demo");
    if demo_dir.exists() {
        fs::remove_dir_all(&demo_dir)
            .with_context(|| format!("removing {}", demo_dir.display()))?;
    }
    fs::create_dir_all(&demo_dir).with_context(|| format!("creating {}", demo_dir.display()))?;
    let staged = build_new_versions(&target, &demo_dir.join("staging"))?;

    ensure_free(ECHO_ADDR)?;
    ensure_free(METRICS_ADDR)?;
    let mut daemon = Daemon::start(&target.join("release/plugvisor"), &demo_dir)?;
    let started = Instant::now();
    let hello = wait_ready(&mut daemon)?;
    println!(
        "demo: plugvisor ready after {} — `hello` → `{hello}`",
        util::secs(started.elapsed())
    );

    let timeline = Arc::new(Timeline::new());
    let clients = Clients::start(&timeline)?;
    println!("demo: {CLIENTS} clients sending frames, one connection each");
    pause(BEFORE_FIRST_RELOAD, &mut daemon)?;
    for (i, version) in staged.iter().enumerate() {
        if i > 0 {
            pause(BETWEEN_RELOADS, &mut daemon)?;
        }
        let written = install(&demo_dir, version)?;
        timeline.reload(written, &version.version);
        wait_for_version(&clients, &version.version, &mut daemon)?;
        println!(
            "demo: all {CLIENTS} clients on {PLUGIN} {} {} after the manifest was written \
             (includes the watcher's debounce)",
            version.version,
            human_secs(written.elapsed().as_secs_f64()),
        );
    }
    pause(AFTER_LAST_RELOAD, &mut daemon)?;
    // `plugvisor_tcp_connections` is a gauge of open connections: scrape
    // once while the clients are still connected (all of them should have
    // survived both reloads) and once after they closed.
    let during = http_get(METRICS_ADDR, "/metrics").context("scraping /metrics under traffic")?;
    let stats = clients.stop();
    let after = http_get(METRICS_ADDR, "/metrics").context("scraping /metrics for the report")?;

    let errors: u64 = stats.iter().map(|s| s.errors).sum();
    print!("{}", report(&stats, &during, &after));
    println!("daemon log: {}", daemon.log.display());
    let picture = demo_dir.join("demo.png");
    match timeline.draw(&picture) {
        Ok(()) => println!("picture: {}", picture.display()),
        Err(e) => println!("picture: not drawn ({e:#})"),
    }

    if !args.once {
        println!(
            "\nplugvisor keeps running; metrics at http://{METRICS_ADDR}/metrics — Ctrl-C to stop"
        );
        while !INTERRUPTED.load(Ordering::SeqCst) {
            daemon.check_alive()?;
            thread::sleep(POLL);
        }
    }
    let status = daemon.stop();
    println!(
        "demo: plugvisor stopped ({})",
        status.map_or_else(|| "status unknown".to_owned(), |s| s.to_string())
    );
    if errors > 0 {
        bail!("clients saw {errors} error(s) during the demo (see the report above)");
    }
    Ok(())
}

/// A new echo version built and set aside for its reload.
struct Staged {
    version: String,
    library: PathBuf,
}

/// Builds each new version into a separate target dir (the main one keeps
/// the bundled 1.0.0) and copies the library out, since the next build
/// overwrites it.
fn build_new_versions(target: &Path, staging: &Path) -> Result<Vec<Staged>> {
    let build_dir = target.join("demo-build");
    fs::create_dir_all(staging).with_context(|| format!("creating {}", staging.display()))?;
    let mut staged = Vec::new();
    for version in NEW_VERSIONS {
        util::run(
            util::cargo()
                .env("PLUGVISOR_PLUGIN_VERSION", version)
                .env("CARGO_TARGET_DIR", &build_dir)
                .args(["build", "--release", "-p", "plugvisor-echo"]),
        )?;
        let built = build_dir.join("release/libplugvisor_echo.so");
        // The version reaches the library through `option_env!`; if cargo
        // ever failed to rebuild on the changed variable, the daemon would
        // reject the package as a version mismatch. Say so here instead.
        let bytes = fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
        if !bytes
            .windows(version.len())
            .any(|w| w == version.as_bytes())
        {
            bail!(
                "{} does not carry version {version}; was it rebuilt?",
                built.display()
            );
        }
        let library = staging.join(format!("libplugvisor_echo-{version}.so"));
        fs::copy(&built, &library)
            .with_context(|| format!("copying {} to {}", built.display(), library.display()))?;
        staged.push(Staged {
            version: version.to_owned(),
            library,
        });
    }
    Ok(staged)
}

/// Refuses to start if something already listens where the daemon will:
/// the demo would otherwise talk to that process and report on it.
fn ensure_free(addr: &str) -> Result<()> {
    let sock: SocketAddr = addr.parse().expect("constant address");
    if TcpStream::connect_timeout(&sock, Duration::from_millis(300)).is_ok() {
        bail!(
            "something already listens on {addr} (another plugvisor?); stop it first \
             (`ss -ltnp 'sport = :{}'` shows what)",
            sock.port()
        );
    }
    Ok(())
}

/// The daemon under test; stopped (SIGTERM, then SIGKILL) when dropped, so
/// an error anywhere in the demo leaves nothing running.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(binary: &Path, dir: &Path) -> Result<Self> {
        let log = dir.join("plugvisor.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        let mut c = Command::new(binary);
        c.arg("run")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        println!(
            "demo: starting `{}` in {} (log: {})",
            util::display(&c),
            dir.display(),
            log.display()
        );
        let child = c
            .spawn()
            .with_context(|| format!("starting {} (did the build succeed?)", binary.display()))?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    /// Fails, with the end of the daemon's log, if it has exited.
    fn check_alive(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("plugvisor was already stopped");
        };
        if let Some(status) = child.try_wait().context("polling plugvisor")? {
            self.child = None;
            bail!(
                "plugvisor exited unexpectedly ({status}){}",
                self.log_tail()
            );
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        format!(
            "\nlast lines of {}:\n{}",
            self.log.display(),
            tail.join("\n")
        )
    }

    /// Asks the daemon to shut down (SIGTERM: it detaches probes and
    /// removes its socket), and kills it if it does not within
    /// `STOP_TIMEOUT`. Idempotent.
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // `kill(1)` rather than libc: no unsafe for one signal.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(POLL);
        }
        eprintln!("demo: plugvisor did not exit within {STOP_TIMEOUT:?} of SIGTERM; killing it");
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps while watching for Ctrl-C and the daemon's death.
fn pause(d: Duration, daemon: &mut Daemon) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        daemon.check_alive()?;
        thread::sleep(POLL);
    }
    Ok(())
}

/// Waits until `/metrics` answers and the echo listener replies to
/// `hello`; returns the reply.
fn wait_ready(daemon: &mut Daemon) -> Result<String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        check_interrupted()?;
        daemon.check_alive()?;
        let attempt = http_get(METRICS_ADDR, "/metrics").and_then(|_| {
            let mut conn = Conn::connect(ECHO_ADDR)?;
            let reply = conn.request("hello")?;
            conn.close();
            match parse_reply(&reply) {
                Some((_, "hello")) => Ok(reply),
                _ => Err(anyhow!("unexpected reply to `hello`: {reply:?}")),
            }
        });
        match attempt {
            Ok(reply) => return Ok(reply),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "plugvisor did not become ready within {READY_TIMEOUT:?}: {e:#}{}",
                    daemon.log_tail()
                );
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Puts `staged` into the echo package the way an operator would: library
/// first, then the manifest by rename, because the daemon acts on the
/// manifest and must never see it before the library it pins. Returns when
/// the manifest was committed.
fn install(demo_dir: &Path, staged: &Staged) -> Result<Instant> {
    let package = demo_dir.join("plugvisor-data/plugins").join(PLUGIN);
    if !package.is_dir() {
        bail!(
            "{} does not exist: the daemon did not seed the echo package",
            package.display()
        );
    }
    let file_name = staged
        .library
        .file_name()
        .and_then(|n| n.to_str())
        .context("staged library has no UTF-8 file name")?;
    let library = package.join(file_name);
    fs::copy(&staged.library, &library)
        .with_context(|| format!("copying to {}", library.display()))?;
    let bytes = fs::read(&library).with_context(|| format!("reading {}", library.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let manifest = manifest(&staged.version, file_name, &sha256);
    let tmp = package.join("plugin.toml.tmp");
    let dest = package.join("plugin.toml");
    fs::write(&tmp, manifest).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    let written = Instant::now();
    println!(
        "demo: reload → {PLUGIN} {}: {file_name} (sha256 {}…) + plugin.toml in {}",
        staged.version,
        &sha256[..12],
        package.display()
    );
    Ok(written)
}

/// The package manifest: it pins the library by hash, and the daemon
/// checks the library's descriptor (ABI, name, version) against it.
fn manifest(version: &str, library: &str, sha256: &str) -> String {
    format!(
        "name = \"{PLUGIN}\"\n\
         version = \"{version}\"\n\
         library = \"{library}\"\n\
         sha256 = \"{sha256}\"\n\
         abi = 1\n"
    )
}

/// Waits until every client's latest reply came from `version`.
fn wait_for_version(clients: &Clients, version: &str, daemon: &mut Daemon) -> Result<()> {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    while !clients.all_on(version) {
        check_interrupted()?;
        daemon.check_alive()?;
        if Instant::now() >= deadline {
            let reloads = http_get(METRICS_ADDR, "/metrics")
                .map(|m| family_lines(&m, "plugvisor_reloads_total").join("\n  "))
                .unwrap_or_default();
            bail!(
                "clients did not see {PLUGIN} {version} within {RELOAD_TIMEOUT:?}; \
                 was the package rejected?\n  {reloads}{}",
                daemon.log_tail()
            );
        }
        thread::sleep(POLL);
    }
    Ok(())
}

/// `[echo 1.0.1] frame-7` → `("1.0.1", "frame-7")`.
fn parse_reply(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix(&format!("[{PLUGIN} "))?;
    let (version, body) = rest.split_once("] ")?;
    (!version.is_empty()).then_some((version, body))
}

/// One TCP connection speaking newline-delimited frames.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn connect(addr: &str) -> Result<Self> {
        let sock: SocketAddr = addr
            .parse()
            .with_context(|| format!("bad address {addr}"))?;
        let stream = TcpStream::connect_timeout(&sock, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        // One small frame per round trip: do not let Nagle hold it back.
        stream.set_nodelay(true)?;
        let reader = BufReader::new(stream.try_clone()?);
        ECHO_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            reader,
            writer: stream,
        })
    }

    /// Sends `frame` and returns the reply line without its newline.
    fn request(&mut self, frame: &str) -> Result<String> {
        self.writer
            .write_all(format!("{frame}\n").as_bytes())
            .context("sending a frame")?;
        let mut line = String::new();
        if self
            .reader
            .read_line(&mut line)
            .context("reading the reply")?
            == 0
        {
            bail!("connection closed by plugvisor");
        }
        Ok(line.trim_end_matches(['\n', '\r']).to_owned())
    }

    /// Closes in order: our FIN, then the server's. Dropping a socket with
    /// unread data would send a RST, which the kernel counts as broken.
    fn close(mut self) {
        let _ = self.writer.shutdown(Shutdown::Write);
        let _ = self.reader.read_to_end(&mut Vec::new());
    }
}

/// What one client saw.
#[derive(Clone, Default)]
struct ClientStats {
    /// Connections opened (1 unless an error forced a reconnect).
    connections: u64,
    /// Frames sent.
    frames: u64,
    /// Failed exchanges: I/O errors, closed connections, wrong replies.
    errors: u64,
    /// The first few error messages.
    first_errors: Vec<String>,
    /// Versions that served this client, in order, each once per switch.
    versions: Vec<String>,
}

impl ClientStats {
    fn error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        if self.first_errors.len() < KEPT_ERRORS {
            self.first_errors.push(format!("{e:#}"));
        }
    }
}

/// The client threads; stopped and joined on drop.
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<ClientThread>,
    // Samples the kernel's counters from /metrics for the picture.
    sampler: Option<JoinHandle<()>>,
}

/// One client thread and the stats it keeps up to date.
struct ClientThread {
    stats: Arc<Mutex<ClientStats>>,
    /// `None` once joined.
    handle: Option<JoinHandle<()>>,
}

impl Clients {
    fn start(timeline: &Arc<Timeline>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = thread::Builder::new()
            .name("kernel-sampler".into())
            .spawn({
                let stop = Arc::clone(&stop);
                let timeline = Arc::clone(timeline);
                move || sample_kernel(&timeline, &stop)
            })
            .context("starting the kernel sampler")?;
        let mut clients = Self {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
            sampler: Some(sampler),
        };
        for id in 1..=CLIENTS {
            let stats = Arc::new(Mutex::new(ClientStats::default()));
            let handle = thread::Builder::new()
                .name(format!("client-{id}"))
                .spawn({
                    let stats = Arc::clone(&stats);
                    let stop = Arc::clone(&stop);
                    let timeline = Arc::clone(timeline);
                    move || client(&stats, &stop, &timeline)
                })
                .context("starting a client thread")?;
            clients.threads.push(ClientThread {
                stats,
                handle: Some(handle),
            });
        }
        Ok(clients)
    }

    fn all_on(&self, version: &str) -> bool {
        self.threads.iter().all(|t| {
            let stats = t.stats.lock().unwrap_or_else(PoisonError::into_inner);
            stats.versions.last().is_some_and(|v| v == version)
        })
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in &mut self.threads {
            if let Some(handle) = t.handle.take() {
                let _ = handle.join();
            }
        }
        if let Some(s) = self.sampler.take() {
            let _ = s.join();
        }
    }

    /// Stops the clients (each closes its connection cleanly) and returns
    /// what they saw.
    fn stop(mut self) -> Vec<ClientStats> {
        self.join();
        self.threads
            .iter()
            .map(|t| {
                t.stats
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            })
            .collect()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.join();
    }
}

/// One client: a persistent connection, one frame at a time, reconnecting
/// only after an error (which is the thing the demo shows does not happen).
fn client(stats: &Mutex<ClientStats>, stop: &AtomicBool, timeline: &Timeline) {
    let lock = || stats.lock().unwrap_or_else(PoisonError::into_inner);
    let mut conn: Option<Conn> = None;
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match Conn::connect(ECHO_ADDR) {
                Ok(c) => {
                    conn = Some(c);
                    lock().connections += 1;
                }
                Err(e) => {
                    lock().error(&e);
                    thread::sleep(POLL);
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        n += 1;
        let frame = format!("frame-{n}");
        let outcome = c
            .request(&frame)
            .and_then(|reply| match parse_reply(&reply) {
                Some((version, body)) if body == frame => Ok(version.to_owned()),
                _ => Err(anyhow!("unexpected reply to {frame:?}: {reply:?}")),
            });
        let mut s = lock();
        s.frames += 1;
        match outcome {
            Ok(version) => {
                timeline.answer(&version);
                if s.versions.last() != Some(&version) {
                    s.versions.push(version);
                }
            }
            Err(e) => {
                timeline.error();
                s.error(&e);
                // After a failed exchange the stream's position is unknown.
                conn = None;
            }
        }
        drop(s);
        thread::sleep(FRAME_PAUSE);
    }
    if let Some(c) = conn {
        c.close();
    }
}

/// How often the picture's kernel counters are read from /metrics.
const KERNEL_SAMPLE: Duration = Duration::from_millis(200);

/// Reads the kernel's connection counts from /metrics until `stop`.
fn sample_kernel(timeline: &Timeline, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        if let Ok(text) = http_get(METRICS_ADDR, "/metrics") {
            let sum = |family: &str| -> f64 {
                samples(&text)
                    .filter(|s| s.name == family && s.labels.contains("listener=\"echo-tcp\""))
                    .map(|s| s.value)
                    .sum()
            };
            timeline.kernel(
                sum("plugvisor_tcp_connections"),
                sum("plugvisor_reload_broken_connections_total"),
            );
        }
        thread::sleep(KERNEL_SAMPLE);
    }
}

/// A minimal HTTP/1.0 GET: the server closes the connection after the
/// body, so reading to EOF is the whole response (no chunking, no
/// keep-alive) — enough for `/metrics` without an HTTP client dependency.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let sock: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr}"))?;
    let mut stream = TcpStream::connect_timeout(&sock, IO_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").context("sending the request")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the response from http://{addr}{path}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response from http://{addr}{path}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("http://{addr}{path} answered {status:?}");
    }
    Ok(body.to_owned())
}

/// One sample of the Prometheus text format.
struct Sample<'a> {
    name: &'a str,
    /// `{a="b",c="d"}`, or empty.
    labels: &'a str,
    /// The value as exposed, for printing without float noise.
    raw: &'a str,
    value: f64,
}

fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(['{', ' '])?;
        let (name, labels, rest) = if line[name_end..].starts_with('{') {
            let close = line.rfind('}')?;
            (
                &line[..name_end],
                &line[name_end..=close],
                &line[close + 1..],
            )
        } else {
            (&line[..name_end], "", &line[name_end..])
        };
        let raw = rest.split_whitespace().next()?;
        let value = raw.parse().ok()?;
        Some(Sample {
            name,
            labels,
            raw,
            value,
        })
    })
}

/// The samples named exactly `name`, one line each.
fn family_lines(text: &str, name: &str) -> Vec<String> {
    samples(text)
        .filter(|s| s.name == name)
        .map(|s| format!("{}{} {}", s.name, s.labels, s.raw))
        .collect()
}

/// `(labels, count, sum)` of a histogram family, per label set.
fn histogram(text: &str, family: &str) -> Vec<(String, f64, f64)> {
    let count_name = format!("{family}_count");
    let sum_name = format!("{family}_sum");
    let mut by_labels: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for s in samples(text) {
        if s.name == count_name {
            by_labels.entry(s.labels.to_owned()).or_default().0 = s.value;
        } else if s.name == sum_name {
            by_labels.entry(s.labels.to_owned()).or_default().1 = s.value;
        }
    }
    by_labels.into_iter().map(|(l, (c, s))| (l, c, s)).collect()
}

/// Seconds in the unit a person reads most easily.
fn human_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

/// The report: what the clients saw, then what the kernel and the daemon
/// saw, from the `/metrics` scrapes taken just before (`during`) and just
/// after (`metrics`) the clients stopped.
fn report(stats: &[ClientStats], during: &str, metrics: &str) -> String {
    let mut out = String::new();
    let o = &mut out;
    let _ = writeln!(o, "\n=== what the clients saw ===");
    let _ = writeln!(
        o,
        "{:>6} {:>11} {:>8} {:>6}  versions (in order)",
        "client", "connections", "frames", "errors"
    );
    for (i, s) in stats.iter().enumerate() {
        let _ = writeln!(
            o,
            "{:>6} {:>11} {:>8} {:>6}  {}",
            i + 1,
            s.connections,
            s.frames,
            s.errors,
            s.versions.join(" → ")
        );
        for e in &s.first_errors {
            let _ = writeln!(o, "{:>8}error: {e}", "");
        }
    }
    let connections: u64 = stats.iter().map(|s| s.connections).sum();
    let frames: u64 = stats.iter().map(|s| s.frames).sum();
    let errors: u64 = stats.iter().map(|s| s.errors).sum();
    let _ = writeln!(o, " total {connections:>11} {frames:>8} {errors:>6}");
    let _ = writeln!(
        o,
        "the demo opened {} connection(s) to {ECHO_ADDR} in all (clients + readiness checks)",
        ECHO_CONNECTIONS.load(Ordering::Relaxed)
    );

    let _ = writeln!(o, "\n=== what the kernel saw (eBPF) ===");
    let probe_samples = samples(metrics)
        .filter(|s| s.name == "plugvisor_probe_up")
        .count();
    let probe_down = samples(metrics).any(|s| s.name == "plugvisor_probe_up" && s.value == 0.0);
    if probe_samples == 0 || probe_down {
        let _ = writeln!(
            o,
            "note: eBPF probes are not (all) loaded — not root, or the kernel refused them; \
             see the daemon log. Kernel numbers below may be missing."
        );
    }
    section(o, metrics, "plugvisor_probe_up");
    // A gauge: under traffic it should count every client, after the
    // clients closed it should be back to zero.
    for (text, when) in [
        (during, "with the clients connected"),
        (metrics, "after they closed"),
    ] {
        let lines = family_lines(text, "plugvisor_tcp_connections");
        if lines.is_empty() {
            let _ = writeln!(o, "  plugvisor_tcp_connections: (no samples {when})");
        }
        for l in lines {
            let _ = writeln!(o, "  {l}    ({when})");
        }
    }
    section(o, metrics, "plugvisor_reload_broken_connections_total");
    histogram_section(
        o,
        metrics,
        "plugvisor_kernel_reload_duration_seconds",
        "reload window measured in the kernel",
    );

    let _ = writeln!(o, "\n=== what the daemon saw ===");
    histogram_section(
        o,
        metrics,
        "plugvisor_reload_duration_seconds",
        "reload time per phase",
    );
    section(o, metrics, "plugvisor_reloads_total");
    section(o, metrics, "plugvisor_plugin_info");
    out
}

fn section(o: &mut String, metrics: &str, family: &str) {
    let lines = family_lines(metrics, family);
    if lines.is_empty() {
        let _ = writeln!(o, "  {family}: (no samples)");
    }
    for l in lines {
        let _ = writeln!(o, "  {l}");
    }
}

fn histogram_section(o: &mut String, metrics: &str, family: &str, what: &str) {
    let groups = histogram(metrics, family);
    let _ = writeln!(o, "  {family} ({what}):");
    if groups.is_empty() {
        let _ = writeln!(o, "    (no samples)");
    }
    for (labels, count, sum) in groups {
        let mean = if count > 0.0 {
            human_secs(sum / count)
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            o,
            "    {labels} _count {count} _sum {sum:.6} (total {}, mean {mean})",
            human_secs(sum)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{histogram, manifest, parse_reply, samples};

    #[test]
    fn writes_the_manifest() {
        assert_eq!(
            manifest("1.0.1", "libplugvisor_echo-1.0.1.so", "ab12"),
            "name = \"echo\"\nversion = \"1.0.1\"\nlibrary = \"libplugvisor_echo-1.0.1.so\"\n\
             sha256 = \"ab12\"\nabi = 1\n"
        );
    }

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse_reply("[echo 1.0.1] frame-7"),
            Some(("1.0.1", "frame-7"))
        );
        assert_eq!(parse_reply("[echo ] x"), None);
        assert_eq!(parse_reply("frame-7"), None);
    }

    #[test]
    fn reads_prometheus_text() {
        let text = "# HELP x y\n\
                    plugvisor_reloads_total{outcome=\"success\",plugin=\"echo\"} 2\n\
                    plugvisor_probe_up 1\n\
                    h_sum{phase=\"swap\"} 0.5\n\
                    h_count{phase=\"swap\"} 2\n\
                    h_bucket{phase=\"swap\",le=\"+Inf\"} 2\n";
        let s: Vec<_> = samples(text).collect();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "plugvisor_reloads_total");
        assert_eq!(s[0].labels, "{outcome=\"success\",plugin=\"echo\"}");
        assert!((s[1].value - 1.0).abs() < f64::EPSILON);
        assert_eq!(
            histogram(text, "h"),
            vec![("{phase=\"swap\"}".to_owned(), 2.0, 0.5)]
        );
    }
}
