//! edge-agent binary: reads the config and runs until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Edge agent: pulls signed model bundles, serves local inference, reports drift and health.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path to the TOML config (see agent/edge-agent.example.toml).
    #[arg(long, short, env = "EDGE_AGENT_CONFIG", default_value = "/etc/edge-agent/config.toml")]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    // Read before the runtime exists: no file I/O on its threads.
    let config = edge_agent::AgentConfig::load(&args.config)?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(config))
}

async fn run(config: edge_agent::AgentConfig) -> anyhow::Result<()> {
    let agent = edge_agent::start(config).await.context("edge-agent failed to start")?;
    tracing::info!(api = %agent.api_addr, "edge-agent running");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // SIGTERM (systemd's stop) ends the agent exactly as Ctrl-C does.
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    agent.shutdown().await;
    Ok(())
}
