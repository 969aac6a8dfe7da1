//! Named snapshots, rollback and fork (seed 003), on top of the backends'
//! `save_to` / `load_from` and the lifecycle's stop/start: a microVM is
//! stopped for the copy (its memory chain and disk are the snapshot; it is
//! started again after), a container is frozen for the copy of its
//! writable layer. Rollback stops the sandbox, loads the snapshot's state
//! and starts it. A fork is a new sandbox, with its own id, directory, uid
//! and (for containers) network, loaded from the snapshot and started.
//! Snapshots outlive their sandbox (forks need them) until deleted.
//!
//! Quotas: `max_snapshots_per_sandbox` and `max_snapshot_bytes_per_org`
//! (all the org's snapshots, its destroyed sandboxes' included). A
//! snapshot is estimated before anything is copied (so a large disk is
//! never staged beyond the quota), then measured once staged, and checked
//! and recorded under one lock; one that would exceed a quota is deleted
//! before it is published: 429 `limit`, nothing left behind.

use http::StatusCode;
use sandforge_api::sandbox::validate_name;
use sandforge_api::{CreateSandbox, Isolation, Network, Sandbox, SandboxStatus};
use sandforge_runtime::snapshot;

use crate::controller::{new_id, not_running, Controller};
use crate::db::{now, SandboxRow, SnapshotRow};
use crate::error::ApiError;

/// In a snapshot's staging directory: the sandbox was stopped for the copy
/// and must be started again (a VM), also after a crash.
pub(crate) const RESTART_NOTE: &str = "restart-after-copy";

fn snapshot_id() -> String {
    crate::controller::random_id("snap")
}

/// Held from checking a staged snapshot against the quotas until it is
/// recorded, so that two snapshots cannot both fit in the last room.
static QUOTA: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn limit(message: String) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "limit", message)
}

impl Controller {
    fn snapshot_dir(&self, sid: &str) -> std::path::PathBuf {
        self.cfg.state_dir.join("snapshots").join(sid)
    }

    /// A snapshot of `org`'s sandbox `id`: 404 otherwise.
    fn snapshot_of(&self, org: &str, id: &str, sid: &str) -> Result<SnapshotRow, ApiError> {
        self.db
            .get_snapshot(sid)?
            .filter(|s| s.org == org && s.sandbox_id == id)
            .ok_or_else(|| ApiError::not_found("snapshot", sid))
    }

    /// Refuse a snapshot of `id` adding `bytes` beyond the quotas.
    fn within_quota(&self, org: &str, id: &str, bytes: u64) -> Result<(), ApiError> {
        let (used, count) = self.db.snapshot_usage(org, id)?;
        if count >= self.cfg.max_snapshots_per_sandbox {
            return Err(limit(format!(
                "sandbox '{id}' has {count} snapshots; the limit is {} (max_snapshots_per_sandbox): delete one first",
                self.cfg.max_snapshots_per_sandbox
            )));
        }
        let max = self.cfg.max_snapshot_bytes_per_org;
        if used.saturating_add(bytes) > max {
            return Err(limit(format!(
                "the organization's snapshots hold {used} bytes; this one ({bytes} bytes) would exceed the limit of {max} (max_snapshot_bytes_per_org)"
            )));
        }
        Ok(())
    }

    fn can_run(row: &SandboxRow) -> Result<(), ApiError> {
        match row.status {
            SandboxStatus::Running | SandboxStatus::Suspended | SandboxStatus::Stopped => Ok(()),
            _ => Err(not_running(row)),
        }
    }

    /// `POST /sandboxes/{id}/snapshots`.
    pub async fn take_snapshot(
        &self,
        org: &str,
        id: &str,
        name: Option<String>,
    ) -> Result<SnapshotRow, ApiError> {
        if let Some(n) = &name {
            validate_name("name", n)?;
        }
        let row = self.get(org, id)?;
        Self::can_run(&row)?;
        // Before anything is stopped or copied (an estimate: a sandbox
        // whose disk alone is beyond the quota is never staged); measured
        // again once staged.
        let estimate = {
            let backend = self.backend(row.spec.isolation)?;
            let spec = self.spec_for(&row)?;
            tokio::task::spawn_blocking(move || backend.snapshot_estimate(&spec))
                .await
                .unwrap_or(0)
        };
        self.within_quota(org, id, estimate)?;
        let vm = row.spec.isolation == Isolation::Microvm;
        let restart = vm && row.status != SandboxStatus::Stopped;
        let sid = snapshot_id();
        let dest = self.snapshot_dir(&sid);
        let tmp = snapshot::staging(&dest, id);
        if restart {
            // The staging directory exists from before the VM is stopped,
            // with a note that it must run again: a daemon killed in the
            // middle finds it at start and starts the VM again.
            std::fs::create_dir_all(&tmp)
                .and_then(|_| std::fs::write(tmp.join(RESTART_NOTE), b""))
                .map_err(|e| ApiError::internal(format!("staging {}: {e}", tmp.display())))?;
            if let Err(e) = self.stop(org, id).await {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
        let result = async {
            let lock = self.op_lock(id);
            let _guard = lock.lock().await;
            let row = self.get(org, id)?;
            let backend = self.backend(row.spec.isolation)?;
            let spec = self.spec_for(&row)?;
            let saved = backend.save_to(&spec, &tmp).await;
            let _ = std::fs::remove_file(tmp.join(RESTART_NOTE));
            if let Err(e) = saved {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(ApiError::from(e));
            }
            let size_bytes = snapshot::disk_usage(&tmp);
            let _quota = QUOTA.lock().await;
            if let Err(e) = self.within_quota(org, id, size_bytes) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            if let Err(e) = snapshot::publish(&tmp, &dest) {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e.into());
            }
            let s = SnapshotRow {
                id: sid.clone(),
                sandbox_id: id.to_string(),
                org: org.to_string(),
                name: name.unwrap_or_else(|| sid.clone()),
                size_bytes,
                memory: vm,
                spec: row.spec.clone(),
                created_at: now(),
            };
            if let Err(e) = self.db.insert_snapshot(&s) {
                let _ = std::fs::remove_dir_all(&dest);
                return Err(e.into());
            }
            Ok(s)
        }
        .await;
        if restart {
            self.wake(org, id).await?;
        }
        result
    }

    /// At daemon start, before anything runs: finish or discard every load
    /// a crash interrupted, discard every snapshot a crash left half-made
    /// (killing a copy still writing into it) and every snapshot directory
    /// the database does not know. Returns the sandboxes that were stopped
    /// for a copy and must run again.
    pub(crate) fn sweep_snapshots(&self) -> Result<Vec<String>, ApiError> {
        let dir = self.cfg.state_dir.join("snapshots");
        let staged: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        let restart: Vec<String> = staged
            .iter()
            .filter(|p| p.join(RESTART_NOTE).exists())
            .filter_map(|p| snapshot::staging_sandbox(p))
            .collect();
        // Loads (rollback, fork) a crash interrupted: finished or discarded
        // now, so no staging outlives the restart even in a sandbox that
        // stays stopped.
        let sandboxes = self.cfg.state_dir.join("sandboxes");
        for e in std::fs::read_dir(&sandboxes)
            .into_iter()
            .flatten()
            .flatten()
        {
            match snapshot::finish_load(&e.path()) {
                Ok(true) => {
                    tracing::warn!(path = %e.path().display(), "finished a load a crash interrupted")
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::error!(path = %e.path().display(), "finishing an interrupted load: {err}")
                }
            }
        }
        let db = &self.db;
        // Only what the database surely does not know is removed.
        let swept = snapshot::sweep(&dir, |sid| !matches!(db.get_snapshot(sid), Ok(None)))?;
        for p in &swept {
            tracing::warn!(path = %p.display(), "discarded a snapshot a crash left half-made");
        }
        Ok(restart)
    }

    /// Remove the snapshot staging of a sandbox being destroyed (off the
    /// async workers: it may wait for a copy it kills).
    pub(crate) async fn discard_staging(&self, id: &str) -> Result<(), ApiError> {
        let staged = snapshot::staging_of(&self.cfg.state_dir.join("snapshots"), id);
        if staged.is_empty() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || snapshot::discard(&staged))
            .await
            .map_err(|e| ApiError::internal(format!("discarding snapshot staging: {e}")))??;
        Ok(())
    }

    pub fn snapshots(&self, org: &str, id: &str) -> Result<Vec<SnapshotRow>, ApiError> {
        self.get(org, id)?;
        Ok(self.db.list_snapshots(id)?)
    }

    pub fn delete_snapshot(&self, org: &str, id: &str, sid: &str) -> Result<(), ApiError> {
        let s = self.snapshot_of(org, id, sid)?;
        let dir = self.snapshot_dir(&s.id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| ApiError::internal(format!("removing {}: {e}", dir.display())))?;
        }
        Ok(self.db.delete_snapshot(&s.id)?)
    }

    /// `POST /sandboxes/{id}/snapshots/{sid}/rollback`.
    pub async fn rollback(&self, org: &str, id: &str, sid: &str) -> Result<Sandbox, ApiError> {
        let s = self.snapshot_of(org, id, sid)?;
        let row = self.get(org, id)?;
        Self::can_run(&row)?;
        if row.status != SandboxStatus::Stopped {
            self.stop(org, id).await?;
        }
        {
            let lock = self.op_lock(id);
            let _guard = lock.lock().await;
            let row = self.get(org, id)?;
            let backend = self.backend(row.spec.isolation)?;
            let spec = self.spec_for(&row)?;
            backend.load_from(&spec, &self.snapshot_dir(&s.id)).await?;
            self.db.set_status(
                id,
                SandboxStatus::Stopped,
                Some(&format!("rolled back to {sid}")),
            )?;
        }
        self.wake(org, id).await
    }

    /// `POST /sandboxes` with `snapshot_id`: a new sandbox from a snapshot.
    pub(crate) async fn fork(&self, org: &str, req: CreateSandbox) -> Result<Sandbox, ApiError> {
        let sid = req.snapshot_id.clone().unwrap_or_default();
        let given = [
            ("cpu", req.cpu.is_some() || req.cpus.is_some()),
            ("memory_mb", req.memory_mb.is_some()),
            ("disk_mb", req.disk_mb.is_some()),
            (
                "template",
                req.template.is_some() || req.template_id.is_some(),
            ),
            ("mounts", !req.mounts.is_empty()),
            ("network", req.network.is_some()),
            (
                "egress",
                req.egress.is_some() || req.network_policy.is_some(),
            ),
            ("init", req.init.is_some()),
            ("env", !req.env.is_empty()),
        ];
        if let Some((field, _)) = given.iter().find(|(_, set)| *set) {
            return Err(ApiError::bad_request(
                field,
                "a fork takes this from its snapshot (only name, metadata, isolation (the snapshot's), mode, timeout, idle_timeout and keep_hot may be given)",
            ));
        }
        let lifecycle = sandforge_api::Lifecycle::validate(
            req.mode,
            req.timeout.as_deref(),
            req.idle_timeout.as_deref(),
            req.keep_hot,
        )?;
        if let Some(n) = &req.name {
            validate_name("name", n)?;
        }
        let snap = self
            .db
            .get_snapshot(&sid)?
            .filter(|s| s.org == org)
            .ok_or_else(|| ApiError::not_found("snapshot", &sid).field("snapshot_id"))?;
        if req.isolation.is_some_and(|i| i != snap.spec.isolation) {
            return Err(ApiError::bad_request(
                "isolation",
                format!(
                    "the snapshot is of a {} sandbox",
                    snap.spec.isolation.as_str()
                ),
            ));
        }
        if snap.memory && snap.spec.network == Network::Nat {
            return Err(ApiError::conflict(
                "unsupported",
                "forking a networked microVM is not supported (its guest keeps the parent's address); fork an offline one",
            )
            .field("snapshot_id"));
        }
        let id = new_id();
        let mut spec = snap.spec.clone();
        spec.lifecycle = lifecycle;
        spec.expires_at = spec
            .lifecycle
            .timeout_secs
            .map(|t| chrono::Utc::now().timestamp() + t as i64);
        spec.metadata = req.metadata.clone();
        spec.net_slot = None;
        let ts = now();
        let mut row = SandboxRow {
            id: id.clone(),
            org: org.to_string(),
            name: req.name.clone().unwrap_or_else(|| id.replace('_', "-")),
            status: SandboxStatus::Creating,
            status_reason: Some(format!("forked from {sid}")),
            spec,
            created_at: ts.clone(),
            updated_at: ts,
        };
        let backend = self.backend(row.spec.isolation)?;
        let lock = self.op_lock(&id);
        let _guard = lock.lock().await;
        self.admit(&mut row)?;
        let spec = self.spec_for(&row)?;
        let started = async {
            self.net_attach(&row).await?;
            backend.load_from(&spec, &self.snapshot_dir(&sid)).await?;
            Ok::<_, ApiError>(backend.restart(&spec).await?)
        }
        .await;
        match started {
            Ok(client) => {
                let _ = std::fs::remove_file(sandforge_runtime::backend::stopped_marker(&spec.dir));
                self.set_live(&id, client);
                self.db.set_status(
                    &id,
                    SandboxStatus::Running,
                    Some(&format!("forked from {sid}")),
                )?;
                self.start_clock(&id)?;
                self.touch(&id);
            }
            Err(e) => {
                let _ = backend.destroy(&spec).await;
                let _ = self.net_detach(&row).await;
                let reason = format!("fork failed: {}", e.message);
                self.db
                    .set_status(&id, SandboxStatus::Failed, Some(&reason))?;
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "start_failed",
                    reason,
                ));
            }
        }
        Ok(self.to_api(&self.get(org, &id)?))
    }
}
