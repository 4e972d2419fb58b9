//! Reports prove which device sent them, whichever broker carries them (here one that admits
//! anyone, as a Mosquitto with its default config does): a status forged by an anonymous client (signed with
//! another key, or in the envelope of before signatures), and a real signed status replayed on
//! another device's topic, are dropped and counted as rejected with one log line each; the same
//! real status replayed on its own topic is a duplicate, stored once. The server's view of both
//! devices is unchanged.

use std::time::Duration;

use fleet_tests::*;
use fleetctl::demo::wait_for;
use proto::delivery::sealed_payload;
use proto::keys::SigningKey;
use proto::wire::{encode, Topic, UpdateStatus, UpdateStep};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_and_misplaced_reports_are_rejected_and_a_replay_is_stored_once() {
    let fleet = Fleet::start(2, open_mqtt(), &[]).await;
    let (a, b) = (fleet.agents[0].device_id().unwrap(), fleet.agents[1].device_id().unwrap());
    let (host, port) = proto::endpoint::parse_mqtt_url(&fleet.server.mqtt_url).unwrap();
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(format!("intruder-{}", rand::random::<u32>()), host, port), 64);
    let status_a = Topic::Status { device: a.clone(), model: "tabular".into() }.render();
    let status_b = Topic::Status { device: b.clone(), model: "tabular".into() }.render();
    client.subscribe(status_a.clone(), QoS::AtLeastOnce).await.unwrap();
    let (captured_tx, mut captured) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = captured_tx.send(p.payload.to_vec()).await;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.publish(fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap()).await;
    fleet.deploy_all("tabular", "1.0.0").await;
    fleet.wait_active("tabular", "1.0.0").await;
    // One of device A's own signed status reports, as it went over the broker.
    let real = tokio::time::timeout(TIMEOUT, captured.recv()).await.unwrap().unwrap();
    let before = fleet.client.delivery().await.unwrap();
    let duplicates_a = before.iter().find(|v| v.device == a).unwrap().reports_duplicates;

    let failed = UpdateStatus {
        model: "tabular".into(),
        version: "1.0.0".into(),
        step: UpdateStep::Failed,
        detail: "forged".into(),
        active_version: None,
        at_ms: u64::MAX / 2,
    };
    let intruder = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let forged = sealed_payload(&intruder, &status_a, 1_000_000, 1, &encode(&failed));
    let mut unsigned = encode(&(1_000_001u64, 1u64));
    unsigned.extend_from_slice(&encode(&failed));
    for (topic, payload) in [(&status_a, forged), (&status_a, unsigned), (&status_b, real.clone()), (&status_a, real)] {
        client.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await.unwrap();
    }

    let client = fleet.client.clone();
    let (a2, b2) = (a.clone(), b.clone());
    let views = wait_for("the forged reports to be counted", TIMEOUT, || async {
        let views = client.delivery().await.ok()?;
        let rejected = |d: &str| views.iter().find(|v| v.device == d).map(|v| v.rejected);
        (rejected(&a2) == Some(2) && rejected(&b2) == Some(1)).then_some(views)
    })
    .await
    .unwrap();
    let view_a = views.iter().find(|v| v.device == a).unwrap();
    assert!(view_a.reports_duplicates > duplicates_a, "the replay is counted as a duplicate: {view_a:?}");
    for device in fleet.client.devices().await.unwrap() {
        let model = device.models.iter().find(|m| m.name == "tabular").unwrap();
        assert_eq!(model.step, Some(UpdateStep::Active), "{} shows a forged status: {model:?}", device.id);
        assert_ne!(model.detail, "forged");
    }
    // Both devices still serve the model the forged status claimed had failed.
    for agent in &fleet.agents {
        let (status, answer) = infer(agent, serde_json::json!({ "inputs": [vec![0.1f32; 8]] })).await;
        assert_eq!((status, answer["version"].as_str()), (200, Some("1.0.0")), "{answer}");
    }
    fleet.shutdown().await;
}
