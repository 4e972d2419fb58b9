//! `fleet-bench drift`: what a drift summary costs and how close its tests come to the exact
//! ones. The sketch update against plain summing of the same values; summary sizes as postcard;
//! KS and Wasserstein from sketches against the same statistics computed exactly on the raw
//! values (in this process, same data), with the verdicts both give under the same rule; and the
//! active model's latency with a candidate in shadow at 10% against no shadow, interleaved.

use std::time::Instant;

use anyhow::Result;
use edge_agent::inference::{EngineHandle, LoadedModel};
use edge_agent::telemetry::{spawn_writer, WriterConfig};
use fleet_server::drift::stattest;
use fleetctl::demo::synthetic_rows;
use proto::drift::{FeatureDecl, FeatureSketch, ReferenceProfile, WindowSketch};
use proto::wire::DriftSummary;

use crate::hot_paths::percentile;

pub struct DriftFigures {
    pub update_ns_per_value: f64,
    pub sum_ns_per_value: f64,
    pub summary_32_numeric_bytes: usize,
    pub summary_32_mixed_bytes: usize,
    pub summary_8_bytes: usize,
    pub cases: usize,
    pub ks_gap_mean: f64,
    pub ks_gap_max: f64,
    pub w_gap_mean: f64,
    pub w_gap_max: f64,
    pub ks_agree: f64,
    pub w_agree: f64,
    pub shadow_p50_us: f64,
    pub plain_p50_us: f64,
}

/// `n` N(0, 1) values (the demo's generator: 8 per row).
fn normals(seed: u64, n: usize) -> Vec<f32> {
    synthetic_rows(seed, n.div_ceil(8), 0.0).into_iter().flatten().take(n).collect()
}

fn profile_of(columns: usize, rows: usize, categorical: bool) -> ReferenceProfile {
    let decls: Vec<FeatureDecl> = (0..columns)
        .map(|i| {
            if categorical && i % 2 == 1 {
                let names: Vec<String> = (0..64).map(|c| format!("c{c}")).collect();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                FeatureDecl::categorical(&format!("f{i}"), &refs).nullable()
            } else {
                FeatureDecl::numeric(&format!("f{i}")).nullable()
            }
        })
        .collect();
    let values = normals(1, rows * columns);
    let data: Vec<Vec<f32>> = values
        .chunks(columns)
        .enumerate()
        .map(|(r, row)| {
            row.iter()
                .enumerate()
                .map(|(i, v)| if categorical && i % 2 == 1 { ((r * 7 + i) % 64) as f32 } else { *v })
                .collect()
        })
        .collect();
    let outputs: Vec<Vec<f32>> = data.iter().map(|r| vec![0.5 + r[0] / 10.0, 0.5 - r[0] / 10.0]).collect();
    ReferenceProfile::build(&decls, &data, &outputs, 2)
}

fn summary_bytes(profile: &ReferenceProfile, rows: usize, shift: f32) -> usize {
    let columns = profile.layout.features.len();
    let values = normals(2, rows * columns);
    let mut sketch = WindowSketch::empty(&profile.layout);
    for (r, row) in values.chunks(columns).enumerate() {
        let row: Vec<f32> = row
            .iter()
            .enumerate()
            .map(|(i, v)| match &profile.layout.features[i] {
                proto::drift::FeatureLayout::Categorical { .. } => ((r * 3 + i) % 70) as f32,
                _ => v * 1.3 + shift,
            })
            .collect();
        sketch.observe(&profile.layout, &row, &[0.6, 0.4], 50 + (r % 300) as u32);
    }
    let summary = DriftSummary {
        model: "m".into(),
        version: "1.0.0".into(),
        window_start_ms: 0,
        window_end_ms: 60_000,
        sketch,
        shadow: None,
    };
    proto::wire::encode(&summary).len()
}

/// ns per feature value of `WindowSketch::observe` on 32 numeric features, and of summing the
/// same values into 32 accumulators (the least any per-value work costs).
fn update_cost() -> (f64, f64) {
    let profile = profile_of(32, 5000, false);
    let rows: Vec<Vec<f32>> = normals(3, 100_000 * 32).chunks(32).map(|c| c.to_vec()).collect();
    let mut sketch = WindowSketch::empty(&profile.layout);
    let (mut best_update, mut best_sum) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let started = Instant::now();
        for row in &rows {
            sketch.observe(&profile.layout, row, &[0.6, 0.4], 40);
        }
        best_update = best_update.min(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let mut sums = [0f64; 32];
        for row in &rows {
            for (s, v) in sums.iter_mut().zip(row) {
                *s += *v as f64;
            }
        }
        std::hint::black_box(&sums);
        best_sum = best_sum.min(started.elapsed().as_secs_f64());
    }
    std::hint::black_box(&sketch);
    let values = (rows.len() * 32) as f64;
    (best_update / values * 1e9, best_sum / values * 1e9)
}

/// The exact two-sample KS statistic.
fn exact_ks(a: &mut [f64], b: &mut [f64]) -> f64 {
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (mut i, mut j, mut d) = (0, 0, 0.0f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// The exact Wasserstein-1 distance: ∫ |F - G| over the merged sorted values.
fn exact_wasserstein(a: &[f64], b: &[f64]) -> f64 {
    let mut points: Vec<(f64, bool)> = a.iter().map(|v| (*v, true)).chain(b.iter().map(|v| (*v, false))).collect();
    points.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (mut fa, mut fb, mut w) = (0.0, 0.0, 0.0);
    for pair in points.windows(2) {
        if pair[0].1 {
            fa += 1.0 / a.len() as f64;
        } else {
            fb += 1.0 / b.len() as f64;
        }
        w += (fa - fb).abs() * (pair[1].0 - pair[0].0);
    }
    w
}

fn population_std(values: &[f64]) -> f64 {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt()
}

struct Accuracy {
    ks_gaps: Vec<f64>,
    w_gaps: Vec<f64>,
    ks_agree: usize,
    w_agree: usize,
}

/// Random cases around the thresholds: reference and current sizes from 200 to 5,000, shifts
/// up to 0.5 sd and scales up to 1.4, on normal and log-normal data. Statistics from the
/// sketch (as the server computes them) against the exact ones on the same values.
fn accuracy(cases: usize) -> Accuracy {
    let sizes = [200usize, 1000, 5000];
    let mut out = Accuracy { ks_gaps: Vec::new(), w_gaps: Vec::new(), ks_agree: 0, w_agree: 0 };
    for case in 0..cases {
        let (n, m) = (sizes[case % 3], sizes[(case / 3) % 3]);
        let shift = (case % 11) as f64 * 0.05;
        let scale = 1.0 + (case % 7) as f64 * 0.066;
        let lognormal = case % 2 == 1;
        let draw = |seed: u64, len: usize, shift: f64, scale: f64| -> Vec<f64> {
            normals(seed, len)
                .into_iter()
                .map(|v| {
                    let v = v as f64 * scale + shift;
                    if lognormal {
                        (v * 0.5).exp()
                    } else {
                        v
                    }
                })
                .collect()
        };
        let mut reference = draw(1000 + case as u64, n, 0.0, 1.0);
        let mut current = draw(5000 + case as u64, m, shift, scale);
        let decls = [FeatureDecl::numeric("x")];
        let rows: Vec<Vec<f32>> = reference.iter().map(|v| vec![*v as f32]).collect();
        let profile = ReferenceProfile::build(&decls, &rows, &[], 0);
        let mut sketch = WindowSketch::empty(&profile.layout);
        for v in &current {
            sketch.observe(&profile.layout, &[*v as f32], &[], 0);
        }
        let (FeatureSketch::Numeric(r), FeatureSketch::Numeric(c)) = (&profile.sketch.features[0], &sketch.features[0])
        else {
            continue;
        };
        let proto::drift::FeatureLayout::Numeric { edges, .. } = &profile.layout.features[0] else { continue };
        // The raw values as the sketch saw them (f32).
        reference.iter_mut().for_each(|v| *v = *v as f32 as f64);
        current.iter_mut().for_each(|v| *v = *v as f32 as f64);
        let spread = population_std(&reference);
        let w_exact = exact_wasserstein(&reference, &current) / spread;
        let w_sketch = stattest::wasserstein(edges, r, c) / r.std().unwrap_or(1.0);
        let d_exact = exact_ks(&mut reference, &mut current);
        let d_sketch = stattest::ks_statistic(&r.bins, &c.bins);
        out.ks_gaps.push((d_exact - d_sketch).abs());
        out.w_gaps.push((w_exact - w_sketch).abs());
        let p = |d| stattest::ks_p_value(d, n as u64, m as u64) < 0.05;
        out.ks_agree += usize::from(p(d_exact) == p(d_sketch));
        out.w_agree += usize::from((w_exact >= 0.1) == (w_sketch >= 0.1));
    }
    out
}

/// MLP p50 through two engines, one with the same model in shadow at 10%, interleaved.
async fn shadow_cost(
    mlp: &proto::Manifest,
    model: &[u8],
    iterations: usize,
    dir: &std::path::Path,
) -> Result<(f64, f64)> {
    let sink = spawn_writer(WriterConfig { queue: 65536, ..WriterConfig::unbounded(dir.join("shadow-bench.db")) })?;
    let plain = EngineHandle::spawn(sink.clone(), 64)?;
    let shadowed = EngineHandle::spawn(sink.clone(), 64)?;
    for engine in [&plain, &shadowed] {
        engine.install(LoadedModel::load(mlp, model)?, 0).await?;
    }
    let mut candidate = mlp.clone();
    candidate.version = semver::Version::new(2, 0, 0);
    shadowed.install_shadow(LoadedModel::load(&candidate, model)?, 0.1).await?;
    let rows = synthetic_rows(9, iterations + iterations / 10, 0.0);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for (i, row) in rows.iter().enumerate() {
        for (engine, samples) in [(&shadowed, &mut with), (&plain, &mut without)] {
            let started = Instant::now();
            std::hint::black_box(engine.infer(None, vec![row.clone()]).await?);
            if i >= iterations / 10 {
                samples.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    let compared = shadowed.take_window("tabular".into(), 1).await.and_then(|w| w.shadow).map_or(0, |s| s.rows);
    anyhow::ensure!(compared > 0, "the shadow compared no request");
    sink.flush().await;
    Ok((percentile(&mut with, 0.5), percentile(&mut without, 0.5)))
}

pub async fn run(mlp: &proto::Manifest, model: &[u8], dir: &std::path::Path) -> Result<DriftFigures> {
    let (update_ns_per_value, sum_ns_per_value) = update_cost();
    let numeric = profile_of(32, 5000, false);
    let mixed = profile_of(32, 5000, true);
    let eight = profile_of(8, 4000, false);
    let cases = 600;
    let acc = accuracy(cases);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (shadow_p50_us, plain_p50_us) = shadow_cost(mlp, model, 4000, dir).await?;
    Ok(DriftFigures {
        update_ns_per_value,
        sum_ns_per_value,
        summary_32_numeric_bytes: summary_bytes(&numeric, 10_000, 0.5),
        summary_32_mixed_bytes: summary_bytes(&mixed, 10_000, 0.5),
        summary_8_bytes: summary_bytes(&eight, 1000, 0.0),
        cases,
        ks_gap_mean: mean(&acc.ks_gaps),
        ks_gap_max: max(&acc.ks_gaps),
        w_gap_mean: mean(&acc.w_gaps),
        w_gap_max: max(&acc.w_gaps),
        ks_agree: acc.ks_agree as f64 / cases as f64,
        w_agree: acc.w_agree as f64 / cases as f64,
        shadow_p50_us,
        plain_p50_us,
    })
}

pub fn section(f: &DriftFigures) -> String {
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    let shadow_ratio = f.shadow_p50_us / f.plain_p50_us;
    format!(
        "## Drift\n\n\
Measured by `target/release/fleet-bench drift --write docs/BENCHMARKS.md` (release build).\n\n\
| what | measured | baseline (same run) | ratio | target | verdict |\n\
|---|---|---|---|---|---|\n\
| sketch update, 32 numeric features, per feature value | {u:.1} ns | summing the same values {s:.1} ns | {ur:.1}x | <= 200 ns | {vu} |\n\
| one window's summary (postcard), 32 numeric features, 10,000 rows | {b32} bytes | | | <= 4096 bytes | {vb} |\n\
| the same, 16 numeric + 16 categorical (64 categories each) | {bmix} bytes | | | <= 4096 bytes | {vbm} |\n\
| the same, the demo's 8 features, 1,000 rows | {b8} bytes | | | | |\n\
| KS statistic from the sketch vs exact on the raw values, {cases} random cases | mean gap {ksm:.4}, max {ksx:.4} | | | | |\n\
| KS verdicts (p < 0.05, the same p-value formula) from the sketch vs the exact statistic | {ksa:.1}% agree | | | | |\n\
| Wasserstein / sd from the sketch vs exact, same cases | mean gap {wm:.4}, max {wx:.4} | | | | |\n\
| Wasserstein verdicts (>= 0.1) from the sketch vs exact | {wa:.1}% agree | | | | |\n\
| MLP through the engine with a candidate in shadow at 10%, p50 | {sp:.1} µs | no shadow {pp:.1} µs | {sr:.3}x | within 5% | {vs} |\n\n\
The random cases draw reference and current samples of 200, 1,000 and 5,000 values (normal and\n\
log-normal), shifted by up to 0.5 sd and scaled by up to 1.4, so many sit near the thresholds;\n\
the agreement against scipy on committed scenarios is in docs/DRIFT.md. The shadow row\n\
alternates requests between two engines serving the same MLP, one also copying a tenth of\n\
its requests to a shadow thread running the same network as a candidate.\n",
        u = f.update_ns_per_value,
        s = f.sum_ns_per_value,
        ur = f.update_ns_per_value / f.sum_ns_per_value,
        vu = verdict(f.update_ns_per_value <= 200.0),
        b32 = f.summary_32_numeric_bytes,
        vb = verdict(f.summary_32_numeric_bytes <= 4096),
        bmix = f.summary_32_mixed_bytes,
        vbm = verdict(f.summary_32_mixed_bytes <= 4096),
        b8 = f.summary_8_bytes,
        cases = f.cases,
        ksm = f.ks_gap_mean,
        ksx = f.ks_gap_max,
        ksa = f.ks_agree * 100.0,
        wm = f.w_gap_mean,
        wx = f.w_gap_max,
        wa = f.w_agree * 100.0,
        sp = f.shadow_p50_us,
        pp = f.plain_p50_us,
        sr = shadow_ratio,
        vs = verdict((shadow_ratio - 1.0).abs() <= 0.05),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exact_statistics_are_right_on_small_hand_checked_samples() {
        let (mut a, mut b) = (vec![1.0, 2.0, 3.0, 4.0], vec![3.0, 4.0, 5.0, 6.0]);
        assert_eq!(exact_ks(&mut a, &mut b), 0.5);
        // Shifting every value by 2 moves the distribution by exactly 2.
        assert!((exact_wasserstein(&[1.0, 2.0, 3.0, 4.0], &[3.0, 4.0, 5.0, 6.0]) - 2.0).abs() < 1e-12);
    }
}
