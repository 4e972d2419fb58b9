//! Every MQTT payload either side decodes: the signed envelope, then each postcard body type,
//! and the telemetry batch posted over HTTP. The first byte picks the type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::delivery::{open_envelope, Ack, DeliveryEvent, TelemetryBatch, MAX_TELEMETRY_BATCH_BYTES};
use proto::wire::{decode, decode_within, DesiredChanged, DriftSummary, Heartbeat, UpdateStatus};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else { return };
    match kind % 8 {
        0 => {
            if let Ok(envelope) = open_envelope(body) {
                let _ = decode::<UpdateStatus>("status", envelope.body);
            }
        }
        1 => drop(decode::<Heartbeat>("heartbeat", body)),
        2 => drop(decode::<UpdateStatus>("status", body)),
        3 => {
            // What the server does with a window before it trusts its layout: read its
            // confidence and latency, merge it (with itself: same layout), and its shadow.
            if let Ok(summary) = decode::<DriftSummary>("drift", body) {
                let _ = summary.sketch.mean_confidence();
                let _ = summary.sketch.latency_quantile_us(0.95);
                let mut merged = summary.sketch.clone();
                let _ = merged.merge(&summary.sketch);
                if let Some(shadow) = &summary.shadow {
                    let _ = (shadow.agreement(), shadow.mean_abs_diff());
                    let mut twice = shadow.clone();
                    let _ = twice.merge(shadow);
                }
            }
        }
        4 => drop(decode::<DeliveryEvent>("event", body)),
        5 => drop(decode::<Ack>("ack", body)),
        6 => drop(decode::<DesiredChanged>("desired", body)),
        _ => drop(decode_within::<TelemetryBatch>("telemetry", body, MAX_TELEMETRY_BATCH_BYTES)),
    }
});
