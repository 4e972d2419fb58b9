//! Versioned migrations of the SQLite store, as for PostgreSQL (`postgres_schema.rs`):
//! `schema_migrations` records each applied version, and each missing migration runs in an
//! IMMEDIATE transaction (SQLite's write lock, so two processes opening one file apply it once).
//! Version 1 is the schema as it was before versions existed: `CREATE TABLE IF NOT EXISTS` plus a
//! column check for every column added since, so a database made by any earlier release reaches it
//! too. Later changes are new versions, never edits of a released one.

use rusqlite::{params, Connection, TransactionBehavior};

use super::{events, lineage};
use crate::store::StoreError;

/// One migration: statements run inside the caller's transaction.
type Migration = fn(&Connection) -> rusqlite::Result<()>;

/// (version, migration), in order.
pub const MIGRATIONS: &[(i64, Migration)] = &[(1, v1), (2, v2), (3, v3), (4, v4)];

const V1_TABLES: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, created_ms INTEGER NOT NULL, used_ms INTEGER);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL, revoked_ms INTEGER);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, labels TEXT NOT NULL,
    credential_hash TEXT NOT NULL UNIQUE, enrolled_ms INTEGER NOT NULL,
    last_seen_ms INTEGER, health TEXT, revision INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS roots (
    version INTEGER PRIMARY KEY, document BLOB NOT NULL, published_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bundles (
    name TEXT NOT NULL, version TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    created_at INTEGER NOT NULL, signed_by TEXT NOT NULL, manifest BLOB NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS desired (
    device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device, model));
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, phase TEXT NOT NULL, created_ms INTEGER NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, actor TEXT NOT NULL, rollout TEXT, action TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model_status (
    device TEXT NOT NULL, model TEXT NOT NULL, version TEXT, step TEXT, detail TEXT NOT NULL DEFAULT '',
    active_version TEXT, at_ms INTEGER, inferences INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0, latency_p95_us INTEGER,
    PRIMARY KEY (device, model));
CREATE TABLE IF NOT EXISTS drift (
    device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL, window_end_ms INTEGER NOT NULL, samples INTEGER NOT NULL,
    score REAL NOT NULL, mean_confidence REAL, counts BLOB NOT NULL,
    PRIMARY KEY (device, model, window_start_ms));
CREATE INDEX IF NOT EXISTS drift_by_model_time ON drift (model, window_start_ms);
CREATE TABLE IF NOT EXISTS received (
    device TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delivery (
    device TEXT PRIMARY KEY, floor INTEGER NOT NULL DEFAULT 0,
    reports_stored INTEGER NOT NULL DEFAULT 0, reports_duplicates INTEGER NOT NULL DEFAULT 0,
    telemetry_stored INTEGER NOT NULL DEFAULT 0, telemetry_duplicates INTEGER NOT NULL DEFAULT 0,
    evicted_telemetry INTEGER NOT NULL DEFAULT 0, evicted_heartbeats INTEGER NOT NULL DEFAULT 0,
    evicted_reports INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT NOT NULL, seq INTEGER NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    at_ms INTEGER NOT NULL, latency_us INTEGER NOT NULL, features BLOB NOT NULL, outputs BLOB NOT NULL,
    PRIMARY KEY (device, seq));
CREATE INDEX IF NOT EXISTS telemetry_by_model ON telemetry (model, version, at_ms);
CREATE TABLE IF NOT EXISTS cohort_defaults (
    source TEXT PRIMARY KEY, model TEXT NOT NULL, selector TEXT NOT NULL, version TEXT NOT NULL,
    at_ms INTEGER NOT NULL);
";

fn v1(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute_batch(V1_TABLES)?;
    tx.execute_batch(lineage::SCHEMA)?;
    tx.execute_batch(events::SCHEMA)?;
    add_column(tx, "devices", "heartbeat_ms", "INTEGER")?;
    add_column(tx, "tokens", "device", "TEXT")?;
    add_column(tx, "devices", "public_key", "TEXT NOT NULL DEFAULT ''")?;
    add_column(tx, "delivery", "rejected", "INTEGER NOT NULL DEFAULT 0")?;
    add_column(tx, "devices", "revoked_ms", "INTEGER")?;
    add_column(tx, "devices", "broker_hash", "TEXT NOT NULL DEFAULT ''")?;
    // Tokens made before expiry existed never expire.
    add_column(tx, "tokens", "expires_ms", "INTEGER")?;
    add_column(tx, "tokens", "revoked_ms", "INTEGER")?;
    add_column(tx, "devices", "freshness_counter", "INTEGER NOT NULL DEFAULT 0")?;
    add_column(tx, "desired", "shadow_version", "TEXT")?;
    add_column(tx, "desired", "shadow_rate", "REAL")?;
    add_column(tx, "desired", "activation_window", "TEXT")?;
    add_column(tx, "model_status", "shadow_version", "TEXT")?;
    add_column(tx, "drift", "shadow", "BLOB")?;
    Ok(())
}

/// Several servers on one database: rollouts saved with a revision (optimistic concurrency) and
/// leases (one server drives the rollouts at a time); when each drift window was stored, so the
/// rollout driver reads only what is new each tick.
fn v2(tx: &Connection) -> rusqlite::Result<()> {
    add_column(tx, "rollouts", "revision", "INTEGER NOT NULL DEFAULT 1")?;
    add_column(tx, "drift", "received_ms", "INTEGER")?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_ms INTEGER NOT NULL);
         CREATE INDEX IF NOT EXISTS drift_by_model_received ON drift (model, received_ms);",
    )
}

/// Retention (`retention.rs`): when each telemetry row was stored, and an index on that time for
/// drift windows and telemetry rows. Rows stored before this version count as stored when it
/// ran (their own times are devices' clocks), so upgrading deletes nothing at once.
fn v3(tx: &Connection) -> rusqlite::Result<()> {
    let now = crate::unix_ms() as i64;
    add_column(tx, "telemetry", "received_ms", &format!("INTEGER NOT NULL DEFAULT {now}"))?;
    tx.execute("UPDATE drift SET received_ms = ?1 WHERE received_ms IS NULL", params![now])?;
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS drift_by_received ON drift (received_ms);
         CREATE INDEX IF NOT EXISTS telemetry_by_received ON telemetry (received_ms);",
    )
}

/// A rollout's members as rows of their own (`rollout_rows.rs`): a save writes the members that
/// changed instead of the whole cohort in the rollout's JSON state. The stored members move out
/// of each state, and the wave order is dropped (it follows from the members).
fn v4(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS rollout_members (
             rollout TEXT NOT NULL, device TEXT NOT NULL, member TEXT NOT NULL,
             PRIMARY KEY (rollout, device)) WITHOUT ROWID;
         INSERT OR IGNORE INTO rollout_members (rollout, device, member)
             SELECT r.id, m.key, m.value FROM rollouts r, json_each(r.state, '$.members') m;
         UPDATE rollouts SET state = json_remove(state, '$.members', '$.order');",
    )
}

/// Applies every migration the database lacks, each in its own transaction; returns how many ran.
pub fn migrate(conn: &mut Connection) -> Result<usize, StoreError> {
    let mut applied = 0;
    for (version, migration) in MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER)",
        )?;
        let done = tx.prepare("SELECT 1 FROM schema_migrations WHERE version = ?1")?.exists(params![version])?;
        if done {
            continue;
        }
        migration(&tx)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ms) VALUES (?1, ?2)",
            params![version, crate::unix_ms() as i64],
        )?;
        tx.commit()?;
        applied += 1;
    }
    Ok(applied)
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
