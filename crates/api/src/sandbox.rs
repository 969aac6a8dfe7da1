//! Sandbox resource: create body, response object, status values, health.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::network::{chosen_egress, Egress, Network, NetworkPolicy};
use crate::{limits, validate_env, Invalid};

/// Isolation backend of a sandbox.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    Container,
    Microvm,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Container => "container",
            Isolation::Microvm => "microvm",
        }
    }
}

/// Lifecycle states (seeds 000–003).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SandboxStatus {
    Creating,
    Starting,
    Running,
    Suspended,
    Stopped,
    Failed,
    Destroyed,
}

impl SandboxStatus {
    pub const ALL: [SandboxStatus; 7] = [
        SandboxStatus::Creating,
        SandboxStatus::Starting,
        SandboxStatus::Running,
        SandboxStatus::Suspended,
        SandboxStatus::Stopped,
        SandboxStatus::Failed,
        SandboxStatus::Destroyed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Creating => "creating",
            SandboxStatus::Starting => "starting",
            SandboxStatus::Running => "running",
            SandboxStatus::Suspended => "suspended",
            SandboxStatus::Stopped => "stopped",
            SandboxStatus::Failed => "failed",
            SandboxStatus::Destroyed => "destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        // "terminated" is seed 000's word for destroyed.
        if s == "terminated" {
            return Some(SandboxStatus::Destroyed);
        }
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A host directory bound into the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    pub host_path: String,
    pub guest_path: String,
    #[serde(default)]
    pub read_only: bool,
}

/// `POST /v1/sandboxes`. All fields optional (seed 002): 1 CPU, 512 MB,
/// the `default` template, offline network.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub cpu: Option<u32>,
    #[serde(default)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub network: Option<Network>,
    /// Outbound policy (seed 001); `network_policy` is seed 003's spelling.
    #[serde(default)]
    pub egress: Option<Egress>,
    #[serde(default)]
    pub network_policy: Option<NetworkPolicy>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub template_id: Option<String>,
    #[serde(default)]
    pub isolation: Option<Isolation>,
    /// Size of a microVM's root disk (its copy-on-write overlay), MB.
    #[serde(default)]
    pub disk_mb: Option<u64>,
    /// A command run once at create, as the terminal session `init`
    /// (seed 002).
    #[serde(default)]
    pub init: Option<String>,
    /// `ephemeral` (destroyed after `timeout`) or `persistent` (suspended
    /// after `idle_timeout`), seed 001.
    #[serde(default)]
    pub mode: Option<crate::Mode>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// Never suspended by the thermal manager (seed 002).
    #[serde(default)]
    pub keep_hot: Option<bool>,
    /// Fork: a new, independent sandbox from this named snapshot (seed
    /// 003); its configuration comes from the snapshot.
    #[serde(default)]
    pub snapshot_id: Option<String>,
}

/// A create request with defaults applied and every field checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidCreate {
    pub name: Option<String>,
    /// `None`: the template's default, else [`DEFAULT_CPUS`].
    pub cpus: Option<u32>,
    /// `None`: the template's default, else [`DEFAULT_MEMORY_MB`].
    pub memory_mb: Option<u64>,
    /// `None`: the template's default.
    pub network: Option<Network>,
    /// `None`: the template's default policy.
    pub egress: Option<Egress>,
    pub mounts: Vec<Mount>,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub template: String,
    pub isolation: Option<Isolation>,
    pub disk_mb: Option<u64>,
    pub init: Option<String>,
    pub lifecycle: crate::Lifecycle,
}

pub const DEFAULT_TEMPLATE: &str = "default";
/// vCPUs of a sandbox when neither its create nor its template says.
pub const DEFAULT_CPUS: u32 = 1;
/// Memory of a sandbox when neither its create nor its template says.
pub const DEFAULT_MEMORY_MB: u64 = 512;

/// `cpu` and `cpus` (one setting, two spellings; seeds differ), checked.
pub fn validate_cpus(cpu: Option<u32>, cpus: Option<u32>) -> Result<Option<u32>, Invalid> {
    let n = match (cpu, cpus) {
        (Some(a), Some(b)) if a != b => {
            return Err(Invalid::new(
                "cpus",
                "cpu and cpus are the same setting; they disagree",
            ))
        }
        (a, b) => a.or(b),
    };
    match n {
        Some(n) if n == 0 || n > limits::MAX_CPUS => Err(Invalid::new(
            "cpu",
            format!("must be between 1 and {}", limits::MAX_CPUS),
        )),
        n => Ok(n),
    }
}

pub fn validate_memory_mb(m: Option<u64>) -> Result<Option<u64>, Invalid> {
    match m {
        Some(m) if !(limits::MIN_MEMORY_MB..=limits::MAX_MEMORY_MB).contains(&m) => {
            Err(Invalid::new(
                "memory_mb",
                format!(
                    "must be between {} and {}",
                    limits::MIN_MEMORY_MB,
                    limits::MAX_MEMORY_MB
                ),
            ))
        }
        m => Ok(m),
    }
}

pub fn validate_disk_mb(d: Option<u64>) -> Result<Option<u64>, Invalid> {
    match d {
        Some(d) if !(limits::MIN_DISK_MB..=limits::MAX_DISK_MB).contains(&d) => Err(Invalid::new(
            "disk_mb",
            format!(
                "must be between {} and {}",
                limits::MIN_DISK_MB,
                limits::MAX_DISK_MB
            ),
        )),
        d => Ok(d),
    }
}

/// Guest paths a mount may not cover (the agent's own files and kernel fs).
const RESERVED_GUEST_PATHS: [&str; 4] = ["/proc", "/sys", "/dev", "/.sandforge"];

pub fn validate_name(field: &str, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= limits::MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            field,
            format!(
                "must be 1-{} characters of [A-Za-z0-9._-], starting with a letter or digit",
                limits::MAX_NAME_LEN
            ),
        ))
    }
}

impl CreateSandbox {
    pub fn validate(self) -> Result<ValidCreate, Invalid> {
        let cpus = validate_cpus(self.cpu, self.cpus)?;
        let memory_mb = validate_memory_mb(self.memory_mb)?;
        let lifecycle = crate::Lifecycle::validate(
            self.mode,
            self.timeout.as_deref(),
            self.idle_timeout.as_deref(),
            self.keep_hot,
        )?;
        let policy_field = if self.network_policy.is_some() {
            "network_policy"
        } else {
            "egress"
        };
        let egress = chosen_egress(self.egress, self.network_policy)?;
        if egress.is_some() && self.network == Some(Network::Offline) {
            return Err(Invalid::new(
                policy_field,
                "an offline sandbox has no egress to filter",
            ));
        }
        validate_disk_mb(self.disk_mb)?;
        if let Some(i) = &self.init {
            if i.trim().is_empty() || i.len() > limits::MAX_COMMAND_BYTES {
                return Err(Invalid::new(
                    "init",
                    format!(
                        "must be a non-empty command of at most {} bytes",
                        limits::MAX_COMMAND_BYTES
                    ),
                ));
            }
        }
        if let Some(n) = &self.name {
            validate_name("name", n)?;
        }
        let template = match (self.template, self.template_id) {
            (Some(a), Some(b)) if a != b => {
                return Err(Invalid::new(
                    "template_id",
                    "template and template_id disagree",
                ))
            }
            (a, b) => a.or(b).unwrap_or_else(|| DEFAULT_TEMPLATE.to_string()),
        };
        validate_name("template", &template)?;
        validate_env("env", &self.env)?;
        if self.metadata.len() > limits::MAX_METADATA {
            return Err(Invalid::new(
                "metadata",
                format!("at most {} keys", limits::MAX_METADATA),
            ));
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || k.len() + v.len() > limits::MAX_METADATA_BYTES {
                return Err(Invalid::new(
                    format!("metadata.{k}"),
                    format!(
                        "keys must be non-empty and key+value at most {} bytes",
                        limits::MAX_METADATA_BYTES
                    ),
                ));
            }
        }
        if self.mounts.len() > limits::MAX_MOUNTS {
            return Err(Invalid::new(
                "mounts",
                format!("at most {} mounts", limits::MAX_MOUNTS),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, m) in self.mounts.iter().enumerate() {
            if !m.host_path.starts_with('/') || m.host_path.contains('\0') {
                return Err(Invalid::new(
                    format!("mounts[{i}].host_path"),
                    "must be an absolute path",
                ));
            }
            let field = format!("mounts[{i}].guest_path");
            sandforge_guest_path(&m.guest_path).map_err(|msg| Invalid::new(&field, msg))?;
            let norm = m.guest_path.trim_end_matches('/');
            if RESERVED_GUEST_PATHS
                .iter()
                .any(|r| norm == *r || norm.starts_with(&format!("{r}/")))
            {
                return Err(Invalid::new(
                    field,
                    "must not be under /proc, /sys, /dev or /.sandforge",
                ));
            }
            if !seen.insert(norm.to_string()) {
                return Err(Invalid::new(field, "two mounts use the same guest path"));
            }
        }
        Ok(ValidCreate {
            name: self.name,
            cpus,
            memory_mb,
            network: self.network,
            egress,
            mounts: self.mounts,
            env: self.env,
            metadata: self.metadata,
            template,
            isolation: self.isolation,
            disk_mb: self.disk_mb,
            init: self.init,
            lifecycle,
        })
    }
}

fn sandforge_guest_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    if p.split('/').any(|c| c == "..") {
        return Err("must not contain '..'".into());
    }
    if p.split('/').all(|c| c.is_empty() || c == ".") {
        return Err("must not be '/'".into());
    }
    if p.contains('\0') || p.len() > 4096 {
        return Err("must be at most 4096 bytes with no NUL".into());
    }
    Ok(())
}

/// The sandbox object every endpoint returns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sandbox {
    pub id: String,
    pub name: String,
    pub status: SandboxStatus,
    pub isolation: Isolation,
    /// `kvm` or `tcg` for microVMs; absent for containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    pub template: String,
    pub cpu: u32,
    pub cpus: u32,
    pub memory_mb: u64,
    /// Root disk size of a microVM (absent for containers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    pub network: Network,
    /// The egress policy in force (networked sandboxes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    /// The sandbox's address on its private network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    pub mounts: Vec<Mount>,
    /// Names of the sandbox's environment variables (values are never echoed).
    pub env_keys: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_at: String,
    pub updated_at: String,
    /// Why the sandbox is `failed`, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(default)]
    pub mode: crate::Mode,
    /// Ephemeral: when it will be destroyed (unless kept alive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Persistent: seconds of idleness before suspension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,
    #[serde(default)]
    pub keep_hot: bool,
}

/// Body of `DELETE /v1/sandboxes/{id}` (seed 000).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeleteResponse {
    pub id: String,
    pub status: String,
    pub message: String,
}

/// `GET /health` (seed 002).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub status: String,
    pub sandboxes: u64,
    pub uptime: String,
}

/// Format a duration as seed 002 does: `2h15m30s`.
pub fn format_uptime(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(json: &str) -> Result<ValidCreate, Invalid> {
        serde_json::from_str::<CreateSandbox>(json)
            .unwrap()
            .validate()
    }

    #[test]
    fn defaults_and_aliases() {
        let v = create("{}").unwrap();
        assert_eq!(
            (v.cpus, v.memory_mb, v.template.as_str()),
            (None, None, "default"),
            "left to the template, then DEFAULT_CPUS/DEFAULT_MEMORY_MB"
        );
        assert_eq!(create(r#"{"cpus":2}"#).unwrap().cpus, Some(2));
        assert_eq!(create(r#"{"cpu":2,"cpus":2}"#).unwrap().cpus, Some(2));
        assert_eq!(create(r#"{"cpu":0}"#).unwrap_err().field, "cpu");
        assert_eq!(create(r#"{"memory_mb":1}"#).unwrap_err().field, "memory_mb");
        assert_eq!(create(r#"{"cpu":2,"cpus":3}"#).unwrap_err().field, "cpus");
        assert_eq!(create(r#"{"template_id":"x"}"#).unwrap().template, "x");
    }

    #[test]
    fn bad_sizes_name_fields() {
        assert_eq!(create(r#"{"cpu":0}"#).unwrap_err().field, "cpu");
        assert_eq!(create(r#"{"memory_mb":1}"#).unwrap_err().field, "memory_mb");
        assert_eq!(create(r#"{"disk_mb":10}"#).unwrap_err().field, "disk_mb");
        assert_eq!(create(r#"{"disk_mb":4096}"#).unwrap().disk_mb, Some(4096));
        assert_eq!(create(r#"{"name":"-x"}"#).unwrap_err().field, "name");
        let e = create(r#"{"mounts":[{"host_path":"/tmp","guest_path":"/proc/x"}]}"#).unwrap_err();
        assert_eq!(e.field, "mounts[0].guest_path");
        let e = create(r#"{"mounts":[{"host_path":"tmp","guest_path":"/w"}]}"#).unwrap_err();
        assert_eq!(e.field, "mounts[0].host_path");
    }

    #[test]
    fn unknown_network_is_a_parse_error() {
        assert!(serde_json::from_str::<CreateSandbox>(r#"{"network":"wifi"}"#).is_err());
        assert!(serde_json::from_str::<CreateSandbox>(r#"{"bogus":1}"#).is_err());
    }

    #[test]
    fn statuses_and_uptime() {
        assert_eq!(
            SandboxStatus::parse("terminated"),
            Some(SandboxStatus::Destroyed)
        );
        assert_eq!(
            SandboxStatus::parse("running"),
            Some(SandboxStatus::Running)
        );
        assert_eq!(SandboxStatus::parse("nope"), None);
        assert_eq!(format_uptime(2 * 3600 + 15 * 60 + 30), "2h15m30s");
        assert_eq!(format_uptime(59), "59s");
    }
}
