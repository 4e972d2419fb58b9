//! The update decisions, as pure functions over plain data: which desired models need an install,
//! and what to do on start with an update that was in flight when the agent stopped.

use std::collections::BTreeMap;

use proto::wire::{DesiredModel, UpdateStep};

use crate::state::UpdateRecord;

/// Desired models that need an install: not active at the desired version, and not already
/// failed at that exact version and attempt (the server raises `attempt` to ask for a retry).
pub fn plan<'a>(
    desired: &'a [DesiredModel],
    active: &BTreeMap<String, String>,
    records: &[UpdateRecord],
) -> Vec<&'a DesiredModel> {
    desired
        .iter()
        .filter(|d| active.get(&d.name) != Some(&d.version))
        .filter(|d| {
            !records.iter().any(|r| {
                r.model == d.name && r.version == d.version && r.step == UpdateStep::Failed && r.attempt >= d.attempt
            })
        })
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was in flight.
    Nothing,
    /// The switch happened before the stop: record the version as active.
    CommitActive,
    /// The update stopped before the switch: the old version still serves; drop partial staging
    /// and let the next check-in start the install again (the download resumes). `failed` says
    /// whether the stop counts against the version: a stop while its model was loading or
    /// self-testing may be the model's doing (a crash), a stop while downloading is not.
    Restart { failed: bool },
    /// The agent stopped during this version's self-test or activation as many times as allowed:
    /// the version is taken to crash the agent and is reported `failed`.
    GiveUp,
}

/// `current` is the version the `current` link points to on disk; `restarts_allowed` bounds the
/// stops during one version's self-test.
pub fn recover(record: &UpdateRecord, current: Option<&str>, restarts_allowed: u32) -> Recovery {
    match record.step {
        // A staged version was verified and waits for its window; the old version serves.
        UpdateStep::Active | UpdateStep::Failed | UpdateStep::RolledBack | UpdateStep::Staged => Recovery::Nothing,
        UpdateStep::Activating if current == Some(record.version.as_str()) => Recovery::CommitActive,
        UpdateStep::SelfTest | UpdateStep::Activating if record.failures + 1 >= restarts_allowed => Recovery::GiveUp,
        UpdateStep::SelfTest | UpdateStep::Activating => Recovery::Restart { failed: true },
        UpdateStep::Downloading | UpdateStep::Verifying => Recovery::Restart { failed: false },
    }
}

/// Progress that keeps a failed download attempt from counting against the version.
pub const PROGRESS_BYTES: u64 = 16 * 1024;

/// What a failed download leads to: another try after a pause, or `failed` once `attempts` tries
/// of this version failed.
#[derive(Debug, PartialEq, Eq)]
pub enum AfterDownloadError {
    RetryLater { failures: u32 },
    GiveUp { failures: u32 },
}

/// An attempt that moved the partial download forward by at least [`PROGRESS_BYTES`] or an
/// eighth of the bundle, whichever is less, is not counted: a link that drops often but moves
/// data finishes by resuming, while the number of such attempts stays bounded by the bundle's size.
///
/// A server that said it is busy (503, 429) is not counted either: a fleet under a rollout's
/// burst sheds requests on purpose, and a device must not give up a good version for it.
pub fn after_download_error(
    failures_before: u32,
    attempts: u32,
    progressed_bytes: u64,
    bundle_size: u64,
    server_busy: bool,
) -> AfterDownloadError {
    if server_busy || progressed_bytes >= PROGRESS_BYTES.min(bundle_size / 8).max(1) {
        return AfterDownloadError::RetryLater { failures: failures_before };
    }
    let failures = failures_before + 1;
    if failures >= attempts {
        AfterDownloadError::GiveUp { failures }
    } else {
        AfterDownloadError::RetryLater { failures }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(name: &str, version: &str) -> DesiredModel {
        DesiredModel {
            name: name.into(),
            version: version.into(),
            bundle_path: String::new(),
            bundle_sha256: String::new(),
            bundle_size: 0,
            attempt: 0,
            shadow: None,
            activation_window: None,
        }
    }

    fn record(step: UpdateStep, version: &str) -> UpdateRecord {
        UpdateRecord {
            model: "m".into(),
            version: version.into(),
            step,
            detail: String::new(),
            attempt: 0,
            failures: 0,
        }
    }

    #[test]
    fn a_model_already_active_at_the_desired_version_needs_nothing() {
        let active = [("m".to_string(), "1.0.0".to_string())].into();
        assert!(plan(&[desired("m", "1.0.0")], &active, &[]).is_empty());
    }

    #[test]
    fn a_new_version_or_a_new_model_needs_an_install() {
        let active = [("m".to_string(), "1.0.0".to_string())].into();
        let wanted = [desired("m", "1.1.0"), desired("other", "0.1.0")];
        assert_eq!(plan(&wanted, &active, &[]).len(), 2);
    }

    #[test]
    fn a_version_that_failed_is_not_retried_in_a_loop_but_a_newer_one_is() {
        let failed = [record(UpdateStep::Failed, "1.1.0")];
        assert!(plan(&[desired("m", "1.1.0")], &BTreeMap::new(), &failed).is_empty());
        assert_eq!(plan(&[desired("m", "1.2.0")], &BTreeMap::new(), &failed).len(), 1);
    }

    #[test]
    fn a_raised_attempt_retries_a_version_that_failed() {
        let failed = [record(UpdateStep::Failed, "1.1.0")];
        let mut retry = desired("m", "1.1.0");
        retry.attempt = 1;
        assert_eq!(plan(&[retry], &BTreeMap::new(), &failed).len(), 1);
    }

    #[test]
    fn an_interrupted_step_before_the_switch_restarts_and_only_a_stop_in_self_test_counts_against_the_version() {
        for step in [UpdateStep::Downloading, UpdateStep::Verifying] {
            assert_eq!(recover(&record(step, "2.0.0"), Some("1.0.0"), 3), Recovery::Restart { failed: false });
        }
        for step in [UpdateStep::SelfTest, UpdateStep::Activating] {
            assert_eq!(recover(&record(step, "2.0.0"), Some("1.0.0"), 3), Recovery::Restart { failed: true });
        }
    }

    #[test]
    fn a_version_that_keeps_stopping_the_agent_in_self_test_is_given_up_after_the_allowed_restarts() {
        let mut crashing = record(UpdateStep::SelfTest, "2.0.0");
        crashing.failures = 1;
        assert_eq!(recover(&crashing, Some("1.0.0"), 3), Recovery::Restart { failed: true });
        crashing.failures = 2;
        assert_eq!(recover(&crashing, Some("1.0.0"), 3), Recovery::GiveUp);
        // Downloads are not the model's fault, however often they were interrupted.
        let downloading = UpdateRecord { step: UpdateStep::Downloading, ..crashing };
        assert_eq!(recover(&downloading, Some("1.0.0"), 3), Recovery::Restart { failed: false });
    }

    #[test]
    fn download_errors_retry_until_the_attempts_are_used_up() {
        assert_eq!(after_download_error(0, 3, 0, 1 << 20, false), AfterDownloadError::RetryLater { failures: 1 });
        assert_eq!(after_download_error(1, 3, 10, 1 << 20, false), AfterDownloadError::RetryLater { failures: 2 });
        assert_eq!(after_download_error(2, 3, 0, 1 << 20, false), AfterDownloadError::GiveUp { failures: 3 });
        assert_eq!(after_download_error(0, 1, 0, 1 << 20, false), AfterDownloadError::GiveUp { failures: 1 });
    }

    #[test]
    fn a_busy_server_does_not_use_up_the_attempts() {
        assert_eq!(after_download_error(2, 3, 0, 1 << 20, true), AfterDownloadError::RetryLater { failures: 2 });
        assert_eq!(after_download_error(0, 1, 0, 1 << 20, true), AfterDownloadError::RetryLater { failures: 0 });
    }

    #[test]
    fn an_attempt_that_moved_the_download_forward_does_not_count() {
        assert_eq!(
            after_download_error(2, 3, PROGRESS_BYTES, 1 << 20, false),
            AfterDownloadError::RetryLater { failures: 2 }
        );
        assert_eq!(
            after_download_error(2, 3, 1000, 8000, false),
            AfterDownloadError::RetryLater { failures: 2 },
            "an eighth"
        );
        assert_eq!(after_download_error(2, 3, 999, 8000, false), AfterDownloadError::GiveUp { failures: 3 });
    }

    #[test]
    fn an_interrupted_activation_whose_switch_landed_is_committed() {
        assert_eq!(recover(&record(UpdateStep::Activating, "2.0.0"), Some("2.0.0"), 3), Recovery::CommitActive);
    }

    #[test]
    fn settled_records_need_no_recovery() {
        for step in [UpdateStep::Active, UpdateStep::Failed, UpdateStep::RolledBack] {
            assert_eq!(recover(&record(step, "1.0.0"), None, 3), Recovery::Nothing);
        }
    }
}
