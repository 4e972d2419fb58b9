//! The outbox actor: one thread owns the outbox's connection to `agent.db`, so the MQTT session's
//! `select!` loop never runs SQLite on an async worker. Commands arrive on a bounded channel.
//!
//! A record's row id is its sequence number in the device's `reports` stream, taken from the
//! `delivery` counter in the same transaction as the insert, so a number is never reused, even
//! after every row was deleted. A row is deleted only when the server acknowledges it as stored,
//! or evicted under the disk budget (heartbeats before reports, oldest first), and every eviction
//! is counted in `delivery`.

use std::path::PathBuf;

use proto::delivery::{DeliveryEvent, Evicted, Priority};
use rusqlite::{params, OptionalExtension, Transaction};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::budget::{SharedUsage, ROW_OVERHEAD};
use crate::state::{StateDb, StateError};

#[derive(Debug, Error)]
pub enum OutboxError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the outbox thread has stopped")]
    Stopped,
}

/// One record waiting for the server's acknowledgement; `body` is without the envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRow {
    pub seq: u64,
    pub topic: String,
    pub body: Vec<u8>,
}

/// The oldest waiting records and the floor to send with them.
#[derive(Debug, Default)]
pub struct PendingRows {
    pub floor: u64,
    pub rows: Vec<OutboxRow>,
    /// More records wait after these.
    pub more: bool,
}

/// Which waiting records to read: those after sequence `after`, oldest first, at most `rows` of
/// them and no more than `bytes` of bodies (but always one, if any waits).
#[derive(Clone, Copy, Debug)]
pub struct PendingQuery {
    pub after: u64,
    pub rows: usize,
    pub bytes: usize,
}

impl PendingQuery {
    /// The oldest `rows` records, whatever their size.
    pub fn oldest(rows: usize) -> PendingQuery {
        PendingQuery { after: 0, rows, bytes: usize::MAX }
    }
}

/// What the outbox has done since the device was enrolled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Sequence numbers handed out: the records ever written.
    pub written: u64,
    /// Records still waiting for an acknowledgement.
    pub pending: u64,
    /// Records evicted under the disk budget (the telemetry field is the writer's, not here).
    pub evicted: Evicted,
}

type Reply<T> = oneshot::Sender<Result<T, StateError>>;

enum Command {
    Push { topic: String, body: Vec<u8>, priority: Priority, reply: Reply<u64> },
    Pending { query: PendingQuery, reply: Reply<PendingRows> },
    Ack { seqs: Vec<u64> },
    Stats { reply: Reply<OutboxStats> },
    ReportEvicted { topic: String, telemetry_evicted: u64, reply: Reply<Option<u64>> },
}

/// Cheap to clone; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Command>,
}

impl Outbox {
    /// Opens the outbox (off the async workers) and starts its thread.
    pub async fn open(path: PathBuf, usage: SharedUsage) -> Result<Outbox, OutboxError> {
        let opened = tokio::task::spawn_blocking(move || {
            let db = StateDb::open(&path)?;
            let bytes = db.transaction(held_bytes)?;
            Ok::<_, StateError>((db, bytes))
        });
        let (db, bytes) = opened.await.map_err(|_| OutboxError::Stopped)??;
        usage.set_outbox(bytes.0, bytes.1);
        let (tx, rx) = mpsc::channel(256);
        let actor = Actor { db, usage, heartbeats: bytes.0, reports: bytes.1 };
        std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || actor.serve(rx))
            .map_err(|_| OutboxError::Stopped)?;
        Ok(Outbox { tx })
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(command(reply)).await.map_err(|_| OutboxError::Stopped)?;
        Ok(rx.await.map_err(|_| OutboxError::Stopped)??)
    }

    /// Stores a record before it is published; returns its sequence number.
    pub async fn push(&self, topic: String, body: Vec<u8>, priority: Priority) -> Result<u64, OutboxError> {
        self.ask(|reply| Command::Push { topic, body, priority, reply }).await
    }

    /// Records not yet acknowledged, as `query` selects them.
    pub async fn pending(&self, query: PendingQuery) -> Result<PendingRows, OutboxError> {
        self.ask(|reply| Command::Pending { query, reply }).await
    }

    /// Deletes records the server acknowledged as stored (fire-and-forget: a lost delete only
    /// means a record is sent again, which the server recognises).
    pub async fn ack(&self, seqs: Vec<u64>) -> Result<(), OutboxError> {
        self.tx.send(Command::Ack { seqs }).await.map_err(|_| OutboxError::Stopped)
    }

    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        self.ask(|reply| Command::Stats { reply }).await
    }

    /// Queues a [`DeliveryEvent::Evicted`] on `topic` with what was evicted since the last one
    /// (outbox counts plus the telemetry writer's `telemetry_evicted` total), and records it as
    /// reported in the same transaction; returns its sequence, or None when nothing is new.
    pub async fn report_evicted(&self, topic: String, telemetry_evicted: u64) -> Result<Option<u64>, OutboxError> {
        self.ask(|reply| Command::ReportEvicted { topic, telemetry_evicted, reply }).await
    }
}

struct Actor {
    db: StateDb,
    usage: SharedUsage,
    /// Logical bytes held, by priority.
    heartbeats: u64,
    reports: u64,
}

impl Actor {
    fn serve(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.blocking_recv() {
            match command {
                Command::Push { topic, body, priority, reply } => {
                    let _ = reply.send(self.push(&topic, &body, priority));
                    self.evict_over_budget();
                }
                Command::Pending { query, reply } => {
                    let _ = reply.send(self.db.transaction(|tx| pending(tx, query)));
                }
                Command::Ack { seqs } => match self.db.transaction_unsynced(|tx| delete(tx, &seqs)) {
                    Ok(freed) => self.release(freed),
                    Err(e) => tracing::error!(error = %e, "outbox delete failed; records may be sent again"),
                },
                Command::Stats { reply } => {
                    let _ = reply.send(self.db.transaction(stats));
                }
                Command::ReportEvicted { topic, telemetry_evicted, reply } => {
                    let reported = self.db.transaction(|tx| report_evicted(tx, &topic, telemetry_evicted));
                    if let Ok(Some((_, bytes))) = &reported {
                        self.reports += bytes;
                        self.publish_usage();
                    }
                    let _ = reply.send(reported.map(|r| r.map(|(seq, _)| seq)));
                }
            }
        }
    }

    fn push(&mut self, topic: &str, body: &[u8], priority: Priority) -> Result<u64, StateError> {
        let seq = self.db.transaction(|tx| insert(tx, topic, body, priority))?;
        let bytes = row_bytes(topic, body);
        match priority {
            Priority::Heartbeat => self.heartbeats += bytes,
            _ => self.reports += bytes,
        }
        self.publish_usage();
        Ok(seq)
    }

    fn release(&mut self, freed: (u64, u64)) {
        self.heartbeats = self.heartbeats.saturating_sub(freed.0);
        self.reports = self.reports.saturating_sub(freed.1);
        self.publish_usage();
    }

    fn publish_usage(&self) {
        self.usage.set_outbox(self.heartbeats, self.reports);
    }

    /// Frees this buffer's share of the budget plan: heartbeats, then reports, oldest first.
    fn evict_over_budget(&mut self) {
        let Some(plan) = self.usage.plan() else { return };
        for (priority, bytes) in [(Priority::Heartbeat, plan.heartbeats), (Priority::Report, plan.reports)] {
            if bytes == 0 {
                continue;
            }
            match self.db.transaction(|tx| evict(tx, priority, bytes)) {
                Ok((rows, freed)) => {
                    tracing::warn!(?priority, rows, freed, "outbox over the disk budget: oldest records evicted");
                    let freed = if priority == Priority::Heartbeat { (freed, 0) } else { (0, freed) };
                    self.release(freed);
                }
                Err(e) => tracing::error!(error = %e, "outbox eviction failed"),
            }
        }
    }
}

fn row_bytes(topic: &str, body: &[u8]) -> u64 {
    (topic.len() + body.len()) as u64 + ROW_OVERHEAD
}

const ROW_BYTES_SQL: &str = "length(topic) + length(payload) + 48";

/// (heartbeat bytes, report bytes) held at start.
fn held_bytes(tx: &Transaction<'_>) -> rusqlite::Result<(u64, u64)> {
    let sum = |heartbeat: bool| -> rusqlite::Result<u64> {
        let op = if heartbeat { "=" } else { "<>" };
        tx.query_row(
            &format!("SELECT COALESCE(SUM({ROW_BYTES_SQL}), 0) FROM outbox WHERE priority {op} ?1"),
            params![Priority::Heartbeat as i64],
            |r| r.get::<_, i64>(0),
        )
        .map(|v| v as u64)
    };
    Ok((sum(true)?, sum(false)?))
}

fn insert(tx: &Transaction<'_>, topic: &str, body: &[u8], priority: Priority) -> rusqlite::Result<u64> {
    let seq: i64 =
        tx.query_row("UPDATE delivery SET next_seq = next_seq + 1 RETURNING next_seq - 1", [], |r| r.get(0))?;
    tx.execute(
        "INSERT INTO outbox (id, topic, payload, priority) VALUES (?1, ?2, ?3, ?4)",
        params![seq, topic, body, priority as i64],
    )?;
    Ok(seq as u64)
}

fn pending(tx: &Transaction<'_>, query: PendingQuery) -> rusqlite::Result<PendingRows> {
    let mut stmt = tx.prepare_cached("SELECT id, topic, payload FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2")?;
    let mut found =
        stmt.query(params![query.after as i64, query.rows.saturating_add(1).min(i64::MAX as usize) as i64])?;
    let (mut rows, mut bytes, mut more) = (Vec::new(), 0usize, false);
    while let Some(r) = found.next()? {
        let row = OutboxRow { seq: r.get::<_, i64>(0)? as u64, topic: r.get(1)?, body: r.get(2)? };
        bytes = bytes.saturating_add(row.body.len());
        if rows.len() == query.rows || (!rows.is_empty() && bytes > query.bytes) {
            more = true;
            break;
        }
        rows.push(row);
    }
    drop(found);
    Ok(PendingRows { floor: floor(tx)?, rows, more })
}

/// The lowest sequence still held, or the next one when nothing is.
fn floor(tx: &Transaction<'_>) -> rusqlite::Result<u64> {
    tx.query_row("SELECT COALESCE((SELECT MIN(id) FROM outbox), (SELECT next_seq FROM delivery))", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v as u64)
}

/// Deletes acknowledged rows; returns the (heartbeat, report) bytes freed.
fn delete(tx: &Transaction<'_>, seqs: &[u64]) -> rusqlite::Result<(u64, u64)> {
    let mut stmt =
        tx.prepare_cached(&format!("DELETE FROM outbox WHERE id = ?1 RETURNING priority, {ROW_BYTES_SQL}"))?;
    let mut freed = (0, 0);
    for seq in seqs {
        let row: Option<(i64, i64)> =
            stmt.query_row(params![*seq as i64], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        match row {
            Some((p, bytes)) if p == Priority::Heartbeat as i64 => freed.0 += bytes as u64,
            Some((_, bytes)) => freed.1 += bytes as u64,
            None => {}
        }
    }
    Ok(freed)
}

/// Deletes the oldest rows of `priority` until `bytes` are freed; returns (rows, bytes freed).
fn evict(tx: &Transaction<'_>, priority: Priority, bytes: u64) -> rusqlite::Result<(u64, u64)> {
    let mut stmt = tx.prepare(&format!("SELECT id, {ROW_BYTES_SQL} FROM outbox WHERE priority = ?1 ORDER BY id"))?;
    let mut rows = stmt.query(params![priority as i64])?;
    let (mut count, mut freed, mut last) = (0u64, 0u64, None);
    while freed < bytes {
        let Some(row) = rows.next()? else { break };
        last = Some(row.get::<_, i64>(0)?);
        freed += row.get::<_, i64>(1)? as u64;
        count += 1;
    }
    drop(rows);
    if let Some(last) = last {
        tx.execute("DELETE FROM outbox WHERE priority = ?1 AND id <= ?2", params![priority as i64, last])?;
        let column = if priority == Priority::Heartbeat { "evicted_heartbeats" } else { "evicted_reports" };
        tx.execute(&format!("UPDATE delivery SET {column} = {column} + ?1"), params![count as i64])?;
    }
    Ok((count, freed))
}

fn stats(tx: &Transaction<'_>) -> rusqlite::Result<OutboxStats> {
    let (next, heartbeats, reports): (i64, i64, i64) =
        tx.query_row("SELECT next_seq, evicted_heartbeats, evicted_reports FROM delivery", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    let pending: i64 = tx.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
    Ok(OutboxStats {
        written: next as u64 - 1,
        pending: pending as u64,
        evicted: Evicted { telemetry: 0, heartbeats: heartbeats as u64, reports: reports as u64 },
    })
}

fn report_evicted(tx: &Transaction<'_>, topic: &str, telemetry_evicted: u64) -> rusqlite::Result<Option<(u64, u64)>> {
    let (total, reported) = tx.query_row(
        "SELECT evicted_heartbeats, evicted_reports, reported_telemetry, reported_heartbeats, reported_reports FROM delivery",
        [],
        |r| {
            let total =
                Evicted { telemetry: telemetry_evicted, heartbeats: r.get::<_, i64>(0)? as u64, reports: r.get::<_, i64>(1)? as u64 };
            let reported = Evicted {
                telemetry: r.get::<_, i64>(2)? as u64,
                heartbeats: r.get::<_, i64>(3)? as u64,
                reports: r.get::<_, i64>(4)? as u64,
            };
            Ok((total, reported))
        },
    )?;
    let new = total.since(&reported);
    if new.is_empty() {
        return Ok(None);
    }
    let body = proto::wire::encode(&DeliveryEvent::Evicted { at_ms: crate::unix_ms(), evicted: new });
    let seq = insert(tx, topic, &body, Priority::Report)?;
    tx.execute(
        "UPDATE delivery SET reported_telemetry = ?1, reported_heartbeats = ?2, reported_reports = ?3",
        params![total.telemetry as i64, total.heartbeats as i64, total.reports as i64],
    )?;
    Ok(Some((seq, row_bytes(topic, &body))))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open(dir: &tempfile::TempDir, budget: u64) -> (Outbox, SharedUsage) {
        let usage = SharedUsage::new(budget);
        (Outbox::open(dir.path().join("agent.db"), usage.clone()).await.unwrap(), usage)
    }

    #[tokio::test]
    async fn records_come_back_in_order_until_acknowledged_and_a_sequence_is_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = open(&dir, u64::MAX).await;
        let mut seqs = Vec::new();
        for i in 0..3u8 {
            seqs.push(outbox.push(format!("t/{i}"), vec![i], Priority::Report).await.unwrap());
        }
        assert_eq!(seqs, vec![1, 2, 3]);
        outbox.ack(vec![1, 3]).await.unwrap();
        let pending = outbox.pending(PendingQuery::oldest(10)).await.unwrap();
        assert_eq!((pending.floor, pending.rows.iter().map(|r| r.seq).collect::<Vec<_>>()), (2, vec![2]));
        outbox.ack(vec![2]).await.unwrap();
        assert_eq!(
            outbox.pending(PendingQuery::oldest(10)).await.unwrap().floor,
            4,
            "an empty outbox's floor is the next sequence"
        );
        drop(outbox);
        let (outbox, _) = open(&dir, u64::MAX).await;
        assert_eq!(outbox.push("t".into(), vec![9], Priority::Report).await.unwrap(), 4, "reopened, no reuse");
        assert_eq!(outbox.stats().await.unwrap(), OutboxStats { written: 4, pending: 1, evicted: Evicted::default() });
    }

    #[tokio::test]
    async fn a_window_reads_after_a_sequence_and_stops_at_its_row_or_byte_limit_but_never_returns_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, _) = open(&dir, u64::MAX).await;
        for _ in 0..6 {
            outbox.push("t".into(), vec![0; 100], Priority::Report).await.unwrap();
        }
        let seqs = |p: &PendingRows| p.rows.iter().map(|r| r.seq).collect::<Vec<_>>();
        let by_rows = outbox.pending(PendingQuery { after: 2, rows: 3, bytes: usize::MAX }).await.unwrap();
        assert_eq!((seqs(&by_rows), by_rows.more, by_rows.floor), (vec![3, 4, 5], true, 1));
        let by_bytes = outbox.pending(PendingQuery { after: 0, rows: 10, bytes: 250 }).await.unwrap();
        assert_eq!((seqs(&by_bytes), by_bytes.more), (vec![1, 2], true));
        let one_over = outbox.pending(PendingQuery { after: 0, rows: 10, bytes: 10 }).await.unwrap();
        assert_eq!(seqs(&one_over), vec![1], "a record larger than the byte limit still goes, alone");
        let rest = outbox.pending(PendingQuery { after: 4, rows: 2, bytes: usize::MAX }).await.unwrap();
        assert_eq!((seqs(&rest), rest.more), (vec![5, 6], false));
    }

    #[tokio::test]
    async fn over_the_budget_heartbeats_are_evicted_before_reports_and_every_eviction_is_counted_and_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        // Each row is 1 + 100 + 48 = 149 bytes: the budget holds 10 of them; the 11th row frees
        // down to 90% (two rows), the 12th fits again.
        let (outbox, usage) = open(&dir, 1490).await;
        for _ in 0..6 {
            outbox.push("r".into(), vec![0; 100], Priority::Report).await.unwrap();
        }
        for _ in 0..6 {
            outbox.push("h".into(), vec![0; 100], Priority::Heartbeat).await.unwrap();
        }
        let stats = outbox.stats().await.unwrap();
        assert_eq!(stats.evicted, Evicted { telemetry: 0, heartbeats: 2, reports: 0 }, "heartbeats go first");
        assert!(usage.snapshot().total() <= 1490);
        let kept: Vec<String> =
            outbox.pending(PendingQuery::oldest(20)).await.unwrap().rows.into_iter().map(|r| r.topic).collect();
        assert_eq!(kept.iter().filter(|t| *t == "r").count(), 6, "no report was evicted");

        let event = outbox.report_evicted("events".into(), 7).await.unwrap().expect("an eviction event");
        let rows = outbox.pending(PendingQuery::oldest(20)).await.unwrap().rows;
        let body = &rows.iter().find(|r| r.seq == event).unwrap().body;
        let DeliveryEvent::Evicted { evicted, .. } = proto::wire::decode("event", body).unwrap();
        assert_eq!(evicted, Evicted { telemetry: 7, heartbeats: 2, reports: 0 });
        assert_eq!(outbox.report_evicted("events".into(), 7).await.unwrap(), None, "nothing new, nothing sent");
    }
}
