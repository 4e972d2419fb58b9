//! The gate in front of the embedded broker: devices connect here, never to rumqttd itself.
//!
//! It reads the client's CONNECT, authenticates username (the device id) and password (the
//! device credential) against the store, admits the connection to rumqttd on its loopback-only
//! port, and then checks every PUBLISH topic and SUBSCRIBE filter the client sends against the
//! device's own topic root (rumqttd has no topic ACL). A client that steps outside is
//! disconnected with one log line. The broker-to-client direction is copied as is. Revoking a
//! device closes its open connections (`Sessions::close`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_packets::{access, connack, device_may_use, frame, parse_connect, Access, PacketError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How long a client has to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Admissions waiting for rumqttd's auth hook at most.
const MAX_PENDING_ADMISSIONS: usize = 10_000;
/// Read buffer per direction and connection.
const READ_CHUNK: usize = 16 * 1024;

/// Each open connection of one device: (connection number, what closes it).
type DeviceConnections = Vec<(u64, CancellationToken)>;

/// Open gate connections per device, so revoking a device can close them.
#[derive(Clone, Default)]
pub struct Sessions {
    open: Arc<Mutex<HashMap<String, DeviceConnections>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Sessions {
    fn register(&self, device: &str, token: CancellationToken) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().entry(device.to_string()).or_default().push((id, token));
        id
    }

    fn unregister(&self, device: &str, id: u64) {
        let mut open = self.lock();
        if let Some(list) = open.get_mut(device) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                open.remove(device);
            }
        }
    }

    /// Closes every open connection of `device`; returns how many there were.
    pub fn close(&self, device: &str) -> usize {
        let list = self.lock().remove(device).unwrap_or_default();
        for (_, token) in &list {
            token.cancel();
        }
        list.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, DeviceConnections>> {
        self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Connections the gate has authenticated and is about to hand to rumqttd: client id ->
/// username. rumqttd's auth hook admits a client only if the gate put it here (or it is the
/// server itself), so a local process that dials rumqttd's port directly gets nowhere.
#[derive(Clone, Default)]
pub struct Admitted {
    pending: Arc<Mutex<HashMap<String, String>>>,
}

impl Admitted {
    fn insert(&self, client_id: &str, username: &str) {
        let mut pending = self.lock();
        // Entries rumqttd never asked about (the connection failed in between) are few; a
        // broker that keeps failing must not grow this without bound.
        if pending.len() >= MAX_PENDING_ADMISSIONS {
            pending.clear();
        }
        pending.insert(client_id.to_string(), username.to_string());
    }

    /// True once for a client id the gate admitted with this username.
    pub fn take(&self, client_id: &str, username: &str) -> bool {
        let mut pending = self.lock();
        if pending.get(client_id).map(String::as_str) == Some(username) {
            pending.remove(client_id);
            true
        } else {
            false
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Everything one gate connection needs; cheap to clone.
#[derive(Clone)]
pub struct Gate {
    pub store: Arc<dyn Store>,
    /// rumqttd's loopback listener.
    pub broker: SocketAddr,
    pub max_packet: usize,
    pub sessions: Sessions,
    pub admitted: Admitted,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Gate {
    /// Accepts clients until `cancel`.
    pub async fn run(self, listener: TcpListener, cancel: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT gate accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let gate = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let served = match gate.tls.clone() {
                    Some(acceptor) => match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => gate.serve(tls, cancel).await,
                        Ok(Err(e)) => Err(GateError::Tls(e.to_string())),
                        Err(_) => Err(GateError::Tls("handshake timed out".into())),
                    },
                    None => gate.serve(stream, cancel).await,
                };
                if let Err(e) = served {
                    tracing::warn!(%peer, error = %e, "MQTT client disconnected by the gate");
                }
            });
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut client: S,
        cancel: CancellationToken,
    ) -> Result<(), GateError> {
        let mut buf = Vec::with_capacity(READ_CHUNK);
        let connect_len = tokio::time::timeout(CONNECT_TIMEOUT, read_frame(&mut client, &mut buf, self.max_packet))
            .await
            .map_err(|_| GateError::Refused("no CONNECT within 10 s".into()))??
            .ok_or(GateError::Closed)?;
        let connect = match parse_connect(&buf[..connect_len]) {
            Ok(connect) => connect,
            Err(e @ PacketError::Level(_)) => {
                let _ = client.write_all(&connack(1)).await;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let device = match self.authenticate(connect.username.as_deref(), connect.password.as_deref()).await {
            Ok(device) => device,
            Err(reason) => {
                let _ = client.write_all(&connack(5)).await;
                return Err(GateError::Refused(format!("client {:?}: {reason}", connect.client_id)));
            }
        };
        if let Some(will) = connect.will_topic.as_deref().filter(|t| !device_may_use(&device, t)) {
            let _ = client.write_all(&connack(5)).await;
            return Err(GateError::Refused(format!(
                "device {device} asked for a will on {will:?}, outside its topics"
            )));
        }
        let mut broker = TcpStream::connect(self.broker).await.map_err(GateError::Broker)?;
        let _ = broker.set_nodelay(true);
        self.admitted.insert(&connect.client_id, &device);
        broker.write_all(&buf[..connect_len]).await.map_err(GateError::Broker)?;
        buf.drain(..connect_len);

        let closed = cancel.child_token();
        let session = self.sessions.register(&device, closed.clone());
        let result = pump(client, broker, buf, &device, self.max_packet, closed).await;
        self.sessions.unregister(&device, session);
        if cancel.is_cancelled() {
            // The server is shutting down: not the client's doing.
            return Ok(());
        }
        result
    }

    /// The device id behind a username and password, or why not.
    async fn authenticate(&self, username: Option<&str>, password: Option<&[u8]>) -> Result<String, String> {
        let (username, hash) = super::login_credential(username, password)?;
        let found = crate::store::blocking(&self.store, move |s| s.device_for_credential(&hash))
            .await
            .map_err(|e| format!("credential not checked: {e}"))?;
        super::login_device(&username, found)
    }
}

/// Carries bytes both ways until either side closes, the client breaks the rules, or `closed`.
async fn pump<S: AsyncRead + AsyncWrite + Unpin>(
    client: S,
    broker: TcpStream,
    mut pending: Vec<u8>,
    device: &str,
    max_packet: usize,
    closed: CancellationToken,
) -> Result<(), GateError> {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut broker_read, mut broker_write) = broker.into_split();
    let upstream = async {
        loop {
            // Forward every whole packet in the buffer once each one is checked.
            let mut checked = 0;
            while let Some(len) = frame(&pending[checked..], max_packet)? {
                check(device, &pending[checked..checked + len])?;
                checked += len;
            }
            if checked > 0 {
                broker_write.write_all(&pending[..checked]).await.map_err(GateError::Broker)?;
                pending.drain(..checked);
            }
            pending.reserve(READ_CHUNK);
            if client_read.read_buf(&mut pending).await.map_err(GateError::Client)? == 0 {
                return Ok::<(), GateError>(());
            }
        }
    };
    let downstream = async {
        tokio::io::copy(&mut broker_read, &mut client_write).await.map_err(GateError::Client)?;
        Ok::<(), GateError>(())
    };
    tokio::select! {
        _ = closed.cancelled() => Err(GateError::Refused(format!("device {device} was revoked; its session is closed"))),
        done = upstream => done,
        done = downstream => done,
    }
}

/// Refuses a packet that touches topics outside the device's own.
fn check(device: &str, packet: &[u8]) -> Result<(), GateError> {
    match access(packet)? {
        Access::Publish(topic) if !device_may_use(device, topic) => {
            Err(GateError::Refused(format!("device {device} published on {topic:?}, outside its topics")))
        }
        Access::Subscribe(filters) => match filters.into_iter().find(|f| !device_may_use(device, f)) {
            Some(filter) => {
                Err(GateError::Refused(format!("device {device} subscribed to {filter:?}, outside its topics")))
            }
            None => Ok(()),
        },
        Access::Connect => Err(GateError::Refused(format!("device {device} sent a second CONNECT"))),
        Access::Publish(_) | Access::Other => Ok(()),
    }
}

/// Reads until `buf` holds a whole packet; its length, or None if the client closed first.
async fn read_frame<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Result<Option<usize>, GateError> {
    loop {
        if let Some(len) = frame(buf, limit)? {
            return Ok(Some(len));
        }
        buf.reserve(READ_CHUNK);
        if client.read_buf(buf).await.map_err(GateError::Client)? == 0 {
            return Ok(None);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Packet(#[from] PacketError),
    #[error("client connection: {0}")]
    Client(std::io::Error),
    #[error("embedded broker connection: {0}")]
    Broker(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("client closed before CONNECT")]
    Closed,
}
