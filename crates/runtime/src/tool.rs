//! Running a host tool (qemu-img, cp) to completion with a time limit,
//! turning every way it can fail into a [`RuntimeError::Command`] that
//! names the tool and carries its stderr. Owns nothing else.

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
