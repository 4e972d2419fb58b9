//! The rollout decision: `decide(rollout, observations, now) -> Decision`. Pure; every transition
//! is covered by the fixture tests in `decide_tests.rs`.

use super::gates::{control_group, enough_samples, group, judge, readings, GateBreach, GateReading};
use super::state::{DeviceObservation, Effect, Evidence, GroupMetrics, MemberStatus, Observations, Phase, Rollout};
use proto::rollout::{HealthGates, OnBreach};
use proto::wire::{AuditAction, UpdateStep};

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub rollout: Rollout,
    pub effects: Vec<Effect>,
}

fn audit(effects: &mut Vec<Effect>, action: AuditAction, detail: String) {
    effects.push(Effect::Audit { action, detail });
}

pub fn decide(current: &Rollout, observations: &Observations, now_ms: u64) -> Decision {
    decide_and_read(current, observations, now_ms).0
}

/// [`decide`], and what the model gates read on the way (None when the rollout is not running),
/// so that the driver can show them without building the groups a second time.
pub fn decide_and_read(current: &Rollout, observations: &Observations, now_ms: u64) -> (Decision, Option<LiveGates>) {
    let mut read = None;
    let decision = decide_reading(current, observations, now_ms, &mut read);
    (decision, read)
}

fn decide_reading(
    current: &Rollout,
    observations: &Observations,
    now_ms: u64,
    read: &mut Option<LiveGates>,
) -> Decision {
    let mut r = current.clone();
    let mut effects = Vec::new();
    if r.phase != Phase::Running {
        return Decision { rollout: r, effects };
    }
    observe_members(&mut r, observations, now_ms, &mut effects);

    let candidate_version = r.plan.version.clone();
    let (executed, failed) = r
        .members
        .values()
        .filter(|m| m.wave.is_some())
        .fold((0, 0), |(e, f), m| (e + m.status.executed() as usize, f + m.status.failed() as usize));
    let mut evidence = evidence(&r, observations, executed, failed, now_ms);
    *read = Some(LiveGates::of(&r.plan.gates, evidence.candidate.clone(), evidence.control.clone()));
    if executed >= r.plan.min_executed && executed > 0 && failed as f64 / executed as f64 > r.plan.failure_threshold {
        let install = GateBreach::InstallFailures { failed, executed, threshold: r.plan.failure_threshold };
        evidence.breaches.insert(0, install);
    }
    if !evidence.breaches.is_empty() {
        breach(&mut r, evidence, &mut effects);
        return Decision { rollout: r, effects };
    }

    let target = r.plan.wave_target(r.wave, r.order.len());
    let shadow_phase = r.plan.waves.get(r.wave).is_some_and(|w| w.shadow) && !r.shadow_passed;
    assign(&mut r, target, now_ms, &candidate_version, shadow_phase, &mut effects);
    if shadow_phase {
        shadow_gate(&mut r, observations, target, now_ms, evidence, &mut effects);
        return Decision { rollout: r, effects };
    }

    let wave_done = r.order[..target].iter().all(|id| r.members[id].status.executed());
    if wave_done {
        let active = r.order[..target].iter().filter(|id| r.members[*id].status == MemberStatus::Active).count();
        let success = if target == 0 { 0.0 } else { active as f64 / target as f64 };
        if success < r.plan.success_threshold {
            let reason = GateBreach::WaveSuccess { wave: r.wave, active, target, threshold: r.plan.success_threshold };
            let mut evidence = evidence;
            evidence.breaches.push(reason);
            breach(&mut r, evidence, &mut effects);
        } else {
            let judged = enough_samples(&r.plan.gates, &evidence.candidate, &evidence.control);
            advance(&mut r, target, judged, now_ms, &mut effects);
        }
    }
    Decision { rollout: r, effects }
}

/// How long a device may wait staged for its activation window before it counts as timed out,
/// on top of the device timeout: a day, in which a daily window opens once.
pub const STAGED_GRACE_MS: u64 = 24 * 3600 * 1000;

/// Moves assigned members to active (or, told to shadow, to shadowing), staged, failed or timed
/// out from what their devices report.
fn observe_members(r: &mut Rollout, observations: &Observations, now_ms: u64, effects: &mut Vec<Effect>) {
    let version = r.plan.version.clone();
    let timeout_ms = (r.plan.device_timeout_secs * 1000.0) as u64;
    let empty = DeviceObservation::default();
    for (id, member) in r.members.iter_mut().filter(|(_, m)| m.status.awaiting_device()) {
        let o = observations.get(id).unwrap_or(&empty);
        let shadow = member.status == MemberStatus::ShadowAssigned;
        if !shadow && o.active_version.as_deref() == Some(version.as_str()) {
            member.status = MemberStatus::Active;
        } else if shadow && o.shadow_version.as_deref() == Some(version.as_str()) {
            member.status = MemberStatus::Shadowing;
        } else if o.step == Some(UpdateStep::Failed) && o.step_version.as_deref() == Some(version.as_str()) {
            member.status = MemberStatus::Failed(o.detail.clone());
            audit(effects, AuditAction::DeviceFailed, format!("{id}: {}", o.detail));
        } else if member.status == MemberStatus::Assigned
            && o.step == Some(UpdateStep::Staged)
            && o.step_version.as_deref() == Some(version.as_str())
        {
            // Its download is done: it waits for its window, off the disruption budget, and
            // its timeout starts again, a day longer.
            member.status = MemberStatus::Staged;
            member.assigned_ms = Some(now_ms);
        } else if member.status == MemberStatus::Staged {
            if member.assigned_ms.is_some_and(|at| now_ms.saturating_sub(at) > timeout_ms + STAGED_GRACE_MS) {
                member.status = MemberStatus::TimedOut;
                audit(
                    effects,
                    AuditAction::DeviceTimedOut,
                    format!("{id}: staged but not activated within a day and {} s", r.plan.device_timeout_secs),
                );
            }
        } else if member.assigned_ms.is_some_and(|at| now_ms.saturating_sub(at) > timeout_ms) {
            member.status = MemberStatus::TimedOut;
            audit(
                effects,
                AuditAction::DeviceTimedOut,
                format!("{id}: no result within {} s", r.plan.device_timeout_secs),
            );
        }
    }
}

/// What a rollout's model gates read now: the candidate and control groups and each gate's
/// value against its limit (what the dashboard and the API show beside the decision).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct LiveGates {
    pub candidate: GroupMetrics,
    pub control: GroupMetrics,
    /// Both groups have `gates.min_samples`: the readings can stop the rollout.
    pub judged: bool,
    pub readings: Vec<GateReading>,
}

impl LiveGates {
    /// The candidate and control groups read against `gates`.
    fn of(gates: &HealthGates, candidate: GroupMetrics, control: GroupMetrics) -> LiveGates {
        LiveGates {
            judged: enough_samples(gates, &candidate, &control),
            readings: readings(gates, &candidate, &control),
            candidate,
            control,
        }
    }
}

/// What the gates of `r` read from `observations` (the API, when the driver has no reading).
pub fn live_gates(r: &Rollout, observations: &Observations, now_ms: u64) -> LiveGates {
    let e = evidence(r, observations, 0, 0, now_ms);
    LiveGates::of(&r.plan.gates, e.candidate, e.control)
}

fn evidence(r: &Rollout, observations: &Observations, executed: usize, failed: usize, now_ms: u64) -> Evidence {
    let empty = DeviceObservation::default();
    let obs = |id: &String| observations.get(id).unwrap_or(&empty);
    let version = r.plan.version.as_str();
    let candidates: Vec<(&DeviceObservation, &str)> =
        r.members.iter().filter(|(_, m)| m.status == MemberStatus::Active).map(|(id, _)| (obs(id), version)).collect();
    let holdout: Vec<(&DeviceObservation, &str)> = r
        .members
        .iter()
        .filter(|(_, m)| m.holdout)
        .filter_map(|(id, m)| Some((obs(id), m.previous_version.as_deref()?)))
        .collect();
    let previous: Vec<(&DeviceObservation, &str)> = r
        .members
        .iter()
        .filter(|(_, m)| m.status == MemberStatus::Active)
        .filter_map(|(id, m)| Some((obs(id), m.previous_version.as_deref()?)))
        .collect();
    let candidate = group(candidates.iter().copied());
    // Two controls: the live holdout (same time, other devices) and the previous version on the
    // same devices (same devices, earlier). A breach against either stops the rollout.
    let control = control_group(&holdout, &previous);
    let previous_version = group(previous.iter().copied());
    let mut breaches = judge(&r.plan.gates, &candidate, &control);
    if !holdout.is_empty() {
        breaches.extend(
            judge(&r.plan.gates, &candidate, &previous_version)
                .into_iter()
                .map(|b| GateBreach::AgainstPreviousVersion(Box::new(b))),
        );
    }
    Evidence {
        wave: r.wave,
        window_start_ms: r.created_ms,
        window_end_ms: now_ms,
        executed,
        failed,
        candidate,
        control,
        previous_version,
        breaches,
    }
}

/// Stops the rollout on the evidence's breaches (halt, or roll back every touched device).
fn breach(r: &mut Rollout, evidence: Evidence, effects: &mut Vec<Effect>) {
    let reason = evidence.breaches.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    r.phase = match r.plan.on_breach {
        OnBreach::Halt => Phase::Halted,
        OnBreach::Rollback => Phase::RolledBack,
    };
    if r.plan.on_breach == OnBreach::Rollback {
        revert_touched(r, effects);
    }
    let action = if r.phase == Phase::Halted { AuditAction::Halted } else { AuditAction::RolledBack };
    audit(effects, action, format!("wave {}: {reason}", r.wave + 1));
    r.reason = Some(reason);
    r.evidence = Some(evidence);
}

/// Puts every device this rollout assigned back on its previous version (a shadow stops too).
pub fn revert_touched(r: &mut Rollout, effects: &mut Vec<Effect>) {
    for (id, member) in r.members.iter_mut().filter(|(_, m)| m.wave.is_some() && m.status != MemberStatus::Reverted) {
        if let Some(previous) = &member.previous_version {
            effects.push(Effect::SetDesired {
                device: id.clone(),
                version: previous.clone(),
                attempt: member.attempt,
                shadow: None,
            });
        }
        member.status = MemberStatus::Reverted;
    }
}

/// Assigns waiting members of the current wave, within the disruption budget and, when the plan
/// has one, the budget per label value (devices sharing a site's uplink). In a shadow
/// wave's shadow phase they run the candidate in shadow beside what they run (a device that runs
/// no version of the model has nothing to compare with and waits for the activation); after it,
/// shadowing members are activated like waiting ones.
fn assign(r: &mut Rollout, target: usize, now_ms: u64, version: &str, shadow_phase: bool, effects: &mut Vec<Effect>) {
    let in_flight = r.members.values().filter(|m| m.status.in_flight()).count();
    let mut budget = r.plan.max_concurrent.saturating_sub(in_flight);
    let group_cap = r.plan.max_concurrent_per.as_ref().map_or(usize::MAX, |b| b.count);
    let mut group_in_flight: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for group in r.members.values().filter(|m| m.status.in_flight()).filter_map(|m| m.budget_group.clone()) {
        *group_in_flight.entry(group).or_default() += 1;
    }
    let wave = r.wave;
    for id in &r.order[..target] {
        if budget == 0 {
            break;
        }
        let Some(member) = r.members.get_mut(id) else { continue };
        let group_full =
            member.budget_group.as_ref().is_some_and(|g| group_in_flight.get(g).copied().unwrap_or(0) >= group_cap);
        if group_full {
            continue;
        }
        let effect = match (&member.status, shadow_phase, &member.previous_version) {
            (MemberStatus::Waiting, true, Some(previous)) => {
                member.status = MemberStatus::ShadowAssigned;
                Effect::SetDesired {
                    device: id.clone(),
                    version: previous.clone(),
                    attempt: member.attempt,
                    shadow: Some(version.to_string()),
                }
            }
            (MemberStatus::Waiting | MemberStatus::Shadowing, false, _) => {
                member.status = MemberStatus::Assigned;
                Effect::SetDesired {
                    device: id.clone(),
                    version: version.to_string(),
                    attempt: member.attempt,
                    shadow: None,
                }
            }
            _ => continue,
        };
        member.assigned_ms = Some(now_ms);
        member.wave = Some(wave);
        if let Some(group) = &member.budget_group {
            *group_in_flight.entry(group.clone()).or_default() += 1;
        }
        effects.push(effect);
        budget -= 1;
    }
}

/// The shadow phase of a shadow wave: once its devices run the candidate in shadow (or failed
/// trying), the wave must have enough of them shadowing, then enough shadowed requests, then
/// enough agreement between the candidate's top outputs and the active version's; then the
/// candidate is activated on them and the wave goes on as any wave.
fn shadow_gate(
    r: &mut Rollout,
    observations: &Observations,
    target: usize,
    now_ms: u64,
    mut evidence: Evidence,
    effects: &mut Vec<Effect>,
) {
    let version = r.plan.version.clone();
    let in_wave: Vec<&String> =
        r.order[..target].iter().filter(|id| r.members[*id].previous_version.is_some()).collect();
    if !in_wave.iter().all(|id| r.members[*id].status.shadow_executed()) {
        return;
    }
    let shadowing: Vec<&String> =
        in_wave.iter().copied().filter(|id| r.members[*id].status == MemberStatus::Shadowing).collect();
    let wanted = in_wave.len();
    if wanted > 0 && (shadowing.len() as f64 / wanted as f64) < r.plan.success_threshold {
        let reason = GateBreach::WaveSuccess {
            wave: r.wave,
            active: shadowing.len(),
            target: wanted,
            threshold: r.plan.success_threshold,
        };
        evidence.breaches.push(reason);
        breach(r, evidence, effects);
        return;
    }
    let merged = shadow_group(shadowing.iter().filter_map(|id| observations.get(*id)), &version);
    let rows = merged.as_ref().map_or(0, |s| s.rows);
    let gates = &r.plan.gates;
    if rows < gates.min_shadow_samples && !r.promoted {
        r.waiting_for = Some(format!(
            "{} shadowed requests on wave {} before its shadow agreement can pass (have {rows})",
            gates.min_shadow_samples,
            r.wave + 1
        ));
        return;
    }
    let agreement = merged.as_ref().and_then(|s| s.agreement()).unwrap_or(1.0);
    if rows > 0 && agreement < gates.min_shadow_agreement {
        let min = gates.min_shadow_agreement;
        evidence.candidate.shadow = merged;
        evidence.breaches.push(GateBreach::ShadowAgreement { agreement, min, rows });
        breach(r, evidence, effects);
        return;
    }
    r.shadow_passed = true;
    r.waiting_for = None;
    r.promoted = false;
    audit(
        effects,
        AuditAction::ShadowPassed,
        format!(
            "wave {}: {} of {wanted} devices shadowed {version}, {:.1}% agreement over {rows} requests; activating",
            r.wave + 1,
            shadowing.len(),
            agreement * 100.0
        ),
    );
    // The activation itself goes through `assign` on this tick and the next, within the budget.
    let target = r.plan.wave_target(r.wave, r.order.len());
    assign(r, target, now_ms, &version, false, effects);
}

/// The candidate's shadow windows on these devices, merged.
pub fn shadow_group<'a>(
    devices: impl Iterator<Item = &'a DeviceObservation>,
    version: &str,
) -> Option<proto::shadow::ShadowSummary> {
    let mut merged: Option<proto::shadow::ShadowSummary> = None;
    for shadow in devices.filter_map(|o| o.metrics.get(version)?.shadow.as_ref()) {
        match merged.as_mut() {
            None => merged = Some(shadow.clone()),
            Some(m) => {
                m.merge(shadow);
            }
        }
    }
    merged
}

/// A passed wave soaks, then the next wave starts, or the rollout completes. A wave whose model
/// gates could not be judged yet (too few samples) waits after its soak, unless promoted.
fn advance(r: &mut Rollout, target: usize, judged: bool, now_ms: u64, effects: &mut Vec<Effect>) {
    match r.soak_until_ms {
        None => {
            let until = now_ms + (r.plan.soak_secs * 1000.0) as u64;
            r.soak_until_ms = Some(until);
            audit(
                effects,
                AuditAction::WaveSoaking,
                format!("wave {} passed with {target} devices; soaking {} s", r.wave + 1, r.plan.soak_secs),
            );
        }
        Some(until) if now_ms >= until && !judged && !r.promoted => {
            let min = r.plan.gates.min_samples;
            r.waiting_for = Some(format!(
                "{min} samples on candidate and control before the model gates can pass wave {}",
                r.wave + 1
            ));
        }
        Some(until) if now_ms >= until => {
            r.soak_until_ms = None;
            r.promoted = false;
            r.waiting_for = None;
            r.shadow_passed = false;
            if r.wave + 1 < r.plan.waves.len() {
                r.wave += 1;
                let next = r.plan.wave_target(r.wave, r.order.len());
                audit(
                    effects,
                    AuditAction::WaveStarted,
                    format!("wave {} targets {next} of {} eligible devices", r.wave + 1, r.order.len()),
                );
            } else {
                r.phase = Phase::Completed;
                audit(
                    effects,
                    AuditAction::Completed,
                    format!("all {} waves passed; {target} devices run {}", r.plan.waves.len(), r.plan.version),
                );
            }
        }
        Some(_) => {}
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
