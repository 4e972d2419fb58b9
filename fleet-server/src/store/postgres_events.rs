//! PostgreSQL side of retraining events: the drift watch per (model, version, cohort), and the
//! events it fired with their delivery state. A fired event is written with the watch and its
//! audit line in one transaction (persist before act); delivery is recorded after each try.

use postgres::Client;
use proto::events::RetrainEvent;
use proto::wire::AuditEntry;

use super::rollouts::append_audit;
use crate::drift::retrain::Watch;
use crate::store::{PendingEvent, StoreError};

pub fn drift_watch(conn: &mut Client, model: &str, version: &str, cohort: &str) -> Result<Option<Watch>, StoreError> {
    let row = conn.query_opt(
        "SELECT state FROM drift_watch WHERE model = $1 AND version = $2 AND cohort = $3",
        &[&model, &version, &cohort],
    )?;
    let Some(row) = row else { return Ok(None) };
    serde_json::from_str(row.try_get(0)?)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("drift watch of {model} {version} [{cohort}]: {e}")))
}

/// Saves the watch and, when it fired, the event (once per id) and its audit line, atomically.
/// True when the event is new.
pub fn save_drift_watch(
    conn: &mut Client,
    key: (&str, &str, &str),
    watch: &Watch,
    fired: Option<(&RetrainEvent, &AuditEntry)>,
) -> Result<bool, StoreError> {
    let (model, version, cohort) = key;
    let state = serde_json::to_string(watch).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let mut tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO drift_watch (model, version, cohort, state) VALUES ($1, $2, $3, $4)
         ON CONFLICT (model, version, cohort) DO UPDATE SET state = excluded.state",
        &[&model, &version, &cohort, &state],
    )?;
    let mut new = false;
    if let Some((event, audit)) = fired {
        let payload = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        new = tx.execute(
            "INSERT INTO retrain_events (id, payload, created_ms, next_attempt_ms) VALUES ($1, $2, $3, $3)
             ON CONFLICT DO NOTHING",
            &[&event.id, &payload, &(audit.at_ms as i64)],
        )? == 1;
        if new {
            append_audit(&mut tx, audit)?;
        }
    }
    tx.commit()?;
    Ok(new)
}

/// Undelivered events whose next try is due, oldest first.
pub fn due_events(conn: &mut Client, now_ms: u64, limit: usize) -> Result<Vec<PendingEvent>, StoreError> {
    let rows = conn.query(
        "SELECT id, payload, attempts FROM retrain_events WHERE delivered_ms IS NULL AND next_attempt_ms <= $1
         ORDER BY created_ms LIMIT $2",
        &[&(now_ms as i64), &(limit as i64)],
    )?;
    rows.iter()
        .map(|r| {
            Ok(PendingEvent { id: r.try_get(0)?, payload: r.try_get(1)?, attempts: r.try_get::<_, i64>(2)? as u32 })
        })
        .collect()
}

/// Records one delivery try: delivered, or failed with the reason and when to try again.
pub fn event_attempted(
    conn: &mut Client,
    id: &str,
    outcome: &Result<(), String>,
    now_ms: u64,
    next_attempt_ms: u64,
) -> Result<(), StoreError> {
    match outcome {
        Ok(()) => conn.execute(
            "UPDATE retrain_events SET delivered_ms = $2, attempts = attempts + 1, last_error = '' WHERE id = $1",
            &[&id, &(now_ms as i64)],
        )?,
        Err(reason) => conn.execute(
            "UPDATE retrain_events SET attempts = attempts + 1, next_attempt_ms = $2, last_error = $3 WHERE id = $1",
            &[&id, &(next_attempt_ms as i64), reason],
        )?,
    };
    Ok(())
}
