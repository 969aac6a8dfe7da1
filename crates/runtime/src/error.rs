//! Errors of the runtime crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("template '{0}' not found")]
    TemplateNotFound(String),
    #[error("template '{name}' is unusable: {reason}")]
    TemplateBroken { name: String, reason: String },
    #[error("agent unavailable: {0}")]
    AgentUnavailable(String),
    #[error("agent protocol error: {0}")]
    AgentProtocol(String),
    /// The agent refused a request (a 4xx with its JSON error).
    #[error("{message}")]
    AgentRefused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("agent did not answer within {0:?}")]
    AgentTimeout(std::time::Duration),
    #[error("{tool} failed: {message}")]
    Command { tool: String, message: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    /// A host mount that is not (or no longer) a plain path below an
    /// allowed root.
    #[error(transparent)]
    HostPath(#[from] crate::hostpath::HostPathError),
    /// The operation does not apply to this sandbox.
    #[error("{0}")]
    Unsupported(String),
}

impl RuntimeError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
