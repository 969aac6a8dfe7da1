//! The one trait every isolation backend implements, and the spec it takes.
//!
//! A backend owns the sandbox's processes and host resources (mounts,
//! cgroups, later taps and VM disks) and nothing else: ids, ownership and
//! status live in the server's database.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sandforge_api::{Isolation, Network};

use crate::agent::AgentClient;
use crate::error::Result;
use crate::template::Template;

/// A host directory to bind into the sandbox. `host_path` was checked at
/// create; `root` is the allowed root it lies under in the configuration in
/// force now (`None`: no longer allowed). Backends never use `host_path` by
/// name: they [`ResolvedMount::open`] it below `root` without following
/// symlinks, at every start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMount {
    pub host_path: PathBuf,
    pub root: Option<PathBuf>,
    pub guest_path: String,
    pub read_only: bool,
}

impl ResolvedMount {
    /// An `O_PATH` descriptor of the host directory, resolved from its
    /// allowed root with no symlink followed.
    pub fn open(&self) -> Result<std::os::fd::OwnedFd> {
        let outside = || {
            crate::error::RuntimeError::HostPath(crate::hostpath::HostPathError::Outside(
                self.host_path.clone(),
            ))
        };
        let root = self.root.as_deref().ok_or_else(outside)?;
        let rel = self.host_path.strip_prefix(root).map_err(|_| outside())?;
        crate::hostpath::open_beneath(root, rel).map_err(crate::error::RuntimeError::HostPath)
    }
}

/// Where a sandbox's host mounts are staged when the staging place must not
/// be writable by the sandbox's own identity (a microVM's directory belongs
/// to its QEMU uid): `<state>/hostmounts/<id>`, root's, 0700.
pub fn host_mount_staging(spec: &SandboxSpec) -> PathBuf {
    let state = spec
        .dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"));
    state.join("hostmounts").join(&spec.id)
}

/// Everything a backend needs to run one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    /// `<state>/sandboxes/<id>`: owned by the backend while the sandbox lives.
    pub dir: PathBuf,
    pub hostname: String,
    pub cpus: u32,
    pub memory_mb: u64,
    /// Root disk size (microVMs); `None` keeps the template image's size.
    pub disk_mb: Option<u64>,
    pub pids_limit: u64,
    pub network: Network,
    /// The link and addresses of a `nat` sandbox.
    pub net: Option<crate::network::Lease>,
    pub mounts: Vec<ResolvedMount>,
    pub env: BTreeMap<String, String>,
    pub template: Template,
}

/// Present in a sandbox directory once a stop has made its state durable
/// (written by the backends, removed by a successful restart): after a
/// crash in the middle of a stop, it tells a stopped sandbox from one that
/// is still running.
pub fn stopped_marker(dir: &std::path::Path) -> PathBuf {
    dir.join("snap").join("STOPPED")
}

/// Write the marker (and its directory).
pub fn mark_stopped(dir: &std::path::Path) -> crate::error::Result<()> {
    let m = stopped_marker(dir);
    if let Some(p) = m.parent() {
        std::fs::create_dir_all(p).map_err(|e| crate::error::RuntimeError::io("mkdir", p, e))?;
    }
    std::fs::write(&m, b"").map_err(|e| crate::error::RuntimeError::io("write", &m, e))
}

/// What a stop wrote to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// `memory-full`, `memory-diff` (VMs) or `filesystem` (containers).
    pub kind: &'static str,
    /// Bytes of memory snapshot written by this stop (0 for containers).
    pub bytes: u64,
}

/// What a backend finds when it looks at a sandbox after a supervisor restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    Running,
    /// Gone or broken, with the reason to record.
    Dead(String),
}

#[async_trait]
pub trait Backend: Send + Sync {
    fn isolation(&self) -> Isolation;

    /// Build and boot the sandbox; returns once its agent answers. On error
    /// the backend has already cleaned up what it made.
    async fn start(&self, spec: &SandboxSpec) -> Result<AgentClient>;

    /// After a supervisor restart: is the sandbox still there?
    async fn probe(&self, spec: &SandboxSpec) -> Liveness;

    /// The agent client of a sandbox that [`Backend::probe`] found running.
    fn agent(&self, spec: &SandboxSpec) -> AgentClient;

    /// Stop every process and reclaim every host resource of the sandbox.
    /// Idempotent: succeeds for a sandbox that is half-built or already gone.
    async fn destroy(&self, spec: &SandboxSpec) -> Result<()>;

    /// Ids of sandboxes this backend still holds resources for (used to reap
    /// orphans that the database no longer knows as live).
    async fn list(&self) -> Result<Vec<String>>;

    /// Warm: stop every process where it is (a VM's vCPUs, a container's
    /// cgroup); memory stays. Undone by [`Backend::resume`].
    async fn pause(&self, spec: &SandboxSpec) -> Result<()>;

    async fn resume(&self, spec: &SandboxSpec) -> Result<()>;

    /// Cold: write the sandbox's state to its directory and end its
    /// processes, releasing its memory. Undone by [`Backend::restart`].
    async fn stop(&self, spec: &SandboxSpec) -> Result<StopReport>;

    /// Bring a stopped sandbox back; returns once its agent answers.
    async fn restart(&self, spec: &SandboxSpec) -> Result<AgentClient>;

    /// Copy the sandbox's state into `dest` (a new directory). A microVM
    /// must be stopped; a container is frozen for the copy if it runs.
    async fn save_to(&self, spec: &SandboxSpec, dest: &Path) -> Result<()>;

    /// Replace the state of a stopped (or not yet created) sandbox with the
    /// one saved in `src`; [`Backend::restart`] then runs it from there.
    async fn load_from(&self, spec: &SandboxSpec, src: &Path) -> Result<()>;

    /// About how many bytes [`Backend::save_to`] would write now (without
    /// a running VM's memory, which its stop writes first), so that a
    /// snapshot far beyond a quota is refused before it is copied.
    fn snapshot_estimate(&self, _spec: &SandboxSpec) -> u64 {
        0
    }
}
