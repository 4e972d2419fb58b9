//! What a device that joins the fleet later should run. A completed rollout, or a deployment to
//! a selector, leaves a cohort default behind: (selector, version), newest wins. A device that
//! matches one and has never been told to run a version of the model (newly enrolled) gets it;
//! devices already told something keep it until a rollout or deployment changes it. Pure.

use std::collections::BTreeMap;

use proto::cohort::matches;
use serde::{Deserialize, Serialize};

use super::state::DeviceInfo;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CohortDefault {
    /// What set it: a rollout id, or `deploy-…` for a deployment to a selector.
    pub source: String,
    pub model: String,
    /// Empty selects every device.
    pub selector: BTreeMap<String, String>,
    pub version: String,
    pub at_ms: u64,
}

/// For each device with no desired version of `model`, the newest default of the model whose
/// selector matches it: (device, version, source).
pub fn newcomer_versions(
    model: &str,
    devices: &[DeviceInfo],
    defaults: &[CohortDefault],
) -> Vec<(String, String, String)> {
    let mut newest_first: Vec<&CohortDefault> = defaults.iter().filter(|d| d.model == model).collect();
    newest_first.sort_by(|a, b| b.at_ms.cmp(&a.at_ms).then_with(|| b.source.cmp(&a.source)));
    devices
        .iter()
        .filter(|device| device.desired_version.is_none() && !device.revoked)
        .filter_map(|device| {
            let default = newest_first.iter().find(|d| matches(&d.selector, &device.labels))?;
            Some((device.id.clone(), default.version.clone(), default.source.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, site: &str, desired: Option<&str>) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            labels: [("site".to_string(), site.to_string())].into(),
            desired_version: desired.map(Into::into),
            ..Default::default()
        }
    }

    fn default(source: &str, site: Option<&str>, version: &str, at_ms: u64) -> CohortDefault {
        CohortDefault {
            source: source.into(),
            model: "tabular".into(),
            selector: site.map(|s| [("site".to_string(), s.to_string())].into()).unwrap_or_default(),
            version: version.into(),
            at_ms,
        }
    }

    #[test]
    fn a_newcomer_gets_the_newest_default_that_matches_it_and_others_keep_what_they_were_told() {
        let defaults = [
            default("deploy-1", None, "1.0.0", 10),
            default("ro-a", Some("a"), "2.0.0", 20),
            default("ro-old", Some("b"), "0.9.0", 5),
        ];
        let devices = [
            device("new-a", "a", None),
            device("new-b", "b", None),
            device("new-c", "c", None),
            device("told-a", "a", Some("1.0.0")),
        ];
        assert_eq!(
            newcomer_versions("tabular", &devices, &defaults),
            vec![
                ("new-a".to_string(), "2.0.0".to_string(), "ro-a".to_string()),
                ("new-b".to_string(), "1.0.0".to_string(), "deploy-1".to_string()),
                ("new-c".to_string(), "1.0.0".to_string(), "deploy-1".to_string()),
            ]
        );
    }

    #[test]
    fn defaults_of_another_model_or_no_match_leave_a_newcomer_alone() {
        let mut other = default("deploy-1", None, "1.0.0", 10);
        other.model = "detector".into();
        let defaults = [other, default("ro-a", Some("a"), "2.0.0", 20)];
        assert!(newcomer_versions("tabular", &[device("new-b", "b", None)], &defaults).is_empty());
    }
}
