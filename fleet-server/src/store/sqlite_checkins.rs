//! Group commit for check-ins. Every check-in writes (the device's last-seen time, the statuses
//! it carries, its freshness counter), and after a wave's notification thousands arrive within a
//! moment: written one transaction each, they queued on the one SQLite writer for up to half a
//! second (docs/BENCHMARKS.md, Load). Here a check-in joins the waiting list, then takes the
//! writer; whoever gets it first writes every waiting check-in in one transaction, each inside a
//! savepoint of its own so that one failing (an unknown device) fails only itself. The others
//! find their outcome written when their turn comes and return at once. The list holds at most
//! one entry per blocked caller, so it is bounded by the blocking pool's threads.

use std::sync::{Arc, Mutex, MutexGuard};

use proto::wire::{DesiredState, UpdateStatus};
use rusqlite::Connection;

use super::devices::{desired_in, freshness_counter_in, status_into, touch_in};
use super::{SqliteStore, StoreError};

type Outcome = Result<(DesiredState, Option<u64>), StoreError>;

/// Check-ins waiting for the writer.
#[derive(Default)]
pub(super) struct WaitingCheckIns(Mutex<Vec<Arc<CheckIn>>>);

impl WaitingCheckIns {
    pub(super) fn list(&self) -> MutexGuard<'_, Vec<Arc<CheckIn>>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub(super) struct CheckIn {
    device: String,
    now_ms: u64,
    statuses: Vec<UpdateStatus>,
    freshness: bool,
    outcome: Mutex<Option<Outcome>>,
}

impl CheckIn {
    fn take_outcome(&self) -> Option<Outcome> {
        self.outcome.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }

    fn set_outcome(&self, outcome: Outcome) {
        *self.outcome.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(outcome);
    }
}

impl SqliteStore {
    pub(super) fn grouped_check_in(
        &self,
        device: &str,
        now_ms: u64,
        statuses: &[UpdateStatus],
        freshness: bool,
    ) -> Outcome {
        let mine = Arc::new(CheckIn {
            device: device.to_string(),
            now_ms,
            statuses: statuses.to_vec(),
            freshness,
            outcome: Mutex::new(None),
        });
        self.checkins.list().push(mine.clone());
        let mut conn = self.conn();
        if let Some(written) = mine.take_outcome() {
            return written;
        }
        let group = std::mem::take(&mut *self.checkins.list());
        let outcomes = write_group(&mut conn, &group);
        // Every outcome is set before the writer is given up: a caller that takes it next and
        // finds none knows its check-in is still on the list.
        for (checkin, outcome) in group.iter().zip(outcomes) {
            checkin.set_outcome(outcome);
        }
        drop(conn);
        mine.take_outcome().unwrap_or_else(|| {
            Err(StoreError::Interrupted("this check-in was not in the group its caller wrote".into()))
        })
    }
}

/// Writes a group of check-ins in one transaction, one outcome per check-in in order.
fn write_group(conn: &mut Connection, group: &[Arc<CheckIn>]) -> Vec<Outcome> {
    let mut tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            return group.iter().map(|_| Err(StoreError::Database(format!("check-in not stored: {e}")))).collect()
        }
    };
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(group.len());
    for checkin in group {
        let outcome = tx.savepoint().map_err(StoreError::from).and_then(|mut savepoint| {
            let written = write_one(&savepoint, checkin);
            if written.is_ok() {
                savepoint.commit()?;
            } else {
                savepoint.rollback()?;
            }
            written
        });
        outcomes.push(outcome);
    }
    if let Err(e) = tx.commit() {
        let failed = |_| Err(StoreError::Database(format!("check-in not stored: {e}")));
        return outcomes.into_iter().map(failed).collect();
    }
    outcomes
}

fn write_one(conn: &Connection, c: &CheckIn) -> Outcome {
    touch_in(conn, &c.device, c.now_ms)?;
    for status in &c.statuses {
        status_into(conn, &c.device, status)?;
    }
    let desired = desired_in(conn, &c.device)?;
    let counter = if c.freshness { Some(freshness_counter_in(conn, &c.device)?) } else { None };
    Ok((desired, counter))
}
