//! The server's MQTT session: stores what devices publish (heartbeats, update status, drift
//! windows) and notifies devices when their desired state changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proto::drift::{drift, ReferenceSketch};
use proto::wire::{decode, encode, DesiredChanged, DriftSummary, Heartbeat, Topic, UpdateStatus, MAX_MQTT_PAYLOAD};
use proto::Manifest;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{Store, StoreError, StoredDrift};

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
pub fn connect(
    host: &str,
    port: u16,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> Notifier {
    let mut options = MqttOptions::new(format!("fleet-server-{}", hex::encode(rand::random::<[u8; 4]>())), host, port);
    options.set_keep_alive(Duration::from_secs(15));
    options.set_max_packet_size(MAX_MQTT_PAYLOAD + 1024, MAX_MQTT_PAYLOAD + 1024);
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
                    for filter in Topic::server_filters() {
                        let _ = self.client.try_subscribe(filter, QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if let Err(e) = self.handle(&publish.topic, &publish.payload).await {
                        tracing::warn!(topic = %publish.topic, error = %e, "device message dropped");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "server MQTT session reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn handle(&mut self, topic: &str, payload: &[u8]) -> Result<(), IngestError> {
        let Some(parsed) = Topic::parse(topic) else {
            return Ok(());
        };
        match parsed {
            Topic::Heartbeat { device } => {
                let heartbeat: Heartbeat = decode("heartbeat", payload)?;
                self.on_store(move |s| known(s, &device)?.then(|| s.record_heartbeat(&device, &heartbeat)).transpose())
                    .await?;
            }
            Topic::Status { device, model } => {
                let status: UpdateStatus = decode("update status", payload)?;
                if status.model != model {
                    return Err(IngestError::Mismatch(format!("status for {} on the topic of {model}", status.model)));
                }
                self.on_store(move |s| known(s, &device)?.then(|| s.record_status(&device, &status)).transpose())
                    .await?;
            }
            Topic::Drift { device, model } => {
                let summary: DriftSummary = decode("drift summary", payload)?;
                if summary.model != model {
                    return Err(IngestError::Mismatch(format!("drift for {} on the topic of {model}", summary.model)));
                }
                let reference = self.reference(&summary.model, &summary.version).await?;
                let report = reference.as_ref().and_then(|r| drift(r, &summary.counts).ok());
                let score = report.as_ref().map_or(summary.score, |r| r.score);
                let mean_confidence = summary.counts.mean_confidence();
                self.on_store(move |s| {
                    known(s, &device)?
                        .then(|| s.record_drift(&device, &StoredDrift { summary: &summary, score, mean_confidence }))
                        .transpose()
                })
                .await?;
            }
            Topic::Desired { .. } => {}
        }
        Ok(())
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

/// Messages from devices the server never enrolled are ignored.
fn known(store: &dyn Store, device: &str) -> Result<bool, StoreError> {
    store.device_exists(device)
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
