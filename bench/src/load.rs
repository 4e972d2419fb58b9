//! fleet-load: N simulated agents speaking the real protocol against one fleet-server process
//! on loopback. Each enrolls with its own ed25519 key, holds an MQTT session with its own
//! credentials, checks in over HTTP, signs every heartbeat, drift window and status it sends,
//! and installs what the server asks for (downloads the bundle, reports `active`). Nothing
//! runs a model: the agent's own costs are measured by fleet-bench; this measures the server.
//!
//! What it reports: client-side check-in latency (p50/p99/max, steady state only), the time from
//! publishing a report to the server's acknowledgement (the server stores before it acks, so a
//! growing delay or backlog means ingest is not keeping up), the server's RSS and CPU from
//! /proc, and the rollout driver's tick duration from the server's /metrics.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edge_agent::uplink::ack_timer::AckTimer;
use fleetctl::client::FleetClient;
use fleetctl::demo::{fixture_bundle, synthetic_rows, wait_for};
use proto::bundle::{read_archive, Limits};
use proto::delivery::{sealed_payload, Ack};
use proto::drift::{SketchLayout, WindowSketch};
use proto::keys::{public_key_hex, SigningKey};
use proto::wire::{
    decode, encode, CheckinRequest, DesiredState, DriftSummary, EnrollRequest, EnrollResponse, Health, Heartbeat,
    ModelCounters, Topic, UpdateStatus, UpdateStep,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// What one run does.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub agents: usize,
    /// How long agents run once all are started.
    pub steady: Duration,
    pub checkin: Duration,
    pub heartbeat: Duration,
    pub drift: Duration,
    /// Agents started per second.
    pub ramp_per_sec: usize,
    /// The fleet-server binary to start.
    pub server_bin: PathBuf,
    /// More arguments for it (e.g. `--database-url postgres://…`).
    pub server_args: Vec<String>,
    /// Start a rollout of 2.0.0 over every agent this long into the steady phase.
    pub rollout_after: Option<Duration>,
    /// An external broker (`host:port`, e.g. the machine's Mosquitto) instead of the server's
    /// embedded one: server and agents connect to it.
    pub broker: Option<String>,
}

/// Shared counters; latencies as (seconds since the steady phase began, microseconds).
#[derive(Default)]
struct Stats {
    enrolled: AtomicU64,
    connected: AtomicU64,
    published: AtomicU64,
    acked: AtomicU64,
    /// Records sent again because their acknowledgement was overdue (the agent's `AckTimer`: at
    /// least 30 s, longer while acknowledgements take longer).
    resent: AtomicU64,
    installs: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<String>,
    checkins: Mutex<Vec<(i64, u32)>>,
    acks: Mutex<Vec<u32>>,
}

impl Stats {
    fn error(&self, what: impl std::fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = what.to_string();
    }
}

/// A sample of the server process and the fleet's backlog.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at_secs: f64,
    pub rss_mib: f64,
    pub cpu_percent: f64,
    pub backlog: u64,
    pub connected: u64,
}

#[derive(Debug)]
pub struct LoadReport {
    pub options: LoadOptions,
    pub checkin_p50_ms: f64,
    pub checkin_p99_ms: f64,
    pub checkin_max_ms: f64,
    pub checkins: usize,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub reports_acked: u64,
    pub reports_published: u64,
    pub reports_resent: u64,
    pub samples: Vec<Sample>,
    pub tick: Option<TickStats>,
    /// The check-in's p50 and p99 as the server measured them (upper bounds of its histogram
    /// buckets, which double), in the steady phase before the rollout and from the rollout on,
    /// to tell the server's time from the load generator's own delays on the shared cores.
    pub server_checkin_ms: ServerCheckins,
    pub installs: u64,
    pub errors: u64,
    pub last_error: String,
    pub ramp_secs: f64,
}

/// Server-side check-in quantiles (p50, p99 in ms) per phase; None where nothing was observed.
#[derive(Debug, Default)]
pub struct ServerCheckins {
    pub before_rollout: Option<(f64, f64)>,
    pub from_rollout_on: Option<(f64, f64)>,
}

#[derive(Debug)]
pub struct TickStats {
    pub count: u64,
    pub mean_ms: f64,
    /// The upper bound of the histogram bucket holding the slowest tick.
    pub max_bucket_ms: f64,
}

struct Server {
    child: Child,
    url: String,
    mqtt: (String, u16),
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The server's warnings and errors say why a run did not keep up.
        let log = std::fs::read_to_string(self._dir.path().join("server.log")).unwrap_or_default();
        let worrying: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        eprintln!("server log: {} warnings and errors; the last ones:", worrying.len());
        for line in worrying.iter().rev().take(15).rev() {
            eprintln!("  {line}");
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_server(options: &LoadOptions, public_key: &str) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let (mqtt, broker_args) = match &options.broker {
        Some(broker) => {
            let (host, port) = broker.rsplit_once(':').context("--broker is host:port")?;
            ((host.to_string(), port.parse()?), vec!["--mqtt-url".to_string(), format!("mqtt://{broker}")])
        }
        None => {
            let mqtt_port = free_port()?;
            (("127.0.0.1".to_string(), mqtt_port), vec!["--mqtt-listen".to_string(), format!("127.0.0.1:{mqtt_port}")])
        }
    };
    let token = hex::encode(rand::random::<[u8; 16]>());
    let log = std::fs::File::create(dir.path().join("server.log"))?;
    let child = Command::new(&options.server_bin)
        .args(["--data-dir", &dir.path().join("data").display().to_string()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(&broker_args)
        .args(["--operator-token", &token, "--trusted-key", public_key])
        .args(&options.server_args)
        // The server logs to stdout and prints its start-up lines to stderr: both go to the log.
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", options.server_bin.display()))?;
    let server = Server { child, url: format!("http://127.0.0.1:{port}"), mqtt, token, _dir: dir };
    let health = format!("{}/healthz", server.url);
    wait_for("the server to answer", Duration::from_secs(60), || async {
        reqwest::get(&health).await.ok()?.status().is_success().then_some(())
    })
    .await
    .context("fleet-server did not start")?;
    Ok(server)
}

/// The server's RSS (MiB) and CPU seconds used so far, from /proc.
fn process_usage(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the command name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((rss_kib / 1024.0, ticks / 100.0))
}

/// A drift window per version, built once from synthetic rows and cloned into every summary.
struct Fixtures {
    sketches: HashMap<String, WindowSketch>,
}

impl Fixtures {
    fn new(layouts: &[(String, SketchLayout)]) -> Fixtures {
        let mut sketches = HashMap::new();
        for (version, layout) in layouts {
            let mut sketch = WindowSketch::empty(layout);
            let outputs: Vec<f32> = (0..layout.classes).map(|i| if i == 0 { 0.8 } else { 0.2 }).collect();
            for row in synthetic_rows(7, 100, 0.0) {
                sketch.observe(layout, &row, &outputs, 60);
            }
            sketches.insert(version.clone(), sketch);
        }
        Fixtures { sketches }
    }
}

struct SimAgent {
    http: reqwest::Client,
    server_url: String,
    device: String,
    credential: String,
    key: SigningKey,
    seq: u64,
    /// Published and not acknowledged yet, to send again as an agent does when its
    /// acknowledgement is overdue.
    unacked: HashMap<u64, Unacked>,
    /// How long acknowledgements take, hence when a record is overdue (the agent's own timer).
    ack_timer: AckTimer,
    active: String,
    stats: Arc<Stats>,
    started: Instant,
    fixtures: Arc<Fixtures>,
}

/// A record published and not acknowledged yet.
struct Unacked {
    first_sent: Instant,
    /// When it is sent again unless acknowledged first.
    due: Instant,
    sends: u32,
    topic: String,
    payload: Vec<u8>,
}

impl SimAgent {
    /// Every record below it was acknowledged.
    fn floor(&self) -> u64 {
        self.unacked.keys().min().copied().unwrap_or(self.seq + 1)
    }

    /// Sends again what is overdue for its acknowledgement (the same sequence: the server stores
    /// it once and acknowledges it again), each record waiting twice as long as before next
    /// time, up to the agent's factor: the agent's policy (`edge_agent::uplink`).
    fn resend_overdue(&mut self, client: &AsyncClient) {
        let now = Instant::now();
        for record in self.unacked.values_mut().filter(|record| record.due <= now) {
            if client.try_publish(record.topic.clone(), QoS::AtLeastOnce, false, record.payload.clone()).is_ok() {
                record.sends += 1;
                record.due = now + self.ack_timer.wait(record.sends);
                self.stats.resent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn publish(&mut self, client: &AsyncClient, topic: Topic, body: Vec<u8>) {
        self.seq += 1;
        let topic = topic.render();
        let payload = sealed_payload(&self.key, &topic, self.seq, self.floor(), &body);
        if client.try_publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()).is_ok() {
            let now = Instant::now();
            let due = now + self.ack_timer.wait(1);
            self.unacked.insert(self.seq, Unacked { first_sent: now, due, sends: 1, topic, payload });
            self.stats.published.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn status(&mut self, client: &AsyncClient, version: &str, step: UpdateStep) {
        let status = UpdateStatus {
            model: "tabular".into(),
            version: version.into(),
            step,
            detail: String::new(),
            active_version: Some(self.active.clone()),
            at_ms: unix_ms(),
        };
        self.publish(client, Topic::Status { device: self.device.clone(), model: "tabular".into() }, encode(&status));
    }

    fn heartbeat(&mut self, client: &AsyncClient) {
        let heartbeat = Heartbeat {
            at_ms: unix_ms(),
            uptime_secs: self.started.elapsed().as_secs(),
            health: Health {
                cpu_percent: 5.0,
                memory_used_bytes: 64 << 20,
                memory_total_bytes: 1 << 30,
                disk_free_bytes: 4 << 30,
                disk_total_bytes: 8 << 30,
            },
            models: vec![ModelCounters {
                model: "tabular".into(),
                version: self.active.clone(),
                inferences: self.started.elapsed().as_secs() * 10,
                errors: 0,
                telemetry_dropped: 0,
                latency_p95_us: Some(60),
                shadow_version: None,
            }],
        };
        self.publish(client, Topic::Heartbeat { device: self.device.clone() }, encode(&heartbeat));
    }

    fn drift(&mut self, client: &AsyncClient, window: Duration) {
        let Some(sketch) = self.fixtures.sketches.get(&self.active).cloned() else { return };
        let end = unix_ms();
        let summary = DriftSummary {
            model: "tabular".into(),
            version: self.active.clone(),
            window_start_ms: end.saturating_sub(window.as_millis() as u64),
            window_end_ms: end,
            sketch,
            shadow: None,
        };
        self.publish(client, Topic::Drift { device: self.device.clone(), model: "tabular".into() }, encode(&summary));
    }

    fn on_ack(&mut self, ack: Ack) {
        let latencies: Vec<u32> = ack
            .seqs
            .iter()
            .filter_map(|seq| self.unacked.remove(seq))
            .map(|record| {
                let delay = record.first_sent.elapsed();
                self.ack_timer.observe(delay);
                delay.as_micros().min(u32::MAX as u128) as u32
            })
            .collect();
        self.stats.acked.fetch_add(latencies.len() as u64, Ordering::Relaxed);
        self.stats.acks.lock().unwrap_or_else(|p| p.into_inner()).extend(latencies);
    }

    /// Checks in; installs the desired version when it differs from what runs.
    async fn check_in(&mut self, client: &AsyncClient, steady_since: Instant) {
        let url = format!("{}/api/v1/devices/{}/checkin", self.server_url, self.device);
        let body = CheckinRequest {
            models: vec![UpdateStatus {
                model: "tabular".into(),
                version: self.active.clone(),
                step: UpdateStep::Active,
                detail: String::new(),
                active_version: Some(self.active.clone()),
                at_ms: unix_ms(),
            }],
        };
        let sent = Instant::now();
        let reply = self.http.post(&url).bearer_auth(&self.credential).json(&body).send().await;
        let desired: DesiredState = match reply {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(d) => d,
                Err(e) => return self.stats.error(format!("check-in reply: {e}")),
            },
            Ok(r) => return self.stats.error(format!("check-in: HTTP {}", r.status())),
            Err(e) => return self.stats.error(format!("check-in: {e}")),
        };
        let latency = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
        let at = if sent >= steady_since { (sent - steady_since).as_secs() as i64 } else { -1 };
        self.stats.checkins.lock().unwrap_or_else(|p| p.into_inner()).push((at, latency));
        let Some(model) = desired.models.iter().find(|m| m.name == "tabular") else { return };
        if model.version == self.active {
            return;
        }
        self.status(client, &model.version, UpdateStep::Downloading);
        let url = format!("{}{}", self.server_url, model.bundle_path);
        match self.http.get(&url).bearer_auth(&self.credential).send().await {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(b) if b.len() as u64 == model.bundle_size => {
                    self.active = model.version.clone();
                    self.status(client, &model.version, UpdateStep::Active);
                    self.stats.installs.fetch_add(1, Ordering::Relaxed);
                }
                Ok(b) => self.stats.error(format!("download: {} bytes, {} expected", b.len(), model.bundle_size)),
                Err(e) => self.stats.error(format!("download: {e}")),
            },
            Ok(r) => self.stats.error(format!("download: HTTP {}", r.status())),
            Err(e) => self.stats.error(format!("download: {e}")),
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// How long a simulated agent waits for an acknowledgement before it sends the record again, at
/// least (the agent's default `ack_timeout_secs`); longer while acknowledgements take longer.
const RESEND_AFTER: Duration = Duration::from_secs(30);
/// How often a simulated agent looks for overdue records.
const RESEND_CHECK: Duration = Duration::from_secs(1);

struct Shared {
    options: LoadOptions,
    http: reqwest::Client,
    server_url: String,
    mqtt: (String, u16),
    stats: Arc<Stats>,
    fixtures: Arc<Fixtures>,
    /// When the steady phase starts (after the ramp) and when every agent stops.
    steady_since: Instant,
    stop_at: Instant,
}

async fn run_agent(shared: Arc<Shared>, index: usize, token: String) {
    let stats = shared.stats.clone();
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let request = EnrollRequest {
        token,
        public_key: public_key_hex(&key.verifying_key()),
        name: format!("load-{index:05}"),
        labels: [("site".to_string(), format!("site-{:03}", index % 100))].into(),
    };
    let enrolled = shared.http.post(format!("{}/api/v1/enroll", shared.server_url)).json(&request).send().await;
    let EnrollResponse { device_id, credential } = match enrolled {
        Ok(r) if r.status().is_success() => match r.json().await {
            Ok(e) => e,
            Err(e) => return stats.error(format!("enroll reply: {e}")),
        },
        Ok(r) => return stats.error(format!("enroll: HTTP {}", r.status())),
        Err(e) => return stats.error(format!("enroll: {e}")),
    };
    stats.enrolled.fetch_add(1, Ordering::Relaxed);
    let mut options = MqttOptions::new(format!("load-{device_id}"), shared.mqtt.0.clone(), shared.mqtt.1);
    options.set_credentials(device_id.clone(), credential.clone());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut eventloop) = AsyncClient::new(options, 32);
    let mut agent = SimAgent {
        http: shared.http.clone(),
        server_url: shared.server_url.clone(),
        device: device_id.clone(),
        credential,
        key,
        seq: 0,
        unacked: HashMap::new(),
        ack_timer: AckTimer::new(RESEND_AFTER),
        active: "1.0.0".into(),
        stats: stats.clone(),
        started: Instant::now(),
        fixtures: shared.fixtures.clone(),
    };
    let desired_topic = Topic::Desired { device: device_id.clone() }.render();
    let ack_topic = Topic::Ack { device: device_id.clone() }.render();
    // Each agent's periodic work starts at its own offset (golden-ratio spread) within the period.
    let offset = (index as f64 * 0.618_034) % 1.0;
    let every =
        |period: Duration| tokio::time::interval_at(tokio::time::Instant::now() + period.mul_f64(offset), period);
    let (mut checkins, mut heartbeats, mut drifts) =
        (every(shared.options.checkin), every(shared.options.heartbeat), every(shared.options.drift));
    let mut resends = every(RESEND_CHECK);
    let stop = tokio::time::sleep_until(shared.stop_at.into());
    tokio::pin!(stop);
    let mut connected = false;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if !connected {
                        stats.connected.fetch_add(1, Ordering::Relaxed);
                        connected = true;
                    }
                    let _ = client.try_subscribe(desired_topic.clone(), QoS::AtLeastOnce);
                    let _ = client.try_subscribe(ack_topic.clone(), QoS::AtLeastOnce);
                    let active = agent.active.clone();
                    agent.status(&client, &active, UpdateStep::Active);
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                    if let Ok(ack) = decode::<Ack>("acknowledgement", &p.payload) {
                        agent.on_ack(ack);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == desired_topic => {
                    agent.check_in(&client, shared.steady_since).await;
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        stats.connected.fetch_sub(1, Ordering::Relaxed);
                        connected = false;
                    }
                    stats.error(format!("mqtt: {e}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = checkins.tick(), if connected => agent.check_in(&client, shared.steady_since).await,
            _ = heartbeats.tick(), if connected => agent.heartbeat(&client),
            _ = drifts.tick(), if connected => agent.drift(&client, shared.options.drift),
            _ = resends.tick(), if connected => agent.resend_overdue(&client),
        }
    }
    let _ = client.try_disconnect();
}

fn quantile_ms(values: &mut [u32], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_unstable();
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index] as f64 / 1000.0
}

/// The server's /metrics text (Prometheus), read with the operator token.
async fn scrape_metrics(server: &Server) -> Result<String> {
    Ok(reqwest::Client::new()
        .get(format!("{}/metrics", server.url))
        .bearer_auth(&server.token)
        .send()
        .await?
        .text()
        .await?)
}

/// The check-in route's series of the server's API latency histogram.
const CHECKIN_SERIES: (&str, &str) =
    ("fleet_api_request_duration_seconds", "route=\"/api/v1/devices/{id}/checkin\",status=\"200\"");

/// One histogram series' cumulative buckets (upper bound in seconds, count) from /metrics text.
fn buckets(metrics: &str, (name, labels): (&str, &str)) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(labels))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((le.parse().unwrap_or(f64::INFINITY), count as u64))
        })
        .collect()
}

/// The upper bound, in ms, of the bucket holding quantile `q` of what a histogram observed
/// between two scrapes; None when it observed nothing.
fn bucket_quantile_ms(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let since: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| (le, n.saturating_sub(before.iter().find(|(b, _)| *b == le).map_or(0, |&(_, m)| m))))
        .collect();
    let total = since.iter().map(|&(_, n)| n).max()?;
    if total == 0 {
        return None;
    }
    let rank = (total as f64 * q).ceil() as u64;
    since.iter().find(|&&(_, n)| n >= rank).map(|&(le, _)| le * 1000.0)
}

/// The rollout tick histogram from the server's /metrics text.
fn tick_stats(metrics: &str) -> Option<TickStats> {
    let value =
        |name: &str| -> Option<f64> { metrics.lines().find(|l| l.starts_with(name))?.rsplit(' ').next()?.parse().ok() };
    let count = value("fleet_rollout_tick_duration_seconds_count")? as u64;
    let sum = value("fleet_rollout_tick_duration_seconds_sum")?;
    // The first bucket whose cumulative count reaches the total holds the slowest tick.
    let (max_bucket, _) =
        buckets(metrics, ("fleet_rollout_tick_duration_seconds", "")).into_iter().find(|&(_, n)| n >= count)?;
    Some(TickStats { count, mean_ms: sum / count.max(1) as f64 * 1000.0, max_bucket_ms: max_bucket * 1000.0 })
}

fn rollout_plan() -> Result<proto::rollout::RolloutPlan> {
    Ok(serde_json::from_value(serde_json::json!({
        "model": "tabular", "version": "2.0.0", "holdout": 0.05,
        "waves": [{"percent": 10.0}, {"percent": 50.0}, {"percent": 100.0}],
        "soak_secs": 10.0, "max_concurrent": 1000, "device_timeout_secs": 120.0,
        "gates": {"min_samples": 0}
    }))?)
}

pub async fn run(options: LoadOptions) -> Result<LoadReport> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    edge_agent::http::init_tls();
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let public = public_key_hex(&proto::keys::parse_secret_key(&secret)?.verifying_key());
    let server = start_server(&options, &public).await?;
    eprintln!(
        "fleet-server at {} (operator token {}), broker {}:{}",
        server.url, server.token, server.mqtt.0, server.mqtt.1
    );
    let operator = FleetClient::new(&server.url, &server.token);
    let trusted = proto::TrustedKeys::from_hex([public.as_str()])?;
    let mut layouts = Vec::new();
    for version in ["1.0.0", "2.0.0"] {
        let bundle = fixture_bundle(&secret, version, fleet_tests::MLP)?;
        let verified = read_archive(&bundle, &Limits::default())?.verify(&trusted)?;
        layouts.push((version.to_string(), verified.manifest.reference.layout.clone()));
        operator.publish(bundle).await?;
    }
    let mut tokens = Vec::with_capacity(options.agents);
    while tokens.len() < options.agents {
        let batch = (options.agents - tokens.len()).min(1000) as u32;
        tokens.extend(operator.tokens(batch).await?);
    }
    let ramp = Duration::from_secs_f64(options.agents as f64 / options.ramp_per_sec.max(1) as f64);
    let started = Instant::now();
    let steady_since = started + ramp;
    let shared = Arc::new(Shared {
        options: options.clone(),
        http: reqwest::Client::builder().pool_max_idle_per_host(256).build()?,
        server_url: server.url.clone(),
        mqtt: server.mqtt.clone(),
        stats: Arc::new(Stats::default()),
        fixtures: Arc::new(Fixtures::new(&layouts)),
        steady_since,
        stop_at: steady_since + options.steady,
    });
    let stats = shared.stats.clone();
    let pace = Duration::from_secs_f64(1.0 / options.ramp_per_sec.max(1) as f64);
    let launcher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut agents = tokio::task::JoinSet::new();
            let mut next = tokio::time::Instant::now();
            for (index, token) in tokens.into_iter().enumerate() {
                agents.spawn(run_agent(shared.clone(), index, token));
                next += pace;
                tokio::time::sleep_until(next).await;
            }
            while agents.join_next().await.is_some() {}
        })
    };

    let pid = server.child.id();
    let mut samples = Vec::new();
    let mut last = process_usage(pid).map(|(_, cpu)| (Instant::now(), cpu));
    let mut rollout_started = false;
    let mut checkins_before_steady = None;
    let mut checkins_at_rollout = None;
    let mut every = tokio::time::interval(Duration::from_secs(5));
    while Instant::now() < shared.stop_at {
        every.tick().await;
        if checkins_before_steady.is_none() && Instant::now() >= steady_since {
            checkins_before_steady = Some(buckets(&scrape_metrics(&server).await?, CHECKIN_SERIES));
        }
        if let (Some((rss, cpu)), Some((at, cpu_before))) = (process_usage(pid), last) {
            let sample = Sample {
                at_secs: started.elapsed().as_secs_f64(),
                rss_mib: rss,
                cpu_percent: (cpu - cpu_before) / at.elapsed().as_secs_f64() * 100.0,
                backlog: stats.published.load(Ordering::Relaxed).saturating_sub(stats.acked.load(Ordering::Relaxed)),
                connected: stats.connected.load(Ordering::Relaxed),
            };
            eprintln!(
                "t={:>5.0}s enrolled {:>6} connected {:>6} unacknowledged {:>6} server rss {:>6.0} MiB cpu {:>5.0}% errors {}",
                sample.at_secs,
                stats.enrolled.load(Ordering::Relaxed),
                sample.connected,
                sample.backlog,
                sample.rss_mib,
                sample.cpu_percent,
                stats.errors.load(Ordering::Relaxed)
            );
            samples.push(sample);
            last = Some((Instant::now(), cpu));
        }
        let rollout_due = options.rollout_after.is_some_and(|after| Instant::now() >= steady_since + after);
        if rollout_due && !rollout_started {
            rollout_started = true;
            checkins_at_rollout = Some(buckets(&scrape_metrics(&server).await?, CHECKIN_SERIES));
            let view = operator.start_rollout(&rollout_plan()?).await?;
            eprintln!("rollout {} started over {} eligible devices", view.rollout.id, view.summary.eligible);
        }
    }
    launcher.await?;
    let metrics = scrape_metrics(&server).await?;
    let checkins_at_end = buckets(&metrics, CHECKIN_SERIES);
    let between = |from: &[(f64, u64)], to: &[(f64, u64)]| {
        bucket_quantile_ms(from, to, 0.5).zip(bucket_quantile_ms(from, to, 0.99))
    };
    let steady = checkins_before_steady.unwrap_or_default();
    let server_checkin_ms = match &checkins_at_rollout {
        Some(at_rollout) => ServerCheckins {
            before_rollout: between(&steady, at_rollout),
            from_rollout_on: between(at_rollout, &checkins_at_end),
        },
        None => ServerCheckins { before_rollout: between(&steady, &checkins_at_end), from_rollout_on: None },
    };
    if stats.enrolled.load(Ordering::Relaxed) == 0 {
        bail!("no agent enrolled: {}", stats.last_error.lock().unwrap_or_else(|p| p.into_inner()));
    }
    let mut checkins: Vec<u32> = stats
        .checkins
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(at, _)| *at >= 0)
        .map(|(_, latency)| *latency)
        .collect();
    let last_error = stats.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut acks: Vec<u32> = stats.acks.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
    Ok(LoadReport {
        checkins: checkins.len(),
        checkin_p50_ms: quantile_ms(&mut checkins, 0.5),
        checkin_p99_ms: quantile_ms(&mut checkins, 0.99),
        checkin_max_ms: quantile_ms(&mut checkins, 1.0),
        ack_p50_ms: quantile_ms(&mut acks, 0.5),
        ack_p99_ms: quantile_ms(&mut acks, 0.99),
        reports_acked: stats.acked.load(Ordering::Relaxed),
        reports_published: stats.published.load(Ordering::Relaxed),
        reports_resent: stats.resent.load(Ordering::Relaxed),
        samples,
        tick: tick_stats(&metrics),
        server_checkin_ms,
        installs: stats.installs.load(Ordering::Relaxed),
        errors: stats.errors.load(Ordering::Relaxed),
        last_error,
        ramp_secs: ramp.as_secs_f64(),
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_histogram_is_read_from_the_metrics_text() {
        let text = "# TYPE fleet_rollout_tick_duration_seconds histogram\n\
            fleet_rollout_tick_duration_seconds_sum 0.5\n\
            fleet_rollout_tick_duration_seconds_count 10\n\
            fleet_rollout_tick_duration_seconds_bucket{le=\"0.001\"} 0\n\
            fleet_rollout_tick_duration_seconds_bucket{le=\"0.064\"} 9\n\
            fleet_rollout_tick_duration_seconds_bucket{le=\"0.128\"} 10\n\
            fleet_rollout_tick_duration_seconds_bucket{le=\"+Inf\"} 10\n";
        let t = tick_stats(text).unwrap();
        assert_eq!((t.count, t.mean_ms, t.max_bucket_ms), (10, 50.0, 128.0));
    }

    #[test]
    fn a_quantile_between_two_scrapes_is_the_bound_of_its_bucket() {
        let scrape = |counts: [u64; 4]| {
            format!(
                "fleet_api_request_duration_seconds_bucket{{method=\"POST\",route=\"/api/v1/devices/{{id}}/checkin\",status=\"200\",le=\"0.001\"}} {}\n\
                 fleet_api_request_duration_seconds_bucket{{method=\"POST\",route=\"/api/v1/devices/{{id}}/checkin\",status=\"200\",le=\"0.002\"}} {}\n\
                 fleet_api_request_duration_seconds_bucket{{method=\"POST\",route=\"/api/v1/devices/{{id}}/checkin\",status=\"200\",le=\"0.004\"}} {}\n\
                 fleet_api_request_duration_seconds_bucket{{method=\"POST\",route=\"/api/v1/devices/{{id}}/checkin\",status=\"200\",le=\"+Inf\"}} {}\n\
                 fleet_api_request_duration_seconds_bucket{{method=\"GET\",route=\"/api/v1/devices\",status=\"200\",le=\"+Inf\"}} 7\n",
                counts[0], counts[1], counts[2], counts[3]
            )
        };
        let before = buckets(&scrape([50, 50, 50, 50]), CHECKIN_SERIES);
        // Since then: 90 under 1 ms, 9 between 2 and 4 ms, 1 slower than 4 ms.
        let after = buckets(&scrape([140, 140, 149, 150]), CHECKIN_SERIES);
        assert_eq!(after.len(), 4, "only the check-in series");
        assert_eq!(bucket_quantile_ms(&before, &after, 0.5), Some(1.0));
        assert_eq!(bucket_quantile_ms(&before, &after, 0.99), Some(4.0));
        assert_eq!(bucket_quantile_ms(&before, &after, 1.0), Some(f64::INFINITY));
        assert_eq!(bucket_quantile_ms(&after, &after, 0.5), None, "nothing observed between");
    }

    #[test]
    fn quantiles_are_read_from_sorted_latencies() {
        let mut v: Vec<u32> = (1..=100).rev().map(|ms| ms * 1000).collect();
        assert_eq!(
            (quantile_ms(&mut v, 0.5), quantile_ms(&mut v, 0.99), quantile_ms(&mut v, 1.0)),
            (51.0, 99.0, 100.0)
        );
        assert!(quantile_ms(&mut [], 0.5).is_nan());
    }
}
