//! `telemetry.db`'s SQL, used only by the writer thread. A row's id is its sequence number in the
//! device's `telemetry` stream, taken from `meta.next_seq`, so an id is never reused after rows
//! were uploaded and deleted; `meta.evicted` counts rows dropped under the disk budget.

use std::path::Path;

use proto::delivery::TelemetryRow;
use rusqlite::{params, Connection};

use super::writer::TelemetryRecord;
use crate::budget::ROW_OVERHEAD;

pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // The writer mostly appends: a small page cache is enough and keeps the agent's RSS low.
    conn.pragma_update(None, "cache_size", -512)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS telemetry (
            id INTEGER PRIMARY KEY,
            at_ms INTEGER NOT NULL,
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            latency_us INTEGER NOT NULL,
            features BLOB NOT NULL,
            outputs BLOB NOT NULL
        );
        CREATE TABLE IF NOT EXISTS meta (
            one INTEGER PRIMARY KEY CHECK (one = 1),
            next_seq INTEGER NOT NULL,
            evicted INTEGER NOT NULL DEFAULT 0
        );
        INSERT OR IGNORE INTO meta (one, next_seq) SELECT 1, COALESCE(MAX(id), 0) + 1 FROM telemetry;",
    )?;
    Ok(conn)
}

const ROW_BYTES_SQL: &str = "length(model) + length(version) + length(features) + length(outputs) + 48";

pub fn record_bytes(r: &TelemetryRecord) -> u64 {
    (r.model.len() + r.version.len() + 4 * (r.features.len() + r.outputs.len())) as u64 + ROW_OVERHEAD
}

/// (rows, logical bytes, evicted so far).
pub fn totals(conn: &Connection) -> rusqlite::Result<(u64, u64, u64)> {
    conn.query_row(
        &format!("SELECT COUNT(*), COALESCE(SUM({ROW_BYTES_SQL}), 0), (SELECT evicted FROM meta) FROM telemetry"),
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)),
    )
}

/// Little-endian f32s: compact and trivially decoded by any consumer.
pub fn encode_f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn decode_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Inserts a batch in one transaction with consecutive sequence numbers.
pub fn insert_batch(conn: &mut Connection, batch: &[TelemetryRecord]) -> rusqlite::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    {
        let first: i64 = tx.query_row(
            "UPDATE meta SET next_seq = next_seq + ?1 RETURNING next_seq - ?1",
            params![batch.len() as i64],
            |r| r.get(0),
        )?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO telemetry (id, at_ms, model, version, latency_us, features, outputs) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for (i, r) in batch.iter().enumerate() {
            insert.execute(params![
                first + i as i64,
                r.at_ms as i64,
                &*r.model,
                &*r.version,
                r.latency_us,
                encode_f32s(&r.features),
                encode_f32s(&r.outputs)
            ])?;
        }
    }
    tx.commit()
}

/// Rows read per statement while evicting: small enough that SQLite works in a few pages and
/// the heap stays flat (an `IN (SELECT ... LIMIT n)` over 100k rows built a 100k-entry temporary
/// table and left the agent's RSS 3 MiB higher for good).
const EVICT_CHUNK: i64 = 8192;

/// Deletes the oldest rows until `bytes` are freed, by rowid range, in chunks; counts them in
/// `meta.evicted`. Returns (rows, bytes) freed.
pub fn evict_oldest(conn: &mut Connection, bytes: u64) -> rusqlite::Result<(u64, u64)> {
    let (mut rows, mut freed) = (0u64, 0u64);
    while freed < bytes {
        let tx = conn.transaction()?;
        let mut last = None;
        let mut chunk_rows = 0u64;
        {
            let mut stmt =
                tx.prepare_cached(&format!("SELECT id, {ROW_BYTES_SQL} FROM telemetry ORDER BY id LIMIT ?1"))?;
            let mut cursor = stmt.query(params![EVICT_CHUNK])?;
            while freed < bytes {
                let Some(row) = cursor.next()? else { break };
                last = Some(row.get::<_, i64>(0)?);
                freed += row.get::<_, i64>(1)? as u64;
                chunk_rows += 1;
            }
        }
        let Some(last) = last else { break };
        tx.execute("DELETE FROM telemetry WHERE id <= ?1", params![last])?;
        tx.execute("UPDATE meta SET evicted = evicted + ?1", params![chunk_rows as i64])?;
        tx.commit()?;
        rows += chunk_rows;
    }
    Ok((rows, freed))
}

/// Makes every commit so far survive a power cut, before any of its rows leave the device.
/// Commits are not synced one by one (`synchronous = NORMAL`: a power cut may undo the last
/// ones), which is harmless while the rows stay here; but a row uploaded, acknowledged and
/// deleted whose insert a power cut then undid would roll `meta.next_seq` back, and the next
/// rows would reuse sequence numbers the server already stored once, so it would drop them as
/// duplicates. A checkpoint syncs the WAL first, then copies it into the database file and syncs
/// that: one or two syncs per upload batch instead of one per commit.
pub fn make_durable(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

/// The oldest rows, in sequence order: at most `limit` rows and about `max_bytes` of values.
pub fn oldest(conn: &Connection, limit: usize, max_bytes: usize) -> rusqlite::Result<Vec<TelemetryRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at_ms, model, version, latency_us, features, outputs FROM telemetry ORDER BY id LIMIT ?1",
    )?;
    let mut cursor = stmt.query(params![limit as i64])?;
    let (mut rows, mut bytes) = (Vec::new(), 0usize);
    while let Some(r) = cursor.next()? {
        let (features, outputs): (Vec<u8>, Vec<u8>) = (r.get(5)?, r.get(6)?);
        bytes += features.len() + outputs.len() + 64;
        if bytes > max_bytes && !rows.is_empty() {
            break;
        }
        rows.push(TelemetryRow {
            seq: r.get::<_, i64>(0)? as u64,
            at_ms: r.get::<_, i64>(1)? as u64,
            model: r.get(2)?,
            version: r.get(3)?,
            latency_us: r.get(4)?,
            features: decode_f32s(&features),
            outputs: decode_f32s(&outputs),
        });
    }
    Ok(rows)
}

/// Deletes rows the server acknowledged (every id up to `through`); returns (rows, bytes) freed.
pub fn delete_through(conn: &Connection, through: u64) -> rusqlite::Result<(u64, u64)> {
    conn.query_row(
        &format!("SELECT COUNT(*), COALESCE(SUM({ROW_BYTES_SQL}), 0) FROM telemetry WHERE id <= ?1"),
        params![through as i64],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .and_then(|freed| conn.execute("DELETE FROM telemetry WHERE id <= ?1", params![through as i64]).map(|_| freed))
}
