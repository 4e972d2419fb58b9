//! The telemetry buffer: one writer thread owns `telemetry.db` and inserts records in batched
//! transactions. Producers hand records over with `try_send`; when the channel is full the record
//! is counted as dropped instead of blocking the inference thread. The buffer shares the agent's
//! disk budget (`crate::budget`) and is evicted first; the uploader (`upload.rs`) sends the
//! oldest rows to the server and deletes what it stored.

mod db;
pub mod upload;
mod writer;

pub use writer::{decode_f32s, encode_f32s, spawn_writer, TelemetryRecord, TelemetrySink, WriterConfig, WriterError};
