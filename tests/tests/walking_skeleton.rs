//! Server + 3 agents over the in-process broker: a signed bundle is verified and activated,
//! `/v1/infer` answers exactly what raw tract answers, telemetry lands in SQLite, and the server
//! receives drift summaries from every agent.

use fleet_tests::*;
use model_runtime::raw_tract_run;

pub async fn skeleton_scenario(mqtt: fleet_server::server::Mqtt) {
    let fleet = Fleet::start(3, mqtt, &[]).await;
    let info = fleet.publish(fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap()).await;
    assert_eq!((info.name.as_str(), info.version.as_str()), ("tabular", "1.0.0"));
    fleet.deploy_all("tabular", "1.0.0").await;
    fleet.wait_active("tabular", "1.0.0").await;

    for (index, agent) in fleet.agents.iter().enumerate() {
        let rows = synthetic_rows(index as u64, 30, 0.0);
        let (status, answer) = infer(agent, serde_json::json!({ "inputs": rows })).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["version"], "1.0.0");
        for (row, output) in rows.iter().zip(answer["outputs"].as_array().unwrap()) {
            let served: Vec<f32> = serde_json::from_value(output.clone()).unwrap();
            assert_eq!(served, raw_tract_run(MLP, &[1, 8], row).unwrap(), "agent {index} differs from raw tract");
        }
        assert_eq!(agent.telemetry.flush().await, Some(30));
        let db = rusqlite::Connection::open(agent.data_dir.join("telemetry.db")).unwrap();
        let (rows_on_disk, version): (i64, String) = db
            .query_row("SELECT COUNT(*), MAX(version) FROM telemetry WHERE model = 'tabular'", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((rows_on_disk, version.as_str()), (30, "1.0.0"));
    }

    let devices = fleet
        .wait_devices("a drift summary and 30 inferences from every agent", "tabular", |m| {
            m.drift_summaries >= 1 && m.inferences >= 30
        })
        .await;
    for device in devices {
        let model = &device.models[0];
        assert!(model.drift_score.unwrap().is_finite());
        assert!(device.health.as_ref().unwrap().memory_total_bytes > 0, "heartbeat health missing");
    }
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signed_bundle_reaches_three_agents_and_is_served_like_raw_tract_with_drift_reported() {
    skeleton_scenario(embedded_mqtt()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_path_runs_over_an_external_broker_when_one_is_named() {
    match std::env::var("FLEET_TEST_MQTT_URL") {
        Ok(url) if !url.is_empty() => skeleton_scenario(fleet_server::server::Mqtt::External { url }).await,
        _ => eprintln!("skipped: set FLEET_TEST_MQTT_URL=mqtt://127.0.0.1:1883 to run against Mosquitto"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_inference_request_gets_a_400_that_says_what_is_wrong() {
    let fleet = Fleet::serving_v1(1, embedded_mqtt(), &[]).await;
    let agent = &fleet.agents[0];
    let (status, body) = infer(agent, serde_json::json!({ "inputs": [[1.0, 2.0]] })).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("input row 0 has 2 values; model \"tabular\" expects 8"),
        "{body}"
    );
    let (status, body) = infer(agent, serde_json::json!({ "rows": [] })).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("inputs"), "{body}");
    fleet.shutdown().await;
}
