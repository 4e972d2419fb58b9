//! A check-in reply counts only when the root's timestamp key signed it for this device with a
//! counter above the last one accepted and an expiry not yet passed. Whoever stands between the
//! device and the server cannot replay an older reply (which would move the device back to the
//! version kept on disk) nor keep serving one after it expired; a device whose clock reads 1970
//! still refuses the expired one.

use edge_agent::AgentHandle;
use fleet_tests::stub::HttpStub;
use fleet_tests::*;
use fleetctl::demo::wait_for;
use proto::keys::parse_secret_key;
use proto::wire::DesiredState;

use crate::serving;

/// A check-in as the device makes it, with its own credential: the signed reply.
async fn check_in_as_device(fleet: &Fleet) -> DesiredState {
    let (device, credential): (String, String) = rusqlite::Connection::open(fleet.agent_dir(0).join("agent.db"))
        .unwrap()
        .query_row("SELECT device_id, credential FROM identity", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    edge_agent::http::client()
        .post(format!("{}/api/v1/devices/{device}/checkin", fleet.server.url()))
        .bearer_auth(credential)
        .json(&proto::wire::CheckinRequest { models: Vec::new() })
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Restarts agent 0 against `stub` as its server, checking in every 200 ms.
async fn restart_against(fleet: &Fleet, agent: &AgentHandle, stub: &HttpStub) -> AgentHandle {
    agent.shutdown().await;
    let mut config = crate::enrolled_config(fleet, &stub.url());
    config.intervals.checkin_secs = 0.2;
    edge_agent::start(config).await.unwrap()
}

async fn check_ins(stub: &HttpStub, count: usize) {
    let from = stub.requests();
    wait_for("check-ins with the stub", TIMEOUT, || async { (stub.requests() >= from + count).then_some(()) })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_or_expired_reply_does_not_move_the_device_and_a_fresh_one_does() {
    let root_key = proto::keys::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let fleet = Fleet::start_rooted(1, mqtt_from_env(), &root_key).await;
    fleet.publish(fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap()).await;
    fleet.deploy_all("tabular", "1.0.0").await;
    fleet.wait_active("tabular", "1.0.0").await;
    let recorded = check_in_as_device(&fleet).await;
    assert_eq!(recorded.models[0].version, "1.0.0");
    assert!(recorded.freshness.is_some(), "the server signs check-in replies");

    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.0.0").await;
    fleet.wait_active("tabular", "2.0.0").await;

    // Replay: the recorded reply is validly signed and unexpired, but older than what the device
    // accepted since. 1.0.0 is kept on disk, so obeying it would need no download.
    let stub = HttpStub::start(serde_json::to_string(&recorded).unwrap()).await;
    let agent = restart_against(&fleet, &fleet.agents[0], &stub).await;
    check_ins(&stub, 5).await;
    assert_eq!(serving(&agent).await, "2.0.0", "a replayed reply moved the device back");
    let why = agent.last_checkin_error().unwrap_or_default();
    assert!(why.contains("is not above") && why.ends_with("a replayed reply"), "{why}");

    // Freeze: a reply with a new counter, but expired a day ago.
    let timestamp = parse_secret_key(fleet.timestamp_secret.as_ref().unwrap()).unwrap();
    let device = recorded.freshness.as_ref().unwrap().signed.device.clone();
    let now = fleet_server::unix_ms() / 1000;
    let mut frozen = recorded.clone();
    proto::freshness::seal(&mut frozen, &timestamp, &device, 1_000_000, now - 2 * 86_400, 86_400);
    stub.set_body(serde_json::to_string(&frozen).unwrap());
    check_ins(&stub, 5).await;
    assert_eq!(serving(&agent).await, "2.0.0", "an expired reply moved the device");
    let why = agent.last_checkin_error().unwrap_or_default();
    assert!(why.contains("the reply expired at") && why.ends_with("a frozen or delayed reply"), "{why}");

    // The device judges time by the newest signed issue time it saw (its time floor) when its
    // clock is behind: the floor is stored (the 1970 case itself is proto::freshness's test).
    let floor: i64 = rusqlite::Connection::open(fleet.agent_dir(0).join("agent.db"))
        .unwrap()
        .query_row("SELECT time_floor FROM freshness", [], |r| r.get(0))
        .unwrap();
    assert!((floor as u64).abs_diff(now) < 300, "time floor {floor} is the last signed issue time, not {now}");

    // The control: the same reply, fresh, moves the device, so the refusals above were the checks.
    let mut fresh = recorded.clone();
    proto::freshness::seal(&mut fresh, &timestamp, &device, 1_000_001, now, 86_400);
    stub.set_body(serde_json::to_string(&fresh).unwrap());
    wait_for("the device to obey the fresh reply", TIMEOUT, || async {
        (serving(&agent).await == "1.0.0").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(agent.last_checkin_error(), None, "an accepted reply clears the refusal");
    agent.shutdown().await;
    fleet.server.shutdown().await;
}
