//! The MQTT session: store-and-forward for durable messages (status, drift), best-effort for
//! heartbeats, and the desired-state notification that wakes the updater.
//!
//! Durable messages are written to the `agent.db` outbox before publishing (QoS 1) and deleted
//! only on the broker's PUBACK. The outbox is its own thread (`outbox.rs`): this loop only waits. Across reconnects the outbox is the only source of retransmission
//! (rumqttc's own pending queue is cleared), so delivery is at least once; the server ignores
//! duplicates.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use proto::wire::{encode, Topic, UpdateStatus, MAX_MQTT_PAYLOAD};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::updater::UpdaterMsg;
use outbox::{Outbox, OutboxError};

pub mod outbox;

#[derive(Debug, Error)]
pub enum UplinkError {
    #[error(transparent)]
    BadUrl(#[from] proto::endpoint::BadMqttUrl),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

enum UplinkMsg {
    Durable { topic: String, payload: Vec<u8> },
    BestEffort { topic: String, payload: Vec<u8> },
}

/// Cheap to clone; every clone feeds the same MQTT session.
#[derive(Clone)]
pub struct UplinkHandle {
    tx: mpsc::Sender<UplinkMsg>,
    device_id: String,
}

impl UplinkHandle {
    pub async fn status(&self, status: UpdateStatus) {
        let topic = Topic::Status { device: self.device_id.clone(), model: status.model.clone() }.render();
        self.durable(topic, encode(&status)).await;
    }

    pub async fn drift(&self, summary: &proto::wire::DriftSummary) {
        let topic = Topic::Drift { device: self.device_id.clone(), model: summary.model.clone() }.render();
        self.durable(topic, encode(summary)).await;
    }

    async fn durable(&self, topic: String, payload: Vec<u8>) {
        if payload.len() > MAX_MQTT_PAYLOAD {
            tracing::error!(%topic, bytes = payload.len(), "message over the MQTT payload limit not sent");
            return;
        }
        let _ = self.tx.send(UplinkMsg::Durable { topic, payload }).await;
    }

    /// Heartbeats: dropped when the session is busy or offline, the next one replaces them.
    pub fn heartbeat(&self, heartbeat: &proto::wire::Heartbeat) {
        let topic = Topic::Heartbeat { device: self.device_id.clone() }.render();
        let _ = self.tx.try_send(UplinkMsg::BestEffort { topic, payload: encode(heartbeat) });
    }
}

pub struct UplinkConfig {
    pub mqtt_url: String,
    pub device_id: String,
    pub credential: String,
    pub state_path: PathBuf,
    pub outbox_max_rows: u64,
}

/// Tracks which outbox rows are handed to rumqttc, and which packet id carries each.
#[derive(Default)]
struct Inflight {
    /// Row ids given to the client, in order; rumqttc assigns packet ids in the same order.
    queued: VecDeque<i64>,
    by_pkid: HashMap<u16, i64>,
}

impl Inflight {
    fn holds(&self, id: i64) -> bool {
        self.queued.contains(&id) || self.by_pkid.values().any(|v| *v == id)
    }
}

pub async fn spawn_uplink(
    config: UplinkConfig,
    updater: mpsc::Sender<UpdaterMsg>,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> Result<UplinkHandle, UplinkError> {
    let (host, port) = proto::endpoint::parse_mqtt_url(&config.mqtt_url)?;
    let outbox = Outbox::open(config.state_path.clone()).await?;
    let mut options = MqttOptions::new(format!("agent-{}", config.device_id), host, port);
    options.set_keep_alive(Duration::from_secs(15));
    options.set_max_packet_size(MAX_MQTT_PAYLOAD + 1024, MAX_MQTT_PAYLOAD + 1024);
    options.set_credentials(config.device_id.clone(), config.credential.clone());
    let (client, eventloop) = AsyncClient::new(options, 256);
    let (tx, rx) = mpsc::channel(256);
    let session = Session { client, outbox, updater, config, inflight: Inflight::default(), connected: false };
    let device_id = session.config.device_id.clone();
    tasks.spawn(session.run(eventloop, rx, cancel));
    Ok(UplinkHandle { tx, device_id })
}

struct Session {
    client: AsyncClient,
    outbox: Outbox,
    updater: mpsc::Sender<UpdaterMsg>,
    config: UplinkConfig,
    inflight: Inflight,
    connected: bool,
}

impl Session {
    async fn run(mut self, mut eventloop: EventLoop, mut rx: mpsc::Receiver<UplinkMsg>, cancel: CancellationToken) {
        let desired = Topic::Desired { device: self.config.device_id.clone() }.render();
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(msg) => self.accept(msg).await,
                    None => break,
                },
                _ = retry.tick(), if self.connected => self.publish_pending().await,
                event = eventloop.poll() => match event {
                    Ok(event) => {
                        backoff = Duration::from_millis(100);
                        self.on_event(event, &desired).await;
                    }
                    Err(e) => {
                        if self.connected {
                            tracing::warn!(device = %self.config.device_id, error = %e, "MQTT connection lost");
                        }
                        self.connected = false;
                        // rumqttc moved unacked publishes and queued requests into `pending`;
                        // drop them all: the outbox re-sends every undeleted row on reconnect.
                        self.inflight = Inflight::default();
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

    async fn accept(&mut self, msg: UplinkMsg) {
        match msg {
            UplinkMsg::Durable { topic, payload } => {
                match self.outbox.push(topic.clone(), payload.clone(), self.config.outbox_max_rows).await {
                    Ok(id) if self.connected => self.publish(id, topic, payload),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "outbox write failed; message lost"),
                }
            }
            UplinkMsg::BestEffort { topic, payload } => {
                if self.connected {
                    let _ = self.client.try_publish(topic, QoS::AtMostOnce, false, payload);
                }
            }
        }
    }

    fn publish(&mut self, id: i64, topic: String, payload: Vec<u8>) {
        if self.client.try_publish(topic, QoS::AtLeastOnce, false, payload).is_ok() {
            self.inflight.queued.push_back(id);
        }
    }

    /// Publishes outbox rows not already handed to the client (after a reconnect, or a full queue).
    async fn publish_pending(&mut self) {
        match self.outbox.pending(64).await {
            Ok(rows) => {
                for (id, topic, payload) in rows {
                    if !self.inflight.holds(id) {
                        self.publish(id, topic, payload);
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "outbox read failed"),
        }
    }

    async fn on_event(&mut self, event: Event, desired: &str) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                self.connected = true;
                let _ = self.client.try_subscribe(desired, QoS::AtLeastOnce);
                // A notification may have been missed while offline.
                let _ = self.updater.try_send(UpdaterMsg::CheckNow);
                self.publish_pending().await;
            }
            Event::Incoming(Packet::Publish(publish)) if publish.topic == desired => {
                let _ = self.updater.try_send(UpdaterMsg::CheckNow);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                if let Some(id) = self.inflight.queued.pop_front() {
                    self.inflight.by_pkid.insert(pkid, id);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(id) = self.inflight.by_pkid.remove(&ack.pkid) {
                    if let Err(e) = self.outbox.delete(id).await {
                        tracing::error!(error = %e, "outbox delete failed; message may be sent twice");
                    }
                }
            }
            _ => {}
        }
    }
}
