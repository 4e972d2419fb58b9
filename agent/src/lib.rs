//! edge-agent: pulls signed model bundles, verifies and activates them atomically, serves local
//! inference, buffers telemetry in SQLite and reports drift and health over MQTT.
//!
//! `runtime` wires the actors together; each folder owns one job (see docs/ARCHITECTURE.md).
#![forbid(unsafe_code)]

pub mod budget;
pub mod config;
pub mod device_key;
pub mod health;
pub mod http;
pub mod inference;
pub mod metrics;
pub mod runtime;
pub mod state;
pub mod telemetry;
pub mod trust;
pub mod updater;
pub mod uplink;

pub use config::AgentConfig;
pub use runtime::{start, AgentHandle, StartError};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
