//! Thin wrapper over the `runc` command line. Owns invoking runc with our
//! state root and turning its failures into errors; must not decide policy.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{Result, RuntimeError};

/// How long one runc invocation may take before it is treated as hung.
const RUNC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    /// runc's `--root`: its state directory for our containers.
    pub root: PathBuf,
}

impl Runc {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root);
        c.stdin(Stdio::null());
        c.kill_on_drop(true);
        crate::tool::sandbox_umask(&mut c);
        c
    }

    async fn output(&self, mut c: Command, what: &str) -> Result<std::process::Output> {
        let out = tokio::time::timeout(RUNC_TIMEOUT, c.output())
            .await
            .map_err(|_| RuntimeError::Command {
                tool: format!("runc {what}"),
                message: "timed out".into(),
            })?
            .map_err(|e| RuntimeError::Command {
                tool: format!("runc {what}"),
                message: e.to_string(),
            })?;
        Ok(out)
    }

    /// `runc run -d`: create and start detached. The container's stdio (and
    /// runc's own messages) go to `out` (the write end of the console FIFO
    /// the supervisor drains), so the container never holds a pipe only the
    /// supervisor's process keeps open, and survives the supervisor's death.
    pub async fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        out: std::fs::File,
        agent_listener: std::os::fd::OwnedFd,
    ) -> Result<()> {
        let out2 = out.try_clone().map_err(|e| RuntimeError::Command {
            tool: "runc run".into(),
            message: format!("dup of the console: {e}"),
        })?;
        let mut c = self.cmd();
        // The agent's listening socket becomes the container's fd 3.
        use command_fds::{CommandFdExt, FdMapping};
        c.fd_mappings(vec![FdMapping {
            parent_fd: agent_listener,
            child_fd: super::spec::AGENT_LISTEN_FD,
        }])
        .map_err(|e| RuntimeError::Setup(format!("passing the agent socket to runc: {e}")))?;
        c.args(["run", "-d", "--preserve-fds", "1", "--bundle"])
            .arg(bundle)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id);
        c.stdout(Stdio::from(out)).stderr(Stdio::from(out2));
        let status = tokio::time::timeout(RUNC_TIMEOUT, c.status())
            .await
            .map_err(|_| RuntimeError::Command {
                tool: "runc run".into(),
                message: "timed out".into(),
            })?
            .map_err(|e| RuntimeError::Command {
                tool: "runc run".into(),
                message: e.to_string(),
            })?;
        if status.success() {
            Ok(())
        } else {
            Err(RuntimeError::Command {
                tool: "runc run".into(),
                message: format!("{status}"),
            })
        }
    }

    /// `runc state`: the container's status string (`running`, `stopped`, ...),
    /// `None` when runc does not know the container.
    pub async fn state(&self, id: &str) -> Result<Option<String>> {
        let mut c = self.cmd();
        c.args(["state", id]);
        let out = self.output(c, "state").await?;
        if !out.status.success() {
            return Ok(None);
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| RuntimeError::Command {
                tool: "runc state".into(),
                message: e.to_string(),
            })?;
        Ok(v.get("status").and_then(|s| s.as_str()).map(str::to_string))
    }

    /// `runc kill <id> KILL`; succeeds when the container is already gone or
    /// stopped (the caller then waits for the init itself, which is faster
    /// than `delete --force`, whose kill path sleeps a fixed 100 ms).
    pub async fn kill(&self, id: &str) -> Result<()> {
        let mut c = self.cmd();
        c.args(["kill", id, "KILL"]);
        let out = self.output(c, "kill").await?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success()
            || err.contains("not exist")
            || err.contains("not running")
            || err.contains("stopped")
        {
            Ok(())
        } else {
            Err(RuntimeError::Command {
                tool: "runc kill".into(),
                message: err.trim().to_string(),
            })
        }
    }

    /// `runc delete --force`: kill every process and remove the container's
    /// cgroups and runc state. Succeeds when the container does not exist.
    pub async fn delete_force(&self, id: &str) -> Result<()> {
        let mut c = self.cmd();
        c.args(["delete", "--force", id]);
        let out = self.output(c, "delete").await?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || err.contains("does not exist") || err.contains("not exist") {
            Ok(())
        } else {
            Err(RuntimeError::Command {
                tool: "runc delete".into(),
                message: err.trim().to_string(),
            })
        }
    }

    /// `runc pause` / `runc resume` (the cgroup freezer, v1 or v2).
    pub async fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        let verb = if frozen { "pause" } else { "resume" };
        let mut c = self.cmd();
        c.args([verb, id]);
        let out = self.output(c, verb).await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RuntimeError::Command {
                tool: format!("runc {verb}"),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Container ids runc holds state for.
    pub async fn list(&self) -> Result<Vec<String>> {
        let mut c = self.cmd();
        c.args(["list", "-q"]);
        let out = self.output(c, "list").await?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .filter(|s| !s.is_empty())
            .collect())
    }
}

/// The last `max` bytes of a file, lossily decoded (for error messages).
pub fn tail_of(path: &Path, max: u64) -> String {
    String::from_utf8_lossy(&tail_bytes(path, max))
        .trim()
        .to_string()
}

/// The last `max` bytes of a file (none when it cannot be read).
pub fn tail_bytes(path: &Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Some(mut f) = open_plain_file(path) else {
        return vec![];
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    buf
}

/// Open a regular file for reading without following a symlink at its last
/// component and without blocking on a FIFO: for files in a directory a
/// sandbox's identity can write (a VM's console log and pid file).
pub fn open_plain_file(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    f.metadata().ok()?.is_file().then_some(f)
}
