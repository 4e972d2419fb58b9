//! The embedded MQTT broker, so a bare machine needs no Mosquitto: rumqttd on a loopback-only
//! port behind our gate (`gate.rs`), which is what devices connect to. The gate authenticates
//! each device against the store, keeps it to its own topics and can close its session; rumqttd
//! admits only connections the gate handed over, and the server's own session (username
//! [`SERVER_USERNAME`], a secret made at start). Operators who run Mosquitto pass `--mqtt-url`
//! instead and none of this starts; `mosquitto.rs` keeps a Mosquitto's password file in step with
//! the store (see `fleetctl broker config`).

pub mod emqx;
pub mod gate;
pub mod mosquitto;

use std::net::SocketAddr;
use std::sync::Arc;

use sha2::Digest;
use subtle::ConstantTimeEq;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use gate::Sessions;

use crate::store::Store;

/// The MQTT username of fleet-server's own session.
pub const SERVER_USERNAME: &str = "fleet-server";

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("embedded broker config: {0}")]
    Config(String),
    #[error("cannot start the embedded broker thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot listen for MQTT clients on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// Whether `given` is the secret `expected`, compared as digests in constant time: how long a
/// refusal takes says nothing of the secret.
pub fn same_secret(given: &str, expected: &str) -> bool {
    let digest = |text: &str| sha2::Sha256::digest(text.as_bytes());
    bool::from(digest(given)[..].ct_eq(&digest(expected)[..]))
}

/// A broker login's username and the digest of its password, which the store looks up among
/// device credentials; or why the login is no device's.
pub fn login_credential(username: Option<&str>, password: Option<&[u8]>) -> Result<(String, String), String> {
    let (Some(username), Some(password)) = (username, password) else {
        return Err("anonymous clients are refused; connect as a device with its credential".into());
    };
    let password = std::str::from_utf8(password).map_err(|_| "the password is not a device credential")?;
    Ok((username.to_string(), crate::api::sha256_hex(password)))
}

/// The device a login is, given the device the store found for its credential: the username
/// must be that device's id (a device may not log in under another's name).
pub fn login_device(username: &str, found: Option<String>) -> Result<String, String> {
    match found {
        Some(device) if device == username => Ok(device),
        Some(_) => Err(format!("username {username:?} does not match the credential's device")),
        None => Err(format!("no enrolled, unrevoked device {username:?} has this credential")),
    }
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    /// rumqttd's own loopback address, where the server's session connects.
    pub internal: SocketAddr,
    /// The gate's address, where devices connect.
    pub public: SocketAddr,
    /// The server session's password.
    pub server_password: String,
    pub sessions: Sessions,
}

/// Starts rumqttd on a free loopback port in a background thread (rumqttd has no stop call: it
/// lives as long as the process) and the gate on `listen` as a task of `tasks`.
pub async fn start_embedded(
    listen: SocketAddr,
    max_payload: usize,
    store: Arc<dyn Store>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> Result<EmbeddedBroker, BrokerError> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|source| BrokerError::Listen { addr: listen, source })?;
    let public = listener.local_addr().map_err(|source| BrokerError::Listen { addr: listen, source })?;
    let internal_port =
        crate::server::free_loopback_port().map_err(|source| BrokerError::Listen { addr: listen, source })?;
    let internal: SocketAddr = ([127, 0, 0, 1], internal_port).into();
    let config_text = rumqttd_config(internal, max_payload);
    let mut config: rumqttd::Config = toml::from_str(&config_text).map_err(|e| BrokerError::Config(e.to_string()))?;
    let server_password = hex::encode(rand::random::<[u8; 24]>());
    let admitted = gate::Admitted::default();
    let hook_admitted = admitted.clone();
    let hook_password = server_password.clone();
    let v4 = config
        .v4
        .as_mut()
        .and_then(|servers| servers.get_mut("1"))
        .ok_or_else(|| BrokerError::Config("no v4 listener".into()))?;
    v4.set_auth_handler(move |client_id: String, username: String, password: String| {
        let server = username == SERVER_USERNAME && same_secret(&password, &hook_password);
        let admitted = server || hook_admitted.take(&client_id, &username);
        async move { admitted }
    });
    spawn_rumqttd(config)?;
    let sessions = Sessions::default();
    let gate = gate::Gate {
        store,
        broker: internal,
        max_packet: max_payload + 1024,
        sessions: sessions.clone(),
        admitted,
        tls,
    };
    tasks.spawn(gate.run(listener, cancel));
    Ok(EmbeddedBroker { internal, public, server_password, sessions })
}

/// Starts rumqttd alone on a loopback address with no authentication: a stand-in for an
/// external broker in tests and demos, where the broker must outlive a server that restarts.
/// Like a Mosquitto run with its default config it admits anyone, so it refuses any address
/// that is not loopback; production uses [`start_embedded`] or a configured Mosquitto.
pub fn start_open(listen: SocketAddr, max_payload: usize) -> Result<(), BrokerError> {
    if !listen.ip().is_loopback() {
        return Err(BrokerError::Config(format!("an unauthenticated broker listens on loopback only, not {listen}")));
    }
    let config_text = rumqttd_config(listen, max_payload);
    let config: rumqttd::Config = toml::from_str(&config_text).map_err(|e| BrokerError::Config(e.to_string()))?;
    spawn_rumqttd(config)
}

fn rumqttd_config(listen: SocketAddr, max_payload: usize) -> String {
    format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "{listen}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = {max_payload}
    max_inflight_count = 100
    dynamic_filters = true
"#
    )
}

/// Runs rumqttd on its own thread; it has no stop call and lives as long as the process.
fn spawn_rumqttd(config: rumqttd::Config) -> Result<(), BrokerError> {
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    Ok(())
}
