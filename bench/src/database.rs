//! The store a benchmark measures: a SQLite file, or a schema of its own in a PostgreSQL
//! database (made for the run and dropped after it).

use std::path::{Path, PathBuf};

use anyhow::Result;
use fleet_server::store::{PostgresStore, SqliteStore, Store};

pub enum Database {
    Sqlite { file: PathBuf },
    Postgres { client: Box<postgres::Client>, schema: String },
}

impl Database {
    /// A SQLite file `<bench>.db` in `dir`, or the schema `fleet_bench_<bench>_<pid>` at
    /// `database_url`; with the store opened on it.
    pub fn open(dir: &Path, database_url: Option<&str>, bench: &str) -> Result<(Database, Box<dyn Store>)> {
        Ok(match database_url {
            None => {
                let file = dir.join(format!("{bench}.db"));
                let store = SqliteStore::open(&file)?;
                (Database::Sqlite { file }, Box::new(store))
            }
            Some(url) => {
                let schema = format!("fleet_bench_{bench}_{}", std::process::id());
                let store = PostgresStore::open(url, Some(&schema))?;
                let mut client = postgres::Client::connect(url, postgres::NoTls)?;
                client.batch_execute(&format!("SET search_path TO {schema}"))?;
                (Database::Postgres { client: Box::new(client), schema }, Box::new(store))
            }
        })
    }

    /// Runs a statement as someone with access to the database would (the store has no call
    /// that backdates arrivals).
    pub fn execute(&mut self, sql: &str) -> Result<()> {
        match self {
            Database::Sqlite { file, .. } => drop(rusqlite::Connection::open(file)?.execute(sql, [])?),
            Database::Postgres { client, .. } => drop(client.execute(sql, &[])?),
        }
        Ok(())
    }

    pub fn count(&mut self, sql: &str) -> Result<i64> {
        Ok(match self {
            Database::Sqlite { file, .. } => rusqlite::Connection::open(file)?.query_row(sql, [], |r| r.get(0))?,
            Database::Postgres { client, .. } => client.query_one(sql, &[])?.get(0),
        })
    }

    /// Megabytes on disk: the SQLite file, or the drift table with its indexes.
    pub fn size_mb(&mut self) -> Result<f64> {
        Ok(match self {
            Database::Sqlite { file, .. } => std::fs::metadata(file)?.len() as f64 / 1e6,
            Database::Postgres { .. } => self.count("SELECT pg_total_relation_size('drift')")? as f64 / 1e6,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Database::Sqlite { .. } => "SQLite",
            Database::Postgres { .. } => "PostgreSQL",
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Database::Postgres { client, schema } = self {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    }
}
