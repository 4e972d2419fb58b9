//! PostgreSQL-only behaviour: versioned migrations and what the server says about a database URL
//! it cannot use. The store's behaviour itself is tested against both stores in `store/tests.rs`.

use super::*;
use crate::store::tests::{TestSchema, DATABASE_URL_VAR};
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
