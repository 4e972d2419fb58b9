//! What the API says about where a model came from and how it reached a device: every
//! published version with the lineage its signed manifest carries, and per device and model the
//! active and previous versions, what installed the active one and when, and recent steps.

use serde::{Deserialize, Serialize};

use crate::bundle::Lineage;
use crate::wire::{AuditEntry, DeviceView, UpdateStep};

/// Steps kept per device and model on the server (older ones are dropped).
pub const MAX_HISTORY: usize = 50;

/// One published version of a model (`GET /api/v1/models`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelVersionView {
    pub name: String,
    pub version: String,
    /// sha256 of the whole bundle file.
    pub sha256: String,
    pub size: u64,
    /// Unix seconds, from the signed manifest.
    pub created_at: u64,
    /// Key id of the signature the server checked at publish.
    pub signed_by: String,
    pub lineage: Lineage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<String>,
}

/// One update step a device reported.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusEntry {
    pub version: String,
    pub step: UpdateStep,
    pub detail: String,
    pub at_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceModelDetail {
    pub name: String,
    pub active_version: Option<String>,
    /// The version active before the current one (what a rollback returns to).
    pub previous_version: Option<String>,
    pub bundle_sha256: Option<String>,
    pub lineage: Option<Lineage>,
    /// The rollout that put the active version there, or "deployment" for a plain deploy.
    pub installed_by: Option<String>,
    /// When the device reported the active version active.
    pub installed_ms: Option<u64>,
    /// Newest first, at most [`MAX_HISTORY`].
    pub history: Vec<StatusEntry>,
}

/// `GET /api/v1/devices/{id}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceDetail {
    pub device: DeviceView,
    pub models: Vec<DeviceModelDetail>,
    /// Audit entries that name the device, newest first.
    pub audit: Vec<AuditEntry>,
}

/// The version active before `active`, from a history newest first.
pub fn previous_version(history: &[StatusEntry], active: Option<&str>) -> Option<String> {
    history
        .iter()
        .filter(|e| e.step == UpdateStep::Active && Some(e.version.as_str()) != active)
        .map(|e| e.version.clone())
        .next()
}

/// When `active` last became active, from a history newest first.
pub fn activated_ms(history: &[StatusEntry], active: &str) -> Option<u64> {
    history.iter().find(|e| e.step == UpdateStep::Active && e.version == active).map(|e| e.at_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: &str, step: UpdateStep, at_ms: u64) -> StatusEntry {
        StatusEntry { version: version.into(), step, detail: String::new(), at_ms }
    }

    #[test]
    fn the_previous_version_is_the_last_other_one_that_was_active() {
        let history = [
            entry("2.0.0", UpdateStep::Active, 30),
            entry("2.0.0", UpdateStep::Verifying, 20),
            entry("1.1.0", UpdateStep::Failed, 15),
            entry("1.0.0", UpdateStep::Active, 10),
        ];
        assert_eq!(previous_version(&history, Some("2.0.0")).as_deref(), Some("1.0.0"));
        assert_eq!(activated_ms(&history, "2.0.0"), Some(30));
        assert_eq!(previous_version(&history[..1], Some("2.0.0")), None);
    }
}
