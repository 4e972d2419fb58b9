//! A fleet over TLS: `fleetctl pki` makes a CA and a server certificate, the server serves HTTPS
//! and MQTT over TLS (embedded broker), and an agent that pins the CA enrolls, installs a signed
//! bundle and has its reports stored. A client that does not trust the CA, or trusts another
//! one, cannot talk to the server; plain HTTP to the TLS port gets no answer.

use fleet_server::server::{self, Mqtt, ServerConfig, TlsFiles};
use fleet_tests::*;
use fleetctl::client::FleetClient;
use fleetctl::demo::{agent_config, wait_for};
use proto::wire::DeployRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_pinning_the_fleet_ca_works_end_to_end_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let (ca, _) = fleetctl::pki::init(&pki.join("ca"), "test fleet CA", 30).unwrap();
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    let (cert, key) = fleetctl::pki::issue(&pki.join("ca"), &pki.join("server"), "server", &hosts, 30).unwrap();
    let (other_ca, _) = fleetctl::pki::init(&pki.join("other"), "someone else's CA", 30).unwrap();
    let (secret, public) = new_key();
    let server = server::start(ServerConfig {
        data_dir: dir.path().join("server"),
        mqtt: Mqtt::Embedded { listen: ([127, 0, 0, 1], 0).into() },
        operator_token: Some("op".into()),
        trusted_keys: vec![public.clone()],
        rollout_tick: std::time::Duration::from_millis(200),
        tls: Some(TlsFiles { cert, key }),
        ..ServerConfig::default()
    })
    .await
    .unwrap();
    let url = server.url();
    assert!(url.starts_with("https://") && server.mqtt_url.starts_with("mqtts://"), "{url} {}", server.mqtt_url);

    let ca_pem = std::fs::read(&ca).unwrap();
    let client = FleetClient::trusting(&url, "op", Some(&ca_pem)).unwrap();
    client.devices().await.unwrap();
    let strangers = [
        FleetClient::new(&url, "op"),
        FleetClient::trusting(&url, "op", Some(&std::fs::read(&other_ca).unwrap())).unwrap(),
    ];
    for stranger in strangers {
        let err = stranger.devices().await.unwrap_err().to_string();
        assert!(err.starts_with("cannot reach the fleet server"), "{err}");
    }
    let plain = edge_agent::http::client().get(url.replace("https://", "http://") + "/healthz").send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success(), "plain HTTP answered on the TLS port");

    let token = client.tokens(1).await.unwrap().remove(0);
    let mut config = agent_config(&url, &server.mqtt_url, &token, &public, dir.path().join("agent"), 0);
    config.ca_file = Some(ca.clone());
    let agent = edge_agent::start(config).await.unwrap();
    client.publish(fixture_bundle(&secret, "1.0.0", MLP).unwrap()).await.unwrap();
    wait_for("the agent to enroll over HTTPS", TIMEOUT, || async {
        (client.devices().await.ok()?.len() == 1).then_some(())
    })
    .await
    .unwrap();
    client
        .deploy(&DeployRequest { model: "tabular".into(), version: "1.0.0".into(), devices: None, selector: None })
        .await
        .unwrap();
    let device = agent.device_id().unwrap();
    wait_for("1.0.0 active, reported over MQTT with TLS", TIMEOUT, || async {
        let devices = client.devices().await.ok()?;
        let active = devices[0].models.iter().any(|m| m.active_version.as_deref() == Some("1.0.0"));
        let stored = client.delivery().await.ok()?.iter().any(|v| v.device == device && v.reports_stored > 0);
        (active && stored).then_some(())
    })
    .await
    .unwrap();

    // An agent that pins another CA does not enroll.
    let token = client.tokens(1).await.unwrap().remove(0);
    let mut config = agent_config(&url, &server.mqtt_url, &token, &public, dir.path().join("misled"), 1);
    config.ca_file = Some(other_ca);
    let misled = edge_agent::start(config).await.unwrap();
    // Its first enrollment attempt is immediate and fails in the handshake; give it a few.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (status, _) = infer(&agent, serde_json::json!({ "inputs": [vec![0.0f32; 8]] })).await;
    assert_eq!(status, 200);
    assert_eq!(client.devices().await.unwrap().len(), 1, "the agent pinning another CA enrolled");
    misled.shutdown().await;
    agent.shutdown().await;
    server.shutdown().await;
}
