//! A bundle bound to a device class (architecture, labels) installs only there; elsewhere the
//! device refuses it with the reason and keeps serving what it had.

use fleet_tests::*;
use fleetctl::demo::{fixture_metadata, signed_bundle};
use proto::wire::UpdateStep;

use crate::{serving, wait_step};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bundle_for_another_architecture_or_label_is_refused() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    let other_arch = if std::env::consts::ARCH == "aarch64" { "x86_64" } else { "aarch64" };
    let mut elsewhere = fixture_metadata("2.0.0").unwrap();
    elsewhere.targets.arch = vec![other_arch.into()];
    fleet.publish(signed_bundle(&fleet.secret, elsewhere, MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.0.0").await;
    let detail = wait_step(&fleet, "2.0.0", UpdateStep::Failed).await;
    let expected = format!("is built for {other_arch} and this device is {}", std::env::consts::ARCH);
    assert!(detail.contains(&expected), "{detail}");
    assert_eq!(serving(&fleet.agents[0]).await, "1.0.0");

    let mut npu_only = fixture_metadata("2.1.0").unwrap();
    npu_only.targets.arch = vec![std::env::consts::ARCH.into()];
    npu_only.targets.labels = [("accelerator".to_string(), "npu".to_string())].into();
    fleet.publish(signed_bundle(&fleet.secret, npu_only, MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.1.0").await;
    let detail = wait_step(&fleet, "2.1.0", UpdateStep::Failed).await;
    assert!(detail.contains("labelled accelerator=npu and this device has no such label"), "{detail}");
    assert_eq!(serving(&fleet.agents[0]).await, "1.0.0");

    // The same bundle on a device of its class installs.
    let mut here = fixture_metadata("2.2.0").unwrap();
    here.targets.arch = vec![std::env::consts::ARCH.into()];
    fleet.publish(signed_bundle(&fleet.secret, here, MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.2.0").await;
    fleet.wait_active("tabular", "2.2.0").await;
    fleet.shutdown().await;
}
