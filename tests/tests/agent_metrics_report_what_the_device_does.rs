//! The device's Prometheus endpoint (config `metrics_listen`, loopback only) reports what the
//! agent did: requests answered per model and version with their latency histogram, the model's
//! last update step and how long ago a check-in reply was accepted. This agent joins after the
//! fleet's deployment and gets the version as its cohort's default.

use fleet_tests::*;
use fleetctl::demo::{agent_config, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agents_metrics_count_its_requests_and_show_its_update_step_and_checkin_age() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    let token = fleet.client.tokens(1).await.unwrap().remove(0);
    let mut config = agent_config(
        &fleet.server.url(),
        &fleet.server.mqtt_url,
        &token,
        &fleet.public,
        fleet.dir.path().join("metered"),
        7,
    );
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let agent = edge_agent::start(config).await.unwrap();
    let metrics_url = format!("http://{}/metrics", agent.metrics_addr.expect("a metrics address"));
    wait_for("the newcomer to serve 1.0.0", TIMEOUT, || async {
        let (status, answer) = infer(&agent, serde_json::json!({ "inputs": [vec![0.1f32; 8]] })).await;
        (status == 200 && answer["version"] == "1.0.0").then_some(())
    })
    .await
    .unwrap();
    for _ in 0..3 {
        assert_eq!(infer(&agent, serde_json::json!({ "inputs": [vec![0.2f32; 8]] })).await.0, 200);
    }
    let http = edge_agent::http::client();
    let text = wait_for("the metrics to show the active step and a check-in", TIMEOUT, || async {
        let text = http.get(&metrics_url).send().await.ok()?.text().await.ok()?;
        let ready = text.contains("edge_update_step{model=\"tabular\",version=\"1.0.0\",step=\"active\"} 1")
            && text.contains("edge_checkin_age_seconds ");
        ready.then_some(text)
    })
    .await
    .unwrap();
    let answered = text
        .lines()
        .find_map(|l| l.strip_prefix("edge_inferences_total{model=\"tabular\",version=\"1.0.0\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("an inference counter for tabular 1.0.0");
    assert!(answered >= 4, "{answered} requests counted, at least 4 were answered");
    assert!(
        text.contains("edge_inference_duration_seconds_count{model=\"tabular\",version=\"1.0.0\"} "),
        "no latency histogram in\n{text}"
    );
    agent.shutdown().await;
    fleet.shutdown().await;
}
