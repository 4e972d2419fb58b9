//! Local inference: models (loaded by `model-runtime`) on a dedicated engine thread that also
//! serves the local HTTP API (`thread.rs` says why).

pub mod api;
pub mod engine;
pub mod shadow;
pub mod thread;

pub use engine::{InferError, InferResponse};
pub use model_runtime::{LoadedModel, ModelError};
pub use thread::{EngineHandle, LocalApi};

#[cfg(test)]
mod tests;
