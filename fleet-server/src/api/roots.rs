//! The root of trust (ADR 0010): admins publish the first root and each rotation, which the
//! server checks by TUF's rule before storing; anyone may read a root (it is signed, public
//! data), and devices fetch the versions after theirs when a check-in says a newer one exists.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::Json;
use proto::root::{rotate, Root, SignedRoot};
use proto::wire::{AuditAction, ErrorBody, Role, RootInfo};
use proto::TrustedKeys;

use super::{audit, blocking, ApiError, AppState};

#[utoipa::path(
    post,
    path = "/api/v1/roots",
    tag = "roots",
    request_body(content = SignedRoot, description = "The signed root document (read as JSON whatever the content type)"),
    responses(
        (status = 200, description = "Verified and stored", body = RootInfo),
        (status = 400, description = "The root is refused: it does not parse, or its signatures or version do not follow the current root", body = ErrorBody),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
        (status = 403, description = "The operator's role is below admin", body = ErrorBody),
        (status = 409, description = "Another root with this version was stored meanwhile", body = ErrorBody),
        (status = 413, description = "Body larger than 1 MiB (plain text, from the body limit)", body = String, content_type = "text/plain"),
    ),
    security(("operator_token" = []))
)]
pub async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<RootInfo>, ApiError> {
    let admin = state.require(&headers, Role::Admin).await?;
    let refused = |e: proto::root::RootError| ApiError::BadRequest(format!("root refused: {e}"));
    let signed = SignedRoot::parse(&body).map_err(refused)?;
    let latest = latest_root(&state).await?;
    let accepted = match &latest {
        None => signed.verify_initial(),
        Some(current) => rotate(current, &signed, crate::unix_ms() / 1000),
    }
    .map_err(refused)?;
    let (version, document) = (accepted.version, signed.to_json_bytes());
    blocking(&state, move |s| s.put_root(version, &document, crate::unix_ms())).await?;
    let detail = match &latest {
        None => format!("root {version} (the first)"),
        Some(previous) => format!("root {version} replaces root {}", previous.version),
    };
    audit(&state, admin.name, AuditAction::RootPublished, detail).await?;
    tracing::info!(version, "root of trust published");
    Ok(Json(RootInfo { version, expires: accepted.expires }))
}

#[utoipa::path(
    get,
    path = "/api/v1/roots/{version}",
    tag = "roots",
    params(("version" = u64, Path, description = "Root version, from 1")),
    responses(
        (status = 200, description = "The signed root document, as published (public data: no token needed)", body = SignedRoot),
        (status = 400, description = "The version is not a number (plain text)", body = String, content_type = "text/plain"),
        (status = 404, description = "No root with this version is published", body = ErrorBody),
    ),
    security(())
)]
pub async fn get(State(state): State<AppState>, Path(version): Path<u64>) -> Result<impl IntoResponse, ApiError> {
    let document = blocking(&state, move |s| s.root(version)).await?;
    let document = document.ok_or_else(|| ApiError::NotFound(format!("no root {version} is published")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], document))
}

/// The newest published root, as verified when it was stored.
pub async fn latest_root(state: &AppState) -> Result<Option<Root>, ApiError> {
    let Some(document) = blocking(state, |s| s.latest_root()).await? else {
        return Ok(None);
    };
    let signed = SignedRoot::parse(&document).map_err(|e| ApiError::Internal(format!("stored root: {e}")))?;
    Ok(Some(signed.signed))
}

/// The keys a published bundle must be signed with: the newest root's targets role when a root
/// is published, else the server's configured trusted keys.
pub async fn bundle_keys(state: &AppState) -> Result<std::sync::Arc<TrustedKeys>, ApiError> {
    Ok(match latest_root(state).await? {
        Some(root) => std::sync::Arc::new(root.targets()),
        None => state.trusted.clone(),
    })
}
