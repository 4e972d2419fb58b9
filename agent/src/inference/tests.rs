//! Engine and model tests on the checked-in fixture models.

use proto::bundle::{DType, GoldenCase, GoldenSet, Manifest, ModelContract, TensorSpec};
use proto::drift::{FeatureDecl, FeatureSketch, ReferenceProfile};

use super::engine::InferError;
use super::thread::EngineHandle;
use crate::telemetry::{spawn_writer, WriterConfig};
use model_runtime::{raw_tract_run, LoadedModel, ModelError};

const MLP: &[u8] = include_bytes!("../../../tests/fixtures/models/mlp.onnx");
const BROKEN: &[u8] = include_bytes!("../../../tests/fixtures/models/broken.onnx");
const GOLDEN: &str = include_str!("../../../tests/fixtures/models/mlp.golden.json");

fn golden() -> GoldenSet {
    let json: serde_json::Value = serde_json::from_str(GOLDEN).unwrap();
    let cases = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| GoldenCase {
            input: serde_json::from_value(c["input"].clone()).unwrap(),
            expected: serde_json::from_value(c["expected"].clone()).unwrap(),
        })
        .collect();
    GoldenSet { tolerance: 1e-4, cases }
}

fn manifest(model: &[u8], reference: ReferenceProfile) -> Manifest {
    let contract = ModelContract {
        input: TensorSpec { name: "features".into(), dtype: DType::F32, shape: vec![1, 8] },
        output: TensorSpec { name: "probabilities".into(), dtype: DType::F32, shape: vec![1, 3] },
        feature_names: (0..8).map(|i| format!("f{i}")).collect(),
        output_labels: vec!["a".into(), "b".into(), "c".into()],
        features: vec![],
    };
    Manifest {
        golden: golden(),
        reference,
        ..Manifest::for_model("tabular", semver::Version::new(1, 0, 0), model, contract)
    }
}

fn rows(n: usize, shift: f32) -> Vec<Vec<f32>> {
    (0..n).map(|i| (0..8).map(|f| (((i * 31 + f * 17) % 97) as f32 / 97.0 - 0.5) * 3.0 + shift).collect()).collect()
}

fn reference() -> ReferenceProfile {
    let loaded = LoadedModel::load(&manifest(MLP, ReferenceProfile::default()), MLP).unwrap();
    model_runtime::reference_profile(&loaded, &rows(500, 0.0)).unwrap()
}

/// Feature 0's mean over a window, from its sketch's sums.
fn feature_mean(summary: &proto::wire::DriftSummary) -> f64 {
    let FeatureSketch::Numeric(s) = &summary.sketch.features[0] else { panic!("numeric") };
    s.mean().unwrap()
}

#[test]
fn the_fixture_model_passes_its_golden_self_test() {
    LoadedModel::load(&manifest(MLP, ReferenceProfile::default()), MLP).unwrap().self_test().unwrap();
}

#[test]
fn a_model_whose_output_shape_breaks_the_contract_is_refused() {
    let err = LoadedModel::load(&manifest(BROKEN, ReferenceProfile::default()), BROKEN).unwrap_err();
    assert!(matches!(err, ModelError::Contract { .. }), "{err}");
    assert!(err.to_string().contains("output shape is [1, 4]"), "{err}");
}

#[test]
fn a_wrong_input_name_in_the_contract_is_refused() {
    let mut m = manifest(MLP, ReferenceProfile::default());
    m.contract.input.name = "pixels".into();
    let err = LoadedModel::load(&m, MLP).unwrap_err();
    assert!(err.to_string().contains("input is named \"features\""), "{err}");
}

#[test]
fn golden_outputs_that_differ_fail_the_self_test() {
    let mut m = manifest(MLP, ReferenceProfile::default());
    m.golden.cases[1].expected[2] += 0.01;
    let err = LoadedModel::load(&m, MLP).unwrap().self_test().unwrap_err();
    assert!(matches!(err, ModelError::Golden { case: 1, index: 2, .. }), "{err}");
}

async fn engine_with_model(dir: &tempfile::TempDir) -> (EngineHandle, crate::telemetry::TelemetrySink) {
    let sink = spawn_writer(WriterConfig::unbounded(dir.path().join("t.db"))).unwrap();
    let engine = EngineHandle::spawn(sink.clone(), 16).unwrap();
    engine.install(LoadedModel::load(&manifest(MLP, reference()), MLP).unwrap(), 1_000).await.unwrap();
    (engine, sink)
}

#[tokio::test]
async fn engine_answers_exactly_what_raw_tract_answers_and_records_telemetry() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, sink) = engine_with_model(&dir).await;
    let batch = rows(5, 0.0);
    let response = engine.infer(None, batch.clone()).await.unwrap();
    for (row, output) in batch.iter().zip(&response.outputs) {
        assert_eq!(output, &raw_tract_run(MLP, &[1, 8], row).unwrap());
    }
    assert_eq!((response.model.as_str(), response.version.as_str()), ("tabular", "1.0.0"));
    assert_eq!(sink.flush().await, Some(5));
}

#[tokio::test]
async fn bad_requests_get_errors_that_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _sink) = engine_with_model(&dir).await;
    let err = engine.infer(None, vec![vec![0.0; 8], vec![0.0; 7]]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "input row 1 has 7 values; model \"tabular\" expects 8 (f0, f1, f2, f3, f4, f5, f6, f7)"
    );
    assert_eq!(engine.infer(None, vec![]).await.unwrap_err(), InferError::EmptyBatch);
    assert_eq!(
        engine.infer(Some("nope".into()), rows(1, 0.0)).await.unwrap_err(),
        InferError::UnknownModel("nope".into())
    );
}

#[tokio::test]
async fn each_window_sketches_its_own_rows_and_the_next_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _sink) = engine_with_model(&dir).await;
    engine.infer(None, rows(300, 0.0)).await.unwrap();
    let calm = engine.take_window("tabular".into(), 2_000).await.unwrap();
    engine.infer(None, rows(300, 1.5)).await.unwrap();
    let shifted = engine.take_window("tabular".into(), 3_000).await.unwrap();
    assert_eq!((calm.sketch.rows, shifted.sketch.rows), (300, 300));
    let (calm_mean, shifted_mean) = (feature_mean(&calm), feature_mean(&shifted));
    assert!(calm_mean.abs() < 0.1 && (shifted_mean - 1.5).abs() < 0.1, "calm {calm_mean} shifted {shifted_mean}");
    let FeatureSketch::Numeric(s) = &shifted.sketch.features[0] else { panic!() };
    assert!(s.bins[s.bins.len() - 1] > 0, "shifted rows overflow the reference's range");
    assert!(engine.take_window("tabular".into(), 4_000).await.unwrap().sketch.rows == 0);
}

#[tokio::test]
async fn drift_windows_start_and_end_where_the_callers_clock_says() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _sink) = engine_with_model(&dir).await;
    let first = engine.take_window("tabular".into(), 61_000).await.unwrap();
    let second = engine.take_window("tabular".into(), 121_000).await.unwrap();
    assert_eq!((first.window_start_ms, first.window_end_ms), (1_000, 61_000), "installed at 1 000");
    assert_eq!((second.window_start_ms, second.window_end_ms), (61_000, 121_000));
}

#[tokio::test]
async fn a_panic_inside_inference_fails_that_request_and_the_engine_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, sink) = engine_with_model(&dir).await;
    let err = engine.panic_for_test("tabular").await.unwrap_err();
    assert!(
        matches!(&err, InferError::Panicked { model, message } if model == "tabular" && message == "injected tract panic"),
        "{err}"
    );
    let batch = rows(3, 0.0);
    let response = engine.infer(None, batch.clone()).await.unwrap();
    assert_eq!(response.outputs[2], raw_tract_run(MLP, &[1, 8], &batch[2]).unwrap(), "the rebuilt session answers");
    let counters = engine.counters().await;
    assert_eq!((counters[0].inferences, counters[0].errors), (3, 1));
    assert_eq!(sink.flush().await, Some(3));
}

#[tokio::test]
async fn windows_and_counters_of_several_engine_threads_merge_into_one() {
    use super::engine::{merge_stats, merge_windows, Engine};
    let dir = tempfile::tempdir().unwrap();
    let sink = spawn_writer(WriterConfig::unbounded(dir.path().join("t.db"))).unwrap();
    let model = LoadedModel::load(&manifest(MLP, reference()), MLP).unwrap();
    let (mut a, mut b) = (Engine::new(sink.clone()), Engine::new(sink.clone()));
    a.install(model.clone(), 1_000).unwrap();
    b.install(model, 2_000).unwrap();
    a.infer(None, rows(120, 1.5)).unwrap();
    b.infer(None, rows(180, 1.5)).unwrap();
    let parts = vec![a.take_window("tabular", 9_000).unwrap(), b.take_window("tabular", 9_000).unwrap()];
    let merged = merge_windows(parts).unwrap();
    assert_eq!((merged.sketch.rows, merged.window_start_ms, merged.window_end_ms), (300, 1_000, 9_000));
    let mut whole = Engine::new(sink.clone());
    whole.install(LoadedModel::load(&manifest(MLP, reference()), MLP).unwrap(), 1_000).unwrap();
    whole.infer(None, rows(120, 1.5)).unwrap();
    whole.infer(None, rows(180, 1.5)).unwrap();
    let alone = merge_windows(vec![whole.take_window("tabular", 9_000).unwrap()]).unwrap();
    // The same rows in one thread give the same sketch, latencies aside (timed separately).
    let (mut merged_sketch, mut alone_sketch) = (merged.sketch.clone(), alone.sketch.clone());
    merged_sketch.latency.clear();
    alone_sketch.latency.clear();
    assert_eq!(merged_sketch, alone_sketch);
    let counters = merge_stats(vec![a.stats(), b.stats()], 0);
    assert_eq!((counters.len(), counters[0].inferences), (1, 300));
    assert!(counters[0].latency_p95_us.is_some());
}

#[tokio::test]
async fn several_engine_threads_all_receive_an_installed_model() {
    let dir = tempfile::tempdir().unwrap();
    let sink = spawn_writer(WriterConfig::unbounded(dir.path().join("t.db"))).unwrap();
    let engine = EngineHandle::spawn_threads(sink, 16, 3).unwrap();
    engine.install(LoadedModel::load(&manifest(MLP, reference()), MLP).unwrap(), 1_000).await.unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let stopped =
        engine.serve(super::LocalApi { listener, max_body_bytes: 1 << 20, shutdown: cancel.clone() }).await.unwrap();
    assert_eq!(stopped.len(), 3);
    for _ in 0..30 {
        // New connections each time: the threads share the accepts, and each must have the model.
        let answer = crate::http::client()
            .post(format!("http://{addr}/v1/infer"))
            .json(&serde_json::json!({ "inputs": [vec![0.5f32; 8]] }))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(engine.counters().await[0].inferences, 30);
    cancel.cancel();
    for thread in stopped {
        thread.await.unwrap();
    }
}

#[tokio::test]
async fn a_null_in_a_nullable_feature_is_filled_for_the_model_and_counted_missing_and_elsewhere_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sink = spawn_writer(WriterConfig::unbounded(dir.path().join("t.db"))).unwrap();
    let mut m = manifest(MLP, ReferenceProfile::default());
    m.contract.features = (0..8).map(|i| FeatureDecl::numeric(&format!("f{i}"))).collect();
    m.contract.features[2] = FeatureDecl { fill: Some(0.25), ..FeatureDecl::numeric("f2").nullable() };
    let loaded = LoadedModel::load(&m, MLP).unwrap();
    m.reference = model_runtime::reference_profile(&loaded, &rows(200, 0.0)).unwrap();
    let engine = EngineHandle::spawn(sink, 16).unwrap();
    engine.install(LoadedModel::load(&m, MLP).unwrap(), 1_000).await.unwrap();

    let mut row = rows(1, 0.0).remove(0);
    let mut filled = row.clone();
    filled[2] = 0.25;
    row[2] = f32::NAN;
    let answer = engine.infer(None, vec![row.clone()]).await.unwrap();
    assert_eq!(answer.outputs[0], raw_tract_run(MLP, &[1, 8], &filled).unwrap(), "the model saw the fill");
    let window = engine.take_window("tabular".into(), 2_000).await.unwrap();
    let FeatureSketch::Numeric(f2) = &window.sketch.features[2] else { panic!() };
    assert_eq!((f2.missing, f2.count()), (1, 0));

    row[3] = f32::NAN;
    let err = engine.infer(None, vec![rows(1, 0.0).remove(0), row]).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "input row 1 has no value for feature \"f3\", which model \"tabular\" requires (only features its contract declares nullable may be null)"
    );
}
