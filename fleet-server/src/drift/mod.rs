//! Drift verdicts: `evaluate(profile, policy, current) -> DriftVerdict`, pure. Each feature gets
//! the test Evidently would choose for its type and sample size (KS or chi-squared on small
//! samples, Wasserstein or Jensen-Shannon on large ones) run on the merged sketch against the
//! bundle's reference profile, plus PSI (reported) and a test of its own for a rising missing
//! rate; the dataset drifts when enough features do. The outputs get the same as a categorical
//! feature (prediction drift), and the mean top score estimates accuracy (a calibrated model's
//! expected accuracy, as NannyML's CBPE assumes).

pub mod report;
pub mod retrain;
pub mod stattest;

use proto::drift::{
    missing, present, DriftPolicy, FeatureLayout, FeatureSketch, ReferenceProfile, SketchError, WindowSketch,
};
use serde::{Deserialize, Serialize};

/// Which test decided a feature.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TestKind {
    /// Two-sample Kolmogorov-Smirnov; the score is the p-value (drift below the threshold).
    Ks,
    /// Chi-squared goodness of fit; the score is the p-value.
    ChiSquare,
    /// Wasserstein-1 in reference standard deviations; drift at or above the threshold.
    Wasserstein,
    /// Jensen-Shannon distance; drift at or above the threshold.
    JensenShannon,
    /// No present values in the window (or none in the reference): nothing to test.
    None,
}

impl TestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TestKind::Ks => "ks",
            TestKind::ChiSquare => "chi_square",
            TestKind::Wasserstein => "wasserstein",
            TestKind::JensenShannon => "jensen_shannon",
            TestKind::None => "none",
        }
    }

    /// A p-value drifts below its threshold; a distance at or above it.
    fn drifted(self, score: f64, threshold: f64) -> bool {
        match self {
            TestKind::Ks | TestKind::ChiSquare => score < threshold,
            TestKind::Wasserstein | TestKind::JensenShannon => score >= threshold,
            TestKind::None => false,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct FeatureVerdict {
    pub name: String,
    /// The value test drifted, or the missing rate rose.
    pub drifted: bool,
    pub test: TestKind,
    pub score: f64,
    pub threshold: f64,
    pub psi: f64,
    /// Present values in the window.
    pub rows: u64,
    pub missing_rate: f64,
    pub reference_missing_rate: f64,
    pub missing_drifted: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct DriftVerdict {
    pub rows: u64,
    pub reference_rows: u64,
    pub dataset_drift: bool,
    /// Share of features that drifted.
    pub drift_share: f64,
    pub features: Vec<FeatureVerdict>,
    /// The predicted classes against the reference's.
    pub prediction: Option<FeatureVerdict>,
    /// Mean top score: a calibrated classifier's expected accuracy, now and on the reference.
    pub estimated_accuracy: Option<f64>,
    pub reference_accuracy: Option<f64>,
}

impl DriftVerdict {
    pub fn drifted_features(&self) -> impl Iterator<Item = &FeatureVerdict> {
        self.features.iter().filter(|f| f.drifted)
    }
}

/// The drift half of a bundle's manifest: its reference profile and thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDrift {
    pub profile: ReferenceProfile,
    pub policy: DriftPolicy,
}

impl ModelDrift {
    pub fn from_manifest(manifest: proto::Manifest) -> ModelDrift {
        ModelDrift { profile: manifest.reference, policy: manifest.drift }
    }

    pub fn evaluate(&self, current: &WindowSketch) -> Result<DriftVerdict, SketchError> {
        evaluate(&self.profile, &self.policy, current)
    }
}

/// The drift half of the published manifest of each of `versions` of `model` (a version
/// without a readable bundle is left out).
pub fn references<'a>(
    store: &dyn crate::store::Store,
    model: &str,
    versions: impl Iterator<Item = &'a String>,
) -> Result<std::collections::BTreeMap<String, ModelDrift>, crate::store::StoreError> {
    let mut references = std::collections::BTreeMap::new();
    for version in versions {
        if references.contains_key(version) {
            continue;
        }
        let manifest = store.bundle(model, version)?.and_then(|b| proto::Manifest::parse(&b.manifest_json).ok());
        if let Some(manifest) = manifest {
            references.insert(version.clone(), ModelDrift::from_manifest(manifest));
        }
    }
    Ok(references)
}

/// Tests the merged window `current` against the profile's reference under `policy`.
pub fn evaluate(
    profile: &ReferenceProfile,
    policy: &DriftPolicy,
    current: &WindowSketch,
) -> Result<DriftVerdict, SketchError> {
    current.fits(&profile.layout)?;
    let reference = &profile.sketch;
    let features: Vec<FeatureVerdict> = if profile.has_rows() {
        profile
            .layout
            .features
            .iter()
            .zip(&reference.features)
            .zip(&current.features)
            .map(|((layout, r), c)| feature(layout, r, c, reference.rows, current.rows, policy))
            .collect()
    } else {
        Vec::new()
    };
    let drifted = features.iter().filter(|f| f.drifted).count();
    let drift_share = if features.is_empty() { 0.0 } else { drifted as f64 / features.len() as f64 };
    let prediction = (profile.has_rows() && !current.outputs.classes.is_empty())
        .then(|| categorical("prediction", &reference.outputs.classes, &current.outputs.classes, policy));
    Ok(DriftVerdict {
        rows: current.rows,
        reference_rows: reference.rows,
        dataset_drift: !features.is_empty() && drift_share >= policy.dataset_share,
        drift_share,
        features,
        prediction,
        estimated_accuracy: current.mean_confidence(),
        reference_accuracy: reference.mean_confidence(),
    })
}

/// The smallest reference standard deviation Wasserstein distances are divided by (Evidently's
/// `wasserstein_distance_norm` uses the same floor).
const MIN_WASSERSTEIN_SPREAD: f64 = 0.001;

fn feature(
    layout: &FeatureLayout,
    reference: &FeatureSketch,
    current: &FeatureSketch,
    reference_rows: u64,
    current_rows: u64,
    policy: &DriftPolicy,
) -> FeatureVerdict {
    let mut verdict = match (layout, reference, current) {
        (FeatureLayout::Numeric { edges, .. }, FeatureSketch::Numeric(r), FeatureSketch::Numeric(c)) => {
            let small = r.count().min(c.count()) <= policy.small_sample_rows;
            let (test, score, threshold) = if r.count() == 0 || c.count() == 0 {
                (TestKind::None, 0.0, 0.0)
            } else if small {
                let d = stattest::ks_statistic(&r.bins, &c.bins);
                (TestKind::Ks, stattest::ks_p_value(d, r.count(), c.count()), policy.p_value)
            } else {
                // A constant reference feature has no spread: Evidently's floor keeps the
                // score finite (an infinite one has no JSON form and broke every reader).
                let spread = r.std().unwrap_or(0.0).max(MIN_WASSERSTEIN_SPREAD);
                let score = stattest::wasserstein(edges, r, c) / spread;
                (TestKind::Wasserstein, score, policy.wasserstein)
            };
            verdict(layout.name(), test, score, threshold, stattest::psi(&r.bins, &c.bins), c.count())
        }
        (FeatureLayout::Categorical { .. }, FeatureSketch::Categorical(r), FeatureSketch::Categorical(c)) => {
            categorical(layout.name(), &r.counts, &c.counts, policy)
        }
        // `evaluate` checked that the window fits the layout, and the profile's own sketch
        // was built in it.
        _ => verdict(layout.name(), TestKind::None, 0.0, 0.0, 0.0, 0),
    };
    let rate = |missing: u64, rows: u64| if rows == 0 { 0.0 } else { missing as f64 / rows as f64 };
    let (ref_missing, cur_missing) = (missing(reference), missing(current));
    let (ref_total, cur_total) = (ref_missing + present(reference), cur_missing + present(current));
    debug_assert!(ref_total <= reference_rows && cur_total <= current_rows);
    verdict.missing_rate = rate(cur_missing, cur_total);
    verdict.reference_missing_rate = rate(ref_missing, ref_total);
    verdict.missing_drifted = verdict.missing_rate - verdict.reference_missing_rate >= policy.missing_increase
        && stattest::missing_rise_p_value(ref_missing, ref_total, cur_missing, cur_total) < policy.p_value;
    verdict.drifted |= verdict.missing_drifted;
    verdict
}

fn categorical(name: &str, reference: &[u64], current: &[u64], policy: &DriftPolicy) -> FeatureVerdict {
    let (n_ref, n_cur): (u64, u64) = (reference.iter().sum(), current.iter().sum());
    let (test, score, threshold) = if n_ref == 0 || n_cur == 0 {
        (TestKind::None, 0.0, 0.0)
    } else if n_ref.min(n_cur) <= policy.small_sample_rows {
        (TestKind::ChiSquare, stattest::chi_square(reference, current).1, policy.p_value)
    } else {
        (TestKind::JensenShannon, stattest::jensen_shannon(reference, current), policy.jensen_shannon)
    };
    verdict(name, test, score, threshold, stattest::psi(reference, current), n_cur)
}

fn verdict(name: &str, test: TestKind, score: f64, threshold: f64, psi: f64, rows: u64) -> FeatureVerdict {
    FeatureVerdict {
        name: name.to_string(),
        drifted: test.drifted(score, threshold),
        test,
        score,
        threshold,
        psi,
        rows,
        missing_rate: 0.0,
        reference_missing_rate: 0.0,
        missing_drifted: false,
    }
}

#[cfg(test)]
mod tests;
