//! SQLite side of lineage: every published bundle, each device's recent update steps per model
//! (bounded), and the audit lines that name a device.

use proto::lineage::{StatusEntry, MAX_HISTORY};
use proto::wire::{AuditEntry, UpdateStatus};
use rusqlite::{params, Connection};

use super::rollouts::{audit_rows, parse_step};
use super::{BundleRecord, StoreError};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS status_history (
    device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, step TEXT NOT NULL,
    detail TEXT NOT NULL, at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS status_history_by_device ON status_history (device, model, at_ms);
";

/// Appends a step to the device's history of the model, unless it repeats the newest step
/// there (an agent sends every model's status with each check-in, every 10 s: stored each time,
/// a model's 50 lines were one unchanged "active" within minutes, the steps before it lost),
/// and drops what is beyond [`MAX_HISTORY`] steps, so the table stays bounded per device.
pub fn record_history(conn: &Connection, device: &str, s: &UpdateStatus) -> Result<(), StoreError> {
    let appended = conn
        .prepare_cached(
            "INSERT INTO status_history (device, model, version, step, detail, at_ms)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE NOT EXISTS (
           SELECT 1 FROM (SELECT version, step, detail FROM status_history WHERE device = ?1 AND model = ?2
                          ORDER BY at_ms DESC, rowid DESC LIMIT 1) AS newest
           WHERE newest.version = ?3 AND newest.step = ?4 AND newest.detail = ?5)",
        )?
        .execute(params![device, s.model, s.version, s.step.as_str(), s.detail, s.at_ms as i64])?;
    if appended == 0 {
        return Ok(());
    }
    conn.prepare_cached("DELETE FROM status_history WHERE device = ?1 AND model = ?2 AND rowid NOT IN (
            SELECT rowid FROM status_history WHERE device = ?1 AND model = ?2 ORDER BY at_ms DESC, rowid DESC LIMIT ?3)")?.execute(params![device, s.model, MAX_HISTORY as i64],
    )?;
    Ok(())
}

/// Newest first.
pub fn status_history(conn: &Connection, device: &str, model: &str) -> Result<Vec<StatusEntry>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT version, step, detail, at_ms FROM status_history WHERE device = ?1 AND model = ?2
         ORDER BY at_ms DESC, rowid DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![device, model, MAX_HISTORY as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)? as u64))
    })?;
    let mut entries = Vec::new();
    for row in rows {
        let (version, step, detail, at_ms) = row?;
        entries.push(StatusEntry { version, step: parse_step(device, &step)?, detail, at_ms });
    }
    Ok(entries)
}

/// Every published bundle, by name then version as stored.
pub fn bundles(conn: &Connection) -> Result<Vec<BundleRecord>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT name, version, sha256, size, created_at, signed_by, manifest FROM bundles ORDER BY name, created_at",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(BundleRecord {
            name: r.get(0)?,
            version: r.get(1)?,
            sha256: r.get(2)?,
            size: r.get::<_, i64>(3)? as u64,
            created_at: r.get::<_, i64>(4)? as u64,
            signed_by: r.get(5)?,
            manifest_json: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Audit lines whose detail names the device (device ids are `dev-` and hex: no LIKE
/// wildcards), newest first.
pub fn audit_for_device(conn: &Connection, device: &str, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
    audit_rows(conn, "instr(detail, ?1) > 0", Some(device), limit)
}
