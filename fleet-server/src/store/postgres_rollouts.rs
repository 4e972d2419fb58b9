//! The rollout half of the PostgreSQL store: rollout state as JSON, the audit log, per-device
//! desired attempts and the raw rows the rollout engine observes. Same statements and the same
//! transactions as `sqlite_rollouts.rs`.

use postgres::{Client, GenericClient};
use proto::window::ActivationWindow;
use proto::wire::{AuditEntry, UpdateStep};

use super::devices::lock_devices;
use super::prepared::{PgConn, Prepared};
use crate::rollout::{CohortDefault, DeviceInfo, MemberWrites, Phase, Rollout};
use crate::store::rollout_rows::{head_json, member_rows, rollout_from_rows};
use crate::store::{DesiredChange, ObservationRows, StatusRow, StoreError, WindowRow};

/// A deployment: `devices` are told to run `version` of `model` at once (no shadow, no
/// activation window), each keeping its stored attempt, and each device's revision rises even
/// when it was told the same before, so a device told again checks in again. Two statements
/// whatever the number of devices, inside the caller's transaction, which has locked their rows.
/// Returns the devices' new revisions, in the order given (a device named twice, once). A device
/// that is not enrolled is a conflict naming it, and the caller's transaction writes nothing (as
/// on SQLite, which refuses the row).
pub fn deploy_desired(
    tx: &mut Prepared<'_, impl GenericClient>,
    model: &str,
    version: &str,
    devices: &[String],
) -> Result<Vec<(String, u64)>, StoreError> {
    let devices: Vec<&str> =
        once_each(devices.iter(), |device| device.as_str()).into_iter().map(String::as_str).collect();
    let rows = tx.query(
        "WITH written AS (
           INSERT INTO desired (device, model, version, attempt)
           SELECT device, $1, $2, 0 FROM unnest($3::TEXT[]) AS wanted(device)
           ON CONFLICT (device, model) DO UPDATE SET version = excluded.version,
             shadow_version = NULL, shadow_rate = NULL, activation_window = NULL
           RETURNING device)
         UPDATE devices SET revision = revision + 1 FROM written WHERE devices.id = written.device
         RETURNING devices.id, devices.revision",
        &[&model, &version, &devices],
    )?;
    let revisions = in_given_order(&devices, &rows)?;
    if revisions.len() < devices.len() {
        let revised: std::collections::HashSet<&str> = revisions.iter().map(|(device, _)| device.as_str()).collect();
        if let Some(missing) = devices.iter().find(|device| !revised.contains(*device)) {
            return Err(StoreError::not_enrolled(missing));
        }
    }
    Ok(revisions)
}

/// A rollout's desired versions, attempts, shadows and activation windows for its devices
/// (ADR 0012): a device whose stored row already says all of that is left as it is, and only
/// the others' revisions rise. Two statements whatever the wave's size (a wave of 5,000 was
/// 15,000 round trips one device at a time), inside the caller's transaction, which has locked
/// the devices' rows. Returns the revisions that rose, in the order given; a device named twice
/// gets what it was named with last, in that place.
pub fn assert_desired(
    tx: &mut Prepared<'_, impl GenericClient>,
    model: &str,
    desired: &[DesiredChange],
) -> Result<Vec<(String, u64)>, StoreError> {
    let mut wanted = once_each(desired.iter().rev(), |d| d.device.as_str());
    wanted.reverse();
    let devices: Vec<&str> = wanted.iter().map(|d| d.device.as_str()).collect();
    let mut versions = Vec::with_capacity(devices.len());
    let mut attempts = Vec::with_capacity(devices.len());
    let mut shadow_versions = Vec::with_capacity(devices.len());
    let mut shadow_rates = Vec::with_capacity(devices.len());
    let mut windows = Vec::with_capacity(devices.len());
    for d in wanted {
        versions.push(d.version.as_str());
        attempts.push(i64::from(d.attempt));
        shadow_versions.push(d.shadow.as_ref().map(|(v, _)| v.as_str()));
        shadow_rates.push(d.shadow.as_ref().map(|(_, r)| *r as f64));
        windows.push(
            d.window.as_ref().map(serde_json::to_string).transpose().map_err(|e| StoreError::Corrupt(e.to_string()))?,
        );
    }
    let rows = tx.query(
        "WITH written AS (
           INSERT INTO desired AS stored (device, model, version, attempt, shadow_version, shadow_rate, activation_window)
           SELECT device, $1, version, attempt, shadow_version, shadow_rate, activation_window
           FROM unnest($2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::DOUBLE PRECISION[], $7::TEXT[])
             AS wanted(device, version, attempt, shadow_version, shadow_rate, activation_window)
           ON CONFLICT (device, model) DO UPDATE SET version = excluded.version, attempt = excluded.attempt,
             shadow_version = excluded.shadow_version, shadow_rate = excluded.shadow_rate,
             activation_window = excluded.activation_window
           WHERE (stored.version, stored.attempt, stored.shadow_version, stored.shadow_rate, stored.activation_window)
             IS DISTINCT FROM
             (excluded.version, excluded.attempt, excluded.shadow_version, excluded.shadow_rate, excluded.activation_window)
           RETURNING device)
         UPDATE devices SET revision = revision + 1 FROM written WHERE devices.id = written.device
         RETURNING devices.id, devices.revision",
        &[&model, &devices, &versions, &attempts, &shadow_versions, &shadow_rates, &windows],
    )?;
    in_given_order(&devices, &rows)
}

/// The first of `items` for each device, in their order (one statement may not write a row
/// twice).
fn once_each<'a, T>(items: impl Iterator<Item = &'a T>, device: impl Fn(&'a T) -> &'a str) -> Vec<&'a T> {
    let mut seen = std::collections::HashSet::new();
    items.filter(|item| seen.insert(device(item))).collect()
}

/// `(device, revision)` rows put in the order of `devices`.
fn in_given_order(devices: &[&str], rows: &[postgres::Row]) -> Result<Vec<(String, u64)>, StoreError> {
    let mut revised = std::collections::HashMap::with_capacity(rows.len());
    for r in rows {
        revised.insert(r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)? as u64);
    }
    Ok(devices
        .iter()
        .filter_map(|device| revised.remove(*device).map(|revision| (device.to_string(), revision)))
        .collect())
}

/// The `desired.activation_window` column (JSON) read back.
pub fn window_of(text: Option<String>) -> Result<Option<ActivationWindow>, StoreError> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("desired activation window: {e}")))
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
    let revisions = deploy_desired(&mut Prepared::new(&mut tx, statements), &default.model, &default.version, devices)?;
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
    let newcomers = once_each(newcomers.iter(), |(device, _)| device.as_str());
    let devices: Vec<&str> = newcomers.iter().map(|(device, _)| device.as_str()).collect();
    let versions: Vec<&str> = newcomers.iter().map(|(_, version)| version.as_str()).collect();
    let mut prepared = Prepared::new(&mut tx, statements);
    let stranger = prepared.query(
        "SELECT wanted FROM unnest($1::TEXT[]) AS wanted WHERE NOT EXISTS (SELECT 1 FROM devices WHERE id = wanted) LIMIT 1",
        &[&devices],
    )?;
    if let Some(row) = stranger.first() {
        return Err(StoreError::not_enrolled(&row.try_get::<_, String>(0)?));
    }
    // Only a device still without a desired version: a deployment since the caller read the
    // devices wins.
    let rows = prepared.query(
        "WITH written AS (
           INSERT INTO desired (device, model, version, attempt)
           SELECT device, $1, version, 0 FROM unnest($2::TEXT[], $3::TEXT[]) AS wanted(device, version)
           ON CONFLICT (device, model) DO NOTHING
           RETURNING device)
         UPDATE devices SET revision = revision + 1 FROM written WHERE devices.id = written.device
         RETURNING devices.id, devices.revision",
        &[&model, &devices, &versions],
    )?;
    let revisions = in_given_order(&devices, &rows)?;
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
    members: &MemberWrites,
    audit: &[AuditEntry],
    desired: &[DesiredChange],
) -> Result<Vec<(String, u64)>, StoreError> {
    let state = head_json(rollout)?;
    let (devices, member_texts) = member_rows(rollout, members)?;
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
    if *members == MemberWrites::All && rollout.revision != 0 {
        tx.execute("DELETE FROM rollout_members WHERE rollout = $1", &[&rollout.id])?;
    }
    if !devices.is_empty() {
        tx.execute(
            "INSERT INTO rollout_members (rollout, device, member)
             SELECT $1, u.device, u.member FROM UNNEST($2::TEXT[], $3::TEXT[]) AS u(device, member)
             ON CONFLICT (rollout, device) DO UPDATE SET member = excluded.member",
            &[&rollout.id, &devices, &member_texts],
        )?;
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
    let revisions = assert_desired(&mut Prepared::new(&mut tx, statements), &rollout.plan.model, desired)?;
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

/// Rollouts newest first: rollout `id` only, when given; only the active ones, when `active_only`.
pub fn load(conn: &mut PgConn, id: Option<&str>, active_only: bool) -> Result<Vec<Rollout>, StoreError> {
    let active: Vec<&str> = Phase::ACTIVE.iter().map(|p| p.as_str()).collect();
    let rows = conn.prepared().query(
        "SELECT id, state, revision FROM rollouts WHERE ($1::TEXT IS NULL OR id = $1) AND (NOT $2 OR phase = ANY($3))
         ORDER BY created_ms DESC, id",
        &[&id, &active_only, &active],
    )?;
    rows.iter()
        .map(|r| {
            let id: &str = r.try_get(0)?;
            let members = conn
                .prepared()
                .query("SELECT device, member FROM rollout_members WHERE rollout = $1", &[&id])?
                .iter()
                .map(|m| Ok((m.try_get(0)?, m.try_get(1)?)))
                .collect::<Result<Vec<(String, String)>, StoreError>>()?;
            rollout_from_rows(r.try_get(1)?, r.try_get::<_, i64>(2)? as u64, members)
        })
        .collect()
}

pub fn active_revisions(conn: &mut PgConn) -> Result<Vec<(String, u64)>, StoreError> {
    let active: Vec<&str> = Phase::ACTIVE.iter().map(|p| p.as_str()).collect();
    conn.prepared()
        .query("SELECT id, revision FROM rollouts WHERE phase = ANY($1) ORDER BY created_ms DESC, id", &[&active])?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get::<_, i64>(1)? as u64)))
        .collect()
}

pub fn phases(conn: &mut PgConn) -> Result<Vec<(Phase, u64)>, StoreError> {
    conn.prepared()
        .query("SELECT phase, COUNT(*) FROM rollouts GROUP BY phase", &[])?
        .iter()
        .map(|r| Ok((crate::store::phase_named(r.try_get(0)?)?, r.try_get::<_, i64>(1)? as u64)))
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
