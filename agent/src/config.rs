//! Agent configuration: one TOML file, unknown keys rejected, every default written here and in
//! `agent/edge-agent.example.toml`. `EDGE_AGENT_*` environment variables override a few keys for
//! containers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Base URL of the fleet server, e.g. `http://fleet.example:8080`.
    pub server_url: String,
    /// One-time token used on first start to enroll; ignored once enrolled.
    #[serde(default)]
    pub enrollment_token: Option<String>,
    /// Name shown to operators; defaults to the host name given at enrollment.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub data_dir: PathBuf,
    /// Hex ed25519 public keys whose signatures on bundles are accepted (any one suffices).
    /// Use `root_file` instead for thresholds and key rotation; set one of the two.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// The signed root of trust the device starts from (`fleetctl root init`): the signing keys
    /// by role and how many must sign. Newer roots from the server replace it only when signed by
    /// a threshold of its root keys (ADR 0010).
    #[serde(default)]
    pub root_file: Option<PathBuf>,
    /// `mqtt://host:port`, or `mqtts://host:port` for TLS (needs `ca_file`).
    pub mqtt_url: String,
    /// PEM file of the CA that signed the server's certificate (`fleetctl pki init`). When set,
    /// `https://` and `mqtts://` trust this CA only (it is pinned); without it `https://` uses
    /// the system's roots and `mqtts://` is refused.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow plain `http://` / `mqtt://` to hosts other than this machine (the credential then
    /// travels in clear). Off by default.
    #[serde(default)]
    pub allow_insecure: bool,
    #[serde(default = "default_api_listen")]
    pub api_listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`) on this loopback address; off when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// IANA time zone (e.g. "Europe/Berlin") in which rollouts' activation windows are read;
    /// the system's zone when absent. Checked at start against the system's tz database.
    #[serde(default)]
    pub time_zone: Option<String>,
    #[serde(default)]
    pub intervals: Intervals,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Intervals {
    /// HTTP check-in when no MQTT notification arrives.
    pub checkin_secs: f64,
    pub heartbeat_secs: f64,
    /// One drift summary per model per window.
    pub drift_secs: f64,
}

impl Default for Intervals {
    fn default() -> Self {
        Intervals { checkin_secs: 60.0, heartbeat_secs: 30.0, drift_secs: 60.0 }
    }
}

impl Intervals {
    pub fn checkin(&self) -> Duration {
        Duration::from_secs_f64(self.checkin_secs.max(0.05))
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_secs.max(0.05))
    }
    pub fn drift(&self) -> Duration {
        Duration::from_secs_f64(self.drift_secs.max(0.05))
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_bundle_bytes: u64,
    pub max_request_bytes: usize,
    pub telemetry_queue: usize,
    /// One budget for everything buffered while offline (telemetry and the report outbox);
    /// beyond it raw telemetry is evicted first, then heartbeats, reports last.
    pub disk_budget_bytes: u64,
    /// Fraction of inferences kept as telemetry records, in (0, 1].
    pub telemetry_sample_rate: f64,
    /// Telemetry upload pace once a backlog exists.
    pub telemetry_upload_rows_per_sec: f64,
    /// A record not acknowledged by the server within this time is published again.
    pub ack_timeout_secs: f64,
    /// Total time for one check-in, enrollment or telemetry upload request.
    pub request_timeout_secs: f64,
    /// Download attempts for one version before it is reported `failed`.
    pub download_attempts: u32,
    /// A download slower than this over `stall_window_secs` is abandoned (and retried).
    pub min_download_bytes_per_sec: u64,
    pub stall_window_secs: f64,
    /// Agent restarts during one version's self-test before that version is reported `failed`.
    pub self_test_restarts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bundle_bytes: 512 << 20,
            max_request_bytes: 4 << 20,
            telemetry_queue: 8192,
            disk_budget_bytes: 256 << 20,
            telemetry_sample_rate: 1.0,
            telemetry_upload_rows_per_sec: 2000.0,
            ack_timeout_secs: 30.0,
            request_timeout_secs: 30.0,
            download_attempts: 5,
            min_download_bytes_per_sec: 1024,
            stall_window_secs: 60.0,
            self_test_restarts: 3,
        }
    }
}

impl Limits {
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.ack_timeout_secs.max(0.1))
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_secs.max(0.1))
    }
    pub fn stall_window(&self) -> Duration {
        Duration::from_secs_f64(self.stall_window_secs.max(0.1))
    }
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8686))
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut config: AgentConfig = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.into(), message: e.message().to_string() })?;
        config.apply_env(|key| std::env::var(key).ok());
        config.validate()?;
        config.read_ca()?;
        Ok(config)
    }

    fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(v) = var("EDGE_AGENT_SERVER_URL") {
            self.server_url = v;
        }
        if let Some(v) = var("EDGE_AGENT_MQTT_URL") {
            self.mqtt_url = v;
        }
        if let Some(v) = var("EDGE_AGENT_ENROLLMENT_TOKEN") {
            self.enrollment_token = Some(v);
        }
        if let Some(v) = var("EDGE_AGENT_DATA_DIR") {
            self.data_dir = v.into();
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.server_url.starts_with("http://") || self.server_url.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!(
                "server_url {:?} must start with http:// or https://",
                self.server_url
            )));
        }
        match (self.trusted_keys.is_empty(), &self.root_file) {
            (true, None) => {
                return Err(ConfigError::Invalid(
                    "neither root_file nor trusted_keys is set: no bundle could ever be accepted".into(),
                ))
            }
            (false, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "set root_file or trusted_keys, not both: the root names the keys that sign bundles".into(),
                ))
            }
            _ => {}
        }
        proto::TrustedKeys::from_hex(self.trusted_keys.iter().map(String::as_str))
            .map_err(|e| ConfigError::Invalid(format!("trusted_keys: {e}")))?;
        if let Some(addr) = self.metrics_listen.filter(|a| !a.ip().is_loopback()) {
            return Err(ConfigError::Invalid(format!(
                "metrics_listen {addr} is not a loopback address; the metrics endpoint has no authentication, so it listens on 127.0.0.1 or ::1 only"
            )));
        }
        let broker =
            proto::endpoint::parse_broker_url(&self.mqtt_url).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let insecure = |e: proto::endpoint::InsecureUrl| ConfigError::Invalid(e.to_string());
        proto::endpoint::require_secure("server_url", &self.server_url, self.allow_insecure).map_err(insecure)?;
        proto::endpoint::require_secure("mqtt_url", &self.mqtt_url, self.allow_insecure).map_err(insecure)?;
        if broker.tls && self.ca_file.is_none() {
            return Err(ConfigError::Invalid(format!(
                "mqtt_url {:?} is TLS; set ca_file to the PEM of the CA that signed the broker's certificate",
                self.mqtt_url
            )));
        }
        let rate = self.limits.telemetry_sample_rate;
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(ConfigError::Invalid(format!("limits.telemetry_sample_rate {rate} must be in (0, 1]")));
        }
        if self.limits.download_attempts == 0 {
            return Err(ConfigError::Invalid("limits.download_attempts must be at least 1".into()));
        }
        Ok(())
    }
}

impl AgentConfig {
    /// The pinned CA certificate (PEM) from `ca_file`, checked to hold a CA certificate
    /// (blocking: reads a file).
    pub fn read_ca(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(path) = &self.ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        crate::http::rustls_trusting(&pem).map_err(|e| ConfigError::Invalid(format!("ca_file: {e}")))?;
        Ok(Some(pem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_to_another_host_needs_allow_insecure() {
        let remote = MINIMAL.replace("http://127.0.0.1:8080", "http://10.1.2.3:8080");
        let config: AgentConfig = toml::from_str(&remote).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server_url") && err.contains("allow_insecure"), "{err}");
        let config: AgentConfig = toml::from_str(&format!("allow_insecure = true\n{remote}")).unwrap();
        config.validate().unwrap();
        let tls = MINIMAL.replace("mqtt://127.0.0.1:1884", "mqtts://fleet.example:8883");
        let err = toml::from_str::<AgentConfig>(&tls).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("ca_file"), "{err}");
    }

    const MINIMAL: &str = r#"
server_url = "http://127.0.0.1:8080"
data_dir = "/tmp/agent"
trusted_keys = ["8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"]
mqtt_url = "mqtt://127.0.0.1:1884"
"#;

    #[test]
    fn a_minimal_config_gets_documented_defaults() {
        let config: AgentConfig = toml::from_str(MINIMAL).unwrap();
        config.validate().unwrap();
        assert_eq!(config.api_listen, default_api_listen());
        assert_eq!(config.intervals.drift(), Duration::from_secs(60));
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = toml::from_str::<AgentConfig>(&format!("{MINIMAL}\nserver_ulr = \"x\"")).unwrap_err();
        assert!(err.message().contains("server_ulr"), "{}", err.message());
    }

    #[test]
    fn a_metrics_endpoint_beyond_loopback_is_refused() {
        let mut config: AgentConfig = toml::from_str(MINIMAL).unwrap();
        config.metrics_listen = Some("0.0.0.0:9186".parse().unwrap());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("metrics_listen 0.0.0.0:9186 is not a loopback address"), "{err}");
        config.metrics_listen = Some("127.0.0.1:9186".parse().unwrap());
        config.validate().unwrap();
    }

    #[test]
    fn the_example_file_parses_and_validates() {
        let text = include_str!("../edge-agent.example.toml");
        let config: AgentConfig = toml::from_str(text).unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn environment_overrides_the_server_url() {
        let mut config: AgentConfig = toml::from_str(MINIMAL).unwrap();
        config.apply_env(|k| (k == "EDGE_AGENT_SERVER_URL").then(|| "http://10.0.0.9:1".to_string()));
        assert_eq!(config.server_url, "http://10.0.0.9:1");
    }

    #[test]
    fn a_bad_trusted_key_is_named_in_the_error() {
        let mut config: AgentConfig = toml::from_str(MINIMAL).unwrap();
        config.trusted_keys = vec!["zz".into()];
        assert!(config.validate().unwrap_err().to_string().contains("trusted_keys"));
    }
}
