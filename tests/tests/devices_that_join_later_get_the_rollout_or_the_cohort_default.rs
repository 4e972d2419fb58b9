//! A rollout's selector is live and a finished deployment keeps working for newcomers: a device
//! enrolled while a rollout runs first gets the fleet's default (the earlier deployment), then
//! joins the rollout's current wave and installs the candidate; once the rollout completed, a
//! device enrolled after it gets the rollout's version as its cohort's default.

use fleet_server::rollout::create::OperatorAction;
use fleet_server::rollout::Phase;
use fleet_tests::*;
use fleetctl::demo::wait_for;
use proto::wire::AuditAction;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_enrolled_mid_rollout_joins_it_and_one_enrolled_after_it_gets_its_version() {
    let mut fleet = Fleet::serving_v1(2, mqtt_from_env(), &[]).await;
    fleet.publish(bundle_with_golden(&fleet.secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    // One wave over everyone, a soak long enough that the rollout is still running when the
    // newcomer enrolls.
    let plan: proto::rollout::RolloutPlan = serde_json::from_value(serde_json::json!({
        "model": "tabular", "version": "2.0.0", "holdout": 0.0, "waves": [{"percent": 100.0}],
        "soak_secs": 3600.0, "gates": {"min_samples": 0}
    }))
    .unwrap();
    let id = fleet.client.start_rollout(&plan).await.unwrap().rollout.id;
    fleet.wait_active("tabular", "2.0.0").await;

    fleet.agents.push(fleet.start_agent(2).await);
    let devices = fleet.wait_active("tabular", "2.0.0").await;
    let newcomer = fleet.agents[2].device_id().unwrap();
    assert!(devices.iter().any(|d| d.id == newcomer));
    let audit = fleet.client.audit(Some(&id)).await.unwrap();
    assert!(
        audit.iter().any(|a| a.action == AuditAction::Joined && a.detail.starts_with(&format!("{newcomer} joined"))),
        "no joined line for {newcomer}: {audit:?}"
    );
    let rollout = fleet.client.rollout(&id).await.unwrap().rollout;
    let member = &rollout.members[&newcomer];
    assert!(member.late);
    assert_eq!(member.previous_version.as_deref(), Some("1.0.0"), "the deployment's default came first");

    let client = fleet.client.clone();
    wait_for("the wave, newcomer included, to soak", TIMEOUT, || async {
        client.rollout(&id).await.ok()?.rollout.soak_until_ms.map(|_| ())
    })
    .await
    .unwrap();
    fleet.client.rollout_action(&id, OperatorAction::Promote).await.unwrap();
    wait_for("the rollout to complete", TIMEOUT, || async {
        (client.rollout(&id).await.ok()?.rollout.phase == Phase::Completed).then_some(())
    })
    .await
    .unwrap();

    fleet.agents.push(fleet.start_agent(3).await);
    fleet.wait_active("tabular", "2.0.0").await;
    let after = fleet.agents[3].device_id().unwrap();
    let rollout = fleet.client.rollout(&id).await.unwrap().rollout;
    assert!(!rollout.members.contains_key(&after), "a completed rollout takes no members");
    let audit = fleet.client.audit(Some(&id)).await.unwrap();
    assert!(
        audit.iter().any(|a| a.action == AuditAction::CohortDefault && a.detail.contains(&after)),
        "no cohort_default line for {after}: {audit:?}"
    );
    fleet.shutdown().await;
}
