//! The OpenAPI 3.1 document of the /api/v1 routes, generated at compile time by utoipa from the
//! `#[utoipa::path]` attribute on each handler and the `ToSchema` derives on the bodies (the proto
//! types behind proto's `openapi` feature). Served unauthenticated at `GET /api/v1/openapi.json`.
//! Left out: `/metrics` (Prometheus text), `/healthz` and the dashboard's static files under `/ui/`.

use std::borrow::Cow;

use axum::Json;
use proto::wire::ErrorBody;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, PartialSchema, ToSchema};

use super::{delivery, devices, drift, identity, lineage, operator, rollouts, roots};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleet-server API",
        description = "Devices enroll, check in, download bundles and upload telemetry with the bearer \
            credential enrollment gave them; operators use a named bearer token whose role (viewer < \
            operator < admin) decides what they may do. Every error the handlers return is \
            `{\"error\": \"<sentence>\"}`; a few rejections made before a handler runs (a query string \
            or path segment that does not parse, a body over its size limit) are plain text."
    ),
    paths(
        devices::enroll,
        devices::checkin,
        devices::download,
        delivery::upload,
        delivery::export,
        delivery::delivery,
        operator::publish,
        operator::devices,
        operator::deploy,
        operator::tokens,
        operator::revoke_token,
        operator::set_labels,
        identity::add_operator,
        identity::list_operators,
        identity::revoke_operator,
        identity::revoke_device,
        rollouts::create,
        rollouts::list,
        rollouts::show,
        rollouts::act,
        rollouts::audit,
        drift::show,
        roots::publish,
        roots::get,
        lineage::models,
        lineage::device,
        super::dashboard::whoami,
        super::broker_auth::authenticate,
        document,
    ),
    components(schemas(Null)),
    modifiers(&Security, &InternalErrors),
    tags(
        (name = "devices", description = "What devices call: enrollment, check-in, bundle download"),
        (name = "delivery", description = "Telemetry upload (devices) and export (operators)"),
        (name = "operator", description = "Bundles, devices, deployments, enrollment tokens"),
        (name = "identity", description = "Operators and device revocation (admin)"),
        (name = "rollouts", description = "Staged rollouts and the audit log"),
        (name = "drift", description = "Drift reports"),
        (name = "roots", description = "The root of trust (ADR 0010)"),
        (name = "lineage", description = "Published versions and per-device lineage"),
        (name = "dashboard", description = "What the dashboard asks"),
        (name = "broker", description = "The HTTP authenticator for a broker such as EMQX"),
        (name = "openapi", description = "This document"),
    )
)]
pub struct ApiDoc;

/// The document as JSON, built once per request (cheap: no I/O).
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "openapi",
    responses((status = 200, description = "This OpenAPI document", body = inline(serde_json::Value))),
    security(())
)]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// JSON `null`: the body of an action that has nothing more to report (`Json(())`).
pub struct Null;

impl PartialSchema for Null {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::Null).into()
    }
}

impl ToSchema for Null {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Null")
    }
}

/// The two bearer schemes the handlers check (`AppState::require`, `AppState::require_device`).
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(description.to_string());
            SecurityScheme::Http(http)
        };
        components.add_security_scheme(
            "operator_token",
            bearer("An operator's token (`fleet-server --operator-token`, `fleetctl operators add`)"),
        );
        components.add_security_scheme(
            "device_credential",
            bearer("The credential a device received from POST /api/v1/enroll"),
        );
        components.add_security_scheme(
            "broker_secret",
            bearer("The broker's secret (`fleet-server --broker-auth-secret-file`)"),
        );
    }
}

/// Every handler reaches the store, whose failures are a 500 with the usual error body.
struct InternalErrors;

impl Modify for InternalErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let error = ResponseBuilder::new()
            .description("The store or the file system failed (logged on the server)")
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name(ErrorBody::name()))).build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete].into_iter().flatten() {
                if operation.operation_id.as_deref() != Some("document") {
                    operation.responses.responses.insert("500".to_string(), error.clone().into());
                }
            }
        }
    }
}
