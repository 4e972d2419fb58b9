//! Candidates in shadow (a rollout's shadow wave): what the server asks for at each check-in is
//! made true. A candidate goes through the same download, signature, floor, device-class and
//! self-test checks as any version, is kept on disk under the `shadow` link, and runs on a
//! sample of requests beside the active version; it never serves. When the server stops asking,
//! or activates the candidate, the shadow stops.

use std::collections::BTreeMap;

use proto::wire::{DesiredModel, DesiredShadow, UpdateStep};

use super::{blocking, InstallJob, UpdateError, Updater};
use crate::state::UpdateRecord;

impl Updater {
    /// Starts, keeps or stops the shadow of one desired model. A failure is reported as the
    /// candidate's and does not touch the active version.
    pub(super) async fn reconcile_shadow(
        &mut self,
        desired: &DesiredModel,
        active: &BTreeMap<String, String>,
        records: &[UpdateRecord],
    ) -> Result<(), UpdateError> {
        let name = desired.name.as_str();
        let running = self.engine.shadow_version(name);
        let wanted = desired
            .shadow
            .as_ref()
            .filter(|s| active.get(name) == Some(&desired.version) && s.version != desired.version);
        match (wanted, running) {
            (None, Some(version)) => {
                self.engine.remove_shadow(name).await;
                let (layout, n) = (self.layout.clone(), name.to_string());
                blocking(move || layout.set_shadow(&n, None)).await??;
                tracing::info!(device = %self.device_id, model = name, %version, "shadow stopped");
                Ok(())
            }
            (Some(shadow), Some(version)) if shadow.version == version => Ok(()),
            (Some(shadow), _) => self.start_shadow(desired, shadow, records).await,
            (None, None) => Ok(()),
        }
    }

    async fn start_shadow(
        &mut self,
        desired: &DesiredModel,
        shadow: &DesiredShadow,
        records: &[UpdateRecord],
    ) -> Result<(), UpdateError> {
        let candidate = shadow.as_model(&desired.name, desired.attempt);
        let record = records.iter().find(|r| r.model == candidate.name && r.version == candidate.version);
        // A candidate that failed at this attempt is not tried again until the server asks anew.
        if record.is_some_and(|r| r.step == UpdateStep::Failed && r.attempt >= candidate.attempt) {
            return Ok(());
        }
        let key = (candidate.name.clone(), candidate.version.clone());
        if self.retry_after.get(&key).is_some_and(|at| *at > tokio::time::Instant::now()) {
            return Ok(());
        }
        let failures = record.filter(|r| r.attempt == candidate.attempt).map_or(0, |r| r.failures);
        let before = self.partial_bytes(&candidate).await;
        let started = match self.fetch(&candidate, failures).await {
            Ok(bundle) => {
                let (job, model, version) = (self.job(), candidate.clone(), desired.version.clone());
                let rate = shadow.sample_rate;
                blocking(move || job.run_shadow(&model, &version, bundle.as_deref(), failures, rate)).await?
            }
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => {
                self.retry_after.remove(&key);
                tracing::info!(device = %self.device_id, model = %candidate.name, version = %candidate.version, rate = shadow.sample_rate, "candidate running in shadow");
                Ok(())
            }
            Err(e @ UpdateError::Download(_)) => {
                let progressed = self.partial_bytes(&candidate).await.saturating_sub(before);
                self.download_failed(&candidate, failures, progressed, e).await
            }
            Err(e) => {
                tracing::warn!(device = %self.device_id, model = %candidate.name, version = %candidate.version, error = %e, "shadow refused");
                self.job().report(&candidate, UpdateStep::Failed, e.to_string(), failures + 1).await?;
                self.remove_download(&candidate).await;
                Ok(())
            }
        }
    }
}

impl InstallJob {
    /// Verifies, stages and self-tests the candidate like any version, keeps it under the
    /// `shadow` link, and starts it beside the active version. The model's record goes back to
    /// the active version once the candidate runs: it is the active version that serves.
    fn run_shadow(
        &self,
        candidate: &DesiredModel,
        active_version: &str,
        bundle: Option<&std::path::Path>,
        failures: u32,
        sample_rate: f32,
    ) -> Result<(), UpdateError> {
        let loaded = self.verify_and_load(candidate, bundle, failures)?;
        self.layout.set_shadow(&candidate.name, Some(&candidate.version))?;
        self.runtime.block_on(self.engine.install_shadow(loaded, sample_rate))?;
        let active = DesiredModel { version: active_version.to_string(), shadow: None, ..candidate.clone() };
        self.report_blocking(&active, UpdateStep::Active, 0)?;
        self.layout.remove_download(&candidate.name, &candidate.version);
        self.layout.collect_garbage(&candidate.name)?;
        Ok(())
    }
}
