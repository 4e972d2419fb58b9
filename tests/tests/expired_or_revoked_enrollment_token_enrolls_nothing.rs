//! Enrollment tokens expire (7 days unless the operator says otherwise) and can be revoked while
//! unused. An expired or revoked token is refused with a sentence saying which, nothing is
//! enrolled, and a fresh token still works. A real agent holding an expired token stays
//! unenrolled and keeps retrying.

use fleet_tests::*;
use fleetctl::demo::{agent_config, wait_for};
use proto::wire::{EnrollRequest, ErrorBody};

async fn enroll(url: &str, token: &str) -> (u16, String) {
    let key = proto::keys::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let request = EnrollRequest {
        token: token.to_string(),
        public_key: proto::keys::public_key_hex(&key.verifying_key()),
        name: String::new(),
        labels: Default::default(),
    };
    let response = edge_agent::http::client().post(format!("{url}/api/v1/enroll")).json(&request).send().await.unwrap();
    let status = response.status().as_u16();
    let body = if status == 200 { String::new() } else { response.json::<ErrorBody>().await.unwrap().error };
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_and_revoked_tokens_are_refused_and_a_fresh_one_enrolls() {
    let fleet = Fleet::start(0, mqtt_from_env(), &[]).await;
    let url = fleet.server.url();
    // A token made two hours ago that was valid for one.
    let expired = hex::encode(rand::random::<[u8; 16]>());
    let now = fleet_server::unix_ms();
    let hash = fleet_server::api::sha256_hex(&expired);
    // A store call blocks (PostgreSQL's client would panic on a tokio worker): the blocking pool.
    let store = fleet.server.store.clone();
    tokio::task::spawn_blocking(move || store.create_tokens(&[hash], now - 2 * 3_600_000, now - 3_600_000))
        .await
        .unwrap()
        .unwrap();
    let (status, message) = enroll(&url, &expired).await;
    assert_eq!(
        (status, message.as_str()),
        (403, "enrollment token has expired; create a new one with `fleetctl tokens create`")
    );

    let revoked = fleet.client.tokens(1).await.unwrap().remove(0);
    fleet.client.revoke_token(&revoked).await.unwrap();
    let (status, message) = enroll(&url, &revoked).await;
    assert_eq!(status, 403);
    assert!(message.starts_with("enrollment token (or the device it enrolled) was revoked"), "{message}");
    assert!(fleet.client.revoke_token(&revoked).await.is_err(), "a token is revoked once");

    // A real agent with the expired token does not enroll; the server lists no device.
    let agent_dir = fleet.dir.path().join("late");
    let config = agent_config(&url, &fleet.server.mqtt_url, &expired, &fleet.public, agent_dir, 0);
    let agent = edge_agent::start(config).await.unwrap();
    let fresh = fleet.client.tokens_valid_for(1, Some(1)).await.unwrap().remove(0);
    let (status, _) = enroll(&url, &fresh).await;
    assert_eq!(status, 200, "a fresh token enrolls");
    let client = fleet.client.clone();
    let devices = wait_for("the fresh device", TIMEOUT, || async {
        let devices = client.devices().await.ok()?;
        (!devices.is_empty()).then_some(devices)
    })
    .await
    .unwrap();
    assert_eq!(devices.len(), 1, "only the fresh token enrolled: {devices:?}");
    assert_eq!(agent.device_id(), None, "the agent with the expired token is not enrolled");
    agent.shutdown().await;
    fleet.shutdown().await;
}
