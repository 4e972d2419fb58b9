//! The outbox actor: one thread owns the outbox's connection to `agent.db`, so the MQTT session's
//! `select!` loop never runs SQLite on an async worker. Commands arrive on a bounded channel;
//! pushes and reads answer on a oneshot, deletes are fire-and-forget (a lost delete only means a
//! message is sent twice, which the server ignores).

use std::path::PathBuf;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::state::{StateDb, StateError};

#[derive(Debug, Error)]
pub enum OutboxError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the outbox thread has stopped")]
    Stopped,
}

/// One outbox row: id, topic, payload.
pub type OutboxRow = (i64, String, Vec<u8>);

enum Command {
    Push { topic: String, payload: Vec<u8>, max_rows: u64, reply: oneshot::Sender<Result<i64, StateError>> },
    Pending { limit: usize, reply: oneshot::Sender<Result<Vec<OutboxRow>, StateError>> },
    Delete { id: i64 },
}

/// Cheap to clone; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Command>,
}

impl Outbox {
    /// Opens the outbox (off the async workers) and starts its thread.
    pub async fn open(path: PathBuf) -> Result<Outbox, OutboxError> {
        let db =
            tokio::task::spawn_blocking(move || StateDb::open(&path)).await.map_err(|_| OutboxError::Stopped)??;
        let (tx, rx) = mpsc::channel(256);
        std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || serve(db, rx))
            .map_err(|_| OutboxError::Stopped)?;
        Ok(Outbox { tx })
    }

    /// Stores a durable message before it is published; returns its row id.
    pub async fn push(&self, topic: String, payload: Vec<u8>, max_rows: u64) -> Result<i64, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Push { topic, payload, max_rows, reply }).await.map_err(|_| OutboxError::Stopped)?;
        Ok(rx.await.map_err(|_| OutboxError::Stopped)??)
    }

    /// The oldest `limit` rows not yet acknowledged.
    pub async fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Pending { limit, reply }).await.map_err(|_| OutboxError::Stopped)?;
        Ok(rx.await.map_err(|_| OutboxError::Stopped)??)
    }

    /// Removes a row the broker acknowledged.
    pub async fn delete(&self, id: i64) -> Result<(), OutboxError> {
        self.tx.send(Command::Delete { id }).await.map_err(|_| OutboxError::Stopped)
    }
}

fn serve(db: StateDb, mut rx: mpsc::Receiver<Command>) {
    while let Some(command) = rx.blocking_recv() {
        match command {
            Command::Push { topic, payload, max_rows, reply } => {
                let _ = reply.send(db.outbox_push(&topic, &payload, max_rows));
            }
            Command::Pending { limit, reply } => {
                let _ = reply.send(db.outbox_pending(limit));
            }
            Command::Delete { id } => {
                if let Err(e) = db.outbox_delete(id) {
                    tracing::error!(error = %e, "outbox delete failed; the message may be sent twice");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pushed_rows_come_back_in_order_until_deleted_and_the_oldest_are_dropped_beyond_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("agent.db")).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..5u8 {
            ids.push(outbox.push(format!("t/{i}"), vec![i], 3).await.unwrap());
        }
        let pending = outbox.pending(10).await.unwrap();
        assert_eq!(pending.iter().map(|r| r.2.clone()).collect::<Vec<_>>(), vec![vec![2], vec![3], vec![4]]);
        outbox.delete(ids[2]).await.unwrap();
        let pending = outbox.pending(10).await.unwrap();
        assert_eq!(pending.iter().map(|r| r.0).collect::<Vec<_>>(), vec![ids[3], ids[4]]);
    }
}
