//! The controller: the one place that changes sandboxes. It checks requests
//! against state (templates, host paths, quotas, ownership, status), records
//! every transition in the database, drives the backends, keeps the agent
//! clients of running sandboxes. Its other parts live beside it, one
//! concern each: `reconcile` (restarts, dying sandboxes), `lifecycle`,
//! `snapshots`, `network`, `sessions`, `publish`. Routes call it; it must
//! not know HTTP beyond returning [`ApiError`]s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use rand::Rng;
use sandforge_api::sandbox::ValidCreate;
use sandforge_api::{CreateSandbox, Isolation, Sandbox, SandboxStatus};
use sandforge_runtime::{
    AgentClient, Backend, Liveness, ResolvedMount, SandboxSpec, TemplateStore,
};

use crate::config::Config;
use crate::db::{now, Db, SandboxRow, StoredSpec};
use crate::error::ApiError;

pub struct Controller {
    pub(crate) cfg: Config,
    /// Isolation used when a create does not name one.
    default_isolation: Isolation,
    /// The microVM accelerator, when that backend is available.
    accel: Option<String>,
    pub(crate) db: Db,
    pub(crate) templates: TemplateStore,
    /// Sandbox networking, when the host supports it.
    pub(crate) network: Option<Arc<sandforge_runtime::network::Network>>,
    pub(crate) backends: HashMap<&'static str, Arc<dyn Backend>>,
    /// Agent clients of running sandboxes.
    pub(crate) live: Mutex<HashMap<String, AgentClient>>,
    /// Last activity and requests in flight per sandbox (idleness).
    pub(crate) activity: crate::lifecycle::ActivityMap,
    /// Serializes lifecycle operations (create/destroy/fail) per sandbox.
    ops: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// What all buffered execs may hold (`exec_buffer_budget_mb`).
    output: Arc<crate::output::OutputBudget>,
    started: Instant,
}

/// `<prefix>_` and 12 random characters of `[0-9a-z]`.
pub(crate) fn random_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::thread_rng();
    let s: String = (0..12)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}_{s}")
}

pub(crate) fn new_id() -> String {
    random_id("sb")
}

impl Controller {
    /// `accel` is the microVM backend's accelerator when it is among
    /// `backends`; with `default_isolation: auto` a VM is the default only
    /// on hardware KVM.
    pub fn new(
        cfg: Config,
        db: Db,
        backends: Vec<Arc<dyn Backend>>,
        accel: Option<&str>,
        network: Option<Arc<sandforge_runtime::network::Network>>,
    ) -> Self {
        let templates =
            TemplateStore::new(&cfg.template_dir).with_own(cfg.state_dir.join("templates"));
        let backends: HashMap<&'static str, Arc<dyn Backend>> = backends
            .into_iter()
            .map(|b| (b.isolation().as_str(), b))
            .collect();
        let default_isolation = match cfg.default_isolation.as_str() {
            "microvm" => Isolation::Microvm,
            "container" => Isolation::Container,
            _ if accel == Some("kvm") && backends.contains_key("microvm") => Isolation::Microvm,
            _ => Isolation::Container,
        };
        let output = crate::output::OutputBudget::new(
            usize::try_from(cfg.exec_buffer_budget_mb << 20).unwrap_or(usize::MAX),
        );
        Controller {
            output,
            default_isolation,
            accel: accel.map(str::to_string),
            cfg,
            db,
            templates,
            backends,
            network,
            activity: Default::default(),
            live: Mutex::new(HashMap::new()),
            ops: Mutex::new(HashMap::new()),
            started: Instant::now(),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Admit one buffered exec to the output budget: 429 `limit` when it
    /// is spent (call before anything runs).
    pub(crate) fn admit_buffered(&self) -> Result<crate::output::Reservation, ApiError> {
        self.output
            .admit()
            .ok_or_else(|| crate::output::budget_spent(&self.output))
    }

    pub(crate) fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.entry(id.to_string()).or_default().clone()
    }

    pub(crate) fn backend(&self, iso: Isolation) -> Result<Arc<dyn Backend>, ApiError> {
        self.backends.get(iso.as_str()).cloned().ok_or_else(|| {
            ApiError::bad_request(
                "isolation",
                format!("'{}' is not available on this host", iso.as_str()),
            )
        })
    }

    pub(crate) fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("sandboxes").join(id)
    }

    pub(crate) fn spec_for(&self, row: &SandboxRow) -> Result<SandboxSpec, ApiError> {
        let template = self.templates.get(&row.spec.template)?;
        let allowed = match row.spec.mounts.is_empty() {
            true => vec![],
            false => sandforge_runtime::hostpath::allowed_roots(&self.cfg.allowed_host_paths),
        };
        Ok(SandboxSpec {
            id: row.id.clone(),
            dir: self.sandbox_dir(&row.id),
            hostname: row.name.clone(),
            cpus: row.spec.cpus,
            memory_mb: row.spec.memory_mb,
            disk_mb: row.spec.disk_mb,
            pids_limit: self.cfg.pids_limit,
            network: row.spec.network,
            net: self.lease_of(row),
            mounts: row
                .spec
                .mounts
                .iter()
                .zip(&row.spec.resolved_host_paths)
                .map(|(m, host)| ResolvedMount {
                    host_path: host.into(),
                    root: sandforge_runtime::hostpath::locate(&allowed, Path::new(host))
                        .ok()
                        .map(|(root, _)| root),
                    guest_path: m.guest_path.clone(),
                    read_only: m.read_only,
                })
                .collect(),
            env: row.spec.env.clone(),
            template,
        })
    }

    pub(crate) fn set_live(&self, id: &str, client: AgentClient) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), client);
    }

    /// The working directory a template's image names (`WorkingDir`).
    pub(crate) fn template_workdir(&self, template: &str) -> Option<String> {
        self.templates
            .get(template)
            .ok()
            .and_then(|t| t.workdir)
            .filter(|w| w.starts_with('/'))
    }

    /// The user a template's commands run as when a request names none
    /// (the image config's `User`); `None` is root.
    pub(crate) fn template_user(&self, template: &str) -> Option<String> {
        self.templates
            .get(template)
            .ok()
            .and_then(|t| t.user)
            .filter(|u| !u.is_empty())
    }

    /// The login shell of a template, when it names one.
    pub(crate) fn template_shell(&self, template: &str) -> Option<String> {
        self.templates.get(template).ok().map(|t| t.shell)
    }

    /// The API view of a row.
    pub fn to_api(&self, row: &SandboxRow) -> Sandbox {
        Sandbox {
            id: row.id.clone(),
            name: row.name.clone(),
            status: row.status,
            isolation: row.spec.isolation,
            accel: row.spec.accel.clone(),
            template: row.spec.template.clone(),
            cpu: row.spec.cpus,
            cpus: row.spec.cpus,
            memory_mb: row.spec.memory_mb,
            disk_mb: row.spec.disk_mb,
            network: row.spec.network,
            egress: row.spec.egress.clone(),
            ip: self.lease_of(row).map(|l| l.guest_ip.to_string()),
            mounts: row.spec.mounts.clone(),
            env_keys: row.spec.env.keys().cloned().collect(),
            metadata: row.spec.metadata.clone(),
            created_at: row.created_at.clone(),
            updated_at: row.updated_at.clone(),
            status_reason: row.status_reason.clone(),
            mode: row.spec.lifecycle.mode,
            expires_at: row.spec.expires_at.and_then(|t| {
                chrono::DateTime::from_timestamp(t, 0)
                    .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            }),
            idle_timeout: row.spec.lifecycle.idle_timeout_secs,
            keep_hot: row.spec.lifecycle.keep_hot,
        }
    }

    /// Check each mount's host path: a plain absolute path inside one of
    /// the configured `allowed_host_paths`, opened from that root with no
    /// symlink followed (the runtime opens it the same way again at every
    /// start). Answers the paths to store, under the roots' real spelling.
    fn resolve_mounts(&self, v: &ValidCreate) -> Result<Vec<String>, ApiError> {
        use sandforge_runtime::hostpath::{self, HostPathError};
        let roots = hostpath::allowed_roots(&self.cfg.allowed_host_paths);
        v.mounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let field = format!("mounts[{i}].host_path");
                let path = Path::new(&m.host_path);
                let checked = hostpath::locate(&roots, path).and_then(|(root, rel)| {
                    hostpath::open_beneath(&root, &rel).map(|_| root.join(rel))
                });
                let real = checked.map_err(|e| match e {
                    // A path that does not exist at all is bad input first
                    // (the lookup only chooses the message).
                    HostPathError::Outside(_) if std::fs::symlink_metadata(path).is_err() => {
                        ApiError::bad_request(
                            &field,
                            format!("'{}': no such file or directory", m.host_path),
                        )
                    }
                    HostPathError::Outside(_) | HostPathError::Symlink(_) => {
                        ApiError::forbidden(format!("{field}: {e}")).field(field.clone())
                    }
                    HostPathError::NotPlain(_) | HostPathError::Io { .. } => {
                        ApiError::bad_request(&field, e.to_string())
                    }
                })?;
                let s = real
                    .to_str()
                    .ok_or_else(|| ApiError::bad_request(&field, "path is not UTF-8"))?;
                Ok(s.to_string())
            })
            .collect()
    }

    /// The root disk of a new sandbox: microVMs get `disk_mb` (default
    /// `vm_disk_mb`), never less than their template's image; containers
    /// get `disk_mb` (default `container_disk_mb`; 0: none) for their
    /// writable layer, an ext4 image of that size.
    /// The root disk size: the create's `disk_mb`, else the template's
    /// default (`template_disk`; for a microVM never below the template's
    /// image), else the configured default.
    fn disk_size(
        &self,
        isolation: Isolation,
        v: &ValidCreate,
        template: &sandforge_runtime::Template,
        template_disk: Option<u64>,
    ) -> Result<Option<u64>, ApiError> {
        if isolation == Isolation::Container {
            return Ok(v
                .disk_mb
                .or(template_disk)
                .or(Some(self.cfg.container_disk_mb).filter(|&mb| mb > 0)));
        }
        let image = sandforge_runtime::microvm::base_image(template);
        let min = std::fs::metadata(&image)
            .map(|m| m.len().div_ceil(1 << 20))
            .unwrap_or(0);
        match v.disk_mb {
            Some(d) if d < min => Err(ApiError::bad_request(
                "disk_mb",
                format!(
                    "must be at least {min} (the size of template '{}')",
                    template.name
                ),
            )),
            Some(d) => Ok(Some(d)),
            None => Ok(Some(template_disk.unwrap_or(self.cfg.vm_disk_mb).max(min))),
        }
    }

    /// What the create left out comes from its template (seed 001: "if
    /// omitted, the template's default egress policy is used"). A
    /// template's egress applies only where the create did not ask for an
    /// offline sandbox and the host has networking (offline is never less
    /// safe than a policy).
    fn apply_template_defaults(&self, v: &mut ValidCreate, d: sandforge_api::TemplateDefaults) {
        v.cpus = v.cpus.or(d.cpus);
        v.memory_mb = v.memory_mb.or(d.memory_mb);
        if v.egress.is_none()
            && v.network != Some(sandforge_api::Network::Offline)
            && self.network.is_some()
        {
            v.egress = d.egress;
        }
    }

    pub async fn create(&self, org: &str, req: CreateSandbox) -> Result<Sandbox, ApiError> {
        if req.snapshot_id.is_some() {
            return self.fork(org, req).await;
        }
        let egress_field = crate::network::egress_field(req.network_policy.is_some());
        let mut v = req.validate()?;
        let isolation = v.isolation.unwrap_or(self.default_isolation);
        let backend = self.backend(isolation)?;
        let (stored, defaults) = self.resolve_template_with_defaults(org, &v.template)?;
        let template = self.templates.get(&stored)?;
        let template_disk = v.disk_mb.is_none().then_some(defaults.disk_mb).flatten();
        self.apply_template_defaults(&mut v, defaults);
        if isolation == Isolation::Microvm {
            self.vm_image(&v.template, &template).await?;
        }
        let disk_mb = self.disk_size(isolation, &v, &template, template_disk)?;
        let resolved = self.resolve_mounts(&v)?;
        let (network, egress) = self.net_choice(&v, egress_field)?;
        let id = new_id();
        let name = v.name.clone().unwrap_or_else(|| id.replace('_', "-"));
        let ts = now();
        let row = SandboxRow {
            id: id.clone(),
            org: org.to_string(),
            name,
            status: SandboxStatus::Creating,
            status_reason: None,
            spec: StoredSpec {
                isolation,
                accel: if isolation == Isolation::Microvm {
                    self.accel.clone()
                } else {
                    None
                },
                template: stored,
                cpus: v.cpus.unwrap_or(sandforge_api::sandbox::DEFAULT_CPUS),
                memory_mb: v
                    .memory_mb
                    .unwrap_or(sandforge_api::sandbox::DEFAULT_MEMORY_MB),
                disk_mb,
                network,
                net_slot: None,
                egress,
                lifecycle: v.lifecycle.clone(),
                expires_at: v
                    .lifecycle
                    .timeout_secs
                    .map(|t| chrono::Utc::now().timestamp() + t as i64),
                mounts: v.mounts.clone(),
                resolved_host_paths: resolved,
                // The image's `Env` under the request's.
                env: template
                    .env
                    .iter()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain(v.env.clone())
                    .collect(),
                metadata: v.metadata.clone(),
            },
            created_at: ts.clone(),
            updated_at: ts,
        };
        let lock = self.op_lock(&id);
        let _guard = lock.lock().await;
        let mut row = row;
        self.admit(&mut row)?;
        let spec = self.spec_for(&row)?;
        let t0 = Instant::now();
        let started = match self.net_attach(&row).await {
            Ok(()) => backend.start(&spec).await,
            Err(e) => Err(sandforge_runtime::RuntimeError::Setup(e.message)),
        };
        if started.is_err() {
            if let Err(e) = self.net_detach(&row).await {
                tracing::error!(%id, "network cleanup after a failed start: {}", e.message);
            }
        }
        let started = match started {
            Ok(client) => match &v.init {
                Some(cmd) => self.start_init(&client, &row, cmd).await.map(|_| client),
                None => Ok(client),
            },
            Err(e) => Err(e),
        };
        if started.is_err() {
            if let Ok(backend) = self.backend(isolation) {
                let _ = backend.destroy(&spec).await;
            }
            let _ = self.net_detach(&row).await;
        }
        match started {
            Ok(client) => {
                self.live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), client);
                self.db.set_status(&id, SandboxStatus::Running, None)?;
                self.start_clock(&id)?;
                self.touch(&id);
                tracing::info!(%id, ms = t0.elapsed().as_millis() as u64, "sandbox running");
            }
            Err(e) => {
                let reason = format!("start failed: {e}");
                tracing::error!(%id, "{reason}");
                self.db
                    .set_status(&id, SandboxStatus::Failed, Some(&reason))?;
                return Err(start_failed(e));
            }
        }
        let row = self
            .db
            .get_sandbox(&id)?
            .ok_or_else(|| ApiError::internal("sandbox vanished"))?;
        Ok(self.to_api(&row))
    }

    /// A sandbox of `org`: 404 when unknown, 403 when another org's.
    pub fn get(&self, org: &str, id: &str) -> Result<SandboxRow, ApiError> {
        let row = self
            .db
            .get_sandbox(id)?
            .ok_or_else(|| ApiError::not_found("sandbox", id))?;
        if row.org != org {
            return Err(ApiError::forbidden(format!(
                "sandbox '{id}' belongs to another organization"
            )));
        }
        Ok(row)
    }

    pub fn list(&self, org: &str, status: Option<SandboxStatus>) -> Result<Vec<Sandbox>, ApiError> {
        Ok(self
            .db
            .list_sandboxes(Some(org))?
            .iter()
            .filter(|r| match status {
                Some(s) => r.status == s,
                None => r.status != SandboxStatus::Destroyed,
            })
            .map(|r| self.to_api(r))
            .collect())
    }

    /// Number of sandboxes that are not destroyed (all orgs).
    pub fn count_live(&self) -> Result<u64, ApiError> {
        Ok(self
            .db
            .list_sandboxes(None)?
            .iter()
            .filter(|r| r.status != SandboxStatus::Destroyed)
            .count() as u64)
    }

    /// Destroy (idempotent). Works from any state, including `creating` and
    /// `failed`: every host resource is reclaimed before it reports success.
    pub async fn destroy(&self, org: &str, id: &str) -> Result<(), ApiError> {
        let row = self.get(org, id)?;
        if row.status == SandboxStatus::Destroyed {
            return Ok(());
        }
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.reclaim(&row).await?;
        self.discard_staging(id).await?;
        self.db.delete_publish_all(id)?;
        self.db.set_status(id, SandboxStatus::Destroyed, None)?;
        self.ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        tracing::info!(%id, "sandbox destroyed");
        Ok(())
    }

    pub(crate) async fn reclaim(&self, row: &SandboxRow) -> Result<(), ApiError> {
        let backend = self.backend(row.spec.isolation)?;
        // Destroy needs only the id and directory, so it works even when the
        // template has vanished since.
        let spec = self.spec_for(row).unwrap_or_else(|_| {
            bare_spec(
                &row.id,
                self.sandbox_dir(&row.id),
                sandforge_runtime::Template {
                    name: row.spec.template.clone(),
                    rootfs: PathBuf::new(),
                    uid_shift: 0,
                    shell: String::new(),
                    env: Vec::new(),
                    workdir: None,
                    user: None,
                },
            )
        });
        backend.destroy(&spec).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "destroy_failed",
                format!("destroy failed (retry): {e}"),
            )
        })?;
        self.net_detach(row).await
    }

    /// The last `max` bytes of a sandbox's console (serial console of a VM,
    /// stdio of a container's init), kept until the sandbox is destroyed.
    pub fn console(&self, org: &str, id: &str, max: u64) -> Result<String, ApiError> {
        self.get(org, id)?;
        Ok(sandforge_runtime::console::tail(&self.sandbox_dir(id), max))
    }

    /// The agent of a running sandbox, whoever owns it (the publish
    /// listener: a published port is public).
    pub async fn agent_of(&self, id: &str) -> Result<AgentClient, ApiError> {
        let row = self
            .db
            .get_sandbox(id)?
            .ok_or_else(|| ApiError::not_found("sandbox", id))?;
        self.agent(&row.org, id).await
    }

    /// The agent of a running sandbox of `org`; 409 when it is not running.
    /// The agent of a sandbox of `org` that needs to run: a suspended or
    /// stopped one is woken first (transparently), and the request counts
    /// as activity. 409 when it cannot run.
    pub async fn agent(&self, org: &str, id: &str) -> Result<AgentClient, ApiError> {
        self.wake(org, id).await?;
        self.touch(id);
        self.running_agent(org, id)
    }

    /// The agent of a running sandbox of `org`, without waking anything.
    pub fn running_agent(&self, org: &str, id: &str) -> Result<AgentClient, ApiError> {
        let row = self.get(org, id)?;
        if row.status != SandboxStatus::Running {
            return Err(not_running(&row));
        }
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| {
                ApiError::conflict("not_running", format!("sandbox '{id}' is not running"))
            })
    }

    /// Called when talking to an agent failed: if the sandbox died, record
    /// it and answer 409; otherwise the agent is merely unreachable (502).
    pub async fn agent_failed(&self, id: &str, err: impl std::fmt::Display) -> ApiError {
        if let Ok(Some(row)) = self.db.get_sandbox(id) {
            if let (Ok(backend), Ok(spec)) = (self.backend(row.spec.isolation), self.spec_for(&row))
            {
                if let Liveness::Dead(reason) = backend.probe(&spec).await {
                    self.mark_failed(id, &reason).await;
                    return ApiError::conflict(
                        "not_running",
                        format!("sandbox '{id}' is not running: {reason}"),
                    );
                }
            }
        }
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "agent_unavailable",
            format!("sandbox agent unavailable: {err}"),
        )
    }

    pub(crate) async fn mark_failed(&self, id: &str, reason: &str) {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        if let Ok(Some(row)) = self.db.get_sandbox(id) {
            if row.status == SandboxStatus::Running {
                self.live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(id);
                tracing::warn!(%id, "sandbox failed: {reason}");
                if let Err(e) = self.db.set_status(id, SandboxStatus::Failed, Some(reason)) {
                    tracing::error!(%id, "recording failure: {e}");
                }
            }
        }
    }
}

/// A spec with just enough in it to find and destroy a sandbox's resources.
pub(crate) fn bare_spec(
    id: &str,
    dir: PathBuf,
    template: sandforge_runtime::Template,
) -> SandboxSpec {
    SandboxSpec {
        id: id.to_string(),
        dir,
        hostname: id.to_string(),
        cpus: 1,
        memory_mb: 0,
        disk_mb: None,
        pids_limit: 0,
        network: sandforge_api::Network::Offline,
        net: None,
        mounts: vec![],
        env: Default::default(),
        template,
    }
}

pub fn not_running(row: &SandboxRow) -> ApiError {
    let mut msg = format!("sandbox '{}' is {}", row.id, row.status.as_str());
    if let Some(r) = &row.status_reason {
        msg.push_str(&format!(": {r}"));
    }
    ApiError::conflict("not_running", msg)
}

/// A failed start: the caller's fault (a host mount that is no longer a
/// plain path below an allowed root) is a 4xx naming `mounts`; anything else
/// is 503 `start_failed`.
pub(crate) fn start_failed(e: sandforge_runtime::RuntimeError) -> ApiError {
    match e {
        e @ sandforge_runtime::RuntimeError::HostPath(_) => e.into(),
        e => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "start_failed",
            format!("start failed: {e}"),
        ),
    }
}
