//! The local inference API under load: the real `edge-agent` binary (drift sketches and telemetry
//! on) against a bare axum + tract server that does nothing but the model call, both driven by the
//! same keep-alive HTTP/1.1 client, interleaved round by round so both see the same machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

/// The request body both servers accept: `{"inputs": [[f32; 8], ...]}`.
#[derive(Deserialize)]
struct InferBody {
    inputs: Vec<Vec<f32>>,
}

#[derive(Serialize)]
struct BareAnswer {
    outputs: Vec<Vec<f32>>,
}

type Plan = Arc<TypedSimplePlan>;

/// The baseline: axum + tract and nothing else, the model run inline in the handler.
pub async fn serve_bare(port: u16, model: &Path, shape: Vec<usize>) -> Result<()> {
    let bytes = std::fs::read(model).with_context(|| format!("cannot read {}", model.display()))?;
    let plan: Plan = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])?
        .with_input_fact(0, f32::fact(shape.clone()).into())?
        .into_optimized()?
        .into_runnable()?;
    let app = Router::new().route("/v1/infer", post(infer_bare)).with_state((plan, shape));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn infer_bare(
    State((plan, shape)): State<(Plan, Vec<usize>)>,
    Json(body): Json<InferBody>,
) -> Result<Json<BareAnswer>, String> {
    run_rows(&plan, &shape, body.inputs).map(|outputs| Json(BareAnswer { outputs })).map_err(|e| e.to_string())
}

fn run_rows(plan: &Plan, shape: &[usize], rows: Vec<Vec<f32>>) -> TractResult<Vec<Vec<f32>>> {
    let mut outputs = Vec::with_capacity(rows.len());
    for row in rows {
        let out = plan.run(tvec!(Tensor::from_shape(shape, &row)?.into()))?;
        outputs.push(out[0].to_plain_array_view::<f32>()?.iter().copied().collect());
    }
    Ok(outputs)
}

/// A server process under test, killed when dropped.
pub struct ServerProcess {
    pub name: &'static str,
    pub port: u16,
    child: Child,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    pub fn start(name: &'static str, mut command: Command, port: u16) -> Result<ServerProcess> {
        let child = command
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start the {name} server"))?;
        Ok(ServerProcess { name, port, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until one inference answers 200.
    pub async fn ready(&self, body: &Bytes) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut connection) = Connection::open(self.port).await {
                if connection.infer(body.clone()).await.unwrap_or(false) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the {} server did not answer an inference on port {}", self.name, self.port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One keep-alive HTTP/1.1 connection (hyper's client connection, no pool in between).
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    port: u16,
}

impl Connection {
    async fn open(port: u16) -> Result<Connection> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Connection { sender, port })
    }

    /// True when the server answered 200; the body is read to the end.
    async fn infer(&mut self, body: Bytes) -> Result<bool> {
        let request = hyper::Request::post("/v1/infer")
            .header("host", format!("127.0.0.1:{}", self.port))
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let response = self.sender.send_request(request).await?;
        let ok = response.status() == hyper::StatusCode::OK;
        response.into_body().collect().await?;
        Ok(ok)
    }
}

pub struct LoadFigures {
    pub requests_per_sec: f64,
    pub failures: u64,
    /// Highest VmRSS sampled while the load ran.
    pub rss_kib: u64,
}

/// `connections` clients send requests back to back for `duration`; RSS is sampled meanwhile.
pub async fn load(
    server: &ServerProcess,
    bodies: &[Bytes],
    connections: usize,
    duration: Duration,
) -> Result<LoadFigures> {
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::with_capacity(connections);
    for client in 0..connections {
        let mut connection = Connection::open(server.port).await?;
        let bodies = bodies.to_vec();
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut next = client;
            while !stop.load(Ordering::Relaxed) {
                let body = bodies[next % bodies.len()].clone();
                next += 1;
                match connection.infer(body).await {
                    Ok(true) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let started = Instant::now();
    let mut rss_kib = 0;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss_kib = rss_kib.max(super::rss_kib(server.pid()).unwrap_or(0));
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let completed = done.load(Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    Ok(LoadFigures { requests_per_sec: completed as f64 / elapsed, failures: failed.load(Ordering::Relaxed), rss_kib })
}

/// Request bodies with one 8-feature row each, rotated by the clients.
pub fn bodies(rows: &[Vec<f32>]) -> Vec<Bytes> {
    rows.iter().map(|row| Bytes::from(serde_json::json!({ "inputs": [row] }).to_string())).collect()
}

/// The bare baseline as a process of this binary: `fleet-bench bare-server`.
pub fn bare_command(port: u16, model: &Path) -> Result<Command> {
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("bare-server").arg("--port").arg(port.to_string()).arg("--model").arg(model);
    Ok(command)
}

pub fn agent_command(agent_bin: &Path, config: &Path) -> Command {
    let mut command = Command::new(agent_bin);
    command.arg("--config").arg(config);
    command
}

pub struct Comparison {
    pub connections: usize,
    pub agent: Vec<LoadFigures>,
    pub bare: Vec<LoadFigures>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

impl Comparison {
    pub fn agent_rps(&self) -> f64 {
        median(self.agent.iter().map(|f| f.requests_per_sec).collect())
    }

    pub fn bare_rps(&self) -> f64 {
        median(self.bare.iter().map(|f| f.requests_per_sec).collect())
    }

    pub fn agent_rss_kib(&self) -> u64 {
        self.agent.iter().map(|f| f.rss_kib).max().unwrap_or(0)
    }

    pub fn bare_rss_kib(&self) -> u64 {
        self.bare.iter().map(|f| f.rss_kib).max().unwrap_or(0)
    }

    pub fn failures(&self) -> u64 {
        self.agent.iter().chain(&self.bare).map(|f| f.failures).sum()
    }
}

/// Alternates agent and bare rounds (the order flips every round).
pub async fn compare(
    agent: &ServerProcess,
    bare: &ServerProcess,
    bodies: &[Bytes],
    connections: usize,
    rounds: usize,
    duration: Duration,
) -> Result<Comparison> {
    agent.ready(&bodies[0]).await?;
    bare.ready(&bodies[0]).await?;
    let mut comparison = Comparison { connections, agent: Vec::new(), bare: Vec::new() };
    for round in 0..rounds {
        let order: [&ServerProcess; 2] = if round % 2 == 0 { [agent, bare] } else { [bare, agent] };
        for server in order {
            let figures = load(server, bodies, connections, duration).await?;
            eprintln!(
                "  round {}: {} {:.0} req/s, RSS {} KiB",
                round + 1,
                server.name,
                figures.requests_per_sec,
                figures.rss_kib
            );
            if std::ptr::eq(server, agent) {
                comparison.agent.push(figures);
            } else {
                comparison.bare.push(figures);
            }
        }
    }
    Ok(comparison)
}

/// Where the model file for the bare server lives during the run.
pub fn model_file(dir: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join("bare-model.onnx");
    std::fs::write(&path, bytes)?;
    Ok(path)
}
