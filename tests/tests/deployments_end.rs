//! Every deployment ends. Behind a proxy that stalls bundle downloads after their first 1.3 KB
//! (holding the connection open), or cuts every download, a device reports `failed` with the
//! reason within the configured bound, while the previous model keeps serving. Behind a proxy
//! that drops each download after 20 KB, the download completes by resuming.

use std::time::Duration;

use fleet_tests::proxy::{Mode, Proxy};
use fleet_tests::*;
use fleetctl::demo::{agent_config, wait_for};
use proto::wire::UpdateStep;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_and_broken_downloads_end_as_failed_and_a_dropping_link_completes_by_resuming() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = new_key();
    let (server, client) = start_server(dir.path(), mqtt_from_env(), vec![public.clone()]).await;
    let proxy = Proxy::start(server.http_addr).await;
    let token = client.tokens(1).await.unwrap().remove(0);
    let mut config = agent_config(&proxy.url(), &server.mqtt_url, &token, &public, dir.path().join("agent"), 0);
    config.limits.download_attempts = 3;
    config.limits.stall_window_secs = 1.0;
    config.limits.min_download_bytes_per_sec = 20_000;
    config.intervals.checkin_secs = 0.5;
    let agent = edge_agent::start(config).await.unwrap();
    let mut size = 0;
    for version in ["1.0.0", "2.0.0", "3.0.0", "4.0.0"] {
        size = client.publish(fixture_bundle(&secret, version, MLP).unwrap()).await.unwrap().size;
    }
    deploy_everywhere(&client, "tabular", "1.0.0").await;
    wait_for("1.0.0 active", TIMEOUT, || first_device_at(&client, "1.0.0", UpdateStep::Active)).await.unwrap();

    proxy.set(Mode::Stall, 1300);
    deploy_everywhere(&client, "tabular", "2.0.0").await;
    let failed =
        wait_for("the stalled 2.0.0 to fail", TIMEOUT, || first_device_at(&client, "2.0.0", UpdateStep::Failed))
            .await
            .unwrap();
    assert!(
        failed.detail.contains("gave up after 3 failed download attempts") && failed.detail.contains("stalled"),
        "{}",
        failed.detail
    );
    assert_eq!(failed.active_version.as_deref(), Some("1.0.0"));
    let (code, body) = infer(&agent, serde_json::json!({ "inputs": synthetic_rows(1, 1, 0.0) })).await;
    assert_eq!((code, body["version"].as_str()), (200, Some("1.0.0")), "the previous model keeps serving");

    proxy.set(Mode::Cut, 0);
    deploy_everywhere(&client, "tabular", "3.0.0").await;
    let failed = wait_for("the cut 3.0.0 to fail", TIMEOUT, || first_device_at(&client, "3.0.0", UpdateStep::Failed))
        .await
        .unwrap();
    assert!(failed.detail.contains("gave up after 3 failed download attempts"), "{}", failed.detail);

    let downloads = dir.path().join("agent").join("downloads");
    let left: Vec<_> =
        std::fs::read_dir(&downloads).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "failed downloads are removed: {left:?}");

    // Each download attempt moves a fifth of the bundle forward and is dropped: more drops than
    // the attempts allowed, and resuming still gets it whole.
    assert!(size > 2000, "a bundle of {size} bytes");
    proxy.set(Mode::Drop, size as usize / 5);
    deploy_everywhere(&client, "tabular", "4.0.0").await;
    wait_for("4.0.0 to arrive by resuming", TIMEOUT, || first_device_at(&client, "4.0.0", UpdateStep::Active))
        .await
        .unwrap();
    agent.shutdown().await;
    server.shutdown().await;
}

/// Run inside a network namespace whose loopback is throttled to 16 kbit/s
/// (`tests/long/throttled-download.sh`); ignored in the ordinary test run, where it would only
/// repeat the drop case above at full speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the 16 kbit/s network namespace of tests/long/throttled-download.sh"]
async fn a_download_over_a_16_kbit_link_that_drops_completes_by_resuming() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = new_key();
    let (server, client) = start_server(dir.path(), embedded_mqtt(), vec![public.clone()]).await;
    let proxy = Proxy::start(server.http_addr).await;
    let token = client.tokens(1).await.unwrap().remove(0);
    let mut config = agent_config(&proxy.url(), &server.mqtt_url, &token, &public, dir.path().join("agent"), 0);
    config.limits.min_download_bytes_per_sec = 200;
    config.limits.stall_window_secs = 10.0;
    config.intervals = edge_agent::config::Intervals { checkin_secs: 2.0, heartbeat_secs: 10.0, drift_secs: 60.0 };
    let agent = edge_agent::start(config).await.unwrap();
    let size = client.publish(fixture_bundle(&secret, "1.0.0", MLP).unwrap()).await.unwrap().size;
    wait_for("enrollment", TIMEOUT, || async { (client.devices().await.ok()?.len() == 1).then_some(()) })
        .await
        .unwrap();
    proxy.set(Mode::Drop, size as usize / 4);
    let started = std::time::Instant::now();
    deploy_everywhere(&client, "tabular", "1.0.0").await;
    wait_for("1.0.0 to arrive over the slow, dropping link", Duration::from_secs(600), || async {
        let devices = client.devices().await.ok()?;
        let model = devices.first()?.models.iter().find(|m| m.name == "tabular")?.clone();
        (model.step == Some(UpdateStep::Active)).then_some(())
    })
    .await
    .unwrap();
    eprintln!(
        "a {size}-byte bundle, dropped every {} bytes, arrived in {:.1} s",
        size / 4,
        started.elapsed().as_secs_f64()
    );
    agent.shutdown().await;
    server.shutdown().await;
}
