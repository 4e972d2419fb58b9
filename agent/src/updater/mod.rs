//! The updater: download -> verify -> stage -> self-test -> activate -> commit | fail.
//!
//! Each step is recorded in `agent.db` before it starts and reported to the server; the serving
//! model is replaced only after the new one passed every check, and only by an atomic link switch
//! followed by an in-memory swap. A failure at any step leaves the previous model serving.

pub mod disk;
pub mod download;
pub mod machine;

use std::collections::BTreeMap;
use std::sync::Arc;

use std::path::Path;

use proto::bundle::{read_archive_from, Limits};
use proto::wire::{CheckinRequest, DesiredModel, DesiredState, UpdateStatus, UpdateStep};
use proto::TrustedKeys;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::inference::EngineHandle;
use crate::state::{StateDb, UpdateRecord};
use crate::uplink::UplinkHandle;
use disk::Layout;
use download::Download;

#[derive(Debug, Error)]
pub enum UpdateError {
    #[error(transparent)]
    Download(#[from] download::DownloadError),
    #[error("bundle {model} {version} refused: {source}")]
    Verify { model: String, version: String, source: proto::VerifyError },
    #[error("bundle names {got}, but {want} was desired: refused")]
    WrongBundle { want: String, got: String },
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    #[error(transparent)]
    Model(#[from] crate::inference::ModelError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("check-in with {url} failed: {reason}")]
    Checkin { url: String, reason: String },
    #[error("blocking task failed: {0}")]
    Join(String),
}

/// Messages the updater accepts.
#[derive(Debug)]
pub enum UpdaterMsg {
    /// The server said the desired state changed: check in now.
    CheckNow,
}

pub struct Updater {
    pub http: reqwest::Client,
    pub server_url: String,
    pub device_id: String,
    pub credential: String,
    pub layout: Layout,
    pub state: Arc<StateDb>,
    pub engine: EngineHandle,
    pub uplink: UplinkHandle,
    pub trusted: Arc<TrustedKeys>,
    pub limits: Limits,
    pub checkin_every: std::time::Duration,
    pub request_timeout: std::time::Duration,
}

impl Updater {
    pub async fn run(mut self, mut rx: mpsc::Receiver<UpdaterMsg>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.checkin_every);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                msg = rx.recv() => if msg.is_none() { break },
            }
            // Stopping mid-update is safe at any await: the partial download resumes, and a
            // started install job finishes on its blocking thread (persist before act).
            let applied = tokio::select! {
                _ = cancel.cancelled() => break,
                applied = self.check_in_and_apply() => applied,
            };
            if let Err(e) = applied {
                tracing::warn!(device = %self.device_id, error = %e, "check-in failed; will retry");
            }
        }
    }

    async fn check_in_and_apply(&mut self) -> Result<(), UpdateError> {
        let desired = self.check_in().await?;
        let active = self.engine.active().await;
        let records = self.records().await?;
        let todo: Vec<DesiredModel> = machine::plan(&desired.models, &active, &records).into_iter().cloned().collect();
        for model in todo {
            match self.install(&model).await {
                Ok(()) => {}
                // A failed transfer says nothing about the bundle: stay in `downloading` so the
                // next check-in resumes it, instead of giving up on the version.
                Err(e @ UpdateError::Download(_)) => {
                    tracing::warn!(device = %self.device_id, model = %model.name, error = %e, "download failed; will resume");
                    self.job().report(&model, UpdateStep::Downloading, e.to_string()).await?;
                }
                Err(e) => {
                    tracing::warn!(device = %self.device_id, model = %model.name, version = %model.version, error = %e, "update failed");
                    self.job().report(&model, UpdateStep::Failed, e.to_string()).await?;
                }
            }
        }
        Ok(())
    }

    async fn records(&self) -> Result<Vec<UpdateRecord>, UpdateError> {
        let state = self.state.clone();
        Ok(blocking(move || state.records()).await??)
    }

    async fn check_in(&self) -> Result<DesiredState, UpdateError> {
        let url = format!("{}/api/v1/devices/{}/checkin", self.server_url, self.device_id);
        let failed = |reason: String| UpdateError::Checkin { url: url.clone(), reason };
        let records = self.records().await?;
        let active = self.engine.active().await;
        let body = CheckinRequest { models: records.iter().map(|r| status_of(r, &active)).collect() };
        let response = self
            .http
            .post(&url)
            .bearer_auth(&self.credential)
            .json(&body)
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        if !response.status().is_success() {
            return Err(failed(format!("HTTP {}", response.status())));
        }
        crate::http::json_capped(response, proto::wire::MAX_REPLY_BYTES).await.map_err(failed)
    }

    fn job(&self) -> InstallJob {
        InstallJob {
            layout: self.layout.clone(),
            state: self.state.clone(),
            engine: self.engine.clone(),
            uplink: self.uplink.clone(),
            trusted: self.trusted.clone(),
            limits: self.limits,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Downloads (unless the version is kept on disk), then runs the install job off the async
    /// workers: verify -> stage -> load -> self-test -> switch -> clean-up.
    async fn install(&self, desired: &DesiredModel) -> Result<(), UpdateError> {
        let (name, version) = (desired.name.as_str(), desired.version.as_str());
        let job = self.job();
        let layout = self.layout.clone();
        let (n, v) = (name.to_string(), version.to_string());
        let kept = blocking(move || layout.version_dir(&n, &v).is_dir()).await?;
        let bundle = if kept {
            // The version is kept on disk (a rollback to `previous`): re-verify it, no download.
            None
        } else {
            job.report(desired, UpdateStep::Downloading, String::new()).await?;
            let path = Download {
                client: &self.http,
                url: format!("{}{}", self.server_url, desired.bundle_path),
                credential: &self.credential,
                dest: self.layout.download_path(name, version),
                size: desired.bundle_size,
                sha256: &desired.bundle_sha256,
                limit: self.limits.max_bundle_bytes,
            }
            .run()
            .await?;
            Some(path)
        };
        let desired = desired.clone();
        blocking(move || job.run(&desired, bundle.as_deref())).await??;
        tracing::info!(device = %self.device_id, model = name, version, "model active");
        Ok(())
    }
}

/// Everything the install job needs; it runs on a blocking thread and reaches async handles
/// (engine, uplink) through the runtime handle.
struct InstallJob {
    layout: Layout,
    state: Arc<StateDb>,
    engine: EngineHandle,
    uplink: UplinkHandle,
    trusted: Arc<TrustedKeys>,
    limits: Limits,
    runtime: tokio::runtime::Handle,
}

impl InstallJob {
    /// From async code: records the step (persist before act, off the workers) and queues its
    /// status report.
    async fn report(&self, desired: &DesiredModel, step: UpdateStep, detail: String) -> Result<(), UpdateError> {
        let record = record_of(desired, step, detail);
        let (state, saved) = (self.state.clone(), record.clone());
        blocking(move || state.record(&saved)).await??;
        let active = self.engine.active().await;
        self.uplink.status(status_of(&record, &active)).await;
        Ok(())
    }

    /// The same from the blocking job.
    fn report_blocking(&self, desired: &DesiredModel, step: UpdateStep) -> Result<(), UpdateError> {
        let record = record_of(desired, step, String::new());
        self.state.record(&record)?;
        let active = self.runtime.block_on(self.engine.active());
        self.runtime.block_on(self.uplink.status(status_of(&record, &active)));
        Ok(())
    }

    /// Verifies and stages a downloaded bundle (when given), then self-tests and switches to the
    /// staged version. Blocking: sha256, ed25519, tract, fsync and renames all run here.
    fn run(&self, desired: &DesiredModel, bundle: Option<&Path>) -> Result<(), UpdateError> {
        let (name, version) = (desired.name.as_str(), desired.version.as_str());
        if let Some(path) = bundle {
            self.report_blocking(desired, UpdateStep::Verifying)?;
            let verify_err = |source| UpdateError::Verify { model: name.into(), version: version.into(), source };
            let file = std::fs::File::open(path).map_err(|source| disk::DiskError::Io {
                action: "open",
                path: path.into(),
                source,
            })?;
            let verified = read_archive_from(std::io::BufReader::new(file), &self.limits)
                .map_err(|e| verify_err(e.into()))?
                .verify(&self.trusted)
                .map_err(verify_err)?;
            if verified.manifest.name != name || verified.manifest.version.to_string() != version {
                let got = format!("{} {}", verified.manifest.name, verified.manifest.version);
                return Err(UpdateError::WrongBundle { want: format!("{name} {version}"), got });
            }
            self.layout.stage(&verified)?;
        }
        self.report_blocking(desired, UpdateStep::SelfTest)?;
        let loaded = self.layout.load(name, version, &self.trusted, &self.limits)?;
        loaded.self_test()?;
        self.report_blocking(desired, UpdateStep::Activating)?;
        self.layout.activate(name, version)?;
        self.runtime.block_on(self.engine.install(loaded, crate::unix_ms()))?;
        self.report_blocking(desired, UpdateStep::Active)?;
        let _ = std::fs::remove_file(self.layout.download_path(name, version));
        self.layout.collect_garbage(name)?;
        Ok(())
    }
}

fn record_of(desired: &DesiredModel, step: UpdateStep, detail: String) -> UpdateRecord {
    UpdateRecord {
        model: desired.name.clone(),
        version: desired.version.clone(),
        step,
        detail,
        attempt: desired.attempt,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, UpdateError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| UpdateError::Join(e.to_string()))
}

pub fn status_of(record: &UpdateRecord, active: &BTreeMap<String, String>) -> UpdateStatus {
    UpdateStatus {
        model: record.model.clone(),
        version: record.version.clone(),
        step: record.step,
        detail: record.detail.clone(),
        active_version: active.get(&record.model).cloned(),
        at_ms: crate::unix_ms(),
    }
}

/// Loads every installed model at start, finishing or undoing updates that were in flight.
/// A `current` version that fails to verify, load or start is replaced by `previous` (rolled
/// back). Nothing here stops the agent: a model that cannot be restored is logged and skipped,
/// and the others still serve.
pub async fn restore_installed(
    layout: &Layout,
    state: &Arc<StateDb>,
    engine: &EngineHandle,
    trusted: &Arc<TrustedKeys>,
    limits: &Limits,
) {
    let (l, s) = (layout.clone(), state.clone());
    let installed = blocking(move || recover_in_flight(&l, &s)).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read installed models at start");
        Vec::new()
    });
    for (name, candidates) in installed {
        let mut restored = false;
        for (which, version) in candidates {
            match restore_one(layout, state, engine, trusted, limits, &name, which, &version).await {
                Ok(()) => {
                    restored = true;
                    break;
                }
                Err(e) => {
                    tracing::error!(model = %name, %version, which, error = %e, "installed model refused at start")
                }
            }
        }
        if !restored {
            tracing::error!(model = %name, "no installed version of this model could be restored; waiting for the server");
        }
    }
}

/// Finishes or undoes each in-flight update (a failure is logged, never fatal) and lists, per
/// installed model, the versions to try in order: `current`, then `previous`.
fn recover_in_flight(layout: &Layout, state: &StateDb) -> Vec<(String, Vec<(&'static str, String)>)> {
    match state.records() {
        Ok(records) => {
            for record in records {
                let current = layout.current(&record.model);
                let done = match machine::recover(&record, current.as_deref()) {
                    machine::Recovery::Nothing => Ok(()),
                    machine::Recovery::CommitActive => state
                        .record(&UpdateRecord { step: UpdateStep::Active, detail: String::new(), ..record.clone() })
                        .map_err(UpdateError::from),
                    // The record stays in flight, so the next check-in installs again; the download resumes.
                    machine::Recovery::Restart => layout.collect_garbage(&record.model).map_err(UpdateError::from),
                };
                if let Err(e) = done {
                    tracing::error!(model = %record.model, error = %e, "cannot settle the update in flight at start");
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read update records at start"),
    }
    layout
        .installed()
        .into_iter()
        .map(|name| {
            let candidates = ["current", "previous"]
                .into_iter()
                .filter_map(|which| Some((which, layout.linked_version(&name, which)?)))
                .collect();
            (name, candidates)
        })
        .collect()
}

/// Loads one installed version (off the workers), puts it in the engine, and when it is the
/// `previous` one makes it `current` and records the rollback.
#[allow(clippy::too_many_arguments)]
async fn restore_one(
    layout: &Layout,
    state: &Arc<StateDb>,
    engine: &EngineHandle,
    trusted: &Arc<TrustedKeys>,
    limits: &Limits,
    name: &str,
    which: &'static str,
    version: &str,
) -> Result<(), UpdateError> {
    let (l, t, lim, n, v) = (layout.clone(), trusted.clone(), *limits, name.to_string(), version.to_string());
    let loaded = blocking(move || l.load(&n, &v, &t, &lim)).await??;
    engine.install(loaded, crate::unix_ms()).await?;
    if which == "previous" {
        let (l, s, n, v) = (layout.clone(), state.clone(), name.to_string(), version.to_string());
        blocking(move || {
            l.activate(&n, &v)?;
            s.record(&UpdateRecord {
                model: n.clone(),
                version: v.clone(),
                step: UpdateStep::RolledBack,
                detail: "the current version failed verification at start".into(),
                attempt: 0,
            })?;
            Ok::<_, UpdateError>(())
        })
        .await??;
    }
    Ok(())
}
