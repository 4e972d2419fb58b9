//! The delivery half of the SQLite store: sequenced reports stored at most once (a `received`
//! entry per (device, seq), forgotten below the device's floor), per-device delivery counters,
//! and uploaded telemetry.

use proto::delivery::{DeliveryEvent, DeliveryView, Evicted, TelemetryAck, TelemetryRow};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::devices::{drift_into, heartbeat_into, status_into};
use crate::store::{Accepted, Pruned, Report, SequencedReport, StoreError, StoredTelemetry, TelemetryQuery};

/// Stores a batch of sequenced reports in one transaction: one commit for the whole batch is
/// what lets the server keep up with a site draining its backlog.
pub fn record_reports(conn: &mut Connection, reports: &[SequencedReport<'_>]) -> Result<Vec<Accepted>, StoreError> {
    let tx = conn.transaction()?;
    let accepted =
        reports.iter().map(|r| record_in(&tx, r.device, r.seq, r.floor, &r.report)).collect::<Result<Vec<_>, _>>()?;
    tx.commit()?;
    Ok(accepted)
}

fn record_in(
    tx: &Transaction<'_>,
    device: &str,
    seq: u64,
    floor: u64,
    report: &Report<'_>,
) -> Result<Accepted, StoreError> {
    if tx
        .prepare_cached("SELECT 1 FROM devices WHERE id = ?1")?
        .query_row(params![device], |_| Ok(()))
        .optional()?
        .is_none()
    {
        return Ok(Accepted::UnknownDevice);
    }
    tx.prepare_cached("INSERT OR IGNORE INTO delivery (device) VALUES (?1)")?.execute(params![device])?;
    let stored_floor: i64 =
        tx.prepare_cached("SELECT floor FROM delivery WHERE device = ?1")?.query_row(params![device], |r| r.get(0))?;
    let new = seq as i64 >= stored_floor
        && tx
            .prepare_cached("INSERT OR IGNORE INTO received (device, seq) VALUES (?1, ?2)")?
            .execute(params![device, seq as i64])?
            == 1;
    if !new {
        tx.prepare_cached("UPDATE delivery SET reports_duplicates = reports_duplicates + 1 WHERE device = ?1")?
            .execute(params![device])?;
        return Ok(Accepted::Duplicate);
    }
    match report {
        Report::Status(status) => status_into(tx, device, status)?,
        Report::Heartbeat(heartbeat) => heartbeat_into(tx, device, heartbeat)?,
        Report::Drift(drift) => {
            drift_into(tx, device, drift)?;
        }
        Report::Event(DeliveryEvent::Evicted { evicted, .. }) => {
            tx.prepare_cached(
                "UPDATE delivery SET evicted_telemetry = evicted_telemetry + ?2,
                   evicted_heartbeats = evicted_heartbeats + ?3, evicted_reports = evicted_reports + ?4
                 WHERE device = ?1",
            )?
            .execute(params![
                device,
                evicted.telemetry as i64,
                evicted.heartbeats as i64,
                evicted.reports as i64
            ])?;
        }
    }
    tx.prepare_cached("UPDATE delivery SET reports_stored = reports_stored + 1 WHERE device = ?1")?
        .execute(params![device])?;
    if floor as i64 > stored_floor {
        tx.prepare_cached("UPDATE delivery SET floor = ?2 WHERE device = ?1")?
            .execute(params![device, floor as i64])?;
        tx.prepare_cached("DELETE FROM received WHERE device = ?1 AND seq < ?2")?
            .execute(params![device, floor as i64])?;
    }
    Ok(Accepted::Stored)
}

pub fn record_telemetry(
    conn: &mut Connection,
    device: &str,
    rows: &[TelemetryRow],
) -> Result<TelemetryAck, StoreError> {
    let tx = conn.transaction()?;
    let mut ack = TelemetryAck::default();
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO telemetry (device, seq, model, version, at_ms, latency_us, features, outputs, received_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        let received_ms = crate::unix_ms() as i64;
        for r in rows {
            let inserted = insert.execute(params![
                device,
                r.seq as i64,
                r.model,
                r.version,
                r.at_ms as i64,
                r.latency_us,
                f32s(&r.features),
                f32s(&r.outputs),
                received_ms
            ])?;
            if inserted == 1 {
                ack.stored += 1;
            } else {
                ack.duplicates += 1;
            }
            ack.through = ack.through.max(r.seq);
        }
    }
    tx.execute("INSERT OR IGNORE INTO delivery (device) VALUES (?1)", params![device])?;
    tx.execute(
        "UPDATE delivery SET telemetry_stored = telemetry_stored + ?2, telemetry_duplicates = telemetry_duplicates + ?3
         WHERE device = ?1",
        params![device, ack.stored as i64, ack.duplicates as i64],
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

pub fn telemetry(conn: &Connection, q: &TelemetryQuery) -> Result<Vec<StoredTelemetry>, StoreError> {
    let (after_device, after_seq) = q.after.clone().unwrap_or_default();
    let mut stmt = conn.prepare_cached(
        "SELECT device, seq, model, version, at_ms, latency_us, features, outputs FROM telemetry
         WHERE model = ?1 AND (?2 IS NULL OR version = ?2) AND at_ms >= ?3 AND (device, seq) > (?4, ?5)
         ORDER BY device, seq LIMIT ?6",
    )?;
    let rows = stmt.query_map(
        params![q.model, q.version, q.since_ms.unwrap_or(0) as i64, after_device, after_seq as i64, q.limit as i64],
        |r| {
            Ok(StoredTelemetry {
                device: r.get(0)?,
                row: TelemetryRow {
                    seq: r.get::<_, i64>(1)? as u64,
                    model: r.get(2)?,
                    version: r.get(3)?,
                    at_ms: r.get::<_, i64>(4)? as u64,
                    latency_us: r.get(5)?,
                    features: from_f32s(&r.get::<_, Vec<u8>>(6)?),
                    outputs: from_f32s(&r.get::<_, Vec<u8>>(7)?),
                },
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn views(conn: &Connection) -> Result<Vec<DeliveryView>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT d.id, COALESCE(reports_stored, 0), COALESCE(reports_duplicates, 0), COALESCE(telemetry_stored, 0),
                COALESCE(telemetry_duplicates, 0), COALESCE(evicted_telemetry, 0), COALESCE(evicted_heartbeats, 0),
                COALESCE(evicted_reports, 0), COALESCE(rejected, 0)
         FROM devices d LEFT JOIN delivery ON delivery.device = d.id ORDER BY d.name, d.id",
    )?;
    let rows = stmt.query_map([], |r| {
        let n = |i| r.get::<_, i64>(i).map(|v| v as u64);
        Ok(DeliveryView {
            device: r.get(0)?,
            reports_stored: n(1)?,
            reports_duplicates: n(2)?,
            telemetry_stored: n(3)?,
            telemetry_duplicates: n(4)?,
            evicted: Evicted { telemetry: n(5)?, heartbeats: n(6)?, reports: n(7)? },
            rejected: n(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes at most `limit` drift windows and `limit` telemetry rows stored before `before_ms`.
pub fn prune(conn: &mut Connection, before_ms: u64, limit: usize) -> Result<Pruned, StoreError> {
    let tx = conn.transaction()?;
    let bounds = params![before_ms as i64, limit as i64];
    let drift_windows = tx
        .prepare_cached("DELETE FROM drift WHERE rowid IN (SELECT rowid FROM drift WHERE received_ms < ?1 LIMIT ?2)")?
        .execute(bounds)?;
    let telemetry_rows = tx
        .prepare_cached(
            "DELETE FROM telemetry WHERE rowid IN (SELECT rowid FROM telemetry WHERE received_ms < ?1 LIMIT ?2)",
        )?
        .execute(bounds)?;
    tx.commit()?;
    Ok(Pruned { drift_windows, telemetry_rows })
}
