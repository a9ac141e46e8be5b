//! The coordinator's side of `[report.mqtt]`: Debian's mosquitto on a
//! loopback port (persistence on, so retained messages and queued QoS 1
//! messages outlive a restart), and a subscriber — rumqttc, the client a
//! coordinator written in Rust would use — that records every message.
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;

use crate::free_port;
use crate::report_pb;

/// A running mosquitto.
pub struct Mosquitto {
    dir: tempfile::TempDir,
    port: u16,
    credentials: Option<(String, String)>,
    // A second listener speaking TLS (with client certificates), and the
    // PKI it uses.
    tls: Option<(u16, PathBuf, PathBuf, PathBuf)>,
    child: Option<Child>,
}

impl Mosquitto {
    /// A broker on a free loopback port; with `credentials`, only that user
    /// (and no anonymous client) may connect.
    pub fn start(credentials: Option<(&str, &str)>) -> Mosquitto {
        let mut m = Mosquitto {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            tls: None,
            child: None,
        };
        m.prepare();
        m.spawn();
        m
    }

    /// A broker with a plain listener (for the test's subscriber) and a TLS
    /// one whose certificate `pki`'s CA signed, and which wants a client
    /// certificate from that CA too.
    pub fn start_tls(pki: &TestPki) -> Mosquitto {
        let mut m = Mosquitto {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            credentials: None,
            tls: Some((
                free_port(),
                pki.ca(),
                pki.file("server.pem"),
                pki.file("server.key"),
            )),
            child: None,
        };
        m.prepare();
        m.spawn();
        m
    }

    /// `mqtts://127.0.0.1:PORT` of the TLS listener.
    pub fn tls_url(&self) -> String {
        format!(
            "mqtts://127.0.0.1:{}",
            self.tls.as_ref().expect("a TLS broker").0
        )
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops it (SIGTERM: it saves its database — retained messages and
    /// the persistent sessions' queues — as it exits).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts it again on the same port, with what it saved.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn prepare(&self) {
        let d = self.dir.path();
        // The broker drops to its own user when started as root: it must
        // reach the directory and write its database and log there.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = d.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let log = d.join("mosquitto.log");
        std::fs::write(&log, "").unwrap();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            let (uid, gid) = mosquitto_user();
            for p in [&data, &log] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let auth = match &self.credentials {
            Some((user, password)) => {
                let file = d.join("passwd");
                let out = Command::new("mosquitto_passwd")
                    .arg("-c")
                    .arg("-b")
                    .arg(&file)
                    .arg(user)
                    .arg(password)
                    .output()
                    .expect("mosquitto_passwd (apt package mosquitto)");
                assert!(out.status.success(), "{out:?}");
                if root {
                    let (uid, gid) = mosquitto_user();
                    std::os::unix::fs::chown(&file, Some(uid), Some(gid)).unwrap();
                }
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
                format!("allow_anonymous false\npassword_file {}\n", file.display())
            }
            None => "allow_anonymous true\n".to_owned(),
        };
        let tls = match &self.tls {
            Some((port, ca, cert, key)) => {
                // Its copies, readable by the user it drops to.
                let copy = |from: &PathBuf, name: &str| {
                    let to = d.join(name);
                    std::fs::copy(from, &to).unwrap();
                    if root {
                        let (uid, gid) = mosquitto_user();
                        std::os::unix::fs::chown(&to, Some(uid), Some(gid)).unwrap();
                    }
                    to.display().to_string()
                };
                format!(
                    "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
                    copy(ca, "ca.pem"),
                    copy(cert, "server.pem"),
                    copy(key, "server.key")
                )
            }
            None => String::new(),
        };
        let conf = format!(
            "{auth}persistence true\npersistence_location {data}/\nlog_dest file {log}\nlog_type all\nlistener {port} 127.0.0.1\n{tls}",
            port = self.port,
            data = data.display(),
            log = log.display(),
        );
        std::fs::write(d.join("mosquitto.conf"), conf).unwrap();
    }

    fn spawn(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mosquitto (apt package mosquitto; cargo xtask setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {}: {}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A test PKI made with openssl: a CA, a server certificate for
/// 127.0.0.1 and a client certificate, all P-256, valid two days.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    /// Makes one.
    pub fn new() -> TestPki {
        let pki = TestPki {
            dir: tempfile::tempdir().unwrap(),
        };
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(pki.dir.path())
                .output()
                .expect("openssl (apt package openssl)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend_from_slice(&ec);
        ca.extend_from_slice(&[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=plugvisor test CA",
        ]);
        openssl(&ca);
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(pki.file(&format!("{name}.ext")), ext).unwrap();
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let pem = format!("{name}.pem");
            let extfile = format!("{name}.ext");
            let subj = format!("/CN=plugvisor test {name}");
            let mut req = vec!["req"];
            req.extend_from_slice(&ec);
            req.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(&req);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ]);
        }
        pki
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// A file of it: `server.pem`, `server.key`, `client.pem`,
    /// `client.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

fn mosquitto_user() -> (u32, u32) {
    let name = std::ffi::CString::new("mosquitto").unwrap();
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no user mosquitto (apt package mosquitto)");
    // SAFETY: checked non-null above.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

/// One message as the subscriber received it.
#[derive(Debug, Clone)]
pub struct Message {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Whether the broker sent it as a retained message (on subscribe).
    pub retain: bool,
    /// When the subscriber got it.
    pub received: std::time::SystemTime,
}

/// A QoS 1 subscriber with a persistent session (what it misses while
/// away is queued for it by the broker), recording every message.
pub struct Subscriber {
    client: rumqttc::AsyncClient,
    messages: Arc<Mutex<Vec<Message>>>,
    connected: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscriber {
    /// Subscribes to `filter` on `broker` as client `id`, and waits for
    /// the subscription to stand.
    pub fn start(broker: &Mosquitto, id: &str, filter: &str) -> Subscriber {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", broker.port());
        options
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        if let Some((u, p)) = &broker.credentials {
            options.set_credentials(u, p);
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let connected = Arc::new(AtomicBool::new(false));
        let thread = {
            let messages = messages.clone();
            let connected = connected.clone();
            let client = client.clone();
            let filter = filter.to_owned();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    loop {
                        match eventloop.poll().await {
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                                // Again on each connect: a broker that lost
                                // the session still has the subscription.
                                let _ = client
                                    .subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce)
                                    .await;
                            }
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                                connected.store(true, Ordering::Release);
                            }
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                                messages.lock().unwrap().push(Message {
                                    topic: p.topic.clone(),
                                    payload: p.payload.to_vec(),
                                    retain: p.retain,
                                    received: std::time::SystemTime::now(),
                                });
                            }
                            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                            Ok(_) => {}
                            Err(_) => {
                                connected.store(false, Ordering::Release);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                });
            })
        };
        let s = Subscriber {
            client,
            messages,
            connected,
            thread: Some(thread),
        };
        s.await_connected();
        s
    }

    /// Waits (10 s at most) until the subscription stands again.
    pub fn await_connected(&self) {
        crate::wait_until(
            Instant::now() + Duration::from_secs(10),
            "the subscriber is subscribed",
            || self.connected.load(Ordering::Acquire),
        );
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }

    /// The events received so far (topic `…/event`), decoded, duplicates
    /// included.
    pub fn events(&self) -> Vec<report_pb::Event> {
        self.messages()
            .iter()
            .filter(|m| m.topic.ends_with("/event"))
            .map(|m| report_pb::Event::decode(m.payload.as_slice()).expect("an Event"))
            .collect()
    }

    /// The events with each sequence once, in sequence order: what a
    /// consumer that drops duplicates keeps.
    pub fn unique_events(&self) -> Vec<report_pb::Event> {
        let mut seen = std::collections::BTreeMap::new();
        for e in self.events() {
            seen.entry(e.sequence).or_insert(e);
        }
        seen.into_values().collect()
    }

    /// The last node birth or death received.
    pub fn last_node(&self) -> Option<report_pb::Node> {
        self.messages()
            .iter()
            .rev()
            .find(|m| m.topic.ends_with("/node"))
            .map(|m| report_pb::Node::decode(m.payload.as_slice()).expect("a Node"))
    }

    /// The last state received for `plugin` (`None` if none, or if it was
    /// cleared).
    pub fn last_state(&self, plugin: &str) -> Option<report_pb::PluginState> {
        let suffix = format!("/plugin/{plugin}");
        self.messages()
            .iter()
            .rev()
            .find(|m| m.topic.ends_with(&suffix))
            .filter(|m| !m.payload.is_empty())
            .map(|m| report_pb::PluginState::decode(m.payload.as_slice()).expect("a PluginState"))
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        if let Some(t) = self.thread.take() {
            // The disconnect ends its loop; a broker already gone does not
            // hold the test up.
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
