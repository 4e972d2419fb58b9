//! fleet-server: device registry, bundle store, desired state, staged rollouts and MQTT ingest.
//! It depends on `proto` only; the operator CLI and the demo live in `fleetctl/`.
#![forbid(unsafe_code)]

pub mod api;
pub mod broker;
pub mod drift;
pub mod ingest;
pub mod lease;
pub mod notify;
pub mod retention;
pub mod retrain;
pub mod rollout;
pub mod server;
pub mod store;
pub mod tls;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
