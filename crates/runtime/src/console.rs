//! Sandbox console logs with a cap. A sandbox's console (a VM's serial
//! port, a container's init stdio) is written by the untrusted side, so it
//! never goes straight to a file: the supervisor drains it (a socket QEMU
//! serves, a FIFO the container holds) into `console.log`, which it rotates
//! to `console.log.1` whenever it reaches the cap. On disk: at most two
//! caps per sandbox, the newest output always kept.
//!
//! While the supervisor is down nobody drains: QEMU drops serial output
//! with no client connected, and a container's writes fill the FIFO's
//! buffer (64 KiB) and then block the writer, which only slows the sandbox
//! itself. A restart re-attaches ([`Drains::attach`]).
//!
//! Owns the two log files and the drain tasks; must not interpret the
//! bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// The console log of the sandbox whose directory is `dir`.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("console.log")
}

/// Where the log rotates to.
pub fn rotated_path(dir: &Path) -> PathBuf {
    dir.join("console.log.1")
}

/// A log file that never grows beyond `cap` bytes: reaching it renames the
/// file to `.1` (replacing the previous one) and starts a new one.
struct BoundedLog {
    path: PathBuf,
    rotated: PathBuf,
    cap: u64,
    file: tokio::fs::File,
    len: u64,
}

impl BoundedLog {
    async fn open(dir: &Path, cap: u64) -> std::io::Result<Self> {
        let path = log_path(dir);
        let file = open_append(&path).await?;
        let len = file.metadata().await?.len();
        Ok(BoundedLog {
            path,
            rotated: rotated_path(dir),
            cap: cap.max(1),
            file,
            len,
        })
    }

    async fn write(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            if self.len >= self.cap {
                self.file.flush().await?;
                tokio::fs::rename(&self.path, &self.rotated).await?;
                self.file = open_append(&self.path).await?;
                self.len = 0;
            }
            let n = ((self.cap - self.len) as usize).min(buf.len());
            self.file.write_all(&buf[..n]).await?;
            self.len += n as u64;
            buf = &buf[n..];
        }
        self.file.flush().await
    }
}

async fn open_append(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .await
}

/// Copy `r` into the sandbox's bounded console log until end of stream.
pub async fn drain(mut r: impl AsyncRead + Unpin, dir: &Path, cap: u64) {
    let mut log = match BoundedLog::open(dir, cap).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "console log: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if let Err(e) = log.write(&buf[..n]).await {
                    tracing::warn!(dir = %dir.display(), "console log: {e}");
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Connect to a unix socket that is about to appear (QEMU's console
/// chardev), then drain it; gives up after `patience`.
pub async fn drain_socket(socket: PathBuf, dir: PathBuf, cap: u64, patience: Duration) {
    let deadline = Instant::now() + patience;
    let stream = loop {
        match crate::sock::connect(&socket).await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => {
                tracing::warn!(socket = %socket.display(), "console: {e}");
                return;
            }
        }
    };
    drain(stream, &dir, cap).await
}

/// The last `max` bytes of the console (from the rotated file too when
/// the current one is shorter), lossily decoded.
pub fn tail(dir: &Path, max: u64) -> String {
    let cur = crate::container::runc::tail_bytes(&log_path(dir), max);
    let mut out = if (cur.len() as u64) < max {
        crate::container::runc::tail_bytes(&rotated_path(dir), max - cur.len() as u64)
    } else {
        vec![]
    };
    out.extend_from_slice(&cur);
    String::from_utf8_lossy(&out).trim().to_string()
}

/// The drain task of each sandbox's console, so that attaching again
/// (after a restart of the sandbox or of the supervisor) replaces it.
#[derive(Default)]
pub struct Drains {
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Drains {
    /// Run `task` as the console drain of `id`, ending any previous one.
    pub fn attach(&self, id: &str, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|_, h| !h.is_finished());
        if let Some(old) = tasks.insert(id.to_string(), handle) {
            old.abort();
        }
    }

    /// Stop draining `id` (destroy).
    pub fn detach(&self, id: &str) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = tasks.remove(id) {
            old.abort();
        }
    }

    /// Wait (bounded) for the drain of `id` to reach the end of its stream,
    /// so that everything written so far is in the log.
    pub async fn settle(&self, id: &str, limit: Duration) {
        let handle = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(mut h) = handle {
            if tokio::time::timeout(limit, &mut h).await.is_err() {
                h.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_log_rotates_at_its_cap_and_keeps_the_tail() {
        let t = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..10_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        drain(&data[..], t.path(), 1000).await;
        let cur = std::fs::metadata(log_path(t.path())).unwrap().len();
        let old = std::fs::metadata(rotated_path(t.path())).unwrap().len();
        assert!(cur <= 1000 && old <= 1000, "{cur} {old}");
        let tail = tail(t.path(), 1500);
        assert!(tail.ends_with("9999"), "{tail}");
        assert!(tail.len() > 1000, "the rotated file completes the tail");
        // Appending again continues from the current size.
        drain(&b"more\n"[..], t.path(), 1000).await;
        assert!(super::tail(t.path(), 100).ends_with("more"));
    }
}
