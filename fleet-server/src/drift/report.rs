//! Drift per model, version, cohort and time bucket: the devices' windows merged (exact, as one
//! device's windows merge) and tested against the version's reference. Pure: the store hands
//! over the windows and the devices' labels; `GET /api/v1/drift` and the retraining trigger
//! call [`report`].

use std::collections::BTreeMap;

use proto::drift::WindowSketch;
use proto::shadow::ShadowSummary;
use serde::{Deserialize, Serialize};

use super::{DriftVerdict, ModelDrift};
use crate::rollout::DeviceInfo;
use crate::store::WindowRow;

/// Buckets a report may hold; older ones are left out (ask with a later `since`).
pub const MAX_BUCKETS: usize = 1000;

/// One cohort's drift for one version over one bucket of time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct BucketVerdict {
    pub version: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub devices: usize,
    pub windows: usize,
    pub verdict: DriftVerdict,
    /// A candidate the devices ran in shadow beside this version over the bucket, compared
    /// request by request (agreement, mean absolute difference, class flips, latency, drops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSummary>,
}

/// What `GET /api/v1/drift` answers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, utoipa::ToSchema)]
pub struct DriftReport {
    pub model: String,
    /// The label selector the devices matched; empty for the whole fleet.
    pub cohort: BTreeMap<String, String>,
    pub bucket_secs: u64,
    pub since_ms: u64,
    /// Oldest first.
    pub buckets: Vec<BucketVerdict>,
    /// Windows that did not decode or did not fit their version's layout, or whose version has
    /// no published bundle.
    pub skipped_windows: usize,
}

/// Whether `labels` carry every `selector` pair.
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Merges the windows of devices in the cohort per (version, bucket) and tests each merge.
pub fn report(
    model: &str,
    windows: &[WindowRow],
    devices: &[DeviceInfo],
    cohort: &BTreeMap<String, String>,
    bucket_secs: u64,
    since_ms: u64,
    references: &BTreeMap<String, ModelDrift>,
) -> DriftReport {
    let bucket_ms = bucket_secs.max(1) * 1000;
    let members: std::collections::HashSet<&str> =
        devices.iter().filter(|d| matches(cohort, &d.labels)).map(|d| d.id.as_str()).collect();
    struct Merge<'a> {
        sketch: WindowSketch,
        devices: std::collections::BTreeSet<&'a str>,
        windows: usize,
        shadow: Option<ShadowSummary>,
    }
    let mut merged: BTreeMap<(u64, &str), Merge> = BTreeMap::new();
    let mut skipped = 0;
    for window in windows.iter().filter(|w| w.start_ms >= since_ms && members.contains(w.device.as_str())) {
        let Some(reference) = references.get(&window.version) else {
            skipped += 1;
            continue;
        };
        let sketch = match proto::wire::decode::<WindowSketch>("stored drift window", &window.counts) {
            Ok(sketch) if sketch.fits(&reference.profile.layout).is_ok() => sketch,
            _ => {
                skipped += 1;
                continue;
            }
        };
        let start = window.start_ms / bucket_ms * bucket_ms;
        let entry = merged.entry((start, window.version.as_str())).or_insert_with(|| Merge {
            sketch: WindowSketch::default(),
            devices: Default::default(),
            windows: 0,
            shadow: None,
        });
        // Both fit the version's layout, checked above.
        let _ = entry.sketch.merge(&sketch);
        let shadow = window.shadow.as_deref().and_then(|b| proto::wire::decode::<ShadowSummary>("shadow", b).ok());
        match (&mut entry.shadow, shadow) {
            (None, Some(s)) => entry.shadow = Some(s),
            // A candidate of another shape (or version) in the same bucket is left out.
            (Some(merged), Some(s)) => {
                let _ = merged.merge(&s);
            }
            (_, None) => {}
        }
        entry.devices.insert(window.device.as_str());
        entry.windows += 1;
    }
    let mut buckets: Vec<BucketVerdict> = merged
        .into_iter()
        .filter_map(|((start, version), m)| {
            let verdict = references.get(version)?.evaluate(&m.sketch).ok()?;
            Some(BucketVerdict {
                version: version.to_string(),
                start_ms: start,
                end_ms: start + bucket_ms,
                devices: m.devices.len(),
                windows: m.windows,
                verdict,
                shadow: m.shadow,
            })
        })
        .collect();
    if buckets.len() > MAX_BUCKETS {
        buckets.drain(..buckets.len() - MAX_BUCKETS);
    }
    DriftReport {
        model: model.to_string(),
        cohort: cohort.clone(),
        bucket_secs,
        since_ms,
        buckets,
        skipped_windows: skipped,
    }
}

#[cfg(test)]
mod tests {
    use proto::drift::{FeatureDecl, ReferenceProfile};

    use super::*;

    fn reference() -> ModelDrift {
        let rows: Vec<Vec<f32>> = (0..2000).map(|i| vec![(i % 100) as f32 / 100.0]).collect();
        ModelDrift {
            profile: ReferenceProfile::build(&[FeatureDecl::numeric("x")], &rows, &[], 0),
            policy: Default::default(),
        }
    }

    fn window(device: &str, start_ms: u64, shift: f32) -> WindowRow {
        let layout = reference().profile.layout;
        let mut sketch = WindowSketch::empty(&layout);
        for i in 0..600 {
            sketch.observe(&layout, &[(i % 100) as f32 / 100.0 + shift], &[], 10);
        }
        WindowRow {
            device: device.into(),
            version: "1.0.0".into(),
            start_ms,
            counts: proto::wire::encode(&sketch),
            shadow: None,
            received_ms: 0,
        }
    }

    fn device(id: &str, site: &str) -> DeviceInfo {
        DeviceInfo { id: id.into(), labels: [("site".to_string(), site.to_string())].into(), ..Default::default() }
    }

    #[test]
    fn windows_merge_per_cohort_and_hour_and_only_the_shifted_site_drifts() {
        let devices = [device("a1", "plant-a"), device("a2", "plant-a"), device("b1", "plant-b")];
        let windows = [
            window("a1", 3_600_000, 0.0),
            window("a2", 3_700_000, 0.0),
            window("b1", 3_600_000, 0.5),
            window("b1", 7_300_000, 0.5),
        ];
        let references = [("1.0.0".to_string(), reference())].into();
        let site = |s: &str| [("site".to_string(), s.to_string())].into();
        let a = report("m", &windows, &devices, &site("plant-a"), 3600, 0, &references);
        assert_eq!(a.buckets.len(), 1);
        assert_eq!((a.buckets[0].devices, a.buckets[0].windows, a.buckets[0].verdict.rows), (2, 2, 1200));
        assert!(!a.buckets[0].verdict.dataset_drift);
        let b = report("m", &windows, &devices, &site("plant-b"), 3600, 0, &references);
        assert_eq!(b.buckets.iter().map(|b| b.start_ms).collect::<Vec<_>>(), [3_600_000, 7_200_000]);
        assert!(b.buckets.iter().all(|b| b.verdict.dataset_drift));
        let fleet = report("m", &windows, &devices, &BTreeMap::new(), 86_400, 0, &references);
        assert_eq!((fleet.buckets.len(), fleet.buckets[0].windows), (1, 4));
        let later = report("m", &windows, &devices, &BTreeMap::new(), 3600, 7_000_000, &references);
        assert_eq!(later.buckets.len(), 1);
    }

    #[test]
    fn a_shadow_candidates_windows_merge_into_the_bucket_of_the_version_beside_it() {
        let devices = [device("a1", "plant-a"), device("a2", "plant-a")];
        let shadowed = |device: &str, agree: bool| {
            let mut s = ShadowSummary::empty("2.0.0", 2);
            s.observe(&[0.9, 0.1], if agree { &[0.8, 0.2] } else { &[0.2, 0.8] }, 40);
            s.dropped = 1;
            let mut w = window(device, 0, 0.0);
            w.shadow = Some(proto::wire::encode(&s));
            w
        };
        let references = [("1.0.0".to_string(), reference())].into();
        let windows = [shadowed("a1", true), shadowed("a2", false), window("a2", 10, 0.0)];
        let r = report("m", &windows, &devices, &BTreeMap::new(), 3600, 0, &references);
        let shadow = r.buckets[0].shadow.as_ref().expect("the bucket carries the shadow comparison");
        assert_eq!((shadow.version.as_str(), shadow.rows, shadow.agree, shadow.dropped), ("2.0.0", 2, 1, 2));
        assert_eq!(shadow.flips, vec![1, 1, 0, 0]);
    }

    #[test]
    fn a_window_that_does_not_fit_or_has_no_bundle_is_skipped_and_counted() {
        let devices = [device("a1", "plant-a")];
        let mut broken = window("a1", 0, 0.0);
        broken.counts.truncate(5);
        let mut unknown = window("a1", 0, 0.0);
        unknown.version = "9.9.9".into();
        let references = [("1.0.0".to_string(), reference())].into();
        let r = report("m", &[broken, unknown, window("a1", 0, 0.0)], &devices, &BTreeMap::new(), 3600, 0, &references);
        assert_eq!((r.skipped_windows, r.buckets.len(), r.buckets[0].windows), (2, 1, 1));
    }
}
