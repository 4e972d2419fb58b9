//! Local inference: models (loaded by `model-runtime`) on a dedicated engine thread, served on a
//! local HTTP API.

pub mod api;
pub mod engine;

pub use engine::{EngineHandle, InferError, InferResponse};
pub use model_runtime::{LoadedModel, ModelError};

#[cfg(test)]
mod tests;
