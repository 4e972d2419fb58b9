//! Delivery endpoints: devices upload buffered telemetry (postcard, acknowledged after commit);
//! operators read it back for labelling and retraining, and read every device's delivery
//! counters (records stored, duplicates dropped, evictions reported).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use proto::delivery::{DeliveryView, ExportedTelemetry, TelemetryAck, TelemetryBatch, MAX_TELEMETRY_BATCH_BYTES};
use proto::names;
use serde::Deserialize;

use proto::wire::{ErrorBody, Role};

use super::{blocking, ApiError, AppState};
use crate::store::{StoredTelemetry, TelemetryQuery};

/// Most values in one row's features or outputs (the agent sends at most 1024 inputs).
const MAX_ROW_VALUES: usize = 4096;
/// Most rows in one export page.
const MAX_EXPORT_PAGE: usize = 10_000;

#[utoipa::path(
    post,
    path = "/api/v1/devices/{id}/telemetry",
    tag = "delivery",
    params(("id" = String, Path, description = "Device id")),
    request_body(
        content = [u8],
        content_type = "application/octet-stream",
        description = "A postcard-encoded `TelemetryBatch` (proto::delivery), at most 1 MiB; not JSON"
    ),
    responses(
        (status = 200, description = "Rows committed: the device may delete every row up to `through`", body = TelemetryAck),
        (status = 400, description = "Body does not decode as a telemetry batch, or a row is invalid", body = ErrorBody),
        (status = 401, description = "Missing or unknown device credential", body = ErrorBody),
        (status = 403, description = "The credential belongs to another device", body = ErrorBody),
        (status = 413, description = "Body larger than 1 MiB (plain text, from the body limit)", body = String, content_type = "text/plain"),
    ),
    security(("device_credential" = []))
)]
pub async fn upload(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<TelemetryAck>, ApiError> {
    let device = state.require_device(&headers).await?;
    if device != id {
        return Err(ApiError::Forbidden(format!("this credential belongs to device {device}, not {id}")));
    }
    let batch: TelemetryBatch = proto::wire::decode_within("telemetry batch", &body, MAX_TELEMETRY_BATCH_BYTES)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    for row in &batch.rows {
        names::validate("model name", &row.model).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if semver::Version::parse(&row.version).is_err() {
            return Err(ApiError::BadRequest(format!(
                "telemetry row {} has version {:?}, not a semantic version",
                row.seq, row.version
            )));
        }
        if row.features.len() > MAX_ROW_VALUES || row.outputs.len() > MAX_ROW_VALUES {
            return Err(ApiError::BadRequest(format!(
                "telemetry row {} has more than {MAX_ROW_VALUES} values",
                row.seq
            )));
        }
    }
    let ack = blocking(&state, move |s| s.record_telemetry(&device, &batch.rows)).await?;
    Ok(Json(ack))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    pub model: String,
    pub version: Option<String>,
    pub since_ms: Option<u64>,
    /// Continue after this device id...
    pub after_device: Option<String>,
    /// ...and this sequence.
    pub after_seq: Option<u64>,
    pub limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/api/v1/telemetry",
    tag = "delivery",
    params(ExportQuery),
    responses(
        (status = 200, description = "Stored inference records, by device then sequence", body = Vec<ExportedTelemetry>),
        (status = 400, description = "Query is invalid: JSON from the handler, or plain text when the query string does not parse", content(
            (ErrorBody = "application/json"),
            (String = "text/plain"),
        )),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn export(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<ExportQuery>,
) -> Result<Json<Vec<StoredTelemetry>>, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    names::validate("model name", &query.model).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let q = TelemetryQuery {
        model: query.model,
        version: query.version,
        since_ms: query.since_ms,
        after: query.after_device.map(|d| (d, query.after_seq.unwrap_or(0))),
        limit: query.limit.unwrap_or(MAX_EXPORT_PAGE).min(MAX_EXPORT_PAGE),
    };
    Ok(Json(blocking(&state, move |s| s.telemetry(&q)).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/delivery",
    tag = "delivery",
    responses(
        (status = 200, description = "Every device's delivery counters", body = Vec<DeliveryView>),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn delivery(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Vec<DeliveryView>>, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    Ok(Json(blocking(&state, |s| s.delivery()).await?))
}
