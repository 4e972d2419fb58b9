//! Statements prepared once and executed after that in one round trip each: an unprepared
//! `execute` costs two (parse and describe, then bind and execute). A batch of reports runs the
//! same few statements hundreds of times, so at 10,000 agents the round trips were the limit.

use postgres::types::ToSql;
use postgres::{GenericClient, Statement};

use crate::store::StoreError;

/// A client or transaction with the statements it has prepared so far (valid for as long as
/// the connection, which this borrows).
pub struct Prepared<'c, C: GenericClient> {
    conn: &'c mut C,
    statements: Vec<(&'static str, Statement)>,
}

impl<'c, C: GenericClient> Prepared<'c, C> {
    pub fn new(conn: &'c mut C) -> Prepared<'c, C> {
        Prepared { conn, statements: Vec::new() }
    }

    /// The statement for `sql`, prepared on first use. A batch uses a handful, so a linear
    /// search is the cheapest map.
    fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some((_, statement)) = self.statements.iter().find(|(known, _)| *known == sql) {
            return Ok(statement.clone());
        }
        let statement = self.conn.prepare(sql)?;
        self.statements.push((sql, statement.clone()));
        Ok(statement)
    }

    /// Rows changed.
    pub fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, StoreError> {
        let statement = self.statement(sql)?;
        Ok(self.conn.execute(&statement, params)?)
    }
}
