//! The security suite (ADR 0010): one file per property, like tough's tests, in one test binary
//! so the suite costs one link. Every refusal must leave the previous model serving and say why
//! in one sentence.

mod a_server_that_lies_about_the_length_is_cut_off;
mod archive_entries_that_escape_or_repeat_are_refused;
mod below_threshold_signatures_are_refused;
mod bundle_for_another_device_class_is_refused;
mod downgrade_below_the_floor_is_refused;
mod mix_and_match_of_two_releases_is_refused;
mod offline_past_grace_follows_the_model_policy;
mod replayed_or_expired_checkin_reply_is_refused;
mod root_rotation_accepted_forged_rotation_refused;

use fleet_tests::*;

/// Waits until the device reports `step` for `version` of tabular; returns its detail.
pub async fn wait_step(fleet: &Fleet, version: &str, step: proto::wire::UpdateStep) -> String {
    let devices = fleet
        .wait_devices(&format!("tabular {version} {step:?}"), "tabular", |m| {
            m.step == Some(step) && m.step_version.as_deref() == Some(version)
        })
        .await;
    devices[0].models.iter().find(|m| m.name == "tabular").map(|m| m.detail.clone()).unwrap_or_default()
}

/// The config that restarts agent 0 of `fleet` with `server_url` as its server (MQTT stays on
/// the fleet's broker), already enrolled.
pub fn enrolled_config(fleet: &Fleet, server_url: &str) -> edge_agent::AgentConfig {
    let mut config = fleetctl::demo::agent_config(
        server_url,
        &fleet.server.mqtt_url,
        "unused",
        &fleet.public,
        fleet.agent_dir(0),
        0,
    );
    config.enrollment_token = None;
    fleet.trust(&mut config);
    config
}

/// Puts a bundle into the server's store by hand, past the server's own signature check: what
/// whoever holds the server can do.
pub fn smuggle_bundle(fleet: &Fleet, bundle: &[u8]) -> String {
    let read = proto::bundle::read_archive(bundle, &Default::default()).unwrap();
    let manifest = proto::Manifest::parse(&read.manifest_bytes).unwrap();
    let version = manifest.version.to_string();
    smuggle_raw(fleet, &manifest.name, &version, bundle, &read.manifest_bytes);
    version
}

/// Stores any bytes as bundle `name` `version`, with `manifest_bytes` as its recorded manifest.
pub fn smuggle_raw(fleet: &Fleet, name: &str, version: &str, bundle: &[u8], manifest_bytes: &[u8]) {
    let path = fleet.dir.path().join(format!("server/bundles/{name}/{version}.bundle"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bundle).unwrap();
    store_sql(
        fleet.dir.path(),
        "INSERT INTO bundles (name, version, sha256, size, created_at, signed_by, manifest)
         VALUES ($1, $2, $3, $4, 0, 'smuggled', $5)",
        &[
            SqlValue::Text(name),
            SqlValue::Text(version),
            SqlValue::Text(&proto::bundle::sha256_hex(bundle)),
            SqlValue::Int(bundle.len() as i64),
            SqlValue::Bytes(manifest_bytes),
        ],
    );
}

/// The version the agent's local API answers with.
pub async fn serving(agent: &edge_agent::AgentHandle) -> String {
    let (status, answer) = infer(agent, serde_json::json!({ "inputs": [vec![0.1f32; 8]] })).await;
    assert_eq!(status, 200, "{answer}");
    answer["version"].as_str().unwrap_or_default().to_string()
}
