//! fleet-server: the registry, bundle store and MQTT ingest. `fleet-server --help` for options.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use fleet_server::ingest::MqttLogin;
use fleet_server::retention::RetentionConfig;
use fleet_server::retrain::RetrainConfig;
use fleet_server::server::{start, MosquittoFiles, Mqtt, ServerConfig, TlsFiles};

#[derive(Parser)]
#[command(version, about = "Fleet server: device registry, signed bundle store, desired state, MQTT ingest.")]
struct Args {
    /// Log lines as text or one JSON object per line (for a log shipper).
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// POST a JSON retraining event here when a model's drift persists in a cohort for the
    /// model's `persist_windows` windows (the event also goes to MQTT fleet/v1/events/retrain).
    #[arg(long, env = "FLEET_RETRAIN_WEBHOOK")]
    retrain_webhook: Option<String>,
    /// Drift is watched for the whole fleet and per value of this device label.
    #[arg(long, env = "FLEET_DRIFT_COHORT_LABEL", default_value = "site")]
    drift_cohort_label: String,
    /// The window (seconds) in which persistent drift is counted.
    #[arg(long, env = "FLEET_DRIFT_WINDOW_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(60..=604_800))]
    drift_window_secs: u64,
    /// HTTP API address [default: 0.0.0.0:8080 with TLS, 127.0.0.1:8080 without].
    #[arg(long, env = "FLEET_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (SQLite store, bundles, operator token).
    #[arg(long, env = "FLEET_DATA_DIR", default_value = "/var/lib/fleet-server")]
    data_dir: PathBuf,
    /// Store in this PostgreSQL database (postgres://user[:password]@host[:port]/database) instead
    /// of SQLite in the data directory; migrations are applied at start. Bundles stay in the data
    /// directory.
    #[arg(long, env = "FLEET_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The schema of --database-url that holds the tables (created if missing) [default: the
    /// connection's search_path, normally public].
    #[arg(long, env = "FLEET_DATABASE_SCHEMA", requires = "database_url")]
    database_schema: Option<String>,
    /// Address of the embedded MQTT broker (not 1883, so it never clashes with a system broker)
    /// [default: 0.0.0.0:1884 with TLS, 127.0.0.1:1884 without].
    #[arg(long, env = "FLEET_MQTT_LISTEN")]
    mqtt_listen: Option<SocketAddr>,
    /// Use an external broker (e.g. Mosquitto set up by `fleetctl broker config`) at
    /// mqtt://host:port instead of the embedded one.
    #[arg(long, env = "FLEET_MQTT_URL")]
    mqtt_url: Option<String>,
    /// Username of this server's session on the external broker.
    #[arg(long, env = "FLEET_MQTT_USERNAME", default_value = "fleet-server", requires = "mqtt_password_file")]
    mqtt_username: String,
    /// File holding the password of this server's session on the external broker.
    #[arg(long, env = "FLEET_MQTT_PASSWORD_FILE")]
    mqtt_password_file: Option<PathBuf>,
    /// With Mosquitto: its password file, which this server keeps in step with enrollments and
    /// revocations (`fleetctl broker config` writes the rest).
    #[arg(long, env = "FLEET_MOSQUITTO_PASSWORD_FILE", requires = "mqtt_url")]
    mosquitto_password_file: Option<PathBuf>,
    /// File holding a secret that turns on POST /api/v1/broker/authenticate, the HTTP
    /// authenticator for a broker such as EMQX (it sends the secret as its bearer token; see
    /// docs/SCALING.md, "EMQX instead of Mosquitto").
    #[arg(long, env = "FLEET_BROKER_AUTH_SECRET_FILE")]
    broker_auth_secret_file: Option<PathBuf>,
    /// EMQX's REST API (e.g. http://emqx:18083): a device revoked while connected is
    /// disconnected there at once. Needs --emqx-api-key-file.
    #[arg(long, env = "FLEET_EMQX_API_URL", requires = "emqx_api_key_file")]
    emqx_api_url: Option<String>,
    /// File holding `key:secret` of an EMQX API key (made in EMQX's dashboard).
    #[arg(long, env = "FLEET_EMQX_API_KEY_FILE", requires = "emqx_api_url")]
    emqx_api_key_file: Option<PathBuf>,
    /// Mosquitto's pid file: it gets a SIGHUP to reload the password file after each change.
    #[arg(long, env = "FLEET_MOSQUITTO_PID_FILE", requires = "mosquitto_password_file")]
    mosquitto_pid_file: Option<PathBuf>,
    /// Public key (hex or a .pub file) accepted on published bundles; repeatable. Or use --root.
    #[arg(long = "trusted-key", env = "FLEET_TRUSTED_KEYS", value_delimiter = ',')]
    trusted_keys: Vec<String>,
    /// Signed root of trust (`fleetctl root init`), published at start when the server holds none.
    #[arg(long, env = "FLEET_ROOT")]
    root: Option<PathBuf>,
    /// Secret key file of the root's timestamp role: signs every check-in reply (needed by
    /// devices that start from a root).
    #[arg(long, env = "FLEET_TIMESTAMP_KEY")]
    timestamp_key: Option<PathBuf>,
    /// Hours a signed check-in reply stays fresh.
    #[arg(long, default_value_t = 24)]
    freshness_hours: u64,
    /// Bootstrap admin token; generated into <data-dir>/operator.token (0600) when omitted.
    #[arg(long, env = "FLEET_OPERATOR_TOKEN")]
    operator_token: Option<String>,
    /// Largest bundle accepted, in bytes.
    #[arg(long, default_value_t = 512 << 20)]
    max_bundle_bytes: usize,
    /// PEM certificate chain for HTTPS and MQTT over TLS (`fleetctl pki issue` makes one).
    #[arg(long, env = "FLEET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FLEET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP / MQTT on addresses that are not loopback (credentials travel in clear).
    #[arg(long, env = "FLEET_ALLOW_INSECURE")]
    allow_insecure: bool,
    /// Where published bundles are kept [default: <data-dir>/bundles]. Several servers on one
    /// --database-url share one directory (NFS or another shared file system).
    #[arg(long, env = "FLEET_BUNDLE_DIR")]
    bundle_dir: Option<PathBuf>,
    /// Seconds of the lease under which one of several servers on one database drives the
    /// rollouts; a stopped server is replaced within it. Servers' clocks must agree to well
    /// within it.
    #[arg(long, env = "FLEET_LEASE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(3..=3600))]
    lease_secs: u64,
    /// Most desired-state notifications sent per second. A rollout wave's devices are told at
    /// this pace rather than all at once, so their check-ins and downloads do not arrive as one
    /// burst; a device not yet told learns its new version at its next check-in anyway.
    #[arg(long, env = "FLEET_NOTIFY_PER_SECOND", default_value_t = fleet_server::notify::DEFAULT_PER_SECOND,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    notify_per_second: u32,
    /// With --mqtt-url and several servers: the shared-subscription group they form, so that each
    /// report reaches one of them.
    #[arg(long, env = "FLEET_MQTT_SHARE_GROUP", requires = "mqtt_url")]
    mqtt_share_group: Option<String>,
    /// Days drift windows and uploaded telemetry rows are kept after they arrive; older ones are
    /// deleted every hour (not while a rollout that may read them runs). 0 keeps everything.
    /// Audit, lineage and statuses are always kept.
    #[arg(long, env = "FLEET_RETENTION_DAYS", default_value_t = 31, value_parser = clap::value_parser!(u32).range(0..=36_500))]
    retention_days: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Plain text only on loopback, unless the operator says otherwise.
fn check_plain(what: &str, addr: SocketAddr, tls: bool, allow_insecure: bool) -> Result<()> {
    if !tls && !allow_insecure && !addr.ip().is_loopback() {
        anyhow::bail!(
            "{what} on {addr} would be plain text beyond this machine; pass --tls-cert and --tls-key (see `fleetctl pki`) or --allow-insecure"
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour codes only for a person at a terminal, never in files or the journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    match args.log_format {
        LogFormat::Json => logs.json().with_ansi(false).init(),
        LogFormat::Text => logs.init(),
    }
    let trusted_keys = args
        .trusted_keys
        .iter()
        .map(|k| match std::fs::read_to_string(k) {
            Ok(text) => text.trim().to_string(),
            Err(_) => k.clone(),
        })
        .collect();
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };
    let any = if tls.is_some() { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
    let listen = args.listen.unwrap_or((any, 8080).into());
    check_plain("the HTTP API", listen, tls.is_some(), args.allow_insecure)?;
    let mqtt = match args.mqtt_url {
        Some(url) => Mqtt::External { url },
        None => {
            let listen = args.mqtt_listen.unwrap_or((any, 1884).into());
            check_plain("the embedded MQTT broker", listen, tls.is_some(), args.allow_insecure)?;
            Mqtt::Embedded { listen }
        }
    };
    let mqtt_login = match &args.mqtt_password_file {
        Some(path) => {
            Some(MqttLogin { username: args.mqtt_username.clone(), password: read_secret(path, "MQTT password file")? })
        }
        None => None,
    };
    let broker_auth_secret = match &args.broker_auth_secret_file {
        Some(path) => {
            let secret = read_secret(path, "broker secret file")?;
            anyhow::ensure!(
                secret.len() >= 16,
                "the broker secret in {} is {} characters; use at least 16 (e.g. `openssl rand -hex 32`)",
                path.display(),
                secret.len()
            );
            Some(secret)
        }
        None => None,
    };
    let emqx_api = match (&args.emqx_api_url, &args.emqx_api_key_file) {
        (Some(url), Some(path)) => Some((url.clone(), read_secret(path, "EMQX API key file")?)),
        _ => None,
    };
    let config = ServerConfig {
        listen,
        data_dir: args.data_dir.clone(),
        database_url: args.database_url,
        database_schema: args.database_schema,
        mqtt,
        operator_token: args.operator_token,
        trusted_keys,
        root_file: args.root,
        timestamp_key: match &args.timestamp_key {
            Some(path) => Some(read_secret(path, "timestamp key")?),
            None => None,
        },
        freshness_lifetime: std::time::Duration::from_secs(args.freshness_hours.max(1) * 3600),
        max_bundle_bytes: args.max_bundle_bytes,
        rollout_tick: std::time::Duration::from_secs(2),
        notify_per_second: args.notify_per_second,
        lease: std::time::Duration::from_secs(args.lease_secs),
        bundle_dir: args.bundle_dir,
        mqtt_share_group: args.mqtt_share_group,
        mqtt_login,
        broker_auth_secret,
        emqx_api,
        tls,
        mosquitto: args
            .mosquitto_password_file
            .map(|password_file| MosquittoFiles { password_file, pid_file: args.mosquitto_pid_file }),
        retrain: RetrainConfig {
            webhook: args.retrain_webhook,
            cohort_label: Some(args.drift_cohort_label).filter(|l| !l.is_empty()),
            bucket_secs: args.drift_window_secs,
            // A bucket is judged once it is complete; checking four times a bucket is soon enough.
            check_every: std::time::Duration::from_secs((args.drift_window_secs / 4).max(15)),
        },
        retention: RetentionConfig {
            keep: (args.retention_days > 0)
                .then(|| std::time::Duration::from_secs(u64::from(args.retention_days) * 86_400)),
            ..RetentionConfig::default()
        },
    };
    let server = start(config).await.context("fleet-server failed to start")?;
    if std::env::var("FLEET_OPERATOR_TOKEN").is_err() {
        eprintln!("admin operator token in {}", args.data_dir.join("operator.token").display());
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

/// A secret kept in a file (a password, a key): its text without surrounding whitespace.
fn read_secret(path: &std::path::Path, what: &str) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the {what} {}", path.display()))?;
    Ok(text.trim().to_string())
}
