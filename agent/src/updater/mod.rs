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

use proto::bundle::{read_archive, Limits};
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
    pub state: StateDb,
    pub engine: EngineHandle,
    pub uplink: UplinkHandle,
    pub trusted: Arc<TrustedKeys>,
    pub limits: Limits,
    pub checkin_every: std::time::Duration,
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
            if let Err(e) = self.check_in_and_apply().await {
                tracing::warn!(device = %self.device_id, error = %e, "check-in failed; will retry");
            }
        }
    }

    async fn check_in_and_apply(&mut self) -> Result<(), UpdateError> {
        let desired = self.check_in().await?;
        let active = self.engine.active().await;
        let records = self.state.records()?;
        let todo: Vec<DesiredModel> = machine::plan(&desired.models, &active, &records).into_iter().cloned().collect();
        for model in todo {
            match self.install(&model).await {
                Ok(()) => {}
                // A failed transfer says nothing about the bundle: stay in `downloading` so the
                // next check-in resumes it, instead of giving up on the version.
                Err(e @ UpdateError::Download(_)) => {
                    tracing::warn!(device = %self.device_id, model = %model.name, error = %e, "download failed; will resume");
                    self.report(&model, UpdateStep::Downloading, e.to_string()).await?;
                }
                Err(e) => {
                    tracing::warn!(device = %self.device_id, model = %model.name, version = %model.version, error = %e, "update failed");
                    self.report(&model, UpdateStep::Failed, e.to_string()).await?;
                }
            }
        }
        Ok(())
    }

    async fn check_in(&self) -> Result<DesiredState, UpdateError> {
        let url = format!("{}/api/v1/devices/{}/checkin", self.server_url, self.device_id);
        let failed = |reason: String| UpdateError::Checkin { url: url.clone(), reason };
        let records = self.state.records()?;
        let active = self.engine.active().await;
        let body = CheckinRequest { models: records.iter().map(|r| status_of(r, &active)).collect() };
        let response = self
            .http
            .post(&url)
            .bearer_auth(&self.credential)
            .json(&body)
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        if !response.status().is_success() {
            return Err(failed(format!("HTTP {}", response.status())));
        }
        response.json().await.map_err(|e| failed(e.to_string()))
    }

    /// Records the step (persist before act) and queues its status report.
    async fn report(&self, desired: &DesiredModel, step: UpdateStep, detail: String) -> Result<(), UpdateError> {
        let (model, version) = (desired.name.as_str(), desired.version.as_str());
        let record =
            UpdateRecord { model: model.into(), version: version.into(), step, detail, attempt: desired.attempt };
        self.state.record(&record)?;
        let active = self.engine.active().await;
        self.uplink.status(status_of(&record, &active)).await;
        Ok(())
    }

    async fn install(&self, desired: &DesiredModel) -> Result<(), UpdateError> {
        let (name, version) = (desired.name.as_str(), desired.version.as_str());
        if self.layout.version_dir(name, version).is_dir() {
            // The version is kept on disk (a rollback to `previous`): re-verify it, no download.
            return self.activate_installed(desired).await;
        }
        self.report(desired, UpdateStep::Downloading, String::new()).await?;
        let bytes = Download {
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

        self.report(desired, UpdateStep::Verifying, String::new()).await?;
        let verify_err = |source| UpdateError::Verify { model: name.into(), version: version.into(), source };
        let verified = read_archive(&bytes, &self.limits)
            .map_err(|e| verify_err(e.into()))?
            .verify(&self.trusted)
            .map_err(verify_err)?;
        let got = format!("{} {}", verified.manifest.name, verified.manifest.version);
        if verified.manifest.name != name || verified.manifest.version.to_string() != version {
            return Err(UpdateError::WrongBundle { want: format!("{name} {version}"), got });
        }
        let layout = self.layout.clone();
        blocking(move || layout.stage(&verified)).await??;

        self.activate_installed(desired).await
    }

    /// Self-test and switch to a version already staged on disk (verified again on load).
    async fn activate_installed(&self, desired: &DesiredModel) -> Result<(), UpdateError> {
        let (name, version) = (desired.name.as_str(), desired.version.as_str());
        self.report(desired, UpdateStep::SelfTest, String::new()).await?;
        let (layout, trusted, limits) = (self.layout.clone(), self.trusted.clone(), self.limits);
        let (n, v) = (name.to_string(), version.to_string());
        let loaded = blocking(move || {
            let loaded = layout.load(&n, &v, &trusted, &limits)?;
            loaded.self_test()?;
            Ok::<_, UpdateError>(loaded)
        })
        .await??;

        self.report(desired, UpdateStep::Activating, String::new()).await?;
        self.layout.activate(name, version)?;
        self.engine.install(loaded, crate::unix_ms()).await?;
        self.report(desired, UpdateStep::Active, String::new()).await?;
        let _ = std::fs::remove_file(self.layout.download_path(name, version));
        self.layout.collect_garbage(name)?;
        tracing::info!(device = %self.device_id, model = name, version, "model active");
        Ok(())
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
/// A `current` version that no longer verifies is replaced by `previous` (rolled back).
pub async fn restore_installed(
    layout: &Layout,
    state: &StateDb,
    engine: &EngineHandle,
    trusted: &Arc<TrustedKeys>,
    limits: &Limits,
) -> Result<(), UpdateError> {
    for record in state.records()? {
        let current = layout.current(&record.model);
        match machine::recover(&record, current.as_deref()) {
            machine::Recovery::Nothing => {}
            machine::Recovery::CommitActive => {
                state.record(&UpdateRecord { step: UpdateStep::Active, detail: String::new(), ..record.clone() })?;
            }
            // The record stays in flight, so the next check-in installs again; the download resumes.
            machine::Recovery::Restart => layout.collect_garbage(&record.model)?,
        }
    }
    for name in layout.installed() {
        for which in ["current", "previous"] {
            let Some(version) = layout.linked_version(&name, which) else {
                continue;
            };
            let (l, t, lim, n, v) = (layout.clone(), trusted.clone(), *limits, name.clone(), version.clone());
            match blocking(move || l.load(&n, &v, &t, &lim)).await? {
                Ok(loaded) => {
                    engine.install(loaded, crate::unix_ms()).await?;
                    if which == "previous" {
                        layout.activate(&name, &version)?;
                        state.record(&UpdateRecord {
                            model: name.clone(),
                            version,
                            step: UpdateStep::RolledBack,
                            detail: "the current version failed verification at start".into(),
                            attempt: 0,
                        })?;
                    }
                    break;
                }
                Err(e) => {
                    tracing::error!(model = %name, version = %version, error = %e, "installed model refused at start")
                }
            }
        }
    }
    Ok(())
}
