//! `fleetctl demo`: a real fleet on one machine. A fleet server (embedded MQTT broker, SQLite in a
//! temporary directory), a fresh signing key, a bundle built and signed from the fixture model,
//! N real agents in this process (each with its own data directory, local API and MQTT session),
//! a deployment, synthetic traffic that shifts halfway, and the drift the server receives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_agent::config::{Intervals, Limits as AgentLimits};
use edge_agent::{AgentConfig, AgentHandle};
use proto::bundle::write_archive;
use proto::keys::{parse_secret_key, public_key_hex};
use proto::wire::{DeployRequest, DeviceView};
use serde::Serialize;
use thiserror::Error;

use crate::client::{ClientError, FleetClient};
use crate::packaging::{self, BuildInputs, BundleMetadata, PackagingError};
use crate::scenario::Scenario;
use fleet_server::server::{self, Mqtt, ServerConfig, ServerError};

pub const MODEL: &[u8] = include_bytes!("../../tests/fixtures/models/mlp.onnx");
const METADATA: &str = include_str!("../../tests/fixtures/bundles/tabular.toml");
pub const GOLDEN: &str = include_str!("../../tests/fixtures/models/mlp.golden.json");
const REFERENCE: &str = include_str!("../../tests/fixtures/bundles/reference.csv");
pub const SITES: [&str; 3] = ["plant-a", "plant-b", "plant-c"];

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("demo setup: {0}")]
    Setup(String),
    #[error(transparent)]
    Packaging(#[from] PackagingError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("agent {index} did not start: {source}")]
    Agent { index: usize, source: Box<edge_agent::StartError> },
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("traffic to agent {index} failed: {message}")]
    Traffic { index: usize, message: String },
}

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub agents: usize,
    /// Rows sent to each agent; the second half is shifted.
    pub rows_per_agent: usize,
    /// Use this broker instead of the embedded one.
    pub mqtt_url: Option<String>,
    /// Store in this PostgreSQL database, in a fresh schema, instead of SQLite.
    pub database_url: Option<String>,
    pub timeout: Duration,
    /// Scenario traffic: rows per agent per tick, and the tick.
    pub traffic_rows: usize,
    pub traffic_every: Duration,
    /// The server's retraining watch (window, webhook); the server's default when None.
    pub retrain: Option<fleet_server::retrain::RetrainConfig>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            agents: 5,
            rows_per_agent: 400,
            mqtt_url: None,
            database_url: None,
            timeout: Duration::from_secs(60),
            traffic_rows: 10,
            traffic_every: Duration::from_millis(100),
            retrain: None,
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct DemoDevice {
    pub id: String,
    pub name: String,
    pub site: String,
    pub model_version: Option<String>,
    pub inferences: u64,
    pub drift_summaries: u64,
    /// Share of features drifted in the device's latest window alone.
    pub drift_score: Option<f64>,
    /// In the rollout's control group (never receives the candidate).
    pub holdout: bool,
}

#[derive(Serialize, Debug, Clone)]
pub struct DemoResult {
    pub ok: bool,
    pub model: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<crate::scenario::Scenario>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<crate::scenario::RolloutOutcome>,
    pub devices: Vec<DemoDevice>,
    /// The fleet's drift over the demo: every device's windows merged and tested per feature.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<fleet_server::drift::FeatureVerdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_drift: Option<fleet_server::drift::FeatureVerdict>,
}

/// The features the demo's traffic shifts in its second half (the first four).
pub const SHIFTED_FEATURES: [&str; 4] = ["temperature", "vibration", "pressure", "current"];

/// Builds and signs the fixture bundle with `key_hex`; returns the archive bytes.
pub fn fixture_bundle(secret_key_hex: &str, version: &str, model: &[u8]) -> Result<Vec<u8>, DemoError> {
    bundle_with_golden(secret_key_hex, version, model, GOLDEN)
}

/// Like [`fixture_bundle`] for another model of the same contract, with its own golden file.
pub fn bundle_with_golden(
    secret_key_hex: &str,
    version: &str,
    model: &[u8],
    golden_json: &str,
) -> Result<Vec<u8>, DemoError> {
    signed_bundle(secret_key_hex, fixture_metadata(version)?, model, golden_json)
}

/// The fixture bundle's metadata at `version`, to change before [`signed_bundle`].
pub fn fixture_metadata(version: &str) -> Result<BundleMetadata, DemoError> {
    let mut metadata: BundleMetadata = toml::from_str(METADATA).map_err(|e| DemoError::Setup(e.to_string()))?;
    metadata.version = version.to_string();
    Ok(metadata)
}

/// Builds a bundle of `model` from `metadata` with the fixture's reference rows, signed with
/// `secret_key_hex`; returns the archive bytes.
pub fn signed_bundle(
    secret_key_hex: &str,
    metadata: BundleMetadata,
    model: &[u8],
    golden_json: &str,
) -> Result<Vec<u8>, DemoError> {
    let golden: serde_json::Value = serde_json::from_str(golden_json).map_err(|e| DemoError::Setup(e.to_string()))?;
    let golden = serde_json::from_value(golden["cases"].clone()).map_err(|e| DemoError::Setup(e.to_string()))?;
    let reference_rows = packaging::reference_rows(Path::new("reference.csv"), REFERENCE, &metadata.contract)?;
    let mut bundle = packaging::build(BuildInputs {
        model: model.to_vec(),
        metadata,
        golden,
        reference_rows,
        created_at: fleet_server::unix_ms() / 1000,
    })?;
    let key = parse_secret_key(secret_key_hex).map_err(|e| DemoError::Setup(e.to_string()))?;
    proto::bundle::add_signature(&mut bundle, &key);
    Ok(write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures))
}

pub fn fixture_model() -> &'static [u8] {
    MODEL
}

/// Agent config for a demo or test fleet: fast intervals, loopback API on a free port.
pub fn agent_config(
    server_url: &str,
    mqtt_url: &str,
    token: &str,
    public_key: &str,
    data_dir: PathBuf,
    index: usize,
) -> AgentConfig {
    AgentConfig {
        server_url: server_url.to_string(),
        enrollment_token: Some(token.to_string()),
        name: format!("edge-{index:03}"),
        labels: [("site".to_string(), SITES[index % SITES.len()].to_string())].into(),
        data_dir,
        trusted_keys: vec![public_key.to_string()],
        mqtt_url: mqtt_url.to_string(),
        api_listen: "127.0.0.1:0".parse().expect("literal socket address"),
        metrics_listen: None,
        intervals: Intervals { checkin_secs: 2.0, heartbeat_secs: 0.5, drift_secs: 1.0 },
        // Quick resends and retries: demo and test outages last seconds, not hours.
        limits: AgentLimits { ack_timeout_secs: 3.0, request_timeout_secs: 10.0, ..AgentLimits::default() },
        ca_file: None,
        allow_insecure: false,
        root_file: None,
        time_zone: None,
    }
}

/// Deterministic N(0,1) rows (Box-Muller over a xorshift generator), shifted by `shift` on the
/// first four features.
pub fn synthetic_rows(seed: u64, count: usize, shift: f32) -> Vec<Vec<f32>> {
    // splitmix64 of the seed: xorshift started from a low-entropy state (seed 0 gave state 1)
    // yields tiny numbers for its first draws, so one agent's first rows were extreme outliers.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut state = (z ^ (z >> 31)) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..count)
        .map(|_| {
            (0..8)
                .map(|feature| {
                    let normal = (-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos();
                    normal as f32 + if feature < 4 { shift } else { 0.0 }
                })
                .collect()
        })
        .collect()
}

/// Polls `check` every 100 ms until it returns Some, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, DemoError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::Timeout { what: what.to_string(), secs: timeout.as_secs() });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn send_rows(http: &reqwest::Client, agent: &AgentHandle, rows: &[Vec<f32>]) -> Result<(), String> {
    for batch in rows.chunks(50) {
        let response = http
            .post(format!("http://{}/v1/infer", agent.api_addr))
            .json(&serde_json::json!({ "inputs": batch }))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}: {}", response.status(), response.text().await.unwrap_or_default()));
        }
    }
    Ok(())
}

/// Writes root 1 for a demo fleet: a fresh root key (used once, then dropped), the release key
/// `targets_public` and a fresh timestamp key, one signature each, valid for a year. Returns the
/// timestamp key's secret (hex), for the server.
pub fn write_demo_root(path: &Path, targets_public: &str) -> Result<String, DemoError> {
    let setup = |e: String| DemoError::Setup(e);
    let targets = proto::keys::parse_public_key(targets_public).map_err(|e| setup(e.to_string()))?;
    let root_key = proto::keys::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let timestamp = proto::keys::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let expires = fleet_server::unix_ms() / 1000 + 365 * 86_400;
    let root = proto::root::single_key_root(&root_key, &targets, &timestamp.verifying_key(), expires);
    std::fs::write(path, root.to_json_bytes()).map_err(|e| setup(format!("cannot write {}: {e}", path.display())))?;
    Ok(proto::keys::secret_key_hex(&timestamp))
}

/// A running demo fleet: server, signing key, agents; removed with its temporary directory.
pub struct DemoFleet {
    _dir: tempfile::TempDir,
    pub server: server::ServerHandle,
    pub client: FleetClient,
    pub secret: String,
    pub agents: Vec<AgentHandle>,
}

impl DemoFleet {
    pub async fn shutdown(&self) {
        for agent in &self.agents {
            agent.shutdown().await;
        }
        self.server.shutdown().await;
    }
}

/// Starts a server, enrolls `options.agents` agents, and makes `tabular 1.0.0` active on all.
pub async fn start_fleet(options: &DemoOptions, progress: &impl Fn(&str)) -> Result<DemoFleet, DemoError> {
    let dir = tempfile::tempdir().map_err(|e| DemoError::Setup(e.to_string()))?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let public =
        public_key_hex(&parse_secret_key(&secret).map_err(|e| DemoError::Setup(e.to_string()))?.verifying_key());
    let root_file = dir.path().join("root.json");
    let timestamp_key = write_demo_root(&root_file, &public)?;
    progress(&format!(
        "root of trust {}: one root, one release and one timestamp key, a year to expiry",
        root_file.display()
    ));
    progress("building and signing bundle tabular 1.0.0 from tests/fixtures/models/mlp.onnx");
    let bundle = fixture_bundle(&secret, "1.0.0", MODEL)?;

    let mqtt = match &options.mqtt_url {
        Some(url) => Mqtt::External { url: url.clone() },
        None => {
            let port = server::free_loopback_port().map_err(|e| DemoError::Setup(e.to_string()))?;
            Mqtt::Embedded { listen: ([127, 0, 0, 1], port).into() }
        }
    };
    // Every demo gets a schema of its own: a second run must not meet the first one's devices.
    let database_schema = options.database_url.as_ref().map(|url| {
        let schema = format!("fleet_demo_{}", hex::encode(rand::random::<[u8; 4]>()));
        progress(&format!("storing in PostgreSQL {} (schema {schema})", fleet_server::store::without_password(url)));
        schema
    });
    let server = server::start(ServerConfig {
        listen: "127.0.0.1:0".parse().expect("literal socket address"),
        data_dir: dir.path().join("server"),
        database_url: options.database_url.clone(),
        database_schema,
        mqtt,
        operator_token: None,
        root_file: Some(root_file.clone()),
        timestamp_key: Some(timestamp_key),
        max_bundle_bytes: 64 << 20,
        rollout_tick: std::time::Duration::from_millis(250),
        retrain: options.retrain.clone().unwrap_or_default(),
        ..ServerConfig::default()
    })
    .await?;
    progress(&format!("fleet server on {} with MQTT at {}", server.url(), server.mqtt_url));
    let client = FleetClient::new(&server.url(), &server.operator_token);

    let tokens = client.tokens(options.agents as u32).await?;
    let mut agents = Vec::with_capacity(options.agents);
    for (index, token) in tokens.iter().enumerate() {
        let mut config = agent_config(
            &server.url(),
            &server.mqtt_url,
            token,
            &public,
            dir.path().join(format!("agent-{index:03}")),
            index,
        );
        config.trusted_keys.clear();
        config.root_file = Some(root_file.clone());
        agents.push(
            edge_agent::start(config).await.map_err(|source| DemoError::Agent { index, source: Box::new(source) })?,
        );
    }
    let timeout = options.timeout;
    wait_for("agents to enroll", timeout, || async {
        (client.devices().await.ok()?.len() == options.agents).then_some(())
    })
    .await?;
    progress(&format!("{} agents enrolled across sites {}", options.agents, SITES.join(", ")));

    let info = client.publish(bundle).await?;
    progress(&format!(
        "published {} {} ({} bytes, signed by key {})",
        info.name, info.version, info.size, info.signed_by
    ));
    let deployed = client
        .deploy(&DeployRequest {
            model: info.name.clone(),
            version: info.version.clone(),
            devices: None,
            selector: None,
        })
        .await?;
    progress(&format!(
        "deployed to {} devices; waiting for download, verification, self-test and activation",
        deployed.devices.len()
    ));
    wait_for("every agent to activate the model", timeout, || async {
        let devices = client.devices().await.ok()?;
        let active = devices.iter().filter(|d| active_version(d, &info.name) == Some(info.version.as_str())).count();
        (active == options.agents).then_some(())
    })
    .await?;
    Ok(DemoFleet { _dir: dir, server, client, secret, agents })
}

pub async fn run(options: DemoOptions, progress: impl Fn(&str)) -> Result<DemoResult, DemoError> {
    let fleet = start_fleet(&options, &progress).await?;
    let (client, timeout) = (&fleet.client, options.timeout);
    progress(&format!(
        "every agent serves tabular 1.0.0; sending traffic (second half shifted by +1.5 on {})",
        SHIFTED_FEATURES.join(", ")
    ));
    let started_ms = fleet_server::unix_ms();
    let http = edge_agent::http::client();
    let half = options.rows_per_agent / 2;
    for (phase, shift) in [("normal", 0.0), ("shifted", 1.5)] {
        let sends = fleet.agents.iter().enumerate().map(|(index, agent)| {
            let rows = synthetic_rows(index as u64 * 2 + (shift > 0.0) as u64, half, shift);
            let http = http.clone();
            async move { send_rows(&http, agent, &rows).await.map_err(|message| DemoError::Traffic { index, message }) }
        });
        futures_util::future::try_join_all(sends).await?;
        progress(&format!("{phase} traffic sent: {half} rows per agent"));
        // Close the windows now, so normal and shifted rows land in different drift summaries.
        futures_util::future::join_all(fleet.agents.iter().map(|agent| agent.report_drift_now())).await;
    }
    let sent = (half * 2) as u64;
    let devices = wait_for("drift summaries and inference counts from every agent", timeout, || async {
        let devices = client.devices().await.ok()?;
        let done = devices
            .iter()
            .all(|d| d.models.iter().any(|m| m.name == "tabular" && m.inferences >= sent && m.drift_summaries >= 2));
        done.then_some(devices)
    })
    .await?;
    // A week's bucket holds the whole demo: one merge of every device's windows.
    let report = client.drift("tabular", "", Some(started_ms.saturating_sub(60_000)), 604_800).await?;
    fleet.shutdown().await;
    let devices: Vec<DemoDevice> = devices.iter().map(|d| demo_device(d, "tabular", false)).collect();
    let (drift, prediction_drift) = match report.buckets.into_iter().last() {
        Some(bucket) => (bucket.verdict.features, bucket.verdict.prediction),
        None => (Vec::new(), None),
    };
    let flagged: Vec<&str> = drift.iter().filter(|f| f.drifted).map(|f| f.name.as_str()).collect();
    let ok = devices.iter().all(|d| d.model_version.as_deref() == Some("1.0.0") && d.drift_summaries > 0)
        && flagged == SHIFTED_FEATURES;
    Ok(DemoResult {
        ok,
        model: "tabular".into(),
        version: "1.0.0".into(),
        scenario: None,
        rollout: None,
        devices,
        drift,
        prediction_drift,
    })
}

/// A staged rollout of a candidate 2.0.0 on a live fleet; see `scenario.rs`.
pub async fn run_scenario(
    options: DemoOptions,
    scenario: Scenario,
    progress: impl Fn(&str),
) -> Result<DemoResult, DemoError> {
    let fleet = start_fleet(&options, &progress).await?;
    let agents = std::sync::Arc::new(fleet.agents.clone());
    let traffic = crate::scenario::steady_traffic(agents, options.traffic_rows, options.traffic_every);
    progress(&format!(
        "steady traffic to every agent: {} rows every {} ms",
        options.traffic_rows,
        options.traffic_every.as_millis()
    ));
    let candidate = crate::scenario::candidate(scenario, &fleet.secret, "2.0.0")?;
    let info = fleet.client.publish(candidate).await?;
    let what = match scenario {
        Scenario::Good => "a retrained, healthy model",
        Scenario::BadModel => "a model whose confidence collapsed",
        Scenario::Shadow => "the collapsed model, run in shadow in wave 1 before it may serve",
        Scenario::Offline | Scenario::Retrain => "no candidate",
    };
    progress(&format!(
        "published candidate {} {} ({what}); starting a staged rollout with a 20% holdout",
        info.name, info.version
    ));
    let plan = crate::scenario::plan(scenario, &info.version);
    let view = crate::scenario::drive(&fleet.client, &plan, options.timeout * 2, &progress).await?;
    if let Some(reason) = &view.rollout.reason {
        progress(&format!("rollout {}: {reason}", view.rollout.phase.as_str()));
    }
    let devices = crate::scenario::settle(&fleet.client, &view, options.timeout).await?;
    drop(traffic);
    fleet.shutdown().await;
    let ok = crate::scenario::verdict(scenario, &view, &devices);
    let holdout = |id: &str| view.rollout.members.get(id).is_some_and(|m| m.holdout);
    Ok(DemoResult {
        ok,
        model: info.name,
        version: info.version,
        scenario: Some(scenario),
        rollout: Some(crate::scenario::outcome(&view)),
        devices: devices.iter().map(|d| demo_device(d, "tabular", holdout(&d.id))).collect(),
        drift: Vec::new(),
        prediction_drift: None,
    })
}

fn active_version<'a>(device: &'a DeviceView, model: &str) -> Option<&'a str> {
    device.models.iter().find(|m| m.name == model)?.active_version.as_deref()
}

fn demo_device(device: &DeviceView, model: &str, holdout: bool) -> DemoDevice {
    let view = device.models.iter().find(|m| m.name == model);
    DemoDevice {
        id: device.id.clone(),
        name: device.name.clone(),
        site: device.labels.get("site").cloned().unwrap_or_default(),
        model_version: active_version(device, model).map(str::to_string),
        inferences: view.map_or(0, |m| m.inferences),
        drift_summaries: view.map_or(0, |m| m.drift_summaries),
        drift_score: view.and_then(|m| m.drift_score),
        holdout,
    }
}

pub fn render_table(result: &DemoResult) -> String {
    let mut out = format!(
        "{:<10} {:<18} {:<8} {:<8} {:<8} {:>10} {:>8} {:>11}\n",
        "device", "id", "site", "version", "holdout", "inferences", "drift#", "last drift"
    );
    for d in &result.devices {
        out.push_str(&format!(
            "{:<10} {:<18} {:<8} {:<8} {:<8} {:>10} {:>8} {:>11}\n",
            d.name,
            d.id,
            d.site,
            d.model_version.as_deref().unwrap_or("-"),
            if d.holdout { "yes" } else { "" },
            d.inferences,
            d.drift_summaries,
            d.drift_score.map_or("-".to_string(), |s| format!("{:.0}%", s * 100.0)),
        ));
    }
    if !result.drift.is_empty() {
        out.push_str("\nfleet drift (every device's windows merged, against the bundle's reference):\n");
        out.push_str(&format!(
            "{:<12} {:<8} {:<15} {:>8} {:>10}\n",
            "feature", "drifted", "test", "score", "threshold"
        ));
        for f in result.drift.iter().chain(&result.prediction_drift) {
            out.push_str(&format!(
                "{:<12} {:<8} {:<15} {:>8.3} {:>10.3}\n",
                f.name,
                if f.drifted { "YES" } else { "no" },
                f.test.as_str(),
                f.score,
                f.threshold
            ));
        }
    }
    if let Some(r) = &result.rollout {
        out.push_str(&format!(
            "rollout {}: {} after wave {}/{}{}\n",
            r.id,
            r.state,
            r.waves_started,
            r.waves,
            r.reason.as_ref().map(|why| format!(" ({why})")).unwrap_or_default()
        ));
    }
    let verdict = match (result.ok, result.scenario) {
        (true, None) => "every agent runs the deployed version; exactly the shifted features drifted",
        (false, None) => {
            "FAILED: not every agent runs the deployed version, or other features than the shifted ones drifted"
        }
        (true, Some(Scenario::Good)) => "the candidate reached every non-holdout device; the holdout kept 1.0.0",
        (true, Some(Scenario::BadModel)) => "the candidate was stopped in wave 1 and every device is back on 1.0.0",
        (true, Some(Scenario::Shadow)) => {
            "the candidate disagreed with 1.0.0 in shadow in wave 1 and was stopped before any device served it"
        }
        (true, Some(Scenario::Offline)) => "nothing lost, nothing stored twice",
        (true, Some(Scenario::Retrain)) => "one retraining event each for the shifted site and the fleet",
        (false, Some(_)) => "FAILED: the rollout did not end as the scenario expects",
    };
    out.push_str(&format!("result: {verdict}\n"));
    out
}
