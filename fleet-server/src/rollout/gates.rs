//! Health gates on the model: the candidate group against the control group.

use proto::drift::{psi, SketchCounts};
use proto::rollout::HealthGates;

use super::state::{DeviceObservation, GroupMetrics, VersionMetrics};

/// Adds up one group's metrics; devices without metrics for the version count as present.
pub fn group<'a>(members: impl Iterator<Item = (&'a DeviceObservation, &'a str)>) -> GroupMetrics {
    let mut total = GroupMetrics::default();
    let mut counts: Option<SketchCounts> = None;
    let (mut drift_sum, mut drift_n, mut p95_sum, mut p95_n) = (0.0, 0, 0.0, 0);
    for (observation, version) in members {
        total.devices += 1;
        let Some(m): Option<&VersionMetrics> = observation.metrics.get(version) else { continue };
        total.inferences += m.inferences;
        total.errors += m.errors;
        if let Some(d) = m.input_drift {
            drift_sum += d;
            drift_n += 1;
        }
        if let Some(p) = m.latency_p95_us {
            p95_sum += p;
            p95_n += 1;
        }
        match counts.as_mut() {
            None => counts = Some(m.counts.clone()),
            Some(c) => {
                // A layout mismatch means different contracts: such a device is not comparable.
                let _ = c.merge(&m.counts);
            }
        }
    }
    if let Some(c) = counts {
        total.samples = c.samples;
        total.mean_confidence = c.mean_confidence();
        total.classes = c.classes;
    }
    total.input_drift = (drift_n > 0).then(|| drift_sum / drift_n as f64);
    total.latency_p95_us = (p95_n > 0).then(|| p95_sum / p95_n as f64);
    total
}

fn rate(errors: u64, inferences: u64) -> Option<f64> {
    (inferences > 0).then(|| errors as f64 / inferences as f64)
}

/// Breached gates, as sentences with the numbers. Empty when fine or not enough data yet.
pub fn judge(gates: &HealthGates, candidate: &GroupMetrics, control: &GroupMetrics) -> Vec<String> {
    let mut breaches = Vec::new();
    if candidate.samples < gates.min_samples || control.samples < gates.min_samples {
        return breaches;
    }
    if let (Some(c), Some(k)) = (candidate.mean_confidence, control.mean_confidence) {
        if k > 0.0 && c / k < gates.min_confidence_ratio {
            breaches.push(format!(
                "mean confidence {c:.3} is {:.2}x the control's {k:.3}, below the {:.2}x gate",
                c / k,
                gates.min_confidence_ratio
            ));
        }
    }
    if candidate.classes.len() == control.classes.len() && !candidate.classes.is_empty() {
        let shift = psi(&control.classes, &candidate.classes);
        if shift > gates.max_prediction_psi {
            breaches.push(format!(
                "prediction distribution PSI {shift:.3} against the control exceeds {:.3}",
                gates.max_prediction_psi
            ));
        }
    }
    if let (Some(c), Some(k)) = (rate(candidate.errors, candidate.inferences), rate(control.errors, control.inferences))
    {
        if c - k > gates.max_error_rate_increase {
            breaches.push(format!(
                "error rate {:.2}% vs control {:.2}% exceeds the +{:.2}% gate",
                c * 100.0,
                k * 100.0,
                gates.max_error_rate_increase * 100.0
            ));
        }
    }
    if let (Some(c), Some(k)) = (candidate.latency_p95_us, control.latency_p95_us) {
        if k > 0.0 && c / k > gates.max_latency_p95_ratio {
            breaches.push(format!(
                "latency p95 {c:.0} µs is {:.2}x the control's {k:.0} µs, above {:.2}x",
                c / k,
                gates.max_latency_p95_ratio
            ));
        }
    }
    if let (Some(c), Some(k)) = (candidate.input_drift, control.input_drift) {
        if c - k > gates.max_input_drift_increase {
            breaches.push(format!(
                "input drift {c:.3} vs control {k:.3} exceeds the +{:.3} gate",
                gates.max_input_drift_increase
            ));
        }
    }
    breaches
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
