//! `fleetctl devices revoke`: the revoked device's MQTT session is closed and it cannot connect
//! again, its credential is refused on check-in and download, and nothing more it reports is
//! stored, while its agent keeps serving the model it has. The other devices are unaffected.
//! A device may download only bundles its desired state names.

use std::time::Duration;

use fleet_tests::*;
use fleetctl::demo::wait_for;
use proto::wire::CheckinRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_device_is_disconnected_refused_and_ignored_but_keeps_serving() {
    let fleet = Fleet::serving_v1(2, embedded_mqtt(), &[]).await;
    let url = fleet.server.url();
    let (revoked, kept) = (fleet.agents[0].device_id().unwrap(), fleet.agents[1].device_id().unwrap());
    let (by_hand, credential) = enroll_by_hand(&url, &fleet.client).await;
    // Published, and desired by nobody (the fleet's default for newcomers is 1.0.0).
    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    let http = edge_agent::http::client();
    let download = |credential: String| {
        let http = http.clone();
        let url = format!("{url}/api/v1/bundles/tabular/2.0.0");
        async move { http.get(url).bearer_auth(credential).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(download(credential.clone()).await, 403, "2.0.0 is not in the hand-made device's desired state");

    fleet.client.revoke_device(&revoked).await.unwrap();
    // Revoked while its MQTT session is open: the broker closes it.
    let (client, id) = (fleet.client.clone(), by_hand.clone());
    let open_session = mqtt_try(&fleet.server.mqtt_url, Some((&by_hand, &credential)), |_session| async move {
        client.revoke_device(&id).await.unwrap();
    })
    .await;
    assert_eq!(open_session, MqttOutcome::Closed, "the revoked device's open MQTT session survived its revocation");
    let checkin = http
        .post(format!("{url}/api/v1/devices/{by_hand}/checkin"))
        .bearer_auth(&credential)
        .json(&CheckinRequest { models: Vec::new() })
        .send()
        .await
        .unwrap();
    assert_eq!(checkin.status().as_u16(), 401, "check-in with a revoked credential");
    assert_eq!(download(credential.clone()).await, 401, "download with a revoked credential");
    let outcome = mqtt_try(&fleet.server.mqtt_url, Some((&by_hand, &credential)), |_client| async {}).await;
    assert!(matches!(outcome, MqttOutcome::Refused(_)), "MQTT with a revoked credential: {outcome:?}");

    // Heartbeats every 0.5 s: the kept device's count grows while the revoked one's stands still.
    let stored = |views: &[proto::delivery::DeliveryView], device: &str| {
        views.iter().find(|v| v.device == device).map_or(0, |v| v.reports_stored)
    };
    let client = fleet.client.clone();
    let first = client.delivery().await.unwrap();
    let (revoked_at, kept_at) = (stored(&first, &revoked), stored(&first, &kept));
    let later = wait_for("the kept device to report 10 more records", TIMEOUT, || async {
        let views = client.delivery().await.ok()?;
        (stored(&views, &kept) >= kept_at + 10).then_some(views)
    })
    .await
    .unwrap();
    // One in-flight batch may land just after the revocation; nothing after it.
    assert!(stored(&later, &revoked) <= revoked_at + 1, "revoked device still stored: {later:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let last = client.delivery().await.unwrap();
    assert_eq!(stored(&last, &revoked), stored(&later, &revoked), "reports from the revoked device stored: {last:?}");

    let devices = fleet.client.devices().await.unwrap();
    assert!(devices.iter().find(|d| d.id == revoked).unwrap().revoked_ms.is_some());
    assert!(devices.iter().find(|d| d.id == kept).unwrap().revoked_ms.is_none());
    // The revoked agent still answers with the model it has.
    let (status, answer) = infer(&fleet.agents[0], serde_json::json!({ "inputs": [vec![0.0f32; 8]] })).await;
    assert_eq!(status, 200, "{answer}");
    fleet.shutdown().await;
}
