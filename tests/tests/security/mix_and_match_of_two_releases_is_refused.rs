//! Mix-and-match: the signed manifest and signatures of one release with the model file of
//! another, stored on the server as whoever holds it could. A running device refuses it by the
//! model's size or digest as the signed manifest lists them, says so, and keeps serving what it had.

use fleet_tests::*;
use fleetctl::demo::{fixture_metadata, signed_bundle};
use proto::bundle::{read_archive, write_archive, MODEL_PATH};
use proto::wire::UpdateStep;

use crate::{serving, smuggle_raw, wait_step};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_manifest_of_one_release_with_the_model_of_another_is_refused() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    let release = signed_bundle(&fleet.secret, fixture_metadata("2.0.0").unwrap(), MLP_V2, MLP_V2_GOLDEN).unwrap();
    let older = read_archive(&fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap(), &Default::default()).unwrap();
    let mut mixed = read_archive(&release, &Default::default()).unwrap();
    mixed.files.insert(MODEL_PATH.to_string(), older.files[MODEL_PATH].clone());
    let bytes = write_archive(&mixed.manifest_bytes, &mixed.files, &mixed.signatures);
    smuggle_raw(&fleet, "tabular", "2.0.0", &bytes, &mixed.manifest_bytes);
    fleet.deploy_all("tabular", "2.0.0").await;
    let detail = wait_step(&fleet, "2.0.0", UpdateStep::Failed).await;
    // The size is checked before the digest; either way the signed manifest names the file.
    assert!(detail.contains("file \"model.onnx\" ") && detail.contains("the manifest says"), "{detail}");
    assert_eq!(serving(&fleet.agents[0]).await, "1.0.0");
    fleet.shutdown().await;
}
