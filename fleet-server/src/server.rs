//! Starts a fleet server: store, HTTP API, MQTT (embedded broker or an external one) and ingest.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::TrustedKeys;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::identity::BOOTSTRAP_ADMIN;
use crate::api::{router, AppState};
pub use crate::broker::mosquitto::MosquittoFiles;
use crate::ingest::{MqttLogin, Revocations, SessionTarget};
use crate::lease::Lease;
use crate::store::{OperatorRecord, Store, StoreError};
pub use crate::tls::TlsFiles;
use proto::wire::Role;

#[derive(Clone, Debug)]
pub enum Mqtt {
    /// Start rumqttd in-process on this address.
    Embedded { listen: SocketAddr },
    /// Use a broker that runs elsewhere (`mqtt://host:port`), e.g. Mosquitto.
    External { url: String },
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The PostgreSQL database to store in (`postgres://user[:password]@host[:port]/database`);
    /// `None` keeps the SQLite store `<data_dir>/fleet.db`. Bundles stay files in `data_dir`.
    pub database_url: Option<String>,
    /// With `database_url`: the schema that holds the tables (created if missing), so that several
    /// fleets or test servers share one database; `None` uses the connection's search_path.
    pub database_schema: Option<String>,
    pub mqtt: Mqtt,
    /// Secret for operator endpoints; `None` generates one and writes it to `<data>/operator.token`.
    pub operator_token: Option<String>,
    /// Hex public keys accepted on published bundles while no root of trust is published.
    pub trusted_keys: Vec<String>,
    /// A signed root of trust (`fleetctl root init`) to publish at start when the store holds
    /// none; published bundles then need its targets keys (ADR 0010).
    pub root_file: Option<PathBuf>,
    /// Secret key (hex) of the root's timestamp role: signs every check-in reply with a per-device
    /// counter and an expiry, which devices with a root require.
    pub timestamp_key: Option<String>,
    /// How long a signed check-in reply stays fresh.
    pub freshness_lifetime: std::time::Duration,
    pub max_bundle_bytes: usize,
    /// How often running rollouts are evaluated.
    pub rollout_tick: std::time::Duration,
    /// Most desired-state notifications sent per second (`crate::notify`): a wave's devices are
    /// told at this pace instead of all at once.
    pub notify_per_second: u32,
    /// Servers sharing one database drive rollouts (and retraining events) one at a time under a
    /// lease of this length; a server that stops is replaced within it.
    pub lease: std::time::Duration,
    /// Where published bundles are kept; `None` is `<data_dir>/bundles`. Servers sharing one
    /// database share this directory (NFS or another shared file system) so each can serve
    /// every bundle.
    pub bundle_dir: Option<PathBuf>,
    /// Username and password of the server's session on an external broker (Mosquitto with the
    /// config from `fleetctl broker config`); the embedded broker makes its own.
    pub mqtt_login: Option<MqttLogin>,
    /// Serve HTTPS and MQTT over TLS (embedded broker) with this certificate and key.
    pub tls: Option<TlsFiles>,
    /// With an external Mosquitto: the password file to keep in step with the store.
    pub mosquitto: Option<MosquittoFiles>,
    /// With an external broker and several servers: their shared-subscription group (each
    /// report reaches one server). See [`crate::ingest::SessionTarget::share_group`].
    pub mqtt_share_group: Option<String>,
    /// Turns on `POST /api/v1/broker/authenticate` for a broker such as EMQX, which presents
    /// this secret as its bearer token (`crate::api::broker_auth`).
    pub broker_auth_secret: Option<String>,
    /// EMQX's REST API (base URL, `key:secret`): a revoked device is disconnected there.
    pub emqx_api: Option<(String, String)>,
    /// When persistent drift asks for a retraining, and where the event goes.
    pub retrain: crate::retrain::RetrainConfig,
    /// How long drift windows and telemetry rows are kept (`retention.rs`).
    pub retention: crate::retention::RetentionConfig,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            data_dir: PathBuf::from("fleet-data"),
            database_url: None,
            database_schema: None,
            mqtt: Mqtt::Embedded { listen: ([127, 0, 0, 1], 0).into() },
            operator_token: None,
            trusted_keys: Vec::new(),
            root_file: None,
            timestamp_key: None,
            freshness_lifetime: std::time::Duration::from_secs(24 * 3600),
            max_bundle_bytes: 512 << 20,
            rollout_tick: std::time::Duration::from_secs(1),
            notify_per_second: crate::notify::DEFAULT_PER_SECOND,
            lease: std::time::Duration::from_secs(10),
            bundle_dir: None,
            mqtt_login: None,
            tls: None,
            mosquitto: None,
            mqtt_share_group: None,
            broker_auth_secret: None,
            emqx_api: None,
            retrain: crate::retrain::RetrainConfig::default(),
            retention: crate::retention::RetentionConfig::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot prepare data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("trusted keys: {0}")]
    Keys(#[from] proto::keys::KeyError),
    #[error("no trusted keys: pass --root with a root from `fleetctl root init`, or --trusted-key with a public key from `fleetctl keygen`")]
    NoKeys,
    #[error("root file {path}: {reason}")]
    Root { path: PathBuf, reason: String },
    #[error("timestamp key: {0}")]
    TimestampKey(String),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Emqx(#[from] crate::broker::emqx::EmqxError),
    #[error(transparent)]
    MqttUrl(#[from] proto::endpoint::BadMqttUrl),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("a start-up task did not complete: {0}")]
    Interrupted(String),
}

pub struct ServerHandle {
    pub http_addr: SocketAddr,
    /// "http" or "https".
    scheme: &'static str,
    /// The broker URL devices should use.
    pub mqtt_url: String,
    pub operator_token: String,
    pub store: Arc<dyn Store>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl ServerHandle {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.http_addr)
    }

    /// Stops accepting work and waits until every task has finished: the HTTP API has answered
    /// its in-flight requests (axum's graceful shutdown), the rollout driver has finished its
    /// current cycle, and the MQTT session has closed. The embedded broker (rumqttd has no stop
    /// call) lives as long as the process.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

pub fn bundle_file(bundle_dir: &Path, name: &str, version: &str) -> PathBuf {
    bundle_dir.join(name).join(format!("{version}.bundle"))
}

/// The bootstrap admin's token: given, or made at first start and written to
/// `<data>/operator.token` (mode 0600, written atomically).
fn operator_token(config: &ServerConfig) -> Result<String, ServerError> {
    if let Some(token) = &config.operator_token {
        return Ok(token.clone());
    }
    let path = config.data_dir.join("operator.token");
    let io = |source| ServerError::DataDir { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(token) => Ok(token.trim().to_string()),
        Err(_) => {
            let token = hex::encode(rand::random::<[u8; 24]>());
            write_atomically(&path, token.as_bytes(), 0o600).map_err(io)?;
            Ok(token)
        }
    }
}

/// Replaces `path` with `bytes` so that no reader sees a half-written file: written to a
/// temporary file made with `mode` (e.g. 0o600 for a secret), synced, then renamed over it.
/// Blocking.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Its own temporary name: another server may be writing the same shared file.
    let tmp = path.with_extension(format!("{}.tmp", hex::encode(rand::random::<[u8; 6]>())));
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The MQTT client id of this server's persistent session: made once per data directory, so a
/// restarted server resumes its session (and receives what was queued for it) while two servers
/// never share one.
fn mqtt_client_id(data_dir: &Path) -> Result<String, ServerError> {
    let path = data_dir.join("mqtt-client-id");
    let io = |source| ServerError::DataDir { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = format!("fleet-server-{}", hex::encode(rand::random::<[u8; 6]>()));
            std::fs::write(&path, &id).map_err(io)?;
            Ok(id)
        }
    }
}

/// Publishes the root in `path` when the store holds none (it must carry a threshold of its own
/// root keys' signatures); a store that holds roots keeps them (rotations go through
/// `fleetctl root publish`), unless the file is newer, which is refused.
fn publish_initial_root(store: &dyn Store, path: &Path) -> Result<(), ServerError> {
    let refused = |reason: String| ServerError::Root { path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|e| refused(e.to_string()))?;
    let signed = proto::root::SignedRoot::parse(&bytes).map_err(|e| refused(e.to_string()))?;
    let root = signed.verify_initial().map_err(|e| refused(e.to_string()))?;
    match store.latest_root()? {
        None => {
            store.put_root(root.version, &signed.to_json_bytes(), crate::unix_ms())?;
            tracing::info!(version = root.version, "initial root of trust published");
            Ok(())
        }
        Some(stored) => {
            let stored = proto::root::SignedRoot::parse(&stored).map_err(|e| refused(format!("stored root: {e}")))?;
            if root.version > stored.signed.version {
                return Err(refused(format!(
                    "it is root {} and the server holds root {}: publish rotations with `fleetctl root publish`",
                    root.version, stored.signed.version
                )));
            }
            Ok(())
        }
    }
}

/// The check-in signer: the key must be one of the newest root's timestamp keys, or devices
/// would refuse every reply it signs.
fn timestamp_signer(
    store: &dyn Store,
    secret_hex: &str,
    lifetime: std::time::Duration,
) -> Result<Arc<crate::api::TimestampSigner>, ServerError> {
    let key = proto::keys::parse_secret_key(secret_hex).map_err(|e| ServerError::TimestampKey(e.to_string()))?;
    let Some(stored) = store.latest_root()? else {
        return Err(ServerError::TimestampKey(
            "no root of trust is published, so devices could not check what it signs: pass --root".into(),
        ));
    };
    let root = proto::root::SignedRoot::parse(&stored).map_err(|e| ServerError::TimestampKey(e.to_string()))?;
    let id = proto::KeyId::of(&key.verifying_key());
    if root.signed.timestamp().get(&id).is_none() {
        return Err(ServerError::TimestampKey(format!(
            "key {id} is not in the timestamp role of root {}: devices would refuse every reply",
            root.signed.version
        )));
    }
    Ok(Arc::new(crate::api::TimestampSigner { key, lifetime }))
}

/// Runs a blocking start-up step (store calls) on tokio's blocking pool.
async fn off_workers<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServerError> + Send + 'static,
) -> Result<T, ServerError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ServerError::Interrupted(e.to_string()))?
}

/// Opens the configured store, publishes the initial root and checks that something is trusted.
/// Blocking.
fn prepare_store(config: &ServerConfig) -> Result<Arc<dyn Store>, ServerError> {
    let store = crate::store::open(
        config.database_url.as_deref(),
        config.database_schema.as_deref(),
        &config.data_dir.join("fleet.db"),
    )?;
    if let Some(path) = &config.root_file {
        publish_initial_root(store.as_ref(), path)?;
    }
    if config.trusted_keys.is_empty() && store.latest_root()?.is_none() {
        return Err(ServerError::NoKeys);
    }
    Ok(store)
}

pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    let data_dir = &config.data_dir;
    let bundle_dir = config.bundle_dir.clone().unwrap_or_else(|| data_dir.join("bundles"));
    for dir in [data_dir, &bundle_dir] {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::DataDir { path: dir.clone(), source })?;
    }
    let trusted = Arc::new(TrustedKeys::from_hex(config.trusted_keys.iter().map(String::as_str))?);
    // Opening the store and the first reads and writes are database calls: off the async workers.
    let prepare = config.clone();
    let store = off_workers(move || prepare_store(&prepare)).await?;
    let operator_token = operator_token(&config)?;
    let admin = OperatorRecord {
        name: BOOTSTRAP_ADMIN.into(),
        role: Role::Admin,
        token_hash: crate::api::sha256_hex(&operator_token),
        created_ms: crate::unix_ms(),
        revoked_ms: None,
    };
    let writer = store.clone();
    off_workers(move || Ok(writer.put_operator(&admin, true)?)).await?;
    let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();

    let (mqtt_url, session_addr, login, sessions) = match &config.mqtt {
        Mqtt::Embedded { listen } => {
            let max_payload = proto::wire::MAX_MQTT_PAYLOAD + 1024;
            let broker =
                crate::broker::start_embedded(*listen, max_payload, store.clone(), tls.clone(), cancel.clone(), &tasks)
                    .await?;
            let scheme = if tls.is_some() { "mqtts" } else { "mqtt" };
            let login = MqttLogin { username: crate::broker::SERVER_USERNAME.into(), password: broker.server_password };
            let internal = (broker.internal.ip().to_string(), broker.internal.port());
            (format!("{scheme}://{}", broker.public), internal, Some(login), Some(broker.sessions))
        }
        Mqtt::External { url } => (url.clone(), proto::endpoint::parse_mqtt_url(url)?, config.mqtt_login.clone(), None),
    };
    let emqx = match &config.emqx_api {
        Some((url, key)) => Some(crate::broker::emqx::EmqxApi::new(url, key)?),
        None => None,
    };
    let broker_passwords = config
        .mosquitto
        .clone()
        .map(|files| crate::broker::mosquitto::spawn_sync(store.clone(), files, cancel.clone(), &tasks));
    let client_id = mqtt_client_id(data_dir)?;
    let timestamp = match config.timestamp_key.clone() {
        Some(hex) => {
            let (store, lifetime) = (store.clone(), config.freshness_lifetime);
            Some(off_workers(move || timestamp_signer(store.as_ref(), &hex, lifetime)).await?)
        }
        None => None,
    };
    let revocations = Revocations::default();
    let (host, port) = session_addr;
    // The embedded broker belongs to this one server: nothing to share.
    let share_group = matches!(config.mqtt, Mqtt::External { .. }).then(|| config.mqtt_share_group.clone()).flatten();
    let target = SessionTarget { host, port, client_id: client_id.clone(), login, share_group };
    let session = crate::ingest::connect(&target, store.clone(), revocations.clone(), cancel.clone(), &tasks);
    let metrics = crate::api::metrics::ApiMetrics::default();
    let notifier =
        crate::notify::spawn(session, config.notify_per_second, metrics.notifications.clone(), cancel.clone(), &tasks);
    let rollouts = crate::rollout::driver::spawn(
        store.clone(),
        notifier.clone(),
        config.rollout_tick,
        Lease::new(
            crate::rollout::driver::LEASE,
            client_id.clone(),
            config.lease,
            metrics.lease_held(crate::rollout::driver::LEASE),
        ),
        metrics.rollout_tick.clone(),
        cancel.clone(),
        &tasks,
    );
    let retrain_lease =
        Lease::new(crate::retrain::LEASE, client_id.clone(), config.lease, metrics.lease_held(crate::retrain::LEASE));
    crate::retrain::spawn(
        store.clone(),
        notifier.clone(),
        config.retrain.clone(),
        retrain_lease,
        cancel.clone(),
        &tasks,
    );
    let retention_lease = Lease::new(
        crate::retention::LEASE,
        client_id.clone(),
        config.lease,
        metrics.lease_held(crate::retention::LEASE),
    );
    crate::retention::spawn(
        store.clone(),
        config.retention.clone(),
        retention_lease,
        metrics.retention.clone(),
        cancel.clone(),
        &tasks,
    );
    let state = AppState {
        rollouts,
        store: store.clone(),
        bundle_dir,
        trusted,
        notifier,
        max_bundle_bytes: config.max_bundle_bytes,
        revocations,
        sessions,
        broker_passwords,
        emqx,
        broker_auth: config
            .broker_auth_secret
            .clone()
            .map(|secret| crate::api::broker_auth::BrokerAuth { secret, server_login: config.mqtt_login.clone() }),
        timestamp,
        metrics,
        store_calls: crate::api::StoreTurns::new(store.as_ref()),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen { addr: config.listen, source })?;
    let http_addr = listener.local_addr().map_err(|source| ServerError::Listen { addr: config.listen, source })?;
    let app = router(state);
    let shutdown = cancel.clone();
    let scheme = if tls.is_some() { "https" } else { "http" };
    match tls {
        Some(acceptor) => {
            let listener = crate::tls::TlsListener::new(listener, acceptor)
                .map_err(|source| ServerError::Listen { addr: config.listen, source })?;
            tasks.spawn(async move {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
                    tracing::error!(error = %e, "HTTPS API stopped");
                }
            });
        }
        None => {
            tasks.spawn(async move {
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
                    tracing::error!(error = %e, "HTTP API stopped");
                }
            });
        }
    }
    tracing::info!(%http_addr, %mqtt_url, "fleet-server running");
    Ok(ServerHandle { http_addr, scheme, mqtt_url, operator_token, store, cancel, tasks })
}

/// A free loopback port for the embedded broker (rumqttd cannot report a port-0 choice back).
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_returns_only_once_the_api_has_stopped_listening() {
        let dir = tempfile::tempdir().unwrap();
        let port = free_loopback_port().unwrap();
        let server = start(ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            mqtt: Mqtt::Embedded { listen: ([127, 0, 0, 1], port).into() },
            operator_token: Some("op".into()),
            trusted_keys: vec![hex::encode([9u8; 32])],
            max_bundle_bytes: 1 << 20,
            rollout_tick: std::time::Duration::from_millis(50),
            ..ServerConfig::default()
        })
        .await
        .unwrap();
        assert!(tokio::net::TcpStream::connect(server.http_addr).await.is_ok(), "the API listens once started");
        server.shutdown().await;
        assert!(tokio::net::TcpStream::connect(server.http_addr).await.is_err(), "the API still listens");
    }
}
