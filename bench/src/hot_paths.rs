//! The agent's hot paths and the rollout decision, each against a baseline in the same run.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use edge_agent::inference::{EngineHandle, LoadedModel};
use edge_agent::telemetry::{encode_f32s, spawn_writer, TelemetryRecord, WriterConfig};
use proto::Manifest;
use tract_onnx::prelude::*;

pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

pub struct InferenceFigures {
    pub raw_p50_us: f64,
    pub raw_p95_us: f64,
    /// A request through the engine: the bounded channel to the engine thread, the session run,
    /// the drift sketch update, the telemetry hand-off and the reply.
    pub agent_p50_us: f64,
    pub agent_p95_us: f64,
}

/// Interleaves raw tract `run` and the agent's engine (channel + session + sketch + telemetry
/// hand-off + reply) on the same model and inputs, so both see the same machine state.
pub async fn inference(
    manifest: &Manifest,
    model: &[u8],
    iterations: usize,
    telemetry_dir: &Path,
) -> Result<InferenceFigures> {
    let shape = manifest.contract.input.shape.clone();
    let len: usize = shape.iter().product();
    let input: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &model[..])?
        .with_input_fact(0, f32::fact(shape.clone()).into())?
        .into_optimized()?
        .into_runnable()?;
    let sink = spawn_writer(WriterConfig {
        queue: 65536,
        ..WriterConfig::unbounded(telemetry_dir.join("bench-telemetry.db"))
    })?;
    let engine = EngineHandle::spawn(sink.clone(), 64)?;
    engine.install(LoadedModel::load(manifest, model)?, 0).await?;
    let tensor = Tensor::from_shape(&shape, &input)?;
    let (mut raw, mut agent) = (Vec::new(), Vec::new());
    let warmup = iterations / 10;
    for i in 0..iterations + warmup {
        let started = Instant::now();
        let out = plan.run(tvec!(tensor.clone().into()))?;
        std::hint::black_box(out);
        let raw_us = started.elapsed().as_secs_f64() * 1e6;
        let row = vec![input.clone()];
        let started = Instant::now();
        let out = engine.infer(None, row).await?;
        std::hint::black_box(out);
        let agent_us = started.elapsed().as_secs_f64() * 1e6;
        if i >= warmup {
            raw.push(raw_us);
            agent.push(agent_us);
        }
    }
    sink.flush().await;
    Ok(InferenceFigures {
        raw_p50_us: percentile(&mut raw, 0.5),
        agent_p50_us: percentile(&mut agent, 0.5),
        raw_p95_us: percentile(&mut raw, 0.95),
        agent_p95_us: percentile(&mut agent, 0.95),
    })
}

fn record(i: usize) -> TelemetryRecord {
    TelemetryRecord {
        at_ms: i as u64,
        model: "tabular".into(),
        version: "1.0.0".into(),
        latency_us: 40,
        features: vec![i as f32; 8],
        outputs: vec![0.2, 0.3, 0.5],
    }
}

/// Records per second through the agent's writer vs plain batched rusqlite inserts.
pub async fn telemetry(dir: &Path, records: usize) -> Result<(f64, f64)> {
    let sink = spawn_writer(WriterConfig::unbounded(dir.join("agent.db")))?;
    let started = Instant::now();
    for i in 0..records {
        sink.send_waiting(record(i)).await;
    }
    let stored = sink.flush().await.context("writer stopped")?;
    let agent_rate = records as f64 / started.elapsed().as_secs_f64();
    if stored != records as u64 {
        bail!("writer stored {stored} of {records} records");
    }

    let mut conn = rusqlite::Connection::open(dir.join("raw.db"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE telemetry (id INTEGER PRIMARY KEY, at_ms INTEGER, model TEXT, version TEXT, latency_us INTEGER, features BLOB, outputs BLOB)",
    )?;
    let batch: Vec<TelemetryRecord> = (0..records).map(record).collect();
    let started = Instant::now();
    for chunk in batch.chunks(512) {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached("INSERT INTO telemetry (at_ms, model, version, latency_us, features, outputs) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
            for r in chunk {
                insert.execute(rusqlite::params![
                    r.at_ms as i64,
                    &*r.model,
                    &*r.version,
                    r.latency_us,
                    encode_f32s(&r.features),
                    encode_f32s(&r.outputs)
                ])?;
            }
        }
        tx.commit()?;
    }
    let raw_rate = records as f64 / started.elapsed().as_secs_f64();
    Ok((agent_rate, raw_rate))
}

/// Mean and worst time of `decide` over a rollout of `devices` devices with full observations
/// (status plus 8-feature, 3-class sketches per device), mid-wave with gates judged.
pub fn decide_bench(devices: usize, evaluations: usize) -> Result<(f64, f64)> {
    use fleet_server::rollout::create::create;
    use fleet_server::rollout::decide;
    use fleet_server::rollout::state::{DeviceObservation, VersionMetrics};
    use fleet_server::rollout::DeviceInfo;
    use proto::drift::{FeatureDecl, ReferenceProfile, WindowSketch};
    let infos: Vec<DeviceInfo> = (0..devices)
        .map(|i| DeviceInfo {
            id: format!("dev-{i:06}"),
            labels: [("site".to_string(), format!("s{}", i % 7))].into(),
            active_version: Some("1.0.0".into()),
            ..Default::default()
        })
        .collect();
    let plan: proto::rollout::RolloutPlan = toml::from_str(
        "model = \"tabular\"\nversion = \"2.0.0\"\nholdout = 0.1\nwaves = [{percent = 1.0}, {percent = 10.0}, {percent = 50.0}, {percent = 100.0}]\nmax_concurrent = 100000",
    )?;
    let mut rollout = create("bench", plan, &infos, &Default::default(), 0)?;
    rollout = decide(&rollout, &Default::default(), 1).rollout;
    rollout.wave = 2;
    rollout = decide(&rollout, &Default::default(), 2).rollout;
    // An 8-feature, 3-class window of 1,000 rows, like a device's after a minute of traffic.
    let decls: Vec<FeatureDecl> = (0..8).map(|i| FeatureDecl::numeric(&format!("f{i}"))).collect();
    let rows: Vec<Vec<f32>> = (0..1000).map(|i| (0..8).map(|f| ((i * (f + 3)) % 97) as f32).collect()).collect();
    let outputs: Vec<Vec<f32>> =
        (0..1000).map(|i| vec![[0.75, 0.15, 0.1], [0.1, 0.75, 0.15], [0.15, 0.1, 0.75]][i % 3].to_vec()).collect();
    let profile = ReferenceProfile::build(&decls, &rows, &outputs, 3);
    let mut window = WindowSketch::empty(&profile.layout);
    for (row, output) in rows.iter().zip(&outputs) {
        window.observe(&profile.layout, row, output, 60);
    }
    let counts = |_conf: f64| window.clone();
    let observations: std::collections::BTreeMap<String, DeviceObservation> = rollout
        .members
        .iter()
        .map(|(id, m)| {
            let version = if m.wave.is_some() { "2.0.0" } else { "1.0.0" };
            let mut o = DeviceObservation {
                active_version: Some(version.into()),
                step: Some(proto::wire::UpdateStep::Active),
                step_version: Some(version.into()),
                ..Default::default()
            };
            let metrics = VersionMetrics {
                sketch: counts(0.75),
                input_drift: Some(0.05),
                drift_share: Some(0.0),
                inferences: 1000,
                errors: 1,
                latency_p95_us: Some(64.0),
                shadow: None,
            };
            o.metrics.insert(version.into(), metrics);
            (id.clone(), o)
        })
        .collect();
    let (mut total, mut worst) = (0.0f64, 0.0f64);
    for i in 0..evaluations {
        let started = Instant::now();
        let decision = decide(&rollout, &observations, 10 + i as u64);
        std::hint::black_box(&decision);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        total += ms;
        worst = worst.max(ms);
    }
    Ok((total / evaluations as f64, worst))
}
