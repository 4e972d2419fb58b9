//! The engine threads: each dedicated OS thread owns an [`Engine`] (its own sessions, drift
//! windows and counters over models whose optimized plans they share) and runs a single-threaded
//! tokio runtime of its own. On it, the local HTTP API (when the agent serves one) answers
//! requests by running the model right there, and a control task takes typed messages from the
//! rest of the agent on a bounded channel (install a model, close a drift window, counters,
//! in-process inference). Every thread accepts on the same listening socket; installs go to all
//! of them, windows and counters are merged across them.
//!
//! Why the API lives on this thread: a request handed from the agent's main runtime to a separate
//! engine thread pays two cross-thread wake-ups (there and back), which on a 2-core device cost
//! more than a small model's whole run (measured in docs/BENCHMARKS.md). Here a request is parsed,
//! run and answered without leaving the thread. The main runtime (MQTT, updater, reporters) never
//! runs tract, so a slow model cannot stall keep-alives; a slow model only delays other local
//! requests, which would have waited for the engine anyway.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use proto::wire::{DriftSummary, ModelCounters};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::engine::{merge_stats, merge_windows, Engine, InferError, InferResponse, ModelStats, WindowPart};
use super::shadow::{ShadowTap, ShadowWorker};
use crate::telemetry::TelemetrySink;
use model_runtime::{LoadedModel, ModelError};

/// The engine, shared by the tasks of the engine thread's runtime. Only that thread ever locks
/// it, so the lock is never contended; it exists because axum wants `Send + Sync` state.
#[derive(Clone)]
pub(crate) struct SharedEngine(Arc<Mutex<Engine>>);

impl SharedEngine {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Engine> {
        // The engine contains panics from tract (`Engine::infer`); a poisoned lock could only come
        // from a bug elsewhere, and the engine's data is still consistent then.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

enum EngineMsg {
    Infer {
        model: Option<String>,
        rows: Vec<Vec<f32>>,
        reply: oneshot::Sender<Result<InferResponse, InferError>>,
    },
    Freshness {
        clock: super::engine::FreshnessClock,
        reply: oneshot::Sender<()>,
    },
    Install {
        model: Box<LoadedModel>,
        now_ms: u64,
        reply: oneshot::Sender<Result<(), ModelError>>,
    },
    TakeWindow {
        model: String,
        now_ms: u64,
        reply: oneshot::Sender<Option<WindowPart>>,
    },
    SetShadow {
        model: String,
        tap: Option<ShadowTap>,
        reply: oneshot::Sender<()>,
    },
    Stats {
        reply: oneshot::Sender<(Vec<ModelStats>, u64)>,
    },
    Active {
        reply: oneshot::Sender<BTreeMap<String, String>>,
    },
    Serve {
        api: LocalApi,
        stopped: oneshot::Sender<()>,
    },
    /// Panics inside the guarded inference path, as a tract bug would.
    #[cfg(test)]
    PanicForTest {
        model: String,
        reply: oneshot::Sender<Result<InferResponse, InferError>>,
    },
}

/// The local inference API the engine thread serves.
pub struct LocalApi {
    pub listener: std::net::TcpListener,
    pub max_body_bytes: usize,
    /// Cancelled to stop accepting requests; in-flight ones finish first.
    pub shutdown: CancellationToken,
}

/// Cheap to clone; every clone talks to the same engine threads.
#[derive(Clone)]
pub struct EngineHandle {
    threads: Arc<[mpsc::Sender<EngineMsg>]>,
    /// Candidates in shadow, by model name. Touched only by the updater and reporters on the
    /// main runtime, briefly; the engine threads hold taps, never this.
    shadows: Arc<Mutex<BTreeMap<String, ShadowWorker>>>,
}

impl EngineHandle {
    /// Starts one engine thread; `queue` bounds the messages waiting for it.
    pub fn spawn(telemetry: TelemetrySink, queue: usize) -> std::io::Result<EngineHandle> {
        Self::spawn_threads(telemetry, queue, 1)
    }

    /// Starts `threads` engine threads (at least one), each serving its share of the local API.
    pub fn spawn_threads(telemetry: TelemetrySink, queue: usize, threads: usize) -> std::io::Result<EngineHandle> {
        let mut senders = Vec::new();
        for index in 0..threads.max(1) {
            let (tx, rx) = mpsc::channel(queue);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
            let engine = SharedEngine(Arc::new(Mutex::new(Engine::new(telemetry.clone()))));
            std::thread::Builder::new()
                .name(format!("inference-{index}"))
                .spawn(move || runtime.block_on(control(rx, engine)))?;
            senders.push(tx);
        }
        Ok(EngineHandle { threads: senders.into(), shadows: Arc::default() })
    }

    /// Serves the local API from every engine thread, from now on (the agent calls it once the
    /// installed models are restored). Each receiver resolves once its thread's API has shut
    /// down gracefully, after `api.shutdown` is cancelled; an error is an engine having stopped.
    pub async fn serve(&self, api: LocalApi) -> Result<Vec<oneshot::Receiver<()>>, InferError> {
        let mut stopped = Vec::new();
        for tx in self.threads.iter() {
            let listener = api.listener.try_clone().map_err(|e| InferError::Run(e.to_string()))?;
            let (done, rx) = oneshot::channel();
            let api = LocalApi { listener, max_body_bytes: api.max_body_bytes, shutdown: api.shutdown.clone() };
            tx.send(EngineMsg::Serve { api, stopped: done }).await.map_err(|_| InferError::Stopped)?;
            stopped.push(rx);
        }
        Ok(stopped)
    }

    async fn ask_one<T>(tx: &mpsc::Sender<EngineMsg>, make: impl FnOnce(oneshot::Sender<T>) -> EngineMsg) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply)).await.ok()?;
        rx.await.ok()
    }

    /// Asks the first engine thread (they all serve the same models).
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> EngineMsg) -> Option<T> {
        Self::ask_one(&self.threads[0], make).await
    }

    /// Asks every engine thread the same; the answers of the threads still running.
    async fn ask_all<T>(&self, make: impl Fn(oneshot::Sender<T>) -> EngineMsg) -> Vec<T> {
        let mut answers = Vec::with_capacity(self.threads.len());
        for tx in self.threads.iter() {
            if let Some(answer) = Self::ask_one(tx, &make).await {
                answers.push(answer);
            }
        }
        answers
    }

    /// In-process inference (tests, benchmarks); devices' clients use the local API.
    pub async fn infer(&self, model: Option<String>, rows: Vec<Vec<f32>>) -> Result<InferResponse, InferError> {
        self.ask(|reply| EngineMsg::Infer { model, rows, reply }).await.unwrap_or(Err(InferError::Stopped))
    }

    /// Swaps a model in (replacing any version of the same name) between two requests; its first
    /// drift window starts at `now_ms`.
    pub async fn install(&self, model: LoadedModel, now_ms: u64) -> Result<(), ModelError> {
        let answers = self.ask_all(|reply| EngineMsg::Install { model: Box::new(model.clone()), now_ms, reply }).await;
        if answers.len() < self.threads.len() {
            return Err(ModelError::Run("the inference engine has stopped".into()));
        }
        answers.into_iter().collect()
    }

    /// Closes the model's current drift window at `now_ms` and opens the next one there; a
    /// candidate in shadow closes its comparison window with it.
    pub async fn take_window(&self, model: String, now_ms: u64) -> Option<DriftSummary> {
        let parts = self.ask_all(|reply| EngineMsg::TakeWindow { model: model.clone(), now_ms, reply }).await;
        let mut summary = merge_windows(parts.into_iter().flatten().collect())?;
        summary.shadow = self.lock_shadows().get(&model).map(ShadowWorker::take);
        Some(summary)
    }

    /// Each model's inferences, errors and latency histogram since it was loaded.
    pub async fn serving_metrics(&self) -> Vec<super::engine::ServingMetrics> {
        let answers = self.ask_all(|reply| EngineMsg::Stats { reply }).await;
        super::engine::serving_metrics(answers.into_iter().map(|(stats, _)| stats).collect())
    }

    pub async fn counters(&self) -> Vec<ModelCounters> {
        let answers = self.ask_all(|reply| EngineMsg::Stats { reply }).await;
        let dropped = answers.first().map_or(0, |(_, dropped)| *dropped);
        let mut counters = merge_stats(answers.into_iter().map(|(stats, _)| stats).collect(), dropped);
        let shadows = self.lock_shadows();
        for c in &mut counters {
            c.shadow_version = shadows.get(&c.model).map(|w| w.version().to_string());
        }
        counters
    }

    fn lock_shadows(&self) -> MutexGuard<'_, BTreeMap<String, ShadowWorker>> {
        self.shadows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `candidate` in shadow beside the active version of its model: `sample_rate` of the
    /// requests are copied to it after they are answered. Replaces any shadow of that model.
    pub async fn install_shadow(&self, candidate: LoadedModel, sample_rate: f32) -> Result<(), ModelError> {
        let name = candidate.name.clone();
        let worker = ShadowWorker::spawn(candidate, sample_rate)?;
        let tap = worker.tap();
        let answers =
            self.ask_all(|reply| EngineMsg::SetShadow { model: name.clone(), tap: Some(tap.clone()), reply }).await;
        if answers.len() < self.threads.len() {
            return Err(ModelError::Run("the inference engine has stopped".into()));
        }
        self.lock_shadows().insert(name, worker);
        Ok(())
    }

    /// Stops the model's shadow, if it has one.
    pub async fn remove_shadow(&self, model: &str) {
        self.ask_all(|reply| EngineMsg::SetShadow { model: model.to_string(), tap: None, reply }).await;
        self.lock_shadows().remove(model);
    }

    /// The version of the candidate in shadow beside `model`, if any.
    pub fn shadow_version(&self, model: &str) -> Option<String> {
        self.lock_shadows().get(model).map(|w| w.version().to_string())
    }

    /// How fresh the device's signed instructions are: each model's offline policy is judged
    /// against it from now on (ADR 0010).
    pub async fn set_freshness(&self, clock: super::engine::FreshnessClock) {
        self.ask_all(|reply| EngineMsg::Freshness { clock, reply }).await;
    }

    /// Active model name -> version.
    pub async fn active(&self) -> BTreeMap<String, String> {
        self.ask(|reply| EngineMsg::Active { reply }).await.unwrap_or_default()
    }

    #[cfg(test)]
    pub(crate) async fn panic_for_test(&self, model: &str) -> Result<InferResponse, InferError> {
        let model = model.to_string();
        self.ask(|reply| EngineMsg::PanicForTest { model, reply }).await.unwrap_or(Err(InferError::Stopped))
    }
}

/// The engine thread's main task: control messages until every handle is gone. The local API,
/// once asked for, runs as tasks on the same single-threaded runtime.
async fn control(mut rx: mpsc::Receiver<EngineMsg>, engine: SharedEngine) {
    while let Some(msg) = rx.recv().await {
        handle(&engine, msg);
    }
}

async fn serve_api(engine: SharedEngine, api: LocalApi, stopped: oneshot::Sender<()>) {
    let listener = api.listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(api.listener));
    match listener {
        Ok(listener) => {
            let app = super::api::router(engine, api.max_body_bytes);
            let served = axum::serve(listener, app).with_graceful_shutdown(api.shutdown.cancelled_owned()).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "local API stopped");
            }
        }
        Err(e) => tracing::error!(error = %e, "local API listener unusable"),
    }
    let _ = stopped.send(());
}

fn handle(engine: &SharedEngine, msg: EngineMsg) {
    match msg {
        EngineMsg::Infer { model, rows, reply } => {
            let _ = reply.send(engine.lock().infer(model, rows));
        }
        EngineMsg::Freshness { clock, reply } => {
            engine.lock().set_freshness(clock);
            let _ = reply.send(());
        }
        EngineMsg::Install { model, now_ms, reply } => {
            let _ = reply.send(engine.lock().install(*model, now_ms));
        }
        EngineMsg::TakeWindow { model, now_ms, reply } => {
            let _ = reply.send(engine.lock().take_window(&model, now_ms));
        }
        EngineMsg::SetShadow { model, tap, reply } => {
            engine.lock().set_shadow(&model, tap);
            let _ = reply.send(());
        }
        EngineMsg::Stats { reply } => {
            let engine = engine.lock();
            let _ = reply.send((engine.stats(), engine.telemetry_dropped()));
        }
        EngineMsg::Active { reply } => {
            let _ = reply.send(engine.lock().active());
        }
        EngineMsg::Serve { api, stopped } => {
            // Runs on this thread's runtime: `handle` is called from inside it.
            tokio::spawn(serve_api(engine.clone(), api, stopped));
        }
        #[cfg(test)]
        EngineMsg::PanicForTest { model, reply } => {
            let _ = reply.send(engine.lock().panic_for_test(model));
        }
    }
}
