//! What the rollout engine observes, as a pure function of the rows the store returns:
//! `observe(rows, references) -> Observations`. The store only reads; the rules live here (which
//! windows merge, when a device has enough samples to compare its input drift, how drift is
//! scored), so every store implementation gets the same observations.

use std::collections::BTreeMap;

use proto::drift::WindowSketch;
use proto::shadow::ShadowSummary;

use super::state::{Observations, VersionMetrics};
use crate::drift::ModelDrift;
use crate::store::ObservationRows;

/// Samples a device needs before its input drift is compared. PSI is biased upwards by about
/// (bins - 1) / samples (34/500 < 0.07 here, the same for candidate and control), so below this
/// a device that just switched versions would look "drifted" next to one that ran all along.
pub const MIN_DRIFT_SAMPLES: u64 = 500;

/// Builds each device's observation: its status and counters, its drift windows merged per
/// version (a window that does not decode or whose layout differs is skipped), its latency p95
/// from those windows (time-aligned with the rollout, unlike the status row's, which counts
/// since the agent started), and its input drift against that version's reference once it has
/// [`MIN_DRIFT_SAMPLES`].
pub fn observe(rows: &ObservationRows, references: &BTreeMap<String, ModelDrift>) -> Observations {
    let mut observations = Observations::new();
    for row in &rows.statuses {
        let o = observations.entry(row.device.clone()).or_default();
        o.step = row.step;
        o.step_version = row.step_version.clone();
        o.detail = row.detail.clone();
        o.shadow_version = row.shadow_version.clone();
        if let Some(active) = &row.active_version {
            let m = o.metrics.entry(active.clone()).or_default();
            m.inferences = row.inferences;
            m.errors = row.errors;
            m.latency_p95_us = row.latency_p95_us.map(|v| v as f64);
        }
        o.active_version = row.active_version.clone();
    }
    for window in &rows.windows {
        let Ok(sketch) = proto::wire::decode::<WindowSketch>("stored drift window", &window.counts) else { continue };
        let metrics: &mut VersionMetrics =
            observations.entry(window.device.clone()).or_default().metrics.entry(window.version.clone()).or_default();
        // A layout mismatch means another contract: that window is not comparable.
        let _ = metrics.sketch.merge(&sketch);
        // The candidate's comparison goes with the candidate's version.
        let shadow =
            window.shadow.as_deref().and_then(|b| proto::wire::decode::<ShadowSummary>("stored shadow", b).ok());
        if let Some(shadow) = shadow {
            let o = observations.entry(window.device.clone()).or_default();
            let candidate = o.metrics.entry(shadow.version.clone()).or_default();
            match candidate.shadow.as_mut() {
                Some(merged) => {
                    merged.merge(&shadow);
                }
                None => candidate.shadow = Some(shadow),
            }
        }
    }
    for observation in observations.values_mut() {
        for (version, metrics) in observation.metrics.iter_mut() {
            if let Some(p95) = metrics.sketch.latency_quantile_us(0.95) {
                metrics.latency_p95_us = Some(p95);
            }
            if metrics.sketch.rows < MIN_DRIFT_SAMPLES {
                continue;
            }
            if let Some(verdict) = references.get(version).and_then(|r| r.evaluate(&metrics.sketch).ok()) {
                metrics.input_drift = verdict.features.iter().map(|f| f.psi).reduce(f64::max);
            }
        }
    }
    observations
}

#[cfg(test)]
mod tests {
    use proto::drift::{FeatureDecl, ReferenceProfile};
    use proto::wire::UpdateStep;

    use super::*;
    use crate::store::{StatusRow, WindowRow};

    /// A one-feature reference from values 0..1000 and a one-class model.
    fn reference() -> ReferenceProfile {
        let rows: Vec<Vec<f32>> = (0..1000).map(|i| vec![i as f32 / 1000.0]).collect();
        let outputs = vec![vec![1.0]; rows.len()];
        ReferenceProfile::build(&[FeatureDecl::numeric("x")], &rows, &outputs, 1)
    }

    /// A window of `values`, each inference taking 40 µs.
    fn window(device: &str, version: &str, values: impl Iterator<Item = f32>) -> WindowRow {
        let layout = reference().layout;
        let mut sketch = WindowSketch::empty(&layout);
        for v in values {
            sketch.observe(&layout, &[v], &[1.0], 40);
        }
        WindowRow {
            device: device.into(),
            version: version.into(),
            start_ms: 0,
            counts: proto::wire::encode(&sketch),
            shadow: None,
        }
    }

    fn status(device: &str, active: &str) -> StatusRow {
        StatusRow {
            device: device.into(),
            active_version: Some(active.into()),
            step: Some(UpdateStep::Active),
            step_version: Some(active.into()),
            detail: String::new(),
            inferences: 700,
            errors: 2,
            latency_p95_us: Some(64),
            shadow_version: None,
        }
    }

    fn references() -> BTreeMap<String, ModelDrift> {
        [("1.0.0".to_string(), ModelDrift { profile: reference(), policy: Default::default() })].into()
    }

    #[test]
    fn windows_of_one_version_merge_into_one_sketch_and_status_fills_the_counters() {
        let rows = ObservationRows {
            statuses: vec![status("d1", "1.0.0")],
            windows: vec![
                window("d1", "1.0.0", (0..300).map(|i| i as f32 / 300.0)),
                window("d1", "1.0.0", (0..400).map(|i| i as f32 / 400.0)),
            ],
        };
        let o = &observe(&rows, &references())["d1"];
        let m = &o.metrics["1.0.0"];
        // Latency from the windows (40 µs, a bucket floor of 40) rather than the status row's 64.
        assert_eq!((m.sketch.rows, m.inferences, m.errors, m.latency_p95_us), (700, 700, 2, Some(40.0)));
        assert_eq!((o.active_version.as_deref(), o.step), (Some("1.0.0"), Some(UpdateStep::Active)));
    }

    #[test]
    fn a_device_with_fewer_than_the_minimum_samples_has_no_input_drift_yet() {
        let few = ObservationRows { statuses: vec![], windows: vec![window("d1", "1.0.0", (0..499).map(|_| 0.05))] };
        assert_eq!(observe(&few, &references())["d1"].metrics["1.0.0"].input_drift, None);
        let enough = ObservationRows { statuses: vec![], windows: vec![window("d1", "1.0.0", (0..500).map(|_| 0.05))] };
        let drift = observe(&enough, &references())["d1"].metrics["1.0.0"].input_drift.unwrap();
        assert!(drift > 1.0, "all 500 samples in one bin of 35: PSI {drift}");
    }

    #[test]
    fn inputs_like_the_reference_score_little_drift_and_an_unknown_version_none() {
        let rows = ObservationRows {
            statuses: vec![],
            windows: vec![
                window("d1", "1.0.0", (0..1000).map(|i| i as f32 / 1000.0)),
                window("d2", "9.9.9", (0..1000).map(|i| i as f32 / 1000.0)),
            ],
        };
        let observed = observe(&rows, &references());
        assert!(observed["d1"].metrics["1.0.0"].input_drift.unwrap() < 0.05);
        assert_eq!(observed["d2"].metrics["9.9.9"].input_drift, None, "no reference for 9.9.9");
    }

    #[test]
    fn a_window_that_does_not_decode_is_skipped() {
        let mut broken = window("d1", "1.0.0", (0..10).map(|_| 0.5));
        broken.counts = vec![0xFF; 3];
        let rows =
            ObservationRows { statuses: vec![], windows: vec![broken, window("d1", "1.0.0", (0..20).map(|_| 0.5))] };
        assert_eq!(observe(&rows, &references())["d1"].metrics["1.0.0"].sketch.rows, 20);
    }
}
