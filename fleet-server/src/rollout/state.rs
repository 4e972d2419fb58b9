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
