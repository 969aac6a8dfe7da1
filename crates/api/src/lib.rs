//! Types of the Sandforge HTTP API, shared by the server and the CLI.
//!
//! Owns: the JSON shapes of requests and responses (seeds 000–002, accepting
//! both spellings where the seeds disagree, e.g. `cpu`/`cpus`,
//! `template`/`template_id`), the error body, and validation of requests that
//! needs no state (sizes, names, timeouts). It must not know about storage,
//! runtimes or HTTP frameworks.

pub mod dockerfile;
pub mod error;
pub mod exec;
pub mod lifecycle;
pub mod network;
pub mod sandbox;
pub mod template;

pub use error::{ErrorBody, ErrorDetail};
pub use exec::{ExecEvent, ExecRequest, ExecResponse, ExecuteRequest, ExecuteResponse, User};
pub use lifecycle::{Keepalive, Lifecycle, Mode};
pub use network::{Cidr, Egress, EgressMode, Network, NetworkPolicy, PatchSandbox};
pub use sandbox::{
    CreateSandbox, DeleteResponse, Health, Isolation, Mount, Sandbox, SandboxStatus,
};
pub use template::{
    validate_template_name, CreateTemplate, RebuildTemplate, RegistryCredentials, SaveTemplate,
    Template, TemplateDefaults, TemplateSource, TemplateStatus, ValidTemplate,
};

/// A validation failure: the offending field and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Limits enforced at the API edge (documented in the README).
pub mod limits {
    pub const MAX_CPUS: u32 = 16;
    pub const MIN_MEMORY_MB: u64 = 64;
    pub const MAX_MEMORY_MB: u64 = 65_536;
    /// A microVM's root disk; also at least its template's image.
    pub const MIN_DISK_MB: u64 = 32;
    pub const MAX_DISK_MB: u64 = 262_144;
    pub const MAX_ENV_VARS: usize = 256;
    pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
    pub const MAX_METADATA: usize = 64;
    pub const MAX_METADATA_BYTES: usize = 1024;
    pub const MAX_MOUNTS: usize = 16;
    /// Entries in each list of an egress policy.
    pub const MAX_EGRESS_ENTRIES: usize = 256;
    pub const MAX_NAME_LEN: usize = 63;
    pub const MAX_EXEC_TIMEOUT_SECS: u64 = 300;
    pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 60;
    pub const MAX_COMMAND_BYTES: usize = 128 * 1024;
    pub const MAX_ARGV: usize = 4096;
    /// Buffered exec keeps at most this much of each of stdout and stderr.
    pub const MAX_BUFFERED_OUTPUT: usize = 16 * 1024 * 1024;
    pub const MAX_STDIN_BYTES: usize = 1024 * 1024;
}

pub(crate) fn validate_env(
    field: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), Invalid> {
    if env.len() > limits::MAX_ENV_VARS {
        return Err(Invalid::new(
            field,
            format!("at most {} variables", limits::MAX_ENV_VARS),
        ));
    }
    for (k, v) in env {
        let mut chars = k.chars();
        let ok_start = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !ok_start || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(Invalid::new(
                format!("{field}.{k}"),
                "variable names must match [A-Za-z_][A-Za-z0-9_]*",
            ));
        }
        if v.len() > limits::MAX_ENV_VALUE_BYTES || v.contains('\0') {
            return Err(Invalid::new(
                format!("{field}.{k}"),
                format!(
                    "value must be at most {} bytes and contain no NUL",
                    limits::MAX_ENV_VALUE_BYTES
                ),
            ));
        }
    }
    Ok(())
}
