//! fleetctl: the operator CLI and what it needs — bundle packaging (`packaging`), a client for the
//! server's operator API (`client`), and the demo that runs a real fleet on one machine (`demo`,
//! `scenario`). This crate is the integrator: it may depend on both the agent and the server
//! libraries; they never depend on each other.
#![forbid(unsafe_code)]

pub mod broker_setup;
pub mod client;
pub mod demo;
pub mod drift_compare;
pub mod link;
pub mod offline;
pub mod ops;
pub mod packaging;
pub mod pki;
pub mod retrain_demo;
pub mod scenario;
pub mod table;
pub mod trust_root;
