//! Signed freshness for check-in replies (ADR 0010), TUF's timestamp idea per device: the server
//! signs, with the root's timestamp role, a statement naming the device, a counter that rises with
//! every reply, when it was issued, when it expires and the digest of the desired state it covers.
//! A device refuses a reply that is not signed so, whose counter is not above the last it
//! accepted (replay), or that has expired (freeze).
//!
//! Time on a device without a trustworthy clock: the device keeps a *time floor*, the newest
//! `issued_at` it has accepted, and takes `now` as the later of its clock and that floor. A device
//! that boots at 1970 thus still judges expiry against the last signed time it saw, and a
//! backwards clock jump changes nothing. Pure: the agent persists [`Seen`] and reads its clock.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::keys::{verify_threshold, DetachedSignature, SigningKey, ThresholdError, TrustedKeys};
use crate::wire::DesiredState;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Freshness {
    pub device: String,
    /// Rises with every reply the server signs for this device.
    pub counter: u64,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; after this the reply no longer counts as fresh.
    pub expires_at: u64,
    /// sha256 (hex) of the desired state's canonical JSON, without its freshness.
    pub desired_sha256: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedFreshness {
    pub signed: Freshness,
    pub signatures: Vec<DetachedSignature>,
}

/// What a device does with a model once it has had no fresh signed instructions for longer than
/// the model's grace period (ADR 0010): signed into the manifest by the release key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OfflinePolicy {
    /// Days after the last accepted reply expired during which the model serves as usual.
    pub grace_days: u32,
    pub on_stale: OnStale,
}

impl Default for OfflinePolicy {
    fn default() -> Self {
        OfflinePolicy { grace_days: 30, on_stale: OnStale::KeepServing }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnStale {
    /// Answer, marking every answer stale.
    KeepServing,
    /// Refuse to answer until fresh instructions arrive.
    StopServing,
}

/// Where a model stands with respect to its offline policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Fresh instructions, still within the grace period, or nothing to judge by.
    Serving,
    /// Past the grace period since `since` (unix seconds): the policy applies.
    Stale { since: u64, policy: OnStale },
}

/// Judges a model: `fresh_until` is when the last accepted reply expired (0 when the device has
/// accepted none, which is not judged: a device never told otherwise keeps serving), `now` the
/// device's trusted time.
pub fn standing(policy: &OfflinePolicy, fresh_until: u64, now: u64) -> Standing {
    if fresh_until == 0 {
        return Standing::Serving;
    }
    let stale_from = fresh_until.saturating_add(u64::from(policy.grace_days) * 86_400);
    if now > stale_from {
        Standing::Stale { since: stale_from, policy: policy.on_stale }
    } else {
        Standing::Serving
    }
}

/// What a device remembers of the freshness it accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The highest counter accepted; 0 before the first.
    pub counter: u64,
    /// The newest `issued_at` accepted (unix seconds): time never goes below it.
    pub time_floor: u64,
    /// When the last accepted reply expires (unix seconds); 0 before the first.
    pub fresh_until: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FreshnessError {
    #[error("the reply carries no signed freshness, and this device's root requires it")]
    Missing,
    #[error("the reply's freshness is not signed by the root's timestamp keys: {0}")]
    Signature(ThresholdError),
    #[error("the reply's freshness is for device {found}, not this one")]
    OtherDevice { found: String },
    #[error("the reply's freshness covers another desired state: the reply was altered")]
    Digest,
    #[error(
        "the reply's freshness counter {found} is not above {seen}, the last this device accepted: a replayed reply"
    )]
    Replay { found: u64, seen: u64 },
    #[error(
        "the reply expired at {expires_at} and it is now at least {now} (unix seconds): a frozen or delayed reply"
    )]
    Expired { expires_at: u64, now: u64 },
}

/// The digest a freshness statement covers: the desired state without its freshness.
pub fn desired_digest(desired: &DesiredState) -> String {
    let bare = DesiredState { freshness: None, ..desired.clone() };
    // A derived Serialize on plain data cannot fail.
    hex::encode(Sha256::digest(serde_json::to_vec(&bare).unwrap_or_default()))
}

/// The device's "now": its clock, but never below the time floor.
pub fn trusted_now(clock: u64, seen: &Seen) -> u64 {
    clock.max(seen.time_floor)
}

/// Signs a desired state for `device` (server side): counter, issue time and lifetime in seconds.
pub fn seal(desired: &mut DesiredState, key: &SigningKey, device: &str, counter: u64, issued_at: u64, lifetime: u64) {
    let signed = Freshness {
        device: device.to_string(),
        counter,
        issued_at,
        expires_at: issued_at.saturating_add(lifetime),
        desired_sha256: desired_digest(desired),
    };
    let message = serde_json::to_vec(&signed).unwrap_or_default();
    desired.freshness = Some(SignedFreshness { signatures: vec![DetachedSignature::new(key, &message)], signed });
}

/// Accepts a reply's freshness for `device` against what was seen before and the device's clock
/// (unix seconds); returns what to remember from now on. Checked in this order: present, signed
/// by a threshold of `timestamp_keys`, for this device, covering this desired state, newer than
/// the last accepted, not expired at [`trusted_now`].
pub fn accept(
    desired: &DesiredState,
    timestamp_keys: &TrustedKeys,
    device: &str,
    seen: &Seen,
    clock: u64,
) -> Result<Seen, FreshnessError> {
    let freshness = desired.freshness.as_ref().ok_or(FreshnessError::Missing)?;
    let statement = &freshness.signed;
    let message = serde_json::to_vec(statement).unwrap_or_default();
    verify_threshold(&message, &freshness.signatures, timestamp_keys).map_err(FreshnessError::Signature)?;
    if statement.device != device {
        return Err(FreshnessError::OtherDevice { found: statement.device.clone() });
    }
    if statement.desired_sha256 != desired_digest(desired) {
        return Err(FreshnessError::Digest);
    }
    if statement.counter <= seen.counter {
        return Err(FreshnessError::Replay { found: statement.counter, seen: seen.counter });
    }
    let now = trusted_now(clock, seen);
    if statement.expires_at <= now {
        return Err(FreshnessError::Expired { expires_at: statement.expires_at, now });
    }
    Ok(Seen {
        counter: statement.counter,
        time_floor: seen.time_floor.max(statement.issued_at),
        fresh_until: statement.expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{bundle_path, DesiredModel};

    const DAY: u64 = 86_400;
    const T0: u64 = 1_800_000_000;

    fn desired(version: &str) -> DesiredState {
        DesiredState {
            revision: 3,
            models: vec![DesiredModel {
                name: "tabular".into(),
                version: version.into(),
                bundle_path: bundle_path("tabular", version),
                bundle_sha256: "ab".repeat(32),
                bundle_size: 10,
                attempt: 0,
                shadow: None,
                activation_window: None,
            }],
            root_version: Some(1),
            freshness: None,
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn keys() -> TrustedKeys {
        TrustedKeys::new([key().verifying_key()])
    }

    fn sealed(version: &str, counter: u64, issued_at: u64) -> DesiredState {
        let mut state = desired(version);
        seal(&mut state, &key(), "dev-1", counter, issued_at, DAY);
        state
    }

    #[test]
    fn a_fresh_reply_is_accepted_and_moves_counter_and_time_floor() {
        let seen = accept(&sealed("1.0.0", 5, T0), &keys(), "dev-1", &Seen::default(), T0 + 10).unwrap();
        assert_eq!(seen, Seen { counter: 5, time_floor: T0, fresh_until: T0 + DAY });
        // Survives a JSON round trip, as it travels.
        let text = serde_json::to_string(&sealed("1.0.0", 6, T0)).unwrap();
        let parsed: DesiredState = serde_json::from_str(&text).unwrap();
        assert!(accept(&parsed, &keys(), "dev-1", &seen, T0).is_ok());
    }

    #[test]
    fn a_replayed_reply_is_refused_even_when_unexpired() {
        let old = sealed("1.0.0", 5, T0);
        let seen = accept(&sealed("2.0.0", 6, T0 + 60), &keys(), "dev-1", &Seen::default(), T0 + 60).unwrap();
        assert_eq!(accept(&old, &keys(), "dev-1", &seen, T0 + 61), Err(FreshnessError::Replay { found: 5, seen: 6 }));
        let again = sealed("2.0.0", 6, T0 + 60);
        assert!(matches!(accept(&again, &keys(), "dev-1", &seen, T0 + 61), Err(FreshnessError::Replay { .. })));
    }

    #[test]
    fn an_expired_reply_is_refused_a_frozen_server_cannot_keep_a_device_on_old_instructions() {
        let reply = sealed("1.0.0", 5, T0);
        let err = accept(&reply, &keys(), "dev-1", &Seen::default(), T0 + DAY).unwrap_err();
        assert_eq!(err, FreshnessError::Expired { expires_at: T0 + DAY, now: T0 + DAY });
    }

    #[test]
    fn a_device_whose_clock_reads_1970_judges_by_its_time_floor() {
        let seen = Seen { counter: 9, time_floor: T0 + 2 * DAY, fresh_until: T0 + 3 * DAY };
        // A valid reply issued after the floor is accepted although the clock says 1970.
        let valid = sealed("1.0.0", 10, T0 + 2 * DAY + 5);
        let next = accept(&valid, &keys(), "dev-1", &seen, 0).unwrap();
        assert_eq!(next.time_floor, T0 + 2 * DAY + 5);
        // A reply that expired before the floor is refused, whatever the clock says.
        let expired = sealed("1.0.0", 11, T0);
        assert_eq!(
            accept(&expired, &keys(), "dev-1", &seen, 0),
            Err(FreshnessError::Expired { expires_at: T0 + DAY, now: T0 + 2 * DAY })
        );
        // A clock jump backwards does not lower the floor.
        assert_eq!(trusted_now(T0, &next), T0 + 2 * DAY + 5);
    }

    #[test]
    fn a_model_goes_stale_only_after_its_grace_period() {
        let policy = OfflinePolicy { grace_days: 2, on_stale: OnStale::StopServing };
        assert_eq!(standing(&policy, T0, T0 + 2 * DAY), Standing::Serving);
        assert_eq!(
            standing(&policy, T0, T0 + 2 * DAY + 1),
            Standing::Stale { since: T0 + 2 * DAY, policy: OnStale::StopServing }
        );
        assert_eq!(standing(&policy, 0, u64::MAX), Standing::Serving, "never judged without a first reply");
        assert_eq!(OfflinePolicy::default(), OfflinePolicy { grace_days: 30, on_stale: OnStale::KeepServing });
    }

    #[test]
    fn a_reply_altered_or_for_another_device_or_unsigned_is_refused() {
        let mut altered = sealed("1.0.0", 5, T0);
        altered.models[0].version = "0.9.0".into();
        altered.models[0].bundle_path = bundle_path("tabular", "0.9.0");
        assert_eq!(accept(&altered, &keys(), "dev-1", &Seen::default(), T0), Err(FreshnessError::Digest));
        let theirs = sealed("1.0.0", 5, T0);
        assert_eq!(
            accept(&theirs, &keys(), "dev-2", &Seen::default(), T0),
            Err(FreshnessError::OtherDevice { found: "dev-1".into() })
        );
        assert_eq!(accept(&desired("1.0.0"), &keys(), "dev-1", &Seen::default(), T0), Err(FreshnessError::Missing));
        let mut stretched = sealed("1.0.0", 5, T0);
        stretched.freshness.as_mut().unwrap().signed.expires_at += 365 * DAY;
        assert!(matches!(
            accept(&stretched, &keys(), "dev-1", &Seen::default(), T0),
            Err(FreshnessError::Signature(ThresholdError::BadSignature { .. }))
        ));
        let stranger = TrustedKeys::new([SigningKey::from_bytes(&[8; 32]).verifying_key()]);
        assert!(matches!(
            accept(&sealed("1.0.0", 5, T0), &stranger, "dev-1", &Seen::default(), T0),
            Err(FreshnessError::Signature(ThresholdError::BelowThreshold { valid: 0, threshold: 1 }))
        ));
    }
}
