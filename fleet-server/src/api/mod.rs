//! The HTTP API under /api/v1. Devices authenticate with the bearer credential they got at
//! enrollment; operators with a named token whose role (viewer, operator, admin) decides what
//! they may do, and whose name is the actor in the audit log. Every error body is `{"error": "<sentence>"}`.

pub mod broker_auth;
pub mod dashboard;
mod delivery;
mod devices;
pub mod drift;
pub mod identity;
pub mod lineage;
pub mod metrics;
pub mod openapi;
mod operator;
pub mod rollouts;
pub mod roots;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use proto::wire::{ErrorBody, Role};
use proto::TrustedKeys;
use sha2::{Digest, Sha256};

use crate::notify::Notifier;
use crate::store::{Store, StoreError};

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub bundle_dir: PathBuf,
    pub trusted: Arc<TrustedKeys>,
    pub notifier: Notifier,
    pub rollouts: crate::rollout::driver::RolloutHandle,
    pub max_bundle_bytes: usize,
    pub revocations: crate::ingest::Revocations,
    /// The embedded broker's sessions (None with an external broker).
    pub sessions: Option<crate::broker::Sessions>,
    /// Keeps an external Mosquitto's password file in step with enrollments and revocations.
    pub broker_passwords: Option<crate::broker::mosquitto::PasswordSync>,
    /// The HTTP authenticator for a broker such as EMQX (`--broker-auth-secret-file`); off if None.
    pub broker_auth: Option<broker_auth::BrokerAuth>,
    /// EMQX's REST API, to disconnect a device when it is revoked (`--emqx-api-url`).
    pub emqx: Option<crate::broker::emqx::EmqxApi>,
    /// Signs check-in replies with the root's timestamp key (ADR 0010); None leaves them unsigned.
    pub timestamp: Option<Arc<TimestampSigner>>,
    /// API latencies per route, kept between scrapes of /metrics.
    pub metrics: metrics::ApiMetrics,
    /// Turns for the requests' store calls. Without them, on tokio's blocking pool, 10,000
    /// devices' check-ins filled all 512 threads waiting for PostgreSQL's 8 connections, and
    /// the ingest's batches and the rollout driver's calls queued behind them.
    pub store_calls: Arc<StoreTurns>,
}

/// The server's online timestamp key and how long what it signs stays fresh.
pub struct TimestampSigner {
    pub key: proto::keys::SigningKey,
    pub lifetime: std::time::Duration,
}

pub fn router(state: AppState) -> Router {
    let bundle_limit = state.max_bundle_bytes;
    Router::new()
        .route("/api/v1/enroll", post(devices::enroll))
        .route("/api/v1/devices/{id}/checkin", post(devices::checkin))
        .route(
            "/api/v1/devices/{id}/telemetry",
            post(delivery::upload).layer(DefaultBodyLimit::max(proto::delivery::MAX_TELEMETRY_BATCH_BYTES)),
        )
        .route("/api/v1/telemetry", get(delivery::export))
        .route("/api/v1/delivery", get(delivery::delivery))
        .route("/api/v1/bundles/{name}/{version}", get(devices::download))
        .route("/api/v1/bundles", post(operator::publish).layer(DefaultBodyLimit::max(bundle_limit)))
        .route("/api/v1/devices", get(operator::devices))
        .route("/api/v1/devices/{id}", get(lineage::device))
        .route("/api/v1/models", get(lineage::models))
        .route("/api/v1/devices/{id}/labels", axum::routing::put(operator::set_labels))
        .route("/api/v1/deployments", post(operator::deploy))
        .route("/api/v1/enrollment-tokens", post(operator::tokens))
        .route("/api/v1/enrollment-tokens/revoke", post(operator::revoke_token))
        .route("/api/v1/operators", post(identity::add_operator).get(identity::list_operators))
        .route("/api/v1/operators/{name}/revoke", post(identity::revoke_operator))
        .route("/api/v1/devices/{id}/revoke", post(identity::revoke_device))
        .route("/api/v1/rollouts", post(rollouts::create).get(rollouts::list))
        .route("/api/v1/rollouts/{id}", get(rollouts::show))
        .route("/api/v1/rollouts/{id}/{action}", post(rollouts::act))
        .route("/api/v1/audit", get(rollouts::audit))
        .route("/api/v1/drift", get(drift::show))
        .route("/api/v1/roots", post(roots::publish))
        .route("/api/v1/roots/{version}", get(roots::get))
        .route("/api/v1/whoami", get(dashboard::whoami))
        .route("/api/v1/broker/authenticate", post(broker_auth::authenticate))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::scrape))
        .route("/healthz", get(|| async { "ok" }))
        .merge(dashboard::routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), metrics::track))
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// Errors as the API reports them.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// Too many requests wait already: 503, the client tries again later.
    #[error("{0}")]
    Busy(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(message) => ApiError::Conflict(message),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if let ApiError::Busy(_) = &self {
            let retry = [(axum::http::header::RETRY_AFTER, "5")];
            return (status, retry, Json(ErrorBody { error: self.to_string() })).into_response();
        }
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        (status, Json(ErrorBody { error: self.to_string() })).into_response()
    }
}

/// Labels select cohorts: bounded keys and values, at most 32 of them.
pub fn validate_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > 32 {
        return Err(ApiError::BadRequest(format!("{} labels given; at most 32 are allowed", labels.len())));
    }
    for (key, value) in labels {
        if key.is_empty() || key.len() > 64 || value.len() > 256 {
            return Err(ApiError::BadRequest(format!(
                "label {key:?} must have a 1-64 character key and a value of at most 256 characters"
            )));
        }
    }
    Ok(())
}

pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// Appends an operator's action (not tied to a rollout) to the audit log.
pub async fn audit(
    state: &AppState,
    actor: String,
    action: proto::wire::AuditAction,
    detail: String,
) -> Result<(), ApiError> {
    let entry = proto::wire::AuditEntry { at_ms: crate::unix_ms(), actor, rollout: None, action, detail };
    blocking(state, move |s| s.append_audit(&entry)).await
}

/// Runs a store call on the blocking pool, as an API error.
pub async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let _turn = state.store_calls.turn().await?;
    Ok(crate::store::blocking(&state.store, f).await?)
}

/// Turns for the requests' store calls: [`Store::concurrency`] at once, the others waiting in
/// order without a thread, and past [`StoreTurns::MAX_WAITING_PER_TURN`] per turn a request is
/// refused at once with 503 instead of waiting longer than its client would.
pub struct StoreTurns {
    turns: tokio::sync::Semaphore,
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

impl StoreTurns {
    /// Requests that may wait for each turn.
    pub const MAX_WAITING_PER_TURN: usize = 64;

    pub fn new(store: &dyn Store) -> Arc<StoreTurns> {
        let concurrency = store.concurrency().max(1);
        Arc::new(StoreTurns::with_limits(concurrency, concurrency * Self::MAX_WAITING_PER_TURN))
    }

    fn with_limits(concurrency: usize, max_waiting: usize) -> StoreTurns {
        StoreTurns { turns: tokio::sync::Semaphore::new(concurrency), waiting: Default::default(), max_waiting }
    }

    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
        use std::sync::atomic::Ordering;
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::Busy(format!(
                "the server has {} requests waiting for its database; try again shortly",
                self.max_waiting
            )));
        }
        let turn = self.turns.acquire().await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        // The semaphore is never closed.
        turn.map_err(|e| ApiError::Internal(e.to_string()))
    }
}

/// The operator behind a request's token.
#[derive(Clone, Debug, PartialEq)]
pub struct Operator {
    pub name: String,
    pub role: Role,
}

impl AppState {
    /// The operator whose token the request carries, if its role is at least `role`. Tokens are
    /// looked up by their SHA-256 digest, so lookup time depends on digests, never on how much
    /// of a secret a guess got right.
    pub async fn require(&self, headers: &HeaderMap, role: Role) -> Result<Operator, ApiError> {
        let hash = sha256_hex(bearer(headers).ok_or(ApiError::Unauthorized)?);
        let found = blocking(self, move |s| s.operator_for_token(&hash)).await?;
        let operator = found.ok_or(ApiError::Unauthorized)?;
        if operator.role < role {
            return Err(ApiError::Forbidden(format!(
                "operator {} has the {} role; this needs {}",
                operator.name,
                operator.role.as_str(),
                role.as_str()
            )));
        }
        Ok(Operator { name: operator.name, role: operator.role })
    }

    /// The device id behind a device credential.
    pub async fn require_device(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let hash = sha256_hex(bearer(headers).ok_or(ApiError::Unauthorized)?);
        blocking(self, move |s| s.device_for_credential(&hash)).await?.ok_or(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests;
