//! A server that answers check-ins with a desired version that walks out of the model directory,
//! a bundle path that points at another host, or a malformed digest: the agent refuses each
//! before using it in a path or URL. Nothing is written for them, the credential goes nowhere
//! else, and 1.0.0 keeps serving.

use fleet_tests::stub::HttpStub;
use fleet_tests::*;
use fleetctl::demo::wait_for;
use proto::wire::{bundle_path, DesiredModel, DesiredState};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn traversing_versions_foreign_bundle_urls_and_bad_digests_are_refused_while_1_0_0_serves() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    let agent = &fleet.agents[0];
    let agent_dir = fleet.agent_dir(0);
    agent.shutdown().await;

    // Where a stolen credential would go.
    let stolen = HttpStub::start(String::new()).await;
    let elsewhere = stolen.addr;
    let honest = |version: &str| DesiredModel {
        name: "tabular".into(),
        version: version.into(),
        bundle_path: bundle_path("tabular", version),
        bundle_sha256: "ab".repeat(32),
        bundle_size: 1000,
        attempt: 0,
        shadow: None,
        activation_window: None,
    };
    let traversal = "x/../../../../escaped";
    let desired = DesiredState {
        revision: 99,
        models: vec![
            honest(traversal),
            DesiredModel { bundle_path: format!("@{elsewhere}/api/v1/bundles/tabular/2.0.0"), ..honest("2.0.0") },
            DesiredModel { bundle_sha256: "../../etc".into(), ..honest("3.0.0") },
            DesiredModel { name: "../models".into(), ..honest("4.0.0") },
        ],
        root_version: None,
        freshness: None,
    };
    let hostile = HttpStub::start(serde_json::to_string(&desired).unwrap()).await;
    let mut config = fleetctl::demo::agent_config(
        &hostile.url(),
        &fleet.server.mqtt_url,
        "unused",
        &fleet.public,
        agent_dir.clone(),
        0,
    );
    config.enrollment_token = None;
    config.intervals.checkin_secs = 0.2;
    let agent = edge_agent::start(config).await.unwrap();
    wait_for("several check-ins with the hostile server", TIMEOUT, || async {
        (hostile.requests() >= 5).then_some(())
    })
    .await
    .unwrap();

    assert_eq!(stolen.requests(), 0, "the credential was sent to another host");
    let (status, answer) = infer(&agent, serde_json::json!({ "inputs": [vec![0.1f32; 8]] })).await;
    assert_eq!((status, answer["version"].as_str()), (200, Some("1.0.0")), "{answer}");
    // Nothing was written for the refused versions: no update record, no download, no directory.
    let state = rusqlite::Connection::open(agent_dir.join("agent.db")).unwrap();
    let versions: Vec<String> = state
        .prepare("SELECT version FROM updates")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(versions, vec!["1.0.0".to_string()]);
    let mut written = Vec::new();
    let mut stack = vec![fleet.dir.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path.clone());
            }
            written.push(path.display().to_string());
        }
    }
    let suspicious: Vec<&String> =
        written.iter().filter(|p| ["escaped", "2.0.0", "3.0.0", "4.0.0"].iter().any(|s| p.contains(s))).collect();
    assert!(suspicious.is_empty(), "written for a refused version: {suspicious:?}");
    agent.shutdown().await;
    fleet.server.shutdown().await;
}
