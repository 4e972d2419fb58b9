//! A real fleet for integration tests: a fleet server (embedded broker, or the broker named by
//! `FLEET_TEST_MQTT_URL`; SQLite, or the PostgreSQL database named by `FLEET_TEST_DATABASE_URL`),
//! a signing key, and in-process agents with their own data directories.

pub mod proxy;
pub mod stub;
pub mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use edge_agent::AgentHandle;
use fleet_server::server::{self, Mqtt, ServerConfig, ServerHandle};
use fleetctl::client::FleetClient;
use fleetctl::demo::{agent_config, wait_for};
use proto::keys::{parse_secret_key, public_key_hex};
use proto::wire::{BundleInfo, DeployRequest, DeviceModelView, DeviceView};

pub use fleetctl::demo::{bundle_with_golden, fixture_bundle, fixture_model, synthetic_rows};

pub const MLP: &[u8] = include_bytes!("../fixtures/models/mlp.onnx");
pub const MLP_V2: &[u8] = include_bytes!("../fixtures/models/mlp_v2.onnx");
pub const MLP_V2_GOLDEN: &str = include_str!("../fixtures/models/mlp_v2.golden.json");
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The broker tests use: `FLEET_TEST_MQTT_URL` (e.g. mqtt://127.0.0.1:1883) or an embedded one.
pub fn mqtt_from_env() -> Mqtt {
    match std::env::var("FLEET_TEST_MQTT_URL") {
        Ok(url) if !url.is_empty() => Mqtt::External { url },
        _ => embedded_mqtt(),
    }
}

pub fn embedded_mqtt() -> Mqtt {
    let port = server::free_loopback_port().expect("a free loopback port");
    Mqtt::Embedded { listen: ([127, 0, 0, 1], port).into() }
}

pub fn new_key() -> (String, String) {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let public = public_key_hex(&parse_secret_key(&secret).unwrap().verifying_key());
    (secret, public)
}

/// A fleet server for tests: loopback, data under `dir/server`, operator token `op`, trusting
/// `trusted_keys`, rollouts ticking every 200 ms; and an operator client for it.
pub async fn start_server(dir: &std::path::Path, mqtt: Mqtt, trusted_keys: Vec<String>) -> (ServerHandle, FleetClient) {
    start_server_with(ServerConfig { trusted_keys, ..test_server_config(dir, mqtt) }).await
}

/// The configuration [`start_server`] uses, to change before [`start_server_with`].
pub fn test_server_config(dir: &std::path::Path, mqtt: Mqtt) -> ServerConfig {
    let (database_url, database_schema) = test_database(dir);
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("server"),
        database_url,
        database_schema,
        mqtt,
        operator_token: Some("op".into()),
        max_bundle_bytes: 64 << 20,
        rollout_tick: Duration::from_millis(200),
        ..ServerConfig::default()
    }
}

/// The database a test server whose files are under `dir` stores in: (None, None) for SQLite, or
/// `FLEET_TEST_DATABASE_URL` and a schema of that directory's own (the same for every call, so a
/// restarted server finds its tables again).
pub fn test_database(dir: &std::path::Path) -> (Option<String>, Option<String>) {
    let Some(url) = std::env::var("FLEET_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        return (None, None);
    };
    use std::hash::{Hash, Hasher};
    // DefaultHasher::new() has fixed keys: the same directory gives the same schema.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut hasher);
    static CLEANUP: std::sync::Once = std::sync::Once::new();
    CLEANUP.call_once(|| {
        let url = url.clone();
        // The sync client must not run on a tokio worker: a thread of its own.
        let _ = std::thread::spawn(move || drop_stale_test_schemas(&url)).join();
    });
    (Some(url), Some(format!("fleet_it_{:016x}", hasher.finish())))
}

/// Integration tests leave their schemas behind (a test may end anywhere); drops those that
/// were migrated more than an hour ago, so the test database does not grow run after run.
fn drop_stale_test_schemas(url: &str) {
    let Ok(mut client) = postgres::Client::connect(url, postgres::NoTls) else { return };
    let Ok(rows) = client.query(r"SELECT nspname FROM pg_namespace WHERE nspname LIKE 'fleet\_it\_%'", &[]) else {
        return;
    };
    let hour_ago = fleet_server::unix_ms() as i64 - 3_600_000;
    for row in rows {
        let schema: String = row.get(0);
        let sql = format!("SELECT COALESCE(MIN(applied_ms), 0) FROM {schema}.schema_migrations");
        let stale = client.query_one(&sql, &[]).map(|r| r.get::<_, i64>(0) < hour_ago).unwrap_or(false);
        if stale {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    }
}

/// A value bound to [`store_sql`].
pub enum SqlValue<'a> {
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// Runs one statement on the store of the test server whose files are under `dir`, as someone
/// who controls the server's storage would (SQLite file or PostgreSQL schema). Parameters are
/// `$1`, `$2`, … in order of first use (both SQLite and PostgreSQL read that).
pub fn store_sql(dir: &std::path::Path, sql: &str, params: &[SqlValue<'_>]) {
    match test_database(dir) {
        (Some(url), Some(schema)) => {
            let values: Vec<Box<dyn postgres::types::ToSql + Sync + Send>> = params
                .iter()
                .map(|p| -> Box<dyn postgres::types::ToSql + Sync + Send> {
                    match p {
                        SqlValue::Int(v) => Box::new(*v),
                        SqlValue::Text(v) => Box::new(v.to_string()),
                        SqlValue::Bytes(v) => Box::new(v.to_vec()),
                    }
                })
                .collect();
            let sql = sql.to_string();
            // The sync client must not run on a tokio worker: a thread of its own.
            std::thread::spawn(move || {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                client.batch_execute(&format!("SET search_path TO {schema}")).unwrap();
                let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    values.iter().map(|v| v.as_ref() as &(dyn postgres::types::ToSql + Sync)).collect();
                client.execute(&sql, &refs).unwrap();
            })
            .join()
            .unwrap();
        }
        _ => {
            let values: Vec<rusqlite::types::Value> = params
                .iter()
                .map(|p| match p {
                    SqlValue::Int(v) => rusqlite::types::Value::Integer(*v),
                    SqlValue::Text(v) => rusqlite::types::Value::Text(v.to_string()),
                    SqlValue::Bytes(v) => rusqlite::types::Value::Blob(v.to_vec()),
                })
                .collect();
            let db = rusqlite::Connection::open(dir.join("server/fleet.db")).unwrap();
            db.execute(sql, rusqlite::params_from_iter(values)).unwrap();
        }
    }
}

pub async fn start_server_with(config: ServerConfig) -> (ServerHandle, FleetClient) {
    let server = server::start(config).await.unwrap();
    let client = FleetClient::new(&server.url(), &server.operator_token);
    (server, client)
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub server: ServerHandle,
    pub client: FleetClient,
    /// The key the server and agents trust.
    pub secret: String,
    pub public: String,
    pub agents: Vec<AgentHandle>,
    /// The initial root agents start from, when the fleet trusts a root (ADR 0010).
    pub root_file: Option<PathBuf>,
    /// The secret (hex) of the root's timestamp key the server signs check-in replies with.
    pub timestamp_secret: Option<String>,
}

impl Fleet {
    /// A server trusting the fleet key (plus `extra_server_keys`) and `agents` enrolled agents.
    pub async fn start(agents: usize, mqtt: Mqtt, extra_server_keys: &[String]) -> Fleet {
        Fleet::start_changed(agents, mqtt, extra_server_keys, |_| {}).await
    }

    /// [`Fleet::start`] with the server's configuration changed by `change` first.
    pub async fn start_changed(
        agents: usize,
        mqtt: Mqtt,
        extra_server_keys: &[String],
        change: impl FnOnce(&mut ServerConfig),
    ) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = new_key();
        let mut trusted_keys = vec![public.clone()];
        trusted_keys.extend_from_slice(extra_server_keys);
        let mut config = ServerConfig { trusted_keys, ..test_server_config(dir.path(), mqtt) };
        change(&mut config);
        Fleet::start_with(dir, config, secret, public, None, agents).await
    }

    /// A fleet whose server and agents trust root 1 (ADR 0010): `root_key` is its only root key,
    /// the fleet key its only targets key, with a fresh timestamp key the server signs check-in
    /// replies with; a year to expiry.
    pub async fn start_rooted(agents: usize, mqtt: Mqtt, root_key: &proto::keys::SigningKey) -> Fleet {
        Fleet::start_rooted_fresh_for(agents, mqtt, root_key, Duration::from_secs(24 * 3600)).await
    }

    /// [`Fleet::start_rooted`] with check-in replies fresh for `freshness` only.
    pub async fn start_rooted_fresh_for(
        agents: usize,
        mqtt: Mqtt,
        root_key: &proto::keys::SigningKey,
        freshness: Duration,
    ) -> Fleet {
        let (secret, public) = new_key();
        let targets = proto::keys::parse_public_key(&public).unwrap();
        let timestamp = proto::keys::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let expires = fleet_server::unix_ms() / 1000 + 365 * 86_400;
        let root = proto::root::single_key_root(root_key, &targets, &timestamp.verifying_key(), expires);
        Fleet::start_with_root(agents, mqtt, &root, &timestamp, (secret, public), freshness).await
    }

    /// A fleet whose server and agents trust `root` (version 1, built and signed as the caller
    /// likes), with `timestamp` signing check-in replies; `fleet_key` (secret, public hex) is the
    /// fleet's `secret`/`public`, one of the root's targets keys.
    pub async fn start_with_root(
        agents: usize,
        mqtt: Mqtt,
        root: &proto::root::SignedRoot,
        timestamp: &proto::keys::SigningKey,
        fleet_key: (String, String),
        freshness: Duration,
    ) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = fleet_key;
        let root_file = dir.path().join("root.1.json");
        std::fs::write(&root_file, root.to_json_bytes()).unwrap();
        let timestamp_secret = proto::keys::secret_key_hex(timestamp);
        let config = ServerConfig {
            root_file: Some(root_file.clone()),
            timestamp_key: Some(timestamp_secret.clone()),
            freshness_lifetime: freshness,
            ..test_server_config(dir.path(), mqtt)
        };
        let mut fleet = Fleet::start_with(dir, config, secret, public, Some(root_file), agents).await;
        fleet.timestamp_secret = Some(timestamp_secret);
        fleet
    }

    async fn start_with(
        dir: tempfile::TempDir,
        config: ServerConfig,
        secret: String,
        public: String,
        root_file: Option<PathBuf>,
        agents: usize,
    ) -> Fleet {
        let (server, client) = start_server_with(config).await;
        let mut fleet =
            Fleet { dir, server, client, secret, public, agents: Vec::new(), root_file, timestamp_secret: None };
        for index in 0..agents {
            let agent = fleet.start_agent(index).await;
            fleet.agents.push(agent);
        }
        let expected = agents;
        let client = fleet.client.clone();
        wait_for("agents to enroll", TIMEOUT, || async {
            (client.devices().await.ok()?.len() == expected).then_some(())
        })
        .await
        .unwrap();
        // The server registers a device before the agent has stored the reply that names it.
        for agent in &fleet.agents {
            tokio::time::timeout(TIMEOUT, agent.enrolled()).await.unwrap().expect("the agent enrolled");
        }
        fleet
    }

    /// A fleet of `agents` agents all serving tabular 1.0.0 (the MLP fixture).
    pub async fn serving_v1(agents: usize, mqtt: Mqtt, extra_server_keys: &[String]) -> Fleet {
        let fleet = Fleet::start(agents, mqtt, extra_server_keys).await;
        fleet.publish(fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap()).await;
        fleet.deploy_all("tabular", "1.0.0").await;
        fleet.wait_active("tabular", "1.0.0").await;
        fleet
    }

    /// Restarts agent `index` offline (server and broker unreachable) from its data directory.
    pub async fn restart_agent_offline(&self, index: usize) -> AgentHandle {
        let mut config = agent_config(
            "http://127.0.0.1:9",
            "mqtt://127.0.0.1:9",
            "unused",
            &self.public,
            self.agent_dir(index),
            index,
        );
        config.enrollment_token = None;
        self.trust(&mut config);
        edge_agent::start(config).await.unwrap()
    }

    pub fn agent_dir(&self, index: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{index:03}"))
    }

    /// Starts agent `index` (enrolling with a fresh token, or reusing its saved identity).
    pub async fn start_agent(&self, index: usize) -> AgentHandle {
        self.start_agent_with(index, |_| {}).await
    }

    /// [`Fleet::start_agent`] with its configuration changed by `change` first. Test agents read
    /// activation windows in UTC unless `change` says otherwise.
    pub async fn start_agent_with(
        &self,
        index: usize,
        change: impl FnOnce(&mut edge_agent::AgentConfig),
    ) -> AgentHandle {
        let token = self.client.tokens(1).await.unwrap().remove(0);
        let mut config =
            agent_config(&self.server.url(), &self.server.mqtt_url, &token, &self.public, self.agent_dir(index), index);
        config.time_zone = Some("UTC".into());
        self.trust(&mut config);
        change(&mut config);
        edge_agent::start(config).await.unwrap()
    }

    /// Points an agent config at the fleet's root, when it has one.
    pub fn trust(&self, config: &mut edge_agent::AgentConfig) {
        if let Some(root) = &self.root_file {
            config.trusted_keys.clear();
            config.root_file = Some(root.clone());
        }
    }

    pub async fn publish(&self, bundle: Vec<u8>) -> BundleInfo {
        self.client.publish(bundle).await.unwrap()
    }

    pub async fn deploy_all(&self, model: &str, version: &str) {
        deploy_everywhere(&self.client, model, version).await;
    }

    /// Waits until `check` holds for every device's view of `model`; returns the devices.
    pub async fn wait_devices(
        &self,
        what: &str,
        model: &str,
        check: impl Fn(&DeviceModelView) -> bool,
    ) -> Vec<DeviceView> {
        let client = self.client.clone();
        let count = self.agents.len();
        wait_for(what, TIMEOUT, || async {
            let devices = client.devices().await.ok()?;
            let ok =
                devices.len() == count && devices.iter().all(|d| d.models.iter().any(|m| m.name == model && check(m)));
            ok.then_some(devices)
        })
        .await
        .unwrap()
    }

    pub async fn wait_active(&self, model: &str, version: &str) -> Vec<DeviceView> {
        self.wait_devices(&format!("{model} {version} active everywhere"), model, |m| {
            m.active_version.as_deref() == Some(version) && m.step == Some(proto::wire::UpdateStep::Active)
        })
        .await
    }

    pub async fn shutdown(&self) {
        for agent in &self.agents {
            agent.shutdown().await;
        }
        self.server.shutdown().await;
    }
}

/// Scenario options for the 200-agent rollout tests: light traffic, generous timeouts.
pub fn scale_options() -> fleetctl::demo::DemoOptions {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    log_if_asked();
    fleetctl::demo::DemoOptions {
        agents: 200,
        traffic_rows: 4,
        traffic_every: Duration::from_millis(250),
        timeout: Duration::from_secs(240),
        ..fleetctl::demo::DemoOptions::default()
    }
}

/// Prints the in-process server's and agents' logs when `RUST_LOG` names what to print.
pub fn log_if_asked() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// POSTs rows to an agent's local API; returns the JSON answer and the HTTP status.
pub async fn infer(agent: &AgentHandle, body: serde_json::Value) -> (u16, serde_json::Value) {
    infer_at(agent, "/v1/infer", body).await
}

/// The same for one named model.
pub async fn infer_model(agent: &AgentHandle, model: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    infer_at(agent, &format!("/v1/models/{model}/infer"), body).await
}

async fn infer_at(agent: &AgentHandle, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response =
        edge_agent::http::client().post(format!("http://{}{path}", agent.api_addr)).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A broker that admits anyone, like a Mosquitto run with its default config: the machine's
/// Mosquitto when `FLEET_TEST_MQTT_URL` names it, else an unauthenticated rumqttd on loopback.
/// For tests of what holds whichever broker carries the reports (signatures).
pub fn open_mqtt() -> Mqtt {
    match std::env::var("FLEET_TEST_MQTT_URL") {
        Ok(url) if !url.is_empty() => Mqtt::External { url },
        _ => {
            let port = server::free_loopback_port().expect("a free loopback port");
            fleet_server::broker::start_open(([127, 0, 0, 1], port).into(), 70_000).expect("an open broker");
            Mqtt::External { url: format!("mqtt://127.0.0.1:{port}") }
        }
    }
}

/// Enrolls a device by hand (as an agent would) with a fresh token: (device id, credential).
pub async fn enroll_by_hand(server_url: &str, client: &FleetClient) -> (String, String) {
    let token = client.tokens(1).await.unwrap().remove(0);
    let key = proto::keys::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let request = proto::wire::EnrollRequest {
        token,
        public_key: public_key_hex(&key.verifying_key()),
        name: String::new(),
        labels: Default::default(),
    };
    let response: proto::wire::EnrollResponse = edge_agent::http::client()
        .post(format!("{server_url}/api/v1/enroll"))
        .json(&request)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    (response.device_id, response.credential)
}

/// What became of an MQTT connection attempt or action.
#[derive(Debug, PartialEq, Eq)]
pub enum MqttOutcome {
    /// Connected (and, for an action, the connection stayed up).
    Up,
    /// The broker refused the CONNECT with this return code.
    Refused(String),
    /// The broker closed the connection.
    Closed,
}

/// Connects to `url` as `login` (None: anonymous), waits for the CONNACK, then runs `act` and
/// reports whether the connection survived it for a second.
pub async fn mqtt_try<F, Fut>(url: &str, login: Option<(&str, &str)>, act: F) -> MqttOutcome
where
    F: FnOnce(rumqttc::AsyncClient) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use rumqttc::{ConnectionError, Event, Packet};
    let (host, port) = proto::endpoint::parse_mqtt_url(url).unwrap();
    let mut options = rumqttc::MqttOptions::new(format!("probe-{}", rand::random::<u32>()), host, port);
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return MqttOutcome::Up,
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => return MqttOutcome::Refused(format!("{code:?}")),
                Err(_) => return MqttOutcome::Closed,
            }
        }
    })
    .await
    .unwrap_or(MqttOutcome::Closed);
    if connected != MqttOutcome::Up {
        return connected;
    }
    act(client).await;
    let survived = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if eventloop.poll().await.is_err() {
                return MqttOutcome::Closed;
            }
        }
    })
    .await;
    survived.unwrap_or(MqttOutcome::Up)
}

/// Tells every device to run `version` of `model` (a deployment, not a rollout).
pub async fn deploy_everywhere(client: &FleetClient, model: &str, version: &str) {
    client
        .deploy(&DeployRequest { model: model.into(), version: version.into(), devices: None, selector: None })
        .await
        .unwrap();
}

/// The first device's view of tabular, once it was told to run `version` and reports `step`.
pub async fn first_device_at(
    client: &FleetClient,
    version: &str,
    step: proto::wire::UpdateStep,
) -> Option<DeviceModelView> {
    let devices = client.devices().await.ok()?;
    let model = devices.first()?.models.iter().find(|m| m.name == "tabular")?.clone();
    (model.desired_version.as_deref() == Some(version) && model.step == Some(step)).then_some(model)
}

/// tabular 2.0.0 to every device in two waves (half, then all), no holdout, where every wave
/// soaks for an hour: a test moves on with an operator's promote.
pub fn two_waves_soaking_an_hour() -> proto::rollout::RolloutPlan {
    use proto::rollout::{OnBreach, RolloutPlan, WaveSpec};
    RolloutPlan {
        model: "tabular".into(),
        version: "2.0.0".into(),
        selector: Default::default(),
        holdout: 0.0,
        waves: vec![
            WaveSpec { percent: Some(50.0), count: None, shadow: false },
            WaveSpec { percent: Some(100.0), count: None, shadow: false },
        ],
        soak_secs: 3600.0,
        min_executed: 1,
        success_threshold: 1.0,
        failure_threshold: 0.0,
        max_concurrent: 10,
        device_timeout_secs: 120.0,
        on_breach: OnBreach::Rollback,
        gates: Default::default(),
        shadow_sample_rate: 0.1,
        max_concurrent_per: None,
        activation_window: None,
    }
}
