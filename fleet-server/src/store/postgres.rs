//! The PostgreSQL store (`fleet-server --database-url postgres://…`): the same tables and the same
//! SQL semantics as the SQLite store (upserts, transactions, RETURNING), with BIGINT for integers,
//! BYTEA for blobs and identity columns where SQLite uses rowids. Versioned migrations
//! (`postgres_schema.rs`) run at open.
//!
//! A pool of up to `CONNECTIONS` clients: calls run at once, each on its own connection, and
//! PostgreSQL orders their transactions (rows are locked by the statements that change them;
//! a rollout is saved with a revision check, and leases are one upsert, because several servers
//! may share the database). A connection the server lost (the database restarted) is replaced on
//! the next call.
//!
//! This half owns opening, enrollment, operators and roots; devices, bundles and desired state are
//! in `postgres_devices.rs`, and the other halves mirror the SQLite files of the same names.

use std::collections::BTreeMap;

use postgres::error::SqlState;
use postgres::{Config, NoTls};
use proto::delivery::{DeliveryView, TelemetryAck, TelemetryRow};
use proto::events::RetrainEvent;
use proto::wire::{AuditEntry, DesiredState, DeviceView, Heartbeat, UpdateStatus};

use self::prepared::{PgConn, Prepared};
use super::pool::{Pool, Pooled};
use super::{
    Accepted, BundleRecord, DesiredChange, EnrollRefusal, NewDevice, ObservationRows, OperatorRecord, PendingEvent,
    Pruned, SequencedReport, Store, StoreError, StoredDrift, StoredTelemetry, TelemetryQuery,
};
use crate::drift::retrain::Watch;
use crate::rollout::{CohortDefault, DeviceInfo, MemberWrites, Phase, Rollout};

/// Connections one server opens at most (PostgreSQL's default limit is 100 for all clients).
const CONNECTIONS: usize = 8;

/// Connections of the MQTT ingest's own (its report batches, the device keys it looks up and
/// the rejected reports it counts).
const INGEST_CONNECTIONS: usize = 2;

/// A PostgreSQL database holding one fleet's tables, in one schema.
pub struct PostgresStore {
    clients: Pool<PgConn>,
    /// The MQTT ingest's own. Telemetry uploads are HTTP requests and stay on the API's pool,
    /// so that they cannot take these from the ingest. Sharing the API's pool, the ingest's key lookups waited for a connection behind the
    /// check-ins of 10,000 devices (the pool takes no turns), and reports were stored at ~100/s.
    ingest: Pool<PgConn>,
}

impl Drop for PostgresStore {
    /// Closing a client blocks on its own runtime, which panics on a tokio worker, where the
    /// last handle to the store is often dropped: a thread of its own closes them there.
    fn drop(&mut self) {
        let clients = (self.clients.take_idle(), self.ingest.take_idle());
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::spawn(move || drop(clients));
        }
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database[?options]`) and brings
    /// the tables up to date. With `schema`, the tables live in that schema (created if missing;
    /// lowercase letters, digits and `_`), so that several fleets or tests share one database;
    /// without it, in the first schema of the connection's search_path (normally `public`).
    /// Errors name the URL without its password.
    pub fn open(url: &str, schema: Option<&str>) -> Result<PostgresStore, StoreError> {
        let shown = without_password(url);
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::Database(format!(
                "database URL {shown} is not a postgres:// URL; pass postgres://user@host:port/database, or no URL for SQLite"
            )));
        }
        let mut config: Config =
            url.parse().map_err(|e| StoreError::Database(format!("database URL {shown} cannot be read: {e}")))?;
        let unreachable = |e: postgres::Error| {
            StoreError::Database(format!("cannot use the PostgreSQL database at {shown}: {}", with_causes(&e)))
        };
        if let Some(schema) = schema {
            check_schema_name(schema)?;
            let mut client = config.connect(NoTls).map_err(unreachable)?;
            schema::create_schema(&mut client, schema).map_err(unreachable)?;
            let options = config.get_options().map(|o| format!("{o} ")).unwrap_or_default();
            config.options(&format!("{options}-c search_path={schema}"));
        }
        let mut client = config.connect(NoTls).map_err(unreachable)?;
        schema::migrate(&mut client).map_err(unreachable)?;
        let ingest_config = config.clone();
        let clients = Pool::new(CONNECTIONS, move || Ok(PgConn::new(config.connect(NoTls)?)));
        let ingest = Pool::new(INGEST_CONNECTIONS, move || Ok(PgConn::new(ingest_config.connect(NoTls)?)));
        // The first client, already open, is the pool's first idle one.
        drop(clients.adopt(PgConn::new(client)));
        Ok(PostgresStore { clients, ingest })
    }

    /// A connection of the API's pool.
    fn conn(&self) -> Result<Pooled<'_, PgConn>, StoreError> {
        open_client(&self.clients)
    }

    /// A connection of the ingest's pool.
    fn ingest_conn(&self) -> Result<Pooled<'_, PgConn>, StoreError> {
        open_client(&self.ingest)
    }

    /// Runs SQL as it is (tests write rows the trait cannot, e.g. corrupt ones).
    #[cfg(test)]
    pub(crate) fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.conn()?.batch_execute(sql)?)
    }
}

/// A connection of `pool`'s, a new one in place of one the database closed.
fn open_client(pool: &Pool<PgConn>) -> Result<Pooled<'_, PgConn>, StoreError> {
    loop {
        let client = pool.get()?;
        if !client.is_closed() {
            return Ok(client);
        }
        client.discard();
    }
}

/// The error and what caused it ("error connecting to server: Connection refused").
pub(super) fn with_causes(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// A schema name goes into the connection's options unquoted: only plain identifiers.
fn check_schema_name(schema: &str) -> Result<(), StoreError> {
    let plain = schema.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 63;
    if plain {
        Ok(())
    } else {
        Err(StoreError::Database(format!(
            "database schema {schema:?} is not a plain name: use lowercase letters, digits and _ (at most 63)"
        )))
    }
}

/// The URL as it may be shown: the password in the user part or in a `password=` parameter
/// left out.
pub fn without_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority_end, query_start) =
        (rest.find(['/', '?']).unwrap_or(rest.len()), rest.find('?').unwrap_or(rest.len()));
    let (authority, path) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => format!("{}@{host}", user.split(':').next().unwrap_or_default()),
        None => authority.to_string(),
    };
    let (path, query) = path.split_at(query_start.saturating_sub(authority_end).min(path.len()));
    let query: Vec<&str> = query
        .trim_start_matches('?')
        .split('&')
        .filter(|p| !p.is_empty() && !p.to_ascii_lowercase().starts_with("password="))
        .collect();
    let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    let scheme = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
    format!("{scheme}{authority}{path}{query}")
}

pub(super) fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

impl Store for PostgresStore {
    fn create_tokens(&self, token_hashes: &[String], now_ms: u64, expires_ms: u64) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        for hash in token_hashes {
            tx.execute(
                "INSERT INTO tokens (hash, created_ms, expires_ms) VALUES ($1, $2, $3)",
                &[hash, &(now_ms as i64), &(expires_ms as i64)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn revoke_token(&self, token_hash: &str, now_ms: u64) -> Result<bool, StoreError> {
        let changed = self.conn()?.execute(
            "UPDATE tokens SET revoked_ms = $2 WHERE hash = $1 AND used_ms IS NULL AND revoked_ms IS NULL",
            &[&token_hash, &(now_ms as i64)],
        )?;
        Ok(changed == 1)
    }

    fn enroll(
        &self,
        token_hash: &str,
        d: &NewDevice,
        grace_ms: u64,
    ) -> Result<Result<String, EnrollRefusal>, StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        // FOR UPDATE: two enrollments with one token (two connections, or two servers) take
        // turns, so the second sees the token used.
        let token = tx
            .query_opt(
                "SELECT used_ms, device, expires_ms, revoked_ms FROM tokens WHERE hash = $1 FOR UPDATE",
                &[&token_hash],
            )?
            .map(|r| {
                Ok::<_, postgres::Error>((
                    r.try_get::<_, Option<i64>>(0)?,
                    r.try_get::<_, Option<String>>(1)?,
                    r.try_get::<_, Option<i64>>(2)?,
                    r.try_get::<_, Option<i64>>(3)?,
                ))
            })
            .transpose()?;
        let now = d.enrolled_ms as i64;
        let enrolled = match token {
            None => Err(EnrollRefusal::UnknownOrUsed),
            Some((_, _, _, Some(_))) => Err(EnrollRefusal::Revoked),
            Some((None, _, Some(expires), _)) if now >= expires => Err(EnrollRefusal::Expired),
            Some((None, _, _, _)) => {
                tx.execute("UPDATE tokens SET used_ms = $2, device = $3 WHERE hash = $1", &[&token_hash, &now, &d.id])?;
                devices::insert_device(&mut tx, d)?;
                Ok(d.id.clone())
            }
            Some((Some(used), Some(device), _, _)) if d.enrolled_ms.saturating_sub(used as u64) <= grace_ms => {
                let changed = tx.execute(
                    "UPDATE devices SET credential_hash = $2, public_key = $3, broker_hash = $4
                     WHERE id = $1 AND revoked_ms IS NULL",
                    &[&device, &d.credential_hash, &d.public_key, &d.broker_hash],
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
        let rows = self.conn()?.query(
            "SELECT id, broker_hash FROM devices WHERE revoked_ms IS NULL AND broker_hash != '' ORDER BY id",
            &[],
        )?;
        Ok(rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, postgres::Error>>()?)
    }

    fn revoke_device(&self, device: &str, now_ms: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let exists = conn.query_opt("SELECT 1 FROM devices WHERE id = $1", &[&device])?.is_some();
        conn.execute(
            "UPDATE devices SET revoked_ms = $2 WHERE id = $1 AND revoked_ms IS NULL",
            &[&device, &(now_ms as i64)],
        )?;
        Ok(exists)
    }

    fn put_operator(&self, o: &OperatorRecord, replace: bool) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        if replace {
            // SQLite's INSERT OR REPLACE: every row in the way (same name or same token) goes.
            tx.execute("DELETE FROM operators WHERE name = $1 OR token_hash = $2", &[&o.name, &o.token_hash])?;
        }
        let inserted = tx.execute(
            "INSERT INTO operators (name, role, token_hash, created_ms, revoked_ms) VALUES ($1, $2, $3, $4, $5)",
            &[&o.name, &o.role.as_str(), &o.token_hash, &(o.created_ms as i64), &o.revoked_ms.map(|v| v as i64)],
        );
        match inserted {
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::Conflict(format!("an operator named {} exists; pick another name", o.name)))
            }
            other => {
                other?;
                tx.commit()?;
                Ok(())
            }
        }
    }

    fn operator_for_token(&self, token_hash: &str) -> Result<Option<OperatorRecord>, StoreError> {
        let row = self.conn()?.query_opt(
            "SELECT name, role, token_hash, created_ms, revoked_ms FROM operators
             WHERE token_hash = $1 AND revoked_ms IS NULL",
            &[&token_hash],
        )?;
        Ok(row.map(|r| devices::operator_row(&r)).transpose()?)
    }

    fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        let rows = self
            .conn()?
            .query("SELECT name, role, token_hash, created_ms, revoked_ms FROM operators ORDER BY name", &[])?;
        Ok(rows.iter().map(devices::operator_row).collect::<Result<_, _>>()?)
    }

    fn revoke_operator(&self, name: &str, now_ms: u64) -> Result<bool, StoreError> {
        let changed = self.conn()?.execute(
            "UPDATE operators SET revoked_ms = $2 WHERE name = $1 AND revoked_ms IS NULL",
            &[&name, &(now_ms as i64)],
        )?;
        Ok(changed == 1)
    }

    fn insert_device(&self, d: &NewDevice) -> Result<(), StoreError> {
        devices::insert_device(&mut self.conn()?.client, d)
    }

    /// Read by the ingest (once per device), so on its connections.
    fn device_public_key(&self, device: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .ingest_conn()?
            .prepared()
            .query_opt("SELECT public_key FROM devices WHERE id = $1 AND revoked_ms IS NULL", &[&device])?;
        let key: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
        Ok(key.filter(|k| !k.is_empty()))
    }

    fn count_rejected(&self, device: &str, reports: u64) -> Result<(), StoreError> {
        let mut conn = self.ingest_conn()?;
        conn.execute(
            "INSERT INTO delivery (device) SELECT id FROM devices WHERE id = $1 ON CONFLICT DO NOTHING",
            &[&device],
        )?;
        conn.execute("UPDATE delivery SET rejected = rejected + $2 WHERE device = $1", &[&device, &(reports as i64)])?;
        Ok(())
    }

    fn device_for_credential(&self, credential_hash: &str) -> Result<Option<String>, StoreError> {
        let row = self.conn()?.prepared().query_opt(
            "SELECT id FROM devices WHERE credential_hash = $1 AND revoked_ms IS NULL",
            &[&credential_hash],
        )?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    fn device_exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn()?.query_opt("SELECT 1 FROM devices WHERE id = $1", &[&id])?.is_some())
    }

    fn set_labels(&self, id: &str, labels: &BTreeMap<String, String>) -> Result<bool, StoreError> {
        Ok(self.conn()?.execute("UPDATE devices SET labels = $2 WHERE id = $1", &[&id, &json(labels)])? == 1)
    }

    fn device_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows = self.conn()?.query("SELECT id FROM devices ORDER BY name, id", &[])?;
        Ok(rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?)
    }

    fn list_devices(&self) -> Result<Vec<DeviceView>, StoreError> {
        devices::list_devices(&mut *self.conn()?)
    }

    fn next_freshness_counter(&self, device: &str) -> Result<u64, StoreError> {
        devices::next_freshness_counter(&mut self.conn()?.client, device)
    }

    /// Twice the connections: a call's turn starts while another's result is still being read.
    fn concurrency(&self) -> usize {
        2 * CONNECTIONS
    }

    fn check_in(
        &self,
        device: &str,
        now_ms: u64,
        statuses: &[UpdateStatus],
        freshness: bool,
    ) -> Result<(DesiredState, Option<u64>), StoreError> {
        let mut conn = self.conn()?;
        let (mut tx, statements) = conn.transaction_and_statements()?;
        let checked_in = devices::check_in(&mut tx, statements, device, now_ms, statuses, freshness)?;
        tx.commit()?;
        Ok(checked_in)
    }

    fn put_root(&self, version: u64, document: &[u8], at_ms: u64) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let latest: Option<i64> = conn.query_one("SELECT MAX(version) FROM roots", &[])?.try_get(0)?;
        let expected = latest.map_or(version, |v| v as u64 + 1);
        if version != expected {
            return Err(StoreError::Conflict(format!(
                "root {version} cannot be stored: the server holds root {} and the next must be {expected}",
                latest.unwrap_or(0)
            )));
        }
        conn.execute(
            "INSERT INTO roots (version, document, published_ms) VALUES ($1, $2, $3)",
            &[&(version as i64), &document, &(at_ms as i64)],
        )?;
        Ok(())
    }

    fn root(&self, version: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self.conn()?.query_opt("SELECT document FROM roots WHERE version = $1", &[&(version as i64)])?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    fn latest_root(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self.conn()?.query_opt("SELECT document FROM roots ORDER BY version DESC LIMIT 1", &[])?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    fn put_bundle(&self, b: &BundleRecord) -> Result<(), StoreError> {
        devices::put_bundle(&mut *self.conn()?, b)
    }

    fn bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>, StoreError> {
        devices::bundle(&mut *self.conn()?, name, version)
    }

    fn set_desired(&self, devices: &[String], model: &str, version: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let mut conn = self.conn()?;
        let (mut tx, statements) = conn.transaction_and_statements()?;
        devices::lock_devices(&mut tx, devices.iter().map(String::as_str))?;
        let revisions = rollouts::deploy_desired(&mut Prepared::new(&mut tx, statements), model, version, devices)?;
        tx.commit()?;
        Ok(revisions)
    }

    fn desired_state(&self, device: &str) -> Result<DesiredState, StoreError> {
        devices::desired_state(&mut self.conn()?.prepared(), device)
    }

    fn record_status(&self, device: &str, s: &UpdateStatus) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let (mut tx, statements) = conn.transaction_and_statements()?;
        let mut prepared = Prepared::new(&mut tx, statements);
        delivery::lock_ingest(&mut prepared, &[device])?;
        devices::status_into(&mut prepared, device, s)?;
        tx.commit()?;
        Ok(())
    }

    fn record_heartbeat(&self, device: &str, heartbeat: &Heartbeat) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let (mut tx, statements) = conn.transaction_and_statements()?;
        let mut prepared = Prepared::new(&mut tx, statements);
        delivery::lock_ingest(&mut prepared, &[device])?;
        devices::heartbeat_into(&mut prepared, device, heartbeat)?;
        tx.commit()?;
        Ok(())
    }

    fn record_drift(&self, device: &str, d: &StoredDrift<'_>) -> Result<bool, StoreError> {
        devices::drift_into(&mut self.conn()?.prepared(), device, d)
    }

    fn record_reports(&self, reports: &[SequencedReport<'_>]) -> Result<Vec<Accepted>, StoreError> {
        delivery::record_reports(&mut *self.ingest_conn()?, reports)
    }

    fn record_telemetry(&self, device: &str, rows: &[TelemetryRow]) -> Result<TelemetryAck, StoreError> {
        delivery::record_telemetry(&mut *self.conn()?, device, rows)
    }

    fn telemetry(&self, query: &TelemetryQuery) -> Result<Vec<StoredTelemetry>, StoreError> {
        delivery::telemetry(&mut *self.conn()?, query)
    }

    fn prune(&self, stored_before_ms: u64, limit: usize) -> Result<Pruned, StoreError> {
        delivery::prune(&mut *self.conn()?, stored_before_ms, limit)
    }

    fn delivery(&self) -> Result<Vec<DeliveryView>, StoreError> {
        delivery::views(&mut *self.conn()?)
    }

    fn cohort_defaults(&self) -> Result<Vec<CohortDefault>, StoreError> {
        rollouts::cohort_defaults(&mut *self.conn()?)
    }

    fn deploy_to_selector(
        &self,
        default: &CohortDefault,
        devices: &[String],
        audit: &AuditEntry,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        rollouts::deploy_to_selector(&mut *self.conn()?, default, devices, audit)
    }

    fn apply_cohort_defaults(
        &self,
        model: &str,
        newcomers: &[(String, String)],
        audit: &[AuditEntry],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        rollouts::apply_cohort_defaults(&mut *self.conn()?, model, newcomers, audit)
    }

    fn device_infos(&self, model: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        rollouts::device_infos(&mut *self.conn()?, model)
    }

    fn observation_rows(
        &self,
        model: &str,
        since_ms: u64,
        received_from_ms: u64,
    ) -> Result<ObservationRows, StoreError> {
        rollouts::observation_rows(&mut *self.conn()?, model, since_ms, received_from_ms)
    }

    fn save_rollout(
        &self,
        rollout: &Rollout,
        members: &MemberWrites,
        audit: &[AuditEntry],
        desired: &[DesiredChange],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        rollouts::save(&mut *self.conn()?, rollout, members, audit, desired)
    }

    fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        rollouts::load(&mut *self.conn()?, Some(id), false).map(|mut all| all.pop())
    }

    fn acquire_lease(&self, name: &str, holder: &str, now_ms: u64, ttl_ms: u64) -> Result<bool, StoreError> {
        rollouts::acquire_lease(&mut *self.conn()?, name, holder, now_ms, ttl_ms)
    }

    fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        rollouts::release_lease(&mut *self.conn()?, name, holder)
    }

    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        rollouts::load(&mut *self.conn()?, None, false)
    }

    fn active_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        rollouts::load(&mut *self.conn()?, None, true)
    }

    fn active_rollout_revisions(&self) -> Result<Vec<(String, u64)>, StoreError> {
        rollouts::active_revisions(&mut *self.conn()?)
    }

    fn rollout_phases(&self) -> Result<Vec<(Phase, u64)>, StoreError> {
        rollouts::phases(&mut *self.conn()?)
    }

    fn audit(&self, rollout: Option<&str>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        rollouts::audit(&mut *self.conn()?, rollout, limit)
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        rollouts::append_audit(&mut self.conn()?.client, entry)
    }

    fn bundles(&self) -> Result<Vec<BundleRecord>, StoreError> {
        lineage::bundles(&mut *self.conn()?)
    }

    fn status_history(&self, device: &str, model: &str) -> Result<Vec<proto::lineage::StatusEntry>, StoreError> {
        lineage::status_history(&mut *self.conn()?, device, model)
    }

    fn audit_for_device(&self, device: &str, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        lineage::audit_for_device(&mut *self.conn()?, device, limit)
    }

    fn drift_watch(&self, model: &str, version: &str, cohort: &str) -> Result<Option<Watch>, StoreError> {
        events::drift_watch(&mut *self.conn()?, model, version, cohort)
    }

    fn save_drift_watch(
        &self,
        key: (&str, &str, &str),
        watch: &Watch,
        fired: Option<(&RetrainEvent, &AuditEntry)>,
    ) -> Result<bool, StoreError> {
        events::save_drift_watch(&mut *self.conn()?, key, watch, fired)
    }

    fn due_events(&self, now_ms: u64, limit: usize) -> Result<Vec<PendingEvent>, StoreError> {
        events::due_events(&mut *self.conn()?, now_ms, limit)
    }

    fn event_attempted(
        &self,
        id: &str,
        outcome: &Result<(), String>,
        now_ms: u64,
        next_attempt_ms: u64,
    ) -> Result<(), StoreError> {
        events::event_attempted(&mut *self.conn()?, id, outcome, now_ms, next_attempt_ms)
    }

    fn touch(&self, device: &str, at_ms: u64) -> Result<(), StoreError> {
        self.conn()?.execute(
            "UPDATE devices SET last_seen_ms = GREATEST(COALESCE(last_seen_ms, 0), $2) WHERE id = $1",
            &[&device, &(at_ms as i64)],
        )?;
        Ok(())
    }
}

#[path = "postgres_schema.rs"]
mod schema;

#[path = "postgres_devices.rs"]
mod devices;

#[path = "postgres_delivery.rs"]
mod delivery;

#[path = "postgres_prepared.rs"]
mod prepared;

#[path = "postgres_rollouts.rs"]
mod rollouts;

#[path = "postgres_lineage.rs"]
mod lineage;

#[path = "postgres_events.rs"]
mod events;

#[cfg(test)]
#[path = "postgres_tests.rs"]
mod tests;
