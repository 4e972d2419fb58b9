//! End-to-end delivery: what makes "nothing acknowledged is lost; nothing is stored twice" hold
//! across broker restarts, server restarts and agent crashes (ADR 0007).
//!
//! Every durable record a device sends over MQTT (status, drift window, heartbeat counters,
//! delivery events) travels in a signed [`Envelope`]: the device's `reports` stream sequence
//! number, assigned once when the record is written to the agent's outbox, the device's
//! `floor`, the lowest sequence it still holds, and the device's signature over both, the topic
//! and the body. The server stores each (device, seq) at most
//! once, then publishes an [`Ack`]; only then does the agent delete the record. A broker's PUBACK
//! is not storage. Telemetry rows travel over HTTP in a [`TelemetryBatch`] on their own stream
//! (`telemetry`), acknowledged by the reply.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::wire::{encode, MAX_MQTT_PAYLOAD};

/// The streams a device sends on; each has its own sequence.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// MQTT records: status, drift, heartbeats, delivery events.
    Reports,
    /// Inference records, uploaded over HTTP.
    Telemetry,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Reports => "reports",
            Stream::Telemetry => "telemetry",
        }
    }
}

/// A record of the device's `reports` stream as it travels: its place in the stream and the
/// device's signature over (topic, seq, floor, body), so a report proves which device sent it
/// whichever broker carried it. Wire layout: `seq` and `floor` as postcard varints, the 64
/// signature bytes, then the body's own postcard bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Envelope<'a> {
    /// Starts at 1 and never repeats for a device, whatever was deleted or evicted.
    pub seq: u64,
    /// Every sequence below this one was acknowledged or evicted: the device never sends it
    /// again, so the server may forget which of them it saw.
    pub floor: u64,
    pub signature: [u8; SIGNATURE_BYTES],
    /// The record, still encoded.
    pub body: &'a [u8],
}

pub const SIGNATURE_BYTES: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("payload is not a sequenced record: {0}")]
    Malformed(String),
    #[error("signature does not match the device's key for this topic, sequence and body")]
    BadSignature,
}

/// What a device signs: a domain tag, then the topic (length first), seq, floor and body.
fn signed_bytes(topic: &str, seq: u64, floor: u64, body: &[u8]) -> Vec<u8> {
    const DOMAIN: &[u8] = b"fleet/v1 report\0";
    let mut message = Vec::with_capacity(DOMAIN.len() + 24 + topic.len() + body.len());
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(&(topic.len() as u64).to_le_bytes());
    message.extend_from_slice(topic.as_bytes());
    message.extend_from_slice(&seq.to_le_bytes());
    message.extend_from_slice(&floor.to_le_bytes());
    message.extend_from_slice(body);
    message
}

/// The payload of a record whose body is already encoded, signed with the device's key.
pub fn sealed_payload(key: &SigningKey, topic: &str, seq: u64, floor: u64, body: &[u8]) -> Vec<u8> {
    let signature = key.sign(&signed_bytes(topic, seq, floor, body)).to_bytes();
    let mut payload = encode(&(seq, floor));
    payload.extend_from_slice(&signature);
    payload.extend_from_slice(body);
    payload
}

/// Splits a payload into its envelope and body; the signature is not checked yet.
pub fn open_envelope(payload: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let ((seq, floor), rest): ((u64, u64), &[u8]) =
        postcard::take_from_bytes(payload).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
    if rest.len() < SIGNATURE_BYTES {
        return Err(EnvelopeError::Malformed(format!(
            "{} bytes after the sequence, no room for a signature",
            rest.len()
        )));
    }
    let (signature, body) = rest.split_at(SIGNATURE_BYTES);
    let signature = signature.try_into().map_err(|_| EnvelopeError::Malformed("signature".into()))?;
    Ok(Envelope { seq, floor, signature, body })
}

impl Envelope<'_> {
    /// Checks the signature against the device's registered key and the topic it arrived on.
    pub fn verify(&self, key: &VerifyingKey, topic: &str) -> Result<(), EnvelopeError> {
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(&signed_bytes(topic, self.seq, self.floor, self.body), &signature)
            .map_err(|_| EnvelopeError::BadSignature)
    }
}

/// Bytes the envelope may add to a body (two varint u64s and the signature).
pub const ENVELOPE_BYTES: usize = 20 + SIGNATURE_BYTES;

/// Largest body a durable record may have, so that the envelope still fits an MQTT payload.
pub const MAX_RECORD_BODY: usize = MAX_MQTT_PAYLOAD - ENVELOPE_BYTES;

/// server -> agent on `…/{device}/ack`: these sequences of the `reports` stream are stored (or
/// were already stored); the agent may delete them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Ack {
    pub seqs: Vec<u64>,
}

/// How precious a buffered record is: under the disk budget the agent evicts the lowest
/// priority first, and within one priority the oldest first.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Raw inference records: useful for retraining, replaceable by nothing but cheapest to lose.
    Telemetry = 0,
    /// Periodic counters and health: the next one supersedes most of it.
    Heartbeat = 1,
    /// Update status, drift windows, delivery events: rollout gates decide on these.
    Report = 2,
}

impl Priority {
    pub fn from_i64(value: i64) -> Option<Priority> {
        match value {
            0 => Some(Priority::Telemetry),
            1 => Some(Priority::Heartbeat),
            2 => Some(Priority::Report),
            _ => None,
        }
    }
}

/// Records a device evicted under its disk budget, by priority.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Evicted {
    pub telemetry: u64,
    pub heartbeats: u64,
    pub reports: u64,
}

impl Evicted {
    pub fn total(&self) -> u64 {
        self.telemetry + self.heartbeats + self.reports
    }

    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// What `self` holds beyond `reported` (counters only grow).
    pub fn since(&self, reported: &Evicted) -> Evicted {
        Evicted {
            telemetry: self.telemetry.saturating_sub(reported.telemetry),
            heartbeats: self.heartbeats.saturating_sub(reported.heartbeats),
            reports: self.reports.saturating_sub(reported.reports),
        }
    }

    pub fn add(&mut self, other: &Evicted) {
        self.telemetry += other.telemetry;
        self.heartbeats += other.heartbeats;
        self.reports += other.reports;
    }
}

/// agent -> server on `…/{device}/events`: something the operator should know about the
/// device's buffers, sent (durably) on the next connection after it happened.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum DeliveryEvent {
    /// Records dropped under the disk budget since the last such event.
    Evicted { at_ms: u64, evicted: Evicted },
}

/// One buffered inference, as uploaded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TelemetryRow {
    /// The device's `telemetry` stream sequence.
    pub seq: u64,
    pub at_ms: u64,
    pub model: String,
    pub version: String,
    pub latency_us: u32,
    pub features: Vec<f32>,
    pub outputs: Vec<f32>,
}

/// agent -> server, postcard body of `POST /api/v1/devices/{id}/telemetry`: the oldest rows
/// the device holds, in sequence order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct TelemetryBatch {
    pub rows: Vec<TelemetryRow>,
}

/// Largest telemetry upload body the server accepts.
pub const MAX_TELEMETRY_BATCH_BYTES: usize = 1 << 20;

/// The reply to a telemetry upload, sent after the rows are committed: the device may delete
/// every row up to `through`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TelemetryAck {
    pub through: u64,
    /// Rows new to the server.
    pub stored: u64,
    /// Rows it already had (a retried upload whose reply was lost).
    pub duplicates: u64,
}

/// One stored inference record as operators export it (`GET /api/v1/telemetry`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExportedTelemetry {
    pub device: String,
    #[serde(flatten)]
    pub row: TelemetryRow,
}

/// A device's delivery as the server counts it (operator API, demo report).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryView {
    pub device: String,
    /// `reports` records stored (each sequence once).
    pub reports_stored: u64,
    /// `reports` records received again after they were stored, and dropped.
    pub reports_duplicates: u64,
    pub telemetry_stored: u64,
    pub telemetry_duplicates: u64,
    /// Evictions the device reported.
    pub evicted: Evicted,
    /// Reports under this device's id whose signature did not verify: dropped.
    #[serde(default)]
    pub rejected: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, UpdateStatus, UpdateStep};

    fn status() -> UpdateStatus {
        UpdateStatus {
            model: "tabular".into(),
            version: "1.0.0".into(),
            step: UpdateStep::Active,
            detail: String::new(),
            active_version: Some("1.0.0".into()),
            at_ms: 42,
        }
    }

    fn key(byte: u8) -> SigningKey {
        SigningKey::from_bytes(&[byte; 32])
    }

    #[test]
    fn a_sealed_record_opens_to_its_sequence_and_body_and_verifies_with_the_devices_key() {
        let body = encode(&status());
        for (seq, floor) in [(1, 1), (300, 7), (u64::MAX, u64::MAX - 1)] {
            let payload = sealed_payload(&key(1), "t/a", seq, floor, &body);
            assert!(payload.len() <= body.len() + ENVELOPE_BYTES);
            let envelope = open_envelope(&payload).unwrap();
            assert_eq!((envelope.seq, envelope.floor, envelope.body), (seq, floor, body.as_slice()));
            assert_eq!(envelope.verify(&key(1).verifying_key(), "t/a"), Ok(()));
            assert_eq!(decode::<UpdateStatus>("status", envelope.body).unwrap(), status());
        }
    }

    #[test]
    fn another_key_topic_sequence_floor_or_body_breaks_the_signature() {
        let body = encode(&status());
        let payload = sealed_payload(&key(1), "t/a", 5, 2, &body);
        let device = key(1).verifying_key();
        assert_eq!(
            open_envelope(&payload).unwrap().verify(&key(2).verifying_key(), "t/a"),
            Err(EnvelopeError::BadSignature)
        );
        assert_eq!(open_envelope(&payload).unwrap().verify(&device, "t/b"), Err(EnvelopeError::BadSignature));
        let envelope = open_envelope(&payload).unwrap();
        for tampered in [
            Envelope { seq: 6, ..envelope },
            Envelope { floor: 5, ..envelope },
            Envelope { body: &body[1..], ..envelope },
        ] {
            assert_eq!(tampered.verify(&device, "t/a"), Err(EnvelopeError::BadSignature));
        }
    }

    #[test]
    fn a_payload_too_short_for_its_signature_is_malformed() {
        assert!(matches!(open_envelope(&encode(&(1u64, 1u64))), Err(EnvelopeError::Malformed(_))));
        assert!(matches!(open_envelope(&[]), Err(EnvelopeError::Malformed(_))));
    }

    #[test]
    fn eviction_counts_report_only_what_is_new() {
        let mut total = Evicted { telemetry: 10, heartbeats: 2, reports: 0 };
        let reported = total;
        total.add(&Evicted { telemetry: 5, heartbeats: 0, reports: 1 });
        assert_eq!(total.since(&reported), Evicted { telemetry: 5, heartbeats: 0, reports: 1 });
        assert!(total.since(&total).is_empty());
    }

    #[test]
    fn priorities_order_telemetry_first_and_reports_last() {
        assert!(Priority::Telemetry < Priority::Heartbeat && Priority::Heartbeat < Priority::Report);
        for p in [Priority::Telemetry, Priority::Heartbeat, Priority::Report] {
            assert_eq!(Priority::from_i64(p as i64), Some(p));
        }
        assert_eq!(Priority::from_i64(9), None);
    }
}
