//! The embedded broker knows who is speaking: anonymous clients, wrong passwords and a credential
//! presented under another device's id are refused at CONNECT; an enrolled device may publish
//! and subscribe below its own topic root only, and is disconnected the moment it publishes or
//! subscribes under another device's id or a wildcard over the fleet. Nothing reaches the other
//! device's records.

use fleet_tests::*;
use proto::wire::Topic;
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strangers_are_refused_and_a_device_is_kept_to_its_own_topics() {
    let fleet = Fleet::start(0, embedded_mqtt(), &[]).await;
    let url = fleet.server.mqtt_url.clone();
    let (a, credential_a) = enroll_by_hand(&fleet.server.url(), &fleet.client).await;
    let (b, credential_b) = enroll_by_hand(&fleet.server.url(), &fleet.client).await;
    let nothing = |_client: rumqttc::AsyncClient| async {};

    // Who may connect at all.
    assert!(matches!(mqtt_try(&url, None, nothing).await, MqttOutcome::Refused(_)), "anonymous");
    assert!(matches!(mqtt_try(&url, Some((&a, "wrong")), nothing).await, MqttOutcome::Refused(_)), "wrong password");
    assert!(
        matches!(mqtt_try(&url, Some((&b, &credential_a)), nothing).await, MqttOutcome::Refused(_)),
        "a's credential under b's id"
    );
    assert!(
        matches!(mqtt_try(&url, Some(("fleet-server", "guess")), nothing).await, MqttOutcome::Refused(_)),
        "the server's own username with a guessed password"
    );
    assert_eq!(mqtt_try(&url, Some((&a, &credential_a)), nothing).await, MqttOutcome::Up);

    // What a connected device may do.
    let own_desired = Topic::Desired { device: a.clone() }.render();
    let own_heartbeat = Topic::Heartbeat { device: a.clone() }.render();
    let outcome = mqtt_try(&url, Some((&a, &credential_a)), |client| async move {
        client.subscribe(own_desired, QoS::AtLeastOnce).await.unwrap();
        client.publish(own_heartbeat, QoS::AtLeastOnce, false, b"not signed".to_vec()).await.unwrap();
    })
    .await;
    assert_eq!(outcome, MqttOutcome::Up, "own topics are fine");

    let foreign_heartbeat = Topic::Heartbeat { device: b.clone() }.render();
    let outcome = mqtt_try(&url, Some((&a, &credential_a)), |client| async move {
        client.publish(foreign_heartbeat, QoS::AtLeastOnce, false, b"as b".to_vec()).await.unwrap();
    })
    .await;
    assert_eq!(outcome, MqttOutcome::Closed, "publishing under b's id");
    for filter in [Topic::Desired { device: b.clone() }.render(), "fleet/v1/devices/+/ack".into(), "#".into()] {
        let subscribe = filter.clone();
        let outcome = mqtt_try(&url, Some((&a, &credential_a)), |client| async move {
            client.subscribe(subscribe, QoS::AtLeastOnce).await.unwrap();
        })
        .await;
        assert_eq!(outcome, MqttOutcome::Closed, "subscribing to {filter}");
    }
    // b is unaffected and nothing was stored under its id.
    assert_eq!(mqtt_try(&url, Some((&b, &credential_b)), nothing).await, MqttOutcome::Up);
    let delivery = fleet.client.delivery().await.unwrap();
    // A device that never had a report stored may have no delivery row at all: zero either way.
    let counts = delivery.iter().find(|v| v.device == b).map_or((0, 0), |v| (v.reports_stored, v.rejected));
    assert_eq!(counts, (0, 0), "something was stored or rejected under b's id: {delivery:?}");
    fleet.shutdown().await;
}
