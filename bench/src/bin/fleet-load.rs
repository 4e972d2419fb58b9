//! fleet-load: how many agents one fleet-server holds. Starts the fleet-server binary on loopback
//! (its embedded broker, SQLite unless `--server-arg` says otherwise), then N simulated agents
//! speaking the real protocol (bench/src/load.rs), and reports check-in latency, how fast reports
//! are stored and acknowledged, the server's RSS and CPU, and the rollout driver's tick time.
//!
//! ```text
//! cargo build --release --locked -p fleet-server -p fleet-bench
//! target/release/fleet-load --agents 10000 --steady-secs 300 --rollout-after-secs 120 --write docs/BENCHMARKS.md
//! ```
//!
//! Bounded: at most 10,000 agents (file descriptors and loopback ports here), loopback only,
//! and it stops after the ramp plus `--steady-secs`.

#[path = "../load.rs"]
mod load;
#[path = "../report.rs"]
mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;

/// Where the load section of docs/BENCHMARKS.md starts.
const LOAD_MARKER: &str = "## Load";

#[derive(Parser)]
#[command(about = "N simulated agents against one fleet-server on loopback.")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Seconds every agent runs once all are started.
    #[arg(long, default_value_t = 120)]
    steady_secs: u64,
    #[arg(long, default_value_t = 10)]
    checkin_secs: u64,
    #[arg(long, default_value_t = 30)]
    heartbeat_secs: u64,
    #[arg(long, default_value_t = 60)]
    drift_secs: u64,
    /// Agents started (enrolled and connected) per second.
    #[arg(long, default_value_t = 200)]
    ramp_per_sec: usize,
    /// Start a rollout over every agent this many seconds into the steady phase.
    #[arg(long)]
    rollout_after_secs: Option<u64>,
    /// The fleet-server binary.
    #[arg(long, default_value = "target/release/fleet-server")]
    server_bin: PathBuf,
    /// Use this broker (`host:port`, e.g. 127.0.0.1:1883 for the machine's Mosquitto) instead of
    /// the server's embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// Extra arguments for fleet-server, e.g. `--server-arg=--database-url=postgres://…`.
    #[arg(long = "server-arg")]
    server_args: Vec<String>,
    /// Replace the load section of this Markdown file (docs/BENCHMARKS.md).
    #[arg(long)]
    write: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.agents == 0 || args.agents > 10_000 {
        bail!("--agents {} must be between 1 and 10000 (open files and loopback ports bound one process)", args.agents);
    }
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let run = load::run(load::LoadOptions {
        agents: args.agents,
        steady: Duration::from_secs(args.steady_secs),
        checkin: Duration::from_secs(args.checkin_secs),
        heartbeat: Duration::from_secs(args.heartbeat_secs),
        drift: Duration::from_secs(args.drift_secs),
        ramp_per_sec: args.ramp_per_sec,
        server_bin: args.server_bin,
        server_args: args.server_args,
        rollout_after: args.rollout_after_secs.map(Duration::from_secs),
        broker: args.broker,
    });
    // Stopped by a signal, the run is dropped, and with it the fleet-server it started: left
    // running, a stopped run's server kept its broker session and skewed the next run.
    let report = tokio::select! {
        report = run => report?,
        signal = stop_signal() => bail!("stopped by {signal}; the fleet-server it started is stopped too"),
    };
    let section = markdown(&report, &command);
    println!("{section}");
    if let Some(path) = &args.write {
        report::write_section(path, LOAD_MARKER, &section)?;
    }
    Ok(())
}

/// The first of SIGINT and SIGTERM, by name.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

fn markdown(r: &load::LoadReport, command: &str) -> String {
    let o = &r.options;
    let steady: Vec<&load::Sample> = r.samples.iter().filter(|s| s.at_secs >= r.ramp_secs).collect();
    let peak_rss = r.samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max);
    let mean_cpu = steady.iter().map(|s| s.cpu_percent).sum::<f64>() / steady.len().max(1) as f64;
    let backlog: Vec<String> = steady.iter().map(|s| s.backlog.to_string()).collect();
    let tick = r.tick.as_ref().map_or("no rollout ticked".to_string(), |t| {
        format!("{} ticks, mean {:.1} ms, slowest in the bucket up to {:.0} ms", t.count, t.mean_ms, t.max_bucket_ms)
    });
    let bounds = |q: Option<(f64, f64)>| {
        q.map_or("not measured".to_string(), |(p50, p99)| format!("<= {p50:.1} / <= {p99:.1} ms"))
    };
    let server_before = bounds(r.server_checkin_ms.before_rollout);
    let server_during = bounds(r.server_checkin_ms.from_rollout_on);
    format!(
        "{LOAD_MARKER}\n\n\
         `fleet-load {command}` (one fleet-server process and {broker}, on this 2-core machine; the \
         load generator shares the cores). {agents} agents, check-in every {c} s, heartbeat every {h} s, \
         drift window every {d} s; ramp {ramp:.0} s, then {steady} s steady.\n\n\
         | measure | value |\n| --- | --- |\n\
         | check-in latency p50 / p99 / max (steady, client side) | {p50:.1} / {p99:.1} / {max:.1} ms over {n} check-ins |\n\
         | check-in latency p50 / p99 (server side: its histogram's bucket bounds), steady before the rollout; from the rollout on | {server_before}; {server_during} |\n\
         | report stored-and-acknowledged p50 / p99 | {a50:.1} / {a99:.1} ms |\n\
         | reports acknowledged / published (sent again, overdue by the agent's timer: at least 30 s) | {acked} / {published} ({resent}) |\n\
         | unacknowledged reports, every 5 s in the steady phase | {backlog} |\n\
         | server RSS, peak | {rss:.0} MiB |\n\
         | server CPU, steady mean (200% = both cores) | {cpu:.0}% |\n\
         | rollout driver tick | {tick} |\n\
         | installs done (rollout) | {installs} |\n\
         | errors | {errors}{last} |\n",
        agents = o.agents,
        broker = o.broker.as_ref().map_or("its embedded broker".to_string(), |b| format!("the broker at {b}")),
        c = o.checkin.as_secs(),
        h = o.heartbeat.as_secs(),
        d = o.drift.as_secs(),
        ramp = r.ramp_secs,
        steady = o.steady.as_secs(),
        p50 = r.checkin_p50_ms,
        p99 = r.checkin_p99_ms,
        max = r.checkin_max_ms,
        n = r.checkins,
        a50 = r.ack_p50_ms,
        a99 = r.ack_p99_ms,
        acked = r.reports_acked,
        published = r.reports_published,
        resent = r.reports_resent,
        backlog = backlog.join(", "),
        rss = peak_rss,
        cpu = mean_cpu,
        installs = r.installs,
        errors = r.errors,
        last = if r.errors > 0 { format!(" (last: {})", r.last_error) } else { String::new() },
    )
}
