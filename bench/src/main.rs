//! fleet-bench: measures the agent against baselines taken in the same run and writes the ratios,
//! with the command, to docs/BENCHMARKS.md. Run from the workspace root:
//!
//! ```text
//! cargo build --release --locked --bins && target/release/fleet-bench --write docs/BENCHMARKS.md
//! target/release/fleet-bench delivery --write docs/BENCHMARKS.md
//! target/release/fleet-bench drift --write docs/BENCHMARKS.md
//! target/release/fleet-bench dashboard --write docs/BENCHMARKS.md
//! ```
//!
//! Each writes its own part of the file and keeps the other's.
//!
//! It lives in its own package and uses only the public APIs of the agent, the server and the
//! model runtime: what it measures is what a caller of those crates gets.

mod dashboard;
mod database;
mod delivery;
mod drift;
mod hot_paths;
mod local_api;
mod report;
mod retention;
mod tick;
mod wave;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use edge_agent::updater::disk::Layout;
use fleetctl::demo::{fixture_bundle, synthetic_rows};
use proto::bundle::{DType, ModelContract, TensorSpec};
use proto::keys::{parse_secret_key, public_key_hex};
use proto::Manifest;
use report::write_section;

use local_api::ServerProcess;

#[derive(Parser)]
#[command(about = "Benchmarks of the agent's hot paths against same-run baselines.")]
struct Args {
    #[command(subcommand)]
    command: Option<Mode>,
    /// Write the report to this Markdown file (docs/BENCHMARKS.md).
    #[arg(long)]
    write: Option<PathBuf>,
    /// Iterations per inference measurement.
    #[arg(long, default_value_t = 2000)]
    mlp_iterations: usize,
    /// CNN iterations: enough that a p50 within 5% is not decided by a few noisy runs.
    #[arg(long, default_value_t = 200)]
    cnn_iterations: usize,
    /// Telemetry records per ingest measurement.
    #[arg(long, default_value_t = 300_000)]
    records: usize,
    /// Local API load: concurrent keep-alive connections, rounds per server, seconds per round.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 5.0)]
    round_secs: f64,
}

#[derive(Subcommand)]
enum Mode {
    /// Delivery: idempotent ingest rate, backlog sync times, agent CPU per report.
    Delivery {
        /// Records in each backlog.
        #[arg(long, default_value_t = 100_000)]
        backlog: u64,
        /// Replace the delivery section of this Markdown file (docs/BENCHMARKS.md).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Drift: sketch update cost, summary sizes, sketch tests against exact ones, shadow cost.
    Drift {
        /// Replace the drift section of this Markdown file (docs/BENCHMARKS.md).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Dashboard: the fleet page's load time in headless Chromium at 1,000 devices against 10.
    Dashboard {
        /// chromedriver to drive Chromium with (tests/browser/setup.sh installs it).
        #[arg(long, env = "FLEET_TEST_CHROMEDRIVER", default_value = "/usr/bin/chromedriver")]
        chromedriver: String,
        /// Page loads per fleet size.
        #[arg(long, default_value_t = 9)]
        repeats: usize,
        /// Replace the dashboard section of this Markdown file (docs/BENCHMARKS.md).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Rollout tick: reading a running rollout's drift windows as it ages, every window against
    /// only those stored since the last read.
    Tick {
        /// Replace the rollout tick section of this Markdown file (docs/BENCHMARKS.md).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Retention: one prune batch against storing as many drift windows through ingest.
    Retention {
        /// Also measure on this PostgreSQL database (in a schema of its own, dropped after).
        #[arg(long)]
        database_url: Option<String>,
        /// Replace the retention section of this Markdown file (docs/BENCHMARKS.md).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Rollout wave save: a wave's desired writes for 5,000 of 10,000 devices against a save
    /// without them.
    Wave {
        /// Also measure on this PostgreSQL database (in a schema of its own, dropped after).
        #[arg(long)]
        database_url: Option<String>,
        /// Replace the wave save section of this Markdown file (docs/BENCHMARKS.md).
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// The baseline server of the local-API comparison: axum + tract, nothing else.
    #[command(hide = true)]
    BareServer {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        model: PathBuf,
    },
}

/// Prints a benchmark's section, and writes it into the Markdown file `write` names, if any.
fn emit(section: &str, write: Option<&Path>, marker: &str) -> Result<()> {
    print!("{section}");
    match write {
        Some(path) => write_section(path, marker, section),
        None => Ok(()),
    }
}

/// Runs a store benchmark on SQLite in `dir`, then on PostgreSQL when `database_url` names one.
/// The stores block (PostgreSQL's client runs a runtime of its own): off the async runtime.
async fn on_each_store<T: Send + 'static>(
    dir: &Path,
    database_url: &Option<String>,
    run: fn(&Path, Option<&str>) -> Result<T>,
) -> Result<Vec<T>> {
    let (dir, url) = (dir.to_path_buf(), database_url.clone());
    tokio::task::spawn_blocking(move || {
        let mut figures = vec![run(&dir, None)?];
        if let Some(url) = url {
            figures.push(run(&dir, Some(&url))?);
        }
        Ok(figures)
    })
    .await?
}

/// Where the delivery section of docs/BENCHMARKS.md starts.
const DELIVERY_MARKER: &str = "## Delivery";
/// Where the drift section starts.
const DRIFT_MARKER: &str = "## Drift";
/// Where the dashboard section starts.
const DASHBOARD_MARKER: &str = "## Dashboard";
/// Where the rollout tick section starts.
const TICK_MARKER: &str = "## Rollout tick";
/// Where the retention section starts.
const RETENTION_MARKER: &str = "## Retention";
/// Where the rollout wave save section starts.
const WAVE_MARKER: &str = "## Rollout wave save";

const CNN: &[u8] = include_bytes!("../../tests/fixtures/models/cnn.onnx");
const MLP: &[u8] = include_bytes!("../../tests/fixtures/models/mlp.onnx");
const MLP_SHAPE: [usize; 2] = [1, 8];

fn manifest(name: &str, model: &[u8], input: (&str, Vec<usize>), output: (&str, Vec<usize>)) -> Manifest {
    let spec = |(name, shape): (&str, Vec<usize>)| TensorSpec { name: name.into(), dtype: DType::F32, shape };
    let contract = ModelContract {
        input: spec(input),
        output: spec(output),
        feature_names: vec![],
        output_labels: vec![],
        features: vec![],
    };
    Manifest::for_model(name, semver::Version::new(1, 0, 0), model, contract)
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// Starts the real edge-agent binary offline (no server), optionally with the MLP installed.
fn start_agent(agent_bin: &Path, dir: &Path, with_model: bool) -> Result<ServerProcess> {
    let secret = hex::encode([3u8; 32]);
    let public = public_key_hex(&parse_secret_key(&secret)?.verifying_key());
    let data_dir = dir.join(if with_model { "agent-model" } else { "agent-idle" });
    std::fs::create_dir_all(&data_dir)?;
    if with_model && Layout::new(&data_dir).current("tabular").is_none() {
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
    ServerProcess::start("agent", local_api::agent_command(agent_bin, &config_path), port)
}

/// RSS of the agent once its local API answers: idle (no model) or after 100 inferences.
async fn agent_rss(agent_bin: &Path, dir: &Path, with_model: bool) -> Result<u64> {
    let agent = start_agent(agent_bin, dir, with_model)?;
    let http = edge_agent::http::client();
    let want = if with_model { "tabular" } else { "{}" };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = http.get(format!("http://127.0.0.1:{}/v1/models", agent.port)).send().await {
            if response.text().await.unwrap_or_default().contains(want) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("edge-agent did not come up on port {}", agent.port);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if with_model {
        let rows = synthetic_rows(1, 100, 0.0);
        http.post(format!("http://127.0.0.1:{}/v1/infer", agent.port))
            .json(&serde_json::json!({ "inputs": rows }))
            .send()
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    rss_kib(agent.pid())
}

async fn local_api_comparison(args: &Args, agent_bin: &Path, dir: &Path) -> Result<local_api::Comparison> {
    let agent = start_agent(agent_bin, dir, true)?;
    let bare_port = fleet_server::server::free_loopback_port()?;
    let model_path = local_api::model_file(dir, MLP)?;
    let bare = ServerProcess::start("bare", local_api::bare_command(bare_port, &model_path)?, bare_port)?;
    let bodies = local_api::bodies(&synthetic_rows(7, 256, 0.0));
    let round = Duration::from_secs_f64(args.round_secs);
    local_api::compare(&agent, &bare, &bodies, args.connections, args.rounds, round).await
}

fn binary_mb(path: &Path) -> Option<f64> {
    std::fs::metadata(path).map(|m| m.len() as f64 / 1e6).ok()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Mode::BareServer { port, model }) = &args.command {
        return local_api::serve_bare(*port, model, MLP_SHAPE.to_vec()).await;
    }
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let agent_bin = exe.with_file_name("edge-agent");
    if let Some(Mode::Delivery { backlog, write }) = &args.command {
        eprintln!("delivery: {backlog}-record backlogs, ingest baseline, CPU per report...");
        let figures = delivery::run(dir.path(), &agent_bin, *backlog).await?;
        let section = delivery::section(&figures);
        return emit(&section, write.as_deref(), DELIVERY_MARKER);
    }
    if let Some(Mode::Dashboard { chromedriver, repeats, write }) = &args.command {
        eprintln!("dashboard: the fleet page at 10 and 1,000 devices in headless Chromium...");
        let section = dashboard::section(&dashboard::run(dir.path(), chromedriver, (*repeats).max(1)).await?);
        return emit(&section, write.as_deref(), DASHBOARD_MARKER);
    }
    if let Some(Mode::Tick { write }) = &args.command {
        eprintln!("tick: a rollout's drift windows read in full and since the last read, at 1, 3 and 9 hours...");
        let section = tick::section(&tick::run(dir.path())?);
        return emit(&section, write.as_deref(), TICK_MARKER);
    }
    if let Some(Mode::Retention { database_url, write }) = &args.command {
        eprintln!("retention: a prune batch against storing as many drift windows, a day of 200 devices stored...");
        let section = retention::section(&on_each_store(dir.path(), database_url, retention::run).await?);
        return emit(&section, write.as_deref(), RETENTION_MARKER);
    }
    if let Some(Mode::Wave { database_url, write }) = &args.command {
        eprintln!("wave: saving a rollout over 10,000 devices with and without a wave's desired writes...");
        let section = wave::section(&on_each_store(dir.path(), database_url, wave::run).await?);
        return emit(&section, write.as_deref(), WAVE_MARKER);
    }
    if let Some(Mode::Drift { write }) = &args.command {
        eprintln!("drift: sketch cost, summary sizes, accuracy against exact statistics, shadow cost...");
        let mlp = manifest("tabular", MLP, ("features", MLP_SHAPE.to_vec()), ("probabilities", vec![1, 3]));
        let section = drift::section(&drift::run(&mlp, MLP, dir.path()).await?);
        return emit(&section, write.as_deref(), DRIFT_MARKER);
    }
    let server_bin = exe.with_file_name("fleet-server");
    let profile =
        if cfg!(debug_assertions) { "debug (numbers are not representative; use --release)" } else { "release" };
    eprintln!("profile: {profile}");

    eprintln!(
        "local API under load ({} connections, {} rounds of {} s per server)...",
        args.connections, args.rounds, args.round_secs
    );
    let api = local_api_comparison(&args, &agent_bin, dir.path()).await?;
    let mlp = manifest("tabular", MLP, ("features", MLP_SHAPE.to_vec()), ("probabilities", vec![1, 3]));
    let cnn = manifest("camera", CNN, ("image", vec![1, 3, 224, 224]), ("logits", vec![1, 10]));
    eprintln!("MLP inference ({} iterations)...", args.mlp_iterations);
    let m = hot_paths::inference(&mlp, MLP, args.mlp_iterations, dir.path()).await?;
    eprintln!("CNN inference ({} iterations)...", args.cnn_iterations);
    let c = hot_paths::inference(&cnn, CNN, args.cnn_iterations, dir.path()).await?;
    eprintln!("telemetry ingest ({} records)...", args.records);
    let (agent_rate, raw_rate) = hot_paths::telemetry(dir.path(), args.records).await?;
    eprintln!("rollout decide over 10,000 devices...");
    let (decide_mean_ms, decide_worst_ms) = hot_paths::decide_bench(10_000, 20)?;
    eprintln!("agent RSS...");
    let idle = agent_rss(&agent_bin, dir.path(), false).await.map_err(|e| eprintln!("RSS idle: {e:#}")).ok();
    let loaded = agent_rss(&agent_bin, dir.path(), true).await.map_err(|e| eprintln!("RSS loaded: {e:#}")).ok();

    let figures = Figures {
        profile,
        api,
        mlp: m,
        cnn: c,
        telemetry: (agent_rate, raw_rate),
        decide_ms: (decide_mean_ms, decide_worst_ms),
        agent_mb: binary_mb(&agent_bin),
        server_mb: binary_mb(&server_bin),
        rss_idle_kib: idle,
        rss_loaded_kib: loaded,
    };
    let report = report(&figures);
    print!("{report}");
    if let Some(path) = args.write {
        // Keep the sections the other modes (and people) write: everything from the first `## `.
        let existing = std::fs::read_to_string(&path).unwrap_or_default();
        let kept = existing.find("\n## ").map(|at| existing[at..].to_string()).unwrap_or_default();
        std::fs::write(&path, format!("{report}{kept}")).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

struct Figures {
    profile: &'static str,
    api: local_api::Comparison,
    mlp: hot_paths::InferenceFigures,
    cnn: hot_paths::InferenceFigures,
    telemetry: (f64, f64),
    decide_ms: (f64, f64),
    agent_mb: Option<f64>,
    server_mb: Option<f64>,
    rss_idle_kib: Option<u64>,
    rss_loaded_kib: Option<u64>,
}

fn report(f: &Figures) -> String {
    let mib = |k: Option<u64>| k.map_or("n/a".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    let mb = |b: Option<f64>| b.map_or("n/a".to_string(), |b| format!("{b:.1} MB"));
    let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let (api_agent, api_bare) = (f.api.agent_rps(), f.api.bare_rps());
    let api_ratio = api_agent / api_bare;
    let (agent_rss, bare_rss) = (f.api.agent_rss_kib(), f.api.bare_rss_kib());
    let cnn_ratio = f.cnn.agent_p50_us / f.cnn.raw_p50_us;
    let mlp_extra = f.mlp.agent_p50_us - f.mlp.raw_p50_us;
    let (agent_rate, raw_rate) = f.telemetry;
    let telemetry_ratio = agent_rate / raw_rate;
    let (decide_mean, decide_worst) = f.decide_ms;
    format!(
        "# Benchmarks\n\n\
Measured by `cargo build --release --locked --bins && target/release/fleet-bench --write docs/BENCHMARKS.md`\n\
(profile: {profile}; {cores} cores, {host}). Every figure is a ratio or difference against a baseline\n\
measured in the same run, interleaved where possible; absolute times vary with the machine.\n\n\
| what | agent | baseline (same run) | ratio / difference | target | verdict |\n\
|---|---|---|---|---|---|\n\
| local API `POST /v1/infer`, one 8-feature row, {conns} keep-alive connections, median of {rounds} rounds | {api_agent:.0} req/s | bare axum + tract {api_bare:.0} req/s | {api_ratio:.3}x | >= 0.9x | {v_api} |\n\
| RSS under that load (peak sampled) | {agent_rss} | bare {bare_rss} | | <= 20 MiB | {v_rss} |\n\
| CNN (MobileNetV2-shaped, 224x224) request through the engine, p50 | {cap50:.0} µs | raw tract `run` {crp50:.0} µs | {cnn_ratio:.3}x | <= 1.05x | {v_cnn} |\n\
| CNN through the engine, p95 | {cap95:.0} µs | {crp95:.0} µs | {cnn95:.3}x | | |\n\
| MLP (8->16->16->3) request through the engine, p50 | {map50:.1} µs | raw tract `run` {mrp50:.1} µs | {mlp_extra:+.1} µs | (informative) | |\n\
| MLP through the engine, p95 | {map95:.1} µs | {mrp95:.1} µs | {mlp95:+.1} µs | | |\n\
| telemetry ingest | {agent_rate:.0} rec/s | raw batched rusqlite {raw_rate:.0} rec/s | {telemetry_ratio:.2}x | >= 200k rec/s and >= 0.3x | {v_tel} |\n\
| rollout `decide` over 10,000 devices (mid-rollout, gates judged), mean of 20 | {decide_mean:.1} ms (worst {decide_worst:.1} ms) | | | <= 1 s | {v_decide} |\n\
| stripped release `edge-agent` binary | {agent_mb} | | | <= 25 MB | {v_bin} |\n\
| stripped release `fleet-server` binary (links neither the agent nor tract) | {server_mb} | | | | |\n\
| agent RSS, idle (no model) | {idle} | | | <= 15 MiB | {v_idle} |\n\
| agent RSS, MLP loaded after 100 inferences | {loaded} | | | <= 20 MiB | {v_loaded} |\n\n\
The local-API row runs the real `edge-agent` binary offline with the MLP installed (drift sketch\n\
and SQLite telemetry on) and, as a separate process, a bare axum + tract server that parses the\n\
same JSON and runs the same optimized model inline in its handler, nothing else. Both are loaded\n\
by the same in-process keep-alive HTTP/1.1 client (hyper), round by round in alternating order;\n\
the client shares the machine's cores with the server under test. Failed requests: {failures}.\n\
\"Through the engine\" is what a local API request pays beyond the HTTP layer: the bounded channel\n\
to the engine thread, the session run, the drift sketch update, the telemetry hand-off and the\n\
reply; the baseline is `SimplePlan::run` on the same optimized model. The telemetry figure includes\n\
the channel hop to the writer thread and the batched transaction. RSS is read from /proc.\n",
        profile = f.profile,
        cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        conns = f.api.connections,
        rounds = f.api.agent.len(),
        v_api = verdict(api_ratio >= 0.9),
        agent_rss = mib(Some(agent_rss)),
        bare_rss = mib(Some(bare_rss)),
        v_rss = verdict(agent_rss <= 20 * 1024),
        cap50 = f.cnn.agent_p50_us,
        crp50 = f.cnn.raw_p50_us,
        cap95 = f.cnn.agent_p95_us,
        crp95 = f.cnn.raw_p95_us,
        cnn95 = f.cnn.agent_p95_us / f.cnn.raw_p95_us,
        v_cnn = verdict(cnn_ratio <= 1.05),
        map50 = f.mlp.agent_p50_us,
        mrp50 = f.mlp.raw_p50_us,
        map95 = f.mlp.agent_p95_us,
        mrp95 = f.mlp.raw_p95_us,
        mlp95 = f.mlp.agent_p95_us - f.mlp.raw_p95_us,
        v_tel = verdict(agent_rate >= 200_000.0 && telemetry_ratio >= 0.3),
        v_decide = verdict(decide_worst <= 1000.0),
        agent_mb = mb(f.agent_mb),
        v_bin = verdict(f.agent_mb.is_some_and(|b| b <= 25.0)),
        server_mb = mb(f.server_mb),
        idle = mib(f.rss_idle_kib),
        v_idle = verdict(f.rss_idle_kib.is_some_and(|k| k <= 15 * 1024)),
        loaded = mib(f.rss_loaded_kib),
        v_loaded = verdict(f.rss_loaded_kib.is_some_and(|k| k <= 20 * 1024)),
        failures = f.api.failures(),
    )
}

#[cfg(test)]
mod tests {
    use crate::report::replace_section;

    #[test]
    fn a_section_is_replaced_in_place_and_the_others_are_kept() {
        let doc = "# Benchmarks\n\ntable\n\n## Delivery\nold delivery\n\n## Drift\nold drift\n";
        let out = replace_section(doc, "## Delivery", "## Delivery\nnew delivery\n");
        assert_eq!(out, "# Benchmarks\n\ntable\n\n## Delivery\nnew delivery\n## Drift\nold drift\n");
        let out = replace_section(&out, "## Drift", "## Drift\nnew drift\n");
        assert!(out.ends_with("## Drift\nnew drift\n") && out.contains("new delivery"), "{out}");
        assert_eq!(replace_section("# B\n", "## Cross", "## Cross\nx\n"), "# B\n\n## Cross\nx\n");
    }
}
