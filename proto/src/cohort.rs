//! Cohorts: a label selector plus a stable hash bucket per device and rollout.
//!
//! `bucket(device, salt)` maps a device to [0, 1) from sha256(device ‖ 0 ‖ salt): the same on
//! every server and after every restart, and independent between rollouts (each has its own
//! salt), so "the first 10%" of a rollout is always the same devices, and not always the same
//! devices across rollouts.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

pub fn bucket(device_id: &str, salt: &str) -> f64 {
    let mut hasher = Sha256::new();
    hasher.update(device_id.as_bytes());
    hasher.update([0u8]);
    hasher.update(salt.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 53 bits keep the value exactly representable and strictly below 1.
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// Every selector label must be present on the device with the same value; empty matches all.
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_stable_and_in_the_unit_interval() {
        let b = bucket("dev-1", "salt");
        assert_eq!(b, bucket("dev-1", "salt"));
        assert!((0.0..1.0).contains(&b));
        assert_ne!(b, bucket("dev-1", "other-salt"));
        assert_eq!(bucket("dev-1", "salt"), 0.41564184291882134, "the hash must not change between releases");
    }

    #[test]
    fn buckets_spread_evenly_over_many_devices() {
        let below_tenth = (0..10_000).filter(|i| bucket(&format!("dev-{i}"), "r1") < 0.1).count();
        assert!((900..1100).contains(&below_tenth), "{below_tenth} of 10000 below 0.1");
    }

    #[test]
    fn a_selector_needs_every_label_to_match() {
        let labels: BTreeMap<String, String> = [("region".into(), "eu".into()), ("hw".into(), "cam".into())].into();
        assert!(matches(&BTreeMap::new(), &labels));
        assert!(matches(&[("region".into(), "eu".into())].into(), &labels));
        assert!(!matches(&[("region".into(), "us".into())].into(), &labels));
        assert!(!matches(&[("site".into(), "a".into())].into(), &labels));
    }
}
