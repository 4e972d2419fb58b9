//! The SQLite store's devices: what a device is (enrollment, operators' rows), what it is told
//! (desired state) and what it says (last seen, statuses, heartbeats, drift windows), in the
//! caller's connection or transaction. Same statements as `postgres_devices.rs`.
//!
//! The statements a check-in or an ingest batch runs for every device are prepared once per
//! connection (`prepare_cached`) instead of compiled again for each. In the 10,000-agent run
//! this changed nothing measurable (docs/BENCHMARKS.md, Load): SQLite compiles them in
//! microseconds, where PostgreSQL's parse and extra round trip were what held it back.

use std::collections::BTreeMap;

use proto::wire::{
    bundle_path, DesiredModel, DesiredShadow, DesiredState, DeviceModelView, DeviceView, Heartbeat, UpdateStatus,
};
use rusqlite::{params, Connection};

use super::{json, lineage, rollouts};
use crate::store::{attach_model_views, blank_model_view, NewDevice, OperatorRecord, StoreError, StoredDrift};

/// Every device with its models' desired version, status and drift, in one read.
pub(super) fn list_devices(conn: &Connection) -> Result<Vec<DeviceView>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, name, labels, enrolled_ms, last_seen_ms, health, revoked_ms FROM devices ORDER BY name, id",
    )?;
    let mut devices: Vec<DeviceView> = stmt
        .query_map([], |r| {
            let labels: String = r.get(2)?;
            let health: Option<String> = r.get(5)?;
            Ok(DeviceView {
                id: r.get(0)?,
                name: r.get(1)?,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                enrolled_ms: r.get::<_, i64>(3)? as u64,
                last_seen_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                health: health.and_then(|h| serde_json::from_str(&h).ok()),
                models: Vec::new(),
                revoked_ms: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut models: BTreeMap<(String, String), DeviceModelView> = BTreeMap::new();
    let mut desired = conn.prepare("SELECT device, model, version FROM desired")?;
    for row in
        desired.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))?
    {
        let (device, model, version) = row?;
        models.entry((device, model.clone())).or_insert_with(|| blank_model_view(&model)).desired_version =
            Some(version);
    }
    let mut status =
        conn.prepare("SELECT device, model, step, detail, active_version, inferences, version FROM model_status")?;
    let rows = status.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, Option<String>>(6)?,
        ))
    })?;
    for row in rows {
        let (device, model, step, detail, active, inferences, step_version) = row?;
        let step = step.as_deref().map(|text| rollouts::parse_step(&device, text)).transpose()?;
        let view = models.entry((device, model.clone())).or_insert_with(|| blank_model_view(&model));
        view.step = step;
        view.step_version = step_version;
        view.detail = detail;
        view.active_version = active;
        view.inferences = inferences as u64;
    }
    let mut drift = conn.prepare(
        "SELECT device, model, COUNT(*),
                (SELECT score FROM drift d2 WHERE d2.device = d.device AND d2.model = d.model ORDER BY window_start_ms DESC LIMIT 1),
                (SELECT mean_confidence FROM drift d2 WHERE d2.device = d.device AND d2.model = d.model ORDER BY window_start_ms DESC LIMIT 1)
         FROM drift d GROUP BY device, model",
    )?;
    let rows = drift.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Option<f64>>(3)?,
            r.get::<_, Option<f64>>(4)?,
        ))
    })?;
    for row in rows {
        let (device, model, count, score, confidence) = row?;
        let view = models.entry((device, model.clone())).or_insert_with(|| blank_model_view(&model));
        view.drift_summaries = count as u64;
        view.drift_score = score;
        view.mean_confidence = confidence;
    }
    attach_model_views(&mut devices, &models);
    Ok(devices)
}

pub(super) fn touch_in(conn: &Connection, device: &str, at_ms: u64) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE devices SET last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?2) WHERE id = ?1")?
        .execute(params![device, at_ms as i64])?;
    Ok(())
}

pub(super) fn freshness_counter_in(conn: &Connection, device: &str) -> Result<u64, StoreError> {
    let counter: i64 = conn
        .prepare_cached(
            "UPDATE devices SET freshness_counter = freshness_counter + 1 WHERE id = ?1 RETURNING freshness_counter",
        )?
        .query_row(params![device], |r| r.get(0))?;
    Ok(counter as u64)
}

/// A device's desired state as stored (no freshness), inside the caller's connection or transaction.
pub(super) fn desired_in(conn: &Connection, device: &str) -> Result<DesiredState, StoreError> {
    let revision: i64 =
        conn.prepare_cached("SELECT revision FROM devices WHERE id = ?1")?.query_row(params![device], |r| r.get(0))?;
    let mut stmt = conn.prepare_cached(
        "SELECT d.model, d.version, b.sha256, b.size, d.attempt, d.shadow_version, d.shadow_rate, s.sha256, s.size,
           d.activation_window
         FROM desired d
         JOIN bundles b ON b.name = d.model AND b.version = d.version
         LEFT JOIN bundles s ON s.name = d.model AND s.version = d.shadow_version
         WHERE d.device = ?1 ORDER BY d.model",
    )?;
    let models = stmt
        .query_map(params![device], |r| {
            let (name, version): (String, String) = (r.get(0)?, r.get(1)?);
            let shadow_version: Option<String> = r.get(5)?;
            let shadow_bundle: Option<(String, i64)> = r.get::<_, Option<String>>(7)?.zip(r.get(8)?);
            let shadow = shadow_version.zip(shadow_bundle).map(|(v, (sha256, size))| DesiredShadow {
                bundle_path: bundle_path(&name, &v),
                version: v,
                bundle_sha256: sha256,
                bundle_size: size as u64,
                sample_rate: r.get::<_, Option<f64>>(6).ok().flatten().unwrap_or(0.1) as f32,
            });
            Ok(DesiredModel {
                bundle_path: bundle_path(&name, &version),
                name,
                version,
                bundle_sha256: r.get(2)?,
                bundle_size: r.get::<_, i64>(3)? as u64,
                attempt: r.get(4)?,
                shadow,
                activation_window: rollouts::window_of(r.get(9)?)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let root_version: Option<i64> =
        conn.prepare_cached("SELECT MAX(version) FROM roots")?.query_row([], |r| r.get(0))?;
    Ok(DesiredState {
        revision: revision as u64,
        models,
        root_version: root_version.map(|v| v as u64),
        freshness: None,
    })
}

pub(super) fn operator_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OperatorRecord> {
    let role: String = r.get(1)?;
    Ok(OperatorRecord {
        name: r.get(0)?,
        // Written only from a Role; an unknown value reads as the least privilege.
        role: role.parse().unwrap_or(proto::wire::Role::Viewer),
        token_hash: r.get(2)?,
        created_ms: r.get::<_, i64>(3)? as u64,
        revoked_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
    })
}

pub(super) fn insert_device(conn: &Connection, d: &NewDevice) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO devices (id, name, labels, credential_hash, enrolled_ms, public_key, broker_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![d.id, d.name, json(&d.labels), d.credential_hash, d.enrolled_ms as i64, d.public_key, d.broker_hash],
    )?;
    Ok(())
}

/// Keeps the newest status per (device, model): a late, older report changes nothing.
pub(super) fn status_into(conn: &Connection, device: &str, s: &UpdateStatus) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO model_status (device, model, version, step, detail, active_version, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (device, model) DO UPDATE SET version = excluded.version, step = excluded.step,
           detail = excluded.detail, active_version = excluded.active_version, at_ms = excluded.at_ms
         WHERE model_status.at_ms IS NULL OR model_status.at_ms <= excluded.at_ms",
    )?
    .execute(params![device, s.model, s.version, s.step.as_str(), s.detail, s.active_version, s.at_ms as i64],
    )?;
    lineage::record_history(conn, device, s)
}

/// Applies a heartbeat unless a newer one is already stored (a backlog may deliver old ones
/// after new ones; counters must not go backwards).
pub(super) fn heartbeat_into(conn: &Connection, device: &str, heartbeat: &Heartbeat) -> Result<(), StoreError> {
    let at = heartbeat.at_ms as i64;
    let newer = conn
        .prepare_cached(
            "UPDATE devices SET health = ?2, heartbeat_ms = ?3, last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?3)
             WHERE id = ?1 AND COALESCE(heartbeat_ms, 0) <= ?3",
        )?
        .execute(params![device, json(&heartbeat.health), at])?
        == 1;
    if !newer {
        return Ok(());
    }
    for m in &heartbeat.models {
        conn.prepare_cached(
            "INSERT INTO model_status (device, model, active_version, inferences, errors, latency_p95_us, shadow_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (device, model) DO UPDATE SET inferences = excluded.inferences,
               active_version = excluded.active_version, errors = excluded.errors,
               latency_p95_us = excluded.latency_p95_us, shadow_version = excluded.shadow_version",
        )?
        .execute(params![device, m.model, m.version, m.inferences as i64, m.errors as i64, m.latency_p95_us, m.shadow_version],
        )?;
    }
    Ok(())
}

/// Stores a window once; a second delivery of the same (device, model, start) returns false.
pub(super) fn drift_into(conn: &Connection, device: &str, d: &StoredDrift<'_>) -> Result<bool, StoreError> {
    let s = d.summary;
    let inserted = conn.prepare_cached(
        "INSERT OR IGNORE INTO drift (device, model, version, window_start_ms, window_end_ms, samples, score, mean_confidence, counts, shadow, received_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
            device,
            s.model,
            s.version,
            s.window_start_ms as i64,
            s.window_end_ms as i64,
            s.sketch.rows as i64,
            d.score,
            d.mean_confidence,
            proto::wire::encode(&s.sketch),
            s.shadow.as_ref().map(proto::wire::encode),
            crate::unix_ms() as i64
        ],
    )?;
    Ok(inserted == 1)
}
