//! fleetctl: the operator CLI. `fleetctl --help` lists the commands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fleet_server::rollout::create::OperatorAction;
use fleetctl::client::FleetClient;
use fleetctl::demo::{self, DemoOptions};
use fleetctl::packaging;
use fleetctl::scenario::Scenario;
use proto::bundle::{read_archive, write_archive, Limits};
use proto::keys::{parse_public_key, parse_secret_key, public_key_hex, secret_key_hex};
use proto::wire::DeployRequest;
use proto::{KeyId, TrustedKeys};

mod drift_cli;
mod image;
mod lineage_cli;
mod root_cli;

#[derive(Parser)]
#[command(
    version,
    about = "Operate a fleet of edge ML devices: keys, bundles, devices, deployments, and a local demo."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Fleet server base URL.
    #[arg(long, env = "FLEET_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Operator token (the server writes the bootstrap admin's to <data-dir>/operator.token;
    /// `fleetctl operators add` makes named ones).
    #[arg(long, env = "FLEET_TOKEN")]
    token: String,
    /// PEM of the fleet's CA (`fleetctl pki init`) to trust for an https:// server; pinned.
    #[arg(long, env = "FLEET_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl ServerArgs {
    fn client(&self) -> Result<FleetClient> {
        let ca = self.ca_file.as_deref().map(read).transpose()?;
        FleetClient::trusting(&self.server, &self.token, ca.as_deref()).map_err(anyhow::Error::msg)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate an ed25519 signing key pair: <out>/<name>.key (secret) and <out>/<name>.pub.
    Keygen {
        #[arg(long, default_value = ".")]
        out: PathBuf,
        #[arg(long, default_value = "fleet-signing")]
        name: String,
    },
    /// Build, sign and verify model bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Upload a signed bundle to the server.
    Publish {
        bundle: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List devices with their models, status and last health (`devices show ID` shows one with
    /// lineage and history, `devices revoke ID` revokes one).
    #[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true, visible_alias = "device")]
    Devices {
        #[command(subcommand)]
        action: Option<DevicesCommand>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Named operator tokens with a role: viewer, operator or admin (admin only).
    #[command(subcommand)]
    Operators(OperatorsCommand),
    /// The root of trust: which keys sign bundles and roots, how many must sign, and rotation.
    #[command(subcommand)]
    Root(root_cli::RootCommand),
    /// A private CA and server certificates for TLS on HTTP and MQTT.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Set up Mosquitto as the fleet's broker.
    #[command(subcommand)]
    Broker(BrokerCommand),
    /// Every published model version with its digest, signer, creation time and lineage.
    Models {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Drift: compare two data sets as the fleet would, or show the fleet's verdicts.
    #[command(subcommand)]
    Drift(drift_cli::DriftCommand),
    /// Flashable disk images: write a device's config into one (`image configure`).
    #[command(subcommand)]
    Image(image::ImageCommand),

    /// Replace a device's labels (they select cohorts for rollouts): `fleetctl label dev-1 site=a region=eu`.
    Label {
        device: String,
        /// key=value pairs; none clears the labels.
        labels: Vec<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Make a published version the desired one on all (or the listed) devices.
    Deploy {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: String,
        /// Comma-separated device ids: exactly these, now. Without it the deployment targets a
        /// selector: every matching device now, and devices that match later (newly enrolled).
        #[arg(long, value_delimiter = ',', conflicts_with = "selector")]
        devices: Option<Vec<String>>,
        /// key=value labels a device must have (repeatable); every device when omitted.
        #[arg(long = "selector", value_name = "KEY=VALUE")]
        selector: Vec<String>,
        /// Follow the deployment until every targeted device is active, failed or timed out;
        /// exits non-zero unless all are active.
        #[arg(long)]
        wait: bool,
        /// With --wait: seconds before devices still in progress count as timed out.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Buffered inference records uploaded by devices.
    #[command(subcommand)]
    Telemetry(TelemetryCommand),
    /// Per device: reports stored, redeliveries dropped, telemetry stored, evictions reported.
    Delivery {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Enrollment tokens for new devices.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Run a real fleet on this machine: server, embedded broker, N agents, a deployment, drift.
    Demo {
        #[arg(long, default_value_t = 5)]
        agents: usize,
        /// Rows of traffic per agent (the second half is shifted).
        #[arg(long, default_value_t = 400)]
        rows: usize,
        /// Use this MQTT broker (mqtt://host:port) instead of the embedded one.
        #[arg(long)]
        mqtt_url: Option<String>,
        /// Store in this PostgreSQL database (postgres://user@host:port/database), in a fresh
        /// schema fleet_demo_<random> that is left for inspection, instead of SQLite.
        #[arg(long)]
        database_url: Option<String>,
        /// Print the final result as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Run a staged rollout of a candidate instead of a plain deployment (default 30 agents).
        #[arg(long, value_enum)]
        scenario: Option<Scenario>,
    },
    /// Staged rollouts by cohort.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// The audit log: who did what, when and why.
    Audit {
        /// Only this rollout's entries.
        #[arg(long)]
        rollout: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
enum TelemetryCommand {
    /// Write stored telemetry rows as CSV (for labelling and retraining).
    Export {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: Option<String>,
        /// Only rows recorded at or after this Unix time in milliseconds.
        #[arg(long)]
        since: Option<u64>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Start a rollout from a plan file (TOML or JSON; see tests/fixtures/rollouts/).
    Start {
        #[arg(long)]
        plan: PathBuf,
        /// Follow progress until the rollout ends.
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show one rollout (or list all without an id).
    Status {
        id: Option<String>,
        #[arg(long)]
        watch: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Stop assigning devices; devices keep what they run.
    Pause(ActionArgs),
    /// Continue a paused rollout.
    Resume(ActionArgs),
    /// Stop and put every device this rollout touched back on its previous version.
    Abort(ActionArgs),
    /// End the current wave's soak early.
    Promote(ActionArgs),
    /// Give failed and timed-out devices another attempt (resumes a halted rollout).
    Retry(ActionArgs),
}

#[derive(clap::Args)]
struct ActionArgs {
    id: String,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Create one-time enrollment tokens, one per line.
    Create {
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Hours until the tokens expire [server default: 168, one week].
        #[arg(long)]
        valid_hours: Option<u32>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Revoke an enrollment token that has not enrolled a device yet.
    Revoke {
        token: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// One device: per model the active and previous version, bundle digest, lineage, what
    /// installed it and when, and recent update steps; then its audit lines.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Revoke a device (admin): its credential and key stop working and its MQTT session closes.
    Revoke {
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
enum OperatorsCommand {
    /// Create a named operator; prints its token once.
    Add {
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Revoke an operator's token.
    Revoke {
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand)]
enum BrokerCommand {
    /// Write <out>/mosquitto.conf (no anonymous clients), <out>/acl (each device on
    /// fleet/v1/devices/<its id>/… only, via `pattern … %u`), <out>/passwords (the server's
    /// login; fleet-server adds each device as it enrolls) and <out>/server.password (0600).
    Config {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// Listener address [default: 0.0.0.0 with TLS, 127.0.0.1 without].
        #[arg(long)]
        bind: Option<String>,
        /// PEM certificate chain for TLS (`fleetctl pki issue`).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Make a private CA: <out>/ca.pem (give it to agents as ca_file) and <out>/ca.key (0600).
    Init {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "fleet CA")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        valid_days: u32,
    },
    /// Issue a server certificate signed by the CA: <out>/<name>.pem (chain) and <out>/<name>.key.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Host names and IP addresses the server is reached by; repeatable.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value = "server")]
        name: String,
        #[arg(long, default_value_t = 825)]
        valid_days: u32,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Package an .onnx model and its metadata TOML into an unsigned bundle.
    Build {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        metadata: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Add a signature over the bundle's manifest (in place unless --out is given).
    Sign {
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify signature, digests, contract and golden inputs, as a device would.
    Verify {
        bundle: PathBuf,
        /// Public key files (or hex) to trust; repeatable.
        #[arg(long = "trusted-key", required_unless_present = "root", conflicts_with = "root")]
        trusted_keys: Vec<String>,
        /// A root of trust: the bundle needs its targets keys, as many as its threshold.
        #[arg(long)]
        root: Option<PathBuf>,
    },
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn key_text(arg: &str) -> Result<String> {
    if Path::new(arg).exists() {
        Ok(String::from_utf8_lossy(&read(Path::new(arg))?).trim().to_string())
    } else {
        Ok(arg.to_string())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // The demo's agents losing their link on purpose is not worth a warning.
            "warn,rumqttd=off,edge_agent::uplink=error,edge_agent::telemetry=error".into()
        }))
        .init();
    match Cli::parse().command {
        Command::Keygen { out, name } => keygen(&out, &name),
        Command::Bundle(command) => bundle(command),
        Command::Publish { bundle, server } => {
            let info = server.client()?.publish(read(&bundle)?).await?;
            println!(
                "published {} {} ({} bytes, sha256 {}, signed by {})",
                info.name, info.version, info.size, info.sha256, info.signed_by
            );
            Ok(())
        }
        Command::Devices { action: Some(DevicesCommand::Revoke { id, server }), .. } => {
            server.client()?.revoke_device(&id).await?;
            println!("{id} revoked: its credential is refused and its MQTT session closed");
            Ok(())
        }
        Command::Devices { action: Some(DevicesCommand::Show { id, json, server }), .. } => {
            lineage_cli::device(&id, json, &server).await
        }
        Command::Devices { action: None, json, server } => devices(json, &server).await,
        Command::Models { json, server } => lineage_cli::models(json, &server).await,
        Command::Operators(command) => operators(command).await,
        Command::Pki(command) => pki(command),
        Command::Root(command) => root_cli::run(command).await,
        Command::Drift(command) => drift_cli::run(command).await,
        Command::Image(command) => image::run(command),
        Command::Broker(BrokerCommand::Config { out, port, bind, tls_cert, tls_key }) => {
            let tls = tls_cert.zip(tls_key);
            let bind = bind.unwrap_or_else(|| if tls.is_some() { "0.0.0.0" } else { "127.0.0.1" }.into());
            let tls = tls.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path()));
            println!("{}", fleetctl::broker_setup::write(&out, &bind, port, tls)?);
            Ok(())
        }
        Command::Deploy { model, version, devices, selector, wait, timeout_secs, server } => {
            let client = server.client()?;
            let selector = if devices.is_some() { None } else { Some(image::parse_labels(&selector)?) };
            let request = DeployRequest { model: model.clone(), version: version.clone(), devices, selector };
            let response = client.deploy(&request).await?;
            println!("desired on {} device(s): {}", response.devices.len(), response.devices.join(", "));
            if wait {
                follow(&client, &response.devices, &model, &version, timeout_secs).await?;
            }
            Ok(())
        }
        Command::Telemetry(TelemetryCommand::Export { model, version, since, out, server }) => {
            let client = server.client()?;
            let rows = fleetctl::ops::export_telemetry(&client, &model, version.as_deref(), since, &out).await?;
            println!("{rows} telemetry row(s) of {model} written to {}", out.display());
            Ok(())
        }
        Command::Delivery { json, server } => {
            let views = server.client()?.delivery().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                println!(
                    "{:<18} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                    "DEVICE", "REPORTS", "REDELIV.", "TELEMETRY", "REDELIV.", "EVICTED", "REJECTED"
                );
                for v in views {
                    println!(
                        "{:<18} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                        v.device,
                        v.reports_stored,
                        v.reports_duplicates,
                        v.telemetry_stored,
                        v.telemetry_duplicates,
                        v.evicted.total(),
                        v.rejected
                    );
                }
            }
            Ok(())
        }
        Command::Tokens(TokensCommand::Create { count, valid_hours, server }) => {
            for token in server.client()?.tokens_valid_for(count, valid_hours).await? {
                println!("{token}");
            }
            Ok(())
        }
        Command::Tokens(TokensCommand::Revoke { token, server }) => {
            server.client()?.revoke_token(&token).await?;
            println!("token revoked");
            Ok(())
        }
        Command::Demo { agents, rows, mqtt_url, database_url, json, scenario } => {
            run_demo(agents, rows, Backends { mqtt_url, database_url }, json, scenario).await
        }
        Command::Rollout(command) => rollout(command).await,
        Command::Label { device, labels, server } => {
            let map = image::parse_labels(&labels)?;
            server.client()?.set_labels(&device, &map).await?;
            println!("{device}: {} label(s) set", map.len());
            Ok(())
        }
        Command::Audit { rollout, json, server } => {
            let entries = server.client()?.audit(rollout.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in entries {
                    println!(
                        "{} {:<10} {:<12} {:<16} {}",
                        e.at_ms,
                        e.actor,
                        e.rollout.unwrap_or_default(),
                        e.action,
                        e.detail
                    );
                }
            }
            Ok(())
        }
    }
}

/// `deploy --wait`: a progress line per change, then one line per device that did not end active.
async fn follow(client: &FleetClient, targets: &[String], model: &str, version: &str, timeout_secs: u64) -> Result<()> {
    use fleetctl::ops::{follow_deployment, tally, DeviceOutcome};
    let timeout = std::time::Duration::from_secs(timeout_secs);
    let outcomes = follow_deployment(client, targets, model, version, timeout, |current| {
        let (active, failed, pending) = tally(current);
        eprintln!("{model} {version}: {active} active, {failed} failed, {pending} in progress");
    })
    .await?;
    let mut bad = 0;
    for (device, outcome) in &outcomes {
        match outcome {
            DeviceOutcome::Active => {}
            DeviceOutcome::Failed(reason) => {
                bad += 1;
                println!("{device}: failed: {reason}");
            }
            DeviceOutcome::TimedOut(step) | DeviceOutcome::Pending(step) => {
                bad += 1;
                let step = step.map_or("no report yet", |s| s.as_str());
                println!("{device}: timed out after {timeout_secs} s (last step: {step})");
            }
        }
    }
    if bad > 0 {
        bail!("{bad} of {} device(s) did not activate {model} {version}", outcomes.len());
    }
    println!("{model} {version} active on all {} device(s)", outcomes.len());
    Ok(())
}

async fn operators(command: OperatorsCommand) -> Result<()> {
    match command {
        OperatorsCommand::Add { name, role, server } => {
            let role: proto::wire::Role = role.parse().map_err(anyhow::Error::msg)?;
            let created = server.client()?.add_operator(&name, role).await?;
            eprintln!("operator {} ({}) created; its token, shown once:", created.name, created.role.as_str());
            println!("{}", created.token);
        }
        OperatorsCommand::List { json, server } => {
            let operators = server.client()?.operators().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&operators)?);
            } else {
                println!("{:<24} {:<9} {:>15} {:>15}", "NAME", "ROLE", "CREATED_MS", "REVOKED_MS");
                for o in operators {
                    let revoked = o.revoked_ms.map_or("-".to_string(), |ms| ms.to_string());
                    println!("{:<24} {:<9} {:>15} {:>15}", o.name, o.role.as_str(), o.created_ms, revoked);
                }
            }
        }
        OperatorsCommand::Revoke { name, server } => {
            server.client()?.revoke_operator(&name).await?;
            println!("operator {name} revoked");
        }
    }
    Ok(())
}

fn pki(command: PkiCommand) -> Result<()> {
    match command {
        PkiCommand::Init { out, name, valid_days } => {
            let (cert, key) = fleetctl::pki::init(&out, &name, valid_days)?;
            println!("CA certificate {} (give it to agents as ca_file), key {}", cert.display(), key.display());
        }
        PkiCommand::Issue { ca, out, hosts, name, valid_days } => {
            let (cert, key) = fleetctl::pki::issue(&ca, &out, &name, &hosts, valid_days)?;
            println!(
                "server certificate {} for {}, key {}: pass them as --tls-cert and --tls-key",
                cert.display(),
                hosts.join(", "),
                key.display()
            );
        }
    }
    Ok(())
}

fn keygen(out: &Path, name: &str) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key = parse_secret_key(&hex::encode(rand::random::<[u8; 32]>()))?;
    let secret_path = out.join(format!("{name}.key"));
    let public_path = out.join(format!("{name}.pub"));
    if secret_path.exists() {
        bail!("{} exists; refusing to overwrite a signing key", secret_path.display());
    }
    // Created 0600, so the secret is never readable by others, not even for a moment.
    fleetctl::pki::create_new(&secret_path, &secret_key_hex(&key), 0o600)
        .with_context(|| format!("cannot write {}", secret_path.display()))?;
    write(&public_path, public_key_hex(&key.verifying_key()).as_bytes())?;
    println!(
        "key id {}: secret {} public {}",
        KeyId::of(&key.verifying_key()),
        secret_path.display(),
        public_path.display()
    );
    Ok(())
}

fn bundle(command: BundleCommand) -> Result<()> {
    match command {
        BundleCommand::Build { model, metadata, out } => {
            let created_at = fleet_server::unix_ms() / 1000;
            let bundle = packaging::build(packaging::read_inputs(&model, &metadata, created_at)?)?;
            write(&out, &write_archive(&bundle.manifest_bytes, &bundle.files, &bundle.signatures))?;
            println!("built {} (unsigned): contract checked, golden cases reproduced", out.display());
        }
        BundleCommand::Sign { bundle, key, out } => {
            let key = parse_secret_key(&key_text(&key.to_string_lossy())?).context("signing key")?;
            let mut archive = read_archive(&read(&bundle)?, &Limits::default())?;
            let key_id = proto::bundle::add_signature(&mut archive, &key);
            let out = out.unwrap_or(bundle);
            write(&out, &write_archive(&archive.manifest_bytes, &archive.files, &archive.signatures))?;
            println!("signed {} with key {key_id}", out.display());
        }
        BundleCommand::Verify { bundle, trusted_keys, root } => {
            let trusted = match root {
                Some(root) => proto::root::SignedRoot::parse(&read(&root)?)?.verify_initial()?.targets(),
                None => TrustedKeys::new(
                    trusted_keys
                        .iter()
                        .map(|k| key_text(k).and_then(|t| Ok(parse_public_key(&t)?)))
                        .collect::<Result<Vec<_>>>()?,
                ),
            };
            let verified = read_archive(&read(&bundle)?, &Limits::default())?.verify(&trusted)?;
            let loaded = model_runtime::LoadedModel::load(&verified.manifest, verified.model_bytes())?;
            loaded.self_test()?;
            let m = &verified.manifest;
            println!(
                "ok: {} {} signed by {}; {} file(s) match; contract holds; {} golden case(s) reproduce within {}",
                m.name,
                m.version,
                verified.signed_by,
                m.files.len(),
                m.golden.cases.len(),
                m.golden.tolerance
            );
        }
    }
    Ok(())
}

async fn devices(json: bool, server: &ServerArgs) -> Result<()> {
    let devices = server.client()?.devices().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
        return Ok(());
    }
    println!(
        "{:<18} {:<12} {:<10} {:<10} {:<10} {:<12} {:>10} {:>7}",
        "id", "name", "model", "desired", "active", "status", "inferences", "drift"
    );
    for d in &devices {
        if d.models.is_empty() {
            println!("{:<18} {:<12} {:<10}", d.id, d.name, "-");
        }
        for m in &d.models {
            println!(
                "{:<18} {:<12} {:<10} {:<10} {:<10} {:<12} {:>10} {:>7}",
                d.id,
                d.name,
                m.name,
                m.desired_version.as_deref().unwrap_or("-"),
                m.active_version.as_deref().unwrap_or("-"),
                m.step.map_or("-", |s| s.as_str()),
                m.inferences,
                m.drift_score.map_or("-".into(), |s| format!("{s:.3}")),
            );
        }
    }
    Ok(())
}

/// The services the demo uses instead of its in-process defaults.
struct Backends {
    mqtt_url: Option<String>,
    database_url: Option<String>,
}

async fn run_demo(
    agents: usize,
    rows: usize,
    backends: Backends,
    json: bool,
    scenario: Option<Scenario>,
) -> Result<()> {
    let Backends { mqtt_url, database_url } = backends;
    if agents == 0 {
        bail!("--agents must be at least 1");
    }
    let progress = |line: &str| eprintln!("==> {line}");
    // Each scenario has a default fleet size; --agents changes it.
    let sized = |default: usize| if agents == 5 { default } else { agents };
    match scenario {
        Some(Scenario::Offline) => {
            let options = DemoOptions { agents: sized(6), mqtt_url, database_url, ..DemoOptions::default() };
            let result = fleetctl::offline::run(options, progress).await?;
            finish(&result, result.ok, json, fleetctl::offline::render_table)
        }
        Some(Scenario::Retrain) => {
            let options = DemoOptions { agents: sized(6), mqtt_url, database_url, ..DemoOptions::default() };
            let result = fleetctl::retrain_demo::run(options, progress).await?;
            finish(&result, result.ok, json, fleetctl::retrain_demo::render_table)
        }
        None => {
            let options =
                DemoOptions { agents, rows_per_agent: rows.max(2), mqtt_url, database_url, ..DemoOptions::default() };
            let result = demo::run(options, progress).await?;
            finish(&result, result.ok, json, demo::render_table)
        }
        Some(scenario) => {
            // A rollout needs cohorts and a holdout: 30 agents unless told otherwise.
            let options = DemoOptions { agents: sized(30), mqtt_url, database_url, ..DemoOptions::default() };
            let result = demo::run_scenario(options, scenario, progress).await?;
            finish(&result, result.ok, json, demo::render_table)
        }
    }
}

/// Prints a demo's result (JSON or its table) and exits 1 when it is not what it promises.
fn finish<T: serde::Serialize>(result: &T, ok: bool, json: bool, table: impl Fn(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(result)?);
    } else {
        print!("{}", table(result));
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

fn read_plan(path: &Path) -> Result<proto::rollout::RolloutPlan> {
    let text = String::from_utf8_lossy(&read(path)?).into_owned();
    let plan: proto::rollout::RolloutPlan = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("plan {} is not a valid rollout plan", path.display()))?
    } else {
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("plan {} is not a valid rollout plan: {}", path.display(), e.message()))?
    };
    plan.validate()?;
    Ok(plan)
}

fn show_rollout(view: &fleet_server::api::rollouts::RolloutView, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(view)?);
        return Ok(());
    }
    let r = &view.rollout;
    println!("{}", fleetctl::scenario::line(view));
    if let Some(reason) = &r.reason {
        println!("  reason: {reason}");
    }
    if let Some(waiting) = &r.waiting_for {
        println!("  waiting for {waiting} (or `fleetctl rollout promote {}`)", r.id);
    }
    Ok(())
}

/// Follows a rollout to its end: progress bars at a terminal, a line per change otherwise (and
/// with --json, the final state as JSON).
async fn watch(client: &FleetClient, id: &str, json: bool) -> Result<()> {
    if !json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return watch_bars(client, id).await;
    }
    let mut shown = Ok(());
    let view = fleetctl::scenario::follow(client, id, None, |view| {
        if shown.is_ok() {
            shown = show_rollout(view, false);
        }
    })
    .await?;
    shown?;
    if json {
        show_rollout(&view, true)?;
    }
    Ok(())
}

async fn watch_bars(client: &FleetClient, id: &str) -> Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg}")?.progress_chars("=> ");
    let bars = MultiProgress::new();
    let overall = bars.add(ProgressBar::new(0).with_style(style.clone()).with_prefix("active"));
    let wave = bars.add(ProgressBar::new(0).with_style(style));
    let view = fleetctl::scenario::follow(client, id, None, |view| {
        let p = fleetctl::scenario::progress(view);
        overall.set_length(p.eligible);
        overall.set_position(p.active);
        overall.set_message(p.overall);
        wave.set_prefix(p.wave_label);
        wave.set_length(p.wave_target);
        wave.set_position(p.wave_done);
        wave.set_message(p.wave_state);
    })
    .await?;
    overall.finish();
    wave.finish();
    show_rollout(&view, false)
}

async fn rollout(command: RolloutCommand) -> Result<()> {
    let (action, args) = match command {
        RolloutCommand::Start { plan, watch: follow, json, server } => {
            let client = server.client()?;
            let view = client.start_rollout(&read_plan(&plan)?).await?;
            return if follow { watch(&client, &view.rollout.id, json).await } else { show_rollout(&view, json) };
        }
        RolloutCommand::Status { id, watch: follow, json, server } => {
            let client = server.client()?;
            return match id {
                Some(id) if follow => watch(&client, &id, json).await,
                Some(id) => show_rollout(&client.rollout(&id).await?, json),
                None => {
                    let all = client.rollouts().await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&all)?);
                        return Ok(());
                    }
                    all.iter().try_for_each(|view| show_rollout(view, false))
                }
            };
        }
        RolloutCommand::Pause(args) => (OperatorAction::Pause, args),
        RolloutCommand::Resume(args) => (OperatorAction::Resume, args),
        RolloutCommand::Abort(args) => (OperatorAction::Abort, args),
        RolloutCommand::Promote(args) => (OperatorAction::Promote, args),
        RolloutCommand::Retry(args) => (OperatorAction::RetryFailed, args),
    };
    let client = FleetClient::new(&args.server.server, &args.server.token);
    show_rollout(&client.rollout_action(&args.id, action).await?, args.json)
}
