//! The rollout half of the SQLite store: rollout state as JSON, the audit log, per-device
//! desired attempts and the observations the rollout engine judges.

use std::collections::BTreeMap;

use proto::drift::SketchCounts;
use proto::wire::{AuditEntry, UpdateStep};
use rusqlite::{params, Connection, OptionalExtension};

use super::{DesiredChange, StoreError};
use crate::rollout::create::DeviceInfo;
use crate::rollout::gates::Observations;
use crate::rollout::state::VersionMetrics;
use crate::rollout::Rollout;

/// Samples a device needs before its input drift is compared (bias ~ 9/500 < 0.02 PSI).
pub const MIN_DRIFT_SAMPLES: u64 = 500;

/// The one desired-version upsert, inside the caller's transaction. `attempt` None keeps the
/// stored attempt (a plain deployment) and always raises the revision, so a device told again
/// checks in again; `Some` is a rollout's assertion and changes nothing (returns None) when the
/// version and attempt are already what it wants.
pub fn upsert_desired(
    tx: &Connection,
    device: &str,
    model: &str,
    version: &str,
    attempt: Option<u32>,
) -> Result<Option<u64>, StoreError> {
    if let Some(attempt) = attempt {
        let current: Option<(String, u32)> = tx
            .query_row(
                "SELECT version, attempt FROM desired WHERE device = ?1 AND model = ?2",
                params![device, model],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if current.as_ref().is_some_and(|(v, a)| v == version && *a == attempt) {
            return Ok(None);
        }
    }
    tx.execute(
        "INSERT INTO desired (device, model, version, attempt) VALUES (?1, ?2, ?3, COALESCE(?4, 0))
         ON CONFLICT (device, model) DO UPDATE SET version = excluded.version,
           attempt = COALESCE(?4, desired.attempt)",
        params![device, model, version, attempt],
    )?;
    let revision: i64 = tx.query_row(
        "UPDATE devices SET revision = revision + 1 WHERE id = ?1 RETURNING revision",
        params![device],
        |r| r.get(0),
    )?;
    Ok(Some(revision as u64))
}

pub fn device_infos(conn: &Connection, model: &str) -> Result<Vec<DeviceInfo>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT d.id, d.labels, s.active_version FROM devices d
         LEFT JOIN model_status s ON s.device = d.id AND s.model = ?1 ORDER BY d.id",
    )?;
    let rows = stmt.query_map(params![model], |r| {
        let labels: String = r.get(1)?;
        Ok(DeviceInfo {
            id: r.get(0)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            active_version: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn observations(conn: &Connection, model: &str, since_ms: u64) -> Result<Observations, StoreError> {
    let mut observations = Observations::new();
    let mut status = conn.prepare(
        "SELECT device, active_version, step, version, detail, inferences, errors, latency_p95_us FROM model_status WHERE model = ?1",
    )?;
    let rows = status.query_map(params![model], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, Option<i64>>(7)?,
        ))
    })?;
    for row in rows {
        let (device, active, step, step_version, detail, inferences, errors, p95) = row?;
        let o = observations.entry(device).or_default();
        o.step = step.as_deref().and_then(UpdateStep::parse);
        o.step_version = step_version;
        o.detail = detail;
        if let Some(active) = &active {
            let m = o.metrics.entry(active.clone()).or_default();
            m.inferences = inferences as u64;
            m.errors = errors as u64;
            m.latency_p95_us = p95.map(|v| v as f64);
        }
        o.active_version = active;
    }
    let mut drift =
        conn.prepare("SELECT device, version, counts FROM drift WHERE model = ?1 AND window_start_ms >= ?2")?;
    let rows = drift.query_map(params![model, since_ms as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Vec<u8>>(2)?))
    })?;
    for row in rows {
        let (device, version, counts) = row?;
        let Ok(counts) = proto::wire::decode::<SketchCounts>("stored drift counts", &counts) else { continue };
        let metrics: &mut VersionMetrics = observations.entry(device).or_default().metrics.entry(version).or_default();
        if metrics.counts.samples == 0 && metrics.counts.classes.is_empty() {
            metrics.counts = counts;
        } else {
            let _ = metrics.counts.merge(&counts);
        }
    }
    // Input drift of everything a device saw since `since_ms`, against the version's reference:
    // PSI over merged windows, not a mean of small-window PSIs. PSI is biased upwards by about
    // (bins - 1) / samples, so a device counts only once it has MIN_DRIFT_SAMPLES: otherwise a
    // device that just switched versions looks "drifted" next to one that ran all along.
    let mut references: BTreeMap<String, Option<proto::drift::ReferenceSketch>> = BTreeMap::new();
    for observation in observations.values_mut() {
        for (version, metrics) in observation.metrics.iter_mut().filter(|(_, m)| m.counts.samples >= MIN_DRIFT_SAMPLES)
        {
            let reference = references.entry(version.clone()).or_insert_with(|| reference(conn, model, version));
            if let Some(report) = reference.as_ref().and_then(|r| proto::drift::drift(r, &metrics.counts).ok()) {
                metrics.input_drift = report.feature_psi.iter().copied().reduce(f64::max);
            }
        }
    }
    Ok(observations)
}

fn reference(conn: &Connection, model: &str, version: &str) -> Option<proto::drift::ReferenceSketch> {
    let manifest: Vec<u8> = conn
        .query_row("SELECT manifest FROM bundles WHERE name = ?1 AND version = ?2", params![model, version], |r| {
            r.get(0)
        })
        .ok()?;
    proto::Manifest::parse(&manifest).ok().map(|m| m.reference)
}

/// The rollout's state, its audit lines and the desired versions it sets, in one transaction:
/// a crash can never leave a saved state whose desired writes are missing. Returns the devices
/// whose revision changed, to notify once committed.
pub fn save(
    conn: &mut Connection,
    rollout: &Rollout,
    audit: &[AuditEntry],
    desired: &[DesiredChange],
) -> Result<Vec<(String, u64)>, StoreError> {
    let state = serde_json::to_string(rollout).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO rollouts (id, model, phase, created_ms, state) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET phase = excluded.phase, state = excluded.state",
        params![rollout.id, rollout.plan.model, rollout.phase.as_str(), rollout.created_ms as i64, state],
    )?;
    for entry in audit {
        insert_audit(&tx, entry)?;
    }
    let mut revisions = Vec::new();
    for (device, version, attempt) in desired {
        if let Some(revision) = upsert_desired(&tx, device, &rollout.plan.model, version, Some(*attempt))? {
            revisions.push((device.clone(), revision));
        }
    }
    tx.commit()?;
    Ok(revisions)
}

fn insert_audit(conn: &Connection, e: &AuditEntry) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit (at_ms, actor, rollout, action, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![e.at_ms as i64, e.actor, e.rollout, e.action, e.detail],
    )?;
    Ok(())
}

pub fn append_audit(conn: &Connection, entry: &AuditEntry) -> Result<(), StoreError> {
    insert_audit(conn, entry)
}

pub fn load(conn: &Connection, id: Option<&str>) -> Result<Vec<Rollout>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT state FROM rollouts WHERE ?1 IS NULL OR id = ?1 ORDER BY created_ms DESC, id")?;
    let rows = stmt.query_map(params![id], |r| r.get::<_, String>(0))?;
    rows.map(|row| {
        let text = row?;
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("rollout state: {e}")))
    })
    .collect()
}

pub fn audit(conn: &Connection, rollout: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT at_ms, actor, rollout, action, detail FROM audit WHERE ?1 IS NULL OR rollout = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![rollout, limit as i64], |r| {
        Ok(AuditEntry {
            at_ms: r.get::<_, i64>(0)? as u64,
            actor: r.get(1)?,
            rollout: r.get(2)?,
            action: r.get(3)?,
            detail: r.get(4)?,
        })
    })?;
    let mut entries: Vec<AuditEntry> = rows.collect::<Result<_, _>>()?;
    entries.reverse();
    Ok(entries)
}
