//! The local inference API, bound to 127.0.0.1 by default:
//! `POST /v1/models/{name}/infer` and `POST /v1/infer` (when one model is active),
//! body `{"inputs": [[f32 or null, ...], ...]}` (null only for features the contract declares
//! nullable); `GET /v1/models`; `GET /healthz`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::engine::InferError;
use super::thread::SharedEngine;
use proto::wire::ErrorBody;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    pub inputs: Vec<Row>,
}

/// One input row; a JSON `null` becomes NaN, the engine's mark for a missing value (JSON has no
/// NaN of its own, so nothing else can produce one). Read straight into the engine's row type.
pub struct Row(pub Vec<f32>);

impl<'de> Deserialize<'de> for Row {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Row, D::Error> {
        struct RowVisitor;
        impl<'de> Visitor<'de> for RowVisitor {
            type Value = Row;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of numbers (or null for a missing value)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Row, A::Error> {
                let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(value) = seq.next_element::<Option<f32>>()? {
                    values.push(value.unwrap_or(f32::NAN));
                }
                Ok(Row(values))
            }
        }
        deserializer.deserialize_seq(RowVisitor)
    }
}

/// Served on the engine thread's own runtime (see `thread.rs`): handlers run the model inline.
pub(crate) fn router(engine: SharedEngine, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/infer", post(infer_default))
        .route("/v1/models/{name}/infer", post(infer_named))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(engine)
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(ErrorBody { error: message })).into_response()
}

fn body_error(rejection: JsonRejection) -> Response {
    let message = match &rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "send the body as JSON with content-type application/json".to_string()
        }
        JsonRejection::JsonDataError(e) => {
            format!("the body must be {{\"inputs\": [[numbers or null, ...], ...]}}: {}", e.body_text())
        }
        JsonRejection::JsonSyntaxError(e) => {
            format!("the body is not valid JSON: {}", e.body_text())
        }
        _ => rejection.body_text(),
    };
    let status = match rejection {
        JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        JsonRejection::BytesRejection(ref e) => e.status(),
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, message)
}

async fn run(
    engine: &SharedEngine,
    model: Option<String>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(request)) => request,
        Err(rejection) => return body_error(rejection),
    };
    let rows = request.inputs.into_iter().map(|row| row.0).collect();
    let answer = engine.lock().infer(model, rows);
    match answer {
        Ok(response) => Json(response).into_response(),
        Err(e @ (InferError::UnknownModel(_) | InferError::NoModel)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ InferError::Stale { .. }) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e @ (InferError::Run(_) | InferError::Panicked { .. } | InferError::Stopped)) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn infer_default(
    State(engine): State<SharedEngine>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Response {
    run(&engine, None, body).await
}

async fn infer_named(
    State(engine): State<SharedEngine>,
    Path(name): Path<String>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Response {
    run(&engine, Some(name), body).await
}

async fn models(State(engine): State<SharedEngine>) -> Response {
    let active = engine.lock().active();
    Json(active).into_response()
}
