//! Events the server sends to the systems around the fleet (not to devices): a retraining
//! request when a model's drift persists in a cohort. The same JSON goes to the MQTT topic
//! [`RETRAIN_TOPIC`] and to the configured webhook.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bundle::Lineage;

/// Outside the device tree, so no device's ACL reaches it; the server's account publishes.
pub const RETRAIN_TOPIC: &str = "fleet/v1/events/retrain";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DriftedFeature {
    pub name: String,
    pub test: String,
    pub score: f64,
    pub threshold: f64,
}

/// "Model M version V has drifted in cohort C for K windows in a row."
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RetrainEvent {
    /// Stable for one episode of drift: the same episode never produces a second event.
    pub id: String,
    pub model: String,
    pub version: String,
    /// The label selector of the cohort; empty for the whole fleet.
    pub cohort: BTreeMap<String, String>,
    /// The drifted windows: how many, and the span they cover (unix ms).
    pub windows: u32,
    pub window_secs: u64,
    pub since_ms: u64,
    pub until_ms: u64,
    /// Share of features drifted in the latest window.
    pub drift_share: f64,
    pub drifted_features: Vec<DriftedFeature>,
    /// From the signed manifest of that version.
    pub lineage: Lineage,
    /// The command that exports the rows those windows describe.
    pub telemetry_export: String,
}
