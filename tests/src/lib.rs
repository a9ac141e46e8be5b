//! Harness for plugvisor's black-box tests: start the real binary on a
//! config of the test's own, talk to it over real sockets, read its real
//! `/metrics`, and leave nothing running when a test fails (every process
//! and directory is held by an RAII guard).
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

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

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A listener entry for a test config.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// Name.
    pub name: String,
    /// Plugin.
    pub plugin: String,
    /// Port on 127.0.0.1.
    pub port: u16,
}

impl ListenerSpec {
    /// A TCP listener for `plugin` on a free port.
    pub fn tcp(name: &str, plugin: &str) -> ListenerSpec {
        ListenerSpec {
            name: name.into(),
            plugin: plugin.into(),
            port: free_port(),
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// A daemon under test with its own directories. Killed on drop.
pub struct Daemon {
    child: Option<Child>,
    /// Temp directory holding config, plugins, state and logs.
    pub dir: tempfile::TempDir,
    /// `plugins_dir`.
    pub plugins_dir: PathBuf,
    /// `state_dir`.
    pub state_dir: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// Metrics port.
    pub metrics_port: u16,
    /// Listeners.
    pub listeners: Vec<ListenerSpec>,
    log: PathBuf,
    env: Vec<(String, String)>,
}

/// How to start a daemon.
pub struct DaemonOptions {
    /// Listeners.
    pub listeners: Vec<ListenerSpec>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// `[probes] mode`.
    pub probes: &'static str,
    /// Packages to install before start: (plugin name, library path, version).
    pub packages: Vec<(String, PathBuf, String)>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            listeners: vec![ListenerSpec::tcp("echo-tcp", "echo")],
            env: Vec::new(),
            probes: "auto",
            packages: vec![("echo".into(), build_echo_version("1.0.0"), "1.0.0".into())],
        }
    }
}

impl Daemon {
    /// Starts plugvisor and waits until every listener's plugin answers.
    pub fn start(opts: DaemonOptions) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let plugins_dir = dir.path().join("plugins");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&plugins_dir).unwrap();
        for (name, lib, version) in &opts.packages {
            install_package(&plugins_dir, name, version, lib, &PackageTweaks::default());
        }
        let metrics_port = free_port();
        let mut cfg = format!(
            "plugins_dir = \"{}\"\nstate_dir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[admin]\nsocket = \"{}\"\n[probes]\nmode = \"{}\"\n[reload]\ndebounce = \"50ms\"\n",
            plugins_dir.display(),
            state_dir.display(),
            dir.path().join("admin.sock").display(),
            opts.probes
        );
        for l in &opts.listeners {
            let _ = write!(
                cfg,
                "[[listener]]\nname = \"{}\"\nprotocol = \"tcp\"\nbind = \"{}\"\nplugin = \"{}\"\n",
                l.name,
                l.addr(),
                l.plugin
            );
        }
        let config = dir.path().join("plugvisor.toml");
        std::fs::write(&config, cfg).unwrap();
        let log = dir.path().join("plugvisor.log");
        let mut d = Daemon {
            child: None,
            plugins_dir,
            state_dir,
            config,
            metrics_port,
            listeners: opts.listeners.clone(),
            log,
            dir,
            env: opts.env,
        };
        d.spawn();
        d
    }

    /// Starts the daemon again (after [`Daemon::stop`]) on the same directories.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.spawn();
    }

    fn spawn(&mut self) {
        let env = self.env.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(binary());
        cmd.args(["--log-format", "json", "run", "--config"])
            .arg(&self.config)
            .env("PLUGVISOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        for l in self.listeners.clone() {
            wait_until(deadline, &format!("listener {} answers", l.name), || {
                self.assert_running();
                LineClient::connect(l.addr())
                    .ok()
                    .and_then(|mut c| c.call("ping").ok())
                    .is_some_and(|r| !r.starts_with("ERR"))
            });
        }
        wait_until(deadline, "metrics endpoint answers", || {
            self.try_metrics().is_some()
        });
    }

    /// Panics with the log if the daemon exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("plugvisor exited with {status}; log:\n{}", self.log_text());
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGTERM, then waits for exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("plugvisor did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Parsed JSON log lines.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn try_metrics(&self) -> Option<String> {
        http_get(
            SocketAddr::from(([127, 0, 0, 1], self.metrics_port)),
            "/metrics",
        )
        .ok()
    }

    /// A scrape of `/metrics`.
    pub fn metrics(&self) -> Metrics {
        Metrics::parse(&self.try_metrics().expect("metrics endpoint answers"))
    }

    /// Runs the CLI against this daemon; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(binary())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Address of the listener called `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .expect("listener")
            .addr()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- plugvisor log ---\n{}", self.log_text());
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics at `deadline`.
pub fn wait_until(deadline: Instant, what: &str, mut cond: impl FnMut() -> bool) {
    loop {
        if cond() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal HTTP/1.0 GET.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or(std::io::ErrorKind::InvalidData)?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(
            head.lines().next().unwrap_or_default().to_owned(),
        ));
    }
    Ok(body.to_owned())
}

/// A scrape, indexed by series.
#[derive(Debug, Clone)]
pub struct Metrics {
    series: Vec<(String, HashMap<String, String>, f64)>,
}

impl Metrics {
    /// Parses the text exposition format.
    pub fn parse(text: &str) -> Metrics {
        let mut series = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value.parse().unwrap_or(f64::NAN);
            let (name, labels) = match head.split_once('{') {
                None => (head.to_owned(), HashMap::new()),
                Some((n, rest)) => {
                    let rest = rest.trim_end_matches('}');
                    let mut labels = HashMap::new();
                    for kv in rest.split("\",").filter(|s| !s.is_empty()) {
                        let (k, v) = kv.split_once('=').unwrap();
                        labels.insert(k.to_owned(), v.trim_matches('"').to_owned());
                    }
                    (n.to_owned(), labels)
                }
            };
            series.push((name, labels, value));
        }
        Metrics { series }
    }

    /// Sum of every series of `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|(_, v)| v).sum()
    }

    /// The one series of `name` matching `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).map(|(_, v)| v).next()
    }

    /// Label sets and values of `name` matching `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a HashMap<String, String>, f64)> + 'a {
        self.series
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, l, v)| (l, *v))
    }

    /// The `q` quantile of histogram `name` (filtered by `labels`), by
    /// linear interpolation inside the bucket, as PromQL does.
    pub fn quantile(&self, name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .matching(&bucket, labels)
            .map(|(l, v)| {
                let le = l["le"].as_str();
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    v,
                )
            })
            .collect();
        buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        let total = buckets.last()?.1;
        if total == 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for (le, count) in buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                let span = count - prev.1;
                let frac = if span > 0.0 {
                    (rank - prev.1) / span
                } else {
                    1.0
                };
                return Some(prev.0 + (le - prev.0) * frac);
            }
            prev = (le, count);
        }
        None
    }
}

/// A client of the newline-delimited TCP listener.
pub struct LineClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineClient {
    /// Connects with a 5 s I/O timeout.
    pub fn connect(addr: SocketAddr) -> std::io::Result<LineClient> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(LineClient {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends one frame, returns the response line (without newline).
    pub fn call(&mut self, frame: &str) -> std::io::Result<String> {
        self.writer.write_all(format!("{frame}\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches('\n').to_owned())
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }

    /// Closes with SO_LINGER 0: the kernel sends RST instead of FIN.
    pub fn reset(self) {
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on an fd we own, with a valid struct.
        unsafe {
            libc::setsockopt(
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const l).cast(),
                size_of::<libc::linger>() as u32,
            );
        }
        drop(self);
    }
}

/// The version in an echo response (`[echo 1.2.3] …`).
pub fn echo_version(resp: &str) -> Option<&str> {
    resp.strip_prefix('[')?.split(']').next()?.split(' ').nth(1)
}

/// Builds the echo plugin stamped with `version` (once per version per test
/// run) and returns the library's path.
pub fn build_echo_version(version: &str) -> PathBuf {
    build_plugin_version("plugvisor-echo", "plugvisor_echo", version)
}

/// Builds workspace plugin `package` (library `lib`) stamped with `version`.
pub fn build_plugin_version(package: &str, lib: &str, version: &str) -> PathBuf {
    static BUILD_LOCK: Mutex<()> = Mutex::new(());
    let _g = BUILD_LOCK.lock().unwrap();
    let out_dir = target_dir().join("stamped").join(package);
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(format!("lib{lib}-{version}.so"));
    if !out.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let build_dir = target_dir().join("stamped").join("build");
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                package,
                "--target-dir",
            ])
            .arg(&build_dir)
            .env("PLUGVISOR_PLUGIN_VERSION", version)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building {package} {version}");
        std::fs::copy(build_dir.join(format!("release/lib{lib}.so")), &out).unwrap();
    }
    out
}

/// Deliberate defects for a package under test.
#[derive(Debug, Default, Clone)]
pub struct PackageTweaks {
    /// Write this sha256 instead of the real one.
    pub sha256: Option<String>,
    /// Write this `library` value instead of the file name.
    pub library: Option<String>,
    /// Write this version instead of the real one.
    pub version: Option<String>,
    /// Write this `abi` instead of 1.
    pub abi: Option<u32>,
    /// Write these bytes as the manifest, verbatim.
    pub raw_manifest: Option<String>,
}

/// sha256 of a file, hex.
pub fn sha256_file(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// Installs a package the way an operator does: the library under a new
/// file name, then the manifest renamed into place (the commit point).
pub fn install_package(
    plugins_dir: &Path,
    name: &str,
    version: &str,
    lib: &Path,
    t: &PackageTweaks,
) {
    let dir = plugins_dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let lib_name = format!("lib{name}-{version}-{}.so", &sha256_file(lib)[..8]);
    std::fs::copy(lib, dir.join(&lib_name)).unwrap();
    let manifest = t.raw_manifest.clone().unwrap_or_else(|| {
        format!(
            "name = \"{name}\"\nversion = \"{}\"\nlibrary = \"{}\"\nsha256 = \"{}\"\nabi = {}\n",
            t.version.as_deref().unwrap_or(version),
            t.library.as_deref().unwrap_or(&lib_name),
            t.sha256.clone().unwrap_or_else(|| sha256_file(lib)),
            t.abi.unwrap_or(1)
        )
    });
    let tmp = dir.join(".plugin.toml.tmp");
    std::fs::write(&tmp, manifest).unwrap();
    std::fs::rename(&tmp, dir.join("plugin.toml")).unwrap();
}
