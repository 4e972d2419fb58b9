//! `fleetctl drift compare`: the whole drift path on two CSV files, without a fleet. The
//! reference profile is built as `bundle build` builds it, the current rows are sketched by the
//! agent's sketch code on K simulated devices, each device's summary goes through its postcard
//! encoding, the server merges them as it merges devices and runs its tests. What it prints is
//! what a fleet would conclude from the same rows.

use std::path::Path;

use fleet_server::drift::{evaluate, DriftVerdict, FeatureVerdict};
use proto::drift::{DriftPolicy, ReferenceProfile, WindowSketch};
use proto::wire::DriftSummary;
use serde::Serialize;
use thiserror::Error;

use crate::table::{Table, TableError};

#[derive(Debug, Error)]
pub enum CompareError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("--shards must be at least 1")]
    NoShards,
    #[error("{0} has no rows")]
    Empty(String),
    #[error("a simulated device's summary did not survive its encoding: {0}")]
    Wire(String),
    #[error(transparent)]
    Sketch(#[from] proto::drift::SketchError),
}

/// What `--json` prints.
#[derive(Serialize, Debug, Clone)]
pub struct Comparison {
    pub dataset_drift: bool,
    /// The largest postcard summary one simulated device sent.
    pub summary_bytes: usize,
    pub shards: usize,
    pub reference_rows: u64,
    pub current_rows: u64,
    pub drift_share: f64,
    pub features: Vec<FeatureVerdict>,
}

/// Compares `current` with `reference` as a fleet of `shards` devices would.
pub fn compare(
    reference_path: &Path,
    reference: &Table,
    current_path: &Path,
    current: &Table,
    shards: usize,
    policy: &DriftPolicy,
) -> Result<Comparison, CompareError> {
    if shards == 0 {
        return Err(CompareError::NoShards);
    }
    for (path, table) in [(reference_path, reference), (current_path, current)] {
        if table.rows() == 0 {
            return Err(CompareError::Empty(path.display().to_string()));
        }
    }
    let decls = reference.declarations();
    let reference_rows = reference.encode(reference_path, &decls, &current_path.display().to_string())?;
    let current_rows = current.encode(current_path, &decls, &reference_path.display().to_string())?;
    // No model: the profile has features only (no classes), as a bundle built without outputs.
    let profile = ReferenceProfile::build(&decls, &reference_rows, &[], 0);
    let (merged, summary_bytes) = fleet_of(&profile, &current_rows, shards)?;
    let verdict: DriftVerdict = evaluate(&profile, policy, &merged)?;
    Ok(Comparison {
        dataset_drift: verdict.dataset_drift,
        summary_bytes,
        shards,
        reference_rows: verdict.reference_rows,
        current_rows: verdict.rows,
        drift_share: verdict.drift_share,
        features: verdict.features,
    })
}

/// Each of `shards` devices sketches its contiguous share of the rows and sends its summary;
/// the server's side decodes and merges them. Returns the merge and the largest summary.
fn fleet_of(
    profile: &ReferenceProfile,
    rows: &[Vec<f32>],
    shards: usize,
) -> Result<(WindowSketch, usize), CompareError> {
    let per_device = rows.len().div_ceil(shards).max(1);
    let mut merged = WindowSketch::default();
    let mut largest = 0;
    for (device, share) in rows.chunks(per_device).enumerate() {
        let mut sketch = WindowSketch::empty(&profile.layout);
        for row in share {
            sketch.observe(&profile.layout, row, &[], 0);
        }
        let summary = DriftSummary {
            model: "compare".into(),
            version: "1.0.0".into(),
            window_start_ms: device as u64,
            window_end_ms: device as u64 + 1,
            sketch,
            shadow: None,
        };
        let bytes = proto::wire::encode(&summary);
        largest = largest.max(bytes.len());
        let received: DriftSummary =
            proto::wire::decode("drift summary", &bytes).map_err(|e| CompareError::Wire(e.to_string()))?;
        merged.merge(&received.sketch)?;
    }
    Ok((merged, largest))
}

/// The comparison as a table for a terminal.
pub fn render(c: &Comparison) -> String {
    let mut out = format!(
        "{} reference rows, {} current rows on {} simulated devices (largest summary {} bytes)\n",
        c.reference_rows, c.current_rows, c.shards, c.summary_bytes
    );
    out.push_str(&format!(
        "{:<24} {:<8} {:<15} {:>10} {:>10} {:>8} {:>9}\n",
        "feature", "drifted", "test", "score", "threshold", "psi", "missing"
    ));
    for f in &c.features {
        let drifted = match (f.drifted, f.missing_drifted) {
            (true, true) => "MISSING",
            (true, false) => "YES",
            _ => "no",
        };
        out.push_str(&format!(
            "{:<24} {:<8} {:<15} {:>10.4} {:>10.4} {:>8.3} {:>8.1}%\n",
            f.name,
            drifted,
            f.test.as_str(),
            f.score,
            f.threshold,
            f.psi,
            f.missing_rate * 100.0
        ));
    }
    let drifted = c.features.iter().filter(|f| f.drifted).count();
    out.push_str(&format!(
        "dataset drift: {} ({drifted} of {} features drifted)\n",
        if c.dataset_drift { "YES" } else { "no" },
        c.features.len()
    ));
    out
}
