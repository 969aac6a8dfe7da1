//! The state database: one SQLite file (`<state>/sandforge.db`, WAL mode)
//! holding tokens, sandboxes and their status history, and publish rules
//! (`publish`). Owns the schema and every SQL statement; must not call
//! into runtimes.

mod publish;
mod snapshots;
pub use publish::{PublishRule, Taken};
pub use snapshots::SnapshotRow;

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use sandforge_api::{Isolation, Mount, Network, SandboxStatus};
use serde::{Deserialize, Serialize};

use crate::ServerError;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT,
    spec TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_org ON sandboxes(org, status);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    memory INTEGER NOT NULL,
    spec TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS publish (
    id TEXT PRIMARY KEY,
    sandbox_id TEXT NOT NULL,
    port INTEGER NOT NULL,
    alias TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    UNIQUE (sandbox_id, port)
);
CREATE TABLE IF NOT EXISTS sandbox_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    at TEXT NOT NULL
);
";

/// What a sandbox was created with (stored as JSON in `sandboxes.spec`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredSpec {
    pub isolation: Isolation,
    /// `kvm` or `tcg` for microVMs.
    #[serde(default)]
    pub accel: Option<String>,
    pub template: String,
    pub cpus: u32,
    pub memory_mb: u64,
    /// Root disk of a microVM, MB.
    #[serde(default)]
    pub disk_mb: Option<u64>,
    pub network: Network,
    /// The /30 slot of a networked sandbox (its addresses and link name).
    #[serde(default)]
    pub net_slot: Option<u32>,
    /// The egress policy in force (networked sandboxes).
    #[serde(default)]
    pub egress: Option<sandforge_api::Egress>,
    /// Mode, timeouts and `keep_hot`.
    #[serde(default)]
    pub lifecycle: sandforge_api::Lifecycle,
    /// Ephemeral: when it is destroyed, Unix seconds.
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// As requested (host paths as the caller wrote them).
    pub mounts: Vec<Mount>,
    /// Canonical host paths, parallel to `mounts`.
    pub resolved_host_paths: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRow {
    pub id: String,
    pub org: String,
    pub name: String,
    pub status: SandboxStatus,
    pub status_reason: Option<String>,
    pub spec: StoredSpec,
    pub created_at: String,
    pub updated_at: String,
}

pub struct Db {
    conn: Mutex<Connection>,
}

fn db_err(e: rusqlite::Error) -> ServerError {
    ServerError::Db(e.to_string())
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, ServerError> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, ServerError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(db_err)
    }

    pub fn insert_token(&self, hash: &str, org: &str) -> Result<(), ServerError> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO tokens(hash, org, created_at) VALUES (?1, ?2, ?3)",
                params![hash, org, now()],
            )
            .map(|_| ())
        })
    }

    pub fn token_org(&self, hash: &str) -> Result<Option<String>, ServerError> {
        self.with(|c| {
            c.query_row(
                "SELECT org FROM tokens WHERE hash = ?1",
                params![hash],
                |r| r.get(0),
            )
            .optional()
        })
    }

    pub fn token_count(&self) -> Result<u64, ServerError> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0)))
    }

    pub fn insert_sandbox(&self, row: &SandboxRow) -> Result<(), ServerError> {
        let spec = serde_json::to_string(&row.spec).map_err(|e| ServerError::Db(e.to_string()))?;
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO sandboxes(id, org, name, status, status_reason, spec, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![row.id, row.org, row.name, row.status.as_str(), row.status_reason, spec, row.created_at, row.updated_at],
            )?;
            tx.execute(
                "INSERT INTO sandbox_events(sandbox_id, status, reason, at) VALUES (?1, ?2, NULL, ?3)",
                params![row.id, row.status.as_str(), row.created_at],
            )?;
            tx.commit()
        })
    }

    /// Replace a sandbox's stored spec (a `PATCH`).
    pub fn set_spec(&self, id: &str, spec: &StoredSpec) -> Result<(), ServerError> {
        let json = serde_json::to_string(spec).map_err(|e| ServerError::Db(e.to_string()))?;
        let at = now();
        self.with(|c| {
            c.execute(
                "UPDATE sandboxes SET spec = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, json, at],
            )
            .map(|_| ())
        })
    }

    /// Record a status transition (and its history event) atomically.
    pub fn set_status(
        &self,
        id: &str,
        status: SandboxStatus,
        reason: Option<&str>,
    ) -> Result<(), ServerError> {
        let at = now();
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "UPDATE sandboxes SET status = ?2, status_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, status.as_str(), reason, at],
            )?;
            tx.execute(
                "INSERT INTO sandbox_events(sandbox_id, status, reason, at) VALUES (?1, ?2, ?3, ?4)",
                params![id, status.as_str(), reason, at],
            )?;
            tx.commit()
        })
    }

    pub fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRow>, ServerError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, org, name, status, status_reason, spec, created_at, updated_at FROM sandboxes WHERE id = ?1",
                params![id],
                row_to_sandbox,
            )
            .optional()
        })
    }

    /// Sandboxes of `org` (all orgs when `None`), oldest first.
    pub fn list_sandboxes(&self, org: Option<&str>) -> Result<Vec<SandboxRow>, ServerError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, org, name, status, status_reason, spec, created_at, updated_at FROM sandboxes
                 WHERE (?1 IS NULL OR org = ?1) ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map(params![org], row_to_sandbox)?;
            rows.collect()
        })
    }

    pub fn name_in_use(&self, org: &str, name: &str) -> Result<bool, ServerError> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE org = ?1 AND name = ?2 AND status != 'destroyed'",
                params![org, name],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
        })
    }

    /// Status history of a sandbox, oldest first: (status, reason, at).
    pub fn events(&self, id: &str) -> Result<Vec<(String, Option<String>, String)>, ServerError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT status, reason, at FROM sandbox_events WHERE sandbox_id = ?1 ORDER BY seq",
            )?;
            let rows = stmt.query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }
}

fn row_to_sandbox(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxRow> {
    let status: String = r.get(3)?;
    let spec: String = r.get(5)?;
    let bad = |msg: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, msg.into())
    };
    Ok(SandboxRow {
        id: r.get(0)?,
        org: r.get(1)?,
        name: r.get(2)?,
        status: SandboxStatus::parse(&status).ok_or_else(|| bad(format!("status {status}")))?,
        status_reason: r.get(4)?,
        spec: serde_json::from_str(&spec).map_err(|e| bad(e.to_string()))?,
        created_at: r.get(6)?,
        updated_at: r.get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, org: &str) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            org: org.into(),
            name: id.into(),
            status: SandboxStatus::Creating,
            status_reason: None,
            spec: StoredSpec {
                isolation: Isolation::Container,
                accel: None,
                template: "default".into(),
                cpus: 1,
                memory_mb: 512,
                disk_mb: None,
                network: Network::Offline,
                net_slot: None,
                egress: None,
                lifecycle: Default::default(),
                expires_at: None,
                mounts: vec![],
                resolved_host_paths: vec![],
                env: Default::default(),
                metadata: Default::default(),
            },
            created_at: now(),
            updated_at: now(),
        }
    }

    #[test]
    fn sandboxes_tokens_and_history_persist() {
        let dir = std::env::temp_dir().join(format!("sf-db-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        {
            let db = Db::open(&path).unwrap();
            db.insert_token("h1", "acme").unwrap();
            db.insert_sandbox(&row("sb_1", "acme")).unwrap();
            db.insert_sandbox(&row("sb_2", "other")).unwrap();
            db.set_status("sb_1", SandboxStatus::Running, None).unwrap();
            db.set_status("sb_1", SandboxStatus::Failed, Some("boom"))
                .unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.token_org("h1").unwrap().as_deref(), Some("acme"));
        assert_eq!(db.token_org("nope").unwrap(), None);
        let s = db.get_sandbox("sb_1").unwrap().unwrap();
        assert_eq!(
            (s.status, s.status_reason.as_deref()),
            (SandboxStatus::Failed, Some("boom"))
        );
        assert_eq!(db.list_sandboxes(Some("acme")).unwrap().len(), 1);
        assert_eq!(db.list_sandboxes(None).unwrap().len(), 2);
        let ev: Vec<String> = db
            .events("sb_1")
            .unwrap()
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(ev, ["creating", "running", "failed"]);
        assert!(db.name_in_use("acme", "sb_1").unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
