//! Local inference: tract models on a dedicated engine thread, served on a local HTTP API.

pub mod api;
pub mod engine;
pub mod model;

pub use engine::{EngineHandle, InferError, InferResponse};
pub use model::{LoadedModel, ModelError};

#[cfg(test)]
mod tests;
