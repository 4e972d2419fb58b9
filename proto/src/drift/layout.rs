//! What a drift sketch measures, fixed when a bundle is built: the contract's feature
//! declarations, the bin edges and tracked categories taken from the reference rows
//! ([`SketchLayout`]), the reference's own sketch in that layout ([`ReferenceProfile`]) and the
//! model's drift thresholds ([`DriftPolicy`]). All of it travels in the signed manifest.

use serde::{Deserialize, Serialize};

use super::sketch::WindowSketch;
use super::{SketchError, MAX_DECLARED_CATEGORIES, MAX_TRACKED_CATEGORIES, NUMERIC_BINS};

/// How the contract declares one input value of a sample.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct FeatureDecl {
    pub name: String,
    #[serde(default)]
    pub kind: FeatureKind,
    /// A request may send `null` for this feature; the model then sees `fill`, and the sketch
    /// counts the value as missing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nullable: bool,
    /// What the model receives in place of a missing value (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill: Option<f32>,
    /// Categorical only: the model's encoding, code `i` standing for `categories[i]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    #[default]
    Numeric,
    /// An encoded value at inference time (0, 1, 2 … as the model takes it); a string column
    /// in reference data.
    Categorical,
}

impl FeatureDecl {
    pub fn numeric(name: &str) -> FeatureDecl {
        FeatureDecl { name: name.to_string(), ..FeatureDecl::default() }
    }

    pub fn categorical(name: &str, categories: &[&str]) -> FeatureDecl {
        FeatureDecl {
            name: name.to_string(),
            kind: FeatureKind::Categorical,
            categories: categories.iter().map(|c| c.to_string()).collect(),
            ..FeatureDecl::default()
        }
    }

    pub fn nullable(self) -> FeatureDecl {
        FeatureDecl { nullable: true, ..self }
    }

    /// The declaration's own consistency; `index` names it in the error.
    pub fn check(&self, index: usize) -> Result<(), SketchError> {
        let bad = |why: &str| Err(SketchError::Declaration { index, name: self.name.clone(), why: why.to_string() });
        match self.kind {
            FeatureKind::Numeric if !self.categories.is_empty() => bad("a numeric feature lists categories"),
            FeatureKind::Categorical if self.categories.is_empty() => bad("a categorical feature lists no categories"),
            FeatureKind::Categorical if self.categories.len() > MAX_DECLARED_CATEGORIES => {
                bad(&format!("more than {MAX_DECLARED_CATEGORIES} categories"))
            }
            _ if self.fill.is_some_and(|f| !f.is_finite()) => bad("its fill value is not a finite number"),
            _ if self.fill.is_some() && !self.nullable => bad("a fill value is given but the feature is not nullable"),
            _ => Ok(()),
        }
    }
}

/// Bins and categories of every sketched feature, and the number of output classes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SketchLayout {
    pub features: Vec<FeatureLayout>,
    pub classes: usize,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FeatureLayout {
    /// `edges[0]` and `edges[last]` are the reference's min and max; the values between are
    /// inner edges (see `numeric_edges`). A value below the min lands in the underflow bin (0), above the max
    /// in the overflow bin (last), otherwise in the bin of the last edge at or below it: bin
    /// `i + 1` is [edges[i], edges[i+1]), and the bin of the max holds the max alone, so each of
    /// a discrete feature's values keeps a bin. `edges.len() + 2` bins in all.
    Numeric { name: String, nullable: bool, edges: Vec<f32> },
    /// Exact counts for `tracked` (codes, ascending; at most [`MAX_TRACKED_CATEGORIES`], the
    /// reference's most frequent); every other code counts as "other".
    Categorical { name: String, nullable: bool, categories: Vec<String>, tracked: Vec<u32> },
}

impl FeatureLayout {
    pub fn name(&self) -> &str {
        match self {
            FeatureLayout::Numeric { name, .. } | FeatureLayout::Categorical { name, .. } => name,
        }
    }

    pub fn nullable(&self) -> bool {
        match self {
            FeatureLayout::Numeric { nullable, .. } | FeatureLayout::Categorical { nullable, .. } => *nullable,
        }
    }

    /// Bins of a numeric feature (underflow, inner, overflow); counts of a categorical one
    /// (tracked, then "other").
    pub fn bins(&self) -> usize {
        match self {
            FeatureLayout::Numeric { edges, .. } => edges.len() + 2,
            FeatureLayout::Categorical { tracked, .. } => tracked.len() + 1,
        }
    }

    /// The label of each bin, for reports: `[-inf, 0.12)`, `red`, `other`.
    pub fn bin_labels(&self) -> Vec<String> {
        match self {
            FeatureLayout::Numeric { edges, .. } => {
                let max = edges[edges.len() - 1];
                let mut labels = vec![format!("< {}", edges[0])];
                labels.extend(edges.windows(2).map(|w| format!("[{}, {})", w[0], w[1])));
                labels.push(format!("= {max}"));
                labels.push(format!("> {max}"));
                labels
            }
            FeatureLayout::Categorical { categories, tracked, .. } => {
                let mut labels: Vec<String> =
                    tracked.iter().map(|&c| categories.get(c as usize).cloned().unwrap_or_default()).collect();
                labels.push("other".into());
                labels
            }
        }
    }

    fn check(&self, index: usize) -> Result<(), SketchError> {
        let bad = |why: &str| Err(SketchError::Declaration { index, name: self.name().to_string(), why: why.into() });
        match self {
            FeatureLayout::Numeric { edges, .. } => {
                if edges.is_empty() || edges.len() > NUMERIC_BINS + 1 {
                    return bad("its edge count is outside 1..=33");
                }
                if edges.iter().any(|e| !e.is_finite()) || edges.windows(2).any(|w| w[0] >= w[1]) {
                    return bad("its edges are not finite and strictly ascending");
                }
                Ok(())
            }
            FeatureLayout::Categorical { categories, tracked, .. } => {
                if tracked.len() > MAX_TRACKED_CATEGORIES || categories.len() > MAX_DECLARED_CATEGORIES {
                    return bad("it tracks too many categories");
                }
                if tracked.windows(2).any(|w| w[0] >= w[1]) || tracked.iter().any(|&c| c as usize >= categories.len()) {
                    return bad("its tracked codes are not ascending codes of its categories");
                }
                Ok(())
            }
        }
    }
}

impl SketchLayout {
    /// The layout's own consistency, for a manifest read from a bundle.
    pub fn check(&self) -> Result<(), SketchError> {
        self.features.iter().enumerate().try_for_each(|(i, f)| f.check(i))
    }

    /// Edges from the reference's distribution (numeric) and its most frequent codes (categorical).
    /// `rows` hold each sample's values as the model takes them, NaN where missing.
    pub fn from_reference(decls: &[FeatureDecl], rows: &[Vec<f32>], classes: usize) -> SketchLayout {
        let features = decls
            .iter()
            .enumerate()
            .map(|(i, decl)| {
                let column = rows.iter().filter_map(|r| r.get(i).copied()).filter(|v| v.is_finite());
                match decl.kind {
                    FeatureKind::Numeric => FeatureLayout::Numeric {
                        name: decl.name.clone(),
                        nullable: decl.nullable,
                        edges: numeric_edges(column.collect()),
                    },
                    FeatureKind::Categorical => FeatureLayout::Categorical {
                        name: decl.name.clone(),
                        nullable: decl.nullable,
                        categories: decl.categories.clone(),
                        tracked: most_frequent_codes(column, decl.categories.len()),
                    },
                }
            })
            .collect();
        SketchLayout { features, classes }
    }
}

/// The reference's min, 31 inner edges and its max. A feature with at most 33 distinct values
/// gets those values as edges, so each has a bin of its own and its tests are exact. Otherwise
/// the inner edges are the k/32 quantiles of an even mix of the reference distribution and the
/// uniform one over [min, max]: every bin holds at most 1/16 of the reference rows (which bounds
/// the KS error) and spans at most 1/16 of its range (which bounds the Wasserstein error where
/// plain quantile bins grow wide, in the tails; ADR 0011 has the measurements). An empty column
/// gets the single edge 0.
fn numeric_edges(mut column: Vec<f32>) -> Vec<f32> {
    if column.is_empty() {
        return vec![0.0];
    }
    column.sort_by(f32::total_cmp);
    let mut distinct = column.clone();
    distinct.dedup();
    if distinct.len() <= NUMERIC_BINS + 1 {
        return distinct;
    }
    let n = column.len();
    let (lo, hi) = (column[0] as f64, column[n - 1] as f64);
    let level = |x: f64| {
        let below = column.partition_point(|v| (*v as f64) <= x) as f64 / n as f64;
        0.5 * below + 0.5 * (x - lo) / (hi - lo)
    };
    let mut edges = vec![column[0]];
    for k in 1..NUMERIC_BINS {
        let target = k as f64 / NUMERIC_BINS as f64;
        // The mix rises strictly, so bisection finds where it crosses the level.
        let (mut a, mut b) = (lo, hi);
        for _ in 0..64 {
            let mid = 0.5 * (a + b);
            if level(mid) < target {
                a = mid;
            } else {
                b = mid;
            }
        }
        edges.push(b as f32);
    }
    edges.push(column[n - 1]);
    edges.dedup();
    edges
}

/// Up to [`MAX_TRACKED_CATEGORIES`] codes, the reference's most frequent first chosen, returned
/// ascending. Codes outside `0..declared` are not categories and are never tracked.
fn most_frequent_codes(column: impl Iterator<Item = f32>, declared: usize) -> Vec<u32> {
    let mut counts = vec![0u64; declared];
    for v in column {
        if let Some(code) = category_code(v, declared) {
            counts[code as usize] += 1;
        }
    }
    let mut order: Vec<u32> = (0..declared as u32).collect();
    // Stable: among equal counts the lower code wins, so a layout is reproducible.
    order.sort_by_key(|&c| std::cmp::Reverse(counts[c as usize]));
    order.truncate(MAX_TRACKED_CATEGORIES);
    order.sort_unstable();
    order
}

/// The category code an encoded value stands for: a whole number within the declared list.
pub fn category_code(value: f32, declared: usize) -> Option<u32> {
    (value >= 0.0 && value.fract() == 0.0 && (value as usize) < declared).then_some(value as u32)
}

/// The reference rows' own sketch, in the layout built from them: what every window is
/// compared with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ReferenceProfile {
    pub layout: SketchLayout,
    pub sketch: WindowSketch,
}

impl ReferenceProfile {
    /// Layout from `rows`, then the rows (and the model's `outputs` for them) sketched in it.
    pub fn build(decls: &[FeatureDecl], rows: &[Vec<f32>], outputs: &[Vec<f32>], classes: usize) -> ReferenceProfile {
        let layout = SketchLayout::from_reference(decls, rows, classes);
        let mut sketch = WindowSketch::empty(&layout);
        // Without outputs (a comparison of data alone) the rows are still sketched.
        for (i, row) in rows.iter().enumerate() {
            sketch.observe(&layout, row, outputs.get(i).map_or(&[][..], Vec::as_slice), 0);
        }
        ReferenceProfile { layout, sketch }
    }

    /// A profile without reference rows has an unset sketch: nothing to compare with, which
    /// is valid (image models, bundles built without reference data).
    pub fn check(&self) -> Result<(), SketchError> {
        self.layout.check()?;
        if self.sketch.is_unset() {
            return Ok(());
        }
        self.sketch.fits(&self.layout)
    }

    /// Whether there are reference rows to compare windows with.
    pub fn has_rows(&self) -> bool {
        self.sketch.rows > 0
    }
}

/// Which test decides a feature's drift and at what threshold, per model (bundle metadata
/// `[drift]`). The defaults follow Evidently's: below `small_sample_rows` rows on either side,
/// KS (numeric) and chi-squared (categorical) with p < `p_value`; above, Wasserstein distance in
/// reference standard deviations ≥ `wasserstein` and Jensen-Shannon distance ≥ `jensen_shannon`;
/// the dataset drifts when at least `dataset_share` of its features do.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DriftPolicy {
    pub small_sample_rows: u64,
    pub p_value: f64,
    pub wasserstein: f64,
    pub jensen_shannon: f64,
    /// PSI at or above this is reported as drifted alongside the chosen test (informative).
    pub psi: f64,
    /// A missing rate that rose by at least this much (absolute), significantly (p < `p_value`,
    /// one-sided two-proportion z-test), is drift of its own.
    pub missing_increase: f64,
    pub dataset_share: f64,
    /// Consecutive drifted windows (per model and cohort) before a retraining event is sent.
    pub persist_windows: u32,
}

impl Default for DriftPolicy {
    fn default() -> Self {
        DriftPolicy {
            small_sample_rows: 1000,
            p_value: 0.05,
            wasserstein: 0.1,
            jensen_shannon: 0.1,
            psi: 0.1,
            missing_increase: 0.02,
            dataset_share: 0.5,
            persist_windows: 3,
        }
    }
}

impl DriftPolicy {
    pub fn check(&self) -> Result<(), SketchError> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        let ok = unit(self.p_value)
            && unit(self.dataset_share)
            && unit(self.missing_increase)
            && unit(self.jensen_shannon)
            && self.wasserstein.is_finite()
            && self.wasserstein >= 0.0
            && self.psi.is_finite()
            && self.psi >= 0.0
            && self.persist_windows >= 1;
        if ok {
            Ok(())
        } else {
            Err(SketchError::Policy)
        }
    }
}
