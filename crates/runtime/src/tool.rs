//! Running a host tool (qemu-img, cp) to completion with a time limit,
//! turning every way it can fail into a [`RuntimeError::Command`] that
//! names the tool and carries its stderr; and giving the tools that create
//! files for a sandbox the conventional umask back. Owns nothing else.
//!
//! `unsafe` here is limited to `pre_exec` hooks that call umask(2).

use std::process::Stdio;
use std::time::Duration;

use crate::error::{Result, RuntimeError};

pub async fn run(cmd: &mut tokio::process::Command, tool: &str, limit: Duration) -> Result<()> {
    let err = |message: String| RuntimeError::Command {
        tool: tool.into(),
        message,
    };
    let out = tokio::time::timeout(limit, cmd.stdin(Stdio::null()).kill_on_drop(true).output())
        .await
        .map_err(|_| err(format!("timed out after {limit:?}")))?
        .map_err(|e| err(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// The daemon runs with umask 077 (every state file private). Children that
/// create files for a sandbox (runc in its root filesystem, virtiofsd in a
/// host mount) get 022 back, so those files get the modes a user expects.
pub fn sandbox_umask(cmd: &mut tokio::process::Command) {
    // SAFETY: the hook runs in the forked child before exec and only calls
    // umask(2), which is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
            Ok(())
        });
    }
}

/// [`sandbox_umask`] for a `std` command.
pub fn sandbox_umask_std(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: as in `sandbox_umask`: only umask(2) runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
            Ok(())
        });
    }
}
