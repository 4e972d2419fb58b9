//! A release that raises the anti-rollback floor retires older versions on every device that has
//! seen it: neither a download of an older version nor a switch back to the kept `previous`
//! installs, whatever the server says; the current version keeps serving.

use fleet_tests::*;
use fleetctl::demo::{fixture_metadata, signed_bundle};
use proto::wire::UpdateStep;

use crate::{serving, wait_step};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_below_the_floor_is_refused_by_download_and_by_rollback() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    let mut raising = fixture_metadata("2.0.0").unwrap();
    raising.floor = Some("1.5.0".into());
    fleet.publish(signed_bundle(&fleet.secret, raising, MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.0.0").await;
    fleet.wait_active("tabular", "2.0.0").await;

    // 1.0.0 is kept on the device as `previous`, and validly signed: still refused.
    fleet.deploy_all("tabular", "1.0.0").await;
    let detail = wait_step(&fleet, "1.0.0", UpdateStep::Failed).await;
    assert!(detail.contains("tabular 1.0.0 is below the floor 1.5.0"), "{detail}");
    assert_eq!(serving(&fleet.agents[0]).await, "2.0.0");

    // A new download below the floor is refused after verification, before it is staged.
    fleet.publish(fixture_bundle(&fleet.secret, "1.4.0", MLP).unwrap()).await;
    fleet.deploy_all("tabular", "1.4.0").await;
    let detail = wait_step(&fleet, "1.4.0", UpdateStep::Failed).await;
    assert!(detail.contains("tabular 1.4.0 is below the floor 1.5.0"), "{detail}");
    assert!(!fleet.agent_dir(0).join("models/tabular/versions/1.4.0").exists());
    assert_eq!(serving(&fleet.agents[0]).await, "2.0.0");

    // At or above the floor installs; an operator rollback to a `previous` at the floor works.
    fleet.publish(fixture_bundle(&fleet.secret, "1.5.0", MLP).unwrap()).await;
    fleet.deploy_all("tabular", "1.5.0").await;
    fleet.wait_active("tabular", "1.5.0").await;
    fleet.deploy_all("tabular", "2.0.0").await;
    fleet.wait_active("tabular", "2.0.0").await;
    fleet.deploy_all("tabular", "1.5.0").await;
    fleet.wait_active("tabular", "1.5.0").await;
    assert_eq!(serving(&fleet.agents[0]).await, "1.5.0");
    fleet.shutdown().await;
}
