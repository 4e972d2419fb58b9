//! fleet-server: the registry, bundle store and MQTT ingest. `fleet-server --help` for options.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use fleet_server::server::{start, Mqtt, ServerConfig};

#[derive(Parser)]
#[command(version, about = "Fleet server: device registry, signed bundle store, desired state, MQTT ingest.")]
struct Args {
    /// HTTP API address.
    #[arg(long, env = "FLEET_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Data directory (SQLite store, bundles, operator token).
    #[arg(long, env = "FLEET_DATA_DIR", default_value = "/var/lib/fleet-server")]
    data_dir: PathBuf,
    /// Address of the embedded MQTT broker (not 1883, so it never clashes with a system broker).
    #[arg(long, env = "FLEET_MQTT_LISTEN", default_value = "0.0.0.0:1884")]
    mqtt_listen: SocketAddr,
    /// Use an external broker (e.g. Mosquitto) at mqtt://host:port instead of the embedded one.
    #[arg(long, env = "FLEET_MQTT_URL")]
    mqtt_url: Option<String>,
    /// Public key (hex or a .pub file) accepted on published bundles; repeatable.
    #[arg(long = "trusted-key", env = "FLEET_TRUSTED_KEYS", value_delimiter = ',', required = true)]
    trusted_keys: Vec<String>,
    /// Operator token; generated into <data-dir>/operator.token when omitted.
    #[arg(long, env = "FLEET_OPERATOR_TOKEN")]
    operator_token: Option<String>,
    /// Largest bundle accepted, in bytes.
    #[arg(long, default_value_t = 512 << 20)]
    max_bundle_bytes: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let trusted_keys = args
        .trusted_keys
        .iter()
        .map(|k| match std::fs::read_to_string(k) {
            Ok(text) => text.trim().to_string(),
            Err(_) => k.clone(),
        })
        .collect();
    let mqtt = match args.mqtt_url {
        Some(url) => Mqtt::External { url },
        None => Mqtt::Embedded { listen: args.mqtt_listen },
    };
    let config = ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        mqtt,
        operator_token: args.operator_token,
        trusted_keys,
        max_bundle_bytes: args.max_bundle_bytes,
        rollout_tick: std::time::Duration::from_secs(2),
    };
    let server = start(config).await.context("fleet-server failed to start")?;
    if std::env::var("FLEET_OPERATOR_TOKEN").is_err() {
        eprintln!("operator token in {}", args.data_dir.join("operator.token").display());
    }
    // SIGTERM (systemd's stop, docker stop) ends the server exactly as Ctrl-C does.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        signal = tokio::signal::ctrl_c() => signal?,
        _ = term.recv() => {}
    }
    server.shutdown().await;
    Ok(())
}
