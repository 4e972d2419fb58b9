//! Retention's cost on the SQLite writer: one prune batch (`Store::prune`, 5,000 drift windows
//! by the `received_ms` index) against storing those 5,000 windows through the ingest path
//! (`record_reports`, 256 reports per transaction as the server's ingest batches them). Same
//! store, same windows, same run; the store holds a day of a 200-device fleet's windows.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use fleet_server::retention::PRUNE_BATCH;
use fleet_server::store::{Report, SequencedReport, SqliteStore, Store, StoredDrift};

use crate::tick::DEVICES;
use proto::drift::{SketchLayout, WindowSketch};
use proto::wire::DriftSummary;

const FEATURES: usize = 8;
const ROWS_PER_WINDOW: usize = 60;
const MINUTE_MS: u64 = 60_000;
/// Minutes of windows in the store before measuring: a day.
const MINUTES: u64 = 24 * 60;
/// Ingest's batch size (`ingest.rs`).
const INGEST_BATCH: usize = 256;
const REPEATS: usize = 3;

pub struct RetentionFigures {
    pub stored_windows: usize,
    /// Storing PRUNE_BATCH windows through ingest batches, best of REPEATS.
    pub store_ms: f64,
    /// Deleting PRUNE_BATCH windows in one prune batch, best of REPEATS.
    pub prune_ms: f64,
    pub db_mb: f64,
}

fn window(layout: &SketchLayout, device: usize, minute: u64) -> DriftSummary {
    let mut sketch = WindowSketch::empty(layout);
    for r in 0..ROWS_PER_WINDOW {
        let row: Vec<f32> =
            (0..FEATURES).map(|i| ((r * 31 + device * 17 + i * 7 + minute as usize) % 1000) as f32 / 100.0).collect();
        sketch.observe(layout, &row, &[0.7, 0.3], 40 + (r % 50) as u32);
    }
    DriftSummary {
        model: "tabular".into(),
        version: "2.0.0".into(),
        window_start_ms: minute * MINUTE_MS,
        window_end_ms: (minute + 1) * MINUTE_MS,
        sketch,
        shadow: None,
    }
}

/// Stores every device's window of `minutes` through ingest-sized batches; returns the time taken.
fn ingest(store: &SqliteStore, layout: &SketchLayout, minutes: std::ops::Range<u64>, seq: &mut u64) -> Result<f64> {
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

pub fn run(dir: &Path) -> Result<RetentionFigures> {
    let db = dir.join("retention.db");
    let store = crate::tick::store_with_devices(&db)?;
    let layout = crate::tick::profile().layout;

    let mut seq = 0;
    let minutes_per_batch = (PRUNE_BATCH / DEVICES) as u64;
    ingest(&store, &layout, 0..MINUTES, &mut seq)?;
    // Each window arrives a second after it ends, by the server's clock.
    let conn = rusqlite::Connection::open(&db)?;
    conn.execute("UPDATE drift SET received_ms = window_end_ms + 1000", [])?;
    let stored_windows: usize = conn.query_row("SELECT COUNT(*) FROM drift", [], |r| r.get::<_, i64>(0))? as usize;
    let db_mb = std::fs::metadata(&db)?.len() as f64 / 1e6;

    let (mut store_ms, mut prune_ms) = (f64::MAX, f64::MAX);
    for repeat in 0..REPEATS as u64 {
        // The oldest windows, a batch's worth, go; as many new ones come (stored at "now").
        let cutoff = (repeat + 1) * minutes_per_batch * MINUTE_MS + 1000 + 1;
        let started = Instant::now();
        let pruned = store.prune(cutoff, PRUNE_BATCH)?;
        prune_ms = prune_ms.min(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(pruned.drift_windows == PRUNE_BATCH, "pruned {} windows", pruned.drift_windows);
        let first = MINUTES + repeat * minutes_per_batch;
        store_ms = store_ms.min(ingest(&store, &layout, first..first + minutes_per_batch, &mut seq)?);
    }
    eprintln!("retention: {stored_windows} windows: store {store_ms:.1} ms, prune {prune_ms:.1} ms per {PRUNE_BATCH}");
    Ok(RetentionFigures { stored_windows, store_ms, prune_ms, db_mb })
}

pub fn section(f: &RetentionFigures) -> String {
    format!(
        "## Retention\n\n\
         `target/release/fleet-bench retention --write docs/BENCHMARKS.md` (release build): a SQLite store\n\
         holding a day of drift windows from 200 devices ({} windows of 60 rows over 8 numeric features,\n\
         {:.0} MB). One retention batch deletes the {} oldest windows (`Store::prune`, by the\n\
         `received_ms` index, one transaction); the baseline stores {} new windows through the ingest\n\
         path ({}-report transactions, as the server batches them). Best of {}, same run.\n\n\
         | {} windows | time | ratio |\n\
         | --- | --- | --- |\n\
         | stored through ingest | {:.1} ms | 1.00x |\n\
         | deleted by one prune batch | {:.1} ms | {:.2}x |\n\n\
         A window takes {:.0} bytes of the database here, indexes included. At 10,000 devices with one\n\
         model, a day's windows (14,400,000) are 2,880 prune batches: about {:.0} s of the writer's time\n\
         a day, spread over the hourly passes.\n\n",
        f.stored_windows,
        f.db_mb,
        PRUNE_BATCH,
        PRUNE_BATCH,
        INGEST_BATCH,
        REPEATS,
        PRUNE_BATCH,
        f.store_ms,
        f.prune_ms,
        f.prune_ms / f.store_ms,
        f.db_mb * 1e6 / f.stored_windows as f64,
        2880.0 * f.prune_ms / 1e3
    )
}
