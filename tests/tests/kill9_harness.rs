//! A crash at any point leaves a working model and loses nothing acknowledged. The real
//! edge-agent binary runs as a child process and is killed with SIGKILL at random moments while
//! it downloads, verifies and activates new versions (the desired version flips between 1.0.0
//! and 2.0.0), serves traffic (telemetry writes) and reports (outbox writes). After every kill:
//! both SQLite files pass `PRAGMA integrity_check`, and the restarted agent serves 1.0.0 or
//! 2.0.0, both verified, once one was ever active. At the end the agent syncs and the server
//! holds every record the agent wrote, once.
//!
//! `KILL9_CYCLES` sets the number of cycles (CI: 200; the documented long run: 1,000).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_server::server;
use fleet_tests::*;
use fleetctl::demo::wait_for;
use proto::wire::DeployRequest;

/// The edge-agent binary cargo built beside this test (it builds it for the agent's own CLI
/// tests); built here when missing.
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let debug_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let binary = debug_dir.join("edge-agent");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo).args(["build", "-p", "edge-agent", "--bin", "edge-agent"]).status().unwrap();
        assert!(status.success(), "building edge-agent failed");
    }
    binary
}

fn write_config(dir: &Path, server_url: &str, mqtt_url: &str, token: &str, public: &str, api_port: u16) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        r#"server_url = "{server_url}"
enrollment_token = "{token}"
name = "kill9"
data_dir = "{data}"
trusted_keys = ["{public}"]
mqtt_url = "{mqtt_url}"
api_listen = "127.0.0.1:{api_port}"

[intervals]
checkin_secs = 0.3
heartbeat_secs = 0.2
drift_secs = 0.3

[limits]
ack_timeout_secs = 2.0
request_timeout_secs = 5.0
# The harness's kills are not the model's fault: keep retrying updates instead of failing them.
self_test_restarts = 1000
"#,
        data = dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn integrity(path: &Path) -> String {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)).unwrap()
}

struct Agent {
    child: Child,
    api: String,
}

impl Agent {
    fn start(binary: &Path, config: &Path, api_port: u16) -> Agent {
        let child = Command::new(binary)
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Agent { child, api: format!("http://127.0.0.1:{api_port}/v1/infer") }
    }

    /// The version it serves, or None when it serves nothing (yet).
    async fn served(&self, http: &reqwest::Client) -> Option<Option<String>> {
        let body = serde_json::json!({ "inputs": synthetic_rows(1, 3, 0.0) });
        let response = http.post(&self.api).json(&body).send().await.ok()?;
        let ok = response.status().is_success();
        let answer: serde_json::Value = response.json().await.ok()?;
        Some(ok.then(|| answer["version"].as_str().unwrap_or_default().to_string()))
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_at_random_moments_always_restarts_serving_a_verified_model_and_loses_nothing() {
    let cycles: usize = std::env::var("KILL9_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let binary = agent_binary();
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = new_key();
    let (server, client) = start_server(dir.path(), mqtt_from_env(), vec![public.clone()]).await;
    client.publish(fixture_bundle(&secret, "1.0.0", MLP).unwrap()).await.unwrap();
    client.publish(bundle_with_golden(&secret, "2.0.0", MLP_V2, MLP_V2_GOLDEN).unwrap()).await.unwrap();
    let token = client.tokens(1).await.unwrap().remove(0);
    let http = edge_agent::http::client();
    let data = dir.path().join("data");
    let mut ever_active = false;
    let mut versions_seen = std::collections::BTreeSet::new();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut random = move |below: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % below.max(1)
    };
    for cycle in 0..cycles {
        let api_port = server::free_loopback_port().unwrap();
        let config = write_config(dir.path(), &server.url(), &server.mqtt_url, &token, &public, api_port);
        let mut agent = Agent::start(&binary, &config, api_port);
        // What it serves right after the restart: a verified version, once one was ever active.
        let served = wait_for("the local API to answer", TIMEOUT, || agent.served(&http)).await.unwrap();
        match &served {
            Some(version) => {
                assert!(version == "1.0.0" || version == "2.0.0", "cycle {cycle}: serves {version:?}");
                ever_active = true;
                versions_seen.insert(version.clone());
            }
            None => assert!(!ever_active, "cycle {cycle}: a model was active before the kill and none serves now"),
        }
        // Flip the desired version now and then, so kills land inside updates.
        if cycle % 3 == 0 {
            let version = if (cycle / 3) % 2 == 0 { "2.0.0" } else { "1.0.0" };
            let request =
                DeployRequest { model: "tabular".into(), version: version.into(), devices: None, selector: None };
            if client.devices().await.map(|d| !d.is_empty()).unwrap_or(false) {
                client.deploy(&request).await.unwrap();
            }
        }
        if cycle == 0 {
            wait_for("enrollment", TIMEOUT, || async { (client.devices().await.ok()?.len() == 1).then_some(()) })
                .await
                .unwrap();
            client
                .deploy(&DeployRequest {
                    model: "tabular".into(),
                    version: "1.0.0".into(),
                    devices: None,
                    selector: None,
                })
                .await
                .unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(random(700));
        while tokio::time::Instant::now() < deadline {
            let _ = agent.served(&http).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent.kill();
        for file in ["agent.db", "telemetry.db"] {
            let path = data.join(file);
            if path.exists() {
                assert_eq!(integrity(&path), "ok", "cycle {cycle}: {file}");
            }
        }
    }
    assert!(ever_active, "no version ever became active in {cycles} cycles");

    // Last start: let it settle and sync; the server then holds every record it wrote, once.
    let api_port = server::free_loopback_port().unwrap();
    let config = write_config(dir.path(), &server.url(), &server.mqtt_url, &token, &public, api_port);
    let mut agent = Agent::start(&binary, &config, api_port);
    let device = client.devices().await.unwrap().remove(0).id;
    let written = || {
        let conn = rusqlite::Connection::open(data.join("agent.db")).unwrap();
        let (next, pending): (i64, i64) = conn
            .query_row("SELECT next_seq, (SELECT COUNT(*) FROM outbox) FROM delivery", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let telemetry = rusqlite::Connection::open(data.join("telemetry.db")).unwrap();
        let (rows, next_row): (i64, i64) = telemetry
            .query_row("SELECT (SELECT COUNT(*) FROM telemetry), next_seq FROM meta", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        (next as u64 - 1, pending as u64, next_row as u64 - 1, rows as u64)
    };
    let settled = wait_for("the agent to sync everything", TIMEOUT, || async {
        let (reports, pending, telemetry, buffered) = written();
        let view = client.delivery().await.ok()?.into_iter().find(|v| v.device == device)?;
        (pending == 0 && buffered == 0 && view.reports_stored == reports && view.telemetry_stored == telemetry)
            .then_some((view, reports, telemetry))
    })
    .await;
    agent.kill();
    let (view, reports, telemetry) = settled.unwrap_or_else(|e| panic!("{e}: written {:?}", written()));
    assert_eq!(view.evicted, proto::delivery::Evicted::default());
    eprintln!(
        "{cycles} kill -9 cycles: versions served after restarts {versions_seen:?}; {reports} reports and {telemetry} \
         telemetry rows written, all stored once ({} + {} redeliveries dropped)",
        view.reports_duplicates, view.telemetry_duplicates
    );
    server.shutdown().await;
}
