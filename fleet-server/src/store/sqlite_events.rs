//! SQLite side of retraining events: the drift watch per (model, version, cohort), and the
//! events it fired with their delivery state. A fired event is written with the watch and its
//! audit line in one transaction (persist before act); delivery is recorded after each try.

use proto::events::RetrainEvent;
use proto::wire::AuditEntry;
use rusqlite::{params, Connection, OptionalExtension};

use super::rollouts::append_audit;
use super::{PendingEvent, StoreError};
use crate::drift::retrain::Watch;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS drift_watch (
    model TEXT NOT NULL, version TEXT NOT NULL, cohort TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (model, version, cohort));
CREATE TABLE IF NOT EXISTS retrain_events (
    id TEXT PRIMARY KEY, payload TEXT NOT NULL, created_ms INTEGER NOT NULL,
    delivered_ms INTEGER, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ms INTEGER NOT NULL,
    last_error TEXT NOT NULL DEFAULT '');
";

pub fn drift_watch(conn: &Connection, model: &str, version: &str, cohort: &str) -> Result<Option<Watch>, StoreError> {
    let state: Option<String> = conn
        .query_row(
            "SELECT state FROM drift_watch WHERE model = ?1 AND version = ?2 AND cohort = ?3",
            params![model, version, cohort],
            |r| r.get(0),
        )
        .optional()?;
    state
        .map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("drift watch of {model} {version} [{cohort}]: {e}")))
        })
        .transpose()
}

/// Saves the watch and, when it fired, the event (once per id) and its audit line, atomically.
/// True when the event is new.
pub fn save_drift_watch(
    conn: &mut Connection,
    key: (&str, &str, &str),
    watch: &Watch,
    fired: Option<(&RetrainEvent, &AuditEntry)>,
) -> Result<bool, StoreError> {
    let (model, version, cohort) = key;
    let tx = conn.transaction()?;
    let state = serde_json::to_string(watch).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    tx.execute(
        "INSERT INTO drift_watch (model, version, cohort, state) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (model, version, cohort) DO UPDATE SET state = excluded.state",
        params![model, version, cohort, state],
    )?;
    let mut new = false;
    if let Some((event, audit)) = fired {
        let payload = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        new = tx.execute(
            "INSERT OR IGNORE INTO retrain_events (id, payload, created_ms, next_attempt_ms) VALUES (?1, ?2, ?3, ?3)",
            params![event.id, payload, audit.at_ms as i64],
        )? == 1;
        if new {
            append_audit(&tx, audit)?;
        }
    }
    tx.commit()?;
    Ok(new)
}

/// Undelivered events whose next try is due, oldest first.
pub fn due_events(conn: &Connection, now_ms: u64, limit: usize) -> Result<Vec<PendingEvent>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, payload, attempts FROM retrain_events WHERE delivered_ms IS NULL AND next_attempt_ms <= ?1
         ORDER BY created_ms LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now_ms as i64, limit as i64], |r| {
        Ok(PendingEvent { id: r.get(0)?, payload: r.get(1)?, attempts: r.get::<_, i64>(2)? as u32 })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records one delivery try: delivered, or failed with the reason and when to try again.
pub fn event_attempted(
    conn: &Connection,
    id: &str,
    outcome: &Result<(), String>,
    now_ms: u64,
    next_attempt_ms: u64,
) -> Result<(), StoreError> {
    match outcome {
        Ok(()) => conn.execute(
            "UPDATE retrain_events SET delivered_ms = ?2, attempts = attempts + 1, last_error = '' WHERE id = ?1",
            params![id, now_ms as i64],
        )?,
        Err(reason) => conn.execute(
            "UPDATE retrain_events SET attempts = attempts + 1, next_attempt_ms = ?2, last_error = ?3 WHERE id = ?1",
            params![id, next_attempt_ms as i64, reason],
        )?,
    };
    Ok(())
}
