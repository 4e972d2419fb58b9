//! Admin endpoints for identities: operators (named tokens with a role) and device revocation.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use proto::wire::{AuditAction, ErrorBody, OperatorCreated, OperatorRequest, OperatorView, Role};

use super::openapi::Null;
use super::{audit, blocking, sha256_hex, ApiError, AppState};
use crate::store::OperatorRecord;

/// Name of the operator whose token is made at first start (or given with `--operator-token`).
pub const BOOTSTRAP_ADMIN: &str = "admin";

#[utoipa::path(
    post,
    path = "/api/v1/operators",
    tag = "identity",
    request_body = OperatorRequest,
    responses(
        (status = 200, description = "The new operator and its token, shown once", body = OperatorCreated),
        (status = 400, description = "Body is not an operator request, or the name is invalid", body = ErrorBody),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below admin", body = ErrorBody),
        (status = 409, description = "An operator with this name exists", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn add_operator(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<OperatorRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<OperatorCreated>, ApiError> {
    let who = state.require(&headers, Role::Admin).await?;
    let Json(request) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "body must be {{\"name\": ..., \"role\": \"viewer\"|\"operator\"|\"admin\"}}: {}",
            e.body_text()
        ))
    })?;
    proto::names::validate("operator name", &request.name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let token = hex::encode(rand::random::<[u8; 24]>());
    let record = OperatorRecord {
        name: request.name.clone(),
        role: request.role,
        token_hash: sha256_hex(&token),
        created_ms: crate::unix_ms(),
        revoked_ms: None,
    };
    blocking(&state, move |s| s.put_operator(&record, false)).await?;
    let detail = format!("{} as {}", request.name, request.role.as_str());
    audit(&state, who.name, AuditAction::OperatorAdded, detail).await?;
    Ok(Json(OperatorCreated { name: request.name, role: request.role, token }))
}

#[utoipa::path(
    get,
    path = "/api/v1/operators",
    tag = "identity",
    responses(
        (status = 200, description = "Every operator, revoked ones included", body = Vec<OperatorView>),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below admin", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn list_operators(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Vec<OperatorView>>, ApiError> {
    state.require(&headers, Role::Admin).await?;
    let operators = blocking(&state, |s| s.operators()).await?;
    Ok(Json(
        operators
            .into_iter()
            .map(|o| OperatorView { name: o.name, role: o.role, created_ms: o.created_ms, revoked_ms: o.revoked_ms })
            .collect(),
    ))
}

#[utoipa::path(
    post,
    path = "/api/v1/operators/{name}/revoke",
    tag = "identity",
    params(("name" = String, Path, description = "Operator name")),
    responses(
        (status = 200, description = "Revoked", body = Null),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below admin", body = ErrorBody),
        (status = 404, description = "No active operator has this name", body = ErrorBody),
        (status = 409, description = "An admin cannot revoke its own token", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn revoke_operator(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<()>, ApiError> {
    let who = state.require(&headers, Role::Admin).await?;
    if name == who.name {
        return Err(ApiError::Conflict("an admin cannot revoke its own token; ask another admin".into()));
    }
    let (lookup, now) = (name.clone(), crate::unix_ms());
    if !blocking(&state, move |s| s.revoke_operator(&lookup, now)).await? {
        return Err(ApiError::NotFound(format!("no active operator named {name:?}")));
    }
    audit(&state, who.name, AuditAction::OperatorRevoked, name).await?;
    Ok(Json(()))
}

/// Revokes a device: its credential stops working on the API and the embedded broker, its open
/// MQTT sessions are closed, and its reports are no longer accepted.
#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/revoke",
    tag = "identity",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "Revoked: its credential no longer works and its broker sessions are closed", body = Null),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below admin", body = ErrorBody),
        (status = 404, description = "The device is not enrolled", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn revoke_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<()>, ApiError> {
    let who = state.require(&headers, Role::Admin).await?;
    let (lookup, now) = (id.clone(), crate::unix_ms());
    if !blocking(&state, move |s| s.revoke_device(&lookup, now)).await? {
        return Err(ApiError::NotFound(format!("device {id:?} is not enrolled")));
    }
    state.revocations.device_revoked();
    let closed = state.sessions.as_ref().map_or(0, |sessions| sessions.close(&id));
    if let Some(sync) = &state.broker_passwords {
        // Mosquitto disconnects the device when it reloads the file without it.
        sync.sync().await;
    }
    let closed = closed + kick_from_emqx(&state, &id).await;
    tracing::info!(device = %id, closed_sessions = closed, "device revoked");
    audit(&state, who.name, AuditAction::DeviceRevoked, id).await?;
    Ok(Json(()))
}

/// Disconnects a revoked device from EMQX, when the server has its API. The revocation stands
/// either way (it is stored first): a failure is logged, and EMQX's HTTP authenticator refuses
/// the device when it reconnects.
async fn kick_from_emqx(state: &AppState, device: &str) -> usize {
    let Some(emqx) = &state.emqx else { return 0 };
    match emqx.kick(device).await {
        Ok(kicked) => kicked,
        Err(e) => {
            tracing::warn!(%device, error = %e, "revoked device not disconnected from EMQX; it is refused when it reconnects");
            0
        }
    }
}
