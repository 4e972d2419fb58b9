//! The signed model bundle: one tar file holding `manifest.json`, the files it lists (at least
//! `model.onnx`) and detached signatures `signatures/<key-id>.sig` over the exact manifest bytes.
//!
//! Verification here covers what needs no model runtime, in this order: a signature by a trusted
//! key, then the manifest, then every file's size and sha256. The agent goes on to check the
//! contract against the loaded model and to replay the golden inputs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::drift::{DriftPolicy, FeatureDecl, FeatureKind, ReferenceProfile, SketchError};
use crate::keys::{KeyId, TrustedKeys};
use crate::names;

pub const MANIFEST_PATH: &str = "manifest.json";
pub const MODEL_PATH: &str = "model.onnx";
pub const SIGNATURE_DIR: &str = "signatures/";
/// Format 2 carries drift profiles (ADR 0011); format 1's decile sketches are not read.
pub const FORMAT_VERSION: u32 = 2;

/// Explicit size limits for reading an untrusted bundle.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_bundle_bytes: u64,
    pub max_manifest_bytes: u64,
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_bundle_bytes: 512 << 20, max_manifest_bytes: 4 << 20, max_entries: 64 }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub version: semver::Version,
    /// Unix seconds.
    pub created_at: u64,
    pub files: Vec<FileEntry>,
    pub contract: ModelContract,
    pub golden: GoldenSet,
    pub reference: ReferenceProfile,
    pub lineage: Lineage,
    /// The thresholds this model's drift is judged by (bundle metadata `[drift]`).
    #[serde(default, skip_serializing_if = "is_default_policy")]
    pub drift: DriftPolicy,
    /// The lowest version of this model a device may install once it has seen this manifest
    /// (ADR 0010): signed with the manifest, so only a release key can raise it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<semver::Version>,
    /// The devices this bundle is built for; empty means every device.
    #[serde(default, skip_serializing_if = "Targets::is_any")]
    pub targets: Targets,
    /// What a device does with this model after it has had no fresh signed instructions for a
    /// while (ADR 0010); the default when absent: 30 days' grace, then keep serving, flagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<crate::freshness::OfflinePolicy>,
}

/// The device class a bundle is bound to: every condition given must hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// CPU architectures as Rust names them (`std::env::consts::ARCH`: x86_64, aarch64, arm);
    /// empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arch: Vec<String>,
    /// Labels the device must carry with exactly these values (e.g. `accelerator = "npu"`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Targets {
    pub fn is_any(&self) -> bool {
        self.arch.is_empty() && self.labels.is_empty()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Values in one sample: the shape without its leading batch dimension.
    pub fn sample_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelContract {
    pub input: TensorSpec,
    pub output: TensorSpec,
    /// One name per input value of a sample (tabular models); empty for images.
    #[serde(default)]
    pub feature_names: Vec<String>,
    /// One label per output value (classes).
    #[serde(default)]
    pub output_labels: Vec<String>,
    /// Kinds of the input values (numeric or categorical, nullable or not); empty means every
    /// value is a numeric, required feature named by `feature_names`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<FeatureDecl>,
}

impl ModelContract {
    /// The declaration of every sketched feature: the declared ones, or one numeric feature per
    /// name in `feature_names`. Image models (no names) sketch no features.
    pub fn feature_decls(&self) -> Vec<FeatureDecl> {
        if !self.features.is_empty() {
            return self.features.clone();
        }
        self.feature_names.iter().map(|name| FeatureDecl::numeric(name)).collect()
    }

    /// Whether any input may be sent as `null`.
    pub fn has_nullable(&self) -> bool {
        self.features.iter().any(|f| f.nullable)
    }

    /// What the model receives for a missing value, by input index: the fill of a nullable
    /// feature (0 unless declared), None where a value is required. Empty without declarations.
    pub fn fills(&self) -> Vec<Option<f32>> {
        self.features.iter().map(|f| f.nullable.then(|| f.fill.unwrap_or(0.0))).collect()
    }

    /// Categorical features' declared category counts, by input index (0 for numeric ones).
    pub fn category_counts(&self) -> Vec<usize> {
        self.features.iter().map(|f| if f.kind == FeatureKind::Categorical { f.categories.len() } else { 0 }).collect()
    }
}

/// `row` with each missing (NaN) value replaced by its feature's fill; values without a fill
/// stay as they are (the caller has refused a missing required value before).
pub fn fill_missing(row: &[f32], fills: &[Option<f32>]) -> Vec<f32> {
    row.iter()
        .enumerate()
        .map(|(i, &v)| match fills.get(i).copied().flatten() {
            Some(fill) if v.is_nan() => fill,
            _ => v,
        })
        .collect()
}

fn is_default_policy(policy: &DriftPolicy) -> bool {
    *policy == DriftPolicy::default()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GoldenSet {
    /// Largest accepted absolute difference per output value.
    pub tolerance: f32,
    pub cases: Vec<GoldenCase>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GoldenCase {
    pub input: Vec<f32>,
    pub expected: Vec<f32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// sha256 of the training data snapshot.
    pub training_data: String,
    /// Commit of the training code.
    pub code_commit: String,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON for format {FORMAT_VERSION}: {0}")]
    Json(#[from] serde_json::Error),
    #[error("manifest format {0} is not supported (this build reads format {FORMAT_VERSION}); rebuild the bundle with this release's fleetctl")]
    Format(u32),
    #[error(transparent)]
    Name(#[from] names::InvalidName),
    #[error("manifest lists no {MODEL_PATH}")]
    NoModel,
    #[error("manifest file path {0:?} is not a plain file name")]
    BadPath(String),
    #[error("manifest lists {0:?} twice")]
    DuplicatePath(String),
    #[error("golden case {case} has {got} input values; the contract input takes {want}")]
    GoldenInputLen { case: usize, got: usize, want: usize },
    #[error("golden case {case} has {got} expected values; the contract output gives {want}")]
    GoldenOutputLen { case: usize, got: usize, want: usize },
    #[error("manifest version {version} is below its own floor {floor}")]
    BelowOwnFloor { version: String, floor: String },
    #[error("manifest targets architecture {0:?}, which is not an architecture name")]
    BadArch(String),
    #[error("the contract declares {got} features; the model input takes {want} values")]
    FeatureCount { got: usize, want: usize },
    #[error("manifest drift profile or thresholds are invalid: {0}")]
    Drift(#[from] SketchError),
}

impl Manifest {
    /// Parses and checks the manifest's own consistency (names, paths, golden case sizes).
    /// A manifest for one model file with no golden cases, an empty reference and no lineage:
    /// the starting point of every builder, which then fills in what it has.
    pub fn for_model(name: &str, version: semver::Version, model: &[u8], contract: ModelContract) -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            name: name.to_string(),
            version,
            created_at: 0,
            files: vec![file_entry(MODEL_PATH, model)],
            contract,
            golden: GoldenSet { tolerance: 0.0, cases: Vec::new() },
            reference: ReferenceProfile::default(),
            lineage: Lineage::default(),
            drift: DriftPolicy::default(),
            floor: None,
            targets: Targets::default(),
            offline: None,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        // The format first: a manifest of another format would otherwise fail on its first
        // unknown field, with a message that hides the reason.
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let Format { format } = serde_json::from_slice(bytes)?;
        if format != FORMAT_VERSION {
            return Err(ManifestError::Format(format));
        }
        let manifest: Manifest = serde_json::from_slice(bytes)?;
        manifest.check()?;
        Ok(manifest)
    }

    pub fn check(&self) -> Result<(), ManifestError> {
        if self.format != FORMAT_VERSION {
            return Err(ManifestError::Format(self.format));
        }
        names::validate("model name", &self.name)?;
        let mut seen = BTreeSet::new();
        for file in &self.files {
            if !is_plain_file_name(&file.path) || file.path == MANIFEST_PATH {
                return Err(ManifestError::BadPath(file.path.clone()));
            }
            if !seen.insert(file.path.as_str()) {
                return Err(ManifestError::DuplicatePath(file.path.clone()));
            }
        }
        if !seen.contains(MODEL_PATH) {
            return Err(ManifestError::NoModel);
        }
        if let Some(floor) = self.floor.as_ref().filter(|floor| **floor > self.version) {
            return Err(ManifestError::BelowOwnFloor { version: self.version.to_string(), floor: floor.to_string() });
        }
        if let Some(arch) = self.targets.arch.iter().find(|a| names::validate("architecture", a).is_err()) {
            return Err(ManifestError::BadArch(arch.clone()));
        }
        let (want_in, want_out) = (self.contract.input.sample_len(), self.contract.output.sample_len());
        let features = &self.contract.features;
        if !features.is_empty() && features.len() != want_in {
            return Err(ManifestError::FeatureCount { got: features.len(), want: want_in });
        }
        features.iter().enumerate().try_for_each(|(i, f)| f.check(i))?;
        self.reference.check()?;
        let layout = &self.reference.layout;
        if !layout.features.is_empty() || layout.classes != 0 {
            let declared: Vec<String> = self.contract.feature_decls().into_iter().map(|f| f.name).collect();
            let sketched: Vec<&str> = layout.features.iter().map(|f| f.name()).collect();
            if declared != sketched || layout.classes != want_out {
                return Err(SketchError::LayoutMismatch("reference features or classes against the contract").into());
            }
        }
        self.drift.check()?;
        for (case, golden) in self.golden.cases.iter().enumerate() {
            if golden.input.len() != want_in {
                return Err(ManifestError::GoldenInputLen { case, got: golden.input.len(), want: want_in });
            }
            if golden.expected.len() != want_out {
                return Err(ManifestError::GoldenOutputLen { case, got: golden.expected.len(), want: want_out });
            }
        }
        Ok(())
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        // A derived Serialize on plain data cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// A file name with no directory part: what a bundle may carry besides manifest and signatures.
fn is_plain_file_name(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 128
        && path != "."
        && path != ".."
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn file_entry(path: &str, bytes: &[u8]) -> FileEntry {
    FileEntry { path: path.to_string(), size: bytes.len() as u64, sha256: sha256_hex(bytes) }
}

/// A bundle as read from bytes: nothing in it is trusted yet.
#[derive(Clone, Debug, Default)]
pub struct UnverifiedBundle {
    pub manifest_bytes: Vec<u8>,
    pub signatures: BTreeMap<KeyId, Vec<u8>>,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// A bundle whose signature and file digests checked out.
#[derive(Clone, Debug)]
pub struct VerifiedBundle {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub signed_by: KeyId,
    pub signatures: BTreeMap<KeyId, Vec<u8>>,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl VerifiedBundle {
    pub fn model_bytes(&self) -> &[u8] {
        // check() guarantees the manifest lists model.onnx and verify() that every listed file is present.
        self.files.get(MODEL_PATH).map(Vec::as_slice).unwrap_or_default()
    }
}

#[derive(Debug, Error)]
pub enum ArchiveError {
    #[error("bundle is larger than the {limit}-byte limit")]
    TooLarge { limit: u64 },
    #[error("bundle is not a readable tar archive: {0}")]
    Tar(String),
    #[error("bundle holds more than {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("bundle entry {0:?} is not a regular file with a plain name (links, directories and paths are refused)")]
    UnsafeEntry(String),
    #[error("bundle entry {path:?} is larger than its {limit}-byte limit")]
    EntryTooLarge { path: String, limit: u64 },
    #[error("bundle holds {0:?} twice")]
    Duplicate(String),
    #[error("signature file {0:?} is not named signatures/<16-hex-key-id>.sig")]
    BadSignatureName(String),
    #[error("bundle has no {MANIFEST_PATH}")]
    NoManifest,
}

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("bundle carries no signature")]
    MissingSignature,
    #[error(
        "bundle is signed only by untrusted key(s) {0}; add the signer's public key to the trusted keys or re-sign"
    )]
    UntrustedSigner(String),
    #[error("bundle is signed by {valid} trusted key(s); {threshold} are needed")]
    BelowThreshold { valid: usize, threshold: usize },
    #[error("signature by trusted key {key_id} does not match the manifest: the manifest or signature was altered")]
    BadSignature { key_id: KeyId },
    #[error("signed manifest is invalid: {0}")]
    Manifest(#[from] ManifestError),
    #[error("file {0:?} listed in the manifest is missing from the bundle")]
    MissingFile(String),
    #[error("file {0:?} is in the bundle but not in the signed manifest")]
    UnlistedFile(String),
    #[error("file {path:?} is {actual} bytes; the manifest says {expected}")]
    SizeMismatch { path: String, expected: u64, actual: u64 },
    #[error("file {path:?} has sha256 {actual}; the manifest says {expected}: the file was altered")]
    DigestMismatch { path: String, expected: String, actual: String },
}

/// Reads a bundle from bytes with limits; accepts only regular files with plain names.
pub fn read_archive(bytes: &[u8], limits: &Limits) -> Result<UnverifiedBundle, ArchiveError> {
    if bytes.len() as u64 > limits.max_bundle_bytes {
        return Err(ArchiveError::TooLarge { limit: limits.max_bundle_bytes });
    }
    read_archive_from(bytes, limits)
}

/// Reads a bundle from a stream (a file on the device) with the same limits, holding each entry
/// once: the archive itself is never in memory whole.
pub fn read_archive_from(reader: impl Read, limits: &Limits) -> Result<UnverifiedBundle, ArchiveError> {
    let mut limited = reader.take(limits.max_bundle_bytes + 1);
    let read = read_entries(&mut limited, limits);
    if limited.limit() == 0 {
        return Err(ArchiveError::TooLarge { limit: limits.max_bundle_bytes });
    }
    read
}

fn read_entries(reader: impl Read, limits: &Limits) -> Result<UnverifiedBundle, ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|e| ArchiveError::Tar(e.to_string()))?;
    let mut bundle = UnverifiedBundle::default();
    let mut manifest = None;
    for (index, entry) in entries.enumerate() {
        if index >= limits.max_entries {
            return Err(ArchiveError::TooManyEntries { limit: limits.max_entries });
        }
        let mut entry = entry.map_err(|e| ArchiveError::Tar(e.to_string()))?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if !entry.header().entry_type().is_file() {
            return Err(ArchiveError::UnsafeEntry(path));
        }
        let limit = if path == MANIFEST_PATH { limits.max_manifest_bytes } else { limits.max_bundle_bytes };
        let mut data = Vec::new();
        (&mut entry).take(limit + 1).read_to_end(&mut data).map_err(|e| ArchiveError::Tar(e.to_string()))?;
        if data.len() as u64 > limit {
            return Err(ArchiveError::EntryTooLarge { path, limit });
        }
        if path == MANIFEST_PATH {
            if manifest.replace(data).is_some() {
                return Err(ArchiveError::Duplicate(path));
            }
        } else if let Some(name) = path.strip_prefix(SIGNATURE_DIR) {
            let key_id = name
                .strip_suffix(".sig")
                .and_then(|id| KeyId::parse(id).ok())
                .ok_or_else(|| ArchiveError::BadSignatureName(path.clone()))?;
            if bundle.signatures.insert(key_id, data).is_some() {
                return Err(ArchiveError::Duplicate(path));
            }
        } else if !is_plain_file_name(&path) {
            return Err(ArchiveError::UnsafeEntry(path));
        } else if bundle.files.insert(path.clone(), data).is_some() {
            return Err(ArchiveError::Duplicate(path));
        }
    }
    bundle.manifest_bytes = manifest.ok_or(ArchiveError::NoManifest)?;
    Ok(bundle)
}

impl UnverifiedBundle {
    /// Signature first (over the exact manifest bytes), then the manifest, then every file.
    pub fn verify(self, trusted: &TrustedKeys) -> Result<VerifiedBundle, VerifyError> {
        let signed_by = verify_signatures(&self.manifest_bytes, &self.signatures, trusted)?;
        let manifest = Manifest::parse(&self.manifest_bytes)?;
        verify_files(&manifest, &self.files)?;
        Ok(VerifiedBundle {
            manifest,
            manifest_bytes: self.manifest_bytes,
            signed_by,
            signatures: self.signatures,
            files: self.files,
        })
    }
}

/// Accepts when valid signatures by at least `trusted.threshold()` distinct trusted keys cover the
/// manifest bytes. A bad signature by a trusted key is an error even when others are good: it
/// means somebody altered something. Signatures by keys not trusted (unknown or revoked) count for
/// nothing. Returns the first trusted signer.
pub fn verify_signatures(
    manifest_bytes: &[u8],
    signatures: &BTreeMap<KeyId, Vec<u8>>,
    trusted: &TrustedKeys,
) -> Result<KeyId, VerifyError> {
    if signatures.is_empty() {
        return Err(VerifyError::MissingSignature);
    }
    let mut good = Vec::new();
    for (key_id, sig_bytes) in signatures {
        let Some(key) = trusted.get(key_id) else {
            continue;
        };
        let signature = Signature::from_slice(sig_bytes).map_err(|_| VerifyError::BadSignature { key_id: *key_id })?;
        key.verify_strict(manifest_bytes, &signature).map_err(|_| VerifyError::BadSignature { key_id: *key_id })?;
        good.push(*key_id);
    }
    let Some(first) = good.first() else {
        let ids: Vec<String> = signatures.keys().map(|k| k.to_string()).collect();
        return Err(VerifyError::UntrustedSigner(ids.join(", ")));
    };
    if good.len() < trusted.threshold() {
        return Err(VerifyError::BelowThreshold { valid: good.len(), threshold: trusted.threshold() });
    }
    Ok(*first)
}

pub fn verify_files(manifest: &Manifest, files: &BTreeMap<String, Vec<u8>>) -> Result<(), VerifyError> {
    for entry in &manifest.files {
        let data = files.get(&entry.path).ok_or_else(|| VerifyError::MissingFile(entry.path.clone()))?;
        if data.len() as u64 != entry.size {
            return Err(VerifyError::SizeMismatch {
                path: entry.path.clone(),
                expected: entry.size,
                actual: data.len() as u64,
            });
        }
        let actual = sha256_hex(data);
        if actual != entry.sha256 {
            return Err(VerifyError::DigestMismatch {
                path: entry.path.clone(),
                expected: entry.sha256.clone(),
                actual,
            });
        }
    }
    if let Some(extra) = files.keys().find(|p| !manifest.files.iter().any(|e| &e.path == *p)) {
        return Err(VerifyError::UnlistedFile(extra.clone()));
    }
    Ok(())
}

/// Writes a bundle archive: manifest first, then files, then signatures; fixed mtime and mode so
/// the same inputs give the same bytes.
pub fn write_archive(
    manifest_bytes: &[u8],
    files: &BTreeMap<String, Vec<u8>>,
    signatures: &BTreeMap<KeyId, Vec<u8>>,
) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut append = |path: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        // Writing into a Vec cannot fail; names are checked plain names shorter than 100 bytes.
        let _ = builder.append_data(&mut header, path, data);
    };
    append(MANIFEST_PATH, manifest_bytes);
    for (path, data) in files {
        append(path, data);
    }
    for (key_id, sig) in signatures {
        append(&format!("{SIGNATURE_DIR}{key_id}.sig"), sig);
    }
    builder.into_inner().unwrap_or_default()
}

/// Adds (or replaces) the signature of `key` over the bundle's manifest bytes.
pub fn add_signature(bundle: &mut UnverifiedBundle, key: &ed25519_dalek::SigningKey) -> KeyId {
    let key_id = KeyId::of(&key.verifying_key());
    let signature = crate::keys::sign(key, &bundle.manifest_bytes);
    bundle.signatures.insert(key_id, signature.to_bytes().to_vec());
    key_id
}

#[cfg(test)]
#[path = "bundle_tests.rs"]
mod tests;
