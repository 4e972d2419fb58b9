//! Maintenance windows (ADR 0012): a rollout whose plan says "activate between these hours"
//! has its devices download and verify the candidate at once, then wait `staged` while the old
//! version keeps serving; the server counts them neither failed nor timed out, however long
//! past the device timeout. Inside the window (here: the same agent restarted in a time zone
//! where the window is open) the device activates from the kept download, with no second
//! download. An abort puts a staged device back at once, outside any window, and its staged
//! download is removed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_server::rollout::create::OperatorAction;
use fleet_server::rollout::Phase;
use fleet_tests::*;
use fleetctl::demo::wait_for;
use proto::wire::{DeviceModelView, UpdateStep};

/// Successful bundle downloads the server answered, from its /metrics.
async fn bundle_downloads(fleet: &Fleet) -> u64 {
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", fleet.server.url()))
        .bearer_auth(&fleet.server.operator_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("fleet_api_request_duration_seconds_count"))
        .filter(|l| l.contains("route=\"/api/v1/bundles/{name}/{version}\"") && l.contains("status=\"2"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

async fn model_view(fleet: &Fleet, device: &str) -> DeviceModelView {
    let devices = fleet.client.devices().await.unwrap();
    let view = devices.iter().find(|d| d.id == device).unwrap();
    view.models.iter().find(|m| m.name == "tabular").unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn devices_stage_outside_their_window_and_activate_inside_it_from_the_kept_download() {
    let mut fleet = Fleet::serving_v1(2, mqtt_from_env(), &[]).await;
    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    let (a, b) = (fleet.agents[0].device_id().unwrap(), fleet.agents[1].device_id().unwrap());
    // The window opens five hours from now in UTC, for three hours: closed for the whole test in
    // UTC (the agents' zone), open in UTC+6.
    let hour = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() / 3600 % 24;
    let window = serde_json::json!({
        "start": format!("{:02}:00", (hour + 5) % 24),
        "end": format!("{:02}:00", (hour + 8) % 24),
    });
    let plan: proto::rollout::RolloutPlan = serde_json::from_value(serde_json::json!({
        "model": "tabular", "version": "2.0.0", "holdout": 0.0, "waves": [{"percent": 100.0}],
        "soak_secs": 0.0, "gates": {"min_samples": 0}, "device_timeout_secs": 1.0,
        "activation_window": window,
    }))
    .unwrap();
    let downloads_before = bundle_downloads(&fleet).await;
    let id = fleet.client.start_rollout(&plan).await.unwrap().rollout.id;

    let client = fleet.client.clone();
    wait_for("both devices staged", TIMEOUT, || async {
        (client.rollout(&id).await.ok()?.summary.staged == 2).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(bundle_downloads(&fleet).await, downloads_before + 2, "each device downloaded 2.0.0 once");
    for device in [&a, &b] {
        let view = model_view(&fleet, device).await;
        assert_eq!(view.step, Some(UpdateStep::Staged), "{view:?}");
        assert_eq!(view.step_version.as_deref(), Some("2.0.0"));
        assert_eq!(view.active_version.as_deref(), Some("1.0.0"), "the old version serves while staged");
        assert!(view.detail.contains("window") && view.detail.contains("UTC"), "{}", view.detail);
    }
    let (status, answer) = infer(&fleet.agents[0], serde_json::json!({ "inputs": [vec![0.1f32; 8]] })).await;
    assert_eq!((status, answer["version"].as_str()), (200, Some("1.0.0")));
    let staged_file = fleet.agent_dir(1).join("downloads").join("tabular-2.0.0.bundle");
    assert!(staged_file.is_file(), "B keeps its verified download while it waits");

    // Well past the device timeout, over several rollout ticks and check-ins: nothing changes,
    // nobody is failed or timed out, nothing is downloaded again. (A bounded wait to show that
    // something does not happen.)
    tokio::time::sleep(Duration::from_secs(5)).await;
    let view = fleet.client.rollout(&id).await.unwrap();
    assert_eq!(view.rollout.phase, Phase::Running);
    assert_eq!((view.summary.staged, view.summary.failed, view.summary.active), (2, 0, 0), "{:?}", view.summary);
    assert_eq!(bundle_downloads(&fleet).await, downloads_before + 2, "no second download while waiting");

    // Device A restarts in a zone where the window is open: it verifies the kept download again
    // and activates from it.
    fleet.agents[0].shutdown().await;
    fleet.agents[0] = fleet.start_agent_with(0, |c| c.time_zone = Some("Etc/GMT-6".into())).await;
    let a2 = a.clone();
    let fleet_ref = &fleet;
    wait_for("device A to activate 2.0.0 inside its window", TIMEOUT, || async {
        let view = model_view(fleet_ref, &a2).await;
        (view.active_version.as_deref() == Some("2.0.0") && view.step == Some(UpdateStep::Active)).then_some(())
    })
    .await
    .unwrap();
    let (status, answer) = infer(&fleet.agents[0], serde_json::json!({ "inputs": [vec![0.1f32; 8]] })).await;
    assert_eq!((status, answer["version"].as_str()), (200, Some("2.0.0")));
    assert_eq!(bundle_downloads(&fleet).await, downloads_before + 2, "activated from the staged download");
    let client = fleet.client.clone();
    let view = wait_for("the rollout to count A active and B staged", TIMEOUT, || async {
        let view = client.rollout(&id).await.ok()?;
        ((view.summary.active, view.summary.staged) == (1, 1)).then_some(view)
    })
    .await
    .unwrap();
    assert_eq!(view.rollout.phase, Phase::Running, "the wave waits for its staged device");

    // An abort acts at once, window or not: A rolls back to its kept 1.0.0, B drops its staged
    // 2.0.0 and reports the 1.0.0 it serves.
    fleet.client.rollout_action(&id, OperatorAction::Abort).await.unwrap();
    fleet.wait_active("tabular", "1.0.0").await;
    let fleet_ref = &fleet;
    let b2 = b.clone();
    wait_for("B to report the 1.0.0 it serves", TIMEOUT, || async {
        let view = model_view(fleet_ref, &b2).await;
        (view.step_version.as_deref() == Some("1.0.0")).then_some(())
    })
    .await
    .unwrap();
    assert!(!staged_file.exists(), "B's staged download is removed");
    fleet.shutdown().await;
}
