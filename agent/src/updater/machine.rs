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
    /// and let the next check-in start the install again (the download resumes).
    Restart,
}

/// `current` is the version the `current` link points to on disk.
pub fn recover(record: &UpdateRecord, current: Option<&str>) -> Recovery {
    match record.step {
        UpdateStep::Active | UpdateStep::Failed | UpdateStep::RolledBack => Recovery::Nothing,
        UpdateStep::Activating if current == Some(record.version.as_str()) => Recovery::CommitActive,
        UpdateStep::Downloading | UpdateStep::Verifying | UpdateStep::SelfTest | UpdateStep::Activating => {
            Recovery::Restart
        }
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
        }
    }

    fn record(step: UpdateStep, version: &str) -> UpdateRecord {
        UpdateRecord { model: "m".into(), version: version.into(), step, detail: String::new(), attempt: 0 }
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
    fn an_interrupted_step_before_the_switch_restarts() {
        for step in [UpdateStep::Downloading, UpdateStep::Verifying, UpdateStep::SelfTest] {
            assert_eq!(recover(&record(step, "2.0.0"), Some("1.0.0")), Recovery::Restart);
        }
        assert_eq!(recover(&record(UpdateStep::Activating, "2.0.0"), Some("1.0.0")), Recovery::Restart);
    }

    #[test]
    fn an_interrupted_activation_whose_switch_landed_is_committed() {
        assert_eq!(recover(&record(UpdateStep::Activating, "2.0.0"), Some("2.0.0")), Recovery::CommitActive);
    }

    #[test]
    fn settled_records_need_no_recovery() {
        for step in [UpdateStep::Active, UpdateStep::Failed, UpdateStep::RolledBack] {
            assert_eq!(recover(&record(step, "1.0.0"), None), Recovery::Nothing);
        }
    }
}
