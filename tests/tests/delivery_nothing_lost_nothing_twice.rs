//! Nothing acknowledged is lost; nothing is stored twice. Twenty agents keep inferring and
//! reporting (heartbeats, drift windows, telemetry) while the server is stopped and restarted,
//! while the broker goes away and comes back (a real Mosquitto process killed and restarted when
//! the machine has one), and while some agents are stopped mid-flight and started again. At the
//! end, per device, the server stored exactly the records the agent wrote (its sequence counter)
//! and every telemetry row it buffered, and every outbox is empty.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edge_agent::AgentHandle;
use fleet_server::server::{self, free_loopback_port, Mqtt, ServerConfig, ServerHandle};
use fleet_tests::*;
use fleetctl::client::FleetClient;
use fleetctl::demo::{agent_config, wait_for};

const AGENTS: usize = 20;
const ROWS_PER_CALL: usize = 5;

fn server_config(dir: &Path, http_port: u16, mqtt_url: &str, public: &str) -> ServerConfig {
    ServerConfig {
        listen: ([127, 0, 0, 1], http_port).into(),
        data_dir: dir.join("server"),
        mqtt: Mqtt::External { url: mqtt_url.to_string() },
        operator_token: Some("op".into()),
        trusted_keys: vec![public.to_string()],
        max_bundle_bytes: 64 << 20,
        rollout_tick: Duration::from_millis(200),
        ..ServerConfig::default()
    }
}

async fn start_server(dir: &Path, http_port: u16, mqtt_url: &str, public: &str) -> ServerHandle {
    wait_for("the server to start on its port", TIMEOUT, || async {
        server::start(server_config(dir, http_port, mqtt_url, public)).await.ok()
    })
    .await
    .unwrap()
}

/// A Mosquitto of this test's own, so it can be killed and restarted.
struct OwnMosquitto {
    port: u16,
    child: Child,
}

impl OwnMosquitto {
    fn start(port: u16) -> Option<OwnMosquitto> {
        let child = Command::new("/usr/sbin/mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(OwnMosquitto { port, child })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.kill();
        *self = OwnMosquitto::start(self.port).expect("mosquitto restarts");
    }
}

impl Drop for OwnMosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Some inferences and a closed drift window on every running agent; returns rows inferred.
async fn traffic(agents: &[AgentHandle], round: u64) -> u64 {
    for (i, agent) in agents.iter().enumerate() {
        let rows = synthetic_rows(round * 100 + i as u64, ROWS_PER_CALL, 0.0);
        let (status, body) = infer(agent, serde_json::json!({ "inputs": rows })).await;
        assert_eq!(status, 200, "{body}");
        agent.report_drift_now().await;
    }
    ROWS_PER_CALL as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reports_and_telemetry_sent_through_outages_are_stored_exactly_once() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = new_key();
    let mqtt_port = free_loopback_port().unwrap();
    // With Mosquitto on the machine (CI names it), run one of our own that can be restarted;
    // otherwise the embedded broker, which outlives the server in this process.
    let mut mosquitto = std::env::var("FLEET_TEST_MQTT_URL").ok().and_then(|_| OwnMosquitto::start(mqtt_port));
    if mosquitto.is_none() {
        fleet_server::broker::start_open(([127, 0, 0, 1], mqtt_port).into(), 70_000).unwrap();
    }
    let mqtt_url = format!("mqtt://127.0.0.1:{mqtt_port}");
    let http_port = free_loopback_port().unwrap();
    let server = start_server(dir.path(), http_port, &mqtt_url, &public).await;
    let client = FleetClient::new(&server.url(), "op");
    let tokens = client.tokens(AGENTS as u32).await.unwrap();
    let config = |i: usize, token: &str| {
        agent_config(&server.url(), &mqtt_url, token, &public, dir.path().join(format!("agent-{i:02}")), i)
    };
    let mut agents = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        agents.push(edge_agent::start(config(i, token)).await.unwrap());
    }
    client.publish(fixture_bundle(&secret, "1.0.0", MLP).unwrap()).await.unwrap();
    client
        .deploy(&proto::wire::DeployRequest {
            model: "tabular".into(),
            version: "1.0.0".into(),
            devices: None,
            selector: None,
        })
        .await
        .unwrap();
    wait_for("tabular 1.0.0 active on every agent", TIMEOUT, || async {
        let mut all = true;
        for agent in &agents {
            all &= agent.engine.active().await.contains_key("tabular");
        }
        all.then_some(())
    })
    .await
    .unwrap();

    let mut rows_per_agent = traffic(&agents, 0).await;

    // The server goes away; agents keep inferring and reporting into their outboxes (and, with
    // a separate broker, into the server's persistent session).
    server.shutdown().await;
    rows_per_agent += traffic(&agents, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    rows_per_agent += traffic(&agents, 2).await;
    let server = start_server(dir.path(), http_port, &mqtt_url, &public).await;

    // The broker goes away (and with it whatever it held), then returns on the same port.
    if let Some(mosquitto) = mosquitto.as_mut() {
        rows_per_agent += traffic(&agents, 3).await;
        mosquitto.restart();
        rows_per_agent += traffic(&agents, 4).await;
    }

    // A quarter of the agents stop mid-flight and start again from their data directories.
    for i in (0..AGENTS).step_by(4) {
        agents[i].request_shutdown();
        agents[i].shutdown().await;
        let mut restarted = config(i, "unused");
        restarted.enrollment_token = None;
        agents[i] = edge_agent::start(restarted).await.unwrap();
    }
    wait_for("restarted agents serve again", TIMEOUT, || async {
        let mut all = true;
        for agent in &agents {
            all &= agent.engine.active().await.contains_key("tabular");
        }
        all.then_some(())
    })
    .await
    .unwrap();
    rows_per_agent += traffic(&agents, 5).await;

    // Settle: per device, every record the agent wrote is stored exactly once.
    let client = FleetClient::new(&server.url(), "op");
    let ids: Vec<String> = agents.iter().map(|a| a.device_id().unwrap()).collect();
    let settled = wait_for("every record stored exactly once", Duration::from_secs(120), || async {
        let views = client.delivery().await.ok()?;
        for (agent, id) in agents.iter().zip(&ids) {
            let stats = agent.delivery().await.ok()?;
            let view = views.iter().find(|v| &v.device == id)?;
            let done = stats.pending == 0
                && view.reports_stored == stats.written
                && view.telemetry_stored == rows_per_agent
                && agent.telemetry.flush().await == Some(0);
            if !done {
                return None;
            }
        }
        Some(views)
    })
    .await;
    let views = match settled {
        Ok(views) => views,
        Err(e) => {
            let views = client.delivery().await.unwrap();
            for (agent, id) in agents.iter().zip(&ids) {
                let stats = agent.delivery().await.unwrap();
                let view = views.iter().find(|v| &v.device == id);
                eprintln!("{id}: agent {stats:?} server {view:?}");
            }
            panic!("{e}; telemetry rows per agent {rows_per_agent}");
        }
    };
    for view in &views {
        assert_eq!(view.evicted, proto::delivery::Evicted::default(), "nothing was evicted under a large budget");
    }
    let duplicates_dropped: u64 = views.iter().map(|v| v.reports_duplicates + v.telemetry_duplicates).sum();
    eprintln!("settled: {} devices, {duplicates_dropped} redelivered records recognised and dropped", views.len());
    for agent in &agents {
        agent.shutdown().await;
    }
    server.shutdown().await;
}
