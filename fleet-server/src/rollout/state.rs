//! The persisted state of one rollout and the observations the engine judges it on. Plain data:
//! serialised to JSON in the store, fed to `decide` in tests as fixtures.

use std::collections::BTreeMap;

use proto::drift::WindowSketch;
use proto::rollout::RolloutPlan;
use proto::wire::UpdateStep;
use serde::{Deserialize, Serialize};

use super::gates::GateBreach;
use proto::wire::AuditAction;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    Paused,
    Completed,
    Halted,
    RolledBack,
    Aborted,
}

impl Phase {
    /// Running or paused rollouts hold their devices.
    pub const ACTIVE: [Phase; 2] = [Phase::Running, Phase::Paused];
    pub const ALL: [Phase; 6] =
        [Phase::Running, Phase::Paused, Phase::Completed, Phase::Halted, Phase::RolledBack, Phase::Aborted];

    /// The phase `as_str` names `text`, if any.
    pub fn named(text: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == text)
    }

    pub fn is_active(self) -> bool {
        Phase::ACTIVE.contains(&self)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Completed => "completed",
            Phase::Halted => "halted",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum MemberStatus {
    /// In the cohort, not assigned yet (or a holdout device).
    Waiting,
    /// Told to install the candidate.
    Assigned,
    /// Downloaded and verified the candidate, waiting for the plan's activation window (ADR
    /// 0012): not in flight (its download is done), and timed out only after a whole day.
    Staged,
    /// Told to run the candidate in shadow (a shadow wave), beside its current version.
    ShadowAssigned,
    /// Runs the candidate in shadow; activated once the wave's shadow gate passes.
    Shadowing,
    Active,
    Failed(String),
    TimedOut,
    /// Put back on its previous version by a rollback or abort.
    Reverted,
}

impl MemberStatus {
    pub fn executed(&self) -> bool {
        matches!(self, MemberStatus::Active | MemberStatus::Failed(_) | MemberStatus::TimedOut)
    }

    pub fn failed(&self) -> bool {
        matches!(self, MemberStatus::Failed(_) | MemberStatus::TimedOut)
    }

    /// Finished the shadow phase of a shadow wave: shadowing, or failed trying.
    pub fn shadow_executed(&self) -> bool {
        matches!(self, MemberStatus::Shadowing) || self.failed()
    }

    /// Told something and not yet done with it: counts against the disruption budget.
    pub fn in_flight(&self) -> bool {
        matches!(self, MemberStatus::Assigned | MemberStatus::ShadowAssigned)
    }

    /// Told to install or shadow the candidate and not done yet: its device's reports move it on.
    pub fn awaiting_device(&self) -> bool {
        self.in_flight() || *self == MemberStatus::Staged
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct Member {
    pub holdout: bool,
    pub bucket: f64,
    /// What the device ran when the rollout started: the rollback target.
    pub previous_version: Option<String>,
    pub wave: Option<usize>,
    pub assigned_ms: Option<u64>,
    pub status: MemberStatus,
    /// Incremented by "retry failed" so the device tries the same version again.
    pub attempt: u32,
    /// The device's value of the plan's `max_concurrent_per` label, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_group: Option<String>,
    /// Joined after the rollout started (enrolled or relabelled into its selector).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

/// How a group of devices behaved over the judged window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, utoipa::ToSchema)]
pub struct GroupMetrics {
    pub devices: usize,
    pub samples: u64,
    pub inferences: u64,
    pub errors: u64,
    pub mean_confidence: Option<f64>,
    pub latency_p95_us: Option<f64>,
    pub input_drift: Option<f64>,
    /// The group's mean share of drifted input features (devices with enough samples).
    #[serde(default)]
    pub drift_share: Option<f64>,
    pub classes: Vec<u64>,
    /// The candidate in shadow on the group's devices, compared with what they run.
    #[serde(default)]
    pub shadow: Option<proto::shadow::ShadowSummary>,
}

/// Why a rollout stopped, with the numbers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct Evidence {
    pub wave: usize,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub executed: usize,
    pub failed: usize,
    pub candidate: GroupMetrics,
    pub control: GroupMetrics,
    /// The candidate devices' own metrics on the version they ran before.
    #[serde(default)]
    pub previous_version: GroupMetrics,
    pub breaches: Vec<GateBreach>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct Rollout {
    pub id: String,
    pub plan: RolloutPlan,
    pub salt: String,
    pub phase: Phase,
    pub wave: usize,
    pub soak_until_ms: Option<u64>,
    /// Set by an operator's promote: the current wave may advance without judged model gates.
    #[serde(default)]
    pub promoted: bool,
    /// Why the rollout is waiting, when it is (e.g. for samples); cleared when it moves on.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// The current wave is a shadow wave whose shadow gate passed: its devices were activated.
    #[serde(default)]
    pub shadow_passed: bool,
    pub reason: Option<String>,
    pub evidence: Option<Evidence>,
    pub created_ms: u64,
    pub members: BTreeMap<String, Member>,
    /// Eligible (non-holdout) devices in bucket order: wave k takes a prefix of it.
    pub order: Vec<String>,
    /// How many times the store has saved this rollout (0: never). A save names the revision it
    /// read and is refused when another writer (another server) saved the rollout since.
    #[serde(skip)]
    pub revision: u64,
}

/// A rollout without its members: what the store keeps in the rollout's own row. The members are
/// rows of their own, so a tick that moves a hundred of 10,000 members writes a hundred rows
/// instead of the whole cohort's 1.6 MB of JSON (docs/BENCHMARKS.md, "Rollout wave save"). The
/// wave order is not stored: it follows from the members ([`eligible_order`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RolloutHead {
    pub id: String,
    pub plan: RolloutPlan,
    pub salt: String,
    pub phase: Phase,
    pub wave: usize,
    pub soak_until_ms: Option<u64>,
    #[serde(default)]
    pub promoted: bool,
    #[serde(default)]
    pub waiting_for: Option<String>,
    #[serde(default)]
    pub shadow_passed: bool,
    pub reason: Option<String>,
    pub evidence: Option<Evidence>,
    pub created_ms: u64,
}

/// The eligible (non-holdout) members in bucket order, ties by id: the order waves take prefixes
/// of. Rollouts keep it as they grow (late joiners are inserted at their bucket's place).
pub fn eligible_order(members: &BTreeMap<String, Member>) -> Vec<String> {
    let mut order: Vec<(f64, &str)> =
        members.iter().filter(|(_, m)| !m.holdout).map(|(id, m)| (m.bucket, id.as_str())).collect();
    order.sort_by(|a, b| wave_order(*a, *b));
    order.into_iter().map(|(_, id)| id.to_string()).collect()
}

/// How two eligible members, as (bucket, id), compare in wave order: the one comparison both
/// [`eligible_order`] and a late joiner's insertion use, so the order a server holds is the
/// order it reads back.
pub fn wave_order(a: (f64, &str), b: (f64, &str)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1))
}

impl Rollout {
    /// Everything but the members (and the order that follows from them).
    pub fn head(&self) -> RolloutHead {
        RolloutHead {
            id: self.id.clone(),
            plan: self.plan.clone(),
            salt: self.salt.clone(),
            phase: self.phase,
            wave: self.wave,
            soak_until_ms: self.soak_until_ms,
            promoted: self.promoted,
            waiting_for: self.waiting_for.clone(),
            shadow_passed: self.shadow_passed,
            reason: self.reason.clone(),
            evidence: self.evidence.clone(),
            created_ms: self.created_ms,
        }
    }

    /// The rollout stored as `head` and `members`, at store revision `revision`.
    pub fn from_parts(head: RolloutHead, members: BTreeMap<String, Member>, revision: u64) -> Rollout {
        let RolloutHead {
            id,
            plan,
            salt,
            phase,
            wave,
            soak_until_ms,
            promoted,
            waiting_for,
            shadow_passed,
            reason,
            evidence,
            created_ms,
        } = head;
        let order = eligible_order(&members);
        Rollout {
            id,
            plan,
            salt,
            phase,
            wave,
            soak_until_ms,
            promoted,
            waiting_for,
            shadow_passed,
            reason,
            evidence,
            created_ms,
            members,
            order,
            revision,
        }
    }
}

/// Which of a rollout's members a save writes.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberWrites {
    /// Every member, replacing whatever the store holds: a new rollout, or one saved from a
    /// state whose stored members are not known.
    All,
    /// Only these (new or changed since the revision the rollout was read at); the store keeps
    /// the others as they are.
    Only(Vec<String>),
}

/// What a save of `after` must write when the store holds `before` (the same rollout at the
/// revision it was read at): the members that joined or changed. A member that left (never done
/// today) makes it all of them, so the stored set cannot keep one that is gone.
pub fn member_writes(before: &Rollout, after: &Rollout) -> MemberWrites {
    if before.members.keys().any(|id| !after.members.contains_key(id)) {
        return MemberWrites::All;
    }
    MemberWrites::Only(
        after.members.iter().filter(|(id, m)| before.members.get(*id) != Some(*m)).map(|(id, _)| id.clone()).collect(),
    )
}

/// An enrolled device as a rollout's cohort selection sees it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DeviceInfo {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub active_version: Option<String>,
    /// The version the server last asked it to run, if it asked.
    pub desired_version: Option<String>,
    /// Revoked devices join no rollout and get no cohort default.
    pub revoked: bool,
}

/// Every device's observation of the rollout's model, by device id (built by `observe`).
pub type Observations = BTreeMap<String, DeviceObservation>;

/// What the store knows about one device's model metrics for one version, since the rollout began.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct VersionMetrics {
    /// The device's drift windows of this version, merged.
    pub sketch: WindowSketch,
    /// Input drift: the largest per-feature PSI of the merged windows against the version's
    /// reference, once the device has enough samples (see `observe`).
    pub input_drift: Option<f64>,
    /// The share of input features that drift from the version's reference by each feature's
    /// chosen test, once the device has enough samples (see `observe`).
    #[serde(default)]
    pub drift_share: Option<f64>,
    pub inferences: u64,
    pub errors: u64,
    pub latency_p95_us: Option<f64>,
    /// How the version did in shadow on this device (its merged shadow windows).
    #[serde(default)]
    pub shadow: Option<proto::shadow::ShadowSummary>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct DeviceObservation {
    pub active_version: Option<String>,
    pub step: Option<UpdateStep>,
    /// The version the step is about.
    pub step_version: Option<String>,
    pub detail: String,
    /// The candidate the device runs in shadow (from its heartbeats), if any.
    #[serde(default)]
    pub shadow_version: Option<String>,
    /// By version.
    pub metrics: BTreeMap<String, VersionMetrics>,
}

/// What the driver must do after a decision, in order, once the new state is persisted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Effect {
    /// Run `version`; `shadow` is the candidate to run beside it in shadow, if any.
    SetDesired {
        device: String,
        version: String,
        attempt: u32,
        shadow: Option<String>,
    },
    Audit {
        action: AuditAction,
        detail: String,
    },
}
