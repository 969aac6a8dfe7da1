//! The one trait every isolation backend implements, and the spec it takes.
//!
//! A backend owns the sandbox's processes and host resources (mounts,
//! cgroups, later taps and VM disks) and nothing else: ids, ownership and
//! status live in the server's database.

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use sandforge_api::{Isolation, Network};

use crate::agent::AgentClient;
use crate::error::Result;
use crate::template::Template;

/// A host directory to bind into the sandbox, already checked against the
/// allowed host paths and canonicalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedMount {
    pub host_path: PathBuf,
    pub guest_path: String,
    pub read_only: bool,
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
}
