//! The wire protocol between the supervisor and `sandforge-agent`.
//!
//! Owns: the route names, the JSON request/response bodies, the binary frame
//! codec used for streamed exec output, and the guest path rules. It must not do
//! any I/O: both ends (the agent inside a sandbox, the runtime's client on the
//! host) depend on it, so it stays pure data and pure functions.
//!
//! # Transport
//! One byte stream per sandbox (a unix socket for containers, a virtio-serial
//! port for microVMs) carries ONE HTTP/2 connection with prior knowledge. The
//! agent is the HTTP/2 server, the supervisor the client. HTTP/2 gives us
//! multiplexing (many concurrent execs, file transfers and, later, PTYs and port
//! tunnels), per-stream flow control and cancellation (a dropped stream is a
//! `RST_STREAM`, which the agent turns into killing the exec's process group).
//!
//! # Versioning
//! Every route lives under `/v{PROTOCOL_VERSION}/`. The supervisor calls
//! [`routes::INFO`] first and refuses an agent whose `proto` differs.
//! Compatible additions are optional fields: absent ones are not sent, so an
//! older agent (a running sandbox keeps the agent it started with) reads
//! every request that does not use them. An agent lists what it supports
//! beyond version 1's first shape in [`AgentInfo::features`] (e.g.
//! [`FEATURE_USER`]), for requests an older agent would silently misread.

pub mod frame;
pub mod path;
pub mod user;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use frame::{Frame, FrameDecoder, FrameError};
pub use path::{validate_guest_path, PathError};
pub use user::{Ident, UserSpec};

/// The protocol version spoken by this build; bump on incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Route names (HTTP/2 `:path`, without query).
pub mod routes {
    /// `GET` → [`super::AgentInfo`].
    pub const INFO: &str = "/v1/info";
    /// `POST` [`super::ExecRequest`] → stream of [`super::Frame`]s.
    pub const EXEC: &str = "/v1/exec";
    /// `GET`/`HEAD`/`PUT` with [`super::FileQuery`] in the query string.
    pub const FILES: &str = "/v1/files";
    /// `POST` [`super::SessionRequest`] → 201 [`super::SessionInfo`];
    /// `GET` → `[SessionInfo]`.
    pub const SESSIONS: &str = "/v1/sessions";
    /// `POST /v1/sessions/{id}/attach`: request body = input and resize
    /// frames, response body = the scrollback then live output frames, and
    /// an exit frame when the session's process ends.
    pub fn attach(id: &str) -> String {
        format!("{SESSIONS}/{id}/attach")
    }
    /// `GET` → `[ListeningPort]`: TCP ports listening in the sandbox.
    pub const PORTS: &str = "/v1/ports";
    /// `POST ?port=N`: a tunnel; request body = bytes to `localhost:N`,
    /// response body = bytes from it (502 when nothing listens).
    pub const TCP: &str = "/v1/tcp";
    /// `GET ?max_bytes=N`: the sandbox's root filesystem as a tar stream
    /// (one filesystem; mount points empty; no devices, FIFOs or sockets),
    /// aborted when its files' sizes sum past `max_bytes`.
    pub const ROOTFS: &str = "/v1/rootfs";
}

/// A TCP port listening inside the sandbox.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListeningPort {
    pub port: u16,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resize {
    pub rows: u16,
    pub cols: u16,
}

/// Start a terminal session: `argv` on a new PTY.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRequest {
    /// 1-64 characters of `[A-Za-z0-9_-]`; the agent picks one if absent.
    #[serde(default)]
    pub id: Option<String>,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    pub size: Resize,
    /// Run as this user ([`UserSpec`] syntax); root when absent. An agent
    /// without [`FEATURE_USER`] would ignore it: ask `info` first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A session as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub id: String,
    pub argv: Vec<String>,
    pub tty: bool,
    pub running: bool,
    /// Clients attached right now.
    pub attached: u32,
    /// Unix seconds.
    pub created_at: u64,
    #[serde(default)]
    pub exit_code: Option<i32>,
}

/// Whether `id` is a valid session id.
pub fn valid_session_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Serial-port resynchronisation (virtio-serial only). A byte pipe has no
/// connection boundaries: bytes of a host connection the guest has not yet
/// noticed as closed may still be queued. So before its HTTP/2 preface the
/// host sends `SANDFORGE-SYNC <nonce>\n` and discards everything it reads
/// until `SANDFORGE-ACK <nonce>\n`; the agent answers each sync line seen
/// before a preface and drops everything before the preface. The nonce is
/// 1-64 characters of `[A-Za-z0-9_-]`.
pub const SYNC_PREFIX: &[u8] = b"SANDFORGE-SYNC ";
pub const ACK_PREFIX: &[u8] = b"SANDFORGE-ACK ";

/// Response header carrying a file's total size.
pub const HDR_FILE_SIZE: &str = "x-file-size";
/// Response header carrying a file's permission bits, octal (`0644`).
pub const HDR_FILE_MODE: &str = "x-file-mode";
/// Response header: `true` when the path is a directory.
pub const HDR_FILE_ISDIR: &str = "x-file-isdir";
/// Response header: `true` when a read was cut short by offset/limit/max_bytes.
pub const HDR_TRUNCATED: &str = "x-truncated";

/// Maximum size of one uploaded file (100 MiB).
pub const MAX_FILE_BYTES: u64 = 100 * 1024 * 1024;
/// Maximum number of directory entries returned by a listing.
pub const MAX_LIST_ENTRIES: usize = 10_000;

/// `GET /v1/info`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentInfo {
    pub proto: u32,
    pub agent_version: String,
    pub pid: u32,
    /// Optional capabilities of this agent (absent from older agents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// [`AgentInfo::features`]: exec and sessions take a `user`.
pub const FEATURE_USER: &str = "user";

/// `POST /v1/exec`: run `argv` (no shell is added by the agent).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added on top of the agent's base environment (PATH, HOME, LANG, TERM).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; when absent the user's home for a user other
    /// than root (`/` if it has none), else `/root` (`/` if missing).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the whole process group after this many milliseconds.
    pub timeout_ms: u64,
    /// Bytes written to the command's stdin, then stdin is closed. Absent:
    /// stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Run as this user ([`UserSpec`] syntax), resolved by the agent
    /// against the sandbox's `/etc/passwd` and `/etc/group` (an unknown
    /// name is a 400 `unknown_user`); root when absent. Not sent when
    /// absent, so an older agent still reads the request (and refuses one
    /// with a user: this struct denies unknown fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The final frame of an exec stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExitStatus {
    /// Process exit code; `128 + signal` when it was killed by a signal (so an
    /// out-of-memory kill is 137), `127` when the program could not be started.
    pub exit_code: i32,
    /// The signal that ended the process, if any.
    #[serde(default)]
    pub signal: Option<i32>,
    /// True when the agent killed the process group because of `timeout_ms`.
    pub timed_out: bool,
    /// Why the command could not be started, if it could not.
    #[serde(default)]
    pub error: Option<String>,
}

/// Query string of `/v1/files`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct FileQuery {
    pub path: String,
    /// 1-indexed first line to return (GET).
    #[serde(default)]
    pub offset: Option<u64>,
    /// Maximum number of lines to return (GET).
    #[serde(default)]
    pub limit: Option<u64>,
    /// Maximum number of bytes to return (GET).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// List a directory instead of reading a file (GET).
    #[serde(default)]
    pub ls: Option<bool>,
    /// Octal permission bits for a PUT, default `0644`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// One entry of a directory listing (seed 002 shape). When a listing is cut
/// at [`MAX_LIST_ENTRIES`], a final sentinel entry has `truncated: true` and
/// `total` set to the real number of entries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DirEntry {
    pub name: String,
    pub size: u64,
    pub mode: String,
    pub is_dir: bool,
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// Error body of any non-2xx agent response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentError {
    /// Stable machine code: `invalid_path`, `path_escape`, `not_found`,
    /// `is_directory`, `not_directory`, `too_large`, `bad_request`, `io`,
    /// `unknown_user`.
    pub code: String,
    pub message: String,
}

/// Parse an octal mode string such as `0644` or `755` (at most `07777`).
pub fn parse_mode(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 5 {
        return None;
    }
    let m = u32::from_str_radix(s, 8).ok()?;
    (m <= 0o7777).then_some(m)
}

/// Format permission bits the way the API shows them (`0644`).
pub fn format_mode(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip() {
        assert_eq!(parse_mode("0644"), Some(0o644));
        assert_eq!(parse_mode("755"), Some(0o755));
        assert_eq!(parse_mode("4755"), Some(0o4755));
        assert_eq!(parse_mode("0999"), None);
        assert_eq!(parse_mode(""), None);
        assert_eq!(parse_mode("17777"), None);
        assert_eq!(format_mode(0o100644), "0644");
    }

    #[test]
    fn exec_request_rejects_unknown_fields() {
        let err = serde_json::from_str::<ExecRequest>(r#"{"argv":["true"],"timeout_ms":1,"x":1}"#);
        assert!(err.is_err());
    }
}
