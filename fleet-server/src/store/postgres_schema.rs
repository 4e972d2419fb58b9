//! Versioned migrations of the PostgreSQL store. `schema_migrations` records each applied
//! version; at open, every missing migration runs in a transaction of its own that holds an
//! advisory lock for the schema, so two servers starting at once apply each exactly once.
//! Migrations are append-only: a released one is never edited, a change is a new version.

use postgres::{Client, Transaction};

/// Advisory lock namespace of fleet-server (first key of the two-key lock); the second is the
/// schema's name hashed, so fleets in other schemas do not wait for each other.
const LOCK_NAMESPACE: i32 = 0x466c_7473; // "Flts"

/// (version, SQL), in order. Version 1 is the schema the SQLite store had when PostgreSQL came:
/// the same tables and columns, BIGINT for integers, BYTEA for blobs, identity columns where
/// SQLite has rowids. Keys that are sorted on are `COLLATE "C"`, so they sort bytewise as SQLite's.
pub const MIGRATIONS: &[(i64, &str)] = &[(1, V1), (2, V2), (3, V3), (4, V4), (5, V5)];

/// A rollout's members as rows of their own (`rollout_rows.rs`): a save writes the members that
/// changed instead of the whole cohort in the rollout's JSON state (1.6 MB at 10,000 members,
/// rewritten by every tick that moved one). The stored members move out of each state, and the
/// wave order is dropped (it follows from the members).
const V5: &str = r#"
CREATE TABLE rollout_members (
    rollout TEXT COLLATE "C" NOT NULL, device TEXT COLLATE "C" NOT NULL, member TEXT NOT NULL,
    PRIMARY KEY (rollout, device));
INSERT INTO rollout_members (rollout, device, member)
    SELECT r.id, m.key, m.value::TEXT FROM rollouts r, jsonb_each(r.state::jsonb -> 'members') m;
UPDATE rollouts SET state = (state::jsonb - 'members' - 'order')::TEXT;
"#;

/// A device's newest heartbeat (its health and when) in a table of its own, out of its `devices`
/// row: a check-in updates that row, and an ingest batch writing heartbeats into it held it
/// until the batch committed, so check-ins queued behind batches (docs/BENCHMARKS.md, "Device
/// rows out of ingest batches"). A heartbeat no longer moves `devices.last_seen_ms`: readers
/// take the later of the two.
const V4: &str = r#"
CREATE TABLE device_heartbeats (
    device TEXT COLLATE "C" PRIMARY KEY, health TEXT, heartbeat_ms BIGINT NOT NULL);
INSERT INTO device_heartbeats (device, health, heartbeat_ms)
    SELECT id, health, heartbeat_ms FROM devices WHERE heartbeat_ms IS NOT NULL;
ALTER TABLE devices DROP COLUMN health;
ALTER TABLE devices DROP COLUMN heartbeat_ms;
"#;

/// Retention (`retention.rs`): when each telemetry row was stored, and an index on that time for
/// drift windows and telemetry rows. Rows stored before this version count as stored when it
/// ran (their own times are devices' clocks), so upgrading deletes nothing at once. The column's
/// default is evaluated once, for the rows already there, and then dropped: every insert names it.
const V3: &str = r#"
ALTER TABLE telemetry ADD COLUMN received_ms BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::BIGINT;
ALTER TABLE telemetry ALTER COLUMN received_ms DROP DEFAULT;
UPDATE drift SET received_ms = (extract(epoch FROM now()) * 1000)::BIGINT WHERE received_ms IS NULL;
CREATE INDEX drift_by_received ON drift (received_ms);
CREATE INDEX telemetry_by_received ON telemetry (received_ms);
"#;

/// Several servers on one database: rollouts saved with a revision (optimistic concurrency) and
/// leases (one server drives the rollouts at a time); when each drift window was stored, so the
/// rollout driver reads only what is new each tick.
const V2: &str = r#"
ALTER TABLE rollouts ADD COLUMN revision BIGINT NOT NULL DEFAULT 1;
CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_ms BIGINT NOT NULL);
ALTER TABLE drift ADD COLUMN received_ms BIGINT;
CREATE INDEX drift_by_model_received ON drift (model, received_ms);
"#;

const V1: &str = r#"
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY, created_ms BIGINT NOT NULL, used_ms BIGINT, device TEXT, expires_ms BIGINT,
    revoked_ms BIGINT);
CREATE TABLE operators (
    name TEXT COLLATE "C" PRIMARY KEY, role TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL, revoked_ms BIGINT);
CREATE TABLE devices (
    id TEXT COLLATE "C" PRIMARY KEY, name TEXT COLLATE "C" NOT NULL, labels TEXT NOT NULL,
    credential_hash TEXT NOT NULL UNIQUE, enrolled_ms BIGINT NOT NULL,
    last_seen_ms BIGINT, health TEXT, revision BIGINT NOT NULL DEFAULT 0, heartbeat_ms BIGINT,
    public_key TEXT NOT NULL DEFAULT '', revoked_ms BIGINT, broker_hash TEXT NOT NULL DEFAULT '',
    freshness_counter BIGINT NOT NULL DEFAULT 0);
CREATE TABLE roots (
    version BIGINT PRIMARY KEY, document BYTEA NOT NULL, published_ms BIGINT NOT NULL);
CREATE TABLE bundles (
    name TEXT COLLATE "C" NOT NULL, version TEXT COLLATE "C" NOT NULL, sha256 TEXT NOT NULL, size BIGINT NOT NULL,
    created_at BIGINT NOT NULL, signed_by TEXT NOT NULL, manifest BYTEA NOT NULL,
    PRIMARY KEY (name, version));
CREATE TABLE desired (
    device TEXT COLLATE "C" NOT NULL, model TEXT COLLATE "C" NOT NULL, version TEXT NOT NULL,
    attempt BIGINT NOT NULL DEFAULT 0, shadow_version TEXT, shadow_rate DOUBLE PRECISION, activation_window TEXT,
    PRIMARY KEY (device, model));
CREATE TABLE rollouts (
    id TEXT COLLATE "C" PRIMARY KEY, model TEXT NOT NULL, phase TEXT NOT NULL, created_ms BIGINT NOT NULL,
    state TEXT NOT NULL);
CREATE TABLE audit (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, at_ms BIGINT NOT NULL, actor TEXT NOT NULL,
    rollout TEXT, action TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE model_status (
    device TEXT NOT NULL, model TEXT NOT NULL, version TEXT, step TEXT, detail TEXT NOT NULL DEFAULT '',
    active_version TEXT, at_ms BIGINT, inferences BIGINT NOT NULL DEFAULT 0,
    errors BIGINT NOT NULL DEFAULT 0, latency_p95_us BIGINT, shadow_version TEXT,
    PRIMARY KEY (device, model));
CREATE TABLE drift (
    device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    window_start_ms BIGINT NOT NULL, window_end_ms BIGINT NOT NULL, samples BIGINT NOT NULL,
    score DOUBLE PRECISION NOT NULL, mean_confidence DOUBLE PRECISION, counts BYTEA NOT NULL, shadow BYTEA,
    PRIMARY KEY (device, model, window_start_ms));
CREATE INDEX drift_by_model_time ON drift (model, window_start_ms);
CREATE TABLE received (
    device TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (device, seq));
CREATE TABLE delivery (
    device TEXT PRIMARY KEY, floor BIGINT NOT NULL DEFAULT 0,
    reports_stored BIGINT NOT NULL DEFAULT 0, reports_duplicates BIGINT NOT NULL DEFAULT 0,
    telemetry_stored BIGINT NOT NULL DEFAULT 0, telemetry_duplicates BIGINT NOT NULL DEFAULT 0,
    evicted_telemetry BIGINT NOT NULL DEFAULT 0, evicted_heartbeats BIGINT NOT NULL DEFAULT 0,
    evicted_reports BIGINT NOT NULL DEFAULT 0, rejected BIGINT NOT NULL DEFAULT 0);
CREATE TABLE telemetry (
    device TEXT COLLATE "C" NOT NULL, seq BIGINT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    at_ms BIGINT NOT NULL, latency_us BIGINT NOT NULL, features BYTEA NOT NULL, outputs BYTEA NOT NULL,
    PRIMARY KEY (device, seq));
CREATE INDEX telemetry_by_model ON telemetry (model, version, at_ms);
CREATE TABLE cohort_defaults (
    source TEXT PRIMARY KEY, model TEXT NOT NULL, selector TEXT NOT NULL, version TEXT NOT NULL,
    at_ms BIGINT NOT NULL);
CREATE TABLE status_history (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    device TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, step TEXT NOT NULL,
    detail TEXT NOT NULL, at_ms BIGINT NOT NULL);
CREATE INDEX status_history_by_device ON status_history (device, model, at_ms);
CREATE TABLE drift_watch (
    model TEXT NOT NULL, version TEXT NOT NULL, cohort TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (model, version, cohort));
CREATE TABLE retrain_events (
    id TEXT PRIMARY KEY, payload TEXT NOT NULL, created_ms BIGINT NOT NULL,
    delivered_ms BIGINT, attempts BIGINT NOT NULL DEFAULT 0, next_attempt_ms BIGINT NOT NULL,
    last_error TEXT NOT NULL DEFAULT '');
"#;

/// Takes the schema's migration lock for the rest of `tx`.
fn lock(tx: &mut Transaction<'_>, schema: Option<&str>) -> Result<(), postgres::Error> {
    match schema {
        Some(name) => tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&LOCK_NAMESPACE, &name])?,
        None => tx.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext(COALESCE(current_schema(), '')))",
            &[&LOCK_NAMESPACE],
        )?,
    };
    Ok(())
}

/// Creates `schema` if it is missing (the caller checked it is a plain name), under the same
/// lock as the migrations: two concurrent `CREATE SCHEMA IF NOT EXISTS` can otherwise collide.
pub fn create_schema(client: &mut Client, schema: &str) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    lock(&mut tx, Some(schema))?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))?;
    tx.commit()
}

/// Applies every migration the database lacks, each in its own transaction; returns how many ran.
pub fn migrate(client: &mut Client) -> Result<usize, postgres::Error> {
    let mut applied = 0;
    for (version, sql) in MIGRATIONS {
        let mut tx = client.transaction()?;
        lock(&mut tx, None)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT)",
        )?;
        if tx.query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[version])?.is_some() {
            continue;
        }
        tx.batch_execute(sql)?;
        tx.execute("INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)", &[version, &now_ms()])?;
        tx.commit()?;
        tracing::info!(version, "database migration applied");
        applied += 1;
    }
    Ok(applied)
}

fn now_ms() -> i64 {
    crate::unix_ms() as i64
}
