//! Device endpoints: enrollment, check-in (desired state), bundle download with Range.

use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::names;
use proto::wire::{CheckinRequest, DesiredState, EnrollRequest, EnrollResponse, ErrorBody, Role};
use tower::ServiceExt;

use super::{blocking, sha256_hex, ApiError, AppState};
use crate::store::{EnrollRefusal, NewDevice};

/// How long after a token's use a retry with it still succeeds (the first reply was lost).
const ENROLL_RETRY_GRACE_MS: u64 = 10 * 60 * 1000;

#[utoipa::path(
    post,
    path = "/api/v1/enroll",
    tag = "devices",
    request_body = EnrollRequest,
    responses(
        (status = 200, description = "Enrolled: the device id and its bearer credential (shown once)", body = EnrollResponse),
        (status = 400, description = "Body is not an enrollment request, a label is out of bounds, or the public key is not 64 hex characters", body = ErrorBody),
        (status = 403, description = "Enrollment token unknown, used, expired or revoked", body = ErrorBody),
    )
)]
pub async fn enroll(
    State(state): State<AppState>,
    body: Result<Json<EnrollRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let Json(request) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "enrollment body must be {{\"token\": ..., \"public_key\": ..., \"name\": ..., \"labels\": {{...}}}}: {}",
            e.body_text()
        ))
    })?;
    super::validate_labels(&request.labels)?;
    proto::keys::parse_public_key(&request.public_key).map_err(|_| {
        ApiError::BadRequest(
            "enrollment needs the device's ed25519 public key as 64 hex characters in \"public_key\"; upgrade the agent"
                .into(),
        )
    })?;
    let token_hash = sha256_hex(&request.token);
    let now = crate::unix_ms();
    let new_id = format!("dev-{}", hex::encode(rand::random::<[u8; 6]>()));
    let credential = hex::encode(rand::random::<[u8; 32]>());
    let device = NewDevice {
        id: new_id.clone(),
        name: if request.name.is_empty() { new_id.clone() } else { request.name.clone() },
        labels: request.labels,
        credential_hash: sha256_hex(&credential),
        enrolled_ms: now,
        public_key: request.public_key.trim().to_ascii_lowercase(),
        broker_hash: crate::broker::mosquitto::new_password_hash(&credential),
    };
    let enrolled = blocking(&state, move |s| s.enroll(&token_hash, &device, ENROLL_RETRY_GRACE_MS)).await?;
    let device_id = enrolled.map_err(|refusal| {
        ApiError::Forbidden(
            match refusal {
                EnrollRefusal::UnknownOrUsed => "enrollment token is unknown or already used",
                EnrollRefusal::Expired => "enrollment token has expired",
                EnrollRefusal::Revoked => "enrollment token (or the device it enrolled) was revoked",
            }
            .to_string()
                + "; create a new one with `fleetctl tokens create`",
        )
    })?;
    if let Some(sync) = &state.broker_passwords {
        // The device connects to the broker next: its password is there before the reply.
        sync.sync().await;
    }
    tracing::info!(device = %device_id, "device enrolled");
    Ok(Json(EnrollResponse { device_id, credential }))
}

#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/checkin",
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    request_body = CheckinRequest,
    responses(
        (status = 200, description = "The device's desired state, signed for freshness when the server has a timestamp key", body = DesiredState),
        (status = 400, description = "Body is not a check-in", body = ErrorBody),
        (status = 401, description = "Missing or unknown device credential", body = ErrorBody),
        (status = 403, description = "The credential belongs to another device", body = ErrorBody),
    ),
    security(("device_credential" = []))
)]
pub async fn checkin(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<CheckinRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<DesiredState>, ApiError> {
    let device = state.require_device(&headers).await?;
    if device != id {
        return Err(ApiError::Forbidden(format!("this credential belongs to device {device}, not {id}")));
    }
    let Json(request) =
        body.map_err(|e| ApiError::BadRequest(format!("check-in body is invalid: {}", e.body_text())))?;
    let now = crate::unix_ms();
    let timestamp = state.timestamp.clone();
    let statuses: Vec<_> =
        request.models.into_iter().filter(|status| names::validate("model name", &status.model).is_ok()).collect();
    let desired = blocking(&state, move |s| {
        let (mut desired, counter) = s.check_in(&device, now, &statuses, timestamp.is_some())?;
        if let (Some(timestamp), Some(counter)) = (&timestamp, counter) {
            let lifetime = timestamp.lifetime.as_secs();
            proto::freshness::seal(&mut desired, &timestamp.key, &device, counter, now / 1000, lifetime);
        }
        Ok(desired)
    })
    .await?;
    Ok(Json(desired))
}

#[utoipa::path(
    get,
    path = "/api/v1/bundles/{name}/{version}",
    tag = "devices",
    params(
        ("name" = String, Path, description = "Model name"),
        ("version" = String, Path, description = "Semantic version"),
        ("Range" = Option<String>, Header, description = "A byte range, to resume a download"),
    ),
    responses(
        (status = 200, description = "The bundle: a tar archive of the signed manifest, its signatures and the model files", body = [u8], content_type = "application/octet-stream"),
        (status = 206, description = "The requested byte range of the bundle", body = [u8], content_type = "application/octet-stream"),
        (status = 400, description = "Model name or version is malformed", body = ErrorBody),
        (status = 401, description = "Neither a device credential nor an operator token", body = ErrorBody),
        (status = 403, description = "The bundle is not in this device's desired state", body = ErrorBody),
        (status = 404, description = "No such bundle is published", body = ErrorBody),
        (status = 416, description = "The range lies outside the bundle"),
    ),
    security(("device_credential" = []), ("operator_token" = []))
)]
pub async fn download(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    names::validate("model name", &name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    semver::Version::parse(&version)
        .map_err(|_| ApiError::BadRequest(format!("version {version:?} is not a semantic version")))?;
    // A device downloads only what its desired state names (a version, or a candidate to run in
    // shadow); an operator any published bundle.
    if let Ok(device) = state.require_device(&headers).await {
        let desired = blocking(&state, move |s| s.desired_state(&device)).await?;
        let named = |m: &proto::wire::DesiredModel| {
            m.name == name && (m.version == version || m.shadow.as_ref().is_some_and(|s| s.version == version))
        };
        if !desired.models.iter().any(named) {
            return Err(ApiError::Forbidden(format!("bundle {name} {version} is not in this device's desired state")));
        }
    } else {
        state.require(&headers, Role::Viewer).await?;
    }
    let (n, v) = (name.clone(), version.clone());
    if blocking(&state, move |s| s.bundle(&n, &v)).await?.is_none() {
        return Err(ApiError::NotFound(format!("no bundle {name} {version} is published")));
    }
    let path = crate::server::bundle_file(&state.bundle_dir, &name, &version);
    let response = tower_http::services::ServeFile::new(path)
        .oneshot(request)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(response.map(axum::body::Body::new).into_response())
}
