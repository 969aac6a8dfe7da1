//! Publish rules (seed 002): a sandbox port served under a public alias.
//! Aliases are unique across organizations (the table's constraint is the
//! arbiter, so two racing publishes cannot both get one).

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{now, Db};
use crate::ServerError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublishRule {
    pub id: String,
    pub sandbox_id: String,
    pub port: u16,
    pub alias: String,
    pub created_at: String,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PublishRule> {
    Ok(PublishRule {
        id: r.get(0)?,
        sandbox_id: r.get(1)?,
        port: r.get(2)?,
        alias: r.get(3)?,
        created_at: r.get(4)?,
    })
}

/// Why an insert was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    Alias,
    Port,
}

impl Db {
    /// Insert a rule; `Ok(Err(_))` when its alias or (sandbox, port) exists.
    pub fn insert_publish(
        &self,
        id: &str,
        sandbox_id: &str,
        port: u16,
        alias: &str,
    ) -> Result<Result<PublishRule, Taken>, ServerError> {
        let rule = PublishRule {
            id: id.into(),
            sandbox_id: sandbox_id.into(),
            port,
            alias: alias.into(),
            created_at: now(),
        };
        let taken = self.with(|c| {
            let alias_taken: bool = c.query_row(
                "SELECT COUNT(*) FROM publish WHERE alias = ?1",
                params![alias],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )?;
            let port_taken: bool = c.query_row(
                "SELECT COUNT(*) FROM publish WHERE sandbox_id = ?1 AND port = ?2",
                params![sandbox_id, port],
                |r| r.get::<_, i64>(0).map(|n| n > 0),
            )?;
            if port_taken {
                return Ok(Some(Taken::Port));
            }
            if alias_taken {
                return Ok(Some(Taken::Alias));
            }
            c.execute(
                "INSERT INTO publish(id, sandbox_id, port, alias, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![rule.id, rule.sandbox_id, rule.port, rule.alias, rule.created_at],
            )?;
            Ok(None)
        })?;
        Ok(match taken {
            Some(t) => Err(t),
            None => Ok(rule),
        })
    }

    pub fn list_publish(&self, sandbox_id: &str) -> Result<Vec<PublishRule>, ServerError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, sandbox_id, port, alias, created_at FROM publish WHERE sandbox_id = ?1 ORDER BY port",
            )?;
            let rows = st.query_map(params![sandbox_id], row)?;
            rows.collect()
        })
    }

    pub fn publish_by_alias(&self, alias: &str) -> Result<Option<PublishRule>, ServerError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, sandbox_id, port, alias, created_at FROM publish WHERE alias = ?1",
                params![alias],
                row,
            )
            .optional()
        })
    }

    /// Delete one rule; whether it existed.
    pub fn delete_publish(&self, sandbox_id: &str, port: u16) -> Result<bool, ServerError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM publish WHERE sandbox_id = ?1 AND port = ?2",
                params![sandbox_id, port],
            )
            .map(|n| n > 0)
        })
    }

    pub fn delete_publish_all(&self, sandbox_id: &str) -> Result<(), ServerError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM publish WHERE sandbox_id = ?1",
                params![sandbox_id],
            )
            .map(|_| ())
        })
    }
}
