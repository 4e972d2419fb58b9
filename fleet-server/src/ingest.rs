//! The server's MQTT session: stores what devices publish (heartbeats, update status, drift
//! windows, delivery events); `crate::notify` publishes on the same session.
//!
//! The session is persistent (a client id fixed per data directory, clean session off, QoS 1
//! subscriptions) so what devices publish while the server is down waits in the broker. Each
//! message is acknowledged to the broker only after the store committed it (manual acks), and
//! each stored or already-stored record is acknowledged to its device on `…/{device}/ack`, which
//! is what lets the device delete it (ADR 0007).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::delivery::{open_envelope, Ack, DeliveryEvent, Envelope, EnvelopeError};
use proto::keys::{parse_public_key, VerifyingKey};
use proto::wire::{decode, encode, DriftSummary, Heartbeat, Topic, UpdateStatus, MAX_MQTT_PAYLOAD};
use proto::Manifest;
use rumqttc::mqttbytes::Error as MqttBytesError;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS, StateError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::drift::ModelDrift;
use crate::store::{Accepted, Report, SequencedReport, Store, StoreError, StoredDrift};

/// Where the server's own MQTT session goes and as whom.
#[derive(Clone, Debug)]
pub struct SessionTarget {
    pub host: String,
    pub port: u16,
    /// Must stay the same across restarts of this server and differ between servers.
    pub client_id: String,
    pub login: Option<MqttLogin>,
    /// With several servers on one external broker: the shared-subscription group they form, so
    /// each report reaches one of them (`$share/<group>/…`). The session is then clean, not
    /// persistent: a persistent member that stopped would keep receiving its share (Mosquitto
    /// queues it for the member's return); devices resend whatever a stopped server did not
    /// acknowledge, and the others receive it.
    pub share_group: Option<String>,
}

/// The username and password of the server's own MQTT session.
#[derive(Clone, Debug)]
pub struct MqttLogin {
    pub username: String,
    pub password: String,
}

/// Tells the ingest that a device was revoked, so it forgets the keys it cached; cheap to clone.
#[derive(Clone, Default)]
pub struct Revocations(Arc<AtomicU64>);

impl Revocations {
    pub fn device_revoked(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    fn generation(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// Publishes waiting to be stored; when full, the session stops reading from the broker.
const ARRIVED_QUEUE: usize = 1024;
/// Most records stored in one transaction.
const MAX_BATCH: usize = 256;

/// Starts the server's MQTT session as two tasks of `tasks` (the connection, and the ingest that
/// stores what arrives in batches); they end when `cancel` is cancelled. The target's client id
/// must stay the same across restarts of this server (its queued messages are kept under it) and
/// differ between servers. Returns the session's client, for `crate::notify` to publish on.
pub fn connect(
    broker: &SessionTarget,
    store: Arc<dyn Store>,
    revocations: Revocations,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> AsyncClient {
    let (host, port, client_id, login) = (&broker.host, broker.port, &broker.client_id, broker.login.as_ref());
    let mut options = MqttOptions::new(client_id, host, port);
    if let Some(login) = login {
        options.set_credentials(login.username.clone(), login.password.clone());
    }
    options.set_keep_alive(Duration::from_secs(15));
    options.set_max_packet_size(MAX_MQTT_PAYLOAD + 1024, MAX_MQTT_PAYLOAD + 1024);
    let persistent = broker.share_group.is_none();
    options.set_clean_session(!persistent);
    options.set_manual_acks(true);
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    // Small packets (records, acknowledgements) go out at once instead of waiting on Nagle's
    // algorithm for the peer's delayed ACK.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (arrived_tx, arrived_rx) = mpsc::channel(ARRIVED_QUEUE);
    let filters: Vec<String> = match &broker.share_group {
        Some(group) => Topic::server_filters().iter().map(|f| format!("$share/{group}/{f}")).collect(),
        None => Topic::server_filters().to_vec(),
    };
    tasks.spawn(run_session(eventloop, client.clone(), filters, persistent, arrived_tx, cancel.clone()));
    let ingest = Ingest { store, known: Known::default(), client: client.clone(), revocations, seen_revocations: 0 };
    tasks.spawn(ingest.run(arrived_rx, cancel));
    client
}

/// Publishes received but not yet handed to a full ingest queue. The broker sends at most its
/// inflight window of unacknowledged QoS 1 publishes (acknowledged only once stored), so this
/// stays small; past it the session stops reading, as a last resort.
const MAX_WAITING: usize = 4 * ARRIVED_QUEUE;

/// Keeps the connection: subscribes on every connection and hands each publish to the ingest.
///
/// The event loop is polled all the time, also while the ingest's queue is full: polling is
/// what writes the session's outgoing packets (the ingest's broker acknowledgements and
/// device acks, desired-state notifications), so a session that stopped polling while the
/// ingest waited for room in that outgoing queue would wait forever on each other. Found by
/// fleet-load: a rollout's burst of notifications to 1,000 devices stopped all ingest.
async fn run_session(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    persistent: bool,
    arrived: mpsc::Sender<Publish>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut waiting: std::collections::VecDeque<Publish> = std::collections::VecDeque::new();
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = arrived.reserve(), if !waiting.is_empty() => match permit {
                Ok(permit) => {
                    if let Some(publish) = waiting.pop_front() {
                        permit.send(publish);
                    }
                    continue;
                }
                Err(_) => break,
            },
            event = eventloop.poll(), if waiting.len() < MAX_WAITING => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                // After a clean start that dropped a poisoned session, be persistent again.
                eventloop.mqtt_options.set_clean_session(!persistent);
                for filter in &filters {
                    let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                }
            }
            // In arrival order: behind any that wait already.
            Ok(Event::Incoming(Packet::Publish(publish))) if !waiting.is_empty() => waiting.push_back(publish),
            Ok(Event::Incoming(Packet::Publish(publish))) => match arrived.try_send(publish) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(publish)) => waiting.push_back(publish),
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            },
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
                tracing::warn!(error = %e, "server MQTT session lost; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

struct Ingest {
    store: Arc<dyn Store>,
    /// Taken by each batch's blocking call and put back after it.
    known: Known,
    client: AsyncClient,
    revocations: Revocations,
    /// The revocation generation the cached keys were read under.
    seen_revocations: u64,
}

/// What the ingest remembers between batches: read from the store once.
#[derive(Default)]
struct Known {
    /// Reference profiles and thresholds by (model, version), from the bundle's manifest.
    references: HashMap<(String, String), Option<Arc<ModelDrift>>>,
    /// Devices' registered public keys; None for a device unknown or without a key.
    keys: HashMap<String, Option<VerifyingKey>>,
}

/// What becomes of one publish of a batch.
enum Slot {
    /// A record to store: its index in the batch's records.
    Record(usize),
    /// Nothing to store (not a device record, unreadable, or forged): acknowledged to the broker.
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
    Drift { summary: Box<DriftSummary>, score: f64, mean_confidence: Option<f64> },
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

/// A batch after the blocking call: what became of each publish, and the records stored.
struct Processed {
    slots: Vec<Slot>,
    records: Vec<Arrived>,
    outcomes: Vec<Result<Accepted, StoreError>>,
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
            self.on_batch(std::mem::take(&mut batch), &cancel).await;
        }
    }

    /// Verifies, decodes and stores the batch on the blocking pool (signature checks are CPU
    /// work, storing is disk work), then acknowledges each publish to the broker (it may be
    /// redelivered until then) and, per device in one message, every record stored now or
    /// before. Unreadable or forged records are logged and acknowledged to the broker so they do
    /// not come back forever; one the store refused is not, so the broker redelivers it after a
    /// reconnect. Acknowledgements that cannot be sent are logged once per batch: a warning,
    /// or a note when the server is shutting down (its broker session is closing, and the broker
    /// and devices send those records again to whoever serves next).
    async fn on_batch(&mut self, publishes: Vec<Publish>, cancel: &CancellationToken) {
        let revocations = self.revocations.generation();
        if revocations != self.seen_revocations {
            self.known.keys.clear();
            self.seen_revocations = revocations;
        }
        let mut known = std::mem::take(&mut self.known);
        let result = crate::store::blocking(&self.store, move |store| {
            let processed = process(store, &mut known, &publishes);
            Ok((known, publishes, processed))
        })
        .await;
        let (known, publishes, Processed { slots, records, outcomes }) = match result {
            Ok(done) => done,
            // The blocking task itself died: nothing is known to be stored, so nothing is
            // acknowledged and the broker delivers the batch again.
            Err(e) => return tracing::error!(error = %e, "ingest task failed; the broker will deliver the batch again"),
        };
        self.known = known;
        let mut acks: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        let mut unsent = UnsentAcks::default();
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
                    unsent.to_broker += 1;
                    unsent.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        for (device, seqs) in acks {
            let topic = Topic::Ack { device: device.to_string() }.render();
            if let Err(e) = self.client.try_publish(topic, QoS::AtMostOnce, false, encode(&Ack { seqs })) {
                unsent.to_devices += 1;
                unsent.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        unsent.log(cancel.is_cancelled());
    }
}

/// The acknowledgements of one batch that could not be sent, logged in one line.
#[derive(Default)]
struct UnsentAcks {
    /// Publishes the broker was not told were handled: it delivers them again.
    to_broker: usize,
    /// Devices not told which records were stored: they send them again.
    to_devices: usize,
    first_error: Option<String>,
}

impl UnsentAcks {
    fn log(&self, shutting_down: bool) {
        let Some(error) = &self.first_error else { return };
        let (to_broker, to_devices) = (self.to_broker, self.to_devices);
        if shutting_down {
            tracing::info!(
                to_broker,
                to_devices,
                error = %error,
                "acknowledgements not sent while shutting down; the broker and the devices send those records again"
            );
        } else {
            tracing::warn!(
                to_broker,
                to_devices,
                error = %error,
                "acknowledgements not sent; the broker and the devices send those records again"
            );
        }
    }
}

/// Runs on the blocking pool: checks and decodes every publish, counts forged ones per device,
/// stores the records in one transaction (one by one if that fails, so one record the store
/// refuses cannot hold back the others). Signatures are checked on all cores at once.
fn process(store: &dyn Store, known: &mut Known, publishes: &[Publish]) -> Processed {
    let mut records = Vec::with_capacity(publishes.len());
    let mut slots = Vec::with_capacity(publishes.len());
    let mut forged: BTreeMap<String, u64> = BTreeMap::new();
    let mut opened = Vec::with_capacity(publishes.len());
    let mut opened_slots = Vec::with_capacity(publishes.len());
    for publish in publishes {
        match open_record(store, known, &publish.topic, &publish.payload) {
            Ok(Some(record)) => {
                opened.push(record);
                opened_slots.push(slots.len());
                slots.push(Slot::Again); // decided below, once its signature is checked
            }
            other => slots.push(slot_for(other.map(|_| None), &publish.topic, &mut records, &mut forged)),
        }
    }
    let verdicts = check_signatures(&opened.iter().map(|o| o.unchecked).collect::<Vec<_>>());
    for ((record, verdict), slot) in opened.into_iter().zip(verdicts).zip(opened_slots) {
        let topic = record.unchecked.topic;
        let decoded = finish_record(store, known, record, verdict);
        slots[slot] = slot_for(decoded, topic, &mut records, &mut forged);
    }
    for (device, count) in forged {
        if let Err(e) = store.count_rejected(&device, count) {
            tracing::warn!(%device, error = %e, "rejected reports not counted");
        }
    }
    let outcomes = if records.is_empty() {
        Vec::new()
    } else {
        let reports: Vec<SequencedReport<'_>> = records.iter().map(Arrived::as_report).collect();
        match store.record_reports(&reports) {
            Ok(accepted) => accepted.into_iter().map(Ok).collect(),
            Err(e) => {
                tracing::warn!(error = %e, records = reports.len(), "batch not stored; storing its records one by one");
                reports.iter().map(|r| store.record_report(r.device, r.seq, r.floor, &r.report)).collect()
            }
        }
    };
    Processed { slots, records, outcomes }
}

/// What becomes of one publish, given what checking and decoding it gave.
fn slot_for(
    decoded: Result<Option<Arrived>, IngestError>,
    topic: &str,
    records: &mut Vec<Arrived>,
    forged: &mut BTreeMap<String, u64>,
) -> Slot {
    match decoded {
        Ok(Some(record)) => {
            records.push(record);
            Slot::Record(records.len() - 1)
        }
        Ok(None) => Slot::Done,
        Err(IngestError::Store(e)) => {
            tracing::warn!(%topic, error = %e, "device message not stored; the broker will deliver it again");
            Slot::Again
        }
        Err(IngestError::Forged { device, reason }) => {
            tracing::warn!(%device, %topic, %reason, "report dropped: it does not prove it came from this device");
            *forged.entry(device).or_default() += 1;
            Slot::Done
        }
        Err(e) => {
            tracing::warn!(%topic, error = %e, "device message dropped");
            Slot::Done
        }
    }
}

/// One report waiting for its signature check: the envelope, the key it must verify under,
/// and the topic it arrived on (part of what is signed).
#[derive(Clone, Copy)]
pub struct Unchecked<'a> {
    pub envelope: Envelope<'a>,
    pub key: VerifyingKey,
    pub topic: &'a str,
}

impl Unchecked<'_> {
    fn check(&self) -> Result<(), EnvelopeError> {
        self.envelope.verify(&self.key, self.topic)
    }
}

/// Fewer signatures than this are checked on the calling thread: starting threads would cost
/// more than it saves.
const PARALLEL_FROM: usize = 16;
/// Most threads checking one batch's signatures.
const MAX_CHECK_THREADS: usize = 8;

/// Checks each report's signature (ed25519, strict), one verdict per report in order, on every
/// core: the batch is cut into one slice per core, the calling thread takes the first.
pub fn check_signatures(reports: &[Unchecked<'_>]) -> Vec<Result<(), EnvelopeError>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_CHECK_THREADS);
    if threads < 2 || reports.len() < PARALLEL_FROM {
        return reports.iter().map(Unchecked::check).collect();
    }
    let slice = reports.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut slices = reports.chunks(slice);
        let own = slices.next().unwrap_or_default();
        let helpers: Vec<_> = slices
            .map(|part| {
                let spawned = std::thread::Builder::new()
                    .name("signature-check".into())
                    .spawn_scoped(scope, move || part.iter().map(Unchecked::check).collect::<Vec<_>>());
                // A thread that cannot start leaves its slice to the calling thread.
                spawned.map_err(|_| part)
            })
            .collect();
        let mut verdicts: Vec<_> = own.iter().map(Unchecked::check).collect();
        for helper in helpers {
            match helper {
                Ok(thread) => verdicts.extend(thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))),
                Err(part) => verdicts.extend(part.iter().map(Unchecked::check)),
            }
        }
        verdicts
    })
}

/// A device record whose envelope opened and whose device has a key; its signature is not
/// checked yet.
struct Opened<'a> {
    parsed: Topic,
    device: String,
    unchecked: Unchecked<'a>,
}

/// Checks one device record's signature against the device's key and decodes it; None for
/// topics the server does not store.
#[cfg(test)]
fn decode_record(
    store: &dyn Store,
    known: &mut Known,
    topic: &str,
    payload: &[u8],
) -> Result<Option<Arrived>, IngestError> {
    let Some(opened) = open_record(store, known, topic, payload)? else {
        return Ok(None);
    };
    let verdict = opened.unchecked.check();
    finish_record(store, known, opened, verdict)
}

/// Opens a device record's envelope and finds the key it must be signed with; None for topics
/// the server does not store.
fn open_record<'a>(
    store: &dyn Store,
    known: &mut Known,
    topic: &'a str,
    payload: &'a [u8],
) -> Result<Option<Opened<'a>>, IngestError> {
    let Some(parsed) = Topic::parse(topic) else {
        return Ok(None);
    };
    let device = match &parsed {
        Topic::Heartbeat { device }
        | Topic::Status { device, .. }
        | Topic::Drift { device, .. }
        | Topic::Events { device } => device.clone(),
        Topic::Desired { .. } | Topic::Ack { .. } => return Ok(None),
    };
    let envelope =
        open_envelope(payload).map_err(|e| IngestError::Forged { device: device.clone(), reason: e.to_string() })?;
    // Unknown and revoked devices, and devices enrolled before keys existed, have nothing to
    // verify with.
    let key = device_key(store, known, &device, Lookup::Cached)?.ok_or_else(|| no_key(&device))?;
    Ok(Some(Opened { parsed, device, unchecked: Unchecked { envelope, key, topic } }))
}

fn no_key(device: &str) -> IngestError {
    IngestError::Forged {
        device: device.to_string(),
        reason: "no public key is registered for this device (unknown or revoked)".into(),
    }
}

/// Given the record's signature verdict under the cached key, decides whether it came from its
/// device and decodes it.
fn finish_record(
    store: &dyn Store,
    known: &mut Known,
    opened: Opened<'_>,
    verdict: Result<(), EnvelopeError>,
) -> Result<Option<Arrived>, IngestError> {
    let Opened { parsed, device, unchecked } = opened;
    let forged = |reason: String| IngestError::Forged { device: device.clone(), reason };
    if let Err(e) = verdict {
        // The cached key may be stale: an enrollment retry registers a new one. Read it again
        // once; a forger pays one indexed lookup per forged report.
        match device_key(store, known, &device, Lookup::Fresh)? {
            Some(fresh) if fresh != unchecked.key => {
                unchecked.envelope.verify(&fresh, unchecked.topic).map_err(|e| forged(e.to_string()))?
            }
            Some(_) => return Err(forged(e.to_string())),
            None => return Err(no_key(&device)),
        }
    }
    let (seq, floor, body) = (unchecked.envelope.seq, unchecked.envelope.floor, unchecked.envelope.body);
    let body = match parsed {
        Topic::Heartbeat { .. } => Body::Heartbeat(decode("heartbeat", body)?),
        Topic::Status { model, .. } => {
            let status: UpdateStatus = decode("update status", body)?;
            if status.model != model {
                return Err(IngestError::Mismatch(format!("status for {} on the topic of {model}", status.model)));
            }
            Body::Status(status)
        }
        Topic::Drift { model, .. } => {
            let summary: DriftSummary = decode("drift summary", body)?;
            if summary.model != model {
                return Err(IngestError::Mismatch(format!("drift for {} on the topic of {model}", summary.model)));
            }
            // A window of a published version must fit that version's profile; its score is
            // the share of features drifted in it alone (0 for a version the server lacks).
            let score = match reference(store, known, &summary.model, &summary.version)? {
                Some(model) => {
                    model
                        .evaluate(&summary.sketch)
                        .map_err(|e| {
                            IngestError::Mismatch(format!("drift window of {} {}: {e}", summary.model, summary.version))
                        })?
                        .drift_share
                }
                None => 0.0,
            };
            let mean_confidence = summary.sketch.mean_confidence();
            Body::Drift { summary: Box::new(summary), score, mean_confidence }
        }
        Topic::Events { .. } => {
            let event: DeliveryEvent = decode("delivery event", body)?;
            let DeliveryEvent::Evicted { evicted, .. } = &event;
            if !evicted.is_empty() {
                tracing::warn!(%device, ?evicted, "device evicted buffered records under its disk budget");
            }
            Body::Event(event)
        }
        Topic::Desired { .. } | Topic::Ack { .. } => return Ok(None),
    };
    Ok(Some(Arrived { device, seq, floor, body }))
}

/// Whether a device key may come from the cache.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lookup {
    Cached,
    Fresh,
}

fn device_key(
    store: &dyn Store,
    known: &mut Known,
    device: &str,
    lookup: Lookup,
) -> Result<Option<VerifyingKey>, IngestError> {
    if let (Lookup::Cached, Some(Some(key))) = (lookup, known.keys.get(device)) {
        return Ok(Some(*key));
    }
    // Looked up again while unknown: the device may have enrolled since.
    let key = store.device_public_key(device).map_err(IngestError::Store)?;
    let key = key.and_then(|k| parse_public_key(&k).ok());
    if known.keys.len() >= MAX_KNOWN_KEYS {
        known.keys.clear();
    }
    known.keys.insert(device.to_string(), key);
    Ok(key)
}

/// Keys kept in memory; beyond this the cache starts again (a fleet larger than this re-reads).
const MAX_KNOWN_KEYS: usize = 100_000;

fn reference(
    store: &dyn Store,
    known: &mut Known,
    model: &str,
    version: &str,
) -> Result<Option<Arc<ModelDrift>>, IngestError> {
    let key = (model.to_string(), version.to_string());
    if let Some(cached) = known.references.get(&key) {
        return Ok(cached.clone());
    }
    let record = store.bundle(model, version).map_err(IngestError::Store)?;
    let reference =
        record.and_then(|r| Manifest::parse(&r.manifest_json).ok()).map(|m| Arc::new(ModelDrift::from_manifest(m)));
    known.references.insert(key, reference.clone());
    Ok(reference)
}

#[derive(Debug, thiserror::Error)]
enum IngestError {
    #[error(transparent)]
    Payload(#[from] proto::wire::PayloadError),
    #[error("report under device {device} refused: {reason}")]
    Forged { device: String, reason: String },
    #[error("{0}")]
    Mismatch(String),
    #[error(transparent)]
    Store(StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewDevice, SqliteStore};
    use proto::delivery::sealed_payload;
    use proto::keys::{public_key_hex, SigningKey};
    use proto::wire::Health;

    fn device(key: &SigningKey, at_ms: u64) -> NewDevice {
        NewDevice {
            id: "dev-00aa".into(),
            name: "d".into(),
            labels: Default::default(),
            credential_hash: format!("c{at_ms}"),
            enrolled_ms: at_ms,
            public_key: public_key_hex(&key.verifying_key()),
            broker_hash: String::new(),
        }
    }

    fn heartbeat(key: &SigningKey, seq: u64) -> (String, Vec<u8>) {
        let topic = Topic::Heartbeat { device: "dev-00aa".into() }.render();
        let body = encode(&Heartbeat { at_ms: seq, uptime_secs: 1, health: Health::default(), models: Vec::new() });
        let payload = sealed_payload(key, &topic, seq, 1, &body);
        (topic, payload)
    }

    #[test]
    fn signatures_checked_on_all_cores_keep_their_order() {
        let (key, other) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        // 100 reports, every seventh signed by another key: each verdict must land on its own report.
        let payloads: Vec<(String, Vec<u8>)> =
            (1..=100).map(|seq| heartbeat(if seq % 7 == 0 { &other } else { &key }, seq)).collect();
        let unchecked: Vec<Unchecked<'_>> = payloads
            .iter()
            .map(|(topic, payload)| Unchecked {
                envelope: open_envelope(payload).unwrap(),
                key: key.verifying_key(),
                topic,
            })
            .collect();
        let verdicts = check_signatures(&unchecked);
        assert_eq!(verdicts.len(), 100);
        for (report, verdict) in unchecked.iter().zip(&verdicts) {
            assert_eq!(verdict.is_err(), report.envelope.seq % 7 == 0, "report {}", report.envelope.seq);
        }
        // The same with fewer reports than are worth a thread.
        let few = check_signatures(&unchecked[..PARALLEL_FROM - 1]);
        assert_eq!(few, verdicts[..PARALLEL_FROM - 1]);
    }

    #[test]
    fn a_key_replaced_by_an_enrollment_retry_is_used_without_a_restart_and_a_revoked_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
        let (first, second) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        store.create_tokens(&["t".into()], 0, u64::MAX / 2).unwrap();
        store.enroll("t", &device(&first, 1), 600_000).unwrap().unwrap();
        let mut known = Known::default();
        let (topic, payload) = heartbeat(&first, 1);
        assert!(decode_record(&store, &mut known, &topic, &payload).unwrap().is_some(), "cached now");
        // The first reply was lost; the retry registered another key.
        store.enroll("t", &device(&second, 2), 600_000).unwrap().unwrap();
        let (topic, payload) = heartbeat(&second, 2);
        assert!(decode_record(&store, &mut known, &topic, &payload).unwrap().is_some(), "the new key is read again");
        let (topic, payload) = heartbeat(&first, 3);
        assert!(matches!(decode_record(&store, &mut known, &topic, &payload), Err(IngestError::Forged { .. })));
        store.revoke_device("dev-00aa", 4).unwrap();
        known.keys.clear(); // what a revocation does to the ingest's cache
        let (topic, payload) = heartbeat(&second, 4);
        match decode_record(&store, &mut known, &topic, &payload) {
            Err(IngestError::Forged { reason, .. }) => assert!(reason.contains("revoked"), "{reason}"),
            other => panic!("a revoked device's report was not refused: {:?}", other.map(|r| r.is_some())),
        }
    }
}
