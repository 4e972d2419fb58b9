//! Retention: drift windows and uploaded telemetry rows are deleted once they have been stored
//! longer than `--retention-days` (31 by default: the longest look-back of the drift API). Age
//! is by the server's clock when each row arrived, so a device's wrong clock neither keeps its
//! rows forever nor loses them at once. One task, under a lease so that of several servers one
//! prunes, deleting in bounded batches (each its own short transaction) so that ingest keeps its
//! turn. Windows a running or paused rollout may still read are kept: the cut-off never passes
//! that rollout's creation, less a day for devices' clocks. Audit, lineage, statuses and
//! retraining events are kept whatever their age.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lease::Lease;
use crate::store::{Pruned, Store, StoreError};

/// The lease under which one server of several sharing a store prunes.
pub const LEASE: &str = "retention";
/// Rows of each table deleted per transaction.
pub const PRUNE_BATCH: usize = 5_000;
/// Batches per pass (at most 1,000,000 rows of each table); the rest waits for the next pass, so
/// a store that has just turned retention on is pruned over several.
const BATCHES_PER_PASS: usize = 200;
/// Devices' clocks may run ahead of the server's: windows stored up to this long before a
/// rollout was created are kept for it too.
pub const CLOCK_MARGIN_MS: u64 = 86_400_000;
/// 31 days: the longest look-back the drift API answers (`api::drift::MAX_LOOKBACK_MS`).
pub const DEFAULT_KEEP: Duration = Duration::from_millis(crate::api::drift::MAX_LOOKBACK_MS);

/// How long rows are kept, and how often the store is pruned.
#[derive(Clone, Debug, PartialEq)]
pub struct RetentionConfig {
    /// None keeps everything.
    pub keep: Option<Duration>,
    pub check_every: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { keep: Some(DEFAULT_KEEP), check_every: Duration::from_secs(3600) }
    }
}

/// Rows deleted by retention since the server started (`/metrics`); a clone shares them.
#[derive(Clone, Debug, Default)]
pub struct RetentionMetrics {
    pub drift_windows: Counter,
    pub telemetry_rows: Counter,
}

/// Rows stored before the returned time may be deleted: `keep` before `now_ms`, but never past
/// the creation of the earliest rollout still running or paused, less [`CLOCK_MARGIN_MS`].
pub fn cutoff_ms(now_ms: u64, keep: Duration, earliest_active_rollout_ms: Option<u64>) -> u64 {
    let by_age = now_ms.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
    match earliest_active_rollout_ms {
        Some(created_ms) => by_age.min(created_ms.saturating_sub(CLOCK_MARGIN_MS)),
        None => by_age,
    }
}

/// The cut-off for the store as it is now.
pub fn cutoff_now(store: &dyn Store, keep: Duration, now_ms: u64) -> Result<u64, StoreError> {
    let earliest = store.active_rollouts()?.iter().map(|r| r.created_ms).min();
    Ok(cutoff_ms(now_ms, keep, earliest))
}

/// One pass: deletes, batch by batch, what was stored before `cutoff_ms`, until a batch finds
/// less than a full batch of either, [`BATCHES_PER_PASS`] batches ran, or `cancel`.
pub async fn prune_pass(
    store: &Arc<dyn Store>,
    cutoff_ms: u64,
    cancel: &CancellationToken,
) -> Result<Pruned, StoreError> {
    let mut pruned = Pruned::default();
    for _ in 0..BATCHES_PER_PASS {
        if cancel.is_cancelled() {
            break;
        }
        let batch = crate::store::blocking(store, move |s| s.prune(cutoff_ms, PRUNE_BATCH)).await?;
        pruned.add(batch);
        if batch.drift_windows < PRUNE_BATCH && batch.telemetry_rows < PRUNE_BATCH {
            break;
        }
    }
    Ok(pruned)
}

pub fn spawn(
    store: Arc<dyn Store>,
    config: RetentionConfig,
    lease: Lease,
    metrics: RetentionMetrics,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) {
    if let Some(keep) = config.keep {
        tasks.spawn(run(store, keep, config.check_every, lease, metrics, cancel));
    }
}

async fn run(
    store: Arc<dyn Store>,
    keep: Duration,
    check_every: Duration,
    mut lease: Lease,
    metrics: RetentionMetrics,
    cancel: CancellationToken,
) {
    let mut turns = Lease::turns(check_every);
    while let Some(held) = lease.next_turn(&mut turns, &store, &cancel).await {
        if !held {
            continue;
        }
        let pass = async {
            let cutoff = crate::store::blocking(&store, move |s| cutoff_now(s, keep, crate::unix_ms())).await?;
            prune_pass(&store, cutoff, &cancel).await
        };
        match pass.await {
            Ok(pruned) => {
                metrics.drift_windows.inc_by(pruned.drift_windows as u64);
                metrics.telemetry_rows.inc_by(pruned.telemetry_rows as u64);
                if pruned != Pruned::default() {
                    tracing::info!(
                        drift_windows = pruned.drift_windows,
                        telemetry_rows = pruned.telemetry_rows,
                        "retention: deleted rows stored more than {} days ago",
                        keep.as_secs() / 86_400
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "retention: pruning old drift windows and telemetry failed"),
        }
    }
    lease.release(&store).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    #[test]
    fn the_cutoff_is_the_retention_before_now_unless_an_active_rollout_began_earlier() {
        let keep = Duration::from_millis(30 * DAY);
        assert_eq!(cutoff_ms(100 * DAY, keep, None), 70 * DAY);
        assert_eq!(cutoff_ms(100 * DAY, keep, Some(90 * DAY)), 70 * DAY, "a recent rollout changes nothing");
        assert_eq!(cutoff_ms(100 * DAY, keep, Some(50 * DAY)), 49 * DAY, "an old one keeps its windows");
        assert_eq!(cutoff_ms(10 * DAY, keep, None), 0, "nothing is old enough yet");
        assert_eq!(cutoff_ms(100 * DAY, Duration::MAX, None), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_task_deletes_what_is_past_retention_batch_by_batch_and_counts_it() {
        use crate::store::tests::{new_device, telemetry_row};
        use crate::store::{SqliteStore, TelemetryQuery};
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
        sqlite.insert_device(&new_device("d1", "hash-d1", 1)).unwrap();
        let rows: Vec<_> = (1..=PRUNE_BATCH as u64 + 2).map(|seq| telemetry_row(seq, "1.0.0")).collect();
        sqlite.record_telemetry("d1", &rows).unwrap();
        // All but the first were stored two days ago: more than one batch.
        let two_days_ago = crate::unix_ms() - 2 * DAY;
        sqlite.execute_batch(&format!("UPDATE telemetry SET received_ms = {two_days_ago} WHERE seq > 1")).unwrap();
        let store: Arc<dyn Store> = Arc::new(sqlite);

        let (cancel, tasks, metrics) = (CancellationToken::new(), TaskTracker::new(), RetentionMetrics::default());
        let config = RetentionConfig { keep: Some(Duration::from_millis(DAY)), check_every: Duration::from_millis(50) };
        let lease = Lease::new(LEASE, "server-1".into(), Duration::from_secs(10), Default::default());
        spawn(store.clone(), config, lease, metrics.clone(), cancel.clone(), &tasks);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while metrics.telemetry_rows.get() < PRUNE_BATCH as u64 + 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        assert_eq!(metrics.telemetry_rows.get(), PRUNE_BATCH as u64 + 1);
        let q = TelemetryQuery { model: "tabular".into(), limit: 10, ..Default::default() };
        let kept = store.telemetry(&q).unwrap();
        assert_eq!(kept.iter().map(|r| r.row.seq).collect::<Vec<_>>(), vec![1], "the row stored now is kept");
    }

    #[tokio::test]
    async fn retention_turned_off_starts_no_task() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
        let tasks = TaskTracker::new();
        let config = RetentionConfig { keep: None, ..Default::default() };
        let lease = Lease::new(LEASE, "server-1".into(), Duration::from_secs(10), Default::default());
        spawn(store, config, lease, RetentionMetrics::default(), CancellationToken::new(), &tasks);
        assert!(tasks.is_empty());
    }
}
