//! Mosquitto set up by `fleetctl broker config`: the server logs in with its own password and
//! keeps the password file in step with the store, so enrolled agents connect and their reports
//! are stored; anonymous clients and wrong passwords are refused; the shipped ACL keeps a device
//! to its own topics (what it publishes under another id reaches nobody, what it subscribes to
//! there delivers nothing); a revoked device is disconnected and cannot connect again.
//! Runs when CI names the machine's Mosquitto (`FLEET_TEST_MQTT_URL`); its own instance on a free
//! port, with the written config.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_server::ingest::MqttLogin;
use fleet_server::server::{self, free_loopback_port, MosquittoFiles, Mqtt, ServerConfig};
use fleet_tests::*;
use fleetctl::client::FleetClient;
use fleetctl::demo::{agent_config, wait_for};
use proto::wire::{DeployRequest, Topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A connected client and what it receives.
/// A session that hands every message it receives over as (topic, payload).
async fn session(
    url: &str,
    user: &str,
    password: &str,
) -> (AsyncClient, tokio::sync::mpsc::Receiver<(String, Vec<u8>)>) {
    let (host, port) = proto::endpoint::parse_mqtt_url(url).unwrap();
    let mut options = MqttOptions::new(format!("probe-{}", rand::random::<u32>()), host, port);
    options.set_credentials(user, password);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let (up_tx, up) = tokio::sync::oneshot::channel();
    let mut up_tx = Some(up_tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(up) = up_tx.take() {
                        let _ = up.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec())).await;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), up).await.unwrap().unwrap();
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_shipped_mosquitto_config_authenticates_devices_and_keeps_them_apart() {
    if std::env::var("FLEET_TEST_MQTT_URL").is_err() {
        eprintln!("skipped: FLEET_TEST_MQTT_URL is not set (no Mosquitto named on this machine)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker_dir = dir.path().join("broker");
    let port = free_loopback_port().unwrap();
    fleetctl::broker_setup::write(&broker_dir, "127.0.0.1", port, None).unwrap();
    let broker_dir = broker_dir.canonicalize().unwrap();
    // Started as root, Mosquitto would drop to its own user, which cannot read this test's
    // private temporary directory; in production the files belong to its group.
    let conf = broker_dir.join("mosquitto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.insert_str(0, "user root\n");
    std::fs::write(&conf, text).unwrap();
    let child = Command::new("/usr/sbin/mosquitto")
        .args(["-c", broker_dir.join("mosquitto.conf").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto starts");
    let _broker = Broker(child);
    let url = format!("mqtt://127.0.0.1:{port}");
    wait_for("mosquitto to listen and write its pid", TIMEOUT, || async {
        let listening = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
        (listening && broker_dir.join("mosquitto.pid").exists()).then_some(())
    })
    .await
    .unwrap();

    let (secret, public) = new_key();
    let password = std::fs::read_to_string(broker_dir.join("server.password")).unwrap();
    let server = server::start(ServerConfig {
        data_dir: dir.path().join("server"),
        mqtt: Mqtt::External { url: url.clone() },
        operator_token: Some("op".into()),
        trusted_keys: vec![public.clone()],
        rollout_tick: Duration::from_millis(200),
        mqtt_login: Some(MqttLogin { username: "fleet-server".into(), password }),
        mosquitto: Some(MosquittoFiles {
            password_file: broker_dir.join("passwords"),
            pid_file: Some(broker_dir.join("mosquitto.pid")),
        }),
        ..ServerConfig::default()
    })
    .await
    .unwrap();
    let client = FleetClient::new(&server.url(), "op");

    // Real agents enroll, connect with their credentials and get their reports stored.
    let mut agents = Vec::new();
    for index in 0..2 {
        let token = client.tokens(1).await.unwrap().remove(0);
        let config = agent_config(&server.url(), &url, &token, &public, dir.path().join(format!("a{index}")), index);
        agents.push(edge_agent::start(config).await.unwrap());
    }
    client.publish(fixture_bundle(&secret, "1.0.0", MLP).unwrap()).await.unwrap();
    wait_for("enrollment", TIMEOUT, || async { (client.devices().await.ok()?.len() == 2).then_some(()) })
        .await
        .unwrap();
    client
        .deploy(&DeployRequest { model: "tabular".into(), version: "1.0.0".into(), devices: None, selector: None })
        .await
        .unwrap();
    wait_for("1.0.0 active everywhere, reported over Mosquitto", TIMEOUT, || async {
        let devices = client.devices().await.ok()?;
        let active = devices.iter().all(|d| d.models.iter().any(|m| m.active_version.as_deref() == Some("1.0.0")));
        active.then_some(())
    })
    .await
    .unwrap();

    // Who may connect.
    let (a, credential_a) = enroll_by_hand(&server.url(), &client).await;
    let (b, credential_b) = enroll_by_hand(&server.url(), &client).await;
    let nothing = |_client: AsyncClient| async {};
    assert!(matches!(mqtt_try(&url, None, nothing).await, MqttOutcome::Refused(_)), "anonymous");
    assert!(matches!(mqtt_try(&url, Some((&a, "wrong")), nothing).await, MqttOutcome::Refused(_)), "wrong password");
    assert!(
        matches!(mqtt_try(&url, Some((&b, &credential_a)), nothing).await, MqttOutcome::Refused(_)),
        "a's password as b"
    );

    // What a device sees and sends: b listens on its own topics, a tries to reach them.
    let (b_client, mut b_seen) = session(&url, &b, &credential_b).await;
    let b_desired = Topic::Desired { device: b.clone() }.render();
    b_client.subscribe(b_desired.clone(), QoS::AtLeastOnce).await.unwrap();
    let (a_client, mut a_seen) = session(&url, &a, &credential_a).await;
    for filter in ["fleet/v1/devices/#".to_string(), b_desired.clone(), Topic::Desired { device: a.clone() }.render()] {
        a_client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    a_client.publish(b_desired.clone(), QoS::AtLeastOnce, false, b"from a".to_vec()).await.unwrap();
    // The server's own notification to b, which a must not see.
    client
        .deploy(&DeployRequest {
            model: "tabular".into(),
            version: "1.0.0".into(),
            devices: Some(vec![b.clone()]),
            selector: None,
        })
        .await
        .unwrap();
    let mut heard = vec![tokio::time::timeout(TIMEOUT, b_seen.recv()).await.unwrap().unwrap()];
    assert_eq!(heard[0].0, b_desired, "b hears the server on its own topic");
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok(message) = b_seen.try_recv() {
        heard.push(message);
    }
    // The server may notify b more than once (its cohort default, then the deployment); a's
    // message must never be among them.
    assert!(heard.iter().all(|(topic, _)| *topic == b_desired), "{heard:?}");
    assert!(heard.iter().all(|(_, payload)| payload != b"from a"), "a's publish under b's id reached b");
    let a_desired = Topic::Desired { device: a.clone() }.render();
    while let Ok((topic, _)) = a_seen.try_recv() {
        assert_eq!(topic, a_desired, "a received another device's messages");
    }

    // Revoked: Mosquitto reloads the password file without the device and drops it.
    client.revoke_device(&a).await.unwrap();
    assert!(matches!(mqtt_try(&url, Some((&a, &credential_a)), nothing).await, MqttOutcome::Refused(_)), "revoked a");
    assert_eq!(mqtt_try(&url, Some((&b, &credential_b)), nothing).await, MqttOutcome::Up, "b is unaffected");
    for agent in &agents {
        agent.shutdown().await;
    }
    server.shutdown().await;
}
