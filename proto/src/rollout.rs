//! Rollout plans as operators write them (TOML or JSON) and the wave math both sides share.
//! Validation names the field to fix.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names;

#[derive(Debug, Error, PartialEq)]
#[error("rollout plan field `{field}`: {problem}")]
pub struct PlanError {
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> PlanError {
    PlanError { field: field.into(), problem: problem.into() }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnBreach {
    /// Stop assigning devices; devices keep what they run.
    Halt,
    /// Stop, and put every device this rollout touched back on its previous version.
    #[default]
    Rollback,
}

/// One wave: a cumulative share of the eligible (non-holdout) devices, by percent or count.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WaveSpec {
    #[serde(default)]
    pub percent: Option<f64>,
    #[serde(default)]
    pub count: Option<usize>,
    /// Run the candidate in shadow on this wave's devices first; activate it there only once
    /// its outputs agree with the active version's (`gates.min_shadow_agreement`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// Thresholds on how the candidate model behaves, compared with the control group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct HealthGates {
    /// Samples needed on both candidate and control before model gates are judged.
    pub min_samples: u64,
    /// Largest accepted increase of the inference error rate over control (absolute).
    pub max_error_rate_increase: f64,
    /// Largest accepted candidate/control ratio of latency p95.
    pub max_latency_p95_ratio: f64,
    /// A candidate p95 at or below this many microseconds passes the latency gate whatever its
    /// ratio: at tens of microseconds, scheduling noise on a shared core moves a p95 several
    /// times over (one log bucket is a 4x step at ~50 µs), and no user notices.
    pub latency_p95_floor_us: f64,
    /// Smallest accepted candidate/control ratio of mean top-class probability.
    pub min_confidence_ratio: f64,
    /// Largest accepted PSI between candidate and control predicted-class distributions.
    pub max_prediction_psi: f64,
    /// Largest accepted increase of input drift (PSI vs reference) over control.
    pub max_input_drift_increase: f64,
    /// Largest accepted increase over control of the share of input features that drift from
    /// the reference by the test chosen for each (KS or Wasserstein, chi² or Jensen-Shannon, by
    /// sample size and type, as `fleetctl drift show` reports them; ADR 0011). 0.5 is Evidently's
    /// dataset-drift share.
    pub max_drift_share_increase: f64,
    /// Smallest accepted share of shadowed requests where the candidate picks the active
    /// version's top output (shadow waves).
    pub min_shadow_agreement: f64,
    /// Shadowed requests needed across a shadow wave before its agreement is judged.
    pub min_shadow_samples: u64,
}

impl Default for HealthGates {
    fn default() -> Self {
        HealthGates {
            min_samples: 200,
            max_error_rate_increase: 0.02,
            max_latency_p95_ratio: 3.0,
            latency_p95_floor_us: 1000.0,
            min_confidence_ratio: 0.8,
            max_prediction_psi: 0.25,
            max_input_drift_increase: 0.25,
            max_drift_share_increase: 0.5,
            min_shadow_agreement: 0.8,
            min_shadow_samples: 200,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RolloutPlan {
    pub model: String,
    pub version: String,
    /// Label selector for the cohort; empty selects every device.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Share of the cohort kept on the current version as a live control group.
    #[serde(default = "defaults::holdout")]
    pub holdout: f64,
    pub waves: Vec<WaveSpec>,
    #[serde(default = "defaults::soak_secs")]
    pub soak_secs: f64,
    /// Devices that must have finished (active, failed or timed out), counted across every wave
    /// so far, before the install failure rate can stop the rollout.
    #[serde(default = "defaults::min_executed")]
    pub min_executed: usize,
    /// Share of a wave's devices that must end active for the wave to pass.
    #[serde(default = "defaults::success_threshold")]
    pub success_threshold: f64,
    /// Share of failed devices among those executed above which the rollout breaches.
    #[serde(default = "defaults::failure_threshold")]
    pub failure_threshold: f64,
    /// Disruption budget: devices installing at once.
    #[serde(default = "defaults::max_concurrent")]
    pub max_concurrent: usize,
    #[serde(default = "defaults::device_timeout_secs")]
    pub device_timeout_secs: f64,
    #[serde(default)]
    pub on_breach: OnBreach,
    #[serde(default)]
    pub gates: HealthGates,
    /// Share of live requests a shadow wave's devices copy to the candidate.
    #[serde(default = "defaults::shadow_sample_rate")]
    pub shadow_sample_rate: f64,
    /// A second disruption budget per value of a label: devices that share one site's uplink
    /// download a few at a time (`{ label = "site", count = 2 }`). Devices without the label
    /// are bound by `max_concurrent` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_per: Option<GroupBudget>,
    /// Devices download and verify the candidate at once but activate it only inside this daily
    /// window of their local time (`{ start = "02:00", end = "04:00" }`); waiting there, they
    /// are `staged`, neither failed nor timed out (ADR 0012).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_window: Option<crate::window::ActivationWindow>,
}

/// At most `count` devices with the same value of `label` install at once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GroupBudget {
    pub label: String,
    pub count: usize,
}

mod defaults {
    pub fn holdout() -> f64 {
        0.1
    }
    pub fn soak_secs() -> f64 {
        300.0
    }
    pub fn min_executed() -> usize {
        1
    }
    pub fn success_threshold() -> f64 {
        0.9
    }
    pub fn failure_threshold() -> f64 {
        0.1
    }
    pub fn max_concurrent() -> usize {
        50
    }
    pub fn device_timeout_secs() -> f64 {
        900.0
    }
    pub fn shadow_sample_rate() -> f64 {
        0.1
    }
}

fn fraction(field: &str, value: f64, max: f64) -> Result<(), PlanError> {
    if value.is_finite() && (0.0..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} must be between 0 and {max}")))
    }
}

impl RolloutPlan {
    pub fn validate(&self) -> Result<(), PlanError> {
        names::validate("model name", &self.model).map_err(|e| invalid("model", e.to_string()))?;
        semver::Version::parse(&self.version)
            .map_err(|_| invalid("version", format!("{:?} is not a semantic version", self.version)))?;
        fraction("holdout", self.holdout, 0.9)?;
        fraction("success_threshold", self.success_threshold, 1.0)?;
        fraction("failure_threshold", self.failure_threshold, 1.0)?;
        if self.waves.is_empty() {
            return Err(invalid("waves", "at least one wave is needed, e.g. [{percent = 10.0}, {percent = 100.0}]"));
        }
        let mut last_percent = 0.0;
        let mut last_count = 0;
        for (i, wave) in self.waves.iter().enumerate() {
            let field = format!("waves[{i}]");
            match (wave.percent, wave.count) {
                (Some(p), None) => {
                    if !(p > 0.0 && p <= 100.0) || p < last_percent {
                        return Err(invalid(
                            field,
                            format!("percent {p} must be in (0, 100] and not below the previous wave's"),
                        ));
                    }
                    last_percent = p;
                }
                (None, Some(c)) => {
                    if c == 0 || c < last_count {
                        return Err(invalid(
                            field,
                            format!("count {c} must be at least 1 and not below the previous wave's"),
                        ));
                    }
                    last_count = c;
                }
                _ => return Err(invalid(field, "give exactly one of `percent` or `count`")),
            }
        }
        if !(self.shadow_sample_rate > 0.0 && self.shadow_sample_rate <= 1.0) {
            return Err(invalid("shadow_sample_rate", "must be in (0, 1]"));
        }
        fraction("gates.min_shadow_agreement", self.gates.min_shadow_agreement, 1.0)?;
        if !(self.soak_secs.is_finite() && self.soak_secs >= 0.0) {
            return Err(invalid("soak_secs", "must be zero or more seconds"));
        }
        if !(self.device_timeout_secs.is_finite() && self.device_timeout_secs > 0.0) {
            return Err(invalid("device_timeout_secs", "must be more than zero seconds"));
        }
        if self.max_concurrent == 0 {
            return Err(invalid("max_concurrent", "must be at least 1"));
        }
        if self.min_executed == 0 {
            return Err(invalid("min_executed", "must be at least 1"));
        }
        if let Some(window) = &self.activation_window {
            window.validate().map_err(|e| invalid("activation_window", e.to_string()))?;
        }
        if let Some(budget) = &self.max_concurrent_per {
            if budget.label.is_empty() || budget.label.len() > 64 {
                return Err(invalid("max_concurrent_per.label", "must be a label key of 1-64 characters"));
            }
            if budget.count == 0 {
                return Err(invalid("max_concurrent_per.count", "must be at least 1"));
            }
        }
        let g = &self.gates;
        for (field, value) in [
            ("gates.max_error_rate_increase", g.max_error_rate_increase),
            ("gates.max_latency_p95_ratio", g.max_latency_p95_ratio),
            ("gates.latency_p95_floor_us", g.latency_p95_floor_us),
            ("gates.min_confidence_ratio", g.min_confidence_ratio),
            ("gates.max_prediction_psi", g.max_prediction_psi),
            ("gates.max_input_drift_increase", g.max_input_drift_increase),
            ("gates.max_drift_share_increase", g.max_drift_share_increase),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(invalid(field, format!("{value} must be a number of zero or more")));
            }
        }
        Ok(())
    }

    /// Eligible devices targeted once wave `index` is reached (cumulative, at least 1 when any).
    pub fn wave_target(&self, index: usize, eligible: usize) -> usize {
        let Some(wave) = self.waves.get(index.min(self.waves.len().saturating_sub(1))) else { return 0 };
        let target = match (wave.percent, wave.count) {
            (Some(p), _) => (p / 100.0 * eligible as f64).ceil() as usize,
            (_, Some(c)) => c,
            _ => 0,
        };
        target.clamp(eligible.min(1), eligible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RolloutPlan {
        toml::from_str(
            r#"
model = "tabular"
version = "2.0.0"
selector = { region = "eu" }
waves = [{ percent = 1.0 }, { percent = 10.0 }, { percent = 50.0 }, { percent = 100.0 }]
"#,
        )
        .unwrap()
    }

    #[test]
    fn a_minimal_plan_gets_defaults_and_validates() {
        let p = plan();
        p.validate().unwrap();
        assert_eq!((p.holdout, p.on_breach, p.gates.min_confidence_ratio), (0.1, OnBreach::Rollback, 0.8));
    }

    #[test]
    fn a_per_site_download_budget_reads_from_toml() {
        let p: RolloutPlan = toml::from_str(
            "model = \"m\"\nversion = \"1.0.0\"\nwaves = [{percent = 100.0}]\nmax_concurrent_per = { label = \"site\", count = 2 }",
        )
        .unwrap();
        p.validate().unwrap();
        assert_eq!(p.max_concurrent_per, Some(GroupBudget { label: "site".into(), count: 2 }));
    }

    #[test]
    fn the_example_plan_the_readme_shows_validates() {
        let p: RolloutPlan = toml::from_str(include_str!("../../tests/fixtures/rollouts/tabular-2.0.0.toml")).unwrap();
        p.validate().unwrap();
        assert_eq!(p.max_concurrent_per.map(|b| (b.label, b.count)), Some(("site".to_string(), 2)));
    }

    #[test]
    fn wave_targets_round_up_and_never_exceed_the_cohort() {
        let p = plan();
        assert_eq!((0..4).map(|w| p.wave_target(w, 250)).collect::<Vec<_>>(), vec![3, 25, 125, 250]);
        assert_eq!(p.wave_target(0, 10), 1, "1% of 10 devices is still one device");
        assert_eq!(p.wave_target(0, 0), 0);
        assert_eq!(p.wave_target(9, 40), 40, "past the last wave stays at the last");
    }

    #[test]
    fn invalid_plans_are_refused_with_the_field_named() {
        let mut p = plan();
        p.waves[1].count = Some(5);
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "rollout plan field `waves[1]`: give exactly one of `percent` or `count`"
        );
        let mut p = plan();
        p.waves[2].percent = Some(5.0);
        assert!(p.validate().unwrap_err().to_string().starts_with("rollout plan field `waves[2]`"));
        let mut p = plan();
        p.holdout = 1.5;
        assert_eq!(p.validate().unwrap_err().field, "holdout");
        let mut p = plan();
        p.version = "two".into();
        assert_eq!(p.validate().unwrap_err().field, "version");
        let mut p = plan();
        p.max_concurrent_per = Some(GroupBudget { label: "site".into(), count: 0 });
        assert_eq!(p.validate().unwrap_err().field, "max_concurrent_per.count");
        let err = toml::from_str::<RolloutPlan>("model = \"m\"\nversion = \"1.0.0\"\nwaves = []\nholdouts = 0.1")
            .unwrap_err();
        assert!(err.message().contains("holdouts"), "{}", err.message());
    }
}
