//! The daemon under test: starting it on a config of the test's own,
//! waiting for it, stopping, killing and restarting it, and reading what
//! it wrote (log, journal, `/metrics`, `plugvisor status`). Every process
//! is held by an RAII guard so that a failing test leaves nothing running.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    DaemonOptions, GRPC_SERVICE, LineClient, ListenerSpec, Metrics, PackageTweaks, Protocol,
    binary, echo_version, free_port, grpc_health, http_get, install_package, pack,
};

/// A daemon under test with its own directories. Killed on drop.
pub struct Daemon {
    child: Option<Child>,
    // After `plugvisor upgrade`: the process that took over (not spawned
    // here; ours to reap once the old one exits if this test process is a
    // child subreaper, see `become_subreaper`).
    successor: Option<u32>,
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
    wrapper: Vec<String>,
    binary: PathBuf,
    // Plugins installed before the first start: their listeners must serve.
    packaged: Vec<String>,
}

impl Daemon {
    /// Starts plugvisor and waits until every listener's plugin answers.
    pub fn start(opts: DaemonOptions) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let plugins_dir = dir.path().join("plugins");
        let state_dir = opts
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        std::fs::create_dir_all(&plugins_dir).unwrap();
        for (name, lib, version) in &opts.packages {
            match &opts.trust.sign_with {
                None => {
                    install_package(&plugins_dir, name, version, lib, &PackageTweaks::default());
                }
                Some(key) => {
                    pack(&plugins_dir.join(name), lib, Some(key), &[]);
                }
            }
        }
        let metrics_port = free_port();
        let thresholds = dir.path().join("thresholds.toml");
        if let Some(t) = &opts.thresholds {
            std::fs::write(&thresholds, t).unwrap();
        }
        let mut cfg = format!(
            "plugins_dir = \"{}\"\nstate_dir = \"{}\"\n{}[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[admin]\nsocket = \"{}\"\n[probes]\nmode = \"{}\"\n{}[reload]\ndebounce = \"50ms\"\ntrial = \"{}\"\n",
            plugins_dir.display(),
            state_dir.display(),
            if opts.thresholds.is_some() {
                format!("thresholds = \"{}\"\n", thresholds.display())
            } else {
                String::new()
            },
            dir.path().join("admin.sock").display(),
            opts.probes,
            opts.ring_buffer_bytes
                .map(|b| format!("ring_buffer_bytes = {b}\n"))
                .unwrap_or_default(),
            opts.trial,
        );
        if let Some(t) = opts.init_timeout {
            let _ = writeln!(cfg, "init_timeout = \"{t}\"");
        }
        if let Some(drain) = opts.drain_timeout {
            let _ = write!(cfg, "[shutdown]\ndrain_timeout = \"{drain}\"\n");
        }
        if !opts.trust.public_keys.is_empty() || opts.trust.require_signature {
            let keys: Vec<String> = opts
                .trust
                .public_keys
                .iter()
                .map(|k| format!("{:?}", k.display().to_string()))
                .collect();
            let _ = write!(
                cfg,
                "[trust]\npublic_keys = [{}]\nrequire_signature = {}\n",
                keys.join(", "),
                opts.trust.require_signature
            );
        }
        for l in &opts.listeners {
            let _ = write!(
                cfg,
                "[[listener]]\nname = \"{}\"\nprotocol = \"{}\"\nbind = \"{}\"\nplugin = \"{}\"\n",
                l.name,
                l.protocol.as_str(),
                l.addr(),
                l.plugin
            );
            if let Some(t) = l.request_timeout {
                let _ = writeln!(cfg, "request_timeout = \"{t}\"");
            }
        }
        cfg.push_str(&opts.extra_config);
        let config = dir.path().join("plugvisor.toml");
        std::fs::write(&config, cfg).unwrap();
        let log = dir.path().join("plugvisor.log");
        let mut d = Daemon {
            child: None,
            successor: None,
            plugins_dir,
            state_dir,
            config,
            metrics_port,
            listeners: opts.listeners.clone(),
            log,
            dir,
            env: opts.env,
            wrapper: opts.wrapper,
            binary: opts.binary.unwrap_or_else(binary),
            packaged: opts.packages.iter().map(|p| p.0.clone()).collect(),
        };
        d.spawn();
        d
    }

    /// Sets (`Some`) or removes (`None`) an environment variable of the
    /// daemon for its next [`Daemon::restart`].
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
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
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(&self.binary),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.binary);
                c
            }
        };
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
            // A listener whose plugin has no package can only say so.
            let must_serve = self.packaged.contains(&l.plugin);
            wait_until(deadline, &format!("listener {} answers", l.name), || {
                self.assert_running();
                match l.protocol {
                    Protocol::Tcp => LineClient::connect(l.addr())
                        .ok()
                        .and_then(|mut c| c.call("ping").ok())
                        .is_some_and(|r| !r.starts_with("ERR")),
                    Protocol::Grpc => grpc_health(l.addr(), GRPC_SERVICE)
                        .is_ok_and(|s| s == ServingStatus::Serving || !must_serve),
                }
            });
        }
        wait_until(deadline, "metrics endpoint answers", || {
            self.try_metrics().is_some()
        });
    }

    /// `plugvisor upgrade --json` (to `binary`, default the daemon's own),
    /// as an operator runs it; returns its exit code and its JSON answer.
    /// When it succeeds the new process is the daemon under test from then
    /// on, and the old one has exited (within `wait_old`).
    pub fn upgrade(
        &mut self,
        binary: Option<&Path>,
        wait_old: Duration,
    ) -> (i32, serde_json::Value) {
        let mut args = vec!["upgrade".to_owned(), "--json".to_owned()];
        if let Some(b) = binary {
            args.push("--binary".to_owned());
            args.push(b.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = self.cli(&args);
        let answer: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("upgrade printed no JSON ({e}): {out:?} {err:?}"));
        if code == 0 {
            let new_pid = u32::try_from(answer["result"]["new_pid"].as_u64().unwrap()).unwrap();
            let old_pid = self.pid();
            assert_ne!(new_pid, old_pid);
            let deadline = Instant::now() + wait_old;
            wait_until(
                deadline,
                "the old process exits after the upgrade",
                || match (&mut self.child, self.successor) {
                    (Some(c), _) => c.try_wait().unwrap().is_some(),
                    (None, Some(pid)) => successor_status(pid).is_some(),
                    (None, None) => true,
                },
            );
            self.child = None;
            self.successor = Some(new_pid);
        }
        (code, answer)
    }

    /// From now on the daemon under test is process `pid` (one an upgrade
    /// started), the old one having exited: it is reaped here.
    pub fn follow(&mut self, pid: u32) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.successor = Some(pid);
    }

    /// Whether the daemon has exited (reaped; `restart` may follow).
    pub fn exited(&mut self) -> bool {
        if let Some(pid) = self.successor {
            let gone = successor_status(pid).is_some();
            if gone {
                self.successor = None;
            }
            return gone;
        }
        let exited = self
            .child
            .as_mut()
            .is_none_or(|c| c.try_wait().unwrap().is_some());
        if exited {
            self.child = None;
        }
        exited
    }

    /// Panics with the log if the daemon exited.
    pub fn assert_running(&mut self) {
        if let Some(pid) = self.successor {
            if let Some(status) = successor_status(pid) {
                panic!(
                    "plugvisor (pid {pid}, after an upgrade) exited with {status}; log:\n{}",
                    self.log_text()
                );
            }
            return;
        }
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("plugvisor exited with {status}; log:\n{}", self.log_text());
        }
    }

    /// Waits at most `timeout` for the daemon to exit on its own (a crash,
    /// say) and returns how it ended.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("daemon started");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "plugvisor still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.successor
            .unwrap_or_else(|| self.child.as_ref().unwrap().id())
    }

    /// The pids of the plugin hosts (`isolation = "process"`) this daemon
    /// runs now: its children running `plugvisor plugin-host`.
    pub fn plugin_hosts(&self) -> Vec<u32> {
        plugin_hosts_of(self.pid())
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGTERM, then waits for exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        if let Some(pid) = self.successor.take() {
            // SAFETY: kill(2) on the daemon under test.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(st) = successor_status(pid) {
                    return st.code();
                }
                assert!(
                    Instant::now() < deadline,
                    "plugvisor did not exit within 20 s of SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
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

    /// The thresholds file written for this daemon (rewrite it to change the rules).
    pub fn thresholds_path(&self) -> PathBuf {
        self.dir.path().join("thresholds.toml")
    }

    /// Installs `plugin` `version` the operator's way and waits (20 s at
    /// most) until the daemon reports it active and has recorded it
    /// (refs and journal: the version serves before the store's fsyncs
    /// make it durable, so a test that reads `state_dir` or kills the
    /// daemon next must wait for the record too); `what` names the wait.
    pub fn install_and_await(&self, plugin: &str, version: &str, lib: &Path, what: &str) {
        let recorded = || {
            self.journal()
                .iter()
                .filter(|e| {
                    e["plugin"] == plugin && e["event"] == "activated" && e["version"] == version
                })
                .count()
        };
        let before = recorded();
        install_package(
            &self.plugins_dir,
            plugin,
            version,
            lib,
            &PackageTweaks::default(),
        );
        wait_until(Instant::now() + Duration::from_secs(20), what, || {
            self.metrics().get(
                "plugvisor_plugin_info",
                &[
                    ("plugin", plugin),
                    ("version", version),
                    ("state", "active"),
                ],
            ) == Some(1.0)
                && recorded() > before
        });
    }

    /// The store's journal, parsed.
    pub fn journal(&self) -> Vec<serde_json::Value> {
        journal(&self.state_dir)
    }

    /// Kills the daemon with SIGKILL (no drain, no cleanup), as a crash would.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.successor.take() {
            kill_successor(pid);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `plugvisor status --json`'s result.
    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.cli(&["status", "--json"]);
        assert_eq!(code, 0, "status failed: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["result"].clone()
    }

    /// Address of the listener called `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|l| l.name == name)
            .expect("listener")
            .addr()
    }

    /// The JSON log lines logged since line `from` that start with
    /// "reload refused".
    pub fn refusals_since(&self, from: usize) -> Vec<serde_json::Value> {
        self.log_lines()
            .into_iter()
            .skip(from)
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("reload refused"))
            })
            .collect()
    }

    /// `plugvisor_reloads_total{plugin, outcome}` now (0 when absent).
    pub fn reloads(&self, plugin: &str, outcome: &str) -> u64 {
        self.metrics()
            .get(
                "plugvisor_reloads_total",
                &[("plugin", plugin), ("outcome", outcome)],
            )
            .map_or(0, |v| v as u64)
    }

    /// The version the TCP listener `listener` answers with now.
    pub fn serving(&self, listener: &str) -> Option<String> {
        LineClient::connect(self.addr(listener))
            .and_then(|mut c| c.call("version?"))
            .ok()
            .and_then(|r| echo_version(&r).map(str::to_owned))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.successor.take() {
            kill_successor(pid);
        }
        reap(self.child.take(), "plugvisor", || self.log_text());
    }
}

/// The pids of the plugin hosts whose parent is process `parent`.
pub fn plugin_hosts_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, …
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && cmdline.split(|b| *b == 0).any(|a| a == b"plugin-host") {
            out.push(pid);
        }
    }
    out
}

/// A process's parent and state letter (from `/proc/PID/stat`).
pub fn parent_and_state(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((ppid, state))
}

/// The pids of the live plugin hosts (not zombies) running objects from
/// the store under `state_dir`, whoever their parent is: a host adopted
/// across an upgrade is no longer the daemon's child.
pub fn plugin_hosts_of_store(state_dir: &Path) -> Vec<u32> {
    let prefix = state_dir.as_os_str().as_encoded_bytes();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|b| *b == 0);
        let is_host = args.clone().any(|a| a == b"plugin-host");
        if is_host
            && args.any(|a| a.starts_with(prefix))
            && parent_and_state(pid).is_some_and(|(_, s)| s != 'Z' && s != 'X')
        {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
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

/// Kills and reaps a child process a test owns; when the test is failing,
/// prints the child's log so the failure explains itself.
pub(crate) fn reap(child: Option<Child>, name: &str, log: impl FnOnce() -> String) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
    if std::thread::panicking() {
        eprintln!("--- {name} log ---\n{}", log());
    }
}

/// Makes this test process the child subreaper (`PR_SET_CHILD_SUBREAPER`):
/// a daemon that an upgrade started becomes its child when the old daemon
/// exits, so it can be reaped and its exit status read. For test binaries
/// that upgrade (each test file is a process of its own).
pub fn become_subreaper() {
    // SAFETY: prctl with an integer argument.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
}

/// How a process the test did not spawn ended, if it did: reaped when it
/// is our child (after reparenting), else judged from `/proc` (status
/// unknown: reported as 0).
fn successor_status(pid: u32) -> Option<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt as _;
    let mut status = 0;
    // SAFETY: waitpid on one pid with WNOHANG.
    let rc = unsafe { libc::waitpid(pid as i32, &raw mut status, libc::WNOHANG) };
    if rc == pid as i32 {
        return Some(std::process::ExitStatus::from_raw(status));
    }
    if rc == 0 {
        return None;
    }
    // Not (yet) our child: alive unless /proc says it is gone or a zombie.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat)
            if !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z') =>
        {
            None
        }
        _ => Some(std::process::ExitStatus::from_raw(0)),
    }
}

fn kill_successor(pid: u32) {
    // SAFETY: kill(2) on the daemon under test.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while successor_status(pid).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Journal entries of `state_dir` (parsed JSON lines).
pub fn journal(state_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state_dir.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
