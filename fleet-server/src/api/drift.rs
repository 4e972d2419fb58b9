//! `GET /api/v1/drift`: a model's drift per version, cohort and time bucket (viewer).

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use proto::names;
use proto::wire::{ErrorBody, Role};
use serde::Deserialize;

use super::{blocking, ApiError, AppState};
use crate::drift::report::{report, DriftReport};

/// How far back a report may reach.
pub const MAX_LOOKBACK_MS: u64 = 31 * 86_400_000;
const DEFAULT_LOOKBACK_MS: u64 = 86_400_000;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DriftQuery {
    pub model: String,
    /// `key=value[,key=value…]`: the devices whose labels carry all of them.
    #[serde(default)]
    pub cohort: Option<String>,
    /// Unix milliseconds; 24 hours ago when absent.
    #[serde(default)]
    pub since_ms: Option<u64>,
    /// 3600 (hour) when absent; 60 to 604,800.
    #[serde(default)]
    pub bucket_secs: Option<u64>,
}

/// `key=value,key=value` as a selector.
pub fn parse_cohort(text: &str) -> Result<BTreeMap<String, String>, ApiError> {
    text.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| ApiError::BadRequest(format!("cohort {pair:?} is not key=value (e.g. site=plant-a)")))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

#[utoipa::path(
    get,
    path = "/api/v1/drift",
    tag = "drift",
    params(DriftQuery),
    responses(
        (status = 200, description = "The model's drift per version, cohort and time bucket", body = DriftReport),
        (status = 400, description = "Query is invalid: JSON from the handler, or plain text when the query string does not parse", content(
            (ErrorBody = "application/json"),
            (String = "text/plain"),
        )),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<DriftQuery>,
) -> Result<Json<DriftReport>, ApiError> {
    state.require(&headers, Role::Viewer).await?;
    names::validate("model name", &query.model).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let cohort = parse_cohort(query.cohort.as_deref().unwrap_or(""))?;
    super::validate_labels(&cohort)?;
    let bucket_secs = query.bucket_secs.unwrap_or(3600);
    if !(60..=604_800).contains(&bucket_secs) {
        return Err(ApiError::BadRequest(format!("bucket_secs {bucket_secs} is outside 60..=604800")));
    }
    let now = crate::unix_ms();
    let since_ms = query.since_ms.unwrap_or(now.saturating_sub(DEFAULT_LOOKBACK_MS));
    if now.saturating_sub(since_ms) > MAX_LOOKBACK_MS {
        return Err(ApiError::BadRequest("since_ms reaches back more than 31 days".into()));
    }
    let report = blocking(&state, move |s| {
        let rows = s.observation_rows(&query.model, since_ms, 0)?;
        let devices = s.device_infos(&query.model)?;
        let references = crate::drift::references(s, &query.model, rows.windows.iter().map(|w| &w.version))?;
        Ok(report(&query.model, &rows.windows, &devices, &cohort, bucket_secs, since_ms, &references))
    })
    .await?;
    Ok(Json(report))
}
