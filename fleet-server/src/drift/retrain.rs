//! When to ask for a retraining, as a pure state machine per (model, version, cohort): each
//! complete time bucket of merged drift is fed once, in order; K drifted buckets in a row start
//! an episode that fires one event; a bucket without drift (or without any windows) ends it.
//! The watch is persisted with the event it fires, so a restart neither forgets nor repeats.

use std::collections::BTreeMap;

use proto::bundle::Lineage;
use proto::events::{DriftedFeature, RetrainEvent};
use serde::{Deserialize, Serialize};

use super::report::BucketVerdict;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Watch {
    /// Start of the newest bucket fed; later checks feed only buckets after it.
    pub last_bucket_ms: Option<u64>,
    /// Drifted buckets in a row up to the last one fed.
    pub run: u32,
    pub episode_start_ms: u64,
    /// This episode has fired its event.
    pub fired: bool,
}

/// What an episode that reached K buckets fires.
#[derive(Clone, Debug, PartialEq)]
pub struct Fired {
    pub episode_start_ms: u64,
    pub until_ms: u64,
    pub run: u32,
    pub latest: BucketVerdict,
}

/// Feeds the complete buckets of `buckets` (one version, oldest first) newer than the watch's
/// last one. A bucket is complete when it ended at or before `now_ms`.
pub fn scan(
    watch: &Watch,
    buckets: &[&BucketVerdict],
    bucket_ms: u64,
    now_ms: u64,
    persist: u32,
) -> (Watch, Option<Fired>) {
    let mut w = watch.clone();
    let mut fired = None;
    let after = watch.last_bucket_ms;
    // Sorted oldest first, so every bucket fed is newer than the one fed before it.
    for b in buckets.iter().filter(|b| b.end_ms <= now_ms && after.is_none_or(|last| b.start_ms > last)) {
        // A bucket with no windows at all lies between: the run does not survive it.
        if w.last_bucket_ms.is_some_and(|last| b.start_ms != last + bucket_ms) {
            w.run = 0;
            w.fired = false;
        }
        if b.verdict.dataset_drift {
            if w.run == 0 {
                w.episode_start_ms = b.start_ms;
            }
            w.run += 1;
            if w.run >= persist.max(1) && !w.fired {
                w.fired = true;
                fired = Some(Fired {
                    episode_start_ms: w.episode_start_ms,
                    until_ms: b.end_ms,
                    run: w.run,
                    latest: (*b).clone(),
                });
            }
        } else {
            w.run = 0;
            w.fired = false;
        }
        w.last_bucket_ms = Some(b.start_ms);
    }
    (w, fired)
}

/// A cohort as stored and keyed: `k=v,k=v` in key order; empty for the whole fleet.
pub fn cohort_key(cohort: &BTreeMap<String, String>) -> String {
    cohort.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The event an episode fires; its id is the same for the same episode, whoever computes it.
pub fn event(
    model: &str,
    cohort: &BTreeMap<String, String>,
    fired: &Fired,
    bucket_secs: u64,
    lineage: Lineage,
) -> RetrainEvent {
    let version = fired.latest.version.clone();
    let key = cohort_key(cohort);
    let id =
        format!("retrain-{model}-{version}-{}-{}", if key.is_empty() { "fleet" } else { &key }, fired.episode_start_ms);
    let drifted_features = fired
        .latest
        .verdict
        .drifted_features()
        .map(|f| DriftedFeature {
            name: f.name.clone(),
            test: f.test.as_str().to_string(),
            score: f.score,
            threshold: f.threshold,
        })
        .collect();
    RetrainEvent {
        telemetry_export: format!(
            "fleetctl telemetry export --model {model} --version {version} --since {} --out {model}-{version}.csv",
            fired.episode_start_ms
        ),
        id,
        model: model.to_string(),
        version,
        cohort: cohort.clone(),
        windows: fired.run,
        window_secs: bucket_secs,
        since_ms: fired.episode_start_ms,
        until_ms: fired.until_ms,
        drift_share: fired.latest.verdict.drift_share,
        drifted_features,
        lineage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::DriftVerdict;

    const H: u64 = 3_600_000;

    fn bucket(hour: u64, drifted: bool) -> BucketVerdict {
        BucketVerdict {
            version: "1.0.0".into(),
            start_ms: hour * H,
            end_ms: (hour + 1) * H,
            devices: 3,
            windows: 3,
            verdict: DriftVerdict {
                rows: 1000,
                reference_rows: 4000,
                dataset_drift: drifted,
                drift_share: if drifted { 0.5 } else { 0.0 },
                features: Vec::new(),
                prediction: None,
                estimated_accuracy: None,
                reference_accuracy: None,
            },
            shadow: None,
        }
    }

    fn feed(watch: &Watch, buckets: &[BucketVerdict], now_hour: u64) -> (Watch, Option<Fired>) {
        let refs: Vec<&BucketVerdict> = buckets.iter().collect();
        scan(watch, &refs, H, now_hour * H, 3)
    }

    #[test]
    fn three_drifted_hours_in_a_row_fire_once_and_a_fourth_does_not_fire_again() {
        let hours = [bucket(10, true), bucket(11, true), bucket(12, true), bucket(13, true)];
        let (w, fired) = feed(&Watch::default(), &hours[..2], 12);
        assert_eq!((w.run, fired), (2, None));
        let (w, fired) = feed(&w, &hours[..3], 13);
        let fired = fired.unwrap();
        assert_eq!((fired.episode_start_ms, fired.until_ms, fired.run), (10 * H, 13 * H, 3));
        let (w, again) = feed(&w, &hours, 14);
        assert_eq!((w.run, w.fired, again), (4, true, None));
    }

    #[test]
    fn a_quiet_hour_or_an_hour_without_windows_ends_the_episode_and_the_next_one_fires_anew() {
        let (w, _) = feed(&Watch::default(), &[bucket(1, true), bucket(2, true), bucket(3, false)], 4);
        assert_eq!((w.run, w.fired), (0, false));
        // Hours 5 and 6 drift, hour 7 has no windows, 8-10 drift: only 8-10 is an episode.
        let later = [bucket(5, true), bucket(6, true), bucket(8, true), bucket(9, true), bucket(10, true)];
        let (_, fired) = feed(&w, &later, 11);
        assert_eq!(fired.unwrap().episode_start_ms, 8 * H);
    }

    #[test]
    fn the_bucket_still_filling_is_not_judged_and_a_bucket_is_fed_only_once() {
        let hours = [bucket(1, true), bucket(2, true), bucket(3, true)];
        let (w, fired) = feed(&Watch::default(), &hours, 3);
        assert_eq!((w.last_bucket_ms, fired), (Some(2 * H), None), "hour 3 ends at 4");
        let (w, fired) = feed(&w, &hours, 4);
        assert!(fired.is_some());
        let (w2, _) = feed(&w, &hours, 5);
        assert_eq!(w2, w);
    }

    #[test]
    fn the_event_names_the_episode_and_says_how_to_export_its_rows() {
        let (_, fired) = feed(&Watch::default(), &[bucket(1, true), bucket(2, true), bucket(3, true)], 4);
        let cohort = [("site".to_string(), "plant-a".to_string())].into();
        let e = event("tabular", &cohort, &fired.unwrap(), 3600, Lineage::default());
        assert_eq!(e.id, format!("retrain-tabular-1.0.0-site=plant-a-{}", H));
        assert_eq!((e.windows, e.since_ms, e.until_ms), (3, H, 4 * H));
        assert!(e.telemetry_export.starts_with("fleetctl telemetry export --model tabular --version 1.0.0"));
    }
}
