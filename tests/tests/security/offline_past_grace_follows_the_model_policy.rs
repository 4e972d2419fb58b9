//! A device cut off from its server keeps serving for each model's signed grace period after its
//! last fresh reply expired, then follows the model's signed policy: keep serving with every
//! answer flagged stale, or stop serving; a fresh reply puts it back.

use edge_agent::AgentHandle;
use fleet_tests::stub::HttpStub;
use fleet_tests::*;
use fleetctl::demo::{fixture_metadata, signed_bundle, wait_for, GOLDEN};
use proto::freshness::{OfflinePolicy, OnStale};

async fn answer(agent: &AgentHandle, model: &str) -> (u16, serde_json::Value) {
    infer_model(agent, model, serde_json::json!({ "inputs": [vec![0.1f32; 8]] })).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_grace_period_one_model_answers_flagged_stale_and_the_other_stops() {
    let root_key = proto::keys::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    // Replies stay fresh for 6 s, and both models' grace periods are 0 days.
    let fleet = Fleet::start_rooted_fresh_for(1, mqtt_from_env(), &root_key, std::time::Duration::from_secs(6)).await;
    for (name, on_stale) in [("tabular", OnStale::KeepServing), ("strict", OnStale::StopServing)] {
        let mut metadata = fixture_metadata("1.0.0").unwrap();
        metadata.name = name.into();
        metadata.offline = Some(OfflinePolicy { grace_days: 0, on_stale });
        fleet.publish(signed_bundle(&fleet.secret, metadata, MLP, GOLDEN).unwrap()).await;
        fleet.deploy_all(name, "1.0.0").await;
        fleet.wait_active(name, "1.0.0").await;
    }
    // Online, both serve unflagged (installs hold check-ins back for a moment, hence the wait).
    let agent = &fleet.agents[0];
    wait_for("both models to serve fresh", TIMEOUT, || async {
        let fresh = answer(agent, "strict").await.0 == 200 && answer(agent, "tabular").await.1.get("stale").is_none();
        fresh.then_some(())
    })
    .await
    .unwrap();

    // The site loses its server: check-ins go to a stub that answers nothing useful.
    agent.shutdown().await;
    let stub = HttpStub::start("not json".into()).await;
    let mut config = crate::enrolled_config(&fleet, &stub.url());
    let offline = edge_agent::start(config.clone()).await.unwrap();
    let (status, refusal) = wait_for("strict to stop serving", TIMEOUT, || async {
        let (status, body) = answer(&offline, "strict").await;
        (status == 503).then_some((status, body))
    })
    .await
    .unwrap();
    assert_eq!(status, 503);
    let message = refusal["error"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("no fresh signed instructions"), "{message}");
    let (status, flagged) = answer(&offline, "tabular").await;
    assert_eq!((status, flagged["stale"].as_bool()), (200, Some(true)), "{flagged}");

    // Back online: the next fresh reply lifts both.
    offline.shutdown().await;
    config.server_url = fleet.server.url();
    let online = edge_agent::start(config).await.unwrap();
    wait_for("strict to serve again", TIMEOUT, || async { (answer(&online, "strict").await.0 == 200).then_some(()) })
        .await
        .unwrap();
    assert_eq!(answer(&online, "tabular").await.1.get("stale"), None);
    online.shutdown().await;
    fleet.server.shutdown().await;
}
