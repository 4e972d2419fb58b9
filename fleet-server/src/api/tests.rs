//! Handler tests through the real router, store and bundle verification (no network).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use proto::keys::{parse_secret_key, public_key_hex};
use proto::TrustedKeys;
use tower::ServiceExt;

use super::{router, AppState};
use crate::notify::Notifier;
use crate::store::SqliteStore;

/// The public half of `SigningKey::from_bytes(&[7; 32])`, as a device sends it at enrollment.
const DEVICE_KEY: &str = "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c";
const OPERATOR: &str = "operator-secret";
const MLP: &[u8] = include_bytes!("../../../tests/fixtures/models/mlp.onnx");

/// A signed bundle built with `proto` alone: the server checks signatures and digests, never runs
/// the model, so its tests need no model runtime.
fn fixture_bundle(secret: &str, version: &str) -> Vec<u8> {
    use proto::bundle::{add_signature, write_archive, DType, Lineage, Manifest, ModelContract, TensorSpec};
    let spec = |name: &str, shape: Vec<usize>| TensorSpec { name: name.into(), dtype: DType::F32, shape };
    let contract = ModelContract {
        input: spec("features", vec![1, 8]),
        output: spec("probabilities", vec![1, 3]),
        feature_names: vec![],
        output_labels: vec![],
        features: vec![],
    };
    let lineage = Lineage { metrics: [("accuracy".to_string(), 0.91)].into(), ..Lineage::default() };
    let manifest =
        Manifest { lineage, ..Manifest::for_model("tabular", semver::Version::parse(version).unwrap(), MLP, contract) };
    let mut bundle = proto::bundle::UnverifiedBundle {
        manifest_bytes: manifest.to_json_bytes(),
        signatures: Default::default(),
        files: [(proto::bundle::MODEL_PATH.to_string(), MLP.to_vec())].into(),
    };
    add_signature(&mut bundle, &parse_secret_key(secret).unwrap());
    write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures)
}

struct Api {
    _dir: tempfile::TempDir,
    app: axum::Router,
    secret: String,
}

fn api() -> Api {
    api_with_broker_auth(None)
}

/// [`api`] with the broker authenticator on (or off).
fn api_with_broker_auth(broker_auth: Option<super::broker_auth::BrokerAuth>) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let secret = hex::encode([7u8; 32]);
    let public = public_key_hex(&parse_secret_key(&secret).unwrap().verifying_key());
    let store: Arc<dyn crate::store::Store> = Arc::new(SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
    let admin = crate::store::OperatorRecord {
        name: "admin".into(),
        role: proto::wire::Role::Admin,
        token_hash: super::sha256_hex(OPERATOR),
        created_ms: 0,
        revoked_ms: None,
    };
    store.put_operator(&admin, true).unwrap();
    let state = AppState {
        store_calls: crate::api::StoreTurns::new(store.as_ref()),
        store: store.clone(),
        bundle_dir: dir.path().join("bundles"),
        trusted: Arc::new(TrustedKeys::from_hex([public.as_str()]).unwrap()),
        notifier: Notifier::detached(),
        rollouts: crate::rollout::driver::spawn(
            store.clone(),
            Notifier::detached(),
            std::time::Duration::from_millis(50),
            crate::lease::Lease::new(
                crate::rollout::driver::LEASE,
                "test".into(),
                std::time::Duration::from_secs(60),
                Default::default(),
            ),
            crate::api::metrics::ApiMetrics::default().rollout_tick,
            Default::default(),
            &tokio_util::task::TaskTracker::new(),
        ),
        max_bundle_bytes: 16 << 20,
        revocations: Default::default(),
        sessions: None,
        broker_passwords: None,
        broker_auth,
        emqx: None,
        timestamp: None,
        metrics: Default::default(),
    };
    Api { _dir: dir, app: router(state), secret }
}

impl Api {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        bearer: Option<&str>,
        body: Body,
        extra: Option<(&str, &str)>,
    ) -> (StatusCode, Vec<u8>) {
        let mut request = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some((name, value)) = extra {
            request = request.header(name, value);
        }
        let response = self.app.clone().oneshot(request.body(body).unwrap()).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec();
        (status, bytes)
    }

    async fn json(
        &self,
        method: &str,
        uri: &str,
        bearer: Option<&str>,
        body: serde_json::Value,
    ) -> (StatusCode, serde_json::Value) {
        let (status, bytes) = self.call(method, uri, bearer, Body::from(body.to_string()), None).await;
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    async fn enroll(&self) -> (String, String) {
        let (_, tokens) =
            self.json("POST", "/api/v1/enrollment-tokens", Some(OPERATOR), serde_json::json!({"count": 1})).await;
        let token = tokens["tokens"][0].as_str().unwrap().to_string();
        let (status, body) = self
            .json(
                "POST",
                "/api/v1/enroll",
                None,
                serde_json::json!({"token": token, "name": "cam", "public_key": DEVICE_KEY}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["device_id"].as_str().unwrap().into(), body["credential"].as_str().unwrap().into())
    }
}

#[tokio::test]
async fn an_enrollment_retried_with_the_same_token_gets_the_same_device_and_an_unknown_token_is_refused() {
    let api = api();
    let (_, tokens) =
        api.json("POST", "/api/v1/enrollment-tokens", Some(OPERATOR), serde_json::json!({"count": 1})).await;
    let token = tokens["tokens"][0].clone();
    let (first, a) =
        api.json("POST", "/api/v1/enroll", None, serde_json::json!({"token": token, "public_key": DEVICE_KEY})).await;
    let (second, b) =
        api.json("POST", "/api/v1/enroll", None, serde_json::json!({"token": token, "public_key": DEVICE_KEY})).await;
    assert_eq!((first, second), (StatusCode::OK, StatusCode::OK));
    assert_eq!(a["device_id"], b["device_id"], "a lost reply must not strand the device: same device, new credential");
    let (devices_status, devices) = api.json("GET", "/api/v1/devices", Some(OPERATOR), serde_json::Value::Null).await;
    assert_eq!((devices_status, devices.as_array().unwrap().len()), (StatusCode::OK, 1));
    let (refused, body) =
        api.json("POST", "/api/v1/enroll", None, serde_json::json!({"token": "nope", "public_key": DEVICE_KEY})).await;
    assert_eq!(refused, StatusCode::FORBIDDEN);
    assert_eq!(
        body["error"],
        "enrollment token is unknown or already used; create a new one with `fleetctl tokens create`"
    );
}

#[tokio::test]
async fn an_enrollment_without_a_device_key_is_refused_and_does_not_use_up_the_token() {
    let api = api();
    let (_, tokens) =
        api.json("POST", "/api/v1/enrollment-tokens", Some(OPERATOR), serde_json::json!({"count": 1})).await;
    let token = tokens["tokens"][0].clone();
    let without_key = serde_json::json!({ "token": token });
    let with_key = |key: &str| serde_json::json!({"token": token, "public_key": key});
    for request in [without_key, with_key(""), with_key("abc"), with_key(&"zz".repeat(32))] {
        let (refused, body) = api.json("POST", "/api/v1/enroll", None, request).await;
        assert_eq!(refused, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().unwrap().contains("ed25519 public key"), "{body}");
    }
    let (accepted, _) =
        api.json("POST", "/api/v1/enroll", None, serde_json::json!({"token": token, "public_key": DEVICE_KEY})).await;
    assert_eq!(accepted, StatusCode::OK);
}

#[tokio::test]
async fn operator_endpoints_refuse_a_missing_or_wrong_token() {
    let api = api();
    for token in [None, Some("wrong")] {
        let (status, body) = api.json("GET", "/api/v1/devices", token, serde_json::Value::Null).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "missing or invalid bearer token");
    }
}

#[tokio::test]
async fn a_device_cannot_check_in_as_another_device() {
    let api = api();
    let (_, credential) = api.enroll().await;
    let (other, _) = api.enroll().await;
    let (status, body) = api
        .json("POST", &format!("/api/v1/devices/{other}/checkin"), Some(&credential), serde_json::json!({"models": []}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) =
        api.json("POST", &format!("/api/v1/devices/{other}/checkin"), None, serde_json::json!({"models": []})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn deploying_an_unpublished_version_says_to_publish_first() {
    let api = api();
    let (status, body) = api
        .json(
            "POST",
            "/api/v1/deployments",
            Some(OPERATOR),
            serde_json::json!({"model": "tabular", "version": "9.9.9"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "no bundle tabular 9.9.9 is published; run `fleetctl publish` first");
}

#[tokio::test]
async fn token_counts_outside_the_limit_are_refused_with_the_range() {
    let api = api();
    let (status, body) =
        api.json("POST", "/api/v1/enrollment-tokens", Some(OPERATOR), serde_json::json!({"count": 0})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "count must be between 1 and 10000");
}

#[tokio::test]
async fn a_published_bundle_downloads_whole_or_by_range_and_the_desired_state_names_it() {
    let api = api();
    let bundle = fixture_bundle(&api.secret, "1.0.0");
    let (status, info) = api.call("POST", "/api/v1/bundles", Some(OPERATOR), Body::from(bundle.clone()), None).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&info));
    let (device, credential) = api.enroll().await;
    let (status, _) = api
        .json(
            "POST",
            "/api/v1/deployments",
            Some(OPERATOR),
            serde_json::json!({"model": "tabular", "version": "1.0.0"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, desired) = api
        .json(
            "POST",
            &format!("/api/v1/devices/{device}/checkin"),
            Some(&credential),
            serde_json::json!({"models": []}),
        )
        .await;
    assert_eq!(desired["models"][0]["bundle_sha256"], proto::bundle::sha256_hex(&bundle));
    assert_eq!(desired["revision"], 1);

    let path = "/api/v1/bundles/tabular/1.0.0";
    let (status, whole) = api.call("GET", path, Some(&credential), Body::empty(), None).await;
    assert_eq!((status, whole.len()), (StatusCode::OK, bundle.len()));
    let (status, tail) = api.call("GET", path, Some(&credential), Body::empty(), Some(("range", "bytes=1000-"))).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail, bundle[1000..]);
    let (status, _) = api.call("GET", path, None, Body::empty(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A device downloads only what its desired state names; an operator any published bundle.
    let (status, info) = api
        .call("POST", "/api/v1/bundles", Some(OPERATOR), Body::from(fixture_bundle(&api.secret, "2.0.0")), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&info));
    let other = "/api/v1/bundles/tabular/2.0.0";
    let (status, body) = api.call("GET", other, Some(&credential), Body::empty(), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("not in this device's desired state"));
    let (status, _) = api.call("GET", other, Some(OPERATOR), Body::empty(), None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn republishing_a_version_with_other_contents_is_a_conflict() {
    let api = api();
    let first = fixture_bundle(&api.secret, "1.0.0");
    let (status, _) = api.call("POST", "/api/v1/bundles", Some(OPERATOR), Body::from(first.clone()), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api.call("POST", "/api/v1/bundles", Some(OPERATOR), Body::from(first), None).await;
    assert_eq!(status, StatusCode::OK, "the identical bundle again is accepted");
    // Same version with another lineage: different manifest, so different bytes.
    let mut archive =
        proto::bundle::read_archive(&fixture_bundle(&api.secret, "1.0.0"), &proto::bundle::Limits::default()).unwrap();
    let text =
        String::from_utf8(archive.manifest_bytes.clone()).unwrap().replace("\"accuracy\": 0.91", "\"accuracy\": 0.92");
    archive.manifest_bytes = text.into_bytes();
    archive.signatures.clear();
    proto::bundle::add_signature(&mut archive, &parse_secret_key(&api.secret).unwrap());
    let other = proto::bundle::write_archive(&archive.manifest_bytes, &archive.files, &archive.signatures);
    let (status, body) = api.call("POST", "/api/v1/bundles", Some(OPERATOR), Body::from(other), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{}", String::from_utf8_lossy(&body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_rollout_plan_is_refused_naming_the_field_and_an_overlapping_one_is_a_conflict() {
    let api = api();
    let bundle = fixture_bundle(&api.secret, "1.0.0");
    api.call("POST", "/api/v1/bundles", Some(OPERATOR), Body::from(bundle), None).await;
    api.enroll().await;
    let plan = |holdout: f64| serde_json::json!({"model": "tabular", "version": "1.0.0", "holdout": holdout, "waves": [{"percent": 100.0}]});
    let (status, body) = api.json("POST", "/api/v1/rollouts", Some(OPERATOR), plan(2.0)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "rollout plan field `holdout`: 2 must be between 0 and 0.9");
    let (status, body) = api.json("POST", "/api/v1/rollouts", Some(OPERATOR), plan(0.0)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["phase"], "running");
    let (status, body) = api.json("POST", "/api/v1/rollouts", Some(OPERATOR), plan(0.0)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body["error"].as_str().unwrap().contains("is already in active rollout"), "{body}");
    let id = {
        let (_, list) = api.json("GET", "/api/v1/rollouts", Some(OPERATOR), serde_json::Value::Null).await;
        list[0]["id"].as_str().unwrap().to_string()
    };
    let (status, body) =
        api.json("POST", &format!("/api/v1/rollouts/{id}/explode"), Some(OPERATOR), serde_json::Value::Null).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "unknown action \"explode\"; use pause, resume, abort, promote or retry");
    let (status, body) =
        api.json("POST", &format!("/api/v1/rollouts/{id}/pause"), Some(OPERATOR), serde_json::Value::Null).await;
    assert_eq!((status, body["phase"].as_str()), (StatusCode::OK, Some("paused")));
    let (_, audit) =
        api.json("GET", &format!("/api/v1/audit?rollout={id}"), Some(OPERATOR), serde_json::Value::Null).await;
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions.first(), Some(&"created"));
    assert_eq!(actions.last(), Some(&"pause"));
}

#[tokio::test]
async fn an_operator_relabels_a_device_and_the_change_is_audited() {
    let api = api();
    let (device, _) = api.enroll().await;
    let uri = format!("/api/v1/devices/{device}/labels");
    let (status, _) = api.json("PUT", &uri, Some(OPERATOR), serde_json::json!({"region": "eu", "hw": "cam"})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, devices) = api.json("GET", "/api/v1/devices", Some(OPERATOR), serde_json::Value::Null).await;
    assert_eq!(devices[0]["labels"], serde_json::json!({"region": "eu", "hw": "cam"}));
    let (_, audit) = api.json("GET", "/api/v1/audit", Some(OPERATOR), serde_json::Value::Null).await;
    assert_eq!(audit[0]["action"], "labels");
    let (status, body) =
        api.json("PUT", "/api/v1/devices/dev-nope/labels", Some(OPERATOR), serde_json::json!({})).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::NOT_FOUND, Some("device \"dev-nope\" is not enrolled")));
    let (status, _) = api.json("PUT", &uri, Some(OPERATOR), serde_json::json!({"": "x"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn metrics_need_a_token_and_count_requests_by_route_pattern_and_devices_by_state() {
    let api = api();
    let (device, _) = api.enroll().await;
    let (status, _) = api.call("GET", "/metrics", None, Body::empty(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api.call("GET", &format!("/api/v1/devices/{device}"), Some(OPERATOR), Body::empty(), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api.call("GET", "/metrics", Some(OPERATOR), Body::empty(), None).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    for line in [
        "fleet_api_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/devices/{id}\",status=\"200\"} 1",
        "fleet_api_request_duration_seconds_count{method=\"GET\",route=\"/metrics\",status=\"401\"} 1",
        "fleet_devices{state=\"offline\"} 1",
        "fleet_reports_stored_total 0",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains(&device), "a device id became a label");
}

mod broker_auth;
mod openapi;

#[tokio::test]
async fn a_request_past_the_waiting_limit_is_refused_busy_at_once_and_the_waiting_ones_get_their_turn() {
    let turns = Arc::new(super::StoreTurns::with_limits(1, 2));
    let held = turns.turn().await.unwrap();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let turns = turns.clone();
            tokio::spawn(async move { turns.turn().await.map(drop) })
        })
        .collect();
    // Both are waiting once the waiting count says so.
    while turns.waiting.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        tokio::task::yield_now().await;
    }
    let refused = turns.turn().await.unwrap_err();
    assert!(matches!(&refused, super::ApiError::Busy(why) if why.contains("try again")), "{refused}");
    assert_eq!(axum::response::IntoResponse::into_response(refused).status(), StatusCode::SERVICE_UNAVAILABLE);
    drop(held);
    for waiter in waiters {
        waiter.await.unwrap().unwrap();
    }
}
