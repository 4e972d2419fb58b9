//! Starts the agent's actors and ties their lifetimes to one cancellation token; every task is
//! tracked, so `AgentHandle::shutdown` returns only once they have all finished.
//!
//! Order matters: the engine and installed models come up first, so a device that boots offline
//! serves its last good model at once; enrollment, the MQTT session and the updater follow in the
//! background and retry until the server is reachable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::admission::DeviceClass;
use proto::bundle::Limits;
use proto::keys::SigningKey;
use proto::wire::{EnrollRequest, EnrollResponse, Heartbeat};
use proto::TrustedKeys;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::SharedUsage;
use crate::config::AgentConfig;
use crate::health::HealthProbe;
use crate::http::{json_capped, Backoff};
use crate::inference::{EngineHandle, LocalApi};
use crate::state::{Identity, StateDb, StateError};
use crate::telemetry::upload::Uploader;
use crate::telemetry::{spawn_writer, TelemetrySink, WriterConfig, WriterError};
use crate::updater::disk::Layout;
use crate::updater::window::LocalClock;
use crate::updater::{restore_installed, UpdatePolicy, Updater, Verifier};
use crate::uplink::outbox::{Outbox, OutboxError, OutboxStats};
use crate::uplink::{spawn_uplink, UplinkConfig, UplinkHandle};

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Telemetry(#[from] WriterError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("cannot start the inference engine: {0}")]
    Engine(std::io::Error),
    #[error("cannot listen on {addr} for the local API: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    DeviceKey(#[from] crate::device_key::DeviceKeyError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    #[error("start-up task failed: {0}")]
    Join(String),
    #[error("not enrolled and no enrollment_token in the config: get one with `fleetctl tokens create`")]
    NoToken,
}

/// A running agent. Dropping it does not stop it; call [`AgentHandle::shutdown`].
#[derive(Clone)]
pub struct AgentHandle {
    pub api_addr: SocketAddr,
    /// Where `GET /metrics` answers, when the config asked for it.
    pub metrics_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub engine: EngineHandle,
    pub telemetry: TelemetrySink,
    outbox: Outbox,
    device: watch::Receiver<Option<String>>,
    drift_now: mpsc::Sender<oneshot::Sender<()>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    checkin_error: watch::Receiver<Option<String>>,
}

impl AgentHandle {
    /// Why the last check-in failed or its reply was refused (e.g. a replayed or expired reply),
    /// in one sentence; None after a check-in that succeeded.
    pub fn last_checkin_error(&self) -> Option<String> {
        self.checkin_error.borrow().clone()
    }

    /// Stops the agent and waits until it has: the local API has answered its in-flight requests
    /// and closed its port, the updater, reporters and MQTT session have ended (the outbox keeps
    /// what was not acknowledged), and every telemetry record offered before is on disk.
    pub async fn shutdown(&self) {
        self.request_shutdown();
        self.tasks.close();
        self.tasks.wait().await;
        self.telemetry.flush().await;
    }

    /// Asks the agent to stop without waiting (for a caller that cannot await).
    pub fn request_shutdown(&self) {
        self.cancel.cancel();
    }

    /// The device id once enrolled.
    pub fn device_id(&self) -> Option<String> {
        self.device.borrow().clone()
    }

    pub async fn enrolled(&self) -> Option<String> {
        let mut rx = self.device.clone();
        let device = rx.wait_for(Option::is_some).await.ok()?.clone();
        device
    }

    /// Closes every model's drift window now and queues the summaries for the server, as the
    /// drift interval would; returns once they are handed to the uplink (after enrollment).
    pub async fn report_drift_now(&self) {
        let (done, rx) = oneshot::channel();
        if self.drift_now.send(done).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// What the report outbox has written, holds and evicted; telemetry evictions included.
    pub async fn delivery(&self) -> Result<OutboxStats, OutboxError> {
        let mut stats = self.outbox.stats().await?;
        stats.evicted.telemetry = self.telemetry.evicted();
        Ok(stats)
    }

    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.cancel.clone().cancelled_owned()
    }
}

/// Engine threads at most, whatever the core count: each holds its own sessions.
const MAX_ENGINE_THREADS: usize = 4;

/// What start-up reads from disk, on a blocking thread.
struct Opened {
    state: Arc<StateDb>,
    device_key: SigningKey,
    identity: Option<Identity>,
    telemetry: TelemetrySink,
    usage: SharedUsage,
    /// The pinned CA (`ca_file`), read once here.
    ca_pem: Option<Vec<u8>>,
    /// The root of trust to start from, when the config names one, and the freshness accepted
    /// under it so far.
    root: Option<(proto::root::Root, proto::freshness::Seen)>,
    /// The local clock activation windows are read in (`time_zone`).
    clock: LocalClock,
}

fn open_data_dir(config: &AgentConfig) -> Result<Opened, StartError> {
    let ca_pem = config.read_ca()?;
    let data_dir = &config.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| StartError::DataDir { path: data_dir.clone(), source })?;
    let state = StateDb::open(&data_dir.join("agent.db"))?;
    let device_key = crate::device_key::load_or_create(data_dir)?;
    let identity = state.identity()?;
    if identity.is_none() && config.enrollment_token.is_none() {
        return Err(StartError::NoToken);
    }
    let root = match config.root_file.as_deref() {
        Some(initial) => Some((crate::trust::current_root(initial, &state)?, state.freshness()?)),
        None => None,
    };
    let usage = SharedUsage::new(config.limits.disk_budget_bytes);
    let telemetry = spawn_writer(WriterConfig {
        path: data_dir.join("telemetry.db"),
        queue: config.limits.telemetry_queue,
        batch: 512,
        usage: usage.clone(),
        sample_rate: config.limits.telemetry_sample_rate,
    })?;
    let clock = LocalClock::new(config.time_zone.as_deref())?;
    Ok(Opened { state: Arc::new(state), device_key, identity, telemetry, usage, ca_pem, root, clock })
}

pub async fn start(config: AgentConfig) -> Result<AgentHandle, StartError> {
    config.validate()?;
    let data_dir = config.data_dir.clone();
    let state_path = data_dir.join("agent.db");
    let (config, opened) = tokio::task::spawn_blocking(move || {
        let opened = open_data_dir(&config);
        (config, opened)
    })
    .await
    .map_err(|e| StartError::Join(e.to_string()))?;
    let Opened { state, device_key, identity, telemetry, usage, ca_pem, root, clock } = opened?;
    let outbox = Outbox::open(state_path, usage).await?;
    // One engine thread per core: each serves local API connections and runs the model inline.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_ENGINE_THREADS);
    let engine = EngineHandle::spawn_threads(telemetry.clone(), 1024, threads).map_err(StartError::Engine)?;
    if let Some((_, seen)) = &root {
        engine.set_freshness(crate::inference::engine::FreshnessClock::new(seen)).await;
    }
    let root = root.map(|(root, _)| root);
    let trusted = match &root {
        Some(root) => root.targets(),
        None => TrustedKeys::from_hex(config.trusted_keys.iter().map(String::as_str))
            .map_err(|e| crate::config::ConfigError::Invalid(e.to_string()))?,
    };
    let verifier = Arc::new(Verifier {
        trusted,
        root,
        device: DeviceClass::this_build(config.labels.clone()),
        limits: Limits { max_bundle_bytes: config.limits.max_bundle_bytes, ..Limits::default() },
    });
    let layout = Layout::new(&data_dir);
    restore_installed(&layout, &state, &engine, &verifier, config.limits.self_test_restarts).await;

    let cancel = CancellationToken::new();
    let listen_err = |source| StartError::Listen { addr: config.api_listen, source };
    let listener = std::net::TcpListener::bind(config.api_listen).map_err(listen_err)?;
    let api_addr = listener.local_addr().map_err(listen_err)?;
    let api = LocalApi { listener, max_body_bytes: config.limits.max_request_bytes, shutdown: cancel.clone() };
    let api_stopped = engine.serve(api).await.map_err(|e| StartError::Engine(std::io::Error::other(e)))?;
    let tasks = TaskTracker::new();
    tasks.spawn(async move {
        for stopped in api_stopped {
            let _ = stopped.await;
        }
    });

    let last_checkin_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (checkin_error_tx, checkin_error) = watch::channel(None);
    let mut metrics_addr = None;
    if let Some(addr) = config.metrics_listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
        metrics_addr = Some(listener.local_addr().map_err(|source| StartError::Listen { addr, source })?);
        let sources = crate::metrics::Sources {
            engine: engine.clone(),
            telemetry: telemetry.clone(),
            outbox: outbox.clone(),
            state: state.clone(),
            last_checkin_ms: last_checkin_ms.clone(),
        };
        tasks.spawn(crate::metrics::serve(listener, sources, cancel.clone()));
    }
    let (device_tx, device) = watch::channel(identity.as_ref().map(|i| i.device_id.clone()));
    let (drift_now, drift_requests) = mpsc::channel(4);
    let connected = Connected {
        config,
        state,
        device_key,
        identity,
        layout,
        engine: engine.clone(),
        verifier,
        outbox: outbox.clone(),
        telemetry: telemetry.clone(),
        tasks: tasks.clone(),
        ca_pem,
        last_checkin_ms,
        checkin_error: checkin_error_tx,
        clock,
    };
    tasks.spawn(connected.run(device_tx, drift_requests, cancel.clone()));
    Ok(AgentHandle {
        api_addr,
        metrics_addr,
        data_dir,
        engine,
        telemetry,
        outbox,
        device,
        drift_now,
        cancel,
        tasks,
        checkin_error,
    })
}

/// The part of the agent that needs the server: enrollment, MQTT, updater, reporters.
struct Connected {
    config: AgentConfig,
    state: Arc<StateDb>,
    /// Signs every report; its public half is registered at enrollment.
    device_key: SigningKey,
    /// Read at start; None until enrolled.
    identity: Option<Identity>,
    layout: Layout,
    engine: EngineHandle,
    verifier: Arc<Verifier>,
    outbox: Outbox,
    telemetry: TelemetrySink,
    tasks: TaskTracker,
    /// The pinned CA for HTTPS and MQTT over TLS, as read at start.
    ca_pem: Option<Vec<u8>>,
    /// Set by the updater at each accepted check-in; read by the metrics endpoint.
    last_checkin_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Set by the updater after each check-in; read through the handle.
    checkin_error: watch::Sender<Option<String>>,
    /// The local clock activation windows are read in.
    clock: LocalClock,
}

impl Connected {
    async fn run(
        self,
        device_tx: watch::Sender<Option<String>>,
        drift_requests: mpsc::Receiver<oneshot::Sender<()>>,
        cancel: CancellationToken,
    ) {
        let built =
            crate::http::builder_trusting(self.ca_pem.as_deref()).and_then(|b| b.build().map_err(|e| e.to_string()));
        let http = match built {
            Ok(http) => http,
            Err(e) => return tracing::error!(error = %e, "cannot build the HTTP client"),
        };
        let identity = tokio::select! {
            _ = cancel.cancelled() => return,
            identity = self.enroll_until_done(&http) => identity,
        };
        let Some(identity) = identity else { return };
        let _ = device_tx.send(Some(identity.device_id.clone()));
        let (updater_tx, updater_rx) = mpsc::channel(8);
        let uplink = match spawn_uplink(
            UplinkConfig {
                mqtt_url: self.config.mqtt_url.clone(),
                device_id: identity.device_id.clone(),
                credential: identity.credential.clone(),
                device_key: self.device_key.clone(),
                outbox: self.outbox.clone(),
                telemetry: self.telemetry.clone(),
                ack_timeout: self.config.limits.ack_timeout(),
                ca_pem: self.ca_pem.clone(),
            },
            updater_tx,
            cancel.clone(),
            &self.tasks,
        )
        .await
        {
            Ok(uplink) => uplink,
            Err(e) => return tracing::error!(error = %e, "cannot start the MQTT session"),
        };
        let server_url = self.config.server_url.trim_end_matches('/').to_string();
        let uploader = Uploader {
            http: http.clone(),
            url: format!("{server_url}/api/v1/devices/{}/telemetry", identity.device_id),
            credential: identity.credential.clone(),
            sink: self.telemetry.clone(),
            batch_rows: 512,
            rows_per_sec: self.config.limits.telemetry_upload_rows_per_sec,
            idle: self.config.intervals.heartbeat().min(Duration::from_secs(5)),
            timeout: self.config.limits.request_timeout(),
        };
        self.tasks.spawn(uploader.run(cancel.clone()));
        let every = self.config.intervals.drift();
        self.tasks.spawn(report_drift(self.engine.clone(), uplink.clone(), every, drift_requests, cancel.clone()));
        self.tasks.spawn(report_health(
            self.engine.clone(),
            uplink.clone(),
            self.config.data_dir.clone(),
            self.config.intervals.heartbeat(),
            cancel.clone(),
        ));
        let updater = Updater {
            http,
            server_url,
            device_id: identity.device_id,
            credential: identity.credential,
            layout: self.layout,
            state: self.state,
            engine: self.engine,
            uplink,
            verifier: self.verifier,
            checkin_every: self.config.intervals.checkin(),
            request_timeout: self.config.limits.request_timeout(),
            policy: UpdatePolicy {
                download_attempts: self.config.limits.download_attempts,
                self_test_restarts: self.config.limits.self_test_restarts,
                min_download_bytes_per_sec: self.config.limits.min_download_bytes_per_sec,
                stall_window: self.config.limits.stall_window(),
                retry_base: self.config.intervals.checkin().min(Duration::from_secs(10)),
                retry_cap: Duration::from_secs(600),
            },
            retry_after: Default::default(),
            last_checkin_ms: self.last_checkin_ms,
            checkin_error: self.checkin_error,
            clock: self.clock,
        };
        updater.run(updater_rx, cancel).await;
    }

    async fn enroll_until_done(&self, http: &reqwest::Client) -> Option<Identity> {
        if let Some(identity) = self.identity.clone() {
            return Some(identity);
        }
        let token = self.config.enrollment_token.clone()?;
        let url = format!("{}/api/v1/enroll", self.config.server_url.trim_end_matches('/'));
        let request = EnrollRequest {
            token,
            public_key: proto::keys::public_key_hex(&self.device_key.verifying_key()),
            name: self.config.name.clone(),
            labels: self.config.labels.clone(),
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let timeout = self.config.limits.request_timeout();
        loop {
            match enroll_once(http, &url, &request, timeout).await {
                Ok(response) => {
                    let identity = Identity { device_id: response.device_id, credential: response.credential };
                    let (state, saved) = (self.state.clone(), identity.clone());
                    match tokio::task::spawn_blocking(move || state.save_identity(&saved)).await {
                        Ok(Ok(())) => return Some(identity),
                        Ok(Err(e)) => tracing::error!(error = %e, "cannot save the enrolled identity"),
                        Err(e) => tracing::error!(error = %e, "cannot save the enrolled identity"),
                    }
                }
                Err(EnrollFailure::Refused(reason)) => {
                    tracing::error!(%reason, "enrollment refused; fix the enrollment_token and restart");
                    return None;
                }
                Err(EnrollFailure::Unreachable(reason)) => {
                    tracing::warn!(%reason, "server unreachable; retrying enrollment")
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

enum EnrollFailure {
    Refused(String),
    Unreachable(String),
}

async fn enroll_once(
    http: &reqwest::Client,
    url: &str,
    request: &EnrollRequest,
    timeout: Duration,
) -> Result<EnrollResponse, EnrollFailure> {
    let response = http
        .post(url)
        .json(request)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| EnrollFailure::Unreachable(e.to_string()))?;
    let status = response.status();
    if status.is_client_error() {
        let body = crate::http::read_capped(response, 4096).await.unwrap_or_default();
        return Err(EnrollFailure::Refused(format!("HTTP {status}: {}", String::from_utf8_lossy(&body))));
    }
    if !status.is_success() {
        return Err(EnrollFailure::Unreachable(format!("HTTP {status}")));
    }
    let reply: EnrollResponse =
        json_capped(response, proto::wire::MAX_REPLY_BYTES).await.map_err(EnrollFailure::Unreachable)?;
    // The device id names topics and files: a server that sends an odd one is not trusted with it.
    proto::names::validate("device id", &reply.device_id)
        .map_err(|e| EnrollFailure::Refused(format!("the server's enrollment reply is unusable: {e}")))?;
    Ok(reply)
}

/// Every `every`, or when asked, closes each model's drift window and queues its summary.
async fn report_drift(
    engine: EngineHandle,
    uplink: UplinkHandle,
    every: Duration,
    mut requests: mpsc::Receiver<oneshot::Sender<()>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        let asked = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => None,
            Some(done) = requests.recv() => Some(done),
        };
        for model in engine.active().await.into_keys() {
            if let Some(summary) = engine.take_window(model, crate::unix_ms()).await {
                if summary.sketch.rows > 0 {
                    uplink.drift(&summary).await;
                }
            }
        }
        if let Some(done) = asked {
            let _ = done.send(());
        }
    }
}

async fn report_health(
    engine: EngineHandle,
    uplink: UplinkHandle,
    data_dir: PathBuf,
    every: Duration,
    cancel: CancellationToken,
) {
    let started = std::time::Instant::now();
    let Ok(mut probe) = tokio::task::spawn_blocking(move || HealthProbe::new(&data_dir)).await else { return };
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (health, returned) = match tokio::task::spawn_blocking(move || (probe.sample(), probe)).await {
            Ok((health, probe)) => (health, probe),
            Err(_) => return,
        };
        probe = returned;
        let heartbeat = Heartbeat {
            at_ms: crate::unix_ms(),
            uptime_secs: started.elapsed().as_secs(),
            health,
            models: engine.counters().await,
        };
        uplink.heartbeat(&heartbeat).await;
    }
}
