//! Named snapshots' rows: which sandbox a snapshot came from, its owner
//! organization, and the spec a fork is created with. The files are under
//! `<state>/snapshots/<id>/` (`sandforge_runtime::snapshot`).

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{now, Db, StoredSpec};
use crate::ServerError;

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRow {
    pub id: String,
    pub sandbox_id: String,
    #[serde(skip)]
    pub org: String,
    pub name: String,
    /// Bytes on disk (memory layers are shared with the sandbox by hard
    /// link and counted here too).
    pub size_bytes: u64,
    /// Whether it holds memory (a microVM) or only the filesystem.
    pub memory: bool,
    #[serde(skip)]
    pub spec: StoredSpec,
    pub created_at: String,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRow> {
    let spec: String = r.get(6)?;
    Ok(SnapshotRow {
        id: r.get(0)?,
        sandbox_id: r.get(1)?,
        org: r.get(2)?,
        name: r.get(3)?,
        size_bytes: r.get::<_, i64>(4)? as u64,
        memory: r.get::<_, i64>(5)? != 0,
        spec: serde_json::from_str(&spec).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, Box::new(e))
        })?,
        created_at: r.get(7)?,
    })
}

const COLS: &str = "id, sandbox_id, org, name, bytes, memory, spec, created_at";

impl Db {
    pub fn insert_snapshot(&self, s: &SnapshotRow) -> Result<(), ServerError> {
        let spec = serde_json::to_string(&s.spec).map_err(|e| ServerError::Db(e.to_string()))?;
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO snapshots({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                params![
                    s.id,
                    s.sandbox_id,
                    s.org,
                    s.name,
                    s.size_bytes as i64,
                    s.memory as i64,
                    spec,
                    now()
                ],
            )
            .map(|_| ())
        })
    }

    /// Bytes held by all of `org`'s snapshots, and how many of them are of
    /// `sandbox_id` (the snapshot quotas).
    pub fn snapshot_usage(&self, org: &str, sandbox_id: &str) -> Result<(u64, u64), ServerError> {
        self.with(|c| {
            c.query_row(
                "SELECT COALESCE(SUM(bytes), 0), COALESCE(SUM(sandbox_id = ?2), 0) FROM snapshots WHERE org = ?1",
                params![org, sandbox_id],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
        })
    }

    pub fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRow>, ServerError> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {COLS} FROM snapshots WHERE id = ?1"),
                params![id],
                row,
            )
            .optional()
        })
    }

    pub fn list_snapshots(&self, sandbox_id: &str) -> Result<Vec<SnapshotRow>, ServerError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLS} FROM snapshots WHERE sandbox_id = ?1 ORDER BY created_at, id"
            ))?;
            let rows = st.query_map(params![sandbox_id], row)?;
            rows.collect()
        })
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<(), ServerError> {
        self.with(|c| {
            c.execute("DELETE FROM snapshots WHERE id = ?1", params![id])
                .map(|_| ())
        })
    }
}
