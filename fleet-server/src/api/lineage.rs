//! Lineage you can query: `GET /api/v1/models` (every published version with the lineage its
//! signed manifest carries) and `GET /api/v1/devices/{id}` (per model: active and previous
//! version, bundle digest, lineage, what installed it and when, recent steps; the device's
//! audit lines). Viewer role.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use proto::lineage::{activated_ms, previous_version, DeviceDetail, DeviceModelDetail, ModelVersionView, StatusEntry};
use proto::wire::{AuditEntry, DeviceView, ErrorBody, Role};

use super::{blocking, ApiError, AppState};
use crate::rollout::{MemberStatus, Rollout};
use crate::store::BundleRecord;

/// Audit lines shown on a device's page.
const DEVICE_AUDIT_LINES: usize = 100;

#[utoipa::path(
    get,
    path = "/api/v1/models",
    tag = "lineage",
    responses(
        (status = 200, description = "Every published version with its signed lineage", body = Vec<ModelVersionView>),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<ModelVersionView>>, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    let bundles = blocking(&state, |s| s.bundles()).await?;
    Ok(Json(bundles.iter().filter_map(model_version).collect()))
}

/// A published bundle as the API shows it; a manifest that no longer parses is left out.
pub fn model_version(record: &BundleRecord) -> Option<ModelVersionView> {
    let manifest = proto::Manifest::parse(&record.manifest_json).ok()?;
    Some(ModelVersionView {
        name: record.name.clone(),
        version: record.version.clone(),
        sha256: record.sha256.clone(),
        size: record.size,
        created_at: record.created_at,
        signed_by: record.signed_by.clone(),
        lineage: manifest.lineage,
        floor: manifest.floor.map(|f| f.to_string()),
    })
}

#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    tag = "lineage",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The device, per model its versions, lineage and steps, and its audit lines", body = DeviceDetail),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn device(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    let lookup = id.clone();
    let gathered = blocking(&state, move |s| {
        let Some(device) = s.list_devices()?.into_iter().find(|d| d.id == lookup) else { return Ok(None) };
        let mut histories = BTreeMap::new();
        let mut bundles = BTreeMap::new();
        for model in &device.models {
            histories.insert(model.name.clone(), s.status_history(&device.id, &model.name)?);
            if let Some(active) = &model.active_version {
                if let Some(record) = s.bundle(&model.name, active)? {
                    bundles.insert(model.name.clone(), record);
                }
            }
        }
        let audit = s.audit_for_device(&device.id, DEVICE_AUDIT_LINES)?;
        Ok(Some((device, histories, bundles, s.rollouts()?, audit)))
    })
    .await?;
    let (device, histories, bundles, rollouts, audit) =
        gathered.ok_or_else(|| ApiError::NotFound(format!("no device {id}")))?;
    Ok(Json(device_detail(device, histories, &bundles, &rollouts, audit)))
}

/// Puts a device's page together from what the store holds. Pure.
pub fn device_detail(
    device: DeviceView,
    mut histories: BTreeMap<String, Vec<StatusEntry>>,
    bundles: &BTreeMap<String, BundleRecord>,
    rollouts: &[Rollout],
    audit: Vec<AuditEntry>,
) -> DeviceDetail {
    let models = device
        .models
        .iter()
        .map(|m| {
            let history = histories.remove(&m.name).unwrap_or_default();
            let active = m.active_version.as_deref();
            let bundle = bundles.get(&m.name).and_then(model_version);
            let installed_ms = active.and_then(|v| activated_ms(&history, v));
            DeviceModelDetail {
                name: m.name.clone(),
                active_version: m.active_version.clone(),
                previous_version: previous_version(&history, active),
                bundle_sha256: bundle.as_ref().map(|b| b.sha256.clone()),
                lineage: bundle.map(|b| b.lineage),
                installed_by: active.and_then(|v| installed_by(rollouts, &device.id, &m.name, v, installed_ms)),
                installed_ms,
                history,
            }
        })
        .collect();
    DeviceDetail { device, models, audit }
}

/// The newest rollout that made `version` of `model` active on the device, or "deployment"
/// when the version went active without one.
fn installed_by(
    rollouts: &[Rollout],
    device: &str,
    model: &str,
    version: &str,
    installed_ms: Option<u64>,
) -> Option<String> {
    let by_rollout = rollouts.iter().find(|r| {
        r.plan.model == model
            && r.plan.version == version
            && r.members.get(device).is_some_and(|m| m.status == MemberStatus::Active)
    });
    match by_rollout {
        Some(r) => Some(r.id.clone()),
        None => installed_ms.map(|_| "deployment".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use proto::wire::{DeviceModelView, UpdateStep};

    use super::*;

    fn view(active: &str) -> DeviceView {
        DeviceView {
            id: "dev-1".into(),
            name: "edge".into(),
            labels: Default::default(),
            enrolled_ms: 0,
            last_seen_ms: None,
            health: None,
            models: vec![DeviceModelView {
                name: "tabular".into(),
                desired_version: Some(active.into()),
                active_version: Some(active.into()),
                step: Some(UpdateStep::Active),
                step_version: Some(active.into()),
                detail: String::new(),
                inferences: 0,
                drift_summaries: 0,
                drift_score: None,
                mean_confidence: None,
            }],
            revoked_ms: None,
        }
    }

    fn history() -> BTreeMap<String, Vec<StatusEntry>> {
        let e =
            |version: &str, step, at_ms| StatusEntry { version: version.into(), step, detail: String::new(), at_ms };
        [("tabular".to_string(), vec![e("2.0.0", UpdateStep::Active, 20), e("1.0.0", UpdateStep::Active, 10)])].into()
    }

    #[test]
    fn a_device_page_names_the_previous_version_and_a_plain_deployment() {
        let detail = device_detail(view("2.0.0"), history(), &BTreeMap::new(), &[], Vec::new());
        let m = &detail.models[0];
        assert_eq!(m.previous_version.as_deref(), Some("1.0.0"));
        assert_eq!((m.installed_by.as_deref(), m.installed_ms), (Some("deployment"), Some(20)));
        assert_eq!((m.bundle_sha256.as_ref(), m.history.len()), (None, 2));
    }

    #[test]
    fn a_version_a_rollout_made_active_names_that_rollout() {
        let plan: proto::rollout::RolloutPlan =
            toml::from_str("model = \"tabular\"\nversion = \"2.0.0\"\nholdout = 0.0\nwaves = [{percent = 100.0}]")
                .unwrap();
        let devices = [crate::rollout::DeviceInfo {
            id: "dev-1".into(),
            active_version: Some("1.0.0".into()),
            ..Default::default()
        }];
        let mut rollout = crate::rollout::create::create("ro-1", plan, &devices, &Default::default(), 0).unwrap();
        rollout.members.get_mut("dev-1").unwrap().status = MemberStatus::Active;
        let detail = device_detail(view("2.0.0"), history(), &BTreeMap::new(), &[rollout], Vec::new());
        assert_eq!(detail.models[0].installed_by.as_deref(), Some("ro-1"));
    }
}
