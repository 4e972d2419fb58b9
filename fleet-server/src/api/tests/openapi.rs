//! The OpenAPI document against the router it describes: every route of `router()` is
//! documented, every documented operation is routed, and real responses match their schemas.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::StatusCode;
use serde_json::{json, Value};

use super::{api, fixture_bundle, Api, OPERATOR};

/// Routes of `router()` the document leaves out on purpose (Prometheus text; a liveness probe).
const UNDOCUMENTED: &[&str] = &["/metrics", "/healthz"];

/// (method, path) of every `.route(...)` in the router's source: the list written once, in
/// `api/mod.rs`, so a route added there without a `#[utoipa::path]` fails the test below.
fn routed() -> BTreeSet<(String, String)> {
    let source = include_str!("../mod.rs");
    let mut routes = BTreeSet::new();
    for (start, _) in source.match_indices(".route(") {
        let args = balanced(&source[start + ".route".len()..]);
        let path = args.split('"').nth(1).expect("a route's first argument is a string literal");
        let mut methods = 0;
        for method in ["get", "post", "put", "delete", "patch"] {
            for (at, _) in args.match_indices(&format!("{method}(")) {
                let before = args[..at].chars().last().unwrap_or(' ');
                if !before.is_alphanumeric() && before != '_' {
                    routes.insert((method.to_string(), path.to_string()));
                    methods += 1;
                }
            }
        }
        assert!(methods > 0, "no method found for route {path}: {args}");
    }
    routes.retain(|(_, path)| !UNDOCUMENTED.contains(&path.as_str()));
    routes
}

/// The text inside the parentheses that open at `text`'s first character.
fn balanced(text: &str) -> &str {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[1..i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in {text}")
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            operations.insert((method.clone(), path.clone()));
        }
    }
    operations
}

async fn document(api: &Api) -> Value {
    let (status, body) = api.call("GET", "/api/v1/openapi.json", None, Body::empty(), None).await;
    assert_eq!(status, StatusCode::OK, "the document is served without a token");
    serde_json::from_slice(&body).expect("the document is JSON")
}

/// Checks `body` against the schema the document gives for this operation and status; the
/// status itself must be documented.
fn conforms(doc: &Value, method: &str, template: &str, status: StatusCode, body: &Value) -> Result<(), String> {
    let response = &doc["paths"][template][method]["responses"][status.as_str()];
    if !response.is_object() {
        return Err(format!("{method} {template} answered {status}, which the document does not list"));
    }
    let mut schema = response["content"]["application/json"]["schema"].clone();
    if !schema.is_object() {
        return Err(format!("{method} {template} {status} has no JSON schema"));
    }
    // The schema's `#/components/...` references resolve against the schema's own root.
    schema["components"] = doc["components"].clone();
    let validator = jsonschema::validator_for(&schema).map_err(|e| format!("{method} {template}: bad schema: {e}"))?;
    let errors: Vec<String> = validator.iter_errors(body).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{method} {template} {status}: {}\nbody: {body}", errors.join("; ")))
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_json_with_both_bearer_schemes_and_no_token_needed() {
    let api = api();
    let doc = document(&api).await;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", doc["openapi"]);
    for scheme in ["operator_token", "device_credential"] {
        assert_eq!(doc["components"]["securitySchemes"][scheme]["scheme"], "bearer", "{scheme}");
    }
    let devices = &doc["paths"]["/api/v1/devices"]["get"];
    assert_eq!(devices["security"], json!([{"operator_token": []}]));
    for status in ["401", "500"] {
        assert!(devices["responses"][status].is_object(), "GET /api/v1/devices documents {status}");
    }
}

#[tokio::test]
async fn every_route_of_the_router_is_documented_and_every_documented_route_is_routed() {
    let api = api();
    let doc = document(&api).await;
    let routed = routed();
    let documented = documented(&doc);
    let missing: Vec<_> = routed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(missing.is_empty(), "routed but not documented: {missing:?}");
    assert!(extra.is_empty(), "documented but not routed: {extra:?}");
    // The source parse can be checked too: the router answers every documented operation (an
    // unrouted path is an empty 404, a wrong method a 405).
    for (method, path) in &documented {
        let uri = path.replace("{version}", "1").replace('{', "x").replace('}', "");
        let (status, body) = api.call(&method.to_uppercase(), &uri, None, Body::empty(), None).await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert!(status != StatusCode::NOT_FOUND || !body.is_empty(), "{method} {uri} is not routed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_responses_match_their_documented_schemas() {
    let api = api();
    let doc = document(&api).await;
    let bundle = fixture_bundle(&api.secret, "1.0.0");
    let (status, body) = api.call("POST", "/api/v1/bundles", Some(OPERATOR), Body::from(bundle), None).await;
    let published: Value = serde_json::from_slice(&body).unwrap();
    let mut checked = vec![("post", "/api/v1/bundles", status, published)];
    let (device, credential) = api.enroll().await;
    let deploy = json!({"model": "tabular", "version": "1.0.0", "devices": [device]});
    let (status, body) = api.json("POST", "/api/v1/deployments", Some(OPERATOR), deploy).await;
    checked.push(("post", "/api/v1/deployments", status, body));
    let report = json!({"models": [{"model": "tabular", "version": "1.0.0", "step": "active", "detail": "",
        "active_version": "1.0.0", "at_ms": 1}]});
    let checkin = format!("/api/v1/devices/{device}/checkin");
    let (status, body) = api.json("POST", &checkin, Some(&credential), report).await;
    checked.push(("post", "/api/v1/devices/{id}/checkin", status, body));
    let plan = json!({"model": "tabular", "version": "1.0.0", "holdout": 0.0, "waves": [{"percent": 100.0}]});
    let (status, rollout) = api.json("POST", "/api/v1/rollouts", Some(OPERATOR), plan).await;
    let id = rollout["id"].as_str().expect("a rollout id").to_string();
    checked.push(("post", "/api/v1/rollouts", status, rollout.clone()));
    for (template, uri) in [
        ("/api/v1/rollouts/{id}", format!("/api/v1/rollouts/{id}")),
        ("/api/v1/rollouts", "/api/v1/rollouts".into()),
        ("/api/v1/devices/{id}", format!("/api/v1/devices/{device}")),
        ("/api/v1/devices", "/api/v1/devices".into()),
        ("/api/v1/models", "/api/v1/models".into()),
        ("/api/v1/audit", "/api/v1/audit".into()),
        ("/api/v1/delivery", "/api/v1/delivery".into()),
        ("/api/v1/operators", "/api/v1/operators".into()),
        ("/api/v1/whoami", "/api/v1/whoami".into()),
        ("/api/v1/drift", "/api/v1/drift?model=tabular".into()),
        ("/api/v1/telemetry", "/api/v1/telemetry?model=tabular".into()),
        // Errors: a missing rollout, a bad query value, and no token at all.
        ("/api/v1/rollouts/{id}", "/api/v1/rollouts/ro-missing".into()),
        ("/api/v1/drift", "/api/v1/drift?model=tabular&bucket_secs=1".into()),
    ] {
        let (status, body) = api.json("GET", &uri, Some(OPERATOR), Value::Null).await;
        checked.push(("get", template, status, body));
    }
    let (status, body) = api.json("GET", "/api/v1/devices", None, Value::Null).await;
    checked.push(("get", "/api/v1/devices", status, body));
    let (status, body) = api.json("POST", &format!("/api/v1/rollouts/{id}/pause"), Some(OPERATOR), Value::Null).await;
    checked.push(("post", "/api/v1/rollouts/{id}/{action}", status, body));
    let (status, body) =
        api.json("POST", &format!("/api/v1/devices/{device}/revoke"), Some(OPERATOR), Value::Null).await;
    checked.push(("post", "/api/v1/devices/{id}/revoke", status, body));

    let statuses: BTreeSet<u16> = checked.iter().map(|(_, _, status, _)| status.as_u16()).collect();
    assert_eq!(statuses, [200, 400, 401, 404].into(), "the exchanges above cover success and each error kind");
    let failures: Vec<String> = checked
        .iter()
        .filter_map(|(method, template, status, body)| conforms(&doc, method, template, *status, body).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The check can fail: a rollout in a phase that does not exist, or without its summary.
    let mut wrong = rollout.clone();
    wrong["phase"] = json!("exploded");
    assert!(conforms(&doc, "post", "/api/v1/rollouts", StatusCode::OK, &wrong).is_err());
    let mut wrong = rollout;
    wrong.as_object_mut().unwrap().remove("summary");
    assert!(conforms(&doc, "post", "/api/v1/rollouts", StatusCode::OK, &wrong).is_err());
    assert!(conforms(&doc, "get", "/api/v1/devices", StatusCode::IM_A_TEAPOT, &json!([])).is_err());
}
