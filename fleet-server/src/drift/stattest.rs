//! The statistical tests, on sketches instead of raw rows: two-sample Kolmogorov-Smirnov and
//! Wasserstein-1 from a numeric feature's histogram (with its exact tail sums), chi-squared
//! goodness of fit and Jensen-Shannon distance on counts, PSI, and a one-sided test for a rising
//! missing rate. Pure functions; ADR 0011 gives each approximation and its error bound.

use proto::drift::{from_fixed, NumericSketch};
use statrs::distribution::{ChiSquared, ContinuousCDF, Normal};

fn fractions(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts.iter().map(|&c| if total == 0 { 0.0 } else { c as f64 / total as f64 }).collect()
}

/// The largest gap between the two cumulative distributions at the bin boundaries. The exact
/// statistic of the raw rows is at least this and at most this plus the larger mass of one bin
/// (continuous data), and exactly this when every distinct value has a bin of its own.
pub fn ks_statistic(reference: &[u64], current: &[u64]) -> f64 {
    let (p, q) = (fractions(reference), fractions(current));
    let (mut f, mut g, mut d) = (0.0f64, 0.0f64, 0.0f64);
    for (a, b) in p.iter().zip(&q) {
        f += a;
        g += b;
        d = d.max((f - g).abs());
    }
    d
}

/// The two-sided p-value of a KS statistic `d` between samples of `n` and `m`: Kolmogorov's
/// limiting distribution at Stephens' corrected argument (within about 0.01 of the exact
/// p-value near 0.05 from a dozen rows on).
pub fn ks_p_value(d: f64, n: u64, m: u64) -> f64 {
    if n == 0 || m == 0 {
        return 1.0;
    }
    let en = (n as f64 * m as f64 / (n + m) as f64).sqrt();
    let lambda = (en + 0.12 + 0.11 / en) * d;
    kolmogorov_sf(lambda)
}

/// P(K > λ) for Kolmogorov's distribution: 2 Σ (-1)^(k-1) exp(-2 k² λ²).
fn kolmogorov_sf(lambda: f64) -> f64 {
    if lambda < 0.2 {
        // The series converges slowly here and the value is 1 to twelve digits.
        return 1.0;
    }
    let mut sum = 0.0;
    for k in 1..=100 {
        let k = k as f64;
        let term = (-2.0 * k * k * lambda * lambda).exp();
        sum += if k as u64 % 2 == 1 { term } else { -term };
        if term < 1e-16 {
            break;
        }
    }
    (2.0 * sum).clamp(0.0, 1.0)
}

/// Wasserstein-1 distance between the reference and the current values of a numeric feature.
/// Below the reference's min and above its max the reference has no mass, so the tails come
/// exactly from the current sketch's tail sums; inside, each distribution is taken as uniform
/// within a bin. The estimate is raised to |Δ mean| (always a lower bound) when below it.
pub fn wasserstein(edges: &[f32], reference: &NumericSketch, current: &NumericSketch) -> f64 {
    let (n_ref, n_cur) = (reference.count() as f64, current.count() as f64);
    if n_ref == 0.0 || n_cur == 0.0 {
        return 0.0;
    }
    let last = edges.len() - 1;
    let (lo, hi) = (edges[0] as f64, edges[last] as f64);
    let below = current.bins[0] as f64;
    let above = current.bins[edges.len() + 1] as f64;
    let mut distance = (below * lo - from_fixed(current.under_sum)) / n_cur;
    distance += (from_fixed(current.over_sum) - above * hi) / n_cur;
    // Inner bins 1..=last-… : bin i + 1 spans [edges[i], edges[i+1]); the max's own bin has no width.
    let (mut f, mut g) = (reference.bins[0] as f64 / n_ref, below / n_cur);
    for i in 0..last {
        let width = (edges[i + 1] - edges[i]) as f64;
        let d0 = f - g;
        f += reference.bins[i + 1] as f64 / n_ref;
        g += current.bins[i + 1] as f64 / n_cur;
        distance += width * mean_abs_linear(d0, f - g);
    }
    let shift = match (reference.mean(), current.mean()) {
        (Some(a), Some(b)) => (a - b).abs(),
        _ => 0.0,
    };
    distance.max(shift)
}

/// ∫₀¹ |d0 + t (d1 - d0)| dt.
fn mean_abs_linear(d0: f64, d1: f64) -> f64 {
    if d0 * d1 >= 0.0 {
        (d0.abs() + d1.abs()) / 2.0
    } else {
        (d0 * d0 + d1 * d1) / (2.0 * (d0.abs() + d1.abs()))
    }
}

/// Jensen-Shannon distance (the square root of the divergence, natural log: SciPy's
/// `jensenshannon`), between two count vectors over the same categories.
pub fn jensen_shannon(reference: &[u64], current: &[u64]) -> f64 {
    let (p, q) = (fractions(reference), fractions(current));
    let kl = |a: &[f64], m: &[f64]| -> f64 {
        a.iter().zip(m).filter(|(x, _)| **x > 0.0).map(|(x, y)| x * (x / y).ln()).sum()
    };
    let m: Vec<f64> = p.iter().zip(&q).map(|(a, b)| (a + b) / 2.0).collect();
    ((kl(&p, &m) + kl(&q, &m)) / 2.0).max(0.0).sqrt()
}

/// Chi-squared goodness of fit of the current counts to the reference's proportions (as
/// Evidently's chi-squared test), over the categories either side has seen. A category the
/// reference never had makes the statistic infinite and the p-value 0. Returns (statistic, p).
pub fn chi_square(reference: &[u64], current: &[u64]) -> (f64, f64) {
    let seen: Vec<(u64, u64)> =
        reference.iter().copied().zip(current.iter().copied()).filter(|(r, c)| r + c > 0).collect();
    let n_ref: u64 = seen.iter().map(|(r, _)| r).sum();
    let n_cur: u64 = seen.iter().map(|(_, c)| c).sum();
    if seen.len() < 2 || n_ref == 0 || n_cur == 0 {
        return (0.0, 1.0);
    }
    let mut statistic = 0.0;
    for (r, c) in &seen {
        let expected = *r as f64 / n_ref as f64 * n_cur as f64;
        if expected == 0.0 {
            return (f64::INFINITY, 0.0);
        }
        statistic += (*c as f64 - expected).powi(2) / expected;
    }
    let p = ChiSquared::new((seen.len() - 1) as f64).map_or(1.0, |chi| chi.sf(statistic));
    (statistic, p)
}

/// Population stability index, an empty bin counted as 0.0001 of its side (as Evidently does).
pub fn psi(reference: &[u64], current: &[u64]) -> f64 {
    let (p, q) = (fractions(reference), fractions(current));
    if current.iter().all(|&c| c == 0) {
        return 0.0;
    }
    p.iter()
        .zip(&q)
        .map(|(&a, &b)| {
            let (a, b) = (a.max(0.0001), b.max(0.0001));
            (b - a) * (b / a).ln()
        })
        .sum()
}

/// A rise of the missing rate: the one-sided p-value of the pooled two-proportion z-test that
/// the current rate exceeds the reference's.
pub fn missing_rise_p_value(
    reference_missing: u64,
    reference_rows: u64,
    current_missing: u64,
    current_rows: u64,
) -> f64 {
    if reference_rows == 0 || current_rows == 0 {
        return 1.0;
    }
    let (n1, n2) = (reference_rows as f64, current_rows as f64);
    let (p1, p2) = (reference_missing as f64 / n1, current_missing as f64 / n2);
    let pooled = (reference_missing + current_missing) as f64 / (n1 + n2);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    if se == 0.0 {
        return if p2 > p1 { 0.0 } else { 1.0 };
    }
    // Normal::new(0, 1) has valid parameters.
    Normal::new(0.0, 1.0).map_or(1.0, |normal| normal.sf((p2 - p1) / se))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ks_of_identical_histograms_is_zero_and_of_disjoint_ones_is_one() {
        assert_eq!(ks_statistic(&[5, 5, 5], &[10, 10, 10]), 0.0);
        assert_eq!(ks_statistic(&[10, 0], &[0, 10]), 1.0);
        assert!((ks_statistic(&[1, 1, 1, 1], &[2, 1, 1, 0]) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn ks_p_values_match_scipy_asymptotics_near_the_usual_threshold() {
        // scipy.stats.kstwobign.sf(1.358) = 0.0501; with Stephens' correction for n = m = 1000.
        assert!((kolmogorov_sf(1.358) - 0.0501).abs() < 0.0005);
        assert!((ks_p_value(0.0607, 1000, 1000) - 0.05).abs() < 0.005);
        assert_eq!(ks_p_value(0.0, 100, 100), 1.0);
        assert!(ks_p_value(0.5, 200, 200) < 1e-10);
    }

    #[test]
    fn chi_square_matches_scipy_and_a_new_category_is_infinitely_unlikely() {
        // scipy.stats.chisquare([30, 20, 50], [25, 25, 50]) = (2.0, 0.3679).
        let (stat, p) = chi_square(&[250, 250, 500], &[30, 20, 50]);
        assert!((stat - 2.0).abs() < 1e-9 && (p - 0.3679).abs() < 1e-4, "{stat} {p}");
        assert_eq!(chi_square(&[10, 10, 0], &[10, 10, 1]), (f64::INFINITY, 0.0));
        assert_eq!(chi_square(&[10, 0], &[0, 0]), (0.0, 1.0));
    }

    #[test]
    fn jensen_shannon_matches_scipy() {
        // scipy.spatial.distance.jensenshannon([0.5, 0.5], [0.9, 0.1]) = 0.318982.
        assert!((jensen_shannon(&[5, 5], &[9, 1]) - 0.318982).abs() < 1e-6);
        assert_eq!(jensen_shannon(&[3, 3], &[1, 1]), 0.0);
        // Disjoint: sqrt(ln 2).
        assert!((jensen_shannon(&[1, 0], &[0, 1]) - 2f64.ln().sqrt()).abs() < 1e-12);
    }

    #[test]
    fn psi_of_a_shifted_histogram_is_large_and_of_the_same_is_zero() {
        assert_eq!(psi(&[10, 10], &[20, 20]), 0.0);
        assert!(psi(&[90, 10], &[10, 90]) > 1.0);
    }

    #[test]
    fn a_significant_rise_of_the_missing_rate_has_a_small_p_value_and_a_fall_does_not() {
        assert!(missing_rise_p_value(10, 1000, 100, 1000) < 1e-6);
        assert!(missing_rise_p_value(100, 1000, 10, 1000) > 0.99);
        assert!((missing_rise_p_value(50, 1000, 50, 1000) - 0.5).abs() < 1e-9);
        assert!(missing_rise_p_value(0, 100, 5, 100) < 0.05);
    }
}
