//! Drift sketches: fixed-edge histograms, one per input feature plus one over predicted classes.
//!
//! The edges come from the reference data when a bundle is built and travel in its manifest, so
//! the agent only ships counts: a window of an 8-feature, 3-class model is ~100 bytes of postcard.
//! Counts add up, so windows and devices merge by addition. The score is the population stability
//! index (PSI) against the reference; 0.1 is a common "watch" level and 0.25 "drifted".

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Bins per feature when building a reference (deciles).
pub const DEFAULT_BINS: usize = 10;
/// PSI at or above this marks a feature as drifted.
pub const DRIFT_THRESHOLD: f64 = 0.25;

/// Bin edges and reference counts, carried in the signed manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ReferenceSketch {
    /// Per feature: ascending inner edges; a feature with k edges has k+1 bins.
    pub edges: Vec<Vec<f32>>,
    pub counts: SketchCounts,
}

/// A mergeable window of observations.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SketchCounts {
    pub samples: u64,
    /// Per feature, per bin.
    pub features: Vec<Vec<u32>>,
    /// Per output class: how often it was the top class.
    pub classes: Vec<u32>,
    /// Sum of top-class probabilities, in millionths, for the mean confidence.
    pub confidence_micros: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SketchError {
    #[error("sketch layouts differ ({0}); sketches from different model contracts cannot be compared")]
    LayoutMismatch(&'static str),
}

impl SketchCounts {
    pub fn empty_for(reference: &ReferenceSketch, classes: usize) -> SketchCounts {
        SketchCounts {
            samples: 0,
            features: reference.edges.iter().map(|e| vec![0; e.len() + 1]).collect(),
            classes: vec![0; classes],
            confidence_micros: 0,
        }
    }

    /// Records one sample. Values beyond the feature count are ignored (image models keep no
    /// per-feature sketch); NaN lands in the last bin.
    pub fn observe(&mut self, edges: &[Vec<f32>], features: &[f32], outputs: &[f32]) {
        self.samples += 1;
        for ((bins, feature_edges), value) in self.features.iter_mut().zip(edges).zip(features) {
            let bin = feature_edges.partition_point(|edge| *edge <= *value);
            let bin = if value.is_nan() { bins.len() - 1 } else { bin };
            bins[bin] = bins[bin].saturating_add(1);
        }
        if let Some((class, confidence)) = top_class(outputs) {
            if let Some(count) = self.classes.get_mut(class) {
                *count = count.saturating_add(1);
            }
            self.confidence_micros += (confidence.clamp(0.0, 1.0) as f64 * 1e6) as u64;
        }
    }

    /// No window was ever recorded into these counts: they have no layout yet, so they merge
    /// with nothing and add nothing (a device that has reported its status but no window).
    pub fn is_unset(&self) -> bool {
        self.samples == 0 && self.features.is_empty() && self.classes.is_empty()
    }

    pub fn merge(&mut self, other: &SketchCounts) -> Result<(), SketchError> {
        if self.features.len() != other.features.len()
            || self.features.iter().zip(&other.features).any(|(a, b)| a.len() != b.len())
        {
            return Err(SketchError::LayoutMismatch("feature bins"));
        }
        if self.classes.len() != other.classes.len() {
            return Err(SketchError::LayoutMismatch("classes"));
        }
        self.samples += other.samples;
        for (mine, theirs) in self.features.iter_mut().zip(&other.features) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a = a.saturating_add(*b);
            }
        }
        for (a, b) in self.classes.iter_mut().zip(&other.classes) {
            *a = a.saturating_add(*b);
        }
        self.confidence_micros += other.confidence_micros;
        Ok(())
    }

    pub fn mean_confidence(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.confidence_micros as f64 / 1e6 / self.samples as f64)
    }
}

fn top_class(outputs: &[f32]) -> Option<(usize, f32)> {
    outputs.iter().copied().enumerate().filter(|(_, v)| !v.is_nan()).max_by(|a, b| a.1.total_cmp(&b.1))
}

/// Edges at the deciles (or `bins` quantiles) of each feature column.
pub fn build_reference(samples: &[Vec<f32>], outputs: &[Vec<f32>], bins: usize) -> ReferenceSketch {
    let width = samples.first().map_or(0, Vec::len);
    let edges: Vec<Vec<f32>> = (0..width)
        .map(|feature| {
            let mut column: Vec<f32> = samples.iter().map(|s| s[feature]).filter(|v| v.is_finite()).collect();
            column.sort_by(f32::total_cmp);
            let mut edges: Vec<f32> = (1..bins).filter_map(|q| column.get(q * column.len() / bins).copied()).collect();
            edges.dedup();
            edges
        })
        .collect();
    let classes = outputs.first().map_or(0, Vec::len);
    let mut reference = ReferenceSketch { edges, counts: SketchCounts::default() };
    let mut counts = SketchCounts::empty_for(&reference, classes);
    for (sample, output) in samples.iter().zip(outputs) {
        counts.observe(&reference.edges, sample, output);
    }
    reference.counts = counts;
    reference
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DriftReport {
    pub samples: u64,
    /// PSI per input feature.
    pub feature_psi: Vec<f64>,
    /// PSI of the predicted-class distribution.
    pub prediction_psi: f64,
    /// Largest of all PSI values: the headline score.
    pub score: f64,
    pub mean_confidence: Option<f64>,
    pub drifted: bool,
}

/// Compares a window (or a merge of windows) with the reference.
pub fn drift(reference: &ReferenceSketch, current: &SketchCounts) -> Result<DriftReport, SketchError> {
    let expected_layout = SketchCounts::empty_for(reference, reference.counts.classes.len());
    if current.features.len() != expected_layout.features.len()
        || current.features.iter().zip(&expected_layout.features).any(|(a, b)| a.len() != b.len())
    {
        return Err(SketchError::LayoutMismatch("feature bins"));
    }
    if current.classes.len() != reference.counts.classes.len() {
        return Err(SketchError::LayoutMismatch("classes"));
    }
    let feature_psi: Vec<f64> =
        reference.counts.features.iter().zip(&current.features).map(|(r, c)| psi(r, c)).collect();
    let prediction_psi = psi(&reference.counts.classes, &current.classes);
    let score = feature_psi.iter().copied().fold(prediction_psi, f64::max);
    Ok(DriftReport {
        samples: current.samples,
        feature_psi,
        prediction_psi,
        score,
        mean_confidence: current.mean_confidence(),
        drifted: current.samples > 0 && score >= DRIFT_THRESHOLD,
    })
}

/// Population stability index with add-half smoothing so empty bins stay finite.
pub fn psi(reference: &[u32], current: &[u32]) -> f64 {
    let total_r: f64 = reference.iter().map(|&c| c as f64).sum::<f64>() + 0.5 * reference.len() as f64;
    let total_c: f64 = current.iter().map(|&c| c as f64).sum::<f64>() + 0.5 * current.len() as f64;
    if current.iter().all(|&c| c == 0) {
        return 0.0;
    }
    reference
        .iter()
        .zip(current)
        .map(|(&r, &c)| {
            let p = (r as f64 + 0.5) / total_r;
            let q = (c as f64 + 0.5) / total_c;
            (q - p) * (q / p).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(n: usize, shift: f32) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let samples: Vec<Vec<f32>> =
            (0..n).map(|i| vec![(i % 100) as f32 / 10.0 + shift, ((i * 7) % 100) as f32]).collect();
        let outputs = samples.iter().map(|s| if s[0] < 5.0 { vec![0.9, 0.1] } else { vec![0.2, 0.8] }).collect();
        (samples, outputs)
    }

    fn window(reference: &ReferenceSketch, samples: &[Vec<f32>], outputs: &[Vec<f32>]) -> SketchCounts {
        let mut counts = SketchCounts::empty_for(reference, 2);
        for (s, o) in samples.iter().zip(outputs) {
            counts.observe(&reference.edges, s, o);
        }
        counts
    }

    #[test]
    fn same_distribution_scores_near_zero_and_a_shift_scores_as_drifted() {
        let (samples, outputs) = grid(1000, 0.0);
        let reference = build_reference(&samples, &outputs, DEFAULT_BINS);
        assert_eq!(reference.edges[0].len(), 9);
        let same = drift(&reference, &window(&reference, &samples, &outputs)).unwrap();
        assert!(same.score < 0.01, "{same:?}");
        assert!(!same.drifted);
        let (shifted, shifted_out) = grid(1000, 4.0);
        let moved = drift(&reference, &window(&reference, &shifted, &shifted_out)).unwrap();
        assert!(moved.drifted && moved.feature_psi[0] > 1.0 && moved.feature_psi[1] < 0.01, "{moved:?}");
    }

    #[test]
    fn merging_two_windows_equals_observing_both() {
        let (samples, outputs) = grid(400, 0.0);
        let reference = build_reference(&samples, &outputs, DEFAULT_BINS);
        let mut first = window(&reference, &samples[..150], &outputs[..150]);
        let second = window(&reference, &samples[150..], &outputs[150..]);
        first.merge(&second).unwrap();
        assert_eq!(first, window(&reference, &samples, &outputs));
        assert_eq!(first.samples, 400);
    }

    #[test]
    fn sketches_of_different_layouts_refuse_to_merge() {
        let mut a = SketchCounts { features: vec![vec![0; 3]], classes: vec![0; 2], ..Default::default() };
        let b = SketchCounts { features: vec![vec![0; 4]], classes: vec![0; 2], ..Default::default() };
        assert_eq!(a.merge(&b), Err(SketchError::LayoutMismatch("feature bins")));
    }

    #[test]
    fn an_empty_window_has_no_drift_and_no_confidence() {
        let (samples, outputs) = grid(100, 0.0);
        let reference = build_reference(&samples, &outputs, DEFAULT_BINS);
        let report = drift(&reference, &SketchCounts::empty_for(&reference, 2)).unwrap();
        assert_eq!((report.score, report.drifted, report.mean_confidence), (0.0, false, None));
    }

    #[test]
    fn a_window_of_an_eight_feature_model_encodes_small() {
        let samples: Vec<Vec<f32>> = (0..5000).map(|i| (0..8).map(|f| ((i * (f + 3)) % 97) as f32).collect()).collect();
        let outputs: Vec<Vec<f32>> =
            (0..5000).map(|i| vec![0.1, 0.2, 0.7].into_iter().cycle().skip(i % 3).take(3).collect()).collect();
        let reference = build_reference(&samples, &outputs, DEFAULT_BINS);
        let counts = window(&reference, &samples, &outputs);
        let bytes = postcard::to_allocvec(&counts).unwrap();
        assert!(bytes.len() < 256, "window encodes to {} bytes", bytes.len());
    }
}
