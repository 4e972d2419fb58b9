//! Persist before act, reconcile on start: an agent that restarts serves its last verified model
//! at once, even offline; a model altered on the device's disk never runs, the previous one does.

use fleet_tests::*;
use proto::wire::UpdateStep;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_agent_serves_its_model_from_disk_before_it_reaches_the_server() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    fleet.agents[0].shutdown().await;
    fleet.server.shutdown().await;

    let agent = fleet.restart_agent_offline(0).await;
    let (status, answer) = infer(&agent, serde_json::json!({ "inputs": [vec![0.5f32; 8]] })).await;
    assert_eq!((status, answer["version"].as_str()), (200, Some("1.0.0")), "{answer}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_file_altered_on_the_device_never_runs_and_the_previous_version_takes_over() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.0.0").await;
    fleet.wait_active("tabular", "2.0.0").await;
    fleet.agents[0].shutdown().await;
    fleet.server.shutdown().await;

    let model_dir = fleet.agent_dir(0).join("models/tabular");
    assert_eq!(std::fs::read_link(model_dir.join("previous")).unwrap(), std::path::Path::new("versions/1.0.0"));
    let model_file = model_dir.join("versions/2.0.0/model.onnx");
    let mut bytes = std::fs::read(&model_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&model_file, bytes).unwrap();

    let agent = fleet.restart_agent_offline(0).await;
    let (status, answer) = infer(&agent, serde_json::json!({ "inputs": [vec![0.5f32; 8]] })).await;
    assert_eq!((status, answer["version"].as_str()), (200, Some("1.0.0")), "{answer}");
    assert_eq!(std::fs::read_link(model_dir.join("current")).unwrap(), std::path::Path::new("versions/1.0.0"));
    let state = edge_agent::state::StateDb::open(&fleet.agent_dir(0).join("agent.db")).unwrap();
    let record = state.records().unwrap().into_iter().find(|r| r.model == "tabular").unwrap();
    assert_eq!((record.step, record.version.as_str()), (UpdateStep::RolledBack, "1.0.0"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_interrupted_before_the_switch_is_retried_and_completes_after_restart() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    fleet.agents[0].shutdown().await;
    // Simulate a kill -9 during self-test of 2.0.0: the record says self_test, a half-written
    // staging directory is on disk, and `current` still points at 1.0.0.
    let state = edge_agent::state::StateDb::open(&fleet.agent_dir(0).join("agent.db")).unwrap();
    state
        .record(&edge_agent::state::UpdateRecord {
            model: "tabular".into(),
            version: "2.0.0".into(),
            step: UpdateStep::SelfTest,
            detail: String::new(),
            attempt: 0,
            failures: 0,
        })
        .unwrap();
    drop(state);
    let layout = edge_agent::updater::disk::Layout::new(&fleet.agent_dir(0));
    let staging = layout.staging_dir("tabular", "2.0.0");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("model.onnx"), b"half").unwrap();

    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.0.0").await;
    let mut config = fleetctl::demo::agent_config(
        &fleet.server.url(),
        &fleet.server.mqtt_url,
        "unused",
        &fleet.public,
        fleet.agent_dir(0),
        0,
    );
    config.enrollment_token = None;
    let agent = edge_agent::start(config).await.unwrap();
    let (status, answer) = infer(&agent, serde_json::json!({ "inputs": [vec![0.5f32; 8]] })).await;
    assert_eq!(
        (status, answer["version"].as_str()),
        (200, Some("1.0.0")),
        "the old model serves while the update resumes"
    );
    assert!(!staging.exists(), "partial staging directory left behind");
    let fleet = Fleet { agents: vec![agent], ..fleet };
    fleet.wait_active("tabular", "2.0.0").await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_up_error_at_start_is_logged_and_the_installed_model_still_serves() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    fleet.agents[0].shutdown().await;
    fleet.server.shutdown().await;
    // An update of 2.0.0 was in flight, and `versions/` holds a stray file that the start-up
    // clean-up cannot remove as a directory.
    let state = edge_agent::state::StateDb::open(&fleet.agent_dir(0).join("agent.db")).unwrap();
    state
        .record(&edge_agent::state::UpdateRecord {
            model: "tabular".into(),
            version: "2.0.0".into(),
            step: UpdateStep::Downloading,
            detail: String::new(),
            attempt: 0,
            failures: 0,
        })
        .unwrap();
    drop(state);
    std::fs::write(fleet.agent_dir(0).join("models/tabular/versions/stray"), b"not a version").unwrap();

    let agent = fleet.restart_agent_offline(0).await;
    let (status, answer) = infer(&agent, serde_json::json!({ "inputs": [vec![0.5f32; 8]] })).await;
    assert_eq!((status, answer["version"].as_str()), (200, Some("1.0.0")), "{answer}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_that_stopped_the_agent_in_self_test_too_often_is_failed_at_start_and_not_installed_again() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.agents[0].shutdown().await;
    // Two earlier starts already died during 2.0.0's self-test; this is the third stop.
    let state = edge_agent::state::StateDb::open(&fleet.agent_dir(0).join("agent.db")).unwrap();
    state
        .record(&edge_agent::state::UpdateRecord {
            model: "tabular".into(),
            version: "2.0.0".into(),
            step: UpdateStep::SelfTest,
            detail: String::new(),
            attempt: 0,
            failures: 2,
        })
        .unwrap();
    drop(state);
    fleet.deploy_all("tabular", "2.0.0").await;
    let mut config = fleetctl::demo::agent_config(
        &fleet.server.url(),
        &fleet.server.mqtt_url,
        "unused",
        &fleet.public,
        fleet.agent_dir(0),
        0,
    );
    config.enrollment_token = None;
    let agent = edge_agent::start(config).await.unwrap();
    let fleet = Fleet { agents: vec![agent], ..fleet };
    let devices = fleet
        .wait_devices("2.0.0 reported failed", "tabular", |m| {
            m.desired_version.as_deref() == Some("2.0.0") && m.step == Some(UpdateStep::Failed)
        })
        .await;
    let model = &devices[0].models[0];
    assert!(model.detail.contains("stopped 3 times during this version's self-test"), "{}", model.detail);
    let (status, answer) = infer(&fleet.agents[0], serde_json::json!({ "inputs": [vec![0.5f32; 8]] })).await;
    assert_eq!((status, answer["version"].as_str()), (200, Some("1.0.0")), "the previous version serves");
    fleet.shutdown().await;
}
