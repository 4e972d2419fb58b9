//! Wire messages. MQTT payloads are postcard (compact, not self-describing: the `v1` in every
//! topic is the payload version). HTTP bodies are JSON. Every message that concerns one model
//! carries the model name, so a device can host several models from the first version on.

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

use crate::drift::WindowSketch;
use crate::names;

/// Largest MQTT payload either side publishes or accepts.
pub const MAX_MQTT_PAYLOAD: usize = 64 * 1024;
/// Largest HTTP reply body the agent reads (check-in, enrollment, telemetry acknowledgement).
pub const MAX_REPLY_BYTES: usize = 1 << 20;
pub const TOPIC_ROOT: &str = "fleet/v1/devices";

/// Every topic of the protocol, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topic {
    /// agent -> server: [`Heartbeat`]
    Heartbeat { device: String },
    /// agent -> server: [`UpdateStatus`] for one model
    Status { device: String, model: String },
    /// agent -> server: [`DriftSummary`] for one model
    Drift { device: String, model: String },
    /// server -> agent: [`DesiredChanged`]; the agent then checks in over HTTP
    Desired { device: String },
    /// agent -> server: [`crate::delivery::DeliveryEvent`]
    Events { device: String },
    /// server -> agent: [`crate::delivery::Ack`], the records the server has stored
    Ack { device: String },
}

impl Topic {
    pub fn render(&self) -> String {
        match self {
            Topic::Heartbeat { device } => format!("{TOPIC_ROOT}/{device}/heartbeat"),
            Topic::Status { device, model } => {
                format!("{TOPIC_ROOT}/{device}/models/{model}/status")
            }
            Topic::Drift { device, model } => format!("{TOPIC_ROOT}/{device}/models/{model}/drift"),
            Topic::Desired { device } => format!("{TOPIC_ROOT}/{device}/desired"),
            Topic::Events { device } => format!("{TOPIC_ROOT}/{device}/events"),
            Topic::Ack { device } => format!("{TOPIC_ROOT}/{device}/ack"),
        }
    }

    /// Parses a concrete topic; names that fail validation make it unknown.
    pub fn parse(topic: &str) -> Option<Topic> {
        let rest = topic.strip_prefix(TOPIC_ROOT)?.strip_prefix('/')?;
        let parts: Vec<&str> = rest.split('/').collect();
        let valid = |kind, name: &str| names::validate(kind, name).is_ok();
        let parsed = match parts.as_slice() {
            [device, "heartbeat"] => Topic::Heartbeat { device: device.to_string() },
            [device, "desired"] => Topic::Desired { device: device.to_string() },
            [device, "events"] => Topic::Events { device: device.to_string() },
            [device, "ack"] => Topic::Ack { device: device.to_string() },
            [device, "models", model, "status"] if valid("model name", model) => {
                Topic::Status { device: device.to_string(), model: model.to_string() }
            }
            [device, "models", model, "drift"] if valid("model name", model) => {
                Topic::Drift { device: device.to_string(), model: model.to_string() }
            }
            _ => return None,
        };
        let device = match &parsed {
            Topic::Heartbeat { device } | Topic::Desired { device } => device,
            Topic::Events { device } | Topic::Ack { device } => device,
            Topic::Status { device, .. } | Topic::Drift { device, .. } => device,
        };
        valid("device id", device).then_some(parsed)
    }

    /// Filters the server subscribes to.
    pub fn server_filters() -> [String; 4] {
        [
            format!("{TOPIC_ROOT}/+/heartbeat"),
            format!("{TOPIC_ROOT}/+/models/+/status"),
            format!("{TOPIC_ROOT}/+/models/+/drift"),
            format!("{TOPIC_ROOT}/+/events"),
        ]
    }
}

#[derive(Debug, Error)]
pub enum PayloadError {
    #[error("payload of {bytes} bytes exceeds the {limit}-byte limit")]
    TooLarge { bytes: usize, limit: usize },
    #[error("payload does not decode as {kind}: {source}")]
    Decode { kind: &'static str, source: postcard::Error },
}

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Plain derived data into a Vec: postcard cannot fail here.
    postcard::to_allocvec(message).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(kind: &'static str, bytes: &[u8]) -> Result<T, PayloadError> {
    decode_within(kind, bytes, MAX_MQTT_PAYLOAD)
}

/// Decodes a postcard body of at most `limit` bytes (HTTP bodies larger than an MQTT payload).
pub fn decode_within<T: DeserializeOwned>(kind: &'static str, bytes: &[u8], limit: usize) -> Result<T, PayloadError> {
    if bytes.len() > limit {
        return Err(PayloadError::TooLarge { bytes: bytes.len(), limit });
    }
    postcard::from_bytes(bytes).map_err(|source| PayloadError::Decode { kind, source })
}

/// The steps a model update goes through on a device.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UpdateStep {
    Downloading,
    Verifying,
    SelfTest,
    Activating,
    Active,
    Failed,
    RolledBack,
    /// Downloaded and verified, waiting for the plan's activation window (ADR 0012). Appended
    /// last: postcard encodes variants by index.
    Staged,
}

impl UpdateStep {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStep::Downloading => "downloading",
            UpdateStep::Verifying => "verifying",
            UpdateStep::SelfTest => "self_test",
            UpdateStep::Activating => "activating",
            UpdateStep::Active => "active",
            UpdateStep::Failed => "failed",
            UpdateStep::RolledBack => "rolled_back",
            UpdateStep::Staged => "staged",
        }
    }

    pub fn parse(text: &str) -> Option<UpdateStep> {
        [
            UpdateStep::Downloading,
            UpdateStep::Verifying,
            UpdateStep::SelfTest,
            UpdateStep::Activating,
            UpdateStep::Active,
            UpdateStep::Failed,
            UpdateStep::RolledBack,
            UpdateStep::Staged,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateStatus {
    pub model: String,
    /// The version this step is about.
    pub version: String,
    pub step: UpdateStep,
    /// Why, for failed and rolled_back; empty otherwise.
    pub detail: String,
    /// The version serving requests now, if any.
    pub active_version: Option<String>,
    pub at_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelCounters {
    pub model: String,
    pub version: String,
    pub inferences: u64,
    pub errors: u64,
    /// Telemetry records dropped because the writer was behind.
    pub telemetry_dropped: u64,
    /// 95th percentile inference latency since the model was loaded (log-bucket estimate).
    pub latency_p95_us: Option<u32>,
    /// The candidate running in shadow beside it, if any.
    #[serde(default)]
    pub shadow_version: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Heartbeat {
    pub at_ms: u64,
    pub uptime_secs: u64,
    pub health: Health,
    pub models: Vec<ModelCounters>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DriftSummary {
    pub model: String,
    pub version: String,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    /// What the window saw, in the layout of the version's reference profile; the server runs
    /// the statistical tests.
    pub sketch: WindowSketch,
    /// How a candidate in shadow compared with this version over the same window.
    #[serde(default)]
    pub shadow: Option<crate::shadow::ShadowSummary>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DesiredChanged {
    pub revision: u64,
}

// ---- HTTP JSON bodies ----

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// The device's ed25519 public key (hex), made on the device: it signs every report.
    #[serde(default)]
    pub public_key: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    pub device_id: String,
    /// Bearer credential for the device API; shown once, stored hashed on the server.
    pub credential: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CheckinRequest {
    pub models: Vec<UpdateStatus>,
}

/// The reply to publishing a root of trust.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RootInfo {
    pub version: u64,
    pub expires: u64,
}

/// What the server wants on a device: one entry per model name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredState {
    pub revision: u64,
    pub models: Vec<DesiredModel>,
    /// The newest root of trust the server holds (ADR 0010); a device with an older one fetches
    /// each version after its own from `/api/v1/roots/{version}` and rotates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_version: Option<u64>,
    /// Signed by the root's timestamp key: for which device, how new, until when (ADR 0010).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<crate::freshness::SignedFreshness>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredModel {
    pub name: String,
    pub version: String,
    /// Path under the server URL, e.g. `/api/v1/bundles/tabular/1.0.0`.
    pub bundle_path: String,
    pub bundle_sha256: String,
    pub bundle_size: u64,
    /// Raised by the server to make a device retry a version that failed on it.
    #[serde(default)]
    pub attempt: u32,
    /// A candidate to run in shadow beside this version (a rollout's shadow wave).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<DesiredShadow>,
    /// Activate only inside this daily window of the device's local time (ADR 0012); download
    /// and verify at once. Absent: activate at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_window: Option<crate::window::ActivationWindow>,
}

/// A candidate the device installs and verifies like any version, but runs only on a sample
/// of live requests, off the hot path, comparing its outputs with the active version's.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredShadow {
    pub version: String,
    pub bundle_path: String,
    pub bundle_sha256: String,
    pub bundle_size: u64,
    /// Share of requests copied to the shadow, in (0, 1].
    pub sample_rate: f32,
}

impl DesiredShadow {
    /// The shadow as a desired model of its own, to download, verify and stage.
    pub fn as_model(&self, name: &str, attempt: u32) -> DesiredModel {
        DesiredModel {
            name: name.to_string(),
            version: self.version.clone(),
            bundle_path: self.bundle_path.clone(),
            bundle_sha256: self.bundle_sha256.clone(),
            bundle_size: self.bundle_size,
            attempt,
            shadow: None,
            activation_window: None,
        }
    }
}

pub fn bundle_path(model: &str, version: &str) -> String {
    format!("/api/v1/bundles/{model}/{version}")
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BundleInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub created_at: u64,
    pub signed_by: String,
    pub lineage: crate::bundle::Lineage,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub model: String,
    pub version: String,
    /// Device ids, a list fixed now. Absent: every device matching `selector`, now and later.
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// Labels a device must have (all devices when absent or empty). The version becomes the
    /// default of the devices it selects: one enrolled or relabelled later gets it too, unless
    /// it was already told to run a version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeployResponse {
    pub devices: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceModelView {
    pub name: String,
    pub desired_version: Option<String>,
    pub active_version: Option<String>,
    pub step: Option<UpdateStep>,
    /// The version `step` is about.
    #[serde(default)]
    pub step_version: Option<String>,
    pub detail: String,
    pub inferences: u64,
    /// Drift windows the server holds for this device and model (those within retention).
    pub drift_summaries: u64,
    pub drift_score: Option<f64>,
    pub mean_confidence: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceView {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub enrolled_ms: u64,
    pub last_seen_ms: Option<u64>,
    pub health: Option<Health>,
    pub models: Vec<DeviceModelView>,
    /// When an admin revoked the device; it can no longer check in, download or report.
    #[serde(default)]
    pub revoked_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    #[serde(default = "one")]
    pub count: u32,
    /// Hours until the tokens expire; the server's default (7 days) when absent.
    #[serde(default)]
    pub valid_hours: Option<u32>,
}

/// Revokes enrollment tokens not yet used: the token itself (the operator holds it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenRevokeRequest {
    pub token: String,
}

/// What an operator may do. Each role includes the ones below it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads fleet state: devices, rollouts, audit, delivery, telemetry.
    Viewer,
    /// Also changes it: publishes bundles, deploys, runs rollouts, labels devices, makes tokens.
    Operator,
    /// Also manages identities: operators, device and token revocation.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!("role {other:?} is not one of viewer, operator, admin")),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OperatorRequest {
    pub name: String,
    pub role: Role,
}

/// A new operator and its token, shown once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OperatorCreated {
    pub name: String,
    pub role: Role,
    pub token: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OperatorView {
    pub name: String,
    pub role: Role,
    pub created_ms: u64,
    pub revoked_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenResponse {
    pub tokens: Vec<String>,
}

/// One line of the audit log: who did what, when, and why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    pub at_ms: u64,
    pub actor: String,
    pub rollout: Option<String>,
    pub action: AuditAction,
    pub detail: String,
}

/// What an audit line records; stored and sent as its snake_case name.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    /// A rollout was created from a plan.
    Created,
    Pause,
    Resume,
    Abort,
    Promote,
    Retry,
    DeviceFailed,
    DeviceTimedOut,
    WaveSoaking,
    WaveStarted,
    Completed,
    Halted,
    RolledBack,
    /// An operator replaced a device's labels.
    Labels,
    /// An operator set a model version on devices directly (`fleetctl deploy`).
    Deploy,
    /// An admin revoked a device.
    DeviceRevoked,
    /// An admin added or revoked an operator.
    OperatorAdded,
    OperatorRevoked,
    /// An operator revoked an unused enrollment token.
    TokenRevoked,
    /// An admin published a root of trust (the first, or a rotation).
    RootPublished,
    /// Drift persisted long enough that the server asked for a retraining (`proto::events`).
    RetrainRequested,
    /// A shadow wave's candidate agreed enough with the active version: it is being activated.
    ShadowPassed,
    /// A device came to match an active rollout's selector and joined it.
    Joined,
    /// A version became the default for devices that match a selector and have none yet
    /// (a completed rollout, or a deployment to a selector).
    CohortDefault,
}

impl AuditAction {
    const ALL: [AuditAction; 24] = [
        AuditAction::Created,
        AuditAction::Pause,
        AuditAction::Resume,
        AuditAction::Abort,
        AuditAction::Promote,
        AuditAction::Retry,
        AuditAction::DeviceFailed,
        AuditAction::DeviceTimedOut,
        AuditAction::WaveSoaking,
        AuditAction::WaveStarted,
        AuditAction::Completed,
        AuditAction::Halted,
        AuditAction::RolledBack,
        AuditAction::Labels,
        AuditAction::Deploy,
        AuditAction::DeviceRevoked,
        AuditAction::OperatorAdded,
        AuditAction::OperatorRevoked,
        AuditAction::TokenRevoked,
        AuditAction::RootPublished,
        AuditAction::RetrainRequested,
        AuditAction::ShadowPassed,
        AuditAction::Joined,
        AuditAction::CohortDefault,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Created => "created",
            AuditAction::Pause => "pause",
            AuditAction::Resume => "resume",
            AuditAction::Abort => "abort",
            AuditAction::Promote => "promote",
            AuditAction::Retry => "retry",
            AuditAction::DeviceFailed => "device_failed",
            AuditAction::DeviceTimedOut => "device_timed_out",
            AuditAction::WaveSoaking => "wave_soaking",
            AuditAction::WaveStarted => "wave_started",
            AuditAction::Completed => "completed",
            AuditAction::Halted => "halted",
            AuditAction::RolledBack => "rolled_back",
            AuditAction::Labels => "labels",
            AuditAction::Deploy => "deploy",
            AuditAction::DeviceRevoked => "device_revoked",
            AuditAction::OperatorAdded => "operator_added",
            AuditAction::OperatorRevoked => "operator_revoked",
            AuditAction::TokenRevoked => "token_revoked",
            AuditAction::RootPublished => "root_published",
            AuditAction::RetrainRequested => "retrain_requested",
            AuditAction::ShadowPassed => "shadow_passed",
            AuditAction::Joined => "joined",
            AuditAction::CohortDefault => "cohort_default",
        }
    }

    pub fn parse(text: &str) -> Option<AuditAction> {
        AuditAction::ALL.into_iter().find(|a| a.as_str() == text)
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topic_round_trips_and_foreign_topics_are_unknown() {
        let device = "d-1".to_string();
        let model = "tabular".to_string();
        for topic in [
            Topic::Heartbeat { device: device.clone() },
            Topic::Status { device: device.clone(), model: model.clone() },
            Topic::Drift { device: device.clone(), model },
            Topic::Desired { device: device.clone() },
            Topic::Events { device: device.clone() },
            Topic::Ack { device },
        ] {
            assert_eq!(Topic::parse(&topic.render()), Some(topic));
        }
        for foreign in [
            "fleet/v1/devices/d/unknown",
            "other/d/heartbeat",
            "fleet/v1/devices/D!/heartbeat",
            "fleet/v1/devices/d/models/../drift",
        ] {
            assert_eq!(Topic::parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn payloads_round_trip_and_garbage_is_a_decode_error() {
        let status = UpdateStatus {
            model: "tabular".into(),
            version: "1.0.0".into(),
            step: UpdateStep::Failed,
            detail: "bad signature".into(),
            active_version: Some("0.9.0".into()),
            at_ms: 7,
        };
        assert_eq!(decode::<UpdateStatus>("status", &encode(&status)).unwrap(), status);
        let err = decode::<UpdateStatus>("status", &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.to_string().starts_with("payload does not decode as status"), "{err}");
        assert!(matches!(
            decode::<Heartbeat>("heartbeat", &vec![0; MAX_MQTT_PAYLOAD + 1]),
            Err(PayloadError::TooLarge { .. })
        ));
    }

    #[test]
    fn update_steps_parse_from_their_names() {
        for step in [UpdateStep::Downloading, UpdateStep::SelfTest, UpdateStep::RolledBack] {
            assert_eq!(UpdateStep::parse(step.as_str()), Some(step));
        }
        assert_eq!(UpdateStep::parse("nope"), None);
    }
}

#[cfg(test)]
mod audit_action_tests {
    use super::AuditAction;

    #[test]
    fn every_audit_action_round_trips_through_its_stored_name_and_json() {
        for action in AuditAction::ALL {
            assert_eq!(AuditAction::parse(action.as_str()), Some(action));
            assert_eq!(serde_json::to_string(&action).unwrap(), format!("\"{}\"", action.as_str()));
        }
        assert_eq!(AuditAction::parse("exploded"), None);
    }
}
