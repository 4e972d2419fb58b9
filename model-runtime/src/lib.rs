//! The model runtime shared by the agent and by bundle building: loading an ONNX model with
//! tract, checking it against the bundle's contract, replaying the golden inputs, and computing
//! the drift reference sketch from reference rows. `fleetctl bundle build` and a device run the
//! same code, so a bundle that would fail on devices fails at build time.
//!
//! Loading and optimizing is slow and CPU-bound: callers run it on a blocking thread, never on an
//! async worker. The agent's engine thread only receives a ready [`LoadedModel`].
#![forbid(unsafe_code)]

use std::sync::Arc;

use proto::bundle::{ModelContract, TensorSpec};
use proto::drift::ReferenceProfile;
use proto::Manifest;
use thiserror::Error;
use tract_onnx::prelude::*;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("model {name} {version} does not load as ONNX: {reason}")]
    Load { name: String, version: String, reason: String },
    #[error("model {name} {version} breaks its contract: {what}")]
    Contract { name: String, version: String, what: String },
    #[error("model {name} {version} fails golden case {case}: output {index} is {got}, expected {expected} within {tolerance}")]
    Golden { name: String, version: String, case: usize, index: usize, got: f32, expected: f32, tolerance: f32 },
    #[error("inference failed: {0}")]
    Run(String),
}

/// A verified, optimized model ready to serve. Cloning shares the optimized plan (each engine
/// thread builds its own session from it).
#[derive(Clone)]
pub struct LoadedModel {
    pub name: String,
    pub version: String,
    pub contract: ModelContract,
    pub reference: ReferenceProfile,
    pub golden: proto::bundle::GoldenSet,
    /// What the device does with this model when it has no fresh instructions (ADR 0010).
    pub offline: proto::freshness::OfflinePolicy,
    plan: Arc<TypedSimplePlan>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoadedModel({} {})", self.name, self.version)
    }
}

/// One reusable execution state: reusing it avoids re-allocating tract's buffers per request.
pub struct Session {
    state: TypedSimpleState,
    input_shape: Vec<usize>,
}

impl LoadedModel {
    /// Parses, checks the contract (names, dtypes, shapes) and optimizes for the fixed input shape.
    pub fn load(manifest: &Manifest, model_bytes: &[u8]) -> Result<LoadedModel, ModelError> {
        let name = manifest.name.clone();
        let version = manifest.version.to_string();
        let load_err =
            |e: TractError| ModelError::Load { name: name.clone(), version: version.clone(), reason: format!("{e:#}") };
        let contract_err = |what: String| ModelError::Contract { name: name.clone(), version: version.clone(), what };
        let contract = &manifest.contract;

        let mut inference = tract_onnx::onnx().model_for_read(&mut &model_bytes[..]).map_err(load_err)?;
        let inputs = inference.input_outlets().map_err(load_err)?.to_vec();
        let outputs = inference.output_outlets().map_err(load_err)?.to_vec();
        if inputs.len() != 1 || outputs.len() != 1 {
            return Err(contract_err(format!(
                "it has {} inputs and {} outputs; the contract allows one of each",
                inputs.len(),
                outputs.len()
            )));
        }
        let input_name = inference.node(inputs[0].node).name.clone();
        if input_name != contract.input.name {
            return Err(contract_err(format!(
                "its input is named {input_name:?}, the contract says {:?}",
                contract.input.name
            )));
        }
        let output_name = inference
            .outlet_label(outputs[0])
            .map(str::to_string)
            .unwrap_or_else(|| inference.node(outputs[0].node).name.clone());
        if output_name != contract.output.name {
            return Err(contract_err(format!(
                "its output is named {output_name:?}, the contract says {:?}",
                contract.output.name
            )));
        }
        inference.set_input_fact(0, f32::fact(contract.input.shape.clone()).into()).map_err(load_err)?;
        let typed = inference
            .into_optimized()
            .map_err(|e| contract_err(format!("it does not accept input shape {:?}: {e}", contract.input.shape)))?;
        check_output(&typed, &contract.output).map_err(contract_err)?;
        let plan = typed.into_runnable().map_err(load_err)?;
        Ok(LoadedModel {
            name: name.clone(),
            version: version.clone(),
            contract: contract.clone(),
            reference: manifest.reference.clone(),
            golden: manifest.golden.clone(),
            offline: manifest.offline.unwrap_or_default(),
            plan,
        })
    }

    pub fn session(&self) -> Result<Session, ModelError> {
        let state = self.plan.spawn().map_err(|e| ModelError::Run(e.to_string()))?;
        Ok(Session { state, input_shape: self.contract.input.shape.clone() })
    }

    /// Replays every golden case; the first output beyond tolerance fails the self-test.
    pub fn self_test(&self) -> Result<(), ModelError> {
        let mut session = self.session()?;
        for (case, golden) in self.golden.cases.iter().enumerate() {
            let got = session.run(&golden.input)?;
            for (index, (g, e)) in got.iter().zip(&golden.expected).enumerate() {
                let within = (g - e).abs() <= self.golden.tolerance;
                if !within {
                    return Err(ModelError::Golden {
                        name: self.name.clone(),
                        version: self.version.clone(),
                        case,
                        index,
                        got: *g,
                        expected: *e,
                        tolerance: self.golden.tolerance,
                    });
                }
            }
        }
        Ok(())
    }
}

fn check_output(model: &TypedModel, spec: &TensorSpec) -> Result<(), String> {
    let outlet = model.output_outlets().map_err(|e| e.to_string())?[0];
    let fact = model.outlet_fact(outlet).map_err(|e| e.to_string())?;
    if fact.datum_type != f32::datum_type() {
        return Err(format!("its output is {:?}, the contract says f32", fact.datum_type));
    }
    match fact.shape.as_concrete() {
        Some(shape) if shape == spec.shape.as_slice() => Ok(()),
        Some(shape) => Err(format!("its output shape is {shape:?}, the contract says {:?}", spec.shape)),
        None => Err(format!("its output shape {:?} is not fixed", fact.shape)),
    }
}

impl Session {
    /// Runs one sample; `input` has exactly the contract's sample length (callers check).
    pub fn run(&mut self, input: &[f32]) -> Result<Vec<f32>, ModelError> {
        let tensor = Tensor::from_shape(&self.input_shape, input).map_err(|e| ModelError::Run(e.to_string()))?;
        let outputs = self.state.run(tvec!(tensor.into())).map_err(|e| ModelError::Run(e.to_string()))?;
        let view = outputs[0].to_plain_array_view::<f32>().map_err(|e| ModelError::Run(e.to_string()))?;
        Ok(view.iter().copied().collect())
    }
}

/// The drift reference of a model: the layout and sketch of `rows` (each one input sample, NaN
/// where a nullable feature is missing) and of the model's outputs on them (missing values
/// filled as the agent fills them).
pub fn reference_profile(model: &LoadedModel, rows: &[Vec<f32>]) -> Result<ReferenceProfile, ModelError> {
    let mut session = model.session()?;
    let fills = model.contract.fills();
    let outputs =
        rows.iter().map(|row| session.run(&proto::bundle::fill_missing(row, &fills))).collect::<Result<Vec<_>, _>>()?;
    let classes = model.contract.output.sample_len();
    Ok(ReferenceProfile::build(&model.contract.feature_decls(), rows, &outputs, classes))
}

/// Runs a raw, unoptimized-path-free baseline: what "plain tract" answers, for tests and benches.
pub fn raw_tract_run(model_bytes: &[u8], shape: &[usize], input: &[f32]) -> TractResult<Vec<f32>> {
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &model_bytes[..])?
        .with_input_fact(0, f32::fact(shape.to_vec()).into())?
        .into_optimized()?
        .into_runnable()?;
    let out = plan.run(tvec!(Tensor::from_shape(shape, input)?.into()))?;
    Ok(out[0].to_plain_array_view::<f32>()?.iter().copied().collect())
}
