//! The delivery half of the PostgreSQL store: sequenced reports stored at most once (a
//! `received` entry per (device, seq), forgotten below the device's floor), per-device delivery
//! counters, and uploaded telemetry. Same statements as `sqlite_delivery.rs`.

use postgres::{Client, Transaction};
use proto::delivery::{DeliveryEvent, DeliveryView, Evicted, TelemetryAck, TelemetryRow};

use super::devices::{drift_into, heartbeat_into, status_into};
use crate::store::{Accepted, Report, SequencedReport, StoreError, StoredTelemetry, TelemetryQuery};

/// Stores a batch of sequenced reports in one transaction: one commit for the whole batch is
/// what lets the server keep up with a site draining its backlog.
pub fn record_reports(conn: &mut Client, reports: &[SequencedReport<'_>]) -> Result<Vec<Accepted>, StoreError> {
    let mut tx = conn.transaction()?;
    let accepted = reports
        .iter()
        .map(|r| record_in(&mut tx, r.device, r.seq, r.floor, &r.report))
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit()?;
    Ok(accepted)
}

fn record_in(
    tx: &mut Transaction<'_>,
    device: &str,
    seq: u64,
    floor: u64,
    report: &Report<'_>,
) -> Result<Accepted, StoreError> {
    if tx.query_opt("SELECT 1 FROM devices WHERE id = $1", &[&device])?.is_none() {
        return Ok(Accepted::UnknownDevice);
    }
    tx.execute("INSERT INTO delivery (device) VALUES ($1) ON CONFLICT DO NOTHING", &[&device])?;
    let stored_floor: i64 = tx.query_one("SELECT floor FROM delivery WHERE device = $1", &[&device])?.try_get(0)?;
    let new = seq as i64 >= stored_floor
        && tx.execute(
            "INSERT INTO received (device, seq) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&device, &(seq as i64)],
        )? == 1;
    if !new {
        tx.execute("UPDATE delivery SET reports_duplicates = reports_duplicates + 1 WHERE device = $1", &[&device])?;
        return Ok(Accepted::Duplicate);
    }
    match report {
        Report::Status(status) => status_into(tx, device, status)?,
        Report::Heartbeat(heartbeat) => heartbeat_into(tx, device, heartbeat)?,
        Report::Drift(drift) => {
            drift_into(tx, device, drift)?;
        }
        Report::Event(DeliveryEvent::Evicted { evicted, .. }) => {
            tx.execute(
                "UPDATE delivery SET evicted_telemetry = evicted_telemetry + $2,
                   evicted_heartbeats = evicted_heartbeats + $3, evicted_reports = evicted_reports + $4
                 WHERE device = $1",
                &[&device, &(evicted.telemetry as i64), &(evicted.heartbeats as i64), &(evicted.reports as i64)],
            )?;
        }
    }
    tx.execute("UPDATE delivery SET reports_stored = reports_stored + 1 WHERE device = $1", &[&device])?;
    if floor as i64 > stored_floor {
        tx.execute("UPDATE delivery SET floor = $2 WHERE device = $1", &[&device, &(floor as i64)])?;
        tx.execute("DELETE FROM received WHERE device = $1 AND seq < $2", &[&device, &(floor as i64)])?;
    }
    Ok(Accepted::Stored)
}

pub fn record_telemetry(conn: &mut Client, device: &str, rows: &[TelemetryRow]) -> Result<TelemetryAck, StoreError> {
    let mut tx = conn.transaction()?;
    let mut ack = TelemetryAck::default();
    let insert = tx.prepare(
        "INSERT INTO telemetry (device, seq, model, version, at_ms, latency_us, features, outputs)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )?;
    for r in rows {
        let inserted = tx.execute(
            &insert,
            &[
                &device,
                &(r.seq as i64),
                &r.model,
                &r.version,
                &(r.at_ms as i64),
                &i64::from(r.latency_us),
                &f32s(&r.features),
                &f32s(&r.outputs),
            ],
        )?;
        if inserted == 1 {
            ack.stored += 1;
        } else {
            ack.duplicates += 1;
        }
        ack.through = ack.through.max(r.seq);
    }
    tx.execute("INSERT INTO delivery (device) VALUES ($1) ON CONFLICT DO NOTHING", &[&device])?;
    tx.execute(
        "UPDATE delivery SET telemetry_stored = telemetry_stored + $2, telemetry_duplicates = telemetry_duplicates + $3
         WHERE device = $1",
        &[&device, &(ack.stored as i64), &(ack.duplicates as i64)],
    )?;
    tx.commit()?;
    Ok(ack)
}

fn f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub fn telemetry(conn: &mut Client, q: &TelemetryQuery) -> Result<Vec<StoredTelemetry>, StoreError> {
    let (after_device, after_seq) = q.after.clone().unwrap_or_default();
    let rows = conn.query(
        "SELECT device, seq, model, version, at_ms, latency_us, features, outputs FROM telemetry
         WHERE model = $1 AND ($2::TEXT IS NULL OR version = $2) AND at_ms >= $3 AND (device, seq) > ($4, $5)
         ORDER BY device, seq LIMIT $6",
        &[
            &q.model,
            &q.version,
            &(q.since_ms.unwrap_or(0) as i64),
            &after_device,
            &(after_seq as i64),
            &(q.limit as i64),
        ],
    )?;
    rows.iter()
        .map(|r| {
            Ok(StoredTelemetry {
                device: r.try_get(0)?,
                row: TelemetryRow {
                    seq: r.try_get::<_, i64>(1)? as u64,
                    model: r.try_get(2)?,
                    version: r.try_get(3)?,
                    at_ms: r.try_get::<_, i64>(4)? as u64,
                    // Written from a u32.
                    latency_us: r.try_get::<_, i64>(5)? as u32,
                    features: from_f32s(r.try_get(6)?),
                    outputs: from_f32s(r.try_get(7)?),
                },
            })
        })
        .collect()
}

pub fn views(conn: &mut Client) -> Result<Vec<DeliveryView>, StoreError> {
    let rows = conn.query(
        "SELECT d.id, COALESCE(reports_stored, 0), COALESCE(reports_duplicates, 0), COALESCE(telemetry_stored, 0),
                COALESCE(telemetry_duplicates, 0), COALESCE(evicted_telemetry, 0), COALESCE(evicted_heartbeats, 0),
                COALESCE(evicted_reports, 0), COALESCE(rejected, 0)
         FROM devices d LEFT JOIN delivery ON delivery.device = d.id ORDER BY d.name, d.id",
        &[],
    )?;
    rows.iter()
        .map(|r| {
            let n = |i| r.try_get::<_, i64>(i).map(|v| v as u64);
            Ok(DeliveryView {
                device: r.try_get(0)?,
                reports_stored: n(1)?,
                reports_duplicates: n(2)?,
                telemetry_stored: n(3)?,
                telemetry_duplicates: n(4)?,
                evicted: Evicted { telemetry: n(5)?, heartbeats: n(6)?, reports: n(7)? },
                rejected: n(8)?,
            })
        })
        .collect()
}
