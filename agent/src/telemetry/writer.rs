//! The telemetry writer: the one thread that owns `telemetry.db`. Records arrive on a bounded
//! channel (`TelemetrySink::offer` never blocks; a full queue counts a drop), are inserted in
//! batched transactions, and the oldest rows are evicted when the shared disk budget says so
//! (`crate::budget`). The uploader reads the oldest rows and deletes what the server stored
//! through the same thread. A SQLite error (disk full) never stops the writer: the batch is
//! counted as dropped and the next one is tried after a pause, so it recovers when space returns.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proto::delivery::TelemetryRow;
use rusqlite::Connection;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use super::db;
use crate::budget::SharedUsage;

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
    #[error("the telemetry writer has stopped")]
    Stopped,
}

#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub path: PathBuf,
    /// Records waiting for the writer; beyond this they are dropped and counted.
    pub queue: usize,
    /// Most records per transaction.
    pub batch: usize,
    /// The disk budget shared with the outbox; telemetry is evicted first.
    pub usage: SharedUsage,
    /// Fraction of inferences kept, in (0, 1]: 0.25 keeps every fourth.
    pub sample_rate: f64,
}

impl WriterConfig {
    /// Defaults for a buffer at `path` with no budget to speak of (tests, benchmarks).
    pub fn unbounded(path: PathBuf) -> WriterConfig {
        WriterConfig { path, queue: 8192, batch: 512, usage: SharedUsage::new(u64::MAX >> 1), sample_rate: 1.0 }
    }
}

/// How long the writer waits for more records after a part-full batch.
const LINGER: Duration = Duration::from_millis(20);
/// Pause after a failed write before the next try (a full disk does not empty itself at once).
const RETRY_PAUSE: Duration = Duration::from_millis(500);

enum Msg {
    Record(TelemetryRecord),
    Flush(oneshot::Sender<u64>),
    Oldest {
        limit: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Result<Vec<TelemetryRow>, String>>,
    },
    Stored {
        through: u64,
    },
    #[cfg(test)]
    MaxPages(u64),
}

/// Counters shared between the sink's clones and the writer thread.
#[derive(Debug, Default)]
struct Counters {
    offered: AtomicU64,
    dropped: AtomicU64,
    evicted: AtomicU64,
}

/// Cheap to clone; hands records to the writer thread without waiting.
#[derive(Clone)]
pub struct TelemetrySink {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    sample_rate: f64,
}

impl TelemetrySink {
    /// Never blocks: a record outside the sample is skipped; a full queue counts a drop and
    /// returns false.
    pub fn offer(&self, record: TelemetryRecord) -> bool {
        let n = self.counters.offered.fetch_add(1, Ordering::Relaxed);
        // Keeps exactly `rate` of the records, evenly spread: record n is kept when the running
        // quota crosses an integer.
        if self.sample_rate < 1.0
            && ((n + 1) as f64 * self.sample_rate).floor() <= (n as f64 * self.sample_rate).floor()
        {
            return true;
        }
        let sent = self.tx.try_send(Msg::Record(record)).is_ok();
        if !sent {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Rows evicted under the disk budget since the buffer was created.
    pub fn evicted(&self) -> u64 {
        self.counters.evicted.load(Ordering::Relaxed)
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

    /// The oldest buffered rows, for upload.
    pub async fn oldest(&self, limit: usize, max_bytes: usize) -> Result<Vec<TelemetryRow>, WriterError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Msg::Oldest { limit, max_bytes, reply }).await.map_err(|_| WriterError::Stopped)?;
        rx.await.map_err(|_| WriterError::Stopped)?.map_err(|e| WriterError::Sqlite {
            path: PathBuf::from("telemetry.db"),
            source: rusqlite::Error::InvalidParameterName(e),
        })
    }

    /// The server stored every row up to `through`: delete them.
    pub async fn stored(&self, through: u64) -> Result<(), WriterError> {
        self.tx.send(Msg::Stored { through }).await.map_err(|_| WriterError::Stopped)
    }

    #[cfg(test)]
    async fn set_max_pages(&self, pages: u64) {
        let _ = self.tx.send(Msg::MaxPages(pages)).await;
    }
}

pub use db::{decode_f32s, encode_f32s};

/// Opens the database and starts the writer thread.
pub fn spawn_writer(config: WriterConfig) -> Result<TelemetrySink, WriterError> {
    let sqlite = |source| WriterError::Sqlite { path: config.path.clone(), source };
    let conn = db::open(&config.path).map_err(sqlite)?;
    let (rows, bytes, evicted) = db::totals(&conn).map_err(sqlite)?;
    config.usage.set_telemetry(bytes);
    let counters = Arc::new(Counters { evicted: AtomicU64::new(evicted), ..Counters::default() });
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let sample_rate = config.sample_rate.clamp(0.0, 1.0);
    let writer = Writer { conn, config, counters: counters.clone(), rows, bytes };
    std::thread::Builder::new()
        .name("telemetry-writer".into())
        .spawn(move || writer.run(rx))
        .map_err(WriterError::Thread)?;
    Ok(TelemetrySink { tx, counters, sample_rate })
}

struct Writer {
    conn: Connection,
    config: WriterConfig,
    counters: Arc<Counters>,
    rows: u64,
    /// Logical bytes held (see `crate::budget`).
    bytes: u64,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut batch = Vec::with_capacity(self.config.batch);
        let mut flushes = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(msg) = next {
                match msg {
                    Msg::Record(record) => batch.push(record),
                    Msg::Flush(reply) => flushes.push(reply),
                    Msg::Oldest { limit, max_bytes, reply } => {
                        let durable = db::make_durable(&self.conn);
                        let rows = durable.and_then(|()| db::oldest(&self.conn, limit, max_bytes));
                        let _ = reply.send(rows.map_err(|e| e.to_string()));
                    }
                    Msg::Stored { through } => self.delete_stored(through),
                    #[cfg(test)]
                    Msg::MaxPages(pages) => {
                        let _ = self.conn.pragma_update(None, "max_page_count", pages as i64);
                    }
                }
                next = if batch.len() < self.config.batch { rx.try_recv().ok() } else { None };
            }
            let inserted = batch.len();
            let written = self.write(&batch);
            batch.clear();
            let flushed = !flushes.is_empty();
            for reply in flushes.drain(..) {
                let _ = reply.send(self.rows);
            }
            if !written {
                std::thread::sleep(RETRY_PAUSE);
            } else if inserted < self.config.batch && !flushed {
                // A part-full batch means records trickle in: let some gather before the next
                // commit, so a busy device pays one wake-up and one WAL write per LINGER, not per
                // request. The queue holds far more than a LINGER's worth at any rate the engine reaches.
                std::thread::sleep(LINGER);
            }
        }
    }

    /// Inserts the batch and evicts over the budget; false (batch counted as dropped) on error.
    fn write(&mut self, batch: &[TelemetryRecord]) -> bool {
        if batch.is_empty() {
            return true;
        }
        if let Err(e) = db::insert_batch(&mut self.conn, batch) {
            self.counters.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::error!(error = %e, records = batch.len(), path = %self.config.path.display(),
                "telemetry batch not written (dropped and counted); retrying with the next batch");
            return false;
        }
        self.rows += batch.len() as u64;
        self.bytes += batch.iter().map(db::record_bytes).sum::<u64>();
        self.config.usage.set_telemetry(self.bytes);
        if let Some(plan) = self.config.usage.plan().filter(|p| p.telemetry > 0) {
            match db::evict_oldest(&mut self.conn, plan.telemetry) {
                Ok((rows, bytes)) => {
                    self.counters.evicted.fetch_add(rows, Ordering::Relaxed);
                    self.release(rows, bytes);
                }
                Err(e) => tracing::error!(error = %e, "telemetry eviction failed"),
            }
        }
        true
    }

    fn delete_stored(&mut self, through: u64) {
        match db::delete_through(&self.conn, through) {
            Ok((rows, bytes)) => self.release(rows, bytes),
            Err(e) => tracing::error!(error = %e, "uploaded telemetry not deleted; it will be sent again"),
        }
    }

    fn release(&mut self, rows: u64, bytes: u64) {
        self.rows = self.rows.saturating_sub(rows);
        self.bytes = self.bytes.saturating_sub(bytes);
        self.config.usage.set_telemetry(self.bytes);
    }
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

    fn config(dir: &tempfile::TempDir, queue: usize, budget: u64) -> WriterConfig {
        WriterConfig {
            queue,
            batch: 64,
            usage: SharedUsage::new(budget),
            ..WriterConfig::unbounded(dir.path().join("telemetry.db"))
        }
    }

    #[tokio::test]
    async fn offered_records_land_in_sqlite_with_their_values_and_come_back_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let sink = spawn_writer(config(&dir, 1024, u64::MAX >> 1)).unwrap();
        for i in 0..300 {
            assert!(sink.offer(record(i)));
        }
        assert_eq!(sink.flush().await, Some(300));
        let oldest = sink.oldest(10, 1 << 20).await.unwrap();
        assert_eq!(oldest.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
        assert_eq!((oldest[7].features.clone(), oldest[7].model.as_str()), (vec![7.0, 0.5], "tabular"));
        sink.stored(10).await.unwrap();
        assert_eq!(sink.flush().await, Some(290));
        assert_eq!(sink.oldest(1, 1 << 20).await.unwrap()[0].seq, 11);
    }

    #[tokio::test]
    async fn over_the_disk_budget_the_oldest_rows_are_evicted_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let per_row = db::record_bytes(&record(0));
        let sink = spawn_writer(config(&dir, 4096, 100 * per_row)).unwrap();
        for i in 0..1000 {
            sink.offer(record(i));
        }
        let rows = sink.flush().await.unwrap();
        assert!(rows <= 100, "{rows} rows kept");
        assert_eq!(sink.evicted(), 1000 - rows, "every eviction is counted");
        let oldest = sink.oldest(1, 1 << 20).await.unwrap()[0].latency_us;
        assert!(oldest >= 900, "oldest kept record is {oldest}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, _rx) = mpsc::channel(2);
        let sink = TelemetrySink { tx, counters: Arc::default(), sample_rate: 1.0 };
        let accepted = (0..5).filter(|i| sink.offer(record(*i))).count();
        assert_eq!((accepted, sink.dropped()), (2, 3));
    }

    #[tokio::test]
    async fn a_sample_rate_keeps_that_fraction_of_records() {
        let dir = tempfile::tempdir().unwrap();
        let sink = spawn_writer(WriterConfig { sample_rate: 0.25, ..config(&dir, 1024, u64::MAX >> 1) }).unwrap();
        for i in 0..400 {
            sink.offer(record(i));
        }
        assert_eq!(sink.flush().await, Some(100));
    }

    #[tokio::test]
    async fn sequences_and_rows_survive_a_restart_and_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let sink = spawn_writer(config(&dir, 64, u64::MAX >> 1)).unwrap();
        sink.offer(record(1));
        sink.flush().await.unwrap();
        sink.stored(1).await.unwrap();
        assert_eq!(sink.flush().await, Some(0));
        drop(sink);
        let again = spawn_writer(config(&dir, 64, u64::MAX >> 1)).unwrap();
        again.offer(record(2));
        assert_eq!(again.flush().await, Some(1));
        assert_eq!(again.oldest(5, 1 << 20).await.unwrap()[0].seq, 2, "sequence 1 is not handed out again");
    }

    #[tokio::test]
    async fn rows_handed_out_for_upload_are_in_the_database_file_not_only_in_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let sink = spawn_writer(config(&dir, 64, u64::MAX >> 1)).unwrap();
        for i in 0..10 {
            sink.offer(record(i));
        }
        sink.flush().await.unwrap();
        let handed_out = sink.oldest(10, 1 << 20).await.unwrap();
        assert_eq!(handed_out.len(), 10);
        // What a power cut leaves at worst with synchronous = NORMAL: the database file without
        // its unsynced log. A copy of the file alone must hold every row handed out.
        let copy = dir.path().join("after-a-power-cut.db");
        std::fs::copy(dir.path().join("telemetry.db"), &copy).unwrap();
        let conn = rusqlite::Connection::open(&copy).unwrap();
        let (rows, next): (i64, i64) = conn
            .query_row("SELECT (SELECT COUNT(*) FROM telemetry), next_seq FROM meta", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((rows, next), (10, 11), "rows and the next sequence number reached the file");
    }

    #[tokio::test]
    async fn a_full_disk_drops_and_counts_records_and_the_writer_recovers_when_space_returns() {
        let dir = tempfile::tempdir().unwrap();
        let sink = spawn_writer(config(&dir, 4096, u64::MAX >> 1)).unwrap();
        sink.offer(record(0));
        sink.flush().await.unwrap();
        // SQLite's own "database or disk is full": the file may not grow past its current pages.
        sink.set_max_pages(1).await;
        // Each record needs ~20 pages, more than any free space left in the capped file, so none
        // fits even when the writer takes the first one alone as its own batch (with 4 KB records
        // that first batch sometimes fit and the test saw 199 drops).
        let big = |i| TelemetryRecord { features: vec![1.0; 20_000], ..record(i) };
        for i in 1..=200 {
            sink.offer(big(i));
        }
        sink.flush().await.unwrap();
        assert!(sink.dropped() >= 200, "records that could not be written are counted: {}", sink.dropped());
        sink.set_max_pages(1 << 30).await;
        sink.offer(record(201));
        assert_eq!(sink.flush().await, Some(2), "the writer is still there and writes again");
    }
}
