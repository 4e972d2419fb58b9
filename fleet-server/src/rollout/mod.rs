//! Staged rollouts by cohort: plan -> waves -> health gates -> complete | halt | roll back.
//!
//! `decide` is a pure function from (rollout, observations, now) to the next state and the
//! effects to carry out; `driver` persists the state first, then carries out the effects, and
//! re-asserts every member's desired version on each tick, so a server killed mid-rollout resumes
//! exactly where it was.

pub mod cohort_default;
pub mod create;
pub mod decide;
pub mod driver;
pub mod gates;
pub mod observe;
pub mod state;

pub use cohort_default::CohortDefault;
pub use decide::{decide, Decision};
pub use observe::observe;
pub use state::{DeviceInfo, Effect, Member, MemberStatus, MemberWrites, Observations, Phase, Rollout};

#[cfg(test)]
mod membership_tests;
