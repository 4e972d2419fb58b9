//! `agent.db`: the agent's durable state — its identity, the last recorded step of each model's
//! update, the roots of trust it rotated to, the freshness it accepted, the highest anti-rollback floor seen per model, and the MQTT outbox with its delivery counters (SQL in `uplink/outbox.rs`). Each actor opens its own connection (WAL mode), so none shares a
//! lock with another.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use proto::wire::UpdateStep;
use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

#[derive(Debug, Error)]
#[error("agent state database {path}: {source}")]
pub struct StateError {
    pub path: PathBuf,
    #[source]
    pub source: rusqlite::Error,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub device_id: String,
    pub credential: String,
}

/// The last recorded step of a model's update: written before the step starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateRecord {
    pub model: String,
    pub version: String,
    pub step: UpdateStep,
    pub detail: String,
    /// The server's attempt number for this version (see `DesiredModel::attempt`).
    pub attempt: u32,
    /// Failed tries of this version and attempt so far (downloads, restarts during self-test);
    /// bounded by the config, then the update is `failed`.
    pub failures: u32,
}

/// One connection behind a mutex that is never held across an await (every method is sync),
/// so the handle can live in async tasks.
pub struct StateDb {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl StateDb {
    pub fn open(path: &Path) -> Result<StateDb, StateError> {
        let err = |source| StateError { path: path.into(), source };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        // Small page cache: the state database is tiny and devices are short of memory.
        conn.pragma_update(None, "cache_size", -256).map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS identity (
                one INTEGER PRIMARY KEY CHECK (one = 1),
                device_id TEXT NOT NULL,
                credential TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS updates (
                model TEXT PRIMARY KEY,
                version TEXT NOT NULL,
                step TEXT NOT NULL,
                detail TEXT NOT NULL,
                attempt INTEGER NOT NULL DEFAULT 0,
                updated_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS roots (
                version INTEGER PRIMARY KEY,
                document BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS freshness (
                one INTEGER PRIMARY KEY CHECK (one = 1),
                counter INTEGER NOT NULL,
                time_floor INTEGER NOT NULL,
                fresh_until INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS floors (
                model TEXT PRIMARY KEY,
                floor TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS outbox (
                id INTEGER PRIMARY KEY,
                topic TEXT NOT NULL,
                payload BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS delivery (
                one INTEGER PRIMARY KEY CHECK (one = 1),
                next_seq INTEGER NOT NULL,
                evicted_heartbeats INTEGER NOT NULL DEFAULT 0,
                evicted_reports INTEGER NOT NULL DEFAULT 0,
                reported_telemetry INTEGER NOT NULL DEFAULT 0,
                reported_heartbeats INTEGER NOT NULL DEFAULT 0,
                reported_reports INTEGER NOT NULL DEFAULT 0);",
        )
        .map_err(err)?;
        // The outbox row id is the record's sequence number; `priority` orders eviction.
        add_column(&conn, "outbox", "priority", "INTEGER NOT NULL DEFAULT 2").map_err(err)?;
        add_column(&conn, "updates", "failures", "INTEGER NOT NULL DEFAULT 0").map_err(err)?;
        conn.execute(
            "INSERT OR IGNORE INTO delivery (one, next_seq) SELECT 1, COALESCE(MAX(id), 0) + 1 FROM outbox",
            [],
        )
        .map_err(err)?;
        Ok(StateDb { conn: Mutex::new(conn), path: path.into() })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection itself usable.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        |source| StateError { path: self.path.clone(), source }
    }

    pub fn identity(&self) -> Result<Option<Identity>, StateError> {
        self.conn()
            .query_row("SELECT device_id, credential FROM identity", [], |r| {
                Ok(Identity { device_id: r.get(0)?, credential: r.get(1)? })
            })
            .optional()
            .map_err(self.err())
    }

    pub fn save_identity(&self, identity: &Identity) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO identity (one, device_id, credential) VALUES (1, ?1, ?2)",
                params![identity.device_id, identity.credential],
            )
            .map(drop)
            .map_err(self.err())
    }

    pub fn record(&self, record: &UpdateRecord) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO updates (model, version, step, detail, attempt, failures, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![record.model, record.version, record.step.as_str(), record.detail, record.attempt, record.failures, crate::unix_ms() as i64],
            )
            .map(drop)
            .map_err(self.err())
    }

    pub fn records(&self) -> Result<Vec<UpdateRecord>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT model, version, step, detail, attempt, failures FROM updates ORDER BY model")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                let step: String = r.get(2)?;
                // A step this agent does not know is corruption: say so rather than guess one.
                let step = UpdateStep::parse(&step).ok_or_else(|| {
                    let why = format!("update step {step:?} is no known step");
                    rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, why.into())
                })?;
                Ok(UpdateRecord {
                    model: r.get(0)?,
                    version: r.get(1)?,
                    step,
                    detail: r.get(3)?,
                    attempt: r.get(4)?,
                    failures: r.get(5)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// What the device remembers of the signed check-in replies it accepted (ADR 0010).
    pub fn freshness(&self) -> Result<proto::freshness::Seen, StateError> {
        let seen = self
            .conn()
            .query_row("SELECT counter, time_floor, fresh_until FROM freshness", [], |r| {
                Ok(proto::freshness::Seen {
                    counter: r.get::<_, i64>(0)? as u64,
                    time_floor: r.get::<_, i64>(1)? as u64,
                    fresh_until: r.get::<_, i64>(2)? as u64,
                })
            })
            .optional()
            .map_err(self.err())?;
        Ok(seen.unwrap_or_default())
    }

    pub fn save_freshness(&self, seen: &proto::freshness::Seen) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO freshness (one, counter, time_floor, fresh_until) VALUES (1, ?1, ?2, ?3)",
                params![seen.counter as i64, seen.time_floor as i64, seen.fresh_until as i64],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// The newest root of trust this device rotated to (its signed JSON), if any.
    pub fn latest_root(&self) -> Result<Option<Vec<u8>>, StateError> {
        self.conn()
            .query_row("SELECT document FROM roots ORDER BY version DESC LIMIT 1", [], |r| r.get(0))
            .optional()
            .map_err(self.err())
    }

    /// Keeps a root the device rotated to; written before the device uses it.
    pub fn save_root(&self, version: u64, document: &[u8]) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO roots (version, document) VALUES (?1, ?2)",
                params![version as i64, document],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// The highest anti-rollback floor seen for a model (ADR 0010), if any.
    pub fn floor(&self, model: &str) -> Result<Option<semver::Version>, StateError> {
        let text: Option<String> = self
            .conn()
            .query_row("SELECT floor FROM floors WHERE model = ?1", params![model], |r| r.get(0))
            .optional()
            .map_err(self.err())?;
        text.map(|text| {
            // A floor this agent cannot read is corruption: refuse rather than forget it.
            semver::Version::parse(&text).map_err(|e| StateError {
                path: self.path.clone(),
                source: rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)),
            })
        })
        .transpose()
    }

    /// Raises a model's floor to `floor` unless it is already at or above it; floors never fall.
    /// Returns the floor now stored.
    pub fn raise_floor(&self, model: &str, floor: &semver::Version) -> Result<semver::Version, StateError> {
        let seen = self.floor(model)?;
        if let Some(seen) = seen.filter(|seen| seen >= floor) {
            return Ok(seen);
        }
        self.conn()
            .execute("INSERT OR REPLACE INTO floors (model, floor) VALUES (?1, ?2)", params![model, floor.to_string()])
            .map_err(self.err())?;
        Ok(floor.clone())
    }

    /// Runs `f` in one transaction on this connection (the outbox's SQL lives with its actor).
    pub fn transaction<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err())?;
        let value = f(&tx).map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(value)
    }

    /// A transaction whose commit does not wait for the disk: for changes that are harmless to
    /// lose in a power cut (deleting acknowledged records only means they are sent again and
    /// recognised). A later synced commit makes it durable with its own; a crash of the process
    /// alone loses nothing (WAL).
    pub fn transaction_unsynced<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StateError> {
        let mut conn = self.conn();
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(self.err())?;
        let outcome = (|| {
            let tx = conn.transaction()?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        })();
        let restored = conn.pragma_update(None, "synchronous", "FULL");
        let value = outcome.map_err(self.err())?;
        restored.map_err(self.err())?;
        Ok(value)
    }
}

/// Adds a column to a table created by an earlier version, once.
fn add_column(conn: &Connection, table: &str, column: &str, declaration: &str) -> rusqlite::Result<()> {
    let exists = conn
        .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
        .exists(params![column])?;
    if !exists {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {declaration}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_records_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let db = StateDb::open(&path).unwrap();
        assert_eq!(db.identity().unwrap(), None);
        let id = Identity { device_id: "d1".into(), credential: "c".into() };
        db.save_identity(&id).unwrap();
        let rec = UpdateRecord {
            model: "m".into(),
            version: "1.0.0".into(),
            step: UpdateStep::SelfTest,
            detail: String::new(),
            attempt: 2,
            failures: 1,
        };
        db.record(&rec).unwrap();
        drop(db);
        let db = StateDb::open(&path).unwrap();
        assert_eq!(db.identity().unwrap(), Some(id));
        assert_eq!(db.records().unwrap(), vec![rec]);
    }

    #[test]
    fn floors_only_rise_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let db = StateDb::open(&path).unwrap();
        let v = |text: &str| semver::Version::parse(text).unwrap();
        assert_eq!(db.floor("m").unwrap(), None);
        assert_eq!(db.raise_floor("m", &v("1.2.0")).unwrap(), v("1.2.0"));
        assert_eq!(db.raise_floor("m", &v("1.1.0")).unwrap(), v("1.2.0"), "a lower floor does not lower it");
        assert_eq!(db.raise_floor("other", &v("0.1.0")).unwrap(), v("0.1.0"));
        drop(db);
        let db = StateDb::open(&path).unwrap();
        assert_eq!(db.floor("m").unwrap(), Some(v("1.2.0")));
        assert_eq!(db.floor("other").unwrap(), Some(v("0.1.0")));
    }

    #[test]
    fn a_corrupt_update_step_is_an_error_that_names_it_not_a_silent_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let db = StateDb::open(&path).unwrap();
        db.conn()
            .execute(
                "INSERT INTO updates (model, version, step, detail, attempt, updated_ms) VALUES ('m', '1.0.0', 'exploded', '', 0, 0)",
                [],
            )
            .unwrap();
        let err = db.records().unwrap_err();
        assert!(err.to_string().contains("update step \"exploded\" is no known step"), "{err}");
        assert!(err.to_string().contains("agent.db"), "{err}");
    }
}
