//! Server + 3 agents over the in-process broker: a signed bundle is verified and activated,
//! `/v1/infer` answers exactly what raw tract answers, telemetry is buffered in SQLite and
//! reaches the server once per row, and the server receives drift summaries from every agent.

use fleet_tests::*;
use fleetctl::demo::wait_for;
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
        // Committed to the agent's SQLite buffer (the uploader may already have sent some).
        let buffered = agent.telemetry.flush().await.unwrap();
        assert!(buffered <= 30, "{buffered} rows buffered for 30 inferences");
    }
    // Buffered rows reach the server, each once, with the version that served them.
    let client = fleet.client.clone();
    let ids: Vec<String> = fleet.agents.iter().map(|a| a.device_id().unwrap()).collect();
    wait_for("30 telemetry rows per agent on the server", TIMEOUT, || async {
        let views = client.delivery().await.ok()?;
        ids.iter().all(|id| views.iter().any(|v| &v.device == id && v.telemetry_stored == 30)).then_some(())
    })
    .await
    .unwrap();
    let rows = fleet.client.telemetry_page("tabular", None, None, None).await.unwrap();
    assert_eq!(rows.len(), 90);
    assert!(rows.iter().all(|r| r.row.version == "1.0.0"), "telemetry recorded under another version");

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
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_sees_each_versions_lineage_and_how_a_device_got_what_it_runs() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.0.0").await;
    fleet.wait_active("tabular", "2.0.0").await;

    let models = fleet.client.models().await.unwrap();
    assert_eq!(models.iter().map(|m| m.version.as_str()).collect::<Vec<_>>(), ["1.0.0", "2.0.0"]);
    assert!(models.iter().all(|m| m.lineage.code_commit == "3c9e1f0" && m.lineage.metrics["accuracy"] == 0.91));
    assert!(models[1].lineage.training_data.starts_with("sha256:"));

    let id = fleet.agents[0].device_id().unwrap();
    let detail = fleet.client.device(&id).await.unwrap();
    let m = &detail.models[0];
    assert_eq!((m.active_version.as_deref(), m.previous_version.as_deref()), (Some("2.0.0"), Some("1.0.0")));
    assert_eq!(m.bundle_sha256.as_deref(), Some(models[1].sha256.as_str()));
    assert_eq!(m.installed_by.as_deref(), Some("deployment"));
    assert!(m.installed_ms.is_some() && m.lineage.as_ref().unwrap().code_commit == "3c9e1f0");
    // Newest first: 2.0.0's steps, down to 1.0.0 going active.
    assert_eq!(m.history[0].step, proto::wire::UpdateStep::Active);
    assert!(m.history.iter().any(|e| e.version == "1.0.0" && e.step == proto::wire::UpdateStep::Active));
    assert!(fleet.client.device("dev-nobody").await.unwrap_err().to_string().contains("no device dev-nobody"));
    fleet.shutdown().await;
}
