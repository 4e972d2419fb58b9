//! One test per transition of the rollout state machine, on small fixture fleets.

use std::collections::BTreeMap;

use proto::drift::{OutputSketch, WindowSketch};
use proto::rollout::{OnBreach, RolloutPlan, WaveSpec};
use proto::wire::{AuditAction, UpdateStep};

use crate::rollout::gates::GateBreach;

use super::*;
use crate::rollout::create::{create, operate, OperatorAction, RolloutError};
use crate::rollout::state::{DeviceObservation, VersionMetrics};
use crate::rollout::DeviceInfo;

const T0: u64 = 1_000_000;

fn plan(waves: &[f64], holdout: f64) -> RolloutPlan {
    let mut plan = plan_judging(waves, holdout);
    plan.gates.min_samples = 0;
    plan
}

/// A plan whose model gates need 200 samples on each side before a wave can pass.
fn plan_judging(waves: &[f64], holdout: f64) -> RolloutPlan {
    RolloutPlan {
        model: "tabular".into(),
        version: "2.0.0".into(),
        selector: BTreeMap::new(),
        holdout,
        waves: waves.iter().map(|p| WaveSpec { percent: Some(*p), count: None, shadow: false }).collect(),
        soak_secs: 10.0,
        min_executed: 2,
        success_threshold: 0.9,
        failure_threshold: 0.25,
        max_concurrent: 100,
        device_timeout_secs: 60.0,
        on_breach: OnBreach::Rollback,
        gates: Default::default(),
        shadow_sample_rate: 0.1,
        max_concurrent_per: None,
        activation_window: None,
    }
}

fn devices(n: usize) -> Vec<DeviceInfo> {
    (0..n)
        .map(|i| DeviceInfo {
            id: format!("dev-{i:03}"),
            labels: [("site".to_string(), if i % 2 == 0 { "a" } else { "b" }.to_string())].into(),
            active_version: Some("1.0.0".into()),
            ..Default::default()
        })
        .collect()
}

fn rollout(plan: RolloutPlan, n: usize) -> Rollout {
    create("r1", plan, &devices(n), &Default::default(), T0).unwrap()
}

fn assigned(r: &Rollout) -> Vec<String> {
    r.members.iter().filter(|(_, m)| m.status == MemberStatus::Assigned).map(|(id, _)| id.clone()).collect()
}

fn active(version: &str) -> DeviceObservation {
    DeviceObservation {
        active_version: Some(version.into()),
        step: Some(UpdateStep::Active),
        step_version: Some(version.into()),
        ..Default::default()
    }
}

fn failed() -> DeviceObservation {
    DeviceObservation {
        active_version: Some("1.0.0".into()),
        step: Some(UpdateStep::Failed),
        step_version: Some("2.0.0".into()),
        detail: "self-test failed".into(),
        ..Default::default()
    }
}

/// Observations where `ids` report `observation` and everyone else runs 1.0.0.
fn observe(r: &Rollout, ids: &[String], observation: DeviceObservation) -> BTreeMap<String, DeviceObservation> {
    r.members
        .keys()
        .map(|id| (id.clone(), if ids.contains(id) { observation.clone() } else { active("1.0.0") }))
        .collect()
}

/// The breaches the decision stopped on.
fn breaches(d: &Decision) -> Vec<GateBreach> {
    d.rollout.evidence.as_ref().map(|e| e.breaches.clone()).unwrap_or_default()
}

fn desired(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::SetDesired { device, version, .. } => Some((device.clone(), version.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_first_tick_assigns_the_first_wave_in_bucket_order_and_never_a_holdout_device() {
    let r = rollout(plan(&[10.0, 100.0], 0.2), 50);
    let d = decide(&r, &observe(&r, &[], active("1.0.0")), T0);
    let eligible = r.order.len();
    let target = r.plan.wave_target(0, eligible);
    assert_eq!(desired(&d.effects).len(), target);
    assert_eq!(assigned(&d.rollout), {
        let mut first = r.order[..target].to_vec();
        first.sort();
        first
    });
    assert!(d.rollout.members.values().filter(|m| m.holdout).all(|m| m.status == MemberStatus::Waiting));
    assert!(r.members.values().filter(|m| m.holdout).count() > 0);
}

#[test]
fn the_same_fleet_and_rollout_id_always_pick_the_same_devices() {
    let a = rollout(plan(&[10.0], 0.2), 100);
    let b = rollout(plan(&[10.0], 0.2), 100);
    assert_eq!(a.order, b.order);
    let other = create("r2", plan(&[10.0], 0.2), &devices(100), &Default::default(), T0).unwrap();
    assert_ne!(a.order, other.order, "another rollout gets another salt");
}

#[test]
fn a_failure_is_not_judged_before_min_executed_devices_finished() {
    let r = rollout(plan(&[100.0], 0.0), 10);
    let r = decide(&r, &observe(&r, &[], active("1.0.0")), T0).rollout;
    let one = vec![r.order[0].clone()];
    let d = decide(&r, &observe(&r, &one, failed()), T0 + 1);
    assert_eq!(d.rollout.phase, Phase::Running, "1 failure of 1 executed, below min_executed = 2");
    assert!(matches!(d.rollout.members[&one[0]].status, MemberStatus::Failed(ref why) if why == "self-test failed"));
}

#[test]
fn a_failure_rate_exactly_at_the_threshold_passes_and_above_it_breaches() {
    let r = rollout(plan(&[100.0], 0.0), 8);
    let r = decide(&r, &observe(&r, &[], active("1.0.0")), T0).rollout;
    let (bad, good) = (r.order[..1].to_vec(), r.order[1..4].to_vec());
    let mut obs = observe(&r, &good, active("2.0.0"));
    obs.insert(bad[0].clone(), failed());
    let d = decide(&r, &obs, T0 + 1);
    assert_eq!(d.rollout.phase, Phase::Running, "1 of 4 = 25% is exactly the threshold");
    let mut obs = observe(&r, &good[..2], active("2.0.0"));
    obs.insert(bad[0].clone(), failed());
    let d = decide(&r, &obs, T0 + 1);
    assert_eq!(d.rollout.phase, Phase::RolledBack, "1 of 3 = 33% is above");
    assert_eq!(breaches(&d)[0], GateBreach::InstallFailures { failed: 1, executed: 3, threshold: 0.25 });
    assert!(d.rollout.reason.as_deref().unwrap().contains("install failure rate 33% (1 of 3 executed) exceeds 25%"));
}

#[test]
fn a_breach_with_rollback_reverts_every_touched_device_to_its_previous_version() {
    let r = rollout(plan(&[100.0], 0.0), 4);
    let r = decide(&r, &observe(&r, &[], active("1.0.0")), T0).rollout;
    let obs = observe(&r, &r.order[..3], failed());
    let d = decide(&r, &obs, T0 + 1);
    assert_eq!(d.rollout.phase, Phase::RolledBack);
    let reverted = desired(&d.effects);
    assert_eq!(reverted.len(), 4);
    assert!(reverted.iter().all(|(_, v)| v == "1.0.0"));
    assert!(d.rollout.members.values().all(|m| m.status == MemberStatus::Reverted));
    assert!(d.effects.iter().any(|e| matches!(e, Effect::Audit { action, .. } if *action == AuditAction::RolledBack)));
}

#[test]
fn a_breach_with_halt_stops_without_touching_devices() {
    let mut p = plan(&[100.0], 0.0);
    p.on_breach = OnBreach::Halt;
    let r = rollout(p, 4);
    let r = decide(&r, &observe(&r, &[], active("1.0.0")), T0).rollout;
    let d = decide(&r, &observe(&r, &r.order[..3], failed()), T0 + 1);
    assert_eq!(d.rollout.phase, Phase::Halted);
    assert!(desired(&d.effects).is_empty());
}

#[test]
fn a_device_silent_past_its_timeout_counts_as_failed() {
    let r = rollout(plan(&[100.0], 0.0), 3);
    let r = decide(&r, &observe(&r, &[], active("1.0.0")), T0).rollout;
    let d = decide(&r, &observe(&r, &[], active("1.0.0")), T0 + 60_000);
    assert_eq!(d.rollout.phase, Phase::Running, "exactly at the timeout is not past it");
    let d = decide(&r, &observe(&r, &[], active("1.0.0")), T0 + 60_001);
    let timed_out = d
        .effects
        .iter()
        .filter(|e| matches!(e, Effect::Audit { action, .. } if *action == AuditAction::DeviceTimedOut))
        .count();
    assert_eq!(timed_out, 3);
    assert_eq!(d.rollout.phase, Phase::RolledBack);
    assert_eq!(breaches(&d), vec![GateBreach::InstallFailures { failed: 3, executed: 3, threshold: 0.25 }]);
}

#[test]
fn when_every_device_is_offline_the_wave_times_out_and_breaches() {
    let r = rollout(plan(&[50.0, 100.0], 0.0), 6);
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    let d = decide(&r, &BTreeMap::new(), T0 + 61_000);
    assert_eq!(d.rollout.phase, Phase::RolledBack);
    assert!(
        matches!(breaches(&d)[..], [GateBreach::InstallFailures { failed: 3, executed: 3, .. }]),
        "{:?}",
        breaches(&d)
    );
}

#[test]
fn the_disruption_budget_limits_devices_installing_at_once() {
    let mut p = plan(&[100.0], 0.0);
    p.max_concurrent = 3;
    let r = rollout(p, 10);
    let d = decide(&r, &observe(&r, &[], active("1.0.0")), T0);
    assert_eq!(desired(&d.effects).len(), 3);
    let r = d.rollout;
    let first = assigned(&r);
    let d = decide(&r, &observe(&r, &first[..2], active("2.0.0")), T0 + 1);
    assert_eq!(desired(&d.effects).len(), 2, "two finished, so two more start");
}

#[test]
fn a_passed_wave_soaks_then_the_next_wave_starts_and_the_last_completes() {
    let r = rollout(plan(&[50.0, 100.0], 0.0), 4);
    let r = decide(&r, &observe(&r, &[], active("1.0.0")), T0).rollout;
    let wave1 = assigned(&r);
    assert_eq!(wave1.len(), 2);
    let obs = observe(&r, &wave1, active("2.0.0"));
    let r = decide(&r, &obs, T0 + 1).rollout;
    assert_eq!(r.soak_until_ms, Some(T0 + 1 + 10_000));
    let r = decide(&r, &obs, T0 + 5_000).rollout;
    assert_eq!(r.wave, 0, "still soaking");
    let r = decide(&r, &obs, T0 + 10_001).rollout;
    assert_eq!(r.wave, 1);
    let d = decide(&r, &obs, T0 + 10_002);
    assert_eq!(desired(&d.effects).len(), 2);
    let all: Vec<String> = r.order.clone();
    let obs = observe(&r, &all, active("2.0.0"));
    let r = decide(&d.rollout, &obs, T0 + 20_000).rollout;
    let r = decide(&r, &obs, T0 + 30_001).rollout;
    assert_eq!(r.phase, Phase::Completed);
}

#[test]
fn a_wave_that_ends_below_the_success_threshold_breaches() {
    let mut p = plan(&[100.0], 0.0);
    p.failure_threshold = 0.5;
    let r = rollout(p, 10);
    let r = decide(&r, &observe(&r, &[], active("1.0.0")), T0).rollout;
    let mut obs = observe(&r, &r.order[..8], active("2.0.0"));
    for id in &r.order[8..] {
        obs.insert(id.clone(), failed());
    }
    let d = decide(&r, &obs, T0 + 1);
    assert_eq!(d.rollout.phase, Phase::RolledBack);
    assert_eq!(breaches(&d), vec![GateBreach::WaveSuccess { wave: 0, active: 8, target: 10, threshold: 0.9 }]);
    assert!(d.rollout.reason.unwrap().contains("8 of 10 devices active (80%), below the 90% success threshold"));
}

fn metrics(samples: u64, classes: Vec<u64>, confidence: f64) -> VersionMetrics {
    VersionMetrics {
        sketch: WindowSketch {
            rows: samples,
            features: vec![],
            outputs: OutputSketch {
                classes,
                top_score: vec![0; 10],
                margin: vec![0; 10],
                top_score_micros: (confidence * 1e6) as u64 * samples,
            },
            latency: vec![0; proto::drift::LATENCY_BUCKETS],
        },
        input_drift: Some(0.02),
        drift_share: Some(0.0),
        inferences: samples,
        errors: 0,
        latency_p95_us: Some(50.0),
        shadow: None,
    }
}

/// Observations where the current wave's devices report `wave`, the holdout `holdout`, and every
/// other device runs 1.0.0 without metrics.
fn observe_groups(
    r: &Rollout,
    wave: DeviceObservation,
    holdout: DeviceObservation,
) -> BTreeMap<String, DeviceObservation> {
    let in_wave = assigned(r);
    r.members
        .iter()
        .map(|(id, m)| {
            let o = if in_wave.contains(id) {
                wave.clone()
            } else if m.holdout {
                holdout.clone()
            } else {
                active("1.0.0")
            };
            (id.clone(), o)
        })
        .collect()
}

fn with_metrics(version: &str, m: VersionMetrics) -> DeviceObservation {
    let mut o = active(version);
    o.metrics.insert(version.into(), m);
    o
}

#[test]
fn a_candidate_whose_confidence_collapses_against_the_holdout_is_rolled_back_with_evidence() {
    let r = rollout(plan(&[30.0, 100.0], 0.3), 40);
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    let wave = assigned(&r);
    let obs = observe_groups(
        &r,
        with_metrics("2.0.0", metrics(300, vec![100, 100, 100], 0.34)),
        with_metrics("1.0.0", metrics(300, vec![90, 120, 90], 0.75)),
    );
    let d = decide(&r, &obs, T0 + 1);
    assert_eq!(d.rollout.phase, Phase::RolledBack);
    let reason = d.rollout.reason.clone().unwrap();
    assert!(
        matches!(breaches(&d)[..], [GateBreach::Confidence { candidate, control, min_ratio }]
            if (candidate - 0.34).abs() < 1e-3 && (control - 0.75).abs() < 1e-3 && min_ratio == 0.8),
        "{reason}"
    );
    assert!(reason.contains("mean confidence 0.340 is 0.45x the control's 0.750, below the 0.80x gate"), "{reason}");
    let evidence = d.rollout.evidence.unwrap();
    assert_eq!((evidence.candidate.devices, evidence.candidate.samples), (wave.len(), 300 * wave.len() as u64));
    assert!(evidence.control.devices > 0);
    assert_eq!(desired(&d.effects).len(), wave.len(), "only the wave's devices are reverted");
}

#[test]
fn model_gates_wait_for_enough_samples() {
    let r = rollout(plan_judging(&[30.0, 100.0], 0.3), 40);
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    let obs = observe_groups(
        &r,
        with_metrics("2.0.0", metrics(1, vec![1, 0, 0], 0.34)),
        with_metrics("1.0.0", metrics(1, vec![0, 1, 0], 0.9)),
    );
    assert_eq!(decide(&r, &obs, T0 + 1).rollout.phase, Phase::Running);
}

#[test]
fn with_an_empty_holdout_the_candidate_is_judged_against_its_own_previous_version() {
    let r = rollout(plan(&[100.0], 0.0), 4);
    assert!(r.members.values().all(|m| !m.holdout));
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    let obs: BTreeMap<String, DeviceObservation> = r
        .members
        .keys()
        .map(|id| {
            let mut o = with_metrics("2.0.0", metrics(300, vec![100, 100, 100], 0.3));
            o.metrics.insert("1.0.0".into(), metrics(300, vec![100, 100, 100], 0.8));
            (id.clone(), o)
        })
        .collect();
    let d = decide(&r, &obs, T0 + 1);
    assert_eq!(d.rollout.phase, Phase::RolledBack);
    assert!(breaches(&d).iter().any(|b| matches!(b, GateBreach::Confidence { .. })), "{:?}", breaches(&d));
}

#[test]
fn a_paused_rollout_assigns_nothing_and_resumes_where_it_was() {
    let r = rollout(plan(&[100.0], 0.0), 5);
    let paused = operate(&r, OperatorAction::Pause, T0).unwrap().rollout;
    assert!(decide(&paused, &BTreeMap::new(), T0).effects.is_empty());
    let resumed = operate(&paused, OperatorAction::Resume, T0).unwrap().rollout;
    assert_eq!(desired(&decide(&resumed, &BTreeMap::new(), T0).effects).len(), 5);
    assert!(matches!(operate(&resumed, OperatorAction::Resume, T0), Err(RolloutError::WrongPhase { .. })));
}

#[test]
fn abort_reverts_every_touched_device_and_retry_gives_failed_devices_another_attempt() {
    let r = rollout(plan(&[100.0], 0.0), 4);
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    let aborted = operate(&r, OperatorAction::Abort, T0).unwrap();
    assert_eq!(aborted.rollout.phase, Phase::Aborted);
    assert_eq!(desired(&aborted.effects).len(), 4);

    let mut p = plan(&[100.0], 0.0);
    p.on_breach = OnBreach::Halt;
    let r = rollout(p, 4);
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    let halted = decide(&r, &observe(&r, &r.order.clone(), failed()), T0 + 1).rollout;
    assert_eq!(halted.phase, Phase::Halted);
    let retried = operate(&halted, OperatorAction::RetryFailed, T0 + 2).unwrap().rollout;
    assert_eq!(retried.phase, Phase::Running);
    assert!(retried.members.values().all(|m| m.status == MemberStatus::Waiting && m.attempt == 1));
    let d = decide(&retried, &BTreeMap::new(), T0 + 3);
    assert!(d.effects.iter().any(|e| matches!(e, Effect::SetDesired { attempt: 1, .. })));
}

#[test]
fn promote_ends_a_soak_early_but_cannot_skip_an_unfinished_wave() {
    let r = rollout(plan(&[50.0, 100.0], 0.0), 4);
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    assert!(matches!(operate(&r, OperatorAction::Promote, T0), Err(RolloutError::NotSoaking { wave: 1, .. })));
    let obs = observe(&r, &assigned(&r), active("2.0.0"));
    let soaking = decide(&r, &obs, T0 + 1).rollout;
    let promoted = operate(&soaking, OperatorAction::Promote, T0 + 2).unwrap().rollout;
    assert_eq!(decide(&promoted, &obs, T0 + 2).rollout.wave, 1);
}

#[test]
fn creation_refuses_an_empty_cohort_and_overlapping_rollouts() {
    let mut p = plan(&[100.0], 0.0);
    p.selector.insert("site".into(), "mars".into());
    assert!(matches!(create("r", p, &devices(4), &Default::default(), T0), Err(RolloutError::EmptyCohort(_))));
    let busy = [("dev-001".to_string(), "r0".to_string())].into();
    let err = create("r", plan(&[100.0], 0.0), &devices(4), &busy, T0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "device dev-001 is already in active rollout r0 of model tabular; pause or abort that rollout first"
    );
}

#[test]
fn a_candidate_worse_than_the_same_devices_previous_version_breaches_even_when_the_holdout_agrees() {
    let r = rollout(plan(&[30.0, 100.0], 0.3), 40);
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    let mut candidate = with_metrics("2.0.0", metrics(300, vec![100, 100, 100], 0.5));
    candidate.metrics.insert("1.0.0".into(), metrics(300, vec![100, 100, 100], 0.9));
    let obs = observe_groups(&r, candidate, with_metrics("1.0.0", metrics(300, vec![100, 100, 100], 0.55)));
    let d = decide(&r, &obs, T0 + 1);
    assert_eq!(d.rollout.phase, Phase::RolledBack);
    let found = breaches(&d);
    assert!(
        found.iter().all(|b| matches!(b, GateBreach::AgainstPreviousVersion(inner) if matches!(**inner, GateBreach::Confidence { .. }))),
        "only the comparison with the previous version breaches, not the holdout one: {found:?}"
    );
    assert!(!found.is_empty());
}

#[test]
fn a_soaked_wave_waits_for_judgeable_samples_unless_promoted() {
    let r = rollout(plan_judging(&[50.0, 100.0], 0.0), 4);
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    let obs = observe(&r, &assigned(&r), active("2.0.0"));
    let r = decide(&r, &obs, T0 + 1).rollout;
    let r = decide(&r, &obs, T0 + 20_000).rollout;
    assert_eq!(r.wave, 0, "no samples, no verdict on the model: the wave must not pass");
    assert!(r.waiting_for.as_deref().unwrap().starts_with("200 samples on candidate and control"));
    let promoted = operate(&r, OperatorAction::Promote, T0 + 20_001).unwrap().rollout;
    let r = decide(&promoted, &obs, T0 + 20_002).rollout;
    assert_eq!((r.wave, r.promoted, r.waiting_for.clone()), (1, false, None));
}

/// A one-wave plan whose wave runs the candidate in shadow first.
fn shadow_plan(devices: usize) -> Rollout {
    let mut p = plan(&[100.0], 0.0);
    p.waves[0].shadow = true;
    p.gates.min_shadow_samples = 100;
    rollout(p, devices)
}

/// A device that runs 1.0.0 with 2.0.0 in shadow, agreeing on `agree` of 200 requests.
fn shadowing(agree: u64) -> DeviceObservation {
    let mut o = active("1.0.0");
    o.shadow_version = Some("2.0.0".into());
    let mut summary = proto::shadow::ShadowSummary::empty("2.0.0", 2);
    summary.rows = 200;
    summary.agree = agree;
    o.metrics.insert("2.0.0".into(), VersionMetrics { shadow: Some(summary), ..Default::default() });
    o
}

fn shadow_effects(effects: &[Effect]) -> Vec<(String, Option<String>)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::SetDesired { version, shadow, .. } => Some((version.clone(), shadow.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_shadow_wave_runs_the_candidate_beside_the_current_version_then_activates_it_once_it_agrees() {
    let r = shadow_plan(4);
    let d = decide(&r, &observe(&r, &[], active("1.0.0")), T0);
    assert_eq!(shadow_effects(&d.effects), vec![("1.0.0".to_string(), Some("2.0.0".to_string())); 4]);
    assert!(d.rollout.members.values().all(|m| m.status == MemberStatus::ShadowAssigned));
    let r = d.rollout;

    // Shadowing, but too few shadowed requests yet (min 100, each device reports none).
    let mut quiet = active("1.0.0");
    quiet.shadow_version = Some("2.0.0".into());
    let d = decide(&r, &observe(&r, &r.order, quiet), T0 + 1);
    assert!(d.rollout.members.values().all(|m| m.status == MemberStatus::Shadowing));
    assert!(
        d.rollout.waiting_for.as_deref().unwrap().starts_with("100 shadowed requests on wave 1"),
        "{:?}",
        d.rollout.waiting_for
    );
    assert!(desired(&d.effects).is_empty());

    // 190 of 200 agree on each device: 95% passes the 80% gate; the candidate is activated.
    let d = decide(&d.rollout, &observe(&r, &r.order, shadowing(190)), T0 + 2);
    assert_eq!(d.rollout.phase, Phase::Running);
    assert!(d.rollout.shadow_passed);
    assert_eq!(shadow_effects(&d.effects), vec![("2.0.0".to_string(), None); 4]);
    assert!(d
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Audit { action, .. } if *action == AuditAction::ShadowPassed)));
    // From here the wave goes on as any wave: active devices complete it.
    let d = decide(&d.rollout, &observe(&r, &r.order, active("2.0.0")), T0 + 3);
    assert!(d.rollout.members.values().all(|m| m.status == MemberStatus::Active));
}

#[test]
fn a_candidate_that_disagrees_in_shadow_is_stopped_before_any_device_activates_it() {
    let r = shadow_plan(4);
    let r = decide(&r, &observe(&r, &[], active("1.0.0")), T0).rollout;
    let d = decide(&r, &observe(&r, &r.order, shadowing(100)), T0 + 1);
    assert_eq!(d.rollout.phase, Phase::RolledBack);
    assert!(
        matches!(breaches(&d)[..], [GateBreach::ShadowAgreement { agreement, min, rows: 800 }] if agreement == 0.5 && min == 0.8)
    );
    assert!(d
        .rollout
        .reason
        .unwrap()
        .contains("agreed with the active version on 50.0% of 800 requests, below the 80.0% gate"));
    // Reverting stops the shadow and keeps 1.0.0: nothing ever asked for 2.0.0 as active.
    assert_eq!(shadow_effects(&d.effects), vec![("1.0.0".to_string(), None); 4]);
}

#[test]
fn a_shadow_wave_whose_devices_cannot_install_the_candidate_fails_on_its_success_threshold() {
    let r = shadow_plan(10);
    let r = decide(&r, &observe(&r, &[], active("1.0.0")), T0).rollout;
    let mut obs = observe(&r, &r.order[..8], shadowing(200));
    for id in &r.order[8..] {
        obs.insert(id.clone(), failed());
    }
    let mut p = r.clone();
    p.plan.failure_threshold = 1.0;
    let d = decide(&p, &obs, T0 + 1);
    assert_eq!(d.rollout.phase, Phase::RolledBack);
    assert_eq!(breaches(&d), vec![GateBreach::WaveSuccess { wave: 0, active: 8, target: 10, threshold: 0.9 }]);
}

/// One gate at a time: the wave reports metrics equal to the holdout's except `spoil` changes
/// one of them; the rollout must stop on exactly that gate.
fn breached_alone(spoil: impl Fn(&mut VersionMetrics)) -> Vec<GateBreach> {
    let r = rollout(plan_judging(&[30.0, 100.0], 0.3), 40);
    let r = decide(&r, &BTreeMap::new(), T0).rollout;
    let mut candidate = metrics(300, vec![100, 100, 100], 0.75);
    spoil(&mut candidate);
    let obs = observe_groups(
        &r,
        with_metrics("2.0.0", candidate),
        with_metrics("1.0.0", metrics(300, vec![100, 100, 100], 0.75)),
    );
    breaches(&decide(&r, &obs, T0 + 1))
}

#[test]
fn healthy_metrics_equal_to_the_holdouts_breach_no_gate() {
    assert_eq!(breached_alone(|_| {}), vec![]);
}

#[test]
fn a_shifted_prediction_distribution_breaches_the_prediction_gate_alone() {
    let b = breached_alone(|m| m.sketch.outputs.classes = vec![280, 10, 10]);
    assert!(matches!(b[..], [GateBreach::PredictionPsi { psi, max }] if psi > 0.25 && max == 0.25), "{b:?}");
}

#[test]
fn a_higher_error_rate_breaches_the_error_gate_alone() {
    let b = breached_alone(|m| m.errors = 30);
    assert!(
        matches!(b[..], [GateBreach::ErrorRate { candidate, control, .. }] if candidate == 0.1 && control == 0.0),
        "{b:?}"
    );
}

#[test]
fn a_slower_model_breaches_the_latency_gate_alone() {
    // Above the gate's 1 ms floor: below it a p95 ratio is scheduling noise (gates.rs).
    let b = breached_alone(|m| m.latency_p95_us = Some(5_000.0));
    assert!(
        matches!(b[..], [GateBreach::LatencyP95 { candidate_us, control_us, max_ratio }]
        if candidate_us == 5_000.0 && control_us == 50.0 && max_ratio == 3.0),
        "{b:?}"
    );
}

#[test]
fn inputs_that_drift_more_than_the_holdouts_breach_the_input_drift_gate_alone() {
    let b = breached_alone(|m| m.input_drift = Some(0.9));
    assert!(
        matches!(b[..], [GateBreach::InputDrift { candidate, control, .. }] if (candidate - 0.9).abs() < 1e-9 && (control - 0.02).abs() < 1e-9),
        "{b:?}"
    );
}

#[test]
fn half_the_input_features_newly_drifting_by_their_tests_breaches_the_drift_share_gate_alone() {
    let b = breached_alone(|m| m.drift_share = Some(0.75));
    assert!(
        matches!(b[..], [GateBreach::DriftShare { candidate, control, max_increase }]
        if candidate == 0.75 && control == 0.0 && max_increase == 0.5),
        "{b:?}"
    );
    assert_eq!(b[0].to_string(), "75% of input features drifted vs 0% on control exceeds the +50-point gate");
    assert_eq!(breached_alone(|m| m.drift_share = Some(0.5)), vec![], "at the limit is within it");
}
