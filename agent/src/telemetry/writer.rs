//! The telemetry writer: the one thread that owns `telemetry.db`. Records arrive on a bounded
//! channel (`TelemetrySink::offer` never blocks; a full queue counts a drop), are inserted in
//! batched transactions, and the oldest rows are evicted by the pure plan in `mod.rs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::{params, Connection};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryRecord {
    pub at_ms: u64,
    pub model: Arc<str>,
    pub version: Arc<str>,
    pub latency_us: u32,
    pub features: Vec<f32>,
    pub outputs: Vec<f32>,
}

#[derive(Debug, Error)]
pub enum WriterError {
    #[error("telemetry database {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("cannot start the telemetry writer thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub path: PathBuf,
    /// Records waiting for the writer; beyond this they are dropped and counted.
    pub queue: usize,
    /// Most records per transaction.
    pub batch: usize,
    /// Rows kept on disk; the oldest are evicted beyond this.
    pub max_rows: u64,
}

/// How long the writer waits for more records after a part-full batch.
const LINGER: std::time::Duration = std::time::Duration::from_millis(20);

enum Msg {
    Record(TelemetryRecord),
    Flush(oneshot::Sender<u64>),
}

/// Cheap to clone; hands records to the writer thread without waiting.
#[derive(Clone)]
pub struct TelemetrySink {
    tx: mpsc::Sender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl TelemetrySink {
    /// Never blocks: a full queue counts a drop and returns false.
    pub fn offer(&self, record: TelemetryRecord) -> bool {
        let sent = self.tx.try_send(Msg::Record(record)).is_ok();
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits for queue space instead of dropping: for replays and benchmarks, never the hot path.
    pub async fn send_waiting(&self, record: TelemetryRecord) -> bool {
        self.tx.send(Msg::Record(record)).await.is_ok()
    }

    /// Waits until every record offered before this call is committed; returns rows on disk.
    pub async fn flush(&self) -> Option<u64> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Flush(reply)).await.ok()?;
        rx.await.ok()
    }
}

fn open(path: &PathBuf) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // The writer only appends: a small page cache is enough and keeps the agent's RSS low.
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
        );",
    )?;
    Ok(conn)
}

/// Little-endian f32s: compact and trivially decoded by any consumer.
pub fn encode_f32s(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn decode_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Opens the database and starts the writer thread.
pub fn spawn_writer(config: WriterConfig) -> Result<TelemetrySink, WriterError> {
    let sqlite = |source| WriterError::Sqlite { path: config.path.clone(), source };
    let conn = open(&config.path).map_err(sqlite)?;
    let rows = conn.query_row("SELECT COUNT(*) FROM telemetry", [], |r| r.get::<_, i64>(0)).map_err(sqlite)? as u64;
    let (tx, rx) = mpsc::channel(config.queue);
    std::thread::Builder::new()
        .name("telemetry-writer".into())
        .spawn(move || {
            if let Err(e) = run_writer(conn, rx, &config, rows) {
                tracing::error!(error = %e, path = %config.path.display(), "telemetry writer stopped");
            }
        })
        .map_err(WriterError::Thread)?;
    Ok(TelemetrySink { tx, dropped: Arc::new(AtomicU64::new(0)) })
}

fn run_writer(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Msg>,
    config: &WriterConfig,
    mut rows: u64,
) -> rusqlite::Result<()> {
    let mut batch = Vec::with_capacity(config.batch);
    let mut flushes = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Record(record) => batch.push(record),
                Msg::Flush(reply) => flushes.push(reply),
            }
            next = if batch.len() < config.batch { rx.try_recv().ok() } else { None };
        }
        let inserted = batch.len();
        rows += insert_batch(&mut conn, &batch)?;
        batch.clear();
        if let Some(plan) = super::evict(rows, config.max_rows) {
            rows -= delete_oldest(&conn, plan.delete_oldest)?;
        }
        let flushed = !flushes.is_empty();
        for reply in flushes.drain(..) {
            let _ = reply.send(rows);
        }
        // A part-full batch means records trickle in: let some gather before the next commit, so
        // a busy device pays one wake-up and one WAL write per LINGER, not per request. The queue
        // holds far more than a LINGER's worth of records at any rate the engine reaches.
        if inserted < config.batch && !flushed {
            std::thread::sleep(LINGER);
        }
    }
    Ok(())
}

/// Rows deleted per statement while evicting: small enough that SQLite works in a few pages and
/// the heap stays flat (an `IN (SELECT ... LIMIT n)` over 100k rows built a 100k-entry temporary
/// table and left the agent's RSS 3 MiB higher for good).
const EVICT_CHUNK: u64 = 8192;

/// Deletes the `count` oldest rows by rowid range. Rowids only grow and eviction only removes
/// from the bottom, so the oldest rows are exactly those below `MIN(id) + n`.
fn delete_oldest(conn: &Connection, count: u64) -> rusqlite::Result<u64> {
    let mut deleted = 0;
    while deleted < count {
        let chunk = (count - deleted).min(EVICT_CHUNK);
        let n = conn
            .execute("DELETE FROM telemetry WHERE id < (SELECT MIN(id) FROM telemetry) + ?1", params![chunk as i64])?
            as u64;
        if n == 0 {
            break;
        }
        deleted += n;
    }
    Ok(deleted)
}

fn insert_batch(conn: &mut Connection, batch: &[TelemetryRecord]) -> rusqlite::Result<u64> {
    if batch.is_empty() {
        return Ok(0);
    }
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO telemetry (at_ms, model, version, latency_us, features, outputs) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for r in batch {
            insert.execute(params![
                r.at_ms as i64,
                &*r.model,
                &*r.version,
                r.latency_us,
                encode_f32s(&r.features),
                encode_f32s(&r.outputs)
            ])?;
        }
    }
    tx.commit()?;
    Ok(batch.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u32) -> TelemetryRecord {
        TelemetryRecord {
            at_ms: i as u64,
            model: "tabular".into(),
            version: "1.0.0".into(),
            latency_us: i,
            features: vec![i as f32, 0.5],
            outputs: vec![0.25, 0.75],
        }
    }

    fn config(dir: &tempfile::TempDir, queue: usize, max_rows: u64) -> WriterConfig {
        WriterConfig { path: dir.path().join("telemetry.db"), queue, batch: 64, max_rows }
    }

    #[tokio::test]
    async fn offered_records_land_in_sqlite_with_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let sink = spawn_writer(config(&dir, 1024, 10_000)).unwrap();
        for i in 0..300 {
            assert!(sink.offer(record(i)));
        }
        assert_eq!(sink.flush().await, Some(300));
        let conn = Connection::open(dir.path().join("telemetry.db")).unwrap();
        let (model, features): (String, Vec<u8>) = conn
            .query_row("SELECT model, features FROM telemetry WHERE latency_us = 7", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!((model.as_str(), decode_f32s(&features)), ("tabular", vec![7.0, 0.5]));
    }

    #[tokio::test]
    async fn the_buffer_evicts_the_oldest_rows_beyond_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let sink = spawn_writer(config(&dir, 4096, 100)).unwrap();
        for i in 0..1000 {
            sink.offer(record(i));
        }
        let rows = sink.flush().await.unwrap();
        assert!(rows <= 100, "{rows} rows kept");
        let conn = Connection::open(dir.path().join("telemetry.db")).unwrap();
        let oldest: u32 = conn.query_row("SELECT MIN(latency_us) FROM telemetry", [], |r| r.get(0)).unwrap();
        assert!(oldest >= 900, "oldest kept record is {oldest}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, _rx) = mpsc::channel(2);
        let sink = TelemetrySink { tx, dropped: Arc::new(AtomicU64::new(0)) };
        let accepted = (0..5).filter(|i| sink.offer(record(*i))).count();
        assert_eq!((accepted, sink.dropped()), (2, 3));
    }

    #[tokio::test]
    async fn rows_survive_a_restart_of_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let sink = spawn_writer(config(&dir, 64, 1000)).unwrap();
        sink.offer(record(1));
        sink.flush().await.unwrap();
        drop(sink);
        let again = spawn_writer(config(&dir, 64, 1000)).unwrap();
        again.offer(record(2));
        assert_eq!(again.flush().await, Some(2));
    }
}
