//! The server's MQTT session: stores what devices publish (heartbeats, update status, drift
//! windows, delivery events) and notifies devices when their desired state changes.
//!
//! The session is persistent (a client id fixed per data directory, clean session off, QoS 1
//! subscriptions) so what devices publish while the server is down waits in the broker. Each
//! message is acknowledged to the broker only after the store committed it (manual acks), and
//! each stored or already-stored record is acknowledged to its device on `…/{device}/ack`, which
//! is what lets the device delete it (ADR 0007).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proto::delivery::{Ack, DeliveryEvent, Sequenced};
use proto::drift::{drift, ReferenceSketch};
use proto::wire::{decode, encode, DesiredChanged, DriftSummary, Heartbeat, Topic, UpdateStatus, MAX_MQTT_PAYLOAD};
use proto::Manifest;
use rumqttc::mqttbytes::Error as MqttBytesError;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS, StateError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{Accepted, Report, SequencedReport, Store, StoreError, StoredDrift};

/// Publishes desired-state notifications; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    client: AsyncClient,
}

impl Notifier {
    /// A notifier with no broker behind it, for handler tests: every notification is dropped.
    #[cfg(test)]
    pub fn detached() -> Notifier {
        let (client, _eventloop) = AsyncClient::new(MqttOptions::new("detached", "127.0.0.1", 9), 1);
        Notifier { client }
    }

    /// Best effort: a device that misses it still checks in on its own interval.
    pub fn desired_changed(&self, device: &str, revision: u64) {
        let topic = Topic::Desired { device: device.to_string() }.render();
        if let Err(e) = self.client.try_publish(topic, QoS::AtLeastOnce, false, encode(&DesiredChanged { revision })) {
            tracing::warn!(%device, error = %e, "desired-state notification not sent");
        }
    }
}

/// Publishes waiting to be stored; when full, the session stops reading from the broker.
const ARRIVED_QUEUE: usize = 1024;
/// Most records stored in one transaction.
const MAX_BATCH: usize = 256;

/// Starts the server's MQTT session as two tasks of `tasks` (the connection, and the ingest that
/// stores what arrives in batches); they end when `cancel` is cancelled. `client_id` must stay
/// the same across restarts of this server (its queued messages are kept under it) and differ
/// between servers.
pub fn connect(
    host: &str,
    port: u16,
    client_id: &str,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> Notifier {
    let mut options = MqttOptions::new(client_id, host, port);
    options.set_keep_alive(Duration::from_secs(15));
    options.set_max_packet_size(MAX_MQTT_PAYLOAD + 1024, MAX_MQTT_PAYLOAD + 1024);
    options.set_clean_session(false);
    options.set_manual_acks(true);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    // Small packets (records, acknowledgements) go out at once instead of waiting on Nagle's
    // algorithm for the peer's delayed ACK.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (arrived_tx, arrived_rx) = mpsc::channel(ARRIVED_QUEUE);
    tasks.spawn(run_session(eventloop, client.clone(), arrived_tx, cancel.clone()));
    let ingest = Ingest { store, references: HashMap::new(), client: client.clone() };
    tasks.spawn(ingest.run(arrived_rx, cancel));
    Notifier { client }
}

/// Keeps the connection: subscribes on every connection and hands each publish to the ingest.
async fn run_session(
    mut eventloop: EventLoop,
    client: AsyncClient,
    arrived: mpsc::Sender<Publish>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                // After a clean start that dropped a poisoned session, be persistent again.
                eventloop.mqtt_options.set_clean_session(false);
                for filter in Topic::server_filters() {
                    let _ = client.try_subscribe(filter, QoS::AtLeastOnce);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    sent = arrived.send(publish) => if sent.is_err() { break },
                }
            }
            Ok(_) => {}
            Err(ConnectionError::MqttState(StateError::Deserialization(MqttBytesError::PayloadSizeLimitExceeded(
                bytes,
            )))) => {
                // The broker would redeliver this message to the persistent session forever:
                // drop the session once. Devices publish again whatever was not acknowledged.
                tracing::error!(
                    bytes,
                    "a message over the size limit is queued for this server; starting a clean session to drop it"
                );
                eventloop.mqtt_options.set_clean_session(true);
            }
            Err(e) => {
                tracing::debug!(error = %e, "server MQTT session reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

struct Ingest {
    store: Arc<dyn Store>,
    /// Reference sketches by (model, version), read once from the bundle's manifest.
    references: HashMap<(String, String), Option<ReferenceSketch>>,
    client: AsyncClient,
}

/// What becomes of one publish of a batch.
enum Slot {
    /// A record to store: its index in the batch's records.
    Record(usize),
    /// Nothing to store (not a device record, or unreadable): acknowledged to the broker.
    Done,
    /// Not stored for now: left for the broker to deliver again.
    Again,
}

/// A decoded record, owned, waiting for its batch to be stored.
struct Arrived {
    device: String,
    seq: u64,
    floor: u64,
    body: Body,
}

enum Body {
    Status(UpdateStatus),
    Heartbeat(Heartbeat),
    Drift { summary: DriftSummary, score: f64, mean_confidence: Option<f64> },
    Event(DeliveryEvent),
}

impl Arrived {
    fn as_report(&self) -> SequencedReport<'_> {
        let report = match &self.body {
            Body::Status(status) => Report::Status(status),
            Body::Heartbeat(heartbeat) => Report::Heartbeat(heartbeat),
            Body::Drift { summary, score, mean_confidence } => {
                Report::Drift(StoredDrift { summary, score: *score, mean_confidence: *mean_confidence })
            }
            Body::Event(event) => Report::Event(event),
        };
        SequencedReport { device: &self.device, seq: self.seq, floor: self.floor, report }
    }
}

impl Ingest {
    async fn run(mut self, mut arrived: mpsc::Receiver<Publish>, cancel: CancellationToken) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let received = tokio::select! {
                _ = cancel.cancelled() => break,
                received = arrived.recv_many(&mut batch, MAX_BATCH) => received,
            };
            if received == 0 {
                break;
            }
            self.on_batch(std::mem::take(&mut batch)).await;
        }
    }

    /// Stores every record of the batch in one transaction (one by one if that fails, so one bad
    /// record cannot hold back the rest), then acknowledges each to the broker (it may be
    /// redelivered until then) and, per device in one message, every record stored now or
    /// before. A record that cannot be read is logged and acknowledged to the broker so it does
    /// not come back forever; one the store refused is not, so the broker redelivers it after a
    /// reconnect.
    async fn on_batch(&mut self, publishes: Vec<Publish>) {
        let mut records = Vec::with_capacity(publishes.len());
        let mut slots = Vec::with_capacity(publishes.len());
        for publish in &publishes {
            slots.push(match self.decode(&publish.topic, &publish.payload).await {
                Ok(Some(record)) => {
                    records.push(record);
                    Slot::Record(records.len() - 1)
                }
                Ok(None) => Slot::Done,
                Err(IngestError::Store(e)) => {
                    tracing::warn!(topic = %publish.topic, error = %e, "device message not stored; the broker will deliver it again");
                    Slot::Again
                }
                Err(e) => {
                    tracing::warn!(topic = %publish.topic, error = %e, "device message dropped");
                    Slot::Done
                }
            });
        }
        let (records, outcomes) = self.store_all(records).await;
        let mut acks: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (publish, slot) in publishes.iter().zip(slots) {
            let done = match slot {
                Slot::Done => true,
                Slot::Again => false,
                Slot::Record(i) => match (records.get(i), outcomes.get(i)) {
                    (Some(record), Some(Ok(Accepted::Stored | Accepted::Duplicate))) => {
                        acks.entry(record.device.as_str()).or_default().push(record.seq);
                        true
                    }
                    (Some(_), Some(Ok(Accepted::UnknownDevice))) => true,
                    (_, Some(Err(e))) => {
                        tracing::warn!(topic = %publish.topic, error = %e, "device message not stored; the broker will deliver it again");
                        false
                    }
                    _ => false,
                },
            };
            if done {
                if let Err(e) = self.client.ack(publish).await {
                    tracing::warn!(error = %e, "broker acknowledgement not sent");
                }
            }
        }
        for (device, seqs) in acks {
            let topic = Topic::Ack { device: device.to_string() }.render();
            if let Err(e) = self.client.try_publish(topic, QoS::AtMostOnce, false, encode(&Ack { seqs })) {
                tracing::warn!(error = %e, "acknowledgement not sent; the device will send the records again");
            }
        }
    }

    /// One transaction for the whole batch; after a failure, one per record.
    async fn store_all(&self, records: Vec<Arrived>) -> (Vec<Arrived>, Vec<Result<Accepted, StoreError>>) {
        if records.is_empty() {
            return (records, Vec::new());
        }
        let result = crate::store::blocking(&self.store, move |s| {
            let reports: Vec<SequencedReport<'_>> = records.iter().map(Arrived::as_report).collect();
            let outcomes = match s.record_reports(&reports) {
                Ok(accepted) => accepted.into_iter().map(Ok).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, records = reports.len(), "batch not stored; storing its records one by one");
                    reports.iter().map(|r| s.record_report(r.device, r.seq, r.floor, &r.report)).collect()
                }
            };
            drop(reports);
            Ok((records, outcomes))
        })
        .await;
        match result {
            Ok(stored) => stored,
            // The blocking task itself died: nothing is known to be stored, so nothing is acknowledged.
            Err(e) => {
                tracing::error!(error = %e, "store task failed; the broker will deliver the batch again");
                (Vec::new(), Vec::new())
            }
        }
    }

    /// Reads one device record; None for topics the server does not store.
    async fn decode(&mut self, topic: &str, payload: &[u8]) -> Result<Option<Arrived>, IngestError> {
        let Some(parsed) = Topic::parse(topic) else {
            return Ok(None);
        };
        let arrived = match parsed {
            Topic::Heartbeat { device } => {
                let record: Sequenced<Heartbeat> = decode("heartbeat", payload)?;
                Arrived { device, seq: record.seq, floor: record.floor, body: Body::Heartbeat(record.body) }
            }
            Topic::Status { device, model } => {
                let record: Sequenced<UpdateStatus> = decode("update status", payload)?;
                if record.body.model != model {
                    return Err(IngestError::Mismatch(format!(
                        "status for {} on the topic of {model}",
                        record.body.model
                    )));
                }
                Arrived { device, seq: record.seq, floor: record.floor, body: Body::Status(record.body) }
            }
            Topic::Drift { device, model } => {
                let record: Sequenced<DriftSummary> = decode("drift summary", payload)?;
                let summary = record.body;
                if summary.model != model {
                    return Err(IngestError::Mismatch(format!("drift for {} on the topic of {model}", summary.model)));
                }
                let reference = self.reference(&summary.model, &summary.version).await?;
                let report = reference.as_ref().and_then(|r| drift(r, &summary.counts).ok());
                let score = report.as_ref().map_or(summary.score, |r| r.score);
                let mean_confidence = summary.counts.mean_confidence();
                Arrived {
                    device,
                    seq: record.seq,
                    floor: record.floor,
                    body: Body::Drift { summary, score, mean_confidence },
                }
            }
            Topic::Events { device } => {
                let record: Sequenced<DeliveryEvent> = decode("delivery event", payload)?;
                let DeliveryEvent::Evicted { evicted, .. } = &record.body;
                if !evicted.is_empty() {
                    tracing::warn!(%device, ?evicted, "device evicted buffered records under its disk budget");
                }
                Arrived { device, seq: record.seq, floor: record.floor, body: Body::Event(record.body) }
            }
            Topic::Desired { .. } | Topic::Ack { .. } => return Ok(None),
        };
        Ok(Some(arrived))
    }

    async fn reference(&mut self, model: &str, version: &str) -> Result<Option<ReferenceSketch>, IngestError> {
        let key = (model.to_string(), version.to_string());
        if let Some(cached) = self.references.get(&key) {
            return Ok(cached.clone());
        }
        let (m, v) = key.clone();
        let record =
            crate::store::blocking(&self.store, move |s| s.bundle(&m, &v)).await.map_err(IngestError::Store)?;
        let reference = record.and_then(|r| Manifest::parse(&r.manifest_json).ok()).map(|m| m.reference);
        self.references.insert(key, reference.clone());
        Ok(reference)
    }
}

#[derive(Debug, thiserror::Error)]
enum IngestError {
    #[error(transparent)]
    Payload(#[from] proto::wire::PayloadError),
    #[error("{0}")]
    Mismatch(String),
    #[error(transparent)]
    Store(StoreError),
}
