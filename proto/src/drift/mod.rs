//! Drift sketches, pure: what a bundle's reference looks like ([`ReferenceProfile`]: the layout
//! of bins and categories plus the reference rows' own sketch), what a device counts per window
//! ([`WindowSketch`]) and the thresholds a model's drift is judged by ([`DriftPolicy`]). The
//! statistical tests run on the server (`fleet-server/src/drift/`); the agent only counts.
//! ADR 0011 explains the choices.

mod layout;
mod sketch;

pub use layout::{category_code, DriftPolicy, FeatureDecl, FeatureKind, FeatureLayout, ReferenceProfile, SketchLayout};
pub use sketch::{
    from_fixed, latency_bucket, latency_bucket_floor_us, latency_quantile_us, missing, present, total,
    CategoricalSketch, FeatureSketch, NumericSketch, OutputSketch, WindowSketch, MAX_WINDOW_ROWS,
};

use thiserror::Error;

/// Inner bins of a numeric feature between the reference's min and max (plus an underflow and
/// an overflow bin): enough for KS and Wasserstein to land close to the exact values (ADR 0011).
pub const NUMERIC_BINS: usize = 32;
/// Categories counted exactly per categorical feature; the rest count as "other".
pub const MAX_TRACKED_CATEGORIES: usize = 64;
/// Categories a contract may declare for one feature.
pub const MAX_DECLARED_CATEGORIES: usize = 4096;
/// Bins of the top-score and margin histograms on [0, 1].
pub const SCORE_BINS: usize = 10;
/// Latency buckets: four per octave of microseconds up to 2^25 µs (33 s).
pub const LATENCY_BUCKETS: usize = 101;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SketchError {
    #[error("sketch layouts differ ({0}); sketches from different model contracts cannot be compared")]
    LayoutMismatch(&'static str),
    #[error("feature {index} ({name:?}) is declared wrongly: {why}")]
    Declaration { index: usize, name: String, why: String },
    #[error("drift thresholds must be within their ranges (p_value, shares and distances in 0..1, persist_windows at least 1)")]
    Policy,
    #[error("sketch counts are impossible ({0}); the window is not from an honest device")]
    Implausible(&'static str),
}

#[cfg(test)]
mod tests;
