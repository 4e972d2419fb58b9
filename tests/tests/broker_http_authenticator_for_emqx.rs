//! The HTTP authenticator a broker such as EMQX calls (docs/SCALING.md, "EMQX instead of
//! Mosquitto"), over real HTTP against a running fleet-server: off by default, and with
//! `broker_auth_secret` a device enrolled over the API logs in to its own topics only, a wrong
//! credential is denied, and only the broker's secret is answered.

use fleet_server::ingest::MqttLogin;
use fleet_server::server::ServerConfig;
use fleet_tests::*;
use proto::wire::{EnrollRequest, EnrollResponse};
use serde_json::json;

const SECRET: &str = "the-broker-secret-for-this-test";

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
    let config = ServerConfig {
        trusted_keys: vec![public],
        broker_auth_secret: Some(SECRET.into()),
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
    assert_eq!(post(&url, "op", login).await.0, 401, "an operator token is not the broker's secret");
    let (_, verdict) = post(&url, SECRET, json!({"username": "fleet-server", "password": "server-password"})).await;
    assert_eq!(verdict["result"], "allow", "{verdict}");
}
