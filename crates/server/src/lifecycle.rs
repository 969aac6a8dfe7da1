//! Sandbox lifecycle (seeds 001/002): expiry of ephemeral sandboxes and
//! keepalive, idleness, the thermal manager, wake, and the explicit
//! `stop`/`start`.
//!
//! States: hot = `running`; warm = `suspended` (processes paused in place:
//! a VM's vCPUs, a container's cgroup freezer; memory kept); cold =
//! `stopped` (state on disk, processes ended, memory released). A sandbox
//! is idle when no request needed it (exec, files, terminal, ports, proxy,
//! publish) for a while and none is in flight (an open terminal or a
//! running exec counts for its whole life). The thermal task moves an idle
//! hot sandbox to warm after its warm delay (its `idle_timeout` when it is
//! persistent and has one, else `thermal_warm_after_secs`), a warm one to
//! cold after `thermal_cold_after_secs` more (0 disables either step), and
//! never touches a `keep_hot` one. Any request that needs a sandbox wakes
//! it first ([`Controller::wake`]).
//!
//! Crash safety: a stop marks `snap/STOPPED` in the sandbox directory once
//! its state is durable (a container: before it ends its processes, since
//! its filesystem is the state), so a supervisor killed mid-stop finds on
//! restart either a live sandbox (and resumes it) or a marked one (stopped,
//! startable), never a half-written snapshot: the snapshot's manifest is
//! written last.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandforge_api::lifecycle::parse_duration;
use sandforge_api::{Keepalive, Mode, Sandbox, SandboxStatus};
use serde::Serialize;

use sandforge_runtime::Liveness;

use crate::controller::{not_running, Controller};
use crate::db::SandboxRow;
use crate::error::ApiError;

/// How long `start` waits for a running sandbox's agent to answer.
const AGENT_CHECK: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Activity {
    last: Instant,
    inflight: u32,
}

pub type ActivityMap = Mutex<HashMap<String, Activity>>;

/// Keeps a sandbox busy (not idle) while alive.
pub struct Busy {
    controller: Arc<Controller>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut map = self
            .controller
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(a) = map.get_mut(&self.id) {
            a.inflight = a.inflight.saturating_sub(1);
            a.last = Instant::now();
        }
    }
}

/// One recorded status change.
#[derive(Debug, Serialize)]
pub struct Transition {
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
}

use sandforge_runtime::backend::stopped_marker as marker;

impl Controller {
    /// Record activity now.
    pub fn touch(&self, id: &str) {
        let mut map = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_string())
            .and_modify(|a| a.last = Instant::now())
            .or_insert(Activity {
                last: Instant::now(),
                inflight: 0,
            });
    }

    /// Mark the sandbox busy until the guard is dropped.
    pub fn busy(self: &Arc<Self>, id: &str) -> Busy {
        self.touch(id);
        if let Some(a) = self
            .activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(id)
        {
            a.inflight += 1;
        }
        Busy {
            controller: self.clone(),
            id: id.to_string(),
        }
    }

    /// How long the sandbox has been idle; `None` while a request is in
    /// flight. A sandbox never seen (e.g. after a restart) starts now.
    fn idle_for(&self, id: &str) -> Option<Duration> {
        let mut map = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        let a = map.entry(id.to_string()).or_insert(Activity {
            last: Instant::now(),
            inflight: 0,
        });
        (a.inflight == 0).then(|| a.last.elapsed())
    }

    /// Make a suspended or stopped sandbox run again (idempotent for a
    /// running one); 409 for one that cannot run.
    pub async fn wake(&self, org: &str, id: &str) -> Result<Sandbox, ApiError> {
        self.get(org, id)?;
        {
            // Always under the op lock, with the activity recorded before
            // it is released: the thermal manager re-checks idleness under
            // the same lock, so it either paused first (and this resumes)
            // or sees this request and leaves the sandbox running.
            let lock = self.op_lock(id);
            let _guard = lock.lock().await;
            self.touch(id);
            let row = self.get(org, id)?;
            match row.status {
                SandboxStatus::Suspended => self.resume_row(&row).await?,
                SandboxStatus::Stopped => self.start_row(&row).await?,
                _ => {}
            }
        }
        let row = self.get(org, id)?;
        if row.status != SandboxStatus::Running {
            return Err(not_running(&row));
        }
        Ok(self.to_api(&row))
    }

    async fn resume_row(&self, row: &SandboxRow) -> Result<(), ApiError> {
        let backend = self.backend(row.spec.isolation)?;
        let spec = self.spec_for(row)?;
        backend.resume(&spec).await?;
        self.db
            .set_status(&row.id, SandboxStatus::Running, Some("woken"))?;
        self.touch(&row.id);
        tracing::info!(id = %row.id, "sandbox resumed (warm → hot)");
        Ok(())
    }

    async fn start_row(&self, row: &SandboxRow) -> Result<(), ApiError> {
        let backend = self.backend(row.spec.isolation)?;
        let spec = self.spec_for(row)?;
        let t0 = Instant::now();
        let client = backend
            .restart(&spec)
            .await
            .map_err(crate::controller::start_failed)?;
        let _ = std::fs::remove_file(marker(&spec.dir));
        self.set_live(&row.id, client);
        self.db
            .set_status(&row.id, SandboxStatus::Running, Some("started"))?;
        self.touch(&row.id);
        tracing::info!(id = %row.id, ms = t0.elapsed().as_millis() as u64, "sandbox started (cold → hot)");
        Ok(())
    }

    /// `POST /sandboxes/{id}/start`. Answers `running` only for a sandbox
    /// whose agent answers: one that the database calls running but whose
    /// processes are gone becomes `failed` (409).
    pub async fn start(&self, org: &str, id: &str) -> Result<Sandbox, ApiError> {
        let row = self.get(org, id)?;
        if !matches!(
            row.status,
            SandboxStatus::Stopped | SandboxStatus::Suspended | SandboxStatus::Running
        ) {
            return Err(not_running(&row));
        }
        let sandbox = self.wake(org, id).await?;
        if row.status == SandboxStatus::Running {
            self.verify_alive(org, id).await?;
            return Ok(self.to_api(&self.get(org, id)?));
        }
        Ok(sandbox)
    }

    /// Check that a running sandbox's processes are there and its agent
    /// answers; record it `failed` (409) when they are gone.
    async fn verify_alive(&self, org: &str, id: &str) -> Result<(), ApiError> {
        let row = self.get(org, id)?;
        let backend = self.backend(row.spec.isolation)?;
        let spec = self.spec_for(&row)?;
        if let Liveness::Dead(reason) = backend.probe(&spec).await {
            self.mark_failed(id, &reason).await;
            return Err(not_running(&self.get(org, id)?));
        }
        let client = self.running_agent(org, id)?;
        match tokio::time::timeout(AGENT_CHECK, client.info()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.agent_failed(id, e).await),
            Err(_) => Err(self
                .agent_failed(id, format!("no answer within {AGENT_CHECK:?}"))
                .await),
        }
    }

    /// `POST /sandboxes/{id}/stop`: state to disk, processes ended.
    pub async fn stop(&self, org: &str, id: &str) -> Result<StopResult, ApiError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let row = self.get(org, id)?;
        match row.status {
            SandboxStatus::Running => {}
            SandboxStatus::Suspended => self.resume_row(&row).await?,
            SandboxStatus::Stopped => {
                return Ok(StopResult {
                    sandbox: self.to_api(&row),
                    snapshot: None,
                    snapshot_bytes: 0,
                    ms: 0,
                })
            }
            _ => return Err(not_running(&row)),
        }
        let backend = self.backend(row.spec.isolation)?;
        let spec = self.spec_for(&row)?;
        let t0 = Instant::now();
        let report = match backend.stop(&spec).await {
            Ok(r) => r,
            Err(sandforge_runtime::RuntimeError::Unsupported(m)) => {
                return Err(ApiError::conflict("cannot_stop", m))
            }
            Err(e) => {
                // A stop that failed half-way may have ended the processes:
                // a dead sandbox must not stay `running`.
                if let Liveness::Dead(reason) = backend.probe(&spec).await {
                    self.live
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(id);
                    let reason = format!("stop failed: {e} ({reason})");
                    self.db
                        .set_status(id, SandboxStatus::Failed, Some(&reason))?;
                }
                return Err(ApiError::from(e));
            }
        };
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.db
            .set_status(id, SandboxStatus::Stopped, Some("stopped"))?;
        let ms = t0.elapsed().as_millis() as u64;
        tracing::info!(%id, ms, kind = report.kind, bytes = report.bytes, "sandbox stopped");
        Ok(StopResult {
            sandbox: self.to_api(&self.get(org, id)?),
            snapshot: Some(report.kind.to_string()),
            snapshot_bytes: report.bytes,
            ms,
        })
    }

    /// An ephemeral sandbox's clock starts when it is running, not when it
    /// was inserted (a VM's boot or a slow start does not eat its timeout).
    /// Call under the op lock, right after the sandbox became `running`.
    pub(crate) fn start_clock(&self, id: &str) -> Result<(), ApiError> {
        let Some(row) = self.db.get_sandbox(id)? else {
            return Ok(());
        };
        if let Some(t) = row.spec.lifecycle.timeout_secs {
            let mut spec = row.spec;
            spec.expires_at = Some(chrono::Utc::now().timestamp() + t as i64);
            self.db.set_spec(id, &spec)?;
        }
        Ok(())
    }

    /// `POST /sandboxes/{id}/keepalive`.
    pub async fn keepalive(
        &self,
        org: &str,
        id: &str,
        req: Keepalive,
    ) -> Result<Sandbox, ApiError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let row = self.get(org, id)?;
        if row.spec.lifecycle.mode != Mode::Ephemeral {
            return Err(ApiError::conflict(
                "not_ephemeral",
                format!("sandbox '{id}' is persistent: it has no timeout to extend"),
            ));
        }
        if row.status != SandboxStatus::Running {
            return Err(not_running(&row));
        }
        let secs = match &req.timeout {
            Some(t) => parse_duration("timeout", t)?,
            None => row.spec.lifecycle.timeout_secs.unwrap_or(300),
        };
        let mut spec = row.spec.clone();
        spec.expires_at = Some(chrono::Utc::now().timestamp() + secs as i64);
        self.db.set_spec(id, &spec)?;
        self.touch(id);
        Ok(self.to_api(&self.get(org, id)?))
    }

    pub fn transitions(&self, org: &str, id: &str) -> Result<Vec<Transition>, ApiError> {
        self.get(org, id)?;
        Ok(self
            .db
            .events(id)?
            .into_iter()
            .map(|(status, reason, at)| Transition { status, reason, at })
            .collect())
    }

    /// After a restart: a stop that was cut short either left the sandbox
    /// live (resume it) or marked (it is stopped).
    pub(crate) async fn recover_stop(
        &self,
        row: &SandboxRow,
        alive: bool,
    ) -> Option<SandboxStatus> {
        let spec = self.spec_for(row).ok()?;
        let marked = marker(&spec.dir).exists();
        let backend = self.backend(row.spec.isolation).ok()?;
        if alive && !marked {
            // Paused by a stop that did not finish: let it run, or, when
            // its state already went out, finish the stop.
            return match backend.resume(&spec).await {
                Err(sandforge_runtime::RuntimeError::Unsupported(_)) => {
                    match backend.stop(&spec).await {
                        Ok(_) => Some(SandboxStatus::Stopped),
                        Err(e) => {
                            tracing::error!(id = %row.id, "finishing an interrupted stop: {e}");
                            None
                        }
                    }
                }
                _ => None,
            };
        }
        if marked {
            let _ = backend.stop(&spec).await;
            return Some(SandboxStatus::Stopped);
        }
        None
    }

    /// The thermal manager and expiry, every `lifecycle_interval_ms`.
    pub async fn lifecycle(self: Arc<Self>) {
        let every = Duration::from_millis(self.cfg.lifecycle_interval_ms.max(100));
        loop {
            tokio::time::sleep(every).await;
            let Ok(rows) = self.db.list_sandboxes(None) else {
                continue;
            };
            let now = chrono::Utc::now().timestamp();
            for row in rows {
                if let Err(e) = self.lifecycle_step(&row, now).await {
                    tracing::warn!(id = %row.id, "lifecycle: {}", e.message);
                }
            }
        }
    }

    async fn lifecycle_step(&self, row: &SandboxRow, now: i64) -> Result<(), ApiError> {
        let live = matches!(
            row.status,
            SandboxStatus::Running | SandboxStatus::Suspended | SandboxStatus::Stopped
        );
        if !live {
            return Ok(());
        }
        if row.spec.expires_at.is_some_and(|t| t <= now) {
            tracing::info!(id = %row.id, "ephemeral sandbox expired");
            return self.destroy(&row.org, &row.id).await;
        }
        if row.spec.lifecycle.keep_hot {
            return Ok(());
        }
        let Some(idle) = self.idle_for(&row.id) else {
            return Ok(());
        };
        let warm = row
            .spec
            .lifecycle
            .idle_timeout_secs
            .unwrap_or(self.cfg.thermal_warm_after_secs);
        let cold = self.cfg.thermal_cold_after_secs;
        match row.status {
            SandboxStatus::Running if warm > 0 && idle >= Duration::from_secs(warm) => {
                let lock = self.op_lock(&row.id);
                let _guard = lock.lock().await;
                // Again under the lock: a request that arrived meanwhile
                // (it touches under this lock) or an operation that changed
                // the sandbox wins over the pause.
                let Some(row) = self.db.get_sandbox(&row.id)? else {
                    return Ok(());
                };
                let still_idle = self
                    .idle_for(&row.id)
                    .is_some_and(|i| i >= Duration::from_secs(warm));
                if row.status != SandboxStatus::Running
                    || row.spec.lifecycle.keep_hot
                    || !still_idle
                {
                    return Ok(());
                }
                let row = &row;
                let backend = self.backend(row.spec.isolation)?;
                let spec = self.spec_for(row)?;
                backend.pause(&spec).await?;
                self.db
                    .set_status(&row.id, SandboxStatus::Suspended, Some("idle"))?;
                tracing::info!(id = %row.id, idle_s = idle.as_secs(), "sandbox suspended (hot → warm)");
            }
            SandboxStatus::Suspended
                if cold > 0 && idle >= Duration::from_secs(warm.max(1) + cold) =>
            {
                if let Err(e) = self.stop(&row.org, &row.id).await {
                    // e.g. a VM with host mounts: it stays warm.
                    tracing::debug!(id = %row.id, "cold: {}", e.message);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// `POST /sandboxes/{id}/stop`'s answer.
#[derive(Debug, Serialize)]
pub struct StopResult {
    #[serde(flatten)]
    pub sandbox: Sandbox,
    /// `memory-full`, `memory-diff` or `filesystem`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    pub snapshot_bytes: u64,
    pub ms: u64,
}
