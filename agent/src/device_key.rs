//! The device's own ed25519 key pair: made on the device the first time it starts, kept in
//! `<data_dir>/device.key` (hex, mode 0600), never sent anywhere. Its public half is registered
//! at enrollment and verifies every report the device signs.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use proto::keys::SigningKey;
use thiserror::Error;

pub const FILE_NAME: &str = "device.key";

#[derive(Debug, Error)]
pub enum DeviceKeyError {
    #[error("cannot read or write the device key {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "device key {path} is not 64 hex characters; restore it from a backup or re-enroll with a new data directory"
    )]
    Corrupt { path: PathBuf },
}

/// Reads the device key, or makes one if there is none yet. The new key is written to a
/// temporary file, synced, then renamed into place, so a crash never leaves half a key.
pub fn load_or_create(data_dir: &Path) -> Result<SigningKey, DeviceKeyError> {
    let path = data_dir.join(FILE_NAME);
    let io = |source| DeviceKeyError::Io { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(text) => proto::keys::parse_secret_key(&text).map_err(|_| DeviceKeyError::Corrupt { path: path.clone() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
            let partial = data_dir.join(format!("{FILE_NAME}.partial"));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&partial)
                .map_err(io)?;
            file.write_all(proto::keys::secret_key_hex(&key).as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&partial, &path).map_err(io)?;
            if let Ok(dir) = std::fs::File::open(data_dir) {
                let _ = dir.sync_all();
            }
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_made_once_readable_only_by_its_owner_and_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let made = load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(dir.path()).unwrap().to_bytes(), made.to_bytes());
    }

    #[test]
    fn a_damaged_key_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "not a key").unwrap();
        assert!(matches!(load_or_create(dir.path()), Err(DeviceKeyError::Corrupt { .. })));
    }
}
