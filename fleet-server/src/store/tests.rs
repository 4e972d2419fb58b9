//! The store's behaviour, written once over `&dyn Store` and run against SQLite and, when
//! `FLEET_TEST_DATABASE_URL` names a PostgreSQL database, against PostgreSQL in a fresh schema of
//! each test's own (dropped at the end, so the tests run in parallel). Without the variable the
//! PostgreSQL instances pass and say they were skipped.

use super::*;
use crate::rollout::MemberWrites;
use crate::store::Report;
use proto::drift::WindowSketch;
use proto::lineage::MAX_HISTORY;
use proto::wire::{DriftSummary, Health, ModelCounters, UpdateStatus, UpdateStep};

/// The environment variable naming the PostgreSQL database the tests may use.
pub(crate) const DATABASE_URL_VAR: &str = "FLEET_TEST_DATABASE_URL";

/// A schema of its own in the test database, dropped when the test ends.
pub(crate) struct TestSchema {
    pub url: String,
    pub name: String,
}

impl TestSchema {
    /// A fresh schema name (created by the store that opens it), or None without the variable.
    pub(crate) fn new() -> Option<TestSchema> {
        let url = std::env::var(DATABASE_URL_VAR).ok().filter(|u| !u.is_empty())?;
        Some(TestSchema { url, name: format!("fleet_test_{:016x}", rand::random::<u64>()) })
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        if let Ok(mut client) = ::postgres::Client::connect(&self.url, ::postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}

/// A store under test: the trait, plus raw SQL for rows the trait cannot write.
pub(crate) enum TestStore {
    Sqlite { store: SqliteStore, _dir: tempfile::TempDir },
    // Fields drop in order: the store before its schema.
    Postgres { store: Box<PostgresStore>, _schema: TestSchema },
}

impl TestStore {
    fn sqlite() -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        TestStore::Sqlite { store: SqliteStore::open(&dir.path().join("fleet.db")).unwrap(), _dir: dir }
    }

    fn postgres() -> Option<TestStore> {
        let schema = TestSchema::new()?;
        let store = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
        Some(TestStore::Postgres { store: Box::new(store), _schema: schema })
    }

    fn execute_sql(&self, sql: &str) {
        match self {
            TestStore::Sqlite { store, .. } => store.execute_batch(sql).unwrap(),
            TestStore::Postgres { store, .. } => store.execute_batch(sql).unwrap(),
        }
    }
}

impl std::ops::Deref for TestStore {
    type Target = dyn Store;
    fn deref(&self) -> &(dyn Store + 'static) {
        match self {
            TestStore::Sqlite { store, .. } => store,
            TestStore::Postgres { store, .. } => store.as_ref(),
        }
    }
}

/// Instantiates each test over `&TestStore` once per store: `sqlite::name` and `postgres::name`.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $name() {
                super::$name(&super::TestStore::sqlite());
            })*
        }
        mod postgres {
            $(#[test]
            fn $name() {
                match super::TestStore::postgres() {
                    Some(store) => super::$name(&store),
                    None => eprintln!("skipped: {} is not set", super::DATABASE_URL_VAR),
                }
            })*
        }
    };
}

on_every_store!(
    an_enrollment_token_enrolls_one_device_and_a_retry_within_the_grace_period_gets_that_device_back,
    enrollments_racing_with_one_token_make_one_device,
    expired_and_revoked_tokens_enroll_nothing,
    a_revoked_device_has_no_credential_no_key_and_cannot_re_enroll_within_grace,
    operators_are_found_by_token_digest_until_revoked,
    desired_state_names_the_published_bundle_and_bumps_the_revision,
    a_deployment_naming_a_device_that_is_not_enrolled_is_a_conflict_and_writes_nothing,
    a_cohort_default_for_a_device_that_is_not_enrolled_is_a_conflict_and_writes_nothing,
    republishing_a_version_with_other_bytes_is_a_conflict,
    a_drift_window_delivered_twice_is_stored_once_and_summarised_per_device,
    an_older_status_does_not_overwrite_a_newer_one,
    a_status_repeated_at_every_check_in_is_one_history_line_and_a_change_is_another,
    a_corrupt_update_step_is_an_error_naming_the_device_not_a_missing_step,
    a_sequenced_report_is_stored_once_and_a_redelivery_is_a_duplicate_even_after_the_floor_moved,
    a_batch_is_stored_in_one_go_with_one_outcome_per_report_in_order_even_for_repeats_within_it,
    an_older_heartbeat_delivered_late_does_not_turn_counters_back,
    a_batch_leaves_heartbeats_windows_and_statuses_as_they_would_be_stored_one_by_one,
    eviction_events_add_up_per_device,
    telemetry_rows_are_stored_once_per_sequence_and_read_back_by_model_and_version,
    drift_windows_and_telemetry_stored_before_the_cutoff_are_pruned_in_batches_and_the_rest_kept,
    retention_keeps_what_a_running_rollout_may_read,
    a_rollouts_activation_window_reaches_the_desired_state_and_a_deploy_clears_it,
    a_rollout_saved_by_another_writer_since_it_was_read_is_refused_as_stale,
    a_rollout_save_writes_the_members_it_names_and_keeps_the_others_as_stored,
    a_rollouts_desired_writes_raise_only_the_changed_devices_revisions_and_a_deploy_raises_every_one,
    a_lease_has_one_holder_until_it_expires_or_is_released,
    only_running_and_paused_rollouts_are_read_as_active_and_every_phase_is_counted,
    ingest_batches_check_ins_and_desired_writes_at_once_never_deadlock,
);

fn device(store: &TestStore, id: &str) {
    store
        .insert_device(&NewDevice {
            id: id.into(),
            name: id.into(),
            labels: [("site".to_string(), "a".to_string())].into(),
            credential_hash: format!("hash-{id}"),
            enrolled_ms: 1,
            public_key: String::new(),
            broker_hash: String::new(),
        })
        .unwrap();
}

/// Turns a migrated store back into one as version 2 left it (no telemetry arrival time, a drift
/// window stored before arrival times existed), holding rows whose devices' clocks say 1970.
pub(crate) const BACK_TO_VERSION_2: &str = "
    DELETE FROM schema_migrations WHERE version = 3;
    DROP INDEX drift_by_received;
    DROP INDEX telemetry_by_received;
    ALTER TABLE telemetry DROP COLUMN received_ms;
    INSERT INTO telemetry (device, seq, model, version, at_ms, latency_us, features, outputs)
        VALUES ('d1', 1, 'tabular', '1.0.0', 1000, 7, '', '');
    INSERT INTO drift (device, model, version, window_start_ms, window_end_ms, samples, score, counts)
        VALUES ('d1', 'tabular', '1.0.0', 1000, 2000, 5, 0.1, '');";

/// After the upgrade to version 3, the rows of [`BACK_TO_VERSION_2`] count as stored at the
/// upgrade: retention deletes them only once its period has passed since.
pub(crate) fn upgraded_rows_count_as_stored_at_the_upgrade(store: &dyn Store, upgraded_at_ms: u64) {
    assert_eq!(store.prune(upgraded_at_ms - 60_000, 10).unwrap(), Pruned::default(), "nothing deleted at once");
    let both = Pruned { drift_windows: 1, telemetry_rows: 1 };
    assert_eq!(store.prune(crate::unix_ms() + 60_000, 10).unwrap(), both, "then both, by their arrival");
}

/// A 10 ms drift window of model tabular 1.0.0 from `start_ms`, 5 rows.
fn drift_window(start_ms: u64) -> DriftSummary {
    DriftSummary {
        model: "tabular".into(),
        version: "1.0.0".into(),
        window_start_ms: start_ms,
        window_end_ms: start_ms + 10,
        sketch: WindowSketch { rows: 5, ..Default::default() },
        shadow: None,
    }
}

/// Telemetry row `seq` of model tabular at `version` (its device time is `seq * 10`).
pub(crate) fn telemetry_row(seq: u64, version: &str) -> proto::delivery::TelemetryRow {
    proto::delivery::TelemetryRow {
        seq,
        at_ms: seq * 10,
        model: "tabular".into(),
        version: version.into(),
        latency_us: 7,
        features: vec![seq as f32, 0.5],
        outputs: vec![0.25],
    }
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

pub(crate) fn new_device(id: &str, credential_hash: &str, enrolled_ms: u64) -> NewDevice {
    NewDevice {
        id: id.into(),
        name: id.into(),
        labels: Default::default(),
        credential_hash: credential_hash.into(),
        enrolled_ms,
        public_key: String::new(),
        broker_hash: format!("$6$salt${credential_hash}"),
    }
}

fn an_enrollment_token_enrolls_one_device_and_a_retry_within_the_grace_period_gets_that_device_back(store: &TestStore) {
    store.create_tokens(&["t1".into()], 1, 1_000).unwrap();
    assert_eq!(store.enroll("t1", &new_device("a", "ca", 2), 100).unwrap(), Ok("a".into()));
    // The reply was lost: the agent retries with the same token and gets a new credential.
    assert_eq!(store.enroll("t1", &new_device("b", "cb", 50), 100).unwrap(), Ok("a".into()));
    assert_eq!(store.device_for_credential("cb").unwrap(), Some("a".into()));
    assert_eq!(store.broker_passwords().unwrap(), vec![("a".to_string(), "$6$salt$cb".to_string())]);
    assert_eq!(store.device_for_credential("ca").unwrap(), None, "the lost credential no longer works");
    assert!(!store.device_exists("b").unwrap(), "no second device for one token");
    let after_grace = store.enroll("t1", &new_device("c", "cc", 500), 100).unwrap();
    assert_eq!(after_grace, Err(EnrollRefusal::UnknownOrUsed), "after the grace period");
    assert_eq!(store.enroll("unknown", &new_device("d", "cd", 3), 100).unwrap(), Err(EnrollRefusal::UnknownOrUsed));
}

/// The stores run calls at once (SQLite's readers, PostgreSQL's pool; several servers on one
/// database): one token used by eight enrollments at the same moment still makes one device.
fn enrollments_racing_with_one_token_make_one_device(store: &TestStore) {
    store.create_tokens(&["t1".into()], 1, 1_000).unwrap();
    const RACERS: usize = 8;
    let start = std::sync::Barrier::new(RACERS);
    let enrolled: Vec<_> = std::thread::scope(|threads| {
        let racing: Vec<_> = (0..RACERS)
            .map(|i| {
                let start = &start;
                threads.spawn(move || {
                    // Open the store's connections first (a call each, at once), then race.
                    start.wait();
                    store.device_ids().unwrap();
                    start.wait();
                    store.enroll("t1", &new_device(&format!("d{i}"), &format!("c{i}"), 2), 100)
                })
            })
            .collect();
        racing.into_iter().map(|t| t.join().unwrap().unwrap()).collect()
    });
    let first = enrolled[0].clone().expect("within the grace period every attempt gets the device");
    assert!(enrolled.iter().all(|e| e.as_ref() == Ok(&first)), "one device for all: {enrolled:?}");
    assert_eq!(store.device_ids().unwrap(), vec![first]);
}

fn expired_and_revoked_tokens_enroll_nothing(store: &TestStore) {
    store.create_tokens(&["old".into(), "gone".into()], 1, 1_000).unwrap();
    assert_eq!(store.enroll("old", &new_device("a", "ca", 1_000), 100).unwrap(), Err(EnrollRefusal::Expired));
    assert!(store.revoke_token("gone", 5).unwrap());
    assert!(!store.revoke_token("gone", 6).unwrap(), "revoked once");
    assert_eq!(store.enroll("gone", &new_device("b", "cb", 10), 100).unwrap(), Err(EnrollRefusal::Revoked));
    assert!(store.device_ids().unwrap().is_empty());
}

fn a_revoked_device_has_no_credential_no_key_and_cannot_re_enroll_within_grace(store: &TestStore) {
    store.create_tokens(&["t1".into()], 1, 10_000).unwrap();
    let mut device = new_device("a", "ca", 2);
    device.public_key = "ab".repeat(32);
    store.enroll("t1", &device, 1_000).unwrap().unwrap();
    assert!(store.revoke_device("a", 3).unwrap());
    assert!(!store.revoke_device("nobody", 3).unwrap());
    assert_eq!(store.device_for_credential("ca").unwrap(), None);
    assert_eq!(store.device_public_key("a").unwrap(), None);
    assert_eq!(store.enroll("t1", &new_device("a2", "cx", 4), 1_000).unwrap(), Err(EnrollRefusal::Revoked));
    assert_eq!(store.list_devices().unwrap()[0].revoked_ms, Some(3));
    assert!(store.broker_passwords().unwrap().is_empty(), "a revoked device leaves the broker's password file");
}

fn operators_are_found_by_token_digest_until_revoked(store: &TestStore) {
    let alice = OperatorRecord {
        name: "alice".into(),
        role: proto::wire::Role::Viewer,
        token_hash: "h1".into(),
        created_ms: 1,
        revoked_ms: None,
    };
    store.put_operator(&alice, false).unwrap();
    assert!(matches!(store.put_operator(&alice, false), Err(StoreError::Conflict(_))), "names are unique");
    assert_eq!(store.operator_for_token("h1").unwrap(), Some(alice.clone()));
    assert!(store.revoke_operator("alice", 9).unwrap());
    assert_eq!(store.operator_for_token("h1").unwrap(), None);
    assert_eq!(store.operators().unwrap()[0].revoked_ms, Some(9));
    let replaced = OperatorRecord { token_hash: "h2".into(), role: proto::wire::Role::Admin, ..alice };
    store.put_operator(&replaced, true).unwrap();
    assert_eq!(store.operator_for_token("h2").unwrap(), Some(replaced));
}

fn desired_state_names_the_published_bundle_and_bumps_the_revision(store: &TestStore) {
    device(store, "d1");
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    assert_eq!(store.set_desired(&["d1".into()], "tabular", "1.0.0").unwrap(), vec![("d1".to_string(), 1)]);
    let desired = store.desired_state("d1").unwrap();
    assert_eq!(desired.revision, 1);
    assert_eq!(desired.models[0].bundle_path, "/api/v1/bundles/tabular/1.0.0");
    assert_eq!((desired.models[0].bundle_sha256.as_str(), desired.models[0].bundle_size), ("aa", 10));
    assert_eq!(store.set_desired(&["d1".into()], "tabular", "1.0.0").unwrap()[0].1, 2);
    // A check-in marks the device seen, stores what it reports and reads the same desired state,
    // with a freshness counter that rises each time when asked for.
    let status = UpdateStatus {
        model: "tabular".into(),
        version: "1.0.0".into(),
        step: UpdateStep::Active,
        detail: String::new(),
        active_version: Some("1.0.0".into()),
        at_ms: 40,
    };
    let (seen, counter) = store.check_in("d1", 50, std::slice::from_ref(&status), true).unwrap();
    assert_eq!((seen.revision, seen.models.len(), counter), (2, 1, Some(1)));
    assert_eq!(store.check_in("d1", 60, &[], true).unwrap().1, Some(2));
    assert_eq!(store.check_in("d1", 70, &[], false).unwrap().1, None);
    let view = &store.list_devices().unwrap()[0];
    assert_eq!((view.last_seen_ms, view.models[0].active_version.as_deref()), (Some(70), Some("1.0.0")));
}

fn a_deployment_naming_a_device_that_is_not_enrolled_is_a_conflict_and_writes_nothing(store: &TestStore) {
    device(store, "d1");
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    let refused = store.set_desired(&["d1".into(), "ghost".into()], "tabular", "1.0.0");
    match refused {
        Err(StoreError::Conflict(message)) => assert_eq!(message, "device \"ghost\" is not enrolled"),
        other => panic!("expected a conflict naming the device, got {other:?}"),
    }
    let d1 = store.desired_state("d1").unwrap();
    assert_eq!((d1.revision, d1.models.len()), (0, 0), "the enrolled device named with it was not told either");
    // Enrolled later, the device finds no desired row left behind for it.
    device(store, "ghost");
    assert!(store.desired_state("ghost").unwrap().models.is_empty());
    assert_eq!(store.set_desired(&["d1".into()], "tabular", "1.0.0").unwrap(), vec![("d1".to_string(), 1)]);
}

fn a_cohort_default_for_a_device_that_is_not_enrolled_is_a_conflict_and_writes_nothing(store: &TestStore) {
    device(store, "d1");
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    let newcomers = [("d1".to_string(), "1.0.0".to_string()), ("ghost".to_string(), "1.0.0".to_string())];
    match store.apply_cohort_defaults("tabular", &newcomers, &[]) {
        Err(StoreError::Conflict(message)) => assert_eq!(message, "device \"ghost\" is not enrolled"),
        other => panic!("expected a conflict naming the device, got {other:?}"),
    }
    let d1 = store.desired_state("d1").unwrap();
    assert_eq!((d1.revision, d1.models.len()), (0, 0), "the enrolled newcomer named with it was not told either");
    device(store, "ghost");
    assert!(store.desired_state("ghost").unwrap().models.is_empty(), "no desired row left behind");
    assert_eq!(store.apply_cohort_defaults("tabular", &newcomers[..1], &[]).unwrap(), vec![("d1".to_string(), 1)]);
}

fn republishing_a_version_with_other_bytes_is_a_conflict(store: &TestStore) {
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    let err = store.put_bundle(&bundle("1.0.0", "bb")).unwrap_err();
    assert!(err.to_string().contains("already published with different contents"), "{err}");
}

fn a_drift_window_delivered_twice_is_stored_once_and_summarised_per_device(store: &TestStore) {
    device(store, "d1");
    let summary = drift_window(10);
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
                    shadow_version: None,
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
    // The window is read with when the server stored it; a read of what is newer skips it.
    std::thread::sleep(std::time::Duration::from_millis(2));
    let before = crate::unix_ms();
    let later = DriftSummary { window_start_ms: 70, window_end_ms: 80, ..summary.clone() };
    assert!(store.record_drift("d1", &StoredDrift { summary: &later, ..stored }).unwrap());
    let all = store.observation_rows("tabular", 0, 0).unwrap().windows;
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|w| w.received_ms > 0 && w.received_ms <= crate::unix_ms()), "{all:?}");
    let new = store.observation_rows("tabular", 0, before).unwrap().windows;
    assert_eq!(new.iter().map(|w| w.start_ms).collect::<Vec<_>>(), [70], "only the window stored since");
    assert!(store.observation_rows("tabular", 0, crate::unix_ms() + 60_000).unwrap().windows.is_empty());
    assert_eq!(store.observation_rows("tabular", 50, 0).unwrap().windows.len(), 1, "since a window start");
}

fn an_older_status_does_not_overwrite_a_newer_one(store: &TestStore) {
    device(store, "d1");
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

fn a_status_repeated_at_every_check_in_is_one_history_line_and_a_change_is_another(store: &TestStore) {
    device(store, "d1");
    let status = |version: &str, step, at_ms| UpdateStatus {
        model: "tabular".into(),
        version: version.into(),
        step,
        detail: String::new(),
        active_version: Some("1.0.0".into()),
        at_ms,
    };
    store.record_status("d1", &status("1.0.0", UpdateStep::Active, 10)).unwrap();
    for at_ms in 20..(20 + 2 * MAX_HISTORY as u64) {
        store.check_in("d1", at_ms, &[status("1.0.0", UpdateStep::Active, at_ms)], false).unwrap();
    }
    store.record_status("d1", &status("2.0.0", UpdateStep::Downloading, 500)).unwrap();
    store.record_status("d1", &status("2.0.0", UpdateStep::Downloading, 501)).unwrap();
    store.record_status("d1", &status("1.0.0", UpdateStep::Active, 502)).unwrap();
    let steps: Vec<(String, UpdateStep, u64)> = store
        .status_history("d1", "tabular")
        .unwrap()
        .into_iter()
        .map(|entry| (entry.version, entry.step, entry.at_ms))
        .collect();
    // The first report of each step, newest first; the repeats changed nothing.
    assert_eq!(
        steps,
        vec![
            ("1.0.0".to_string(), UpdateStep::Active, 502),
            ("2.0.0".to_string(), UpdateStep::Downloading, 500),
            ("1.0.0".to_string(), UpdateStep::Active, 10),
        ]
    );
    // The current status still follows every report.
    assert_eq!(store.list_devices().unwrap()[0].models[0].step, Some(UpdateStep::Active));
}

fn a_corrupt_update_step_is_an_error_naming_the_device_not_a_missing_step(store: &TestStore) {
    device(store, "d1");
    store
        .execute_sql("INSERT INTO model_status (device, model, step, detail) VALUES ('d1', 'tabular', 'exploded', '')");
    let err = store.observation_rows("tabular", 0, 0).unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt(why) if why.contains("d1") && why.contains("\"exploded\"")), "{err}");
    assert!(matches!(store.list_devices(), Err(StoreError::Corrupt(_))));
}

fn heartbeat(at_ms: u64, inferences: u64) -> Heartbeat {
    Heartbeat {
        at_ms,
        uptime_secs: 1,
        health: Health::default(),
        models: vec![ModelCounters {
            model: "tabular".into(),
            version: "1.0.0".into(),
            inferences,
            errors: 0,
            telemetry_dropped: 0,
            latency_p95_us: None,
            shadow_version: None,
        }],
    }
}

fn a_sequenced_report_is_stored_once_and_a_redelivery_is_a_duplicate_even_after_the_floor_moved(store: &TestStore) {
    device(store, "d1");
    let hb = heartbeat(10, 5);
    assert_eq!(store.record_report("d1", 1, 1, &Report::Heartbeat(&hb)).unwrap(), Accepted::Stored);
    assert_eq!(store.record_report("d1", 1, 1, &Report::Heartbeat(&hb)).unwrap(), Accepted::Duplicate);
    assert_eq!(store.record_report("d1", 3, 3, &Report::Heartbeat(&hb)).unwrap(), Accepted::Stored);
    // The device said everything below 3 is settled: a late copy of 1 or 2 is not stored.
    assert_eq!(store.record_report("d1", 2, 1, &Report::Heartbeat(&hb)).unwrap(), Accepted::Duplicate);
    assert_eq!(store.record_report("nobody", 1, 1, &Report::Heartbeat(&hb)).unwrap(), Accepted::UnknownDevice);
    let view = store.delivery().unwrap().remove(0);
    assert_eq!((view.reports_stored, view.reports_duplicates), (2, 2));
}

fn a_batch_is_stored_in_one_go_with_one_outcome_per_report_in_order_even_for_repeats_within_it(store: &TestStore) {
    device(store, "d1");
    device(store, "d2");
    let hb = heartbeat(10, 5);
    let report = |device, seq, floor| SequencedReport { device, seq, floor, report: Report::Heartbeat(&hb) };
    let batch = [
        report("d1", 1, 1),
        report("d2", 1, 1),
        report("d1", 1, 1),
        report("nobody", 1, 1),
        report("d1", 5, 5),
        // Below the floor the report before it moved.
        report("d1", 3, 1),
        report("d1", 6, 5),
    ];
    assert_eq!(
        store.record_reports(&batch).unwrap(),
        vec![
            Accepted::Stored,
            Accepted::Stored,
            Accepted::Duplicate,
            Accepted::UnknownDevice,
            Accepted::Stored,
            Accepted::Duplicate,
            Accepted::Stored
        ]
    );
    // The floor moved to 5 within the batch: a late 2 is settled, a 6 was received.
    assert_eq!(store.record_reports(&[report("d1", 2, 1)]).unwrap(), vec![Accepted::Duplicate]);
    assert_eq!(store.record_reports(&[report("d1", 6, 5)]).unwrap(), vec![Accepted::Duplicate]);
    assert_eq!(store.record_reports(&[report("d1", 7, 5)]).unwrap(), vec![Accepted::Stored]);
    let views = store.delivery().unwrap();
    let d1 = views.iter().find(|v| v.device == "d1").unwrap();
    assert_eq!((d1.reports_stored, d1.reports_duplicates), (4, 4));
    let d2 = views.iter().find(|v| v.device == "d2").unwrap();
    assert_eq!((d2.reports_stored, d2.reports_duplicates), (1, 0));
}

fn an_older_heartbeat_delivered_late_does_not_turn_counters_back(store: &TestStore) {
    device(store, "d1");
    store.record_report("d1", 2, 1, &Report::Heartbeat(&heartbeat(20, 900))).unwrap();
    store.record_report("d1", 1, 1, &Report::Heartbeat(&heartbeat(10, 100))).unwrap();
    let devices = store.list_devices().unwrap();
    assert_eq!(devices[0].models[0].inferences, 900);
}

fn a_batch_leaves_heartbeats_windows_and_statuses_as_they_would_be_stored_one_by_one(store: &TestStore) {
    device(store, "d1");
    device(store, "d2");
    let (newer, older, d2_beat) = (heartbeat(20, 900), heartbeat(10, 100), heartbeat(5, 7));
    let window = drift_window(10);
    let drift = || Report::Drift(StoredDrift { summary: &window, score: 0.2, mean_confidence: None });
    let installed = UpdateStatus {
        model: "tabular".into(),
        version: "2.0.0".into(),
        step: UpdateStep::Active,
        detail: String::new(),
        active_version: Some("2.0.0".into()),
        at_ms: 6,
    };
    let report = |device, seq, report| SequencedReport { device, seq, floor: 1, report };
    let batch = [
        report("d1", 1, Report::Heartbeat(&newer)),
        report("d1", 2, Report::Heartbeat(&older)),
        report("d2", 1, Report::Heartbeat(&d2_beat)),
        report("d1", 3, drift()),
        report("d1", 4, drift()),
        report("d2", 2, Report::Status(&installed)),
    ];
    assert_eq!(store.record_reports(&batch).unwrap(), vec![Accepted::Stored; 6]);
    let rows = store.observation_rows("tabular", 0, 0).unwrap();
    let status = |device: &str| rows.statuses.iter().find(|s| s.device == device).unwrap().clone();
    // The older heartbeat, later in the batch, did not turn d1's counters back.
    assert_eq!(status("d1").inferences, 900);
    // The status after d2's heartbeat says which version is active; the heartbeat's counters stay.
    assert_eq!((status("d2").active_version.as_deref(), status("d2").inferences), (Some("2.0.0"), 7));
    // One window, sent twice in the batch, is stored once.
    assert_eq!(rows.windows.len(), 1);
    let view = store.list_devices().unwrap();
    assert_eq!(view.iter().find(|d| d.id == "d1").unwrap().last_seen_ms, Some(20));
}

fn eviction_events_add_up_per_device(store: &TestStore) {
    device(store, "d1");
    let evicted = proto::delivery::Evicted { telemetry: 10, heartbeats: 2, reports: 0 };
    let event = proto::delivery::DeliveryEvent::Evicted { at_ms: 1, evicted };
    store.record_report("d1", 1, 1, &Report::Event(&event)).unwrap();
    let later = |seq| SequencedReport { device: "d1", seq, floor: 1, report: Report::Event(&event) };
    store.record_reports(&[later(2), later(3), later(3)]).unwrap();
    assert_eq!(
        store.delivery().unwrap()[0].evicted,
        proto::delivery::Evicted { telemetry: 30, heartbeats: 6, reports: 0 }
    );
}

fn telemetry_rows_are_stored_once_per_sequence_and_read_back_by_model_and_version(store: &TestStore) {
    device(store, "d1");
    let row = telemetry_row;
    let rows = vec![row(1, "1.0.0"), row(2, "1.0.0"), row(3, "2.0.0")];
    let ack = store.record_telemetry("d1", &rows).unwrap();
    assert_eq!((ack.through, ack.stored, ack.duplicates), (3, 3, 0));
    let again = store.record_telemetry("d1", &rows[1..]).unwrap();
    assert_eq!((again.through, again.stored, again.duplicates), (3, 0, 2));
    let q = TelemetryQuery { model: "tabular".into(), version: Some("1.0.0".into()), limit: 10, ..Default::default() };
    let got = store.telemetry(&q).unwrap();
    assert_eq!(got.iter().map(|r| r.row.clone()).collect::<Vec<_>>(), rows[..2].to_vec());
    let page = TelemetryQuery { after: Some(("d1".into(), 1)), version: None, ..q };
    assert_eq!(store.telemetry(&page).unwrap().len(), 2);
}

fn drift_windows_and_telemetry_stored_before_the_cutoff_are_pruned_in_batches_and_the_rest_kept(store: &TestStore) {
    device(store, "d1");
    for start in [10, 20, 30] {
        let summary = drift_window(start);
        assert!(store
            .record_drift("d1", &StoredDrift { summary: &summary, score: 0.1, mean_confidence: None })
            .unwrap());
    }
    let rows: Vec<_> = (1..=3).map(|seq| telemetry_row(seq, "1.0.0")).collect();
    store.record_telemetry("d1", &rows).unwrap();
    let now = crate::unix_ms();
    assert_eq!(store.prune(now - 60_000, 10).unwrap(), Pruned::default(), "rows just stored are kept");
    // Two of each were stored long ago (by the server's clock, whatever the device's said).
    store.execute_sql(
        "UPDATE drift SET received_ms = 1000 WHERE window_start_ms < 30;
         UPDATE telemetry SET received_ms = 1000 WHERE seq < 3;",
    );
    let one = Pruned { drift_windows: 1, telemetry_rows: 1 };
    assert_eq!(store.prune(2000, 1).unwrap(), one, "at most the batch of each");
    assert_eq!(store.prune(2000, 10).unwrap(), one);
    assert_eq!(store.prune(2000, 10).unwrap(), Pruned::default());
    let windows = store.observation_rows("tabular", 0, 0).unwrap().windows;
    assert_eq!(windows.iter().map(|w| w.start_ms).collect::<Vec<_>>(), vec![30]);
    let q = TelemetryQuery { model: "tabular".into(), limit: 10, ..Default::default() };
    assert_eq!(store.telemetry(&q).unwrap().iter().map(|r| r.row.seq).collect::<Vec<_>>(), vec![3]);
}

fn retention_keeps_what_a_running_rollout_may_read(store: &TestStore) {
    use crate::retention::{cutoff_now, CLOCK_MARGIN_MS};
    device(store, "d1");
    let keep = std::time::Duration::from_secs(86_400);
    let now = 100 * 86_400_000;
    assert_eq!(cutoff_now(&**store, keep, now).unwrap(), now - 86_400_000, "no rollout: the retention");
    let plan: proto::rollout::RolloutPlan =
        toml::from_str("model = \"tabular\"\nversion = \"2.0.0\"\nwaves = [{percent = 100.0}]").unwrap();
    let d1 = crate::rollout::DeviceInfo { id: "d1".into(), active_version: Some("1.0.0".into()), ..Default::default() };
    let created_ms = 50 * 86_400_000;
    let mut rollout = crate::rollout::create::create("r1", plan, &[d1], &Default::default(), created_ms).unwrap();
    let save = |rollout: &mut crate::rollout::Rollout| {
        store.save_rollout(rollout, &MemberWrites::All, &[], &[]).unwrap();
        rollout.revision += 1;
    };
    save(&mut rollout);
    assert_eq!(cutoff_now(&**store, keep, now).unwrap(), created_ms - CLOCK_MARGIN_MS, "running: its windows stay");
    rollout.phase = crate::rollout::Phase::Paused;
    save(&mut rollout);
    assert_eq!(cutoff_now(&**store, keep, now).unwrap(), created_ms - CLOCK_MARGIN_MS, "paused: likewise");
    rollout.phase = crate::rollout::Phase::Aborted;
    save(&mut rollout);
    assert_eq!(cutoff_now(&**store, keep, now).unwrap(), now - 86_400_000, "finished: the retention again");
}

fn a_rollouts_activation_window_reaches_the_desired_state_and_a_deploy_clears_it(store: &TestStore) {
    device(store, "d1");
    store.put_bundle(&bundle("2.0.0", "bb")).unwrap();
    let plan: proto::rollout::RolloutPlan =
        toml::from_str("model = \"tabular\"\nversion = \"2.0.0\"\nwaves = [{percent = 100.0}]").unwrap();
    let d1 = crate::rollout::DeviceInfo { id: "d1".into(), active_version: Some("1.0.0".into()), ..Default::default() };
    let mut rollout = crate::rollout::create::create("r1", plan, &[d1], &Default::default(), 1).unwrap();
    let window = proto::window::ActivationWindow::new("02:00", "04:00");
    let change = |window: Option<&proto::window::ActivationWindow>| DesiredChange {
        device: "d1".into(),
        version: "2.0.0".into(),
        attempt: 0,
        shadow: None,
        window: window.cloned(),
    };
    assert_eq!(store.save_rollout(&rollout, &MemberWrites::All, &[], &[change(Some(&window))]).unwrap().len(), 1);
    assert_eq!(store.desired_state("d1").unwrap().models[0].activation_window, Some(window.clone()));
    rollout.revision += 1;
    assert!(
        store.save_rollout(&rollout, &MemberWrites::All, &[], &[change(Some(&window))]).unwrap().is_empty(),
        "unchanged"
    );
    rollout.revision += 1;
    let wider = proto::window::ActivationWindow::new("01:00", "05:00");
    assert_eq!(
        store.save_rollout(&rollout, &MemberWrites::All, &[], &[change(Some(&wider))]).unwrap().len(),
        1,
        "a new window is a change"
    );
    store.set_desired(&["d1".into()], "tabular", "2.0.0").unwrap();
    assert_eq!(store.desired_state("d1").unwrap().models[0].activation_window, None, "a deploy activates at once");
}

fn a_rollouts_desired_writes_raise_only_the_changed_devices_revisions_and_a_deploy_raises_every_one(store: &TestStore) {
    for id in ["d1", "d2", "d3", "d4"] {
        device(store, id);
    }
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    store.put_bundle(&bundle("2.0.0", "bb")).unwrap();
    let plan: proto::rollout::RolloutPlan =
        toml::from_str("model = \"tabular\"\nversion = \"2.0.0\"\nwaves = [{percent = 100.0}]").unwrap();
    let infos: Vec<crate::rollout::DeviceInfo> = ["d1", "d2", "d3", "d4"]
        .iter()
        .map(|id| crate::rollout::DeviceInfo {
            id: id.to_string(),
            active_version: Some("1.0.0".into()),
            ..Default::default()
        })
        .collect();
    let mut rollout = crate::rollout::create::create("r1", plan, &infos, &Default::default(), 1).unwrap();
    let change = |device: &str, version: &str, attempt: u32, shadow: Option<(&str, f32)>| DesiredChange {
        device: device.into(),
        version: version.into(),
        attempt,
        shadow: shadow.map(|(v, r)| (v.to_string(), r)),
        window: None,
    };
    let mut save = |desired: &[DesiredChange]| {
        let revised = store.save_rollout(&rollout, &MemberWrites::All, &[], desired).unwrap();
        rollout.revision += 1;
        revised
    };
    let pairs =
        |list: &[(&str, u64)]| -> Vec<(String, u64)> { list.iter().map(|(d, r)| (d.to_string(), *r)).collect() };

    // Devices told for the first time, in the order the decision named them.
    let first = [change("d3", "2.0.0", 0, None), change("d1", "2.0.0", 0, None), change("d2", "2.0.0", 0, None)];
    assert_eq!(save(&first), pairs(&[("d3", 1), ("d1", 1), ("d2", 1)]));
    // Told the same: nothing. A new attempt, a shadow, another shadow rate: each a change.
    let second = [
        change("d1", "2.0.0", 0, None),
        change("d2", "2.0.0", 1, None),
        change("d3", "1.0.0", 0, Some(("2.0.0", 0.5))),
    ];
    assert_eq!(save(&second), pairs(&[("d2", 2), ("d3", 2)]));
    assert!(save(&second).is_empty(), "the same assertion again changes nothing");
    assert_eq!(save(&[change("d3", "1.0.0", 0, Some(("2.0.0", 0.25)))]), pairs(&[("d3", 3)]));
    let d3 = store.desired_state("d3").unwrap();
    assert_eq!((d3.revision, d3.models[0].version.as_str()), (3, "1.0.0"));
    assert_eq!(d3.models[0].shadow.as_ref().map(|s| s.version.as_str()), Some("2.0.0"));
    assert_eq!(store.desired_state("d4").unwrap().revision, 0, "a device not named is not touched");

    // A deployment raises every device it names, told the same or not; it keeps the attempt and
    // drops the shadow.
    assert_eq!(
        store.set_desired(&["d2".into(), "d3".into(), "d4".into()], "tabular", "2.0.0").unwrap(),
        pairs(&[("d2", 3), ("d3", 4), ("d4", 1)])
    );
    assert_eq!(store.set_desired(&["d4".into()], "tabular", "2.0.0").unwrap(), pairs(&[("d4", 2)]));
    let (d2, d3) = (store.desired_state("d2").unwrap(), store.desired_state("d3").unwrap());
    assert_eq!((d2.models[0].version.as_str(), d2.models[0].attempt), ("2.0.0", 1));
    assert_eq!((d3.models[0].version.as_str(), d3.models[0].shadow.is_none()), ("2.0.0", true));
}

fn a_rollout_saved_by_another_writer_since_it_was_read_is_refused_as_stale(store: &TestStore) {
    device(store, "d1");
    let plan: proto::rollout::RolloutPlan =
        toml::from_str("model = \"tabular\"\nversion = \"2.0.0\"\nwaves = [{percent = 100.0}]").unwrap();
    let d1 = crate::rollout::DeviceInfo { id: "d1".into(), active_version: Some("1.0.0".into()), ..Default::default() };
    let created = crate::rollout::create::create("r1", plan, &[d1], &Default::default(), 1).unwrap();
    store.save_rollout(&created, &MemberWrites::All, &[], &[]).unwrap();
    assert!(
        matches!(store.save_rollout(&created, &MemberWrites::All, &[], &[]), Err(StoreError::Stale(id)) if id == "r1"),
        "created twice"
    );
    // Two servers read revision 1; the first to save wins, the second is refused and changes nothing.
    let read = store.rollout("r1").unwrap().unwrap();
    assert_eq!(read.revision, 1);
    let mut paused = read.clone();
    paused.phase = crate::rollout::Phase::Paused;
    store.save_rollout(&paused, &MemberWrites::All, &[], &[]).unwrap();
    let mut advanced = read.clone();
    advanced.wave = 1;
    let change = DesiredChange { device: "d1".into(), version: "2.0.0".into(), attempt: 0, shadow: None, window: None };
    let refused = store.save_rollout(&advanced, &MemberWrites::All, &[], &[change]);
    assert!(matches!(refused, Err(StoreError::Stale(_))), "{refused:?}");
    let stored = store.rollout("r1").unwrap().unwrap();
    assert_eq!((stored.phase, stored.wave, stored.revision), (crate::rollout::Phase::Paused, 0, 2));
    assert!(store.desired_state("d1").unwrap().models.is_empty(), "a refused save wrote desired versions");
    // Read again, it saves.
    let mut again = stored;
    again.wave = 1;
    store.save_rollout(&again, &MemberWrites::All, &[], &[]).unwrap();
    assert_eq!(store.rollout("r1").unwrap().unwrap().revision, 3);
}

/// A rollout `r1` of eight devices (some in the holdout), one of them failed with a reason that
/// holds a quote, and one that joined late.
pub(crate) fn rollout_with_a_late_joiner() -> crate::rollout::Rollout {
    use crate::rollout::create::{admit_late_joiners, create, Busy};
    use crate::rollout::DeviceInfo;
    let plan: proto::rollout::RolloutPlan = toml::from_str(
        "model = \"tabular\"\nversion = \"2.0.0\"\nholdout = 0.3\nwaves = [{percent = 50.0}, {percent = 100.0}]",
    )
    .unwrap();
    let info = |id: &str| DeviceInfo { id: id.into(), active_version: Some("1.0.0".into()), ..Default::default() };
    let devices: Vec<DeviceInfo> = (1..=7).map(|i| info(&format!("d{i}"))).collect();
    let mut rollout = create("r1", plan, &devices, &Busy::new(), 1).unwrap();
    let first = rollout.order[0].clone();
    let member = rollout.members.get_mut(&first).unwrap();
    member.status = crate::rollout::MemberStatus::Failed("checksum of 'model.onnx' differs".into());
    member.wave = Some(0);
    member.assigned_ms = Some(5);
    admit_late_joiners(&rollout, &[info("d8")], &Busy::new()).unwrap().rollout
}

fn a_rollout_save_writes_the_members_it_names_and_keeps_the_others_as_stored(store: &TestStore) {
    use crate::rollout::state::member_writes;
    use crate::rollout::{MemberStatus, Rollout};
    let created = rollout_with_a_late_joiner();
    store.save_rollout(&created, &MemberWrites::All, &[], &[]).unwrap();
    let read = store.rollout("r1").unwrap().unwrap();
    assert_eq!(read, Rollout { revision: 1, ..created.clone() }, "read back whole, the late joiner in its place");

    // A tick moves one member and the wave: the save names that member only.
    let mut moved = read.clone();
    let second = moved.order[1].clone();
    moved.members.get_mut(&second).unwrap().status = MemberStatus::Active;
    moved.wave = 1;
    let writes = member_writes(&read, &moved);
    assert_eq!(writes, MemberWrites::Only(vec![second.clone()]));
    store.save_rollout(&moved, &writes, &[], &[]).unwrap();
    assert_eq!(store.rollout("r1").unwrap().unwrap(), Rollout { revision: 2, ..moved.clone() });

    // What a save does not name stays as stored, whatever the saved copy holds.
    let mut unnamed = Rollout { revision: 2, ..moved.clone() };
    let third = unnamed.order[2].clone();
    unnamed.members.get_mut(&third).unwrap().status = MemberStatus::Active;
    store.save_rollout(&unnamed, &MemberWrites::Only(Vec::new()), &[], &[]).unwrap();
    let stored = store.rollout("r1").unwrap().unwrap();
    assert_eq!(stored.members[&third], read.members[&third], "a member not named was written");
    assert_eq!(stored.members[&second].status, MemberStatus::Active);

    // All replaces the stored members: one gone from the saved copy is gone from the store.
    let mut shrunk = stored.clone();
    shrunk.members.remove("d8");
    shrunk.order.retain(|id| id != "d8");
    assert_eq!(member_writes(&stored, &shrunk), MemberWrites::All);
    store.save_rollout(&shrunk, &MemberWrites::All, &[], &[]).unwrap();
    assert_eq!(store.rollout("r1").unwrap().unwrap(), Rollout { revision: 4, ..shrunk.clone() });

    // Naming a member the rollout does not have is refused before anything is written.
    let refused =
        store.save_rollout(&Rollout { revision: 4, ..shrunk }, &MemberWrites::Only(vec!["d8".into()]), &[], &[]);
    assert!(matches!(refused, Err(StoreError::Corrupt(ref text)) if text.contains("d8")), "{refused:?}");
    assert_eq!(store.rollout("r1").unwrap().unwrap().revision, 4);
}

/// Turns a migrated store's rollout `r1` back into one stored whole in its state (its members
/// and order in the JSON, no member rows), as before migration `version`.
pub(crate) fn back_to_whole_rollout_states(version: i64, rollout: &crate::rollout::Rollout) -> String {
    let whole = serde_json::to_string(rollout).unwrap().replace('\'', "''");
    format!(
        "DELETE FROM schema_migrations WHERE version = {version};
         DROP TABLE rollout_members;
         UPDATE rollouts SET state = '{whole}' WHERE id = 'r1';"
    )
}

fn only_running_and_paused_rollouts_are_read_as_active_and_every_phase_is_counted(store: &TestStore) {
    use crate::rollout::Phase;
    device(store, "d1");
    let plan: proto::rollout::RolloutPlan =
        toml::from_str("model = \"tabular\"\nversion = \"2.0.0\"\nwaves = [{percent = 100.0}]").unwrap();
    let d1 = crate::rollout::DeviceInfo { id: "d1".into(), active_version: Some("1.0.0".into()), ..Default::default() };
    assert!(store.active_rollouts().unwrap().is_empty());
    assert!(store.rollout_phases().unwrap().is_empty());
    let phases = [Phase::Completed, Phase::Running, Phase::Aborted, Phase::Paused, Phase::Completed];
    for (i, phase) in phases.into_iter().enumerate() {
        let mut rollout = crate::rollout::create::create(
            &format!("r{i}"),
            plan.clone(),
            std::slice::from_ref(&d1),
            &Default::default(),
            i as u64,
        )
        .unwrap();
        store.save_rollout(&rollout, &MemberWrites::All, &[], &[]).unwrap();
        rollout.revision = 1;
        rollout.phase = phase;
        store.save_rollout(&rollout, &MemberWrites::All, &[], &[]).unwrap();
    }
    let active: Vec<(String, Phase)> = store.active_rollouts().unwrap().into_iter().map(|r| (r.id, r.phase)).collect();
    assert_eq!(active, vec![("r3".to_string(), Phase::Paused), ("r1".to_string(), Phase::Running)], "newest first");
    assert_eq!(store.active_rollouts().unwrap()[0].revision, 2);
    assert_eq!(store.active_rollout_revisions().unwrap(), vec![("r3".to_string(), 2), ("r1".to_string(), 2)]);
    let mut counted = store.rollout_phases().unwrap();
    counted.sort_by_key(|(phase, _)| phase.as_str());
    assert_eq!(counted, vec![(Phase::Aborted, 1), (Phase::Completed, 2), (Phase::Paused, 1), (Phase::Running, 1)]);
    assert_eq!(store.rollouts().unwrap().len(), 5);
}

fn a_lease_has_one_holder_until_it_expires_or_is_released(store: &TestStore) {
    let ttl = 1_000;
    assert!(store.acquire_lease("driver", "a", 10_000, ttl).unwrap(), "a free lease is taken");
    assert!(!store.acquire_lease("driver", "b", 10_500, ttl).unwrap(), "held by a");
    assert!(store.acquire_lease("other", "b", 10_500, ttl).unwrap(), "leases are independent by name");
    assert!(store.acquire_lease("driver", "a", 10_900, ttl).unwrap(), "a renews its own");
    assert!(!store.acquire_lease("driver", "b", 11_500, ttl).unwrap(), "the renewal moved the expiry to 11,900");
    assert!(store.acquire_lease("driver", "b", 11_900, ttl).unwrap(), "an expired lease is taken over");
    assert!(!store.acquire_lease("driver", "a", 12_000, ttl).unwrap(), "a lost it");
    store.release_lease("driver", "a").unwrap();
    assert!(!store.acquire_lease("driver", "a", 12_000, ttl).unwrap(), "releasing what it does not hold does nothing");
    store.release_lease("driver", "b").unwrap();
    assert!(store.acquire_lease("driver", "a", 12_000, ttl).unwrap(), "a released lease is free at once");
}

/// Ingest batches (two servers' at once), check-ins and a wave's desired writes each change many
/// devices' rows in one transaction. On PostgreSQL each takes row locks as it goes; taken in
/// different orders they deadlocked, and the database failed one of the two (seen in the
/// 10,000-agent load run: a batch holding a device's status row waiting for its device row,
/// held by a check-in waiting for the status row; a batch and a wave each holding device rows
/// the other wanted). A deadlock here is an error from one of the calls.
fn ingest_batches_check_ins_and_desired_writes_at_once_never_deadlock(store: &TestStore) {
    const DEVICES: usize = 12;
    const ROUNDS: u64 = 25;
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("d{i:02}")).collect();
    for id in &ids {
        device(store, id);
    }
    store.put_bundle(&bundle("1.0.0", "aa")).unwrap();
    store.put_bundle(&bundle("2.0.0", "bb")).unwrap();
    let status = |at_ms| UpdateStatus {
        model: "tabular".into(),
        version: "1.0.0".into(),
        step: UpdateStep::Active,
        detail: format!("round at {at_ms}"),
        active_version: Some("1.0.0".into()),
        at_ms,
    };
    // Each device's status, then its heartbeat, in the given order of devices.
    let ingest = |order: Vec<&String>, first_seq: u64| {
        for round in 0..ROUNDS {
            let at_ms = 100 + round;
            let (status, heartbeat) = (status(at_ms), heartbeat(at_ms, round));
            let seq = first_seq + 2 * round;
            let batch: Vec<SequencedReport<'_>> = order
                .iter()
                .flat_map(|id| {
                    [
                        SequencedReport { device: id, seq, floor: 1, report: Report::Status(&status) },
                        SequencedReport { device: id, seq: seq + 1, floor: 1, report: Report::Heartbeat(&heartbeat) },
                    ]
                })
                .collect();
            store.record_reports(&batch).unwrap();
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(|| ingest(ids.iter().collect(), 1));
        scope.spawn(|| ingest(ids.iter().rev().collect(), 1_000));
        scope.spawn(|| {
            for round in 0..ROUNDS {
                for id in &ids {
                    store.check_in(id, 100 + round, &[status(100 + round)], true).unwrap();
                }
            }
        });
        scope.spawn(|| {
            let reversed: Vec<String> = ids.iter().rev().cloned().collect();
            for round in 0..ROUNDS {
                let version = if round % 2 == 0 { "2.0.0" } else { "1.0.0" };
                store.set_desired(&reversed, "tabular", version).unwrap();
            }
        });
    });
    let stored: u64 = store.delivery().unwrap().iter().map(|v| v.reports_stored).sum();
    assert_eq!(stored, 2 * 2 * ROUNDS * DEVICES as u64, "every report of both ingests stored");
}
