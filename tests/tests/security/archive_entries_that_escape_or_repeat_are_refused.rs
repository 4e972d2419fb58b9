//! A bundle archive is read entry by entry before anything in it is trusted: an entry that
//! climbs out (`..`), names an absolute path, is a symbolic or hard link, or repeats a file is
//! refused by a running device, which says which entry and keeps serving what it had. The
//! archives are put into the server's store by hand with the genuine signed manifest and
//! signatures beside them, as whoever holds the server could.

use fleet_tests::*;
use fleetctl::demo::{fixture_metadata, signed_bundle};
use proto::bundle::{read_archive, UnverifiedBundle};
use proto::wire::UpdateStep;

use crate::{serving, smuggle_raw, wait_step};

fn regular(builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, path, data).unwrap();
}

/// A regular file whose name field is written raw, as an attacker would (tar refuses to).
fn raw_name(builder: &mut tar::Builder<Vec<u8>>, name: &[u8]) {
    let mut header = tar::Header::new_gnu();
    header.set_size(1);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_cksum();
    builder.append(&header, &b"x"[..]).unwrap();
}

fn link(builder: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, target: &str) {
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_entry_type(kind);
    builder.append_link(&mut header, path, target).unwrap();
}

/// The genuine bundle's entries, then the hostile one.
fn genuine_plus(genuine: &UnverifiedBundle, hostile: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    regular(&mut builder, proto::bundle::MANIFEST_PATH, &genuine.manifest_bytes);
    for (path, data) in &genuine.files {
        regular(&mut builder, path, data);
    }
    for (key_id, signature) in &genuine.signatures {
        regular(&mut builder, &format!("{}{key_id}.sig", proto::bundle::SIGNATURE_DIR), signature);
    }
    hostile(&mut builder);
    builder.into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_entries_that_climb_out_are_absolute_are_links_or_repeat_are_refused() {
    let fleet = Fleet::serving_v1(1, mqtt_from_env(), &[]).await;
    let bundle = signed_bundle(&fleet.secret, fixture_metadata("2.0.0").unwrap(), MLP_V2, MLP_V2_GOLDEN).unwrap();
    let genuine = read_archive(&bundle, &Default::default()).unwrap();
    type Hostile = Box<dyn FnOnce(&mut tar::Builder<Vec<u8>>)>;
    let cases: Vec<(&str, Hostile, &str)> = vec![
        (
            "2.0.1",
            Box::new(|b| raw_name(b, b"../evil\0")),
            "bundle entry \"../evil\" is not a regular file with a plain name",
        ),
        (
            "2.0.2",
            Box::new(|b| raw_name(b, b"/etc/evil\0")),
            "bundle entry \"/etc/evil\" is not a regular file with a plain name",
        ),
        (
            "2.0.3",
            Box::new(|b| link(b, tar::EntryType::Symlink, "extra.onnx", "/etc/passwd")),
            "bundle entry \"extra.onnx\" is not a regular file with a plain name",
        ),
        (
            "2.0.4",
            Box::new(|b| link(b, tar::EntryType::Link, "extra.onnx", "model.onnx")),
            "bundle entry \"extra.onnx\" is not a regular file with a plain name",
        ),
        ("2.0.5", Box::new(|b| regular(b, "model.onnx", b"a second model")), "bundle holds \"model.onnx\" twice"),
    ];
    for (version, hostile, reason) in cases {
        smuggle_raw(&fleet, "tabular", version, &genuine_plus(&genuine, hostile), &genuine.manifest_bytes);
        fleet.deploy_all("tabular", version).await;
        let detail = wait_step(&fleet, version, UpdateStep::Failed).await;
        assert!(detail.contains(reason), "{version}: {detail}");
        assert_eq!(serving(&fleet.agents[0]).await, "1.0.0", "{version}");
    }
    // The control: the genuine archive, stored the same way, installs.
    smuggle_raw(&fleet, "tabular", "2.0.0", &bundle, &genuine.manifest_bytes);
    fleet.deploy_all("tabular", "2.0.0").await;
    fleet.wait_active("tabular", "2.0.0").await;
    assert_eq!(serving(&fleet.agents[0]).await, "2.0.0");
    fleet.shutdown().await;
}
