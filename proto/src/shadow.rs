//! Shadow inference, as it travels: a candidate runs beside the active version on a sample of
//! live requests, off the hot path, and each window the device sends how the two compared.
//! Counts only, so windows and devices merge by addition.

use serde::{Deserialize, Serialize};

use crate::drift::{latency_bucket, LATENCY_BUCKETS};

/// One window of a candidate running in shadow beside the active version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ShadowSummary {
    /// The candidate's version.
    pub version: String,
    /// Requests compared.
    pub rows: u64,
    /// Sampled requests the shadow queue had no room for (counted, never waited on).
    pub dropped: u64,
    /// Sampled requests the candidate failed to answer.
    pub errors: u64,
    /// Rows where both versions chose the same top output.
    pub agree: u64,
    /// Σ over rows of the mean absolute difference between the two outputs, in millionths.
    pub abs_diff_micros: u64,
    /// classes × classes counts, row-major: [active's top class][shadow's top class].
    pub flips: Vec<u64>,
    /// The candidate's latency, in the drift sketch's buckets.
    pub latency: Vec<u64>,
}

impl ShadowSummary {
    pub fn empty(version: &str, classes: usize) -> ShadowSummary {
        ShadowSummary {
            version: version.to_string(),
            rows: 0,
            dropped: 0,
            errors: 0,
            agree: 0,
            abs_diff_micros: 0,
            flips: vec![0; classes * classes],
            latency: vec![0; LATENCY_BUCKETS],
        }
    }

    /// Records one compared request.
    pub fn observe(&mut self, active: &[f32], shadow: &[f32], latency_us: u32) {
        self.rows += 1;
        let (a, s) = (top(active), top(shadow));
        if a == s {
            self.agree += 1;
        }
        let n = active.len().max(1) as f64;
        let diff: f64 = active.iter().zip(shadow).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / n;
        self.abs_diff_micros += (diff.min(1e6) * 1e6) as u64;
        let classes = (self.flips.len() as f64).sqrt() as usize;
        if let (Some(a), Some(s)) = (a, s) {
            if a < classes && s < classes {
                self.flips[a * classes + s] += 1;
            }
        }
        if let Some(count) = self.latency.get_mut(latency_bucket(latency_us)) {
            *count += 1;
        }
    }

    /// Adds `other` in when it is of the same version and shape; false (nothing added) otherwise.
    pub fn merge(&mut self, other: &ShadowSummary) -> bool {
        if other.version != self.version
            || other.flips.len() != self.flips.len()
            || other.latency.len() != self.latency.len()
        {
            return false;
        }
        // Saturating: summaries come from devices, and a hostile one must not wrap or panic.
        self.rows = self.rows.saturating_add(other.rows);
        self.dropped = self.dropped.saturating_add(other.dropped);
        self.errors = self.errors.saturating_add(other.errors);
        self.agree = self.agree.saturating_add(other.agree);
        self.abs_diff_micros = self.abs_diff_micros.saturating_add(other.abs_diff_micros);
        for (a, b) in self.flips.iter_mut().zip(&other.flips) {
            *a = a.saturating_add(*b);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a = a.saturating_add(*b);
        }
        true
    }

    /// Share of compared requests where both chose the same top output.
    pub fn agreement(&self) -> Option<f64> {
        (self.rows > 0).then(|| self.agree as f64 / self.rows as f64)
    }

    /// The candidate's latency at quantile `q` (0..1), as the lower bound of its bucket.
    pub fn latency_quantile_us(&self, q: f64) -> Option<f64> {
        crate::drift::latency_quantile_us(&self.latency, q)
    }

    pub fn mean_abs_diff(&self) -> Option<f64> {
        (self.rows > 0).then(|| self.abs_diff_micros as f64 / 1e6 / self.rows as f64)
    }
}

fn top(outputs: &[f32]) -> Option<usize> {
    outputs.iter().enumerate().filter(|(_, v)| !v.is_nan()).max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_flips_and_differences_are_counted_and_merge_by_addition() {
        let mut a = ShadowSummary::empty("2.0.0", 2);
        a.observe(&[0.9, 0.1], &[0.8, 0.2], 40);
        a.observe(&[0.9, 0.1], &[0.3, 0.7], 40);
        assert_eq!((a.rows, a.agree, a.flips.clone()), (2, 1, vec![1, 1, 0, 0]));
        assert!((a.mean_abs_diff().unwrap() - 0.35).abs() < 1e-6);
        let mut b = ShadowSummary::empty("2.0.0", 2);
        b.observe(&[0.2, 0.8], &[0.1, 0.9], 40);
        assert!(a.merge(&b));
        assert_eq!((a.rows, a.agree, a.flips.clone(), a.agreement()), (3, 2, vec![1, 1, 0, 1], Some(2.0 / 3.0)));
        assert!(!a.merge(&ShadowSummary::empty("3.0.0", 2)), "another candidate does not merge");
    }
}
