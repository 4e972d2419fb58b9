//! PostgreSQL-only behaviour: versioned migrations and what the server says about a database URL
//! it cannot use. The store's behaviour itself is tested against both stores in `store/tests.rs`.

use super::*;
use crate::store::tests::{new_device, TestSchema, DATABASE_URL_VAR};
use crate::store::Report;
use postgres::Client;

fn applied_versions(schema: &TestSchema) -> Vec<i64> {
    let mut client = Client::connect(&schema.url, NoTls).unwrap();
    let sql = format!("SELECT version FROM {}.schema_migrations ORDER BY version", schema.name);
    client.query(&sql, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

fn all_versions() -> Vec<i64> {
    schema::MIGRATIONS.iter().map(|(v, _)| *v).collect()
}

#[test]
fn migrations_applied_twice_are_a_no_op_and_keep_the_data() {
    let Some(schema) = TestSchema::new() else {
        return eprintln!("skipped: {DATABASE_URL_VAR} is not set");
    };
    let first = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
    first.create_tokens(&["t".into()], 1, 10).unwrap();
    assert_eq!(applied_versions(&schema), all_versions());
    let again = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
    assert_eq!(schema::migrate(&mut again.conn().unwrap()).unwrap(), 0, "nothing left to apply");
    assert_eq!(applied_versions(&schema), all_versions(), "each version recorded once");
    assert!(again.revoke_token("t", 2).unwrap(), "the token written before is still there");
}

#[test]
fn rows_from_before_retention_count_as_stored_at_the_upgrade() {
    use crate::store::tests::{upgraded_rows_count_as_stored_at_the_upgrade, BACK_TO_VERSION_2};
    let Some(schema) = TestSchema::new() else {
        return eprintln!("skipped: {DATABASE_URL_VAR} is not set");
    };
    PostgresStore::open(&schema.url, Some(&schema.name)).unwrap().execute_batch(BACK_TO_VERSION_2).unwrap();
    let upgraded_at = crate::unix_ms();
    let store = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
    assert_eq!(applied_versions(&schema), all_versions());
    upgraded_rows_count_as_stored_at_the_upgrade(&store, upgraded_at);
}

#[test]
fn two_stores_opening_the_same_fresh_schema_at_once_both_succeed() {
    let Some(schema) = TestSchema::new() else {
        return eprintln!("skipped: {DATABASE_URL_VAR} is not set");
    };
    let barrier = std::sync::Barrier::new(2);
    let opened: Vec<Result<PostgresStore, StoreError>> = std::thread::scope(|scope| {
        let open = || {
            barrier.wait();
            PostgresStore::open(&schema.url, Some(&schema.name))
        };
        let handles = [scope.spawn(open), scope.spawn(open)];
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for store in &opened {
        assert!(store.is_ok(), "{:?}", store.as_ref().err());
    }
    assert_eq!(applied_versions(&schema), all_versions());
}

#[test]
fn a_database_url_that_is_not_postgres_is_refused_without_showing_its_password() {
    let err = PostgresStore::open("mysql://fleet:s3cret@db.example/fleet", None).err().unwrap().to_string();
    assert!(err.contains("mysql://fleet@db.example/fleet") && err.contains("not a postgres:// URL"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn an_unreachable_database_is_named_without_its_password() {
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    let err = PostgresStore::open("postgres://fleet:s3cret@127.0.0.1:1/fleet", None).err().unwrap().to_string();
    assert!(err.starts_with("cannot use the PostgreSQL database at postgres://fleet@127.0.0.1:1/fleet"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn a_schema_name_that_is_not_a_plain_identifier_is_refused() {
    let err = PostgresStore::open("postgres://fleet@127.0.0.1:1/fleet", Some("x; DROP TABLE y")).err().unwrap();
    assert!(err.to_string().contains("not a plain name"), "{err}");
}

#[test]
fn a_password_is_left_out_of_the_user_part_and_the_parameters() {
    assert_eq!(
        without_password("postgres://u:pw@h:5432/db?password=x&sslmode=disable"),
        "postgres://u@h:5432/db?sslmode=disable"
    );
    assert_eq!(without_password("postgres://h/db"), "postgres://h/db");
    assert_eq!(without_password("postgresql://u@h"), "postgresql://u@h");
}

#[test]
fn a_database_error_says_what_the_database_said() {
    let Some(schema) = TestSchema::new() else {
        return eprintln!("skipped: {DATABASE_URL_VAR} is not set");
    };
    let store = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
    let err = store.execute_batch("SELECT * FROM no_such_table").unwrap_err().to_string();
    assert!(err.contains("no_such_table"), "{err}");
}

fn enrolled(store: &PostgresStore, id: &str) {
    store.insert_device(&new_device(id, &format!("hash-{id}"), 1)).unwrap();
}

fn active(detail: &str, at_ms: u64) -> UpdateStatus {
    UpdateStatus {
        model: "tabular".into(),
        version: "1.0.0".into(),
        step: proto::wire::UpdateStep::Active,
        detail: detail.into(),
        active_version: Some("1.0.0".into()),
        at_ms,
    }
}

fn view(store: &PostgresStore, id: &str) -> DeviceView {
    store.list_devices().unwrap().into_iter().find(|d| d.id == id).unwrap()
}

#[test]
fn heartbeats_stored_in_device_rows_before_version_4_move_to_their_table() {
    let Some(schema) = TestSchema::new() else {
        return eprintln!("skipped: {DATABASE_URL_VAR} is not set");
    };
    let store = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
    enrolled(&store, "d1");
    enrolled(&store, "d2");
    store
        .execute_batch(
            r#"DELETE FROM schema_migrations WHERE version = 4;
            DROP TABLE device_heartbeats;
            ALTER TABLE devices ADD COLUMN health TEXT, ADD COLUMN heartbeat_ms BIGINT;
            UPDATE devices SET last_seen_ms = 900, heartbeat_ms = 900,
              health = '{"cpu_percent":5.0,"memory_used_bytes":1,"memory_total_bytes":2,"disk_free_bytes":3,"disk_total_bytes":4}'
              WHERE id = 'd1';"#,
        )
        .unwrap();
    let store = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
    assert_eq!(applied_versions(&schema), all_versions());
    let d1 = view(&store, "d1");
    assert_eq!((d1.last_seen_ms, d1.health.map(|h| h.disk_free_bytes)), (Some(900), Some(3)));
    let d2 = view(&store, "d2");
    assert_eq!((d2.last_seen_ms, d2.health), (None, None), "no heartbeat, none made up");
    let later = Heartbeat { at_ms: 1_000, uptime_secs: 1, health: Default::default(), models: Vec::new() };
    let earlier = Heartbeat { at_ms: 800, ..later.clone() };
    store.record_heartbeat("d1", &later).unwrap();
    store.record_heartbeat("d1", &earlier).unwrap();
    let d1 = view(&store, "d1");
    assert_eq!((d1.last_seen_ms, d1.health.map(|h| h.disk_free_bytes)), (Some(1_000), Some(0)), "the newest wins");
}

/// An ingest batch holds the status rows of its devices until it commits. A check-in of one of
/// them used to queue behind it (it updated the same device row and status row); now it leaves
/// a status row another transaction holds, answers, and its next check-in writes it.
#[test]
fn a_check_in_does_not_wait_for_an_ingest_batch_holding_its_device() {
    let Some(schema) = TestSchema::new() else {
        return eprintln!("skipped: {DATABASE_URL_VAR} is not set");
    };
    let store = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
    enrolled(&store, "d1");
    let seq = |seq, report| SequencedReport { device: "d1", seq, floor: 1, report };
    let first = active("reported", 10);
    store.record_reports(&[seq(1, Report::Status(&first))]).unwrap();

    // What a batch of d1's holds, from its first statement to its commit.
    let mut batch = Client::connect(&schema.url, NoTls).unwrap();
    let mut held = batch.transaction().unwrap();
    held.batch_execute(&format!(
        "SET LOCAL search_path TO {0};
         SELECT 1 FROM delivery WHERE device = 'd1' FOR NO KEY UPDATE;
         UPDATE model_status SET inferences = inferences + 1 WHERE device = 'd1';
         INSERT INTO device_heartbeats (device, heartbeat_ms) VALUES ('d1', 5);",
        schema.name
    ))
    .unwrap();
    let (answered, answer) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| answered.send(store.check_in("d1", 50, &[active("checked in", 20)], true)).unwrap());
        let reply = answer.recv_timeout(std::time::Duration::from_secs(60));
        held.commit().unwrap();
        let (desired, counter) = reply.expect("the check-in answered while the batch held its rows").unwrap();
        assert_eq!((desired.revision, counter), (0, Some(1)));
    });
    let d1 = view(&store, "d1");
    assert_eq!(d1.last_seen_ms, Some(50), "seen, while the batch held its rows");
    assert_eq!(d1.models[0].detail, "reported", "the busy status row was left to the batch");
    store.check_in("d1", 60, &[active("checked in", 30)], false).unwrap();
    assert_eq!(view(&store, "d1").models[0].detail, "checked in", "and written by the next check-in");
}

#[test]
fn a_rollout_stored_whole_before_members_were_rows_reads_back_the_same() {
    use crate::store::tests::{back_to_whole_rollout_states, rollout_with_a_late_joiner};
    let Some(schema) = TestSchema::new() else {
        return eprintln!("skipped: {DATABASE_URL_VAR} is not set");
    };
    let created = rollout_with_a_late_joiner();
    let rollout = crate::rollout::Rollout { revision: 1, ..created.clone() };
    let store = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
    store.save_rollout(&created, &MemberWrites::All, &[], &[]).unwrap();
    store.execute_batch(&back_to_whole_rollout_states(5, &rollout)).unwrap();
    let store = PostgresStore::open(&schema.url, Some(&schema.name)).unwrap();
    assert_eq!(applied_versions(&schema), all_versions());
    assert_eq!(store.rollout("r1").unwrap(), Some(rollout.clone()));
    let mut client = Client::connect(&schema.url, NoTls).unwrap();
    let state: String = client.query_one(&format!("SELECT state FROM {}.rollouts", schema.name), &[]).unwrap().get(0);
    assert!(!state.contains("\"members\"") && !state.contains("\"order\""), "{state}");
}
