//! A root whose targets role needs two of its two release keys: a bundle signed by one of them
//! (stored on the server by hand, as whoever stole that key and holds the server could) is
//! refused by a running device, which says how many signatures it found and keeps serving; a
//! release signed by both installs.

use std::time::Duration;

use fleet_tests::*;
use fleetctl::demo::{fixture_metadata, signed_bundle};
use proto::bundle::{add_signature, read_archive, write_archive};
use proto::keys::KeyId;
use proto::keys::{public_key_hex, SigningKey};
use proto::root::{Role, Roles, Root, SignedRoot};
use proto::wire::UpdateStep;

use crate::{serving, smuggle_raw, wait_step};

fn key() -> SigningKey {
    SigningKey::from_bytes(&rand::random::<[u8; 32]>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_two_required_release_signatures_is_refused_and_both_install() {
    let (root_key, release_a, release_b, timestamp) = (key(), key(), key(), key());
    let entry = |k: &SigningKey| (KeyId::of(&k.verifying_key()).to_string(), public_key_hex(&k.verifying_key()));
    let id = |k: &SigningKey| KeyId::of(&k.verifying_key()).to_string();
    let mut root = SignedRoot {
        signed: Root {
            version: 1,
            expires: fleet_server::unix_ms() / 1000 + 86_400,
            keys: [entry(&root_key), entry(&release_a), entry(&release_b), entry(&timestamp)].into(),
            roles: Roles {
                root: Role { keyids: vec![id(&root_key)], threshold: 1 },
                targets: Role { keyids: vec![id(&release_a), id(&release_b)], threshold: 2 },
                timestamp: Role { keyids: vec![id(&timestamp)], threshold: 1 },
            },
        },
        signatures: Vec::new(),
    };
    root.sign(&root_key);
    let secret_a = proto::keys::secret_key_hex(&release_a);
    let fleet_key = (secret_a.clone(), public_key_hex(&release_a.verifying_key()));
    let fleet =
        Fleet::start_with_root(1, mqtt_from_env(), &root, &timestamp, fleet_key, Duration::from_secs(86_400)).await;

    // 1.0.0 signed by both keys serves; 2.0.0 carries only release key A's signature.
    let both = |bytes: Vec<u8>| {
        let mut bundle = read_archive(&bytes, &Default::default()).unwrap();
        add_signature(&mut bundle, &release_b);
        write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures)
    };
    let v1 = both(fixture_bundle(&secret_a, "1.0.0", MLP).unwrap());
    fleet.publish(v1).await;
    fleet.deploy_all("tabular", "1.0.0").await;
    fleet.wait_active("tabular", "1.0.0").await;

    let one = signed_bundle(&secret_a, fixture_metadata("2.0.0").unwrap(), MLP_V2, MLP_V2_GOLDEN).unwrap();
    let manifest = read_archive(&one, &Default::default()).unwrap().manifest_bytes;
    smuggle_raw(&fleet, "tabular", "2.0.0", &one, &manifest);
    fleet.deploy_all("tabular", "2.0.0").await;
    let detail = wait_step(&fleet, "2.0.0", UpdateStep::Failed).await;
    assert!(detail.contains("signed by 1 trusted key(s); 2 are needed"), "{detail}");
    assert_eq!(serving(&fleet.agents[0]).await, "1.0.0");

    // The control: a release signed by both keys is published (the server checks the same
    // threshold) and installs.
    let twice = both(signed_bundle(&secret_a, fixture_metadata("2.1.0").unwrap(), MLP_V2, MLP_V2_GOLDEN).unwrap());
    fleet.publish(twice).await;
    fleet.deploy_all("tabular", "2.1.0").await;
    fleet.wait_active("tabular", "2.1.0").await;
    assert_eq!(serving(&fleet.agents[0]).await, "2.1.0");
    fleet.shutdown().await;
}
