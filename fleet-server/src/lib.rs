//! fleet-server: device registry, bundle store, desired state and MQTT ingest; plus what the
//! operator CLI `fleetctl` needs (bundle packaging, an API client, the demo).
#![forbid(unsafe_code)]

pub mod api;
pub mod broker;
pub mod client;
pub mod demo;
pub mod ingest;
pub mod packaging;
pub mod rollout;
pub mod scenario;
pub mod server;
pub mod store;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    edge_agent::unix_ms()
}
