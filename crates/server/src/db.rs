//! The state database: one SQLite file (`<state>/sandforge.db`, WAL mode)
//! holding tokens, sandboxes and their status history, and publish rules
//! (`publish`). Owns the schema, its migrations (`PRAGMA user_version`,
//! applied in order at open) and every SQL statement; must not call into
//! runtimes.
//!
//! Admission of a new sandbox (the org's quota, its name, its network
//! slot) is one `BEGIN IMMEDIATE` transaction: concurrent creates are
//! serialized by SQLite itself, and UNIQUE indexes on the live (org, name)
//! and the live network slot hold even against a bug elsewhere.

mod publish;
mod snapshots;
mod templates;
pub use publish::{PublishRule, Taken};
pub use snapshots::SnapshotRow;
pub use templates::{TemplateRefused, TemplateRow};

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use sandforge_api::{Isolation, Mount, Network, SandboxStatus};
use serde::{Deserialize, Serialize};

use crate::ServerError;

/// Migration 1: the schema before migrations existed (`IF NOT EXISTS`, so
/// a database made by an older daemon passes through it unchanged).
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

/// Migration 2: the network slot as a column (mirroring `spec.net_slot`)
/// and UNIQUE indexes over live sandboxes for (org, name) and the slot.
/// Duplicates that an older daemon's race let in are renamed (`-<id>`) or
/// lose the slot column (their spec keeps it) so the indexes can be built.
const LIVE_UNIQUE: &str = "
ALTER TABLE sandboxes ADD COLUMN net_slot INTEGER;
UPDATE sandboxes SET net_slot = json_extract(spec, '$.net_slot')
 WHERE status != 'destroyed';
UPDATE sandboxes SET name = name || '-' || id
 WHERE status != 'destroyed' AND rowid NOT IN (
   SELECT MIN(rowid) FROM sandboxes WHERE status != 'destroyed' GROUP BY org, name);
UPDATE sandboxes SET net_slot = NULL
 WHERE net_slot IS NOT NULL AND status != 'destroyed' AND rowid NOT IN (
   SELECT MIN(rowid) FROM sandboxes
    WHERE status != 'destroyed' AND net_slot IS NOT NULL GROUP BY net_slot);
UPDATE sandboxes SET net_slot = NULL WHERE status = 'destroyed';
CREATE UNIQUE INDEX sandboxes_live_name ON sandboxes(org, name)
 WHERE status != 'destroyed';
CREATE UNIQUE INDEX sandboxes_live_slot ON sandboxes(net_slot)
 WHERE status != 'destroyed' AND net_slot IS NOT NULL;
";

/// Migration 3: templates as rows (issue 12). `org` NULL: a built-in
/// template of the host, seen by every organization. A name is unique per
/// organization; the uniqueness against built-in names is checked by the
/// insert's transaction.
const TEMPLATES: &str = "
CREATE TABLE templates (
    id TEXT PRIMARY KEY,
    org TEXT,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX templates_org_name ON templates(ifnull(org, ''), name);
";

/// Migration 4: a template's defaults for its sandboxes (JSON
/// `TemplateDefaults`: cpus, memory_mb, disk_mb, egress).
const TEMPLATE_DEFAULTS: &str = "
ALTER TABLE templates ADD COLUMN defaults TEXT NOT NULL DEFAULT '{}';
";

fn migrations() -> rusqlite_migration::Migrations<'static> {
    use rusqlite_migration::M;
    rusqlite_migration::Migrations::new(vec![
        M::up(SCHEMA),
        M::up(LIVE_UNIQUE),
        M::up(TEMPLATES),
        M::up(TEMPLATE_DEFAULTS),
    ])
}

/// What a new sandbox must satisfy to be inserted.
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    /// Most live (not destroyed) sandboxes the org may hold.
    pub max_live: u64,
    /// Give the row the lowest free network slot below this many.
    pub slots: Option<u32>,
}

/// Why a sandbox was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("organization has {live} sandboxes; the limit is {limit}")]
    Quota { live: u64, limit: u64 },
    #[error("name '{0}' is already used")]
    NameInUse(String),
    #[error("every address of the sandbox subnet is in use")]
    NetworkFull,
    #[error(transparent)]
    Db(#[from] ServerError),
}

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

pub(crate) fn db_err(e: rusqlite::Error) -> ServerError {
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
        let mut conn = conn;
        migrations()
            .to_latest(&mut conn)
            .map_err(|e| ServerError::Db(format!("migrating {}: {e}", path.display())))?;
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

    /// Insert a row as it is (no admission checks: tests and restores).
    #[cfg(test)]
    pub fn insert_sandbox(&self, row: &SandboxRow) -> Result<(), ServerError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            insert_row(&tx, row)?;
            tx.commit()
        })
    }

    /// Insert a new sandbox (status `creating`) if its org is under
    /// `adm.max_live` and its name is free, giving it a network slot when
    /// asked (written into `row.spec.net_slot`): check and insert in one
    /// immediate transaction, so no concurrent create sees a stale count.
    pub fn admit(&self, row: &mut SandboxRow, adm: Admission) -> Result<(), Refused> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db_err)?;
        let live: u64 = tx
            .query_row(
                "SELECT COUNT(*) FROM sandboxes WHERE org = ?1 AND status != 'destroyed'",
                params![row.org],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if live >= adm.max_live {
            return Err(Refused::Quota {
                live,
                limit: adm.max_live,
            });
        }
        let taken: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM sandboxes WHERE org = ?1 AND name = ?2 AND status != 'destroyed')",
                params![row.org, row.name],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if taken {
            return Err(Refused::NameInUse(row.name.clone()));
        }
        row.spec.net_slot = match adm.slots {
            None => None,
            Some(n) => {
                let mut stmt = tx
                    .prepare(
                        "SELECT net_slot FROM sandboxes WHERE status != 'destroyed' AND net_slot IS NOT NULL ORDER BY net_slot",
                    )
                    .map_err(db_err)?;
                let used: Vec<u32> = stmt
                    .query_map([], |r| r.get(0))
                    .and_then(|rows| rows.collect())
                    .map_err(db_err)?;
                drop(stmt);
                Some(
                    (0..n)
                        .find(|s| used.binary_search(s).is_err())
                        .ok_or(Refused::NetworkFull)?,
                )
            }
        };
        insert_row(&tx, row).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Refused::NameInUse(row.name.clone())
            }
            e => Refused::Db(db_err(e)),
        })?;
        tx.commit().map_err(db_err)?;
        Ok(())
    }

    /// Replace a sandbox's stored spec (a `PATCH`).
    pub fn set_spec(&self, id: &str, spec: &StoredSpec) -> Result<(), ServerError> {
        let json = serde_json::to_string(spec).map_err(|e| ServerError::Db(e.to_string()))?;
        let at = now();
        self.with(|c| {
            c.execute(
                "UPDATE sandboxes SET spec = ?2, updated_at = ?3, net_slot = ?4 WHERE id = ?1",
                params![id, json, at, spec.net_slot],
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

fn insert_row(tx: &rusqlite::Transaction<'_>, row: &SandboxRow) -> rusqlite::Result<()> {
    let spec = serde_json::to_string(&row.spec)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    tx.execute(
        "INSERT INTO sandboxes(id, org, name, status, status_reason, spec, created_at, updated_at, net_slot)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![row.id, row.org, row.name, row.status.as_str(), row.status_reason, spec, row.created_at, row.updated_at, row.spec.net_slot],
    )?;
    tx.execute(
        "INSERT INTO sandbox_events(sandbox_id, status, reason, at) VALUES (?1, ?2, NULL, ?3)",
        params![row.id, row.status.as_str(), row.created_at],
    )?;
    Ok(())
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

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sf-db-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn admission_holds_across_connections_racing_on_one_file() {
        let dir = scratch("admit");
        let path = dir.join("t.db");
        Db::open(&path).unwrap();
        // Four connections (as four daemons would be), 25 creates each,
        // all at once: the quota, the names and the slots hold.
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let db = Db::open(&path).unwrap();
                    let mut ok = vec![];
                    for i in 0..25 {
                        let mut r = row(&format!("sb_{t}_{i}"), "acme");
                        r.name = format!("n{}", i % 10);
                        r.spec.network = Network::Nat;
                        let adm = Admission {
                            max_live: 8,
                            slots: Some(100),
                        };
                        match db.admit(&mut r, adm) {
                            Ok(()) => ok.push((r.name.clone(), r.spec.net_slot.unwrap())),
                            Err(Refused::Quota { .. } | Refused::NameInUse(_)) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                    ok
                })
            })
            .collect();
        let ok: Vec<(String, u32)> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(ok.len(), 8, "{ok:?}");
        let names: std::collections::BTreeSet<_> = ok.iter().map(|o| &o.0).collect();
        let slots: std::collections::BTreeSet<_> = ok.iter().map(|o| o.1).collect();
        assert_eq!((names.len(), slots.len()), (8, 8), "{ok:?}");
        assert_eq!(slots, (0..8).collect());
        // A destroyed sandbox frees its name and slot.
        let db = Db::open(&path).unwrap();
        let victim = db
            .list_sandboxes(Some("acme"))
            .unwrap()
            .into_iter()
            .find(|r| r.spec.net_slot == Some(3))
            .unwrap();
        db.set_status(&victim.id, SandboxStatus::Destroyed, None)
            .unwrap();
        let mut r = row("sb_new", "acme");
        r.name = victim.name.clone();
        r.spec.network = Network::Nat;
        db.admit(
            &mut r,
            Admission {
                max_live: 8,
                slots: Some(100),
            },
        )
        .unwrap();
        assert_eq!(r.spec.net_slot, Some(3));
        let mut full = row("sb_full", "acme");
        assert!(matches!(
            db.admit(
                &mut full,
                Admission {
                    max_live: 8,
                    slots: None
                }
            ),
            Err(Refused::Quota { live: 8, limit: 8 })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_old_database_with_raced_duplicates_migrates() {
        let dir = scratch("migrate");
        let path = dir.join("t.db");
        {
            // The schema as an older daemon left it (user_version 0), with
            // duplicates its quota race let in.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            let db = Db {
                conn: Mutex::new(c),
            };
            for id in ["sb_a", "sb_b", "sb_c"] {
                let mut r = row(id, "acme");
                r.name = "same".into();
                r.spec.net_slot = Some(7);
                let spec = serde_json::to_string(&r.spec).unwrap();
                db.with(|c| {
                    c.execute(
                        "INSERT INTO sandboxes(id, org, name, status, spec, created_at, updated_at) VALUES (?1, ?2, ?3, 'running', ?4, ?5, ?5)",
                        params![r.id, r.org, r.name, spec, r.created_at],
                    )
                })
                .unwrap();
            }
        }
        let db = Db::open(&path).unwrap();
        let rows = db.list_sandboxes(Some("acme")).unwrap();
        let names: std::collections::BTreeSet<_> = rows.iter().map(|r| r.name.clone()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains("same"));
        let slot_holders: i64 = db
            .with(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM sandboxes WHERE net_slot = 7",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(slot_holders, 1);
        // Opening again is a no-op.
        drop(db);
        Db::open(&path).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
