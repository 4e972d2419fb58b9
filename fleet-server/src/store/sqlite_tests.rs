use super::*;
use proto::drift::SketchCounts;
use proto::wire::{DriftSummary, Health, ModelCounters, UpdateStep};

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("fleet.db")).unwrap();
    (dir, store)
}

fn device(store: &SqliteStore, id: &str) {
    store
        .insert_device(&NewDevice {
            id: id.into(),
            name: id.into(),
            labels: [("site".to_string(), "a".to_string())].into(),
            credential_hash: format!("hash-{id}"),
            enrolled_ms: 1,
        })
        .unwrap();
}

fn bundle(version: &str, sha: &str) -> BundleRecord {
    BundleRecord {
        name: "tabular".into(),
        version: version.into(),
        sha256: sha.into(),
        size: 10,
        created_at: 1,
        signed_by: "k".into(),
        manifest_json: b"{}".to_vec(),
    }
}

#[test]
fn an_enrollment_token_works_exactly_once() {
    let (_dir, store) = store();
    store.create_tokens(&["t1".into()], 1).unwrap();
    assert!(store.consume_token("t1", 2).unwrap());
    assert!(!store.consume_token("t1", 3).unwrap());
    assert!(!store.consume_token("unknown", 3).unwrap());
}

#[test]
fn desired_state_names_the_published_bundle_and_bumps_the_revision() {
    let (_dir, store) = store();
    device(&store, "d1");
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    assert_eq!(store.set_desired(&["d1".into()], "tabular", "1.0.0").unwrap(), vec![("d1".to_string(), 1)]);
    let desired = store.desired_state("d1").unwrap();
    assert_eq!(desired.revision, 1);
    assert_eq!(desired.models[0].bundle_path, "/api/v1/bundles/tabular/1.0.0");
    assert_eq!((desired.models[0].bundle_sha256.as_str(), desired.models[0].bundle_size), ("aa", 10));
    assert_eq!(store.set_desired(&["d1".into()], "tabular", "1.0.0").unwrap()[0].1, 2);
}

#[test]
fn republishing_a_version_with_other_bytes_is_a_conflict() {
    let (_dir, store) = store();
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    let err = store.put_bundle(&bundle("1.0.0", "bb")).unwrap_err();
    assert!(err.to_string().contains("already published with different contents"), "{err}");
}

#[test]
fn a_drift_window_delivered_twice_is_stored_once_and_summarised_per_device() {
    let (_dir, store) = store();
    device(&store, "d1");
    let summary = DriftSummary {
        model: "tabular".into(),
        version: "1.0.0".into(),
        window_start_ms: 10,
        window_end_ms: 20,
        counts: SketchCounts { samples: 5, ..Default::default() },
        score: 0.3,
    };
    let stored = StoredDrift { summary: &summary, score: 0.31, mean_confidence: Some(0.8) };
    assert!(store.record_drift("d1", &stored).unwrap());
    assert!(!store.record_drift("d1", &stored).unwrap());
    store
        .record_heartbeat(
            "d1",
            &Heartbeat {
                at_ms: 30,
                uptime_secs: 1,
                health: Health { cpu_percent: 5.0, ..Default::default() },
                models: vec![ModelCounters {
                    model: "tabular".into(),
                    version: "1.0.0".into(),
                    inferences: 42,
                    errors: 0,
                    telemetry_dropped: 0,
                    latency_p95_us: Some(64),
                }],
            },
        )
        .unwrap();
    let view = &store.list_devices().unwrap()[0];
    assert_eq!(view.last_seen_ms, Some(30));
    assert_eq!(view.health.as_ref().unwrap().cpu_percent, 5.0);
    let model = &view.models[0];
    assert_eq!((model.drift_summaries, model.drift_score, model.inferences), (1, Some(0.31), 42));
    assert_eq!(model.active_version.as_deref(), Some("1.0.0"));
}

#[test]
fn an_older_status_does_not_overwrite_a_newer_one() {
    let (_dir, store) = store();
    device(&store, "d1");
    let status = |step, at_ms| UpdateStatus {
        model: "tabular".into(),
        version: "1.0.0".into(),
        step,
        detail: String::new(),
        active_version: None,
        at_ms,
    };
    store.record_status("d1", &status(UpdateStep::Active, 20)).unwrap();
    store.record_status("d1", &status(UpdateStep::Downloading, 10)).unwrap();
    assert_eq!(store.list_devices().unwrap()[0].models[0].step, Some(UpdateStep::Active));
}

#[test]
fn a_corrupt_update_step_is_an_error_naming_the_device_not_a_missing_step() {
    let (_dir, store) = store();
    device(&store, "d1");
    store
        .conn()
        .execute("INSERT INTO model_status (device, model, step, detail) VALUES ('d1', 'tabular', 'exploded', '')", [])
        .unwrap();
    let err = store.observation_rows("tabular", 0).unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt(why) if why.contains("d1") && why.contains("\"exploded\"")), "{err}");
    assert!(matches!(store.list_devices(), Err(StoreError::Corrupt(_))));
}
