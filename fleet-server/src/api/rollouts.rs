//! Rollout endpoints: create from a plan, list, show, operator actions, and the audit log.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use proto::rollout::RolloutPlan;
use proto::wire::{AuditEntry, ErrorBody};
use serde::{Deserialize, Serialize};

use proto::wire::Role;

use super::{blocking, ApiError, AppState};
use crate::rollout::create::{OperatorAction, RolloutError};
use crate::rollout::driver::DriverError;
use crate::rollout::{MemberStatus, Rollout};

/// A rollout with counts per member status, as the API and fleetctl show it.
#[derive(Serialize, Deserialize, Clone, Debug, utoipa::ToSchema)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    pub summary: Summary,
    /// For a running or paused rollout fetched alone: what its model gates read now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<crate::rollout::decide::LiveGates>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, utoipa::ToSchema)]
pub struct Summary {
    pub eligible: usize,
    pub holdout: usize,
    pub wave_target: usize,
    pub waiting: usize,
    pub assigned: usize,
    /// Running the candidate in shadow (shadow waves).
    #[serde(default)]
    pub shadowing: usize,
    /// Downloaded and verified, waiting for the plan's activation window.
    #[serde(default)]
    pub staged: usize,
    pub active: usize,
    pub failed: usize,
    pub reverted: usize,
}

impl From<Rollout> for RolloutView {
    fn from(rollout: Rollout) -> Self {
        let mut s = Summary {
            eligible: rollout.order.len(),
            wave_target: rollout.plan.wave_target(rollout.wave, rollout.order.len()),
            ..Summary::default()
        };
        for m in rollout.members.values() {
            if m.holdout {
                s.holdout += 1;
                continue;
            }
            match m.status {
                MemberStatus::Waiting => s.waiting += 1,
                MemberStatus::Assigned | MemberStatus::ShadowAssigned => s.assigned += 1,
                MemberStatus::Shadowing => s.shadowing += 1,
                MemberStatus::Staged => s.staged += 1,
                MemberStatus::Active => s.active += 1,
                MemberStatus::Failed(_) | MemberStatus::TimedOut => s.failed += 1,
                MemberStatus::Reverted => s.reverted += 1,
            }
        }
        RolloutView { rollout, summary: s, live: None }
    }
}

impl From<DriverError> for ApiError {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DriverError::Rollout(
                RolloutError::Overlap { .. } | RolloutError::WrongPhase { .. } | RolloutError::NotSoaking { .. },
            ) => ApiError::Conflict(e.to_string()),
            DriverError::Rollout(_) => ApiError::BadRequest(e.to_string()),
            DriverError::Store(s) => s.into(),
            DriverError::Stopped => ApiError::Internal(e.to_string()),
        }
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/rollouts",
    tag = "rollouts",
    request_body = RolloutPlan,
    responses(
        (status = 200, description = "The rollout, started", body = RolloutView),
        (status = 400, description = "The plan is invalid (the field to fix is named)", body = ErrorBody),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below operator", body = ErrorBody),
        (status = 404, description = "The plan's bundle is not published", body = ErrorBody),
        (status = 409, description = "Another active rollout holds some of the cohort's devices", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<RolloutPlan>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let who = state.require(&headers, Role::Operator).await?;
    let Json(plan) = body.map_err(|e| ApiError::BadRequest(format!("rollout plan is invalid: {}", e.body_text())))?;
    let (model, version) = (plan.model.clone(), plan.version.clone());
    if blocking(&state, move |s| s.bundle(&model, &version)).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "no bundle {} {} is published; run `fleetctl publish` first",
            plan.model, plan.version
        )));
    }
    Ok(Json(state.rollouts.create(plan, who.name).await?.into()))
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts",
    tag = "rollouts",
    responses(
        (status = 200, description = "Every rollout with its counts", body = Vec<RolloutView>),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Vec<RolloutView>>, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    let rollouts = blocking(&state, |s| s.rollouts()).await?;
    Ok(Json(rollouts.into_iter().map(RolloutView::from).collect()))
}

#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{id}",
    tag = "rollouts",
    params(("id" = String, Path, description = "Rollout id")),
    responses(
        (status = 200, description = "The rollout, with its live gate readings while running or paused", body = RolloutView),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    let lookup = id.clone();
    let rollout =
        blocking(&state, move |s| s.rollout(&lookup)).await?.ok_or(ApiError::NotFound(format!("no rollout {id}")))?;
    let live = if !rollout.phase.is_active() {
        None
    } else if let Some(live) = state.rollouts.live_gates(&rollout.id, rollout.revision) {
        // The driver's last tick, from the windows it keeps merged: no read of every window.
        Some(live)
    } else {
        // Paused, or driven by another server: read every window since the rollout began.
        let (model, since) = (rollout.plan.model.clone(), rollout.created_ms);
        let (rows, references) =
            blocking(&state, move |s| crate::rollout::driver::observation_inputs(s, &model, since)).await?;
        let observations = crate::rollout::observe(&rows, &references);
        Some(crate::rollout::decide::live_gates(&rollout, &observations, crate::unix_ms()))
    };
    Ok(Json(RolloutView { live, ..rollout.into() }))
}

#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{id}/{action}",
    tag = "rollouts",
    params(
        ("id" = String, Path, description = "Rollout id"),
        ("action" = String, Path, description = "pause, resume, abort, promote or retry"),
    ),
    responses(
        (status = 200, description = "The rollout after the action", body = RolloutView),
        (status = 400, description = "Unknown action", body = ErrorBody),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below operator", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
        (status = 409, description = "The action does not apply in the rollout's phase", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn act(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<RolloutView>, ApiError> {
    let who = state.require(&headers, Role::Operator).await?;
    let action = OperatorAction::parse(&action).ok_or_else(|| {
        ApiError::BadRequest(format!("unknown action {action:?}; use pause, resume, abort, promote or retry"))
    })?;
    Ok(Json(state.rollouts.operate(id, action, who.name).await?.into()))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    rollout: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    500
}

#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "rollouts",
    params(AuditQuery),
    responses(
        (status = 200, description = "Audit lines, newest first", body = Vec<AuditEntry>),
        (status = 400, description = "The query string does not parse (plain text)", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    let limit = query.limit.clamp(1, 10_000);
    Ok(Json(blocking(&state, move |s| s.audit(query.rollout.as_deref(), limit)).await?))
}
