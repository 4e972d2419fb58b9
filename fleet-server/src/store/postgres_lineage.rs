//! PostgreSQL side of lineage: every published bundle, each device's recent update steps per
//! model (bounded), and the audit lines that name a device. `status_history.id` stands in for
//! SQLite's rowid as the tie-break between steps of the same millisecond.

use postgres::{Client, GenericClient};
use proto::lineage::{StatusEntry, MAX_HISTORY};
use proto::wire::{AuditEntry, UpdateStatus};

use super::prepared::Prepared;
use super::rollouts::{audit_rows, parse_step};
use crate::store::{BundleRecord, StoreError};

/// Appends a step to the device's history of the model unless it repeats the newest step there,
/// and drops what is beyond [`MAX_HISTORY`] steps (as `sqlite_lineage.rs`, which says why).
pub fn record_history(
    conn: &mut Prepared<'_, impl GenericClient>,
    device: &str,
    s: &UpdateStatus,
) -> Result<(), StoreError> {
    let appended = conn.execute(
        "INSERT INTO status_history (device, model, version, step, detail, at_ms)
         SELECT $1, $2, $3, $4, $5, $6 WHERE NOT EXISTS (
           SELECT 1 FROM (SELECT version, step, detail FROM status_history WHERE device = $1 AND model = $2
                          ORDER BY at_ms DESC, id DESC LIMIT 1) AS newest
           WHERE newest.version = $3 AND newest.step = $4 AND newest.detail = $5)",
        &[&device, &s.model, &s.version, &s.step.as_str(), &s.detail, &(s.at_ms as i64)],
    )?;
    if appended == 0 {
        return Ok(());
    }
    conn.execute(
        "DELETE FROM status_history WHERE device = $1 AND model = $2 AND id NOT IN (
            SELECT id FROM status_history WHERE device = $1 AND model = $2 ORDER BY at_ms DESC, id DESC LIMIT $3)",
        &[&device, &s.model, &(MAX_HISTORY as i64)],
    )?;
    Ok(())
}

/// Newest first.
pub fn status_history(conn: &mut Client, device: &str, model: &str) -> Result<Vec<StatusEntry>, StoreError> {
    let rows = conn.query(
        "SELECT version, step, detail, at_ms FROM status_history WHERE device = $1 AND model = $2
         ORDER BY at_ms DESC, id DESC LIMIT $3",
        &[&device, &model, &(MAX_HISTORY as i64)],
    )?;
    rows.iter()
        .map(|r| {
            Ok(StatusEntry {
                version: r.try_get(0)?,
                step: parse_step(device, r.try_get(1)?)?,
                detail: r.try_get(2)?,
                at_ms: r.try_get::<_, i64>(3)? as u64,
            })
        })
        .collect()
}

/// Every published bundle, by name then creation time.
pub fn bundles(conn: &mut Client) -> Result<Vec<BundleRecord>, StoreError> {
    let rows = conn.query(
        "SELECT name, version, sha256, size, created_at, signed_by, manifest FROM bundles ORDER BY name, created_at",
        &[],
    )?;
    rows.iter()
        .map(|r| {
            Ok(BundleRecord {
                name: r.try_get(0)?,
                version: r.try_get(1)?,
                sha256: r.try_get(2)?,
                size: r.try_get::<_, i64>(3)? as u64,
                created_at: r.try_get::<_, i64>(4)? as u64,
                signed_by: r.try_get(5)?,
                manifest_json: r.try_get(6)?,
            })
        })
        .collect()
}

/// Audit lines whose detail names the device (a plain substring match, as SQLite's instr),
/// newest first.
pub fn audit_for_device(conn: &mut Client, device: &str, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
    audit_rows(conn, "strpos(detail, $1) > 0", Some(device), limit)
}
