//! Malformed input never crashes anything: garbage postcard on every topic the server and the
//! agent read, and garbage bodies on every device route, are logged and dropped; both keep
//! working and a valid record sent afterwards is stored.

use std::time::Duration;

use fleet_tests::*;
use fleetctl::demo::wait_for;
use proto::wire::Topic;
use rumqttc::{AsyncClient, MqttOptions, QoS};

const GARBAGE: [&[u8]; 4] = [b"", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x01\x01", b"not postcard at all"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_every_topic_and_route_is_dropped_and_both_sides_keep_working() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    let agent = &fleet.agents[0];
    let device = agent.device_id().unwrap();
    let (host, port) = proto::endpoint::parse_mqtt_url(&fleet.server.mqtt_url).unwrap();
    let mut options = MqttOptions::new(format!("garbage-{}", rand::random::<u32>()), host, port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let topics = [
        Topic::Heartbeat { device: device.clone() },
        Topic::Status { device: device.clone(), model: "tabular".into() },
        Topic::Drift { device: device.clone(), model: "tabular".into() },
        Topic::Events { device: device.clone() },
        Topic::Desired { device: device.clone() },
        Topic::Ack { device: device.clone() },
    ];
    for topic in &topics {
        for garbage in GARBAGE {
            client.publish(topic.render(), QoS::AtLeastOnce, false, garbage.to_vec()).await.unwrap();
        }
        // Over the payload limit: refused by size before decoding.
        client.publish(topic.render(), QoS::AtLeastOnce, false, vec![0u8; 70_000]).await.unwrap();
    }

    let http = edge_agent::http::client();
    let state = edge_agent::state::StateDb::open(&agent.data_dir.join("agent.db")).unwrap();
    let credential = state.identity().unwrap().unwrap().credential;
    let base = fleet.server.url();
    for (path, body) in [
        ("/api/v1/enroll".to_string(), b"{\"token\": 7}".to_vec()),
        ("/api/v1/enroll".to_string(), b"\xff\xfe".to_vec()),
        (format!("/api/v1/devices/{device}/checkin"), b"[1,2,3]".to_vec()),
        (format!("/api/v1/devices/{device}/telemetry"), b"\xff\xff\xff\xff\xff".to_vec()),
        (format!("/api/v1/devices/{device}/telemetry"), vec![0u8; 2 << 20]),
    ] {
        let response = http
            .post(format!("{base}{path}"))
            .bearer_auth(&credential)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error(), "{path}: {}", response.status());
    }
    let (status, _) = infer(agent, serde_json::json!({ "inputs": "rows" })).await;
    assert_eq!(status, 400, "garbage on the local API is a client error");

    // Both sides still work: a new drift window is stored, the agent still serves.
    let before = fleet.client.devices().await.unwrap()[0].models[0].drift_summaries;
    let (status, _) = infer(agent, serde_json::json!({ "inputs": synthetic_rows(3, 10, 0.0) })).await;
    assert_eq!(status, 200);
    agent.report_drift_now().await;
    wait_for("a valid window after the garbage to be stored", TIMEOUT, || async {
        (fleet.client.devices().await.ok()?[0].models[0].drift_summaries > before).then_some(())
    })
    .await
    .unwrap();
    wait_for("the agent's outbox to drain", TIMEOUT, || async {
        (agent.delivery().await.ok()?.pending == 0).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    fleet.shutdown().await;
}
