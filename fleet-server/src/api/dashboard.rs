//! The operator dashboard: static pages embedded in the binary (fleet-server/dashboard/, plain
//! HTML, CSS and JavaScript with uPlot vendored; nothing is built at run time), served under
//! /ui/ with a content security policy that allows only this server. The pages call the same
//! /api/v1 routes as fleetctl with the operator's token, so roles decide what works.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use proto::wire::{ErrorBody, Role};
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState};

/// (path under /ui/, content type, bytes)
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("", "text/html; charset=utf-8", include_bytes!("../../dashboard/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../../dashboard/app.js")),
    ("errors.js", "text/javascript; charset=utf-8", include_bytes!("../../dashboard/errors.js")),
    ("app.css", "text/css; charset=utf-8", include_bytes!("../../dashboard/app.css")),
    (
        "vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../dashboard/vendor/uPlot.iife.min.js"),
    ),
    ("vendor/uPlot.min.css", "text/css; charset=utf-8", include_bytes!("../../dashboard/vendor/uPlot.min.css")),
];

/// Scripts and styles from this server only (uPlot sizes its canvas through element styles).
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(|| async { asset("") }))
        .route("/ui/{*path}", get(|axum::extract::Path(path): axum::extract::Path<String>| async move { asset(&path) }))
}

fn asset(path: &str) -> Response {
    let Some((_, content_type, bytes)) = ASSETS.iter().find(|(p, _, _)| *p == path) else {
        return (StatusCode::NOT_FOUND, "no such dashboard file").into_response();
    };
    let mut response = bytes.to_vec().into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// Who the request's operator token belongs to: what the dashboard shows and which buttons work.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct WhoAmI {
    pub name: String,
    pub role: Role,
}

#[utoipa::path(
    get,
    path = "/api/v1/whoami",
    tag = "dashboard",
    responses(
        (status = 200, description = "The token's operator and role", body = WhoAmI),
        (status = 401, description = "Missing or unknown operator token", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn whoami(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<WhoAmI>, ApiError> {
    let who = state.require(&headers, Role::Viewer).await?;
    Ok(Json(WhoAmI { name: who.name, role: who.role }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_the_index_loads_is_served_with_the_policy() {
        let index = String::from_utf8_lossy(ASSETS[0].2);
        for wanted in
            ["/ui/app.js", "/ui/errors.js", "/ui/app.css", "/ui/vendor/uPlot.iife.min.js", "/ui/vendor/uPlot.min.css"]
        {
            assert!(index.contains(wanted), "index.html does not load {wanted}");
            let response = asset(wanted.trim_start_matches("/ui/"));
            assert_eq!(response.status(), StatusCode::OK, "{wanted}");
            assert!(response.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .starts_with("default-src 'self'"));
        }
        assert_eq!(asset("../Cargo.toml").status(), StatusCode::NOT_FOUND);
    }
}
