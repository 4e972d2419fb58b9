//! The contract between edge-agent and fleet-server.
//!
//! Everything here is pure: no sockets, no files, no clocks. Both sides link this crate, so a
//! change here is a protocol change: bundle format (`bundle`), signatures and key ids (`keys`),
//! MQTT topics and payloads plus HTTP JSON bodies (`wire`), the checks a device makes on what a
//! server tells it (`desired`) and on what a bundle is for (`admission`), the root of trust and its rotation (`root`), maintenance windows (`window`), signed
//! freshness of check-in replies (`freshness`), drift sketches (`drift`), broker addresses (`endpoint`) and the
//! names that address models on a device (`names`).
#![forbid(unsafe_code)]

pub mod admission;
pub mod bundle;
pub mod cohort;
pub mod delivery;
pub mod desired;
pub mod drift;
pub mod endpoint;
pub mod events;
pub mod freshness;
pub mod keys;
pub mod lineage;
pub mod names;
pub mod rollout;
pub mod root;
pub mod shadow;
pub mod window;
pub mod wire;

pub use bundle::{Manifest, VerifiedBundle, VerifyError};
pub use keys::{KeyId, TrustedKeys};
