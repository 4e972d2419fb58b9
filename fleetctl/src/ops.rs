//! Operator workflows over the API that take more than one call: following a plain deployment
//! until every targeted device has ended it, and exporting stored telemetry as CSV.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use proto::wire::{DeviceModelView, DeviceView, UpdateStep};

use crate::client::{ClientError, FleetClient};

/// Where one device stands with a deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceOutcome {
    Active,
    /// With the device's one-sentence reason.
    Failed(String),
    /// Still on its way: the step it reported for this version, if any yet.
    Pending(Option<UpdateStep>),
    /// Still pending when the deadline passed.
    TimedOut(Option<UpdateStep>),
}

impl DeviceOutcome {
    pub fn ended(&self) -> bool {
        !matches!(self, DeviceOutcome::Pending(_))
    }
}

/// A device's outcome for `version` of its model view (pure).
pub fn outcome(view: Option<&DeviceModelView>, version: &str) -> DeviceOutcome {
    let Some(view) = view else { return DeviceOutcome::Pending(None) };
    let about_this = view.step_version.as_deref() == Some(version);
    match view.step {
        Some(UpdateStep::Active) if about_this && view.active_version.as_deref() == Some(version) => {
            DeviceOutcome::Active
        }
        Some(UpdateStep::Failed | UpdateStep::RolledBack) if about_this => DeviceOutcome::Failed(view.detail.clone()),
        step if about_this => DeviceOutcome::Pending(step),
        _ => DeviceOutcome::Pending(None),
    }
}

/// Every targeted device's outcome, from one device listing (pure).
pub fn outcomes(
    devices: &[DeviceView],
    targets: &[String],
    model: &str,
    version: &str,
) -> BTreeMap<String, DeviceOutcome> {
    targets
        .iter()
        .map(|id| {
            let view = devices.iter().find(|d| &d.id == id).and_then(|d| d.models.iter().find(|m| m.name == model));
            (id.clone(), outcome(view, version))
        })
        .collect()
}

/// Counts (active, failed, pending) for a progress line.
pub fn tally(outcomes: &BTreeMap<String, DeviceOutcome>) -> (usize, usize, usize) {
    let active = outcomes.values().filter(|o| **o == DeviceOutcome::Active).count();
    let failed = outcomes.values().filter(|o| matches!(o, DeviceOutcome::Failed(_))).count();
    (active, failed, outcomes.len() - active - failed)
}

/// Polls until every target ended (active or failed) or `timeout` passed; pending devices then
/// count as timed out. `progress` sees each new tally.
pub async fn follow_deployment(
    client: &FleetClient,
    targets: &[String],
    model: &str,
    version: &str,
    timeout: Duration,
    mut progress: impl FnMut(&BTreeMap<String, DeviceOutcome>),
) -> Result<BTreeMap<String, DeviceOutcome>, ClientError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        let current = outcomes(&client.devices().await?, targets, model, version);
        let counts = tally(&current);
        if last != Some(counts) {
            progress(&current);
            last = Some(counts);
        }
        if current.values().all(DeviceOutcome::ended) {
            return Ok(current);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(current
                .into_iter()
                .map(|(id, o)| match o {
                    DeviceOutcome::Pending(step) => (id, DeviceOutcome::TimedOut(step)),
                    ended => (id, ended),
                })
                .collect());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// Writes every stored telemetry row of `model` (optionally one version, since a time) to `out`
/// as CSV: `device,seq,at_ms,model,version,latency_us,features,outputs`, the value lists
/// space-separated. Returns the rows written.
pub async fn export_telemetry(
    client: &FleetClient,
    model: &str,
    version: Option<&str>,
    since_ms: Option<u64>,
    out: &Path,
) -> Result<u64, ExportError> {
    let write_err = |source| ExportError::Write { path: out.display().to_string(), source };
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).map_err(write_err)?);
    writeln!(file, "device,seq,at_ms,model,version,latency_us,features,outputs").map_err(write_err)?;
    let mut after: Option<(String, u64)> = None;
    let mut written = 0;
    loop {
        let page =
            client.telemetry_page(model, version, since_ms, after.as_ref().map(|(d, s)| (d.as_str(), *s))).await?;
        let Some(last) = page.last() else { break };
        after = Some((last.device.clone(), last.row.seq));
        for r in &page {
            let join = |values: &[f32]| values.iter().map(f32::to_string).collect::<Vec<_>>().join(" ");
            writeln!(
                file,
                "{},{},{},{},{},{},{},{}",
                r.device,
                r.row.seq,
                r.row.at_ms,
                r.row.model,
                r.row.version,
                r.row.latency_us,
                join(&r.row.features),
                join(&r.row.outputs)
            )
            .map_err(write_err)?;
            written += 1;
        }
    }
    file.flush().map_err(write_err)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(step: Option<UpdateStep>, step_version: &str, active: &str) -> DeviceModelView {
        DeviceModelView {
            name: "m".into(),
            desired_version: Some("2.0.0".into()),
            active_version: Some(active.into()),
            step,
            step_version: Some(step_version.into()),
            detail: "why".into(),
            inferences: 0,
            drift_summaries: 0,
            drift_score: None,
            mean_confidence: None,
        }
    }

    #[test]
    fn a_device_is_active_or_failed_only_by_a_step_about_the_deployed_version() {
        assert_eq!(outcome(Some(&view(Some(UpdateStep::Active), "2.0.0", "2.0.0")), "2.0.0"), DeviceOutcome::Active);
        assert_eq!(
            outcome(Some(&view(Some(UpdateStep::Failed), "2.0.0", "1.0.0")), "2.0.0"),
            DeviceOutcome::Failed("why".into())
        );
        // An old failure of another version says nothing about this deployment.
        assert_eq!(
            outcome(Some(&view(Some(UpdateStep::Failed), "1.5.0", "1.0.0")), "2.0.0"),
            DeviceOutcome::Pending(None)
        );
        assert_eq!(
            outcome(Some(&view(Some(UpdateStep::Downloading), "2.0.0", "1.0.0")), "2.0.0"),
            DeviceOutcome::Pending(Some(UpdateStep::Downloading))
        );
        assert_eq!(outcome(None, "2.0.0"), DeviceOutcome::Pending(None));
    }
}
