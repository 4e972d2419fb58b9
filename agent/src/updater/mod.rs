//! The updater: download -> verify -> stage -> self-test -> activate -> commit | fail.
//!
//! Each step is recorded in `agent.db` before it starts and reported to the server; the serving
//! model is replaced only after the new one passed every check, and only by an atomic link switch
//! followed by an in-memory swap. A failure at any step leaves the previous model serving.
//!
//! Every update ends: a download that fails (refused, stalled, corrupt, no space) is retried
//! after an exponential backoff with jitter, at most `download_attempts` times per version and
//! attempt, then reported `failed` with the last reason; a version that stops the agent during
//! its self-test `self_test_restarts` times is reported `failed` on the next start. Downloads
//! are removed after every outcome, and abandoned ones at start. A server that answers busy
//! (503, 429) is asked again after its `Retry-After` and is not counted as an attempt: it sheds
//! load on purpose during a rollout's burst, and if it stays busy the rollout's device timeout
//! on the server ends that deployment.

pub mod disk;
pub mod download;
pub mod machine;
mod shadow;
mod staging;
pub mod window;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use std::path::Path;

use proto::admission::{admit, raised_floor, DeviceClass, Refusal};
use proto::bundle::{read_archive_from, Limits};
use proto::wire::{CheckinRequest, DesiredModel, DesiredState, UpdateStatus, UpdateStep};
use proto::{Manifest, TrustedKeys};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::http::Backoff;
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
    Refused(#[from] Refusal),
    #[error("check-in reply refused: {0}")]
    Stale(#[from] proto::freshness::FreshnessError),
    #[error(transparent)]
    Window(#[from] proto::window::WindowError),
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
    pub verifier: Arc<Verifier>,
    pub checkin_every: std::time::Duration,
    pub request_timeout: std::time::Duration,
    pub policy: UpdatePolicy,
    /// Versions whose last download failed, and when the next try may start.
    pub retry_after: HashMap<(String, String), tokio::time::Instant>,
    /// When a check-in reply was last accepted (unix ms; 0 before the first), for the metrics.
    pub last_checkin_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Why the last check-in failed or was refused, in one sentence; None once one succeeds.
    pub checkin_error: tokio::sync::watch::Sender<Option<String>>,
    /// The local clock activation windows are read in.
    pub clock: window::LocalClock,
}

/// What every bundle is checked against before it is installed or loaded: the keys that may sign
/// it, the device it must be built for, and the size limits for reading it.
#[derive(Clone, Debug)]
pub struct Verifier {
    pub trusted: TrustedKeys,
    /// The root of trust `trusted` comes from (its targets role), when the config names one;
    /// None when the config lists `trusted_keys`, which never rotate.
    pub root: Option<proto::root::Root>,
    pub device: DeviceClass,
    pub limits: Limits,
}

impl Verifier {
    /// The same checks under a newer root: bundles need its targets keys and threshold.
    fn rotated(&self, root: proto::root::Root) -> Verifier {
        Verifier { trusted: root.targets(), root: Some(root), ..self.clone() }
    }

    /// Refuses a version below the model's stored floor or not built for this device (ADR 0010);
    /// returns the stored floor.
    fn admit(&self, state: &StateDb, manifest: &Manifest) -> Result<Option<semver::Version>, UpdateError> {
        let floor = state.floor(&manifest.name)?;
        admit(manifest, &self.device, floor.as_ref())?;
        Ok(floor)
    }

    /// Stores the manifest's floor when it is higher than `seen`, the one stored: from now on no
    /// version below it is installed, whatever the server says.
    fn remember_floor(state: &StateDb, manifest: &Manifest, seen: Option<semver::Version>) -> Result<(), UpdateError> {
        if let Some(raised) = raised_floor(seen.as_ref(), manifest).filter(|raised| Some(raised) != seen.as_ref()) {
            state.raise_floor(&manifest.name, &raised)?;
            tracing::info!(model = %manifest.name, floor = %raised, "anti-rollback floor raised");
        }
        Ok(())
    }
}

/// How hard the updater tries before a version is `failed`.
#[derive(Clone, Copy, Debug)]
pub struct UpdatePolicy {
    pub download_attempts: u32,
    pub self_test_restarts: u32,
    pub min_download_bytes_per_sec: u64,
    pub stall_window: Duration,
    /// First pause between download attempts; doubles up to `retry_cap`, with jitter.
    pub retry_base: Duration,
    pub retry_cap: Duration,
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
            match applied {
                Ok(()) => {
                    self.checkin_error.send_replace(None);
                }
                Err(e) => {
                    tracing::warn!(device = %self.device_id, error = %e, "check-in failed; will retry");
                    self.checkin_error.send_replace(Some(e.to_string()));
                }
            }
        }
    }

    async fn check_in_and_apply(&mut self) -> Result<(), UpdateError> {
        let mut desired = self.check_in().await?;
        // A rotated root can change which keys sign bundles and replies: follow it first.
        self.follow_root(desired.root_version).await;
        self.check_fresh(&desired).await?;
        self.last_checkin_ms.store(crate::unix_ms(), std::sync::atomic::Ordering::Relaxed);
        // Nothing the server names reaches a path, a URL or a topic before it is checked.
        desired.models.retain(|model| match proto::desired::validate(model) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(device = %self.device_id, error = %e, "desired model refused: the server's reply for it is not used");
                false
            }
        });
        let active = self.engine.active().await;
        let records = self.records().await?;
        let todo: Vec<DesiredModel> = machine::plan(&desired.models, &active, &records).into_iter().cloned().collect();
        let now = tokio::time::Instant::now();
        for model in todo {
            let key = (model.name.clone(), model.version.clone());
            if self.retry_after.get(&key).is_some_and(|at| *at > now) {
                continue;
            }
            // Failures so far count only for this exact version and attempt.
            let failures = records
                .iter()
                .find(|r| r.model == model.name && r.version == model.version && r.attempt == model.attempt)
                .map_or(0, |r| r.failures);
            let before = self.partial_bytes(&model).await;
            match self.install_or_stage(&model, failures, &records).await {
                Ok(()) => {
                    self.retry_after.remove(&key);
                }
                Err(e @ UpdateError::Download(_)) => {
                    let progressed = self.partial_bytes(&model).await.saturating_sub(before);
                    self.download_failed(&model, failures, progressed, e).await?
                }
                Err(e) => {
                    tracing::warn!(device = %self.device_id, model = %model.name, version = %model.version, error = %e, "update failed");
                    self.job().report(&model, UpdateStep::Failed, e.to_string(), failures + 1).await?;
                    self.remove_download(&model).await;
                }
            }
        }
        // Shadows last: a candidate runs beside a version only once that version is active.
        let active = self.engine.active().await;
        let records = self.records().await?;
        self.drop_stale_staged(&desired.models, &active, &records).await?;
        for model in &desired.models {
            self.reconcile_shadow(model, &active, &records).await?;
        }
        Ok(())
    }

    /// Moves to the server's newest root when it is newer than ours, one version at a time,
    /// each signed by a threshold of the previous root's keys. A refused root is logged and the
    /// device keeps the last one it accepted.
    async fn follow_root(&mut self, latest: Option<u64>) {
        let (Some(current), Some(latest)) = (self.verifier.root.clone(), latest) else { return };
        if latest <= current.version {
            return;
        }
        let state = self.state.clone();
        let seen = match blocking(move || state.freshness()).await.and_then(|r| r.map_err(UpdateError::from)) {
            Ok(seen) => seen,
            Err(e) => {
                tracing::error!(device = %self.device_id, error = %e, "root of trust not rotated: the time floor cannot be read");
                return;
            }
        };
        let now = proto::freshness::trusted_now(crate::unix_ms() / 1000, &seen);
        let (root, refused) = crate::trust::follow_rotations(
            &self.http,
            &self.server_url,
            &self.credential,
            &self.state,
            &current,
            latest,
            now,
        )
        .await;
        if root.version != current.version {
            self.verifier = Arc::new(self.verifier.rotated(root));
        }
        if let Some(e) = refused {
            tracing::error!(device = %self.device_id, error = %e, "root of trust not rotated; keeping the last accepted root");
        }
    }

    /// Under a root, a reply counts only when its timestamp signature names this device, a
    /// counter above the last accepted and an expiry not yet passed (ADR 0010); what was
    /// accepted is stored before the reply is acted on.
    async fn check_fresh(&self, desired: &DesiredState) -> Result<(), UpdateError> {
        let Some(root) = &self.verifier.root else { return Ok(()) };
        let state = self.state.clone();
        let seen = blocking(move || state.freshness()).await??;
        let clock = crate::unix_ms() / 1000;
        let accepted = proto::freshness::accept(desired, &root.timestamp(), &self.device_id, &seen, clock)?;
        let state = self.state.clone();
        blocking(move || state.save_freshness(&accepted)).await??;
        self.engine.set_freshness(crate::inference::engine::FreshnessClock::new(&accepted)).await;
        Ok(())
    }

    /// A failed transfer says little about the bundle: retry after a pause (the partial file is
    /// resumed, a corrupt one was discarded), until the attempts are used up.
    async fn download_failed(
        &mut self,
        model: &DesiredModel,
        failures: u32,
        progressed: u64,
        e: UpdateError,
    ) -> Result<(), UpdateError> {
        let key = (model.name.clone(), model.version.clone());
        let busy = match &e {
            UpdateError::Download(download::DownloadError::Busy { retry_after, .. }) => Some(*retry_after),
            _ => None,
        };
        let attempts = self.policy.download_attempts;
        match machine::after_download_error(failures, attempts, progressed, model.bundle_size, busy.is_some()) {
            machine::AfterDownloadError::RetryLater { failures } => {
                let mut backoff = Backoff::new(self.policy.retry_base, self.policy.retry_cap);
                let pause = (0..failures.max(1)).map(|_| backoff.next_delay()).last().unwrap_or_default();
                // A busy server's own pause, if longer, within the cap.
                let asked = busy.flatten().unwrap_or_default().min(self.policy.retry_cap);
                let pause = pause.max(asked);
                tracing::warn!(device = %self.device_id, model = %model.name, error = %e, failures, ?pause, "download failed; will retry");
                self.retry_after.insert(key, tokio::time::Instant::now() + pause);
                self.job().report(model, UpdateStep::Downloading, e.to_string(), failures).await
            }
            machine::AfterDownloadError::GiveUp { failures } => {
                tracing::warn!(device = %self.device_id, model = %model.name, error = %e, failures, "download failed; giving up on this version");
                self.retry_after.remove(&key);
                let detail = format!("gave up after {failures} failed download attempts; the last: {e}");
                self.job().report(model, UpdateStep::Failed, detail, failures).await?;
                self.remove_download(model).await;
                Ok(())
            }
        }
    }

    /// Bytes of the version's partial download on disk.
    async fn partial_bytes(&self, model: &DesiredModel) -> u64 {
        let part = self.layout.download_path(&model.name, &model.version).with_extension("bundle.part");
        tokio::fs::metadata(part).await.map_or(0, |m| m.len())
    }

    async fn remove_download(&self, model: &DesiredModel) {
        let (layout, name, version) = (self.layout.clone(), model.name.clone(), model.version.clone());
        let _ = blocking(move || layout.remove_download(&name, &version)).await;
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
            verifier: self.verifier.clone(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Downloads (unless the version is kept on disk), then runs the install job off the async
    /// workers: verify -> stage -> load -> self-test -> switch -> clean-up.
    async fn install(&self, desired: &DesiredModel, failures: u32) -> Result<(), UpdateError> {
        let bundle = self.fetch(desired, failures).await?;
        let (job, desired) = (self.job(), desired.clone());
        let (name, version) = (desired.name.clone(), desired.version.clone());
        blocking(move || job.run(&desired, bundle.as_deref(), failures)).await??;
        tracing::info!(device = %self.device_id, model = %name, %version, "model active");
        Ok(())
    }

    /// The version's bundle, downloaded, or None when the version is kept on disk (a rollback to
    /// `previous`, or a candidate that ran in shadow), which the install job verifies again.
    async fn fetch(&self, desired: &DesiredModel, failures: u32) -> Result<Option<std::path::PathBuf>, UpdateError> {
        let (name, version) = (desired.name.as_str(), desired.version.as_str());
        let job = self.job();
        let layout = self.layout.clone();
        let (n, v) = (name.to_string(), version.to_string());
        let kept = blocking(move || layout.version_dir(&n, &v).is_dir()).await?;
        let bundle = if kept {
            // The version is kept on disk (a rollback to `previous`): re-verify it, no download.
            None
        } else {
            job.report(desired, UpdateStep::Downloading, String::new(), failures).await?;
            let dest = self.layout.download_path(name, version);
            let dir = self.layout.download_path(name, version).parent().map(Path::to_path_buf).unwrap_or_default();
            let free_bytes = blocking(move || {
                let _ = std::fs::create_dir_all(&dir);
                crate::health::free_space(&dir)
            })
            .await?;
            let path = Download {
                client: &self.http,
                url: format!("{}{}", self.server_url, desired.bundle_path),
                credential: &self.credential,
                dest,
                size: desired.bundle_size,
                sha256: &desired.bundle_sha256,
                limit: self.verifier.limits.max_bundle_bytes,
                min_bytes_per_sec: self.policy.min_download_bytes_per_sec,
                stall_window: self.policy.stall_window,
                free_bytes,
            }
            .run()
            .await?;
            Some(path)
        };
        Ok(bundle)
    }
}

/// Everything the install job needs; it runs on a blocking thread and reaches async handles
/// (engine, uplink) through the runtime handle.
struct InstallJob {
    layout: Layout,
    state: Arc<StateDb>,
    engine: EngineHandle,
    uplink: UplinkHandle,
    verifier: Arc<Verifier>,
    runtime: tokio::runtime::Handle,
}

impl InstallJob {
    /// From async code: records the step (persist before act, off the workers) and queues its
    /// status report.
    async fn report(
        &self,
        desired: &DesiredModel,
        step: UpdateStep,
        detail: String,
        failures: u32,
    ) -> Result<(), UpdateError> {
        self.report_record(record_of(desired, step, detail, failures)).await
    }

    async fn report_record(&self, record: UpdateRecord) -> Result<(), UpdateError> {
        let (state, saved) = (self.state.clone(), record.clone());
        blocking(move || state.record(&saved)).await??;
        let active = self.engine.active().await;
        self.uplink.status(status_of(&record, &active)).await;
        Ok(())
    }

    /// The same from the blocking job.
    fn report_blocking(&self, desired: &DesiredModel, step: UpdateStep, failures: u32) -> Result<(), UpdateError> {
        let record = record_of(desired, step, String::new(), failures);
        self.state.record(&record)?;
        let active = self.runtime.block_on(self.engine.active());
        self.runtime.block_on(self.uplink.status(status_of(&record, &active)));
        Ok(())
    }

    /// Verifies and stages a downloaded bundle (when given), then self-tests and switches to the
    /// staged version. Blocking: sha256, ed25519, tract, fsync and renames all run here.
    fn run(&self, desired: &DesiredModel, bundle: Option<&Path>, failures: u32) -> Result<(), UpdateError> {
        let (name, version) = (desired.name.as_str(), desired.version.as_str());
        let loaded = self.verify_and_load(desired, bundle, failures)?;
        self.report_blocking(desired, UpdateStep::Activating, failures)?;
        self.layout.activate(name, version)?;
        self.runtime.block_on(self.engine.install(loaded, crate::unix_ms()))?;
        self.report_blocking(desired, UpdateStep::Active, 0)?;
        self.layout.remove_download(name, version);
        self.layout.collect_garbage(name)?;
        Ok(())
    }

    /// A downloaded bundle's signatures and digests, that it is the desired name and version,
    /// and that this device may run it (floor, device class); returns it with the stored floor.
    fn verify_download(
        &self,
        desired: &DesiredModel,
        path: &Path,
        failures: u32,
    ) -> Result<(proto::VerifiedBundle, Option<semver::Version>), UpdateError> {
        let (name, version) = (desired.name.as_str(), desired.version.as_str());
        self.report_blocking(desired, UpdateStep::Verifying, failures)?;
        let verify_err = |source| UpdateError::Verify { model: name.into(), version: version.into(), source };
        let file = std::fs::File::open(path).map_err(|source| disk::DiskError::Io {
            action: "open",
            path: path.into(),
            source,
        })?;
        let verified = read_archive_from(std::io::BufReader::new(file), &self.verifier.limits)
            .map_err(|e| verify_err(e.into()))?
            .verify(&self.verifier.trusted)
            .map_err(verify_err)?;
        if verified.manifest.name != name || verified.manifest.version.to_string() != version {
            let got = format!("{} {}", verified.manifest.name, verified.manifest.version);
            return Err(UpdateError::WrongBundle { want: format!("{name} {version}"), got });
        }
        let seen = self.verifier.admit(&self.state, &verified.manifest)?;
        Ok((verified, seen))
    }

    /// Verify (a download) and stage it, then load the staged or kept version and self-test it:
    /// what a version goes through before it may serve, or run in shadow.
    fn verify_and_load(
        &self,
        desired: &DesiredModel,
        bundle: Option<&Path>,
        failures: u32,
    ) -> Result<crate::inference::LoadedModel, UpdateError> {
        let (name, version) = (desired.name.as_str(), desired.version.as_str());
        if let Some(path) = bundle {
            let (verified, seen) = self.verify_download(desired, path, failures)?;
            Verifier::remember_floor(&self.state, &verified.manifest, seen)?;
            self.layout.stage(&verified)?;
        }
        self.report_blocking(desired, UpdateStep::SelfTest, failures)?;
        let verifier = &self.verifier;
        let installed = self.layout.load(name, version, &verifier.trusted, &verifier.limits)?;
        // A kept version (a rollback to `previous`) is held to the floor as much as a download.
        verifier.admit(&self.state, &installed.manifest)?;
        let loaded = installed.model;
        loaded.self_test()?;
        Ok(loaded)
    }
}

fn record_of(desired: &DesiredModel, step: UpdateStep, detail: String, failures: u32) -> UpdateRecord {
    UpdateRecord {
        model: desired.name.clone(),
        version: desired.version.clone(),
        step,
        detail,
        attempt: desired.attempt,
        failures,
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
    verifier: &Arc<Verifier>,
    self_test_restarts: u32,
) {
    let (l, s) = (layout.clone(), state.clone());
    let installed = blocking(move || recover_in_flight(&l, &s, self_test_restarts)).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read installed models at start");
        Vec::new()
    });
    for (name, candidates) in installed {
        let mut restored = false;
        for (which, version) in candidates {
            match restore_one(layout, state, engine, verifier, &name, which, &version).await {
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
fn recover_in_flight(
    layout: &Layout,
    state: &StateDb,
    self_test_restarts: u32,
) -> Vec<(String, Vec<(&'static str, String)>)> {
    let records = state.records().unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read update records at start");
        Vec::new()
    });
    let mut downloading = Vec::new();
    for record in &records {
        // A staged version waits for its window with its verified download kept.
        if record.step == UpdateStep::Staged {
            downloading.push((record.model.clone(), record.version.clone()));
        }
        let current = layout.current(&record.model);
        let done = match machine::recover(record, current.as_deref(), self_test_restarts) {
            machine::Recovery::Nothing => Ok(()),
            machine::Recovery::CommitActive => state
                .record(&UpdateRecord {
                    step: UpdateStep::Active,
                    detail: String::new(),
                    failures: 0,
                    ..record.clone()
                })
                .map_err(UpdateError::from),
            // The record stays in flight, so the next check-in installs again; the download resumes.
            machine::Recovery::Restart { failed } => {
                downloading.push((record.model.clone(), record.version.clone()));
                let counted = UpdateRecord { failures: record.failures + u32::from(failed), ..record.clone() };
                state
                    .record(&counted)
                    .map_err(UpdateError::from)
                    .and_then(|()| layout.collect_garbage(&record.model).map_err(UpdateError::from))
            }
            machine::Recovery::GiveUp => {
                let failures = record.failures + 1;
                tracing::error!(model = %record.model, version = %record.version, failures, "version stopped the agent during its self-test; giving up on it");
                let detail =
                    format!("the agent stopped {failures} times during this version's self-test; it is not installed");
                state
                    .record(&UpdateRecord { step: UpdateStep::Failed, detail, failures, ..record.clone() })
                    .map_err(UpdateError::from)
                    .and_then(|()| layout.collect_garbage(&record.model).map_err(UpdateError::from))
            }
        };
        if let Err(e) = done {
            tracing::error!(model = %record.model, error = %e, "cannot settle the update in flight at start");
        }
    }
    for path in layout.remove_abandoned_downloads(&downloading) {
        tracing::info!(path = %path.display(), "abandoned download removed");
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
/// `previous` one makes it `current` and records the rollback. `current` serves even when a floor
/// seen since it was installed is above it (it keeps the device answering until the server names
/// a newer version); falling back to `previous` is a rollback and is held to the floor.
async fn restore_one(
    layout: &Layout,
    state: &Arc<StateDb>,
    engine: &EngineHandle,
    verifier: &Arc<Verifier>,
    name: &str,
    which: &'static str,
    version: &str,
) -> Result<(), UpdateError> {
    let (l, s, checks, n, v) = (layout.clone(), state.clone(), verifier.clone(), name.to_string(), version.to_string());
    let loaded = blocking(move || {
        let installed = l.load(&n, &v, &checks.trusted, &checks.limits)?;
        if which == "previous" {
            checks.admit(&s, &installed.manifest)?;
        }
        Ok::<_, UpdateError>(installed.model)
    })
    .await??;
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
                failures: 0,
            })?;
            Ok::<_, UpdateError>(())
        })
        .await??;
    }
    Ok(())
}
