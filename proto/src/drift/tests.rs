use super::*;

/// A small deterministic generator (splitmix64), so the property tests need no RNG crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn decls() -> Vec<FeatureDecl> {
    vec![
        FeatureDecl::numeric("temperature"),
        FeatureDecl::numeric("pressure").nullable(),
        FeatureDecl::categorical("colour", &["red", "green", "blue"]).nullable(),
    ]
}

/// Rows of the three features above; `missing` of the nullable ones are NaN.
fn rows(rng: &mut Rng, n: usize, shift: f32, missing: f64) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            let pressure = if rng.unit() < missing { f32::NAN } else { 3.0 * rng.normal() + 10.0 };
            let colour = if rng.unit() < missing { f32::NAN } else { rng.below(4) as f32 };
            vec![rng.normal() + shift, pressure, colour]
        })
        .collect()
}

fn outputs(row: &[f32]) -> Vec<f32> {
    let p = 1.0 / (1.0 + (-row[0]).exp());
    vec![p, 1.0 - p]
}

fn sketch_of(layout: &SketchLayout, rows: &[Vec<f32>]) -> WindowSketch {
    let mut sketch = WindowSketch::empty(layout);
    for (i, row) in rows.iter().enumerate() {
        sketch.observe(layout, row, &outputs(row), (i * 37 % 5000) as u32);
    }
    sketch
}

fn profile(rng: &mut Rng) -> ReferenceProfile {
    let reference = rows(rng, 2000, 0.0, 0.05);
    let outs: Vec<Vec<f32>> = reference.iter().map(|r| outputs(r)).collect();
    ReferenceProfile::build(&decls(), &reference, &outs, 2)
}

#[test]
fn a_continuous_feature_gets_32_bins_each_with_at_most_a_sixteenth_of_its_rows_and_range() {
    let profile = profile(&mut Rng(1));
    profile.check().unwrap();
    let FeatureLayout::Numeric { edges, .. } = &profile.layout.features[0] else { panic!() };
    assert_eq!(edges.len(), NUMERIC_BINS + 1);
    assert_eq!(profile.layout.features[0].bins(), NUMERIC_BINS + 3);
    let range = edges[NUMERIC_BINS] - edges[0];
    assert!(edges.windows(2).all(|w| w[1] - w[0] <= range / 16.0 + 1e-6), "{edges:?}");
    let FeatureSketch::Numeric(s) = &profile.sketch.features[0] else { panic!() };
    // The reference itself never lands outside its own range; the max sits alone in its bin.
    assert_eq!((s.bins[0], s.bins[NUMERIC_BINS + 2], s.bins[NUMERIC_BINS + 1]), (0, 0, 1));
    assert_eq!(s.count(), 2000);
    assert!(s.bins.iter().all(|&c| c <= 2000 / 16 + 1), "{:?}", s.bins);
}

#[test]
fn each_distinct_value_of_a_discrete_feature_gets_a_bin_of_its_own() {
    let decls = [FeatureDecl::numeric("rooms")];
    let rows: Vec<Vec<f32>> = (0..1000).map(|i| vec![[1.0, 2.0, 3.0, 4.0, 40.0][i % 5]]).collect();
    let outs = vec![vec![1.0]; rows.len()];
    let profile = ReferenceProfile::build(&decls, &rows, &outs, 1);
    let FeatureSketch::Numeric(s) = &profile.sketch.features[0] else { panic!() };
    assert_eq!(s.bins.iter().filter(|&&c| c > 0).count(), 5, "{:?}", s.bins);
    assert!(s.bins.iter().all(|&c| c == 0 || c == 200));
}

#[test]
fn values_outside_the_reference_range_land_in_underflow_and_overflow_with_their_sums() {
    let decls = [FeatureDecl::numeric("x")];
    let rows: Vec<Vec<f32>> = (0..100).map(|i| vec![i as f32]).collect();
    let profile = ReferenceProfile::build(&decls, &rows, &vec![vec![1.0]; 100], 1);
    let layout = &profile.layout;
    let window = sketch_of(layout, &[vec![-5.0], vec![-1.0], vec![0.0], vec![99.0], vec![150.0]]);
    let FeatureSketch::Numeric(s) = &window.features[0] else { panic!() };
    let last = s.bins.len() - 1;
    assert_eq!((s.bins[0], s.bins[last], s.count()), (2, 1, 5));
    assert_eq!((from_fixed(s.under_sum), from_fixed(s.over_sum)), (-6.0, 150.0));
    assert_eq!((s.min, s.max), (-5.0, 150.0));
    assert_eq!(s.mean(), Some((-5.0 - 1.0 + 0.0 + 99.0 + 150.0) / 5.0));
}

#[test]
fn categories_are_counted_exactly_and_unknown_codes_count_as_other() {
    let profile = profile(&mut Rng(2));
    let layout = &profile.layout;
    let FeatureLayout::Categorical { tracked, .. } = &layout.features[2] else { panic!() };
    assert_eq!(tracked, &[0, 1, 2]);
    let window =
        sketch_of(layout, &[vec![0.0, 1.0, 2.0], vec![0.0, 1.0, 7.0], vec![0.0, 1.0, 1.5], vec![0.0, 1.0, f32::NAN]]);
    let FeatureSketch::Categorical(c) = &window.features[2] else { panic!() };
    assert_eq!((c.counts.clone(), c.missing), (vec![0, 0, 1, 2], 1));
    assert_eq!(layout.features[2].bin_labels(), ["red", "green", "blue", "other"]);
}

#[test]
fn only_the_64_most_frequent_categories_are_tracked() {
    let names: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let decls = [FeatureDecl::categorical("site", &refs)];
    // Code c appears c + 1 times: the 64 most frequent are 36..=99.
    let rows: Vec<Vec<f32>> = (0..100u32).flat_map(|c| std::iter::repeat_n(vec![c as f32], c as usize + 1)).collect();
    let profile = ReferenceProfile::build(&decls, &rows, &vec![vec![1.0]; rows.len()], 1);
    let FeatureLayout::Categorical { tracked, .. } = &profile.layout.features[0] else { panic!() };
    assert_eq!(tracked, &(36..100).collect::<Vec<u32>>());
    let FeatureSketch::Categorical(c) = &profile.sketch.features[0] else { panic!() };
    assert_eq!(c.counts[64], (1..=36).sum::<u64>());
}

#[test]
fn merging_shards_in_any_order_and_grouping_equals_the_sketch_of_all_rows() {
    let mut rng = Rng(3);
    let profile = profile(&mut rng);
    let layout = &profile.layout;
    for case in 0..50 {
        let all = rows(&mut rng, 50 + case * 20, (case % 3) as f32, 0.1);
        let whole = sketch_of(layout, &all);
        let shards = 1 + rng.below(7) as usize;
        let mut parts: Vec<WindowSketch> = vec![WindowSketch::empty(layout); shards];
        for (i, row) in all.iter().enumerate() {
            parts[rng.below(shards as u64) as usize].observe(layout, row, &outputs(row), (i * 37 % 5000) as u32);
        }
        // Merge in a random tree: repeatedly merge two random parts until one is left.
        while parts.len() > 1 {
            let a = parts.swap_remove(rng.below(parts.len() as u64) as usize);
            let b = rng.below(parts.len() as u64) as usize;
            parts[b].merge(&a).unwrap();
        }
        assert_eq!(parts[0], whole, "case {case}");
    }
}

#[test]
fn an_unset_sketch_merges_with_anything_and_different_layouts_refuse() {
    let profile = profile(&mut Rng(4));
    let window = sketch_of(&profile.layout, &rows(&mut Rng(5), 10, 0.0, 0.0));
    let mut unset = WindowSketch::default();
    assert!(unset.is_unset());
    unset.merge(&window).unwrap();
    assert_eq!(unset, window);
    let mut copy = window.clone();
    copy.merge(&WindowSketch::default()).unwrap();
    assert_eq!(copy, window);

    let other_layout = SketchLayout::from_reference(&[FeatureDecl::numeric("x")], &[vec![1.0], vec![2.0]], 2);
    let mut other = WindowSketch::empty(&other_layout);
    assert_eq!(other.merge(&window), Err(SketchError::LayoutMismatch("feature count")));
    assert!(window.fits(&profile.layout).is_ok());
    assert!(window.fits(&other_layout).is_err());
}

#[test]
fn mean_and_standard_deviation_come_from_the_fixed_point_sums() {
    let mut rng = Rng(6);
    let values: Vec<f32> = (0..10_000).map(|_| 2.0 * rng.normal() + 5.0).collect();
    let layout = SketchLayout::from_reference(&[FeatureDecl::numeric("x")], &[vec![0.0], vec![10.0]], 1);
    let mut sketch = WindowSketch::empty(&layout);
    for v in &values {
        sketch.observe(&layout, &[*v], &[1.0], 1);
    }
    let FeatureSketch::Numeric(s) = &sketch.features[0] else { panic!() };
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / values.len() as f64;
    assert!((s.mean().unwrap() - mean).abs() < 1e-6);
    assert!((s.std().unwrap() - var.sqrt()).abs() < 1e-5);
}

#[test]
fn outputs_record_the_top_class_its_score_and_the_margin_to_the_runner_up() {
    let layout = SketchLayout { features: Vec::new(), classes: 3 };
    let mut sketch = WindowSketch::empty(&layout);
    sketch.observe(&layout, &[], &[0.1, 0.75, 0.15], 10);
    sketch.observe(&layout, &[], &[0.05, 0.05, 0.9], 10);
    assert_eq!(sketch.outputs.classes, [0, 1, 1]);
    assert_eq!((sketch.outputs.top_score[7], sketch.outputs.top_score[9]), (1, 1));
    // Margins 0.6 and 0.85.
    assert_eq!((sketch.outputs.margin[6], sketch.outputs.margin[8]), (1, 1));
    assert!((sketch.mean_confidence().unwrap() - 0.825).abs() < 1e-6);
}

#[test]
fn latency_buckets_are_quarter_octaves_and_quantiles_read_their_floor() {
    assert_eq!([0, 1, 2, 3, 4, 5, 6, 7].map(latency_bucket), [0, 1, 5, 7, 9, 10, 11, 12]);
    for us in [1u32, 7, 100, 1_000, 65_537, 1_000_000] {
        let floor = latency_bucket_floor_us(latency_bucket(us));
        assert!(floor <= us as f64 && us as f64 <= floor * 1.25 + 1.0, "{us} -> {floor}");
    }
    assert_eq!(latency_bucket(u32::MAX), LATENCY_BUCKETS - 1);
    let layout = SketchLayout { features: Vec::new(), classes: 1 };
    let mut sketch = WindowSketch::empty(&layout);
    for us in 1..=100 {
        sketch.observe(&layout, &[], &[1.0], us);
    }
    assert_eq!(sketch.latency_quantile_us(0.95), Some(latency_bucket_floor_us(latency_bucket(95))));
}

#[test]
fn a_summary_of_32_features_over_ten_thousand_rows_stays_under_4_kb() {
    let mut rng = Rng(7);
    let decls: Vec<FeatureDecl> = (0..32).map(|i| FeatureDecl::numeric(&format!("f{i}")).nullable()).collect();
    let reference: Vec<Vec<f32>> = (0..5000).map(|_| (0..32).map(|_| rng.normal()).collect()).collect();
    let outs: Vec<Vec<f32>> = reference.iter().map(|r| outputs(r)).collect();
    let profile = ReferenceProfile::build(&decls, &reference, &outs, 2);
    let current: Vec<Vec<f32>> = (0..10_000).map(|_| (0..32).map(|_| rng.normal() * 1.5 + 0.3).collect()).collect();
    let bytes = postcard::to_allocvec(&sketch_of(&profile.layout, &current)).unwrap();
    assert!(bytes.len() <= 4096, "{} bytes", bytes.len());
}

#[test]
fn declarations_that_contradict_themselves_are_refused_by_name() {
    let numeric_with_categories = FeatureDecl { categories: vec!["a".into()], ..FeatureDecl::numeric("x") };
    let err = numeric_with_categories.check(3).unwrap_err().to_string();
    assert_eq!(err, "feature 3 (\"x\") is declared wrongly: a numeric feature lists categories");
    assert!(FeatureDecl { kind: FeatureKind::Categorical, ..FeatureDecl::numeric("c") }.check(0).is_err());
    assert!(FeatureDecl { fill: Some(1.0), ..FeatureDecl::numeric("x") }.check(0).is_err());
    assert!(FeatureDecl { fill: Some(1.0), ..FeatureDecl::numeric("x").nullable() }.check(0).is_ok());
    assert!(DriftPolicy { p_value: 2.0, ..DriftPolicy::default() }.check().is_err());
    assert!(DriftPolicy::default().check().is_ok());
}

#[test]
fn a_hostile_window_with_huge_counts_merges_without_overflow_and_does_not_fit() {
    let mut rng = Rng(11);
    let p = profile(&mut rng);
    let honest = sketch_of(&p.layout, &rows(&mut rng, 300, 0.0, 0.1));
    honest.fits(&p.layout).unwrap();
    let mut hostile = honest.clone();
    if let FeatureSketch::Numeric(s) = &mut hostile.features[0] {
        s.bins[3] = u64::MAX;
        s.sum = i128::MAX;
        s.under_sum = i128::MAX;
    }
    hostile.latency[0] = u64::MAX;
    let mut merged = hostile.clone();
    merged.merge(&hostile).unwrap();
    let _ = (merged.mean_confidence(), merged.latency_quantile_us(0.95));
    assert!(matches!(hostile.fits(&p.layout), Err(SketchError::Implausible(_))));
    let mut too_many = honest.clone();
    too_many.rows = MAX_WINDOW_ROWS + 1;
    assert!(matches!(too_many.fits(&p.layout), Err(SketchError::Implausible(_))));
    let mut shadow = crate::shadow::ShadowSummary::empty("2.0.0", 2);
    shadow.rows = u64::MAX;
    let twice = shadow.clone();
    assert!(shadow.merge(&twice));
    assert_eq!(shadow.rows, u64::MAX);
}
