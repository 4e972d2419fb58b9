//! The inference engine's state and hot path: every serving model with its tract session, drift
//! window and counters. It lives on the engine thread (`thread.rs`) and is only ever touched from
//! there. Telemetry leaves through `try_send`, so a request never waits for disk or network. A
//! panic inside tract fails that one request; the model's session is rebuilt and the engine keeps
//! serving. Window boundaries come from the caller's clock (`now_ms` on install and on take), as
//! `decide` takes `now` on the server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use proto::drift::WindowSketch;
use proto::freshness::{OnStale, Standing};
use proto::wire::{DriftSummary, ModelCounters};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::shadow::ShadowTap;
use crate::telemetry::{TelemetryRecord, TelemetrySink};
use crate::unix_ms;
use model_runtime::{LoadedModel, ModelError, Session};

/// Most rows accepted in one request.
pub const MAX_BATCH_ROWS: usize = 1024;
/// Inputs larger than this (images) are not copied into telemetry: the drift sketch and the
/// outputs describe them; storing every frame would fill a device's disk in hours.
pub const MAX_TELEMETRY_INPUT_VALUES: usize = 1024;

#[derive(Debug, Error, PartialEq)]
pub enum InferError {
    #[error("no model named {0:?} is active on this device")]
    UnknownModel(String),
    #[error("no model is active on this device yet")]
    NoModel,
    #[error("several models are active ({0}); name one in the path /v1/models/<name>/infer")]
    Ambiguous(String),
    #[error("the batch is empty; send at least one row in \"inputs\"")]
    EmptyBatch,
    #[error("the batch has {0} rows; at most {MAX_BATCH_ROWS} are accepted")]
    TooManyRows(usize),
    #[error("input row {row} has {got} values; model {model:?} expects {want}{features}")]
    RowLength { row: usize, got: usize, want: usize, model: String, features: String },
    #[error("input row {row} holds a value that is not a finite number")]
    NotFinite { row: usize },
    #[error("input row {row} has no value for {feature}, which model {model:?} requires (only features its contract declares nullable may be null)")]
    Missing { row: usize, feature: String, model: String },
    #[error("inference failed: {0}")]
    Run(String),
    #[error("inference of model {model:?} panicked ({message}); the request failed, the engine keeps serving")]
    Panicked { model: String, message: String },
    #[error("the inference engine has stopped")]
    Stopped,
    #[error("model {model:?} stopped serving: this device has had no fresh signed instructions since {since} (unix seconds, past the model's offline grace period); it serves again after its next check-in")]
    Stale { model: String, since: u64 },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InferResponse {
    pub model: String,
    pub version: String,
    pub outputs: Vec<Vec<f32>>,
    /// Set when the device has had no fresh signed instructions for longer than the model's
    /// offline grace period and the model's policy is to keep serving (ADR 0010).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

/// How fresh the device's instructions are, for judging each model's offline policy: when the
/// last accepted check-in reply expires, and a time floor that runs on with the monotonic clock
/// (so a device whose wall clock is wrong still sees time pass while it runs).
#[derive(Clone, Copy, Debug)]
pub struct FreshnessClock {
    pub fresh_until: u64,
    pub time_floor: u64,
    pub floor_at: Instant,
}

impl FreshnessClock {
    pub fn new(seen: &proto::freshness::Seen) -> FreshnessClock {
        FreshnessClock { fresh_until: seen.fresh_until, time_floor: seen.time_floor, floor_at: Instant::now() }
    }

    /// The later of the wall clock and the time floor advanced by the time since it was set.
    fn now(&self) -> u64 {
        let floor = self.time_floor.saturating_add(self.floor_at.elapsed().as_secs());
        (unix_ms() / 1000).max(floor)
    }
}

/// A model being served: its tract session, drift window and counters. Owned by the engine thread.
struct Serving {
    model: LoadedModel,
    session: Session,
    name: Arc<str>,
    version: Arc<str>,
    window: WindowSketch,
    window_start_ms: u64,
    /// What the model receives for a missing value, by input index (see `ModelContract::fills`).
    fills: Vec<Option<f32>>,
    /// A candidate in shadow beside this version, and this thread's sampling credit for it.
    shadow: Option<ShadowTap>,
    shadow_credit: f32,
    inferences: u64,
    errors: u64,
    latency: LatencyHistogram,
}

/// Latency buckets in microseconds: four per power of two (HDR-style), so a p95 estimate is
/// within 19% of the true value; fixed memory on the hot path.
#[derive(Clone)]
pub(crate) struct LatencyHistogram {
    buckets: [u64; LatencyHistogram::BUCKETS],
    /// Every recorded latency added up, for a mean (Prometheus' `_sum`).
    sum_us: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: [0; LatencyHistogram::BUCKETS], sum_us: 0 }
    }
}

impl LatencyHistogram {
    const SUB: u32 = 4;
    const BUCKETS: usize = (32 * Self::SUB) as usize + 1;

    fn bucket(micros: u32) -> usize {
        if micros < Self::SUB {
            return micros as usize;
        }
        let octave = 31 - micros.leading_zeros();
        let sub = (micros >> (octave - 2)) & (Self::SUB - 1);
        (octave * Self::SUB + sub) as usize
    }

    /// Exclusive upper edge of a bucket.
    fn upper_edge(bucket: usize) -> u64 {
        let (octave, sub) = (bucket as u64 / 4, bucket as u64 % 4);
        if octave < 2 {
            return bucket as u64 + 1;
        }
        (1u64 << octave) + (sub + 1) * (1u64 << (octave - 2))
    }

    fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self.sum_us += other.sum_us;
    }

    fn record(&mut self, micros: u32) {
        self.buckets[Self::bucket(micros)] += 1;
        self.sum_us += u64::from(micros);
    }

    /// The counts regrouped under fixed upper bounds (µs, rising; a bucket goes under the first
    /// bound at or above its largest value), with what lies above the last bound at the end:
    /// (upper bound in seconds or infinity, requests in that bucket alone).
    fn regrouped(&self, bounds_us: &[u64]) -> Vec<(f64, u64)> {
        let mut out: Vec<(f64, u64)> = bounds_us.iter().map(|b| (*b as f64 / 1e6, 0)).collect();
        out.push((f64::INFINITY, 0));
        for (bucket, count) in self.buckets.iter().enumerate().filter(|(_, c)| **c > 0) {
            let largest = Self::upper_edge(bucket) - 1;
            let slot = bounds_us.iter().position(|b| *b >= largest).unwrap_or(bounds_us.len());
            out[slot].1 += count;
        }
        out
    }

    /// Upper edge of the bucket holding the 95th percentile.
    fn p95(&self) -> Option<u32> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let wanted = (total * 95).div_ceil(100);
        let mut seen = 0;
        for (bucket, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return Some(Self::upper_edge(bucket).min(u32::MAX as u64) as u32);
            }
        }
        None
    }
}

impl Serving {
    fn new(model: LoadedModel, now_ms: u64) -> Result<Serving, ModelError> {
        let session = model.session()?;
        let window = WindowSketch::empty(&model.reference.layout);
        Ok(Serving {
            fills: model.contract.fills(),
            shadow: None,
            shadow_credit: 0.0,
            name: model.name.as_str().into(),
            version: model.version.as_str().into(),
            session,
            model,
            window,
            window_start_ms: now_ms,
            inferences: 0,
            errors: 0,
            latency: LatencyHistogram::default(),
        })
    }
}

/// Every model the device serves; owned by the engine thread.
pub(crate) struct Engine {
    serving: BTreeMap<String, Serving>,
    telemetry: TelemetrySink,
    /// None when the device has no root of trust: nothing goes stale.
    freshness: Option<FreshnessClock>,
}

impl Engine {
    pub(crate) fn new(telemetry: TelemetrySink) -> Engine {
        Engine { serving: BTreeMap::new(), telemetry, freshness: None }
    }

    pub(crate) fn set_freshness(&mut self, clock: FreshnessClock) {
        self.freshness = Some(clock);
    }

    /// The hot path, with a panic inside tract contained to this one request. A model past its
    /// offline grace period answers flagged stale, or not at all, as its policy says.
    pub(crate) fn infer(&mut self, model: Option<String>, rows: Vec<Vec<f32>>) -> Result<InferResponse, InferError> {
        let (telemetry, freshness) = (&self.telemetry, self.freshness);
        guarded_infer(&mut self.serving, model, |s| {
            let standing = freshness.map_or(Standing::Serving, |clock| {
                proto::freshness::standing(&s.model.offline, clock.fresh_until, clock.now())
            });
            match standing {
                Standing::Serving => infer(s, rows, telemetry),
                Standing::Stale { policy: OnStale::KeepServing, .. } => {
                    infer(s, rows, telemetry).map(|answer| InferResponse { stale: true, ..answer })
                }
                Standing::Stale { policy: OnStale::StopServing, since } => {
                    Err(InferError::Stale { model: s.name.to_string(), since })
                }
            }
        })
    }

    #[cfg(test)]
    pub(crate) fn panic_for_test(&mut self, model: String) -> Result<InferResponse, InferError> {
        guarded_infer(&mut self.serving, Some(model), |_| panic!("injected tract panic"))
    }

    /// Swaps a model in (replacing any version of the same name); its first window starts at `now_ms`.
    pub(crate) fn install(&mut self, model: LoadedModel, now_ms: u64) -> Result<(), ModelError> {
        let mut serving = Serving::new(model, now_ms)?;
        // A shadow keeps running beside a reinstalled version, unless it is the version now active.
        if let Some(old) = self.serving.get_mut(&serving.model.name) {
            serving.shadow = old.shadow.take().filter(|tap| *tap.version != *serving.version);
        }
        self.serving.insert(serving.model.name.clone(), serving);
        Ok(())
    }

    /// Starts (or stops, with None) copying a sample of the model's requests to a shadow.
    pub(crate) fn set_shadow(&mut self, model: &str, tap: Option<ShadowTap>) {
        if let Some(serving) = self.serving.get_mut(model) {
            serving.shadow = tap;
            serving.shadow_credit = 0.0;
        }
    }

    /// Closes this engine thread's share of a model's window (merged across threads by
    /// [`merge_windows`]).
    pub(crate) fn take_window(&mut self, model: &str, now_ms: u64) -> Option<WindowPart> {
        self.serving.get_mut(model).map(|s| take_window(s, now_ms))
    }

    pub(crate) fn stats(&self) -> Vec<ModelStats> {
        self.serving
            .values()
            .map(|s| ModelStats {
                model: s.name.to_string(),
                version: s.version.to_string(),
                inferences: s.inferences,
                errors: s.errors,
                latency: s.latency.clone(),
            })
            .collect()
    }

    pub(crate) fn telemetry_dropped(&self) -> u64 {
        self.telemetry.dropped()
    }

    /// Active model name -> version.
    pub(crate) fn active(&self) -> BTreeMap<String, String> {
        self.serving.values().map(|s| (s.name.to_string(), s.version.to_string())).collect()
    }
}

/// Runs one inference with a panic caught: the request fails, the model's session (whose tract
/// state a panic may have left half-updated) is rebuilt, and the engine thread lives on.
fn guarded_infer(
    serving: &mut BTreeMap<String, Serving>,
    model: Option<String>,
    run: impl FnOnce(&mut Serving) -> Result<InferResponse, InferError>,
) -> Result<InferResponse, InferError> {
    let target = pick(serving, model)?;
    let name = target.model.name.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(target))) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            tracing::error!(model = %name, %message, "inference panicked; rebuilding the session");
            if let Some(s) = serving.get_mut(&name) {
                s.errors += 1;
                match s.model.session() {
                    Ok(session) => s.session = session,
                    Err(e) => tracing::error!(model = %name, error = %e, "cannot rebuild the session"),
                }
            }
            Err(InferError::Panicked { model: name, message })
        }
    }
}

fn pick(serving: &mut BTreeMap<String, Serving>, model: Option<String>) -> Result<&mut Serving, InferError> {
    match model {
        Some(name) => serving.get_mut(&name).ok_or(InferError::UnknownModel(name)),
        None if serving.len() > 1 => Err(InferError::Ambiguous(serving.keys().cloned().collect::<Vec<_>>().join(", "))),
        None => serving.values_mut().next().ok_or(InferError::NoModel),
    }
}

fn validate(serving: &Serving, rows: &[Vec<f32>]) -> Result<(), InferError> {
    if rows.is_empty() {
        return Err(InferError::EmptyBatch);
    }
    if rows.len() > MAX_BATCH_ROWS {
        return Err(InferError::TooManyRows(rows.len()));
    }
    let want = serving.model.contract.input.sample_len();
    for (row, values) in rows.iter().enumerate() {
        if values.len() != want {
            let names = &serving.model.contract.feature_names;
            let features = if names.is_empty() { String::new() } else { format!(" ({})", names.join(", ")) };
            return Err(InferError::RowLength {
                row,
                got: values.len(),
                want,
                model: serving.model.name.clone(),
                features,
            });
        }
        // One pass over the row (an image's is 150,000 values): only a value that is not finite
        // is looked at again. NaN is how the API hands over a JSON null; it is a value only where
        // a fill exists.
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            check_not_finite(serving, row, values, index)?;
        }
    }
    Ok(())
}

/// The non-finite values of a row from `first` on: an infinity is refused, a missing value
/// where the contract allows none is refused by feature name.
fn check_not_finite(serving: &Serving, row: usize, values: &[f32], first: usize) -> Result<(), InferError> {
    for (index, v) in values.iter().enumerate().skip(first).filter(|(_, v)| !v.is_finite()) {
        if v.is_infinite() {
            return Err(InferError::NotFinite { row });
        }
        if !has_fill(&serving.fills, index) {
            let names = serving.model.contract.feature_decls();
            let feature = names.get(index).map_or(format!("value {index}"), |d| format!("feature {:?}", d.name));
            return Err(InferError::Missing { row, feature, model: serving.model.name.clone() });
        }
    }
    Ok(())
}

fn has_fill(fills: &[Option<f32>], index: usize) -> bool {
    fills.get(index).is_some_and(Option::is_some)
}

/// The hot path: validate, run each row, update the drift window, hand telemetry off.
fn infer(serving: &mut Serving, rows: Vec<Vec<f32>>, telemetry: &TelemetrySink) -> Result<InferResponse, InferError> {
    validate(serving, &rows)?;
    let mut outputs = Vec::with_capacity(rows.len());
    let nullable = serving.fills.iter().any(Option::is_some);
    for features in rows {
        let filled = (nullable && features.iter().any(|v| v.is_nan()))
            .then(|| proto::bundle::fill_missing(&features, &serving.fills));
        let started = Instant::now();
        let output = match serving.session.run(filled.as_deref().unwrap_or(&features)) {
            Ok(output) => output,
            Err(e) => {
                serving.errors += 1;
                return Err(InferError::Run(e.to_string()));
            }
        };
        let latency_us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
        serving.inferences += 1;
        serving.latency.record(latency_us);
        serving.window.observe(&serving.model.reference.layout, &features, &output, latency_us);
        if let Some(tap) = &serving.shadow {
            // After the answer is computed, a copy at most: the request never waits for the shadow.
            if tap.sampled(&mut serving.shadow_credit) {
                tap.offer(filled.clone().unwrap_or_else(|| features.clone()), output.clone());
            }
        }
        telemetry.offer(TelemetryRecord {
            at_ms: unix_ms(),
            model: serving.name.clone(),
            version: serving.version.clone(),
            latency_us,
            features: if features.len() <= MAX_TELEMETRY_INPUT_VALUES { features } else { Vec::new() },
            outputs: output.clone(),
        });
        outputs.push(output);
    }
    Ok(InferResponse { model: serving.name.to_string(), version: serving.version.to_string(), outputs, stale: false })
}

/// One engine thread's part of a model's drift window.
pub(crate) struct WindowPart {
    summary: DriftSummary,
}

/// One engine thread's counters of a model.
pub(crate) struct ModelStats {
    model: String,
    version: String,
    inferences: u64,
    errors: u64,
    latency: LatencyHistogram,
}

fn take_window(serving: &mut Serving, now: u64) -> WindowPart {
    let fresh = WindowSketch::empty(&serving.model.reference.layout);
    let sketch = std::mem::replace(&mut serving.window, fresh);
    let start = std::mem::replace(&mut serving.window_start_ms, now);
    let summary = DriftSummary {
        model: serving.name.to_string(),
        version: serving.version.to_string(),
        window_start_ms: start,
        window_end_ms: now,
        sketch,
        shadow: None,
    };
    WindowPart { summary }
}

/// The window of every engine thread as one summary: sketches merged (exact), the earliest
/// start. The server runs the tests.
pub(crate) fn merge_windows(parts: Vec<WindowPart>) -> Option<DriftSummary> {
    let mut parts = parts.into_iter();
    let WindowPart { mut summary } = parts.next()?;
    for part in parts.filter(|p| p.summary.version == summary.version) {
        // Same model and version on every thread, so the layouts match.
        let _ = summary.sketch.merge(&part.summary.sketch);
        summary.window_start_ms = summary.window_start_ms.min(part.summary.window_start_ms);
    }
    Some(summary)
}

/// Every engine thread's stats as one per model: counts added, latency histograms merged.
fn per_model(parts: Vec<Vec<ModelStats>>) -> impl Iterator<Item = ModelStats> {
    let mut merged: BTreeMap<String, ModelStats> = BTreeMap::new();
    for stats in parts.into_iter().flatten() {
        match merged.get_mut(&stats.model) {
            Some(total) => {
                total.inferences += stats.inferences;
                total.errors += stats.errors;
                total.latency.merge(&stats.latency);
            }
            None => {
                merged.insert(stats.model.clone(), stats);
            }
        }
    }
    merged.into_values()
}

/// Every engine thread's counters as one line per model, the p95 read from the merged histogram.
pub(crate) fn merge_stats(parts: Vec<Vec<ModelStats>>, telemetry_dropped: u64) -> Vec<ModelCounters> {
    per_model(parts)
        .map(|s| ModelCounters {
            model: s.model,
            version: s.version,
            inferences: s.inferences,
            errors: s.errors,
            telemetry_dropped,
            latency_p95_us: s.latency.p95(),
            shadow_version: None,
        })
        .collect()
}

/// One model's serving since it was loaded, for the device's metrics endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingMetrics {
    pub model: String,
    pub version: String,
    pub inferences: u64,
    pub errors: u64,
    pub latency_sum_secs: f64,
    /// (upper bound in seconds, requests in that bucket alone), the last unbounded.
    pub latency_buckets: Vec<(f64, u64)>,
}

/// Latency bounds of the exported histogram: 50 µs doubling to 3.3 s.
pub const LATENCY_BOUNDS_US: [u64; 17] = [
    50, 100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 51_200, 102_400, 204_800, 409_600, 819_200, 1_638_400,
    3_276_800,
];

pub(crate) fn serving_metrics(parts: Vec<Vec<ModelStats>>) -> Vec<ServingMetrics> {
    per_model(parts)
        .map(|s| ServingMetrics {
            latency_sum_secs: s.latency.sum_us as f64 / 1e6,
            latency_buckets: s.latency.regrouped(&LATENCY_BOUNDS_US),
            model: s.model,
            version: s.version,
            inferences: s.inferences,
            errors: s.errors,
        })
        .collect()
}

#[cfg(test)]
mod latency_tests {
    use super::LatencyHistogram;

    #[test]
    fn regrouped_counts_land_under_the_first_bound_that_holds_them_and_the_sum_adds_up() {
        let mut h = LatencyHistogram::default();
        for micros in [40, 45, 90, 150, 5_000_000] {
            h.record(micros);
        }
        let out = h.regrouped(&[50, 100, 200]);
        assert_eq!(out.iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![2, 1, 1, 1]);
        assert_eq!((out[0].0, out[3].0), (0.00005, f64::INFINITY));
        assert_eq!(h.sum_us, 5_000_325);
    }

    #[test]
    fn the_p95_estimate_is_the_upper_edge_of_its_quarter_octave_bucket() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.p95(), None);
        for _ in 0..95 {
            h.record(40);
        }
        for _ in 0..5 {
            h.record(5000);
        }
        assert_eq!(h.p95(), Some(48), "40 µs lies in [40, 48)");
        h.record(5000);
        assert_eq!(h.p95(), Some(5120), "5000 µs lies in [4096 + 3*1024/4.., 5120)");
    }

    #[test]
    fn every_bucket_edge_is_within_a_quarter_octave_of_the_value() {
        for micros in [1u32, 3, 4, 5, 7, 8, 100, 1000, 65_535, 1 << 20, u32::MAX / 2] {
            let mut h = LatencyHistogram::default();
            h.record(micros);
            let edge = h.p95().unwrap() as f64;
            assert!(edge > micros as f64 && edge <= micros as f64 * 1.25 + 1.0, "{micros} -> {edge}");
        }
    }
}
