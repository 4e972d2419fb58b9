//! Device endpoints: enrollment, check-in (desired state), bundle download with Range.

use axum::extract::{Path, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::names;
use proto::wire::{CheckinRequest, DesiredState, EnrollRequest, EnrollResponse, Role};
use tower::ServiceExt;

use super::{blocking, sha256_hex, ApiError, AppState};
use crate::store::{EnrollRefusal, NewDevice};

/// How long after a token's use a retry with it still succeeds (the first reply was lost).
const ENROLL_RETRY_GRACE_MS: u64 = 10 * 60 * 1000;

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
    let enrolled = blocking(&state.store, move |s| s.enroll(&token_hash, &device, ENROLL_RETRY_GRACE_MS)).await?;
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
    let desired = blocking(&state.store, move |s| {
        s.touch(&device, now)?;
        for status in &request.models {
            if names::validate("model name", &status.model).is_ok() {
                s.record_status(&device, status)?;
            }
        }
        let mut desired = s.desired_state(&device)?;
        if let Some(timestamp) = &timestamp {
            let counter = s.next_freshness_counter(&device)?;
            let lifetime = timestamp.lifetime.as_secs();
            proto::freshness::seal(&mut desired, &timestamp.key, &device, counter, now / 1000, lifetime);
        }
        Ok(desired)
    })
    .await?;
    Ok(Json(desired))
}

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
        let desired = blocking(&state.store, move |s| s.desired_state(&device)).await?;
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
    if blocking(&state.store, move |s| s.bundle(&n, &v)).await?.is_none() {
        return Err(ApiError::NotFound(format!("no bundle {name} {version} is published")));
    }
    let path = crate::server::bundle_file(&state.bundle_dir, &name, &version);
    let response = tower_http::services::ServeFile::new(path)
        .oneshot(request)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(response.map(axum::body::Body::new).into_response())
}
