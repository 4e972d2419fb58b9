//! The window sketch a device keeps per model and sends when a window closes: per feature a
//! histogram on the layout's edges (numeric) or exact category counts, missing counts, exact
//! fixed-point sums; per window the outputs (classes, top score, margin, Σ top score) and a
//! log-bucket latency histogram. Merging adds integers only, so it is exact, associative and
//! commutative: the merge of K devices' windows is the sketch of all their rows.

use serde::{Deserialize, Serialize};

use super::layout::{category_code, FeatureLayout, SketchLayout};
use super::{SketchError, LATENCY_BUCKETS, SCORE_BINS};

/// Values enter the sums as multiples of 2^-24, clamped to ±2^31, so sums are integers: exact
/// whatever the order of merging. Finer than an f32 near 1; the min and max keep full values.
const FIXED_SCALE: f64 = (1u64 << 24) as f64;
const SUM_CLAMP: f64 = (1u64 << 31) as f64;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct WindowSketch {
    /// Rows observed (every feature of a row counts once in its feature's sketch).
    pub rows: u64,
    pub features: Vec<FeatureSketch>,
    pub outputs: OutputSketch,
    /// Inference latency in [`LATENCY_BUCKETS`] log-linear buckets: bucket 0 is < 1 µs; bucket
    /// b ≥ 1 is the quarter q = (b-1) % 4 of the octave o = (b-1) / 4, i.e. [2^o (1 + q/4),
    /// 2^o (1 + (q+1)/4)) µs; the last bucket also takes everything slower.
    pub latency: Vec<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum FeatureSketch {
    Numeric(NumericSketch),
    Categorical(CategoricalSketch),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NumericSketch {
    /// Underflow, one bin per edge, overflow (see [`FeatureLayout::Numeric`]).
    pub bins: Vec<u64>,
    pub missing: u64,
    /// Σ v, Σ v² over present values, and Σ v over the underflow and overflow bins, in units of
    /// 2^-24.
    pub sum: i128,
    pub sum_sq: i128,
    pub under_sum: i128,
    pub over_sum: i128,
    /// +inf / -inf while no value was seen.
    pub min: f32,
    pub max: f32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CategoricalSketch {
    /// One count per tracked code, then "other" (any other code, including ones the
    /// reference never had).
    pub counts: Vec<u64>,
    pub missing: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct OutputSketch {
    /// How often each output was the top one.
    pub classes: Vec<u64>,
    /// Histograms on [0, 1] in [`SCORE_BINS`] equal bins: the top output, and the top minus
    /// the runner-up (the margin).
    pub top_score: Vec<u64>,
    pub margin: Vec<u64>,
    /// Σ top output in millionths: mean confidence, and the estimated accuracy of a calibrated
    /// classifier.
    pub top_score_micros: u64,
}

fn fixed(v: f64) -> i128 {
    (v.clamp(-SUM_CLAMP, SUM_CLAMP) * FIXED_SCALE).round() as i128
}

/// Back from fixed point.
pub fn from_fixed(v: i128) -> f64 {
    v as f64 / FIXED_SCALE
}

impl NumericSketch {
    fn empty(bins: usize) -> NumericSketch {
        NumericSketch {
            bins: vec![0; bins],
            missing: 0,
            sum: 0,
            sum_sq: 0,
            under_sum: 0,
            over_sum: 0,
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }

    fn observe(&mut self, edges: &[f32], value: f32) {
        if value.is_nan() {
            self.missing += 1;
            return;
        }
        let last = edges.len() - 1;
        let v = value as f64;
        let bin = if value < edges[0] {
            self.under_sum += fixed(v);
            0
        } else if value > edges[last] {
            self.over_sum += fixed(v);
            edges.len() + 1
        } else {
            // The last edge at or below the value: bin i + 1 starts at edges[i].
            edges.partition_point(|e| *e <= value)
        };
        self.bins[bin] += 1;
        self.sum += fixed(v);
        self.sum_sq += fixed(v * v);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    fn merge(&mut self, other: &NumericSketch) {
        add_counts(&mut self.bins, &other.bins);
        // Saturating: windows come from devices, and a hostile one must not wrap or panic.
        self.missing = self.missing.saturating_add(other.missing);
        self.sum = self.sum.saturating_add(other.sum);
        self.sum_sq = self.sum_sq.saturating_add(other.sum_sq);
        self.under_sum = self.under_sum.saturating_add(other.under_sum);
        self.over_sum = self.over_sum.saturating_add(other.over_sum);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Present values.
    pub fn count(&self) -> u64 {
        total(&self.bins)
    }

    pub fn mean(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| from_fixed(self.sum) / n as f64)
    }

    /// Population standard deviation (as numpy's `std`).
    pub fn std(&self) -> Option<f64> {
        let n = self.count() as f64;
        let mean = self.mean()?;
        Some((from_fixed(self.sum_sq) / n - mean * mean).max(0.0).sqrt())
    }
}

impl CategoricalSketch {
    fn observe(&mut self, categories: usize, tracked: &[u32], value: f32) {
        if value.is_nan() {
            self.missing += 1;
            return;
        }
        let other = self.counts.len() - 1;
        let slot = category_code(value, categories).and_then(|code| tracked.binary_search(&code).ok()).unwrap_or(other);
        self.counts[slot] += 1;
    }
}

/// Missing values of a feature sketch.
pub fn missing(sketch: &FeatureSketch) -> u64 {
    match sketch {
        FeatureSketch::Numeric(s) => s.missing,
        FeatureSketch::Categorical(s) => s.missing,
    }
}

/// Present values of a feature sketch.
pub fn present(sketch: &FeatureSketch) -> u64 {
    match sketch {
        FeatureSketch::Numeric(s) => s.count(),
        FeatureSketch::Categorical(s) => total(&s.counts),
    }
}

fn add_counts(mine: &mut [u64], theirs: &[u64]) {
    for (a, b) in mine.iter_mut().zip(theirs) {
        *a = a.saturating_add(*b);
    }
}

/// The latency at quantile `q` (0..1) of counts in [`latency_bucket`]'s buckets, as the lower
/// bound of its bucket; None when there are none.
pub fn latency_quantile_us(buckets: &[u64], q: f64) -> Option<f64> {
    let all = total(buckets);
    if all == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * all as f64).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    buckets
        .iter()
        .position(|&c| {
            seen = seen.saturating_add(c);
            seen >= rank
        })
        .map(latency_bucket_floor_us)
}

/// The counts added up, saturating (a hostile window's counts must not overflow).
pub fn total(counts: &[u64]) -> u64 {
    counts.iter().fold(0u64, |sum, c| sum.saturating_add(*c))
}

/// Rows a window (one device's, or a fleet's merged over a bucket) may hold at most: far above
/// any real one (a 10,000-device fleet at 1,000 requests/s fills it in 14 years), far below
/// where sums of its counts could overflow.
pub const MAX_WINDOW_ROWS: u64 = 1 << 52;

fn score_bin(score: f32) -> usize {
    ((score.clamp(0.0, 1.0) * SCORE_BINS as f32) as usize).min(SCORE_BINS - 1)
}

/// The latency bucket of a duration in microseconds (see [`WindowSketch::latency`]).
pub fn latency_bucket(us: u32) -> usize {
    if us == 0 {
        return 0;
    }
    // floor(4 log2(us)) from the bit length and the next two bits below the top one: exact at
    // powers of two, within a quarter octave elsewhere, and no floating point on the hot path.
    let log2 = 31 - us.leading_zeros();
    let fraction = if log2 >= 2 { (us >> (log2 - 2)) & 0b11 } else { (us << (2 - log2)) & 0b11 };
    ((1 + 4 * log2 + fraction) as usize).min(LATENCY_BUCKETS - 1)
}

/// The lower bound in microseconds of a latency bucket.
pub fn latency_bucket_floor_us(bucket: usize) -> f64 {
    match bucket {
        0 => 0.0,
        b => {
            let (octave, quarter) = ((b - 1) / 4, (b - 1) % 4);
            (1u64 << octave) as f64 * (1.0 + quarter as f64 / 4.0)
        }
    }
}

impl WindowSketch {
    /// An empty window in `layout`.
    pub fn empty(layout: &SketchLayout) -> WindowSketch {
        let features = layout
            .features
            .iter()
            .map(|f| match f {
                FeatureLayout::Numeric { .. } => FeatureSketch::Numeric(NumericSketch::empty(f.bins())),
                FeatureLayout::Categorical { .. } => {
                    FeatureSketch::Categorical(CategoricalSketch { counts: vec![0; f.bins()], missing: 0 })
                }
            })
            .collect();
        WindowSketch {
            rows: 0,
            features,
            outputs: OutputSketch {
                classes: vec![0; layout.classes],
                top_score: vec![0; SCORE_BINS],
                margin: vec![0; SCORE_BINS],
                top_score_micros: 0,
            },
            latency: vec![0; LATENCY_BUCKETS],
        }
    }

    /// No window was ever recorded into this sketch (it has no layout): it merges with nothing
    /// and adds nothing, like a device that reported a status but no window yet.
    pub fn is_unset(&self) -> bool {
        self.rows == 0 && self.features.is_empty() && self.outputs.classes.is_empty() && self.latency.is_empty()
    }

    /// Records one inference: `row` as the request gave it (NaN where a value is missing; only
    /// the layout's features are read), the model's `outputs`, its latency.
    pub fn observe(&mut self, layout: &SketchLayout, row: &[f32], outputs: &[f32], latency_us: u32) {
        self.rows += 1;
        for ((sketch, feature), value) in self.features.iter_mut().zip(&layout.features).zip(row) {
            match (sketch, feature) {
                (FeatureSketch::Numeric(s), FeatureLayout::Numeric { edges, .. }) => s.observe(edges, *value),
                (FeatureSketch::Categorical(s), FeatureLayout::Categorical { categories, tracked, .. }) => {
                    s.observe(categories.len(), tracked, *value)
                }
                // An empty window is built from its layout, so kinds always pair up.
                _ => {}
            }
        }
        self.observe_outputs(outputs);
        if let Some(count) = self.latency.get_mut(latency_bucket(latency_us)) {
            *count += 1;
        }
    }

    fn observe_outputs(&mut self, outputs: &[f32]) {
        let (mut top, mut second) = (None::<(usize, f32)>, f32::NEG_INFINITY);
        for (i, &v) in outputs.iter().enumerate().filter(|(_, v)| !v.is_nan()) {
            match top {
                Some((_, best)) if v <= best => second = second.max(v),
                _ => {
                    if let Some((_, best)) = top {
                        second = best;
                    }
                    top = Some((i, v));
                }
            }
        }
        let Some((class, score)) = top else { return };
        let o = &mut self.outputs;
        if let Some(count) = o.classes.get_mut(class) {
            *count += 1;
        }
        if o.top_score.len() == SCORE_BINS && o.margin.len() == SCORE_BINS {
            o.top_score[score_bin(score)] += 1;
            let margin = if second.is_finite() { score - second } else { score };
            o.margin[score_bin(margin)] += 1;
        }
        o.top_score_micros += (score.clamp(0.0, 1.0) as f64 * 1e6) as u64;
    }

    /// Adds `other` in. Both must share a layout (same features, kinds and bin counts);
    /// an unset sketch takes the other's layout.
    pub fn merge(&mut self, other: &WindowSketch) -> Result<(), SketchError> {
        if other.is_unset() {
            return Ok(());
        }
        if self.is_unset() {
            *self = other.clone();
            return Ok(());
        }
        self.same_shape(other)?;
        self.rows = self.rows.saturating_add(other.rows);
        for (mine, theirs) in self.features.iter_mut().zip(&other.features) {
            match (mine, theirs) {
                (FeatureSketch::Numeric(a), FeatureSketch::Numeric(b)) => a.merge(b),
                (FeatureSketch::Categorical(a), FeatureSketch::Categorical(b)) => {
                    add_counts(&mut a.counts, &b.counts);
                    a.missing = a.missing.saturating_add(b.missing);
                }
                _ => return Err(SketchError::LayoutMismatch("feature kinds")),
            }
        }
        add_counts(&mut self.outputs.classes, &other.outputs.classes);
        add_counts(&mut self.outputs.top_score, &other.outputs.top_score);
        add_counts(&mut self.outputs.margin, &other.outputs.margin);
        self.outputs.top_score_micros = self.outputs.top_score_micros.saturating_add(other.outputs.top_score_micros);
        add_counts(&mut self.latency, &other.latency);
        Ok(())
    }

    fn same_shape(&self, other: &WindowSketch) -> Result<(), SketchError> {
        if self.features.len() != other.features.len() {
            return Err(SketchError::LayoutMismatch("feature count"));
        }
        for (a, b) in self.features.iter().zip(&other.features) {
            let same = match (a, b) {
                (FeatureSketch::Numeric(a), FeatureSketch::Numeric(b)) => a.bins.len() == b.bins.len(),
                (FeatureSketch::Categorical(a), FeatureSketch::Categorical(b)) => a.counts.len() == b.counts.len(),
                _ => false,
            };
            if !same {
                return Err(SketchError::LayoutMismatch("feature bins"));
            }
        }
        let (a, b) = (&self.outputs, &other.outputs);
        if a.classes.len() != b.classes.len()
            || a.top_score.len() != b.top_score.len()
            || a.margin.len() != b.margin.len()
            || self.latency.len() != other.latency.len()
        {
            return Err(SketchError::LayoutMismatch("outputs"));
        }
        Ok(())
    }

    /// Whether this sketch (from a device: untrusted) has the shape `layout` gives and counts an
    /// honest device could have sent: no count above the window's rows, and rows within
    /// [`MAX_WINDOW_ROWS`].
    pub fn fits(&self, layout: &SketchLayout) -> Result<(), SketchError> {
        self.same_shape(&WindowSketch::empty(layout))?;
        if self.rows > MAX_WINDOW_ROWS {
            return Err(SketchError::Implausible("more rows than one window can hold"));
        }
        let within = |n: u64| n <= self.rows;
        for feature in &self.features {
            let (present, missing) = match feature {
                FeatureSketch::Numeric(s) => (total(&s.bins), s.missing),
                FeatureSketch::Categorical(s) => (total(&s.counts), s.missing),
            };
            if !within(present) || !within(missing) {
                return Err(SketchError::Implausible("a feature counts more values than the window has rows"));
            }
        }
        let o = &self.outputs;
        if ![total(&o.classes), total(&o.top_score), total(&o.margin), total(&self.latency)].into_iter().all(within) {
            return Err(SketchError::Implausible("outputs or latencies count more than the window has rows"));
        }
        Ok(())
    }

    /// Mean of the top output over the window.
    pub fn mean_confidence(&self) -> Option<f64> {
        let n = total(&self.outputs.classes);
        (n > 0).then(|| self.outputs.top_score_micros as f64 / 1e6 / n as f64)
    }

    /// The latency at quantile `q` (0..1), as the lower bound of its bucket.
    pub fn latency_quantile_us(&self, q: f64) -> Option<f64> {
        latency_quantile_us(&self.latency, q)
    }
}
