//! An offline site loses nothing: while the MQTT broker is unreachable the agent keeps serving
//! and keeps its drift summaries in the SQLite outbox; when the broker comes back every summary
//! reaches the server, the server acknowledges each, and only then does the outbox drain.

use fleet_server::server::{free_loopback_port, Mqtt};
use fleet_tests::*;
use fleetctl::demo::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drift_summaries_buffered_while_the_broker_is_down_arrive_when_it_returns() {
    let port = free_loopback_port().unwrap();
    let fleet = Fleet::start(1, Mqtt::External { url: format!("mqtt://127.0.0.1:{port}") }, &[]).await;
    fleet.publish(fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap()).await;
    fleet.deploy_all("tabular", "1.0.0").await;
    // Desired state and status still flow over HTTP check-in while MQTT is down.
    fleet.wait_active("tabular", "1.0.0").await;

    let agent = &fleet.agents[0];
    for window in 0..3 {
        let (status, _) = infer(agent, serde_json::json!({ "inputs": synthetic_rows(window, 20, 0.0) })).await;
        assert_eq!(status, 200);
        agent.report_drift_now().await;
    }
    let buffered: usize = 3;
    assert!(agent.delivery().await.unwrap().pending >= buffered as u64, "the windows wait in the outbox");
    let devices = fleet.client.devices().await.unwrap();
    assert_eq!(devices[0].models[0].drift_summaries, 0, "nothing can have arrived without a broker");

    fleet_server::broker::start_open(([127, 0, 0, 1], port).into(), 70_000).unwrap();
    fleet
        .wait_devices("every buffered drift summary to arrive", "tabular", |m| m.drift_summaries as usize >= buffered)
        .await;
    wait_for("the outbox to drain", TIMEOUT, || async { (agent.delivery().await.ok()?.pending == 0).then_some(()) })
        .await
        .unwrap();
    fleet.shutdown().await;
}
