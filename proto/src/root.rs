//! The root of trust (ADR 0010): a signed document naming the keys of each role and how many of
//! them must sign, and TUF's rule for replacing it.
//!
//! `root.json` holds `{"signed": {...}, "signatures": [{"keyid", "sig"}]}`. Signatures cover the
//! canonical bytes of `signed`: its compact JSON as this crate writes it (fields in declaration
//! order, maps sorted by key), so a file re-indented by hand still verifies. Roles:
//! - `root`: offline keys; sign root documents, nothing else.
//! - `targets`: release keys; sign bundle manifests (a bundle needs `threshold` of them).
//! - `timestamp`: the server's online key; vouches for freshness only (ADR 0010), never for a
//!   bundle.
//!
//! A key listed in no role of the current root is revoked: its signatures count for nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys::{
    parse_public_key, verify_threshold, DetachedSignature, KeyId, SigningKey, ThresholdError, TrustedKeys, VerifyingKey,
};

/// Largest root document accepted, in bytes.
pub const MAX_ROOT_BYTES: usize = 64 * 1024;
/// Most keys one root may list.
pub const MAX_ROOT_KEYS: usize = 64;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Starts at 1 and rises by exactly one with each rotation.
    pub version: u64,
    /// Unix seconds after which this document is no longer accepted as the next root.
    pub expires: u64,
    /// Public keys (hex) by key id.
    pub keys: BTreeMap<String, String>,
    pub roles: Roles,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Roles {
    pub root: Role,
    pub targets: Role,
    pub timestamp: Role,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = RootRole))]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Key ids, each listed in the root's `keys`.
    pub keyids: Vec<String>,
    /// Valid signatures by distinct keys of this role that are needed.
    pub threshold: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedRoot {
    pub signed: Root,
    pub signatures: Vec<DetachedSignature>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RootError {
    #[error("root document is not valid JSON for a signed root: {0}")]
    Json(String),
    #[error("root document is larger than {MAX_ROOT_BYTES} bytes")]
    TooLarge,
    #[error("root version {0} is not valid: versions start at 1")]
    Version(u64),
    #[error("root lists key id {listed} for a key whose id is {actual}")]
    KeyIdMismatch { listed: String, actual: String },
    #[error("root lists more than {MAX_ROOT_KEYS} keys")]
    TooManyKeys,
    #[error("root key {0}: not a valid ed25519 public key in hex")]
    BadKey(String),
    #[error("the {role} role names key {keyid}, which the root does not list")]
    UnknownRoleKey { role: &'static str, keyid: String },
    #[error("the {role} role lists key {keyid} twice")]
    DuplicateRoleKey { role: &'static str, keyid: String },
    #[error("the {role} role needs {threshold} signatures but has {keys} keys (and at least 1 is needed)")]
    Threshold { role: &'static str, threshold: u32, keys: usize },
    #[error("root {version} is signed by {valid} of the {whose} root keys; {threshold} are needed")]
    BelowThreshold { version: u64, whose: &'static str, valid: usize, threshold: u32 },
    #[error("root {version}: the signature by key {keyid} does not match the document: it was altered")]
    BadSignature { version: u64, keyid: String },
    #[error("root {found} cannot follow root {current}: each rotation raises the version by exactly one")]
    NotNext { current: u64, found: u64 },
    #[error("root {version} expired at {expires} (unix seconds) and it is now {now}")]
    Expired { version: u64, expires: u64, now: u64 },
}

impl Root {
    /// The bytes signatures cover.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        // A derived Serialize on strings, integers and maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Checks the document's own consistency: ids match keys, roles name listed keys once, and
    /// every threshold is between 1 and the role's key count.
    pub fn check(&self) -> Result<(), RootError> {
        if self.version == 0 {
            return Err(RootError::Version(0));
        }
        if self.keys.len() > MAX_ROOT_KEYS {
            return Err(RootError::TooManyKeys);
        }
        for (keyid, public) in &self.keys {
            let key = parse_public_key(public).map_err(|_| RootError::BadKey(keyid.clone()))?;
            let actual = KeyId::of(&key).to_string();
            if *keyid != actual {
                return Err(RootError::KeyIdMismatch { listed: keyid.clone(), actual });
            }
        }
        for (role, spec) in self.roles.named() {
            let mut seen = BTreeSet::new();
            for keyid in &spec.keyids {
                if !self.keys.contains_key(keyid) {
                    return Err(RootError::UnknownRoleKey { role, keyid: keyid.clone() });
                }
                if !seen.insert(keyid) {
                    return Err(RootError::DuplicateRoleKey { role, keyid: keyid.clone() });
                }
            }
            if spec.threshold == 0 || spec.threshold as usize > spec.keyids.len() {
                return Err(RootError::Threshold { role, threshold: spec.threshold, keys: spec.keyids.len() });
            }
        }
        Ok(())
    }

    /// The keys of one role and its threshold.
    fn role_keys(&self, role: &Role) -> TrustedKeys {
        let keys = role.keyids.iter().filter_map(|id| parse_public_key(self.keys.get(id)?).ok());
        TrustedKeys::new(keys).with_threshold(role.threshold as usize)
    }

    /// What bundles are checked against: the targets keys and their threshold.
    pub fn targets(&self) -> TrustedKeys {
        self.role_keys(&self.roles.targets)
    }

    /// The keys that may sign freshness metadata, and how many must.
    pub fn timestamp(&self) -> TrustedKeys {
        self.role_keys(&self.roles.timestamp)
    }
}

impl Roles {
    fn named(&self) -> [(&'static str, &Role); 3] {
        [("root", &self.root), ("targets", &self.targets), ("timestamp", &self.timestamp)]
    }
}

impl SignedRoot {
    /// Parses (bounded) and checks the document; signatures are not checked here.
    pub fn parse(bytes: &[u8]) -> Result<SignedRoot, RootError> {
        if bytes.len() > MAX_ROOT_BYTES {
            return Err(RootError::TooLarge);
        }
        let root: SignedRoot = serde_json::from_slice(bytes).map_err(|e| RootError::Json(e.to_string()))?;
        root.signed.check()?;
        Ok(root)
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Adds (or replaces) the signature of `key`.
    pub fn sign(&mut self, key: &SigningKey) {
        let signature = DetachedSignature::new(key, &self.signed.canonical_bytes());
        self.signatures.retain(|s| s.keyid != signature.keyid);
        self.signatures.push(signature);
    }

    /// Needs valid signatures by a threshold of distinct keys of `signer`'s root role. A
    /// signature by one of those keys that does not verify is an error: somebody altered the
    /// document.
    fn signed_by_threshold_of(&self, signer: &Root, whose: &'static str) -> Result<(), RootError> {
        let keys = signer.role_keys(&signer.roles.root);
        let version = self.signed.version;
        verify_threshold(&self.signed.canonical_bytes(), &self.signatures, &keys).map_err(|e| match e {
            ThresholdError::BadSignature { keyid } => RootError::BadSignature { version, keyid },
            ThresholdError::BelowThreshold { valid, .. } => {
                RootError::BelowThreshold { version, whose, valid, threshold: signer.roles.root.threshold }
            }
        })
    }

    /// The first root a device trusts (from its config): it must be signed by a threshold of its
    /// own root keys. Its expiry is not checked: it is what the device was flashed with.
    pub fn verify_initial(&self) -> Result<Root, RootError> {
        self.signed.check()?;
        self.signed_by_threshold_of(&self.signed, "its own")?;
        Ok(self.signed.clone())
    }
}

/// TUF's rotation rule: `next` replaces `current` only if its version is exactly one higher, a
/// threshold of `current`'s root keys signed it, a threshold of its own root keys signed it, and it
/// has not expired at `now` (unix seconds).
pub fn rotate(current: &Root, next: &SignedRoot, now: u64) -> Result<Root, RootError> {
    next.signed.check()?;
    let version = next.signed.version;
    if version != current.version + 1 {
        return Err(RootError::NotNext { current: current.version, found: version });
    }
    next.signed_by_threshold_of(current, "current")?;
    next.signed_by_threshold_of(&next.signed, "its own")?;
    if next.signed.expires <= now {
        return Err(RootError::Expired { version, expires: next.signed.expires, now });
    }
    Ok(next.signed.clone())
}

/// A root with one key per role, each role needing one signature, signed by its root key: what
/// the demo and tests start from.
pub fn single_key_root(
    root: &SigningKey,
    targets: &VerifyingKey,
    timestamp: &VerifyingKey,
    expires: u64,
) -> SignedRoot {
    let root_public = root.verifying_key();
    let entry = |key: &VerifyingKey| (KeyId::of(key).to_string(), crate::keys::public_key_hex(key));
    let role = |key: &VerifyingKey| Role { keyids: vec![KeyId::of(key).to_string()], threshold: 1 };
    let mut signed = SignedRoot {
        signed: Root {
            version: 1,
            expires,
            keys: [entry(&root_public), entry(targets), entry(timestamp)].into(),
            roles: Roles { root: role(&root_public), targets: role(targets), timestamp: role(timestamp) },
        },
        signatures: Vec::new(),
    };
    signed.sign(root);
    signed
}

#[cfg(test)]
#[path = "root_tests.rs"]
mod tests;
