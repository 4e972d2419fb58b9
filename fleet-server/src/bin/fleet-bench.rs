//! fleet-bench: measures the agent against baselines taken in the same run and writes the ratios,
//! with the command, to docs/BENCHMARKS.md. Run from the workspace root:
//!
//! ```text
//! cargo build --release --locked --bins && target/release/fleet-bench --write docs/BENCHMARKS.md
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use edge_agent::inference::engine::{infer as engine_infer, Serving};
use edge_agent::inference::{EngineHandle, LoadedModel};
use edge_agent::telemetry::{spawn_writer, TelemetryRecord, WriterConfig};
use edge_agent::updater::disk::Layout;
use fleet_server::demo::{fixture_bundle, synthetic_rows};
use proto::bundle::{
    file_entry, DType, GoldenSet, Lineage, Manifest, ModelContract, TensorSpec, FORMAT_VERSION, MODEL_PATH,
};
use proto::keys::{parse_secret_key, public_key_hex};
use tract_onnx::prelude::*;

#[derive(Parser)]
#[command(about = "Benchmarks of the agent's hot paths against same-run baselines.")]
struct Args {
    /// Write the report to this Markdown file (docs/BENCHMARKS.md).
    #[arg(long)]
    write: Option<PathBuf>,
    /// Iterations per inference measurement.
    #[arg(long, default_value_t = 2000)]
    mlp_iterations: usize,
    #[arg(long, default_value_t = 60)]
    cnn_iterations: usize,
    /// Telemetry records per ingest measurement.
    #[arg(long, default_value_t = 300_000)]
    records: usize,
}

const CNN: &[u8] = include_bytes!("../../../tests/fixtures/models/cnn.onnx");
const MLP: &[u8] = include_bytes!("../../../tests/fixtures/models/mlp.onnx");

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn manifest(name: &str, model: &[u8], input: (&str, Vec<usize>), output: (&str, Vec<usize>)) -> Manifest {
    Manifest {
        format: FORMAT_VERSION,
        name: name.into(),
        version: semver::Version::new(1, 0, 0),
        created_at: 0,
        files: vec![file_entry(MODEL_PATH, model)],
        contract: ModelContract {
            input: TensorSpec { name: input.0.into(), dtype: DType::F32, shape: input.1 },
            output: TensorSpec { name: output.0.into(), dtype: DType::F32, shape: output.1 },
            feature_names: vec![],
            output_labels: vec![],
        },
        golden: GoldenSet { tolerance: 0.0, cases: vec![] },
        reference: Default::default(),
        lineage: Lineage::default(),
    }
}

struct InferenceFigures {
    raw_p50_us: f64,
    /// In-engine path: session run + sketch update + telemetry hand-off.
    agent_p50_us: f64,
    raw_p95_us: f64,
    agent_p95_us: f64,
    /// The whole request through the engine channel (what a local API call adds to the above).
    channel_p50_us: f64,
}

/// Interleaves raw tract `run` and the agent path (engine channel + session + sketch + telemetry
/// hand-off) on the same model and inputs, so both see the same machine state.
async fn inference(
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
        path: telemetry_dir.join("bench-telemetry.db"),
        queue: 65536,
        batch: 512,
        max_rows: 10_000_000,
    })?;
    let engine = EngineHandle::spawn(sink.clone(), 64)?;
    engine.install(LoadedModel::load(manifest, model)?).await?;
    let mut serving = Serving::new(LoadedModel::load(manifest, model)?)?;
    let tensor = Tensor::from_shape(&shape, &input)?;
    let (mut raw, mut agent, mut channel) = (Vec::new(), Vec::new(), Vec::new());
    let warmup = iterations / 10;
    for i in 0..iterations + warmup {
        let started = Instant::now();
        let out = plan.run(tvec!(tensor.clone().into()))?;
        std::hint::black_box(out);
        let raw_us = started.elapsed().as_secs_f64() * 1e6;
        let row = vec![input.clone()];
        let started = Instant::now();
        let out = engine_infer(&mut serving, row, &sink)?;
        std::hint::black_box(out);
        let agent_us = started.elapsed().as_secs_f64() * 1e6;
        let row = vec![input.clone()];
        let started = Instant::now();
        let out = engine.infer(None, row).await?;
        std::hint::black_box(out);
        let channel_us = started.elapsed().as_secs_f64() * 1e6;
        if i >= warmup {
            raw.push(raw_us);
            agent.push(agent_us);
            channel.push(channel_us);
        }
    }
    sink.flush().await;
    Ok(InferenceFigures {
        raw_p50_us: percentile(&mut raw, 0.5),
        agent_p50_us: percentile(&mut agent, 0.5),
        raw_p95_us: percentile(&mut raw, 0.95),
        agent_p95_us: percentile(&mut agent, 0.95),
        channel_p50_us: percentile(&mut channel, 0.5),
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
async fn telemetry(dir: &Path, records: usize) -> Result<(f64, f64)> {
    let sink =
        spawn_writer(WriterConfig { path: dir.join("agent.db"), queue: 8192, batch: 512, max_rows: u64::MAX >> 1 })?;
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
                    edge_agent::telemetry::encode_f32s(&r.features),
                    edge_agent::telemetry::encode_f32s(&r.outputs)
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
fn decide_bench(devices: usize, evaluations: usize) -> Result<(f64, f64)> {
    use fleet_server::rollout::create::{create, DeviceInfo};
    use fleet_server::rollout::decide;
    use fleet_server::rollout::state::{DeviceObservation, VersionMetrics};
    use proto::drift::SketchCounts;
    let infos: Vec<DeviceInfo> = (0..devices)
        .map(|i| DeviceInfo {
            id: format!("dev-{i:06}"),
            labels: [("site".to_string(), format!("s{}", i % 7))].into(),
            active_version: Some("1.0.0".into()),
        })
        .collect();
    let plan: proto::rollout::RolloutPlan = toml::from_str(
        "model = \"tabular\"\nversion = \"2.0.0\"\nholdout = 0.1\nwaves = [{percent = 1.0}, {percent = 10.0}, {percent = 50.0}, {percent = 100.0}]\nmax_concurrent = 100000",
    )?;
    let mut rollout = create("bench", plan, &infos, &Default::default(), 0)?;
    rollout = decide(&rollout, &Default::default(), 1).rollout;
    rollout.wave = 2;
    rollout = decide(&rollout, &Default::default(), 2).rollout;
    let counts = |conf: f64| SketchCounts {
        samples: 1000,
        features: vec![vec![100; 10]; 8],
        classes: vec![300, 400, 300],
        confidence_micros: (conf * 1e9) as u64,
    };
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
                counts: counts(0.75),
                input_drift: Some(0.05),
                inferences: 1000,
                errors: 1,
                latency_p95_us: Some(64.0),
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

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// Starts the real edge-agent binary offline (no server), optionally with the MLP installed, and
/// reads its resident set once the local API answers.
async fn agent_rss(agent_bin: &Path, dir: &Path, with_model: bool) -> Result<u64> {
    let secret = hex::encode([3u8; 32]);
    let public = public_key_hex(&parse_secret_key(&secret)?.verifying_key());
    let data_dir = dir.join(if with_model { "rss-model" } else { "rss-idle" });
    std::fs::create_dir_all(&data_dir)?;
    if with_model {
        let bundle = fixture_bundle(&secret, "1.0.0", MLP)?;
        let trusted = proto::TrustedKeys::from_hex([public.as_str()])?;
        let verified = proto::bundle::read_archive(&bundle, &Default::default())?.verify(&trusted)?;
        let layout = Layout::new(&data_dir);
        layout.stage(&verified)?;
        layout.activate("tabular", "1.0.0")?;
    }
    let port = fleet_server::server::free_loopback_port()?;
    let config = format!(
        "server_url = \"http://127.0.0.1:9\"\nenrollment_token = \"offline\"\ndata_dir = \"{}\"\ntrusted_keys = [\"{public}\"]\nmqtt_url = \"mqtt://127.0.0.1:9\"\napi_listen = \"127.0.0.1:{port}\"\n",
        data_dir.display()
    );
    let config_path = data_dir.join("agent.toml");
    std::fs::write(&config_path, config)?;
    let mut child = std::process::Command::new(agent_bin)
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", agent_bin.display()))?;
    let http = edge_agent::http::client();
    let want = if with_model { "tabular" } else { "{}" };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = http.get(format!("http://127.0.0.1:{port}/v1/models")).send().await;
        if let Ok(response) = body {
            if response.text().await.unwrap_or_default().contains(want) {
                break;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("edge-agent did not come up on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if with_model {
        let rows = synthetic_rows(1, 100, 0.0);
        http.post(format!("http://127.0.0.1:{port}/v1/infer"))
            .json(&serde_json::json!({ "inputs": rows }))
            .send()
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    rss
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let agent_bin = exe.with_file_name("edge-agent");
    let profile =
        if cfg!(debug_assertions) { "debug (numbers are not representative; use --release)" } else { "release" };
    eprintln!("profile: {profile}");

    let mlp = manifest("tabular", MLP, ("features", vec![1, 8]), ("probabilities", vec![1, 3]));
    let cnn = manifest("camera", CNN, ("image", vec![1, 3, 224, 224]), ("logits", vec![1, 10]));
    eprintln!("MLP inference ({} iterations)...", args.mlp_iterations);
    let m = inference(&mlp, MLP, args.mlp_iterations, dir.path()).await?;
    eprintln!("CNN inference ({} iterations)...", args.cnn_iterations);
    let c = inference(&cnn, CNN, args.cnn_iterations, dir.path()).await?;
    eprintln!("telemetry ingest ({} records)...", args.records);
    let (agent_rate, raw_rate) = telemetry(dir.path(), args.records).await?;
    eprintln!("rollout decide over 10,000 devices...");
    let (decide_mean_ms, decide_worst_ms) = decide_bench(10_000, 20)?;
    let binary_mb = std::fs::metadata(&agent_bin).map(|m| m.len() as f64 / 1e6).ok();
    eprintln!("agent RSS...");
    let idle = agent_rss(&agent_bin, dir.path(), false).await.map_err(|e| eprintln!("RSS idle: {e:#}")).ok();
    let loaded = agent_rss(&agent_bin, dir.path(), true).await.map_err(|e| eprintln!("RSS loaded: {e:#}")).ok();

    let mib = |k: Option<u64>| k.map_or("n/a".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    let cnn_ratio = c.agent_p50_us / c.raw_p50_us;
    let mlp_extra = m.agent_p50_us - m.raw_p50_us;
    let telemetry_ratio = agent_rate / raw_rate;
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let report = format!(
        "# Benchmarks\n\n\
Measured by `cargo build --release --locked --bins && target/release/fleet-bench --write docs/BENCHMARKS.md`\n\
(profile: {profile}; {cores} cores, {host}). Every figure is a ratio or difference against a baseline\n\
measured in the same run, interleaved where possible; absolute times vary with the machine.\n\n\
| what | agent | baseline (same run) | ratio / difference | target | verdict |\n\
|---|---|---|---|---|---|\n\
| CNN (MobileNetV2-shaped, 224x224) inference p50 | {cap50:.0} µs | raw tract `run` {crp50:.0} µs | {cnn_ratio:.3}x | <= 1.05x | {v1} |\n\
| CNN inference p95 | {cap95:.0} µs | {crp95:.0} µs | {cnn95:.3}x | | |\n\
| MLP (8->16->16->3) inference p50 | {map50:.1} µs | raw tract `run` {mrp50:.1} µs | {mlp_extra:+.1} µs | <= +5 µs | {v2} |\n\
| MLP inference p95 | {map95:.1} µs | {mrp95:.1} µs | {mlp95:+.1} µs | | |\n\
| MLP request through the engine channel, p50 | {mcp50:.1} µs | raw tract `run` {mrp50:.1} µs | {mlp_channel:+.1} µs | (informative) | |\n\
| CNN request through the engine channel, p50 | {ccp50:.0} µs | raw tract `run` {crp50:.0} µs | {cnn_channel:.3}x | (informative) | |\n\
| telemetry ingest | {agent_rate:.0} rec/s | raw batched rusqlite {raw_rate:.0} rec/s | {telemetry_ratio:.2}x | >= 200k rec/s and >= 0.3x | {v3} |\n\
| rollout `decide` over 10,000 devices (mid-rollout, gates judged), mean of 20 | {decide_mean_ms:.1} ms (worst {decide_worst_ms:.1} ms) | | | <= 1 s | {v7} |\n\
| stripped release `edge-agent` binary | {bin} | | | <= 25 MB | {v4} |\n\
| agent RSS, idle (no model) | {idle} | | | <= 15 MiB | {v5} |\n\
| agent RSS, MLP loaded after 100 inferences | {loaded} | | | <= 20 MiB | {v6} |\n\n\
The agent path is the engine's hot path (`inference::engine::infer`): validation, a run on a\n\
reused tract session, the drift sketch update and the telemetry hand-off with `try_send`. The\n\
\"through the engine channel\" rows add what a local API request also pays: the bounded channel\n\
to the engine thread and the reply. The baseline is `SimplePlan::run` on the same optimized model. The\n\
telemetry figure includes the channel hop to the writer thread and the batched transaction.\n\
RSS is read from /proc of the real `edge-agent` binary started offline.\n",
        cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cap50 = c.agent_p50_us,
        crp50 = c.raw_p50_us,
        cap95 = c.agent_p95_us,
        crp95 = c.raw_p95_us,
        cnn95 = c.agent_p95_us / c.raw_p95_us,
        v1 = verdict(cnn_ratio <= 1.05),
        map50 = m.agent_p50_us,
        mrp50 = m.raw_p50_us,
        map95 = m.agent_p95_us,
        mrp95 = m.raw_p95_us,
        mlp95 = m.agent_p95_us - m.raw_p95_us,
        mcp50 = m.channel_p50_us,
        mlp_channel = m.channel_p50_us - m.raw_p50_us,
        ccp50 = c.channel_p50_us,
        cnn_channel = c.channel_p50_us / c.raw_p50_us,
        v2 = verdict(mlp_extra <= 5.0),
        v3 = verdict(agent_rate >= 200_000.0 && telemetry_ratio >= 0.3),
        bin = binary_mb.map_or("n/a".into(), |b| format!("{b:.1} MB")),
        v4 = verdict(binary_mb.is_some_and(|b| b <= 25.0)),
        idle = mib(idle),
        v5 = verdict(idle.is_some_and(|k| k <= 15 * 1024)),
        loaded = mib(loaded),
        v6 = verdict(loaded.is_some_and(|k| k <= 20 * 1024)),
        v7 = verdict(decide_worst_ms <= 1000.0),
    );
    print!("{report}");
    if let Some(path) = args.write {
        std::fs::write(&path, &report).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
