//! A server (or anything on the path) that lies about a bundle's length: it announces 50 MB in
//! Content-Length and keeps sending. The device reads no more than the size its signed check-in
//! reply announced, refuses the download ("sent more than the announced … bytes"), keeps nothing
//! of it, reports `failed` with that reason once its attempts are spent, and keeps serving the
//! previous version; once the path is honest again the next version installs.

use fleet_tests::proxy::{Mode, Proxy};
use fleet_tests::*;
use fleetctl::demo::{agent_config, wait_for};
use proto::wire::UpdateStep;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_download_longer_than_announced_is_refused_and_the_previous_model_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = new_key();
    let (server, client) = start_server(dir.path(), mqtt_from_env(), vec![public.clone()]).await;
    let proxy = Proxy::start(server.http_addr).await;
    let token = client.tokens(1).await.unwrap().remove(0);
    let mut config = agent_config(&proxy.url(), &server.mqtt_url, &token, &public, dir.path().join("agent"), 0);
    config.limits.download_attempts = 2;
    config.intervals.checkin_secs = 0.5;
    let agent = edge_agent::start(config).await.unwrap();
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        client.publish(fixture_bundle(&secret, version, MLP).unwrap()).await.unwrap();
    }
    deploy_everywhere(&client, "tabular", "1.0.0").await;
    wait_for("1.0.0 active", TIMEOUT, || first_device_at(&client, "1.0.0", UpdateStep::Active)).await.unwrap();

    proxy.set(Mode::Lie, 50 << 20);
    deploy_everywhere(&client, "tabular", "2.0.0").await;
    let failed =
        wait_for("the overlong 2.0.0 to fail", TIMEOUT, || first_device_at(&client, "2.0.0", UpdateStep::Failed))
            .await
            .unwrap();
    assert!(failed.detail.contains("sent more than the announced"), "{}", failed.detail);
    assert_eq!(failed.active_version.as_deref(), Some("1.0.0"));
    let (code, body) = infer(&agent, serde_json::json!({ "inputs": synthetic_rows(1, 1, 0.0) })).await;
    assert_eq!((code, body["version"].as_str()), (200, Some("1.0.0")), "the previous model keeps serving");
    let downloads = dir.path().join("agent").join("downloads");
    let left: Vec<_> =
        std::fs::read_dir(&downloads).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing of the overlong download is kept: {left:?}");

    // An honest path again: the next version installs.
    proxy.set(Mode::Pass, 0);
    deploy_everywhere(&client, "tabular", "3.0.0").await;
    wait_for("3.0.0 to install", TIMEOUT, || first_device_at(&client, "3.0.0", UpdateStep::Active)).await.unwrap();
    agent.shutdown().await;
    server.shutdown().await;
}
