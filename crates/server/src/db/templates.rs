//! Template rows (issue 12): id, owner organization (none for the host's
//! built-in templates, which every organization sees), name (unique per
//! organization; a built-in name is global), source, status and size. The
//! files are under the template store (`sandforge_runtime::template`).
//!
//! Owns the `templates` table's statements; must not touch files.

use rusqlite::{params, OptionalExtension};
use sandforge_api::{TemplateDefaults, TemplateSource, TemplateStatus};

use super::{db_err, now, Db};
use crate::ServerError;

#[derive(Debug, Clone, PartialEq)]
pub struct TemplateRow {
    pub id: String,
    /// `None`: built-in, global.
    pub org: Option<String>,
    pub name: String,
    pub source: TemplateSource,
    pub status: TemplateStatus,
    pub status_reason: Option<String>,
    pub size_bytes: u64,
    pub created_at: String,
    pub defaults: TemplateDefaults,
}

const COLS: &str = "id, org, name, source, status, status_reason, size_bytes, created_at, defaults";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TemplateRow> {
    let bad = |i: usize, msg: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, msg.into())
    };
    let source: String = r.get(3)?;
    let status: String = r.get(4)?;
    let defaults: String = r.get(8)?;
    Ok(TemplateRow {
        id: r.get(0)?,
        org: r.get(1)?,
        name: r.get(2)?,
        source: serde_json::from_str(&source).map_err(|e| bad(3, e.to_string()))?,
        status: TemplateStatus::parse(&status).ok_or_else(|| bad(4, status.clone()))?,
        status_reason: r.get(5)?,
        size_bytes: r.get::<_, i64>(6)?.max(0) as u64,
        created_at: r.get(7)?,
        defaults: serde_json::from_str(&defaults).map_err(|e| bad(8, e.to_string()))?,
    })
}

/// Why a template was not inserted.
#[derive(Debug, thiserror::Error)]
pub enum TemplateRefused {
    #[error("name '{0}' is already used")]
    NameInUse(String),
    #[error(transparent)]
    Db(#[from] ServerError),
}

impl Db {
    /// Insert a new template; its name must be free in its organization and
    /// among the built-in ones (checked and inserted in one transaction).
    pub fn insert_template(&self, t: &TemplateRow) -> Result<(), TemplateRefused> {
        let source =
            serde_json::to_string(&t.source).map_err(|e| ServerError::Db(e.to_string()))?;
        let defaults =
            serde_json::to_string(&t.defaults).map_err(|e| ServerError::Db(e.to_string()))?;
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let taken: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM templates WHERE name = ?1 AND (org IS NULL OR org IS ?2))",
                params![t.name, t.org],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if taken {
            return Err(TemplateRefused::NameInUse(t.name.clone()));
        }
        tx.execute(
            &format!("INSERT INTO templates({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            params![
                t.id,
                t.org,
                t.name,
                source,
                t.status.as_str(),
                t.status_reason,
                t.size_bytes as i64,
                t.created_at,
                defaults
            ],
        )
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                TemplateRefused::NameInUse(t.name.clone())
            }
            e => TemplateRefused::Db(db_err(e)),
        })?;
        tx.commit().map_err(db_err)?;
        Ok(())
    }

    /// Register a built-in template (idempotent).
    pub fn ensure_builtin_template(&self, id: &str, name: &str) -> Result<(), ServerError> {
        let source = serde_json::to_string(&TemplateSource::Builtin).expect("serializable");
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT OR IGNORE INTO templates({COLS}) VALUES (?1, NULL, ?2, ?3, 'ready', NULL, 0, ?4, '{{}}')"
                ),
                params![id, name, source, now()],
            )
            .map(|_| ())
        })
    }

    pub fn set_template_status(
        &self,
        id: &str,
        status: TemplateStatus,
        reason: Option<&str>,
        size_bytes: u64,
    ) -> Result<(), ServerError> {
        self.with(|c| {
            c.execute(
                "UPDATE templates SET status = ?2, status_reason = ?3, size_bytes = ?4 WHERE id = ?1",
                params![id, status.as_str(), reason, size_bytes as i64],
            )
            .map(|_| ())
        })
    }

    /// Mark a template `building` unless it already is: false when another
    /// build holds it.
    pub fn claim_template_build(&self, id: &str) -> Result<bool, ServerError> {
        self.with(|c| {
            c.execute(
                "UPDATE templates SET status = 'building', status_reason = NULL, size_bytes = 0
                 WHERE id = ?1 AND status != 'building'",
                params![id],
            )
            .map(|n| n == 1)
        })
    }

    pub fn get_template(&self, id: &str) -> Result<Option<TemplateRow>, ServerError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLS} FROM templates WHERE id = ?1"),
                params![id],
                row,
            )
            .optional()
        })
    }

    /// The template `org` reaches by `name`: its own, else a built-in one.
    pub fn template_by_name(
        &self,
        org: &str,
        name: &str,
    ) -> Result<Option<TemplateRow>, ServerError> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {COLS} FROM templates WHERE name = ?1 AND (org = ?2 OR org IS NULL)
                     ORDER BY org IS NULL LIMIT 1"
                ),
                params![name, org],
                row,
            )
            .optional()
        })
    }

    /// The built-in templates and `org`'s, oldest first.
    pub fn list_templates(&self, org: &str) -> Result<Vec<TemplateRow>, ServerError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLS} FROM templates WHERE org IS NULL OR org = ?1 ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map(params![org], row)?;
            rows.collect()
        })
    }

    /// Every template left `building` (by a daemon that stopped meanwhile).
    pub fn building_templates(&self) -> Result<Vec<TemplateRow>, ServerError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {COLS} FROM templates WHERE status = 'building'"
            ))?;
            let rows = stmt.query_map([], row)?;
            rows.collect()
        })
    }

    pub fn delete_template(&self, id: &str) -> Result<(), ServerError> {
        self.with(|c| {
            c.execute("DELETE FROM templates WHERE id = ?1", params![id])
                .map(|_| ())
        })
    }

    /// Live sandboxes and snapshots that use the template stored as `dir`.
    pub fn template_users(&self, dir: &str) -> Result<(u64, u64), ServerError> {
        self.with(|c| {
            let sandboxes: u64 = c.query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE status != 'destroyed' AND json_extract(spec, '$.template') = ?1",
                params![dir],
                |r| r.get(0),
            )?;
            let snapshots: u64 = c.query_row(
                "SELECT COUNT(*) FROM snapshots WHERE json_extract(spec, '$.template') = ?1",
                params![dir],
                |r| r.get(0),
            )?;
            Ok((sandboxes, snapshots))
        })
    }
}
