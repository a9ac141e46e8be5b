//! Debian's nginx on a loopback port, serving a directory: the HTTP server
//! of a TUF repository in the sync tests (it answers range requests, as a
//! CDN or a caching mirror does). Started and stopped by the test; its
//! access log says what each node fetched.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// A running nginx.
pub struct Nginx {
    dir: tempfile::TempDir,
    root: PathBuf,
    port: u16,
    limit_rate: Option<String>,
    /// `worker_connections`, and the descriptors the worker may open.
    connections: usize,
    child: Option<Child>,
}

impl Nginx {
    /// Serves `root` on a free loopback port; `limit_rate` (nginx's
    /// spelling, e.g. `"256k"`) slows every response, so a test can stop
    /// the server in the middle of a download.
    pub fn start(root: &Path, limit_rate: Option<&str>) -> Nginx {
        let mut n = Nginx {
            dir: tempfile::tempdir().unwrap(),
            root: root.to_owned(),
            port: free_port(),
            limit_rate: limit_rate.map(str::to_owned),
            connections: 256,
            child: None,
        };
        n.spawn();
        n
    }

    /// Serves `root` with room for `connections` open at once, each kept
    /// alive for ten minutes: the peer of the connection sweep in
    /// `cargo xtask bench`, as an operator would size it.
    pub fn start_for_connections(root: &Path, connections: usize) -> Nginx {
        let mut n = Nginx {
            dir: tempfile::tempdir().unwrap(),
            root: root.to_owned(),
            port: free_port(),
            limit_rate: None,
            connections,
            child: None,
        };
        n.spawn();
        n
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The worker's process id (one process: no master).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The base URL of `sub` (`metadata`, `targets`) of the served root.
    pub fn url(&self, sub: &str) -> String {
        format!("http://127.0.0.1:{}/{sub}", self.port)
    }

    /// Its access log: one `"METHOD PATH STATUS BYTES RANGE"` per request.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Stops it (the port stays this server's: `restart` binds it again).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let d = self.dir.path();
        for t in ["client", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(d.join(t)).unwrap();
        }
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            // Workers would drop to nobody, who cannot read a test's
            // private temp directories.
            "user root;"
        } else {
            ""
        };
        let rate = self
            .limit_rate
            .as_deref()
            .map_or_else(String::new, |r| format!("limit_rate {r};"));
        let conf = format!(
            r"{user}
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connections}; }}
http {{
    log_format plain '$request_method $uri $status $body_bytes_sent $http_range';
    access_log {d}/access.log plain;
    client_body_temp_path {d}/client;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {rate}
        location / {{ }}
    }}
}}
",
            d = d.display(),
            port = self.port,
            root = self.root.display(),
            connections = self.connections,
            nofile = self.connections * 2 + 64,
        );
        let path = d.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx (apt package nginx-light; cargo xtask setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {}: {}",
                self.port,
                std::fs::read_to_string(d.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
