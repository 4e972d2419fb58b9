//! The edge-agent binary under a service manager's signals, as systemd sends them: SIGTERM
//! (`systemctl stop`) ends it with status 0 after every telemetry record of the requests it
//! answered is on disk; SIGHUP (`systemctl reload`) refuses a config that does not load and keeps
//! serving, and applies one that does. Its log lines carry no colour codes when stdout is a pipe.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edge_agent::updater::disk::Layout;
use fleet_server::server::free_loopback_port;
use fleet_tests::*;

/// The edge-agent binary cargo built beside this test; built here when missing.
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().and_then(Path::parent).unwrap().join("edge-agent");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo).args(["build", "-p", "edge-agent", "--bin", "edge-agent"]).status().unwrap();
        assert!(status.success(), "building edge-agent failed");
    }
    binary
}

/// A data directory with tabular 1.0.0 installed, and a config for an agent that never reaches a
/// server (nothing listens on port 9): it serves the installed model.
fn offline_agent(dir: &Path, api_port: u16) -> PathBuf {
    let (secret, public) = new_key();
    let data = dir.join("data");
    let bundle = fixture_bundle(&secret, "1.0.0", MLP).unwrap();
    let trusted = proto::TrustedKeys::from_hex([public.as_str()]).unwrap();
    let verified = proto::bundle::read_archive(&bundle, &Default::default()).unwrap().verify(&trusted).unwrap();
    let layout = Layout::new(&data);
    layout.stage(&verified).unwrap();
    layout.activate("tabular", "1.0.0").unwrap();
    std::fs::write(dir.join("public"), &public).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(&config, config_text(dir, api_port)).unwrap();
    config
}

fn config_text(dir: &Path, api_port: u16) -> String {
    let public = std::fs::read_to_string(dir.join("public")).unwrap();
    format!(
        "server_url = \"http://127.0.0.1:9\"\nenrollment_token = \"offline\"\ndata_dir = \"{}\"\n\
         trusted_keys = [\"{public}\"]\nmqtt_url = \"mqtt://127.0.0.1:9\"\napi_listen = \"127.0.0.1:{api_port}\"\n",
        dir.join("data").display()
    )
}

struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Agent {
    fn start(config: &Path) -> Agent {
        let mut child = Command::new(agent_binary())
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Agent { child, lines, seen: Vec::new() }
    }

    /// Waits for a log line containing `text`.
    fn wait_for_line(&mut self, text: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no log line with {text:?}; seen:\n{}", self.seen.join("\n"));
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "edge-agent did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs one row; None when nothing answers on the port.
async fn infer_once(http: &reqwest::Client, port: u16) -> Option<u16> {
    let body = serde_json::json!({ "inputs": synthetic_rows(7, 1, 0.0) });
    let response = http.post(format!("http://127.0.0.1:{port}/v1/infer")).json(&body).send().await.ok()?;
    Some(response.status().as_u16())
}

/// Returns once a request has been answered with 200 (that one request included).
async fn wait_serving(http: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + TIMEOUT;
    while infer_once(http, port).await != Some(200) {
        assert!(Instant::now() < deadline, "nothing served the model on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_writes_the_telemetry_of_every_answered_request_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_loopback_port().unwrap();
    let mut agent = Agent::start(&offline_agent(dir.path(), port));
    let http = edge_agent::http::client();
    wait_serving(&http, port).await;
    for _ in 0..300 {
        assert_eq!(infer_once(&http, port).await, Some(200));
    }
    // Right after the last answer: records may still sit in the writer's queue or batch.
    agent.signal("TERM");
    let status = agent.wait_exit();
    assert_eq!(status.code(), Some(0), "{status}");
    // Every answered request leaves one record: the 300 and the one that found the model serving
    // (requests refused before it leave none).
    assert_eq!(telemetry_rows(dir.path()), 301);
    agent.wait_for_line("stopped");
}

fn telemetry_rows(dir: &Path) -> i64 {
    let path = dir.join("data/telemetry.db");
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT COUNT(*) FROM telemetry", [], |r| r.get(0)).unwrap()
}

#[tokio::test]
async fn sighup_refuses_a_broken_config_keeps_serving_and_applies_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let (old_port, new_port) = (free_loopback_port().unwrap(), free_loopback_port().unwrap());
    let config = offline_agent(dir.path(), old_port);
    let mut agent = Agent::start(&config);
    let http = edge_agent::http::client();
    agent.wait_for_line("edge-agent running");
    wait_serving(&http, old_port).await;

    std::fs::write(&config, format!("{}server_ulr = \"x\"\n", config_text(dir.path(), new_port))).unwrap();
    agent.signal("HUP");
    let refused = agent.wait_for_line("reload refused");
    assert!(refused.contains("server_ulr"), "{refused}");
    assert_eq!(infer_once(&http, old_port).await, Some(200), "still serving on the old port");

    std::fs::write(&config, config_text(dir.path(), new_port)).unwrap();
    agent.signal("HUP");
    agent.wait_for_line("config reloaded");
    wait_serving(&http, new_port).await;
    assert_eq!(infer_once(&http, old_port).await, None, "the old port is closed");

    agent.signal("TERM");
    assert_eq!(agent.wait_exit().code(), Some(0));
    agent.wait_for_line("stopped");
    let escapes: Vec<&String> = agent.seen.iter().filter(|l| l.contains('\x1b')).collect();
    assert!(escapes.is_empty(), "colour codes in piped log lines: {escapes:?}");
}
