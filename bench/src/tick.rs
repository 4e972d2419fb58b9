//! The rollout tick's reading of drift windows as a rollout ages: every window since the rollout
//! began read, decoded and merged each tick (as before issue 14's running aggregates), against
//! the driver's `WindowCache` reading only what was stored since its last read. Same SQLite
//! store, same windows, same run.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use fleet_server::rollout::observe::{observe, observe_merged, WindowCache};
use fleet_server::store::{NewDevice, SqliteStore, Store, StoredDrift};
use proto::drift::{FeatureDecl, ReferenceProfile, SketchLayout, WindowSketch};
use proto::wire::DriftSummary;

pub(crate) const DEVICES: usize = 200;
const FEATURES: usize = 8;
const ROWS_PER_WINDOW: usize = 60;
pub(crate) const MINUTE_MS: u64 = 60_000;
/// Rollout ages measured, in hours.
const AGES_H: [u64; 3] = [1, 3, 9];
const REPEATS: usize = 3;

pub struct TickRow {
    pub age_h: u64,
    pub windows: usize,
    pub full_ms: f64,
    pub cached_ms: f64,
    pub cached_rows_read: usize,
}

/// The reference profile of the windows both benchmarks store: 8 numeric features.
pub(crate) fn profile() -> ReferenceProfile {
    let decls: Vec<FeatureDecl> = (0..FEATURES).map(|i| FeatureDecl::numeric(&format!("f{i}"))).collect();
    let rows: Vec<Vec<f32>> =
        (0..2000).map(|r| (0..FEATURES).map(|i| ((r * 7 + i * 13) % 1000) as f32 / 100.0).collect()).collect();
    let outputs: Vec<Vec<f32>> = rows.iter().map(|_| vec![0.7, 0.3]).collect();
    ReferenceProfile::build(&decls, &rows, &outputs, 2)
}

/// Device `device`'s drift window of minute `minute`: 60 rows over the features of `layout`.
pub(crate) fn window(layout: &SketchLayout, device: usize, minute: u64) -> DriftSummary {
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

/// Stores every device's window of minute `minute`, then dates their arrival one second after
/// the window ends, as if the rollout had been running in real time.
fn store_minute(store: &SqliteStore, db: &Path, profile: &ReferenceProfile, minute: u64) -> Result<()> {
    for d in 0..DEVICES {
        let summary = window(&profile.layout, d, minute);
        store
            .record_drift(&format!("d{d:04}"), &StoredDrift { summary: &summary, score: 0.0, mean_confidence: None })?;
    }
    let conn = rusqlite::Connection::open(db)?;
    conn.execute(
        "UPDATE drift SET received_ms = window_end_ms + 1000 WHERE window_start_ms = ?1",
        rusqlite::params![(minute * MINUTE_MS) as i64],
    )?;
    Ok(())
}

/// Enrolls `count` devices, d0000 on, in `store`.
pub(crate) fn enroll_devices(store: &dyn Store, count: usize) -> Result<()> {
    for d in 0..count {
        store.insert_device(&NewDevice {
            id: format!("d{d:04}"),
            name: format!("d{d:04}"),
            labels: Default::default(),
            credential_hash: format!("h{d}"),
            enrolled_ms: 1,
            public_key: String::new(),
            broker_hash: String::new(),
        })?;
    }
    Ok(())
}

pub fn run(dir: &Path) -> Result<Vec<TickRow>> {
    let db = dir.join("tick.db");
    let store = SqliteStore::open(&db)?;
    enroll_devices(&store, DEVICES)?;
    let profile = profile();
    let references = Default::default();
    let mut cache = WindowCache::default();
    let mut minute = 0;
    let mut rows = Vec::new();
    for age_h in AGES_H {
        let last = age_h * 60;
        while minute < last {
            store_minute(&store, &db, &profile, minute)?;
            minute += 1;
            // The cache follows along as the driver's would, a tick per minute.
            let read = store.observation_rows("tabular", 0, cache.read_from())?;
            cache.absorb(&read.windows);
        }
        let mut full = f64::MAX;
        let mut windows = 0;
        for _ in 0..REPEATS {
            let started = Instant::now();
            let read = store.observation_rows("tabular", 0, 0)?;
            let observed = observe(&read, &references);
            full = full.min(started.elapsed().as_secs_f64() * 1e3);
            windows = read.windows.len();
            std::hint::black_box(observed);
        }
        // One more minute arrives; a tick reads it. Each repeat starts from the same cache.
        store_minute(&store, &db, &profile, minute)?;
        minute += 1;
        let mut cached = f64::MAX;
        let mut cached_rows_read = 0;
        let before = cache.clone();
        for _ in 0..REPEATS {
            let mut tick_cache = before.clone();
            let started = Instant::now();
            let read = store.observation_rows("tabular", 0, tick_cache.read_from())?;
            tick_cache.absorb(&read.windows);
            let observed = observe_merged(&read.statuses, tick_cache.merged(), &references);
            cached = cached.min(started.elapsed().as_secs_f64() * 1e3);
            cached_rows_read = read.windows.len();
            std::hint::black_box(observed);
            cache = tick_cache;
        }
        eprintln!("tick: {age_h} h, {windows} windows: full {full:.1} ms, cached {cached:.1} ms");
        rows.push(TickRow { age_h, windows, full_ms: full, cached_ms: cached, cached_rows_read });
    }
    Ok(rows)
}

pub fn section(rows: &[TickRow]) -> String {
    let mut text = String::from(
        "## Rollout tick\n\n\
         `target/release/fleet-bench tick --write docs/BENCHMARKS.md` (release build): one running rollout's drift\n\
         windows as the rollout ages, SQLite, 200 devices sending a window of 60 rows over 8 numeric\n\
         features every minute. \"Every window\" reads, decodes and merges all windows since the rollout\n\
         began, as each tick did before the driver kept running aggregates; \"since the last read\" is the\n\
         driver's `WindowCache` after one more minute arrived (the windows stored since its last read and\n\
         the 2-minute overlap behind it), with the statuses and the observation built from the merged\n\
         windows. Best of 3, same run.\n\n\
         | rollout age | windows stored | every window | since the last read (rows read) | ratio |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        text.push_str(&format!(
            "| {} h | {} | {:.1} ms | {:.1} ms ({}) | {:.1}x |\n",
            r.age_h,
            r.windows,
            r.full_ms,
            r.cached_ms,
            r.cached_rows_read,
            r.full_ms / r.cached_ms
        ));
    }
    text.push('\n');
    text
}
