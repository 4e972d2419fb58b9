//! Health gates on the model: the candidate group against the control group, and the breaches
//! they report as data ([`GateBreach`]) whose `Display` is the sentence operators read.

use proto::drift::WindowSketch;
use proto::rollout::HealthGates;
use serde::{Deserialize, Serialize};

use super::state::{DeviceObservation, GroupMetrics, VersionMetrics};
use crate::drift::stattest::psi;

/// Adds up one group's metrics; devices without metrics for the version count as present. The
/// group's latency is the median of its devices' p95s: a slower model raises every device's p95,
/// while one device stalled by something else (its CPU busy installing, say) must not decide.
pub fn group<'a>(members: impl Iterator<Item = (&'a DeviceObservation, &'a str)>) -> GroupMetrics {
    let mut total = GroupMetrics::default();
    let mut merged = WindowSketch::default();
    let (mut drift_sum, mut drift_n) = (0.0, 0);
    let (mut share_sum, mut share_n) = (0.0, 0);
    let mut p95s = Vec::new();
    for (observation, version) in members {
        total.devices += 1;
        let Some(m): Option<&VersionMetrics> = observation.metrics.get(version) else { continue };
        total.inferences += m.inferences;
        total.errors += m.errors;
        if let Some(d) = m.input_drift {
            drift_sum += d;
            drift_n += 1;
        }
        if let Some(s) = m.drift_share {
            share_sum += s;
            share_n += 1;
        }
        if let Some(p) = m.latency_p95_us {
            p95s.push(p);
        }
        // A device with a status but no window yet has an unset sketch, which adds nothing
        // (were it taken as the group's layout, every other window would be a "mismatch"). A
        // layout mismatch means different contracts: such a device is not comparable.
        let _ = merged.merge(&m.sketch);
    }
    total.samples = merged.rows;
    total.mean_confidence = merged.mean_confidence();
    total.classes = merged.outputs.classes;
    total.input_drift = (drift_n > 0).then(|| drift_sum / drift_n as f64);
    total.drift_share = (share_n > 0).then(|| share_sum / share_n as f64);
    total.latency_p95_us = median(&mut p95s);
    total
}

fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn rate(errors: u64, inferences: u64) -> Option<f64> {
    (inferences > 0).then(|| errors as f64 / inferences as f64)
}

/// Why a wave failed a gate, with the numbers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GateBreach {
    /// Mean top-class confidence of the candidate over the control's, below the gate's ratio.
    Confidence {
        candidate: f64,
        control: f64,
        min_ratio: f64,
    },
    /// PSI of the candidate's predicted classes against the control's, above the gate.
    PredictionPsi {
        psi: f64,
        max: f64,
    },
    ErrorRate {
        candidate: f64,
        control: f64,
        max_increase: f64,
    },
    LatencyP95 {
        candidate_us: f64,
        control_us: f64,
        max_ratio: f64,
    },
    InputDrift {
        candidate: f64,
        control: f64,
        max_increase: f64,
    },
    /// The share of input features drifted by their chosen tests rose over control.
    DriftShare {
        candidate: f64,
        control: f64,
        max_increase: f64,
    },
    /// Install failures among the devices that executed, across every wave so far.
    InstallFailures {
        failed: usize,
        executed: usize,
        threshold: f64,
    },
    /// A finished wave with too few devices active.
    WaveSuccess {
        wave: usize,
        active: usize,
        target: usize,
        threshold: f64,
    },
    /// A model gate breached against the candidate devices' own previous version (same devices,
    /// earlier) rather than against the holdout.
    #[schema(no_recursion)]
    AgainstPreviousVersion(Box<GateBreach>),
    /// In a shadow wave, the candidate chose the active version's top output too rarely.
    ShadowAgreement {
        agreement: f64,
        min: f64,
        rows: u64,
    },
}

impl std::fmt::Display for GateBreach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GateBreach::Confidence { candidate: c, control: k, min_ratio } => write!(
                f,
                "mean confidence {c:.3} is {:.2}x the control's {k:.3}, below the {min_ratio:.2}x gate",
                c / k
            ),
            GateBreach::PredictionPsi { psi, max } => {
                write!(f, "prediction distribution PSI {psi:.3} against the control exceeds {max:.3}")
            }
            GateBreach::ErrorRate { candidate, control, max_increase } => write!(
                f,
                "error rate {:.2}% vs control {:.2}% exceeds the +{:.2}% gate",
                candidate * 100.0,
                control * 100.0,
                max_increase * 100.0
            ),
            GateBreach::LatencyP95 { candidate_us: c, control_us: k, max_ratio } => {
                write!(f, "latency p95 {c:.0} µs is {:.2}x the control's {k:.0} µs, above {max_ratio:.2}x", c / k)
            }
            GateBreach::InputDrift { candidate, control, max_increase } => {
                write!(f, "input drift {candidate:.3} vs control {control:.3} exceeds the +{max_increase:.3} gate")
            }
            GateBreach::DriftShare { candidate, control, max_increase } => write!(
                f,
                "{:.0}% of input features drifted vs {:.0}% on control exceeds the +{:.0}-point gate",
                candidate * 100.0,
                control * 100.0,
                max_increase * 100.0
            ),
            GateBreach::InstallFailures { failed, executed, threshold } => write!(
                f,
                "install failure rate {:.0}% ({failed} of {executed} executed) exceeds {:.0}%",
                *failed as f64 * 100.0 / *executed as f64,
                threshold * 100.0
            ),
            GateBreach::WaveSuccess { wave, active, target, threshold } => write!(
                f,
                "wave {} ended with {active} of {target} devices active ({:.0}%), below the {:.0}% success threshold",
                wave + 1,
                if *target == 0 { 0.0 } else { *active as f64 * 100.0 / *target as f64 },
                threshold * 100.0
            ),
            GateBreach::ShadowAgreement { agreement, min, rows } => write!(
                f,
                "in shadow the candidate agreed with the active version on {:.1}% of {rows} requests, below the {:.1}% gate",
                agreement * 100.0,
                min * 100.0
            ),
            GateBreach::AgainstPreviousVersion(breach) => {
                write!(f, "{breach} (against the previous version on the same devices)")
            }
        }
    }
}

/// One model gate's reading: both groups' values, what is compared with the limit (a ratio, a
/// difference or a PSI) and the breach it makes, if any. What the dashboard and `rollout status`
/// show, and what [`judge`] decides on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct GateReading {
    /// confidence, prediction_psi, error_rate, latency_p95, input_drift or drift_share.
    pub gate: String,
    pub candidate: Option<f64>,
    pub control: Option<f64>,
    /// None until both groups have a value.
    pub value: Option<f64>,
    pub limit: f64,
    /// True when `value` must stay at or above `limit` (a minimum), false for a maximum.
    pub at_least: bool,
    pub breach: Option<GateBreach>,
}

fn reading(gate: &str, candidate: Option<f64>, control: Option<f64>, value: Option<f64>, limit: f64) -> GateReading {
    GateReading { gate: gate.into(), candidate, control, value, limit, at_least: false, breach: None }
}

/// Every model gate's reading, breached or not, whatever the sample counts.
pub fn readings(gates: &HealthGates, candidate: &GroupMetrics, control: &GroupMetrics) -> Vec<GateReading> {
    let (c, k) = (candidate.mean_confidence, control.mean_confidence);
    let ratio = c.zip(k).filter(|(_, k)| *k > 0.0).map(|(c, k)| c / k);
    let mut confidence = reading("confidence", c, k, ratio, gates.min_confidence_ratio);
    confidence.at_least = true;
    if let (Some(c), Some(k), Some(r)) = (c, k, ratio) {
        if r < gates.min_confidence_ratio {
            confidence.breach =
                Some(GateBreach::Confidence { candidate: c, control: k, min_ratio: gates.min_confidence_ratio });
        }
    }

    let comparable = candidate.classes.len() == control.classes.len() && !candidate.classes.is_empty();
    let shift = comparable.then(|| psi(&control.classes, &candidate.classes));
    let mut prediction = reading("prediction_psi", None, None, shift, gates.max_prediction_psi);
    if let Some(shift) = shift.filter(|s| *s > gates.max_prediction_psi) {
        prediction.breach = Some(GateBreach::PredictionPsi { psi: shift, max: gates.max_prediction_psi });
    }

    let (c, k) = (rate(candidate.errors, candidate.inferences), rate(control.errors, control.inferences));
    let mut errors = reading("error_rate", c, k, c.zip(k).map(|(c, k)| c - k), gates.max_error_rate_increase);
    if let (Some(c), Some(k)) = (c, k) {
        if c - k > gates.max_error_rate_increase {
            errors.breach =
                Some(GateBreach::ErrorRate { candidate: c, control: k, max_increase: gates.max_error_rate_increase });
        }
    }

    let (c, k) = (candidate.latency_p95_us, control.latency_p95_us);
    let ratio = c.zip(k).filter(|(_, k)| *k > 0.0).map(|(c, k)| c / k);
    let mut latency = reading("latency_p95", c, k, ratio, gates.max_latency_p95_ratio);
    if let (Some(c), Some(k), Some(r)) = (c, k, ratio) {
        if r > gates.max_latency_p95_ratio && c > gates.latency_p95_floor_us {
            latency.breach =
                Some(GateBreach::LatencyP95 { candidate_us: c, control_us: k, max_ratio: gates.max_latency_p95_ratio });
        }
    }

    let (c, k) = (candidate.input_drift, control.input_drift);
    let mut drift = reading("input_drift", c, k, c.zip(k).map(|(c, k)| c - k), gates.max_input_drift_increase);
    if let (Some(c), Some(k)) = (c, k) {
        if c - k > gates.max_input_drift_increase {
            drift.breach =
                Some(GateBreach::InputDrift { candidate: c, control: k, max_increase: gates.max_input_drift_increase });
        }
    }
    let (c, k) = (candidate.drift_share, control.drift_share);
    let mut share = reading("drift_share", c, k, c.zip(k).map(|(c, k)| c - k), gates.max_drift_share_increase);
    if let (Some(c), Some(k)) = (c, k) {
        if c - k > gates.max_drift_share_increase {
            share.breach =
                Some(GateBreach::DriftShare { candidate: c, control: k, max_increase: gates.max_drift_share_increase });
        }
    }
    vec![confidence, prediction, errors, latency, drift, share]
}

/// Both groups have `gates.min_samples`: their readings can stop the rollout.
pub fn enough_samples(gates: &HealthGates, candidate: &GroupMetrics, control: &GroupMetrics) -> bool {
    candidate.samples >= gates.min_samples && control.samples >= gates.min_samples
}

/// Breached model gates, with the numbers. Empty when fine or not enough data yet.
pub fn judge(gates: &HealthGates, candidate: &GroupMetrics, control: &GroupMetrics) -> Vec<GateBreach> {
    if !enough_samples(gates, candidate, control) {
        return Vec::new();
    }
    readings(gates, candidate, control).into_iter().filter_map(|r| r.breach).collect()
}

/// Control group: holdout devices on what they run; without holdout, the candidate devices'
/// previous version over the same period.
pub fn control_group(
    holdout: &[(&DeviceObservation, &str)],
    candidates_previous: &[(&DeviceObservation, &str)],
) -> GroupMetrics {
    if holdout.is_empty() {
        group(candidates_previous.iter().copied())
    } else {
        group(holdout.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(p95_us: f64) -> DeviceObservation {
        let metrics = VersionMetrics { latency_p95_us: Some(p95_us), ..Default::default() };
        DeviceObservation { metrics: [("2.0.0".to_string(), metrics)].into(), ..Default::default() }
    }

    fn latency(p95s: &[f64]) -> Option<f64> {
        let devices: Vec<DeviceObservation> = p95s.iter().map(|p| device(*p)).collect();
        group(devices.iter().map(|d| (d, "2.0.0"))).latency_p95_us
    }

    #[test]
    fn readings_show_every_gate_against_its_limit_and_judge_takes_their_breaches() {
        let gates = HealthGates::default();
        let control = GroupMetrics {
            samples: 500,
            inferences: 1000,
            errors: 5,
            mean_confidence: Some(0.8),
            latency_p95_us: Some(1_000.0),
            input_drift: Some(0.05),
            classes: vec![50, 50],
            ..Default::default()
        };
        let mut candidate = control.clone();
        candidate.latency_p95_us = Some(4_000.0);
        let r = readings(&gates, &candidate, &control);
        let names: Vec<&str> = r.iter().map(|g| g.gate.as_str()).collect();
        assert_eq!(names, ["confidence", "prediction_psi", "error_rate", "latency_p95", "input_drift", "drift_share"]);
        let latency = &r[3];
        assert_eq!(
            (latency.candidate, latency.control, latency.value, latency.limit),
            (Some(4_000.0), Some(1_000.0), Some(4.0), 3.0)
        );
        assert!(matches!(latency.breach, Some(GateBreach::LatencyP95 { .. })));
        assert!(r.iter().filter(|g| g.gate != "latency_p95").all(|g| g.breach.is_none()));
        assert_eq!((r[0].value, r[0].at_least), (Some(1.0), true));
        assert_eq!(judge(&gates, &candidate, &control).len(), 1);
        candidate.samples = 10;
        assert!(judge(&gates, &candidate, &control).is_empty(), "below min_samples nothing is judged");
        assert_eq!(readings(&gates, &candidate, &control)[3].value, Some(4.0), "but every gate is still read");
    }

    #[test]
    fn one_stalled_device_does_not_move_the_group_latency_but_a_slower_group_does() {
        assert_eq!(latency(&[60.0, 70.0, 30_000.0]), Some(70.0));
        assert_eq!(latency(&[600.0, 700.0, 800.0]), Some(700.0));
        assert_eq!(latency(&[60.0, 80.0]), Some(70.0));
        assert_eq!(latency(&[]), None);
    }

    #[test]
    fn a_device_without_a_window_yet_does_not_hide_the_samples_of_the_others() {
        let layout =
            proto::drift::SketchLayout::from_reference(&[proto::drift::FeatureDecl::numeric("x")], &[vec![0.5]], 1);
        let mut sketch = WindowSketch::empty(&layout);
        for _ in 0..300 {
            sketch.observe(&layout, &[0.5], &[1.0], 10);
        }
        let reported = DeviceObservation {
            metrics: [("1.0.0".to_string(), VersionMetrics { sketch, ..Default::default() })].into(),
            ..Default::default()
        };
        let status_only = DeviceObservation {
            metrics: [("1.0.0".to_string(), VersionMetrics::default())].into(),
            ..Default::default()
        };
        // The silent device first, as a device id sorting first would put it.
        let members = [(&status_only, "1.0.0"), (&reported, "1.0.0"), (&reported, "1.0.0")];
        let total = group(members.iter().copied());
        assert_eq!((total.devices, total.samples), (3, 600));
    }

    #[test]
    fn the_latency_gate_breaches_only_above_its_ratio() {
        let gates = HealthGates {
            min_samples: 0,
            max_latency_p95_ratio: 1.5,
            latency_p95_floor_us: 0.0,
            ..HealthGates::default()
        };
        let control = GroupMetrics { latency_p95_us: Some(100.0), ..Default::default() };
        let fine = GroupMetrics { latency_p95_us: Some(150.0), ..Default::default() };
        let slow = GroupMetrics { latency_p95_us: Some(151.0), ..Default::default() };
        assert!(judge(&gates, &fine, &control).is_empty());
        assert_eq!(
            judge(&gates, &slow, &control),
            vec![GateBreach::LatencyP95 { candidate_us: 151.0, control_us: 100.0, max_ratio: 1.5 }]
        );
    }

    #[test]
    fn a_candidate_p95_under_the_floor_passes_the_latency_gate_whatever_its_ratio() {
        let gates = HealthGates { min_samples: 0, max_latency_p95_ratio: 2.0, ..HealthGates::default() };
        assert_eq!(gates.latency_p95_floor_us, 1000.0);
        let control = GroupMetrics { latency_p95_us: Some(48.0), ..Default::default() };
        // The CI flake: a 4x step of one log bucket at ~50 µs.
        let noisy = GroupMetrics { latency_p95_us: Some(192.0), ..Default::default() };
        assert!(judge(&gates, &noisy, &control).is_empty());
        let at_floor = GroupMetrics { latency_p95_us: Some(1000.0), ..Default::default() };
        assert!(judge(&gates, &at_floor, &control).is_empty());
        let above = GroupMetrics { latency_p95_us: Some(1001.0), ..Default::default() };
        assert_eq!(
            judge(&gates, &above, &control),
            vec![GateBreach::LatencyP95 { candidate_us: 1001.0, control_us: 48.0, max_ratio: 2.0 }]
        );
    }

    #[test]
    fn the_error_rate_and_input_drift_gates_breach_on_an_increase_over_the_control() {
        let gates = HealthGates {
            min_samples: 0,
            max_error_rate_increase: 0.01,
            max_input_drift_increase: 0.1,
            ..HealthGates::default()
        };
        let control = GroupMetrics { inferences: 1000, errors: 5, input_drift: Some(0.05), ..Default::default() };
        let worse = GroupMetrics { inferences: 1000, errors: 30, input_drift: Some(0.3), ..Default::default() };
        let breaches = judge(&gates, &worse, &control);
        assert!(
            matches!(breaches[0], GateBreach::ErrorRate { candidate, control, .. } if candidate == 0.03 && control == 0.005)
        );
        assert!(
            matches!(breaches[1], GateBreach::InputDrift { candidate, control, .. } if candidate == 0.3 && control == 0.05)
        );
        assert_eq!(breaches.len(), 2);
        assert!(judge(&gates, &control, &control).is_empty());
    }
}
