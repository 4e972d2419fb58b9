//! The rollout half of the SQLite store: rollout state as JSON, the audit log, per-device
//! desired attempts and the raw rows the rollout engine observes.

use proto::window::ActivationWindow;
use proto::wire::{AuditEntry, UpdateStep};
use rusqlite::{params, Connection, OptionalExtension};

use crate::rollout::{CohortDefault, DeviceInfo, MemberWrites, Phase, Rollout};
use crate::store::rollout_rows::{head_json, member_rows, rollout_from_rows};
use crate::store::{DesiredChange, ObservationRows, StatusRow, StoreError, WindowRow};

/// A `desired` row's version, attempt, shadow version and rate, and activation window (JSON).
type DesiredColumns = (String, u32, Option<String>, Option<f64>, Option<String>);

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
    shadow: Option<(&str, f32)>,
    window: Option<&ActivationWindow>,
) -> Result<Option<u64>, StoreError> {
    let (shadow_version, shadow_rate) = (shadow.map(|(v, _)| v), shadow.map(|(_, r)| r as f64));
    let window = window.map(serde_json::to_string).transpose().map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if let Some(attempt) = attempt {
        let current: Option<DesiredColumns> = tx
            .prepare_cached(
                "SELECT version, attempt, shadow_version, shadow_rate, activation_window FROM desired
                 WHERE device = ?1 AND model = ?2",
            )?
            .query_row(params![device, model], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .optional()?;
        let unchanged = current.as_ref().is_some_and(|(v, a, sv, sr, w)| {
            v == version && *a == attempt && sv.as_deref() == shadow_version && *sr == shadow_rate && *w == window
        });
        if unchanged {
            return Ok(None);
        }
    }
    // Cached: a wave runs these once per device (a statement compiled 15,000 times a wave of 5,000).
    tx.prepare_cached(
        "INSERT INTO desired (device, model, version, attempt, shadow_version, shadow_rate, activation_window)
         VALUES (?1, ?2, ?3, COALESCE(?4, 0), ?5, ?6, ?7)
         ON CONFLICT (device, model) DO UPDATE SET version = excluded.version,
           attempt = COALESCE(?4, desired.attempt), shadow_version = ?5, shadow_rate = ?6, activation_window = ?7",
    )?
    .execute(params![device, model, version, attempt, shadow_version, shadow_rate, window])?;
    bump_revision(tx, device).map(Some)
}

/// The `desired.activation_window` column (JSON) read back.
pub fn window_of(text: Option<String>) -> rusqlite::Result<Option<ActivationWindow>> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// Raises the device's desired-state revision (it checks in again when told it changed).
/// A device that is not enrolled is a conflict naming it (its desired row, written first in the
/// caller's transaction, goes with the transaction).
fn bump_revision(tx: &Connection, device: &str) -> Result<u64, StoreError> {
    let revision: Option<i64> = tx
        .prepare_cached("UPDATE devices SET revision = revision + 1 WHERE id = ?1 RETURNING revision")?
        .query_row(params![device], |r| r.get(0))
        .optional()?;
    revision.map(|r| r as u64).ok_or_else(|| StoreError::not_enrolled(device))
}

pub fn device_infos(conn: &Connection, model: &str) -> Result<Vec<DeviceInfo>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT d.id, d.labels, s.active_version, w.version, d.revoked_ms IS NOT NULL FROM devices d
         LEFT JOIN model_status s ON s.device = d.id AND s.model = ?1
         LEFT JOIN desired w ON w.device = d.id AND w.model = ?1 ORDER BY d.id",
    )?;
    let rows = stmt.query_map(params![model], |r| {
        let labels: String = r.get(1)?;
        Ok(DeviceInfo {
            id: r.get(0)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            active_version: r.get(2)?,
            desired_version: r.get(3)?,
            revoked: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn cohort_defaults(conn: &Connection) -> Result<Vec<CohortDefault>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT source, model, selector, version, at_ms FROM cohort_defaults ORDER BY at_ms DESC")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get(1)?, r.get::<_, String>(2)?, r.get(3)?, r.get::<_, i64>(4)?))
    })?;
    rows.map(|row| {
        let (source, model, selector, version, at_ms) = row?;
        let selector = serde_json::from_str(&selector)
            .map_err(|e| StoreError::Corrupt(format!("cohort default {source}'s selector: {e}")))?;
        Ok(CohortDefault { source, model, selector, version, at_ms: at_ms as u64 })
    })
    .collect()
}

fn insert_cohort_default(tx: &Connection, d: &CohortDefault) -> Result<(), StoreError> {
    let selector = serde_json::to_string(&d.selector).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    // A rollout saved again after it completed keeps the time it first became the default.
    tx.execute(
        "INSERT OR IGNORE INTO cohort_defaults (source, model, selector, version, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![d.source, d.model, selector, d.version, d.at_ms as i64],
    )?;
    Ok(())
}

pub fn deploy_to_selector(
    conn: &mut Connection,
    default: &CohortDefault,
    devices: &[String],
    audit: &AuditEntry,
) -> Result<Vec<(String, u64)>, StoreError> {
    let tx = conn.transaction()?;
    insert_cohort_default(&tx, default)?;
    let mut revisions = Vec::with_capacity(devices.len());
    for device in devices {
        if let Some(revision) = upsert_desired(&tx, device, &default.model, &default.version, None, None, None)? {
            revisions.push((device.clone(), revision));
        }
    }
    insert_audit(&tx, audit)?;
    tx.commit()?;
    Ok(revisions)
}

pub fn apply_cohort_defaults(
    conn: &mut Connection,
    model: &str,
    newcomers: &[(String, String)],
    audit: &[AuditEntry],
) -> Result<Vec<(String, u64)>, StoreError> {
    let tx = conn.transaction()?;
    let mut revisions = Vec::with_capacity(newcomers.len());
    for (device, version) in newcomers {
        // Only a device still without a desired version: a deployment since the caller read
        // the devices wins.
        let inserted = tx.execute(
            "INSERT INTO desired (device, model, version, attempt) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT (device, model) DO NOTHING",
            params![device, model, version],
        )?;
        if inserted == 1 {
            revisions.push((device.clone(), bump_revision(&tx, device)?));
        }
    }
    for entry in audit {
        insert_audit(&tx, entry)?;
    }
    tx.commit()?;
    Ok(revisions)
}

/// The raw rows the rollout engine observes: every device's status of `model`, and its drift
/// windows since `since_ms` (counts still encoded). No policy here: see `rollout::observe`.
pub fn observation_rows(
    conn: &Connection,
    model: &str,
    since_ms: u64,
    received_from_ms: u64,
) -> Result<ObservationRows, StoreError> {
    let mut status = conn.prepare(
        "SELECT device, active_version, step, version, detail, inferences, errors, latency_p95_us, shadow_version
         FROM model_status WHERE model = ?1",
    )?;
    let rows = status.query_map(params![model], |r| {
        Ok((
            StatusRow {
                device: r.get(0)?,
                active_version: r.get(1)?,
                step: None,
                step_version: r.get(3)?,
                detail: r.get(4)?,
                inferences: r.get::<_, i64>(5)? as u64,
                errors: r.get::<_, i64>(6)? as u64,
                latency_p95_us: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                shadow_version: r.get(8)?,
            },
            r.get::<_, Option<String>>(2)?,
        ))
    })?;
    let mut statuses = Vec::new();
    for row in rows {
        let (mut row, step) = row?;
        row.step = step.as_deref().map(|text| parse_step(&row.device, text)).transpose()?;
        statuses.push(row);
    }
    // Two statements, so that a read of what is new uses the (model, received_ms) index.
    let mut drift = conn.prepare(if received_from_ms == 0 {
        "SELECT device, version, window_start_ms, counts, shadow, received_ms FROM drift
         WHERE model = ?1 AND window_start_ms >= ?2 AND ?3 = 0"
    } else {
        "SELECT device, version, window_start_ms, counts, shadow, received_ms FROM drift
         WHERE model = ?1 AND received_ms >= ?3 AND window_start_ms >= ?2"
    })?;
    let windows = drift
        .query_map(params![model, since_ms as i64, received_from_ms as i64], |r| {
            Ok(WindowRow {
                device: r.get(0)?,
                version: r.get(1)?,
                start_ms: r.get::<_, i64>(2)? as u64,
                counts: r.get(3)?,
                shadow: r.get(4)?,
                received_ms: r.get::<_, Option<i64>>(5)?.unwrap_or(0) as u64,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(ObservationRows { statuses, windows })
}

/// A stored update step; text that names no step is corruption, said with the device.
pub fn parse_step(device: &str, text: &str) -> Result<UpdateStep, StoreError> {
    UpdateStep::parse(text)
        .ok_or_else(|| StoreError::Corrupt(format!("device {device} has update step {text:?}, which is no known step")))
}

/// The rollout's state, its audit lines and the desired versions it sets, in one transaction:
/// a crash can never leave a saved state whose desired writes are missing. Returns the devices
/// whose revision changed, to notify once committed.
pub fn save(
    conn: &mut Connection,
    rollout: &Rollout,
    members: &MemberWrites,
    audit: &[AuditEntry],
    desired: &[DesiredChange],
) -> Result<Vec<(String, u64)>, StoreError> {
    let state = head_json(rollout)?;
    let (devices, member_texts) = member_rows(rollout, members)?;
    let tx = conn.transaction()?;
    let saved = if rollout.revision == 0 {
        tx.execute(
            "INSERT INTO rollouts (id, model, phase, created_ms, state, revision) VALUES (?1, ?2, ?3, ?4, ?5, 1)
             ON CONFLICT (id) DO NOTHING",
            params![rollout.id, rollout.plan.model, rollout.phase.as_str(), rollout.created_ms as i64, state],
        )?
    } else {
        tx.execute(
            "UPDATE rollouts SET phase = ?2, state = ?3, revision = revision + 1 WHERE id = ?1 AND revision = ?4",
            params![rollout.id, rollout.phase.as_str(), state, rollout.revision as i64],
        )?
    };
    if saved == 0 {
        return Err(StoreError::Stale(rollout.id.clone()));
    }
    if *members == MemberWrites::All && rollout.revision != 0 {
        tx.execute("DELETE FROM rollout_members WHERE rollout = ?1", params![rollout.id])?;
    }
    {
        let mut upsert = tx.prepare_cached(
            "INSERT INTO rollout_members (rollout, device, member) VALUES (?1, ?2, ?3)
             ON CONFLICT (rollout, device) DO UPDATE SET member = excluded.member",
        )?;
        for (device, member) in devices.iter().zip(&member_texts) {
            upsert.execute(params![rollout.id, device, member])?;
        }
    }
    for entry in audit {
        insert_audit(&tx, entry)?;
    }
    if rollout.phase == Phase::Completed {
        let at_ms = audit.iter().map(|e| e.at_ms).max().unwrap_or(rollout.created_ms);
        let default = CohortDefault {
            source: rollout.id.clone(),
            model: rollout.plan.model.clone(),
            selector: rollout.plan.selector.clone(),
            version: rollout.plan.version.clone(),
            at_ms,
        };
        insert_cohort_default(&tx, &default)?;
    }
    let mut revisions = Vec::new();
    for d in desired {
        let shadow = d.shadow.as_ref().map(|(v, r)| (v.as_str(), *r));
        if let Some(revision) =
            upsert_desired(&tx, &d.device, &rollout.plan.model, &d.version, Some(d.attempt), shadow, d.window.as_ref())?
        {
            revisions.push((d.device.clone(), revision));
        }
    }
    tx.commit()?;
    Ok(revisions)
}

fn insert_audit(conn: &Connection, e: &AuditEntry) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit (at_ms, actor, rollout, action, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![e.at_ms as i64, e.actor, e.rollout, e.action.as_str(), e.detail],
    )?;
    Ok(())
}

pub fn append_audit(conn: &Connection, entry: &AuditEntry) -> Result<(), StoreError> {
    insert_audit(conn, entry)
}

/// Rollouts newest first: rollout `id` only, when given; only the active ones, when `active_only`.
pub fn load(conn: &Connection, id: Option<&str>, active_only: bool) -> Result<Vec<Rollout>, StoreError> {
    let [running, paused] = Phase::ACTIVE.map(Phase::as_str);
    let mut stmt = conn.prepare_cached(
        "SELECT id, state, revision FROM rollouts WHERE (?1 IS NULL OR id = ?1) AND (NOT ?2 OR phase IN (?3, ?4))
         ORDER BY created_ms DESC, id",
    )?;
    let heads = stmt
        .query_map(params![id, active_only, running, paused], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut members = conn.prepare_cached("SELECT device, member FROM rollout_members WHERE rollout = ?1")?;
    heads
        .into_iter()
        .map(|(id, head, revision)| {
            let rows = members
                .query_map(params![id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            rollout_from_rows(&head, revision as u64, rows)
        })
        .collect()
}

pub fn active_revisions(conn: &Connection) -> Result<Vec<(String, u64)>, StoreError> {
    let [running, paused] = Phase::ACTIVE.map(Phase::as_str);
    let mut stmt =
        conn.prepare_cached("SELECT id, revision FROM rollouts WHERE phase IN (?1, ?2) ORDER BY created_ms DESC, id")?;
    let rows =
        stmt.query_map(params![running, paused], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn phases(conn: &Connection) -> Result<Vec<(Phase, u64)>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT phase, COUNT(*) FROM rollouts GROUP BY phase")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    rows.map(|row| {
        let (phase, count) = row?;
        Ok((crate::store::phase_named(&phase)?, count as u64))
    })
    .collect()
}

/// [`crate::store::Store::acquire_lease`]: one upsert that takes a free or expired lease or
/// renews the holder's own; it returns a row only when it wrote one.
pub fn acquire_lease(
    conn: &Connection,
    name: &str,
    holder: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<bool, StoreError> {
    let held = conn
        .query_row(
            "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms
             WHERE leases.holder = excluded.holder OR leases.expires_ms <= ?4
             RETURNING holder",
            params![name, holder, now_ms.saturating_add(ttl_ms) as i64, now_ms as i64],
            |r| r.get::<_, String>(0),
        )
        .optional()?;
    Ok(held.is_some())
}

pub fn release_lease(conn: &Connection, name: &str, holder: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM leases WHERE name = ?1 AND holder = ?2", params![name, holder])?;
    Ok(())
}

pub fn audit(conn: &Connection, rollout: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
    let mut entries = audit_rows(conn, "?1 IS NULL OR rollout = ?1", rollout, limit)?;
    entries.reverse();
    Ok(entries)
}

/// Audit lines matching `filter` (SQL over the audit table, with `?1` bound to `param` and
/// `?2` to the limit), newest first.
pub(super) fn audit_rows(
    conn: &Connection,
    filter: &str,
    param: Option<&str>,
    limit: usize,
) -> Result<Vec<AuditEntry>, StoreError> {
    let sql =
        format!("SELECT at_ms, actor, rollout, action, detail FROM audit WHERE {filter} ORDER BY id DESC LIMIT ?2");
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params![param, limit as i64], |r| {
        let entry = AuditEntry {
            at_ms: r.get::<_, i64>(0)? as u64,
            actor: r.get(1)?,
            rollout: r.get(2)?,
            action: proto::wire::AuditAction::Created,
            detail: r.get(4)?,
        };
        Ok((entry, r.get::<_, String>(3)?))
    })?;
    let mut entries = Vec::new();
    for row in rows {
        let (mut entry, action) = row?;
        entry.action = proto::wire::AuditAction::parse(&action)
            .ok_or_else(|| StoreError::Corrupt(format!("audit line with unknown action {action:?}")))?;
        entries.push(entry);
    }
    Ok(entries)
}
