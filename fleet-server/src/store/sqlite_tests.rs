//! SQLite-only behaviour: versioned migrations over databases made before versions existed. The
//! store's behaviour itself is tested against both stores in `store/tests.rs`.

use super::*;

fn versions(path: &Path) -> Vec<i64> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn.prepare("SELECT version FROM schema_migrations ORDER BY version").unwrap();
    stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
}

fn all_versions() -> Vec<i64> {
    schema::MIGRATIONS.iter().map(|(v, _)| *v).collect()
}

#[test]
fn a_database_from_before_versioned_migrations_keeps_its_rows_and_gains_the_later_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    // The devices table as the first releases made it: none of the columns added since.
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE devices (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, labels TEXT NOT NULL,
                credential_hash TEXT NOT NULL UNIQUE, enrolled_ms INTEGER NOT NULL,
                last_seen_ms INTEGER, health TEXT, revision INTEGER NOT NULL DEFAULT 0);
             INSERT INTO devices (id, name, labels, credential_hash, enrolled_ms) VALUES ('d1', 'd1', '{}', 'c1', 1);",
        )
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(versions(&path), all_versions());
    assert_eq!(store.device_for_credential("c1").unwrap(), Some("d1".into()), "revoked_ms was added");
    assert_eq!(store.next_freshness_counter("d1").unwrap(), 1, "freshness_counter was added");
    assert_eq!(store.device_public_key("d1").unwrap(), None, "public_key was added, empty");
}

#[test]
fn rows_from_before_retention_count_as_stored_at_the_upgrade() {
    use crate::store::tests::{upgraded_rows_count_as_stored_at_the_upgrade, BACK_TO_VERSION_2};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    SqliteStore::open(&path).unwrap().execute_batch(BACK_TO_VERSION_2).unwrap();
    let upgraded_at = crate::unix_ms();
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(versions(&path), all_versions());
    upgraded_rows_count_as_stored_at_the_upgrade(&store, upgraded_at);
}

#[test]
fn a_rollout_stored_whole_before_members_were_rows_reads_back_the_same() {
    use crate::store::tests::{back_to_whole_rollout_states, rollout_with_a_late_joiner};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let created = rollout_with_a_late_joiner();
    let rollout = crate::rollout::Rollout { revision: 1, ..created.clone() };
    let store = SqliteStore::open(&path).unwrap();
    store.save_rollout(&created, &MemberWrites::All, &[], &[]).unwrap();
    store.execute_batch(&back_to_whole_rollout_states(4, &rollout)).unwrap();
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(versions(&path), all_versions());
    assert_eq!(store.rollout("r1").unwrap(), Some(rollout.clone()));
    let state: String = store.conn().query_row("SELECT state FROM rollouts", [], |r| r.get(0)).unwrap();
    assert!(!state.contains("\"members\"") && !state.contains("\"order\""), "{state}");
}

#[test]
fn opening_a_migrated_database_again_applies_nothing_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    SqliteStore::open(&path).unwrap().create_tokens(&["t".into()], 1, 10).unwrap();
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(schema::migrate(&mut again.conn()).unwrap(), 0, "nothing left to apply");
    assert_eq!(versions(&path), all_versions(), "each version recorded once");
    assert!(again.revoke_token("t", 2).unwrap(), "the token written before is still there");
}

#[test]
fn readers_see_the_last_commit_while_the_writer_is_in_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
    store.insert_device(&super::super::tests::new_device("d1", "c1", 1)).unwrap();
    // The writer is busy: a transaction that inserted a second device and has not committed.
    let mut writer = store.conn();
    let tx = writer.transaction().unwrap();
    insert_device(&tx, &super::super::tests::new_device("d2", "c2", 2)).unwrap();

    let (sent, read) = std::sync::mpsc::channel();
    let reading = store.clone();
    std::thread::spawn(move || {
        let seen = (reading.device_for_credential("c1").unwrap(), reading.device_ids().unwrap());
        sent.send(seen).unwrap();
    });
    // Bounded only so that a reader waiting for the writer fails the test instead of hanging it.
    let (found, ids) = read.recv_timeout(std::time::Duration::from_secs(30)).expect("a reader waited for the writer");
    assert_eq!(found, Some("d1".to_string()));
    assert_eq!(ids, vec!["d1".to_string()], "the uncommitted device is not seen");
    tx.commit().unwrap();
    drop(writer);
    assert_eq!(store.device_ids().unwrap(), vec!["d1".to_string(), "d2".to_string()], "and is once committed");
}

#[test]
fn check_ins_waiting_for_the_writer_are_written_together_and_one_failing_fails_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SqliteStore::open(&dir.path().join("fleet.db")).unwrap());
    let devices: Vec<String> = (0..8).map(|i| format!("d{i}")).collect();
    for (i, id) in devices.iter().enumerate() {
        store.insert_device(&super::super::tests::new_device(id, &format!("c{i}"), 1)).unwrap();
    }
    store.check_in("d3", 5, &[], true).unwrap();
    // Hold the writer until every check-in (and one from a device that does not exist) waits.
    let writer = store.conn();
    let callers: Vec<_> = devices
        .iter()
        .cloned()
        .chain(["nobody".to_string()])
        .map(|id| {
            let store = store.clone();
            std::thread::spawn(move || (id.clone(), store.check_in(&id, 10, &[], true)))
        })
        .collect();
    while store.checkins.list().len() < callers.len() {
        std::thread::yield_now();
    }
    drop(writer);
    for caller in callers {
        let (id, outcome) = caller.join().unwrap();
        match id.as_str() {
            "nobody" => assert!(outcome.is_err(), "an unknown device's check-in fails"),
            "d3" => assert_eq!(outcome.unwrap().1, Some(2), "its second counter"),
            _ => assert_eq!(outcome.unwrap().1, Some(1), "{id}: its first counter, in the same group"),
        }
    }
    assert!(store.checkins.list().is_empty());
    let seen: Vec<Option<u64>> = store.list_devices().unwrap().iter().map(|d| d.last_seen_ms).collect();
    assert_eq!(seen, vec![Some(10); 8], "every device's check-in was stored despite the failing one");
}
