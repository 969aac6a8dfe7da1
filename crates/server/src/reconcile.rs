//! Keeping the database and the host in agreement: after a (re)start,
//! adopt what still runs, fail what died, finish a stop that was cut
//! short, reclaim what nobody owns ([`Controller::reconcile`]); while
//! running, notice sandboxes that die ([`Controller::monitor`]). Must not
//! create sandboxes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sandforge_api::SandboxStatus;
use sandforge_runtime::Liveness;

use crate::controller::{bare_spec, Controller};
use crate::db::SandboxRow;
use crate::error::ApiError;

impl Controller {
    /// After a (re)start: adopt running sandboxes, fail the ones that died or
    /// were mid-create, and reclaim resources nobody owns any more.
    pub async fn reconcile(&self) -> Result<(), ApiError> {
        // Half-made snapshots first: a copy a killed daemon left running
        // must not go on writing while the sandbox it froze is thawed.
        let restart_after_copy = self.sweep_snapshots().unwrap_or_else(|e| {
            tracing::error!("sweeping snapshot staging: {}", e.message);
            vec![]
        });
        let rows = self.db.list_sandboxes(None)?;
        for row in &rows {
            match row.status {
                SandboxStatus::Running => {
                    let backend = self.backend(row.spec.isolation)?;
                    let spec = match self.spec_for(row) {
                        Ok(s) => s,
                        Err(e) => {
                            self.db
                                .set_status(&row.id, SandboxStatus::Failed, Some(&e.message))?;
                            continue;
                        }
                    };
                    match backend.probe(&spec).await {
                        Liveness::Running => {
                            if let Some(st) = self.recover_stop(row, true).await {
                                self.db.set_status(
                                    &row.id,
                                    st,
                                    Some("stop finished after a restart"),
                                )?;
                                continue;
                            }
                            self.set_live(&row.id, backend.agent(&spec));
                            tracing::info!(id = %row.id, "re-attached running sandbox");
                        }
                        Liveness::Dead(reason) => {
                            if let Some(st) = self.recover_stop(row, false).await {
                                self.db.set_status(
                                    &row.id,
                                    st,
                                    Some("stop finished after a restart"),
                                )?;
                                continue;
                            }
                            tracing::warn!(id = %row.id, "sandbox died while the supervisor was down: {reason}");
                            self.db
                                .set_status(&row.id, SandboxStatus::Failed, Some(&reason))?;
                        }
                    }
                }
                SandboxStatus::Suspended | SandboxStatus::Stopped => {
                    let (Ok(backend), Ok(spec)) =
                        (self.backend(row.spec.isolation), self.spec_for(row))
                    else {
                        continue;
                    };
                    let alive = backend.probe(&spec).await == Liveness::Running;
                    let stopped_now = if row.status == SandboxStatus::Stopped || !alive {
                        self.recover_stop(row, alive).await
                    } else {
                        None
                    };
                    match (row.status, alive, stopped_now) {
                        (SandboxStatus::Suspended, true, _) => {
                            self.set_live(&row.id, backend.agent(&spec))
                        }
                        (_, _, Some(st)) if st != row.status => self.db.set_status(
                            &row.id,
                            st,
                            Some("stop finished after a restart"),
                        )?,
                        (SandboxStatus::Suspended, false, None) => self.db.set_status(
                            &row.id,
                            SandboxStatus::Failed,
                            Some("gone while the supervisor was down"),
                        )?,
                        _ => {}
                    }
                }
                SandboxStatus::Creating | SandboxStatus::Starting => {
                    let reason = "supervisor restarted while the sandbox was being created";
                    if let Err(e) = self.reclaim(row).await {
                        tracing::warn!(id = %row.id, "reclaiming half-created sandbox: {}", e.message);
                    }
                    self.db
                        .set_status(&row.id, SandboxStatus::Failed, Some(reason))?;
                }
                _ => {}
            }
        }
        // Sandboxes a snapshot stopped for its copy run again.
        for id in restart_after_copy {
            let Ok(Some(row)) = self.db.get_sandbox(&id) else {
                continue;
            };
            if row.status == SandboxStatus::Stopped {
                match self.wake(&row.org, &id).await {
                    Ok(_) => tracing::info!(%id, "started again after an interrupted snapshot"),
                    Err(e) => {
                        tracing::warn!(%id, "starting after an interrupted snapshot: {}", e.message)
                    }
                }
            }
        }
        // Orphans: backend resources whose sandbox the database calls destroyed
        // or does not know.
        let known: HashMap<&str, &SandboxRow> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
        for backend in self.backends.values() {
            for id in backend.list().await.unwrap_or_default() {
                let owned = known
                    .get(id.as_str())
                    .is_some_and(|r| r.status != SandboxStatus::Destroyed);
                if !owned {
                    tracing::warn!(%id, "reclaiming orphaned sandbox");
                    let dir = self.sandbox_dir(&id);
                    if let Some(row) = known.get(id.as_str()) {
                        let _ = self.reclaim(row).await;
                    } else if let Ok(t) =
                        self.templates.get(sandforge_api::sandbox::DEFAULT_TEMPLATE)
                    {
                        let spec = bare_spec(&id, dir, t);
                        let _ = backend.destroy(&spec).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Periodically check running sandboxes; record the ones that died.
    pub async fn monitor(self: Arc<Self>) {
        let every = Duration::from_secs(self.cfg.monitor_interval_secs.max(1));
        loop {
            tokio::time::sleep(every).await;
            let ids: Vec<String> = self
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            for id in ids {
                let Ok(Some(row)) = self.db.get_sandbox(&id) else {
                    continue;
                };
                let (Ok(backend), Ok(spec)) =
                    (self.backend(row.spec.isolation), self.spec_for(&row))
                else {
                    continue;
                };
                if let Liveness::Dead(reason) = backend.probe(&spec).await {
                    self.mark_failed(&id, &reason).await;
                }
            }
        }
    }
}
