//! Statements prepared once per connection and executed after that in one round trip each: an
//! unprepared `execute` costs two (parse and describe, then bind and execute), and PostgreSQL
//! parses and plans the text again every time. The hot statements (a check-in's, the ingest's,
//! the credential lookup) are run through [`Prepared`], whose statements the connection keeps
//! for as long as it is open; at 10,000 agents, statements prepared anew for every check-in and
//! every batch were a large part of what PostgreSQL spent its CPU on.

use std::collections::HashMap;

use postgres::types::ToSql;
use postgres::{Client, GenericClient, Row, Statement, Transaction};

use crate::store::StoreError;

/// A connection of the store's pools and the statements prepared on it so far.
pub struct PgConn {
    pub client: Client,
    pub statements: Statements,
}

impl PgConn {
    pub fn new(client: Client) -> PgConn {
        PgConn { client, statements: Statements::default() }
    }

    /// The hot statements on this connection, outside a transaction.
    pub fn prepared(&mut self) -> Prepared<'_, Client> {
        Prepared { conn: &mut self.client, statements: &mut self.statements }
    }

    /// A transaction, and the connection's statements to run in it.
    pub fn transaction_and_statements(&mut self) -> Result<(Transaction<'_>, &mut Statements), postgres::Error> {
        Ok((self.client.transaction()?, &mut self.statements))
    }
}

/// Everything else uses the client as it is.
impl std::ops::Deref for PgConn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// Statements prepared on one connection, by their text. The texts are the `'static` SQL of this
/// crate, so the map is bounded by the code: it cannot grow with what clients send.
#[derive(Default)]
pub struct Statements(HashMap<&'static str, Statement>);

/// A client or transaction, with its connection's prepared statements.
pub struct Prepared<'c, C: GenericClient> {
    conn: &'c mut C,
    statements: &'c mut Statements,
}

impl<'c, C: GenericClient> Prepared<'c, C> {
    /// `conn` must be (a transaction of) the connection `statements` were prepared on.
    pub fn new(conn: &'c mut C, statements: &'c mut Statements) -> Prepared<'c, C> {
        Prepared { conn, statements }
    }

    /// The statement for `sql`, prepared on first use on this connection.
    fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.conn.prepare(sql)?;
        self.statements.0.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Rows changed.
    pub fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.conn.execute(&statement, params)?)
    }

    pub fn query(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.conn.query(&statement, params)?)
    }

    pub fn query_one(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.conn.query_one(&statement, params)?)
    }

    pub fn query_opt(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.conn.query_opt(&statement, params)?)
    }
}
