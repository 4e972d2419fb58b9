//! The fleetctl binary as an operator runs it: keys, bundle build/sign/verify, and the demo's
//! JSON contract.

use std::path::Path;
use std::process::{Command, Output};

fn fleetctl(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetctl")).args(args).current_dir(cwd).output().expect("fleetctl runs")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn fixture(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(path).display().to_string()
}

#[test]
fn an_operator_builds_signs_and_verifies_a_bundle_and_tampering_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    assert!(fleetctl(&["keygen", "--out", "keys"], cwd).status.success());
    let again = fleetctl(&["keygen", "--out", "keys"], cwd);
    assert!(
        !again.status.success() && text(&again).contains("refusing to overwrite a signing key"),
        "{}",
        text(&again)
    );

    let built = fleetctl(
        &[
            "bundle",
            "build",
            "--model",
            &fixture("models/mlp.onnx"),
            "--metadata",
            &fixture("bundles/tabular.toml"),
            "--out",
            "m.bundle",
        ],
        cwd,
    );
    assert!(built.status.success(), "{}", text(&built));
    let unsigned = fleetctl(&["bundle", "verify", "m.bundle", "--trusted-key", "keys/fleet-signing.pub"], cwd);
    assert!(
        !unsigned.status.success() && text(&unsigned).contains("bundle carries no signature"),
        "{}",
        text(&unsigned)
    );

    assert!(fleetctl(&["bundle", "sign", "m.bundle", "--key", "keys/fleet-signing.key"], cwd).status.success());
    let verified = fleetctl(&["bundle", "verify", "m.bundle", "--trusted-key", "keys/fleet-signing.pub"], cwd);
    assert!(verified.status.success(), "{}", text(&verified));
    assert!(text(&verified).contains("ok: tabular 1.0.0 signed by"), "{}", text(&verified));

    let mut bytes = std::fs::read(cwd.join("m.bundle")).unwrap();
    let at = bytes.windows(9).position(|w| w == b"\"tabular\"").unwrap();
    bytes[at + 1] = b'T';
    std::fs::write(cwd.join("m.bundle"), bytes).unwrap();
    let tampered = fleetctl(&["bundle", "verify", "m.bundle", "--trusted-key", "keys/fleet-signing.pub"], cwd);
    assert!(!tampered.status.success());
    assert!(
        text(&tampered).contains("does not match the manifest: the manifest or signature was altered"),
        "{}",
        text(&tampered)
    );
}

#[test]
fn a_broken_model_is_refused_at_build_time_with_the_contract_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let output = fleetctl(
        &[
            "bundle",
            "build",
            "--model",
            &fixture("models/broken.onnx"),
            "--metadata",
            &fixture("bundles/tabular.toml"),
            "--out",
            "b.bundle",
        ],
        dir.path(),
    );
    assert!(!output.status.success());
    assert!(text(&output).contains("its output shape is [1, 4], the contract says [1, 3]"), "{}", text(&output));
}

#[test]
fn the_demo_prints_its_result_as_json_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let output = fleetctl(&["demo", "--agents", "2", "--rows", "100", "--json"], dir.path());
    assert!(output.status.success(), "{}", text(&output));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let devices = result["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    for device in devices {
        assert!(device["id"].as_str().unwrap().starts_with("dev-"));
        assert_eq!(device["model_version"], "1.0.0");
        assert_eq!(device["inferences"], 100);
        assert!(device["drift_summaries"].as_u64().unwrap() >= 2);
    }
    let flagged: Vec<&str> = result["drift"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["drifted"] == true)
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(flagged, ["temperature", "vibration", "pressure", "current"], "only the shifted features drift");
}

#[test]
fn the_offline_demo_accounts_for_every_record_and_exits_zero_when_nothing_was_lost_or_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let output = fleetctl(&["demo", "--scenario", "offline", "--json"], dir.path());
    assert!(output.status.success(), "{}", text(&output));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let devices = result["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 6);
    assert_eq!(devices.iter().filter(|d| d["site"] == "plant-a").count(), 2, "the site that went offline");
    for d in devices {
        assert!(d["records_sent"].as_u64().unwrap() > 0);
        assert_eq!(d["records_stored"], d["records_sent"], "{d}");
        assert_eq!(d["duplicates_stored"], 0);
        assert_eq!(d["evicted"], 0);
    }
    let totals = &result["totals"];
    assert_eq!(totals["records_stored"], totals["records_sent"]);
    assert_eq!(totals["duplicates_stored"], 0);
}

#[test]
fn pki_and_broker_config_write_private_keys_0600_and_refuse_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let init = fleetctl(&["pki", "init", "--out", "pki/ca"], cwd);
    assert!(init.status.success(), "{}", text(&init));
    let issue = fleetctl(
        &["pki", "issue", "--ca", "pki/ca", "--out", "pki/server", "--host", "127.0.0.1", "--host", "fleet.local"],
        cwd,
    );
    assert!(issue.status.success() && text(&issue).contains("--tls-cert"), "{}", text(&issue));
    let again = fleetctl(&["pki", "init", "--out", "pki/ca"], cwd);
    assert!(!again.status.success() && text(&again).contains("refusing to overwrite"), "{}", text(&again));
    let bad = fleetctl(&["pki", "issue", "--ca", "nowhere", "--out", "x", "--host", "h"], cwd);
    assert!(!bad.status.success() && text(&bad).contains("is not a CA made by `fleetctl pki init`"), "{}", text(&bad));

    let config = fleetctl(&["broker", "config", "--out", "broker", "--port", "18883"], cwd);
    assert!(config.status.success() && text(&config).contains("--mosquitto-password-file"), "{}", text(&config));
    let acl = std::fs::read_to_string(cwd.join("broker/acl")).unwrap();
    assert!(acl.contains("pattern readwrite fleet/v1/devices/%u/#"), "{acl}");
    let conf = std::fs::read_to_string(cwd.join("broker/mosquitto.conf")).unwrap();
    assert!(conf.contains("allow_anonymous false") && conf.contains("listener 18883 127.0.0.1"), "{conf}");
    for secret in ["pki/ca/ca.key", "pki/server/server.key", "broker/passwords", "broker/server.password"] {
        let mode = std::fs::metadata(cwd.join(secret)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{secret}");
    }
    let again = fleetctl(&["broker", "config", "--out", "broker"], cwd);
    assert!(!again.status.success() && text(&again).contains("refusing to overwrite"), "{}", text(&again));
}

#[test]
fn the_retrain_demo_sends_one_event_for_the_drifting_site_and_one_for_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let output = fleetctl(&["demo", "--scenario", "retrain", "--json"], dir.path());
    assert!(output.status.success(), "{}", text(&output));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut cohorts: Vec<String> =
        result["events"].as_array().unwrap().iter().map(|e| e["cohort"].to_string()).collect();
    cohorts.sort();
    assert_eq!(cohorts, [r#"{"site":"plant-a"}"#, "{}"]);
}

#[test]
fn drift_compare_prints_the_documented_json_and_flags_only_the_shifted_column() {
    let dir = tempfile::tempdir().unwrap();
    let colours = ["red", "green", "blue"];
    let csv = |shift: f64| {
        let mut text = String::from("temperature,colour\n");
        for i in 0..400 {
            // Evenly spread over 0..40, plus `shift`; every tenth colour cell empty (missing).
            let colour = if i % 10 == 9 { "" } else { colours[i % 3] };
            text.push_str(&format!("{},{colour}\n", (i as f64) / 10.0 + shift));
        }
        text
    };
    std::fs::write(dir.path().join("ref.csv"), csv(0.0)).unwrap();
    std::fs::write(dir.path().join("cur.csv"), csv(20.0)).unwrap();
    let out = fleetctl(
        &["drift", "compare", "--reference", "ref.csv", "--current", "cur.csv", "--shards", "3", "--json"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["dataset_drift"].is_boolean() && report["summary_bytes"].as_u64().unwrap() > 0, "{report}");
    let features = report["features"].as_array().unwrap();
    let by_name = |name: &str| features.iter().find(|f| f["name"] == name).unwrap_or_else(|| panic!("{report}"));
    for f in features {
        for key in ["name", "drifted", "test", "score", "threshold"] {
            assert!(!f[key].is_null(), "{key} missing in {f}");
        }
    }
    assert_eq!(by_name("temperature")["drifted"], true, "{report}");
    assert_eq!(by_name("colour")["drifted"], false, "{report}");
}
