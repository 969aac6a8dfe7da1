//! Committing a running sandbox's root filesystem as a template (issue 12:
//! "save a sandbox as a template", and the last step of a Dockerfile
//! build). Works the same for both backends: the sandbox's agent streams a
//! tar of its own root filesystem ([`AgentClient::rootfs`]) and the host
//! applies it, as one hostile layer, with the image unpacker
//! ([`crate::image::unpack::Unpacker`]: every path resolved inside the new
//! rootfs, `..` refused, hard links only to files inside, no device nodes,
//! ownership shifted) into a staging tree `<parent>/.<name>.tmp-<rand>`,
//! renamed (NOREPLACE) to `<dest>`, `template.json` written last.
//!
//! Why through the agent: the host never walks a tree the sandbox can
//! change while it is read (a container's upper directory) nor mounts a
//! filesystem a guest wrote (a VM's ext4): the only thing it trusts is the
//! unpacker's treatment of a byte stream, which it bounds by `max_bytes`
//! (the tar stream's length, file contents plus headers).
//!
//! Must not: know templates' ids, the database or HTTP routes; leave a
//! half-made template behind.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Serialize;

use crate::agent::AgentClient;
use crate::image::unpack::Unpacker;
use crate::image::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The filesystem is bigger than the limit.
    #[error("the sandbox's filesystem is larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// The agent could not be asked, or its stream broke off.
    #[error("agent: {0}")]
    Agent(String),
    /// An entry of the stream was refused.
    #[error("{0}")]
    Layer(#[source] ImageError),
    /// The destination exists already.
    #[error("destination exists: {0}")]
    Exists(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path, source: io::Error) -> CommitError {
    CommitError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What the new template's `template.json` records besides its tree.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CommitConfig {
    /// `sandbox` (a save) or `dockerfile` (a build).
    pub source: String,
    /// Environment (`KEY=value`).
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// The template the sandbox was made from.
    pub parent: String,
    /// The sandbox the tree came from.
    pub sandbox_id: String,
}

#[derive(Serialize)]
struct Manifest<'a> {
    name: &'a str,
    source: &'a str,
    uid_shift: u32,
    shell: &'a str,
    size_mb: u64,
    size_bytes: u64,
    env: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    workdir: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    parent: &'a str,
    sandbox_id: &'a str,
}

/// Removes a path on drop unless kept.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// A blocking reader over body pieces sent by an async task, failing once
/// more than `max` bytes came.
struct PieceReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
    total: u64,
    max: u64,
    failed: Option<CommitError>,
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.total += b.len() as u64;
                    if self.total > self.max {
                        self.failed = Some(CommitError::TooLarge(self.max));
                        return Err(io::Error::other("stream over the limit"));
                    }
                    self.cur = b;
                }
                Some(Err(e)) => {
                    self.failed = Some(CommitError::Agent(e.clone()));
                    return Err(io::Error::other(e));
                }
                None => return Ok(0), // the stream ended
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// Stream the root filesystem of the sandbox behind `client` into a new
/// template at `dest` (which must not exist; its file name is the
/// template's name). Returns the template's size in bytes (the stream's).
pub async fn commit(
    client: &AgentClient,
    dest: &Path,
    uid_shift: u32,
    max_bytes: u64,
    cfg: &CommitConfig,
) -> Result<u64, CommitError> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io_err("name", dest, io::Error::other("bad destination")))?
        .to_string();
    if dest.symlink_metadata().is_ok() {
        return Err(CommitError::Exists(dest.to_path_buf()));
    }
    let parent = dest
        .parent()
        .ok_or_else(|| io_err("name", dest, io::Error::other("bad destination")))?
        .to_path_buf();
    let mut body = match client
        .rootfs(max_bytes)
        .await
        .map_err(|e| CommitError::Agent(e.to_string()))?
    {
        Ok(body) => body,
        Err((http::StatusCode::PAYLOAD_TOO_LARGE, _)) => {
            return Err(CommitError::TooLarge(max_bytes))
        }
        Err((status, message)) => return Err(CommitError::Agent(format!("{status}: {message}"))),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, String>>(16);
    let pump = tokio::spawn(async move {
        loop {
            let frame = match body.frame().await {
                None => return,
                Some(Err(e)) => {
                    let _ = tx.send(Err(format!("the stream broke off: {e}"))).await;
                    return;
                }
                Some(Ok(f)) => f,
            };
            if let Ok(data) = frame.into_data() {
                if tx.send(Ok(data)).await.is_err() {
                    return; // the unpacker stopped: dropping the body resets the stream
                }
            }
        }
    });
    let staging = parent.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
    let cfg = cfg.clone();
    let dest = dest.to_path_buf();
    let result = tokio::task::spawn_blocking(move || {
        let mut guard = Cleanup(Some(staging.clone()));
        let rootfs = staging.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(|e| io_err("create", &rootfs, e))?;
        let mut u = Unpacker::new(&rootfs, Some(uid_shift)).map_err(CommitError::Layer)?;
        let mut reader = PieceReader {
            rx,
            cur: Bytes::new(),
            total: 0,
            max: max_bytes,
            failed: None,
        };
        if let Err(e) = u.apply(&mut reader) {
            return Err(reader.failed.take().unwrap_or(CommitError::Layer(e)));
        }
        // Whatever follows the tar's end: drained (bounded), so a stream
        // error at the very end is noticed.
        let mut sink = [0u8; 64 * 1024];
        loop {
            match reader.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(reader
                        .failed
                        .take()
                        .unwrap_or(CommitError::Agent(e.to_string())))
                }
            }
        }
        let size = reader.total;
        if std::fs::symlink_metadata(rootfs.join("bin")).is_err() {
            return Err(CommitError::Layer(ImageError::Layer(
                "the saved filesystem has no /bin".into(),
            )));
        }
        let shell = if std::fs::symlink_metadata(rootfs.join("bin/bash")).is_ok()
            || std::fs::symlink_metadata(rootfs.join("usr/bin/bash")).is_ok()
        {
            "/bin/bash"
        } else {
            "/bin/sh"
        };
        std::fs::set_permissions(
            &staging,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|e| io_err("chmod", &staging, e))?;
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            &dest,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => guard.0 = Some(dest.clone()),
            Err(rustix::io::Errno::EXIST) => return Err(CommitError::Exists(dest)),
            Err(e) => return Err(io_err("rename", &dest, e.into())),
        }
        let m = Manifest {
            name: &name,
            source: &cfg.source,
            uid_shift,
            shell,
            size_mb: size.div_ceil(1 << 20),
            size_bytes: size,
            env: &cfg.env,
            workdir: cfg.workdir.as_deref(),
            user: cfg.user.as_deref(),
            parent: &cfg.parent,
            sandbox_id: &cfg.sandbox_id,
        };
        let json = serde_json::to_vec_pretty(&m).map_err(|e| io_err("encode", &dest, e.into()))?;
        let tmp = dest.join(".template.json.tmp");
        std::fs::write(&tmp, json).map_err(|e| io_err("write", &tmp, e))?;
        let manifest = dest.join("template.json");
        std::fs::rename(&tmp, &manifest).map_err(|e| io_err("rename", &manifest, e))?;
        guard.0 = None;
        Ok(size)
    })
    .await
    .unwrap_or_else(|e| Err(CommitError::Agent(format!("commit task failed: {e}"))));
    pump.abort();
    result
}
