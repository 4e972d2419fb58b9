//! Operator endpoints: publish bundles, list devices, deploy, create enrollment tokens.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use proto::bundle::{read_archive, sha256_hex as bytes_sha256, Limits};
use proto::wire::{
    AuditAction, BundleInfo, DeployRequest, DeployResponse, DeviceView, ErrorBody, Role, TokenRequest, TokenResponse,
    TokenRevokeRequest,
};

use super::openapi::Null;
use super::{blocking, sha256_hex, ApiError, AppState};
use crate::store::BundleRecord;

/// Most tokens created by one request.
const MAX_TOKENS_PER_REQUEST: u32 = 10_000;
/// How long an enrollment token is valid unless the request says otherwise.
const DEFAULT_TOKEN_HOURS: u32 = 7 * 24;
const MAX_TOKEN_HOURS: u32 = 365 * 24;

#[utoipa::path(
    post,
    path = "/api/v1/bundles",
    tag = "operator",
    request_body(
        content = [u8],
        content_type = "application/octet-stream",
        description = "The bundle file as `fleetctl bundle build` writes it: a tar archive, at most the server's --max-bundle-bytes"
    ),
    responses(
        (status = 200, description = "Verified and published", body = BundleInfo),
        (status = 400, description = "The bundle is refused: archive, manifest, digest or signature check failed", body = ErrorBody),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below operator", body = ErrorBody),
        (status = 409, description = "This version is already published with different contents", body = ErrorBody),
        (status = 413, description = "Body larger than the server's bundle limit (plain text, from the body limit)", body = String, content_type = "text/plain"),
    ),
    security(("operator_token" = []))
)]
pub async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<BundleInfo>, ApiError> {
    state.require(&headers, Role::Operator).await?;
    let limits = Limits { max_bundle_bytes: state.max_bundle_bytes as u64, ..Limits::default() };
    let trusted = super::roots::bundle_keys(&state).await?;
    let bytes = body.clone();
    let verified = tokio::task::spawn_blocking(move || {
        read_archive(&bytes, &limits).map_err(proto::VerifyError::from)?.verify(&trusted)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::BadRequest(format!("bundle refused: {e}")))?;
    let manifest = &verified.manifest;
    let record = BundleRecord {
        name: manifest.name.clone(),
        version: manifest.version.to_string(),
        sha256: bytes_sha256(&body),
        size: body.len() as u64,
        created_at: manifest.created_at,
        signed_by: verified.signed_by.to_string(),
        manifest_json: verified.manifest_bytes.clone(),
    };
    let path = crate::server::bundle_file(&state.bundle_dir, &record.name, &record.version);
    write_bundle_file(&path, body.clone()).await?;
    let stored = record.clone();
    blocking(&state, move |s| s.put_bundle(&stored)).await?;
    tracing::info!(model = %record.name, version = %record.version, "bundle published");
    Ok(Json(BundleInfo {
        name: record.name,
        version: record.version,
        sha256: record.sha256,
        size: record.size,
        created_at: record.created_at,
        signed_by: record.signed_by,
        lineage: manifest.lineage.clone(),
    }))
}

/// Writes beside the target and renames, so a download never sees a half-written file. An
/// existing file with the same version is left alone (the store refuses different contents).
async fn write_bundle_file(path: &std::path::Path, bytes: Bytes) -> Result<(), ApiError> {
    if tokio::fs::metadata(path).await.is_ok() {
        let existing =
            tokio::fs::read(path).await.map_err(|e| ApiError::Internal(format!("read {}: {e}", path.display())))?;
        if existing != bytes {
            return Err(ApiError::Conflict(
                "this bundle version is already published with different contents; publish a new version instead"
                    .into(),
            ));
        }
        return Ok(());
    }
    let io = |e: std::io::Error| ApiError::Internal(format!("write {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io)?;
    }
    // Under a temporary name of its own: servers sharing the directory may publish at once.
    let dest = path.to_path_buf();
    tokio::task::spawn_blocking(move || crate::server::write_atomically(&dest, &bytes, 0o644))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(io)
}

#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "operator",
    responses(
        (status = 200, description = "Every enrolled device with its models and health", body = Vec<DeviceView>),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn devices(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Vec<DeviceView>>, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    Ok(Json(blocking(&state, |s| s.list_devices()).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/deployments",
    tag = "operator",
    request_body = DeployRequest,
    responses(
        (status = 200, description = "The devices told to run the version", body = DeployResponse),
        (status = 400, description = "Body is not a deployment, gives both devices and selector, or a selector label is out of bounds", body = ErrorBody),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below operator", body = ErrorBody),
        (status = 404, description = "The bundle is not published, or a listed device is not enrolled", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn deploy(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<DeployRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<DeployResponse>, ApiError> {
    let who = state.require(&headers, Role::Operator).await?;
    let Json(request) = body.map_err(|e| {
        ApiError::BadRequest(format!(
            "deployment body must be {{\"model\", \"version\", \"devices\"? or \"selector\"?}}: {}",
            e.body_text()
        ))
    })?;
    let (model, version) = (request.model.clone(), request.version.clone());
    if blocking(&state, move |s| s.bundle(&model, &version)).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "no bundle {} {} is published; run `fleetctl publish` first",
            request.model, request.version
        )));
    }
    if request.devices.is_some() && request.selector.is_some() {
        return Err(ApiError::BadRequest("give either \"devices\" or \"selector\", not both".into()));
    }
    let Some(wanted) = request.devices.clone() else {
        return deploy_to_selector(&state, who.name, request).await;
    };
    let known = blocking(&state, |s| s.device_ids()).await?;
    if let Some(unknown) = wanted.iter().find(|d| !known.contains(d)) {
        return Err(ApiError::NotFound(format!("device {unknown:?} is not enrolled")));
    }
    let devices = wanted;
    let (targets, model, version) = (devices.clone(), request.model.clone(), request.version.clone());
    let revisions = blocking(&state, move |s| s.set_desired(&targets, &model, &version)).await?;
    state.notifier.desired_changed(revisions);
    tracing::info!(model = %request.model, version = %request.version, devices = devices.len(), "deployment set");
    super::audit(
        &state,
        who.name,
        AuditAction::Deploy,
        format!("{} {} on {} devices", request.model, request.version, devices.len()),
    )
    .await?;
    Ok(Json(DeployResponse { devices }))
}

/// A deployment to a selector: the devices matching it now, and (as the selector's cohort
/// default) the ones that match later with no version of the model yet.
async fn deploy_to_selector(
    state: &AppState,
    actor: String,
    request: DeployRequest,
) -> Result<Json<DeployResponse>, ApiError> {
    let selector = request.selector.unwrap_or_default();
    super::validate_labels(&selector)?;
    let model = request.model.clone();
    let infos = blocking(state, move |s| s.device_infos(&model)).await?;
    let devices: Vec<String> = infos
        .into_iter()
        .filter(|d| !d.revoked && proto::cohort::matches(&selector, &d.labels))
        .map(|d| d.id)
        .collect();
    let now = crate::unix_ms();
    let default = crate::rollout::CohortDefault {
        source: format!("deploy-{}", hex::encode(rand::random::<[u8; 4]>())),
        model: request.model.clone(),
        selector: selector.clone(),
        version: request.version.clone(),
        at_ms: now,
    };
    let audit = proto::wire::AuditEntry {
        at_ms: now,
        actor,
        rollout: None,
        action: AuditAction::Deploy,
        detail: format!(
            "{} {} on {} devices matching {} and on devices that match later ({})",
            request.model,
            request.version,
            devices.len(),
            serde_json::to_string(&selector).unwrap_or_default(),
            default.source
        ),
    };
    let targets = devices.clone();
    let revisions = blocking(state, move |s| s.deploy_to_selector(&default, &targets, &audit)).await?;
    state.notifier.desired_changed(revisions);
    tracing::info!(model = %request.model, version = %request.version, devices = devices.len(), "deployment to a selector set");
    Ok(Json(DeployResponse { devices }))
}

#[utoipa::path(
    post,
    path = "/api/v1/enrollment-tokens",
    tag = "operator",
    request_body = TokenRequest,
    responses(
        (status = 200, description = "New single-use enrollment tokens, shown once", body = TokenResponse),
        (status = 400, description = "Body is not a token request, or count or valid_hours is out of range", body = ErrorBody),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below operator", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<TokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<TokenResponse>, ApiError> {
    state.require(&headers, Role::Operator).await?;
    let Json(request) =
        body.map_err(|e| ApiError::BadRequest(format!("token body must be {{\"count\": n}}: {}", e.body_text())))?;
    if request.count == 0 || request.count > MAX_TOKENS_PER_REQUEST {
        return Err(ApiError::BadRequest(format!("count must be between 1 and {MAX_TOKENS_PER_REQUEST}")));
    }
    let valid_hours = request.valid_hours.unwrap_or(DEFAULT_TOKEN_HOURS);
    if valid_hours == 0 || valid_hours > MAX_TOKEN_HOURS {
        return Err(ApiError::BadRequest(format!("valid_hours must be between 1 and {MAX_TOKEN_HOURS}")));
    }
    let tokens: Vec<String> = (0..request.count).map(|_| hex::encode(rand::random::<[u8; 16]>())).collect();
    let hashes: Vec<String> = tokens.iter().map(|t| sha256_hex(t)).collect();
    let now = crate::unix_ms();
    let expires = now + u64::from(valid_hours) * 3_600_000;
    blocking(&state, move |s| s.create_tokens(&hashes, now, expires)).await?;
    Ok(Json(TokenResponse { tokens }))
}

/// Revokes an enrollment token that has not enrolled a device yet.
#[utoipa::path(
    post,
    path = "/api/v1/enrollment-tokens/revoke",
    tag = "operator",
    request_body = TokenRevokeRequest,
    responses(
        (status = 200, description = "Revoked", body = Null),
        (status = 400, description = "Body is not {\"token\": ...}", body = ErrorBody),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below operator", body = ErrorBody),
        (status = 404, description = "No unused, unrevoked enrollment token matches", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn revoke_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<TokenRevokeRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<()>, ApiError> {
    let who = state.require(&headers, Role::Operator).await?;
    let Json(request) =
        body.map_err(|e| ApiError::BadRequest(format!("body must be {{\"token\": ...}}: {}", e.body_text())))?;
    let hash = sha256_hex(&request.token);
    let now = crate::unix_ms();
    if !blocking(&state, move |s| s.revoke_token(&hash, now)).await? {
        return Err(ApiError::NotFound("no unused, unrevoked enrollment token matches".into()));
    }
    super::audit(
        &state,
        who.name,
        AuditAction::TokenRevoked,
        format!("token {}…", request.token.chars().take(6).collect::<String>()),
    )
    .await?;
    Ok(Json(()))
}

/// Replaces a device's labels (cohort membership for future rollouts) and audits the change.
#[utoipa::path(
    put,
    path = "/api/v1/devices/{id}/labels",
    tag = "operator",
    params(("id" = String, Path, description = "Device id")),
    request_body(content = std::collections::BTreeMap<String, String>, description = "The device's new labels, replacing the old ones: at most 32, keys of 1-64 and values of at most 256 characters"),
    responses(
        (status = 200, description = "The labels now stored", body = std::collections::BTreeMap<String, String>),
        (status = 400, description = "Body is not an object of strings, or a label is out of bounds", body = ErrorBody),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below operator", body = ErrorBody),
        (status = 404, description = "The device is not enrolled", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn set_labels(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<std::collections::BTreeMap<String, String>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<std::collections::BTreeMap<String, String>>, ApiError> {
    let who = state.require(&headers, Role::Operator).await?;
    let Json(labels) =
        body.map_err(|e| ApiError::BadRequest(format!("labels must be a JSON object of strings: {}", e.body_text())))?;
    super::validate_labels(&labels)?;
    let (device, stored) = (id.clone(), labels.clone());
    if !blocking(&state, move |s| s.set_labels(&device, &stored)).await? {
        return Err(ApiError::NotFound(format!("device {id:?} is not enrolled")));
    }
    super::audit(
        &state,
        who.name,
        AuditAction::Labels,
        format!("{id}: {}", serde_json::to_string(&labels).unwrap_or_default()),
    )
    .await?;
    Ok(Json(labels))
}
