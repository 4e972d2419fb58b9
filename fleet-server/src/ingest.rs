//! The server's MQTT session: stores what devices publish (heartbeats, update status, drift
//! windows, delivery events) and notifies devices when their desired state changes.
//!
//! The session is persistent (a client id fixed per data directory, clean session off, QoS 1
//! subscriptions) so what devices publish while the server is down waits in the broker. Each
//! message is acknowledged to the broker only after the store committed it (manual acks), and
//! each stored or already-stored record is acknowledged to its device on `…/{device}/ack`, which
//! is what lets the device delete it (ADR 0007).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proto::delivery::{Ack, DeliveryEvent, Sequenced};
use proto::drift::{drift, ReferenceSketch};
use proto::wire::{decode, encode, DesiredChanged, DriftSummary, Heartbeat, Topic, UpdateStatus, MAX_MQTT_PAYLOAD};
use proto::Manifest;
use rumqttc::mqttbytes::Error as MqttBytesError;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS, StateError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{Accepted, Report, Store, StoreError, StoredDrift};

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

/// Starts the server's MQTT session as a task of `tasks`; it ends when `cancel` is cancelled.
/// `client_id` must stay the same across restarts of this server (its queued messages are kept
/// under it) and differ between servers.
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
    let (client, eventloop) = AsyncClient::new(options, 1024);
    let ingest = Ingest { store, references: HashMap::new(), client: client.clone() };
    tasks.spawn(ingest.run(eventloop, cancel));
    Notifier { client }
}

struct Ingest {
    store: Arc<dyn Store>,
    /// Reference sketches by (model, version), read once from the bundle's manifest.
    references: HashMap<(String, String), Option<ReferenceSketch>>,
    client: AsyncClient,
}

impl Ingest {
    async fn run(mut self, mut eventloop: EventLoop, cancel: CancellationToken) {
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
                        let _ = self.client.try_subscribe(filter, QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => self.on_publish(publish).await,
                Ok(_) => {}
                Err(ConnectionError::MqttState(StateError::Deserialization(
                    MqttBytesError::PayloadSizeLimitExceeded(bytes),
                ))) => {
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

    /// Stores the record, then acknowledges it to the broker (it may be redelivered until then)
    /// and, when stored now or before, to the device. A record that cannot be read is logged
    /// and acknowledged to the broker so it does not come back forever; a store error is not,
    /// so the broker redelivers it after a reconnect.
    async fn on_publish(&mut self, publish: Publish) {
        let outcome = self.handle(&publish.topic, &publish.payload).await;
        let ack_broker = !matches!(outcome, Err(IngestError::Store(_)));
        match outcome {
            Ok(Some((device, seq, Accepted::Stored | Accepted::Duplicate))) => {
                let topic = Topic::Ack { device }.render();
                if let Err(e) = self.client.try_publish(topic, QoS::AtMostOnce, false, encode(&Ack { seqs: vec![seq] }))
                {
                    tracing::warn!(error = %e, "acknowledgement not sent; the device will send the record again");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(topic = %publish.topic, error = %e, "device message dropped"),
        }
        if ack_broker {
            if let Err(e) = self.client.ack(&publish).await {
                tracing::warn!(error = %e, "broker acknowledgement not sent");
            }
        }
    }

    /// Stores one device record; returns (device, seq, outcome) for sequenced records.
    async fn handle(&mut self, topic: &str, payload: &[u8]) -> Result<Option<(String, u64, Accepted)>, IngestError> {
        let Some(parsed) = Topic::parse(topic) else {
            return Ok(None);
        };
        let (device, seq, accepted) = match parsed {
            Topic::Heartbeat { device } => {
                let record: Sequenced<Heartbeat> = decode("heartbeat", payload)?;
                let (seq, floor) = (record.seq, record.floor);
                let d = device.clone();
                let accepted =
                    self.on_store(move |s| s.record_report(&d, seq, floor, &Report::Heartbeat(&record.body))).await?;
                (device, seq, accepted)
            }
            Topic::Status { device, model } => {
                let record: Sequenced<UpdateStatus> = decode("update status", payload)?;
                if record.body.model != model {
                    return Err(IngestError::Mismatch(format!(
                        "status for {} on the topic of {model}",
                        record.body.model
                    )));
                }
                let (seq, floor) = (record.seq, record.floor);
                let d = device.clone();
                let accepted =
                    self.on_store(move |s| s.record_report(&d, seq, floor, &Report::Status(&record.body))).await?;
                (device, seq, accepted)
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
                let (seq, floor) = (record.seq, record.floor);
                let d = device.clone();
                let accepted = self
                    .on_store(move |s| {
                        let stored = StoredDrift { summary: &summary, score, mean_confidence };
                        s.record_report(&d, seq, floor, &Report::Drift(stored))
                    })
                    .await?;
                (device, seq, accepted)
            }
            Topic::Events { device } => {
                let record: Sequenced<DeliveryEvent> = decode("delivery event", payload)?;
                let DeliveryEvent::Evicted { evicted, .. } = &record.body;
                if !evicted.is_empty() {
                    tracing::warn!(%device, ?evicted, "device evicted buffered records under its disk budget");
                }
                let (seq, floor) = (record.seq, record.floor);
                let d = device.clone();
                let accepted =
                    self.on_store(move |s| s.record_report(&d, seq, floor, &Report::Event(&record.body))).await?;
                (device, seq, accepted)
            }
            Topic::Desired { .. } | Topic::Ack { .. } => return Ok(None),
        };
        Ok(Some((device, seq, accepted)))
    }

    async fn reference(&mut self, model: &str, version: &str) -> Result<Option<ReferenceSketch>, IngestError> {
        let key = (model.to_string(), version.to_string());
        if let Some(cached) = self.references.get(&key) {
            return Ok(cached.clone());
        }
        let (m, v) = key.clone();
        let record = self.on_store(move |s| s.bundle(&m, &v)).await?;
        let reference = record.and_then(|r| Manifest::parse(&r.manifest_json).ok()).map(|m| m.reference);
        self.references.insert(key, reference.clone());
        Ok(reference)
    }

    async fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, IngestError> {
        crate::store::blocking(&self.store, f).await.map_err(IngestError::Store)
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
