//! Creating a rollout from a plan and the fleet, and the operator actions on it. Pure.

use std::collections::BTreeMap;

use proto::cohort::{bucket, matches};
use proto::rollout::RolloutPlan;
use proto::wire::AuditAction;
use thiserror::Error;

use super::decide::{revert_touched, Decision};
use super::state::{eligible_order, wave_order, DeviceInfo, Effect, Member, MemberStatus, Phase, Rollout};

#[derive(Debug, Error, PartialEq)]
pub enum RolloutError {
    #[error(transparent)]
    Plan(#[from] proto::rollout::PlanError),
    #[error("no enrolled device matches the selector {0}")]
    EmptyCohort(String),
    #[error("every matching device falls in the holdout; lower `holdout` or widen the selector")]
    NoEligible,
    #[error(
        "device {device} is already in active rollout {rollout} of model {model}; pause or abort that rollout first"
    )]
    Overlap { device: String, rollout: String, model: String },
    #[error("rollout {id} is {phase}; {action} needs a {needs} rollout")]
    WrongPhase { id: String, phase: &'static str, action: &'static str, needs: &'static str },
    #[error(
        "rollout {id} wave {wave} is not soaking yet: promote ends a soak early, it does not skip a wave's checks"
    )]
    NotSoaking { id: String, wave: usize },
}

/// Active rollouts of the same model already holding devices: device -> rollout id.
pub type Busy = BTreeMap<String, String>;

pub fn create(
    id: &str,
    plan: RolloutPlan,
    devices: &[DeviceInfo],
    busy: &Busy,
    now_ms: u64,
) -> Result<Rollout, RolloutError> {
    plan.validate()?;
    let salt = id.to_string();
    let cohort: Vec<&DeviceInfo> =
        devices.iter().filter(|d| !d.revoked && matches(&plan.selector, &d.labels)).collect();
    if cohort.is_empty() {
        return Err(RolloutError::EmptyCohort(format!("{:?}", plan.selector)));
    }
    if let Some((device, rollout)) = cohort.iter().find_map(|d| busy.get(&d.id).map(|r| (d.id.clone(), r.clone()))) {
        return Err(RolloutError::Overlap { device, rollout, model: plan.model.clone() });
    }
    let members: BTreeMap<String, Member> =
        cohort.iter().map(|device| (device.id.clone(), new_member(device, &plan, &salt, false))).collect();
    let order = eligible_order(&members);
    if order.is_empty() {
        return Err(RolloutError::NoEligible);
    }
    Ok(Rollout {
        id: id.to_string(),
        plan,
        salt,
        phase: Phase::Running,
        wave: 0,
        soak_until_ms: None,
        promoted: false,
        waiting_for: None,
        shadow_passed: false,
        reason: None,
        evidence: None,
        created_ms: now_ms,
        members,
        order,
        revision: 0,
    })
}

/// A device entering a rollout: its stable bucket puts it in the holdout or in the eligible order.
/// The rollback target is what it runs, or else what it was last told to run.
fn new_member(device: &DeviceInfo, plan: &RolloutPlan, salt: &str, late: bool) -> Member {
    let b = bucket(&device.id, salt);
    Member {
        holdout: b < plan.holdout,
        bucket: b,
        previous_version: device.active_version.clone().or_else(|| device.desired_version.clone()),
        wave: None,
        assigned_ms: None,
        status: MemberStatus::Waiting,
        attempt: 0,
        budget_group: plan.max_concurrent_per.as_ref().and_then(|budget| device.labels.get(&budget.label).cloned()),
        late,
    }
}

/// Devices that came to match a running or paused rollout's selector after it started (newly
/// enrolled, or relabelled) and are held by no other active rollout of the model join it by
/// their stable bucket: the holdout, or the eligible order at their bucket's place, so the
/// current wave takes them when their bucket falls inside its share and a later wave otherwise.
/// A member whose labels stop matching stays a member. `None` when nobody joins.
pub fn admit_late_joiners(current: &Rollout, devices: &[DeviceInfo], busy: &Busy) -> Option<Decision> {
    if !current.phase.is_active() {
        return None;
    }
    let joiners: Vec<&DeviceInfo> = devices
        .iter()
        .filter(|d| !d.revoked && matches(&current.plan.selector, &d.labels))
        .filter(|d| !current.members.contains_key(&d.id))
        .filter(|d| busy.get(&d.id).is_none_or(|holder| *holder == current.id))
        .collect();
    if joiners.is_empty() {
        return None;
    }
    let mut r = current.clone();
    let mut effects = Vec::new();
    for device in joiners {
        let member = new_member(device, &r.plan, &r.salt, true);
        let place = if member.holdout {
            "the holdout".to_string()
        } else {
            let key = (member.bucket, device.id.as_str());
            let at = r.order.partition_point(|id| wave_order((r.members[id].bucket, id), key).is_lt());
            r.order.insert(at, device.id.clone());
            format!("position {} of {} in wave order", at + 1, r.order.len())
        };
        effects.push(Effect::Audit { action: AuditAction::Joined, detail: format!("{} joined {place}", device.id) });
        r.members.insert(device.id.clone(), member);
    }
    Some(Decision { rollout: r, effects })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorAction {
    Pause,
    Resume,
    Abort,
    Promote,
    RetryFailed,
}

impl OperatorAction {
    pub fn parse(text: &str) -> Option<OperatorAction> {
        Some(match text {
            "pause" => OperatorAction::Pause,
            "resume" => OperatorAction::Resume,
            "abort" => OperatorAction::Abort,
            "promote" => OperatorAction::Promote,
            "retry" => OperatorAction::RetryFailed,
            _ => return None,
        })
    }

    /// The audit line an operator action writes.
    pub fn audit_action(self) -> AuditAction {
        match self {
            OperatorAction::Pause => AuditAction::Pause,
            OperatorAction::Resume => AuditAction::Resume,
            OperatorAction::Abort => AuditAction::Abort,
            OperatorAction::Promote => AuditAction::Promote,
            OperatorAction::RetryFailed => AuditAction::Retry,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OperatorAction::Pause => "pause",
            OperatorAction::Resume => "resume",
            OperatorAction::Abort => "abort",
            OperatorAction::Promote => "promote",
            OperatorAction::RetryFailed => "retry",
        }
    }
}

pub fn operate(current: &Rollout, action: OperatorAction, now_ms: u64) -> Result<Decision, RolloutError> {
    let mut r = current.clone();
    let mut effects = Vec::new();
    let wrong =
        |needs| RolloutError::WrongPhase { id: r.id.clone(), phase: r.phase.as_str(), action: action.as_str(), needs };
    match action {
        OperatorAction::Pause if r.phase == Phase::Running => r.phase = Phase::Paused,
        OperatorAction::Pause => return Err(wrong("running")),
        OperatorAction::Resume if r.phase == Phase::Paused => r.phase = Phase::Running,
        OperatorAction::Resume => return Err(wrong("paused")),
        OperatorAction::Abort if r.phase.is_active() || r.phase == Phase::Halted => {
            revert_touched(&mut r, &mut effects);
            r.phase = Phase::Aborted;
            r.reason = Some("aborted by an operator".into());
        }
        OperatorAction::Abort => return Err(wrong("running, paused or halted")),
        OperatorAction::Promote if r.phase.is_active() => match r.soak_until_ms {
            Some(_) => {
                r.soak_until_ms = Some(now_ms);
                r.promoted = true;
            }
            None => return Err(RolloutError::NotSoaking { id: r.id.clone(), wave: r.wave + 1 }),
        },
        OperatorAction::Promote => return Err(wrong("running or paused")),
        OperatorAction::RetryFailed if r.phase.is_active() || r.phase == Phase::Halted => {
            for member in r.members.values_mut().filter(|m| m.status.failed()) {
                member.status = MemberStatus::Waiting;
                member.attempt += 1;
                member.assigned_ms = None;
                member.wave = None;
            }
            if r.phase == Phase::Halted {
                r.phase = Phase::Running;
                r.reason = None;
                r.evidence = None;
            }
        }
        OperatorAction::RetryFailed => return Err(wrong("running, paused or halted")),
    }
    effects
        .push(Effect::Audit { action: action.audit_action(), detail: format!("rollout is now {}", r.phase.as_str()) });
    Ok(Decision { rollout: r, effects })
}

/// Devices a set of active rollouts hold, for overlap checks.
pub fn busy_devices<'a>(rollouts: impl Iterator<Item = &'a Rollout>, model: &str) -> Busy {
    let mut busy = Busy::new();
    for r in rollouts.filter(|r| r.phase.is_active() && r.plan.model == model) {
        for id in r.members.keys() {
            busy.insert(id.clone(), r.id.clone());
        }
    }
    busy
}
