//! The MQTT connection (rumqttc): connect and reconnect with backoff, the
//! Last Will, and which PUBACK acknowledges which event.
//!
//! rumqttc tells a publish's packet id only as an `Outgoing::Publish(pkid)`
//! event, in the order the publishes were queued; [`Link::publish`] queues
//! the event's sequence number in that same order, under one lock with the
//! queueing itself, so the two cannot drift. When the connection drops,
//! rumqttc would resend its in-flight publishes on its own; the link drops
//! them instead (with its queue, under the same lock): the outbox is the
//! one place unacknowledged events are kept, and the reporter replays it,
//! in order, after the next CONNACK.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use super::ReportError;
use super::payload;
use crate::config::{MqttConfig, MqttCredentials};

/// At most this many publishes wait for their PUBACK at once.
pub const MAX_INFLIGHT: usize = 32;
/// The first wait before a reconnect; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The largest packet sent or accepted (rumqttc's default is 10 KiB).
const MAX_PACKET: usize = 256 << 10;

/// What the connection tells the reporter.
#[derive(Debug)]
pub enum LinkEvent {
    /// CONNACK: a birth is due (this is its number).
    Connected {
        /// The birth number the Last Will of this connection carries.
        birth: u64,
    },
    /// The broker acknowledged the event with this sequence number.
    Acked(u64),
    /// A publish that was not an event (a state, a birth) was acknowledged.
    AckedOther,
    /// The connection failed or dropped; the reporter stops publishing
    /// until the next `Connected`.
    Disconnected {
        /// Why, in words.
        error: String,
        /// The broker refused the credentials (or the client id): the
        /// operator has something to fix.
        refused: bool,
    },
}

#[derive(Default)]
struct Queue {
    connected: bool,
    // Queued in rumqttc's channel, not yet given a packet id: the event's
    // sequence, or `None` for a state or birth.
    queued: VecDeque<Option<u64>>,
    // Sent, waiting for a PUBACK.
    inflight: HashMap<u16, Option<u64>>,
}

/// The reporter's side of the connection.
pub struct Link {
    client: AsyncClient,
    queue: Arc<Mutex<Queue>>,
    stopping: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Where the topics are and what the node is called.
#[derive(Debug, Clone)]
pub struct Topics {
    /// The node's name in every payload (the client id).
    pub node: String,
    /// The topic prefix.
    pub prefix: String,
}

impl Topics {
    /// `<prefix>/node`: the retained birth and death.
    pub fn node_topic(&self) -> String {
        format!("{}/node", self.prefix)
    }
    /// `<prefix>/event`.
    pub fn event_topic(&self) -> String {
        format!("{}/event", self.prefix)
    }
    /// `<prefix>/plugin/<name>`: the retained state.
    pub fn plugin_topic(&self, plugin: &str) -> String {
        format!("{}/plugin/{plugin}", self.prefix)
    }
}

impl Link {
    /// Starts connecting to the broker with `options` (from [`options`]);
    /// what happens arrives on the returned channel. `births` gives each
    /// connection attempt its birth number, which its Last Will carries.
    pub fn start(
        options: MqttOptions,
        topics: &Topics,
        mut births: impl FnMut() -> u64 + Send + 'static,
    ) -> (Link, mpsc::UnboundedReceiver<LinkEvent>) {
        let (client, mut eventloop) = AsyncClient::new(options, MAX_INFLIGHT * 2);
        let (events, events_rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Mutex::new(Queue::default()));
        let stopping = Arc::new(AtomicBool::new(false));
        let will_topic = topics.node_topic();
        let node = topics.node.clone();
        let task = {
            let queue = queue.clone();
            let stopping = stopping.clone();
            tokio::spawn(async move {
                let mut birth = births();
                set_will(&mut eventloop, &will_topic, &node, birth);
                let mut backoff = FIRST_BACKOFF;
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            backoff = FIRST_BACKOFF;
                            let mut q = queue.lock().expect("link queue");
                            q.connected = true;
                            q.queued.clear();
                            q.inflight.clear();
                            let _ = events.send(LinkEvent::Connected { birth });
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            let mut q = queue.lock().expect("link queue");
                            if let Some(seq) = q.queued.pop_front() {
                                q.inflight.insert(pkid, seq);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            let acked =
                                queue.lock().expect("link queue").inflight.remove(&ack.pkid);
                            let _ = events.send(match acked {
                                Some(Some(seq)) => LinkEvent::Acked(seq),
                                _ => LinkEvent::AckedOther,
                            });
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                            if stopping.load(Ordering::Acquire) {
                                // Give the DISCONNECT a moment on the wire.
                                let _ = tokio::time::timeout(
                                    Duration::from_millis(200),
                                    eventloop.poll(),
                                )
                                .await;
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if stopping.load(Ordering::Acquire) {
                                return;
                            }
                            {
                                let mut q = queue.lock().expect("link queue");
                                q.connected = false;
                                // What rumqttc would resend, and what is
                                // still in its channel: the outbox replays
                                // the events; states and births are sent
                                // afresh.
                                eventloop.clean();
                                eventloop.pending.clear();
                                q.queued.clear();
                                q.inflight.clear();
                            }
                            let refused = matches!(
                                e,
                                ConnectionError::ConnectionRefused(
                                    ConnectReturnCode::BadUserNamePassword
                                        | ConnectReturnCode::NotAuthorized
                                        | ConnectReturnCode::BadClientId
                                )
                            );
                            let _ = events.send(LinkEvent::Disconnected {
                                error: describe(&e),
                                refused,
                            });
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            birth = births();
                            set_will(&mut eventloop, &will_topic, &node, birth);
                        }
                    }
                }
            })
        };
        (
            Link {
                client,
                queue,
                stopping,
                task,
            },
            events_rx,
        )
    }

    /// Queues a QoS 1 publish if the link is up and not full; `sequence`
    /// names the event it carries (`None`: a state or birth). False when
    /// it was not queued (down, or full: try again after the next ack).
    pub fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        sequence: Option<u64>,
    ) -> bool {
        let mut q = self.queue.lock().expect("link queue");
        if !q.connected || q.queued.len() + q.inflight.len() >= MAX_INFLIGHT {
            return false;
        }
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
            .is_err()
        {
            return false;
        }
        q.queued.push_back(sequence);
        true
    }

    /// Whether a CONNACK came and nothing failed since.
    pub fn connected(&self) -> bool {
        self.queue.lock().expect("link queue").connected
    }

    /// How many publishes wait for a PUBACK (or for a packet id).
    pub fn outstanding(&self) -> usize {
        let q = self.queue.lock().expect("link queue");
        q.queued.len() + q.inflight.len()
    }

    /// Sends DISCONNECT (so the broker does not publish the Last Will) and
    /// waits, boundedly, for the connection to end.
    pub async fn close(self, within: Duration) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.client.try_disconnect();
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// The client's options for `config` as `client_id`: keep-alive,
/// persistent session, credentials, TLS. Everything `[report.mqtt]` names
/// is read here, so a bad file is an error at the start.
pub fn options(config: &MqttConfig, client_id: &str) -> Result<MqttOptions, ReportError> {
    let broker = config.broker_addr().map_err(ReportError::Config)?;
    let mut options = MqttOptions::new(client_id, broker.host, broker.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_session(false)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_inflight(u16::try_from(MAX_INFLIGHT).expect("small"));
    if let Some(MqttCredentials { username, password }) =
        config.read_credentials().map_err(ReportError::Config)?
    {
        options.set_credentials(username, password);
    }
    if broker.tls {
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(tls(
            config,
        )?))));
    }
    Ok(options)
}

fn set_will(eventloop: &mut EventLoop, topic: &str, node: &str, birth: u64) {
    // The death the broker publishes for this connection if it ends
    // without a DISCONNECT. Its next_sequence is unknown here (0).
    let death = payload::node(node, false, birth, 0).encode_to_vec();
    eventloop
        .mqtt_options
        .set_last_will(LastWill::new(topic, death, QoS::AtLeastOnce, true));
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection: {code:?}")
        }
        other => other.to_string(),
    }
}

/// The rustls client config for `mqtts://`: the CA file's certificates as
/// the only roots, and the client certificate if one is configured.
fn tls(config: &MqttConfig) -> Result<rustls::ClientConfig, ReportError> {
    let read = |key: &str, path: &std::path::Path| -> Result<Vec<pem::Pem>, ReportError> {
        let text = std::fs::read(path)
            .map_err(|e| ReportError::Config(format!("{key} {}: {e}", path.display())))?;
        pem::parse_many(text)
            .map_err(|e| ReportError::Config(format!("{key} {}: {e}", path.display())))
    };
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &config.ca_file {
        for p in read("ca_file", ca)?
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
        {
            roots
                .add(p.into_contents().into())
                .map_err(|e| ReportError::Config(format!("ca_file {}: {e}", ca.display())))?;
        }
        if roots.is_empty() {
            return Err(ReportError::Config(format!(
                "ca_file {}: no CERTIFICATE in it",
                ca.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ReportError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read("cert_file", cert)?
                .into_iter()
                .filter(|p| p.tag() == "CERTIFICATE")
                .map(|p| p.into_contents().into())
                .collect();
            let k = read("key_file", key)?
                .into_iter()
                .find_map(|p| {
                    let der = p.contents().to_vec();
                    match p.tag() {
                        "PRIVATE KEY" => Some(rustls::pki_types::PrivateKeyDer::Pkcs8(der.into())),
                        "RSA PRIVATE KEY" => {
                            Some(rustls::pki_types::PrivateKeyDer::Pkcs1(der.into()))
                        }
                        "EC PRIVATE KEY" => {
                            Some(rustls::pki_types::PrivateKeyDer::Sec1(der.into()))
                        }
                        _ => None,
                    }
                })
                .ok_or_else(|| {
                    ReportError::Config(format!("key_file {}: no private key in it", key.display()))
                })?;
            builder
                .with_client_auth_cert(chain, k)
                .map_err(|e| ReportError::Config(format!("cert_file {}: {e}", cert.display())))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}
