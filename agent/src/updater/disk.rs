//! On-disk layout of installed models and the atomic switch.
//!
//! ```text
//! <data>/models/<name>/versions/<version>/   manifest.json, model.onnx, signatures/<key>.sig
//! <data>/models/<name>/current  -> versions/<version>     (the serving version)
//! <data>/models/<name>/previous -> versions/<version>     (kept for rollback)
//! <data>/downloads/<name>-<version>.bundle[.part]
//! ```
//! A version directory is written as `<version>.staging` and renamed into place; `current` is
//! switched by renaming a fresh symlink over it, which is atomic on POSIX file systems. Every load
//! re-verifies signatures and digests, so a file altered on disk never runs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use proto::bundle::{Limits, UnverifiedBundle, VerifiedBundle, MANIFEST_PATH, SIGNATURE_DIR};
use proto::{KeyId, TrustedKeys};
use thiserror::Error;

use crate::inference::{LoadedModel, ModelError};

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("installed bundle {path} failed verification: {source}")]
    Verify { path: PathBuf, source: proto::VerifyError },
    #[error("installed bundle {path} holds {found}: a version directory must hold the version it is named after")]
    Misplaced { path: PathBuf, found: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// An installed version read back from disk, verified and loaded.
pub struct Installed {
    pub manifest: proto::Manifest,
    pub model: LoadedModel,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DiskError + 'a {
    move |source| DiskError::Io { action, path: path.to_path_buf(), source }
}

#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(data_dir: &Path) -> Layout {
        Layout { root: data_dir.to_path_buf() }
    }

    pub fn model_dir(&self, name: &str) -> PathBuf {
        self.root.join("models").join(name)
    }

    pub fn version_dir(&self, name: &str, version: &str) -> PathBuf {
        self.model_dir(name).join("versions").join(version)
    }

    /// Where a version is written before it is renamed into place: `versions/<version>.staging`.
    /// Never a name another version can have: versions never end in `.staging` (semver build
    /// metadata is `+...`, and a prerelease ending in `.staging` would still differ by this suffix).
    pub fn staging_dir(&self, name: &str, version: &str) -> PathBuf {
        self.model_dir(name).join("versions").join(format!("{version}.staging"))
    }

    pub fn download_path(&self, name: &str, version: &str) -> PathBuf {
        self.root.join("downloads").join(format!("{name}-{version}.bundle"))
    }

    /// Removes a version's finished and partial download (after it failed or was installed).
    pub fn remove_download(&self, name: &str, version: &str) {
        let path = self.download_path(name, version);
        let _ = std::fs::remove_file(path.with_extension("bundle.part"));
        let _ = std::fs::remove_file(path);
    }

    /// Removes every download but those of `keep` (the versions still being downloaded), so an
    /// abandoned one does not hold disk forever. Returns the files removed.
    pub fn remove_abandoned_downloads(&self, keep: &[(String, String)]) -> Vec<PathBuf> {
        let kept: Vec<PathBuf> = keep
            .iter()
            .flat_map(|(n, v)| {
                let path = self.download_path(n, v);
                [path.with_extension("bundle.part"), path]
            })
            .collect();
        let Ok(entries) = std::fs::read_dir(self.root.join("downloads")) else { return Vec::new() };
        let mut removed = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            if !kept.contains(&path) && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
        removed
    }

    fn link(&self, name: &str, which: &str) -> PathBuf {
        self.model_dir(name).join(which)
    }

    /// The version a link (`current` or `previous`) points to.
    pub fn linked_version(&self, name: &str, which: &str) -> Option<String> {
        let target = fs::read_link(self.link(name, which)).ok()?;
        target.file_name()?.to_str().map(str::to_string)
    }

    pub fn current(&self, name: &str) -> Option<String> {
        self.linked_version(name, "current")
    }

    /// Model names that have a `current` link.
    pub fn installed(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.root.join("models")) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| self.current(name).is_some())
            .collect();
        names.sort();
        names
    }

    /// Writes a verified bundle into `versions/<version>` via a staging directory.
    pub fn stage(&self, bundle: &VerifiedBundle) -> Result<PathBuf, DiskError> {
        let name = &bundle.manifest.name;
        let version = bundle.manifest.version.to_string();
        let final_dir = self.version_dir(name, &version);
        let staging = self.staging_dir(name, &version);
        remove_dir_if_present(&staging)?;
        remove_dir_if_present(&final_dir)?;
        fs::create_dir_all(staging.join(SIGNATURE_DIR)).map_err(io("create", &staging))?;
        write_synced(&staging.join(MANIFEST_PATH), &bundle.manifest_bytes)?;
        for (path, data) in &bundle.files {
            write_synced(&staging.join(path), data)?;
        }
        for (key_id, sig) in &bundle.signatures {
            write_synced(&staging.join(SIGNATURE_DIR).join(format!("{key_id}.sig")), sig)?;
        }
        fs::rename(&staging, &final_dir).map_err(io("rename staging to", &final_dir))?;
        sync_dir(final_dir.parent().unwrap_or(&final_dir))?;
        Ok(final_dir)
    }

    /// Reads an installed version back, verifies it, checks that it is the model and version its
    /// directory says, and loads the model (contract checked).
    pub fn load(
        &self,
        name: &str,
        version: &str,
        trusted: &TrustedKeys,
        limits: &Limits,
    ) -> Result<Installed, DiskError> {
        let dir = self.version_dir(name, version);
        let bundle = read_dir_bundle(&dir, limits)?;
        let verified = bundle.verify(trusted).map_err(|source| DiskError::Verify { path: dir.clone(), source })?;
        let manifest = &verified.manifest;
        if manifest.name != name || manifest.version.to_string() != version {
            return Err(DiskError::Misplaced { path: dir, found: format!("{} {}", manifest.name, manifest.version) });
        }
        let model = LoadedModel::load(manifest, verified.model_bytes())?;
        Ok(Installed { manifest: verified.manifest, model })
    }

    /// Points `current` at `version`, keeping the old target as `previous`. Returns the old one.
    pub fn activate(&self, name: &str, version: &str) -> Result<Option<String>, DiskError> {
        let old = self.current(name);
        if let Some(old) = old.as_deref().filter(|old| *old != version) {
            self.point(name, "previous", old)?;
        }
        self.point(name, "current", version)?;
        Ok(old)
    }

    /// Atomically (re)points a link by renaming a fresh symlink over it.
    fn point(&self, name: &str, which: &str, version: &str) -> Result<(), DiskError> {
        let link = self.link(name, which);
        let tmp = self.link(name, &format!("{which}.new"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("versions").join(version), &tmp).map_err(io("create link", &tmp))?;
        fs::rename(&tmp, &link).map_err(io("switch link", &link))?;
        sync_dir(&self.model_dir(name))
    }

    /// Points `shadow` at the candidate running in shadow, or removes the link (None). The link
    /// only keeps the version's directory from garbage collection; what runs in shadow is what
    /// the server asks for at each check-in.
    pub fn set_shadow(&self, name: &str, version: Option<&str>) -> Result<(), DiskError> {
        match version {
            Some(version) => self.point(name, "shadow", version),
            None => match fs::remove_file(self.link(name, "shadow")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(DiskError::Io { action: "remove", path: self.link(name, "shadow"), source: e })
                }
                _ => Ok(()),
            },
        }
    }

    /// Removes versions other than `current`, `previous` and `shadow`, and leftover staging
    /// directories.
    pub fn collect_garbage(&self, name: &str) -> Result<(), DiskError> {
        let keep: Vec<String> =
            ["current", "previous", "shadow"].iter().filter_map(|w| self.linked_version(name, w)).collect();
        let versions = self.model_dir(name).join("versions");
        let Ok(entries) = fs::read_dir(&versions) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&file_name) {
                remove_dir_if_present(&entry.path())?;
            }
        }
        Ok(())
    }
}

fn remove_dir_if_present(path: &Path) -> Result<(), DiskError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(DiskError::Io { action: "remove", path: path.into(), source: e })
        }
        _ => Ok(()),
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), DiskError> {
    let mut file = fs::File::create(path).map_err(io("create", path))?;
    file.write_all(data).map_err(io("write", path))?;
    file.sync_all().map_err(io("sync", path))
}

fn sync_dir(path: &Path) -> Result<(), DiskError> {
    fs::File::open(path).and_then(|d| d.sync_all()).map_err(io("sync", path))
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, DiskError> {
    let len = fs::metadata(path).map_err(io("stat", path))?.len();
    if len > limit {
        return Err(DiskError::Io {
            action: "read",
            path: path.into(),
            source: std::io::Error::other(format!("file is {len} bytes, over the {limit}-byte limit")),
        });
    }
    fs::read(path).map_err(io("read", path))
}

/// Reads an installed version directory as an (unverified) bundle.
fn read_dir_bundle(dir: &Path, limits: &Limits) -> Result<UnverifiedBundle, DiskError> {
    let manifest_bytes = read_limited(&dir.join(MANIFEST_PATH), limits.max_manifest_bytes)?;
    let mut files = BTreeMap::new();
    let mut signatures = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(io("list", dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name == MANIFEST_PATH || path.is_dir() {
            continue;
        }
        files.insert(name, read_limited(&path, limits.max_bundle_bytes)?);
    }
    let sig_dir = dir.join(SIGNATURE_DIR);
    for entry in fs::read_dir(&sig_dir).map_err(io("list", &sig_dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(key_id) = name.strip_suffix(".sig").and_then(|id| KeyId::parse(id).ok()) {
            signatures.insert(key_id, read_limited(&entry.path(), 1024)?);
        }
    }
    Ok(UnverifiedBundle { manifest_bytes, signatures, files })
}

#[cfg(test)]
mod tests {
    use proto::bundle::{DType, Manifest, ModelContract, TensorSpec, MODEL_PATH};
    use proto::KeyId;

    use super::*;

    fn bundle(version: &str) -> VerifiedBundle {
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DType::F32, shape: vec![1, 2] };
        let contract = ModelContract {
            input: spec("in"),
            output: spec("out"),
            feature_names: vec![],
            output_labels: vec![],
            features: vec![],
        };
        let manifest = Manifest::for_model("m", semver::Version::parse(version).unwrap(), b"model", contract);
        VerifiedBundle {
            manifest_bytes: manifest.to_json_bytes(),
            manifest,
            signed_by: KeyId::parse("0102030405060708").unwrap(),
            signatures: BTreeMap::new(),
            files: [(MODEL_PATH.to_string(), b"model".to_vec())].into(),
        }
    }

    #[test]
    fn a_version_stages_in_its_full_name_with_a_staging_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert_eq!(layout.staging_dir("m", "2.0.0"), dir.path().join("models/m/versions/2.0.0.staging"));
        assert_eq!(layout.staging_dir("m", "1.0.0-rc.1"), dir.path().join("models/m/versions/1.0.0-rc.1.staging"));
    }

    #[test]
    fn staging_a_prerelease_never_deletes_an_installed_version_whose_name_looks_like_its_staging_dir() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        // `1.0.0-rc.staging` is a valid version; `1.0.0-rc.1` once staged in a directory of that name.
        let kept = layout.stage(&bundle("1.0.0-rc.staging")).unwrap();
        layout.stage(&bundle("1.0.0-rc.1")).unwrap();
        assert!(kept.join(MODEL_PATH).is_file(), "staging 1.0.0-rc.1 removed installed version 1.0.0-rc.staging");
        assert!(layout.version_dir("m", "1.0.0-rc.1").join(MODEL_PATH).is_file());
    }

    #[test]
    fn a_version_directory_holding_another_version_is_refused_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let key = proto::keys::SigningKey::from_bytes(&[5; 32]);
        let trusted = TrustedKeys::new([key.verifying_key()]);
        let staged = bundle("1.0.0");
        let mut unverified = UnverifiedBundle {
            manifest_bytes: staged.manifest_bytes,
            signatures: BTreeMap::new(),
            files: staged.files,
        };
        proto::bundle::add_signature(&mut unverified, &key);
        layout.stage(&unverified.verify(&trusted).unwrap()).unwrap();
        // A validly signed 1.0.0 moved to where 2.0.0 belongs.
        std::fs::rename(layout.version_dir("m", "1.0.0"), layout.version_dir("m", "2.0.0")).unwrap();
        match layout.load("m", "2.0.0", &trusted, &Limits::default()) {
            Err(DiskError::Misplaced { found, .. }) => assert_eq!(found, "m 1.0.0"),
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("a misplaced version was loaded"),
        }
    }
}
