//! `fleetctl deploy --wait` ends with every targeted device active or failed (non-zero exit and
//! the device's reason when one failed), and `fleetctl telemetry export` writes the rows the
//! agents uploaded.

use std::process::Command;
use std::time::Duration;

use fleet_server::server::{self, free_loopback_port, Mqtt, ServerConfig};
use fleetctl::client::FleetClient;
use fleetctl::demo::{agent_config, fixture_bundle, synthetic_rows, wait_for};
use proto::keys::{parse_secret_key, public_key_hex};

const MLP: &[u8] = include_bytes!("../../tests/fixtures/models/mlp.onnx");
const TIMEOUT: Duration = Duration::from_secs(60);

fn key() -> (String, String) {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let public = public_key_hex(&parse_secret_key(&secret).unwrap().verifying_key());
    (secret, public)
}

async fn fleetctl(args: Vec<String>) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_fleetctl")).args(&args).output().expect("fleetctl runs");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_wait_reports_each_device_outcome_and_telemetry_export_writes_the_uploaded_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = key();
    // The server also trusts a key the agent does not: a bundle signed with it fails on the device.
    let (other_secret, other_public) = key();
    let port = free_loopback_port().unwrap();
    let server = server::start(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("server"),
        mqtt: Mqtt::Embedded { listen: ([127, 0, 0, 1], port).into() },
        operator_token: Some("op".into()),
        trusted_keys: vec![public.clone(), other_public],
        max_bundle_bytes: 64 << 20,
        rollout_tick: Duration::from_millis(200),
        ..ServerConfig::default()
    })
    .await
    .unwrap();
    let client = FleetClient::new(&server.url(), "op");
    let token = client.tokens(1).await.unwrap().remove(0);
    let agent =
        edge_agent::start(agent_config(&server.url(), &server.mqtt_url, &token, &public, dir.path().join("a"), 0))
            .await
            .unwrap();
    client.publish(fixture_bundle(&secret, "1.0.0", MLP).unwrap()).await.unwrap();
    client.publish(fixture_bundle(&other_secret, "2.0.0", MLP).unwrap()).await.unwrap();
    wait_for("enrollment", TIMEOUT, || async { (client.devices().await.ok()?.len() == 1).then_some(()) })
        .await
        .unwrap();
    let server_args = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--server".into(), server.url(), "--token".into(), "op".into()]);
        all
    };

    let (ok, text) = fleetctl(server_args(&[
        "deploy",
        "--model",
        "tabular",
        "--version",
        "1.0.0",
        "--wait",
        "--timeout-secs",
        "60",
    ]))
    .await;
    assert!(ok && text.contains("tabular 1.0.0 active on all 1 device(s)"), "{text}");

    let (ok, text) = fleetctl(server_args(&[
        "deploy",
        "--model",
        "tabular",
        "--version",
        "2.0.0",
        "--wait",
        "--timeout-secs",
        "60",
    ]))
    .await;
    assert!(!ok, "{text}");
    assert!(text.contains(": failed: bundle tabular 2.0.0 refused"), "{text}");
    assert!(text.contains("1 of 1 device(s) did not activate tabular 2.0.0"), "{text}");

    let rows = 37;
    let response = edge_agent::http::client()
        .post(format!("http://{}/v1/infer", agent.api_addr))
        .json(&serde_json::json!({ "inputs": synthetic_rows(5, rows, 0.0) }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    wait_for("telemetry to be uploaded", TIMEOUT, || async {
        (client.delivery().await.ok()?.first()?.telemetry_stored >= rows as u64).then_some(())
    })
    .await
    .unwrap();
    let out = dir.path().join("rows.csv");
    let (ok, text) =
        fleetctl(server_args(&["telemetry", "export", "--model", "tabular", "--out", out.to_str().unwrap()])).await;
    assert!(ok, "{text}");
    let csv = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "device,seq,at_ms,model,version,latency_us,features,outputs");
    assert_eq!(lines.len(), rows + 1, "{text}");
    let first: Vec<&str> = lines[1].split(',').collect();
    assert_eq!((first[3], first[4], first[6].split(' ').count()), ("tabular", "1.0.0", 8));
    agent.shutdown().await;
    server.shutdown().await;
}
