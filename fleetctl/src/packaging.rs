//! `fleetctl bundle build`: turns an .onnx file and a metadata TOML into an unsigned bundle.
//! Before packaging it loads the model with the same engine the agent uses, checks the contract,
//! replays the golden cases and computes the drift reference from the reference rows, so a bundle
//! that would fail on devices fails here first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use model_runtime::{reference_profile, LoadedModel, ModelError};
use proto::bundle::{
    DType, GoldenCase, GoldenSet, Lineage, Manifest, ModelContract, Targets, TensorSpec, UnverifiedBundle, MODEL_PATH,
};
use proto::drift::{DriftPolicy, FeatureDecl};
use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PackagingError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("metadata {path} is invalid: {message}")]
    Metadata { path: PathBuf, message: String },
    #[error("golden file {path} is invalid: {message}")]
    Golden { path: PathBuf, message: String },
    #[error("reference file {path} line {line}: {message}")]
    Reference { path: PathBuf, line: usize, message: String },
    #[error("version {0:?} is not a semantic version like 1.2.0")]
    Version(String),
    #[error(transparent)]
    Manifest(#[from] proto::bundle::ManifestError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Table(#[from] crate::table::TableError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleMetadata {
    pub name: String,
    pub version: String,
    pub contract: ContractMetadata,
    pub golden: GoldenMetadata,
    #[serde(default)]
    pub reference: Option<ReferenceMetadata>,
    #[serde(default)]
    pub lineage: Lineage,
    /// The lowest version of this model devices may install once they have seen this bundle.
    #[serde(default)]
    pub floor: Option<String>,
    /// The devices the bundle is for (`arch = ["aarch64"]`, `labels = { accelerator = "npu" }`).
    #[serde(default)]
    pub targets: Targets,
    /// What devices do with the model after `grace_days` without fresh signed instructions:
    /// `on_stale = "keep_serving"` (answers flagged stale) or `"stop_serving"`.
    #[serde(default)]
    pub offline: Option<proto::freshness::OfflinePolicy>,
    /// Thresholds this model's drift is judged by; Evidently-like defaults when absent.
    #[serde(default)]
    pub drift: Option<DriftPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractMetadata {
    pub input: TensorMetadata,
    pub output: TensorMetadata,
    #[serde(default)]
    pub feature_names: Vec<String>,
    #[serde(default)]
    pub output_labels: Vec<String>,
    /// `[[contract.features]]`: each input's kind (numeric, or categorical with its
    /// categories in code order), whether it may be null, and its fill.
    #[serde(default)]
    pub features: Vec<FeatureDecl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorMetadata {
    pub name: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenMetadata {
    /// JSON file `{"cases": [{"input": [...], "expected": [...]}, ...]}`, relative to the metadata.
    pub file: PathBuf,
    pub tolerance: f32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceMetadata {
    /// CSV of input rows the drift reference is computed from: numbers only without a header
    /// (one column per input), or with a header naming the contract's features, categorical
    /// columns holding category names; an empty cell is a missing value.
    pub file: PathBuf,
}

#[derive(Deserialize)]
struct GoldenFile {
    cases: Vec<GoldenCase>,
}

/// Everything `build` needs, already read from disk.
pub struct BuildInputs {
    pub model: Vec<u8>,
    pub metadata: BundleMetadata,
    pub golden: Vec<GoldenCase>,
    pub reference_rows: Vec<Vec<f32>>,
    pub created_at: u64,
}

fn read(path: &Path) -> Result<Vec<u8>, PackagingError> {
    std::fs::read(path).map_err(|source| PackagingError::Read { path: path.into(), source })
}

/// Reads the model, metadata and the files the metadata names.
pub fn read_inputs(model_path: &Path, metadata_path: &Path, created_at: u64) -> Result<BuildInputs, PackagingError> {
    let model = read(model_path)?;
    let text = String::from_utf8_lossy(&read(metadata_path)?).into_owned();
    let metadata: BundleMetadata = toml::from_str(&text)
        .map_err(|e| PackagingError::Metadata { path: metadata_path.into(), message: e.message().to_string() })?;
    let base = metadata_path.parent().unwrap_or(Path::new("."));
    let golden_path = base.join(&metadata.golden.file);
    let golden: GoldenFile = serde_json::from_slice(&read(&golden_path)?)
        .map_err(|e| PackagingError::Golden { path: golden_path.clone(), message: e.to_string() })?;
    let reference_rows = match &metadata.reference {
        Some(reference) => {
            let path = base.join(&reference.file);
            reference_rows(&path, &String::from_utf8_lossy(&read(&path)?), &metadata.contract)?
        }
        None => Vec::new(),
    };
    Ok(BuildInputs { model, metadata, golden: golden.cases, reference_rows, created_at })
}

/// Reference rows as the engine takes them (NaN where missing, category codes), from a CSV with
/// a header naming the contract's features or, without one, numbers only in input order.
pub fn reference_rows(path: &Path, text: &str, contract: &ContractMetadata) -> Result<Vec<Vec<f32>>, PackagingError> {
    let first_cell = text.lines().find(|l| !l.trim().is_empty()).and_then(|l| l.split(',').next()).unwrap_or("");
    if first_cell.trim().is_empty() || first_cell.trim().parse::<f32>().is_ok() {
        return parse_csv(path, text);
    }
    let decls = if contract.features.is_empty() {
        contract.feature_names.iter().map(|n| FeatureDecl::numeric(n)).collect()
    } else {
        contract.features.clone()
    };
    let table = crate::table::parse(path, text)?;
    let rows = table.encode(path, &decls, "the contract")?;
    // A category name outside the declared ones is a mistake in reference data, not drift.
    for (i, decl) in decls.iter().enumerate().filter(|(_, d)| !d.categories.is_empty()) {
        if let Some(line) = rows.iter().position(|r| r[i] as usize >= decl.categories.len() && !r[i].is_nan()) {
            let message = format!("feature {:?} holds a category its contract does not declare", decl.name);
            return Err(PackagingError::Reference { path: path.into(), line: line + 2, message });
        }
    }
    Ok(rows)
}

/// Numbers only, one row per line, an empty cell a missing value.
pub fn parse_csv(path: &Path, text: &str) -> Result<Vec<Vec<f32>>, PackagingError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            line.split(',')
                .map(|v| match v.trim() {
                    "" => Ok(f32::NAN),
                    v => v.parse::<f32>(),
                })
                .collect::<Result<Vec<f32>, _>>()
                .map_err(|e| PackagingError::Reference { path: path.into(), line: i + 1, message: e.to_string() })
        })
        .collect()
}

/// Builds the manifest and files of an unsigned bundle.
pub fn build(inputs: BuildInputs) -> Result<UnverifiedBundle, PackagingError> {
    let meta = &inputs.metadata;
    let version = semver::Version::parse(&meta.version).map_err(|_| PackagingError::Version(meta.version.clone()))?;
    let spec = |t: &TensorMetadata| TensorSpec { name: t.name.clone(), dtype: DType::F32, shape: t.shape.clone() };
    let contract = ModelContract {
        input: spec(&meta.contract.input),
        output: spec(&meta.contract.output),
        feature_names: meta.contract.feature_names.clone(),
        output_labels: meta.contract.output_labels.clone(),
        features: meta.contract.features.clone(),
    };
    let floor = meta
        .floor
        .as_deref()
        .map(|text| semver::Version::parse(text).map_err(|_| PackagingError::Version(text.to_string())))
        .transpose()?;
    let mut manifest = Manifest {
        created_at: inputs.created_at,
        floor,
        targets: meta.targets.clone(),
        offline: meta.offline,
        golden: GoldenSet { tolerance: meta.golden.tolerance, cases: inputs.golden },
        lineage: meta.lineage.clone(),
        drift: meta.drift.unwrap_or_default(),
        ..Manifest::for_model(&meta.name, version, &inputs.model, contract)
    };
    manifest.check()?;
    let loaded = LoadedModel::load(&manifest, &inputs.model)?;
    loaded.self_test()?;
    let width = manifest.contract.input.sample_len();
    if let Some((line, row)) = inputs.reference_rows.iter().enumerate().find(|(_, r)| r.len() != width) {
        return Err(PackagingError::Reference {
            path: PathBuf::from("reference"),
            line: line + 1,
            message: format!("{} values, the model input takes {width}", row.len()),
        });
    }
    manifest.reference = reference_profile(&loaded, &inputs.reference_rows)?;
    manifest.check()?;
    Ok(UnverifiedBundle {
        manifest_bytes: manifest.to_json_bytes(),
        signatures: BTreeMap::new(),
        files: [(MODEL_PATH.to_string(), inputs.model)].into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
    }

    #[test]
    fn the_fixture_metadata_builds_a_bundle_with_a_reference_sketch() {
        let inputs = read_inputs(&fixture("models/mlp.onnx"), &fixture("bundles/tabular.toml"), 1).unwrap();
        let bundle = build(inputs).unwrap();
        let manifest = Manifest::parse(&bundle.manifest_bytes).unwrap();
        assert_eq!(manifest.reference.layout.features.len(), 8);
        assert_eq!(manifest.reference.sketch.rows, 4000);
        assert_eq!(manifest.golden.cases.len(), 4);
    }

    #[test]
    fn a_model_that_breaks_the_declared_contract_is_not_packaged() {
        let inputs = read_inputs(&fixture("models/broken.onnx"), &fixture("bundles/tabular.toml"), 1).unwrap();
        let err = build(inputs).unwrap_err();
        assert!(err.to_string().contains("breaks its contract"), "{err}");
    }

    #[test]
    fn declared_features_and_drift_thresholds_reach_the_manifest_and_string_categories_their_codes() {
        let mut inputs = read_inputs(&fixture("models/mlp.onnx"), &fixture("bundles/tabular.toml"), 1).unwrap();
        let mut features: Vec<FeatureDecl> =
            inputs.metadata.contract.feature_names.iter().map(|n| FeatureDecl::numeric(n)).collect();
        features[7] = FeatureDecl::categorical("load", &["low", "mid", "high"]).nullable();
        inputs.metadata.contract.features = features.clone();
        inputs.metadata.drift = Some(DriftPolicy { wasserstein: 0.3, persist_windows: 5, ..DriftPolicy::default() });
        let header = inputs.metadata.contract.feature_names.join(",");
        let text = format!("{header}\n0,0,0,0,0,0,0,low\n1,1,1,1,1,1,1,high\n0.5,0,0,0,0,0,0,\n");
        inputs.reference_rows = reference_rows(Path::new("ref.csv"), &text, &inputs.metadata.contract).unwrap();
        assert_eq!(inputs.reference_rows[1][7], 2.0, "high is code 2");
        assert!(inputs.reference_rows[2][7].is_nan(), "an empty cell is missing");
        let manifest = Manifest::parse(&build(inputs).unwrap().manifest_bytes).unwrap();
        assert_eq!((manifest.drift.wasserstein, manifest.drift.persist_windows), (0.3, 5));
        assert_eq!(manifest.contract.features, features);
        let proto::drift::FeatureSketch::Categorical(load) = &manifest.reference.sketch.features[7] else { panic!() };
        assert_eq!(load.missing, 1);

        let wrong = format!("{header}\n0,0,0,0,0,0,0,huge\n");
        let mut contract =
            read_inputs(&fixture("models/mlp.onnx"), &fixture("bundles/tabular.toml"), 1).unwrap().metadata.contract;
        contract.features = features;
        let err = reference_rows(Path::new("ref.csv"), &wrong, &contract).unwrap_err().to_string();
        assert_eq!(
            err,
            "reference file ref.csv line 2: feature \"load\" holds a category its contract does not declare"
        );
    }

    #[test]
    fn golden_cases_from_another_model_fail_the_build() {
        let mut inputs = read_inputs(&fixture("models/mlp_v2.onnx"), &fixture("bundles/tabular.toml"), 1).unwrap();
        inputs.metadata.version = "2.0.0".into();
        assert!(matches!(build(inputs), Err(PackagingError::Model(ModelError::Golden { .. }))));
    }
}
