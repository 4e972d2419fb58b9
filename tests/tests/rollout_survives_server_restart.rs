//! A fleet-server killed mid-rollout resumes exactly where it was: same wave, same soak, same
//! devices, and the rollout then completes.

use std::time::Duration;

use edge_agent::AgentHandle;
use fleet_server::rollout::create::OperatorAction;
use fleet_server::rollout::Phase;
use fleet_server::server::{self, free_loopback_port, Mqtt, ServerConfig};
use fleet_tests::*;
use fleetctl::client::FleetClient;
use fleetctl::demo::{agent_config, wait_for};

fn config(dir: &std::path::Path, http_port: u16, mqtt_port: u16, public: &str) -> ServerConfig {
    // The restarted server finds the same store: the same SQLite file or PostgreSQL schema.
    let (database_url, database_schema) = test_database(dir);
    ServerConfig {
        listen: ([127, 0, 0, 1], http_port).into(),
        data_dir: dir.join("server"),
        database_url,
        database_schema,
        mqtt: Mqtt::External { url: format!("mqtt://127.0.0.1:{mqtt_port}") },
        operator_token: Some("op".into()),
        trusted_keys: vec![public.to_string()],
        max_bundle_bytes: 64 << 20,
        rollout_tick: Duration::from_millis(100),
        ..ServerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_restarted_mid_rollout_resumes_the_same_wave_and_soak_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = new_key();
    let (http_port, mqtt_port) = (free_loopback_port().unwrap(), free_loopback_port().unwrap());
    fleet_server::broker::start_open(([127, 0, 0, 1], mqtt_port).into(), 70_000).unwrap();
    let first = server::start(config(dir.path(), http_port, mqtt_port, &public)).await.unwrap();
    let client = FleetClient::new(&first.url(), "op");
    let tokens = client.tokens(4).await.unwrap();
    let mut agents: Vec<AgentHandle> = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let c = agent_config(&first.url(), &first.mqtt_url, token, &public, dir.path().join(format!("a{i}")), i);
        agents.push(edge_agent::start(c).await.unwrap());
    }
    client.publish(fixture_bundle(&secret, "1.0.0", MLP).unwrap()).await.unwrap();
    client.publish(bundle_with_golden(&secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await.unwrap();
    wait_for("enrollment", TIMEOUT, || async { (client.devices().await.ok()?.len() == 4).then_some(()) })
        .await
        .unwrap();
    client
        .deploy(&proto::wire::DeployRequest {
            model: "tabular".into(),
            version: "1.0.0".into(),
            devices: None,
            selector: None,
        })
        .await
        .unwrap();
    wait_for("1.0.0 everywhere", TIMEOUT, || async {
        let all = client.devices().await.ok()?;
        all.iter().all(|d| d.models.iter().any(|m| m.active_version.as_deref() == Some("1.0.0"))).then_some(())
    })
    .await
    .unwrap();

    let plan = two_waves_soaking_an_hour();
    let id = client.start_rollout(&plan).await.unwrap().rollout.id;
    let before = wait_for("wave 1 to pass and soak", TIMEOUT, || async {
        let view = client.rollout(&id).await.ok()?;
        view.rollout.soak_until_ms.is_some().then_some(view)
    })
    .await
    .unwrap();
    assert_eq!((before.rollout.wave, before.summary.active), (0, 2));

    first.shutdown().await;
    let second = wait_for("the port to be free again", TIMEOUT, || async {
        server::start(config(dir.path(), http_port, mqtt_port, &public)).await.ok()
    })
    .await
    .unwrap();
    // A new client: the old one's pooled connection belongs to the server that was stopped.
    let client = FleetClient::new(&second.url(), "op");
    let after = client.rollout(&id).await.unwrap();
    assert_eq!(after.rollout, before.rollout, "the restarted server must hold exactly the same rollout");
    assert_eq!(after.rollout.phase, Phase::Running);

    client.rollout_action(&id, OperatorAction::Promote).await.unwrap();
    // Wave 2 installs on the other two devices and soaks too (every wave soaks); end it early.
    wait_for("wave 2 to pass and soak", TIMEOUT, || async {
        let view = client.rollout(&id).await.ok()?;
        (view.rollout.wave == 1 && view.rollout.soak_until_ms.is_some()).then_some(())
    })
    .await
    .unwrap();
    client.rollout_action(&id, OperatorAction::Promote).await.unwrap();
    let done = wait_for("the rollout to complete", TIMEOUT, || async {
        let view = client.rollout(&id).await.ok()?;
        (view.rollout.phase == Phase::Completed).then_some(view)
    })
    .await
    .unwrap();
    assert_eq!(done.summary.active, 4);
    let audit = client.audit(Some(&id)).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions.first(), Some(&"created"));
    assert!(actions.contains(&"promote") && actions.last() == Some(&"completed"), "{actions:?}");
    assert!(audit.iter().any(|e| e.action == proto::wire::AuditAction::Promote && e.actor != "engine"));
    for agent in &agents {
        agent.shutdown().await;
    }
    second.shutdown().await;
}
