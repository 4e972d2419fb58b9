//! The MQTT session: store-and-forward for every durable record (status, drift, heartbeats,
//! delivery events) and the desired-state notification that wakes the updater.
//!
//! A record is written to the `agent.db` outbox first, which gives it its sequence number, then
//! published (QoS 1) in a signed [`proto::delivery::Envelope`]. It is deleted only when the
//! server's [`Ack`] says it is stored: a broker's PUBACK is not storage. A record not
//! acknowledged in time (`ack_timeout`, or longer when acknowledgements have been taking longer:
//! [`ack_timer`]) or sent on a connection that dropped is published again;
//! the server recognises the sequence and acknowledges without storing twice (ADR 0007). At
//! most `WINDOW` records are unacknowledged at once, oldest first, so a site that returns after
//! a long outage drains its backlog at the pace the server stores it.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::delivery::{sealed_payload, Ack, Priority, MAX_RECORD_BODY};
use proto::keys::SigningKey;
use proto::wire::{decode, encode, Topic, UpdateStatus, MAX_MQTT_PAYLOAD};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::TelemetrySink;
use crate::updater::UpdaterMsg;
use ack_timer::AckTimer;
use outbox::{Outbox, OutboxError, OutboxRow, PendingQuery};

pub mod ack_timer;
pub mod outbox;

#[derive(Debug, Error)]
pub enum UplinkError {
    #[error(transparent)]
    BadUrl(#[from] proto::endpoint::BadMqttUrl),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("MQTT over TLS: {0}")]
    Tls(String),
}

struct Record {
    topic: String,
    body: Vec<u8>,
    priority: Priority,
}

/// Cheap to clone; every clone feeds the same MQTT session.
#[derive(Clone)]
pub struct UplinkHandle {
    tx: mpsc::Sender<Record>,
    device_id: String,
}

impl UplinkHandle {
    pub async fn status(&self, status: UpdateStatus) {
        let topic = Topic::Status { device: self.device_id.clone(), model: status.model.clone() }.render();
        self.send(topic, encode(&status), Priority::Report).await;
    }

    pub async fn drift(&self, summary: &proto::wire::DriftSummary) {
        let topic = Topic::Drift { device: self.device_id.clone(), model: summary.model.clone() }.render();
        self.send(topic, encode(summary), Priority::Report).await;
    }

    /// Heartbeats are durable too (their counters feed the rollout gates), but evicted before
    /// reports when the disk budget is short.
    pub async fn heartbeat(&self, heartbeat: &proto::wire::Heartbeat) {
        let topic = Topic::Heartbeat { device: self.device_id.clone() }.render();
        self.send(topic, encode(heartbeat), Priority::Heartbeat).await;
    }

    async fn send(&self, topic: String, body: Vec<u8>, priority: Priority) {
        if body.len() > MAX_RECORD_BODY {
            tracing::error!(%topic, bytes = body.len(), "record over the MQTT payload limit not sent");
            return;
        }
        let _ = self.tx.send(Record { topic, body, priority }).await;
    }
}

pub struct UplinkConfig {
    pub mqtt_url: String,
    pub device_id: String,
    pub credential: String,
    /// Signs every record published (ADR 0008).
    pub device_key: SigningKey,
    pub outbox: Outbox,
    /// Its eviction count goes into the delivery event sent on each connection.
    pub telemetry: TelemetrySink,
    /// How long a published record waits for the server's acknowledgement before it is sent
    /// again, at least: longer once acknowledgements are seen to take longer ([`AckTimer`]).
    pub ack_timeout: Duration,
    /// The pinned CA for `mqtts://` (required for it).
    pub ca_pem: Option<Vec<u8>>,
}

/// Most records published and not yet acknowledged, and most bytes of them read at once: enough
/// in flight to cover the round trip to the server's store (see the delivery benchmark), little
/// enough memory for a small device. The window in use starts at `WINDOW_MIN`, grows by one per
/// record acknowledged, and halves when an acknowledgement is overdue (a busy server is not
/// buried in resends), never below `WINDOW_MIN`.
const WINDOW: usize = 512;
const WINDOW_MIN: usize = 32;
const WINDOW_BYTES: usize = 1 << 20;

/// A record published on this connection and not yet acknowledged.
struct InFlight {
    /// When it was first published on this connection.
    first_sent: Instant,
    /// When it is sent again unless acknowledged first.
    due: Instant,
    sends: u32,
}

pub async fn spawn_uplink(
    config: UplinkConfig,
    updater: mpsc::Sender<UpdaterMsg>,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> Result<UplinkHandle, UplinkError> {
    let broker = proto::endpoint::parse_broker_url(&config.mqtt_url)?;
    let mut options = MqttOptions::new(format!("agent-{}", config.device_id), broker.host, broker.port);
    if broker.tls {
        let pem = config.ca_pem.as_deref().ok_or(UplinkError::Tls("mqtts:// needs ca_file".into()))?;
        let tls = crate::http::rustls_trusting(pem).map_err(UplinkError::Tls)?;
        options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            std::sync::Arc::new(tls),
        )));
    }
    options.set_keep_alive(Duration::from_secs(15));
    options.set_max_packet_size(MAX_MQTT_PAYLOAD + 1024, MAX_MQTT_PAYLOAD + 1024);
    options.set_credentials(config.device_id.clone(), config.credential.clone());
    options.set_inflight(WINDOW as u16);
    let (client, mut eventloop) = AsyncClient::new(options, WINDOW * 2);
    // Small packets (records, acknowledgements) go out at once instead of waiting on Nagle's
    // algorithm for the peer's delayed ACK.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (tx, rx) = mpsc::channel(256);
    let device_id = config.device_id.clone();
    let ack_timer = AckTimer::new(config.ack_timeout);
    let session = Session {
        client,
        updater,
        desired: Topic::Desired { device: device_id.clone() }.render(),
        ack: Topic::Ack { device: device_id.clone() }.render(),
        events: Topic::Events { device: device_id.clone() }.render(),
        config,
        unacked: BTreeMap::new(),
        ack_timer,
        window: WINDOW_MIN,
        floor: 0,
        backlog: true,
        connected: false,
    };
    tasks.spawn(session.run(eventloop, rx, cancel));
    Ok(UplinkHandle { tx, device_id })
}

struct Session {
    client: AsyncClient,
    updater: mpsc::Sender<UpdaterMsg>,
    config: UplinkConfig,
    desired: String,
    ack: String,
    events: String,
    /// Published on this connection and not yet acknowledged: sequence -> when.
    unacked: BTreeMap<u64, InFlight>,
    /// How long acknowledgements take, hence how long a record waits before it is sent again.
    ack_timer: AckTimer,
    /// How many records may be in flight now (`WINDOW_MIN..=WINDOW`).
    window: usize,
    /// The last floor the outbox reported; it only rises, and a stale one is safe to send.
    floor: u64,
    /// Records may wait in the outbox that were never published on this connection.
    backlog: bool,
    connected: bool,
}

impl Session {
    async fn run(mut self, mut eventloop: EventLoop, mut rx: mpsc::Receiver<Record>, cancel: CancellationToken) {
        let mut retry = tokio::time::interval(Duration::from_millis(500));
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                record = rx.recv() => match record {
                    Some(record) => self.accept(record).await,
                    None => break,
                },
                _ = retry.tick(), if self.connected => self.resend_due().await,
                event = eventloop.poll() => match event {
                    Ok(event) => {
                        backoff = Duration::from_millis(100);
                        self.on_event(event).await;
                    }
                    Err(e) => {
                        if self.connected {
                            tracing::warn!(device = %self.config.device_id, error = %e, "MQTT connection lost");
                        }
                        self.connected = false;
                        // rumqttc moved unacked publishes and queued requests into `pending`;
                        // drop them all: the outbox publishes every unacknowledged record again.
                        self.unacked.clear();
                        self.backlog = true;
                        eventloop.pending.clear();
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                },
            }
        }
        // Say goodbye so the broker does not wait for the keep-alive to expire.
        if self.connected && self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
        }
    }

    async fn accept(&mut self, record: Record) {
        let Record { topic, body, priority } = record;
        match self.config.outbox.push(topic.clone(), body.clone(), priority).await {
            // Straight out only when nothing older waits, so records leave in sequence order.
            Ok(seq) if self.connected && !self.backlog && self.unacked.len() < self.window => {
                self.publish(OutboxRow { seq, topic, body });
            }
            Ok(_) => self.backlog = true,
            Err(e) => tracing::error!(error = %e, "outbox write failed; record lost"),
        }
    }

    /// False when the client's queue is full: the record stays waiting for the next round.
    fn publish(&mut self, row: OutboxRow) -> bool {
        let payload = sealed_payload(&self.config.device_key, &row.topic, row.seq, self.floor, &row.body);
        let sent = self.client.try_publish(row.topic, QoS::AtLeastOnce, false, payload).is_ok();
        if sent {
            let now = Instant::now();
            let (first_sent, sends) = self.unacked.get(&row.seq).map_or((now, 1), |f| (f.first_sent, f.sends + 1));
            let due = now + self.ack_timer.wait(sends);
            self.unacked.insert(row.seq, InFlight { first_sent, due, sends });
        } else {
            self.backlog = true;
        }
        sent
    }

    /// Publishes, oldest first and up to the window, the records never published on this
    /// connection and those whose acknowledgement is overdue.
    async fn resend_due(&mut self) {
        let now = Instant::now();
        let overdue = self.unacked.values().any(|f| f.due <= now);
        if !self.backlog && !overdue {
            return;
        }
        if overdue {
            self.window = (self.window / 2).max(WINDOW_MIN);
        }
        // Records leave in sequence order, so every waiting record up to the newest one in flight
        // was published on this connection: without an overdue one, read only after it.
        let (after, rows) = if overdue {
            (0, self.window.max(self.unacked.len()))
        } else {
            (self.unacked.keys().next_back().copied().unwrap_or(0), self.window.saturating_sub(self.unacked.len()))
        };
        let query = PendingQuery { after, rows, bytes: WINDOW_BYTES };
        let pending = match self.config.outbox.pending(query).await {
            Ok(pending) => pending,
            Err(e) => return tracing::error!(error = %e, "outbox read failed"),
        };
        self.floor = self.floor.max(pending.floor);
        self.backlog = pending.more;
        for row in pending.rows {
            let publish = match self.unacked.get(&row.seq) {
                Some(in_flight) => in_flight.due <= now,
                None => self.unacked.len() < self.window,
            };
            if !publish {
                // Not yet due, or no room: a newer record waits for the next round.
                self.backlog |= !self.unacked.contains_key(&row.seq);
                continue;
            }
            if !self.publish(row) {
                break;
            }
        }
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                self.connected = true;
                let _ = self.client.try_subscribe(self.desired.clone(), QoS::AtLeastOnce);
                let _ = self.client.try_subscribe(self.ack.clone(), QoS::AtLeastOnce);
                // A notification may have been missed while offline.
                let _ = self.updater.try_send(UpdaterMsg::CheckNow);
                let evicted = self.config.telemetry.evicted();
                if let Err(e) = self.config.outbox.report_evicted(self.events.clone(), evicted).await {
                    tracing::error!(error = %e, "cannot queue the eviction report");
                }
                self.backlog = true;
                self.resend_due().await;
            }
            Event::Incoming(Packet::Publish(publish)) if publish.topic == self.desired => {
                let _ = self.updater.try_send(UpdaterMsg::CheckNow);
            }
            Event::Incoming(Packet::Publish(publish)) if publish.topic == self.ack => {
                match decode::<Ack>("acknowledgement", &publish.payload) {
                    Ok(ack) => self.on_ack(ack).await,
                    Err(e) => tracing::warn!(error = %e, "acknowledgement dropped"),
                }
            }
            _ => {}
        }
    }

    async fn on_ack(&mut self, ack: Ack) {
        let mut acknowledged = 0;
        let now = Instant::now();
        for seq in &ack.seqs {
            if let Some(in_flight) = self.unacked.remove(seq) {
                acknowledged += 1;
                self.ack_timer.observe(now - in_flight.first_sent);
            }
        }
        self.window = (self.window + acknowledged).min(WINDOW);
        if let Err(e) = self.config.outbox.ack(ack.seqs).await {
            tracing::error!(error = %e, "outbox delete failed; records may be sent again");
        }
        if self.backlog && self.unacked.len() < self.window / 2 {
            self.resend_due().await;
        }
    }
}
