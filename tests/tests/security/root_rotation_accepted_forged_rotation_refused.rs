//! The root of trust rotates by TUF's rule: a release key is replaced by a root signed with the
//! root key, devices follow it at their next check-in and accept the new key's bundles. A root
//! the old root keys did not sign is refused by the server, and by a device even when a
//! compromised server offers it together with a bundle signed by the forger's key.

use fleet_tests::*;
use fleetctl::trust_root::{next, RoleKeys, RootChanges};
use proto::keys::{parse_public_key, SigningKey};
use proto::root::SignedRoot;
use proto::wire::UpdateStep;

use crate::{serving, smuggle_bundle, wait_step};

fn targets_only(public: &str) -> RootChanges {
    let keys = vec![parse_public_key(public).unwrap()];
    RootChanges { targets: Some(RoleKeys { keys, threshold: 1 }), ..RootChanges::default() }
}

fn root_1(fleet: &Fleet) -> SignedRoot {
    SignedRoot::parse(&std::fs::read(fleet.root_file.as_ref().unwrap()).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_signed_by_the_root_key_moves_devices_to_the_new_release_key() {
    let root_key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let fleet = Fleet::start_rooted(1, mqtt_from_env(), &root_key).await;
    fleet.publish(fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap()).await;
    fleet.deploy_all("tabular", "1.0.0").await;
    fleet.wait_active("tabular", "1.0.0").await;

    // The release key is replaced; the old one is in no role of root 2, so it is revoked.
    let (new_secret, new_public) = new_key();
    let mut rotation = next(&root_1(&fleet).signed, &targets_only(&new_public));
    let unsigned = fleet.client.publish_root(rotation.to_json_bytes()).await.unwrap_err();
    assert!(unsigned.to_string().contains("root 2 is signed by 0 of the current root keys"), "{unsigned}");
    rotation.sign(&root_key);
    assert_eq!(fleet.client.publish_root(rotation.to_json_bytes()).await.unwrap().version, 2);

    let revoked = fleet.client.publish(fixture_bundle(&fleet.secret, "1.5.0", MLP).unwrap()).await.unwrap_err();
    assert!(revoked.to_string().contains("untrusted key"), "{revoked}");
    fleet.publish(bundle_with_golden(&new_secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.0.0").await;
    fleet.wait_active("tabular", "2.0.0").await;
    assert_eq!(serving(&fleet.agents[0]).await, "2.0.0");

    // A bundle the revoked key signs reaches the device anyway (put into the store by hand): the
    // device refuses it too.
    smuggle_bundle(&fleet, &fixture_bundle(&fleet.secret, "1.6.0", MLP).unwrap());
    fleet.deploy_all("tabular", "1.6.0").await;
    let detail = wait_step(&fleet, "1.6.0", UpdateStep::Failed).await;
    assert!(detail.contains("signed only by untrusted key"), "{detail}");
    assert_eq!(serving(&fleet.agents[0]).await, "2.0.0");

    // The device stored root 2 before using it, so a restart starts from root 2.
    let stored: Vec<u8> = rusqlite::Connection::open(fleet.agent_dir(0).join("agent.db"))
        .unwrap()
        .query_row("SELECT document FROM roots WHERE version = 2", [], |r| r.get(0))
        .unwrap();
    assert_eq!(SignedRoot::parse(&stored).unwrap().signed, rotation.signed);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_rotation_from_a_compromised_server_is_refused_and_so_is_its_bundle() {
    let root_key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let fleet = Fleet::start_rooted(1, mqtt_from_env(), &root_key).await;
    fleet.publish(fixture_bundle(&fleet.secret, "1.0.0", MLP).unwrap()).await;
    fleet.deploy_all("tabular", "1.0.0").await;
    fleet.wait_active("tabular", "1.0.0").await;

    // Whoever holds the server writes a root 2 of their own into its database: a new root key
    // and their release key, signed only by keys the devices never trusted.
    let forger = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let (forger_secret, forger_public) = new_key();
    let mut forged = next(&root_1(&fleet).signed, &targets_only(&forger_public));
    forged.signed.roles.root.keyids = vec![proto::KeyId::of(&forger.verifying_key()).to_string()];
    forged.signed.keys.retain(|id, _| *id != proto::KeyId::of(&root_key.verifying_key()).to_string());
    forged.signed.keys.insert(
        proto::KeyId::of(&forger.verifying_key()).to_string(),
        proto::keys::public_key_hex(&forger.verifying_key()),
    );
    forged.sign(&forger);
    let refused = fleet.client.publish_root(forged.to_json_bytes()).await.unwrap_err();
    assert!(refused.to_string().contains("signed by 0 of the current root keys"), "{refused}");
    let document = forged.to_json_bytes();
    store_sql(
        fleet.dir.path(),
        "INSERT INTO roots (version, document, published_ms) VALUES (2, $1, 0)",
        &[SqlValue::Bytes(&document)],
    );

    // The server now takes the forger's bundles and offers root 2 at every check-in.
    fleet.publish(bundle_with_golden(&forger_secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await;
    fleet.deploy_all("tabular", "2.0.0").await;
    let detail = wait_step(&fleet, "2.0.0", UpdateStep::Failed).await;
    assert!(detail.contains("signed only by untrusted key"), "{detail}");
    assert_eq!(serving(&fleet.agents[0]).await, "1.0.0");
    let rotated: i64 = rusqlite::Connection::open(fleet.agent_dir(0).join("agent.db"))
        .unwrap()
        .query_row("SELECT COUNT(*) FROM roots", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rotated, 0, "the device did not take the forged root");
    fleet.shutdown().await;
}
