//! POST /api/v1/broker/authenticate, as EMQX's HTTP authenticator calls it.

use axum::http::StatusCode;
use serde_json::json;

use super::{api, api_with_broker_auth, Api, OPERATOR};
use crate::api::broker_auth::BrokerAuth;
use crate::ingest::MqttLogin;

const SECRET: &str = "broker-secret-of-some-length";
const PATH: &str = "/api/v1/broker/authenticate";

fn with_authenticator() -> Api {
    api_with_broker_auth(Some(BrokerAuth {
        secret: SECRET.into(),
        server_login: Some(MqttLogin { username: "fleet-server".into(), password: "server-password".into() }),
    }))
}

async fn login(api: &Api, username: &str, password: &str) -> serde_json::Value {
    let body = json!({"username": username, "password": password, "clientid": format!("agent-{username}")});
    let (status, verdict) = api.json("POST", PATH, Some(SECRET), body).await;
    assert_eq!(status, StatusCode::OK, "{verdict}");
    verdict
}

#[tokio::test]
async fn the_authenticator_is_off_unless_configured_and_answers_only_the_brokers_secret() {
    let body = json!({"username": "x", "password": "y"});
    let (status, error) = api().json("POST", PATH, Some(SECRET), body.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error["error"].as_str().unwrap().contains("--broker-auth-secret-file"), "{error}");

    let api = with_authenticator();
    assert_eq!(api.json("POST", PATH, None, body.clone()).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(api.json("POST", PATH, Some(OPERATOR), body.clone()).await.0, StatusCode::UNAUTHORIZED);
    let (status, error) = api.json("POST", PATH, Some(SECRET), json!({"username": 5, "password": "y"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
}

#[tokio::test]
async fn a_device_logs_in_as_itself_only_to_its_own_topics_and_never_once_revoked() {
    let api = with_authenticator();
    let (device, credential) = api.enroll().await;

    let allowed = login(&api, &device, &credential).await;
    assert_eq!(
        allowed,
        json!({"result": "allow", "is_superuser": false, "acl": [
            {"permission": "allow", "action": "all", "topic": format!("fleet/v1/devices/{device}/#")},
            {"permission": "deny", "action": "all", "topic": "#"},
        ]})
    );
    let deny = json!({"result": "deny", "is_superuser": false});
    assert_eq!(login(&api, &device, "not-its-credential").await, deny);
    assert_eq!(login(&api, "dev-someone-else", &credential).await, deny, "another device's name");
    let (status, anonymous) = api.json("POST", PATH, Some(SECRET), json!({"clientid": "x"})).await;
    assert_eq!((status, anonymous), (StatusCode::OK, deny.clone()));

    let (status, body) = api.json("POST", &format!("/api/v1/devices/{device}/revoke"), Some(OPERATOR), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(login(&api, &device, &credential).await, deny, "revoked");
}

#[tokio::test]
async fn the_servers_own_login_gets_the_fleets_tree_with_its_password_only() {
    let api = with_authenticator();
    let allowed = login(&api, "fleet-server", "server-password").await;
    assert_eq!(allowed["result"], "allow");
    let topics: Vec<&str> = allowed["acl"].as_array().unwrap().iter().map(|r| r["topic"].as_str().unwrap()).collect();
    assert_eq!(topics, ["fleet/#", "$share/+/fleet/#", "#"]);
    assert_eq!(allowed["acl"][2]["permission"], "deny");
    assert_eq!(login(&api, "fleet-server", "a-guess").await["result"], "deny");
}
