//! A real Prometheus server scraping the daemon, for the tests that prove
//! the shipped rules and dashboards' queries work against real data.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::reap;
use crate::{free_port, http_get_status, tool, url_encode, wait_until};

/// A real Prometheus server on loopback with its own config and storage in
/// a temp directory. Killed (and its directory removed) on drop.
pub struct Prometheus {
    child: Option<Child>,
    /// Temp directory holding `prometheus.yml`, the TSDB and the log.
    pub dir: tempfile::TempDir,
    /// `--web.listen-address`.
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts `prometheus` scraping `targets` (host:port) every second as
    /// job `plugvisor`, evaluating `rule_files` every second, and waits
    /// until it is ready.
    pub fn start(targets: &[SocketAddr], rule_files: &[PathBuf]) -> Prometheus {
        let binary = tool("prometheus").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|r| format!("\"{}\"", r.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: plugvisor\n    static_configs:\n      - targets: [{}]\n",
            rules.join(", "),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut p = Prometheus {
            child: Some(child),
            dir,
            addr,
        };
        wait_until(
            Instant::now() + Duration::from_secs(30),
            "prometheus is ready",
            || {
                p.assert_running();
                http_get_status(addr, "/-/ready").is_ok_and(|(code, _)| code == 200)
            },
        );
        p
    }

    /// Panics with the log if Prometheus exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("prometheus exited with {status}; log:\n{}", self.log_text());
        }
    }

    /// Everything Prometheus logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GETs `path` of the HTTP API and returns its `data`, or the API's
    /// error (`errorType: error`) as a string.
    pub fn api(&self, path: &str) -> Result<serde_json::Value, String> {
        let (code, body) = http_get_status(self.addr, path).map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {code}, not JSON ({e}): {body}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!("HTTP {code}: {}: {}", v["errorType"], v["error"]))
        }
    }

    /// An instant query (`/api/v1/query`) evaluated now; its result vector.
    pub fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        match data["result"].as_array() {
            Some(r) => Ok(r.clone()),
            // A scalar or string result: one value.
            None => Ok(vec![data["result"].clone()]),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        reap(self.child.take(), "prometheus", || self.log_text());
    }
}

/// A Grafana query made runnable: the variables set to "everything" and
/// the intervals to a window of `window_s` seconds that covers the
/// scenario.
pub fn runnable(expr: &str, window_s: u64) -> String {
    let w = format!("{window_s}s");
    let out = expr
        .replace("$__rate_interval", &w)
        .replace("$__interval", &w)
        .replace("$__range", &w)
        .replace("$job", "plugvisor")
        .replace("$instance", ".*")
        .replace("$plugin", ".*")
        .replace("$listener", ".*");
    assert!(
        !out.contains('$'),
        "a Grafana variable this test does not know: {expr}"
    );
    out
}
