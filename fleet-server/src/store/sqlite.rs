//! The SQLite store: one file in the data directory in WAL mode, one writing connection behind a
//! mutex and a small pool of reading connections. WAL lets readers read a committed snapshot while
//! the writer writes, so a check-in's credential lookup, the rollout tick's reads and the API's
//! listings never wait behind an ingest batch or a wave's desired-state writes; check-ins waiting
//! for the writer are written together (`sqlite_checkins.rs`).
//!
//! This half owns enrollment, devices, bundles, desired state and what devices report; the
//! versioned schema is in `sqlite_schema.rs`, the rollout half (`sqlite_rollouts.rs`) owns rollout
//! state, the audit log and the raw rows the rollout engine observes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use self::devices::{
    desired_in, drift_into, freshness_counter_in, heartbeat_into, insert_device, operator_row, status_into, touch_in,
};
use super::pool::{Pool, Pooled};

use proto::wire::{DesiredState, DeviceView, Heartbeat, UpdateStatus};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    Accepted, BundleRecord, DesiredChange, EnrollRefusal, NewDevice, ObservationRows, OperatorRecord, PendingEvent,
    Pruned, SequencedReport, Store, StoreError, StoredDrift, StoredTelemetry, TelemetryQuery,
};
use crate::drift::retrain::Watch;
use crate::rollout::{CohortDefault, DeviceInfo, MemberWrites, Phase, Rollout};
use proto::delivery::{DeliveryView, TelemetryAck, TelemetryRow};
use proto::events::RetrainEvent;
use proto::wire::AuditEntry;

/// Reading connections the store opens at most: enough for the check-ins, the ingest's key
/// lookups, the rollout tick and the API to read at once on a small server.
const READERS: usize = 4;

/// Statements each connection keeps prepared (rusqlite's default is 16): a check-in group and an
/// ingest batch run about twenty different ones for every device, and with 16 they would push
/// each other out.
const PREPARED_STATEMENTS: usize = 64;

/// How long a statement waits for a lock before it fails (the writer's checkpoints, other
/// processes opening the file).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The writer behind a mutex and the readers in a pool; every method is short and synchronous.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    readers: Pool<Connection>,
    checkins: checkins::WaitingCheckIns,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Every commit reaches the disk before it returns: a device deletes a report once it is
        // acknowledged, so a commit lost to a power cut would lose the report for good. With
        // NORMAL, WAL mode syncs only at checkpoints.
        conn.pragma_update(None, "synchronous", "FULL")?;
        schema::migrate(&mut conn)?;
        let path = path.to_path_buf();
        let readers = Pool::new(READERS, move || {
            let reader = Connection::open(&path)?;
            reader.busy_timeout(BUSY_TIMEOUT)?;
            reader.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
            reader.pragma_update(None, "query_only", true)?;
            Ok(reader)
        });
        Ok(SqliteStore { conn: Mutex::new(conn), readers, checkins: Default::default() })
    }

    /// The writing connection: every write, and reads that must see the same transaction.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A reading connection inside one read transaction: its statements see one committed state
    /// of the database, whatever the writer does meanwhile.
    fn snapshot(&self) -> Result<Snapshot<'_>, StoreError> {
        let reader = self.readers.get()?;
        match reader.execute_batch("BEGIN") {
            Ok(()) => Ok(Snapshot(Some(reader))),
            Err(e) => {
                reader.discard();
                Err(e.into())
            }
        }
    }

    /// Runs SQL as it is (tests write rows the trait cannot, e.g. corrupt ones).
    #[cfg(test)]
    pub(crate) fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.conn().execute_batch(sql)?)
    }
}

/// A reader in a read transaction, ended (and the reader given back) when dropped.
struct Snapshot<'a>(Option<Pooled<'a, Connection>>);

impl std::ops::Deref for Snapshot<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.0.as_ref().expect("a snapshot's reader is taken only by drop")
    }
}

impl Drop for Snapshot<'_> {
    fn drop(&mut self) {
        if let Some(reader) = self.0.take() {
            // A reader whose transaction cannot end is not given back to be reused.
            if reader.execute_batch("COMMIT").is_err() {
                reader.discard();
            }
        }
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

impl Store for SqliteStore {
    fn create_tokens(&self, token_hashes: &[String], now_ms: u64, expires_ms: u64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for hash in token_hashes {
            tx.execute(
                "INSERT INTO tokens (hash, created_ms, expires_ms) VALUES (?1, ?2, ?3)",
                params![hash, now_ms as i64, expires_ms as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn revoke_token(&self, token_hash: &str, now_ms: u64) -> Result<bool, StoreError> {
        let changed = self.conn().execute(
            "UPDATE tokens SET revoked_ms = ?2 WHERE hash = ?1 AND used_ms IS NULL AND revoked_ms IS NULL",
            params![token_hash, now_ms as i64],
        )?;
        Ok(changed == 1)
    }

    fn enroll(
        &self,
        token_hash: &str,
        d: &NewDevice,
        grace_ms: u64,
    ) -> Result<Result<String, EnrollRefusal>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        type TokenRow = (Option<i64>, Option<String>, Option<i64>, Option<i64>);
        let token: Option<TokenRow> = tx
            .query_row(
                "SELECT used_ms, device, expires_ms, revoked_ms FROM tokens WHERE hash = ?1",
                params![token_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let now = d.enrolled_ms as i64;
        let enrolled = match token {
            None => Err(EnrollRefusal::UnknownOrUsed),
            Some((_, _, _, Some(_))) => Err(EnrollRefusal::Revoked),
            Some((None, _, Some(expires), _)) if now >= expires => Err(EnrollRefusal::Expired),
            Some((None, _, _, _)) => {
                tx.execute(
                    "UPDATE tokens SET used_ms = ?2, device = ?3 WHERE hash = ?1",
                    params![token_hash, now, d.id],
                )?;
                insert_device(&tx, d)?;
                Ok(d.id.clone())
            }
            Some((Some(used), Some(device), _, _)) if d.enrolled_ms.saturating_sub(used as u64) <= grace_ms => {
                let changed = tx.execute(
                    "UPDATE devices SET credential_hash = ?2, public_key = ?3, broker_hash = ?4
                     WHERE id = ?1 AND revoked_ms IS NULL",
                    params![device, d.credential_hash, d.public_key, d.broker_hash],
                )?;
                if changed == 1 {
                    Ok(device)
                } else {
                    Err(EnrollRefusal::Revoked)
                }
            }
            Some(_) => Err(EnrollRefusal::UnknownOrUsed),
        };
        tx.commit()?;
        Ok(enrolled)
    }

    fn broker_passwords(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.snapshot()?;
        let mut stmt = conn.prepare(
            "SELECT id, broker_hash FROM devices WHERE revoked_ms IS NULL AND broker_hash != '' ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn revoke_device(&self, device: &str, now_ms: u64) -> Result<bool, StoreError> {
        let conn = self.conn();
        let exists = conn.query_row("SELECT 1 FROM devices WHERE id = ?1", params![device], |_| Ok(())).optional()?;
        conn.execute(
            "UPDATE devices SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![device, now_ms as i64],
        )?;
        Ok(exists.is_some())
    }

    fn put_operator(&self, o: &OperatorRecord, replace: bool) -> Result<(), StoreError> {
        let conn = self.conn();
        let sql = if replace {
            "INSERT OR REPLACE INTO operators (name, role, token_hash, created_ms, revoked_ms) VALUES (?1, ?2, ?3, ?4, ?5)"
        } else {
            "INSERT INTO operators (name, role, token_hash, created_ms, revoked_ms) VALUES (?1, ?2, ?3, ?4, ?5)"
        };
        match conn.execute(
            sql,
            params![o.name, o.role.as_str(), o.token_hash, o.created_ms as i64, o.revoked_ms.map(|v| v as i64)],
        ) {
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::Conflict(format!("an operator named {} exists; pick another name", o.name)))
            }
            other => other.map(|_| ()).map_err(StoreError::from),
        }
    }

    fn operator_for_token(&self, token_hash: &str) -> Result<Option<OperatorRecord>, StoreError> {
        Ok(self
            .snapshot()?
            .query_row(
                "SELECT name, role, token_hash, created_ms, revoked_ms FROM operators
                 WHERE token_hash = ?1 AND revoked_ms IS NULL",
                params![token_hash],
                operator_row,
            )
            .optional()?)
    }

    fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        let conn = self.snapshot()?;
        let mut stmt =
            conn.prepare("SELECT name, role, token_hash, created_ms, revoked_ms FROM operators ORDER BY name")?;
        let rows = stmt.query_map([], operator_row)?.collect::<Result<_, _>>()?;
        Ok(rows)
    }

    fn revoke_operator(&self, name: &str, now_ms: u64) -> Result<bool, StoreError> {
        let changed = self.conn().execute(
            "UPDATE operators SET revoked_ms = ?2 WHERE name = ?1 AND revoked_ms IS NULL",
            params![name, now_ms as i64],
        )?;
        Ok(changed == 1)
    }

    fn insert_device(&self, d: &NewDevice) -> Result<(), StoreError> {
        insert_device(&self.conn(), d)
    }

    fn device_public_key(&self, device: &str) -> Result<Option<String>, StoreError> {
        let key: Option<String> = self
            .snapshot()?
            .prepare_cached("SELECT public_key FROM devices WHERE id = ?1 AND revoked_ms IS NULL")?
            .query_row(params![device], |r| r.get(0))
            .optional()?;
        Ok(key.filter(|k| !k.is_empty()))
    }

    fn count_rejected(&self, device: &str, reports: u64) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute("INSERT OR IGNORE INTO delivery (device) SELECT id FROM devices WHERE id = ?1", params![device])?;
        conn.execute(
            "UPDATE delivery SET rejected = rejected + ?2 WHERE device = ?1",
            params![device, reports as i64],
        )?;
        Ok(())
    }

    fn device_for_credential(&self, credential_hash: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .snapshot()?
            .prepare_cached("SELECT id FROM devices WHERE credential_hash = ?1 AND revoked_ms IS NULL")?
            .query_row(params![credential_hash], |r| r.get(0))
            .optional()?)
    }

    fn device_exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .snapshot()?
            .query_row("SELECT 1 FROM devices WHERE id = ?1", params![id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn set_labels(&self, id: &str, labels: &BTreeMap<String, String>) -> Result<bool, StoreError> {
        Ok(self.conn().execute("UPDATE devices SET labels = ?2 WHERE id = ?1", params![id, json(labels)])? == 1)
    }

    fn device_ids(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.snapshot()?;
        let mut stmt = conn.prepare("SELECT id FROM devices ORDER BY name, id")?;
        let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }

    fn list_devices(&self) -> Result<Vec<DeviceView>, StoreError> {
        devices::list_devices(&*self.snapshot()?)
    }

    fn next_freshness_counter(&self, device: &str) -> Result<u64, StoreError> {
        freshness_counter_in(&self.conn(), device)
    }

    fn put_root(&self, version: u64, document: &[u8], at_ms: u64) -> Result<(), StoreError> {
        let conn = self.conn();
        let latest: Option<i64> = conn.query_row("SELECT MAX(version) FROM roots", [], |r| r.get(0))?;
        let expected = latest.map_or(version, |v| v as u64 + 1);
        if version != expected {
            return Err(StoreError::Conflict(format!(
                "root {version} cannot be stored: the server holds root {} and the next must be {expected}",
                latest.unwrap_or(0)
            )));
        }
        conn.execute(
            "INSERT INTO roots (version, document, published_ms) VALUES (?1, ?2, ?3)",
            params![version as i64, document, at_ms as i64],
        )?;
        Ok(())
    }

    fn root(&self, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let conn = self.snapshot()?;
        Ok(conn
            .query_row("SELECT document FROM roots WHERE version = ?1", params![version as i64], |r| r.get(0))
            .optional()?)
    }

    fn latest_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let conn = self.snapshot()?;
        Ok(conn.query_row("SELECT document FROM roots ORDER BY version DESC LIMIT 1", [], |r| r.get(0)).optional()?)
    }

    fn put_bundle(&self, b: &BundleRecord) -> Result<(), StoreError> {
        let conn = self.conn();
        let existing: Option<String> = conn
            .query_row("SELECT sha256 FROM bundles WHERE name = ?1 AND version = ?2", params![b.name, b.version], |r| {
                r.get(0)
            })
            .optional()?;
        match existing {
            Some(sha) if sha == b.sha256 => Ok(()),
            Some(_) => Err(StoreError::Conflict(format!(
                "bundle {} {} is already published with different contents; publish a new version instead",
                b.name, b.version
            ))),
            None => {
                conn.execute(
                    "INSERT INTO bundles (name, version, sha256, size, created_at, signed_by, manifest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![b.name, b.version, b.sha256, b.size as i64, b.created_at as i64, b.signed_by, b.manifest_json],
                )?;
                Ok(())
            }
        }
    }

    fn bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>, StoreError> {
        Ok(self
            .snapshot()?
            .query_row(
                "SELECT sha256, size, created_at, signed_by, manifest FROM bundles WHERE name = ?1 AND version = ?2",
                params![name, version],
                |r| {
                    Ok(BundleRecord {
                        name: name.to_string(),
                        version: version.to_string(),
                        sha256: r.get(0)?,
                        size: r.get::<_, i64>(1)? as u64,
                        created_at: r.get::<_, i64>(2)? as u64,
                        signed_by: r.get(3)?,
                        manifest_json: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    fn set_desired(&self, devices: &[String], model: &str, version: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut revisions = Vec::with_capacity(devices.len());
        for device in devices {
            if let Some(revision) = rollouts::upsert_desired(&tx, device, model, version, None, None, None)? {
                revisions.push((device.clone(), revision));
            }
        }
        tx.commit()?;
        Ok(revisions)
    }

    fn desired_state(&self, device: &str) -> Result<DesiredState, StoreError> {
        desired_in(&*self.snapshot()?, device)
    }

    fn check_in(
        &self,
        device: &str,
        now_ms: u64,
        statuses: &[UpdateStatus],
        freshness: bool,
    ) -> Result<(DesiredState, Option<u64>), StoreError> {
        self.grouped_check_in(device, now_ms, statuses, freshness)
    }

    fn record_status(&self, device: &str, s: &UpdateStatus) -> Result<(), StoreError> {
        status_into(&self.conn(), device, s)
    }

    fn record_heartbeat(&self, device: &str, heartbeat: &Heartbeat) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        heartbeat_into(&tx, device, heartbeat)?;
        tx.commit()?;
        Ok(())
    }

    fn record_drift(&self, device: &str, d: &StoredDrift<'_>) -> Result<bool, StoreError> {
        drift_into(&self.conn(), device, d)
    }

    fn record_reports(&self, reports: &[SequencedReport<'_>]) -> Result<Vec<Accepted>, StoreError> {
        delivery::record_reports(&mut self.conn(), reports)
    }

    fn record_telemetry(&self, device: &str, rows: &[TelemetryRow]) -> Result<TelemetryAck, StoreError> {
        delivery::record_telemetry(&mut self.conn(), device, rows)
    }

    fn telemetry(&self, query: &TelemetryQuery) -> Result<Vec<StoredTelemetry>, StoreError> {
        delivery::telemetry(&*self.snapshot()?, query)
    }

    fn prune(&self, stored_before_ms: u64, limit: usize) -> Result<Pruned, StoreError> {
        delivery::prune(&mut self.conn(), stored_before_ms, limit)
    }

    fn delivery(&self) -> Result<Vec<DeliveryView>, StoreError> {
        delivery::views(&*self.snapshot()?)
    }

    fn cohort_defaults(&self) -> Result<Vec<CohortDefault>, StoreError> {
        rollouts::cohort_defaults(&*self.snapshot()?)
    }

    fn deploy_to_selector(
        &self,
        default: &CohortDefault,
        devices: &[String],
        audit: &AuditEntry,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        rollouts::deploy_to_selector(&mut self.conn(), default, devices, audit)
    }

    fn apply_cohort_defaults(
        &self,
        model: &str,
        newcomers: &[(String, String)],
        audit: &[AuditEntry],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        rollouts::apply_cohort_defaults(&mut self.conn(), model, newcomers, audit)
    }

    fn device_infos(&self, model: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        rollouts::device_infos(&*self.snapshot()?, model)
    }

    fn observation_rows(
        &self,
        model: &str,
        since_ms: u64,
        received_from_ms: u64,
    ) -> Result<ObservationRows, StoreError> {
        rollouts::observation_rows(&*self.snapshot()?, model, since_ms, received_from_ms)
    }

    fn save_rollout(
        &self,
        rollout: &Rollout,
        members: &MemberWrites,
        audit: &[AuditEntry],
        desired: &[DesiredChange],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        rollouts::save(&mut self.conn(), rollout, members, audit, desired)
    }

    fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        rollouts::load(&*self.snapshot()?, Some(id), false).map(|mut all| all.pop())
    }

    fn acquire_lease(&self, name: &str, holder: &str, now_ms: u64, ttl_ms: u64) -> Result<bool, StoreError> {
        rollouts::acquire_lease(&self.conn(), name, holder, now_ms, ttl_ms)
    }

    fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        rollouts::release_lease(&self.conn(), name, holder)
    }

    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        rollouts::load(&*self.snapshot()?, None, false)
    }

    fn active_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        rollouts::load(&*self.snapshot()?, None, true)
    }

    fn active_rollout_revisions(&self) -> Result<Vec<(String, u64)>, StoreError> {
        rollouts::active_revisions(&*self.snapshot()?)
    }

    fn rollout_phases(&self) -> Result<Vec<(Phase, u64)>, StoreError> {
        rollouts::phases(&*self.snapshot()?)
    }

    fn audit(&self, rollout: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        rollouts::audit(&*self.snapshot()?, rollout, limit)
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        rollouts::append_audit(&self.conn(), entry)
    }

    fn bundles(&self) -> Result<Vec<BundleRecord>, StoreError> {
        lineage::bundles(&*self.snapshot()?)
    }

    fn status_history(&self, device: &str, model: &str) -> Result<Vec<proto::lineage::StatusEntry>, StoreError> {
        lineage::status_history(&*self.snapshot()?, device, model)
    }

    fn audit_for_device(&self, device: &str, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        lineage::audit_for_device(&*self.snapshot()?, device, limit)
    }

    fn drift_watch(&self, model: &str, version: &str, cohort: &str) -> Result<Option<Watch>, StoreError> {
        events::drift_watch(&*self.snapshot()?, model, version, cohort)
    }

    fn save_drift_watch(
        &self,
        key: (&str, &str, &str),
        watch: &Watch,
        fired: Option<(&RetrainEvent, &AuditEntry)>,
    ) -> Result<bool, StoreError> {
        events::save_drift_watch(&mut self.conn(), key, watch, fired)
    }

    fn due_events(&self, now_ms: u64, limit: usize) -> Result<Vec<PendingEvent>, StoreError> {
        events::due_events(&*self.snapshot()?, now_ms, limit)
    }

    fn event_attempted(
        &self,
        id: &str,
        outcome: &Result<(), String>,
        now_ms: u64,
        next_attempt_ms: u64,
    ) -> Result<(), StoreError> {
        events::event_attempted(&self.conn(), id, outcome, now_ms, next_attempt_ms)
    }

    fn touch(&self, device: &str, at_ms: u64) -> Result<(), StoreError> {
        touch_in(&self.conn(), device, at_ms)
    }
}

#[path = "sqlite_devices.rs"]
mod devices;

#[path = "sqlite_schema.rs"]
mod schema;

#[path = "sqlite_delivery.rs"]
mod delivery;

#[path = "sqlite_rollouts.rs"]
mod rollouts;

#[path = "sqlite_lineage.rs"]
mod lineage;

#[path = "sqlite_events.rs"]
mod events;

#[path = "sqlite_checkins.rs"]
mod checkins;

#[cfg(test)]
#[path = "sqlite_tests.rs"]
mod tests;
