use proto::drift::{FeatureDecl, ReferenceProfile, WindowSketch};
use statrs::distribution::{ContinuousCDF, Normal};

use super::*;

/// `n` values at the normal quantiles (i + 0.5) / n: a sample with no noise, so each verdict
/// below is decided by the shift alone.
fn normal(n: usize, mean: f64, sd: f64) -> Vec<f32> {
    let z = Normal::new(0.0, 1.0).unwrap();
    (0..n).map(|i| (mean + sd * z.inverse_cdf((i as f64 + 0.5) / n as f64)) as f32).collect()
}

/// Codes 0..3 in proportions `weights` (per 10), `n` rows.
fn colours(n: usize, weights: [usize; 4]) -> Vec<f32> {
    let cycle: Vec<f32> =
        weights.iter().enumerate().flat_map(|(code, &w)| std::iter::repeat_n(code as f32, w)).collect();
    (0..n).map(|i| cycle[i * 7 % cycle.len()]).collect()
}

fn decls() -> Vec<FeatureDecl> {
    vec![
        FeatureDecl::numeric("temperature"),
        FeatureDecl::numeric("pressure").nullable(),
        FeatureDecl::categorical("colour", &["red", "green", "blue", "grey"]),
    ]
}

fn rows(temperature: Vec<f32>, pressure: Vec<f32>, colour: Vec<f32>) -> Vec<Vec<f32>> {
    temperature.into_iter().zip(pressure).zip(colour).map(|((t, p), c)| vec![t, p, c]).collect()
}

fn model(row: &[f32]) -> Vec<f32> {
    let p = 1.0 / (1.0 + (-row[0]).exp());
    vec![p, 1.0 - p]
}

fn profile(n: usize) -> ReferenceProfile {
    let reference = rows(normal(n, 0.0, 1.0), normal(n, 10.0, 3.0), colours(n, [4, 3, 2, 1]));
    let outputs: Vec<Vec<f32>> = reference.iter().map(|r| model(r)).collect();
    ReferenceProfile::build(&decls(), &reference, &outputs, 2)
}

fn window(profile: &ReferenceProfile, rows: &[Vec<f32>]) -> WindowSketch {
    let mut sketch = WindowSketch::empty(&profile.layout);
    for row in rows {
        sketch.observe(&profile.layout, row, &model(row), 100);
    }
    sketch
}

fn verdict(n_ref: usize, current: Vec<Vec<f32>>) -> DriftVerdict {
    let profile = profile(n_ref);
    evaluate(&profile, &DriftPolicy::default(), &window(&profile, &current)).unwrap()
}

fn by_name<'a>(v: &'a DriftVerdict, name: &str) -> &'a FeatureVerdict {
    v.features.iter().find(|f| f.name == name).unwrap()
}

#[test]
fn the_same_distribution_drifts_nowhere_at_any_size() {
    for n in [200, 5000] {
        let v = verdict(n, rows(normal(n, 0.0, 1.0), normal(n, 10.0, 3.0), colours(n, [4, 3, 2, 1])));
        assert!(!v.dataset_drift && v.drift_share == 0.0, "{n}: {v:#?}");
        assert!(!v.prediction.as_ref().unwrap().drifted);
    }
}

#[test]
fn small_samples_are_judged_by_ks_and_chi_square_and_large_ones_by_wasserstein_and_jensen_shannon() {
    let small = verdict(200, rows(normal(200, 0.0, 1.0), normal(200, 10.0, 3.0), colours(200, [4, 3, 2, 1])));
    let tests: Vec<TestKind> = small.features.iter().map(|f| f.test).collect();
    assert_eq!(tests, [TestKind::Ks, TestKind::Ks, TestKind::ChiSquare]);
    let large = verdict(5000, rows(normal(5000, 0.0, 1.0), normal(5000, 10.0, 3.0), colours(5000, [4, 3, 2, 1])));
    let tests: Vec<TestKind> = large.features.iter().map(|f| f.test).collect();
    assert_eq!(tests, [TestKind::Wasserstein, TestKind::Wasserstein, TestKind::JensenShannon]);
    assert_eq!(large.prediction.unwrap().test, TestKind::JensenShannon);
}

#[test]
fn a_mean_shift_of_half_a_sigma_drifts_that_feature_only_and_wasserstein_reads_the_shift() {
    let v = verdict(5000, rows(normal(5000, 0.5, 1.0), normal(5000, 10.0, 3.0), colours(5000, [4, 3, 2, 1])));
    let t = by_name(&v, "temperature");
    assert!(t.drifted && (t.score - 0.5).abs() < 0.02, "{t:?}");
    assert!(!by_name(&v, "pressure").drifted && !by_name(&v, "colour").drifted);
    assert!((v.drift_share - 1.0 / 3.0).abs() < 1e-12 && !v.dataset_drift);
    // The model's outputs follow temperature.
    assert!(v.prediction.unwrap().drifted);
}

#[test]
fn a_variance_change_is_caught_though_the_mean_stays() {
    let v = verdict(5000, rows(normal(5000, 0.0, 1.0), normal(5000, 10.0, 9.0), colours(5000, [4, 3, 2, 1])));
    let p = by_name(&v, "pressure");
    assert!(p.drifted && p.test == TestKind::Wasserstein, "{p:?}");
}

#[test]
fn a_small_shift_is_caught_by_ks_and_a_tiny_one_is_not() {
    let moved = verdict(200, rows(normal(200, 0.6, 1.0), normal(200, 10.0, 3.0), colours(200, [4, 3, 2, 1])));
    assert!(by_name(&moved, "temperature").drifted, "{moved:#?}");
    let barely = verdict(200, rows(normal(200, 0.05, 1.0), normal(200, 10.0, 3.0), colours(200, [4, 3, 2, 1])));
    assert!(!by_name(&barely, "temperature").drifted, "{barely:#?}");
}

#[test]
fn category_frequencies_that_change_drift_and_a_category_never_seen_drifts_on_small_samples() {
    let changed = verdict(5000, rows(normal(5000, 0.0, 1.0), normal(5000, 10.0, 3.0), colours(5000, [1, 2, 3, 4])));
    assert!(by_name(&changed, "colour").drifted);
    // The reference never had grey at the small size below: a small current sample with grey
    // in it makes chi-squared infinite.
    let reference = rows(normal(200, 0.0, 1.0), normal(200, 10.0, 3.0), colours(200, [4, 3, 3, 0]));
    let outputs: Vec<Vec<f32>> = reference.iter().map(|r| model(r)).collect();
    let profile = ReferenceProfile::build(&decls(), &reference, &outputs, 2);
    let current = window(&profile, &rows(normal(200, 0.0, 1.0), normal(200, 10.0, 3.0), colours(200, [4, 3, 2, 1])));
    let v = evaluate(&profile, &DriftPolicy::default(), &current).unwrap();
    let colour = by_name(&v, "colour");
    assert_eq!((colour.test, colour.score, colour.drifted), (TestKind::ChiSquare, 0.0, true));
}

#[test]
fn a_rising_missing_rate_is_drift_of_its_own_though_the_present_values_look_the_same() {
    let n = 5000;
    let mut pressure = normal(n, 10.0, 3.0);
    // Every fifth value goes missing, spread evenly so the present ones keep their shape.
    for v in pressure.iter_mut().step_by(5) {
        *v = f32::NAN;
    }
    let v = verdict(n, rows(normal(n, 0.0, 1.0), pressure, colours(n, [4, 3, 2, 1])));
    let p = by_name(&v, "pressure");
    assert!(p.missing_drifted && p.drifted && p.score < 0.1, "{p:?}");
    assert!((p.missing_rate - 0.2).abs() < 1e-9 && p.reference_missing_rate == 0.0);
}

#[test]
fn the_dataset_drifts_when_half_its_features_do() {
    let v = verdict(5000, rows(normal(5000, 2.0, 1.0), normal(5000, 14.0, 3.0), colours(5000, [4, 3, 2, 1])));
    assert_eq!(v.drifted_features().count(), 2);
    assert!(v.dataset_drift);
    let strict = DriftPolicy { dataset_share: 0.9, ..DriftPolicy::default() };
    let profile = profile(5000);
    let current = window(&profile, &rows(normal(5000, 2.0, 1.0), normal(5000, 14.0, 3.0), colours(5000, [4, 3, 2, 1])));
    assert!(!evaluate(&profile, &strict, &current).unwrap().dataset_drift);
}

#[test]
fn estimated_accuracy_is_the_mean_top_score_on_both_sides() {
    let v = verdict(1000, rows(normal(1000, 3.0, 0.1), normal(1000, 10.0, 3.0), colours(1000, [4, 3, 2, 1])));
    let (now, before) = (v.estimated_accuracy.unwrap(), v.reference_accuracy.unwrap());
    // Temperatures near 3 give confident answers; the reference's, around 0, much less so.
    assert!(now > 0.94 && before < 0.8, "{now} {before}");
}

#[test]
fn a_window_of_another_layout_is_refused_and_an_empty_one_tests_nothing() {
    let profile = profile(500);
    let other = ReferenceProfile::build(&[FeatureDecl::numeric("x")], &[vec![1.0]], &[vec![1.0, 0.0]], 2);
    assert!(evaluate(&profile, &DriftPolicy::default(), &WindowSketch::empty(&other.layout)).is_err());
    let empty = evaluate(&profile, &DriftPolicy::default(), &WindowSketch::empty(&profile.layout)).unwrap();
    assert!(empty.features.iter().all(|f| f.test == TestKind::None && !f.drifted));
}

#[test]
fn a_constant_reference_feature_gets_a_finite_score_that_drifts_only_when_the_value_moves() {
    let n = 5000;
    let constant = || vec![2.0f32; n];
    let reference = rows(constant(), normal(n, 10.0, 3.0), colours(n, [4, 3, 2, 1]));
    let outputs: Vec<Vec<f32>> = reference.iter().map(|r| model(r)).collect();
    let profile = ReferenceProfile::build(&decls(), &reference, &outputs, 2);
    let judge = |temperature: Vec<f32>| {
        let current = rows(temperature, normal(n, 10.0, 3.0), colours(n, [4, 3, 2, 1]));
        evaluate(&profile, &DriftPolicy::default(), &window(&profile, &current)).unwrap()
    };
    let same = judge(constant());
    let t = by_name(&same, "temperature");
    assert!(!t.drifted && t.score == 0.0, "{t:?}");
    let moved = judge(vec![2.5f32; n]);
    let t = by_name(&moved, "temperature");
    assert!(t.drifted && t.score.is_finite() && t.test == TestKind::Wasserstein, "{t:?}");
    // What the API and the retraining webhook send must read back as the same number.
    let json = serde_json::to_value(t).unwrap();
    assert_eq!(json["score"].as_f64(), Some(t.score), "{json}");
}
