//! Devices, bundles and desired state in the PostgreSQL store, and the writes of what devices
//! report (status, heartbeat, drift window) that both a single call and a sequenced batch use.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use postgres::{Client, GenericClient, Row, Transaction};
use proto::wire::{
    bundle_path, DesiredModel, DesiredShadow, DesiredState, DeviceModelView, DeviceView, Heartbeat, ModelCounters,
    UpdateStatus,
};

use super::prepared::{Prepared, Statements};
use super::{json, lineage, rollouts};
use crate::store::{
    attach_model_views, blank_model_view, BundleRecord, NewDevice, OperatorRecord, StoreError, StoredDrift,
};

pub fn operator_row(r: &Row) -> Result<OperatorRecord, postgres::Error> {
    let role: String = r.try_get(1)?;
    Ok(OperatorRecord {
        name: r.try_get(0)?,
        // Written only from a Role; an unknown value reads as the least privilege.
        role: role.parse().unwrap_or(proto::wire::Role::Viewer),
        token_hash: r.try_get(2)?,
        created_ms: r.try_get::<_, i64>(3)? as u64,
        revoked_ms: r.try_get::<_, Option<i64>>(4)?.map(|v| v as u64),
    })
}

pub fn insert_device(conn: &mut impl GenericClient, d: &NewDevice) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO devices (id, name, labels, credential_hash, enrolled_ms, public_key, broker_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&d.id, &d.name, &json(&d.labels), &d.credential_hash, &(d.enrolled_ms as i64), &d.public_key, &d.broker_hash],
    )?;
    Ok(())
}

pub fn list_devices(conn: &mut Client) -> Result<Vec<DeviceView>, StoreError> {
    let rows = conn.query(
        "SELECT d.id, d.name, d.labels, d.enrolled_ms, GREATEST(d.last_seen_ms, h.heartbeat_ms), h.health, d.revoked_ms
         FROM devices d LEFT JOIN device_heartbeats h ON h.device = d.id ORDER BY d.name, d.id",
        &[],
    )?;
    let mut devices = Vec::with_capacity(rows.len());
    for r in &rows {
        let labels: String = r.try_get(2)?;
        let health: Option<String> = r.try_get(5)?;
        devices.push(DeviceView {
            id: r.try_get(0)?,
            name: r.try_get(1)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            enrolled_ms: r.try_get::<_, i64>(3)? as u64,
            last_seen_ms: r.try_get::<_, Option<i64>>(4)?.map(|v| v as u64),
            health: health.and_then(|h| serde_json::from_str(&h).ok()),
            models: Vec::new(),
            revoked_ms: r.try_get::<_, Option<i64>>(6)?.map(|v| v as u64),
        });
    }
    let mut models: BTreeMap<(String, String), DeviceModelView> = BTreeMap::new();
    for r in conn.query("SELECT device, model, version FROM desired", &[])? {
        let (device, model): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        models.entry((device, model.clone())).or_insert_with(|| blank_model_view(&model)).desired_version =
            Some(r.try_get(2)?);
    }
    for r in
        conn.query("SELECT device, model, step, detail, active_version, inferences, version FROM model_status", &[])?
    {
        let (device, model): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        let step: Option<String> = r.try_get(2)?;
        let step = step.as_deref().map(|text| rollouts::parse_step(&device, text)).transpose()?;
        let view = models.entry((device, model.clone())).or_insert_with(|| blank_model_view(&model));
        view.step = step;
        view.step_version = r.try_get(6)?;
        view.detail = r.try_get(3)?;
        view.active_version = r.try_get(4)?;
        view.inferences = r.try_get::<_, i64>(5)? as u64;
    }
    let drift = conn.query(
        "SELECT device, model, COUNT(*),
                (SELECT score FROM drift d2 WHERE d2.device = d.device AND d2.model = d.model ORDER BY window_start_ms DESC LIMIT 1),
                (SELECT mean_confidence FROM drift d2 WHERE d2.device = d.device AND d2.model = d.model ORDER BY window_start_ms DESC LIMIT 1)
         FROM drift d GROUP BY device, model",
        &[],
    )?;
    for r in drift {
        let (device, model): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        let view = models.entry((device, model.clone())).or_insert_with(|| blank_model_view(&model));
        view.drift_summaries = r.try_get::<_, i64>(2)? as u64;
        view.drift_score = r.try_get(3)?;
        view.mean_confidence = r.try_get(4)?;
    }
    attach_model_views(&mut devices, &models);
    Ok(devices)
}

pub fn put_bundle(conn: &mut Client, b: &BundleRecord) -> Result<(), StoreError> {
    let existing =
        conn.query_opt("SELECT sha256 FROM bundles WHERE name = $1 AND version = $2", &[&b.name, &b.version])?;
    match existing.map(|r| r.try_get::<_, String>(0)).transpose()? {
        Some(sha) if sha == b.sha256 => Ok(()),
        Some(_) => Err(StoreError::Conflict(format!(
            "bundle {} {} is already published with different contents; publish a new version instead",
            b.name, b.version
        ))),
        None => {
            conn.execute(
                "INSERT INTO bundles (name, version, sha256, size, created_at, signed_by, manifest)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &b.name,
                    &b.version,
                    &b.sha256,
                    &(b.size as i64),
                    &(b.created_at as i64),
                    &b.signed_by,
                    &b.manifest_json,
                ],
            )?;
            Ok(())
        }
    }
}

pub fn bundle(conn: &mut Client, name: &str, version: &str) -> Result<Option<BundleRecord>, StoreError> {
    let row = conn.query_opt(
        "SELECT sha256, size, created_at, signed_by, manifest FROM bundles WHERE name = $1 AND version = $2",
        &[&name, &version],
    )?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(BundleRecord {
        name: name.to_string(),
        version: version.to_string(),
        sha256: r.try_get(0)?,
        size: r.try_get::<_, i64>(1)? as u64,
        created_at: r.try_get::<_, i64>(2)? as u64,
        signed_by: r.try_get(3)?,
        manifest_json: r.try_get(4)?,
    }))
}

pub fn desired_state(conn: &mut Prepared<'_, impl GenericClient>, device: &str) -> Result<DesiredState, StoreError> {
    let revision: i64 = conn.query_one("SELECT revision FROM devices WHERE id = $1", &[&device])?.try_get(0)?;
    let models = desired_models(conn, device)?;
    let root_version: Option<i64> = conn.query_one("SELECT MAX(version) FROM roots", &[])?.try_get(0)?;
    Ok(DesiredState {
        revision: revision as u64,
        models,
        root_version: root_version.map(|v| v as u64),
        freshness: None,
    })
}

fn desired_models(conn: &mut Prepared<'_, impl GenericClient>, device: &str) -> Result<Vec<DesiredModel>, StoreError> {
    let rows = conn.query(
        "SELECT d.model, d.version, b.sha256, b.size, d.attempt, d.shadow_version, d.shadow_rate, s.sha256, s.size,
           d.activation_window
         FROM desired d
         JOIN bundles b ON b.name = d.model AND b.version = d.version
         LEFT JOIN bundles s ON s.name = d.model AND s.version = d.shadow_version
         WHERE d.device = $1 ORDER BY d.model",
        &[&device],
    )?;
    let mut models = Vec::with_capacity(rows.len());
    for r in &rows {
        let (name, version): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        let shadow_version: Option<String> = r.try_get(5)?;
        let shadow_bundle: Option<(String, i64)> = r.try_get::<_, Option<String>>(7)?.zip(r.try_get(8)?);
        let sample_rate = r.try_get::<_, Option<f64>>(6)?.unwrap_or(0.1) as f32;
        let shadow = shadow_version.zip(shadow_bundle).map(|(v, (sha256, size))| DesiredShadow {
            bundle_path: bundle_path(&name, &v),
            version: v,
            bundle_sha256: sha256,
            bundle_size: size as u64,
            sample_rate,
        });
        models.push(DesiredModel {
            bundle_path: bundle_path(&name, &version),
            name,
            version,
            bundle_sha256: r.try_get(2)?,
            bundle_size: r.try_get::<_, i64>(3)? as u64,
            attempt: r.try_get::<_, i64>(4)? as u32,
            shadow,
            activation_window: rollouts::window_of(r.try_get(9)?)?,
        });
    }
    Ok(models)
}

/// A device's check-in (`Store::check_in`) in one transaction, so one commit: written as four
/// (last seen, status, counter each their own), each commit waited for its WAL flush, and at
/// 10,000 agents those flushes were what PostgreSQL waited on.
///
/// A check-in that issues no freshness counter does not wait for its commit's flush at all:
/// nothing in it must outlive a crash of the database. A last-seen time or a status lost with
/// the last moment of commits is written again by the device's next check-in (statuses also
/// arrive as acknowledged reports). A counter must be stored before the reply is signed
/// (ADR 0010), so those commits wait, as do all others: an acknowledged report is gone from its
/// device.
pub fn check_in(
    tx: &mut Transaction<'_>,
    statements: &mut Statements,
    device: &str,
    now_ms: u64,
    statuses: &[UpdateStatus],
    freshness: bool,
) -> Result<(DesiredState, Option<u64>), StoreError> {
    if !freshness {
        tx.batch_execute("SET LOCAL synchronous_commit TO OFF")?;
    }
    // Last seen, the counter, and what the desired state needs besides its models: one round trip.
    let mut prepared = Prepared::new(tx, statements);
    let seen = prepared.query_one(
        "UPDATE devices SET last_seen_ms = GREATEST(COALESCE(last_seen_ms, 0), $2),
           freshness_counter = freshness_counter + CASE WHEN $3 THEN 1 ELSE 0 END
         WHERE id = $1 RETURNING revision, freshness_counter, (SELECT MAX(version) FROM roots)",
        &[&device, &(now_ms as i64), &freshness],
    )?;
    for status in statuses {
        if status_row_is_free(&mut prepared, device, &status.model)? {
            status_into(&mut prepared, device, status)?;
        }
    }
    let desired = DesiredState {
        revision: seen.try_get::<_, i64>(0)? as u64,
        models: desired_models(&mut prepared, device)?,
        root_version: seen.try_get::<_, Option<i64>>(2)?.map(|v| v as u64),
        freshness: None,
    };
    let counter = if freshness { Some(seen.try_get::<_, i64>(1)? as u64) } else { None };
    Ok((desired, counter))
}

/// Locks the rows of `devices` in the order of their ids. Every transaction that changes the
/// `devices` rows of several devices (a wave's or a deployment's desired writes) calls it first,
/// and a check-in changes the row of one: so no two wait for each other in a cycle. Taken as
/// each statement came to them, a batch and a wave each held device rows the other wanted, and
/// PostgreSQL failed one of each pair as deadlocked (docs/BENCHMARKS.md, Load). Ingest batches
/// no longer write `devices` rows; they are ordered by `delivery::lock_ingest`.
pub fn lock_devices<'a>(
    tx: &mut impl GenericClient,
    devices: impl IntoIterator<Item = &'a str>,
) -> Result<(), StoreError> {
    let ids: Vec<&str> = devices.into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    if ids.len() > 1 {
        tx.execute("SELECT 1 FROM devices WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE", &[&ids])?;
    }
    Ok(())
}

pub fn next_freshness_counter(conn: &mut impl GenericClient, device: &str) -> Result<u64, StoreError> {
    let row = conn.query_one(
        "UPDATE devices SET freshness_counter = freshness_counter + 1 WHERE id = $1 RETURNING freshness_counter",
        &[&device],
    )?;
    Ok(row.try_get::<_, i64>(0)? as u64)
}

/// Whether a check-in may write the status row of (`device`, `model`) without waiting: the row
/// is missing, or this transaction has just locked it. A row that an ingest batch (or another
/// check-in) holds is left to it: the status a check-in carries is the device's current one,
/// which it also sends as an acknowledged report and again at its next check-in, while waiting
/// for the batch's commit made check-ins queue behind ingest under load (docs/BENCHMARKS.md,
/// "Device rows out of ingest batches"). Ingest batches write no `devices` row, so a check-in
/// waits for none of them (only for a status row no one had, while a batch inserts it).
fn status_row_is_free(
    conn: &mut Prepared<'_, impl GenericClient>,
    device: &str,
    model: &str,
) -> Result<bool, StoreError> {
    let row = conn.query_one(
        "SELECT NOT EXISTS (SELECT 1 FROM model_status WHERE device = $1 AND model = $2)
             OR EXISTS (SELECT 1 FROM model_status WHERE device = $1 AND model = $2 FOR NO KEY UPDATE SKIP LOCKED)",
        &[&device, &model],
    )?;
    Ok(row.try_get(0)?)
}

/// Keeps the newest status per (device, model): a late, older report changes nothing.
pub fn status_into(
    conn: &mut Prepared<'_, impl GenericClient>,
    device: &str,
    s: &UpdateStatus,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO model_status (device, model, version, step, detail, active_version, at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (device, model) DO UPDATE SET version = excluded.version, step = excluded.step,
           detail = excluded.detail, active_version = excluded.active_version, at_ms = excluded.at_ms
         WHERE model_status.at_ms IS NULL OR model_status.at_ms <= excluded.at_ms",
        &[&device, &s.model, &s.version, &s.step.as_str(), &s.detail, &s.active_version, &(s.at_ms as i64)],
    )?;
    lineage::record_history(conn, device, s)
}

/// Applies a heartbeat unless a newer one is already stored (a backlog may deliver old ones
/// after new ones; counters must not go backwards).
pub fn heartbeat_into(
    conn: &mut Prepared<'_, impl GenericClient>,
    device: &str,
    heartbeat: &Heartbeat,
) -> Result<(), StoreError> {
    heartbeats_into(conn, &[(device, heartbeat)])
}

/// Applies heartbeats, in the order given, as `heartbeat_into` one by one would leave the rows
/// (each device keeps its newest heartbeat, a newer one already stored wins, and each model row
/// has what the last heartbeat applied that names it said), in three statements whatever their
/// number: one statement per heartbeat and per model made batches of hundreds of milliseconds
/// under load, holding their rows all the while (docs/BENCHMARKS.md, "Check-ins waiting on
/// ingest"). Heartbeats of devices that are not enrolled are left out. Callers hold the
/// devices' ingest locks (`delivery::lock_ingest`).
pub fn heartbeats_into(
    conn: &mut Prepared<'_, impl GenericClient>,
    heartbeats: &[(&str, &Heartbeat)],
) -> Result<(), StoreError> {
    if heartbeats.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = heartbeats.iter().map(|(device, _)| *device).collect::<BTreeSet<_>>().into_iter().collect();
    // The stored times matter only to a device with several heartbeats here (which of them
    // apply); a device with one is decided by the conditional update below alone.
    let mut newest: HashMap<String, i64> = if ids.len() < heartbeats.len() {
        let mut newest: HashMap<String, i64> = ids.iter().map(|id| (id.to_string(), 0)).collect();
        for r in conn.query("SELECT device, heartbeat_ms FROM device_heartbeats WHERE device = ANY($1)", &[&ids])? {
            newest.insert(r.try_get(0)?, r.try_get(1)?);
        }
        newest
    } else {
        ids.iter().map(|id| (id.to_string(), i64::MIN)).collect()
    };
    let mut applied: BTreeMap<&str, &Heartbeat> = BTreeMap::new();
    let mut model_rows: BTreeMap<(&str, &str), &ModelCounters> = BTreeMap::new();
    for (device, heartbeat) in heartbeats {
        let at = heartbeat.at_ms as i64;
        match newest.get_mut(*device) {
            Some(stored) if *stored <= at => *stored = at,
            _ => continue,
        }
        applied.insert(device, heartbeat);
        for m in &heartbeat.models {
            model_rows.insert((device, m.model.as_str()), m);
        }
    }
    if applied.is_empty() {
        return Ok(());
    }
    let (devices, healths, ats): (Vec<&str>, Vec<String>, Vec<i64>) =
        applied.iter().map(|(device, h)| (*device, json(&h.health), h.at_ms as i64)).collect();
    // Conditional, and only the devices it stored get their model rows: the stored time may not
    // have been read, and a newer heartbeat may have been stored since it was. Devices that are
    // not enrolled are left out by the join (read, not locked: `devices` rows are the check-ins').
    let updated: HashSet<String> = conn
        .query(
            "INSERT INTO device_heartbeats (device, health, heartbeat_ms)
             SELECT u.id, u.health, u.at_ms FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS u(id, health, at_ms)
             JOIN devices ON devices.id = u.id
             ON CONFLICT (device) DO UPDATE SET health = excluded.health, heartbeat_ms = excluded.heartbeat_ms
             WHERE device_heartbeats.heartbeat_ms <= excluded.heartbeat_ms
             RETURNING device",
            &[&devices, &healths, &ats],
        )?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut columns = ModelCounterColumns::default();
    for ((device, model), m) in model_rows {
        if updated.contains(device) {
            columns.push(device, model, m);
        }
    }
    if columns.devices.is_empty() {
        return Ok(());
    }
    let ModelCounterColumns { devices, models, versions, inferences, errors, latencies, shadows } = columns;
    conn.execute(
        "INSERT INTO model_status (device, model, active_version, inferences, errors, latency_p95_us, shadow_version)
         SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::TEXT[])
         ON CONFLICT (device, model) DO UPDATE SET inferences = excluded.inferences,
           active_version = excluded.active_version, errors = excluded.errors,
           latency_p95_us = excluded.latency_p95_us, shadow_version = excluded.shadow_version",
        &[&devices, &models, &versions, &inferences, &errors, &latencies, &shadows],
    )?;
    Ok(())
}

/// Heartbeat model rows as the columns of one `UNNEST`.
#[derive(Default)]
struct ModelCounterColumns<'a> {
    devices: Vec<&'a str>,
    models: Vec<&'a str>,
    versions: Vec<&'a str>,
    inferences: Vec<i64>,
    errors: Vec<i64>,
    latencies: Vec<Option<i64>>,
    shadows: Vec<Option<&'a str>>,
}

impl<'a> ModelCounterColumns<'a> {
    fn push(&mut self, device: &'a str, model: &'a str, m: &'a ModelCounters) {
        self.devices.push(device);
        self.models.push(model);
        self.versions.push(&m.version);
        self.inferences.push(m.inferences as i64);
        self.errors.push(m.errors as i64);
        self.latencies.push(m.latency_p95_us.map(i64::from));
        self.shadows.push(m.shadow_version.as_deref());
    }
}

/// Stores a window once; a second delivery of the same (device, model, start) returns false.
pub fn drift_into(
    conn: &mut Prepared<'_, impl GenericClient>,
    device: &str,
    d: &StoredDrift<'_>,
) -> Result<bool, StoreError> {
    Ok(drifts_into(conn, &[(device, d)])? == 1)
}

/// Stores windows, each once (a window already stored, or named twice, is stored once), in one
/// statement whatever their number. Returns how many were new.
pub fn drifts_into(
    conn: &mut Prepared<'_, impl GenericClient>,
    windows: &[(&str, &StoredDrift<'_>)],
) -> Result<u64, StoreError> {
    if windows.is_empty() {
        return Ok(0);
    }
    let mut c = DriftColumns::default();
    for (device, d) in windows {
        let s = d.summary;
        c.devices.push(device);
        c.models.push(&s.model);
        c.versions.push(&s.version);
        c.starts.push(s.window_start_ms as i64);
        c.ends.push(s.window_end_ms as i64);
        c.samples.push(s.sketch.rows as i64);
        c.scores.push(d.score);
        c.confidences.push(d.mean_confidence);
        c.counts.push(proto::wire::encode(&s.sketch));
        c.shadows.push(s.shadow.as_ref().map(proto::wire::encode));
    }
    conn.execute(
        "INSERT INTO drift (device, model, version, window_start_ms, window_end_ms, samples, score, mean_confidence, counts, shadow, received_ms)
         SELECT w.*, $11 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[],
           $7::FLOAT8[], $8::FLOAT8[], $9::BYTEA[], $10::BYTEA[]) AS w
         ON CONFLICT DO NOTHING",
        &[
            &c.devices,
            &c.models,
            &c.versions,
            &c.starts,
            &c.ends,
            &c.samples,
            &c.scores,
            &c.confidences,
            &c.counts,
            &c.shadows,
            &(crate::unix_ms() as i64),
        ],
    )
}

/// Drift windows as the columns of one `UNNEST`.
#[derive(Default)]
struct DriftColumns<'a> {
    devices: Vec<&'a str>,
    models: Vec<&'a str>,
    versions: Vec<&'a str>,
    starts: Vec<i64>,
    ends: Vec<i64>,
    samples: Vec<i64>,
    scores: Vec<f64>,
    confidences: Vec<Option<f64>>,
    counts: Vec<Vec<u8>>,
    shadows: Vec<Option<Vec<u8>>>,
}
