//! Ed25519 keys as the fleet names them: a key id is the first 8 bytes of sha256(public key),
//! in hex. Keys travel as hex text files (`fleetctl keygen`).

use std::collections::BTreeMap;
use std::fmt;

pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct KeyId([u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }

    pub fn parse(text: &str) -> Result<KeyId, KeyError> {
        let bytes = hex::decode(text).map_err(|_| KeyError::BadKeyId(text.to_string()))?;
        let id: [u8; 8] = bytes.try_into().map_err(|_| KeyError::BadKeyId(text.to_string()))?;
        Ok(KeyId(id))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("key id {0:?} is not 16 hex characters")]
    BadKeyId(String),
    #[error("public key is not 64 hex characters of a valid ed25519 point")]
    BadPublicKey,
    #[error("secret key is not 64 hex characters")]
    BadSecretKey,
}

pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = hex::decode(text.trim()).map_err(|_| KeyError::BadPublicKey)?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::BadPublicKey)?;
    VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::BadPublicKey)
}

pub fn parse_secret_key(text: &str) -> Result<SigningKey, KeyError> {
    let bytes = hex::decode(text.trim()).map_err(|_| KeyError::BadSecretKey)?;
    let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::BadSecretKey)?;
    Ok(SigningKey::from_bytes(&arr))
}

pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

pub fn secret_key_hex(key: &SigningKey) -> String {
    hex::encode(key.to_bytes())
}

/// The keys a verifier accepts, by key id, and how many of them must sign (at least 1).
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, VerifyingKey>,
    threshold: usize,
}

impl TrustedKeys {
    /// Any one of `keys` suffices.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> TrustedKeys {
        TrustedKeys { keys: keys.into_iter().map(|k| (KeyId::of(&k), k)).collect(), threshold: 1 }
    }

    /// Valid signatures by this many distinct keys are needed (raised to at least 1).
    pub fn with_threshold(self, threshold: usize) -> TrustedKeys {
        TrustedKeys { threshold: threshold.max(1), ..self }
    }

    pub fn threshold(&self) -> usize {
        self.threshold.max(1)
    }

    pub fn from_hex<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<TrustedKeys, KeyError> {
        let keys = texts.into_iter().map(parse_public_key).collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedKeys::new(keys))
    }

    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A signature carried beside a JSON document (roots, freshness): key id and signature in hex.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DetachedSignature {
    pub keyid: String,
    /// 64 bytes in hex.
    pub sig: String,
}

impl DetachedSignature {
    pub fn new(key: &SigningKey, message: &[u8]) -> DetachedSignature {
        DetachedSignature {
            keyid: KeyId::of(&key.verifying_key()).to_string(),
            sig: hex::encode(sign(key, message).to_bytes()),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ThresholdError {
    #[error("the signature by key {keyid} does not match: the document was altered")]
    BadSignature { keyid: String },
    #[error("signed by {valid} of the trusted keys; {threshold} are needed")]
    BelowThreshold { valid: usize, threshold: usize },
}

/// Accepts when valid signatures over `message` by at least `trusted.threshold()` distinct
/// trusted keys are among `signatures`. Signatures by other keys count for nothing; one by a
/// trusted key that does not verify is an error (somebody altered something).
pub fn verify_threshold(
    message: &[u8],
    signatures: &[DetachedSignature],
    trusted: &TrustedKeys,
) -> Result<(), ThresholdError> {
    let mut valid = std::collections::BTreeSet::new();
    for signature in signatures {
        let Some((id, key)) = KeyId::parse(&signature.keyid).ok().and_then(|id| Some((id, trusted.get(&id)?))) else {
            continue;
        };
        let bad = || ThresholdError::BadSignature { keyid: signature.keyid.clone() };
        let bytes = hex::decode(&signature.sig).map_err(|_| bad())?;
        let sig = Signature::from_slice(&bytes).map_err(|_| bad())?;
        key.verify_strict(message, &sig).map_err(|_| bad())?;
        valid.insert(id);
    }
    if valid.len() < trusted.threshold() {
        return Err(ThresholdError::BelowThreshold { valid: valid.len(), threshold: trusted.threshold() });
    }
    Ok(())
}

/// Signs exact bytes; the caller passes the manifest bytes as stored in the bundle.
pub fn sign(key: &SigningKey, message: &[u8]) -> Signature {
    use ed25519_dalek::Signer;
    key.sign(message)
}
