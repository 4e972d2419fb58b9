//! Going back to the previous version needs no download: the agent re-verifies the bundle it kept
//! on disk and switches to it, even when the server could no longer serve that version.

use fleet_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn returning_to_the_previous_version_works_without_the_server_having_its_bundle() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.0.0").await;
    fleet.wait_active("tabular", "2.0.0").await;

    // Any download of 1.0.0 would now fail: only the copy kept on the device can serve.
    std::fs::remove_file(fleet.dir.path().join("server/bundles/tabular/1.0.0.bundle")).unwrap();
    fleet.deploy_all("tabular", "1.0.0").await;
    fleet.wait_active("tabular", "1.0.0").await;
    let (status, answer) = infer(&fleet.agents[0], serde_json::json!({ "inputs": [vec![0.1f32; 8]] })).await;
    assert_eq!((status, answer["version"].as_str()), (200, Some("1.0.0")), "{answer}");
    let models = fleet.agent_dir(0).join("models/tabular");
    assert_eq!(std::fs::read_link(models.join("current")).unwrap(), std::path::Path::new("versions/1.0.0"));
    assert_eq!(std::fs::read_link(models.join("previous")).unwrap(), std::path::Path::new("versions/2.0.0"));
    fleet.shutdown().await;
}
