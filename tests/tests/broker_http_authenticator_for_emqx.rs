//! The HTTP authenticator a broker such as EMQX calls (docs/SCALING.md, "EMQX instead of
//! Mosquitto"), over real HTTP against a running fleet-server: off by default, and with
//! `broker_auth_secret` a device enrolled over the API logs in to its own topics only, a wrong
//! credential is denied, and only the broker's secret is answered. Revoking the device then
//! disconnects its sessions through EMQX's REST API, here a stand-in that records the calls.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use fleet_server::ingest::MqttLogin;
use fleet_server::server::ServerConfig;
use fleet_tests::*;
use proto::wire::{EnrollRequest, EnrollResponse};
use serde_json::json;

const SECRET: &str = "the-broker-secret-for-this-test";
/// `key:secret` of the stand-in's API key, and its basic-auth header.
const EMQX_KEY: &str = "fleet:key-secret";
const EMQX_AUTH: &str = "Basic ZmxlZXQ6a2V5LXNlY3JldA==";

/// What the stand-in for EMQX's REST API saw: the username listed, then each client kicked.
type Calls = Arc<Mutex<Vec<String>>>;

/// Lists two clients for any username (the agent's own id and an odd one a device might pick);
/// the second is gone by the time it is kicked (404).
async fn emqx_stand_in() -> (String, Calls) {
    async fn list(
        State(calls): State<Calls>,
        headers: HeaderMap,
        Query(query): Query<std::collections::HashMap<String, String>>,
    ) -> Result<axum::Json<serde_json::Value>, StatusCode> {
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(EMQX_AUTH) {
            return Err(StatusCode::UNAUTHORIZED);
        }
        let username = query.get("username").cloned().unwrap_or_default();
        calls.lock().unwrap().push(format!("list {username}"));
        Ok(axum::Json(json!({"data": [{"clientid": format!("agent-{username}")}, {"clientid": "odd id/#"}]})))
    }
    async fn kick(State(calls): State<Calls>, headers: HeaderMap, Path(client): Path<String>) -> StatusCode {
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(EMQX_AUTH) {
            return StatusCode::UNAUTHORIZED;
        }
        calls.lock().unwrap().push(format!("kick {client}"));
        if client.starts_with("agent-") {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::NOT_FOUND
        }
    }
    let calls = Calls::default();
    let app = axum::Router::new()
        .route("/api/v5/clients", axum::routing::get(list))
        .route("/api/v5/clients/{client}", axum::routing::delete(kick))
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

async fn post(url: &str, bearer: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = edge_agent::http::client()
        .post(format!("{url}/api/v1/broker/authenticate"))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_the_secret_learns_which_logins_are_devices_and_their_topics() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = new_key();
    let (off, _) = start_server(dir.path(), mqtt_from_env(), vec![public.clone()]).await;
    let (status, _) = post(&off.url(), SECRET, json!({"username": "x", "password": "y"})).await;
    assert_eq!(status, 404, "off unless configured");
    drop(off);

    let dir = tempfile::tempdir().unwrap();
    let (emqx_url, emqx_calls) = emqx_stand_in().await;
    let config = ServerConfig {
        trusted_keys: vec![public],
        broker_auth_secret: Some(SECRET.into()),
        emqx_api: Some((emqx_url, EMQX_KEY.into())),
        mqtt_login: Some(MqttLogin { username: "fleet-server".into(), password: "server-password".into() }),
        ..test_server_config(dir.path(), mqtt_from_env())
    };
    let (server, client) = start_server_with(config).await;
    let url = server.url();
    let token = client.tokens(1).await.unwrap().remove(0);
    let key = proto::keys::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let request = EnrollRequest {
        token,
        public_key: proto::keys::public_key_hex(&key.verifying_key()),
        name: "cam".into(),
        labels: Default::default(),
    };
    let enrolled: EnrollResponse = edge_agent::http::client()
        .post(format!("{url}/api/v1/enroll"))
        .json(&request)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let device = enrolled.device_id;

    let login = json!({"username": device, "password": enrolled.credential, "clientid": format!("agent-{device}")});
    let (status, verdict) = post(&url, SECRET, login.clone()).await;
    assert_eq!((status, &verdict["result"]), (200, &json!("allow")), "{verdict}");
    assert_eq!(verdict["acl"][0]["topic"], format!("fleet/v1/devices/{device}/#"));
    assert_eq!(verdict["acl"][1], json!({"permission": "deny", "action": "all", "topic": "#"}));

    let (status, verdict) = post(&url, SECRET, json!({"username": device, "password": "guess"})).await;
    assert_eq!((status, &verdict["result"]), (200, &json!("deny")), "{verdict}");
    assert_eq!(post(&url, "op", login.clone()).await.0, 401, "an operator token is not the broker's secret");
    let (_, verdict) = post(&url, SECRET, json!({"username": "fleet-server", "password": "server-password"})).await;
    assert_eq!(verdict["result"], "allow", "{verdict}");

    // Revoked while connected: EMQX is told to drop every session under the device's name, and
    // the authenticator refuses the device from then on.
    assert!(emqx_calls.lock().unwrap().is_empty());
    client.revoke_device(&device).await.unwrap();
    let calls = emqx_calls.lock().unwrap().clone();
    assert_eq!(calls, [format!("list {device}"), format!("kick agent-{device}"), "kick odd id/#".to_string()]);
    let (_, verdict) = post(&url, SECRET, login).await;
    assert_eq!(verdict["result"], "deny", "{verdict}");
}
