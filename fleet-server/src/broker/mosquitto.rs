//! Mosquitto as the fleet's broker: the config `fleetctl broker config` writes (a listener without
//! anonymous access, a password file, an ACL keeping each device to its own topics with a `%u`
//! pattern), and the server side that keeps the password file in step with the store.
//!
//! The store is the truth: every enrolled, unrevoked device has a salted SHA-512 hash of its
//! credential (`$6$`, a format Mosquitto reads), made at enrollment. The password file is
//! rendered from the store at start, after each enrollment and after each revocation, written
//! atomically, and Mosquitto is told to reload it (SIGHUP through its pid file); a reload also
//! disconnects clients whose entry is gone. Lines of users that are not devices (the server's
//! own, added by `fleetctl broker config`) are kept as they are.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha512};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::Store;

/// Devices are kept to their own topics; the server may use every device's, and publishes the
/// fleet's events (retraining requests) outside the device tree, where no device reaches.
pub fn acl(server_username: &str) -> String {
    format!(
        "# fleet ACL (written by fleetctl broker config)\n\
         user {server_username}\n\
         topic readwrite {root}/#\n\
         topic readwrite {events}\n\
         \n\
         # every other user is a device: its own topics only\n\
         pattern readwrite {root}/%u/#\n",
        root = proto::wire::TOPIC_ROOT,
        events = proto::events::RETRAIN_TOPIC
    )
}

/// Mosquitto's `$6$` password hash: base64(salt) and base64(SHA-512(password ‖ salt)).
pub fn password_hash(password: &str, salt: &[u8; 12]) -> String {
    let digest = Sha512::new().chain_update(password.as_bytes()).chain_update(salt).finalize();
    format!("$6${}${}", base64(salt), base64(&digest))
}

/// A new random salt and the hash of `password` with it.
pub fn new_password_hash(password: &str) -> String {
    password_hash(password, &rand::random::<[u8; 12]>())
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The password file: the existing lines of users that are not devices, then one line per device.
pub fn render_passwords(existing: &str, devices: &[(String, String)]) -> String {
    let mut out = String::new();
    for line in existing.lines() {
        let user = line.split(':').next().unwrap_or("");
        if !line.trim().is_empty() && !is_device_username(user) {
            out.push_str(line);
            out.push('\n');
        }
    }
    for (device, hash) in devices {
        out.push_str(&format!("{device}:{hash}\n"));
    }
    out
}

/// Device ids are `dev-` and hex (the server makes them); other users are left alone.
fn is_device_username(user: &str) -> bool {
    user.strip_prefix("dev-").is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Where the password file is and how Mosquitto is told to reload it.
#[derive(Clone, Debug)]
pub struct MosquittoFiles {
    pub password_file: PathBuf,
    /// Mosquitto's pid file (`pid_file` in its config): it gets a SIGHUP after each change.
    pub pid_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("reloading Mosquitto (pid file {path}): {reason}")]
    Reload { path: PathBuf, reason: String },
}

/// Asks the password-file task to write the file again; cheap to clone.
#[derive(Clone)]
pub struct PasswordSync {
    tx: mpsc::Sender<oneshot::Sender<()>>,
}

impl PasswordSync {
    /// Returns once the file reflects the store as it is now (or the attempt failed and was
    /// logged), waiting at most 10 s.
    pub async fn sync(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(done).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
        }
    }
}

/// Starts the task that owns the password file; it writes it once at start.
/// How often the password file is rendered from the store again without being asked.
const RESYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

pub fn spawn_sync(
    store: Arc<dyn Store>,
    files: MosquittoFiles,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> PasswordSync {
    let (tx, mut rx) = mpsc::channel::<oneshot::Sender<()>>(64);
    tasks.spawn(async move {
        // Also now and then: servers sharing one store and one password file each write after
        // their own enrollments, and a write that read the store just before another server's
        // enrollment would leave that device out until the next.
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut waiting = Vec::new();
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = resync.tick() => {}
                request = rx.recv() => match request {
                    Some(done) => waiting.push(done),
                    None => break,
                },
            }
            // Everything asked for meanwhile is served by one write.
            while let Ok(done) = rx.try_recv() {
                waiting.push(done);
            }
            let (store, files) = (store.clone(), files.clone());
            match tokio::task::spawn_blocking(move || write_and_reload(store.as_ref(), &files)).await {
                Ok(Ok(devices)) => tracing::debug!(devices, "Mosquitto password file written"),
                Ok(Err(e)) => tracing::error!(error = %e, "Mosquitto password file not updated"),
                Err(e) => tracing::error!(error = %e, "Mosquitto password file task failed"),
            }
            for done in waiting {
                let _ = done.send(());
            }
        }
    });
    PasswordSync { tx }
}

/// Renders the file from the store, writes it beside and renames it, then signals Mosquitto.
fn write_and_reload(store: &dyn Store, files: &MosquittoFiles) -> Result<usize, SyncError> {
    let devices = store.broker_passwords()?;
    let path = &files.password_file;
    let io = |source| SyncError::Io { path: path.clone(), source };
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    let text = render_passwords(&existing, &devices);
    if text != existing {
        // Mode 0640: Mosquitto's group may read the hashes, nobody else.
        crate::server::write_atomically(path, text.as_bytes(), 0o640).map_err(io)?;
        if let Some(pid_file) = &files.pid_file {
            reload(pid_file)?;
        }
    }
    Ok(devices.len())
}

fn reload(pid_file: &Path) -> Result<(), SyncError> {
    let failed = |reason: String| SyncError::Reload { path: pid_file.to_path_buf(), reason };
    let pid = std::fs::read_to_string(pid_file).map_err(|e| failed(e.to_string()))?;
    let pid: u32 = pid.trim().parse().map_err(|_| failed(format!("{:?} is not a pid", pid.trim())))?;
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .map_err(|e| failed(format!("cannot run kill: {e}")))?;
    if !status.success() {
        return Err(failed(format!("kill -HUP {pid} failed ({status})")));
    }
    Ok(())
}

/// The files `fleetctl broker config` writes, as text.
pub struct BrokerConfig {
    pub mosquitto_conf: String,
    pub acl: String,
    /// The server's line only; fleet-server adds the devices.
    pub passwords: String,
    /// The server's MQTT password, for `fleet-server --mqtt-password-file`.
    pub server_password: String,
}

/// A Mosquitto config for the fleet in `dir`: listener on `bind:port` (TLS when `tls` names a
/// certificate chain and key, plus a loopback listener on port + 1 for the server), no anonymous
/// access, the password file and ACL beside it.
pub fn broker_config(
    dir: &Path,
    bind: &str,
    port: u16,
    tls: Option<(&Path, &Path)>,
    server_username: &str,
) -> BrokerConfig {
    let server_password = hex::encode(rand::random::<[u8; 24]>());
    // With TLS, the server's own session uses a second, loopback-only listener on port + 1.
    let tls_lines = match tls {
        Some((cert, key)) => format!(
            "certfile {}\nkeyfile {}\n# fleet-server's own session, on this machine only\nlistener {} 127.0.0.1\n",
            cert.display(),
            key.display(),
            port.saturating_add(1)
        ),
        None => String::new(),
    };
    let mosquitto_conf = format!(
        "# Mosquitto for the fleet (written by fleetctl broker config). Run: mosquitto -c {conf}\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         password_file {passwords}\n\
         acl_file {acl}\n\
         pid_file {pid}\n\
         # report payloads are at most 64 KiB; leave room for the envelope\n\
         message_size_limit 70000\n\
         listener {port} {bind}\n\
         {tls_lines}",
        conf = dir.join("mosquitto.conf").display(),
        passwords = dir.join("passwords").display(),
        acl = dir.join("acl").display(),
        pid = dir.join("mosquitto.pid").display(),
    );
    BrokerConfig {
        mosquitto_conf,
        acl: acl(server_username),
        passwords: format!("{server_username}:{}\n", new_password_hash(&server_password)),
        server_password,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashes_match_what_mosquitto_passwd_writes() {
        // `mosquitto_passwd -H sha512 -b pw dev-1 secret1` wrote this line with this salt.
        let salt: [u8; 12] = [0x0d, 0xed, 0x71, 0x25, 0xd8, 0xe1, 0xd1, 0xc9, 0x8f, 0xdd, 0x5b, 0xc9];
        assert_eq!(
            password_hash("secret1", &salt),
            "$6$De1xJdjh0cmP3VvJ$sXs+oHvM1qXrQOiHVyikDaOnMtiD1fZ6iBObkjPKmZPM9c/XhfMXrYt6iKIfwf0QEwwSQ26xrR3rOrruDGy4BQ=="
        );
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
    }

    #[test]
    fn the_password_file_keeps_other_users_and_lists_exactly_the_given_devices() {
        let existing = "fleet-server:$6$x$y\ndev-0a1b:$6$old$gone\n\nmonitor:$6$m$n\n";
        let devices = vec![("dev-00ff".to_string(), "$6$a$b".to_string())];
        assert_eq!(render_passwords(existing, &devices), "fleet-server:$6$x$y\nmonitor:$6$m$n\ndev-00ff:$6$a$b\n");
    }
}
