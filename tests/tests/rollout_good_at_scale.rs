//! 200 real agents (in-process): a healthy candidate rolls out in waves to every non-holdout
//! device; the holdout control group keeps the current version throughout.

use fleetctl::demo::run_scenario;
use fleetctl::scenario::Scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_agents_take_a_healthy_candidate_in_waves_and_the_holdout_keeps_the_current_version() {
    let options = fleet_tests::scale_options();
    let result = run_scenario(options, Scenario::Good, |line| eprintln!("{line}")).await.unwrap();
    let rollout = result.rollout.as_ref().unwrap();
    assert_eq!((rollout.state.as_str(), rollout.waves_started), ("completed", 3), "{rollout:?}");
    assert!(result.ok);
    let holdout: Vec<_> = result.devices.iter().filter(|d| d.holdout).collect();
    assert_eq!(holdout.len(), rollout.holdout_devices);
    assert!(!holdout.is_empty());
    assert!(holdout.iter().all(|d| d.model_version.as_deref() == Some("1.0.0")));
    assert!(result.devices.iter().filter(|d| !d.holdout).all(|d| d.model_version.as_deref() == Some("2.0.0")));
    assert_eq!(result.devices.len(), 200);
}
