//! What the rollout engine observes, as a pure function of the rows the store returns:
//! `observe(rows, references) -> Observations`. The store only reads; the rules live here (which
//! windows merge, when a device has enough samples to compare its input drift, how drift is
//! scored), so every store implementation gets the same observations.

use std::collections::BTreeMap;

use proto::drift::WindowSketch;
use proto::shadow::ShadowSummary;

use super::state::{Observations, VersionMetrics};
use crate::drift::ModelDrift;
use crate::store::{ObservationRows, StatusRow, WindowRow};

/// Samples a device needs before its input drift is compared. PSI is biased upwards by about
/// (bins - 1) / samples (34/500 < 0.07 here, the same for candidate and control), so below this
/// a device that just switched versions would look "drifted" next to one that ran all along.
pub const MIN_DRIFT_SAMPLES: u64 = 500;

/// Each device's drift windows merged per version, with the shadow comparisons they carried
/// merged under the candidate's version: what [`observe`] needs of the windows, kept between
/// ticks by [`WindowCache`] so a tick reads and merges only what arrived since the last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergedWindows {
    /// (device, version) -> merged sketch (None until a window of that version decodes).
    sketches: BTreeMap<(String, String), WindowSketch>,
    /// (device, candidate version) -> merged shadow comparison.
    shadows: BTreeMap<(String, String), ShadowSummary>,
}

impl MergedWindows {
    /// Every version a merged window was of.
    pub fn versions(&self) -> std::collections::BTreeSet<String> {
        self.sketches.keys().map(|(_, version)| version.clone()).collect()
    }

    /// Merges `windows` in: a window that does not decode is skipped, one whose layout differs
    /// from what its (device, version) merged so far is not comparable and skipped too.
    pub fn merge(&mut self, windows: &[WindowRow]) {
        for window in windows {
            let Ok(sketch) = proto::wire::decode::<WindowSketch>("stored drift window", &window.counts) else {
                continue;
            };
            match self.sketches.entry((window.device.clone(), window.version.clone())) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(sketch);
                }
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    let _ = e.get_mut().merge(&sketch);
                }
            }
            let shadow =
                window.shadow.as_deref().and_then(|b| proto::wire::decode::<ShadowSummary>("stored shadow", b).ok());
            if let Some(shadow) = shadow {
                match self.shadows.entry((window.device.clone(), shadow.version.clone())) {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(shadow);
                    }
                    std::collections::btree_map::Entry::Occupied(mut e) => {
                        e.get_mut().merge(&shadow);
                    }
                }
            }
        }
    }
}

/// Builds each device's observation: its status and counters, its drift windows merged per
/// version (a window that does not decode or whose layout differs is skipped), its latency p95
/// from those windows (time-aligned with the rollout, unlike the status row's, which counts
/// since the agent started), and its input drift against that version's reference once it has
/// [`MIN_DRIFT_SAMPLES`].
pub fn observe(rows: &ObservationRows, references: &BTreeMap<String, ModelDrift>) -> Observations {
    let mut merged = MergedWindows::default();
    merged.merge(&rows.windows);
    observe_merged(&rows.statuses, &merged, references)
}

/// [`observe`] from windows merged already.
pub fn observe_merged(
    statuses: &[StatusRow],
    merged: &MergedWindows,
    references: &BTreeMap<String, ModelDrift>,
) -> Observations {
    observe_owned(statuses, merged.clone(), references)
}

/// [`observe_merged`] that moves the merged windows into the observations instead of copying.
fn observe_owned(
    statuses: &[StatusRow],
    merged: MergedWindows,
    references: &BTreeMap<String, ModelDrift>,
) -> Observations {
    let mut observations = Observations::new();
    for row in statuses {
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
    for ((device, version), sketch) in merged.sketches {
        let metrics: &mut VersionMetrics = observations.entry(device).or_default().metrics.entry(version).or_default();
        metrics.sketch = sketch;
    }
    for ((device, candidate), shadow) in merged.shadows {
        let metrics = observations.entry(device).or_default().metrics.entry(candidate).or_default();
        metrics.shadow = Some(shadow);
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
                metrics.drift_share = Some(verdict.drift_share);
            }
        }
    }
    observations
}

/// The keys of the merged windows a tick's observations hold.
#[derive(Clone, Debug, Default)]
struct Lent {
    sketches: Vec<(String, String)>,
    shadows: Vec<(String, String)>,
}

/// How far back (in the server's time of storing) each read of new windows reaches behind the
/// newest window read before: a window stored that long before it committed, or by a server
/// whose clock is that far behind, would be missed. A store transaction takes milliseconds.
pub const REREAD_OVERLAP_MS: u64 = 120_000;

/// A rollout's windows merged so far, so that each tick reads only the windows stored since the
/// last (plus [`REREAD_OVERLAP_MS`]) and its cost does not grow with the rollout's age. Windows
/// read twice within the overlap are merged once (a window is identified by device, model and
/// start, as the store keeps it).
#[derive(Clone, Debug, Default)]
pub struct WindowCache {
    merged: MergedWindows,
    /// What [`WindowCache::lend`] moved into a tick's observations, to take back.
    lent: Lent,
    /// The newest `received_ms` read.
    newest_ms: u64,
    /// (device, window start) of every window merged that the next read may return again.
    recent: BTreeMap<(String, u64), u64>,
}

impl WindowCache {
    /// The `received_from_ms` of the next read: 0 (everything) the first time.
    pub fn read_from(&self) -> u64 {
        if self.newest_ms == 0 {
            0
        } else {
            self.newest_ms.saturating_sub(REREAD_OVERLAP_MS).max(1)
        }
    }

    /// Merges the windows of a read from [`WindowCache::read_from`] that it has not merged yet;
    /// returns how many were new.
    pub fn absorb(&mut self, windows: &[WindowRow]) -> usize {
        let new: Vec<WindowRow> =
            windows.iter().filter(|w| !self.recent.contains_key(&(w.device.clone(), w.start_ms))).cloned().collect();
        self.merged.merge(&new);
        for window in &new {
            self.recent.insert((window.device.clone(), window.start_ms), window.received_ms);
            self.newest_ms = self.newest_ms.max(window.received_ms);
        }
        let horizon = self.read_from();
        self.recent.retain(|_, received| *received >= horizon);
        new.len()
    }

    pub fn merged(&self) -> &MergedWindows {
        &self.merged
    }

    /// A tick's observations from `statuses` and the merged windows, which move into them
    /// instead of being copied (a rollout over 10,000 devices holds ~20,000 sketches); give them
    /// back with [`WindowCache::restore`] once the tick has decided.
    pub fn lend(&mut self, statuses: &[StatusRow], references: &BTreeMap<String, ModelDrift>) -> Observations {
        let merged = std::mem::take(&mut self.merged);
        self.lent = Lent {
            sketches: merged.sketches.keys().cloned().collect(),
            shadows: merged.shadows.keys().cloned().collect(),
        };
        observe_owned(statuses, merged, references)
    }

    /// Takes back the merged windows lent to `observations`.
    pub fn restore(&mut self, mut observations: Observations) {
        let lent = std::mem::take(&mut self.lent);
        for (device, version) in lent.sketches {
            let metrics = observations.get_mut(&device).and_then(|o| o.metrics.get_mut(&version));
            if let Some(metrics) = metrics {
                self.merged.sketches.insert((device, version), std::mem::take(&mut metrics.sketch));
            }
        }
        for (device, candidate) in lent.shadows {
            let metrics = observations.get_mut(&device).and_then(|o| o.metrics.get_mut(&candidate));
            if let Some(shadow) = metrics.and_then(|m| m.shadow.take()) {
                self.merged.shadows.insert((device, candidate), shadow);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::drift::{FeatureDecl, ReferenceProfile};
    use proto::wire::UpdateStep;

    use super::*;

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
            received_ms: 0,
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
        let enough = &observe(&enough, &references())["d1"].metrics["1.0.0"];
        let drift = enough.input_drift.unwrap();
        assert!(drift > 1.0, "all 500 samples in one bin of 35: PSI {drift}");
        assert_eq!(enough.drift_share, Some(1.0), "its one feature drifts by its test too");
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
        assert_eq!(observed["d1"].metrics["1.0.0"].drift_share, Some(0.0));
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

    /// `window` stored at `received_ms`, starting at `start_ms`.
    fn stored(device: &str, start_ms: u64, received_ms: u64, values: std::ops::Range<u32>) -> WindowRow {
        WindowRow { start_ms, received_ms, ..window(device, "1.0.0", values.map(|i| i as f32 / 1000.0)) }
    }

    #[test]
    fn a_cache_fed_read_after_read_merges_what_one_read_of_everything_merges() {
        let t = 10_000_000;
        let all = vec![
            stored("d1", 0, t, 0..300),
            stored("d2", 0, t + 10, 100..400),
            stored("d1", 60_000, t + 60_000, 300..700),
            // Stored late (an offline site syncing): an old window start, a new arrival.
            stored("d2", 1_000, t + 61_000, 0..50),
            stored("d1", 120_000, t + 120_000, 0..900),
        ];
        let mut cache = WindowCache::default();
        assert_eq!(cache.read_from(), 0, "the first read reads everything");
        assert_eq!(cache.absorb(&all[..2]), 2);
        assert_eq!(cache.read_from(), t + 10 - REREAD_OVERLAP_MS);
        // The next read returns the overlap again: merged once.
        assert_eq!(cache.absorb(&all[..4]), 2);
        assert_eq!(cache.absorb(&all[1..]), 1);
        let mut everything = MergedWindows::default();
        everything.merge(&all);
        assert_eq!(cache.merged(), &everything);
        let statuses = vec![status("d1", "1.0.0"), status("d2", "1.0.0")];
        let rows = ObservationRows { statuses: statuses.clone(), windows: all };
        assert_eq!(observe_merged(&statuses, cache.merged(), &references()), observe(&rows, &references()));
        // Lent to a tick and given back: the same observations, and the cache as it was.
        let lent = cache.lend(&statuses, &references());
        assert_eq!(lent, observe(&rows, &references()));
        cache.restore(lent);
        assert_eq!(cache.merged(), &everything);
    }

    #[test]
    fn a_cache_remembers_only_the_windows_a_read_can_return_again() {
        let t = 10_000_000;
        let mut cache = WindowCache::default();
        cache.absorb(&[stored("d1", 0, t, 0..10), stored("d1", 60_000, t + 60_000, 0..10)]);
        assert_eq!(cache.recent.len(), 2);
        // Far later: the reads no longer reach back to the first two.
        cache.absorb(&[stored("d1", 600_000, t + 10 * REREAD_OVERLAP_MS, 0..10)]);
        assert_eq!(cache.recent.len(), 1, "{:?}", cache.recent);
        assert_eq!(cache.merged().sketches[&("d1".to_string(), "1.0.0".to_string())].rows, 30);
    }
}
