//! The rollout half of the PostgreSQL store: rollout state as JSON, the audit log, per-device
//! desired attempts and the raw rows the rollout engine observes. Same statements and the same
//! transactions as `sqlite_rollouts.rs`.

use postgres::{Client, GenericClient};
use proto::window::ActivationWindow;
use proto::wire::{AuditEntry, UpdateStep};

use super::devices::lock_devices;
use super::prepared::{PgConn, Prepared};
use crate::rollout::{CohortDefault, DeviceInfo, Phase, Rollout};
use crate::store::{DesiredChange, ObservationRows, StatusRow, StoreError, WindowRow};

/// The one desired-version upsert, inside the caller's transaction. `attempt` None keeps the
/// stored attempt (a plain deployment) and always raises the revision, so a device told again
/// checks in again; `Some` is a rollout's assertion and changes nothing (returns None) when the
/// version, attempt, shadow and window are already what it wants.
pub fn upsert_desired(
    tx: &mut Prepared<'_, impl GenericClient>,
    device: &str,
    model: &str,
    version: &str,
    attempt: Option<u32>,
    shadow: Option<(&str, f32)>,
    window: Option<&ActivationWindow>,
) -> Result<Option<u64>, StoreError> {
    let (shadow_version, shadow_rate) = (shadow.map(|(v, _)| v), shadow.map(|(_, r)| r as f64));
    let window = window.map(serde_json::to_string).transpose().map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let attempt = attempt.map(i64::from);
    if let Some(attempt) = attempt {
        let current = tx.query_opt(
            "SELECT version, attempt, shadow_version, shadow_rate, activation_window FROM desired
             WHERE device = $1 AND model = $2",
            &[&device, &model],
        )?;
        if let Some(r) = current {
            let unchanged = r.try_get::<_, &str>(0)? == version
                && r.try_get::<_, i64>(1)? == attempt
                && r.try_get::<_, Option<&str>>(2)? == shadow_version
                && r.try_get::<_, Option<f64>>(3)? == shadow_rate
                && r.try_get::<_, Option<String>>(4)? == window;
            if unchanged {
                return Ok(None);
            }
        }
    }
    tx.execute(
        "INSERT INTO desired (device, model, version, attempt, shadow_version, shadow_rate, activation_window)
         VALUES ($1, $2, $3, COALESCE($4::BIGINT, 0), $5, $6, $7)
         ON CONFLICT (device, model) DO UPDATE SET version = excluded.version,
           attempt = COALESCE($4::BIGINT, desired.attempt), shadow_version = $5, shadow_rate = $6, activation_window = $7",
        &[&device, &model, &version, &attempt, &shadow_version, &shadow_rate, &window],
    )?;
    bump_revision(tx, device).map(Some)
}

/// The `desired.activation_window` column (JSON) read back.
pub fn window_of(text: Option<String>) -> Result<Option<ActivationWindow>, StoreError> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("desired activation window: {e}")))
}

/// Raises the device's desired-state revision (it checks in again when told it changed).
fn bump_revision(tx: &mut Prepared<'_, impl GenericClient>, device: &str) -> Result<u64, StoreError> {
    let row =
        tx.query_one("UPDATE devices SET revision = revision + 1 WHERE id = $1 RETURNING revision", &[&device])?;
    Ok(row.try_get::<_, i64>(0)? as u64)
}

pub fn device_infos(conn: &mut Client, model: &str) -> Result<Vec<DeviceInfo>, StoreError> {
    let rows = conn.query(
        "SELECT d.id, d.labels, s.active_version, w.version, d.revoked_ms IS NOT NULL FROM devices d
         LEFT JOIN model_status s ON s.device = d.id AND s.model = $1
         LEFT JOIN desired w ON w.device = d.id AND w.model = $1 ORDER BY d.id",
        &[&model],
    )?;
    rows.iter()
        .map(|r| {
            let labels: &str = r.try_get(1)?;
            Ok(DeviceInfo {
                id: r.try_get(0)?,
                labels: serde_json::from_str(labels).unwrap_or_default(),
                active_version: r.try_get(2)?,
                desired_version: r.try_get(3)?,
                revoked: r.try_get(4)?,
            })
        })
        .collect()
}

pub fn cohort_defaults(conn: &mut Client) -> Result<Vec<CohortDefault>, StoreError> {
    let rows =
        conn.query("SELECT source, model, selector, version, at_ms FROM cohort_defaults ORDER BY at_ms DESC", &[])?;
    rows.iter()
        .map(|r| {
            let source: String = r.try_get(0)?;
            let selector = serde_json::from_str(r.try_get(2)?)
                .map_err(|e| StoreError::Corrupt(format!("cohort default {source}'s selector: {e}")))?;
            Ok(CohortDefault {
                model: r.try_get(1)?,
                selector,
                version: r.try_get(3)?,
                at_ms: r.try_get::<_, i64>(4)? as u64,
                source,
            })
        })
        .collect()
}

fn insert_cohort_default(tx: &mut impl GenericClient, d: &CohortDefault) -> Result<(), StoreError> {
    let selector = serde_json::to_string(&d.selector).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    // A rollout saved again after it completed keeps the time it first became the default.
    tx.execute(
        "INSERT INTO cohort_defaults (source, model, selector, version, at_ms) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT DO NOTHING",
        &[&d.source, &d.model, &selector, &d.version, &(d.at_ms as i64)],
    )?;
    Ok(())
}

pub fn deploy_to_selector(
    conn: &mut PgConn,
    default: &CohortDefault,
    devices: &[String],
    audit: &AuditEntry,
) -> Result<Vec<(String, u64)>, StoreError> {
    let (mut tx, statements) = conn.transaction_and_statements()?;
    lock_devices(&mut tx, devices.iter().map(String::as_str))?;
    insert_cohort_default(&mut tx, default)?;
    append_audit(&mut tx, audit)?;
    let mut prepared = Prepared::new(&mut tx, statements);
    let mut revisions = Vec::with_capacity(devices.len());
    for device in devices {
        let desired = upsert_desired(&mut prepared, device, &default.model, &default.version, None, None, None)?;
        if let Some(revision) = desired {
            revisions.push((device.clone(), revision));
        }
    }
    tx.commit()?;
    Ok(revisions)
}

pub fn apply_cohort_defaults(
    conn: &mut PgConn,
    model: &str,
    newcomers: &[(String, String)],
    audit: &[AuditEntry],
) -> Result<Vec<(String, u64)>, StoreError> {
    let (mut tx, statements) = conn.transaction_and_statements()?;
    lock_devices(&mut tx, newcomers.iter().map(|(device, _)| device.as_str()))?;
    for entry in audit {
        append_audit(&mut tx, entry)?;
    }
    let mut prepared = Prepared::new(&mut tx, statements);
    let mut revisions = Vec::with_capacity(newcomers.len());
    for (device, version) in newcomers {
        // Only a device still without a desired version: a deployment since the caller read
        // the devices wins.
        let inserted = prepared.execute(
            "INSERT INTO desired (device, model, version, attempt) VALUES ($1, $2, $3, 0)
             ON CONFLICT (device, model) DO NOTHING",
            &[device, &model, version],
        )?;
        if inserted == 1 {
            revisions.push((device.clone(), bump_revision(&mut prepared, device)?));
        }
    }
    tx.commit()?;
    Ok(revisions)
}

/// The raw rows the rollout engine observes: every device's status of `model`, and its drift
/// windows since `since_ms` (counts still encoded). No policy here: see `rollout::observe`.
pub fn observation_rows(
    conn: &mut Client,
    model: &str,
    since_ms: u64,
    received_from_ms: u64,
) -> Result<ObservationRows, StoreError> {
    let rows = conn.query(
        "SELECT device, active_version, step, version, detail, inferences, errors, latency_p95_us, shadow_version
         FROM model_status WHERE model = $1",
        &[&model],
    )?;
    let mut statuses = Vec::with_capacity(rows.len());
    for r in &rows {
        let device: String = r.try_get(0)?;
        let step: Option<&str> = r.try_get(2)?;
        statuses.push(StatusRow {
            step: step.map(|text| parse_step(&device, text)).transpose()?,
            device,
            active_version: r.try_get(1)?,
            step_version: r.try_get(3)?,
            detail: r.try_get(4)?,
            inferences: r.try_get::<_, i64>(5)? as u64,
            errors: r.try_get::<_, i64>(6)? as u64,
            latency_p95_us: r.try_get::<_, Option<i64>>(7)?.map(|v| v as u64),
            shadow_version: r.try_get(8)?,
        });
    }
    // Two statements, so that a read of what is new uses the (model, received_ms) index.
    let sql = if received_from_ms == 0 {
        "SELECT device, version, window_start_ms, counts, shadow, received_ms FROM drift
         WHERE model = $1 AND window_start_ms >= $2 AND $3::BIGINT = 0"
    } else {
        "SELECT device, version, window_start_ms, counts, shadow, received_ms FROM drift
         WHERE model = $1 AND received_ms >= $3 AND window_start_ms >= $2"
    };
    let windows = conn
        .query(sql, &[&model, &(since_ms as i64), &(received_from_ms as i64)])?
        .iter()
        .map(|r| {
            Ok(WindowRow {
                device: r.try_get(0)?,
                version: r.try_get(1)?,
                start_ms: r.try_get::<_, i64>(2)? as u64,
                counts: r.try_get(3)?,
                shadow: r.try_get(4)?,
                received_ms: r.try_get::<_, Option<i64>>(5)?.unwrap_or(0) as u64,
            })
        })
        .collect::<Result<_, StoreError>>()?;
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
    conn: &mut PgConn,
    rollout: &Rollout,
    audit: &[AuditEntry],
    desired: &[DesiredChange],
) -> Result<Vec<(String, u64)>, StoreError> {
    let state = serde_json::to_string(rollout).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let (mut tx, statements) = conn.transaction_and_statements()?;
    lock_devices(&mut tx, desired.iter().map(|d| d.device.as_str()))?;
    let saved = if rollout.revision == 0 {
        tx.execute(
            "INSERT INTO rollouts (id, model, phase, created_ms, state, revision) VALUES ($1, $2, $3, $4, $5, 1)
             ON CONFLICT (id) DO NOTHING",
            &[&rollout.id, &rollout.plan.model, &rollout.phase.as_str(), &(rollout.created_ms as i64), &state],
        )?
    } else {
        tx.execute(
            "UPDATE rollouts SET phase = $2, state = $3, revision = revision + 1 WHERE id = $1 AND revision = $4",
            &[&rollout.id, &rollout.phase.as_str(), &state, &(rollout.revision as i64)],
        )?
    };
    if saved == 0 {
        return Err(StoreError::Stale(rollout.id.clone()));
    }
    for entry in audit {
        append_audit(&mut tx, entry)?;
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
        insert_cohort_default(&mut tx, &default)?;
    }
    let mut prepared = Prepared::new(&mut tx, statements);
    let mut revisions = Vec::new();
    for d in desired {
        let shadow = d.shadow.as_ref().map(|(v, r)| (v.as_str(), *r));
        let window = d.window.as_ref();
        if let Some(revision) =
            upsert_desired(&mut prepared, &d.device, &rollout.plan.model, &d.version, Some(d.attempt), shadow, window)?
        {
            revisions.push((d.device.clone(), revision));
        }
    }
    tx.commit()?;
    Ok(revisions)
}

pub fn append_audit(conn: &mut impl GenericClient, e: &AuditEntry) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit (at_ms, actor, rollout, action, detail) VALUES ($1, $2, $3, $4, $5)",
        &[&(e.at_ms as i64), &e.actor, &e.rollout, &e.action.as_str(), &e.detail],
    )?;
    Ok(())
}

pub fn load(conn: &mut Client, id: Option<&str>) -> Result<Vec<Rollout>, StoreError> {
    let rows = conn.query(
        "SELECT state, revision FROM rollouts WHERE $1::TEXT IS NULL OR id = $1 ORDER BY created_ms DESC, id",
        &[&id],
    )?;
    rows.iter()
        .map(|r| {
            let mut rollout: Rollout =
                serde_json::from_str(r.try_get(0)?).map_err(|e| StoreError::Corrupt(format!("rollout state: {e}")))?;
            rollout.revision = r.try_get::<_, i64>(1)? as u64;
            Ok(rollout)
        })
        .collect()
}

/// [`crate::store::Store::acquire_lease`]: one upsert that takes a free or expired lease or
/// renews the holder's own; it returns a row only when it wrote one.
pub fn acquire_lease(
    conn: &mut Client,
    name: &str,
    holder: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<bool, StoreError> {
    let expires = now_ms.saturating_add(ttl_ms) as i64;
    let held = conn.query_opt(
        "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms
         WHERE leases.holder = excluded.holder OR leases.expires_ms <= $4
         RETURNING holder",
        &[&name, &holder, &expires, &(now_ms as i64)],
    )?;
    Ok(held.is_some())
}

pub fn release_lease(conn: &mut Client, name: &str, holder: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM leases WHERE name = $1 AND holder = $2", &[&name, &holder])?;
    Ok(())
}

pub fn audit(conn: &mut Client, rollout: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
    let mut entries = audit_rows(conn, "$1::TEXT IS NULL OR rollout = $1", rollout, limit)?;
    entries.reverse();
    Ok(entries)
}

/// Audit lines matching `filter` (SQL over the audit table, with `$1` bound to `param` and
/// `$2` to the limit), newest first.
pub(super) fn audit_rows(
    conn: &mut Client,
    filter: &str,
    param: Option<&str>,
    limit: usize,
) -> Result<Vec<AuditEntry>, StoreError> {
    let sql =
        format!("SELECT at_ms, actor, rollout, action, detail FROM audit WHERE {filter} ORDER BY id DESC LIMIT $2");
    let rows = conn.query(&sql, &[&param, &(limit as i64)])?;
    rows.iter()
        .map(|r| {
            let action: &str = r.try_get(3)?;
            Ok(AuditEntry {
                at_ms: r.try_get::<_, i64>(0)? as u64,
                actor: r.try_get(1)?,
                rollout: r.try_get(2)?,
                action: proto::wire::AuditAction::parse(action)
                    .ok_or_else(|| StoreError::Corrupt(format!("audit line with unknown action {action:?}")))?,
                detail: r.try_get(4)?,
            })
        })
        .collect()
}
