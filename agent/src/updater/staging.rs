//! Maintenance windows (ADR 0012): a desired version with an activation window is downloaded and
//! verified at once, then held `staged` until the device's local clock enters the window; only
//! then does the install job (which verifies the kept download again) switch to it. The old
//! version serves meanwhile. A staged download that the server no longer asks for is dropped.

use std::collections::BTreeMap;

use proto::window::ActivationWindow;
use proto::wire::{DesiredModel, UpdateStep};

use super::{blocking, UpdateError, Updater};
use crate::state::UpdateRecord;

impl Updater {
    /// Installs `model` now, or, when its activation window is closed, downloads and verifies it
    /// and reports it `staged` (once: a later check-in with the window still closed and the
    /// download kept does nothing).
    pub(super) async fn install_or_stage(
        &self,
        model: &DesiredModel,
        failures: u32,
        records: &[UpdateRecord],
    ) -> Result<(), UpdateError> {
        let Some(window) = &model.activation_window else { return self.install(model, failures).await };
        let minute = self.clock.minute_of_day(crate::unix_ms());
        if window.contains(minute)? {
            return self.install(model, failures).await;
        }
        let staged = records.iter().any(|r| {
            r.model == model.name
                && r.version == model.version
                && r.attempt == model.attempt
                && r.step == UpdateStep::Staged
        });
        if staged && self.kept_for_window(model).await? {
            return Ok(());
        }
        self.stage(model, failures, window, minute).await
    }

    /// Download (or find kept on disk) and verify, then record and report `staged`.
    async fn stage(
        &self,
        model: &DesiredModel,
        failures: u32,
        window: &ActivationWindow,
        minute: u16,
    ) -> Result<(), UpdateError> {
        if let Some(path) = self.fetch(model, failures).await? {
            let (job, desired) = (self.job(), model.clone());
            blocking(move || job.verify_download(&desired, &path, failures).map(drop)).await??;
        }
        let wait = window.minutes_until_open(minute)?;
        let detail = format!(
            "verified; activates in the {window} window ({} time), which opens in {} h {:02} min",
            self.clock.name(),
            wait / 60,
            wait % 60
        );
        tracing::info!(device = %self.device_id, model = %model.name, version = %model.version, %window, "staged until the activation window");
        self.job().report(model, UpdateStep::Staged, detail, failures).await
    }

    /// Whether what a staged version needs is still on disk: its finished download, or the
    /// version itself (kept as `previous`, or after a shadow).
    async fn kept_for_window(&self, model: &DesiredModel) -> Result<bool, UpdateError> {
        let download = self.layout.download_path(&model.name, &model.version);
        let version_dir = self.layout.version_dir(&model.name, &model.version);
        blocking(move || download.is_file() || version_dir.is_dir()).await
    }

    /// A model staged at a version the server no longer asks for (a rollback or abort while it
    /// waited for its window) goes back to reporting the version it serves, and its staged
    /// download is removed.
    pub(super) async fn drop_stale_staged(
        &self,
        desired: &[DesiredModel],
        active: &BTreeMap<String, String>,
        records: &[UpdateRecord],
    ) -> Result<(), UpdateError> {
        for record in records.iter().filter(|r| r.step == UpdateStep::Staged) {
            let still_wanted = desired.iter().any(|d| d.name == record.model && d.version == record.version);
            if still_wanted {
                continue;
            }
            let (layout, name, version) = (self.layout.clone(), record.model.clone(), record.version.clone());
            blocking(move || layout.remove_download(&name, &version)).await?;
            if let Some(serving) = active.get(&record.model) {
                let serving = UpdateRecord {
                    version: serving.clone(),
                    step: UpdateStep::Active,
                    detail: String::new(),
                    attempt: 0,
                    failures: 0,
                    ..record.clone()
                };
                self.job().report_record(serving).await?;
            }
            tracing::info!(device = %self.device_id, model = %record.model, version = %record.version, "staged version no longer desired; dropped");
        }
        Ok(())
    }
}
