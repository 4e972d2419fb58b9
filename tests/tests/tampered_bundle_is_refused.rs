//! A bundle that is not exactly what a trusted key signed never runs; the previous model keeps
//! serving and the device reports why.

use fleet_tests::*;
use proto::wire::UpdateStep;

async fn fleet_serving_v1(extra_server_keys: &[String]) -> Fleet {
    Fleet::serving_v1(1, mqtt_from_env(), extra_server_keys).await
}

async fn assert_still_serving_v1(fleet: &Fleet) {
    let (status, answer) = infer(&fleet.agents[0], serde_json::json!({ "inputs": [vec![0.0f32; 8]] })).await;
    assert_eq!((status, answer["version"].as_str()), (200, Some("1.0.0")), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_signed_by_a_key_the_device_does_not_trust_is_refused_and_v1_keeps_serving() {
    let (rogue_secret, rogue_public) = new_key();
    let fleet = fleet_serving_v1(&[rogue_public]).await;
    fleet.publish(fixture_bundle(&rogue_secret, "1.1.0", MLP).unwrap()).await;
    fleet.deploy_all("tabular", "1.1.0").await;
    let devices =
        fleet.wait_devices("the device to refuse 1.1.0", "tabular", |m| m.step == Some(UpdateStep::Failed)).await;
    let detail = &devices[0].models[0].detail;
    assert!(detail.contains("signed only by untrusted key"), "{detail}");
    assert_eq!(devices[0].models[0].active_version.as_deref(), Some("1.0.0"));
    assert_still_serving_v1(&fleet).await;
    fleet.shutdown().await;
}

/// Replaces the server's stored bundle with `bytes` and its recorded digest, as an attacker who
/// controls the server's storage would: the transport check passes, only the signature can catch it.
fn replace_stored_bundle(fleet: &Fleet, version: &str, bytes: &[u8]) {
    let server_dir = fleet.dir.path().join("server");
    std::fs::write(server_dir.join(format!("bundles/tabular/{version}.bundle")), bytes).unwrap();
    store_sql(
        fleet.dir.path(),
        "UPDATE bundles SET sha256 = $1, size = $2 WHERE name = 'tabular' AND version = $3",
        &[
            SqlValue::Text(&proto::bundle::sha256_hex(bytes)),
            SqlValue::Int(bytes.len() as i64),
            SqlValue::Text(version),
        ],
    );
}

/// Publishes a genuine 1.1.0, swaps the stored copy for one `tamper` changed, deploys it and
/// returns the device's failure detail once it refused the bundle (v1 still serving).
async fn deploy_tampered(fleet: &Fleet, tamper: impl FnOnce(&mut proto::bundle::UnverifiedBundle)) -> String {
    let genuine = fixture_bundle(&fleet.secret, "1.1.0", MLP).unwrap();
    fleet.publish(genuine.clone()).await;
    let mut archive = proto::bundle::read_archive(&genuine, &Default::default()).unwrap();
    tamper(&mut archive);
    let tampered = proto::bundle::write_archive(&archive.manifest_bytes, &archive.files, &archive.signatures);
    assert_ne!(tampered, genuine, "the tampering must change the bundle");
    replace_stored_bundle(fleet, "1.1.0", &tampered);
    fleet.deploy_all("tabular", "1.1.0").await;
    let devices =
        fleet.wait_devices("the device to refuse 1.1.0", "tabular", |m| m.step == Some(UpdateStep::Failed)).await;
    assert_still_serving_v1(fleet).await;
    devices[0].models[0].detail.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_byte_changed_on_the_server_is_refused_as_altered_and_v1_keeps_serving() {
    let fleet = fleet_serving_v1(&[]).await;
    let detail = deploy_tampered(&fleet, |archive| {
        let model = archive.files.get_mut("model.onnx").unwrap();
        let last = model.len() - 1;
        model[last] ^= 0x01;
    })
    .await;
    assert!(detail.contains("\"model.onnx\" has sha256") && detail.contains("the file was altered"), "{detail}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_changed_on_the_server_fails_the_signature_and_v1_keeps_serving() {
    let fleet = fleet_serving_v1(&[]).await;
    let detail = deploy_tampered(&fleet, |archive| {
        let genuine = archive.manifest_bytes.clone();
        let text = String::from_utf8(genuine.clone()).unwrap();
        archive.manifest_bytes = text.replace("\"tolerance\": 0.0001", "\"tolerance\": 0.5").into_bytes();
        assert_ne!(archive.manifest_bytes, genuine, "the tolerance edit must change the manifest");
    })
    .await;
    assert!(detail.contains("does not match the manifest"), "{detail}");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_refuses_to_publish_a_bundle_it_cannot_verify() {
    let fleet = Fleet::start(0, mqtt_from_env(), &[]).await;
    let (rogue, _) = new_key();
    let err = fleet.client.publish(fixture_bundle(&rogue, "1.0.0", MLP).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("bundle refused: bundle is signed only by untrusted key"), "{err}");
    let err = fleet.client.publish(b"not a tar".to_vec()).await.unwrap_err();
    assert!(err.to_string().contains("bundle refused"), "{err}");
    fleet.shutdown().await;
}
