//! 200 real agents (in-process): a candidate whose confidence collapses is stopped by the health
//! gate in its first wave and rolled back automatically; no device keeps it, the holdout never
//! receives it.

use fleetctl::demo::run_scenario;
use fleetctl::scenario::Scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_agents_reject_a_degraded_candidate_in_the_first_wave_and_roll_back() {
    let options = fleet_tests::scale_options();
    let result = run_scenario(options, Scenario::BadModel, |line| eprintln!("{line}")).await.unwrap();
    let rollout = result.rollout.as_ref().unwrap();
    assert_eq!((rollout.state.as_str(), rollout.waves_started), ("rolled_back", 1), "{rollout:?}");
    assert!(rollout.reason.as_deref().unwrap().contains("mean confidence"), "{rollout:?}");
    assert!(result.ok);
    assert!(result.devices.iter().all(|d| d.model_version.as_deref() == Some("1.0.0")));
    assert!(result.devices.iter().any(|d| d.holdout));
}
