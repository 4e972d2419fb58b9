//! Retention's cost on the SQLite writer: one prune batch (`Store::prune`, 5,000 drift windows
//! by the `received_ms` index) against storing those 5,000 windows through the ingest path
//! (`record_reports`, 256 reports per transaction as the server's ingest batches them). Same
//! store, same windows, same run; the store holds a day of a 200-device fleet's windows.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use fleet_server::retention::PRUNE_BATCH;
use fleet_server::store::{Report, SequencedReport, Store, StoredDrift};

use crate::database::Database;

use crate::tick::{window, DEVICES, MINUTE_MS};
use proto::drift::SketchLayout;
use proto::wire::DriftSummary;

/// Minutes of windows in the store before measuring: a day.
const MINUTES: u64 = 24 * 60;
/// Ingest's batch size (`ingest.rs`).
const INGEST_BATCH: usize = 256;
const REPEATS: usize = 3;

pub struct RetentionFigures {
    pub store: &'static str,
    pub stored_windows: usize,
    /// Storing PRUNE_BATCH windows through ingest batches, best of REPEATS.
    pub store_ms: f64,
    /// Deleting PRUNE_BATCH windows in one prune batch, best of REPEATS.
    pub prune_ms: f64,
    pub db_mb: f64,
}

/// Stores every device's window of `minutes` through ingest-sized batches; returns the time taken.
fn ingest(store: &dyn Store, layout: &SketchLayout, minutes: std::ops::Range<u64>, seq: &mut u64) -> Result<f64> {
    let summaries: Vec<(String, DriftSummary)> = minutes
        .flat_map(|m| (0..DEVICES).map(move |d| (d, m)))
        .map(|(d, m)| (format!("d{d:04}"), window(layout, d, m)))
        .collect();
    let reports: Vec<SequencedReport<'_>> = summaries
        .iter()
        .map(|(device, summary)| {
            *seq += 1;
            let drift = StoredDrift { summary, score: 0.0, mean_confidence: None };
            SequencedReport { device, seq: *seq, floor: 0, report: Report::Drift(drift) }
        })
        .collect();
    let started = Instant::now();
    for batch in reports.chunks(INGEST_BATCH) {
        store.record_reports(batch)?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// Measures on SQLite in `dir`, or on PostgreSQL at `database_url` (a schema made and dropped
/// here). Blocks: call it off the async runtime.
pub fn run(dir: &Path, database_url: Option<&str>) -> Result<RetentionFigures> {
    let (mut database, store) = Database::open(dir, database_url, "retention")?;
    crate::tick::enroll_devices(store.as_ref(), DEVICES)?;
    let layout = crate::tick::profile().layout;

    let mut seq = 0;
    let minutes_per_batch = (PRUNE_BATCH / DEVICES) as u64;
    ingest(store.as_ref(), &layout, 0..MINUTES, &mut seq)?;
    // Each window arrives a second after it ends, by the server's clock.
    database.execute("UPDATE drift SET received_ms = window_end_ms + 1000")?;
    let stored_windows = database.count("SELECT COUNT(*) FROM drift")? as usize;
    let db_mb = database.size_mb()?;

    let (mut store_ms, mut prune_ms) = (f64::MAX, f64::MAX);
    for repeat in 0..REPEATS as u64 {
        // The oldest windows, a batch's worth, go; as many new ones come (stored at "now").
        let cutoff = (repeat + 1) * minutes_per_batch * MINUTE_MS + 1000 + 1;
        let started = Instant::now();
        let pruned = store.prune(cutoff, PRUNE_BATCH)?;
        prune_ms = prune_ms.min(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(pruned.drift_windows == PRUNE_BATCH, "pruned {} windows", pruned.drift_windows);
        let first = MINUTES + repeat * minutes_per_batch;
        store_ms = store_ms.min(ingest(store.as_ref(), &layout, first..first + minutes_per_batch, &mut seq)?);
    }
    let store_name = database.name();
    eprintln!("retention, {store_name}: {stored_windows} windows: store {store_ms:.1} ms, prune {prune_ms:.1} ms per {PRUNE_BATCH}");
    Ok(RetentionFigures { store: store_name, stored_windows, store_ms, prune_ms, db_mb })
}

pub fn section(figures: &[RetentionFigures]) -> String {
    let mut text = format!(
        "## Retention\n\n\
         `target/release/fleet-bench retention [--database-url postgres://…] --write docs/BENCHMARKS.md`\n\
         (release build): a store holding a day of drift windows from 200 devices (windows of 60 rows\n\
         over 8 numeric features), SQLite, and PostgreSQL when a URL is given (a schema of its own,\n\
         dropped after). One retention batch deletes the {PRUNE_BATCH} oldest windows (`Store::prune`,\n\
         by the `received_ms` index, one transaction); the baseline stores {PRUNE_BATCH} new windows\n\
         through the ingest path ({INGEST_BATCH}-report transactions, as the server batches them), on\n\
         the same store in the same run. Best of {REPEATS}. \"Writer time a day\" is what pruning a\n\
         day of 10,000 devices' windows (14,400,000: 2,880 batches) would take at that rate.\n\n\
         | store | windows stored (size, per window) | storing {PRUNE_BATCH} | one prune batch of {PRUNE_BATCH} | ratio | writer time a day at 10,000 devices |\n\
         | --- | --- | --- | --- | --- | --- |\n"
    );
    for f in figures {
        text.push_str(&format!(
            "| {} | {} ({:.0} MB, {:.0} bytes) | {:.1} ms | {:.1} ms | {:.2}x | {:.0} s |\n",
            f.store,
            f.stored_windows,
            f.db_mb,
            f.db_mb * 1e6 / f.stored_windows as f64,
            f.store_ms,
            f.prune_ms,
            f.prune_ms / f.store_ms,
            2880.0 * f.prune_ms / 1e3
        ));
    }
    text.push_str("\nSizes: the whole SQLite file; PostgreSQL\'s drift table with its indexes.\n\n");
    text
}
